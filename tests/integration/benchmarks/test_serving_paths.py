"""`bench serve` end to end on the session's real Ray (tests/integration/conftest.py): every path
at two device counts, the broker driven through the device's own GrpcTransport, with no errors."""

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
    summary = result["summary"]
    assert "broker_vs_naive_throughput_at_2" in summary and "broker_minus_naive_p50_ms_at_1" in summary
    assert "throughput_target" not in summary, "the throughput target is judged at 64 devices only"
    assert summary["p50_target"]["devices"] == 1 and isinstance(summary["p50_target"]["met"], bool)
