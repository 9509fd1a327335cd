"""`bench planner`: one tiny run through the real path (the broker and the link emulator on real
gRPC sockets, the device's own transport, in-process tails) has the schema."""

from __future__ import annotations

import math

import pytest

from benchmarks.planned_vs_best import PlannerBenchConfig, run_planner_bench
from pipelines.catalog import load_catalog
from splitsense.config import Config

pytestmark = pytest.mark.integration

MODEL = "fsdd_speaker"


def test_tiny_run_through_the_real_path_has_the_schema() -> None:
    bench = PlannerBenchConfig(model=MODEL, device_classes=("watch",), bandwidths_mbps=(20.0,), windows=1,
                               warmup=0, with_ray=False)  # fmt: skip
    result = run_planner_bench(bench)
    assert set(result) == {"config", "cells", "summary"}
    c = result["config"]
    assert c["model"] == MODEL and c["tails"] == "in-process" and c["cloud"]["overhead_ms"] >= 0
    assert c["device_classes"]["watch"]["rtt_ms"] == Config().simulator.rtt_ms["wifi"]
    (cell,) = result["cells"]
    assert cell["device_class"] == "watch" and cell["bandwidth_mbps"] == 20.0
    for key in ("planned", "planned_with_telemetry", "best", "ratio", "ratio_with_telemetry", "candidates"):
        assert key in cell
    assert len(cell["candidates"]) >= 2 * load_catalog(MODEL).n_stages + 1 and cell["ratio"] >= 1.0
    local = next(x for x in cell["candidates"] if x["choice"] == "local")
    assert local["measured_ms"] > 0 and "network_ms" not in local  # always measured, never offloaded
    offloaded = [x for x in cell["candidates"] if "network_ms" in x]
    assert offloaded and all(x["promotion_ms"] == pytest.approx(79.1) for x in offloaded)  # WiFi, 1-s windows
    assert all(x["wire_bytes_up"] > 0 for x in offloaded)
    for x in cell["candidates"]:
        assert ("measured_ms" in x) != ("skipped" in x) or "error" in x
        assert math.isfinite(x["lower_bound_ms"])
    s = result["summary"]
    assert s["cells"] == 1 and s["max_ratio"] == cell["ratio"]
