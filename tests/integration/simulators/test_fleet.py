"""A tiny fleet through `splitsense simulate`: every policy, an outage in the middle, no window lost.

Three devices (a phone, an IoT board and a watch) x 6 s x all five policies, each behind its own
trace-driven link, with every link down from 2 s to 4 s (the "smoke" scenario). The cloud is the
real CloudStack (broker, embedded Redis, metrics exporter, controller) with the in-process tails
to stay fast: Ray Serve is covered by the cloud's own integration tests. One run of the command,
checked from its stdout (exactly one JSON object), its stderr and its report folder.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from simulators.report import CLASS_KEYS, PLOTS

pytestmark = pytest.mark.integration

POLICIES = ("adaptive", "all_local", "all_cloud", "cloud_input", "fixed_cut", "oracle")
CLASSES = ("phone", "iot_board", "watch", "sensor_node")
NODE = "sensor_node"  # holds only the shared encoder: no local model, stores and forwards offline


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("fleet") / "report"
    cmd = [sys.executable, "-m", "splitsense.cli", "simulate", "--scenario", "smoke", "--in-process", "--json",
           "--report-dir", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env={**os.environ, "COLUMNS": "150"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)  # stdout is exactly one JSON object
    windows = [json.loads(line) for line in (out / "windows.jsonl").read_text().splitlines()]
    report = json.loads((out / "report.json").read_text())
    return {"summary": summary, "windows": windows, "report": report, "stderr": proc.stderr, "dir": out}


def _of(run: dict[str, Any], policy: str) -> list[dict[str, Any]]:
    return [w for w in run["windows"] if w["policy"] == policy]


def test_summary_schema_and_no_lost_window(run: dict[str, Any]) -> None:
    s = run["summary"]
    assert set(s) == {"config", "objective", "policies", "realtime_factor"}
    assert set(s["objective"]) == set(CLASSES) and set(s["objective"].values()) <= {"latency", "energy"}
    assert tuple(s["policies"]) == POLICIES
    for policy, classes in s["policies"].items():
        assert tuple(classes) == CLASSES, policy
        for cls, stats in classes.items():
            if policy == "all_local" and cls == NODE:  # the whole model does not fit the node
                assert stats["infeasible"] is True and "flash budget of sensor_node" in stats["reason"]
                continue
            assert tuple(k for k in stats if k != "task_accuracy") == CLASS_KEYS
            assert stats["lost"] == 0 and stats["windows"] > 0, policy
    node = s["policies"]["adaptive"][NODE]
    assert node["split_ratio"] > 0.5 and node["task_accuracy"]["fsdd_digit"] > 0.9  # one code, two tasks
    assert s["config"]["devices"] == 4 and s["config"]["outages"] == [[2.0, 4.0]]
    assert 0.8 < s["realtime_factor"] <= 1.0
    assert run["report"]["comparison"]["zero_lost_windows"] is True
    for policy in POLICIES:  # one progress line per policy on stderr (not a terminal)
        assert f"{policy}: " in run["stderr"] and "lost 0" in run["stderr"]


def test_same_inputs_under_every_policy(run: dict[str, Any]) -> None:
    def ran_everywhere(p: str) -> list[dict[str, Any]]:  # all_local has no windows on the node
        return [w for w in _of(run, p) if w["device_class"] != NODE]

    keys = {p: sorted((w["device_id"], w["index"]) for w in ran_everywhere(p)) for p in POLICIES}
    assert len({tuple(k) for k in keys.values()}) == 1  # the same windows of the same devices
    truth = {p: sorted((w["device_id"], w["index"], w["correct"]) for w in ran_everywhere(p)) for p in POLICIES}
    assert truth["all_cloud"] == truth["all_local"]  # fp32 offload: the local model's predictions


def test_the_policies_do_what_they_say(run: dict[str, Any]) -> None:
    assert all(
        w["mode"] == "local" and w["cut"] == w["n_stages"] and w["bytes_sent"] == 0 for w in _of(run, "all_local")
    )
    cloud = _of(run, "all_cloud")
    # the node stores what it cannot send as the bottleneck's code (cut 1), forwarded later
    assert all(w["cut"] == 0 or w["mode"] == "deferred" for w in cloud)
    assert any(w["mode"] == "offloaded" for w in cloud)
    # windows that found every link down (2-4 s) were finished on the device or stored, none lost
    in_outage = [w for w in cloud if 2.0 <= w["t_s"] < 3.6 and w["true_mbps"] == 0.0]
    assert in_outage and all(w["mode"] in ("fallback", "local", "deferred") for w in in_outage)
    assert any(w["mode"] == "deferred" and w["device_class"] == NODE for w in in_outage)
    for w in _of(run, "oracle"):  # the oracle knows when nothing gets through
        if w["true_mbps"] == 0.0 and w["device_class"] != NODE:
            assert w["cut"] == w["n_stages"]
    for device in {w["device_id"] for w in _of(run, "fixed_cut")}:  # one cut for the whole run
        assert len({w["cut"] for w in _of(run, "fixed_cut") if w["device_id"] == device}) == 1
    assert max(w["plan_version"] for w in _of(run, "adaptive")) > 1  # the controller's plans


def test_energy_is_accounted(run: dict[str, Any]) -> None:
    for w in run["windows"]:
        assert w["compute_mj"] > 0 and w["radio_mj"] >= 0 and w["wait_mj"] >= 0
        if w["bytes_sent"] > 0:
            assert w["radio_mj"] > 0
    assert sum(w["radio_mj"] for w in _of(run, "all_local")) == 0
    assert sum(w["radio_mj"] for w in _of(run, "all_cloud")) > 0


def test_report_folder(run: dict[str, Any]) -> None:
    report = run["report"]
    assert report["summary"]["policies"] == run["summary"]["policies"]
    assert "speed factor" in report["simulated_hardware"]["note"]
    assert report["timeline"]["device"]["device_id"] in {w["device_id"] for w in run["windows"]}
    for name in PLOTS:
        assert (run["dir"] / name).stat().st_size > 10_000


def test_inline_link_end_to_end(tmp_path: Path) -> None:
    """The smoke fleet with `--link inline` (no proxy: each device's transport waits out the same
    link model in process), adaptive and all_cloud, the 2-4 s outage included: nothing lost, the
    outage's windows finished on the device or stored, and the devices' link estimates sane."""
    out = tmp_path / "report"
    cmd = [sys.executable, "-m", "splitsense.cli", "simulate", "--scenario", "smoke", "--in-process", "--json",
           "--link", "inline", "--policy", "adaptive,all_cloud", "--report-dir", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env={**os.environ, "COLUMNS": "150"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    assert summary["config"]["link"] == "inline" and summary["config"]["outages"] == [[2.0, 4.0]]
    for policy, classes in summary["policies"].items():
        for cls, stats in classes.items():
            assert stats["lost"] == 0 and stats["windows"] > 0, (policy, cls)
    assert 0.8 < summary["realtime_factor"] <= 1.0
    windows = [json.loads(line) for line in (out / "windows.jsonl").read_text().splitlines()]
    cloud = [w for w in windows if w["policy"] == "all_cloud"]
    offloaded = [w for w in cloud if w["mode"] == "offloaded"]
    assert offloaded and {w["device_class"] for w in offloaded} >= {"phone", "sensor_node"}
    in_outage = [w for w in cloud if 2.0 <= w["t_s"] < 3.6 and w["true_mbps"] == 0.0]
    assert in_outage and all(w["mode"] in ("fallback", "local", "deferred") for w in in_outage)
    # what the devices estimate of their links (a prior, then their own calls through the inline
    # link) stays within a factor of a few of the truth, as through the proxy
    ratios = sorted(w["estimate_mbps"] / w["true_mbps"] for w in windows if w["bytes_sent"] and w["true_mbps"] > 0)
    assert ratios and all(0.0 < r for r in ratios)
    assert 0.25 <= ratios[len(ratios) // 2] <= 2.0, ratios
    for w in offloaded:  # a round trip through the link: at least its RTT (the smoke's radios: 20 ms or more)
        assert w["latency_ms"] >= 20.0, w
