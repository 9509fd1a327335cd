"""Offloading plans: what the controller decides and what a device looks up for every window.

    PlanSet     one publication of the controller: a version, a reason, one Plan per (model, class)
    └── Plan    the table of one model for one device class, and the objective it minimised
        └── PlanRow   one (bandwidth bucket, battery state) -> (cut, compression, codec), with why

For each battery state a plan has rows, their bandwidth buckets are half-open `[min, max)` and
cover `[0, +inf)` without gaps or overlaps; the last bucket is open-ended (`max = math.inf`, written
`null` in JSON). NORMAL rows are required; LOW rows are optional, and a plan without them uses its
NORMAL rows for a low battery too.

This module is pure: no gRPC, no Redis. `splitsense.wire` converts these to and from the wire,
`to_dict`/`from_dict` (and `to_json`/`from_json`) to and from the plan store. Everything is checked
when built; a bad plan raises PlanError naming the field and what was expected.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from splitsense.errors import PlanError
from splitsense.kinds import Codec

__all__ = [
    "BatteryState",
    "Objective",
    "Plan",
    "PlanRow",
    "PlanSet",
    "battery_state",
]


class BatteryState(StrEnum):
    """Which rows of a plan apply: NORMAL (mains power or enough charge) or LOW."""

    NORMAL = "normal"
    LOW = "low"


class Objective(StrEnum):
    """What the controller minimised for a plan."""

    LATENCY = "latency"
    ENERGY = "energy"


def battery_state(battery_fraction: float, low_battery_threshold: float, *, on_battery: bool = True) -> BatteryState:
    """LOW when the device runs on its battery and has strictly less than the threshold left."""
    _check_fraction("low_battery_threshold", low_battery_threshold)
    if not on_battery:
        return BatteryState.NORMAL
    _check_fraction("battery_fraction", battery_fraction)
    return BatteryState.LOW if battery_fraction < low_battery_threshold else BatteryState.NORMAL


@dataclass(frozen=True, kw_only=True)
class PlanRow:
    """What a device does while its bandwidth is in `[min_bandwidth_mbps, max_bandwidth_mbps)`
    and its battery is in state `battery`.

    `cut` k runs stages [0, k) on the device (k = N is fully local), `compression_energy_kept` is
    the fraction of singular-value energy the compressed front keeps (1.0: uncompressed), `codec`
    encodes the activation. `reason` says why, with the inputs used; the predictions are the cost
    model's for one window.
    """

    min_bandwidth_mbps: float
    max_bandwidth_mbps: float
    battery: BatteryState
    cut: int
    codec: Codec
    reason: str
    predicted_latency_ms: float
    predicted_energy_mj: float
    compression_energy_kept: float = 1.0

    def __post_init__(self) -> None:
        lo = _number("PlanRow.min_bandwidth_mbps", self.min_bandwidth_mbps)
        hi = _number("PlanRow.max_bandwidth_mbps", self.max_bandwidth_mbps, allow_inf=True)
        if lo < 0:
            raise PlanError(f"PlanRow.min_bandwidth_mbps must be >= 0, got {lo!r}")
        if not hi > lo:
            raise PlanError(
                f"PlanRow.max_bandwidth_mbps must be > min_bandwidth_mbps, got [{lo!r}, {hi!r}); "
                "use math.inf for the last, open-ended bucket"
            )
        object.__setattr__(self, "min_bandwidth_mbps", lo)
        object.__setattr__(self, "max_bandwidth_mbps", hi)
        object.__setattr__(self, "battery", _enum("PlanRow.battery", BatteryState, self.battery))
        if isinstance(self.cut, bool) or not isinstance(self.cut, int) or self.cut < 0:
            raise PlanError(f"PlanRow.cut must be an int >= 0, got {self.cut!r}")
        object.__setattr__(self, "codec", _enum("PlanRow.codec", Codec, self.codec))
        if not isinstance(self.reason, str) or not self.reason.strip():
            raise PlanError("PlanRow.reason must be a non-empty string saying why the row was chosen")
        kept = _number("PlanRow.compression_energy_kept", self.compression_energy_kept)
        if not 0 < kept <= 1:
            raise PlanError(f"PlanRow.compression_energy_kept must be in (0, 1] (1.0 = uncompressed), got {kept!r}")
        object.__setattr__(self, "compression_energy_kept", kept)
        for name in ("predicted_latency_ms", "predicted_energy_mj"):
            value = _number(f"PlanRow.{name}", getattr(self, name))
            if value < 0:
                raise PlanError(f"PlanRow.{name} must be >= 0, got {value!r}")
            object.__setattr__(self, name, value)

    def contains(self, bandwidth_mbps: float) -> bool:
        """Whether the bandwidth falls in this row's half-open bucket."""
        return self.min_bandwidth_mbps <= bandwidth_mbps < self.max_bandwidth_mbps

    def to_dict(self) -> dict[str, Any]:
        return {
            "min_bandwidth_mbps": self.min_bandwidth_mbps,
            "max_bandwidth_mbps": None if math.isinf(self.max_bandwidth_mbps) else self.max_bandwidth_mbps,
            "battery": self.battery.value,
            "cut": self.cut,
            "compression_energy_kept": self.compression_energy_kept,
            "codec": self.codec.value,
            "reason": self.reason,
            "predicted_latency_ms": self.predicted_latency_ms,
            "predicted_energy_mj": self.predicted_energy_mj,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PlanRow:
        d = _keys("PlanRow", data, _ROW_KEYS, optional={"compression_energy_kept"})
        if d["max_bandwidth_mbps"] is None:
            d["max_bandwidth_mbps"] = math.inf
        return cls(**d)


_ROW_KEYS = frozenset(
    {
        "min_bandwidth_mbps",
        "max_bandwidth_mbps",
        "battery",
        "cut",
        "compression_energy_kept",
        "codec",
        "reason",
        "predicted_latency_ms",
        "predicted_energy_mj",
    }
)


@dataclass(frozen=True)
class Plan:
    """The table one device class uses for one model.

    Rows are kept sorted by battery state (NORMAL first), then by bandwidth.
    """

    model: str
    device_class: str
    rows: tuple[PlanRow, ...]
    objective: Objective
    _by_state: dict[BatteryState, tuple[PlanRow, ...]] = field(
        init=False, repr=False, compare=False, hash=False, default_factory=dict
    )

    def __post_init__(self) -> None:
        _name("Plan.model", self.model)
        _name("Plan.device_class", self.device_class)
        object.__setattr__(self, "objective", _enum("Plan.objective", Objective, self.objective))
        rows = tuple(self.rows)
        for i, row in enumerate(rows):
            if not isinstance(row, PlanRow):
                raise PlanError(f"Plan.rows[{i}] must be a PlanRow, got {type(row).__name__}")
        where = f"plan of model {self.model!r} for device class {self.device_class!r}"
        by_state: dict[BatteryState, tuple[PlanRow, ...]] = {}
        for state in BatteryState:
            mine = tuple(sorted((r for r in rows if r.battery is state), key=lambda r: r.min_bandwidth_mbps))
            if mine:
                _check_tiling(mine, f"{where}, battery {state.value}")
                by_state[state] = mine
        if BatteryState.NORMAL not in by_state:
            raise PlanError(f"{where} has no rows for battery state 'normal'; every plan needs them")
        object.__setattr__(self, "rows", tuple(r for state in by_state for r in by_state[state]))
        object.__setattr__(self, "_by_state", by_state)

    def rows_for(self, state: BatteryState) -> tuple[PlanRow, ...]:
        """The rows that apply in this battery state (NORMAL's when the plan has none for LOW)."""
        return self._by_state.get(state) or self._by_state[BatteryState.NORMAL]

    def lookup(
        self,
        bandwidth_mbps: float,
        battery_fraction: float,
        low_battery_threshold: float,
        *,
        on_battery: bool = True,
    ) -> PlanRow:
        """The row for a device's live estimates.

        Buckets are half-open `[min, max)`, so a bandwidth exactly on an edge takes the upper
        bucket; anything at or above the last bucket's min (infinity included) takes the last one.
        The battery is LOW when on battery with strictly less than `low_battery_threshold` left.
        """
        bw = _number("bandwidth_mbps", bandwidth_mbps, allow_inf=True)
        if bw < 0:
            raise PlanError(f"bandwidth_mbps must be >= 0, got {bw!r}")
        rows = self.rows_for(battery_state(battery_fraction, low_battery_threshold, on_battery=on_battery))
        for row in rows:
            if row.contains(bw):
                return row
        return rows[-1]  # only reached for bw = +inf: the last bucket is open-ended

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "device_class": self.device_class,
            "objective": self.objective.value,
            "rows": [r.to_dict() for r in self.rows],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Plan:
        d = _keys("Plan", data, frozenset({"model", "device_class", "objective", "rows"}))
        rows = _list("Plan.rows", d["rows"])
        return cls(
            model=d["model"],
            device_class=d["device_class"],
            rows=tuple(PlanRow.from_dict(_mapping(f"Plan.rows[{i}]", r)) for i, r in enumerate(rows)),
            objective=d["objective"],
        )


@dataclass(frozen=True)
class PlanSet:
    """One publication of the controller: every plan, under one increasing version (>= 1)."""

    version: int
    plans: tuple[Plan, ...]
    created_unix_ms: int
    reason: str

    def __post_init__(self) -> None:
        if isinstance(self.version, bool) or not isinstance(self.version, int) or self.version < 1:
            raise PlanError(f"PlanSet.version must be an int >= 1, got {self.version!r}")
        if (
            isinstance(self.created_unix_ms, bool)
            or not isinstance(self.created_unix_ms, int)
            or self.created_unix_ms < 0
        ):
            raise PlanError(f"PlanSet.created_unix_ms must be an int >= 0, got {self.created_unix_ms!r}")
        if not isinstance(self.reason, str) or not self.reason.strip():
            raise PlanError("PlanSet.reason must be a non-empty string saying why the set was published")
        plans = tuple(self.plans)
        seen: set[tuple[str, str]] = set()
        for i, plan in enumerate(plans):
            if not isinstance(plan, Plan):
                raise PlanError(f"PlanSet.plans[{i}] must be a Plan, got {type(plan).__name__}")
            key = (plan.model, plan.device_class)
            if key in seen:
                raise PlanError(
                    f"PlanSet.plans[{i}]: a second plan for model {plan.model!r} and device class "
                    f"{plan.device_class!r}; keep one plan per (model, device class)"
                )
            seen.add(key)
        object.__setattr__(self, "plans", plans)

    def get(self, model: str, device_class: str) -> Plan | None:
        """The plan of this model for this device class, or None."""
        for plan in self.plans:
            if plan.model == model and plan.device_class == device_class:
                return plan
        return None

    def select(self, device_class: str, models: Iterable[str] = ()) -> PlanSet:
        """The same set (version, time, reason) cut down to one device class and these models
        (all models when none are given): what GetPlan and WatchPlan send to a device."""
        wanted = set(models)
        return PlanSet(
            version=self.version,
            plans=tuple(p for p in self.plans if p.device_class == device_class and (not wanted or p.model in wanted)),
            created_unix_ms=self.created_unix_ms,
            reason=self.reason,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "created_unix_ms": self.created_unix_ms,
            "reason": self.reason,
            "plans": [p.to_dict() for p in self.plans],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PlanSet:
        d = _keys("PlanSet", data, frozenset({"version", "created_unix_ms", "reason", "plans"}))
        plans = _list("PlanSet.plans", d["plans"])
        return cls(
            version=d["version"],
            plans=tuple(Plan.from_dict(_mapping(f"PlanSet.plans[{i}]", p)) for i, p in enumerate(plans)),
            created_unix_ms=d["created_unix_ms"],
            reason=d["reason"],
        )

    def to_json(self) -> str:
        """Strict JSON (no NaN/Infinity): the open-ended bucket edge is written as null."""
        return json.dumps(self.to_dict(), allow_nan=False, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> PlanSet:
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise PlanError(f"plan set is not valid JSON: {e}") from None
        return cls.from_dict(_mapping("PlanSet", data))


def _check_tiling(rows: tuple[PlanRow, ...], where: str) -> None:
    """Rows sorted by min must tile [0, +inf): start at 0, each max is the next min, end open."""
    if rows[0].min_bandwidth_mbps != 0:
        raise PlanError(f"{where}: the first bucket must start at 0 Mbit/s, got {rows[0].min_bandwidth_mbps!r}")
    for a, b in zip(rows, rows[1:], strict=False):
        if a.max_bandwidth_mbps != b.min_bandwidth_mbps:
            kind = "overlap" if a.max_bandwidth_mbps > b.min_bandwidth_mbps else "leave a gap"
            raise PlanError(
                f"{where}: buckets [{a.min_bandwidth_mbps}, {a.max_bandwidth_mbps}) and "
                f"[{b.min_bandwidth_mbps}, {b.max_bandwidth_mbps}) {kind}; each max must equal the next min"
            )
    if not math.isinf(rows[-1].max_bandwidth_mbps):
        raise PlanError(
            f"{where}: the last bucket must be open-ended (max_bandwidth_mbps = inf), "
            f"got {rows[-1].max_bandwidth_mbps!r}"
        )


def _check_fraction(name: str, value: float) -> None:
    if not 0 <= _number(name, value) <= 1:
        raise PlanError(f"{name} must be in [0, 1], got {value!r}")


def _number(name: str, value: Any, *, allow_inf: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PlanError(f"{name} must be a number, got {value!r}")
    v = float(value)
    if math.isnan(v) or (math.isinf(v) and not (allow_inf and v > 0)):
        raise PlanError(f"{name} must be a finite number, got {value!r}")
    return v


def _enum(name: str, cls: type[Any], value: Any) -> Any:
    if isinstance(value, cls):
        return value
    try:
        return cls(value)
    except ValueError:
        valid = ", ".join(repr(m.value) for m in cls)
        raise PlanError(f"{name} must be one of {valid}, got {value!r}") from None


def _name(name: str, value: Any) -> None:
    if not isinstance(value, str) or not value:
        raise PlanError(f"{name} must be a non-empty string, got {value!r}")


def _mapping(name: str, value: Any) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise PlanError(f"{name} must be a JSON object, got {type(value).__name__}")
    return value


def _list(name: str, value: Any) -> list[Any]:
    if not isinstance(value, (list, tuple)):
        raise PlanError(f"{name} must be a JSON array, got {type(value).__name__}")
    return list(value)


def _keys(
    name: str,
    data: Mapping[str, Any],
    keys: frozenset[str],
    optional: frozenset[str] | set[str] = frozenset(),
) -> dict[str, Any]:
    data = _mapping(name, data)
    unknown = set(data) - keys
    if unknown:
        raise PlanError(f"{name} has unknown keys {sorted(unknown)}; known: {sorted(keys)}")
    missing = keys - set(optional) - set(data)
    if missing:
        raise PlanError(f"{name} is missing keys {sorted(missing)}")
    return dict(data)
