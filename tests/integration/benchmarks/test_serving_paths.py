"""`bench serve` end to end on the session's real Ray (tests/integration/conftest.py): every path
at two device counts (two broker processes for broker_x2, the unthrottled twin deployment for
naive_ray_unthrottled), the brokers driven through the device's own GrpcTransport, with no errors."""

from __future__ import annotations

import json

import pytest

from benchmarks.serving_paths import PATHS, ServeBenchConfig, run_serve_bench

pytestmark = pytest.mark.integration

MODEL = "uci_har"  # the smallest shipped model: the quickest replica to start


def test_bench_serve_runs_end_to_end_and_prints_its_schema(ray_cluster: str) -> None:
    # The bench deploys its own app on the session's Ray and stops Serve when it is done.
    bench = ServeBenchConfig(model=MODEL, devices=(1, 2), requests=6, max_seconds=3.0, windows=8, windows_per_device=2)
    result = run_serve_bench(bench)
    json.dumps(result)  # one JSON object, as `--json` prints it
    assert set(result) == {"config", "results", "summary"}
    assert result["config"]["model"] == MODEL and result["config"]["devices"] == [1, 2]
    rows = result["results"]
    assert sorted((r["path"], r["devices"]) for r in rows) == sorted((p, n) for p in PATHS for n in (1, 2))
    for r in rows:
        assert {"path", "devices", "p50_ms", "p99_ms", "throughput_rps"} <= set(r)
        assert r["errors"] == 0, r
        assert r["ok"] >= 1 and r["throughput_rps"] > 0
        assert 0 < r["p50_ms"] <= r["p99_ms"]
        if r["path"] in ("raw_grpc", "transport_echo", "broker", "broker_ray_only", "broker_free_tail", "broker_x2"):
            assert r["server_cpu_ms_per_window"] > 0, r
    # broker_x2: two broker processes, both answered (each device picks one at random: the two
    # devices may pick the same one), and together every window
    x2 = next(r for r in rows if r["path"] == "broker_x2" and r["devices"] == 2)
    assert len(x2["broker_windows"]) == 2 and sum(x2["broker_windows"]) == x2["ok"]
    summary = result["summary"]
    assert "broker_vs_naive_unthrottled_throughput_at_2" in summary and "broker_x2_vs_broker_throughput_at_2" in summary
    assert "broker_minus_naive_p50_ms_at_1" in summary and "broker_ray_only_minus_broker_p50_ms_at_1" in summary
    assert "free_tail_vs_broker_throughput_at_2" in summary
    # the device's transport against an OffloadStream that answers at once, beside the bare stream
    assert summary["transport_client_cpu_ms_per_window_at_2"] > 0
    assert summary["raw_grpc_stream_client_cpu_ms_per_window_at_2"] > 0
    assert "throughput_target" not in summary, "the throughput target is judged at 64 devices only"
    assert summary["p50_target"]["devices"] == 1 and isinstance(summary["p50_target"]["met"], bool)
