"""Reading deploy/grafana/splitsense.json as Prometheus will see it; shared by the dashboard tests.

`queries` lists every PromQL expression the dashboard holds (panel targets, repeated panels and
collapsed rows included, and annotations), `variable_queries` the template variables' queries
(Grafana's `label_values(...)`), `substitute` fills in the variables the way Grafana does for
"All" (their allValue) and fixed values for Grafana's built-ins, and `metric_names` finds the
metric names an expression selects (PromQL's own grammar, less what the dashboard does not use:
no `__name__` matchers).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DASHBOARD = Path(__file__).resolve().parents[3] / "deploy" / "grafana" / "splitsense.json"

# Grafana's built-in interval variables, as a 1 s-scrape test Prometheus needs them: wide enough
# that rate() over a short fleet run sees every sample of it.
BUILTINS = {"__rate_interval": "1m", "__interval": "15s", "__range": "5m"}

_KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool",
    "and", "or", "unless", "atan2", "inf", "nan",
}  # fmt: skip
_STRING = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_BRACKETS = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_IDENT = re.compile(r"(?<![\w.:])([A-Za-z_:][\w:]*)(\s*\()?")
_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\[\[(\w+)(?::\w+)?\]\]|\$(\w+)")
_LABEL_VALUES = re.compile(r"^\s*label_values\(\s*(?:(.+),\s*)?(\w+)\s*\)\s*$", re.S)


@dataclass(frozen=True)
class Query:
    where: str  # "panel 'Title' A", "annotation 'Name'"
    expr: str
    panel_id: int | None = None
    legend: str = ""


def load(path: Path = DASHBOARD) -> dict[str, Any]:
    return dict(json.loads(path.read_text()))


def panels(dashboard: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel but the rows, those inside collapsed rows included."""
    for p in dashboard.get("panels", []):
        if p.get("type") == "row":
            yield from p.get("panels", [])
        else:
            yield p


def queries(dashboard: Mapping[str, Any]) -> list[Query]:
    out = []
    for p in panels(dashboard):
        for t in p.get("targets", []):
            where = f"panel {p['title']!r} {t.get('refId', '?')}"
            out.append(Query(where, t["expr"], p["id"], t.get("legendFormat", "")))
    for a in dashboard.get("annotations", {}).get("list", []):
        if a.get("expr"):
            out.append(Query(f"annotation {a['name']!r}", a["expr"]))
    return out


def variable_queries(dashboard: Mapping[str, Any]) -> dict[str, str]:
    """name -> query of every `query` template variable."""
    out = {}
    for v in dashboard.get("templating", {}).get("list", []):
        if v.get("type") == "query":
            q = v["query"]
            out[v["name"]] = q["query"] if isinstance(q, dict) else q
    return out


def all_values(dashboard: Mapping[str, Any]) -> dict[str, str]:
    """What each query variable becomes with "All" selected (its allValue), plus BUILTINS."""
    out = dict(BUILTINS)
    for v in dashboard.get("templating", {}).get("list", []):
        if v.get("type") == "query":
            if not v.get("includeAll") or not v.get("allValue"):
                raise ValueError(f"template variable {v['name']!r} needs includeAll and an allValue")
            out[v["name"]] = v["allValue"]
    return out


def substitute(expr: str, values: Mapping[str, str]) -> str:
    """`$name`, `${name}`, `${name:format}` and `[[name]]` replaced; KeyError naming an unknown one."""

    def one(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2) or m.group(3)
        if name not in values:
            raise KeyError(f"{expr!r} uses ${name}, which the dashboard does not define")
        return values[name]

    return _VARIABLE.sub(one, expr)


def variables_used(expr: str) -> set[str]:
    return {m.group(1) or m.group(2) or m.group(3) for m in _VARIABLE.finditer(expr)}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (not functions, keywords or label names)."""
    s = _STRING.sub('""', expr)
    s = _MATCHERS.sub(" ", s)  # label matchers
    s = _BRACKETS.sub(" ", s)  # range and subquery durations
    s = _GROUPING.sub(" ", s)  # by (...), on (...), group_left (...)
    names = set()
    for m in _IDENT.finditer(s):
        name, call = m.group(1), m.group(2)
        if call or name in _KEYWORDS:
            continue
        names.add(name)
    return names


def label_values_query(query: str) -> tuple[str | None, str]:
    """Grafana's `label_values(selector, label)` (or `label_values(label)`) -> (selector, label)."""
    m = _LABEL_VALUES.match(query)
    if m is None:
        raise ValueError(f"not a label_values(...) query: {query!r}")
    return m.group(1), m.group(2)
