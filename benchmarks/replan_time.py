"""Benchmark: how long replanning the whole fleet takes.

The fleet is every device class of ``pipelines.devices`` x every model of ``pipelines.models`` x
every bandwidth bucket of ``PlannerConfig`` x both battery states. Catalogs come from
``<paths.weights_dir>/{model}.catalog.json`` (the data package) when present; otherwise they are
measured here on a freshly built (untrained) model, with accuracy replaced by top-1 agreement with the uncompressed
model on a fixed random batch (timing is what this measures; the JSON says which source was used).

The figure is the median wall time of ``plan_fleet`` over `repeats` runs, each given the previous
run's PlanSet (the steady state of the controller: hysteresis included). Building the inputs and
the catalogs is not timed.

    python -m benchmarks.replan_time [--repeats 50]   ->   {"replan_ms": x, "rows": n, "config": {...}}
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

from cloud.controller.costmodel import CloudState, DeviceCostProfile, choices_of
from cloud.controller.planner import bandwidth_buckets, inputs_from_config, plan_fleet
from pipelines.catalog import ModelCatalog, build_catalog, load_catalog
from splitsense.config import Config
from splitsense.errors import ModelError
from splitsense.kinds import Codec

# Scenario assumptions of the benchmark (the controller uses measured RTTs and cloud figures).
BENCH_RTT_MS = {"phone": 60.0, "iot_board": 20.0, "watch": 20.0}
BENCH_CLOUD = CloudState(speedup_vs_host=1.0, queue_ms=2.0, overhead_ms=8.0)  # ~8 ms: Ray Serve hop (DESIGN)
_AGREEMENT_WINDOWS = 8  # enough for a timing benchmark; keeps building the catalogs to seconds


def _agreement_catalog(name: str, build: Callable[[], Any], levels: tuple[float, ...]) -> ModelCatalog:
    """Catalog of an untrained model; 'accuracy' is top-1 agreement with the uncompressed model."""
    import torch

    from pipelines import codecs

    torch.manual_seed(0)
    model = build().eval()
    x = torch.randn((_AGREEMENT_WINDOWS, *model.input_shape), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(x).argmax(1)

    def evaluate(m: Any) -> float:
        with torch.no_grad():
            return float((m(x).argmax(1) == ref).float().mean())

    def with_codec(m: Any, k: int, codec: Codec) -> float:
        with torch.no_grad():
            act = m.run(x, 0, k)
            wire = torch.from_numpy(codecs.decode(codecs.encode(act, codec)))
            return float((m.run(wire, k, m.n_stages).argmax(1) == ref).float().mean())

    return build_catalog(model, evaluate, with_codec, levels=levels, repeats=5, warmup=1)


def load_or_measure_catalogs(cfg: Config) -> tuple[list[ModelCatalog], dict[str, str]]:
    from pipelines.models import MODEL_SPECS

    catalogs, sources = [], {}
    for name, spec in MODEL_SPECS.items():
        try:
            catalogs.append(load_catalog(name, cfg.paths.weights_dir))
            sources[name] = "weights"
        except ModelError:
            catalogs.append(_agreement_catalog(name, spec.build, cfg.planner.compression_levels))
            sources[name] = "untrained model (accuracy = agreement proxy)"
    return catalogs, sources


def run_plan_bench(repeats: int = 50, cfg: Config | None = None) -> dict[str, Any]:
    """Median ms of one whole-fleet replan, the number of rows, and the configuration used."""
    from pipelines.devices import DEVICE_CLASSES

    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats!r}")
    cfg = cfg or Config()
    catalogs, sources = load_or_measure_catalogs(cfg)
    devices = {name: DeviceCostProfile.of(dc) for name, dc in DEVICE_CLASSES.items()}
    inputs = inputs_from_config(
        cfg.planner,
        devices,
        {name: BENCH_RTT_MS.get(name, 40.0) for name in devices},
        catalogs,
        BENCH_CLOUD,
        now_unix_ms=int(time.time() * 1000),
    )
    previous = plan_fleet(inputs)
    times_ms = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        previous = plan_fleet(inputs, previous)
        times_ms.append((time.perf_counter() - t0) * 1000.0)
    rows = sum(len(p.rows) for p in previous.plans)
    return {
        "replan_ms": round(statistics.median(times_ms), 3),
        "rows": rows,
        "config": {
            "repeats": repeats,
            "statistic": "median wall ms of plan_fleet(inputs, previous) (inputs and catalogs built untimed)",
            "device_classes": {
                c.name: {
                    "speed_factor": c.device.speed_factor,
                    "radio": c.device.radio_name,
                    "objective": c.objective.value,
                    "rtt_ms": c.rtt_ms,
                }
                for c in inputs.classes
            },
            "models": {
                c.model: {"stages": c.n_stages, "choices": len(choices_of(c)), "catalog": sources[c.model]}
                for c in catalogs
            },
            "bandwidth_edges_mbps": list(cfg.planner.bandwidth_edges_mbps),
            "buckets": len(bandwidth_buckets(cfg.planner.bandwidth_edges_mbps)),
            "battery_states": ["normal", "low"],
            "hysteresis_margin": cfg.planner.hysteresis_margin,
            "cloud": {
                "speedup_vs_host": BENCH_CLOUD.speedup_vs_host,
                "queue_ms": BENCH_CLOUD.queue_ms,
                "overhead_ms": BENCH_CLOUD.overhead_ms,
            },
        },
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args(argv)
    print(json.dumps(run_plan_bench(repeats=args.repeats), indent=2))


if __name__ == "__main__":
    main()
