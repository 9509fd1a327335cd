"""The cost model: what one window costs a device class under every (cut, level, codec) choice.

Pure: numbers in, numbers out (no clock, no I/O). For a model's catalog (pipelines.catalog), a
device class, a link and the cloud's state it predicts, per choice ``Choice(cut k, compression
level, codec)``:

    device_ms    the window's preprocessing, paid at every cut (k = 0 included), plus the front
                 [0, k) compressed at `level`, on the device. Preprocessing (``device_prep_ms``): the
                 catalog's `prep_ops` at the class's `macs_per_s` when it has one, else its host
                 `prep_ms` x the class's `speed_factor`, the basis of the stages' profile (telemetry
                 reports stages only). Per stage: the device's reported latency when telemetry has
                 at least `min_telemetry_samples` samples of that stage, else the stage's MACs at
                 `macs_per_s` or its host profile x `speed_factor`. Telemetry is of the uncompressed
                 stages; a compressed front is scaled by the host's measured ratio (compressed
                 front / uncompressed front at the same cut).
    transfer_ms  for k < N: radio promotion (only when the radio dropped to idle since the previous
                 window) + activation bytes (codec) / uplink + RTT + result bytes (fp32 logits) /
                 downlink. 0 for k = N (nothing crosses). Encoding time is not modelled.
    cloud_ms     for k < N: the tail [k, N) uncompressed (per-stage cloud latency the broker
                 reports, or host profile / `speedup_vs_host`) + the queueing the broker reports +
                 a fixed per-request serving overhead. 0 for k = N.
    energy_mj    device compute (active_mw x device time, preprocessing included) + radio energy +
                 waiting for the answer (idle_mw x (RTT + cloud time)), in mJ (mW x s). The
                 breakdown gives the preprocessing's share: `prep_device_ms` and `prep_mj`.
    accuracy     base + (drop of the compressed front at k) + (drop of the codec at k): the two
                 drops are measured separately in the catalog and added.
    fits         whether the device can hold the front [0, k) at `level` in its memory budgets
                 (``pipelines.devices.front_fits``: fp32 weights in storage, peak activation, and
                 weights where they are loaded, in RAM). A profile without budgets holds anything.
                 The grid carries it (``CostGrid.fits``, ``CostGrid.refusal``); the planner never
                 chooses a front that does not fit.
    held         whether every device of the class that says what it holds (telemetry's held
                 fronts: an ONNX Runtime device holds only what its export has) holds the front
                 [0, k) at `level` (``CostGrid.held``, ``CostGrid.missing``). Cut 0 needs no front;
                 held fronts unknown (None) hold everything. The planner names only held fronts.

Radio energy uses the published power model of pipelines.power (Huang et al., MobiSys 2012,
Tables 3 and 4; the constants live there and are read from its RadioPowerModel, never copied):
``alpha_u*Mbit_up + alpha_d*Mbit_down + beta*(t_up + t_down)`` while transferring, plus the tail
of the previous window's transfer over the gap between the two, plus a promotion when that gap
was longer than the whole tail. The model assumes the steady state of a row: the device offloads
every window, one window every ``catalog.window_s``, so the gap is ``window_s - t_up - t_down``
(at least 0). This is exactly what ``power.transfer_energy_mj`` charges for that gap, and what
``power.RadioEnergyMeter`` charges per transfer for a stream of windows (tested).

``estimate`` computes one choice with plain Python over ``pipelines.power``'s scalar functions;
``estimate_grid`` computes every choice for many links at once with numpy (what the planner uses to
replan a whole fleet in a few ms). Both give the same numbers (tested).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

import numpy as np

from pipelines.catalog import ModelCatalog
from pipelines.devices import DeviceClass, front_fits, stage_device_ms
from pipelines.power import (
    BITS_PER_BYTE,
    Radio,
    RadioPowerModel,
    promotion_delay_s,
    radio_model,
    transfer_energy_mj,
    transfer_seconds,
)
from splitsense.errors import ConfigError
from splitsense.kinds import Codec, parse_codec

__all__ = [
    "Choice",
    "CloudState",
    "CostEstimate",
    "CostGrid",
    "DeviceCostProfile",
    "LinkState",
    "TelemetryStats",
    "choices_of",
    "device_prep_ms",
    "device_stage_ms",
    "front_held",
    "estimate",
    "estimate_grid",
]

_BITS_PER_MBIT = 1e6
_MS_PER_S = 1000.0


def _finite_nonneg(where: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ConfigError(f"{where} must be a finite number >= 0, got {value!r}")
    return float(value)


# ---------------------------------------------------------------------------------------------
# Inputs


@dataclass(frozen=True)
class DeviceCostProfile:
    """What the cost model needs to know about a device class (pipelines.devices has the figures).

    `radio` is a Radio (its published model from pipelines.power) or a RadioPowerModel of your own.
    `ram_bytes`/`storage_bytes` are the class's memory budgets for one model (None: unlimited) and
    `weights_in_ram` whether its runtime loads the weights into RAM (see pipelines.devices).
    """

    name: str
    speed_factor: float  # device time / host time for the same work
    active_mw: float  # whole device while computing
    idle_mw: float  # whole device while waiting (radio excluded)
    radio: Radio | RadioPowerModel
    ram_bytes: int | None = None
    storage_bytes: int | None = None
    weights_in_ram: bool = True
    macs_per_s: float | None = None  # set: a stage takes its MACs at this rate (pipelines.devices)

    @classmethod
    def of(cls, device: DeviceClass) -> DeviceCostProfile:
        """The cost model's view of a device class of pipelines.devices, memory budgets included."""
        return cls(
            device.name,
            device.speed_factor,
            device.active_mw,
            device.idle_mw,
            device.radio,
            ram_bytes=device.ram_bytes,
            storage_bytes=device.storage_bytes,
            weights_in_ram=device.weights_in_ram,
            macs_per_s=device.macs_per_s,
        )

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError("DeviceCostProfile.name must be a non-empty string")
        for budget_name in ("ram_bytes", "storage_bytes"):
            budget = getattr(self, budget_name)
            if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget <= 0):
                raise ConfigError(f"device {self.name!r}: {budget_name} must be an int > 0 or None, got {budget!r}")
        if not _finite_nonneg(f"device {self.name!r}: speed_factor", self.speed_factor) > 0:
            raise ConfigError(f"device {self.name!r}: speed_factor must be > 0")
        _finite_nonneg(f"device {self.name!r}: active_mw", self.active_mw)
        _finite_nonneg(f"device {self.name!r}: idle_mw", self.idle_mw)
        if not isinstance(self.radio, RadioPowerModel):
            try:
                object.__setattr__(self, "radio", Radio(self.radio))
            except ValueError:
                raise ConfigError(f"device {self.name!r}: unknown radio {self.radio!r}") from None

    @property
    def radio_power(self) -> RadioPowerModel:
        return self.radio if isinstance(self.radio, RadioPowerModel) else radio_model(self.radio)

    @property
    def radio_name(self) -> str:
        r = self.radio.radio if isinstance(self.radio, RadioPowerModel) else self.radio
        return r.value


@dataclass(frozen=True)
class LinkState:
    """The device's uplink (and downlink, the uplink's when None) and round-trip time.

    A bandwidth of 0 means nothing gets through: offloading costs infinite time and energy.
    """

    bandwidth_mbps: float
    rtt_ms: float
    downlink_mbps: float | None = None

    def __post_init__(self) -> None:
        _finite_nonneg("LinkState.bandwidth_mbps", self.bandwidth_mbps)
        _finite_nonneg("LinkState.rtt_ms", self.rtt_ms)
        if self.downlink_mbps is not None:
            _finite_nonneg("LinkState.downlink_mbps", self.downlink_mbps)

    @property
    def down_mbps(self) -> float:
        return self.bandwidth_mbps if self.downlink_mbps is None else self.downlink_mbps


@dataclass(frozen=True)
class CloudState:
    """What the broker reports: per-model per-stage cloud latency (when measured), else the host
    profile divided by `speedup_vs_host`; queueing delay; fixed cost of one request (gRPC + Ray hop)."""

    stage_ms: Mapping[str, Sequence[float]] = field(default_factory=dict, hash=False)
    speedup_vs_host: float = 1.0
    queue_ms: float = 0.0
    overhead_ms: float = 0.0

    def __post_init__(self) -> None:
        if not _finite_nonneg("CloudState.speedup_vs_host", self.speedup_vs_host) > 0:
            raise ConfigError("CloudState.speedup_vs_host must be > 0")
        _finite_nonneg("CloudState.queue_ms", self.queue_ms)
        _finite_nonneg("CloudState.overhead_ms", self.overhead_ms)
        frozen = {}
        for model, values in dict(self.stage_ms).items():
            vals = tuple(_finite_nonneg(f"CloudState.stage_ms[{model!r}]", v) for v in values)
            frozen[model] = vals
        object.__setattr__(self, "stage_ms", MappingProxyType(frozen))

    def stage_latency_ms(self, catalog: ModelCatalog) -> tuple[float, ...]:
        measured = self.stage_ms.get(catalog.model)
        if measured is not None:
            if len(measured) != catalog.n_stages:
                raise ConfigError(
                    f"CloudState.stage_ms[{catalog.model!r}] has {len(measured)} stages, the catalog {catalog.n_stages}"
                )
            return tuple(measured)
        return tuple(v / self.speedup_vs_host for v in catalog.stage_latency_ms)

    @property
    def fixed_ms(self) -> float:
        return self.queue_ms + self.overhead_ms


@dataclass(frozen=True)
class TelemetryStats:
    """Per-stage device latency a class reported for one model (uncompressed stages), with the
    number of samples behind each figure; a stage with fewer than the planner's minimum falls
    back to the profile."""

    stage_ms: tuple[float, ...]
    samples: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.stage_ms) != len(self.samples):
            raise ConfigError("TelemetryStats.stage_ms and samples need one entry per stage each")
        object.__setattr__(self, "stage_ms", tuple(_finite_nonneg("TelemetryStats.stage_ms", v) for v in self.stage_ms))
        for s in self.samples:
            if isinstance(s, bool) or not isinstance(s, int) or s < 0:
                raise ConfigError(f"TelemetryStats.samples must hold ints >= 0, got {s!r}")
        object.__setattr__(self, "samples", tuple(self.samples))


@dataclass(frozen=True)
class Choice:
    """Cut k (device runs stages [0, k)), front compression level (energy kept), activation codec."""

    cut: int
    level: float = 1.0
    codec: Codec = Codec.FP32

    def __post_init__(self) -> None:
        if isinstance(self.cut, bool) or not isinstance(self.cut, int) or self.cut < 0:
            raise ConfigError(f"Choice.cut must be an int >= 0, got {self.cut!r}")
        if not 0 < self.level <= 1:
            raise ConfigError(f"Choice.level must be in (0, 1], got {self.level!r}")
        object.__setattr__(self, "level", float(self.level))
        object.__setattr__(self, "codec", parse_codec(self.codec))


@dataclass(frozen=True)
class CostEstimate:
    """One window under one choice. total_ms = device_ms + transfer_ms + cloud_ms."""

    device_ms: float
    transfer_ms: float
    cloud_ms: float
    total_ms: float
    energy_mj: float
    accuracy: float
    breakdown: Mapping[str, float] = field(default_factory=dict, hash=False)


# ---------------------------------------------------------------------------------------------
# Shared pieces


def choices_of(catalog: ModelCatalog, *, local_only: bool = False) -> tuple[Choice, ...]:
    """Every distinct choice, in the planner's tie-break order: cut ascending, then level from
    1.0 down, then codec fp32, fp16, int8. Cut 0 has no front (level 1.0 only); cut N sends
    nothing (fp32 only). `local_only`: cut N only."""
    n = catalog.n_stages
    out = []
    for k in range(n if local_only else 0, n + 1):
        for lvl in catalog.levels if k > 0 else catalog.levels[:1]:
            for c in catalog.codecs if k < n else catalog.codecs[:1]:
                if c.available_at(k):
                    out.append(Choice(k, lvl.energy_kept, c.codec))
    return tuple(out)


def device_prep_ms(catalog: ModelCatalog, device: DeviceCostProfile) -> float:
    """Device time of one window's preprocessing, on the stages' basis (``stage_device_ms``): the
    catalog's `prep_ops` at the class's `macs_per_s` when it has one, else `prep_ms` x `speed_factor`."""
    return stage_device_ms(device, catalog.prep_ops, catalog.prep_ms)


def device_stage_ms(
    catalog: ModelCatalog,
    device: DeviceCostProfile,
    telemetry: TelemetryStats | None = None,
    min_telemetry_samples: int = 30,
) -> tuple[tuple[float, ...], str]:
    """(per-stage device latency, where it came from: 'profile x<speed>' or 'telemetry i/N stages')."""
    profile = [stage_device_ms(device, m, v) for m, v in zip(catalog.stage_macs, catalog.stage_latency_ms, strict=True)]
    src = f"MACs at {device.macs_per_s:.3g}/s" if device.macs_per_s else f"profile x{device.speed_factor:g}"
    if telemetry is None:
        return tuple(profile), src
    if len(telemetry.stage_ms) != catalog.n_stages:
        raise ConfigError(
            f"telemetry of {device.name!r} for {catalog.model!r} has {len(telemetry.stage_ms)} stages, "
            f"the catalog {catalog.n_stages}"
        )
    used = [s >= min_telemetry_samples for s in telemetry.samples]
    out = tuple(t if u else p for t, p, u in zip(telemetry.stage_ms, profile, used, strict=True))
    if not any(used):
        return out, src
    return out, f"telemetry {sum(used)}/{catalog.n_stages} stages"


# ---------------------------------------------------------------------------------------------
# One choice, plain Python


def estimate(
    catalog: ModelCatalog,
    device: DeviceCostProfile,
    link: LinkState,
    cloud: CloudState,
    choice: Choice,
    telemetry: TelemetryStats | None = None,
    *,
    min_telemetry_samples: int = 30,
) -> CostEstimate:
    """The cost of one window under `choice` (see the module docstring)."""
    n = catalog.n_stages
    k = choice.cut
    if k > n:
        raise ConfigError(f"cut {k} is out of range for {catalog.model!r}: expected 0..{n}")
    lvl = catalog.level(choice.level)
    top = catalog.levels[0]
    cod = catalog.codec(choice.codec)
    dev_stage, _ = device_stage_ms(catalog, device, telemetry, min_telemetry_samples)
    host_front = top.front_latency_ms[k]
    ratio = lvl.front_latency_ms[k] / host_front if host_front > 0 else 1.0
    prep_ms = device_prep_ms(catalog, device)
    device_ms = prep_ms + sum(dev_stage[:k]) * ratio
    compute_mj = device.active_mw * device_ms / _MS_PER_S
    accuracy = lvl.accuracy[k] + cod.accuracy[k] - catalog.base_accuracy
    accuracy = min(max(accuracy, 0.0), 1.0)
    breakdown: dict[str, float] = {
        "compute_mj": compute_mj,
        "prep_device_ms": prep_ms,
        "prep_mj": device.active_mw * prep_ms / _MS_PER_S,
        "radio_mj": 0.0,
        "wait_mj": 0.0,
        "promotion_ms": 0.0,
        "upload_ms": 0.0,
        "download_ms": 0.0,
        "rtt_ms": 0.0,
        "cloud_compute_ms": 0.0,
        "queue_ms": 0.0,
        "overhead_ms": 0.0,
        "bytes_up": 0.0,
        "bytes_down": 0.0,
        "radio_gap_s": 0.0,
        "accuracy_loss_points": (catalog.base_accuracy - accuracy) * 100.0,
    }
    if k == n:
        return CostEstimate(device_ms, 0.0, 0.0, device_ms, compute_mj, accuracy, MappingProxyType(breakdown))

    radio = device.radio_power
    up = float(cod.activation_bytes[k])
    down = float(catalog.result_bytes)
    cloud_compute = sum(cloud.stage_latency_ms(catalog)[k:])
    cloud_ms = cloud_compute + cloud.queue_ms + cloud.overhead_ms
    wait_mj = device.idle_mw * (link.rtt_ms + cloud_ms) / _MS_PER_S
    t_up = _seconds(up, link.bandwidth_mbps)
    t_down = _seconds(down, link.down_mbps)
    if math.isinf(t_up) or math.isinf(t_down):
        transfer_ms = radio_mj = math.inf
        gap = promo_s = 0.0
    else:
        gap = max(catalog.window_s - t_up - t_down, 0.0)
        promo_s = promotion_delay_s(radio, gap)
        transfer_ms = (promo_s + t_up + t_down) * _MS_PER_S + link.rtt_ms
        radio_mj = transfer_energy_mj(radio, up, down, link.bandwidth_mbps, link.down_mbps, gap)
    total_ms = device_ms + transfer_ms + cloud_ms
    breakdown.update(
        radio_mj=radio_mj,
        wait_mj=wait_mj,
        promotion_ms=promo_s * _MS_PER_S,
        upload_ms=t_up * _MS_PER_S,
        download_ms=t_down * _MS_PER_S,
        rtt_ms=link.rtt_ms,
        cloud_compute_ms=cloud_compute,
        queue_ms=cloud.queue_ms,
        overhead_ms=cloud.overhead_ms,
        bytes_up=up,
        bytes_down=down,
        radio_gap_s=gap,
    )
    energy = compute_mj + radio_mj + wait_mj
    return CostEstimate(device_ms, transfer_ms, cloud_ms, total_ms, energy, accuracy, MappingProxyType(breakdown))


def _seconds(nbytes: float, mbps: float) -> float:
    if nbytes > 0 and mbps <= 0:
        return math.inf
    return transfer_seconds(nbytes, mbps)


# ---------------------------------------------------------------------------------------------
# Every choice, many links: numpy


@dataclass(frozen=True, eq=False)
class CostGrid:
    """Costs of every choice (axis -1, `choices` order) for every link (axis 0 where present)."""

    catalog: ModelCatalog
    choices: tuple[Choice, ...]
    links: tuple[LinkState, ...]
    device_source: str  # where device latency came from (for reasons)
    cut: np.ndarray  # (M,) int
    device_ms: np.ndarray  # (M,)
    cloud_ms: np.ndarray  # (M,)
    accuracy: np.ndarray  # (M,)
    accuracy_loss_points: np.ndarray  # (M,)
    compute_mj: np.ndarray  # (M,) preprocessing included
    wait_mj: np.ndarray  # (B, M)
    bytes_up: np.ndarray  # (M,)
    bytes_down: np.ndarray  # (M,)
    upload_ms: np.ndarray  # (B, M)
    download_ms: np.ndarray  # (B, M)
    promotion_ms: np.ndarray  # (B, M)
    radio_gap_s: np.ndarray  # (B, M)
    transfer_ms: np.ndarray  # (B, M)
    radio_mj: np.ndarray  # (B, M)
    total_ms: np.ndarray  # (B, M)
    energy_mj: np.ndarray  # (B, M)
    cloud_compute_ms: np.ndarray  # (M,)
    queue_ms: float
    overhead_ms: float
    prep_device_ms: float  # one window's preprocessing on the device, in every choice's device_ms
    prep_mj: float  # its energy, in every choice's compute_mj
    fits: np.ndarray  # (M,) bool: the device can hold the choice's front (memory budgets)
    refusals: Mapping[int, str] = field(default_factory=dict)  # m -> why its front does not fit
    held: np.ndarray | None = None  # (M,) bool: every reporting device holds the choice's front
    missing: Mapping[int, str] = field(default_factory=dict)  # m -> which front is not held
    _index: dict[tuple[int, float, Codec], int] = field(default_factory=dict, repr=False)

    def index(self, choice: Choice) -> int | None:
        """Position of `choice` in this grid, or None when it is not one of its choices."""
        return self._index.get((choice.cut, choice.level, choice.codec))

    def refusal(self, m: int) -> str | None:
        """Why choice m's front does not fit the device's memory (None: it fits)."""
        return self.refusals.get(m)

    @property
    def held_mask(self) -> np.ndarray:
        """(M,) bool: the class's devices hold the choice's front (all True when unknown)."""
        return self.held if self.held is not None else np.ones(len(self.choices), dtype=bool)

    def estimate(self, b: int, m: int) -> CostEstimate:
        """The CostEstimate of choice m on link b (same numbers as `estimate`)."""
        offload = self.cut[m] < self.catalog.n_stages
        breakdown = {
            "compute_mj": float(self.compute_mj[m]),
            "prep_device_ms": self.prep_device_ms,
            "prep_mj": self.prep_mj,
            "radio_mj": float(self.radio_mj[b, m]),
            "wait_mj": float(self.wait_mj[b, m]),
            "promotion_ms": float(self.promotion_ms[b, m]),
            "upload_ms": float(self.upload_ms[b, m]),
            "download_ms": float(self.download_ms[b, m]),
            "rtt_ms": self.links[b].rtt_ms if offload else 0.0,
            "cloud_compute_ms": float(self.cloud_compute_ms[m]),
            "queue_ms": self.queue_ms if offload else 0.0,
            "overhead_ms": self.overhead_ms if offload else 0.0,
            "bytes_up": float(self.bytes_up[m]),
            "bytes_down": float(self.bytes_down[m]),
            "radio_gap_s": float(self.radio_gap_s[b, m]),
            "accuracy_loss_points": float(self.accuracy_loss_points[m]),
        }
        return CostEstimate(
            device_ms=float(self.device_ms[m]),
            transfer_ms=float(self.transfer_ms[b, m]),
            cloud_ms=float(self.cloud_ms[m]),
            total_ms=float(self.total_ms[b, m]),
            energy_mj=float(self.energy_mj[b, m]),
            accuracy=float(self.accuracy[m]),
            breakdown=MappingProxyType(breakdown),
        )


_LEVEL_TOL = 1e-6  # a held front's level as the broker's label writes it (%g) matches the catalog's


def front_held(held_fronts: Collection[tuple[int, float]] | None, cut: int, level: float) -> bool:
    """Whether the front of `cut` at `level` is among `held_fronts` (None: unknown, held). Cut 0
    needs no front: always held."""
    if held_fronts is None or cut == 0:
        return True
    return any(k == cut and abs(lv - level) <= _LEVEL_TOL for k, lv in held_fronts)


def _held(
    catalog: ModelCatalog, choices: Sequence[Choice], held_fronts: Collection[tuple[int, float]] | None
) -> tuple[np.ndarray | None, dict[int, str]]:
    """(held mask or None when unknown, {choice index: which front is not held})."""
    if held_fronts is None:
        return None, {}
    fronts = tuple(held_fronts)
    missing: dict[int, str] = {}
    for m, c in enumerate(choices):
        if not front_held(fronts, c.cut, c.level):
            where = "the whole model" if c.cut == catalog.n_stages else f"the front of cut {c.cut}"
            missing[m] = f"{where} at level {c.level:g} is not held by every device of the class"
    held = np.ones(len(choices), dtype=bool)
    if missing:
        held[list(missing)] = False
    return held, missing


def estimate_grid(
    catalog: ModelCatalog,
    device: DeviceCostProfile,
    links: Sequence[LinkState],
    cloud: CloudState,
    telemetry: TelemetryStats | None = None,
    *,
    min_telemetry_samples: int = 30,
    local_only: bool = False,
    held_fronts: Collection[tuple[int, float]] | None = None,
) -> CostGrid:
    """Costs of every choice of `choices_of(catalog, local_only=...)` on every link, vectorised.
    `held_fronts`: the (cut, level) fronts every device of the class holds (None: unknown, all)."""
    links = tuple(links)
    if not links:
        raise ConfigError("estimate_grid needs at least one link")
    n = catalog.n_stages
    choices = choices_of(catalog, local_only=local_only)
    level_pos = {e.energy_kept: i for i, e in enumerate(catalog.levels)}
    codec_pos = {c.codec: i for i, c in enumerate(catalog.codecs)}
    cut = np.fromiter((c.cut for c in choices), dtype=np.int64, count=len(choices))
    li = np.fromiter((level_pos[c.level] for c in choices), dtype=np.int64, count=len(choices))
    ci = np.fromiter((codec_pos[c.codec] for c in choices), dtype=np.int64, count=len(choices))
    offload = cut < n

    # Device compute: the window's preprocessing, then the (compressed) front.
    prep_ms = device_prep_ms(catalog, device)
    dev_stage, source = device_stage_ms(catalog, device, telemetry, min_telemetry_samples)
    dev_cum = np.concatenate(([0.0], np.cumsum(dev_stage)))
    host_front = np.array([e.front_latency_ms for e in catalog.levels])  # (L, N+1)
    top = host_front[0]
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(top > 0, host_front / np.where(top > 0, top, 1.0), 1.0)
    device_ms = prep_ms + dev_cum[cut] * ratio[li, cut]
    compute_mj = device.active_mw * device_ms / _MS_PER_S

    # Cloud tail.
    cloud_stage = np.asarray(cloud.stage_latency_ms(catalog), dtype=np.float64)
    tail = np.concatenate((np.cumsum(cloud_stage[::-1])[::-1], [0.0]))  # tail[k] = sum(stage[k:])
    cloud_compute = np.where(offload, tail[cut], 0.0)
    cloud_ms = np.where(offload, cloud_compute + cloud.queue_ms + cloud.overhead_ms, 0.0)

    # Accuracy.
    lvl_acc = np.array([e.accuracy for e in catalog.levels])
    cod_acc = np.array([c.accuracy for c in catalog.codecs])
    accuracy = np.clip(lvl_acc[li, cut] + cod_acc[ci, cut] - catalog.base_accuracy, 0.0, 1.0)
    loss_points = (catalog.base_accuracy - accuracy) * 100.0

    # Wire and radio, per link.
    act_bytes = np.array([c.activation_bytes for c in catalog.codecs], dtype=np.float64)
    up = act_bytes[ci, cut]  # 0 at cut N
    down = np.where(offload, float(catalog.result_bytes), 0.0)
    bw_up = np.array([ln.bandwidth_mbps for ln in links])[:, None]
    bw_down = np.array([ln.down_mbps for ln in links])[:, None]
    rtt = np.array([ln.rtt_ms for ln in links])[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        t_up = np.where(up > 0, up * BITS_PER_BYTE / (bw_up * _BITS_PER_MBIT), 0.0)
        t_down = np.where(down > 0, down * BITS_PER_BYTE / (bw_down * _BITS_PER_MBIT), 0.0)
    radio = device.radio_power
    on_air = t_up + t_down
    gap = np.where(offload & np.isfinite(on_air), np.maximum(catalog.window_s - on_air, 0.0), 0.0)
    promo_s = np.where(offload & (gap > radio.total_tail_s), radio.promotion_s, 0.0)
    transfer_ms = np.where(offload, (promo_s + t_up + t_down) * _MS_PER_S + rtt, 0.0)
    tail_mj = radio.tail_mw * np.minimum(gap, radio.tail_s) + radio.tail2_mw * np.minimum(
        np.maximum(gap - radio.tail_s, 0.0), radio.tail2_s
    )
    active_mj = (
        radio.uplink_mw_per_mbps * up * BITS_PER_BYTE / _BITS_PER_MBIT
        + radio.downlink_mw_per_mbps * down * BITS_PER_BYTE / _BITS_PER_MBIT
        + radio.base_mw * on_air
    )
    radio_mj = np.where(offload, tail_mj + radio.promotion_mw * promo_s + active_mj, 0.0)
    radio_mj = np.where(offload & ~np.isfinite(on_air), np.inf, radio_mj)
    wait_mj = np.where(offload, device.idle_mw * (rtt + cloud_ms) / _MS_PER_S, 0.0)
    total_ms = device_ms + transfer_ms + cloud_ms
    energy_mj = compute_mj + radio_mj + wait_mj

    # Memory: one check per (cut, level); the codec does not change the front.
    why_by_front: dict[tuple[int, float], str | None] = {}
    refusals: dict[int, str] = {}
    for m, c in enumerate(choices):
        key = (c.cut, c.level)
        if key not in why_by_front:
            why_by_front[key] = front_fits(device, catalog, c.cut, c.level)
        why = why_by_front[key]
        if why is not None:
            refusals[m] = why
    fits = np.ones(len(choices), dtype=bool)
    if refusals:
        fits[list(refusals)] = False
    held, missing = _held(catalog, choices, held_fronts)

    return CostGrid(
        catalog=catalog,
        choices=choices,
        links=links,
        device_source=source,
        cut=cut,
        device_ms=device_ms,
        cloud_ms=cloud_ms,
        accuracy=accuracy,
        accuracy_loss_points=loss_points,
        compute_mj=compute_mj,
        wait_mj=wait_mj,
        bytes_up=up,
        bytes_down=down,
        upload_ms=t_up * _MS_PER_S,
        download_ms=t_down * _MS_PER_S,
        promotion_ms=promo_s * _MS_PER_S,
        radio_gap_s=gap,
        transfer_ms=transfer_ms,
        radio_mj=radio_mj,
        total_ms=total_ms,
        energy_mj=energy_mj,
        cloud_compute_ms=cloud_compute,
        queue_ms=cloud.queue_ms,
        overhead_ms=cloud.overhead_ms,
        prep_device_ms=prep_ms,
        prep_mj=device.active_mw * prep_ms / _MS_PER_S,
        fits=fits,
        refusals=MappingProxyType(refusals),
        held=held,
        missing=MappingProxyType(missing),
        _index={(c.cut, c.level, c.codec): i for i, c in enumerate(choices)},
    )
