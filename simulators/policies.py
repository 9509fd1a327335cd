"""The offloading policies a fleet is run under, and the pure choice logic of the baselines.

Every policy runs on the same inputs (traces, offsets, recordings, seeds); only who picks each
window's (cut, front compression level, codec) differs:

    adaptive    the controller's plans (per class, per bandwidth bucket and battery state) and the
                device's own live estimates choosing the row: the product (edge/runtime.py)
    all_local   k = N for every window: the whole model on the device, nothing sent
    all_cloud   k = 0 for every window: the preprocessed input goes up (fp32, exact), the classic
                cloud-offload baseline
    cloud_input k = 0 for every window with the best codec: the fewest bytes at cut 0 among the
                codecs whose accuracy there is within the class's accuracy budget. SC2's baseline
                (Matsubara et al., TMLR 2023): remote computation on the compressed input, what a
                split must beat
    fixed_cut   Neurosurgeon (Kang et al., ASPLOS 2017): one argmin over the cuts at start, from
                the bandwidth a first probe measures, uncompressed and fp32, then kept for the run.
                Latency classes take Neurosurgeon's latency argmin (`planner.neurosurgeon_argmin`);
                energy classes its energy mode (argmin of the cost model's device energy over the
                cuts). No budgets, no compression, no codec: what Neurosurgeon searches.
    oracle      in hindsight, per window: the exact optimum of the cost model over every (k, level,
                codec) under the class's objective and budgets, at the TRUE bandwidth of the
                device's link at that moment (outages included: 0 Mbit/s is "fully local"). Perfect
                knowledge of the link, then executed for real like every other policy.

Device memory: `PolicyInputs.unfit` names the (cut, level) fronts the class cannot hold (from
`pipelines.devices.front_fits`). all_local is infeasible where the whole model (cut N) does not
fit (`infeasible_reason`); cloud_input and all_cloud need nothing beyond preprocessing; fixed_cut's
argmin and the oracle only consider fronts that fit (cut 0 always does).

Budgets. `budget_feasibility` says, per bandwidth, whether any choice the oracle may take meets the
class's energy budget (latency objective) or deadline (energy objective), by the planner's own test,
and the least value any of them reaches: the report tells a budget no choice can meet from one that
a policy exceeds.

Pure: numbers in, choices out. The fleet runner (simulators/fleet.py) turns a choice into an
`edge.runtime.ForcedChoice` for the device; the adaptive policy imposes nothing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum

import numpy as np

from cloud.controller.costmodel import (
    Choice,
    CloudState,
    CostGrid,
    DeviceCostProfile,
    LinkState,
    device_stage_ms,
    estimate,
    estimate_grid,
)
from cloud.controller.planner import (
    ClassInputs,
    Constraints,
    chain_split_latency_ms,
    neurosurgeon_argmin,
    row_constraints,
    select,
)
from pipelines.catalog import LevelEntry, ModelCatalog
from splitsense.config import ClassObjectiveConfig
from splitsense.errors import ConfigError
from splitsense.kinds import Codec
from splitsense.plan import BatteryState, Objective

__all__ = [
    "POLICIES",
    "BudgetFeasibility",
    "Policy",
    "PolicyInputs",
    "OracleTable",
    "all_cloud_choice",
    "all_local_choice",
    "budget_feasibility",
    "calibrated_catalog",
    "choice_text",
    "cloud_input_choice",
    "fixed_cut_choice",
    "infeasible_reason",
    "oracle_choice",
    "policy_inputs",
]


class Policy(StrEnum):
    ADAPTIVE = "adaptive"
    ALL_LOCAL = "all_local"
    ALL_CLOUD = "all_cloud"
    CLOUD_INPUT = "cloud_input"
    FIXED_CUT = "fixed_cut"
    ORACLE = "oracle"


POLICIES: tuple[Policy, ...] = tuple(Policy)


@dataclass(frozen=True)
class PolicyInputs:
    """What the cost-model policies know about one (device class, model)."""

    catalog: ModelCatalog
    device: DeviceCostProfile
    cloud: CloudState
    rtt_ms: float
    constraints: Constraints  # the class's NORMAL-battery row: objective and budgets
    # (cut, level) fronts the device cannot hold, with the reason (pipelines.devices.front_fits);
    # empty: every front fits. Cut 0 (preprocessing only) always fits and is never listed.
    unfit: Mapping[tuple[int, float], str] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        if not (math.isfinite(self.rtt_ms) and self.rtt_ms >= 0):
            raise ConfigError(f"rtt_ms must be finite and >= 0, got {self.rtt_ms!r}")
        unfit = {(int(k), float(lvl)): str(why) for (k, lvl), why in self.unfit.items() if int(k) > 0}
        object.__setattr__(self, "unfit", unfit)

    def fits(self, cut: int, level: float = 1.0) -> bool:
        return (int(cut), float(level)) not in self.unfit

    @property
    def objective(self) -> Objective:
        return self.constraints.objective


def policy_inputs(
    catalog: ModelCatalog,
    device: DeviceCostProfile,
    objective: ClassObjectiveConfig,
    rtt_ms: float,
    cloud: CloudState,
    unfit: Mapping[tuple[int, float], str] | None = None,
) -> PolicyInputs:
    """PolicyInputs with the class's objective and budgets exactly as the planner reads them."""
    cls = ClassInputs(
        device=device,
        objective=Objective(objective.objective),
        rtt_ms=rtt_ms,
        energy_budget_mw=objective.energy_budget_mw,
        deadline_ms=objective.deadline_ms,
        accuracy_budget_points=objective.accuracy_budget_points,
    )
    constraints = row_constraints(cls, catalog, BatteryState.NORMAL)
    return PolicyInputs(catalog, device, cloud, rtt_ms, constraints, dict(unfit or {}))


# ---------------------------------------------------------------------------------------------
# The fixed baselines


def all_local_choice(catalog: ModelCatalog) -> Choice:
    """Stages [0, N) on the device: nothing crosses the wire."""
    return Choice(catalog.n_stages)


def all_cloud_choice(catalog: ModelCatalog) -> Choice:  # noqa: ARG001 (same signature as its twin)
    """Cut 0: the preprocessed input is uploaded, fp32 (exact), the cloud runs the whole model."""
    return Choice(0, 1.0, Codec.FP32)


def cloud_input_choice(catalog: ModelCatalog, accuracy_budget_points: float = math.inf) -> Choice:
    """Cut 0 with the best codec: the fewest bytes at cut 0 among the catalog's codecs whose
    accuracy there loses at most `accuracy_budget_points` (points below the model's own; fp32 is
    exact, so there is always one). Ties: the more accurate, then the catalog's (Codec) order."""
    budget = float(accuracy_budget_points)
    if math.isnan(budget) or budget < 0:
        raise ConfigError(f"accuracy_budget_points must be >= 0 (inf: none), got {accuracy_budget_points!r}")
    ok = [
        (c.activation_bytes[0], -c.accuracy[0], i, c.codec)
        for i, c in enumerate(catalog.codecs)
        if c.available_at(0) and (catalog.base_accuracy - c.accuracy[0]) * 100.0 <= budget + _ACC_SLACK_POINTS
    ]
    if not ok:  # only with a malformed catalog: fp32 is exact
        return Choice(0, 1.0, Codec.FP32)
    return Choice(0, 1.0, min(ok)[3])


def infeasible_reason(policy: Policy | str, inputs: PolicyInputs) -> str | None:
    """Why `policy` cannot run on the class of `inputs` at all (None: it can): all_local when the
    whole model does not fit the device's memory. The others always have a choice that fits (cut 0:
    preprocessing only), and fixed_cut and the oracle choose among the fronts that fit."""
    if Policy(policy) is Policy.ALL_LOCAL:
        n = inputs.catalog.n_stages
        why = inputs.unfit.get((n, 1.0))
        if why is not None:
            return f"all_local needs the whole model ({n} stages) on the device: {why}"
    return None


def fixed_cut_choice(inputs: PolicyInputs, bandwidth_mbps: float) -> Choice:
    """Neurosurgeon's one-time argmin over the cuts (uncompressed, fp32) at `bandwidth_mbps`.

    Latency objective: `neurosurgeon_argmin` on the class's per-stage device latency (profile x
    speed factor), the cloud's per-stage latency plus its fixed per-request cost on the cloud side,
    and the fp32 activation bytes. Energy objective: Neurosurgeon's energy mode, the cut of least
    device energy under the cost model (compute + radio with its tail + waiting). Ties: the
    shallower cut (Neurosurgeon's first minimum). Only cuts whose front fits the device's memory
    (`inputs.unfit`) are candidates: a partition that cannot be deployed is not one.
    """
    bw = _bandwidth(bandwidth_mbps)
    cat = inputs.catalog
    n = cat.n_stages
    fits = [k for k in range(n + 1) if inputs.fits(k)]
    if inputs.objective is Objective.LATENCY:
        if bw <= 0:
            return Choice(n if inputs.fits(n) else 0)
        dev, _ = device_stage_ms(cat, inputs.device)
        cloud = list(inputs.cloud.stage_latency_ms(cat))
        cloud[-1] += inputs.cloud.fixed_ms  # one request's queueing + overhead, paid once per offload
        act = cat.codec(Codec.FP32).activation_bytes[:n]
        if len(fits) == n + 1:
            return Choice(neurosurgeon_argmin(dev, cloud, act, bw, inputs.rtt_ms))
        lat = {k: chain_split_latency_ms(dev, cloud, act, bw, inputs.rtt_ms, k) for k in fits}
        return Choice(min(fits, key=lambda k: (lat[k], k)))
    link = LinkState(bw, inputs.rtt_ms)
    energies = {k: estimate(cat, inputs.device, link, inputs.cloud, Choice(k)).energy_mj for k in fits}
    best = min(fits, key=lambda k: (energies[k], k))
    return Choice(best)


# ---------------------------------------------------------------------------------------------
# The oracle


def oracle_choice(inputs: PolicyInputs, bandwidth_mbps: float) -> Choice:
    """The exact optimum of the cost model at the true bandwidth (the planner's `select`, which
    tests hold equal to `planner.exhaustive_best`)."""
    return OracleTable(inputs).choose(bandwidth_mbps)


@dataclass
class OracleTable:
    """The oracle's choice per bandwidth, computed vectorised and memoised by exact value.

    Traces are piecewise constant, so a fleet meets a few thousand distinct bandwidths at most:
    `prime(values)` computes them all in one `estimate_grid` call, `choose(bw)` looks one up (and
    computes it on a miss).
    """

    inputs: PolicyInputs
    _cache: dict[float, Choice] = field(default_factory=dict, repr=False)

    def prime(self, bandwidths_mbps: Sequence[float] | np.ndarray) -> None:
        values = sorted({_bandwidth(b) for b in np.asarray(bandwidths_mbps, dtype=np.float64).ravel()})
        todo = [v for v in values if v not in self._cache]
        if not todo:
            return
        grid = _oracle_grid(self.inputs, todo)
        for b, v in enumerate(todo):
            choice = grid.choices[select(grid, b, self.inputs.constraints).index]
            if not self.inputs.fits(choice.cut, choice.level):  # nothing fits and meets the budget
                choice = cloud_input_choice(self.inputs.catalog, self.inputs.constraints.accuracy_budget_points)
            self._cache[v] = choice

    def choose(self, bandwidth_mbps: float) -> Choice:
        bw = _bandwidth(bandwidth_mbps)
        choice = self._cache.get(bw)
        if choice is None:
            self.prime([bw])
            choice = self._cache[bw]
        return choice

    def __len__(self) -> int:
        return len(self._cache)


def _oracle_grid(inputs: PolicyInputs, bandwidths_mbps: Sequence[float]) -> CostGrid:
    """Every choice's cost at each bandwidth; fronts the device cannot hold are put out of every
    accuracy budget, so that neither the oracle nor a budget check counts them."""
    links = [LinkState(v, inputs.rtt_ms) for v in bandwidths_mbps]
    grid = estimate_grid(inputs.catalog, inputs.device, links, inputs.cloud)
    if inputs.unfit:
        mask = np.array([not inputs.fits(c.cut, c.level) for c in grid.choices])
        grid = replace(grid, accuracy_loss_points=np.where(mask, np.inf, grid.accuracy_loss_points))
    return grid


@dataclass(frozen=True)
class BudgetFeasibility:
    """Per bandwidth (in the order given): whether some choice meets the class's budget, and the least
    value of the budgeted metric any choice reaches (energy mJ per window, or latency ms)."""

    budget: str  # "energy" (a latency class's energy budget) | "deadline" (an energy class's)
    limit: float  # mJ per window or ms; inf: the class has no such budget
    feasible: np.ndarray  # (B,) bool
    least: np.ndarray  # (B,) float

    @property
    def share(self) -> float | None:
        """The share of the bandwidths at which the budget can be met (None: none given)."""
        return float(self.feasible.mean()) if self.feasible.size else None


def budget_feasibility(inputs: PolicyInputs, bandwidths_mbps: Sequence[float] | np.ndarray) -> BudgetFeasibility:
    """Whether any choice within the class's accuracy budget, whose front the device can hold, meets
    its energy budget (latency objective) or deadline (energy objective) at each bandwidth: the
    planner's own test (`planner.select(...).feasible`), on the candidates the oracle has."""
    cons = inputs.constraints
    latency_first = cons.objective is Objective.LATENCY
    budget, limit = ("energy", cons.energy_budget_mj) if latency_first else ("deadline", cons.deadline_ms)
    values = [_bandwidth(b) for b in np.asarray(bandwidths_mbps, dtype=np.float64).ravel()]
    if not values:
        return BudgetFeasibility(budget, limit, np.zeros(0, dtype=bool), np.zeros(0))
    distinct = sorted(set(values))
    grid = _oracle_grid(inputs, distinct)
    candidates = (grid.accuracy_loss_points <= cons.accuracy_budget_points + _ACC_SLACK_POINTS) & grid.fits
    metric = grid.energy_mj if latency_first else grid.total_ms
    by_value = {}
    for b, v in enumerate(distinct):
        least = np.where(candidates, metric[b], np.inf).min() if candidates.any() else np.inf
        sel = select(grid, b, cons)
        by_value[v] = (sel.feasible and sel.fits, float(least))
    feasible = np.array([by_value[v][0] for v in values], dtype=bool)
    least = np.array([by_value[v][1] for v in values])
    return BudgetFeasibility(budget, limit, feasible, least)


_ACC_SLACK_POINTS = 1e-9  # as the planner: accuracies equal up to float noise meet a budget


def _bandwidth(value: float) -> float:
    bw = float(value)
    if math.isnan(bw) or bw < 0:
        raise ConfigError(f"bandwidth must be >= 0 Mbit/s, got {value!r}")
    if bw < 1e-9:  # a bit per 1000 s: nothing gets through (and no float overflow downstream)
        return 0.0
    return min(bw, 1e6)  # +inf and absurd values: a link no transfer waits on


# ---------------------------------------------------------------------------------------------
# Knowing the simulated hardware


def calibrated_catalog(
    catalog: ModelCatalog, host_stage_ms: Sequence[float], host_prep_ms: float | None = None
) -> ModelCatalog:
    """`catalog` with its per-stage host latency replaced by `host_stage_ms` (measured where the
    simulated devices actually run), every compression level's front scaled by the same per-cut
    ratio, and its preprocessing's `prep_ms` by `host_prep_ms` when given. What the oracle and
    fixed_cut know of the device's compute: the truth of this host."""
    new = [float(v) for v in host_stage_ms]
    if len(new) != catalog.n_stages or not all(math.isfinite(v) and v >= 0 for v in new):
        raise ConfigError(
            f"host_stage_ms needs {catalog.n_stages} finite values >= 0 for {catalog.model!r}, "
            f"got {list(host_stage_ms)}"
        )
    cum = [0.0]
    for v in new:
        cum.append(cum[-1] + v)
    old_cum = catalog.levels[0].front_latency_ms
    levels = []
    for lvl in catalog.levels:
        if lvl.energy_kept >= 1.0:
            front = tuple(cum)
        else:
            front = tuple(
                0.0 if k == 0 else (f * cum[k] / old_cum[k] if old_cum[k] > 0 else cum[k])
                for k, f in enumerate(lvl.front_latency_ms)
            )
        levels.append(LevelEntry(lvl.energy_kept, front, lvl.front_params, lvl.accuracy))
    if host_prep_ms is not None and not (math.isfinite(host_prep_ms) and host_prep_ms >= 0):
        raise ConfigError(f"host_prep_ms must be a finite number >= 0 for {catalog.model!r}, got {host_prep_ms!r}")
    prep_ms = catalog.prep_ms if host_prep_ms is None else float(host_prep_ms)
    return replace(catalog, stage_latency_ms=tuple(new), levels=tuple(levels), prep_ms=prep_ms)


def choice_text(catalog: ModelCatalog, choice: Choice) -> str:
    """'local', or 'cut 3 int8' (plus the level when the front is compressed)."""
    if choice.cut >= catalog.n_stages:
        return "local"
    lvl = "" if choice.level >= 1.0 else f" level {choice.level:g}"
    return f"cut {choice.cut} {choice.codec.value}{lvl}"
