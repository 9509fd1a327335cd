"""The cloud tail's engines side by side: torch on the weights vs ONNX Runtime on the export.

For each model and cut, batches of B real test activations (the test windows run through stages
[0, cut) in torch) go through stages [cut, N) both ways, one thread each, alternating in short
rounds so that this shared host's drift hits both alike. Reported: CPU per window (process time),
the ratio, and the largest logit difference and the argmax agreement on those batches.

    splitsense bench tail [--model M] [--batches 1,4,16,32] [--json]
    ->  {"config", "results": [{model, cut, batch, torch_us, onnx_us, speedup, max_abs_diff,
                                argmax_agree}], "summary"}

serving.tail_engine (cloud/backend.py `make_tail`) picks one of them for the replicas and the
broker's own tail.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

Progress = Callable[[str], None]


@dataclass(frozen=True)
class TailBenchConfig:
    models: tuple[str, ...] = ("fsdd_speaker", "fsdd_digit", "uci_har")
    batches: tuple[int, ...] = (1, 4, 16, 32)
    cuts: tuple[int, ...] | None = None  # default: 1 and n_stages // 2 of each model
    seconds: float = 0.6  # of CPU per (engine, batch), in rounds of ~50 ms alternating


def _cpu_us_per_window(f: Callable[[], Any], windows: int, seconds: float) -> float:
    f()  # warm-up: lazy kernels, allocator
    n, cpu0 = 0, time.process_time()
    while time.process_time() - cpu0 < seconds:
        f()
        n += 1
    return (time.process_time() - cpu0) * 1e6 / (n * windows)


def run_tail_bench(
    bench: TailBenchConfig | None = None,
    weights_dir: Path | None = None,
    export_root: Path | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    import torch

    from cloud.backend import choose_tail_engine, make_tail
    from pipelines.training import held_out_set, load_trained

    bench = bench or TailBenchConfig()
    say = progress or (lambda _m: None)
    torch.set_num_threads(1)  # a replica's thread (serving.replica_threads)
    choose_tail_engine("onnx", bench.models, weights_dir, export_root)  # ConfigError: how to export
    rows: list[dict[str, Any]] = []
    for name in bench.models:
        say(f"{name}: loading the weights and the export")
        tm = load_trained(name, weights_dir)
        m = tm.model
        tails = {e: make_tail(name, e, m, weights_dir, threads=1, root=export_root) for e in ("torch", "onnx")}
        x_test, _ = held_out_set(tm)
        x_test = x_test[: max(bench.batches)]
        cuts = bench.cuts or tuple(sorted({1, m.n_stages // 2}))
        for cut in cuts:
            with torch.inference_mode():
                acts = m.run(x_test, 0, cut).numpy()
            for b in bench.batches:
                say(f"{name} cut {cut}: batches of {b}")
                x = np.ascontiguousarray(acts[:b])
                got, want = tails["onnx"](cut, x), tails["torch"](cut, x)
                us = {"torch": 0.0, "onnx": 0.0}
                rounds = max(1, round(bench.seconds / 0.05))
                for _ in range(rounds):
                    for e in ("torch", "onnx"):
                        us[e] += _cpu_us_per_window(partial(tails[e], cut, x), b, 0.05) / rounds
                rows.append(
                    {
                        "model": name,
                        "cut": cut,
                        "batch": b,
                        "torch_us": round(us["torch"], 1),
                        "onnx_us": round(us["onnx"], 1),
                        "speedup": round(us["torch"] / us["onnx"], 2),
                        "max_abs_diff": float(np.abs(got - want).max()),
                        "argmax_agree": float((got.argmax(1) == want.argmax(1)).mean()),
                    }
                )
    speedups = [r["speedup"] for r in rows]
    return {
        "config": {**asdict(bench), "threads": 1},
        "results": rows,
        "summary": {
            "speedup_min": min(speedups),
            "speedup_median": float(np.median(speedups)),
            "speedup_max": max(speedups),
            "max_abs_diff": max(r["max_abs_diff"] for r in rows),
            "argmax_agree_min": min(r["argmax_agree"] for r in rows),
        },
    }


def parse_batches(text: str) -> tuple[int, ...]:
    from splitsense.errors import ConfigError

    try:
        out = tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise ConfigError(f"--batches takes comma-separated ints, e.g. 1,4,16; got {text!r}") from None
    if not out or min(out) < 1:
        raise ConfigError(f"--batches takes ints >= 1, got {text!r}")
    return out


def rows_for_table(result: dict[str, Any]) -> Sequence[tuple[str, ...]]:
    return [
        (
            r["model"],
            str(r["cut"]),
            str(r["batch"]),
            f"{r['torch_us']:.0f}",
            f"{r['onnx_us']:.0f}",
            f"{r['speedup']:.2f}x",
            f"{r['max_abs_diff']:.1e}",
            f"{r['argmax_agree']:.0%}",
        )
        for r in result["results"]
    ]
