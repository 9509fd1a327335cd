"""The fleet report: the --json schema, the comparison against the baselines, the folder and plots."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest

from cloud.controller.costmodel import CloudState, DeviceCostProfile
from pipelines.power import Radio
from simulators.fleet import FleetResult, PolicyRun, WindowRecord
from simulators.policies import PolicyInputs, policy_inputs
from simulators.policies import budget_feasibility as budget_feasibility_of
from simulators.report import (
    CLASS_KEYS,
    MECHANISM_KEYS,
    PLOTS,
    budget_verdict,
    class_stats,
    comparison,
    render_summary,
    summarize,
    timeline_device,
    write_report,
)
from simulators.scenario import DeviceSpec
from simulators.traces import Trace
from splitsense.config import ClassObjectiveConfig, Config
from tests.unit.cloud.controller.synthetic import make_catalog

POLICIES = ("adaptive", "all_local", "all_cloud", "cloud_input", "fixed_cut", "oracle")
CLASSES = ("phone", "watch")
# (latency ms, energy mJ, cut, mode) per policy: local is optimal for the phone (latency), the
# oracle offloads the watch (energy) half of the time and adaptive is close to it.
SHAPE = {
    "adaptive": {"phone": (10.0, 20.0, 7, "local"), "watch": (40.0, 9.0, 0, "offloaded")},
    "all_local": {"phone": (10.0, 20.0, 7, "local"), "watch": (30.0, 12.0, 7, "local")},
    "all_cloud": {"phone": (150.0, 900.0, 0, "offloaded"), "watch": (60.0, 15.0, 0, "offloaded")},
    "cloud_input": {"phone": (120.0, 700.0, 0, "offloaded"), "watch": (50.0, 13.0, 0, "offloaded")},
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
                codec=None if mode == "local" or in_outage else "int8" if policy == "cloud_input" else "fp32",
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


def _result(lost_one: bool = False, infeasible: dict[str, dict[str, str]] | None = None) -> FleetResult:
    specs = _specs()
    runs = {}
    for p in POLICIES:
        skip = (infeasible or {}).get(p, {})  # classes the policy cannot run on: their devices are not run
        records = [r for s in specs if s.device_class not in skip for r in _records(p, s)]
        expected = {s.device_id: 4 for s in specs if s.device_class not in skip}
        if lost_one and p == "all_cloud":
            expected[specs[0].device_id] = 5
        runs[p] = PolicyRun(p, 4.0, 4.2, expected, records, {}, {"tail_calls": 3, "mean_batch_size": 1.3}, [3])
        runs[p].infeasible = dict(skip)
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
    # one wrong window of four on the phone: 25 points below the local model, but one window in four
    # is what sampling alone moves it by (95%: 1.96 x sqrt(1) / 4 = 49 points): not a breach
    acc = phone["accuracy"]
    assert acc["points_below_local"] == pytest.approx(25.0) and acc["paired_windows"] == 4
    assert acc["noise_points_95"] == pytest.approx(49.0) and acc["met"]
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
    assert "vs oracle" in text and "same windows" in text and "noise" in text
    assert "report: /tmp/r" in text


# ---------------------------------------------------------------------------------------------
# Which mechanisms were really used


def _window(cut: int, mode: str, codec: str | None = None, level: float = 1.0, reason: str = "") -> WindowRecord:
    return WindowRecord(
        policy="adaptive",
        device_id="sim-000-watch",
        device_class="watch",
        model="fsdd_digit",
        index=0,
        t_s=0.0,
        lag_ms=0.0,
        latency_ms=10.0 * (cut + 1),
        mode=mode,
        cut=cut,
        n_stages=5,
        codec=codec,
        level=level,
        correct=True,
        bytes_sent=0 if codec is None else 100,
        compute_mj=1.0,
        radio_mj=0.0,
        wait_mj=0.0,
        true_mbps=1.0,
        estimate_mbps=1.0,
        plan_version=2,
        reason=reason,
    )


# 10 windows of a 5-stage model: 4 answered at an intermediate cut, 2 that tried one and fell back
# (a deadline, the breaker), 2 uploads of the input, 2 fully local.
MIXED = [
    _window(2, "offloaded", "int8"),
    _window(2, "offloaded", "int8", 0.7),
    _window(3, "offloaded", "ans", 0.7),
    _window(1, "offloaded", "fp16"),
    _window(2, "fallback", "int8", reason="deadline"),
    _window(3, "local", reason="circuit breaker open"),
    _window(0, "offloaded", "int8"),
    _window(0, "offloaded", "fp32"),
    _window(5, "local", reason="plan keeps the whole model on the device"),
    _window(5, "local", reason="plan keeps the whole model on the device"),
]


def test_split_ratio_counts_answered_intermediate_cuts() -> None:
    stats = class_stats(MIXED, 10)
    assert stats["split_ratio"] == 0.4  # cuts 1..4 answered by the cloud
    assert stats["split_attempt_ratio"] == 0.6  # ... plus the two that fell back
    assert stats["offload_ratio"] == 0.6
    assert stats["latency_ms_mean"] == pytest.approx(np.mean([r.latency_ms for r in MIXED]))
    assert tuple(stats) == CLASS_KEYS
    assert class_stats([_window(5, "local"), _window(0, "offloaded", "int8")], 2)["split_ratio"] == 0.0


def test_mechanisms_are_shares_per_cut_codec_level_and_fallback() -> None:
    m = class_stats(MIXED, 10)["mechanisms"]
    assert tuple(m) == MECHANISM_KEYS
    assert m["mode"] == {"fallback": 0.1, "local": 0.3, "offloaded": 0.6}
    assert m["cut"] == {"0": 0.2, "1": 0.1, "2": 0.3, "3": 0.2, "local": 0.2}
    assert list(m["cut"]) == ["0", "1", "2", "3", "local"]
    assert m["codec"] == {"ans": 0.1, "fp16": 0.1, "fp32": 0.1, "int8": 0.4, "none": 0.3}
    assert m["level"] == {"1": 0.8, "0.7": 0.2}
    assert m["fallback"] == {"circuit breaker open": 0.1, "deadline": 0.1}  # plan-local windows are not one
    assert m["stored"] == {}  # no deferred window
    for shares in m.values():
        assert all(0 <= v <= 1 for v in shares.values())
    for key in ("mode", "cut", "codec", "level"):
        assert sum(m[key].values()) == pytest.approx(1.0)
    stored = [
        _window(1, "deferred", "ans", reason="deadline"),
        _window(1, "deferred", "ans", reason="breaker"),
        _window(1, "deferred", "ans", reason="breaker"),
        _window(1, "offloaded", "ans"),
    ]
    sm = class_stats(stored, 4)["mechanisms"]
    assert sm["stored"] == {"breaker": 0.5, "deadline": 0.25} and sm["fallback"] == {}
    empty = class_stats([], 3)
    assert empty["split_ratio"] is None and empty["mechanisms"] == dict.fromkeys(MECHANISM_KEYS, {})
    assert tuple(empty) == CLASS_KEYS


def test_comparison_includes_cloud_input_and_the_split_share() -> None:
    comp = comparison(_result())
    watch = comp["watch"]
    assert watch["adaptive_vs_cloud_input"]["beats"] and watch["adaptive_vs_cloud_input"]["met"]
    assert watch["adaptive_vs_cloud_input"]["ratio"] == pytest.approx(9.0 / 13.0, abs=1e-4)
    # adaptive uploads the input as fp32, cloud_input as int8: not the same choice
    assert watch["adaptive_input_share"] == 0.0 and watch["adaptive_cloud_share"] == 0.75
    assert watch["adaptive_split_ratio"] == 0.0 and "infeasible" not in watch


# ---------------------------------------------------------------------------------------------
# Infeasible policies

NO_ROOM = "all_local needs the whole model (7 stages) on the device: 2.1 MB of weights, the node has 256 KB"


def test_an_infeasible_policy_reports_why_instead_of_figures() -> None:
    result = _result(infeasible={"all_local": {"watch": NO_ROOM}})
    out = summarize(result)
    assert out["policies"]["all_local"]["watch"] == {"infeasible": True, "reason": NO_ROOM}
    assert out["policies"]["all_local"]["phone"]["windows"] == 4  # the other class still ran
    assert tuple(out["policies"]["adaptive"]["watch"]) == CLASS_KEYS
    json.dumps(out, allow_nan=False)
    watch = comparison(result)["watch"]
    assert watch["infeasible"] == {"all_local": NO_ROOM}
    verdict = watch["adaptive_vs_all_local"]
    assert verdict["infeasible"] and verdict["reason"] == NO_ROOM and verdict["ratio"] is None and verdict["met"]
    assert watch["adaptive_vs_cloud_input"]["met"] and "accuracy" not in watch  # no local model to compare with
    assert comparison(result)["zero_lost_windows"] is True  # devices not run lose nothing


def test_a_policy_infeasible_everywhere_does_not_count_for_realtime() -> None:
    result = _result(infeasible={"all_local": {"phone": NO_ROOM, "watch": NO_ROOM}})
    assert summarize(result)["realtime_factor"] == pytest.approx(3.1 / 4.2, abs=1e-3)


def test_report_and_summary_show_infeasible_and_split(tmp_path: Path) -> None:
    from rich.console import Console

    result = _result(infeasible={"all_local": {"watch": NO_ROOM}})
    out = write_report(result, tmp_path / "report")
    report = json.loads((out / "report.json").read_text())
    assert report["policies"]["all_local"]["watch"] == {"infeasible": True, "reason": NO_ROOM}
    assert report["summary"]["policies"]["adaptive"]["watch"]["mechanisms"]["cut"] == {"0": 0.75, "local": 0.25}
    console = Console(record=True, width=200)
    render_summary(result, console)
    text = console.export_text()
    assert "split %" in text and "infeasible" in text and NO_ROOM in text
    assert "vs local: infeasible on this class" in text and "vs input x" in text and "adaptive split 0%" in text


def test_paired_accuracy_drop_counts_only_windows_answered_differently() -> None:
    from simulators.report import paired_accuracy_drop

    local = [dataclasses.replace(_window(0, "local"), index=i) for i in range(100)]
    adaptive = [dataclasses.replace(_window(0, "local"), index=i, correct=i >= 10) for i in range(100)]
    drop, noise, n = paired_accuracy_drop(adaptive, local)
    assert n == 100 and drop == pytest.approx(0.10) and noise == pytest.approx(1.96 * math.sqrt(10) / 100)
    assert drop * 100 > 1.0 + noise * 100  # 10 points lost on 100 windows is a real breach
    assert paired_accuracy_drop(adaptive, []) == (0.0, 0.0, 0)


# ---------------------------------------------------------------------------------------------
# The device's bandwidth estimate against the truth


def test_estimate_error_is_estimate_over_true_on_the_windows_that_sent_on_a_live_link() -> None:
    def sent(estimate: float, true: float, mode: str = "offloaded", codec: str | None = "int8") -> WindowRecord:
        return dataclasses.replace(_window(0, mode, codec), estimate_mbps=estimate, true_mbps=true)

    counted = [sent(float(k), 1.0) for k in range(1, 10)] + [sent(10.0, 1.0, "deferred")]  # ratios 1..10
    ignored = [
        sent(5.0, 0.0),  # sent into an outage: no true bandwidth to compare with
        sent(5.0, 1.0, "fallback"),  # the cloud never answered
        sent(5.0, 1.0, "local", None),  # nothing sent
    ]
    err = class_stats(counted + ignored, 13)["estimate_error"]
    ratios = np.arange(1.0, 11.0)
    assert err == {
        "median_ratio": pytest.approx(float(np.median(ratios))),
        "p10_ratio": pytest.approx(float(np.percentile(ratios, 10))),
        "p90_ratio": pytest.approx(float(np.percentile(ratios, 90))),
        "windows": 10,
    }
    assert class_stats(ignored, 3)["estimate_error"] is None  # none to judge: null, the key stays
    assert class_stats([], 3)["estimate_error"] is None


def test_summary_and_report_give_each_offloading_policy_its_estimate_error(tmp_path: Path) -> None:
    from rich.console import Console

    result = _result()
    out = summarize(result)
    # the watch's adaptive windows: estimate 2 Mbit/s on a 1, 3 and 4 Mbit/s link (the outage window ran locally)
    err = out["policies"]["adaptive"]["watch"]["estimate_error"]
    assert err["windows"] == 3 and err["median_ratio"] == pytest.approx(2 / 3, abs=1e-4)
    assert err["p10_ratio"] == pytest.approx(0.5333, abs=1e-4) and err["p90_ratio"] == pytest.approx(1.7333, abs=1e-4)
    assert out["policies"]["all_local"]["watch"]["estimate_error"] is None  # never offloads
    assert out["policies"]["cloud_input"]["phone"]["estimate_error"]["windows"] == 3
    report = json.loads((write_report(result, tmp_path / "r") / "report.json").read_text())
    assert report["policies"]["adaptive"]["watch"]["estimate_error"] == err
    console = Console(record=True, width=200)
    render_summary(result, console)
    text = console.export_text()
    assert "watch adaptive estimate/true: median 0.67 (p10 0.53, p90 1.73) over 3 offloaded windows" in text
    assert "phone adaptive estimate/true" not in text  # adaptive keeps the phone local


# ---------------------------------------------------------------------------------------------
# Budgets no choice can meet

SLOW_WATCH = DeviceCostProfile("watch", speed_factor=100.0, active_mw=400.0, idle_mw=25.0, radio=Radio.WIFI)
WATCH_DEADLINE = ClassObjectiveConfig("energy", deadline_ms=300.0)  # the fixture's watch: least energy within 300 ms


def _watch_inputs(fp32_bytes: list[int]) -> PolicyInputs:
    # local: 2 stages x 5 ms x 100 = 1000 ms, never within 300 ms; what offloading takes depends on the bytes
    return policy_inputs(make_catalog([5.0, 5.0], fp32_bytes), SLOW_WATCH, WATCH_DEADLINE, 20.0, CloudState())


def _with_inputs(result: FleetResult, inputs: PolicyInputs, *, watch_extra_ms: float = 0.0) -> FleetResult:
    for run in result.runs.values():
        run.records = [
            dataclasses.replace(r, latency_ms=r.latency_ms + watch_extra_ms) if r.device_class == "watch" else r
            for r in run.records
        ]
    result.extra["policy_inputs"] = {"watch": inputs}
    return result


def test_budget_feasibility_is_the_planners_test_per_bandwidth() -> None:
    small = _watch_inputs([1000, 100])  # the input goes up in ~110 ms at 1 Mbit/s; nothing goes up at 0
    feas = budget_feasibility_of(small, [0.0, 1.0, 3.0, 0.0])
    assert feas.budget == "deadline" and feas.limit == 300.0
    assert feas.feasible.tolist() == [False, True, True, False] and feas.share == 0.5
    assert feas.least[0] == pytest.approx(1000.0) and feas.least[1] < 300.0
    huge = _watch_inputs([10_000_000, 100])  # 80 Mbit: seconds at any of these rates
    assert not budget_feasibility_of(huge, [1.0, 4.0]).feasible.any()
    assert budget_feasibility_of(huge, []).share is None


def test_a_budget_infeasible_at_some_windows_says_so_instead_of_exceeded() -> None:
    from rich.console import Console

    result = _with_inputs(_result(), _watch_inputs([1000, 100]), watch_extra_ms=400.0)
    budget = comparison(result)["watch"]["budget"]
    # the watch's windows at 1, 0 (outage), 3 and 4 Mbit/s: no choice answers within 300 ms in the outage
    assert budget["feasible_share"] == 0.75 and budget["windows"] == 4
    assert budget["least_where_infeasible"] == pytest.approx(1000.0)  # local, the only choice at 0 Mbit/s
    assert not any(budget["within"].values())  # every policy's mean is over the deadline ...
    verdict = budget_verdict(budget)  # ... but the summary does not say "exceeded by" all of them
    assert verdict == (
        "infeasible for every choice at 25% of windows (the least any choice reached there: median 1000 ms); "
        "no policy within it on average"
    )
    console = Console(record=True, width=300)
    render_summary(result, console)
    assert f"latency_ms_mean <= 300: {verdict}" in " ".join(console.export_text().split())


def test_a_budget_no_choice_ever_meets_is_infeasible_at_every_window() -> None:
    result = _with_inputs(_result(), _watch_inputs([10_000_000, 100]), watch_extra_ms=400.0)
    budget = comparison(result)["watch"]["budget"]
    assert budget["feasible_share"] == 0.0
    verdict = budget_verdict(budget)
    assert verdict.startswith("infeasible for every choice at 100% of windows") and "exceeded" not in verdict


def test_a_feasible_budget_keeps_its_exceeded_verdict() -> None:
    # feasible at every window (no outage in these bandwidths) but two policies over it on average
    budget = {"within": {"adaptive": True, "all_cloud": False, "oracle": True, "fixed_cut": False}}
    assert budget_verdict({**budget, "feasible_share": 1.0}) == "exceeded by all_cloud, fixed_cut"
    assert budget_verdict({**budget, "feasible_share": None}) == "exceeded by all_cloud, fixed_cut"
    everyone = {"within": {"adaptive": False, "oracle": False}, "feasible_share": 1.0}
    assert budget_verdict(everyone) == (
        "exceeded by adaptive, oracle (though the cost model had a choice within it at every window)"
    )
    # the 1,000-device scale run: both policies over the sensor node's latency budget on a host
    # that could not carry either run; the words name the host, not only the cost model
    assert budget_verdict(everyone, ["adaptive", "all_cloud"]) == (
        "exceeded by adaptive, oracle (the cost model had a choice within it at every window, on a host "
        "short of cores for adaptive: see the real-time verdicts)"
    )
    partly = {**budget, "feasible_share": 0.996, "least_where_infeasible": None}
    assert budget_verdict(partly) == "infeasible for every choice at <1% of windows; exceeded by all_cloud, fixed_cut"
    # without the class's policy inputs the report cannot tell: no share, the old verdict
    plain = comparison(_result())["watch"]["budget"]
    assert plain["feasible_share"] is None and plain["windows"] is None and budget_verdict(plain) == "all within"


def test_where_nothing_the_device_holds_can_run_there_is_no_least_value() -> None:
    # the node holds no front at all: in the outage nothing runs; on the link the input goes up
    cat = make_catalog([5.0, 5.0], [1000, 100])
    no_room = {(1, 1.0): "no room", (2, 1.0): "no room"}
    inputs = policy_inputs(cat, SLOW_WATCH, WATCH_DEADLINE, 20.0, CloudState(), no_room)
    assert budget_feasibility_of(inputs, [0.0]).least.tolist() == [math.inf]
    budget = comparison(_with_inputs(_result(), inputs))["watch"]["budget"]
    assert budget["feasible_share"] == 0.75 and budget["least_where_infeasible"] is None
    assert budget_verdict(budget) == "infeasible for every choice at 25% of windows; every policy within it on average"


def test_the_summary_says_why_windows_were_lost() -> None:
    from rich.console import Console

    from simulators.report import realtime

    result = _result()
    run = result.runs["adaptive"]
    if run.lost == 0:  # the fixture answers every window: take one away
        run.records.pop()
    run.lost_by_reason = {"expired": run.lost}
    rt = realtime(result)["adaptive"]
    assert rt["lost"] == run.lost > 0 and rt["lost_by_reason"] == {"expired": run.lost}
    console = Console(record=True, width=250)
    render_summary(result, console)
    assert f"lost windows: {sum(r.lost for r in result.runs.values())} (adaptive: expired {run.lost})" in (
        console.export_text()
    )


def test_a_run_that_fell_behind_on_a_saturated_host_says_so() -> None:
    from rich.console import Console

    from simulators.report import realtime

    result = _result()
    run = result.runs["adaptive"]
    assert realtime(result)["adaptive"]["capacity"] is None, "no accounting: no verdict"
    run.host_cpu = {"busy_cpu_s": 7.9, "busy_share": 0.97, "cores": 2.0}
    cap = realtime(result)["adaptive"]["capacity"]
    assert run.realtime_factor < 0.99  # the fixture's run ends late
    assert cap["verdict"] == "saturated" and "infeasible on this host" in cap["why"]
    console = Console(record=True, width=250)
    render_summary(result, console)
    assert "adaptive: saturated" in console.export_text()
    assert realtime(result)["adaptive"]["lost_by_reason"] == {}
    run.host_cpu = {"busy_cpu_s": 2.0, "busy_share": 0.3, "cores": 2.0}
    assert realtime(result)["adaptive"]["capacity"]["verdict"] == "fell behind"
    assert cap["cpu_ms_per_window"] == pytest.approx(1000 * 7.9 / len(run.records), abs=1e-3)
