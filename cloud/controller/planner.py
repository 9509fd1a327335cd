"""The planner: per (device class, model), a table from (bandwidth bucket, battery state) to a choice.

Pure: ``plan_fleet(inputs, previous) -> PlanSet`` reads only its arguments (the time stamp comes in
with the inputs), like Ray Serve's autoscaling policy; the controller's I/O loop feeds it and
publishes what it returns.

Rows. The bandwidth edges e_0 < ... < e_m give the buckets [0, e_0), [e_0, e_1), ..., [e_m, inf),
for each battery state NORMAL and LOW. Each bucket is planned at its *lower edge*: transfer time
only falls as bandwidth rises, so the row's predicted latency holds for every bandwidth in the
bucket (a deadline met at the edge is met in the whole bucket), and the first bucket, planned at
0 Mbit/s, is always fully local (nothing gets through at 0; below the first edge offloading is not
worth planning for). The other end of the bargain: a bucket may be planned more cautiously than
its upper part deserves; more edges buy precision.

Objectives (per class, from PlannerConfig.classes):
    LATENCY   least end-to-end latency s.t. energy <= budget (mW x the model's window) and
              accuracy loss <= budget (points)
    ENERGY    least device energy s.t. latency <= deadline and accuracy loss <= budget
A LOW battery row always uses ENERGY with the class's deadline. Ties go to the other metric,
then to the earlier choice in ``costmodel.choices_of`` order (shallower cut, less compression,
wider codec). The fully local choice k = N needs neither link nor cloud and always belongs to the
candidates (uncompressed, it costs no accuracy), so a row is never empty. When no candidate meets
the energy budget (LATENCY) or the deadline (ENERGY), the budget is *infeasible* for that row: the
row takes the least energy (LATENCY) or least latency (ENERGY) choice among those within the
accuracy budget, and its reason starts with "infeasible: energy budget ..." or "infeasible:
deadline ...", naming the budget, the least value any choice reaches and the choice taken
(``INFEASIBLE_PREFIXES``; ``infeasible_rows`` counts such rows per class, model and budget, which the
controller exports). When a class's
failure rate says the cloud is broken, the caller sets ``ClassInputs.cloud_available = False``: its
rows are chosen among the local choices only (still over the compression levels), and say why.

Memory. A choice whose front the device cannot hold (``pipelines.devices.front_fits``: its weights
over the class's storage budget, or its peak activation, plus its weights where they are loaded,
over its RAM budget) is never a candidate. When the row's optimum without that rule would have been
such a front, the row's reason says so ("... refused: front of M at cut k needs ..."). Cut 0 (upload
the input) needs no front and always fits, so a row with the cloud reachable always has a fitting
candidate; when none of a row's candidates fits and has a finite cost (the cloud is unreachable, or
the row is planned at 0 Mbit/s, and the device cannot hold any local front), the row is chosen as if
memory were unlimited and its reason starts with "NO choice fits" (after the infeasible verdict, when
its budget is infeasible too): the device cannot run that row as planned, and the plan set's reason
counts such rows.

Held fronts. A device says in its telemetry which fronts it holds (an ONNX Runtime device: what its
export has, e.g. only some compression levels); the snapshot keeps, per (model, class), the fronts
every reporting device holds (``ClassInputs.held_fronts``; a model absent from it is unknown: no
restriction). A choice whose front is not among them is never a candidate (cut 0 needs no front
and is always held), and when the row's optimum without that rule would have been such a front,
the row's reason says so ("... avoided: the front of cut k at level L is not held by every device
of the class"); the plan set's reason counts such rows. When no held choice has a finite cost (the
cloud unreachable and no device holds a local front), the row is chosen as if every front were
held and its reason starts with "NO choice is held" (a device that lacks the front runs the nearest
one it holds, edge/runtime.py).

Hysteresis. With a previous PlanSet, a row keeps its previous (cut, level, codec) unless the new
optimum improves the row's objective by more than ``hysteresis_margin`` (relative) -- provided the
previous choice is still a (fitting, held) candidate and still feasible under the new inputs; otherwise the row
follows the optimum. Rows match by (model, class, battery, bucket edges); new edges start afresh.
The exact-optimum property (tests compare with ``exhaustive_best``) is for ``previous=None`` or a
margin of 0.

How this relates to Neurosurgeon and DADS.
  * Neurosurgeon (Kang et al., ASPLOS 2017) predicts per-layer device and cloud latency (or
    energy) from per-layer-type regression models and takes the argmin over the cut points of a
    chain: sum(device[:k]) + transfer(k) + sum(cloud[k:]). Ours is the same argmin over cuts, with
    measured per-stage profiles (and device telemetry) instead of regressions, and three more
    things: the front's compression level and the activation codec are chosen jointly with the
    cut, energy counts the radio's promotion and tail (Huang et al. 2012) and not only the
    transfer, and the choice is constrained (energy or latency budget, accuracy budget).
    ``neurosurgeon_argmin`` is that baseline; with the level fixed to 1.0 and the codec to fp32 our
    choice is the same optimisation over the same cuts, so it is at least as good under our cost
    model (equal when the extras -- radio promotion, result download, cloud overheads -- are 0),
    and with levels and codecs free it can only get better.
  * DADS (Hu et al., INFOCOM 2019) handles DAG-shaped models: it builds a graph whose s-t cuts are
    the device/cloud partitions (edge weights: cloud latency on source edges, device latency on
    sink edges, transfer latency on data edges) and solves a min cut. On a chain every min cut is
    a prefix, so DADS's answer equals Neurosurgeon's argmin. ``dads_min_cut`` builds that graph for
    a chain (with infinite reverse edges so a partition never comes back from the cloud, and the
    RTT on every data edge, since exactly one crosses) and solves it with Edmonds-Karp.
  Our models are chains of at most a few tens of stages, so enumerating every (k, level, codec)
  is exact and cheap (a few hundred choices per model, vectorised over all bandwidth buckets):
  no min cut is needed, and constraints that a min cut cannot express come for free.
"""

from __future__ import annotations

import dataclasses
import math
from collections import deque
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

import numpy as np

from cloud.controller.costmodel import (
    Choice,
    CloudState,
    CostEstimate,
    CostGrid,
    DeviceCostProfile,
    LinkState,
    TelemetryStats,
    choices_of,
    estimate,
    estimate_grid,
    front_held,
)
from pipelines.catalog import ModelCatalog
from pipelines.devices import front_fits
from splitsense.config import PlannerConfig
from splitsense.errors import ConfigError
from splitsense.plan import BatteryState, Objective, Plan, PlanRow, PlanSet

__all__ = [
    "INFEASIBLE_PREFIXES",
    "Bucket",
    "ClassInputs",
    "Constraints",
    "PlannerInputs",
    "Selection",
    "bandwidth_buckets",
    "chain_split_latency_ms",
    "changed_rows",
    "dads_min_cut",
    "exhaustive_best",
    "infeasible_rows",
    "inputs_from_config",
    "neurosurgeon_argmin",
    "plan_fleet",
    "row_constraints",
    "select",
]

_REL_SLACK = 1e-9  # budgets and deadlines tolerate float noise of this relative size
_ACC_SLACK_POINTS = 1e-9
# How the reason of a row that no choice can meet its budget starts, per budget: the energy budget
# of a LATENCY row, the deadline of an ENERGY row. `infeasible_rows` reads them back.
INFEASIBLE_PREFIXES: Mapping[str, str] = MappingProxyType(
    {"energy": "infeasible: energy budget ", "deadline": "infeasible: deadline "}
)


# ---------------------------------------------------------------------------------------------
# Inputs


@dataclass(frozen=True)
class Constraints:
    """What one row minimises and within which limits (inf: no limit)."""

    objective: Objective
    energy_budget_mj: float = math.inf
    deadline_ms: float = math.inf
    accuracy_budget_points: float = math.inf

    def __post_init__(self) -> None:
        object.__setattr__(self, "objective", Objective(self.objective))
        for name in ("energy_budget_mj", "deadline_ms", "accuracy_budget_points"):
            value = getattr(self, name)
            if math.isnan(value) or value < 0:
                raise ConfigError(f"Constraints.{name} must be >= 0 (inf: none), got {value!r}")


@dataclass(frozen=True)
class ClassInputs:
    """One device class as the planner sees it: hardware, link RTT, objective, and health."""

    device: DeviceCostProfile
    objective: Objective
    rtt_ms: float
    energy_budget_mw: float | None = None  # None: no energy budget
    deadline_ms: float | None = None  # None: no deadline
    accuracy_budget_points: float = 1.0
    cloud_available: bool = True
    cloud_unavailable_reason: str = "cloud unavailable"  # e.g. "cloud failure rate 42% > 20%"
    telemetry: Mapping[str, TelemetryStats] = field(default_factory=dict, hash=False)  # per model
    # per model: the (cut, level) fronts every reporting device holds; a model absent: unknown (all)
    held_fronts: Mapping[str, frozenset[tuple[int, float]]] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "objective", Objective(self.objective))
        except ValueError:
            raise ConfigError(f"class {self.name!r}: unknown objective {self.objective!r}") from None
        if not (math.isfinite(self.rtt_ms) and self.rtt_ms >= 0):
            raise ConfigError(f"class {self.name!r}: rtt_ms must be finite and >= 0, got {self.rtt_ms!r}")
        for name in ("energy_budget_mw", "deadline_ms"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ConfigError(f"class {self.name!r}: {name} must be > 0 or None, got {value!r}")
        if not 0 <= self.accuracy_budget_points <= 100:
            raise ConfigError(f"class {self.name!r}: accuracy_budget_points must be in [0, 100]")
        object.__setattr__(self, "telemetry", MappingProxyType(dict(self.telemetry)))
        held = {m: frozenset((int(k), float(lv)) for k, lv in f) for m, f in self.held_fronts.items()}
        object.__setattr__(self, "held_fronts", MappingProxyType(held))

    @property
    def name(self) -> str:
        return self.device.name


@dataclass(frozen=True)
class PlannerInputs:
    """Everything one replan reads."""

    classes: tuple[ClassInputs, ...]
    catalogs: tuple[ModelCatalog, ...]
    cloud: CloudState
    bandwidth_edges_mbps: tuple[float, ...] = PlannerConfig().bandwidth_edges_mbps
    hysteresis_margin: float = PlannerConfig().hysteresis_margin
    min_telemetry_samples: int = PlannerConfig().min_telemetry_samples
    now_unix_ms: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "classes", tuple(self.classes))
        object.__setattr__(self, "catalogs", tuple(self.catalogs))
        if not self.classes or not self.catalogs:
            raise ConfigError("PlannerInputs needs at least one device class and one model catalog")
        for what, names in (
            ("device class", [c.name for c in self.classes]),
            ("model", [c.model for c in self.catalogs]),
        ):
            if len(set(names)) != len(names):
                raise ConfigError(f"PlannerInputs: duplicate {what} names {names}")
        bandwidth_buckets(self.bandwidth_edges_mbps)  # checks the edges
        if not 0 <= self.hysteresis_margin < 1:
            raise ConfigError(f"hysteresis_margin must be in [0, 1), got {self.hysteresis_margin!r}")
        if self.min_telemetry_samples < 1:
            raise ConfigError("min_telemetry_samples must be >= 1")
        if self.now_unix_ms < 0:
            raise ConfigError("now_unix_ms must be >= 0")


def inputs_from_config(
    cfg: PlannerConfig,
    devices: Mapping[str, DeviceCostProfile],
    rtt_ms: Mapping[str, float],
    catalogs: Iterable[ModelCatalog],
    cloud: CloudState,
    *,
    now_unix_ms: int = 0,
    telemetry: Mapping[tuple[str, str], TelemetryStats] | None = None,
    cloud_unavailable: Mapping[str, str] | None = None,
    held_fronts: Mapping[tuple[str, str], Collection[tuple[int, float]]] | None = None,
) -> PlannerInputs:
    """PlannerInputs for the classes in `devices`, objectives from `cfg.classes`.

    `telemetry` and `held_fronts` (the fronts every reporting device holds; absent: unknown) are
    keyed by (device class, model); `cloud_unavailable` maps a class whose cloud is broken to the
    reason (its rows become local only).
    """
    held_fronts = held_fronts or {}
    telemetry = telemetry or {}
    cloud_unavailable = cloud_unavailable or {}
    classes = []
    for name, device in devices.items():
        obj = cfg.classes.get(name)
        if obj is None:
            raise ConfigError(
                f"device class {name!r} has no planner objective; add it to planner.classes "
                f"(known: {', '.join(sorted(cfg.classes))})"
            )
        if name not in rtt_ms:
            raise ConfigError(f"no RTT for device class {name!r}")
        classes.append(
            ClassInputs(
                device=device,
                objective=Objective(obj.objective),
                rtt_ms=float(rtt_ms[name]),
                energy_budget_mw=obj.energy_budget_mw,
                deadline_ms=obj.deadline_ms,
                accuracy_budget_points=obj.accuracy_budget_points,
                cloud_available=name not in cloud_unavailable,
                cloud_unavailable_reason=cloud_unavailable.get(name, "cloud unavailable"),
                telemetry={m: t for (c, m), t in telemetry.items() if c == name},
                held_fronts={m: frozenset(f) for (c, m), f in held_fronts.items() if c == name},
            )
        )
    return PlannerInputs(
        classes=tuple(classes),
        catalogs=tuple(catalogs),
        cloud=cloud,
        bandwidth_edges_mbps=cfg.bandwidth_edges_mbps,
        hysteresis_margin=cfg.hysteresis_margin,
        min_telemetry_samples=cfg.min_telemetry_samples,
        now_unix_ms=now_unix_ms,
    )


@dataclass(frozen=True)
class Bucket:
    """[min_mbps, max_mbps), planned at `planned_mbps` (its lower edge)."""

    min_mbps: float
    max_mbps: float
    planned_mbps: float


def bandwidth_buckets(edges_mbps: Sequence[float]) -> tuple[Bucket, ...]:
    """[0, e0), [e0, e1), ..., [e_last, inf), each planned at its lower edge."""
    edges = [float(e) for e in edges_mbps]
    if not edges or edges[0] <= 0 or any(b <= a for a, b in zip(edges, edges[1:], strict=False)):
        raise ConfigError(f"bandwidth edges must be > 0 and strictly increasing, got {list(edges_mbps)}")
    bounds = [0.0, *edges, math.inf]
    return tuple(Bucket(lo, hi, lo) for lo, hi in zip(bounds, bounds[1:], strict=False))


def row_constraints(cls: ClassInputs, catalog: ModelCatalog, battery: BatteryState) -> Constraints:
    """The row's objective and limits: the class's, or ENERGY within its deadline on LOW battery."""
    objective = Objective.ENERGY if battery is BatteryState.LOW else cls.objective
    energy = math.inf if cls.energy_budget_mw is None else cls.energy_budget_mw * catalog.window_s
    deadline = math.inf if cls.deadline_ms is None else cls.deadline_ms
    return Constraints(
        objective=objective,
        energy_budget_mj=energy if objective is Objective.LATENCY else math.inf,
        deadline_ms=deadline if objective is Objective.ENERGY else math.inf,
        accuracy_budget_points=cls.accuracy_budget_points,
    )


# ---------------------------------------------------------------------------------------------
# Choosing one row


@dataclass(frozen=True)
class Selection:
    index: int  # into the grid's choices
    feasible: bool  # False: infeasible (no choice met the energy budget / deadline): the least violating
    fits: bool = True  # False: no candidate fits the device's memory; chosen as if memory were unlimited
    held: bool = True  # False: no candidate is held by every device of the class; chosen as if all were


def _within(value: np.ndarray, limit: float) -> np.ndarray:
    result: np.ndarray = value <= limit * (1 + _REL_SLACK)
    return result


def select(grid: CostGrid, b: int, cons: Constraints, *, memory: bool = True, holdings: bool = True) -> Selection:
    """The optimum of link b's row under `cons` (vectorised; `exhaustive_best` is its twin).

    Only choices whose front fits the device (`grid.fits`) and is held by every device of the
    class (`grid.held`) are candidates; `memory=False` ignores the memory budgets, `holdings=False`
    the held fronts (what the row would have chosen without them). When no candidate has a finite
    cost, the held fronts are ignored first (Selection.held False), then the memory budgets."""
    ones = np.ones(len(grid.choices), dtype=bool)
    fit = grid.fits if memory else ones
    if holdings and grid.held is not None:
        fit = fit & grid.held
        if not (fit & _finite_choice(grid, b, cons)).any():
            return dataclasses.replace(select(grid, b, cons, memory=memory, holdings=False), held=False)
    if memory and not (fit & _finite_choice(grid, b, cons)).any():
        return dataclasses.replace(select(grid, b, cons, memory=False, holdings=holdings), fits=False)
    total, energy = grid.total_ms[b], grid.energy_mj[b]
    acc_ok = grid.accuracy_loss_points <= cons.accuracy_budget_points + _ACC_SLACK_POINTS
    if cons.objective is Objective.LATENCY:
        primary, secondary, violated = total, energy, energy
        ok = acc_ok & _within(energy, cons.energy_budget_mj)
    else:
        primary, secondary, violated = energy, total, total
        ok = acc_ok & _within(total, cons.deadline_ms)
    ok &= np.isfinite(primary) & fit
    if ok.any():
        return Selection(_lex_argmin(primary, secondary, ok), True)
    fallback = acc_ok & np.isfinite(violated) & fit
    if not fallback.any():  # no fitting choice within the accuracy budget: the least inaccurate rule
        fallback = np.isfinite(violated) & fit
    return Selection(_lex_argmin(violated, primary, fallback), False)


def _finite_choice(grid: CostGrid, b: int, cons: Constraints) -> np.ndarray:
    """Choices select can pick at all on link b: those whose constrained metric is finite."""
    violated = grid.energy_mj[b] if cons.objective is Objective.LATENCY else grid.total_ms[b]
    result: np.ndarray = np.isfinite(violated)
    return result


def _lex_argmin(primary: np.ndarray, secondary: np.ndarray, mask: np.ndarray) -> int:
    """First index minimising (primary, secondary) among `mask`."""
    cand = np.where(mask, primary, np.inf)
    tied = mask & (cand == cand.min())
    sec = np.where(tied, secondary, np.inf)
    if not np.isfinite(sec.min()):
        return int(np.flatnonzero(tied)[0])
    return int(np.argmin(sec))


def _feasible(est: CostEstimate, cons: Constraints) -> bool:
    loss = est.breakdown["accuracy_loss_points"]
    if loss > cons.accuracy_budget_points + _ACC_SLACK_POINTS:
        return False
    if cons.objective is Objective.LATENCY:
        return math.isfinite(est.total_ms) and est.energy_mj <= cons.energy_budget_mj * (1 + _REL_SLACK)
    return math.isfinite(est.energy_mj) and est.total_ms <= cons.deadline_ms * (1 + _REL_SLACK)


def exhaustive_best(
    catalog: ModelCatalog,
    device: DeviceCostProfile,
    link: LinkState,
    cloud: CloudState,
    cons: Constraints,
    telemetry: TelemetryStats | None = None,
    *,
    min_telemetry_samples: int = 30,
    local_only: bool = False,
    held_fronts: Collection[tuple[int, float]] | None = None,
) -> tuple[Choice, CostEstimate, bool]:
    """Brute force with plain loops over every choice and the scalar cost model: (choice, its
    estimate, feasible). The reference the planner is tested against.

    Choices whose front does not fit the device (`pipelines.devices.front_fits`) or is not among
    `held_fronts` (None: unknown, all held) are left out, unless none of those left has a finite
    cost: then the held fronts are ignored, then memory too, as `select` does."""
    items = []
    for choice in choices_of(catalog, local_only=local_only):
        est = estimate(catalog, device, link, cloud, choice, telemetry, min_telemetry_samples=min_telemetry_samples)
        fits = front_fits(device, catalog, choice.cut, choice.level) is None
        items.append((choice, est, fits, front_held(held_fronts, choice.cut, choice.level)))
    violated = (lambda e: e.energy_mj) if cons.objective is Objective.LATENCY else (lambda e: e.total_ms)
    pools = (
        [(c, e) for c, e, fits, held in items if fits and held],
        [(c, e) for c, e, fits, _ in items if fits],
        [(c, e) for c, e, _, _ in items],
    )
    pool = next((p for p in pools if any(math.isfinite(violated(e)) for _, e in p)), pools[-1])
    best: tuple[float, float] | None = None
    best_item: tuple[Choice, CostEstimate] | None = None
    fallback: tuple[float, float] | None = None
    fallback_item: tuple[Choice, CostEstimate] | None = None
    any_fallback: tuple[float, float] | None = None
    any_item: tuple[Choice, CostEstimate] | None = None
    for choice, est in pool:
        if cons.objective is Objective.LATENCY:
            key = (est.total_ms, est.energy_mj)
            fb_key = (est.energy_mj, est.total_ms)
        else:
            key = (est.energy_mj, est.total_ms)
            fb_key = (est.total_ms, est.energy_mj)
        if _feasible(est, cons):
            if best is None or key < best:
                best, best_item = key, (choice, est)
            continue
        if not math.isfinite(fb_key[0]):
            continue
        if est.breakdown["accuracy_loss_points"] <= cons.accuracy_budget_points + _ACC_SLACK_POINTS:
            if fallback is None or fb_key < fallback:
                fallback, fallback_item = fb_key, (choice, est)
        if any_fallback is None or fb_key < any_fallback:
            any_fallback, any_item = fb_key, (choice, est)
    if best_item is not None:
        return best_item[0], best_item[1], True
    item = fallback_item or any_item  # the second: no fitting choice within the accuracy budget
    if item is None:
        raise ConfigError(f"no choice at all for {catalog.model!r}: the catalog has no local choice")
    return item[0], item[1], False


# ---------------------------------------------------------------------------------------------
# The fleet


_RowKey = tuple[str, str, BatteryState, float, float]


def _row_key(model: str, device_class: str, row: PlanRow) -> _RowKey:
    return (model, device_class, row.battery, row.min_bandwidth_mbps, row.max_bandwidth_mbps)


def _previous_choices(previous: PlanSet | None) -> dict[_RowKey, Choice]:
    out: dict[_RowKey, Choice] = {}
    if previous is None:
        return out
    for plan in previous.plans:
        for row in plan.rows:
            out[_row_key(plan.model, plan.device_class, row)] = Choice(row.cut, row.compression_energy_kept, row.codec)
    return out


def plan_fleet(inputs: PlannerInputs, previous: PlanSet | None = None) -> PlanSet:
    """One plan per (device class, model): rows per (bandwidth bucket, battery state)."""
    buckets = bandwidth_buckets(inputs.bandwidth_edges_mbps)
    prev = _previous_choices(previous)
    plans = []
    kept = infeasible = refused = unfit = avoided = unheld = 0
    for cls in inputs.classes:
        links = [LinkState(bk.planned_mbps, cls.rtt_ms) for bk in buckets]
        for catalog in inputs.catalogs:
            grid = estimate_grid(
                catalog,
                cls.device,
                links,
                inputs.cloud,
                cls.telemetry.get(catalog.model),
                min_telemetry_samples=inputs.min_telemetry_samples,
                local_only=not cls.cloud_available,
                held_fronts=cls.held_fronts.get(catalog.model),
            )
            plan, k, inf, mem, hold = _plan_one(cls, catalog, grid, buckets, prev, inputs.hysteresis_margin)
            plans.append(plan)
            kept, infeasible = kept + k, infeasible + inf
            refused, unfit = refused + mem[0], unfit + mem[1]
            avoided, unheld = avoided + hold[0], unheld + hold[1]

    version = 1 if previous is None else previous.version + 1
    plan_set = PlanSet(version=version, plans=tuple(plans), created_unix_ms=inputs.now_unix_ms, reason="-")
    rows = sum(len(p.rows) for p in plans)
    parts = [f"{len(plans)} plans, {rows} rows ({len(buckets)} bandwidth buckets x 2 battery states)"]
    if previous is not None:
        parts.append(
            f"{changed_rows(previous, plan_set)} rows changed since v{previous.version}, "
            f"{kept} kept by {inputs.hysteresis_margin:.0%} hysteresis"
        )
    if infeasible:
        parts.append(f"{infeasible} infeasible rows (no choice meets their energy budget or deadline)")
    if refused:
        parts.append(f"{refused} rows refused a front that does not fit the device's memory")
    if unfit:
        parts.append(f"{unfit} rows where NO choice fits the device's memory")
    if avoided:
        parts.append(f"{avoided} rows avoided a front not every device of the class holds")
    if unheld:
        parts.append(f"{unheld} rows where NO choice is held by every device of the class")
    local = [c.name for c in inputs.classes if not c.cloud_available]
    if local:
        parts.append(f"local only for {', '.join(local)} (cloud unavailable)")
    return dataclasses.replace(plan_set, reason="; ".join(parts))


def _plan_one(
    cls: ClassInputs,
    catalog: ModelCatalog,
    grid: CostGrid,
    buckets: tuple[Bucket, ...],
    prev: dict[_RowKey, Choice],
    margin: float,
) -> tuple[Plan, int, int, tuple[int, int], tuple[int, int]]:
    """The plan of one (class, model), how many rows hysteresis kept, how many are infeasible,
    (rows whose optimum was refused for memory, rows where no choice fits) and (rows whose optimum
    is a front not every device holds, rows where no choice is held)."""
    local_m, cloud_m = grid.index(Choice(catalog.n_stages)), grid.index(Choice(0))
    rows, kept, infeasible, refused, unfit, avoided, unheld = [], 0, 0, 0, 0, 0, 0
    for battery in (BatteryState.NORMAL, BatteryState.LOW):
        cons = row_constraints(cls, catalog, battery)
        for b, bk in enumerate(buckets):
            sel = select(grid, b, cons)
            old = prev.get((catalog.model, cls.name, battery, bk.min_mbps, bk.max_mbps))
            m, kept_note = _hysteresis(grid, b, sel, cons, old, margin)
            kept += bool(kept_note)
            infeasible += not sel.feasible
            memory_note = _memory_note(cls, grid, b, cons, sel, m)
            refused += bool(memory_note) and sel.fits
            unfit += not sel.fits
            held_note = _held_note(cls, grid, b, cons, sel, m)
            avoided += bool(held_note) and sel.held
            unheld += not sel.held
            est = grid.estimate(b, m)
            choice = grid.choices[m]
            reason = _reason(
                cls, catalog, grid, b, m, est, cons, battery, bk, sel.feasible, kept_note, local_m, cloud_m
            )  # fmt: skip
            reason = memory_note + held_note + reason
            if not sel.feasible:  # the verdict first: no choice can meet this row's budget
                reason = _infeasible_note(cons) + reason
            rows.append(
                PlanRow(
                    min_bandwidth_mbps=bk.min_mbps,
                    max_bandwidth_mbps=bk.max_mbps,
                    battery=battery,
                    cut=choice.cut,
                    codec=choice.codec,
                    reason=reason,
                    predicted_latency_ms=est.total_ms,
                    predicted_energy_mj=est.energy_mj,
                    compression_energy_kept=choice.level,
                )
            )
    plan = Plan(model=catalog.model, device_class=cls.name, rows=tuple(rows), objective=cls.objective)
    return plan, kept, infeasible, (refused, unfit), (avoided, unheld)


def _held_note(cls: ClassInputs, grid: CostGrid, b: int, cons: Constraints, sel: Selection, m: int) -> str:
    """'' when the held fronts did not decide the row; else the front they ruled out (or that no
    choice is held), ending '; '."""
    if grid.held is None:
        return ""
    if not sel.held:
        why = grid.missing.get(m) or "its front is not held by every device of the class"
        return f"NO choice is held by every {cls.name} device, planned as if it were ({why}); "
    if not grid.missing:
        return ""
    free = select(grid, b, cons, holdings=False).index
    ruled_out = grid.missing.get(free)
    if free == sel.index or ruled_out is None:
        return ""
    return f"{_choice_text(grid.catalog, grid.choices[free])} avoided: {ruled_out}; "


def _memory_note(cls: ClassInputs, grid: CostGrid, b: int, cons: Constraints, sel: Selection, m: int) -> str:
    """'' when memory did not decide the row; else what it refused (or that nothing fits), ending '; '."""
    if not sel.fits:
        why = grid.refusal(m) or "its front does not fit"
        return f"NO choice fits {cls.name}'s memory, planned as if it did ({why}); "
    if not grid.refusals:
        return ""
    free = select(grid, b, cons, memory=False).index
    refused = grid.refusal(free)
    if free == m or refused is None:
        return ""
    return f"{_choice_text(grid.catalog, grid.choices[free])} refused: {refused}; "


def _hysteresis(
    grid: CostGrid, b: int, sel: Selection, cons: Constraints, old: Choice | None, margin: float
) -> tuple[int, str]:
    """(choice index, note): the previous choice when it is still a feasible candidate and the new
    optimum does not beat it by more than `margin`; else the optimum and no note."""
    old_m = None if old is None else grid.index(old)
    if not sel.feasible or old_m is None or old_m == sel.index or not grid.fits[old_m]:
        return sel.index, ""
    if sel.held and not grid.held_mask[old_m]:  # the class no longer holds the previous front
        return sel.index, ""
    if not _feasible(grid.estimate(b, old_m), cons):
        return sel.index, ""
    new_v, old_v = _objective_value(grid, b, sel.index, cons), _objective_value(grid, b, old_m, cons)
    if new_v < old_v * (1 - margin):
        return sel.index, ""
    note = (
        f"kept previous, new best {_choice_text(grid.catalog, grid.choices[sel.index])} "
        f"{_value_text(new_v, cons)} is within {margin:.0%} hysteresis; "
    )
    return old_m, note


def changed_rows(old: PlanSet | None, new: PlanSet) -> int:
    """How many rows of `new` choose differently from the same row of `old` (new rows count)."""
    before = _previous_choices(old)
    n = 0
    for plan in new.plans:
        for row in plan.rows:
            was = before.get(_row_key(plan.model, plan.device_class, row))
            if was != Choice(row.cut, row.compression_energy_kept, row.codec):
                n += 1
    return n


def _objective_value(grid: CostGrid, b: int, m: int, cons: Constraints) -> float:
    arr = grid.total_ms if cons.objective is Objective.LATENCY else grid.energy_mj
    return float(arr[b, m])


def _value_text(value: float, cons: Constraints) -> str:
    return _fmt(value, "ms" if cons.objective is Objective.LATENCY else "mJ")


def _fmt(value: float, unit: str) -> str:
    return f"{value:.1f} {unit}" if math.isfinite(value) else f"inf {unit}"


def _choice_text(catalog: ModelCatalog, c: Choice) -> str:
    if c.cut == catalog.n_stages:
        return f"cut {c.cut} (local) level {c.level:g}"
    return f"cut {c.cut} ({catalog.cut_name(c.cut)}) {c.codec.value} level {c.level:g}"


def _infeasible_note(cons: Constraints) -> str:
    """How the reason of a row starts when no choice meets its budget (INFEASIBLE_PREFIXES)."""
    if cons.objective is Objective.LATENCY:
        return f"{INFEASIBLE_PREFIXES['energy']}{_fmt(cons.energy_budget_mj, 'mJ')} met by no choice; "
    return f"{INFEASIBLE_PREFIXES['deadline']}{cons.deadline_ms:g} ms met by no choice; "


def infeasible_rows(plan_set: PlanSet) -> dict[tuple[str, str, str], int]:
    """Per (device class, model, budget) of `plan_set`, budget "energy" or "deadline": how many rows
    no choice can meet that budget in (their reasons start with INFEASIBLE_PREFIXES[budget]); every
    plan has both keys, 0 when none. Works on a plan set read back from the store too."""
    out: dict[tuple[str, str, str], int] = {}
    for plan in plan_set.plans:
        for budget, prefix in INFEASIBLE_PREFIXES.items():
            out[(plan.device_class, plan.model, budget)] = sum(r.reason.startswith(prefix) for r in plan.rows)
    return out


def _reason(
    cls: ClassInputs,
    catalog: ModelCatalog,
    grid: CostGrid,
    b: int,
    m: int,
    est: CostEstimate,
    cons: Constraints,
    battery: BatteryState,
    bucket: Bucket,
    feasible: bool,
    kept_note: str,
    local_m: int | None,
    cloud_m: int | None,
) -> str:
    """One line: what was minimised, the inputs that decided it, the choice, and the baselines."""
    word = "latency" if kept_note else "least latency"
    e_word = "energy" if kept_note else "least energy"
    if cons.objective is Objective.LATENCY:
        if not feasible:  # `_infeasible_note` names the budget; the choice is the least energy
            head = f"least energy any choice reaches {_fmt(est.energy_mj, 'mJ')} ({_fmt(est.total_ms, 'ms')})"
        elif math.isfinite(cons.energy_budget_mj):
            head = (
                f"{word} {_fmt(est.total_ms, 'ms')} (energy {_fmt(est.energy_mj, 'mJ')} <= "
                f"{_fmt(cons.energy_budget_mj, 'mJ')})"
            )
        else:
            head = f"{word} {_fmt(est.total_ms, 'ms')} ({_fmt(est.energy_mj, 'mJ')})"
    elif not feasible:  # ... the least latency
        head = f"least latency any choice reaches {_fmt(est.total_ms, 'ms')} ({_fmt(est.energy_mj, 'mJ')})"
    elif math.isfinite(cons.deadline_ms):
        within = f"{_fmt(est.total_ms, 'ms')} <= {cons.deadline_ms:g} ms deadline"
        head = f"{e_word} {_fmt(est.energy_mj, 'mJ')} ({within})"
    else:
        head = f"{e_word} {_fmt(est.energy_mj, 'mJ')} ({_fmt(est.total_ms, 'ms')})"
    ctx = f"at {bucket.planned_mbps:g} Mbit/s, rtt {cls.rtt_ms:g} ms, {cls.device.radio_name}"
    if battery is BatteryState.LOW:
        ctx += ", battery low"
    ctx += f", device {grid.device_source}"
    if grid.queue_ms > 0:
        ctx += f", cloud queue {grid.queue_ms:g} ms"
    loss = est.breakdown["accuracy_loss_points"]
    acc = f", -{loss:.2f} acc pts" if loss > 0 else ""
    metric = grid.total_ms if cons.objective is Objective.LATENCY else grid.energy_mj
    unit = "ms" if cons.objective is Objective.LATENCY else "mJ"
    refs = []
    if local_m is not None:
        refs.append(f"local {_fmt(float(metric[b, local_m]), unit)}")
    if cloud_m is not None:
        refs.append(f"cloud-all {_fmt(float(metric[b, cloud_m]), unit)}")
    prefix = "" if cls.cloud_available else f"local only ({cls.cloud_unavailable_reason}); "
    line = f"{prefix}{kept_note}{head} {ctx}: {_choice_text(catalog, grid.choices[m])}{acc}; {', '.join(refs)}"
    return line.replace("\n", " ")


# ---------------------------------------------------------------------------------------------
# Baselines on a chain (latency only, uncompressed, one codec)


def _transfer_ms(nbytes: float, bandwidth_mbps: float, rtt_ms: float) -> float:
    if nbytes > 0 and bandwidth_mbps <= 0:
        return math.inf
    return nbytes * 8.0 / (bandwidth_mbps * 1e6) * 1000.0 + rtt_ms if nbytes > 0 else rtt_ms


def _check_chain(
    dev: Sequence[float], cloud: Sequence[float], act: Sequence[float]
) -> tuple[list[float], list[float], list[float]]:
    d, c, a = [float(x) for x in dev], [float(x) for x in cloud], [float(x) for x in act]
    if not d or len(c) != len(d) or len(a) < len(d):
        raise ConfigError(
            "per-stage device and cloud latencies need one entry per stage, activation bytes one per cut "
            f"0..N-1 (got {len(d)}, {len(c)}, {len(a)})"
        )
    return d, c, a


def chain_split_latency_ms(
    per_stage_device_ms: Sequence[float],
    per_stage_cloud_ms: Sequence[float],
    activation_bytes: Sequence[float],
    bandwidth_mbps: float,
    rtt_ms: float,
    cut: int,
) -> float:
    """Neurosurgeon's latency of cut k on a chain: device[:k] + bytes[k]/bw + rtt + cloud[k:]
    (k = N: device only). `activation_bytes[k]` is what crosses at cut k (an entry N is ignored)."""
    d, c, a = _check_chain(per_stage_device_ms, per_stage_cloud_ms, activation_bytes)
    n = len(d)
    if not 0 <= cut <= n:
        raise ConfigError(f"cut {cut} is out of range 0..{n}")
    if cut == n:
        return sum(d)
    return sum(d[:cut]) + _transfer_ms(a[cut], bandwidth_mbps, rtt_ms) + sum(c[cut:])


def neurosurgeon_argmin(
    per_stage_device_ms: Sequence[float],
    per_stage_cloud_ms: Sequence[float],
    activation_bytes: Sequence[float],
    bandwidth_mbps: float,
    rtt_ms: float,
) -> int:
    """Neurosurgeon (ASPLOS 2017) for latency: the first cut minimising `chain_split_latency_ms`."""
    n = len(_check_chain(per_stage_device_ms, per_stage_cloud_ms, activation_bytes)[0])
    costs = [
        chain_split_latency_ms(per_stage_device_ms, per_stage_cloud_ms, activation_bytes, bandwidth_mbps, rtt_ms, k)
        for k in range(n + 1)
    ]
    return min(range(n + 1), key=lambda k: (costs[k], k))


def dads_min_cut(
    per_stage_device_ms: Sequence[float],
    per_stage_cloud_ms: Sequence[float],
    activation_bytes: Sequence[float],
    bandwidth_mbps: float,
    rtt_ms: float,
) -> int:
    """DADS (INFOCOM 2019) on a chain: min s-t cut of its partition graph, by Edmonds-Karp.

    Nodes: s (the device), the input (pinned to s), one per stage, t (the cloud). Edges: s -> stage
    with its cloud latency (cut when the stage runs in the cloud), stage -> t with its device
    latency (cut when it runs on the device), producer -> consumer with the transfer latency of the
    producer's output + RTT (cut when that output crosses), and consumer -> producer with infinite
    capacity (a partition never comes back from the cloud). The device side of the minimal min cut
    is a prefix [0, k) of the stages: k is returned.
    """
    d, c, a = _check_chain(per_stage_device_ms, per_stage_cloud_ms, activation_bytes)
    n = len(d)
    s, inp, t = 0, 1, n + 2
    size = n + 3
    cap = [[0.0] * size for _ in range(size)]
    cap[s][inp] = math.inf
    for i in range(n):
        v = 2 + i
        u = inp if i == 0 else v - 1
        cap[s][v] += c[i]
        cap[v][t] += d[i]
        cap[u][v] += _transfer_ms(a[i], bandwidth_mbps, rtt_ms)
        cap[v][u] = math.inf
    finite = [x for row in cap for x in row if math.isfinite(x)]
    eps = 1e-12 * max(1.0, max(finite, default=1.0))
    reach = _max_flow_source_side(cap, s, t, eps)
    on_device = [reach[2 + i] for i in range(n)]
    k = sum(on_device)
    if on_device != [True] * k + [False] * (n - k):
        raise RuntimeError(f"DADS min cut is not a prefix of the chain: {on_device}")  # pragma: no cover
    return k


def _max_flow_source_side(cap: list[list[float]], s: int, t: int, eps: float) -> list[bool]:
    """Edmonds-Karp (shortest augmenting paths by BFS) on a dense residual matrix; returns which
    nodes the source still reaches in the residual graph (the source side of a minimum cut)."""
    size = len(cap)
    res = [row[:] for row in cap]
    while True:
        parent = [-1] * size
        parent[s] = s
        queue = deque([s])
        while queue and parent[t] == -1:
            u = queue.popleft()
            for v in range(size):
                if parent[v] == -1 and res[u][v] > eps:
                    parent[v] = u
                    queue.append(v)
        if parent[t] == -1:
            return [p != -1 for p in parent]
        bottleneck = math.inf
        v = t
        while v != s:
            u = parent[v]
            bottleneck = min(bottleneck, res[u][v])
            v = u
        if not math.isfinite(bottleneck):  # pragma: no cover - every s-t path has a finite edge
            raise RuntimeError("unbounded flow in the DADS graph")
        v = t
        while v != s:
            u = parent[v]
            res[u][v] -= bottleneck
            res[v][u] += bottleneck
            v = u
