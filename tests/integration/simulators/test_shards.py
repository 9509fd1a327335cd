"""A sharded fleet through `splitsense simulate --shards 2 --reuse`: both shards ran, nothing lost.

Eight devices x 5 s x two policies (adaptive, all_cloud) in two Ray actors against one cloud (the
real CloudStack with the in-process tails, so that only the shards need Ray), fronts reused: the
report merges the shards into one run per policy and says which mode ran.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def test_two_shards_one_report(tmp_path: Path) -> None:
    out = tmp_path / "report"
    cmd = [sys.executable, "-m", "splitsense.cli", "simulate", "--scenario", "smoke", "--in-process", "--json",
           "--shards", "2", "--reuse", "--devices", "8", "--duration", "5", "--outages", "",
           "--policy", "adaptive,all_cloud", "--report-dir", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env={**os.environ, "COLUMNS": "150"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    fleet = summary["config"]["fleet"]
    assert fleet["mode"] == "sharded" and fleet["shards"] == 2 and fleet["reuse"] is True
    assert fleet["shard_devices"] == [4, 4]  # a phone, a board, a watch, a node each
    assert sum(s["hits"] for r in fleet["reuse_stats"] for s in r.values()) > 0  # fronts were reused
    report = json.loads((out / "report.json").read_text())
    windows = [json.loads(line) for line in (out / "windows.jsonl").read_text().splitlines()]
    for policy in ("adaptive", "all_cloud"):
        rt = report["realtime"][policy]
        assert [s["shard"] for s in rt["shards"]] == [0, 1]  # both shards ran ...
        assert all(s["windows"] > 0 and s["lost"] == 0 and s["devices"] == 4 for s in rt["shards"])
        assert rt["windows"] == sum(s["windows"] for s in rt["shards"])  # ... and were merged
        assert rt["event_loop_lag_ms"]["p95"] == max(s["loop_lag_ms"]["p95"] for s in rt["shards"])
        assert not rt["device_errors"]
        devices = {w["device_id"] for w in windows if w["policy"] == policy}
        assert len(devices) == 8
        for cls, stats in summary["policies"][policy].items():
            assert stats["lost"] == 0, (policy, cls)
    # the cloud computed the offloaded windows: all_cloud offloads, the broker batched them
    assert report["realtime"]["all_cloud"]["broker"]["windows_batched"] > 0
    assert report["realtime"]["all_cloud"]["offloaded_windows_per_s"] > 0
