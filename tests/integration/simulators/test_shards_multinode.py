"""Issue 12: `splitsense simulate --shards 2 --reuse --ray-address ...` on a real two-node Ray cluster.

The same command a fleet operator runs on one machine, pointed at a cluster started with
`ray start --block` (tests/integration/ray_cluster.py: a head with 2 logical CPUs and a worker
with 1, on this machine, token authentication on). The cloud joins that cluster too: the Ray
Serve tails deploy on it, the broker runs in the command's process. Checked: the shard actors ran
on both nodes (a STRICT_SPREAD placement group: an actor's own SPREAD is only best effort), every
shard's windows were answered, none lost, for both policies, and the report merges the shards into
one run per policy.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from splitsense.config import REPO_ROOT
from tests.integration.ray_cluster import LocalRayCluster

pytestmark = [pytest.mark.integration, pytest.mark.slow]

HEAD_CPUS, WORKER_CPUS = 2, 1


def test_a_sharded_fleet_runs_on_a_two_node_cluster(tmp_path: Path) -> None:
    pytest.importorskip("ray")
    cluster = LocalRayCluster(tmp_path)
    try:
        cluster.start("head", HEAD_CPUS)
        cluster.start("worker", WORKER_CPUS)
        out = tmp_path / "report"
        cmd = [sys.executable, "-m", "splitsense.cli", "simulate", "--scenario", "smoke", "--json",
               "--shards", "2", "--reuse", "--devices", "8", "--duration", "5", "--outages", "",
               "--policy", "adaptive,all_cloud", "--report-dir", str(out),
               "--ray-address", cluster.address]  # fmt: skip
        env = {**cluster.env, "COLUMNS": "150"}
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=420, env=env, cwd=REPO_ROOT)
        assert proc.returncode == 0, proc.stderr[-3000:]
        summary = json.loads(proc.stdout)
    finally:
        cluster.stop()
    fleet = summary["config"]["fleet"]
    assert fleet["mode"] == "sharded" and fleet["shards"] == 2 and fleet["reuse"] is True
    assert fleet["placement"].startswith("STRICT_SPREAD"), fleet["placement"]
    assert len(fleet["nodes"]) == 2, f"both nodes ran a shard (STRICT_SPREAD): {fleet['nodes']}"
    report = json.loads((out / "report.json").read_text())
    for policy in ("adaptive", "all_cloud"):
        rt = report["realtime"][policy]
        assert [s["shard"] for s in rt["shards"]] == [0, 1]
        assert all(s["windows"] > 0 and s["lost"] == 0 for s in rt["shards"]), rt["shards"]
        assert rt["windows"] == sum(s["windows"] for s in rt["shards"])
    placed = {"nodes": fleet["nodes"], "shard_devices": fleet["shard_devices"]}
    print("\nshards on a two-node cluster:", json.dumps(placed))
