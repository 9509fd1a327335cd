"""deploy/grafana/splitsense.json against a real Prometheus that scraped a short fleet run.

The fleet is the "smoke" scenario (four devices, one per class) under two policies, all_cloud then
adaptive, against the real CloudStack (broker, Redis, controller; the broker's and the controller's
metrics on one exporter) with the in-process tails, and a Debian Prometheus scraping that exporter
every second. One model's tail calls (the phone's, uci_har) are made slower than the devices'
300 ms deadline, so that the broker misses a deadline and then sheds on that lane and the phone
falls back: the shed and fallback panels get data of their own. The scenario's link outage is
left out: with it the phone's second offload can land in the outage, and then nothing is shed.

Then, for every PromQL expression in the dashboard (every panel target and annotation), with the
template variables set to "All":
    - Prometheus's /api/v1/query parses and evaluates it (no error);
    - every metric name it selects is one Prometheus has scraped (/api/v1/label/__name__/values);
    - every panel returns at least one series (one of its targets may be empty: "deferred" needs an
      outage, the plan annotation a publication within its window), and each label a legend names
      ({{label}}) is a label of the series its target returned.
And every template variable's label_values() query finds values.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

import numpy as np
import pytest

from cloud.backend import InProcessTailBackend, ModelRegistry
from cloud.stack import CloudStack, with_ports
from simulators.fleet import FleetRunner
from simulators.scenario import load_scenario
from tests.unit.deploy import dashboard as d

pytestmark = pytest.mark.integration

_LEGEND = re.compile(r"\{\{\s*(\w+)\s*\}\}")

SLOW_MODEL = "uci_har"  # the phone's
SLOW_TAIL_S = 0.9  # > the 300 ms deadline, < broker.backend_timeout_ms (1 s)
TIME_LIMIT_S = 170.0  # the whole test: ~30 s here, 60 s on a loaded machine


class SlowTail:
    """The in-process tails, `SLOW_MODEL`'s slower than any deadline. Its first window misses its
    deadline; the lane's batch-time estimate then predicts a miss, so the next windows are shed until
    the estimate is old enough for a probe (broker.admission_probe_after_ms), which misses again."""

    def __init__(self, inner: InProcessTailBackend) -> None:
        self.inner = inner

    async def run_tail(self, model: str, cut: int, batch: np.ndarray) -> np.ndarray:
        if model == SLOW_MODEL:
            await asyncio.sleep(SLOW_TAIL_S)
        return await self.inner.run_tail(model, cut, batch)

    async def close(self) -> None:
        await self.inner.close()


def _api(base: str, path: str, **params: str) -> Any:
    """GET a Prometheus API path; its JSON also when it answers 400/422 (a query it refused)."""
    url = f"{base}{path}?{urllib.parse.urlencode(params)}"
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        return json.loads(e.read())


def _scalar(base: str, query: str) -> float | None:
    result = _api(base, "/api/v1/query", query=query)["data"]["result"]
    return float(result[0]["value"][1]) if result else None


async def _scraped_after(base: str, target: str, t: float, timeout_s: float = 15.0) -> None:
    """Wait for a scrape of `target` that started after unix time `t`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        ts = await asyncio.to_thread(_scalar, base, f'max(timestamp(up{{instance="{target}"}} == 1))')
        if ts is not None and ts > t:
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"Prometheus did not scrape {target} after {t:.1f} within {timeout_s} s")


def _check_dashboard(base: str) -> tuple[list[str], dict[str, int]]:
    """Every problem found, and the number of series each panel returned."""
    dash = d.load()
    values = d.all_values(dash)
    exported = set(_api(base, "/api/v1/label/__name__/values")["data"])
    problems: list[str] = []
    series: dict[str, int] = {}
    titles = {p["id"]: p["title"] for p in d.panels(dash)}
    for q in d.queries(dash):
        expr = d.substitute(q.expr, values)
        answer = _api(base, "/api/v1/query", query=expr)
        if answer.get("status") != "success":
            problems.append(f"{q.where}: Prometheus refused it ({answer.get('error')}): {expr}")
            continue
        missing = d.metric_names(expr) - exported
        if missing:
            problems.append(f"{q.where}: names metrics Prometheus never scraped: {sorted(missing)}")
        result = answer["data"]["result"]
        if q.panel_id is not None:
            title = titles[q.panel_id]
            series[title] = series.get(title, 0) + len(result)
        labels = set().union(*(r["metric"] for r in result)) if result else set()
        absent = set(_LEGEND.findall(q.legend)) - labels if result else set()
        if absent:
            problems.append(f"{q.where}: the legend names labels its series do not have: {sorted(absent)}")
    for title, n in series.items():
        if n == 0:
            problems.append(f"panel {title!r}: no series after the fleet run")
    for name, query in d.variable_queries(dash).items():
        selector, label = d.label_values_query(d.substitute(query, values))
        if selector is None:
            found = set(_api(base, f"/api/v1/label/{label}/values")["data"])
        else:
            missing = d.metric_names(selector) - exported
            if missing:
                problems.append(f"variable ${name}: names metrics Prometheus never scraped: {sorted(missing)}")
            answer = _api(base, "/api/v1/series", **{"match[]": selector})
            found = {s[label] for s in answer.get("data", []) if label in s}
        if not found:
            problems.append(f"variable ${name}: {query!r} found no values")
    return problems, series


async def test_every_dashboard_query_runs_against_a_scraped_fleet(prometheus_server: Any) -> None:
    overrides = {
        "simulator": {"policies": ["all_cloud", "adaptive"], "outages": []},
        # local_tail off: the slow tail must be what the phone's windows meet (an idle lane would
        # otherwise run them in the broker and nothing would be shed); a probe only every 30 s:
        # after the first miss the lane sheds (with the default 1 s, phones every 2.56 s could each
        # meet a stale estimate and probe instead: a CI run once shed nothing)
        "broker": {
            "auth_secret": "dashboard-integration-secret-0123",
            "local_tail": False,
            "admission_probe_after_ms": 30_000.0,
        },
    }
    config = with_ports(load_scenario("smoke", overrides))
    runner = FleetRunner(config, backend="in_process")
    runner.traces()
    preparing = asyncio.ensure_future(asyncio.to_thread(runner.prepare))
    backend = SlowTail(InProcessTailBackend(ModelRegistry(config.serving.models)))
    try:
        async with asyncio.timeout(TIME_LIMIT_S), CloudStack(config, backend=backend) as stack:
            target = stack.metrics_address
            prometheus_server.add_targets([target], name="stack")
            await preparing
            await _scraped_after(prometheus_server.url, target, time.time())
            result = await runner.run(stack)
            assert all(run.lost == 0 for run in result.runs.values())
            await _scraped_after(prometheus_server.url, target, time.time())
            problems, series = await asyncio.to_thread(_check_dashboard, prometheus_server.url)
    finally:
        await backend.close()
    assert not problems, "\n".join(problems)
    assert len(series) >= 20, series
