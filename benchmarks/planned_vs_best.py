"""Benchmark: is the planner's choice, measured through the real path, as fast as the best choice?

Issue 4: "On a grid of bandwidths (0.1 to 50 Mbit/s) and device classes, the latency of the planned
choice, measured through the real path, is within 10% of the best choice found by measuring every
cut." This is that benchmark (a benchmark prints figures; no test asserts them).

The real path, started once: CloudStack (Ray Serve tails, or the in-process twin with
`with_ray=False`; the gRPC broker with its auth, validation, admission and micro-batcher) on
loopback. For each (device class, bandwidth) cell a `simulators.link.LinkEmulator` (a shaping TCP
proxy) sits between a device client and the broker, shaping both directions to the cell's
bandwidth and delaying them by the class's RTT; the device sends its windows through its own
transport (edge/transport.py GrpcTransport: one OffloadStream per device).

One window of a choice (cut k, front compression level, codec), on a real FSDD test window:

    device     stages [0, k) run on this host, each timed on the CPU clock of the one torch thread
               that runs it (`torch_threads`: time spent waiting for one of the 2 shared cores is
               not counted, cache contention still is), summed and multiplied by the class's speed
               factor (pipelines/devices.py): the *simulated* hardware. compute_time="reference"
               uses the catalog's host time x the factor instead (no host noise; the host the
               factors were defined on).
    encode     the activation's encoding, host time, not stretched (as edge/runtime.py does; the
               cost model does not model it)
    network    the real gRPC round trip through the shaped link: upload, broker, tail, answer
    promotion  radio promotion: the link emulator has none, so (promotion="add") the cost model's
               own promotion delay of that choice on that link is added to every offloaded window
               (WiFi 79 ms whenever the radio idled past its 238 ms tail between 1-s windows, LTE
               none within its 11.6 s tail); or (promotion="exclude") the planner is given a radio
               without promotion delay and none is added: either way both sides count the same.
    k = N      device time of every stage, nothing else.

Preprocessing (log-mel) is left out on both sides: every choice runs it, and the cost model does
not count it. A choice's latency is the median of `windows` windows after `warmup` warm-ups.

The planner. `plan_fleet` on the same inputs: the catalog, the class (speed factor, radio), the
cell's bandwidth (the plan's bucket edges are the grid's bandwidths, so each cell is planned at its
own bandwidth) and RTT, and the cloud overhead measured before the cells (the median over every
(cut, codec) of the direct round trip minus the catalog's tail time). Objective: least latency with
the classes' energy budgets lifted (this measures latency; an energy budget may pick a slower
choice on purpose); the class's accuracy budget holds. Two planners are reported:
    planned                 a fresh fleet: device compute from the catalog profile, the class's
                            configured RTT (the inputs named in the issue)
    planned_with_telemetry  the controller's steady state: what the class's devices would report,
                            measured at the start of each cell: per-stage compute (this host,
                            `calibration_windows` >= planner.min_telemetry_samples runs, stretched)
                            and their RTT estimate (small windows through the link, minus their
                            direct round trip and the bytes the cost model charges apart, as
                            edge/estimator.py nets out the server's time)

Candidates: every cut 0..N-1 with fp32 and int8 uncompressed, the fully local choice, and each
planner's choice (which may carry a compression level or another codec). Measuring every one at
0.1 Mbit/s would take half a minute per window of cut 1 (379 KiB) alone, so unless `exhaustive`, a candidate
whose lower bound already exceeds the best median measured in the cell is skipped, with its bound:
    bound = 0.5 x the calibrated host time of its front x speed factor (slack for host noise)
            + promotion + RTT + (activation + result bytes) / bandwidth
which the real path cannot beat (the link serialises at least those bytes and delays by the RTT).
Both planners' choices and the local one are always measured.

    python -m benchmarks.planned_vs_best [--in-process] [--windows 8]  ->  {config, cells, summary}
    splitsense bench planner --json
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cloud.controller.costmodel import (
    Choice,
    CloudState,
    DeviceCostProfile,
    LinkState,
    TelemetryStats,
    estimate,
)
from cloud.controller.planner import inputs_from_config, plan_fleet
from pipelines.catalog import ModelCatalog
from pipelines.devices import DEVICE_CLASSES, DeviceClass
from pipelines.power import radio_model
from splitsense import aio
from splitsense.config import ClassObjectiveConfig, Config, PlannerConfig
from splitsense.errors import ConfigError, OffloadError
from splitsense.kinds import Codec
from splitsense.plan import PlanRow, PlanSet

if TYPE_CHECKING:
    from edge.transport import GrpcTransport

__all__ = [
    "CANDIDATE_CODECS",
    "PlannerBenchConfig",
    "TARGET_RATIO",
    "bench_planner_config",
    "candidate_choices",
    "choice_label",
    "cloud_overhead_ms",
    "lower_bound_ms",
    "parse_bandwidths",
    "parse_classes",
    "planned_row",
    "render",
    "run_planner_bench",
    "run_planner_bench_async",
    "summarize",
]

TARGET_RATIO = 1.10  # issue 4: the planned choice within 10% of the best measured one
CANDIDATE_CODECS = (Codec.FP32, Codec.INT8)
PROMOTION_MODES = ("add", "exclude")
COMPUTE_TIMES = ("measured", "reference")
# A candidate's device time in its lower bound is this fraction of its calibrated front time: a
# window can run faster than the calibration's median, never twice as fast.
_BOUND_DEVICE_SLACK = 0.5
_DEADLINE_MS = 60_000  # the broker's deadline for a bench window: slow links must not be shed
_MAX_MESSAGE_BYTES = 4 << 20

Progress = Callable[[str], None]


def _noop(_: str) -> None:
    pass


@dataclass(frozen=True)
class PlannerBenchConfig:
    """What `bench planner` measures; checked when built."""

    model: str = "fsdd_speaker"
    device_classes: tuple[str, ...] = ("phone", "iot_board", "watch")
    bandwidths_mbps: tuple[float, ...] = (0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0)
    windows: int = 8  # measured windows per choice (the median is reported)
    warmup: int = 2  # windows per choice before those, not counted
    # Per device class; None (or a class left out): config.simulator.rtt_ms of the class's radio.
    rtt_ms: Mapping[str, float] | None = None
    with_ray: bool = True  # False: the in-process tails (quick runs, tests)
    promotion: str = "add"  # see the module docstring
    compute_time: str = "measured"  # "reference": the catalog's host time x speed factor
    exhaustive: bool = False  # measure every candidate, even those a lower bound rules out
    calibration_windows: int = 30  # per-stage host timing runs (>= planner.min_telemetry_samples)
    # One thread, timed on its CPU clock: a device's compute does not count the time it waited for
    # one of these 2 shared cores (2 threads run ~1.5x faster but with 10-30x outliers when contended).
    torch_threads: int = 1  # (restored when the run ends)
    # A choice whose lower bound says its windows would take longer than this in all gets fewer
    # windows (at least one warm-up and one measured; the cell says so).
    candidate_budget_s: float = 60.0
    window_timeout_s: float = 120.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "device_classes", tuple(self.device_classes))
        object.__setattr__(self, "bandwidths_mbps", tuple(float(b) for b in self.bandwidths_mbps))
        if not self.device_classes:
            raise ConfigError("bench planner needs at least one device class")
        for name in self.device_classes:
            if name not in DEVICE_CLASSES:
                raise ConfigError(f"unknown device class {name!r}; use one of: {', '.join(DEVICE_CLASSES)}")
        if len(set(self.device_classes)) != len(self.device_classes):
            raise ConfigError(f"device classes are named twice: {self.device_classes}")
        if not self.bandwidths_mbps or any(not (math.isfinite(b) and b > 0) for b in self.bandwidths_mbps):
            raise ConfigError(f"bandwidths must be finite Mbit/s > 0, got {self.bandwidths_mbps}")
        if len(set(self.bandwidths_mbps)) != len(self.bandwidths_mbps):
            raise ConfigError(f"bandwidths are named twice: {self.bandwidths_mbps}")
        for name in ("windows", "calibration_windows", "torch_threads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be an int >= 1, got {value!r}")
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, int) or self.warmup < 0:
            raise ConfigError(f"warmup must be an int >= 0, got {self.warmup!r}")
        if self.promotion not in PROMOTION_MODES:
            raise ConfigError(f"promotion must be one of {PROMOTION_MODES}, got {self.promotion!r}")
        if self.compute_time not in COMPUTE_TIMES:
            raise ConfigError(f"compute_time must be one of {COMPUTE_TIMES}, got {self.compute_time!r}")
        for name in ("candidate_budget_s", "window_timeout_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0")
        if self.rtt_ms is not None:
            rtt = {str(k): float(v) for k, v in dict(self.rtt_ms).items()}
            if any(not (math.isfinite(v) and v >= 0) for v in rtt.values()):
                raise ConfigError(f"rtt_ms values must be finite and >= 0, got {rtt}")
            object.__setattr__(self, "rtt_ms", rtt)


# ---------------------------------------------------------------------------------------------
# Pure parts


def parse_bandwidths(text: str) -> tuple[float, ...]:
    """'0.1,0.5,1' -> (0.1, 0.5, 1.0); ConfigError on anything else."""
    try:
        out = tuple(float(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise ConfigError(f"--bandwidths must be comma-separated Mbit/s such as 0.1,1,10, got {text!r}") from None
    if not out or any(not (math.isfinite(b) and b > 0) for b in out):
        raise ConfigError(f"--bandwidths must list Mbit/s > 0, got {text!r}")
    return out


def parse_classes(text: str) -> tuple[str, ...]:
    out = tuple(p.strip() for p in text.split(",") if p.strip())
    if not out:
        raise ConfigError(f"--classes must name device classes ({', '.join(DEVICE_CLASSES)}), got {text!r}")
    for name in out:
        if name not in DEVICE_CLASSES:
            raise ConfigError(f"unknown device class {name!r}; use one of: {', '.join(DEVICE_CLASSES)}")
    return out


def candidate_choices(catalog: ModelCatalog, codecs: Sequence[Codec] = CANDIDATE_CODECS) -> tuple[Choice, ...]:
    """Every cut 0..N-1 with each codec (uncompressed front), then the fully local choice."""
    n = catalog.n_stages
    return (*(Choice(k, 1.0, c) for k in range(n) for c in codecs), Choice(n))


def choice_label(catalog: ModelCatalog, choice: Choice) -> str:
    if choice.cut >= catalog.n_stages:
        text = "local"
    else:
        text = f"cut {choice.cut} ({catalog.cut_name(choice.cut)}) {choice.codec.value}"
    return text if choice.level >= 1.0 else f"{text} level {choice.level:g}"


def lower_bound_ms(
    device_floor_ms: float,
    *,
    offload: bool,
    promotion_ms: float = 0.0,
    rtt_ms: float = 0.0,
    up_bytes: float = 0.0,
    down_bytes: float = 0.0,
    bandwidth_mbps: float = math.inf,
) -> float:
    """What no window of a choice can beat: its device floor, and when it offloads the promotion,
    the RTT and the serialisation of what must cross at the link's rate."""
    if not offload:
        return device_floor_ms
    wire_ms = (up_bytes + down_bytes) * 8.0 / (bandwidth_mbps * 1e6) * 1000.0
    return device_floor_ms + promotion_ms + rtt_ms + wire_ms


def cloud_overhead_ms(
    round_trip_ms: Mapping[tuple[int, str], float], catalog: ModelCatalog
) -> tuple[float, dict[str, float]]:
    """The cost model's per-request cloud overhead from direct (unshaped loopback) round trips per
    (cut, codec): the median over them of round trip - the catalog's host time of the tail [k, N),
    at least 0; and each one, keyed 'cut/codec'."""
    if not round_trip_ms:
        raise ConfigError("no round trips to estimate the cloud overhead from")
    per = {}
    for (k, codec), ms in sorted(round_trip_ms.items()):
        per[f"{k}/{codec}"] = ms - sum(catalog.stage_latency_ms[k:])
    return max(statistics.median(per.values()), 0.0), per


def bench_planner_config(cfg: PlannerConfig, classes: Sequence[str], bandwidths_mbps: Sequence[float]) -> PlannerConfig:
    """The planner as the bench runs it: bucket edges at the grid's bandwidths (each cell planned at
    its own bandwidth), least latency with the energy budgets lifted, the classes' accuracy budgets."""
    objectives = {}
    for name in classes:
        own = cfg.classes.get(name)
        budget = own.accuracy_budget_points if own is not None else ClassObjectiveConfig().accuracy_budget_points
        objectives[name] = ClassObjectiveConfig("latency", energy_budget_mw=None, deadline_ms=None,
                                                accuracy_budget_points=budget)  # fmt: skip
    return dataclasses.replace(cfg, bandwidth_edges_mbps=tuple(sorted(set(bandwidths_mbps))), classes=objectives)


def planned_row(plan_set: PlanSet, model: str, device_class: str, bandwidth_mbps: float, cfg: PlannerConfig) -> PlanRow:
    """The row a device of `device_class` on `bandwidth_mbps` with a full battery would use."""
    for plan in plan_set.plans:
        if plan.model == model and plan.device_class == device_class:
            return plan.lookup(bandwidth_mbps, 1.0, cfg.low_battery_threshold)
    raise ConfigError(f"the plan set has no plan for {model!r} on {device_class!r}")


def _ratio_stats(ratios: list[float]) -> dict[str, Any]:
    if not ratios:
        return {"max_ratio": None, "within_10pct": None, "cells_within_10pct": 0}
    within = sum(r <= TARGET_RATIO + 1e-9 for r in ratios)
    return {
        "max_ratio": round(max(ratios), 4),
        "within_10pct": round(within / len(ratios), 4),
        "cells_within_10pct": within,
    }


def summarize(cells: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """max ratio planned/best, the share of cells within 10%, for both planners; the worst cell."""
    ratios = [c["ratio"] for c in cells if c.get("ratio") is not None]
    tele = [c["ratio_with_telemetry"] for c in cells if c.get("ratio_with_telemetry") is not None]
    out: dict[str, Any] = {"cells": len(cells), **_ratio_stats(ratios)}
    out["target_ratio"] = TARGET_RATIO
    out["met"] = bool(ratios) and len(ratios) == len(cells) and out["max_ratio"] <= TARGET_RATIO + 1e-9
    measured = [c for c in cells if c.get("ratio") is not None]
    if measured:
        worst = max(measured, key=lambda c: c["ratio"])
        out["worst"] = {
            "device_class": worst["device_class"],
            "bandwidth_mbps": worst["bandwidth_mbps"],
            "ratio": worst["ratio"],
            "planned": worst["planned"]["choice"],
            "best": worst["best"]["choice"],
        }
    out["with_telemetry"] = _ratio_stats(tele)
    failed = len(cells) - len(ratios)
    if failed:
        out["cells_without_ratio"] = failed
    return out


# ---------------------------------------------------------------------------------------------
# The device side: real windows, real fronts on this host


@dataclass
class _Sample:
    device_ms: float
    encode_ms: float
    network_ms: float
    promotion_ms: float
    bytes_up: int
    bytes_down: int
    cloud_compute_ms: float
    cloud_queue_ms: float

    @property
    def total_ms(self) -> float:
        return self.device_ms + self.encode_ms + self.network_ms + self.promotion_ms


class _Host:
    """The model's real test windows, and its fronts (compressed ones built on demand)."""

    def __init__(self, model_name: str, weights_dir: Any, windows: int, clock: Callable[[], float]) -> None:
        from pipelines.training import held_out_set, load_trained

        self.clock = clock
        trained = load_trained(model_name, weights_dir)
        self.model = trained.model.eval()
        x, _ = held_out_set(trained)
        n = max(1, min(windows, int(x.shape[0])))
        self.inputs = [x[i : i + 1].contiguous() for i in range(n)]
        self._fronts: dict[tuple[int, float], Any] = {}
        self._next = 0

    def _front(self, cut: int, level: float) -> Any:
        if level >= 1.0:
            return self.model
        key = (cut, level)
        if key not in self._fronts:
            from pipelines.compress import compress_front_at_level

            self._fronts[key] = compress_front_at_level(self.model, cut, level).eval()
        return self._fronts[key]

    def window(self) -> Any:
        x = self.inputs[self._next % len(self.inputs)]
        self._next += 1
        return x

    def run_front(self, choice: Choice) -> tuple[Any, float]:
        """(activation, host ms of stages [0, cut)) on the next test window; each stage is timed
        on its own and the times summed, as edge/runtime.py does (cut 0 runs nothing: 0 ms)."""
        import torch

        model = self._front(choice.cut, choice.level)
        a = self.window()
        ms = 0.0
        with torch.inference_mode():
            for stage in model.stages[: choice.cut]:
                t = self.clock()
                a = stage(a)
                ms += (self.clock() - t) * 1000.0
        return a, ms

    def calibrate(self, runs: int) -> list[float]:
        """Median host ms of each stage over `runs` windows, run one after the other as a device
        runs them (what its telemetry reports)."""
        import torch

        samples: list[list[float]] = [[] for _ in range(self.model.n_stages)]
        with torch.inference_mode():
            for _ in range(3):
                self.model(self.window())
            for _ in range(runs):
                a = self.window()
                for i, stage in enumerate(self.model.stages):
                    t = self.clock()
                    a = stage(a)
                    samples[i].append((self.clock() - t) * 1000.0)
        return [statistics.median(s) for s in samples]


# ---------------------------------------------------------------------------------------------
# The run


@dataclass
class _ClassSetup:
    device: DeviceClass
    rtt_ms: float
    profile: DeviceCostProfile  # what the planners see (radio without promotion when excluded)
    promo_profile: DeviceCostProfile  # the modelled promotion added to measured offloads ("add")
    plan: PlanSet  # the catalog planner's (one for the whole run)


class _Bench:
    def __init__(self, bench: PlannerBenchConfig, cfg: Config, progress: Progress) -> None:
        self.bench = bench
        self.cfg = cfg
        self.say = progress
        self.catalog: ModelCatalog
        self.host: _Host
        self.stack: Any = None
        self._window_no = 0
        self._direct_small_ms = 0.0  # direct round trip of the smallest window (cut N-1, int8)

    # --- one window ----------------------------------------------------------------------------

    def _transport(self, address: str, device_id: str) -> GrpcTransport:
        """A device's own transport to the broker at `address` (the link's, or the broker's own)."""
        from edge.transport import GrpcTransport

        return GrpcTransport(address, self.stack.token_for(device_id), device_id=device_id,
                             max_message_bytes=_MAX_MESSAGE_BYTES)  # fmt: skip

    def _device_ms(self, choice: Choice, host_ms: float, speed: float) -> float:
        if self.bench.compute_time == "reference":
            return self.catalog.level(choice.level).front_latency_ms[choice.cut] * speed
        return host_ms * speed

    async def _window(
        self, client: GrpcTransport | None, link: Any, choice: Choice, device: DeviceClass, promotion_ms: float,
        estimates: Any,
    ) -> _Sample:  # fmt: skip
        from pipelines.codecs import encode
        from splitsense import wire

        act, host_ms = self.host.run_front(choice)
        device_ms = self._device_ms(choice, host_ms, device.speed_factor)
        if choice.cut >= self.catalog.n_stages:
            return _Sample(device_ms, 0.0, 0.0, 0.0, 0, 0, 0.0, 0.0)
        assert client is not None
        t = time.perf_counter()
        encoded = encode(act, choice.codec)
        encode_ms = (time.perf_counter() - t) * 1000.0
        self._window_no += 1
        request = wire.OffloadRequest(
            window_id=f"bench-{self._window_no}",
            model=self.catalog.model,
            cut=choice.cut,
            device_id=f"bench-{device.name}",
            device_class=device.name,
            estimates=estimates,
            plan_version=0,
            activation=encoded,
            sent_unix_ms=int(time.time() * 1000),
            deadline_ms=_DEADLINE_MS,
        )
        before = link.counters if link is not None else None
        t0 = time.perf_counter()
        resp = await client.offload(request, self.bench.window_timeout_s)
        network_ms = (time.perf_counter() - t0) * 1000.0
        up = down = 0
        if link is not None and before is not None:
            after = link.counters
            up, down = after.bytes_up - before.bytes_up, after.bytes_down - before.bytes_down
        return _Sample(device_ms, encode_ms, network_ms, promotion_ms, up, down,
                       resp.timing.compute_ms, resp.timing.queue_ms)  # fmt: skip

    # --- set-up ----------------------------------------------------------------------------------

    async def _direct_overhead(self) -> tuple[float, dict[str, float], dict[str, float]]:
        """Round trips straight to the broker (no link) at every (cut, codec): the cloud overhead."""
        from splitsense.wire import DeviceEstimates, RadioKind

        stack = self.stack
        device = DEVICE_CLASSES[self.bench.device_classes[0]]
        client = self._transport(stack.broker_address, f"bench-{device.name}")
        est = DeviceEstimates(1000.0, 0.0, 1.0, True, RadioKind(device.radio.value))
        medians: dict[tuple[int, str], float] = {}
        try:
            for choice in candidate_choices(self.catalog):
                if choice.cut >= self.catalog.n_stages:
                    continue
                times = []
                for i in range(self.bench.warmup + self.bench.windows):
                    s = await self._window(client, None, choice, device, 0.0, est)
                    if i >= self.bench.warmup:
                        times.append(s.network_ms)
                medians[(choice.cut, choice.codec.value)] = statistics.median(times)
        finally:
            await client.close()
        overhead, per = cloud_overhead_ms(medians, self.catalog)
        self._direct_small_ms = medians[(self.catalog.n_stages - 1, Codec.INT8.value)]
        return overhead, per, {f"{k}/{c}": round(v, 3) for (k, c), v in sorted(medians.items())}

    def _setups(self, cloud: CloudState, pcfg: PlannerConfig) -> dict[str, _ClassSetup]:
        """Per class: its RTT, cost profiles, and the catalog planner's plan (for every class at once)."""
        b, cfg = self.bench, self.cfg
        profiles, rtts, promo = {}, {}, {}
        for name in b.device_classes:
            dc = DEVICE_CLASSES[name]
            radio = radio_model(dc.radio)
            promo[name] = dataclasses.replace(DeviceCostProfile.of(dc), radio=radio)
            if b.promotion == "exclude":
                radio = dataclasses.replace(radio, promotion_s=0.0)
            profiles[name] = dataclasses.replace(DeviceCostProfile.of(dc), radio=radio)
            given = (b.rtt_ms or {}).get(name)
            rtts[name] = float(given) if given is not None else float(cfg.simulator.rtt_ms[dc.radio.value])
        plan = plan_fleet(inputs_from_config(pcfg, profiles, rtts, [self.catalog], cloud))
        return {n: _ClassSetup(DEVICE_CLASSES[n], rtts[n], profiles[n], promo[n], plan) for n in b.device_classes}

    def _telemetry(self, device: DeviceClass, host_stage_ms: Sequence[float], samples: int) -> TelemetryStats:
        """What the class's devices would report: per-stage device ms (host x speed factor)."""
        base = self.catalog.stage_latency_ms if self.bench.compute_time == "reference" else host_stage_ms
        return TelemetryStats(tuple(v * device.speed_factor for v in base), (samples,) * len(base))

    def _device_floor_ms(self, choice: Choice, host_stage_ms: Sequence[float], speed: float) -> float:
        """The calibrated device time of a choice's front (compressed fronts scaled as the cost
        model scales them)."""
        base = self.catalog.levels[0].front_latency_ms
        k = choice.cut
        ratio = self.catalog.level(choice.level).front_latency_ms[k] / base[k] if base[k] > 0 else 1.0
        host = sum(host_stage_ms[:k]) if self.bench.compute_time == "measured" else base[k]
        return host * ratio * speed

    # --- one cell --------------------------------------------------------------------------------

    async def _cell(self, setup: _ClassSetup, bw: float, cloud: CloudState, pcfg: PlannerConfig) -> dict[str, Any]:
        from simulators.link import LinkEmulator

        dc = setup.device
        t_cell = time.monotonic()
        host, port = self.stack.broker_address.rsplit(":", 1)
        link = LinkEmulator((host, int(port)), uplink_mbps=bw, downlink_mbps=bw, rtt_ms=setup.rtt_ms)
        await link.start()
        client = self._transport(link.address, f"bench-{dc.name}")
        try:
            cell = await self._measure_cell(setup, bw, cloud, pcfg, client, link)
        finally:
            await client.close()
            await link.close()
        cell["seconds"] = round(time.monotonic() - t_cell, 2)
        return cell

    async def _device_rtt_ms(self, setup: _ClassSetup, bw: float, client: GrpcTransport, link: Any, est: Any) -> float:
        """The class's RTT as its devices measure it (what the controller plans with): small windows
        through the link, minus the same window's direct round trip and the serialisation the cost
        model charges apart (its activation and result bytes at the link's rate). What is left is the
        RTT plus what the path adds per window beyond the model (framing bytes, the proxy's own hops)."""
        cat = self.catalog
        small = Choice(cat.n_stages - 1, 1.0, Codec.INT8)
        await self._window(client, link, small, setup.device, 0.0, est)  # opens the connection (HTTP/2 set-up)
        times = [(await self._window(client, link, small, setup.device, 0.0, est)).network_ms
                 for _ in range(max(3, self.bench.windows))]  # fmt: skip
        wire_ms = (cat.codec(Codec.INT8).activation_bytes[small.cut] + cat.result_bytes) * 8.0 / (bw * 1e3)
        return max(statistics.median(times) - self._direct_small_ms - wire_ms, 0.0)

    async def _measure_cell(
        self, setup: _ClassSetup, bw: float, cloud: CloudState, pcfg: PlannerConfig, client: GrpcTransport, link: Any
    ) -> dict[str, Any]:
        from splitsense.wire import DeviceEstimates, RadioKind

        b, cat, dc = self.bench, self.catalog, setup.device
        est = DeviceEstimates(bw, setup.rtt_ms, 1.0, True, RadioKind(dc.radio.value))
        # What the class's devices would report now (the host's load drifts, so per cell): per-stage
        # compute and their RTT estimate. The controller plans with these once it has them.
        n_cal = max(b.calibration_windows, pcfg.min_telemetry_samples)
        host_stage_ms = self.host.calibrate(n_cal)
        telemetry = self._telemetry(dc, host_stage_ms, n_cal)
        device_rtt = await self._device_rtt_ms(setup, bw, client, link, est)
        plan_t = plan_fleet(inputs_from_config(pcfg, {dc.name: setup.profile}, {dc.name: device_rtt}, [cat], cloud,
                                               telemetry={(dc.name, cat.model): telemetry}))  # fmt: skip
        row = planned_row(setup.plan, cat.model, dc.name, bw, pcfg)
        row_t = planned_row(plan_t, cat.model, dc.name, bw, pcfg)
        planned = Choice(row.cut, row.compression_energy_kept, row.codec)
        planned_t = Choice(row_t.cut, row_t.compression_energy_kept, row_t.codec)
        link_state, link_t = LinkState(bw, setup.rtt_ms), LinkState(bw, device_rtt)

        def promotion_ms(c: Choice) -> float:
            if b.promotion == "exclude" or c.cut >= cat.n_stages:
                return 0.0
            return float(estimate(cat, setup.promo_profile, link_state, cloud, c).breakdown["promotion_ms"])

        def bound(c: Choice) -> float:
            floor = _BOUND_DEVICE_SLACK * self._device_floor_ms(c, host_stage_ms, dc.speed_factor)
            offload = c.cut < cat.n_stages
            up = float(cat.codec(c.codec).activation_bytes[c.cut]) if offload else 0.0
            return lower_bound_ms(floor, offload=offload, promotion_ms=promotion_ms(c), rtt_ms=setup.rtt_ms,
                                  up_bytes=up, down_bytes=float(cat.result_bytes), bandwidth_mbps=bw)  # fmt: skip

        # Both planners' choices and the local one (no network: cheap) are always measured; the
        # others in the order of their bounds, so that the first bound above the best ends the cell.
        forced = [planned, planned_t, Choice(cat.n_stages)]
        others = sorted((c for c in candidate_choices(cat) if c not in forced), key=bound)
        rows: dict[Choice, dict[str, Any]] = {}
        best = math.inf
        for c in dict.fromkeys([*forced, *others]):
            lb = bound(c)
            entry: dict[str, Any] = {
                "choice": choice_label(cat, c),
                "cut": c.cut,
                "codec": c.codec.value if c.cut < cat.n_stages else None,
                "level": c.level,
                "predicted_ms": round(estimate(cat, setup.profile, link_state, cloud, c).total_ms, 3),
                "predicted_with_telemetry_ms": round(
                    estimate(cat, setup.profile, link_t, cloud, c, telemetry,
                             min_telemetry_samples=pcfg.min_telemetry_samples).total_ms, 3),
                "lower_bound_ms": round(lb, 3),
            }  # fmt: skip
            rows[c] = entry
            if c not in forced and not b.exhaustive and lb > best:
                entry["skipped"] = f"lower bound {lb:.1f} ms > best measured {best:.1f} ms"
                continue
            windows, warmup = b.windows, b.warmup
            if lb / 1000.0 * (windows + warmup) > b.candidate_budget_s:
                windows = max(1, int(b.candidate_budget_s / max(lb / 1000.0, 1e-9)) - 1)
                warmup = min(warmup, 1)
                entry["windows_reduced"] = f"{windows} windows, {warmup} warm-up (candidate_budget_s)"
            promo = promotion_ms(c)
            samples: list[_Sample] = []
            try:
                for i in range(warmup + windows):
                    s = await self._window(client, link, c, dc, promo, est)
                    if i >= warmup:
                        samples.append(s)
            except OffloadError as e:
                entry["error"] = str(e)
                continue
            entry.update(_sample_stats(samples))
            best = min(best, entry["measured_ms"])

        measured = {c: r for c, r in rows.items() if "measured_ms" in r}
        cell: dict[str, Any] = {
            "device_class": dc.name,
            "radio": dc.radio.value,
            "speed_factor": dc.speed_factor,
            "rtt_ms": setup.rtt_ms,
            "device_rtt_ms": round(device_rtt, 3),  # what the telemetry planner was given
            "bandwidth_mbps": bw,
            "host_front_ms": round(sum(host_stage_ms), 4),  # calibrated at the cell's start
            "planned": {**rows[planned], "reason": row.reason},
            "planned_with_telemetry": {**rows[planned_t], "reason": row_t.reason},
        }
        if measured:
            best_c = min(measured, key=lambda c: measured[c]["measured_ms"])
            cell["best"] = measured[best_c]
            best_ms = measured[best_c]["measured_ms"]
            for key, c in (("ratio", planned), ("ratio_with_telemetry", planned_t)):
                ms = measured.get(c, {}).get("measured_ms")
                cell[key] = round(ms / best_ms, 4) if ms is not None and best_ms > 0 else None
        else:
            cell["best"] = None
            cell["ratio"] = cell["ratio_with_telemetry"] = None
        cell["within_10pct"] = cell["ratio"] is not None and cell["ratio"] <= TARGET_RATIO + 1e-9
        cell["candidates"] = [rows[c] for c in sorted(rows, key=lambda c: (c.cut, -c.level, c.codec.value))]
        cell["measured_candidates"] = len(measured)
        return cell

    # --- everything ------------------------------------------------------------------------------

    async def run(self) -> dict[str, Any]:
        import torch

        threads = torch.get_num_threads()
        torch.set_num_threads(self.bench.torch_threads)
        try:
            return await self._run()
        finally:
            torch.set_num_threads(threads)

    async def _run(self) -> dict[str, Any]:
        from cloud.stack import CloudStack, with_ports
        from cloud.wiring import load_catalogs
        from pipelines.models import get_spec

        b = self.bench
        get_spec(b.model)  # an unknown model: ModelError naming the known ones
        t0 = time.monotonic()
        load_start = round(os.getloadavg()[0], 2)  # the cores are shared: the load explains noise
        cfg = with_ports(self.cfg)
        cfg = dataclasses.replace(cfg, serving=dataclasses.replace(cfg.serving, models=(b.model,)))
        self.catalog = (await asyncio.to_thread(load_catalogs, (b.model,), cfg.paths.weights_dir))[b.model]
        pcfg = bench_planner_config(cfg.planner, b.device_classes, b.bandwidths_mbps)
        n_cal = max(b.calibration_windows, pcfg.min_telemetry_samples)
        self.say(f"loading {b.model} and its test windows")
        clock = time.thread_time if b.torch_threads == 1 else time.perf_counter
        self.host = await asyncio.to_thread(
            _Host, b.model, cfg.paths.weights_dir, max(n_cal, b.windows + b.warmup), clock
        )
        host_stage_ms = self.host.calibrate(n_cal)

        stack = CloudStack(cfg, with_ray=b.with_ray, catalogs={b.model: self.catalog}, with_controller=False,
                           progress=self.say)  # fmt: skip
        async with stack:
            self.stack = stack
            self.say("measuring the cloud overhead (direct round trips at every cut)")
            overhead, per_cut, direct = await self._direct_overhead()
            cloud = CloudState(speedup_vs_host=1.0, queue_ms=0.0, overhead_ms=overhead)
            setups = self._setups(cloud, pcfg)
            cells: list[dict[str, Any]] = []
            total = len(b.device_classes) * len(b.bandwidths_mbps)
            for name in b.device_classes:
                for bw in b.bandwidths_mbps:
                    self.say(f"cell {len(cells) + 1}/{total}: {name} at {bw:g} Mbit/s")
                    cells.append(await self._cell(setups[name], bw, cloud, pcfg))
            tails = "Ray Serve" if b.with_ray else "in-process"
        host_front = sum(host_stage_ms)
        cat_front = self.catalog.levels[0].front_latency_ms[-1]
        config = {
            "model": b.model,
            "stages": self.catalog.n_stages,
            "device_classes": {
                n: {"speed_factor": s.device.speed_factor, "radio": s.device.radio.value, "rtt_ms": s.rtt_ms}
                for n, s in setups.items()
            },
            "bandwidths_mbps": list(b.bandwidths_mbps),
            "windows": b.windows,
            "warmup": b.warmup,
            "statistic": "median end-to-end ms of `windows` windows after `warmup` warm-ups, per choice",
            "tails": tails,
            "link": "simulators.link.LinkEmulator: constant bandwidth both ways, the class's RTT",
            "candidates": "every cut 0..N-1 x (fp32, int8) uncompressed, local, and both planners' choices "
                          "(those three always measured)",
            "pruning": "exhaustive" if b.exhaustive else (
                f"skip a candidate whose lower bound ({_BOUND_DEVICE_SLACK:g} x calibrated device front + "
                "promotion + RTT + bytes / bandwidth) exceeds the best measured median of its cell"),
            "simulated_hardware": (
                "device compute = stages [0, k) "
                + (f"run on this host ({'thread CPU' if b.torch_threads == 1 else 'wall'} time, "
                   f"{b.torch_threads} torch thread(s))" if b.compute_time == "measured" else "from the catalog")
                + " x the class's speed factor (pipelines/devices.py); encoding: host time, not stretched"),
            "compute_time": b.compute_time,
            "torch_threads": b.torch_threads,
            "host_front_ms": {"calibrated_at_start": round(host_front, 4), "catalog": round(cat_front, 4),
                              "ratio": round(host_front / cat_front, 3) if cat_front > 0 else None},
            "host_stage_ms": [round(v, 4) for v in host_stage_ms],
            "catalog_stage_ms": [round(v, 4) for v in self.catalog.stage_latency_ms],
            "promotion": b.promotion,
            "promotion_note": (
                "the link emulator has no radio promotion: the cost model's promotion delay of each "
                "offloaded choice is added to its measured latency (both sides count it)"
                if b.promotion == "add" else
                "the planner's radios have no promotion delay and none is added: both sides exclude it"),
            "preprocessing": "excluded on both sides (every choice runs it; the cost model does not count it)",
            "planner": ("plan_fleet, bucket edges = the grid's bandwidths, least latency with energy budgets "
                        "lifted, the classes' accuracy budgets; 'planned': catalog device profile and the "
                        "configured RTT; 'planned_with_telemetry': per-stage device compute and the device-measured "
                        "RTT (cell's device_rtt_ms), both measured at the start of the cell"),
            "load_average_1m": {"start": load_start, "end": round(os.getloadavg()[0], 2)},
            "cloud": {"overhead_ms": round(overhead, 3), "queue_ms": 0.0,
                      "overhead_ms_per_cut_codec": {k: round(v, 3) for k, v in per_cut.items()},
                      "direct_round_trip_ms": direct},
            "exhaustive": b.exhaustive,
            "seconds": round(time.monotonic() - t0, 1),
        }  # fmt: skip
        return {"config": config, "cells": cells, "summary": summarize(cells)}


def _sample_stats(samples: Sequence[_Sample]) -> dict[str, Any]:
    def med(xs: list[float]) -> float:
        return round(statistics.median(xs), 3)

    totals = [s.total_ms for s in samples]
    out: dict[str, Any] = {
        "measured_ms": med(totals),
        "min_ms": round(min(totals), 3),
        "max_ms": round(max(totals), 3),
        "windows": len(samples),
        "device_ms": med([s.device_ms for s in samples]),
    }
    if any(s.network_ms for s in samples):
        out.update(
            encode_ms=med([s.encode_ms for s in samples]),
            network_ms=med([s.network_ms for s in samples]),
            promotion_ms=med([s.promotion_ms for s in samples]),
            wire_bytes_up=int(statistics.median([s.bytes_up for s in samples])),
            wire_bytes_down=int(statistics.median([s.bytes_down for s in samples])),
            cloud_compute_ms=med([s.cloud_compute_ms for s in samples]),
            cloud_queue_ms=med([s.cloud_queue_ms for s in samples]),
        )
    return out


async def run_planner_bench_async(
    bench: PlannerBenchConfig | None = None, cfg: Config | None = None, progress: Progress | None = None
) -> dict[str, Any]:
    """{config, cells, summary} (see the module docstring); starts and stops its own cloud stack."""
    bench = bench or PlannerBenchConfig()
    cfg = cfg or Config()
    return await _Bench(bench, cfg, progress or _noop).run()


def run_planner_bench(
    bench: PlannerBenchConfig | None = None, cfg: Config | None = None, progress: Progress | None = None
) -> dict[str, Any]:
    """`run_planner_bench_async` in a fresh event loop."""
    return aio.run(run_planner_bench_async(bench, cfg, progress))


# ---------------------------------------------------------------------------------------------
# Output


def _ms(v: Any) -> str:
    return "-" if v is None else f"{v:.1f}"


def _ratio(v: Any) -> str:
    if v is None:
        return "[red]n/a[/]"
    colour = "green" if v <= TARGET_RATIO + 1e-9 else "red"
    return f"[{colour}]{v:.3f}[/]"


def render(result: Mapping[str, Any], console: Any) -> None:
    """A rich table of the cells, the summary, and what was simulated."""
    from rich.table import Table

    c = result["config"]
    table = Table(title=f"bench planner: {c['model']}, {c['tails']} tails, median of {c['windows']} windows")
    cols = ("class", "Mbit/s", "planned", "pred ms", "meas ms", "best measured", "ms", "ratio",
            "planned (telemetry)", "ratio", "measured/total", "s")  # fmt: skip
    for col in cols:
        table.add_column(col, justify="left" if col in ("class", "planned", "best measured") or "(" in col else "right")
    for cell in result["cells"]:
        p, pt, best = cell["planned"], cell["planned_with_telemetry"], cell.get("best") or {}
        table.add_row(
            cell["device_class"],
            f"{cell['bandwidth_mbps']:g}",
            p["choice"],
            _ms(p.get("predicted_ms")),
            _ms(p.get("measured_ms")),
            best.get("choice", "-"),
            _ms(best.get("measured_ms")),
            _ratio(cell.get("ratio")),
            pt["choice"],
            _ratio(cell.get("ratio_with_telemetry")),
            f"{cell['measured_candidates']}/{len(cell['candidates'])}",
            f"{cell['seconds']:.1f}",
        )
    console.print(table)
    s = result["summary"]
    if s.get("max_ratio") is not None:
        verdict = "[green]met[/]" if s["met"] else "[red]missed[/]"
        console.print(
            f"planned / best: max {s['max_ratio']:.3f}, {s['cells_within_10pct']}/{s['cells']} cells within 10% "
            f"(target <= {TARGET_RATIO:g} everywhere: {verdict})"
        )
        t = s["with_telemetry"]
        if t.get("max_ratio") is not None:
            console.print(
                f"with device telemetry: max {t['max_ratio']:.3f}, {t['cells_within_10pct']}/{s['cells']} within 10%"
            )
        if "worst" in s:
            w = s["worst"]
            console.print(f"worst cell: {w['device_class']} at {w['bandwidth_mbps']:g} Mbit/s: planned "
                          f"{w['planned']}, best {w['best']} ({w['ratio']:.3f})")  # fmt: skip
    hf = c["host_front_ms"]
    console.print(
        f"[dim]simulated hardware: {c['simulated_hardware']}; this host ran the whole front in "
        f"{hf['calibrated_at_start']:.2f} ms (catalog {hf['catalog']:.2f} ms, x{hf['ratio']})[/]"
    )
    console.print(f"[dim]promotion: {c['promotion_note']}[/]")
    console.print("[dim]planned: catalog profile, configured RTT; planned (telemetry): per-stage compute and RTT "
                  "as the devices would report them (see each cell's device_rtt_ms)[/]")  # fmt: skip
    if "load_average_1m" in c:
        la = c["load_average_1m"]
        console.print(f"[dim]host load average (2 shared cores): {la['start']} at the start, {la['end']} at the end[/]")
    console.print(f"[dim]cloud overhead {c['cloud']['overhead_ms']:.2f} ms (measured); {c['preprocessing']}[/]")
    for cell in result["cells"]:
        for cand in cell["candidates"]:
            if "error" in cand:
                console.print(f"[yellow]{cell['device_class']} at {cell['bandwidth_mbps']:g} Mbit/s, "
                              f"{cand['choice']}: {cand['error']}[/]")  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--bandwidths", default="0.1,0.5,1,2,5,10,20,50")
    parser.add_argument("--classes", default="phone,iot_board,watch")
    parser.add_argument("--model", default=PlannerBenchConfig.model)
    parser.add_argument("--windows", type=int, default=PlannerBenchConfig.windows)
    parser.add_argument("--in-process", action="store_true")
    parser.add_argument("--exhaustive", action="store_true")
    args = parser.parse_args(argv)
    bench = PlannerBenchConfig(
        model=args.model,
        device_classes=parse_classes(args.classes),
        bandwidths_mbps=parse_bandwidths(args.bandwidths),
        windows=args.windows,
        with_ray=not args.in_process,
        exhaustive=args.exhaustive,
    )
    result = run_planner_bench(bench, progress=lambda m: print(m, file=sys.stderr))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
