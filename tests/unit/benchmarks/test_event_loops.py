"""benchmarks.event_loops (`splitsense bench loop`): both loops measured on a real gRPC stream echo."""

from __future__ import annotations

import pytest

from benchmarks.event_loops import LoopBenchConfig, run_loop_bench, summarize
from splitsense.errors import ConfigError

pytest.importorskip("uvloop")


def test_each_round_measures_both_loops_on_a_real_echo_server() -> None:
    steps: list[str] = []
    out = run_loop_bench(LoopBenchConfig(rounds=1, devices=4, round_trips=400), progress=steps.append)
    assert [r["loop"] for r in out["results"]] == ["asyncio", "uvloop"]
    for r in out["results"]:
        assert r["client_us"] > 0 and r["server_us"] > 0 and r["rate_per_s"] > 0
        assert r["total_us"] == pytest.approx(r["client_us"] + r["server_us"], abs=0.2)
    s = out["summary"]
    assert s["uvloop_vs_asyncio_cpu"] > 0 and s["rounds_uvloop_used_less_cpu"] in ("0/1", "1/1")
    assert len(steps) == 2 and "uvloop" in steps[1]


def test_summary_takes_medians_and_counts_the_rounds_won() -> None:
    rows = [
        {"loop": "asyncio", "round": 1, "client_us": 200, "server_us": 200, "total_us": 400, "rate_per_s": 4000},
        {"loop": "uvloop", "round": 1, "client_us": 180, "server_us": 180, "total_us": 360, "rate_per_s": 4400},
        {"loop": "asyncio", "round": 2, "client_us": 210, "server_us": 210, "total_us": 420, "rate_per_s": 3900},
        {"loop": "uvloop", "round": 2, "client_us": 220, "server_us": 220, "total_us": 440, "rate_per_s": 3800},
    ]
    s = summarize(rows)
    assert s["asyncio"]["total_us"] == 410 and s["uvloop"]["total_us"] == 400
    assert s["uvloop_vs_asyncio_cpu"] == pytest.approx(400 / 410, abs=1e-3)
    assert s["rounds_uvloop_used_less_cpu"] == "1/2"


def test_bad_settings_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="devices must be >= 1"):
        LoopBenchConfig(devices=0)
