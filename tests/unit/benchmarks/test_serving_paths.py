"""The pure parts of `bench serve`: the closed-loop driver, the summary and the arguments."""

from __future__ import annotations

import asyncio

import pytest
from rich.console import Console

from benchmarks.serving_paths import (
    Cell,
    ServeBenchConfig,
    drive,
    parse_devices,
    render,
    summarize,
)
from splitsense.errors import ConfigError


async def test_drive_keeps_each_device_closed_loop_and_stops_at_the_request_count() -> None:
    in_flight: dict[int, bool] = {}
    overlap = False

    async def call(d: int, i: int) -> None:
        nonlocal overlap
        overlap |= in_flight.get(d, False)
        in_flight[d] = True
        await asyncio.sleep(0.001)
        in_flight[d] = False
        if i == 2 and d == 0:
            raise RuntimeError("boom")

    cell = await drive("x", 4, call, requests=40, max_seconds=10.0)
    assert not overlap, "a device sends its next window only after the previous answer"
    assert cell.ok + cell.errors == 40 and cell.errors == 1 and "boom" in cell.first_error
    assert cell.devices == 4 and cell.throughput_rps > 0 and 0 < cell.p50_ms <= cell.p99_ms


async def test_drive_stops_at_the_time_bound() -> None:
    async def slow(d: int, i: int) -> None:
        await asyncio.sleep(0.05)

    cell = await drive("x", 2, slow, requests=10_000, max_seconds=0.2)
    assert 2 <= cell.ok <= 20 and cell.seconds < 1.0


def _cell(path: str, devices: int, p50: float, rps: float) -> Cell:
    return Cell(path, devices, p50, p50 * 2, rps, ok=10, errors=0, seconds=1.0)


def test_summary_ratios_and_targets() -> None:
    cells = [
        _cell("naive_ray", 1, 5.0, 200.0),
        _cell("broker", 1, 5.6, 180.0),
        _cell("naive_ray", 64, 150.0, 300.0),
        _cell("broker", 64, 40.0, 1500.0),
    ]
    s = summarize(cells, (1, 64))
    assert s["broker_vs_naive_throughput_at_64"] == 5.0 and s["throughput_target"]["met"]
    assert s["broker_minus_naive_p50_ms_at_1"] == pytest.approx(0.6) and s["p50_target"]["met"]
    s = summarize([*cells[:1], _cell("broker", 1, 7.0, 150.0)], (1,))
    assert not s["p50_target"]["met"] and s["broker_vs_naive_throughput_at_1"] == 0.75
    assert "throughput_target" not in s, "judged at 64 devices only"
    s = summarize([_cell("naive_ray", 2, 5.0, 200.0), _cell("broker", 2, 9.0, 100.0)], (2,))
    assert s == {"broker_vs_naive_throughput_at_2": 0.5, "broker_minus_naive_p50_ms_at_2": 4.0}
    assert summarize([], (1, 8)) == {}


def test_rows_and_render() -> None:
    cells = [
        _cell("broker", 64, 10.0, 500.0),
        _cell("naive_ray", 64, 20.0, 100.0),
        _cell("broker", 1, 6.0, 150.0),
        _cell("naive_ray", 1, 4.0, 200.0),
    ]
    assert "first_error" not in cells[0].row() and "broker_timing" not in cells[0].row()
    result = {
        "config": {"model": "m", "cut": 3, "cut_name": "conv3", "request_bytes": 100},
        "results": [c.row() for c in cells],
        "summary": summarize(cells, (1, 64)),
    }
    console = Console(record=True, width=120)
    render(result, console)
    text = console.export_text()
    assert "at 64 devices: 5.00x (target >= 4x: met)" in text
    assert "at 1 device(s): +2.00 ms (target <= 1 ms: missed)" in text


def test_arguments_are_checked() -> None:
    assert parse_devices("1, 8,64") == (1, 8, 64)
    for bad in ("", "0", "a,b", "-1"):
        with pytest.raises(ConfigError):
            parse_devices(bad)
    with pytest.raises(ConfigError):
        ServeBenchConfig(paths=("nope",))
    with pytest.raises(ConfigError):
        ServeBenchConfig(devices=())
    with pytest.raises(ConfigError):
        ServeBenchConfig(broker_transport="carrier pigeon")
