"""From a fleet snapshot to the planner's inputs: what the controller makes of its metrics. Pure.

Plans cover every bandwidth bucket and both battery states, so a device's own link and battery
pick its row window by window (`Plan.lookup`); the controller decides the table, from what moves
the cost of the rows:

    RTT               per class: p50 of the devices' own estimates (else their mean, else the last
                      measured value, else the devices' own prior)
    cloud             queueing the broker measured, and its per-request overhead: the measured
                      tail call minus the host profile of that tail (else the last measured values,
                      else one Ray hop, ~8 ms)
    device compute    per (class, model) stage latencies from telemetry; the planner uses a stage
                      once it has `planner.min_telemetry_samples` samples, else the class profile
    failures          a class whose offloads fail (or fall back) more often than
                      `controller.local_only_failure_rate`, over at least
                      `controller.local_only_min_windows` of them, goes local only, and is held
                      there (below)
    held fronts       per (class, model): the fronts every device that reported them holds (an
                      ONNX Runtime device holds what its export has); the planner names only those.
                      None reported in the window: the last known ones (remembered as RTTs are),
                      else unknown (no restriction)
    battery           a class of which at least a quarter of the battery reports are below
                      `planner.low_battery_threshold` (p25 below it) saves energy as a class: its
                      NORMAL rows minimise energy within its deadline too, as its LOW rows always
                      do (a class whose objective is energy already has nothing to switch)

Memory. A snapshot without an RTT or cloud figure (nobody offloaded in its window) is not news that
the network or the cloud got slower: the last measured value stands in for `_REMEMBER_WINDOWS`
query windows. A class gone local only sends nothing, so its failures age out of the query window
while it is local: a hold keeps it local for one query window after the last pass that saw the
failures, then the cloud is offered again (the probe; the devices' breakers keep every window
safe); each hold in a row lasts twice as long, up to `_MAX_HOLD_WINDOWS` windows, and a healthy
window of offloads forgets them. `Memory` carries both from one pass to the next; everything here
is a function of (config, snapshot, catalogs, devices, memory, now).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cloud.controller.costmodel import CloudState, DeviceCostProfile, TelemetryStats, front_held
from cloud.controller.metrics_source import DeviceModelSnapshot, FleetSnapshot
from cloud.controller.planner import PlannerInputs, changed_rows, inputs_from_config, plan_fleet
from pipelines.catalog import ModelCatalog
from pipelines.devices import DeviceClass
from splitsense.config import ClassObjectiveConfig, Config, EstimatorConfig
from splitsense.errors import ConfigError
from splitsense.plan import PlanSet

__all__ = [
    "PRIOR_CLOUD_OVERHEAD_MS",
    "PRIOR_RTT_MS",
    "ClassDecision",
    "CloudDecision",
    "HeldFronts",
    "LocalOnlyHold",
    "Measured",
    "Memory",
    "SnapshotInputs",
    "cost_profile",
    "inputs_from_snapshot",
    "plan_differences",
    "plan_from_snapshot",
]

# What a device believes before it measured its link (edge/estimator.py): the controller assumes
# the same for a class nobody reported on, so a fresh fleet is planned as its devices behave.
PRIOR_RTT_MS = EstimatorConfig().prior_rtt_ms
# One Ray Serve handle call costs ~8 ms p50 here (DESIGN, measured): the cloud's overhead per
# request until the broker has measured its own tail calls.
PRIOR_CLOUD_OVERHEAD_MS = 8.0
# Measured RTTs and cloud figures stand in for missing ones for this many query windows (10 min at
# the defaults), then the priors return: evidence that old says little about now.
_REMEMBER_WINDOWS = 10
# A class held local only is offered the cloud again after 1, 2, 4, then at most 8 query windows
# (60 s .. 8 min at the defaults): each probe costs its devices a breaker's worth of fallbacks.
_MAX_HOLD_WINDOWS = 8


def cost_profile(device: DeviceClass) -> DeviceCostProfile:
    """The cost model's view of a device class of pipelines.devices (memory budgets included)."""
    return DeviceCostProfile.of(device)


@dataclass(frozen=True)
class ClassDecision:
    """What the snapshot said about one device class, and what the controller made of it."""

    device_class: str
    rtt_ms: float
    rtt_source: str  # "p50 of device estimates", "mean of device estimates", "prior (no reports)"
    local_only_reason: str | None = None  # set: the class runs local only, this is why
    battery_saving_reason: str | None = None  # set: NORMAL rows minimise energy, this is why
    telemetry_models: tuple[str, ...] = ()  # models with per-stage device telemetry in the snapshot
    # per model whose devices said what they hold: "model: H of T fronts held (source)"
    held_fronts: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class CloudDecision:
    queue_ms: float
    overhead_ms: float
    source: str  # "measured over N (model, cut)s" or "prior (no answered requests)"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Measured:
    """A value the fleet measured, and when: what a later snapshot without it falls back on."""

    value: float
    taken_unix_ms: int


@dataclass(frozen=True)
class LocalOnlyHold:
    """A class kept local only until `until_unix_ms`; `strikes` holds in a row (each twice as long)."""

    reason: str
    until_unix_ms: int
    strikes: int


@dataclass(frozen=True)
class HeldFronts:
    """The fronts every reporting device of a class holds of one model, and when they were read."""

    fronts: frozenset[tuple[int, float]]
    taken_unix_ms: int


@dataclass(frozen=True)
class Memory:
    """What one pass hands the next: the last measured RTTs and cloud figures (standing in for
    missing ones), the classes held local only, and the last known held fronts per (class,
    model). The loop's only state besides the plan."""

    measured: Mapping[str, Measured] = field(default_factory=dict)
    holds: Mapping[str, LocalOnlyHold] = field(default_factory=dict)
    fronts: Mapping[tuple[str, str], HeldFronts] = field(default_factory=dict)


@dataclass(frozen=True)
class SnapshotInputs:
    """The planner's inputs for one snapshot, the decisions behind them, and the memory for the
    next pass."""

    planner: PlannerInputs
    classes: tuple[ClassDecision, ...]
    cloud: CloudDecision
    memory: Memory = field(default_factory=Memory)

    def digest(self) -> dict[str, str]:
        """A flat {input: shown value}: what a publication's reason diffs against the last one."""
        out = {"cloud queue": f"{self.cloud.queue_ms:.2g} ms", "cloud overhead": f"{self.cloud.overhead_ms:.2g} ms"}
        for c in self.classes:
            out[f"{c.device_class} rtt"] = f"{c.rtt_ms:.2g} ms"
            out[f"{c.device_class} local only"] = "on" if c.local_only_reason else "off"
            out[f"{c.device_class} battery saving"] = "on" if c.battery_saving_reason else "off"
            out[f"{c.device_class} telemetry"] = ",".join(c.telemetry_models) or "none"
            out[f"{c.device_class} held fronts"] = ",".join(h.split(" (")[0] for h in c.held_fronts) or "unknown"
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"classes": [c.to_dict() for c in self.classes], "cloud": self.cloud.to_dict()}


def _recalled(key: str, remembered: Mapping[str, Measured], now_unix_ms: int, max_age_s: float) -> Measured | None:
    m = remembered.get(key)
    if m is None or now_unix_ms - m.taken_unix_ms > max_age_s * 1000:
        return None
    return m


def _ago(m: Measured, now_unix_ms: int) -> str:
    return f"last measured {max(now_unix_ms - m.taken_unix_ms, 0) / 1000:.0f} s ago"


def _class_rtt(snap: FleetSnapshot | None, name: str) -> tuple[float | None, str]:
    cs = snap.device_class(name) if snap is not None else None
    if cs is not None and cs.rtt_p50_ms is not None and math.isfinite(cs.rtt_p50_ms):
        return max(cs.rtt_p50_ms, 0.0), "p50 of device estimates"
    if cs is not None and cs.rtt_mean_ms is not None and math.isfinite(cs.rtt_mean_ms):
        return max(cs.rtt_mean_ms, 0.0), "mean of device estimates"
    return None, ""


def _failure_evidence(snap: FleetSnapshot | None, name: str, config: Config) -> tuple[str | None, bool]:
    """(why the cloud path is broken for the class, or None; whether its offloads are healthy)."""
    cs = snap.device_class(name) if snap is not None else None
    if cs is None or cs.offload_windows is None:
        return None, False
    rates = [r for r in (cs.failure_rate, cs.fallback_rate) if r is not None and math.isfinite(r)]
    c = config.controller
    if not rates or cs.offload_windows < c.local_only_min_windows:
        return None, False
    rate = max(rates)
    if rate <= c.local_only_failure_rate:
        return None, True
    why = (
        f"cloud failure rate {rate:.0%} > {c.local_only_failure_rate:.0%} over {cs.offload_windows:.0f} offload windows"
    )
    return why, False


def _local_only(
    snap: FleetSnapshot | None, name: str, config: Config, hold: LocalOnlyHold | None, now_unix_ms: int
) -> tuple[str | None, LocalOnlyHold | None]:
    """(why the class runs local only now, or None; its hold for the next pass).

    Fresh evidence starts a hold of one query window (each hold in a row twice as long, at most
    `_MAX_HOLD_WINDOWS`), counted from the last pass that still saw the evidence; a hold outlives
    the evidence, which stops coming once the class runs locally. When it ends the cloud is offered
    again (the probe): healthy offloads forget the strikes, new failures escalate them.
    """
    evidence, healthy = _failure_evidence(snap, name, config)
    window_ms = int(config.controller.query_window_s * 1000)
    active = hold is not None and now_unix_ms < hold.until_unix_ms
    if evidence is not None:
        if hold is None:
            strikes = 1
        else:
            strikes = hold.strikes if active else hold.strikes + 1
        length_ms = window_ms * min(2 ** (strikes - 1), _MAX_HOLD_WINDOWS)
        until = now_unix_ms + length_ms
        if hold is not None and active:
            until = max(until, hold.until_unix_ms)
        return evidence, LocalOnlyHold(evidence, until, strikes)
    if hold is None:
        return None, None
    if active:
        left_s = (hold.until_unix_ms - now_unix_ms) / 1000
        return f"{hold.reason}; held {left_s:.0f} s more", hold
    if healthy or now_unix_ms - hold.until_unix_ms > window_ms * _MAX_HOLD_WINDOWS:
        return None, None  # offloads work again (or it is old news): forget the strikes
    return None, hold  # probing: new failures make the next hold longer


def _battery_saving_reason(snap: FleetSnapshot | None, name: str, config: Config) -> str | None:
    cs = snap.device_class(name) if snap is not None else None
    if cs is None or cs.battery_p25 is None or not math.isfinite(cs.battery_p25):
        return None
    threshold = config.planner.low_battery_threshold
    if cs.battery_p25 >= threshold:
        return None
    return f"a quarter of its battery reports are low (p25 {cs.battery_p25:.0%} < {threshold:.0%})"


def _cloud(snap: FleetSnapshot | None, catalogs: Mapping[str, ModelCatalog]) -> CloudDecision | None:
    """Queueing and per-request overhead, averaged over the (model, cut)s weighted by requests;
    None when the snapshot has no answered request."""
    q_sum = o_sum = weight = 0.0
    n = 0
    for cut in snap.cuts if snap is not None else ():
        cat = catalogs.get(cut.model)
        if cat is None or cut.compute_ms is None or not 0 <= cut.cut < cat.n_stages:
            continue
        w = cut.requests_per_s if cut.requests_per_s is not None and cut.requests_per_s > 0 else 1.0
        tail_host_ms = sum(cat.stage_latency_ms[cut.cut :])
        o_sum += w * max(cut.compute_ms - tail_host_ms, 0.0)
        q_sum += w * max(cut.queue_ms or 0.0, 0.0)
        weight += w
        n += 1
    if n == 0:
        return None
    return CloudDecision(q_sum / weight, o_sum / weight, f"measured over {n} (model, cut)s")


def inputs_from_snapshot(
    config: Config,
    snapshot: FleetSnapshot | None,
    catalogs: Mapping[str, ModelCatalog],
    devices: Mapping[str, DeviceClass],
    *,
    now_unix_ms: int = 0,
    memory: Memory | None = None,
) -> SnapshotInputs:
    """The planner's inputs for `snapshot` (None: nothing measured). Pure.

    RTT and cloud figures the snapshot lacks (nobody offloaded in its window) come from `memory`
    (the previous pass's `SnapshotInputs.memory`) while younger than `_REMEMBER_WINDOWS` query
    windows, else from the priors: a fleet that stopped offloading has not made the cloud slower.
    Classes held local only stay so until their hold ends (`_local_only`). Device classes are
    those of `devices` (each needs an objective in `config.planner.classes`), models those of
    `catalogs`.
    """
    if not devices or not catalogs:
        raise ConfigError("the controller needs at least one device class and one model catalog")
    memory = memory or Memory()
    remembered = memory.measured
    holds: dict[str, LocalOnlyHold] = {}
    max_age_s = config.controller.query_window_s * _REMEMBER_WINDOWS
    measured: dict[str, Measured] = {}
    decisions = []
    classes: dict[str, ClassObjectiveConfig] = dict(config.planner.classes)
    rtt: dict[str, float] = {}
    unavailable: dict[str, str] = {}
    telemetry: dict[tuple[str, str], TelemetryStats] = {}
    held_fronts: dict[tuple[str, str], frozenset[tuple[int, float]]] = {}
    fronts_memory: dict[tuple[str, str], HeldFronts] = {}
    for name in devices:
        obj = classes.get(name)
        if obj is None:
            raise ConfigError(
                f"device class {name!r} has no planner objective; add it to planner.classes "
                f"(known: {', '.join(sorted(classes))})"
            )
        key = f"rtt_ms:{name}"
        rtt_ms, rtt_source = _class_rtt(snapshot, name)
        if rtt_ms is not None:
            measured[key] = Measured(rtt_ms, now_unix_ms)
        elif (old := _recalled(key, remembered, now_unix_ms, max_age_s)) is not None:
            rtt_ms, rtt_source = old.value, _ago(old, now_unix_ms)
            measured[key] = old
        else:
            rtt_ms, rtt_source = PRIOR_RTT_MS, "prior (no reports)"
        rtt[name] = rtt_ms
        local, hold = _local_only(snapshot, name, config, memory.holds.get(name), now_unix_ms)
        if hold is not None:
            holds[name] = hold
        if local is not None:
            unavailable[name] = local
        battery = _battery_saving_reason(snapshot, name, config)
        if battery is not None and obj.objective != "energy":
            classes[name] = dataclasses.replace(obj, objective="energy")
        elif battery is not None:
            battery = None  # the class minimises energy anyway: nothing to switch
        with_telemetry = []
        held_notes = []
        for model, cat in catalogs.items():
            dm = snapshot.device_model(model, name) if snapshot is not None else None
            stats = dm.telemetry_stats(cat.n_stages) if dm is not None else None
            if stats is not None:
                telemetry[(name, model)] = stats
                with_telemetry.append(model)
            held = _held_fronts(dm, (name, model), memory.fronts, now_unix_ms, max_age_s)
            if held is not None:
                fronts_memory[(name, model)] = held[0]
                held_fronts[(name, model)] = held[0].fronts
                held_notes.append(f"{model}: {_held_count(held[0].fronts, cat)} fronts held ({held[1]})")
        decisions.append(
            ClassDecision(name, rtt_ms, rtt_source, local, battery, tuple(with_telemetry), tuple(held_notes))
        )

    cloud = _cloud(snapshot, catalogs)
    if cloud is not None:
        measured["cloud_queue_ms"] = Measured(cloud.queue_ms, now_unix_ms)
        measured["cloud_overhead_ms"] = Measured(cloud.overhead_ms, now_unix_ms)
    else:
        q = _recalled("cloud_queue_ms", remembered, now_unix_ms, max_age_s)
        o = _recalled("cloud_overhead_ms", remembered, now_unix_ms, max_age_s)
        if q is not None and o is not None:
            cloud = CloudDecision(q.value, o.value, _ago(o, now_unix_ms))
            measured["cloud_queue_ms"], measured["cloud_overhead_ms"] = q, o
        else:
            cloud = CloudDecision(0.0, PRIOR_CLOUD_OVERHEAD_MS, "prior (no answered requests)")
    planner_cfg = dataclasses.replace(config.planner, classes=classes)
    inputs = inputs_from_config(
        planner_cfg,
        {name: cost_profile(d) for name, d in devices.items()},
        rtt,
        catalogs.values(),
        CloudState(speedup_vs_host=1.0, queue_ms=cloud.queue_ms, overhead_ms=cloud.overhead_ms),
        now_unix_ms=now_unix_ms,
        telemetry=telemetry,
        cloud_unavailable=unavailable,
        held_fronts=held_fronts,
    )
    return SnapshotInputs(inputs, tuple(decisions), cloud, Memory(measured, holds, fronts_memory))


def _held_fronts(
    dm: DeviceModelSnapshot | None,
    key: tuple[str, str],
    remembered: Mapping[tuple[str, str], HeldFronts],
    now_unix_ms: int,
    max_age_s: float,
) -> tuple[HeldFronts, str] | None:
    """(the fronts every reporting device of the class holds of the model, where that came from):
    the snapshot's, else the last known ones while younger than `max_age_s`, else None (unknown)."""
    if dm is not None and (fronts := dm.held_fronts()) is not None:
        return HeldFronts(fronts, now_unix_ms), f"{dm.front_reports or 0:.0f} reports"
    old = remembered.get(key)
    if old is None or now_unix_ms - old.taken_unix_ms > max_age_s * 1000:
        return None
    return old, f"last reported {max(now_unix_ms - old.taken_unix_ms, 0) / 1000:.0f} s ago"


def _held_count(fronts: frozenset[tuple[int, float]], catalog: ModelCatalog) -> str:
    """Of the catalog's fronts past cut 0 (each cut 1..N at each level), those held, as "H of T"."""
    wanted = [(k, e.energy_kept) for e in catalog.levels for k in range(1, catalog.n_stages + 1)]
    held = sum(front_held(fronts, k, lv) for k, lv in wanted)
    return f"{held} of {len(wanted)}"


def plan_from_snapshot(
    config: Config,
    snapshot: FleetSnapshot | None,
    catalogs: Mapping[str, ModelCatalog],
    devices: Mapping[str, DeviceClass],
    previous: PlanSet | None = None,
    *,
    now_unix_ms: int = 0,
    memory: Memory | None = None,
) -> tuple[PlanSet, SnapshotInputs]:
    """One planning pass without I/O: `controller plan` prints it, the loop publishes it."""
    inputs = inputs_from_snapshot(config, snapshot, catalogs, devices, now_unix_ms=now_unix_ms, memory=memory)
    plan = plan_fleet(inputs.planner, previous)
    notes = [f"{c.device_class} local only: {c.local_only_reason}" for c in inputs.classes if c.local_only_reason]
    notes += [
        f"{c.device_class} saves energy: {c.battery_saving_reason}" for c in inputs.classes if c.battery_saving_reason
    ]
    if notes:
        plan = dataclasses.replace(plan, reason=f"{plan.reason}; " + "; ".join(notes))
    return plan, inputs


def _plan_keys(ps: PlanSet | None) -> set[tuple[str, str]]:
    return set() if ps is None else {(p.model, p.device_class) for p in ps.plans}


def plan_differences(old: PlanSet | None, new: PlanSet) -> int:
    """Rows of `new` that choose differently from `old`, plus plans `old` had and `new` lacks, plus
    plans whose objective changed (a class switching to energy saving is news even where its rows
    happen to keep their choices)."""
    objectives = {} if old is None else {(p.model, p.device_class): p.objective for p in old.plans}
    switched = sum(
        1
        for p in new.plans
        if (p.model, p.device_class) in objectives and objectives[(p.model, p.device_class)] != p.objective
    )
    return changed_rows(old, new) + len(_plan_keys(old) - _plan_keys(new)) + switched
