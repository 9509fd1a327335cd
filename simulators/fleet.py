"""The fleet runner: N simulated devices as asyncio tasks in one process, against the real cloud.

Each device is the product's own `edge.runtime.EdgeDevice` with its class (pipelines/devices.py),
its own real sensor stream (the test recording of its model, from its own start position, paced in
real time by `edge.sources.ReplaySource`), its own trace on its own link, and its own
`GrpcTransport` to the real broker, which batches for the Ray Serve tails; the controller replans
from the fleet's telemetry meanwhile. The link (`simulator.link`, simulators/link.py) is either
    proxy   a `LinkEmulator` per device: a shaping TCP proxy that the real gRPC bytes cross (the
            default; every byte crosses loopback twice more and is copied through asyncio streams)
    inline  a `ShapedTransport` around a `GrpcTransport` that dials the broker directly: each call's
            bytes wait out the same link model (bandwidth, delay, loss, slow start, outages) in
            this process first; what it does not shape is in its docstring (the `scale` scenario)

Simulated hardware. A device's preprocessing and stages run for real on this host (one thread, on
the devices' backend, `edge.backend` as `config.edge.backend` chooses: ONNX Runtime on the exported
graphs, or PyTorch, shared by every device of a model), and their time is stretched by the class's
`speed_factor` (pipelines/devices.py: how much slower than this host each class is, with the
published sources); the device waits out the stretched time before it goes on, so latency, the
deadline and energy see the device's speed.
What is stretched (`simulator.compute_time`):
    reference  the stage's and the preprocessing's host time in the model's catalog (this host,
               uncontended: the basis the speed factors are defined on; a microcontroller: their
               MACs / operations at its rate), the numbers the planner's cost model uses. The
               default: 200 devices sharing 2 cores inflate each window's own CPU time 2-3x, and
               that is the host's congestion, not the simulated device's speed.
    measured   the CPU time the window's thread actually took (`time.thread_time`); what fixed_cut
               and the oracle know is this host's stage and preprocessing times measured at start.
The radio is simulated hardware too (simulators/hardware.py, `SimulatedHardware`: the device's one
hook into the simulator): a call that starts after the radio dropped to idle (a gap longer than
its tails) first waits the radio's promotion delay (Huang et al. 2012: LTE 260 ms, WiFi 79 ms), as
the cost model assumes, because the device's own radio state (edge/radio.py) says it is due; the
bytes' time on the air is their serialisation on the true trace; the platform reports the link
lost a radio-specific detection time after a scripted outage starts.

Energy per window (mJ), with the power model the controller uses:
    compute  active_mw x stretched compute time (preprocessing, front, and the tail when local)
    radio    the device's radio state (edge/radio.py, Huang et al. 2012: promotion, active, the
             tail since the previous call, the connected wait): the energy of this window's own
             calls, their bytes' time on air taken from the true trace
    wait     idle_mw x the time the device waited for the cloud's answer
Radio energy that belongs to no window (telemetry reports and their pings, breaker probes, the tail still pending
when the run ends) is each device's `radio_overhead_mj` (PolicyRun): window radio energy plus that
overhead equals the device radio state's total, by construction and by test.

Policies (simulators/policies.py) run one after the other, each for `duration_s`, on the same
inputs: the same devices, traces, trace offsets, recording positions, start phases and seeds, and
links whose clocks start with the policy. Every window gets a result (the runtime finishes it
locally on any failure); `lost` counts windows emitted without a result, and is 0. A policy that
cannot run on a class at all (all_local where the whole model does not fit the device's memory:
`policies.infeasible_reason`) does not run that class's devices; `PolicyRun.infeasible` says why.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import math
import random
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from prometheus_client import CollectorRegistry

from cloud.controller.costmodel import CloudState, DeviceCostProfile
from cloud.metrics import BrokerMetrics
from edge.backend import FrontBackend, choose_backend, make_backend
from edge.runtime import EdgeDevice, ForcedChoice
from edge.sink import WindowResult
from edge.sources import RecordedWindow, ReplaySource, SensorWindow, recorded_windows
from edge.transport import GrpcTransport
from pipelines.catalog import ModelCatalog
from pipelines.codecs import encode
from pipelines.compress import compress_front_at_level
from pipelines.devices import DEVICE_CLASSES, DeviceClass, edge_fallback, front_fits, stage_device_ms
from pipelines.groups import group_members
from pipelines.models import get_spec
from pipelines.stages import StagedModel
from pipelines.training import TrainedModel, load_trained
from simulators.capacity import read_host_cpu, usage_since
from simulators.hardware import LINK_LOSS_DETECT_S, SimulatedHardware
from simulators.link import BYTES_PER_MBIT, LinkEmulator, ShapedTransport, ShapingSchedule
from simulators.policies import (
    OracleTable,
    Policy,
    PolicyInputs,
    all_cloud_choice,
    all_local_choice,
    calibrated_catalog,
    choice_text,
    cloud_input_choice,
    fixed_cut_choice,
    infeasible_reason,
    policy_inputs,
)
from simulators.scenario import DeviceSpec, assign_devices, select_traces
from simulators.traces import Trace
from splitsense import aio
from splitsense.config import Config, EdgeConfig
from splitsense.errors import ConfigError
from splitsense.kinds import EncodedTensor
from splitsense.wire import ExecutionMode

__all__ = [
    "CloudSide",
    "FleetProgress",
    "FleetResult",
    "FleetRunner",
    "PolicyRun",
    "WindowRecord",
    "simulate",
    "unfit_fronts",
]

log = logging.getLogger(__name__)

_BYTES_PER_LOGIT = 4
# Cloud cost per request the oracle and fixed_cut assume: one Ray Serve handle call (~8 ms p50
# here, DESIGN) with Ray, about a millisecond of gRPC and batching with the in-process tails.
RAY_CLOUD_OVERHEAD_MS = 8.0
IN_PROCESS_CLOUD_OVERHEAD_MS = 1.0
_START_DELAY_S = 0.5  # links up and devices built before the policy's clock starts
_CALIBRATION_RUNS = 15
_PLAN_WAIT_S = 15.0  # adaptive waits this long at most for the controller's first plan
_LAG_PERIOD_S = 0.05  # event-loop lag sampling


class CloudSide(Protocol):
    """What the fleet needs of the cloud (cloud.stack.CloudStack has it)."""

    @property
    def broker_address(self) -> str: ...

    def token_for(self, device_id: str) -> str: ...

    @property
    def broker(self) -> Any: ...  # cloud.broker.Broker: .metrics.registry, .plans

    catalogs: dict[str, ModelCatalog]


class FleetProgress:
    """Told what the fleet does; the CLI draws its progress bar from it. No-ops by default."""

    def policy_started(self, policy: str, windows_expected: int) -> None:
        pass

    def window_done(self, policy: str, record: WindowRecord) -> None:
        pass

    def policy_done(self, policy: str, run: PolicyRun) -> None:
        pass


@dataclass(slots=True)
class WindowRecord:
    """One window of one device under one policy: what happened and what it cost."""

    policy: str
    device_id: str
    device_class: str
    model: str
    index: int
    t_s: float  # when the window was emitted, seconds since the policy's start
    lag_ms: float  # how long it waited for the device (its previous window still running)
    latency_ms: float  # from the window being available to its result
    mode: str  # offloaded | local | fallback
    cut: int
    n_stages: int
    codec: str | None
    level: float
    correct: bool
    bytes_sent: int
    compute_mj: float
    radio_mj: float
    wait_mj: float
    true_mbps: float  # the link's real bandwidth when the window started (0 in an outage)
    estimate_mbps: float  # the device's own estimate then (what it chose its plan row by)
    plan_version: int
    reason: str  # why local, fallback or stored (deferred): the result's typed kind ("" when answered at once)
    tasks_correct: tuple[tuple[str, bool], ...] = ()  # (model, correct) of each extra task of the window

    @property
    def energy_mj(self) -> float:
        return self.compute_mj + self.radio_mj + self.wait_mj

    def to_dict(self) -> dict[str, Any]:
        return {
            "policy": self.policy,
            "device_id": self.device_id,
            "device_class": self.device_class,
            "model": self.model,
            "index": self.index,
            "t_s": round(self.t_s, 4),
            "lag_ms": round(self.lag_ms, 3),
            "latency_ms": round(self.latency_ms, 3),
            "mode": self.mode,
            "cut": self.cut,
            "n_stages": self.n_stages,
            "codec": self.codec,
            "level": self.level,
            "correct": self.correct,
            "bytes_sent": self.bytes_sent,
            "energy_mj": round(self.energy_mj, 4),
            "compute_mj": round(self.compute_mj, 4),
            "radio_mj": round(self.radio_mj, 4),
            "wait_mj": round(self.wait_mj, 4),
            "true_mbps": round(self.true_mbps, 4),
            "estimate_mbps": round(self.estimate_mbps, 4),
            "plan_version": self.plan_version,
            "reason": self.reason,
            "tasks_correct": {m: c for m, c in self.tasks_correct},
        }


@dataclass
class PolicyRun:
    """One policy's run over the whole fleet."""

    policy: str
    duration_s: float
    wall_s: float
    windows_expected: dict[str, int]  # per device
    records: list[WindowRecord]
    device_errors: dict[str, str]  # device id -> what stopped it (never expected)
    broker: dict[str, Any]  # batch sizes and sheds during this run
    plan_versions: list[int]  # plan versions the devices used (adaptive)
    loop_lag_ms: dict[str, float] = field(default_factory=dict)  # how late the event loop woke up
    infeasible: dict[str, str] = field(default_factory=dict)  # device class -> why it was not run
    # per device: radio energy charged to no window (telemetry, probes, the final tail), mJ
    radio_overhead_mj: dict[str, float] = field(default_factory=dict)
    # why the lost windows got no result, as the devices' own runs counted them (edge RunSummary:
    # expired or refused by the store, rejected, codec; "pending": still stored when a device
    # stopped), and "device error" for a device that stopped on a bug: the lost windows, explained
    lost_by_reason: dict[str, int] = field(default_factory=dict)
    # a sharded fleet (simulators/shards.py): per shard, its devices, windows, wall time, loop lag
    shards: list[dict[str, Any]] = field(default_factory=list)
    # the host's CPU over the run (simulators/capacity.py usage_since): was a shortfall the host's?
    host_cpu: dict[str, float] = field(default_factory=dict)

    @property
    def lost(self) -> int:
        return sum(self.windows_expected.values()) - len(self.records)

    @property
    def sensor_s(self) -> float:
        """When the run's last window was due (its sensor time), seconds after the start."""
        return max((r.t_s for r in self.records), default=0.0)

    @property
    def realtime_factor(self) -> float:
        """Sensor time / wall time until every result was in: 1.0 (less the last window's latency)
        means the fleet kept up with its sensors; a fleet that falls behind ends late, lower."""
        return self.sensor_s / self.wall_s if self.wall_s > 0 else 0.0


@dataclass
class FleetResult:
    config: Config
    specs: list[DeviceSpec]
    runs: dict[str, PolicyRun]
    objectives: dict[str, str]  # device class -> "latency" | "energy"
    backend: str  # "ray" | "in_process"
    host_stage_ms: dict[str, list[float]]  # per model, this host, one thread (what is stretched)
    cloud_overhead_ms: float
    wall_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# Inputs


def device_windows(base: list[RecordedWindow], offset: int, duration_s: float, phase_s: float) -> list[RecordedWindow]:
    """The recording from position `offset` on (wrapping), timed like the recording from its start,
    for the windows that complete within `duration_s` of the policy's start."""
    if not base:
        raise ConfigError("an empty recording cannot feed a device")
    times = [w.stream_t_s for w in base]
    period = times[1] - times[0] if len(times) > 1 else times[0]
    out: list[RecordedWindow] = []
    j = 0
    while True:
        t = times[j] if j < len(times) else times[-1] + (j - len(times) + 1) * period
        if phase_s + t > duration_s:
            return out
        src = base[(offset + j) % len(base)]
        out.append(RecordedWindow(f"{src.window_id}@{j}", src.label, src.raw, t, src.task_labels))
        j += 1


def measure_host_stage_ms(
    trained: TrainedModel, runs: int = _CALIBRATION_RUNS, backend: FrontBackend | None = None
) -> list[float]:
    """Median thread-CPU ms of each stage at batch 1 in this process: what the devices stretch
    (on `backend`, the devices' own, when given; PyTorch on `trained` otherwise)."""
    if backend is not None:
        return _backend_stage_ms(backend, trained.spec.name, runs)
    model = trained.model.eval()
    x = torch.zeros((1, *model.input_shape))
    samples: list[list[float]] = [[] for _ in range(model.n_stages)]
    with torch.inference_mode():
        for _ in range(3):
            model(x)
        for _ in range(runs):
            a = x
            for i, stage in enumerate(model.stages):
                t = time.thread_time()
                a = stage(a)
                samples[i].append((time.thread_time() - t) * 1000.0)
    return [float(np.median(s)) for s in samples]


def compressed_fronts(model: StagedModel, levels: tuple[float, ...]) -> dict[tuple[int, float], StagedModel]:
    """Every (cut, level) front a plan or the oracle may ask for, built once per model and shared
    by its devices: compression is per layer, so the front of cut k at level L is the first k
    stages of the whole model compressed at L followed by the original stages (what
    `compress_front_at_level(model, k, L)` makes, without k SVD passes). A real device would have
    them ready before switching plans; building one inside a window would stall the whole fleet."""
    out: dict[tuple[int, float], StagedModel] = {}
    n = model.n_stages
    for level in sorted({float(x) for x in levels if 0 < x < 1}):
        full = compress_front_at_level(model, n, level).eval()
        for k in range(1, n + 1):
            stages = [(name, full.stages[i] if i < k else model.stages[i]) for i, name in enumerate(model.stage_names)]
            out[(k, level)] = StagedModel(model.name, stages, model.input_shape, model.class_names).eval()
    return out


def unfit_fronts(device: DeviceClass, catalog: ModelCatalog) -> dict[tuple[int, float], str]:
    """The (cut, level) fronts, cuts 1..N at every catalog level, that `device` cannot hold, with
    the reason (`pipelines.devices.front_fits`). Cut 0 (preprocessing only) always fits."""
    out: dict[tuple[int, float], str] = {}
    for lvl in catalog.levels:
        for k in range(1, catalog.n_stages + 1):
            why = front_fits(device, catalog, k, lvl.energy_kept)
            if why is not None:
                out[(k, float(lvl.energy_kept))] = why
    return out


def cost_profile(device: DeviceClass) -> DeviceCostProfile:
    """The cost model's view of a device class (as the controller builds it)."""
    return DeviceCostProfile.of(device)


def usable_levels(config: Config, catalogs: Mapping[str, ModelCatalog]) -> dict[str, tuple[float, ...]]:
    """Per model of the fleet, the compression levels < 1 that keep at least one cut within the
    accuracy budget of a class running it: the only ones the planner and the oracle can choose."""
    sim = config.simulator
    out: dict[str, set[float]] = defaultdict(set)
    for cls in sim.device_classes:
        model = sim.models[cls]
        cat = catalogs.get(model)
        if cat is None:
            continue
        budget = config.planner.classes[cls].accuracy_budget_points
        for lvl in cat.levels:
            if lvl.energy_kept < 1.0:
                loss = [(cat.base_accuracy - a) * 100.0 for a in lvl.accuracy[1:]]
                if min(loss) <= budget + 1e-9:
                    out[model].add(lvl.energy_kept)
    return {m: tuple(sorted(v)) for m, v in out.items()}


class ReferenceTime:
    """`device_time_ms` of EdgeDevice for compute_time "reference": the catalog's host time of the
    stage at its compression level (preprocessing, stage -1: the catalog's `prep_ms`) x the class's
    speed factor; for a class with a runtime MAC rate (a microcontroller,
    pipelines.devices.DeviceClass.macs_per_s) the stage's MACs (scaled by the level's latency ratio)
    and the catalog's `prep_ops` at that rate. The cost model's numbers (`costmodel.device_prep_ms`)."""

    def __init__(self, catalog: ModelCatalog, speed_factor: float, macs_per_s: float | None = None) -> None:
        self.speed_factor = speed_factor
        self.macs_per_s = macs_per_s
        self.prep_device_ms = stage_device_ms(self, catalog.prep_ops, catalog.prep_ms)  # every window
        self.stage_ms: dict[float, tuple[float, ...]] = {}
        for lvl in catalog.levels:
            front = lvl.front_latency_ms
            self.stage_ms[lvl.energy_kept] = tuple(front[i + 1] - front[i] for i in range(catalog.n_stages))
        self._full = self.stage_ms[1.0]
        self._macs = catalog.stage_macs

    def __call__(self, stage: int, level: float, host_ms: float) -> float:
        rate = self.macs_per_s
        if stage < 0:
            return self.prep_device_ms
        ms = max(self.stage_ms.get(level, self._full)[stage], 0.0)
        if not rate:
            return ms * self.speed_factor
        full = self._full[stage]
        return self._macs[stage] / rate * 1000.0 * (ms / full if full > 0 else 1.0)


def _backend_stage_ms(backend: FrontBackend, model: str, runs: int) -> list[float]:
    info = backend.info(model)
    x = np.zeros((1, *info.input_shape), dtype=np.float32)
    samples: list[list[float]] = [[] for _ in range(info.n_stages)]
    for _ in range(3):
        backend.run_front(model, info.n_stages, 1.0, x)
    for _ in range(runs):
        a = x
        for i in range(info.n_stages):
            t = time.thread_time()
            a = backend.run_stage(model, i, 1.0, a)
            samples[i].append((time.thread_time() - t) * 1000.0)
    return [float(np.median(s)) for s in samples]


def measure_prep_ms(
    trained: TrainedModel, window: RecordedWindow, runs: int = _CALIBRATION_RUNS, backend: FrontBackend | None = None
) -> float:
    """Median thread-CPU ms of preprocessing one window in this process (compute_time "measured":
    what fixed_cut and the oracle know of it, as `measure_host_stage_ms` of the stages)."""
    if backend is not None:
        name = trained.spec.name
        for _ in range(3):
            backend.prepare(name, window.raw)
        times = []
        for _ in range(runs):
            t = time.thread_time()
            backend.prepare(name, window.raw)
            times.append((time.thread_time() - t) * 1000.0)
        return float(np.median(times))
    samples = []
    with torch.inference_mode():
        for _ in range(3):
            trained.prepare_window(window.raw)
        for _ in range(runs):
            t = time.thread_time()
            trained.prepare_window(window.raw)
            samples.append((time.thread_time() - t) * 1000.0)
    return float(np.median(samples))


# ---------------------------------------------------------------------------------------------
# One device's books


class _Ledger:
    """Builds a device's WindowRecords: its windows' emit times, the energy the device's radio
    state charged them, the link's true bandwidth."""

    def __init__(
        self,
        policy: str,
        spec: DeviceSpec,
        device_class: DeviceClass,
        n_stages: int,
        schedule: ShapingSchedule,
        clock_zero: Callable[[], float],
        t0: float,
        out: list[WindowRecord],
        progress: FleetProgress,
    ) -> None:
        self.policy = policy
        self.spec = spec
        self.cls = device_class
        self.n_stages = n_stages
        self.schedule = schedule
        self.clock_zero = clock_zero  # monotonic time at which the link's clock reads 0
        self.t0 = t0
        self.out = out
        self.progress = progress
        self.emitted: dict[str, SensorWindow] = {}
        self.prev_done = -math.inf
        self.device: EdgeDevice | None = None
        self.mine: list[WindowRecord] = []
        self.overhead_mj = 0.0

    async def watch(self, source: ReplaySource) -> AsyncIterator[SensorWindow]:
        async for window in source:
            self.emitted[window.window_id] = window
            yield window

    def link_time(self, t: float) -> float:
        return t - self.clock_zero()

    def on_result(self, r: WindowResult) -> None:
        now = time.monotonic()
        window = self.emitted.pop(r.window_id)
        deferred = r.mode is ExecutionMode.DEFERRED
        if deferred:  # answered long after later windows: it never held the device up
            start = window.t_emit
        else:
            start = max(window.t_emit, self.prev_done)
            self.prev_done = now
        offloaded = r.mode in (ExecutionMode.OFFLOADED, ExecutionMode.DEFERRED)
        compute_ms = r.front_ms + (0.0 if offloaded else sum(r.stage_ms[r.cut :])) + r.task_ms
        compute_mj = self.cls.active_mw * compute_ms / 1000.0
        wait_mj = 0.0
        if r.bytes_sent > 0 and not deferred:  # the device idled while its call was out
            lag_ms = max(0.0, start - window.t_emit) * 1000.0
            wait_mj = self.cls.idle_mw * max(0.0, r.latency_ms - lag_ms - compute_ms) / 1000.0
        record = WindowRecord(
            policy=self.policy,
            device_id=self.spec.device_id,
            device_class=self.spec.device_class,
            model=self.spec.model,
            index=int(r.window_id.rsplit("@", 1)[-1]),
            t_s=window.t_emit - self.t0,
            lag_ms=max(0.0, start - window.t_emit) * 1000.0,
            latency_ms=r.latency_ms,
            mode=r.mode.value,
            cut=r.cut,
            n_stages=self.n_stages,
            codec=r.codec,
            level=r.compression_energy_kept,
            correct=r.correct,
            bytes_sent=r.bytes_sent,
            compute_mj=compute_mj,
            radio_mj=r.radio_mj,
            wait_mj=wait_mj,
            true_mbps=self.schedule.bandwidth_at(self.link_time(start)),
            estimate_mbps=r.estimate_mbps if r.estimate_mbps is not None else 0.0,
            plan_version=r.plan_version,
            reason=r.kind.value if r.kind is not None else "",
            tasks_correct=tuple((m, p == lab) for m, lab, p in r.tasks),
        )
        self.mine.append(record)
        self.out.append(record)
        self.progress.window_done(self.policy, record)

    def close(self, end: float) -> None:
        """The radio energy of this device that no window carries (telemetry, probes, the tail
        pending at the end): the device radio state's total less its windows' radio energy."""
        if self.device is not None:
            total = self.device.radio.energy_until(end)
            self.overhead_mj = max(total - sum(r.radio_mj for r in self.mine), 0.0)


# ---------------------------------------------------------------------------------------------
# The runner


class FleetRunner:
    """Runs `config.simulator` against a cloud, one policy after another: `await run(cloud)`.

    `prepare()` (blocking, a few seconds: models, recordings, the host's stage times, traces, the
    fleet) may run in a thread while the cloud starts; `run` calls it if not, then builds what
    needs the cloud's catalogs (the oracle's tables, the compressed fronts) and runs the policies.
    """

    def __init__(
        self,
        config: Config,
        *,
        backend: str = "ray",
        progress: FleetProgress | None = None,
    ) -> None:
        self.config = config
        self.sim = config.simulator
        self.backend = backend
        self.progress = progress or FleetProgress()
        self.cloud_overhead_ms = RAY_CLOUD_OVERHEAD_MS if backend == "ray" else IN_PROCESS_CLOUD_OVERHEAD_MS
        self.trained: dict[str, TrainedModel] = {}
        self.recordings: dict[str, list[RecordedWindow]] = {}
        self.tasks: dict[str, tuple[TrainedModel, ...]] = {}  # per model or group: its extra tasks
        self.fronts: dict[str, dict[tuple[int, float], StagedModel]] = {}
        # The devices' inference engine (edge.backend; config.edge.backend), one per model or group,
        # shared by every device that runs it: its sessions or compressed fronts are built once.
        self.engines: dict[str, FrontBackend] = {}
        self.engine_kind = "torch"
        self.encoder: Callable[..., EncodedTensor] = encode  # the devices' (a sharded fleet may reuse results)
        self.engine_why = ""
        self.host_stage_ms: dict[str, list[float]] = {}
        self.prep_ms: dict[str, float] = {}  # compute_time "measured" only: this host's, at start
        self.catalogs: dict[str, ModelCatalog] = {}  # what the oracle and fixed_cut know
        self.inputs: dict[str, PolicyInputs] = {}  # per device class
        self.oracles: dict[str, OracleTable] = {}
        self.specs: list[DeviceSpec] = []
        self.cloud: CloudSide | Any = None
        self._traces: list[Trace] | None = None
        self._prepared = False

    # --- set-up ---------------------------------------------------------------------------------

    def traces(self) -> list[Trace]:
        """The fleet's traces (loaded once): a malformed file fails here, naming its file and line."""
        if self._traces is None:
            self._traces = select_traces(self.sim)
        return self._traces

    def prepare(self) -> None:
        """Load models, recordings and traces, measure the host, assign the fleet. Idempotent."""
        if self._prepared:
            return
        sim, cfg = self.sim, self.config
        torch.set_num_threads(sim.torch_threads)  # also in this thread, if it is a worker
        for cls in sim.device_classes:
            if cls not in DEVICE_CLASSES:
                raise ConfigError(
                    f"simulator.device_classes: unknown class {cls!r}; known: {', '.join(DEVICE_CLASSES)}"
                )
            if cls not in cfg.planner.classes:
                raise ConfigError(f"device class {cls!r} has no objective in planner.classes")
            if DEVICE_CLASSES[cls].radio.value not in sim.rtt_ms:
                raise ConfigError(f"simulator.rtt_ms has no RTT for radio {DEVICE_CLASSES[cls].radio.value!r}")
        models = sorted({sim.models[c] for c in sim.device_classes})
        traces = self.traces()
        for m in models:  # a model, or a task group "a+b" (pipelines/groups.py): its first member runs the front
            members = group_members(m)
            tm = load_trained(members[0], cfg.paths.weights_dir)
            tm.model.eval()
            self.trained[m] = tm
            self.tasks[m] = tuple(load_trained(t, cfg.paths.weights_dir) for t in members[1:])
            for t in self.tasks[m]:
                t.model.eval()
            self.recordings[m] = list(
                recorded_windows(
                    get_spec(members[0]),
                    frame_ms=cfg.edge.audio_frame_ms,
                    tasks=tuple(get_spec(t) for t in members[1:]),
                )
            )
            self.fronts[m] = {}
        every = sorted({name for m in models for name in group_members(m)})
        self.engine_kind, self.engine_why = choose_backend(
            cfg.edge.backend, every, root=cfg.edge.export_dir, weights_dir=cfg.paths.weights_dir
        )
        for m in models:
            tm, members = self.trained[m], group_members(m)
            self.engines[m] = make_backend(
                self.engine_kind,
                members,
                root=cfg.edge.export_dir,
                weights_dir=cfg.paths.weights_dir,
                intra_op_threads=sim.torch_threads,
                trained=(tm, *self.tasks[m]),
                front_caches={members[0]: self.fronts[m]},
            )
            onnx = self.engines[m] if self.engine_kind == "onnx" else None  # torch: as the devices run it
            self.host_stage_ms[m] = measure_host_stage_ms(tm, backend=onnx)
            if sim.compute_time == "measured":  # "reference" charges the catalog's prep_ms / prep_ops
                self.prep_ms[m] = measure_prep_ms(tm, self.recordings[m][0], backend=onnx)
        periods = {m: _period(r) for m, r in self.recordings.items()}
        self.specs = assign_devices(sim, traces, {m: len(r) for m, r in self.recordings.items()}, periods)
        self._prepared = True

    def _build_fronts(self, catalogs: Mapping[str, ModelCatalog]) -> None:
        """The compressed fronts any plan or the oracle may choose: the levels that keep some cut
        within a class's accuracy budget (the planner never picks another)."""
        torch.set_num_threads(self.sim.torch_threads)
        for model, levels in usable_levels(self.config, catalogs).items():
            if self.engine_kind == "torch":
                self.fronts[model].update(compressed_fronts(self.trained[model].model, levels))
            else:  # open the sessions now, not inside a window
                self.engines[model].load(group_members(model)[0], (1.0, *levels))

    def _prepare_policies(self, catalogs: Mapping[str, ModelCatalog]) -> None:
        """What fixed_cut and the oracle know: the cloud's catalogs, calibrated to this host."""
        sim, cfg = self.sim, self.config
        missing = sorted({sim.models[c] for c in sim.device_classes} - set(catalogs))
        if missing:
            raise ConfigError(f"the cloud has no catalog for models {missing}; serve them (serving.models)")
        cloud = CloudState(overhead_ms=self.cloud_overhead_ms)
        for cls in sim.device_classes:
            dev = DEVICE_CLASSES[cls]
            model = sim.models[cls]
            if sim.compute_time == "reference":  # the simulated hardware is the catalog x speed
                catalog = catalogs[model]
            else:  # ... or this host's own time, measured at start
                catalog = calibrated_catalog(catalogs[model], self.host_stage_ms[model], self.prep_ms[model])
            self.catalogs[model] = catalog
            self.inputs[cls] = policy_inputs(
                catalog,
                cost_profile(dev),
                cfg.planner.classes[cls],
                sim.rtt_ms[dev.radio.value],
                cloud,
                unfit_fronts(dev, catalog),
            )
            self.oracles[cls] = OracleTable(self.inputs[cls])
        by_class: dict[str, list[np.ndarray]] = defaultdict(list)
        for spec in self.specs:  # every bandwidth the oracle can meet: one vectorised pass per class
            by_class[spec.device_class].append(spec.trace.mbps)
        for cls, arrays in by_class.items():
            self.oracles[cls].prime(np.concatenate([*arrays, [0.0]]))

    # --- running --------------------------------------------------------------------------------

    async def run(self, cloud: CloudSide) -> FleetResult:
        self.cloud = cloud
        torch.set_num_threads(self.sim.torch_threads)
        self.prepare()
        self._prepare_policies(cloud.catalogs)
        await asyncio.to_thread(self._build_fronts, cloud.catalogs)
        t_start = time.monotonic()
        runs: dict[str, PolicyRun] = {}
        try:
            for name in self.sim.policies:
                policy = Policy(name)
                if policy is Policy.ADAPTIVE:
                    await self._wait_for_plan()
                runs[name] = await self.run_policy(policy)
        finally:
            gc.unfreeze()  # what run_policy froze is collectable again
        return FleetResult(
            config=self.config,
            specs=self.specs,
            runs=runs,
            objectives={c: self.config.planner.classes[c].objective for c in self.sim.device_classes},
            backend=self.backend,
            host_stage_ms=self.host_stage_ms,
            cloud_overhead_ms=self.cloud_overhead_ms,
            wall_s=time.monotonic() - t_start,
            extra={
                # the preprocessing's host ms fixed_cut and the oracle know: the catalog's, or this host's
                "host_prep_ms": {m: round(c.prep_ms, 4) for m, c in self.catalogs.items()},
                "policy_inputs": dict(self.inputs),  # what the report checks budgets' feasibility on
                "device_backend": {"kind": self.engine_kind, "why": self.engine_why},
            },
        )

    async def _wait_for_plan(self) -> None:
        """The broker serves a static plan (version 1) until the controller's first one lands."""
        deadline = time.monotonic() + _PLAN_WAIT_S
        while self.cloud.broker.plans.version <= 1 and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        if self.cloud.broker.plans.version <= 1:
            log.warning("adaptive starts on the broker's static plan: no controller plan after %.0f s", _PLAN_WAIT_S)

    async def run_policy(self, policy: Policy, start_wall: float | None = None) -> PolicyRun:
        """Every device of the fleet under `policy` for `duration_s`, concurrently (after `run`
        has set up the cloud side). `start_wall` (time.time()): the policy's clock origin, shared
        by the shards of a sharded fleet; None: half a second from now."""
        sim = self.sim
        infeasible = self.infeasible(policy)
        specs = [s for s in self.specs if s.device_class not in infeasible]
        expected = {
            s.device_id: len(device_windows(self.recordings[s.model], s.recording_offset, sim.duration_s, s.phase_s))
            for s in specs
        }
        self.progress.policy_started(policy.value, sum(expected.values()))
        # Everything built so far (models, recordings, traces, the cloud) lives for the whole run:
        # out of the collector's sight, a full collection no longer stalls every device at once.
        gc.collect()
        gc.freeze()
        records: list[WindowRecord] = []
        errors: dict[str, str] = {}
        overhead: dict[str, float] = {}
        unanswered: Counter[str] = Counter()
        registry = _broker_registry(self.cloud)  # None in a shard: the driver reads the broker
        before = _batch_totals(registry) if registry is not None else None
        loop = asyncio.get_running_loop()
        cpu0 = read_host_cpu()
        t0 = loop.time() + (_START_DELAY_S if start_wall is None else start_wall - time.time())
        tasks = [
            asyncio.create_task(
                self._device(policy, spec, t0, records, errors, overhead, unanswered), name=spec.device_id
            )
            for spec in specs
        ]
        lags: list[float] = []
        monitor = asyncio.create_task(_watch_loop_lag(lags), name="loop-lag")
        try:
            await asyncio.gather(*tasks)
        finally:
            monitor.cancel()
            for t in tasks:
                t.cancel()
            await asyncio.gather(monitor, *tasks, return_exceptions=True)
        wall = loop.time() - t0
        after = _batch_totals(registry) if registry is not None else None
        if errors:  # a device that stopped on a bug: what it had not answered is lost to it
            answered = Counter(r.device_id for r in records if r.device_id in errors)
            unanswered["device error"] += sum(max(expected.get(d, 0) - answered[d], 0) for d in errors)
        run = PolicyRun(
            policy=policy.value,
            duration_s=sim.duration_s,
            wall_s=wall,
            windows_expected=expected,
            records=records,
            device_errors=errors,
            broker=_batch_delta(before, after) if before is not None and after is not None else {},
            plan_versions=sorted({r.plan_version for r in records}),
            loop_lag_ms=_lag_stats(lags),
            infeasible=infeasible,
            radio_overhead_mj={k: round(v, 4) for k, v in sorted(overhead.items())},
            host_cpu=usage_since(cpu0),
            lost_by_reason=dict(sorted(unanswered.items())),
        )
        self.progress.policy_done(policy.value, run)
        return run

    def infeasible(self, policy: Policy) -> dict[str, str]:
        """Per device class of the fleet where `policy` cannot run at all, why (after `run` has
        read the cloud's catalogs; empty before)."""
        out = {}
        for cls in self.sim.device_classes:
            inputs = self.inputs.get(cls)
            why = infeasible_reason(policy, inputs) if inputs is not None else None
            if why is not None:
                out[cls] = why
        return out

    async def _device(
        self,
        policy: Policy,
        spec: DeviceSpec,
        t0: float,
        records: list[WindowRecord],
        errors: dict[str, str],
        overhead: dict[str, float],
        unanswered: Counter[str],
    ) -> None:
        try:
            await self._device_run(policy, spec, t0, records, overhead, unanswered)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # one device's bug must not stop the fleet; its windows count as lost
            log.exception("device %s failed under %s", spec.device_id, policy.value)
            errors[spec.device_id] = f"{type(e).__name__}: {e}"

    async def _device_run(
        self,
        policy: Policy,
        spec: DeviceSpec,
        t0: float,
        records: list[WindowRecord],
        overhead: dict[str, float],
        unanswered: Counter[str],
    ) -> None:
        sim, cfg = self.sim, self.config
        dev = DEVICE_CLASSES[spec.device_class]
        trained = self.trained[spec.model]
        objective = cfg.planner.classes[spec.device_class]
        deadline_ms = objective.deadline_ms or cfg.edge.deadline_ms
        loop = asyncio.get_running_loop()
        link: LinkEmulator | None = None
        transport: GrpcTransport | ShapedTransport | None = None
        try:
            # Every policy, all_local included, has its link and transport: the same plan watch and
            # telemetry load on the host, so that only the choices differ between policies.
            # The link's clock starts when it does (now, before t0): shift its trace and outages
            # by that lead so that its clock and the policy's agree to within the start-up time.
            lead = t0 - loop.time()
            token = self.cloud.token_for(spec.device_id)
            shaping: dict[str, Any] = {
                "rtt_ms": sim.rtt_ms[dev.radio.value],
                "loss": sim.loss,
                "outages": [(a + lead, b + lead) for a, b in sim.outages],
                "time_offset_s": spec.trace_offset_s - lead,
                "seed": spec.seed,
            }
            if sim.link == "inline":  # the same link model in this process, the broker dialled directly
                address = self.cloud.broker_address
                direct = GrpcTransport(
                    address, token, device_id=spec.device_id, max_message_bytes=cfg.edge.max_message_bytes
                )
                shaped = ShapedTransport(direct, spec.trace, **shaping)
                transport, dialled = shaped, direct
                await shaped.start()
                uplink, zero = shaped.uplink, shaped.started_at
            else:  # a shaping TCP proxy in front of the broker: the real bytes cross it
                host, port = self.cloud.broker_address.rsplit(":", 1)
                link = LinkEmulator((host, int(port)), spec.trace, **shaping)
                await link.start()
                address = link.address
                uplink, zero = link.uplink, link.started_at
                transport = dialled = GrpcTransport(
                    address, token, device_id=spec.device_id, max_message_bytes=cfg.edge.max_message_bytes
                )
            assert uplink is not None
            schedule = uplink  # what the link really does
            ecfg = EdgeConfig(
                broker_address=address,
                device_id=spec.device_id,
                device_class=spec.device_class,
                token=token,
                model=spec.model,
                deadline_ms=deadline_ms,
                # Local until the first plan arrives (at the start of the plan watch, before the
                # first window); also spares each device a profiling pass to find the smallest cut.
                default_cut=trained.model.n_stages,
                default_codec=cfg.edge.default_codec,
                replay_speed=1.0,
                audio_frame_ms=cfg.edge.audio_frame_ms,
                telemetry_period_s=cfg.edge.telemetry_period_s,
                active_mw=dev.active_mw,
                radio=dev.radio.value,
                battery_mwh=dev.battery_mwh,
                breaker=cfg.edge.breaker,
                estimator=cfg.edge.estimator,
            )
            link_zero = zero
            ledger = _Ledger(
                policy.value,
                spec,
                dev,
                trained.model.n_stages,
                schedule,
                lambda: link_zero,
                t0,
                records,
                self.progress,
            )
            hardware = SimulatedHardware(
                device_time_ms=(
                    ReferenceTime(self.catalogs[spec.model], dev.speed_factor, dev.macs_per_s)
                    if sim.compute_time == "reference"
                    else None
                ),
                speed_factor=dev.speed_factor,
                schedule=schedule,
                link_zero=lambda: link_zero,
                outages=schedule.outages,
                detect_s=LINK_LOSS_DETECT_S.get(dev.radio.value, 1.0),
                # what a BLE stack knows: its PHY's application rate (the simulator's cap)
                hint_mbps=sim.radio_cap_mbps.get(dev.radio.value),
            )
            device = EdgeDevice(
                ecfg,
                trained,
                transport,
                rng=random.Random(spec.seed),
                low_battery_threshold=cfg.planner.low_battery_threshold,
                hardware=hardware,
                choose=self._chooser(policy, spec, schedule, link_zero, t0 + spec.phase_s - link_zero),
                front_cache=self.fronts[spec.model],
                tasks=self.tasks[spec.model],
                backend=self.engines[spec.model],
                encoder=self.encoder,
                # A class that cannot hold the whole model keeps no local fallback: what it cannot
                # offload now it stores and forwards (edge/store.py), at most its deepest fitting cut.
                **edge_fallback(dev, self.catalogs[spec.model]),  # type: ignore[arg-type]
            )
            ledger.device = device
            windows = device_windows(self.recordings[spec.model], spec.recording_offset, sim.duration_s, spec.phase_s)
            # A device connects when it boots, not at its first window: its channel gets READY in
            # the lead time before the clock origin (if not by then, its calls connect as ever).
            await dialled.connect(t0 - loop.time())
            await asyncio.sleep(max(0.0, t0 + spec.phase_s - loop.time()))
            source = ReplaySource(windows, speed=1.0)
            summary = await device.run(ledger.watch(source), progress=ledger.on_result)
            unanswered.update(summary.lost_by_reason)
            if summary.pending:
                unanswered["pending"] += summary.pending
            ledger.close(time.monotonic())
            overhead[spec.device_id] = ledger.overhead_mj
        finally:
            if transport is not None:
                with contextlib.suppress(Exception):
                    await transport.close()
            if link is not None:
                await link.close()

    def _chooser(
        self, policy: Policy, spec: DeviceSpec, schedule: ShapingSchedule, zero: float, start_s: float
    ) -> Callable[[], ForcedChoice | None] | None:
        """The policy's choice per window (None: the plan's). `schedule` read at `monotonic - zero`
        is the device's true link; `start_s` is when, on that clock, its sensor stream starts."""
        inputs = self.inputs[spec.device_class]
        catalog = inputs.catalog
        if policy is Policy.ADAPTIVE:
            return None
        if policy in (Policy.ALL_LOCAL, Policy.ALL_CLOUD, Policy.CLOUD_INPUT, Policy.FIXED_CUT):
            if policy is Policy.ALL_LOCAL:
                c, why = all_local_choice(catalog), "policy all_local: the whole model on the device"
            elif policy is Policy.ALL_CLOUD:
                c, why = all_cloud_choice(catalog), "policy all_cloud: the preprocessed input to the cloud"
            elif policy is Policy.CLOUD_INPUT:
                c = cloud_input_choice(catalog, inputs.constraints.accuracy_budget_points)
                why = f"policy cloud_input: the input to the cloud with the best codec: {choice_text(catalog, c)}"
            else:
                t = max(start_s, 0.0)  # Neurosurgeon's probe, as the device starts
                probe = schedule.bytes_between(t, t + self.sim.probe_s) / BYTES_PER_MBIT / self.sim.probe_s
                c = fixed_cut_choice(inputs, probe)
                why = f"policy fixed_cut: Neurosurgeon argmin at a probed {probe:.3g} Mbit/s: {choice_text(catalog, c)}"
            forced = ForcedChoice(c.cut, c.codec, c.level, why)
            return lambda: forced
        table = self.oracles[spec.device_class]

        def oracle() -> ForcedChoice:
            bw = schedule.bandwidth_at(time.monotonic() - zero)
            c = table.choose(bw)
            return ForcedChoice(c.cut, c.codec, c.level, f"oracle at a true {bw:.3g} Mbit/s: {choice_text(catalog, c)}")

        return oracle


async def _watch_loop_lag(out: list[float], period_s: float = _LAG_PERIOD_S) -> None:
    """How late the event loop wakes a sleeper, every `period_s`: every device's timing (its paced
    sensor, its simulated compute, its link) is late by as much when the one process is busy."""
    loop = asyncio.get_running_loop()
    while True:
        t = loop.time()
        await asyncio.sleep(period_s)
        out.append(max(0.0, loop.time() - t - period_s) * 1000.0)


def _lag_stats(lags: list[float]) -> dict[str, float]:
    if not lags:
        return {}
    arr = np.asarray(lags)
    return {
        "p50": round(float(np.percentile(arr, 50)), 3),
        "p95": round(float(np.percentile(arr, 95)), 3),
        "p99": round(float(np.percentile(arr, 99)), 3),
        "max": round(float(arr.max()), 3),
    }


def _period(windows: list[RecordedWindow]) -> float:
    if len(windows) > 1:
        return windows[1].stream_t_s - windows[0].stream_t_s
    return windows[0].stream_t_s


# ---------------------------------------------------------------------------------------------
# The broker's batch sizes


def _broker_registry(cloud: Any) -> CollectorRegistry | None:
    """The broker's metrics registry when the broker runs in this process (None: a remote cloud)."""
    broker = getattr(cloud, "broker", None)
    return broker.metrics.registry if broker is not None else None


def _batch_totals(registry: CollectorRegistry) -> dict[str, Any]:
    """Cumulative batch-size histogram (summed over model and cut) and shed count."""
    buckets: dict[float, float] = defaultdict(float)
    count = total = shed = 0.0
    names = BrokerMetrics.names()
    for metric in registry.collect():
        if metric.name == names["batch_size"]:
            for s in metric.samples:
                if s.name.endswith("_bucket"):
                    buckets[float(s.labels["le"])] += s.value
                elif s.name.endswith("_count"):
                    count += s.value
                elif s.name.endswith("_sum"):
                    total += s.value
        elif f"{metric.name}_total" == names["shed"]:  # a counter's family name has no _total
            shed += sum(s.value for s in metric.samples if s.name.endswith("_total"))
    return {"buckets": dict(buckets), "count": count, "sum": total, "shed": shed}


def _batch_delta(before: Mapping[str, Any], after: Mapping[str, Any]) -> dict[str, Any]:
    count = after["count"] - before["count"]
    total = after["sum"] - before["sum"]
    les = sorted(after["buckets"])
    cum = [after["buckets"][le] - before["buckets"].get(le, 0.0) for le in les]

    def quantile(q: float) -> float | None:
        if count <= 0:
            return None
        for le, c in zip(les, cum, strict=True):
            if c >= q * count:
                return le
        return None

    finite = [(le, c) for le, c in zip(les, cum, strict=True) if math.isfinite(le)]
    hist = {}
    prev = 0.0
    for le, c in finite:
        hist[f"<={le:g}"] = int(round(c - prev))
        prev = c
    if count - prev > 0:
        hist[f">{finite[-1][0]:g}" if finite else "all"] = int(round(count - prev))
    return {
        "tail_calls": int(round(count)),
        "windows_batched": int(round(total)),
        "mean_batch_size": round(total / count, 3) if count > 0 else None,
        "p50_batch_size_le": quantile(0.5),
        "p95_batch_size_le": quantile(0.95),
        "histogram": hist,
        "shed_windows": int(round(after["shed"] - before["shed"])),
    }


# ---------------------------------------------------------------------------------------------
# The whole thing


async def simulate(
    config: Config,
    *,
    with_ray: bool = True,
    progress: FleetProgress | None = None,
    stack_progress: Callable[[str], None] | None = None,
) -> FleetResult:
    """Start the cloud (CloudStack: tails, broker, Redis, controller; free ports), run the fleet,
    stop the cloud (also when cancelled). The devices are the only clients of this cloud."""
    from cloud.stack import CloudStack, with_ports

    stack_config = with_ports(config, broker_port=0, metrics_port=0)
    runner = FleetRunner(stack_config, backend="ray" if with_ray else "in_process", progress=progress)
    torch.set_num_threads(config.simulator.torch_threads)
    runner.traces()  # a bad trace folder fails now, before the cloud starts
    preparing = asyncio.ensure_future(asyncio.to_thread(runner.prepare))  # while the cloud starts
    try:
        async with CloudStack(stack_config, with_ray=with_ray, progress=stack_progress) as stack:
            await preparing
            result = await runner.run(stack)
            result.extra["cloud_tails"] = stack.tail_engine
            result.extra["event_loop"] = aio.running_loop_name()  # the broker's and the fleet's
            return result
    finally:
        if not preparing.done():
            preparing.cancel()
        with contextlib.suppress(BaseException):
            await preparing
