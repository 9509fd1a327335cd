"""Typed mirrors of the v1 wire messages, and the only conversions to and from them.

Only servicers and clients touch `splitsense.v1.offload_pb2`; everything else works with these
frozen dataclasses (and with `splitsense.kinds.EncodedTensor` and the `splitsense.plan` classes,
which travel on the same wire):

    dataclass                      message (splitsense.v1)
    EncodedTensor                  Tensor                  tensor_to_pb / tensor_from_pb
    DeviceEstimates                DeviceEstimates
    OffloadRequest                 OffloadRequest          (OffloadStreamRequest: stream_request_*)
    Timing                         Timing
    OffloadResponse                OffloadResponse         (OffloadStreamResponse: stream_response_*,
    WindowError                    WindowError              its oneof is OffloadResponse | WindowError)
    TelemetryObservation           TelemetryObservation
    HeldFronts                     HeldFronts (its fronts: FrontRef)
    TelemetryReport                ReportTelemetryRequest
    TelemetryAck                   ReportTelemetryResponse
    PlanRequest                    GetPlanRequest, WatchPlanRequest   plan_request_from_pb
    PlanRow, Plan, PlanSet         PlanRow, Plan, PlanSet

`to_pb(x)` and `from_pb(msg)` convert any pair of that table (typed per pair). Every dataclass
checks its values when built, and `from_pb` additionally rejects what proto3 cannot say is missing
(an unset sub-message, an empty id, an UNSPECIFIED or unknown enum value). A device's strings have
length limits (MAX_ID_CHARS for ids, MAX_NAME_CHARS for names) and an unset `estimates` is None,
"unknown", not an error: proto3 lets any client leave a message field out. Either way the error is a
`WireError` whose message starts with the path of the field at fault, e.g.
`OffloadRequest.activation.shape: expected dimensions >= 0, got [1, -3]`; a broker answers it
with INVALID_ARGUMENT. This module imports protobuf, never grpc.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum, StrEnum
from typing import Any, Generic, NoReturn, TypeVar, overload

from splitsense.errors import CodecError, PlanError, WireError
from splitsense.kinds import Codec, EncodedTensor, Radio
from splitsense.plan import BatteryState, Objective, Plan, PlanRow, PlanSet
from splitsense.v1 import offload_pb2 as pb

__all__ = [
    "DeviceEstimates",
    "ExecutionMode",
    "HeldFronts",
    "OffloadRequest",
    "MAX_EXTRA_MODELS",
    "MAX_FRONTS_PER_MODEL",
    "MAX_HELD_MODELS",
    "MAX_ID_CHARS",
    "MAX_NAME_CHARS",
    "MAX_PLAN_MODELS",
    "OffloadResponse",
    "PlanRequest",
    "RadioKind",
    "TaskResult",
    "TelemetryAck",
    "TelemetryObservation",
    "TelemetryReport",
    "Timing",
    "WindowError",
    "from_pb",
    "plan_request_from_pb",
    "stream_request_from_pb",
    "stream_request_to_pb",
    "stream_response_from_pb",
    "stream_response_to_pb",
    "tensor_from_pb",
    "tensor_to_pb",
    "to_pb",
]

_UINT32_MAX = 2**32 - 1
_INT64_MAX = 2**63 - 1

# Length limits of the strings a device sends, in characters (the only place they are defined).
# Past these the field is refused (INVALID_ARGUMENT naming the field and the limit), never echoed.
MAX_ID_CHARS = 128  # window_id, device_id: a UUID is 36, "fleet-sensor_node-0042" 22
MAX_NAME_CHARS = 64  # model names (model, extra_models, observations, plan requests), device_class,
#                      prior_digest (16 hex digits): the shipped names are at most 11
MAX_FALLBACK_KINDS = 32  # TelemetryObservation.fallback_kinds: FallbackKind has 13 values
MAX_EXTRA_MODELS = 8  # OffloadRequest.extra_models: tasks sharing one encoder (2 ship)
MAX_PLAN_MODELS = 64  # GetPlanRequest / WatchPlanRequest.models: a device runs a handful
MAX_HELD_MODELS = 16  # ReportTelemetryRequest.held_fronts: one entry per model a device runs
MAX_FRONTS_PER_MODEL = 256  # HeldFronts.fronts: (N + 1) cuts x levels (the shipped: 5 x 4 = 20)


# Call metadata keys of the contract (both sides import these; gRPC status codes are mapped only
# in the servicers and the edge transport).
AUTH_METADATA_KEY = "authorization"  # value: "Bearer <token>"
TOKEN_METADATA_KEY = "x-splitsense-token"  # alternative to authorization: the bare token
DEVICE_ID_METADATA_KEY = "x-splitsense-device-id"
RETRY_AFTER_METADATA_KEY = "x-splitsense-retry-after-ms"  # trailing metadata of a shed


RadioKind = Radio  # the kind of link a device's uplink uses (splitsense.kinds.Radio)


class ExecutionMode(StrEnum):
    """Where a window's stages ran (also the `mode` metric label)."""

    OFFLOADED = "offloaded"  # the cloud ran stages [cut, N) and answered in time
    LOCAL = "local"  # the plan chose to run the whole model on the device
    FALLBACK = "fallback"  # the plan chose to offload, but the device finished the window itself
    DEFERRED = "deferred"  # stored while the cloud was unreachable and forwarded later (no local model fits)


class _FieldError(WireError):
    """A WireError about one field of one dataclass; `from_pb` re-raises it with the message path."""

    def __init__(self, owner: str, field: str, detail: str) -> None:
        super().__init__(f"{owner}.{field}: {detail}")
        self.field = field
        self.detail = detail


def _bad(owner: str, field: str, expected: str, got: Any) -> NoReturn:
    raise _FieldError(owner, field, f"expected {expected}, got {got!r}")


def _check_str(owner: str, field: str, value: Any, max_chars: int) -> None:
    if not isinstance(value, str) or not value:
        _bad(owner, field, "a non-empty string", value)
    if len(value) > max_chars:  # the value itself is not echoed: it may be megabytes
        raise _FieldError(owner, field, f"expected at most {max_chars} characters, got {len(value)}")


def _check_names(owner: str, field: str, value: Any, max_count: int) -> tuple[str, ...]:
    """A sequence of distinct non-empty names of at most MAX_NAME_CHARS, at most max_count of them."""
    if isinstance(value, str) or not isinstance(value, Sequence):
        _bad(owner, field, "a sequence of model names", value)
    names = tuple(value)
    if len(names) > max_count:
        raise _FieldError(owner, field, f"expected at most {max_count} names, got {len(names)}")
    for i, m in enumerate(names):
        if not isinstance(m, str) or not m:
            raise _FieldError(owner, field, f"expected non-empty model names, got {m!r} at index {i}")
        if len(m) > MAX_NAME_CHARS:
            raise _FieldError(
                owner, field, f"expected names of at most {MAX_NAME_CHARS} characters, got {len(m)} at index {i}"
            )
    return names


def _check_int(owner: str, field: str, value: Any, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        _bad(owner, field, f"an int in [{lo}, {hi}]", value)


def _check_float(owner: str, field: str, value: Any, lo: float = 0.0, hi: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
        _bad(owner, field, f"a number in [{lo}, {hi}]", value)
    if not math.isfinite(value):
        _bad(owner, field, "a finite number", value)
    return float(value)


def _check_enum(owner: str, field: str, cls: type[Enum], value: Any) -> Any:
    if isinstance(value, cls):
        return value
    try:
        return cls(value)
    except ValueError:
        _bad(owner, field, "one of " + ", ".join(repr(m.value) for m in cls), value)


@dataclass(frozen=True)
class DeviceEstimates:
    """A device's live estimates of its uplink and battery."""

    bandwidth_mbps: float
    rtt_ms: float
    battery_fraction: float  # 0.0 empty .. 1.0 full
    on_battery: bool  # False when plugged in or without a battery
    radio: RadioKind

    def __post_init__(self) -> None:
        o = "DeviceEstimates"
        object.__setattr__(self, "bandwidth_mbps", _check_float(o, "bandwidth_mbps", self.bandwidth_mbps))
        object.__setattr__(self, "rtt_ms", _check_float(o, "rtt_ms", self.rtt_ms))
        object.__setattr__(
            self, "battery_fraction", _check_float(o, "battery_fraction", self.battery_fraction, 0.0, 1.0)
        )
        if not isinstance(self.on_battery, bool):
            _bad(o, "on_battery", "a bool", self.on_battery)
        object.__setattr__(self, "radio", _check_enum(o, "radio", RadioKind, self.radio))


@dataclass(frozen=True)
class OffloadRequest:
    """One window the device asks the cloud to finish from `cut` on."""

    window_id: str
    model: str
    cut: int  # the device ran stages [0, cut); the cloud runs [cut, N)
    device_id: str
    device_class: str
    estimates: DeviceEstimates | None  # None: unknown (a client that leaves the message out)
    plan_version: int  # 0 when the device has no plan yet
    activation: EncodedTensor
    sent_unix_ms: int
    deadline_ms: int = 0  # from the broker receiving the window; 0: the call's own deadline
    extra_models: tuple[str, ...] = ()  # tasks that share the front [0, cut): one upload serves all

    def __post_init__(self) -> None:
        o = "OffloadRequest"
        for name in ("window_id", "device_id"):
            _check_str(o, name, getattr(self, name), MAX_ID_CHARS)
        for name in ("model", "device_class"):
            _check_str(o, name, getattr(self, name), MAX_NAME_CHARS)
        extra = _check_names(o, "extra_models", self.extra_models, MAX_EXTRA_MODELS)
        if len(set(extra)) != len(extra) or self.model in extra:
            _bad(o, "extra_models", f"distinct models other than {self.model!r}", extra)
        object.__setattr__(self, "extra_models", extra)
        _check_int(o, "cut", self.cut, 0, _UINT32_MAX)
        if self.estimates is not None and not isinstance(self.estimates, DeviceEstimates):
            _bad(o, "estimates", "a DeviceEstimates or None (unknown)", self.estimates)
        _check_int(o, "plan_version", self.plan_version, 0, _INT64_MAX)
        if not isinstance(self.activation, EncodedTensor):
            _bad(o, "activation", "a pipelines.codecs.EncodedTensor", self.activation)
        _check_int(o, "sent_unix_ms", self.sent_unix_ms, 0, _INT64_MAX)
        _check_int(o, "deadline_ms", self.deadline_ms, 0, _UINT32_MAX)


@dataclass(frozen=True)
class Timing:
    """Where the cloud spent its time on a window."""

    queue_ms: float
    compute_ms: float
    batch_size: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "queue_ms", _check_float("Timing", "queue_ms", self.queue_ms))
        object.__setattr__(self, "compute_ms", _check_float("Timing", "compute_ms", self.compute_ms))
        _check_int("Timing", "batch_size", self.batch_size, 0, _UINT32_MAX)


def _check_logits(o: str, logits_in: Any, prediction: Any) -> tuple[float, ...]:
    if isinstance(logits_in, (str, bytes)) or not isinstance(logits_in, Sequence):
        _bad(o, "logits", "a sequence of numbers", logits_in)
    logits = tuple(logits_in)
    if not logits:
        _bad(o, "logits", "at least one logit", logits)
    for x in logits:
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
            _bad(o, "logits", "finite numbers", logits)
    _check_int(o, "prediction", prediction, 0, len(logits) - 1)
    return tuple(float(x) for x in logits)


@dataclass(frozen=True)
class TaskResult:
    """The answer of one extra model of a window (a task sharing the window's activation)."""

    model: str
    logits: tuple[float, ...]
    prediction: int

    def __post_init__(self) -> None:
        _check_str("TaskResult", "model", self.model, MAX_NAME_CHARS)
        object.__setattr__(self, "logits", _check_logits("TaskResult", self.logits, self.prediction))


@dataclass(frozen=True)
class OffloadResponse:
    """The cloud's result for one window. Logits travel as float32."""

    window_id: str
    logits: tuple[float, ...]
    prediction: int  # index into logits
    timing: Timing
    task_results: tuple[TaskResult, ...] = ()  # one per extra model of the request, in its order

    def __post_init__(self) -> None:
        o = "OffloadResponse"
        _check_str(o, "window_id", self.window_id, MAX_ID_CHARS)
        object.__setattr__(self, "logits", _check_logits(o, self.logits, self.prediction))
        if not isinstance(self.timing, Timing):
            _bad(o, "timing", "a Timing", self.timing)
        tasks = tuple(self.task_results)
        if any(not isinstance(t, TaskResult) for t in tasks):
            _bad(o, "task_results", "TaskResult entries", tasks)
        object.__setattr__(self, "task_results", tasks)


@dataclass(frozen=True)
class WindowError:
    """Why the cloud produced no result for one window of a stream (the stream goes on).

    `code` is the gRPC status code number the unary call would have failed with (1..16, never
    OK); mapping it to and from `grpc.StatusCode` or our errors is the servicer's and client's job.
    """

    window_id: str
    code: int
    message: str
    retry_after_ms: int = 0  # 0: no hint

    def __post_init__(self) -> None:
        _check_str("WindowError", "window_id", self.window_id, MAX_ID_CHARS)
        _check_int("WindowError", "code", self.code, 1, 16)
        if not isinstance(self.message, str):
            _bad("WindowError", "message", "a string", self.message)
        _check_int("WindowError", "retry_after_ms", self.retry_after_ms, 0, _UINT32_MAX)


@dataclass(frozen=True)
class TelemetryObservation:
    """The windows of one (model, cut, mode) over a reporting period, as sums that add up across
    devices. `stage_ms_total[i]` is stage i's on-device time, for the stages that ran on the device
    (empty when not measured); `failure_count` counts offload attempts that produced no result."""

    model: str
    cut: int
    mode: ExecutionMode
    window_count: int
    front_ms_total: float
    latency_ms_total: float
    bytes_sent: int
    energy_mj: float
    failure_count: int = 0
    stage_ms_total: tuple[float, ...] = ()
    # The windows the cloud did not answer, by why (FallbackKind values), sorted by kind; a
    # receiver counts kinds it does not know as "other".
    fallback_kinds: tuple[tuple[str, int], ...] = ()

    def __post_init__(self) -> None:
        o = "TelemetryObservation"
        _check_str(o, "model", self.model, MAX_NAME_CHARS)
        _check_int(o, "cut", self.cut, 0, _UINT32_MAX)
        object.__setattr__(self, "mode", _check_enum(o, "mode", ExecutionMode, self.mode))
        _check_int(o, "window_count", self.window_count, 0, _UINT32_MAX)
        for name in ("front_ms_total", "latency_ms_total", "energy_mj"):
            object.__setattr__(self, name, _check_float(o, name, getattr(self, name)))
        _check_int(o, "bytes_sent", self.bytes_sent, 0, 2**64 - 1)
        _check_int(o, "failure_count", self.failure_count, 0, _UINT32_MAX)
        if isinstance(self.stage_ms_total, (str, bytes)) or not isinstance(self.stage_ms_total, Sequence):
            _bad(o, "stage_ms_total", "a sequence of numbers", self.stage_ms_total)
        object.__setattr__(
            self, "stage_ms_total", tuple(_check_float(o, "stage_ms_total", x) for x in self.stage_ms_total)
        )
        kinds = dict(self.fallback_kinds)
        if len(kinds) > MAX_FALLBACK_KINDS:
            _bad(o, "fallback_kinds", f"at most {MAX_FALLBACK_KINDS} kinds", len(kinds))
        for kind, n in kinds.items():
            _check_str(o, "fallback_kinds key", kind, MAX_NAME_CHARS)
            _check_int(o, f"fallback_kinds[{kind!r}]", n, 0, _UINT32_MAX)
        object.__setattr__(self, "fallback_kinds", tuple(sorted(kinds.items())))


@dataclass(frozen=True)
class HeldFronts:
    """The fronts of one model a device can run: (cut, compression level) pairs, each at most once,
    kept sorted (cut ascending, level from 1.0 down). Cut 0 needs no front and is implied; an
    ONNX Runtime device lists what its export's manifest holds, a PyTorch one what its weights and
    catalog can build (edge/backend.py `FrontBackend.fronts`)."""

    model: str
    fronts: tuple[tuple[int, float], ...]

    def __post_init__(self) -> None:
        o = "HeldFronts"
        _check_str(o, "model", self.model, MAX_NAME_CHARS)
        if isinstance(self.fronts, (str, bytes)) or not isinstance(self.fronts, Sequence):
            _bad(o, "fronts", "a sequence of (cut, level) pairs", self.fronts)
        if len(self.fronts) > MAX_FRONTS_PER_MODEL:
            raise _FieldError(o, "fronts", f"expected at most {MAX_FRONTS_PER_MODEL} fronts, got {len(self.fronts)}")
        out: dict[tuple[int, float], None] = {}
        for i, pair in enumerate(self.fronts):
            if isinstance(pair, (str, bytes)) or not isinstance(pair, Sequence) or len(pair) != 2:
                _bad(o, f"fronts[{i}]", "a (cut, level) pair", pair)
            cut, level = pair
            _check_int(o, f"fronts[{i}].cut", cut, 0, _UINT32_MAX)
            lv = _check_float(o, f"fronts[{i}].compression_energy_kept", level, 0.0, 1.0)
            if not lv > 0:
                _bad(o, f"fronts[{i}].compression_energy_kept", "a level in (0, 1]", level)
            if (cut, lv) in out:
                _bad(o, f"fronts[{i}]", "each (cut, level) at most once", (cut, lv))
            out[(cut, lv)] = None
        object.__setattr__(self, "fronts", tuple(sorted(out, key=lambda f: (f[0], -f[1]))))

    def holds(self, cut: int, level: float, tol: float = 1e-9) -> bool:
        """Whether the front of `cut` at `level` is listed (cut 0 at level 1.0 always is)."""
        if cut == 0 and level >= 1.0 - tol:
            return True
        return any(k == cut and abs(lv - level) <= tol for k, lv in self.fronts)


@dataclass(frozen=True)
class TelemetryAck:
    """The broker's answer to a telemetry report (ReportTelemetryResponse)."""

    plan_version: int  # the newest plan set version the broker knows
    # How long the broker took to handle the report (ms); None: a broker that does not say (the
    # device then pings for its link sample instead of timing the report)
    handling_ms: float | None = None

    def __post_init__(self) -> None:
        o = "TelemetryAck"
        _check_int(o, "plan_version", self.plan_version, 0, _INT64_MAX)
        if self.handling_ms is not None:
            object.__setattr__(self, "handling_ms", _check_float(o, "handling_ms", self.handling_ms))


@dataclass(frozen=True)
class TelemetryReport:
    """One device's observations for one reporting period (ReportTelemetryRequest)."""

    device_id: str
    device_class: str
    estimates: DeviceEstimates | None  # None: unknown (a client that leaves the message out)
    plan_version: int
    period_start_unix_ms: int
    period_end_unix_ms: int
    observations: tuple[TelemetryObservation, ...]
    # The fronts the device holds, per model it runs; empty: unknown (no restriction)
    held_fronts: tuple[HeldFronts, ...] = ()

    def __post_init__(self) -> None:
        o = "TelemetryReport"
        _check_str(o, "device_id", self.device_id, MAX_ID_CHARS)
        _check_str(o, "device_class", self.device_class, MAX_NAME_CHARS)
        if self.estimates is not None and not isinstance(self.estimates, DeviceEstimates):
            _bad(o, "estimates", "a DeviceEstimates or None (unknown)", self.estimates)
        _check_int(o, "plan_version", self.plan_version, 0, _INT64_MAX)
        _check_int(o, "period_start_unix_ms", self.period_start_unix_ms, 0, _INT64_MAX)
        _check_int(o, "period_end_unix_ms", self.period_end_unix_ms, self.period_start_unix_ms, _INT64_MAX)
        observations = tuple(self.observations)
        for x in observations:
            if not isinstance(x, TelemetryObservation):
                _bad(o, "observations", "TelemetryObservation items", x)
        object.__setattr__(self, "observations", observations)
        if isinstance(self.held_fronts, (str, bytes)) or not isinstance(self.held_fronts, Sequence):
            _bad(o, "held_fronts", "a sequence of HeldFronts", self.held_fronts)
        held = tuple(self.held_fronts)
        if len(held) > MAX_HELD_MODELS:
            raise _FieldError(o, "held_fronts", f"expected at most {MAX_HELD_MODELS} models, got {len(held)}")
        for h in held:
            if not isinstance(h, HeldFronts):
                _bad(o, "held_fronts", "HeldFronts items", type(h).__name__)
        models = [h.model for h in held]
        if len(set(models)) != len(models):
            raise _FieldError(o, "held_fronts", "expected each model at most once")
        object.__setattr__(self, "held_fronts", held)


@dataclass(frozen=True)
class PlanRequest:
    """What a device asks the PlanService for (GetPlanRequest and WatchPlanRequest alike)."""

    device_class: str
    models: tuple[str, ...]  # empty: every model
    known_version: int  # 0: the device has no plan set yet

    def __post_init__(self) -> None:
        o = "PlanRequest"
        _check_str(o, "device_class", self.device_class, MAX_NAME_CHARS)
        object.__setattr__(self, "models", _check_names(o, "models", self.models, MAX_PLAN_MODELS))
        _check_int(o, "known_version", self.known_version, 0, _INT64_MAX)


# --- enum tables: every member of ours <-> one non-UNSPECIFIED wire value ---------------------


_E = TypeVar("_E", bound=Enum)
_W = TypeVar("_W", bound=int)


class _EnumMap(Generic[_E, _W]):
    def __init__(self, pairs: Mapping[_E, _W], wire_enum: Any) -> None:
        self.to_wire: dict[_E, _W] = dict(pairs)
        self.from_wire: dict[int, _E] = {int(v): k for k, v in pairs.items()}
        self._wire_enum = wire_enum

    def decode(self, path: str, value: int) -> _E:
        try:
            return self.from_wire[value]
        except KeyError:
            names = ", ".join(self._wire_enum.Name(v) for v in self.from_wire)
            try:
                got = f"{self._wire_enum.Name(value)} ({value})"
            except ValueError:
                got = f"unknown value {value}"
            raise WireError(f"{path}: expected one of {names}, got {got}") from None


_CODEC = _EnumMap(
    {Codec.FP32: pb.CODEC_FP32, Codec.FP16: pb.CODEC_FP16, Codec.INT8: pb.CODEC_INT8, Codec.ANS: pb.CODEC_ANS},
    pb.Codec,
)
_RADIO = _EnumMap(
    {
        RadioKind.WIFI: pb.RADIO_KIND_WIFI,
        RadioKind.LTE: pb.RADIO_KIND_LTE,
        RadioKind.THREEG: pb.RADIO_KIND_3G,
        RadioKind.BLE: pb.RADIO_KIND_BLE,
    },
    pb.RadioKind,
)
_BATTERY = _EnumMap(
    {BatteryState.NORMAL: pb.BATTERY_STATE_NORMAL, BatteryState.LOW: pb.BATTERY_STATE_LOW},
    pb.BatteryState,
)
_OBJECTIVE = _EnumMap(
    {Objective.LATENCY: pb.OBJECTIVE_LATENCY, Objective.ENERGY: pb.OBJECTIVE_ENERGY},
    pb.Objective,
)
_MODE = _EnumMap(
    {
        ExecutionMode.OFFLOADED: pb.EXECUTION_MODE_OFFLOADED,
        ExecutionMode.LOCAL: pb.EXECUTION_MODE_LOCAL,
        ExecutionMode.FALLBACK: pb.EXECUTION_MODE_FALLBACK,
        ExecutionMode.DEFERRED: pb.EXECUTION_MODE_DEFERRED,
    },
    pb.ExecutionMode,
)


# --- decoding helpers -------------------------------------------------------------------------

_T = TypeVar("_T")


def _build(path: str, cls: Callable[..., _T], **kwargs: Any) -> _T:
    """cls(**kwargs), with a value error re-raised under the message path of the field."""
    try:
        return cls(**kwargs)
    except _FieldError as e:
        raise WireError(f"{path}.{e.field}: {e.detail}") from None
    except (PlanError, CodecError) as e:
        raise WireError(f"{path}: {e}") from None


def _required(path: str, msg: Any, field: str) -> Any:
    if not msg.HasField(field):
        raise WireError(f"{path}.{field}: expected a {type(getattr(msg, field)).__name__} message, got none")
    return getattr(msg, field)


def _optional(path: str, msg: Any, field: str, convert: Callable[[Any, str], _T]) -> _T | None:
    """convert(sub-message) of a message field proto3 lets a sender leave out; None when unset."""
    return convert(getattr(msg, field), f"{path}.{field}") if msg.HasField(field) else None


def _expect(msg: Any, cls: type) -> None:
    if not isinstance(msg, cls):
        raise WireError(f"expected a splitsense.v1.{cls.__name__} message, got {type(msg).__name__}")


# --- Tensor <-> EncodedTensor -----------------------------------------------------------------


def tensor_to_pb(t: EncodedTensor) -> pb.Tensor:
    if not isinstance(t, EncodedTensor):
        raise WireError(f"Tensor: expected a pipelines.codecs.EncodedTensor, got {type(t).__name__}")
    return pb.Tensor(
        codec=_CODEC.to_wire[t.codec],
        shape=list(t.shape),
        scale=t.scale,
        zero_point=t.zero_point,
        data=t.data,
        prior_digest=t.prior_digest,
    )


def tensor_from_pb(msg: pb.Tensor, path: str = "Tensor") -> EncodedTensor:
    """The EncodedTensor of a Tensor message, with its payload checked against shape and codec."""
    _expect(msg, pb.Tensor)
    codec = _CODEC.decode(f"{path}.codec", msg.codec)
    if len(msg.prior_digest) > MAX_NAME_CHARS:
        raise WireError(
            f"{path}.prior_digest: expected at most {MAX_NAME_CHARS} characters, got {len(msg.prior_digest)}"
        )
    shape = tuple(msg.shape)
    if any(d < 0 for d in shape):
        raise WireError(f"{path}.shape: expected dimensions >= 0, got {list(shape)}")
    t = _build(
        path,
        EncodedTensor,
        codec=codec,
        shape=shape,
        data=msg.data,
        scale=msg.scale,
        zero_point=msg.zero_point,
        prior_digest=msg.prior_digest,
    )
    try:
        t.validate()
    except CodecError as e:
        raise WireError(f"{path}: {e}") from None
    return t


# --- per-message conversions ------------------------------------------------------------------


def _estimates_to_pb(x: DeviceEstimates) -> pb.DeviceEstimates:
    return pb.DeviceEstimates(
        bandwidth_mbps=x.bandwidth_mbps,
        rtt_ms=x.rtt_ms,
        battery_fraction=x.battery_fraction,
        on_battery=x.on_battery,
        radio=_RADIO.to_wire[x.radio],
    )


def _estimates_from_pb(msg: pb.DeviceEstimates, path: str = "DeviceEstimates") -> DeviceEstimates:
    return _build(
        path,
        DeviceEstimates,
        bandwidth_mbps=msg.bandwidth_mbps,
        rtt_ms=msg.rtt_ms,
        battery_fraction=msg.battery_fraction,
        on_battery=msg.on_battery,
        radio=_RADIO.decode(f"{path}.radio", msg.radio),
    )


def _request_to_pb(x: OffloadRequest) -> pb.OffloadRequest:
    return pb.OffloadRequest(
        window_id=x.window_id,
        model=x.model,
        cut=x.cut,
        device_id=x.device_id,
        device_class=x.device_class,
        estimates=None if x.estimates is None else _estimates_to_pb(x.estimates),
        plan_version=x.plan_version,
        activation=tensor_to_pb(x.activation),
        sent_unix_ms=x.sent_unix_ms,
        deadline_ms=x.deadline_ms,
        extra_models=list(x.extra_models),
    )


def _request_from_pb(msg: pb.OffloadRequest, path: str = "OffloadRequest") -> OffloadRequest:
    return _build(
        path,
        OffloadRequest,
        window_id=msg.window_id,
        model=msg.model,
        cut=msg.cut,
        device_id=msg.device_id,
        device_class=msg.device_class,
        estimates=_optional(path, msg, "estimates", _estimates_from_pb),
        plan_version=msg.plan_version,
        activation=tensor_from_pb(_required(path, msg, "activation"), f"{path}.activation"),
        sent_unix_ms=msg.sent_unix_ms,
        deadline_ms=msg.deadline_ms,
        extra_models=tuple(msg.extra_models),
    )


def _timing_to_pb(x: Timing) -> pb.Timing:
    return pb.Timing(queue_ms=x.queue_ms, compute_ms=x.compute_ms, batch_size=x.batch_size)


def _timing_from_pb(msg: pb.Timing, path: str = "Timing") -> Timing:
    return _build(path, Timing, queue_ms=msg.queue_ms, compute_ms=msg.compute_ms, batch_size=msg.batch_size)


def _response_to_pb(x: OffloadResponse) -> pb.OffloadResponse:
    return pb.OffloadResponse(
        window_id=x.window_id,
        logits=list(x.logits),
        prediction=x.prediction,
        timing=_timing_to_pb(x.timing),
        task_results=[
            pb.TaskResult(model=t.model, logits=list(t.logits), prediction=t.prediction) for t in x.task_results
        ],
    )


def _response_from_pb(msg: pb.OffloadResponse, path: str = "OffloadResponse") -> OffloadResponse:
    return _build(
        path,
        OffloadResponse,
        window_id=msg.window_id,
        logits=tuple(msg.logits),
        prediction=msg.prediction,
        timing=_timing_from_pb(_required(path, msg, "timing"), f"{path}.timing"),
        task_results=tuple(
            _build(
                f"{path}.task_results[{i}]", TaskResult, model=t.model, logits=tuple(t.logits), prediction=t.prediction
            )
            for i, t in enumerate(msg.task_results)
        ),
    )


def _observation_to_pb(x: TelemetryObservation) -> pb.TelemetryObservation:
    return pb.TelemetryObservation(
        model=x.model,
        cut=x.cut,
        mode=_MODE.to_wire[x.mode],
        window_count=x.window_count,
        front_ms_total=x.front_ms_total,
        stage_ms_total=list(x.stage_ms_total),
        latency_ms_total=x.latency_ms_total,
        bytes_sent=x.bytes_sent,
        energy_mj=x.energy_mj,
        failure_count=x.failure_count,
        fallback_kinds=dict(x.fallback_kinds),
    )


def _observation_from_pb(msg: pb.TelemetryObservation, path: str = "TelemetryObservation") -> TelemetryObservation:
    return _build(
        path,
        TelemetryObservation,
        model=msg.model,
        cut=msg.cut,
        mode=_MODE.decode(f"{path}.mode", msg.mode),
        window_count=msg.window_count,
        front_ms_total=msg.front_ms_total,
        stage_ms_total=tuple(msg.stage_ms_total),
        latency_ms_total=msg.latency_ms_total,
        bytes_sent=msg.bytes_sent,
        energy_mj=msg.energy_mj,
        failure_count=msg.failure_count,
        fallback_kinds=tuple(msg.fallback_kinds.items()),
    )


def _held_to_pb(x: HeldFronts) -> pb.HeldFronts:
    return pb.HeldFronts(model=x.model, fronts=[pb.FrontRef(cut=k, compression_energy_kept=lv) for k, lv in x.fronts])


def _held_from_pb(msg: pb.HeldFronts, path: str = "HeldFronts") -> HeldFronts:
    if len(msg.fronts) > MAX_FRONTS_PER_MODEL:  # before building a tuple of a huge list
        raise WireError(f"{path}.fronts: expected at most {MAX_FRONTS_PER_MODEL} fronts, got {len(msg.fronts)}")
    return _build(
        path, HeldFronts, model=msg.model, fronts=tuple((f.cut, f.compression_energy_kept) for f in msg.fronts)
    )


def _report_to_pb(x: TelemetryReport) -> pb.ReportTelemetryRequest:
    return pb.ReportTelemetryRequest(
        device_id=x.device_id,
        device_class=x.device_class,
        estimates=None if x.estimates is None else _estimates_to_pb(x.estimates),
        plan_version=x.plan_version,
        period_start_unix_ms=x.period_start_unix_ms,
        period_end_unix_ms=x.period_end_unix_ms,
        observations=[_observation_to_pb(o) for o in x.observations],
        held_fronts=[_held_to_pb_shared(h) for h in x.held_fronts],
    )


def _ack_to_pb(x: TelemetryAck) -> pb.ReportTelemetryResponse:
    return pb.ReportTelemetryResponse(plan_version=x.plan_version, handling_ms=x.handling_ms)


def _ack_from_pb(msg: pb.ReportTelemetryResponse, path: str = "ReportTelemetryResponse") -> TelemetryAck:
    handling = msg.handling_ms if msg.HasField("handling_ms") else None
    return _build(path, TelemetryAck, plan_version=msg.plan_version, handling_ms=handling)


# A device's held fronts are the same in every report it sends (~20 pairs, a FrontRef each):
# their message is built once per HeldFronts value and copied into each report's repeated field
# (the constructor copies it; the shared one is never handed out).
_held_to_pb_shared = functools.lru_cache(maxsize=4096)(_held_to_pb)


def _report_from_pb(msg: pb.ReportTelemetryRequest, path: str = "ReportTelemetryRequest") -> TelemetryReport:
    return _build(
        path,
        TelemetryReport,
        device_id=msg.device_id,
        device_class=msg.device_class,
        estimates=_optional(path, msg, "estimates", _estimates_from_pb),
        plan_version=msg.plan_version,
        period_start_unix_ms=msg.period_start_unix_ms,
        period_end_unix_ms=msg.period_end_unix_ms,
        observations=tuple(
            _observation_from_pb(o, f"{path}.observations[{i}]") for i, o in enumerate(msg.observations)
        ),
        held_fronts=_held_list_from_pb(msg, path),
    )


def _held_list_from_pb(msg: pb.ReportTelemetryRequest, path: str) -> tuple[HeldFronts, ...]:
    if len(msg.held_fronts) > MAX_HELD_MODELS:
        raise WireError(f"{path}.held_fronts: expected at most {MAX_HELD_MODELS} models, got {len(msg.held_fronts)}")
    return tuple(_held_from_pb(h, f"{path}.held_fronts[{i}]") for i, h in enumerate(msg.held_fronts))


def _row_to_pb(x: PlanRow) -> pb.PlanRow:
    return pb.PlanRow(
        min_bandwidth_mbps=x.min_bandwidth_mbps,
        max_bandwidth_mbps=x.max_bandwidth_mbps,
        battery=_BATTERY.to_wire[x.battery],
        cut=x.cut,
        compression_energy_kept=x.compression_energy_kept,
        codec=_CODEC.to_wire[x.codec],
        reason=x.reason,
        predicted_latency_ms=x.predicted_latency_ms,
        predicted_energy_mj=x.predicted_energy_mj,
    )


def _row_from_pb(msg: pb.PlanRow, path: str = "PlanRow") -> PlanRow:
    return _build(
        path,
        PlanRow,
        min_bandwidth_mbps=msg.min_bandwidth_mbps,
        max_bandwidth_mbps=msg.max_bandwidth_mbps,
        battery=_BATTERY.decode(f"{path}.battery", msg.battery),
        cut=msg.cut,
        compression_energy_kept=msg.compression_energy_kept,
        codec=_CODEC.decode(f"{path}.codec", msg.codec),
        reason=msg.reason,
        predicted_latency_ms=msg.predicted_latency_ms,
        predicted_energy_mj=msg.predicted_energy_mj,
    )


def _plan_to_pb(x: Plan) -> pb.Plan:
    return pb.Plan(
        model=x.model,
        device_class=x.device_class,
        rows=[_row_to_pb(r) for r in x.rows],
        objective=_OBJECTIVE.to_wire[x.objective],
    )


def _plan_from_pb(msg: pb.Plan, path: str = "Plan") -> Plan:
    return _build(
        path,
        Plan,
        model=msg.model,
        device_class=msg.device_class,
        rows=tuple(_row_from_pb(r, f"{path}.rows[{i}]") for i, r in enumerate(msg.rows)),
        objective=_OBJECTIVE.decode(f"{path}.objective", msg.objective),
    )


def _plan_set_to_pb(x: PlanSet) -> pb.PlanSet:
    return pb.PlanSet(
        version=x.version,
        plans=[_plan_to_pb(p) for p in x.plans],
        created_unix_ms=x.created_unix_ms,
        reason=x.reason,
    )


def _plan_set_from_pb(msg: pb.PlanSet, path: str = "PlanSet") -> PlanSet:
    return _build(
        path,
        PlanSet,
        version=msg.version,
        plans=tuple(_plan_from_pb(p, f"{path}.plans[{i}]") for i, p in enumerate(msg.plans)),
        created_unix_ms=msg.created_unix_ms,
        reason=msg.reason,
    )


def plan_request_from_pb(msg: pb.GetPlanRequest | pb.WatchPlanRequest) -> PlanRequest:
    """The PlanRequest of a GetPlanRequest or WatchPlanRequest; WireError naming the field."""
    if not isinstance(msg, (pb.GetPlanRequest, pb.WatchPlanRequest)):
        got = type(msg).__name__
        raise WireError(f"expected a splitsense.v1.GetPlanRequest or WatchPlanRequest message, got {got}")
    return _build(
        type(msg).__name__,
        PlanRequest,
        device_class=msg.device_class,
        models=tuple(msg.models),
        known_version=msg.known_version,
    )


# --- streams ----------------------------------------------------------------------------------


def stream_request_to_pb(x: OffloadRequest) -> pb.OffloadStreamRequest:
    return pb.OffloadStreamRequest(request=to_pb(x))


def stream_request_from_pb(msg: pb.OffloadStreamRequest) -> OffloadRequest:
    _expect(msg, pb.OffloadStreamRequest)
    path = "OffloadStreamRequest"
    return _request_from_pb(_required(path, msg, "request"), f"{path}.request")


def stream_response_to_pb(x: OffloadResponse | WindowError) -> pb.OffloadStreamResponse:
    """One answer on an OffloadStream: the result, or the error of that one window."""
    if isinstance(x, OffloadResponse):
        return pb.OffloadStreamResponse(window_id=x.window_id, result=_response_to_pb(x))
    if isinstance(x, WindowError):
        err = pb.WindowError(code=x.code, message=x.message, retry_after_ms=x.retry_after_ms)
        return pb.OffloadStreamResponse(window_id=x.window_id, error=err)
    raise WireError(f"OffloadStreamResponse: expected an OffloadResponse or WindowError, got {type(x).__name__}")


def stream_response_from_pb(msg: pb.OffloadStreamResponse) -> OffloadResponse | WindowError:
    _expect(msg, pb.OffloadStreamResponse)
    path = "OffloadStreamResponse"
    if not msg.window_id:
        raise WireError(f"{path}.window_id: expected a non-empty string, got ''")
    which = msg.WhichOneof("outcome")
    if which == "result":
        result = _response_from_pb(msg.result, f"{path}.result")
        if result.window_id != msg.window_id:
            raise WireError(
                f"{path}.result.window_id: expected the stream entry's window id "
                f"{msg.window_id!r}, got {result.window_id!r}"
            )
        return result
    if which == "error":
        e = msg.error
        return _build(
            f"{path}.error",
            WindowError,
            window_id=msg.window_id,
            code=e.code,
            message=e.message,
            retry_after_ms=e.retry_after_ms,
        )
    raise WireError(f"{path}.outcome: expected a result or an error, got neither")


# --- the generic pair -------------------------------------------------------------------------

_TO_PB: dict[type, Callable[[Any], Any]] = {
    EncodedTensor: tensor_to_pb,
    DeviceEstimates: _estimates_to_pb,
    OffloadRequest: _request_to_pb,
    Timing: _timing_to_pb,
    OffloadResponse: _response_to_pb,
    TelemetryObservation: _observation_to_pb,
    HeldFronts: _held_to_pb,
    TelemetryReport: _report_to_pb,
    TelemetryAck: _ack_to_pb,
    PlanRow: _row_to_pb,
    Plan: _plan_to_pb,
    PlanSet: _plan_set_to_pb,
}

_FROM_PB: dict[type, Callable[[Any], Any]] = {
    pb.Tensor: tensor_from_pb,
    pb.DeviceEstimates: _estimates_from_pb,
    pb.OffloadRequest: _request_from_pb,
    pb.Timing: _timing_from_pb,
    pb.OffloadResponse: _response_from_pb,
    pb.TelemetryObservation: _observation_from_pb,
    pb.HeldFronts: _held_from_pb,
    pb.ReportTelemetryRequest: _report_from_pb,
    pb.ReportTelemetryResponse: _ack_from_pb,
    pb.PlanRow: _row_from_pb,
    pb.Plan: _plan_from_pb,
    pb.PlanSet: _plan_set_from_pb,
}


@overload
def to_pb(x: EncodedTensor) -> pb.Tensor: ...
@overload
def to_pb(x: DeviceEstimates) -> pb.DeviceEstimates: ...
@overload
def to_pb(x: OffloadRequest) -> pb.OffloadRequest: ...
@overload
def to_pb(x: Timing) -> pb.Timing: ...
@overload
def to_pb(x: OffloadResponse) -> pb.OffloadResponse: ...
@overload
def to_pb(x: TelemetryObservation) -> pb.TelemetryObservation: ...
@overload
def to_pb(x: HeldFronts) -> pb.HeldFronts: ...
@overload
def to_pb(x: TelemetryReport) -> pb.ReportTelemetryRequest: ...
@overload
def to_pb(x: TelemetryAck) -> pb.ReportTelemetryResponse: ...
@overload
def to_pb(x: PlanRow) -> pb.PlanRow: ...
@overload
def to_pb(x: Plan) -> pb.Plan: ...
@overload
def to_pb(x: PlanSet) -> pb.PlanSet: ...
def to_pb(x: Any) -> Any:
    """The wire message of one of our dataclasses (see the table in the module docstring)."""
    convert = _TO_PB.get(type(x))
    if convert is None:
        raise WireError(f"to_pb: no wire message for {type(x).__name__}; known: {_names(_TO_PB)}")
    return convert(x)


@overload
def from_pb(msg: pb.Tensor) -> EncodedTensor: ...
@overload
def from_pb(msg: pb.DeviceEstimates) -> DeviceEstimates: ...
@overload
def from_pb(msg: pb.OffloadRequest) -> OffloadRequest: ...
@overload
def from_pb(msg: pb.Timing) -> Timing: ...
@overload
def from_pb(msg: pb.OffloadResponse) -> OffloadResponse: ...
@overload
def from_pb(msg: pb.TelemetryObservation) -> TelemetryObservation: ...
@overload
def from_pb(msg: pb.HeldFronts) -> HeldFronts: ...
@overload
def from_pb(msg: pb.ReportTelemetryRequest) -> TelemetryReport: ...
@overload
def from_pb(msg: pb.ReportTelemetryResponse) -> TelemetryAck: ...
@overload
def from_pb(msg: pb.PlanRow) -> PlanRow: ...
@overload
def from_pb(msg: pb.Plan) -> Plan: ...
@overload
def from_pb(msg: pb.PlanSet) -> PlanSet: ...
def from_pb(msg: Any) -> Any:
    """Our dataclass of a wire message; WireError naming the field if the message is malformed."""
    convert = _FROM_PB.get(type(msg))
    if convert is None:
        raise WireError(f"from_pb: no dataclass for {type(msg).__name__}; known: {_names(_FROM_PB)}")
    return convert(msg)


def _names(table: Mapping[type, Any]) -> str:
    return ", ".join(t.__name__ for t in table)
