"""The device runtime: every sensor window through preprocessing, the front, and offload or local.

For each window, in order:

1. A plan that arrived since the last window is applied now (never in the middle of a window).
2. Preprocess and pick the plan row for the device's live bandwidth estimate and battery
   (`Plan.lookup`); without a plan, the config's default cut, codec and compression level. Run
   stages [0, k) on the device, each compressed at the row's level. Preprocessing and every stage
   run on the device's backend (edge/backend.py): PyTorch on the weights, or ONNX Runtime on the
   exported graphs (`splitsense models export`), numpy in and out either way. A choice naming a
   front (cut, level) the backend does not hold (`FrontBackend.fronts`: an export of some levels
   only) is not run as named: the window runs the nearest front the device holds (the same cut at
   the nearest held level, else the whole model here, else the nearest held cut it can send), its
   reason names the missing front, a window that ends on the device has kind `missing_front`, and
   `missing_front_windows` counts it. Every telemetry report lists the fronts held, and the
   planner names only those (cloud/controller/planner.py).
3. k = N, no transport, or the circuit breaker says no: finish stages [k, N) here (mode local).
4. Otherwise encode the activation with the row's codec and offload it with the deadline. Any
   failure at all (unreachable, deadline, shed, rejected, a malformed answer, a bug in the
   transport) finishes the window here from the activation already computed (mode fallback,
   with the reason) and tells the breaker; an answer in time is the result (mode offloaded).

So every window ends with exactly one result and none is ever dropped: `run()` counts them
(`lost` is windows in minus results out, 0 by construction). Since stages [k, N) on the device are
the very modules the cloud runs, and fp32 encoding is exact, an offloaded window's prediction is
the one the device would have made by itself (on the ONNX Runtime backend, the same graphs checked
against PyTorch within float tolerance at export: `pipelines.export`).

A device that cannot hold the whole model (`local_fallback=False`: e.g. the sensor_node class, whose
RAM holds only the front up to the bottleneck) cannot do step 3 or the fallback of step 4. It runs
stages [0, k) for k at most `max_cut` (a plan row or choice deeper than that, local included, is
sent at `max_cut`), and a window the cloud cannot answer now (any failed offload, the breaker open
or holding after a shed) is stored with its encoded activation (edge/store.py) instead of finished
here. A background drain task forwards stored windows oldest first whenever the breaker allows
(it is the breaker's prober then: a stored window is the probe, its success closes the breaker),
and each answer is that window's result, mode deferred, its latency from the window being ready to
the answer and its reason "stored: ..." saying for how long. Later windows never wait for stored
ones: `submit()` returns a future for a stored window and `run()` delivers its result to the sink
and `progress` when it resolves, at most once. Windows still stored when a run ends, after a flush
bounded by `drain_timeout_s` without progress, are reported pending (`RunSummary.pending`, with
their bytes); windows the store refuses (full), expires, or the broker rejects get no result and
count as lost, by reason (`RunSummary.lost_by_reason`, the `unanswered_windows` metric).

Energy per window: the device's active power x its measured compute time, plus the radio energy
of its transfer on the class's radio (`pipelines.power.RadioEnergyMeter`: tails and promotions
included). The battery drains by that, so a plan's LOW-battery rows take over when it runs low.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import random
import time
from collections import Counter, deque
from collections.abc import AsyncIterable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from edge.backend import FrontBackend, ModelInfo, TorchBackend
from edge.breaker import BreakerState, CircuitBreaker, FailureKind
from edge.estimator import LinkEstimator
from edge.hardware import Hardware
from edge.metrics import EdgeMetrics
from edge.radio import RadioState, RadioTransfer, TrafficKind
from edge.route import FallbackKind, Route, RouteDecision, RouteInputs, decide_route, hedge_after_s
from edge.sink import ResultSink, WindowResult
from edge.sources import SensorWindow
from edge.store import DEFAULT_CAPACITY_BYTES, DEFAULT_MAX_AGE_S, ForwardStore, Stored
from edge.transport import OffloadTransport
from pipelines.codecs import encode
from pipelines.groups import GROUP_SEPARATOR, group_members, shared_cut
from pipelines.power import compute_energy_mj, radio_model
from splitsense import wire
from splitsense.config import EdgeConfig, PlannerConfig
from splitsense.errors import (
    BrokerUnavailableError,
    CodecError,
    ConfigError,
    OffloadDeadlineError,
    OffloadError,
    RejectedError,
    ShedError,
)
from splitsense.kinds import Codec, EncodedTensor, parse_codec
from splitsense.plan import Plan, PlanSet
from splitsense.wire import DeviceEstimates, ExecutionMode, OffloadRequest, OffloadResponse, RadioKind

if TYPE_CHECKING:
    from pipelines.stages import StagedModel
    from pipelines.training import TrainedModel

__all__ = ["Battery", "EdgeDevice", "ForcedChoice", "Pending", "RunSummary", "WindowUnansweredError"]

log = logging.getLogger(__name__)

# How long past its deadline a transport may take to give up before the runtime stops waiting
# for it: a well-behaved transport raises at the deadline; this only bounds a broken one.
_TRANSPORT_GRACE_S = 0.05
_TELEMETRY_TIMEOUT_S = 2.0
_PING_VERSION = 2**62  # a plan version no plan set reaches: the broker answers GetPlan with nothing
_PING_BYTES = 48  # GetPlanRequest: device class, model, version
_PING_ANSWER_BYTES = 2  # an empty GetPlanResponse
_BYTES_PER_LOGIT = 4  # float32 on the wire
_SERVER_EWMA_ALPHA = 0.2  # the cloud's queue + compute per window, smoothed for the hedge's expectation
_REQUEST_OVERHEAD_BYTES = 160  # an OffloadRequest's fields besides the activation (ids, estimates)
_LEVEL_TOL = 1e-9  # compression levels are float keys: equal within float noise


class Battery:
    """Charge left, drained by the energy estimate of each window."""

    def __init__(self, capacity_mwh: float, fraction: float = 1.0, on_battery: bool = True) -> None:
        if not capacity_mwh > 0:
            raise ConfigError(f"battery capacity must be > 0 mWh, got {capacity_mwh!r}")
        if not 0 <= fraction <= 1:
            raise ConfigError(f"battery fraction must be in [0, 1], got {fraction!r}")
        self.capacity_mj = capacity_mwh * 3600.0  # 1 mWh = 3.6 J
        self._left_mj = fraction * self.capacity_mj
        self.on_battery = on_battery

    @property
    def fraction(self) -> float:
        return self._left_mj / self.capacity_mj

    def drain(self, energy_mj: float) -> None:
        if self.on_battery:
            self._left_mj = max(0.0, self._left_mj - max(0.0, energy_mj))


@dataclass(frozen=True)
class RunSummary:
    windows: int
    by_mode: dict[str, int]
    lost: int  # windows the source produced that got no result: 0, but for a full store (lost_by_reason)
    accuracy: float  # predictions equal to the recording's labels
    latency_p50_ms: float
    latency_p95_ms: float
    bytes_sent: int
    energy_mj: float
    fallbacks_by_reason: dict[str, int]
    battery_fraction: float
    plan_version: int
    wall_s: float
    # A device without local fallback only (EdgeDevice(local_fallback=False)): windows still stored
    # when the run ended (not lost: their encoded activations are still on the device, unanswered)
    # and their bytes; and why the lost windows got no result (refused: the store was full,
    # expired, rejected, codec). `lost` = windows in - results - pending.
    pending: int = 0
    pending_bytes: int = 0
    lost_by_reason: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "windows": self.windows,
            "by_mode": dict(self.by_mode),
            "lost": self.lost,
            "accuracy": round(self.accuracy, 4),
            "latency_p50_ms": round(self.latency_p50_ms, 3),
            "latency_p95_ms": round(self.latency_p95_ms, 3),
            "bytes_sent": self.bytes_sent,
            "energy_mj": round(self.energy_mj, 3),
            "fallbacks_by_reason": dict(self.fallbacks_by_reason),
            "battery_fraction": round(self.battery_fraction, 6),
            "plan_version": self.plan_version,
            "wall_s": round(self.wall_s, 3),
            "pending": self.pending,
            "pending_bytes": self.pending_bytes,
            "lost_by_reason": dict(self.lost_by_reason),
        }


@dataclass(frozen=True)
class ForcedChoice:
    """A choice imposed on a window from outside the plan (the simulators' baseline policies)."""

    cut: int
    codec: Codec = Codec.FP32
    level: float = 1.0  # compression_energy_kept of the front
    why: str = "forced by the caller"


@dataclass(frozen=True)
class _Choice:
    """What to do with one window, and why."""

    cut: int
    codec: Codec
    level: float  # compression_energy_kept of the front
    plan_version: int
    why: str
    missing: str = ""  # set: the front chosen first is not held by the device; what ran instead


@dataclass(frozen=True)
class _Attempt:
    response: OffloadResponse | None
    kind: FailureKind | None
    detail: str
    sent_at: float
    elapsed_s: float
    transfer: RadioTransfer | None = None  # what the call cost the radio

    @property
    def radio_mj(self) -> float:
        return self.transfer.energy_mj if self.transfer is not None else 0.0


class _Call:
    """Filled in by `_offload` as it goes: the radio transfer of a call that may be cancelled (a
    hedged window's offload, cancelled when its local tail answered first)."""

    transfer: RadioTransfer | None = None


class WindowUnansweredError(OffloadError):
    """A window of a device without local fallback that gets no result. `kind`: refused (the
    store was full), expired (stored past its age bound), rejected (the broker refused it: no retry
    can help), codec (its activation cannot be encoded) or pending (still stored when the device
    stopped: its activation is still on the device, unanswered)."""

    def __init__(self, window_id: str, kind: str, detail: str, nbytes: int = 0) -> None:
        super().__init__(f"window {window_id}: {kind}: {detail}")
        self.window_id = window_id
        self.kind = kind
        self.detail = detail
        self.nbytes = nbytes


@dataclass(frozen=True)
class Pending:
    """Windows still stored when a device stopped, and their encoded bytes."""

    windows: int
    nbytes: int


@dataclass
class _Held:
    """A stored window: what the drain task needs to forward it and to build its result."""

    window: SensorWindow
    choice: _Choice  # the cut and codec it was encoded at
    encoded: EncodedTensor
    t_ready: float  # on `clock`: when it became available
    front_ms: float
    stage_ms: tuple[float, ...]
    energy_mj: float  # so far: its front, and the radio of every attempt that carried it
    bytes_sent: int  # so far: every attempt that carried it
    why: str  # why it was stored
    future: asyncio.Future[WindowResult]
    kind: FallbackKind | None = None  # why it was stored, typed (its result's `kind`)
    attempts: int = 0  # sends that carried it (the live one included)
    radio_mj: float = 0.0  # radio energy of every attempt that carried it (in energy_mj too)
    estimate_mbps: float | None = None  # the bandwidth estimate when its row was chosen


def _answered_tasks(window: SensorWindow, response: OffloadResponse) -> tuple[tuple[str, int, int], ...]:
    labels = dict(window.task_labels)
    return tuple((t.model, labels.get(t.model, -1), t.prediction) for t in response.task_results)


def _check_shared_front(backend: FrontBackend, main: str, task: str, cut: int) -> None:
    """ConfigError unless `task` computes exactly `main`'s activation at `cut` (same preprocessing
    statistics, same weights of stages [0, cut))."""
    if not backend.shares_front(main, task, cut):
        raise ConfigError(
            f"model {task!r} does not share stages [0, {cut}) with {main!r}: "
            "they cannot read one window's front (retrain them as one encoder group)"
        )


class EdgeDevice:
    """One device running one model on one sensor stream."""

    def __init__(
        self,
        config: EdgeConfig,
        trained: TrainedModel | None,
        transport: OffloadTransport | None = None,
        plan: PlanSet | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        metrics: EdgeMetrics | None = None,
        low_battery_threshold: float | None = None,
        hardware: Hardware | None = None,
        choose: Callable[[], ForcedChoice | None] | None = None,
        front_cache: dict[tuple[int, float], StagedModel] | None = None,
        local_fallback: bool = True,
        max_cut: int | None = None,
        store_capacity_bytes: int = DEFAULT_CAPACITY_BYTES,
        store_max_age_s: float = DEFAULT_MAX_AGE_S,
        drain_timeout_s: float | None = None,
        tasks: Sequence[TrainedModel] = (),
        backend: FrontBackend | None = None,
        encoder: Callable[..., EncodedTensor] = encode,
    ) -> None:
        """`clock` (monotonic seconds) times latency, deadlines and the breaker; `wall_clock` (Unix
        seconds) stamps what goes on the wire. `low_battery_threshold` must be the planner's
        (`Config.planner.low_battery_threshold`, the default).

        `hardware` is the platform (edge/hardware.py): a real device's by default; the simulator's
        `SimulatedHardware` stretches compute to the simulated device's speed, makes calls wait the
        promotion the device's radio state says is due, and raises the emulated radio's link
        signals. `choose` may impose a window's choice (the simulators' policies; None from it: the
        plan decides); `front_cache` shares compressed fronts between devices running the same model.

        `local_fallback=False` says the whole model does not fit this device: only the front up
        to `max_cut` does (default N - 1; `pipelines.devices.front_fits` says which cuts fit a
        class). It needs a transport. A window is then never finished here: one the cloud cannot
        answer now is stored (at most `store_capacity_bytes` of encoded activations, each for at
        most `store_max_age_s`: edge/store.py) and forwarded when the link is back; its result
        comes later with mode deferred (`submit`, `run`). At the end of a run (or `close()`) the
        device keeps forwarding until the store is empty or `drain_timeout_s` has passed without
        a window forwarded (default: the breaker's longest back-off plus one deadline, so at least
        one probe goes); what is left is reported pending.

        `tasks` are extra models that read the same sensor stream and share this model's front
        (pipelines/groups.py: one bottleneck encoder for the FSDD speaker and digit tasks): the
        shared front runs once per window, one upload of its activation serves every task (the
        request's extra_models), and a window finished here runs every task's own tail. The
        config's model is then the group's name ("fsdd_speaker+fsdd_digit"), which names its plan.

        `encoder` encodes an activation for the wire (pipelines.codecs.encode; the simulator's
        front reuse passes a caching one, simulators/reuse.py).

        `backend` runs preprocessing and stages (edge/backend.py): by default PyTorch on `trained`
        and `tasks` (sharing `front_cache`, which a given backend ignores: it holds its own). With a
        backend, `trained` may be None (a device without torch: `OnnxBackend`): the models are then
        those `config.model` names, and `tasks` is unused."""
        self._encode = encoder  # pipelines.codecs.encode; the simulator may reuse results (simulators/reuse.py)
        self.tasks = tuple(tasks)
        if trained is not None:
            names = (trained.spec.name, *(t.spec.name for t in self.tasks))
            if GROUP_SEPARATOR.join(names) != config.model:
                raise ConfigError(
                    f"edge.model is {config.model!r} but the trained models are {GROUP_SEPARATOR.join(names)!r}"
                )
        elif backend is None:
            raise ConfigError("a device needs its trained model or a backend that holds it")
        else:
            names = group_members(config.model)
        if backend is None:
            assert trained is not None
            caches = {trained.spec.name: front_cache} if front_cache is not None else None
            backend = TorchBackend((trained, *self.tasks), front_caches=caches)
        missing = [n for n in names if n not in backend.models()]
        if missing:
            raise ConfigError(f"the device's {backend.kind} backend lacks model(s) {missing} that edge.model names")
        self.backend: FrontBackend = backend
        self.model_name = names[0]
        self.task_names: tuple[str, ...] = tuple(names[1:])
        self.shared_cut = shared_cut(names) if len(names) > 1 else 0
        for t in self.task_names:
            _check_shared_front(backend, self.model_name, t, self.shared_cut)
        self.config = config
        self.trained = trained
        self.info: ModelInfo = backend.info(self.model_name)
        self.n_stages = self.info.n_stages
        # The fronts the backend can run (cut -> levels, 1.0 first); None: it does not say (all)
        self._held = self._held_fronts(backend)
        self._held_report: tuple[wire.HeldFronts, ...] | None = None  # held_fronts(), built once
        self.transport = transport
        self._clock = clock
        self._wall = wall_clock
        self._rng = rng or random.Random()
        self.low_battery_threshold = (
            PlannerConfig().low_battery_threshold if low_battery_threshold is None else low_battery_threshold
        )
        self.breaker = CircuitBreaker(config.breaker, self._rng)
        self._probes: set[asyncio.Task[Any]] = set()  # half-open probes in flight (see _start_probe)
        self.hardware = hardware or Hardware()
        hint = self.hardware.hint_mbps()
        # The one model of this device's radio: the estimator, the energy of every transfer and
        # (simulated) the promotion a call waits all read it.
        self.radio = RadioState(radio_model(config.radio), clock, hint_mbps=hint)
        self.estimator = LinkEstimator(config.estimator, clock, hint_mbps=hint)
        self._server_s: float | None = None  # smoothed cloud queue + compute per window
        self._answered = 0  # offloads answered so far (the first warms the path: not a link sample)
        self.metrics = metrics or EdgeMetrics(config.model, config.device_class)
        self.battery = Battery(config.battery_mwh, config.battery_initial_fraction, config.on_battery)
        self._default = self._default_choice()
        self._plan_set: PlanSet | None = None
        self._plan: Plan | None = None
        self._next_plan: PlanSet | None = None
        self.plan_log: deque[str] = deque(maxlen=100)  # the last plan sets applied or refused, with why
        self._compute_clock = self.hardware.compute_clock
        self._choose_hook = choose
        self._telemetry_task: asyncio.Task[None] | None = None
        self._period_start_ms = int(self._wall() * 1000)
        # When the next report is due (on `clock`); None until the first window, within
        # edge.telemetry_jitter x period of which the first goes (the cloud hears early). Its own
        # random stream, seeded by the device's id: the reports' schedule changes no other draw.
        self._report_due: float | None = None
        self._report_rng = random.Random(f"{config.device_id}/telemetry")
        self.local_fallback = local_fallback
        if local_fallback:
            if max_cut is not None:
                raise ConfigError("max_cut is for a device without local fallback (local_fallback=False)")
            self.max_cut = self.n_stages
        else:
            if transport is None:
                raise ConfigError("a device without local fallback needs a transport: it cannot finish a window itself")
            self.max_cut = self.n_stages - 1 if max_cut is None else max_cut
            if isinstance(self.max_cut, bool) or not 0 <= self.max_cut < self.n_stages:
                raise ConfigError(
                    f"max_cut {max_cut!r} is out of range for a device without local fallback: "
                    f"expected 0..{self.n_stages - 1}"
                )
        self.store: ForwardStore[_Held] = ForwardStore(store_capacity_bytes, store_max_age_s)
        if drain_timeout_s is None:
            drain_timeout_s = self.breaker.backoff_bound_s() + config.deadline_ms / 1000.0 + _TRANSPORT_GRACE_S
        if not drain_timeout_s >= 0:
            raise ConfigError(f"drain_timeout_s must be >= 0, got {drain_timeout_s!r}")
        self.drain_timeout_s = drain_timeout_s
        self._drain_task: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None  # set: the drain task should look again
        self._changed: asyncio.Event | None = None  # set by the drain task: a stored window left
        if plan is not None:
            self.apply_plan(plan)
            self._apply_pending_plan()

    # --- plans ------------------------------------------------------------------------------

    def _default_choice(self) -> _Choice:
        c = self.config
        if c.default_cut is None:
            sizes = [math.prod(self.info.activation_shape(k)) for k in range(self.n_stages)]
            cut = int(np.argmin(sizes))
            why = f"no plan yet: default cut {cut}, the smallest activation ({sizes[cut]} values)"
        else:
            cut = c.default_cut
            if cut > self.n_stages:
                raise ConfigError(
                    f"edge.default_cut {cut} is out of range for model {c.model!r}: expected 0..{self.n_stages}"
                )
            why = f"no plan yet: the configured default cut {cut}"
        return _Choice(cut, parse_codec(c.default_codec), c.compression_energy_kept, 0, why)

    def _held_fronts(self, backend: FrontBackend) -> dict[int, tuple[float, ...]] | None:
        fronts = getattr(backend, "fronts", None)
        if not callable(fronts):
            return None
        held: dict[int, list[float]] = {}
        for k, lv in fronts(self.model_name):
            if 0 <= k <= self.n_stages:
                held.setdefault(int(k), []).append(float(lv))
        return {k: tuple(sorted(set(v), reverse=True)) for k, v in sorted(held.items())}

    def held_fronts(self) -> tuple[wire.HeldFronts, ...]:
        """What telemetry says this device holds: the fronts of its model (a task group's by the
        group's name, which names its plan); () when the backend does not say. The backend's
        fronts do not change while the device runs: built once, carried by every report."""
        if self._held is None:
            return ()
        if self._held_report is None:
            pairs = sorted(((k, lv) for k, levels in self._held.items() for lv in levels), key=lambda f: (-f[1], f[0]))
            self._held_report = (wire.HeldFronts(self.config.model, tuple(pairs[: wire.MAX_FRONTS_PER_MODEL])),)
        return self._held_report

    def holds(self, cut: int, level: float) -> bool:
        """Whether the device can run the front of `cut` at compression `level` (cut 0 runs no
        stage: always)."""
        if self._held is None or cut == 0:
            return True
        return any(abs(lv - level) <= _LEVEL_TOL for lv in self._held.get(cut, ()))

    def _held_choice(self, choice: _Choice) -> _Choice:
        """The nearest front this device holds to `choice`'s, which it does not: the same cut at
        the nearest held level (ties: the less compressed); else the whole model here (with local
        fallback, uncompressed when it holds that); else the nearest cut it can send (ties: the
        shallower) at its nearest level. Cut 0 needs no front, so there always is one."""
        assert self._held is not None

        def nearest(levels: Sequence[float]) -> float:
            return min(levels, key=lambda lv: (abs(lv - choice.level), -lv))

        cut, level = choice.cut, choice.level
        at_cut = self._held.get(cut, ())
        if at_cut:
            level = nearest(at_cut)
        elif self.local_fallback and self._held.get(self.n_stages):
            whole = self._held[self.n_stages]
            cut, level = self.n_stages, 1.0 if self.holds(self.n_stages, 1.0) else nearest(whole)
        else:
            reachable = [k for k, lvs in self._held.items() if lvs and 0 < k <= self.max_cut]
            if reachable:
                cut = min(reachable, key=lambda k: (abs(k - choice.cut), k))
                level = nearest(self._held[cut])
            else:
                cut, level = 0, 1.0
        held = ", ".join(f"{lv:g}" for lv in at_cut) or "none"
        missing = (
            f"missing front: the device's {self.backend.kind} backend does not hold cut {choice.cut} at level "
            f"{choice.level:g} (levels held at that cut: {held}); ran cut {cut} at level {level:g} instead"
        )
        codec = choice.codec
        if cut != choice.cut and codec is Codec.ANS and self.info.symbol_prior(cut) is None:
            codec = self._default.codec if self._default.codec is not Codec.ANS else Codec.FP32
        return _Choice(cut, codec, level, choice.plan_version, f"{choice.why}; {missing}", missing)

    @property
    def plan_version(self) -> int:
        return self._plan_set.version if self._plan_set is not None else 0

    def apply_plan(self, plan_set: PlanSet) -> None:
        """Queue a plan set; it takes effect at the start of the next window."""
        self._next_plan = plan_set

    def _apply_pending_plan(self) -> None:
        ps, self._next_plan = self._next_plan, None
        if ps is None or ps.version <= self.plan_version:
            return
        plan = ps.get(self.config.model, self.config.device_class)
        if plan is not None:
            bad = [r.cut for r in plan.rows if r.cut > self.n_stages]
            if bad:
                self.plan_log.append(
                    f"refused plan set v{ps.version}: cuts {bad} are out of range for model "
                    f"{self.config.model!r} (0..{self.n_stages}); keeping v{self.plan_version}"
                )
                log.warning(self.plan_log[-1])
                return
        self._plan_set, self._plan = ps, plan
        what = "a plan" if plan is not None else "no plan"
        self.plan_log.append(f"applied plan set v{ps.version} ({what} for this model and class): {ps.reason}")

    def _choose(self) -> _Choice:
        if self._choose_hook is not None:
            forced = self._choose_hook()
            if forced is not None:
                if not 0 <= forced.cut <= self.n_stages:
                    raise ConfigError(f"forced cut {forced.cut} is out of range 0..{self.n_stages}")
                return _Choice(forced.cut, forced.codec, forced.level, self.plan_version, forced.why)
        if self._plan is None:
            return self._default
        row = self._plan.lookup(
            self.estimator.bandwidth_mbps,
            self.battery.fraction,
            self.low_battery_threshold,
            on_battery=self.battery.on_battery,
        )
        return _Choice(row.cut, row.codec, row.compression_energy_kept, self.plan_version, row.reason)

    # --- estimates --------------------------------------------------------------------------

    def estimates(self) -> DeviceEstimates:
        return DeviceEstimates(
            bandwidth_mbps=self.estimator.bandwidth_mbps,
            rtt_ms=self.estimator.rtt_ms,
            battery_fraction=min(1.0, max(0.0, self.battery.fraction)),
            on_battery=self.battery.on_battery,
            radio=RadioKind(self.config.radio),
        )

    # --- one window -------------------------------------------------------------------------

    async def process(self, window: SensorWindow) -> WindowResult:
        """Finish one window and return its result.

        With local fallback (the default) this returns at once, whatever the cloud does. Without
        it, a window the cloud cannot answer now is stored and this waits for its forwarded answer
        (mode deferred), or raises WindowUnansweredError if it never gets one: a caller whose later
        windows must not wait uses `submit` (or `run`)."""
        out = await self.submit(window)
        return out if isinstance(out, WindowResult) else await out

    async def submit(self, window: SensorWindow) -> WindowResult | asyncio.Future[WindowResult]:
        """Run one window as far as it can go now, never waiting for the store.

        Returns its result when it is finished now (always, with local fallback), or, for a
        window stored on a device without local fallback, a future that resolves to its deferred
        result when the drain task forwards it, or fails with WindowUnansweredError (already
        failed when the store refused it). Each window's outcome resolves exactly once."""
        self._apply_pending_plan()
        start = self._clock()
        t_ready = min(window.t_emit, start)
        choice = self._choose()
        estimate = self.estimator.bandwidth_mbps  # what the row was chosen by
        if choice.cut > self.max_cut:
            choice = self._within_reach(choice)
        if not self.holds(choice.cut, choice.level):
            self.metrics.observe_missing_front(choice.cut, choice.level)
            choice = self._held_choice(choice)
        stage_ms: list[float] = []
        t_front = self._clock()
        t = self._compute_clock()
        x = self.backend.prepare(self.model_name, window.raw)
        prep_ms = self._device_ms(-1, 1.0, (self._compute_clock() - t) * 1000.0)
        k_shared = min(choice.cut, self.shared_cut)
        shared_act = self._run_stages(self.model_name, x, 0, k_shared, stage_ms, choice.level)
        act = self._run_stages(self.model_name, shared_act, k_shared, choice.cut, stage_ms, choice.level)
        front_ms = prep_ms + sum(stage_ms)
        await self._simulated_hardware(t_front, front_ms)
        if not self.local_fallback:
            return await self._offload_or_store(window, choice, act, t_ready, front_ms, stage_ms, estimate)

        decision = self._route(choice)
        mode, kind, reason = ExecutionMode.LOCAL, decision.kind, decision.reason
        if choice.missing and kind is FallbackKind.PLAN:  # local because the planned front is missing
            kind, reason = FallbackKind.MISSING_FRONT, f"{choice.missing} (the whole model here)"
        elif choice.missing:
            reason = f"{reason}; {choice.missing}"
        encoded: EncodedTensor | None = None
        attempt: _Attempt | None = None
        call = _Call()
        local_tail: tuple[Any, list[float]] | None = None  # (logits, stage ms) when the tail ran here
        if decision.route in (Route.OFFLOAD, Route.PROBE):  # encode only when it will be sent
            try:
                encoded = self._encode(act, choice.codec, self.info.symbol_prior(choice.cut))
            except CodecError as e:
                mode, kind, reason = ExecutionMode.FALLBACK, FallbackKind.CODEC, f"codec: {e}"
        if encoded is not None and decision.route is Route.PROBE and self.breaker.allow_offload(self._clock()):
            self._start_probe(window, choice, encoded)  # the breaker's probe; this window runs here
        elif encoded is not None and decision.route is Route.OFFLOAD and self.breaker.allow_offload(self._clock()):
            attempt, local_tail = await self._offload_hedged(window, choice, encoded, act, call)
            if attempt.response is None:
                assert attempt.kind is not None
                mode, kind = ExecutionMode.FALLBACK, FallbackKind.of_failure(attempt.kind)
                reason = f"{attempt.kind.value}: {attempt.detail}" + (f"; {choice.missing}" if choice.missing else "")
            else:
                mode, kind = ExecutionMode.OFFLOADED, None
                reason = choice.missing  # "" when the front ran as chosen

        tail_ms: list[float] = []
        if mode is ExecutionMode.OFFLOADED:
            assert attempt is not None and attempt.response is not None
            prediction = attempt.response.prediction
        else:
            if local_tail is None:
                local_tail = await self._local_tail(act, choice.cut)
            logits, tail_ms = local_tail
            prediction = int(np.argmax(logits[0]))

        task_results, task_ms = await self._task_results(
            window, k_shared, attempt.response if attempt is not None else None, shared_act
        )
        compute_s = (front_ms + sum(tail_ms) + task_ms) / 1000.0
        compute_mj = compute_energy_mj(self.config.active_mw, compute_s)
        self.battery.drain(compute_mj)  # the radio's energy was drained as each transfer ended
        radio_mj = call.transfer.energy_mj if call.transfer is not None else 0.0
        bytes_sent = encoded.nbytes if attempt is not None and encoded is not None else 0
        result = WindowResult(
            window_id=window.window_id,
            label=window.label,
            prediction=prediction,
            mode=mode,
            cut=choice.cut,
            codec=choice.codec.value if attempt is not None else None,
            compression_energy_kept=choice.level,
            latency_ms=(self._clock() - t_ready) * 1000.0,
            front_ms=front_ms,
            bytes_sent=bytes_sent,
            energy_mj=compute_mj + radio_mj,
            reason=reason,
            plan_version=choice.plan_version,
            stage_ms=tuple(stage_ms + tail_ms) if mode is not ExecutionMode.OFFLOADED else tuple(stage_ms),
            tasks=task_results,
            task_ms=task_ms,
            kind=kind,
            radio_mj=radio_mj,
            estimate_mbps=estimate,
        )
        self.metrics.observe(result, kind.value if mode is ExecutionMode.FALLBACK and kind is not None else None)
        self.metrics.set_state(self.breaker.state, self.estimates())
        return result

    def _sync_link(self) -> bool:
        """Read the platform's link signal; tell the breaker when it changed. Returns link up."""
        up = self.hardware.link_up()
        now = self._clock()
        if self.radio.set_link(up, now):
            if up:
                self.breaker.record_link_up(now)
            else:
                self.breaker.record_link_down(now, "the platform lost the radio's association or bearer")
        return up

    def _route(self, choice: _Choice) -> RouteDecision:
        link_up = self._sync_link()  # first: the link's return lets this very window probe
        now = self._clock()
        snap = self.breaker.snapshot(now)
        return decide_route(
            RouteInputs(
                cut=choice.cut,
                n_stages=self.n_stages,
                plan_why=choice.why,
                local_fallback=self.local_fallback,
                has_transport=self.transport is not None,
                link_up=link_up,
                breaker=snap.state,
                breaker_allows=self.breaker.peek(now),
                breaker_reason=snap.reason,
            )
        )

    async def _local_tail(self, act: np.ndarray, cut: int) -> tuple[np.ndarray, list[float]]:
        """Stages [cut, N) here (uncompressed: only a front is), with the device's time waited
        out: (logits, per-stage ms)."""
        tail_ms: list[float] = []
        t_tail = self._clock()
        logits = self._run_stages(self.model_name, act, cut, self.n_stages, tail_ms, 1.0)
        await self.hardware.wait_compute(t_tail, sum(tail_ms))
        return logits, tail_ms

    def expected_offload_s(self, nbytes: int) -> tuple[float, float]:
        """(seconds an offload of an `nbytes` activation should take from now, its 1-sigma spread):
        the link estimate's network time, the cloud's usual queue + compute, the promotion due."""
        network, sigma = self.estimator.expected_network_s(
            nbytes + _REQUEST_OVERHEAD_BYTES, self.info.num_classes * (_BYTES_PER_LOGIT + 1) + 32
        )
        server = self._server_s if self._server_s is not None else 0.0
        return network + server + self.radio.promotion_due_s(), sigma

    async def _offload_hedged(
        self, window: SensorWindow, choice: _Choice, encoded: EncodedTensor, act: np.ndarray, call: _Call
    ) -> tuple[_Attempt, tuple[np.ndarray, list[float]] | None]:
        """Offload; if the answer is late relative to the estimate (`hedge_after_s`), start the
        local tail too, and take whichever answers first. Returns the attempt (a late one that
        lost: FailureKind.LATE, its call cancelled) and the local tail's output if it ran."""
        c = self.config
        deadline_s = c.deadline_ms / 1000.0
        expected, sigma = self.expected_offload_s(encoded.nbytes)
        wait_s = hedge_after_s(expected, sigma, deadline_s, c.hedge_factor, c.hedge_margin_ms / 1000.0)
        task: asyncio.Future[Any] = asyncio.ensure_future(self._offload(window, choice, encoded, call=call))
        if wait_s >= deadline_s:
            return await task, None
        done, _ = await asyncio.wait({task}, timeout=wait_s)
        if done:
            return task.result(), None
        sent = self._clock() - wait_s
        local = asyncio.ensure_future(self._local_tail(act, choice.cut))
        racers: set[asyncio.Future[Any]] = {task, local}
        done, _ = await asyncio.wait(racers, return_when=asyncio.FIRST_COMPLETED)
        if task in done and task.result().response is not None:  # the cloud answered first after all
            local.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await local
            return task.result(), None
        tail = await local
        if task.done():  # it failed on its own while the tail ran
            return task.result(), tail
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        now = self._clock()
        detail = (
            f"no answer after {wait_s * 1000:.0f} ms ({expected * 1000:.0f} ms expected at "
            f"{self.estimator.bandwidth_mbps:.3g} Mbit/s): the local tail answered first"
        )
        self.breaker.record_failure(now, FailureKind.LATE, detail=detail)
        if self.radio.link_up:  # the link is at least this slow (unless the platform says it is gone)
            promotion = call.transfer.promotion_s if call.transfer is not None else 0.0
            self.estimator.record_lower_bound(
                encoded.nbytes + _REQUEST_OVERHEAD_BYTES,
                0,
                now - sent,
                self._server_s or 0.0,
                promotion,
            )
        return _Attempt(None, FailureKind.LATE, detail, sent, now - sent, call.transfer), tail

    def _riders(self, cut: int) -> tuple[str, ...]:
        """The extra tasks whose front is the same as this model's at `cut`: one upload serves them."""
        return self.task_names if cut <= self.shared_cut else ()

    async def _task_results(
        self, window: SensorWindow, start: int, response: OffloadResponse | None, shared_act: Any
    ) -> tuple[tuple[tuple[str, int, int], ...], float]:
        """((model, label, prediction) per extra task, device ms spent on their tails here): from the
        cloud's answer when the task rode along, else its stages [start, N) run on this device on
        `shared_act`, the activation at `start` <= shared_cut, which every task shares (only a device
        with local fallback gets here without an answer). Simulated time uses the main model's stage
        times for the same stage indices (the tasks' stages have the same shapes)."""
        if not self.task_names:
            return (), 0.0
        labels = dict(window.task_labels)
        answered = {t.model: t.prediction for t in response.task_results} if response is not None else {}
        out: list[tuple[str, int, int]] = []
        times: list[float] = []
        t_tail = self._clock()
        for name in self.task_names:
            if name in answered:
                pred = answered[name]
            else:
                n = self.backend.info(name).n_stages
                logits = self._run_stages(name, shared_act, start, n, times, 1.0)
                pred = int(np.argmax(logits[0]))
            out.append((name, labels.get(name, -1), pred))
        await self._simulated_hardware(t_tail, sum(times))
        return tuple(out), sum(times)

    def _run_stages(
        self, model: str, x: np.ndarray, start: int, stop: int, times_ms: list[float], level: float
    ) -> np.ndarray:
        """Stages [start, stop) of `model`, each compressed at `level`, on the backend; appends each
        stage's device time."""
        run = self.backend.run_stage
        for i in range(start, stop):
            t = self._compute_clock()
            x = run(model, i, level, x)
            times_ms.append(self._device_ms(i, level, (self._compute_clock() - t) * 1000.0))
        return x

    def _device_ms(self, stage: int, level: float, host_ms: float) -> float:
        return self.hardware.device_ms(stage, level, host_ms)

    async def _simulated_hardware(self, since: float, device_ms: float) -> None:
        """Simulated slower hardware: wait until `device_ms` of device time has passed on `clock`
        since `since` (nothing to wait for on real hardware, where that time has passed already)."""
        await self.hardware.wait_compute(since, device_ms)

    async def _offload(
        self,
        window: SensorWindow,
        choice: _Choice,
        encoded: EncodedTensor,
        *,
        call: _Call | None = None,
        traffic: TrafficKind = TrafficKind.OFFLOAD,
    ) -> _Attempt:
        """One offload on the radio: the promotion the radio state says is due (waited by simulated
        hardware; a real modem does it inside the call), the call within the deadline, then the
        radio's energy (drained from the battery here), the estimator and the breaker."""
        assert self.transport is not None
        c = self.config
        call = call or _Call()
        request = OffloadRequest(
            window_id=window.window_id,
            model=self.model_name,
            extra_models=self._riders(choice.cut),
            cut=choice.cut,
            device_id=c.device_id,
            device_class=c.device_class,
            estimates=self.estimates(),
            plan_version=choice.plan_version,
            activation=encoded,
            sent_unix_ms=int(self._wall() * 1000),
            deadline_ms=int(c.deadline_ms),
        )
        up_bytes = wire.to_pb(request).ByteSize()
        timeout_s = c.deadline_ms / 1000.0
        ticket = self.radio.begin(traffic)
        sent = ticket.start_s
        streams = getattr(self.transport, "streams_opened", 0)
        retry_after_s = 0.0
        response: OffloadResponse | None = None
        try:
            await self.hardware.promote(min(ticket.promotion_s, timeout_s))
            left_s = timeout_s - (self._clock() - sent)
            # (simulated hardware waited the promotion just now; a real modem promotes inside the call)
            if left_s <= 0 or (self.hardware.simulated and ticket.promotion_s >= timeout_s):
                raise OffloadDeadlineError(
                    f"radio promotion ({ticket.promotion_s * 1000:.0f} ms) outlasts the deadline "
                    f"({c.deadline_ms:.0f} ms)"
                )
            async with asyncio.timeout(left_s + _TRANSPORT_GRACE_S):
                response = await self.transport.offload(request, left_s)
            if not isinstance(response, OffloadResponse):
                raise BrokerUnavailableError(f"the transport returned {type(response).__name__}, not an answer")
            if response.window_id != window.window_id or len(response.logits) != self.info.num_classes:
                raise BrokerUnavailableError(
                    f"answer for window {response.window_id!r} with {len(response.logits)} logits; "
                    f"expected window {window.window_id!r} with {self.info.num_classes}"
                )
            got = tuple(t.model for t in response.task_results)
            if got != request.extra_models:
                raise BrokerUnavailableError(
                    f"answer for window {window.window_id!r} carries tasks {list(got)}, "
                    f"expected {list(request.extra_models)}"
                )
        except asyncio.CancelledError:  # hedged: the local tail answered first; the bytes went up
            self._end_call(call, ticket, up_bytes, 0, answered=False)
            raise
        except ShedError as e:
            kind, detail, retry_after_s = FailureKind.SHED, str(e), e.retry_after_ms / 1000.0
        except (OffloadDeadlineError, TimeoutError) as e:
            kind, detail = FailureKind.DEADLINE, str(e) or f"no answer within {c.deadline_ms:.0f} ms"
        except BrokerUnavailableError as e:
            kind, detail = FailureKind.UNAVAILABLE, str(e)
        except RejectedError as e:
            kind, detail = FailureKind.REJECTED, str(e)
        except OffloadError as e:
            kind, detail = FailureKind.ERROR, str(e)
        except Exception as e:  # a bug in a transport must not cost a window
            log.exception("transport failed on window %s", window.window_id)
            kind, detail = FailureKind.ERROR, f"{type(e).__name__}: {e}"
        else:
            now = self._clock()
            elapsed = now - sent
            down_bytes = wire.to_pb(response).ByteSize()
            transfer = self._end_call(call, ticket, up_bytes, down_bytes, answered=True)
            self.breaker.record_success(now)
            t = response.timing
            server_s = (t.queue_ms + t.compute_ms) / 1000.0
            a = _SERVER_EWMA_ALPHA
            self._server_s = server_s if self._server_s is None else (1 - a) * self._server_s + a * server_s
            # Not the link's doing: the cloud's queue and compute, and the promotion this call paid
            # (the device's own radio state says whether there was one).
            # Not a sample of the link: a call across a link loss (it timed the outage) or one that
            # set up a stream or connection first (extra round trips, the cloud's first call).
            changed = self.radio.link_changed_s
            warm = getattr(self.transport, "streams_opened", 0) == streams and self._answered > 0
            if (changed is None or changed < sent) and warm:
                self.estimator.record_transfer(up_bytes, down_bytes, elapsed, server_s, ticket.promotion_s)
            self._answered += 1
            return _Attempt(response, None, "", sent, elapsed, transfer)
        now = self._clock()
        transfer = self._end_call(call, ticket, up_bytes, 0, answered=False)
        self.breaker.record_failure(now, kind, retry_after_s=retry_after_s, detail=detail)
        return _Attempt(None, kind, detail, sent, now - sent, transfer)

    def _end_call(self, call: _Call, ticket: Any, up_bytes: int, down_bytes: int, answered: bool) -> RadioTransfer:
        """End a call on the radio: its energy (what the platform says its bytes took on the air,
        else at the estimate) is charged and drained from the battery."""
        on_air = self.hardware.on_air_s(up_bytes, down_bytes, ticket.start_s + ticket.promotion_s)
        transfer = self.radio.end(
            ticket, up_bytes, down_bytes, on_air_s=on_air, mbps=self.estimator.bandwidth_mbps, answered=answered
        )
        self.battery.drain(transfer.energy_mj)
        call.transfer = transfer
        return transfer

    def _start_probe(self, window: SensorWindow, choice: Any, encoded: EncodedTensor) -> None:
        """Send this window's activation as the breaker's probe, in the background.

        A probe through a dead link waits out a whole deadline; carrying a real window, that wait
        would land on the window. Here the window runs locally at once, and the probe (the same
        request, so it exercises the whole path down to the Ray tail) only decides the breaker:
        success closes it, and the next window offloads again. Its radio energy is drained from
        the battery and kept under the radio state's `probe` traffic."""
        task = asyncio.create_task(
            self._offload(window, choice, encoded, traffic=TrafficKind.PROBE), name=f"probe-{window.window_id}"
        )
        self._probes.add(task)
        task.add_done_callback(self._probes.discard)

    # --- store-and-forward (a device without local fallback) --------------------------------

    def _within_reach(self, choice: _Choice) -> _Choice:
        """A choice deeper than this device can run (a local plan row included): sent at the
        model's bottleneck within reach, coded (ans: the fewest bytes the device can make), else at
        `max_cut` with the config's default codec (fp32 if that cannot code it: `_encode_storable`)."""
        b = max((k for k in range(1, self.max_cut + 1) if self.info.symbol_prior(k) is not None), default=None)
        if b is not None:
            cut, codec = b, Codec.ANS
        else:
            cut, codec = self.max_cut, self._default.codec
        why = (
            f"{choice.why}; this device holds only stages [0, {self.max_cut}) (no local fallback): "
            f"sent at cut {cut} ({codec.value})"
        )
        return _Choice(cut, codec, choice.level, choice.plan_version, why)

    def _encode_storable(self, act: Any, choice: _Choice) -> tuple[EncodedTensor, _Choice]:
        """The activation encoded with the choice's codec, or with fp32 when that codec cannot
        code it (ans at a cut without a symbol prior): a device without local fallback has no
        other way to finish the window. CodecError only when fp32 cannot either (NaN/inf)."""
        try:
            return self._encode(act, choice.codec, self.info.symbol_prior(choice.cut)), choice
        except CodecError as e:
            if choice.codec is Codec.FP32:
                raise
            why = f"{choice.why}; {choice.codec.value} cannot code it ({e}): sent as fp32"
            fp32 = _Choice(choice.cut, Codec.FP32, choice.level, choice.plan_version, why)
            return self._encode(act, Codec.FP32), fp32

    async def _compact(
        self, act: Any, choice: _Choice, encoded: EncodedTensor, stage_ms: list[float]
    ) -> tuple[EncodedTensor, _Choice, float] | None:
        """The window as the model's bottleneck code (ans) when this device can compute it from
        `act` (the bottleneck is at or after the choice's cut, within max_cut) and it is smaller than
        `encoded`: what a node keeps while it cannot reach the cloud (a 16 KB fp32 input would fill
        its store in two windows; the code is a few hundred bytes). (encoded, choice, device ms of
        the extra stages), or None to keep the window as chosen."""
        b = next((k for k in range(choice.cut, self.max_cut + 1) if self.info.symbol_prior(k) is not None), None)
        if b is None or (b == choice.cut and choice.codec is Codec.ANS) or not self.holds(b, choice.level):
            return None
        times: list[float] = []
        t0 = self._clock()
        code = self._run_stages(self.model_name, act, choice.cut, b, times, choice.level)
        try:
            small = self._encode(code, Codec.ANS, self.info.symbol_prior(b))
        except CodecError:
            return None
        if small.nbytes >= encoded.nbytes:
            return None
        await self._simulated_hardware(t0, sum(times))
        stage_ms.extend(times)
        why = f"{choice.why}; stored as the bottleneck's code (cut {b}, ans, {small.nbytes} B vs {encoded.nbytes} B)"
        return small, _Choice(b, Codec.ANS, choice.level, choice.plan_version, why), sum(times)

    def _unanswered(self, window_id: str, kind: str, detail: str, nbytes: int) -> WindowUnansweredError:
        self.metrics.observe_unanswered(kind)
        return WindowUnansweredError(window_id, kind, detail, nbytes)

    async def _offload_or_store(
        self,
        window: SensorWindow,
        choice: _Choice,
        act: Any,
        t_ready: float,
        front_ms: float,
        stage_ms: list[float],
        estimate: float | None = None,
    ) -> WindowResult | asyncio.Future[WindowResult]:
        """Steps 3-4 for a device without local fallback: offload when the breaker is closed,
        otherwise (or when that fails) store the window for the drain task."""
        if self.store:  # every window is a moment for the drain task to look at the breaker again
            self._ensure_drain()
        energy = compute_energy_mj(self.config.active_mw, front_ms / 1000.0)
        self.battery.drain(energy)
        future: asyncio.Future[WindowResult] = asyncio.get_running_loop().create_future()
        try:
            encoded, choice = self._encode_storable(act, choice)
        except CodecError as e:
            future.set_exception(self._unanswered(window.window_id, "codec", f"cannot be encoded: {e}", 0))
            return future
        now = self._clock()
        bytes_sent = 0
        radio = 0.0
        # Closed and the link up: offload now. Link down, open, half open (the drain task's probe
        # is out) or holding after a shed: straight to the store; the drain task probes with the
        # oldest stored window.
        decision = self._route(choice)
        if decision.route is Route.OFFLOAD and self.breaker.allow_offload(now):
            attempt = await self._offload(window, choice, encoded)
            radio = attempt.radio_mj  # drained from the battery as the call ended
            energy += radio
            bytes_sent = encoded.nbytes
            if attempt.response is not None:
                result = WindowResult(
                    window_id=window.window_id,
                    label=window.label,
                    prediction=attempt.response.prediction,
                    mode=ExecutionMode.OFFLOADED,
                    cut=choice.cut,
                    codec=choice.codec.value,
                    compression_energy_kept=choice.level,
                    latency_ms=(self._clock() - t_ready) * 1000.0,
                    front_ms=front_ms,
                    bytes_sent=bytes_sent,
                    energy_mj=energy,
                    reason=choice.missing,  # "" when the front ran as chosen
                    plan_version=choice.plan_version,
                    stage_ms=tuple(stage_ms),
                    tasks=_answered_tasks(window, attempt.response),
                    radio_mj=radio,
                    estimate_mbps=estimate,
                )
                self.metrics.observe(result)
                self.metrics.set_state(self.breaker.state, self.estimates())
                return result
            assert attempt.kind is not None
            why, stored_kind = f"{attempt.kind.value}: {attempt.detail}", FallbackKind.of_failure(attempt.kind)
            if attempt.kind is FailureKind.REJECTED:  # the broker refuses this window: no retry helps
                future.set_exception(self._unanswered(window.window_id, "rejected", why, encoded.nbytes))
                return future
        else:  # not sent now: a route other than OFFLOAD, or the breaker took its grant back
            why, stored_kind = decision.reason, decision.kind or FallbackKind.BREAKER
        compact = await self._compact(act, choice, encoded, stage_ms)
        if compact is not None:  # kept as the bottleneck's code: the store holds ~10x more windows
            encoded, choice, extra_ms = compact
            front_ms += extra_ms
            more = compute_energy_mj(self.config.active_mw, extra_ms / 1000.0)
            self.battery.drain(more)
            energy += more
        held = _Held(window, choice, encoded, t_ready, front_ms, tuple(stage_ms), energy, bytes_sent, why, future)
        held.kind = stored_kind
        held.radio_mj = radio
        held.estimate_mbps = estimate
        held.attempts = 1 if bytes_sent else 0
        admission = self.store.put(held, encoded.nbytes, self._clock())
        self.metrics.set_state(self.breaker.state, self.estimates())
        if not admission:
            future.set_exception(self._unanswered(window.window_id, "refused", admission.reason, encoded.nbytes))
            return future
        self.metrics.set_store(len(self.store), self.store.nbytes)
        self._ensure_drain()
        return future

    def _ensure_drain(self) -> None:
        if self._drain_task is None or self._drain_task.done():
            self._wake, self._changed = asyncio.Event(), asyncio.Event()
            self._drain_task = asyncio.create_task(self._drain_loop(), name=f"drain-{self.config.device_id}")
        else:
            assert self._wake is not None
            self._wake.set()

    async def _drain_loop(self) -> None:
        """Forward stored windows, oldest first, whenever the breaker allows, for as long as the
        device runs (`close` cancels it)."""
        while True:
            try:
                await self._drain_step()
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug here must not strand the store: log it and go on
                log.exception("store-and-forward drain failed; retrying")
                await asyncio.sleep(self.config.breaker.backoff_base_s)

    async def _drain_step(self) -> None:
        assert self._wake is not None
        self._wake.clear()  # a window stored from here on wakes the wait below
        now = self._clock()
        for s in self.store.expire(now):
            what = f"stored {s.age_s(now):.1f} s, longer than the store's bound of {self.store.max_age_s:g} s"
            self._resolve(s, error=self._unanswered(s.item.window.window_id, "expired", what, s.nbytes))
        head = self.store.head()
        if head is None:
            await self._wait_wake(None)
            return
        if not self.breaker.peek(now):
            await self._wait_wake(self._breaker_wait_s(now))
            return
        if not self._sync_link():  # nothing gets through: look again when the link may be back
            await self._wait_wake(self.config.breaker.backoff_base_s)
            return
        closed = self.breaker.state is BreakerState.CLOSED
        self.breaker.allow_offload(now)  # grants the probe when open: this window is the probe
        # Closed: the oldest store_drain_burst go together (a round trip for all of them, not one
        # each); open or half open: the head alone, the breaker's probe. They stay in the store
        # until answered: a device stopped meanwhile reports them pending, none lost.
        burst = list(itertools.islice(self.store, self.config.store_drain_burst)) if closed else [head]
        attempts = await asyncio.gather(*(self._offload(s.item.window, s.item.choice, s.item.encoded) for s in burst))
        for stored, attempt in zip(burst, attempts, strict=True):
            h = stored.item
            radio = attempt.radio_mj  # drained from the battery as the call ended
            h.energy_mj += radio
            h.radio_mj += radio
            h.bytes_sent += h.encoded.nbytes
            h.attempts += 1
            if attempt.response is not None:
                self.store.remove(stored)
                self._resolve(stored, result=self._deferred_result(stored, attempt.response))
            elif attempt.kind is FailureKind.REJECTED:
                self.store.remove(stored)
                what = f"{attempt.detail} (after {stored.age_s(self._clock()):.1f} s in the store)"
                self._resolve(stored, error=self._unanswered(h.window.window_id, "rejected", what, stored.nbytes))
            # any other failure: it stays where it is, and the breaker (told by _offload) says when
            # the next try may go

    def _breaker_wait_s(self, now: float) -> float:
        """How long until the breaker may allow the next send (on `clock`, read as seconds)."""
        snap = self.breaker.snapshot(now)
        if snap.state is BreakerState.HALF_OPEN:  # another send is the probe: its deadline bounds it
            return self.config.deadline_ms / 1000.0 + _TRANSPORT_GRACE_S
        until = max(snap.open_until or now, snap.hold_until or now)
        return min(max(until - now, 0.001), self.breaker.backoff_bound_s())

    async def _wait_wake(self, timeout_s: float | None) -> None:
        """Until a window is stored (or `flush` asks), or `timeout_s` has passed."""
        assert self._wake is not None
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await self._wake.wait()

    def _deferred_result(self, stored: Stored[_Held], response: OffloadResponse) -> WindowResult:
        h, now = stored.item, self._clock()
        reason = (
            f"stored: {stored.age_s(now):.2f} s in the store-and-forward buffer, forwarded on attempt "
            f"{h.attempts}; stored because {h.why}"
        )
        return WindowResult(
            window_id=h.window.window_id,
            label=h.window.label,
            prediction=response.prediction,
            mode=ExecutionMode.DEFERRED,
            cut=h.choice.cut,
            codec=h.choice.codec.value,
            compression_energy_kept=h.choice.level,
            latency_ms=(now - h.t_ready) * 1000.0,
            front_ms=h.front_ms,
            bytes_sent=h.bytes_sent,
            energy_mj=h.energy_mj,
            reason=reason,
            plan_version=h.choice.plan_version,
            stage_ms=h.stage_ms,
            tasks=_answered_tasks(h.window, response),
            radio_mj=h.radio_mj,
            estimate_mbps=h.estimate_mbps,
            kind=h.kind,
        )

    def _resolve(
        self, stored: Stored[_Held], result: WindowResult | None = None, error: BaseException | None = None
    ) -> None:
        """A stored window left the store: answered (`result`) or not (`error`)."""
        future = stored.item.future
        if result is not None:
            self.metrics.observe(result)
        if not future.done():
            if result is not None:
                future.set_result(result)
            else:
                future.set_exception(error or RuntimeError("a stored window left the store without an outcome"))
        self.metrics.set_store(len(self.store), self.store.nbytes)
        self.metrics.set_state(self.breaker.state, self.estimates())
        if self._changed is not None:
            self._changed.set()

    async def flush(self, idle_timeout_s: float | None = None) -> int:
        """Let the drain task forward stored windows until the store is empty, or until no window
        has left it for `idle_timeout_s` (default `drain_timeout_s`). Returns the windows left."""
        timeout = self.drain_timeout_s if idle_timeout_s is None else idle_timeout_s
        while self.store and timeout > 0:
            self._ensure_drain()
            assert self._changed is not None and self._wake is not None
            self._changed.clear()
            self._wake.set()
            try:
                async with asyncio.timeout(timeout):
                    await self._changed.wait()
            except TimeoutError:
                break
        return len(self.store)

    async def close(self, drain_timeout_s: float | None = None) -> Pending:
        """Flush (see `flush`), stop the drain task, and report what is still stored as pending:
        each such window's future fails with WindowUnansweredError(kind "pending")."""
        if self.store:
            await self.flush(drain_timeout_s)
        return await self._stop_store()

    async def _stop_store(self) -> Pending:
        task, self._drain_task = self._drain_task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        left = self.store.take_all()
        nbytes = sum(s.nbytes for s in left)
        now = self._clock()
        for s in left:
            what = (
                f"still stored after {s.age_s(now):.1f} s when the device stopped ({s.item.attempts} attempt(s); "
                f"stored because {s.item.why})"
            )
            self._resolve(s, error=self._unanswered(s.item.window.window_id, "pending", what, s.nbytes))
        self.metrics.set_store(0, 0)
        return Pending(len(left), nbytes)

    # --- a whole stream ---------------------------------------------------------------------

    async def run(
        self,
        source: AsyncIterable[SensorWindow],
        sink: ResultSink | None = None,
        progress: Callable[[WindowResult], None] | None = None,
    ) -> RunSummary:
        """Process every window of `source` in order; watch plans and push telemetry meanwhile.

        Every result goes to `sink` and `progress` once, as it is known: at once for a window
        finished now, when its answer arrives for a stored one (mode deferred; the loop never
        waits for it). Without local fallback the run ends with `close()`: a flush of the store,
        then what is left is reported pending."""
        self.warm_up()
        t0 = self._clock()
        watcher = asyncio.ensure_future(self._watch_plans()) if self.transport is not None else None
        modes: Counter[str] = Counter()
        reasons: Counter[str] = Counter()
        unanswered: Counter[str] = Counter()
        latencies: list[float] = []
        correct = bytes_sent = windows_in = 0
        energy = 0.0
        outstanding: set[asyncio.Future[WindowResult]] = set()
        errors: list[BaseException] = []  # raised by the sink or `progress` on a deferred result
        pending = Pending(0, 0)

        def deliver(result: WindowResult) -> None:
            nonlocal correct, bytes_sent, energy
            if sink is not None:
                sink.write(result)
            if progress is not None:
                progress(result)
            modes[result.mode.value] += 1
            if result.mode is ExecutionMode.FALLBACK and result.kind is not None:
                reasons[result.kind.value] += 1
            latencies.append(result.latency_ms)
            correct += result.correct
            bytes_sent += result.bytes_sent
            energy += result.energy_mj

        def settled(future: asyncio.Future[WindowResult]) -> None:
            outstanding.discard(future)
            error = future.exception() if not future.cancelled() else asyncio.CancelledError()
            if isinstance(error, WindowUnansweredError):
                if error.kind != "pending":  # pending windows are reported by `close`
                    unanswered[error.kind] += 1
                return
            if error is not None:
                errors.append(error)
                return
            try:
                deliver(future.result())
            except Exception as e:  # from the sink or `progress`: raised by run() at the end
                errors.append(e)

        try:
            async for window in source:
                windows_in += 1
                out = await self.submit(window)
                if isinstance(out, WindowResult):
                    deliver(out)
                else:
                    outstanding.add(out)
                    out.add_done_callback(settled)
                self._maybe_report()
            if not self.local_fallback:
                pending = await self.close()
        finally:
            if self._probes:  # bounded by the deadline (+ grace) of each
                await asyncio.gather(*self._probes, return_exceptions=True)
            if not self.local_fallback:
                left = await self._stop_store()  # a run cut short: what it had stored is pending
                pending = Pending(pending.windows + left.windows, pending.nbytes + left.nbytes)
            if outstanding:  # every stored window's future is settled by now: run its callback
                await asyncio.gather(*list(outstanding), return_exceptions=True)
            if watcher is not None:
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher
            await self._final_report()
        if errors:
            raise errors[0]
        n = sum(modes.values())
        return RunSummary(
            windows=n,
            by_mode={m.value: modes[m.value] for m in ExecutionMode},
            lost=windows_in - n - pending.windows,
            accuracy=correct / n if n else 0.0,
            latency_p50_ms=float(np.percentile(latencies, 50)) if latencies else 0.0,
            latency_p95_ms=float(np.percentile(latencies, 95)) if latencies else 0.0,
            bytes_sent=bytes_sent,
            energy_mj=energy,
            fallbacks_by_reason=dict(reasons),
            battery_fraction=self.battery.fraction,
            plan_version=self.plan_version,
            wall_s=self._clock() - t0,
            pending=pending.windows,
            pending_bytes=pending.nbytes,
            lost_by_reason=dict(unanswered),
        )

    def warm_up(self) -> None:
        """One inference on zeros, so that the first real window does not pay the backend's lazy
        set-up (torch's first call; ONNX Runtime's sessions)."""
        self.backend.warm_up(self.model_name)

    async def _watch_plans(self) -> None:
        """Follow the broker's plan watch for as long as the device runs; on any error keep the
        plan in hand and re-watch after a jittered, growing pause (the breaker's back-off)."""
        assert self.transport is not None
        b = self.config.breaker
        pause = b.backoff_base_s
        while True:
            try:
                async for plan_set in self.transport.watch_plans(
                    self.config.device_class, [self.config.model], self.plan_version
                ):
                    self.apply_plan(plan_set)
                    pause = b.backoff_base_s
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.debug("plan watch ended: %s", e)
            await asyncio.sleep(pause * self._rng.uniform(1 - b.backoff_jitter, 1 + b.backoff_jitter))
            pause = min(pause * b.backoff_factor, b.backoff_max_s)

    def _maybe_report(self) -> None:
        if self.transport is None or (self._telemetry_task is not None and not self._telemetry_task.done()):
            return
        now, c = self._clock(), self.config
        if self._report_due is None:
            self._report_due = now + c.telemetry_period_s * c.telemetry_jitter * self._report_rng.random()
        if now >= self._report_due:
            j = c.telemetry_jitter
            self._report_due = now + c.telemetry_period_s * self._report_rng.uniform(1 - j, 1 + j)
            self._telemetry_task = asyncio.ensure_future(self._send_report())

    async def _send_report(self) -> None:
        """One telemetry report, on the radio like any other call: it may pay a promotion, its
        energy is charged (TrafficKind.TELEMETRY), and its time is a (small) sample of the link:
        the call's time less the broker's handling of it (the answer's handling_ms), as an
        offload's is less its queue and compute. A broker that does not say how long it took
        gets a ping after the report instead (`_ping`)."""
        assert self.transport is not None
        end_ms = int(self._wall() * 1000)
        report = self.metrics.drain_report(
            self.config.device_id,
            self.estimates(),
            self.plan_version,
            self._period_start_ms,
            end_ms,
            held_fronts=self.held_fronts(),
        )
        self._period_start_ms = end_ms
        if not report.observations:
            return
        up_bytes = wire.to_pb(report).ByteSize()
        ticket = self.radio.begin(TrafficKind.TELEMETRY)
        call = _Call()
        ack: wire.TelemetryAck | None = None
        try:
            await self.hardware.promote(ticket.promotion_s)
            ack = await self.transport.report_telemetry(report, _TELEMETRY_TIMEOUT_S)
        except asyncio.CancelledError:
            self._end_call(call, ticket, up_bytes, 0, answered=False)
            self.metrics.restore(report)
            raise
        except Exception as e:  # telemetry is best effort; its sums ride on the next report
            log.debug("telemetry report failed: %s", e)
            self._end_call(call, ticket, up_bytes, 0, answered=False)
            self.metrics.restore(report)
        else:
            elapsed = self._clock() - ticket.start_s
            answer_bytes = wire.to_pb(ack).ByteSize()
            self._end_call(call, ticket, up_bytes, answer_bytes, answered=True)
            if ack.handling_ms is not None:
                changed = self.radio.link_changed_s
                if changed is None or changed < ticket.start_s:
                    self.estimator.record_transfer(
                        up_bytes, answer_bytes, elapsed, ack.handling_ms / 1000.0, ticket.promotion_s
                    )
                return
        # The broker's handling of the report is unknown time: a ping is the link sample, on the
        # radio this report just woke.
        await self._ping()

    async def _ping(self) -> None:
        """A round trip of an (almost) empty call: GetPlan with a version no plan reaches, which
        the broker answers at once with nothing. Small calls inform the estimator's round trip,
        which offloads of one size alone cannot tell apart from the rate (a cheap probe, as the
        streaming literature's packet-pair is for the rate). Sent with each telemetry report, when
        the radio is already awake."""
        assert self.transport is not None
        ticket = self.radio.begin(TrafficKind.PING)
        call = _Call()
        try:
            await self.hardware.promote(ticket.promotion_s)
            await self.transport.get_plan(
                self.config.device_class, [self.config.model], _PING_VERSION, _TELEMETRY_TIMEOUT_S
            )
        except asyncio.CancelledError:
            self._end_call(call, ticket, _PING_BYTES, 0, answered=False)
            raise
        except Exception as e:  # best effort, like telemetry
            log.debug("ping failed: %s", e)
            self._end_call(call, ticket, _PING_BYTES, 0, answered=False)
        else:
            elapsed = self._clock() - ticket.start_s
            self._end_call(call, ticket, _PING_BYTES, _PING_ANSWER_BYTES, answered=True)
            changed = self.radio.link_changed_s
            if changed is None or changed < ticket.start_s:
                self.estimator.record_transfer(_PING_BYTES, _PING_ANSWER_BYTES, elapsed, 0.0, ticket.promotion_s)

    async def _final_report(self) -> None:
        if self._telemetry_task is not None and not self._telemetry_task.done():
            with contextlib.suppress(Exception):
                await self._telemetry_task
        if self.transport is not None and self.metrics.pending_windows():
            await self._send_report()
