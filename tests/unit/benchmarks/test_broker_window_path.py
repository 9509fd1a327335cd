"""benchmarks.broker_window_path: every row measured, every window answered, the quick way taken."""

from __future__ import annotations

from benchmarks.broker_window_path import WindowBenchConfig, run_window_bench


def test_a_small_run_answers_every_window_and_takes_the_quick_way_after_each_devices_first() -> None:
    out = run_window_bench(WindowBenchConfig(devices=4, windows=200, repeats=20, rounds=2))
    rows = {r["row"]: r for r in out["results"]}
    assert set(rows) == {"full", "quick", "start_window"}
    whole = rows["start_window"]
    assert whole["windows"] >= 200 and whole["failed"] == 0
    # one full check per device (its first window), the quick way after that
    assert whole["quick_share"] >= 1 - 4 / whole["windows"] - 1e-9
    assert all(r["cpu_us_per_window"] > 0 for r in rows.values())
    assert out["summary"]["full_vs_quick"] is not None and out["summary"]["cut"] >= 0
