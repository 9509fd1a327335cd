"""The sharded fleet's pure parts: which shard runs a device, merging the shards' runs, the mode."""

from __future__ import annotations

import pytest

from simulators.fleet import PolicyRun, WindowRecord
from simulators.shards import ShardCloud, fleet_mode, merge_runs, shard_of, shard_strategy
from splitsense.config import Config
from splitsense.errors import ConfigError


def _record(device: str, index: int, t_s: float, mode: str = "offloaded") -> WindowRecord:
    return WindowRecord(
        policy="adaptive", device_id=device, device_class="phone", model="uci_har", index=index, t_s=t_s,
        lag_ms=0.0, latency_ms=10.0, mode=mode, cut=0, n_stages=3, codec="fp32", level=1.0, correct=True,
        bytes_sent=100, compute_mj=1.0, radio_mj=1.0, wait_mj=0.0, true_mbps=5.0, estimate_mbps=5.0,
        plan_version=2, reason="",
    )  # fmt: skip


def _run(devices: dict[str, int], wall_s: float, lag_p95: float, *, missing: int = 0, version: int = 2) -> PolicyRun:
    records = [
        _record(d, i, float(i), "offloaded" if i % 2 else "local")
        for d, n in devices.items()
        for i in range(n - (missing if d == next(iter(devices)) else 0))
    ]
    return PolicyRun(
        policy="adaptive",
        duration_s=10.0,
        wall_s=wall_s,
        windows_expected=dict(devices),
        records=records,
        device_errors={},
        broker={},
        plan_versions=[version],
        loop_lag_ms={"p50": 1.0, "p95": lag_p95, "p99": lag_p95 + 1, "max": lag_p95 + 5},
        radio_overhead_mj={d: 0.5 for d in devices},
    )


def test_devices_go_to_shards_by_rounds_of_classes() -> None:
    assert [shard_of(i, 3) for i in range(7)] == [0, 1, 2, 0, 1, 2, 0]
    assert {shard_of(i, 1, 4) for i in range(10)} == {0}
    assert [shard_of(i, 2, 4) for i in range(10)] == [0, 0, 0, 0, 1, 1, 1, 1, 0, 0]  # every class in each


def test_merge_joins_records_and_keeps_each_shard() -> None:
    a = _run({"d0": 10, "d2": 10}, wall_s=10.2, lag_p95=3.0)
    b = _run({"d1": 10, "d3": 10}, wall_s=10.5, lag_p95=7.0, version=3)
    infos = [{"shard": 0, "node": "n0"}, {"shard": 1, "node": "n1"}]
    broker = {"tail_calls": 5, "windows_batched": 20}
    m = merge_runs("adaptive", [a, b], infos, broker)
    assert m.windows_expected == {"d0": 10, "d2": 10, "d1": 10, "d3": 10}
    assert len(m.records) == 40 and m.lost == 0
    assert [r.t_s for r in m.records] == sorted(r.t_s for r in m.records)  # one timeline, one origin
    assert m.wall_s == 10.5  # the slowest shard ends the run
    assert m.realtime_factor == pytest.approx(9.0 / 10.5)
    assert m.loop_lag_ms["p95"] == 7.0 and m.loop_lag_ms["p50"] == 1.0  # the worst shard, per statistic
    assert m.plan_versions == [2, 3]
    assert m.broker == broker
    assert set(m.radio_overhead_mj) == {"d0", "d1", "d2", "d3"}
    assert [s["shard"] for s in m.shards] == [0, 1]
    assert [s["node"] for s in m.shards] == ["n0", "n1"]
    assert [s["loop_lag_ms"]["p95"] for s in m.shards] == [3.0, 7.0]
    assert all(s["devices"] == 2 and s["windows"] == 20 and s["lost"] == 0 for s in m.shards)
    assert [s["offloaded"] for s in m.shards] == [10, 10]


def test_merge_counts_a_shards_lost_windows() -> None:
    m = merge_runs("adaptive", [_run({"d0": 5}, 5.0, 1.0, missing=2), _run({"d1": 5}, 5.0, 1.0)])
    assert m.lost == 2 and [s["lost"] for s in m.shards] == [2, 0]


def test_merge_sums_why_windows_were_lost() -> None:
    a, b, c = _run({"d0": 5}, 5.0, 1.0, missing=3), _run({"d1": 5}, 5.0, 1.0, missing=1), _run({"d2": 5}, 5.0, 1.0)
    a.lost_by_reason = {"expired": 2, "pending": 1}
    b.lost_by_reason = {"expired": 1}
    m = merge_runs("adaptive", [a, b, c])
    assert m.lost == 4 and m.lost_by_reason == {"expired": 3, "pending": 1}


def test_merge_refuses_a_device_in_two_shards_or_another_policy() -> None:
    with pytest.raises(ConfigError, match="two shards"):
        merge_runs("adaptive", [_run({"d0": 1}, 1.0, 1.0), _run({"d0": 1}, 1.0, 1.0)])
    with pytest.raises(ConfigError, match="other policies"):
        merge_runs("all_cloud", [_run({"d0": 1}, 1.0, 1.0)])
    with pytest.raises(ConfigError, match="no shard"):
        merge_runs("adaptive", [])


def test_fleet_mode_says_what_ran() -> None:
    one = fleet_mode(1, False)
    assert one["mode"] == "one_process" and one["reuse"] is False
    sharded = fleet_mode(2, True, "auto", [{"node": "a", "devices": 3}, {"node": "b", "devices": 2}], [{"x": 1}])
    assert sharded["mode"] == "sharded" and sharded["nodes"] == ["a", "b"] and sharded["shard_devices"] == [3, 2]
    assert "reused" in sharded["front"] and sharded["ray_address"] == "auto"
    assert sharded["placement"] is None
    assert fleet_mode(2, True, placement="STRICT_SPREAD placement group")["placement"].startswith("STRICT_SPREAD")


def test_shards_spread_one_per_node_when_there_are_nodes_enough() -> None:
    assert shard_strategy(nodes=2, shards=2) == "STRICT_SPREAD"
    assert shard_strategy(nodes=3, shards=2) == "STRICT_SPREAD"
    assert shard_strategy(nodes=2, shards=4) == "SPREAD"  # as even as two nodes allow
    assert shard_strategy(nodes=1, shards=2) is None  # one node: nothing to spread
    assert shard_strategy(nodes=2, shards=1) is None


def test_shard_cloud_tokens() -> None:
    cloud = ShardCloud("127.0.0.1:1", {"d0": "t0"})
    assert cloud.token_for("d0") == "t0" and cloud.broker is None
    with pytest.raises(ConfigError, match="no token"):
        cloud.token_for("d9")


def test_config_shards_and_reuse() -> None:
    sim = Config.from_dict({"simulator": {"shards": 3, "reuse": True}}).simulator
    assert sim.shards == 3 and sim.reuse is True
    with pytest.raises(ConfigError, match="shards"):
        Config.from_dict({"simulator": {"shards": 0}})
    with pytest.raises(ConfigError, match="reuse needs"):
        Config.from_dict({"simulator": {"reuse": True, "compute_time": "measured"}})
