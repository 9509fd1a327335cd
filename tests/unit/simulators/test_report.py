"""The fleet report: the --json schema, the comparison against the baselines, the folder and plots."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from simulators.fleet import FleetResult, PolicyRun, WindowRecord
from simulators.report import (
    CLASS_KEYS,
    PLOTS,
    class_stats,
    comparison,
    render_summary,
    summarize,
    timeline_device,
    write_report,
)
from simulators.scenario import DeviceSpec
from simulators.traces import Trace
from splitsense.config import Config

POLICIES = ("adaptive", "all_local", "all_cloud", "fixed_cut", "oracle")
CLASSES = ("phone", "watch")
# (latency ms, energy mJ, cut, mode) per policy: local is optimal for the phone (latency), the
# oracle offloads the watch (energy) half of the time and adaptive is close to it.
SHAPE = {
    "adaptive": {"phone": (10.0, 20.0, 7, "local"), "watch": (40.0, 9.0, 0, "offloaded")},
    "all_local": {"phone": (10.0, 20.0, 7, "local"), "watch": (30.0, 12.0, 7, "local")},
    "all_cloud": {"phone": (150.0, 900.0, 0, "offloaded"), "watch": (60.0, 15.0, 0, "offloaded")},
    "fixed_cut": {"phone": (10.5, 20.0, 7, "local"), "watch": (30.0, 12.0, 7, "local")},
    "oracle": {"phone": (9.8, 19.0, 7, "local"), "watch": (35.0, 8.5, 0, "offloaded")},
}


def _config() -> Config:
    return Config.from_dict(
        {
            "planner": {
                "classes": {
                    "phone": {"objective": "latency", "deadline_ms": 300.0},
                    "watch": {"objective": "energy", "deadline_ms": 300.0},
                }
            },
            "simulator": {
                "models": {"phone": "fsdd_digit", "watch": "uci_har"},
                "devices": 2,
                "device_classes": list(CLASSES),
                "duration_s": 4.0,
                "outages": [[1.0, 2.0]],
            },
        }
    )


def _specs() -> list[DeviceSpec]:
    trace = Trace(name="steps", family="test", times_s=np.array([0.0, 2.0]), mbps=np.array([1.0, 8.0]), duration_s=4.0)
    return [
        DeviceSpec(i, f"sim-{i:03d}-{c}", c, "fsdd_digit" if c == "phone" else "uci_har", trace, 0.5, 3, 0.1, i)
        for i, c in enumerate(CLASSES)
    ]


def _records(policy: str, spec: DeviceSpec, n: int = 4) -> list[WindowRecord]:
    lat, energy, cut, mode = SHAPE[policy][spec.device_class]
    out = []
    for i in range(n):
        # the oracle and adaptive go local for the window in the outage
        in_outage = i == 1 and policy in ("adaptive", "oracle") and spec.device_class == "watch"
        out.append(
            WindowRecord(
                policy=policy,
                device_id=spec.device_id,
                device_class=spec.device_class,
                model=spec.model,
                index=i,
                t_s=0.1 + i,
                lag_ms=0.0,
                latency_ms=lat + i,
                mode="local" if in_outage else mode,
                cut=7 if in_outage else cut,
                n_stages=7,
                codec=None if mode == "local" or in_outage else "fp32",
                level=1.0,
                correct=not (policy == "adaptive" and i == 3 and spec.device_class == "phone"),
                bytes_sent=0 if mode == "local" else 1000,
                compute_mj=energy * 0.5,
                radio_mj=energy * 0.4,
                wait_mj=energy * 0.1,
                true_mbps=0.0 if i == 1 else 1.0 + i,
                estimate_mbps=2.0,
                plan_version=3 if policy == "adaptive" else 0,
                reason="" if mode == "offloaded" else "plan keeps the whole model on the device",
            )
        )
    return out


def _result(lost_one: bool = False) -> FleetResult:
    specs = _specs()
    runs = {}
    for p in POLICIES:
        records = [r for s in specs for r in _records(p, s)]
        expected = {s.device_id: 4 for s in specs}
        if lost_one and p == "all_cloud":
            expected[specs[0].device_id] = 5
        runs[p] = PolicyRun(p, 4.0, 4.2, expected, records, {}, {"tail_calls": 3, "mean_batch_size": 1.3}, [3])
    return FleetResult(
        config=_config(),
        specs=specs,
        runs=runs,
        objectives={"phone": "latency", "watch": "energy"},
        backend="in_process",
        host_stage_ms={"fsdd_digit": [0.1] * 7},
        cloud_overhead_ms=1.0,
        wall_s=25.0,
    )


def test_summary_has_exactly_the_documented_schema() -> None:
    out = summarize(_result(), Path("/tmp/r"))
    assert set(out) == {"config", "objective", "policies", "realtime_factor"}
    assert out["objective"] == {"phone": "latency", "watch": "energy"}
    assert set(out["policies"]) == set(POLICIES)
    for classes in out["policies"].values():
        assert set(classes) == set(CLASSES)
        for stats in classes.values():
            assert tuple(stats) == CLASS_KEYS
            assert stats["windows"] == 4 and stats["lost"] == 0
    assert out["policies"]["all_cloud"]["phone"]["offload_ratio"] == 1.0
    assert out["policies"]["adaptive"]["phone"]["accuracy"] == 0.75
    assert out["config"]["devices"] == 2 and out["config"]["report_dir"] == "/tmp/r"
    assert out["realtime_factor"] == pytest.approx(3.1 / 4.2, abs=1e-3)  # last window due at 3.1 s
    json.dumps(out, allow_nan=False)


def test_lost_windows_are_counted_per_class() -> None:
    out = summarize(_result(lost_one=True))
    assert out["policies"]["all_cloud"]["phone"]["lost"] == 1
    assert comparison(_result(lost_one=True))["zero_lost_windows"] is False
    assert comparison(_result())["zero_lost_windows"] is True


def test_class_stats_of_no_windows() -> None:
    stats = class_stats([], 3)
    assert stats["windows"] == 0 and stats["lost"] == 3 and stats["accuracy"] is None


def test_comparison_judges_each_class_on_its_objective() -> None:
    comp = comparison(_result())
    phone, watch = comp["phone"], comp["watch"]
    assert phone["metric"] == "mean latency (ms)" and watch["metric"] == "mean energy per window (mJ)"
    # phone: local is optimal throughout (the oracle never offloads): adaptive ties all_local
    assert phone["oracle_local_share"] == 1.0
    assert not phone["adaptive_vs_all_local"]["beats"] and phone["adaptive_vs_all_local"]["ties_where_optimal"]
    assert phone["adaptive_vs_all_local"]["met"] and phone["adaptive_vs_all_cloud"]["beats"]
    # watch: adaptive beats both on energy, and is within 15% of the oracle
    assert watch["adaptive_vs_all_local"]["beats"] and watch["adaptive_vs_all_cloud"]["beats"]
    assert watch["adaptive_vs_oracle"]["met"]
    assert watch["values"]["adaptive"] == pytest.approx(9.0)
    # the watch minimises energy within its 300-ms deadline; the phone has no energy budget here
    assert watch["budget"]["what"] == "latency_ms_mean <= 300"
    assert watch["budget"]["within"]["adaptive"] is True
    # one wrong window of four on the phone: 25 points below the local model
    assert phone["accuracy"]["points_below_local"] == pytest.approx(25.0) and not phone["accuracy"]["met"]
    assert watch["accuracy"]["met"]


def test_timeline_device_is_the_one_that_changed_its_mind() -> None:
    spec = timeline_device(_result())
    assert spec is not None and spec.device_class == "watch"  # offloaded, then local in the outage


def test_write_report_writes_json_windows_and_plots(tmp_path: Path) -> None:
    result = _result()
    out = write_report(result, tmp_path / "report")
    report = json.loads((out / "report.json").read_text())  # strict JSON: no NaN or Infinity
    assert report["summary"]["policies"]["oracle"]["watch"]["windows"] == 4
    assert report["comparison"]["watch"]["adaptive_vs_oracle"]["met"] is True
    assert "speed factor" in report["simulated_hardware"]["note"]
    assert set(report["simulated_hardware"]["classes"]) == set(CLASSES)
    assert report["config"]["simulator"]["outages"] == [[1.0, 2.0]]
    assert report["realtime"]["adaptive"]["broker"]["mean_batch_size"] == 1.3
    timeline = report["timeline"]
    assert timeline["device"]["device_class"] == "watch"
    assert len(timeline["bandwidth"]["t_s"]) == len(timeline["bandwidth"]["mbps"]) > 10
    assert min(timeline["bandwidth"]["mbps"]) == 0.0  # the outage
    assert len(timeline["windows"]["adaptive"]) == 4
    lines = (out / "windows.jsonl").read_text().splitlines()
    assert len(lines) == len(POLICIES) * 2 * 4
    assert all(math.isfinite(json.loads(line)["energy_mj"]) for line in lines)
    for name in PLOTS:
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, name


def test_render_summary_prints_the_table_and_verdicts() -> None:
    from rich.console import Console

    console = Console(record=True, width=160)
    render_summary(_result(), console, Path("/tmp/r"))
    text = console.export_text()
    assert "all_cloud" in text and "watch" in text
    assert "vs oracle" in text and "NOT MET" in text  # the phone's accuracy in this toy run
    assert "report: /tmp/r" in text
