"""Every metric name that the alert rules, the dashboard and the controller's queries use is one
the exporters write, as client_python names it (splitsense/metric_names.py): the exporters alone
spell the names. (The integration test tests/integration/deploy/test_dashboard.py also runs every
dashboard query against a real Prometheus after a fleet run.)"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry

from cloud.controller.loop import ControllerMetrics
from cloud.controller.metrics_source import MetricNames
from cloud.metrics import BrokerMetrics
from edge.metrics import EdgeMetrics
from splitsense.metric_names import NAMESPACE, exposed_name, exposed_names, sample_names
from tests.unit.deploy import dashboard as d

PROMETHEUS_OWN = {"up"}  # series Prometheus writes itself for every scrape target
PROMETHEUS = Path(__file__).resolve().parents[3] / "deploy" / "prometheus"


def exported() -> set[str]:
    names: set[str] = set()
    for holder in (
        BrokerMetrics(CollectorRegistry()),
        ControllerMetrics(CollectorRegistry()),
        EdgeMetrics("uci_har", "phone", CollectorRegistry()),
    ):
        names |= sample_names(holder)
    return names


def alert_exprs() -> list[tuple[str, str]]:
    rules = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())
    return [(r.get("alert") or r["record"], r["expr"]) for g in rules["groups"] for r in g["rules"]]


def test_every_exporter_uses_the_namespace() -> None:
    for name in exported():
        assert name.startswith(f"{NAMESPACE}_"), name


@pytest.mark.parametrize(("rule", "expr"), alert_exprs())
def test_alert_rules_name_exported_metrics(rule: str, expr: str) -> None:
    used = d.metric_names(expr)
    assert used, f"{rule}: selects no metric"
    assert used <= exported() | PROMETHEUS_OWN, f"{rule}: not exported: {sorted(used - exported() - PROMETHEUS_OWN)}"


def test_alert_unit_tests_feed_exported_series() -> None:
    tests = yaml.safe_load((PROMETHEUS / "alerts_test.yml").read_text())
    series = {s["series"].split("{")[0].strip() for t in tests["tests"] for s in t.get("input_series", [])}
    assert series and series <= exported() | PROMETHEUS_OWN, sorted(series - exported() - PROMETHEUS_OWN)


def test_dashboard_names_exported_metrics() -> None:
    values = d.all_values(d.load())
    used = set().union(*(d.metric_names(d.substitute(q.expr, values)) for q in d.queries(d.load())))
    assert used and used <= exported(), sorted(used - exported())


def test_controller_reads_the_brokers_names() -> None:
    names = BrokerMetrics.names()
    read = {getattr(MetricNames(), f.name) for f in fields(MetricNames)}
    assert read <= set(names.values())
    assert MetricNames().shed == names["shed"] == "splitsense_broker_shed_total"


def test_exposed_name_follows_client_python() -> None:
    m = BrokerMetrics(CollectorRegistry())
    assert exposed_name(m.shed) == "splitsense_broker_shed_total"  # counter: _total
    assert exposed_name(m.request_duration) == "splitsense_broker_request_duration_seconds"  # histogram: base
    assert exposed_name(m.in_flight) == "splitsense_broker_requests_in_flight"  # gauge
    assert exposed_names(m)["device_windows"] == "splitsense_device_windows_total"
    assert {"splitsense_broker_request_duration_seconds_bucket", "splitsense_broker_shed_total"} <= sample_names(m)
