"""deploy/grafana/splitsense.json read without any server: its shape, its variables, and the
PromQL helpers the integration test (tests/integration/deploy/test_dashboard.py) relies on. Whether
every query parses and names only exported metrics is that test's job, against a real Prometheus."""

from __future__ import annotations

import pytest

from tests.unit.deploy import dashboard as d

DASH = d.load()
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


def test_panels_are_complete() -> None:
    ids = [p["id"] for p in DASH["panels"]]
    assert len(ids) == len(set(ids))
    found = list(d.panels(DASH))
    assert len(found) >= 20
    for p in found:
        where = p["title"]
        assert p["datasource"] == DATASOURCE, where
        assert p["fieldConfig"]["defaults"].get("unit"), f"{where}: no unit"
        assert p.get("description"), f"{where}: no description"
        assert p["targets"] and all(t["expr"].strip() and t["datasource"] == DATASOURCE for t in p["targets"]), where
        assert len({t["refId"] for t in p["targets"]}) == len(p["targets"]), where
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0, where


def test_variables_are_defined_and_used() -> None:
    names = [v["name"] for v in DASH["templating"]["list"]]
    assert names[0] == "datasource" and DASH["templating"]["list"][0]["query"] == "prometheus"
    assert {"class", "model"} <= set(d.variable_queries(DASH))
    values = d.all_values(DASH)
    used: set[str] = set()
    for q in d.queries(DASH):
        used |= d.variables_used(q.expr)
        assert "$" not in d.substitute(q.expr, values), q.where
    for query in d.variable_queries(DASH).values():
        used |= d.variables_used(query)
    assert used <= set(names) | set(d.BUILTINS), used - set(names) - set(d.BUILTINS)
    assert {"class", "model", "__rate_interval"} <= used


def test_only_splitsense_metrics() -> None:
    values = d.all_values(DASH)
    names = set().union(*(d.metric_names(d.substitute(q.expr, values)) for q in d.queries(DASH)))
    assert names and all(n.startswith("splitsense_") for n in names), names


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ('sum by (le, model) (rate(a_bucket{model=~"x|y", cut!="0"}[1m]))', {"a_bucket"}),
        ("histogram_quantile(0.99, sum by (le) (rate(a_bucket[5m]))) > 1e3", {"a_bucket"}),
        ("a / on (device_class, model) group_left b * 0 or c offset 5m", {"a", "b", "c"}),
        ("time() - max(last_ts) and bool_up == bool 1", {"last_ts", "bool_up"}),
        ('changes(max(v)[2m:]) > 0 unless absent(w{job="x by (y)"})', {"v", "w"}),
        ("clamp_min(x:recorded:rate5m - inf, 0)", {"x:recorded:rate5m"}),
    ],
)
def test_metric_names(expr: str, names: set[str]) -> None:
    assert d.metric_names(expr) == names


def test_substitute_and_label_values() -> None:
    values = {"class": ".*", "__rate_interval": "1m"}
    got = d.substitute('rate(x{c=~"$class", k=~"${class}", j=~"[[class]]"}[$__rate_interval])', values)
    assert got == 'rate(x{c=~".*", k=~".*", j=~".*"}[1m])'
    with pytest.raises(KeyError, match=r"\$nope"):
        d.substitute("x{a=~'$nope'}", values)
    assert d.label_values_query('label_values(m{a=~"$b"}, model)') == ('m{a=~"$b"}', "model")
    assert d.label_values_query("label_values(job)") == (None, "job")
