"""Benchmark: the broker's own Python per window, without gRPC or Ray, side by side.

    full          splitsense.wire.from_pb + cloud/validation.validate_offload: the checks every
                  window got before cloud/intake.py, and what a window with a new header still gets
    quick         Intake.accept on a header it has seen: the window's own fields, the decode
    start_window  the whole per-window path of Broker.start_window (intake, identity, metrics,
                  admission, the micro-batcher, the answer) with N devices' windows in flight at
                  once and a backend that answers every batch at once (no compute, no hop):
                  what the broker's Python costs a window, apart from grpc.aio and Ray

The workload is bench serve's: real test windows of the model through stages [0, cut), encoded
with the codec, one device id per simulated device. Figures are CPU microseconds a window (median
of `repeats` rounds for full and quick; the process CPU over the run for start_window), with the
quick way's share of the windows. `bench serve` measures the same path with gRPC and Ray around it.

    splitsense bench window [--devices 64] [--windows 20000] [--json]
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

from splitsense import aio
from splitsense.config import Config

__all__ = ["WindowBenchConfig", "run_window_bench"]

Progress = Callable[[str], None]


@dataclass(frozen=True)
class WindowBenchConfig:
    model: str = "uci_har"
    cut: int | None = None  # None: the middle stage boundary, as bench serve
    codec: str = "fp32"
    devices: int = 64  # windows in flight at once in the start_window row
    windows: int = 20_000  # windows through start_window
    repeats: int = 2_000  # calls per round of the full and quick rows
    rounds: int = 5


class _InstantBackend:
    """Answers every batch at once with zeros of the model's classes: no compute, no hop."""

    def __init__(self, classes: int) -> None:
        self._classes = classes

    async def run_tail(self, model: str, cut: int, batch: np.ndarray) -> np.ndarray:
        return np.zeros((len(batch), self._classes), dtype=np.float32)

    async def close(self) -> None:
        return None


def _per_call_us(fn: Callable[[], Any], repeats: int, rounds: int) -> float:
    out = []
    for _ in range(rounds):
        t0 = time.process_time()
        for _ in range(repeats):
            fn()
        out.append((time.process_time() - t0) / repeats * 1e6)
    return statistics.median(out)


def run_window_bench(
    bench: WindowBenchConfig | None = None, cfg: Config | None = None, progress: Progress | None = None
) -> dict[str, Any]:
    """Every row once; returns {"config", "results", "summary"}."""
    from benchmarks.serving_paths import BENCH_SECRET, ServeBenchConfig, build_workload
    from cloud.backend import ModelRegistry
    from cloud.broker import Broker, Failure
    from cloud.intake import Intake
    from cloud.validation import validate_offload
    from splitsense.v1 import offload_pb2 as pb
    from splitsense.wire import from_pb

    bench = bench or WindowBenchConfig()
    cfg = cfg or Config()
    say = progress or (lambda _m: None)
    say(f"preparing {bench.model} windows")
    serve = ServeBenchConfig(model=bench.model, cut=bench.cut, codec=bench.codec)
    wl, _ = build_workload(serve, bench.devices)
    registry = ModelRegistry([bench.model])
    models = registry.info
    messages = [[pb.OffloadRequest.FromString(p) for p in row] for row in wl.payloads]
    first = messages[0][0]

    say("full and quick checks")
    full_us = _per_call_us(lambda: validate_offload(from_pb(first), models), bench.repeats, bench.rounds)
    intake = Intake(models)
    intake.accept(first)
    quick_us = _per_call_us(lambda: intake.accept(first), bench.repeats, bench.rounds)

    say(f"start_window: {bench.windows} windows, {bench.devices} in flight")
    broker_cfg = replace(cfg.broker, auth_secret=BENCH_SECRET, local_tail=False, metrics_port=None)
    broker = Broker(broker_cfg, registry, _InstantBackend(models[bench.model].num_classes))
    answered = failed = 0

    async def device(d: int) -> None:
        nonlocal answered, failed
        device_id, row, i = wl.requests[d][0].device_id, messages[d], 0
        while answered + failed < bench.windows:
            out = await broker.offload(row[i % len(row)], device_id, None, time.monotonic())
            i += 1
            if isinstance(out, Failure):
                failed += 1
            else:
                answered += 1

    async def drive() -> float:
        t0 = time.process_time()
        await asyncio.gather(*(device(d) for d in range(bench.devices)))
        return time.process_time() - t0

    cpu_s = aio.run(drive())
    windows = answered + failed
    results = [
        {"row": "full", "cpu_us_per_window": round(full_us, 2)},
        {"row": "quick", "cpu_us_per_window": round(quick_us, 2)},
        {
            "row": "start_window",
            "cpu_us_per_window": round(cpu_s / max(windows, 1) * 1e6, 2),
            "windows": windows,
            "failed": failed,
            "quick_share": round(broker._intake.quick / max(broker._intake.quick + broker._intake.full, 1), 4),
        },
    ]
    summary = {
        "full_vs_quick": round(full_us / quick_us, 2) if quick_us > 0 else None,
        "start_window_cpu_us_per_window": results[2]["cpu_us_per_window"],
        "payload_bytes": wl.payload_bytes,
        "cut": wl.cut,
    }
    return {"config": asdict(bench), "results": results, "summary": summary}
