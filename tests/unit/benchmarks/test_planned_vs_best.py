"""`bench planner`: its pure parts (candidates, bounds, the planner as the bench runs it, the
summary, the table, the CLI); tests/integration/benchmarks/ makes one tiny run through the real path."""

from __future__ import annotations

import json
from typing import Any

import pytest
from rich.console import Console
from typer.testing import CliRunner

from benchmarks import planned_vs_best as bench_planner
from benchmarks.planned_vs_best import (
    TARGET_RATIO,
    PlannerBenchConfig,
    bench_planner_config,
    candidate_choices,
    choice_label,
    cloud_overhead_ms,
    lower_bound_ms,
    parse_bandwidths,
    parse_classes,
    planned_row,
    render,
    summarize,
)
from cloud.controller.costmodel import Choice, CloudState, LinkState, estimate
from cloud.controller.inputs import cost_profile
from cloud.controller.planner import inputs_from_config, plan_fleet
from pipelines.catalog import ModelCatalog, load_catalog
from pipelines.codecs import Codec
from pipelines.devices import DEVICE_CLASSES
from splitsense.cli import app
from splitsense.config import Config, PlannerConfig
from splitsense.errors import ConfigError

MODEL = "fsdd_speaker"


@pytest.fixture(scope="module")
def catalog() -> ModelCatalog:
    return load_catalog(MODEL)


def test_parse_and_check_arguments() -> None:
    assert parse_bandwidths("0.1, 1,50") == (0.1, 1.0, 50.0)
    assert parse_classes("watch,phone") == ("watch", "phone")
    for bad in ("", "x", "0", "-1,2", "inf"):
        with pytest.raises(ConfigError):
            parse_bandwidths(bad)
    with pytest.raises(ConfigError, match="unknown device class 'toaster'"):
        parse_classes("phone,toaster")
    with pytest.raises(ConfigError, match="twice"):
        PlannerBenchConfig(bandwidths_mbps=(1.0, 1.0))
    for kwargs in ({"windows": 0}, {"warmup": -1}, {"promotion": "maybe"}, {"compute_time": "x"},
                   {"rtt_ms": {"watch": -5}}, {"device_classes": ()}):  # fmt: skip
        with pytest.raises(ConfigError):
            PlannerBenchConfig(**kwargs)  # type: ignore[arg-type]


def test_candidates_are_every_cut_with_fp32_and_int8_then_local(catalog: ModelCatalog) -> None:
    cands = candidate_choices(catalog)
    n = catalog.n_stages
    assert len(cands) == 2 * n + 1 and len(set(cands)) == len(cands)
    assert cands[-1] == Choice(n) and {c.codec for c in cands[:-1]} == {Codec.FP32, Codec.INT8}
    assert all(c.level == 1.0 for c in cands)
    assert choice_label(catalog, Choice(n)) == "local"
    assert choice_label(catalog, Choice(0, 1.0, Codec.INT8)) == "cut 0 (input) int8"
    assert choice_label(catalog, Choice(2, 0.9, Codec.FP16)) == "cut 2 (decoder) fp16 level 0.9"
    assert choice_label(catalog, Choice(1, 1.0, Codec.ANS)) == "cut 1 (encoder) ans"


def test_lower_bound_is_device_plus_promotion_rtt_and_serialisation() -> None:
    assert lower_bound_ms(12.0, offload=False, rtt_ms=50.0, up_bytes=1e6, bandwidth_mbps=1.0) == 12.0
    # 10 kB + 2 kB at 1 Mbit/s = 96 ms on the wire
    got = lower_bound_ms(5.0, offload=True, promotion_ms=79.0, rtt_ms=20.0, up_bytes=10_000, down_bytes=2_000,
                         bandwidth_mbps=1.0)  # fmt: skip
    assert got == pytest.approx(5.0 + 79.0 + 20.0 + 96.0)


def test_cloud_overhead_is_the_median_round_trip_minus_the_catalog_tail(catalog: ModelCatalog) -> None:
    tail0 = sum(catalog.stage_latency_ms)
    tail3 = sum(catalog.stage_latency_ms[3:])
    overhead, per = cloud_overhead_ms({(0, "fp32"): tail0 + 9.0, (3, "int8"): tail3 + 7.0, (3, "fp32"): tail3 + 8.0},
                                      catalog)  # fmt: skip
    assert (
        overhead == pytest.approx(8.0)
        and per["0/fp32"] == pytest.approx(9.0)
        and set(per)
        == {
            "0/fp32",
            "3/fp32",
            "3/int8",
        }
    )
    assert cloud_overhead_ms({(0, "fp32"): 0.0}, catalog)[0] == 0.0  # never negative
    with pytest.raises(ConfigError):
        cloud_overhead_ms({}, catalog)


def test_the_bench_plans_each_cell_at_its_own_bandwidth_for_least_latency(catalog: ModelCatalog) -> None:
    grid = (50.0, 0.1, 1.0, 5.0)
    base = Config().planner
    pcfg = bench_planner_config(base, ("watch", "phone"), grid)
    assert pcfg.bandwidth_edges_mbps == (0.1, 1.0, 5.0, 50.0)
    assert set(pcfg.classes) == {"watch", "phone"}
    for name, obj in pcfg.classes.items():
        assert obj.objective == "latency" and obj.energy_budget_mw is None and obj.deadline_ms is None
        assert obj.accuracy_budget_points == base.classes[name].accuracy_budget_points
    cloud = CloudState(overhead_ms=3.0)
    devices = {n: cost_profile(DEVICE_CLASSES[n]) for n in ("watch", "phone")}
    rtt = {"watch": 20.0, "phone": 70.0}
    plan_set = plan_fleet(inputs_from_config(pcfg, devices, rtt, [catalog], cloud))
    for name in devices:
        for bw in grid:
            row = planned_row(plan_set, MODEL, name, bw, pcfg)
            assert row.min_bandwidth_mbps == bw  # planned at the cell's own bandwidth
            choice = Choice(row.cut, row.compression_energy_kept, row.codec)
            best = min(
                estimate(catalog, devices[name], LinkState(bw, rtt[name]), cloud, c).total_ms
                for c in candidate_choices(catalog)
            )
            own = estimate(catalog, devices[name], LinkState(bw, rtt[name]), cloud, choice).total_ms
            assert row.predicted_latency_ms == pytest.approx(own)
            assert own <= best + 1e-9  # least latency (it may choose beyond the candidates)
    with pytest.raises(ConfigError, match="no plan"):
        planned_row(plan_set, MODEL, "iot_board", 1.0, PlannerConfig())


def _cell(cls: str, bw: float, ratio: float | None, tele: float | None = 1.0) -> dict[str, Any]:
    best = {"choice": "local", "measured_ms": 100.0} if ratio is not None else None
    return {
        "device_class": cls,
        "bandwidth_mbps": bw,
        "host_front_ms": 3.0,
        "planned": {"choice": "cut 0 (input) int8", "predicted_ms": 90.0,
                    "measured_ms": None if ratio is None else 100.0 * ratio},
        "planned_with_telemetry": {"choice": "local", "measured_ms": 100.0},
        "best": best,
        "ratio": ratio,
        "ratio_with_telemetry": tele,
        "within_10pct": ratio is not None and ratio <= TARGET_RATIO,
        "candidates": [{"choice": "local", "error": "boom"}] if ratio is None else [{"choice": "local"}],
        "measured_candidates": 1,
        "seconds": 0.5,
    }  # fmt: skip


def test_summary_counts_cells_within_ten_percent() -> None:
    cells = [_cell("watch", 0.5, 1.4, 1.0), _cell("watch", 5, 1.0), _cell("phone", 5, 1.1, 1.05)]
    s = summarize(cells)
    assert s["cells"] == 3 and s["max_ratio"] == 1.4 and s["cells_within_10pct"] == 2
    assert s["within_10pct"] == pytest.approx(2 / 3, abs=1e-4) and not s["met"]
    assert s["worst"] == {"device_class": "watch", "bandwidth_mbps": 0.5, "ratio": 1.4,
                          "planned": "cut 0 (input) int8", "best": "local"}  # fmt: skip
    assert s["with_telemetry"] == {"max_ratio": 1.05, "within_10pct": 1.0, "cells_within_10pct": 3}
    ok = summarize([_cell("watch", 5, 1.0), _cell("phone", 5, 1.09)])
    assert ok["met"] and ok["max_ratio"] == 1.09
    broken = summarize([_cell("watch", 5, None, None), _cell("phone", 5, 1.0)])
    assert not broken["met"] and broken["cells_without_ratio"] == 1
    assert summarize([])["max_ratio"] is None and not summarize([])["met"]


def _result(cells: list[dict[str, Any]]) -> dict[str, Any]:
    config = {
        "model": MODEL,
        "tails": "in-process",
        "windows": 2,
        "host_front_ms": {"calibrated_at_start": 3.0, "catalog": 1.46, "ratio": 2.05},
        "simulated_hardware": "device compute = stages x speed factor",
        "promotion_note": "added",
        "cloud": {"overhead_ms": 2.0},
        "preprocessing": "excluded on both sides",
    }
    return {"config": config, "cells": cells, "summary": summarize(cells)}


def test_render_prints_every_cell_and_the_verdict() -> None:
    console = Console(record=True, width=250)
    render(_result([_cell("watch", 0.5, 1.4), _cell("phone", 5, 1.0), _cell("iot_board", 1, None, None)]), console)
    text = console.export_text()
    assert "watch" in text and "iot_board" in text and "1.400" in text and "n/a" in text
    assert "1/3 cells within 10%" in text and "missed" in text and "boom" in text


def test_cli_prints_the_json_of_the_bench(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}

    def fake(bench: PlannerBenchConfig, cfg: Any, progress: Any = None) -> dict[str, Any]:
        seen["bench"] = bench
        return _result([_cell("watch", 2.0, 1.0)])

    monkeypatch.setattr(bench_planner, "run_planner_bench", fake)
    runner = CliRunner()
    args = ["bench", "planner", "--json", "--in-process", "--bandwidths", "2", "--classes", "watch", "--windows", "3"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert set(out) == {"config", "cells", "summary"} and out["summary"]["cells"] == 1
    b = seen["bench"]
    assert b.bandwidths_mbps == (2.0,) and b.device_classes == ("watch",) and b.windows == 3 and not b.with_ray
    table = runner.invoke(app, ["bench", "planner", "--in-process", "--classes", "watch"])
    assert table.exit_code == 0 and "bench planner" in table.stdout
    bad = runner.invoke(app, ["bench", "planner", "--bandwidths", "fast"])
    assert bad.exit_code == 2 and "--bandwidths" in bad.output and "Traceback" not in bad.output
