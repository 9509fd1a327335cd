"""The offloading policies a fleet is run under, and the pure choice logic of the baselines.

Every policy runs on the same inputs (traces, offsets, recordings, seeds); only who picks each
window's (cut, front compression level, codec) differs:

    adaptive    the controller's plans (per class, per bandwidth bucket and battery state) and the
                device's own live estimates choosing the row: the product (edge/runtime.py)
    all_local   k = N for every window: the whole model on the device, nothing sent
    all_cloud   k = 0 for every window: the preprocessed input goes up (fp32, exact), the classic
                cloud-offload baseline
    fixed_cut   Neurosurgeon (Kang et al., ASPLOS 2017): one argmin over the cuts at start, from
                the bandwidth a first probe measures, uncompressed and fp32, then kept for the run.
                Latency classes take Neurosurgeon's latency argmin (`planner.neurosurgeon_argmin`);
                energy classes its energy mode (argmin of the cost model's device energy over the
                cuts). No budgets, no compression, no codec: what Neurosurgeon searches.
    oracle      in hindsight, per window: the exact optimum of the cost model over every (k, level,
                codec) under the class's objective and budgets, at the TRUE bandwidth of the
                device's link at that moment (outages included: 0 Mbit/s is "fully local"). Perfect
                knowledge of the link, then executed for real like every other policy.

Pure: numbers in, choices out. The fleet runner (simulators/fleet.py) turns a choice into an
`edge.runtime.ForcedChoice` for the device; the adaptive policy imposes nothing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum

import numpy as np

from cloud.controller.costmodel import (
    Choice,
    CloudState,
    DeviceCostProfile,
    LinkState,
    device_stage_ms,
    estimate,
    estimate_grid,
)
from cloud.controller.planner import ClassInputs, Constraints, neurosurgeon_argmin, row_constraints, select
from pipelines.catalog import LevelEntry, ModelCatalog
from pipelines.codecs import Codec
from splitsense.config import ClassObjectiveConfig
from splitsense.errors import ConfigError
from splitsense.plan import BatteryState, Objective

__all__ = [
    "POLICIES",
    "Policy",
    "PolicyInputs",
    "OracleTable",
    "all_cloud_choice",
    "all_local_choice",
    "calibrated_catalog",
    "choice_text",
    "fixed_cut_choice",
    "oracle_choice",
    "policy_inputs",
]


class Policy(StrEnum):
    ADAPTIVE = "adaptive"
    ALL_LOCAL = "all_local"
    ALL_CLOUD = "all_cloud"
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

    def __post_init__(self) -> None:
        if not (math.isfinite(self.rtt_ms) and self.rtt_ms >= 0):
            raise ConfigError(f"rtt_ms must be finite and >= 0, got {self.rtt_ms!r}")

    @property
    def objective(self) -> Objective:
        return self.constraints.objective


def policy_inputs(
    catalog: ModelCatalog,
    device: DeviceCostProfile,
    objective: ClassObjectiveConfig,
    rtt_ms: float,
    cloud: CloudState,
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
    return PolicyInputs(catalog, device, cloud, rtt_ms, row_constraints(cls, catalog, BatteryState.NORMAL))


# ---------------------------------------------------------------------------------------------
# The fixed baselines


def all_local_choice(catalog: ModelCatalog) -> Choice:
    """Stages [0, N) on the device: nothing crosses the wire."""
    return Choice(catalog.n_stages)


def all_cloud_choice(catalog: ModelCatalog) -> Choice:  # noqa: ARG001 (same signature as its twin)
    """Cut 0: the preprocessed input is uploaded, fp32 (exact), the cloud runs the whole model."""
    return Choice(0, 1.0, Codec.FP32)


def fixed_cut_choice(inputs: PolicyInputs, bandwidth_mbps: float) -> Choice:
    """Neurosurgeon's one-time argmin over the cuts (uncompressed, fp32) at `bandwidth_mbps`.

    Latency objective: `neurosurgeon_argmin` on the class's per-stage device latency (profile x
    speed factor), the cloud's per-stage latency plus its fixed per-request cost on the cloud side,
    and the fp32 activation bytes. Energy objective: Neurosurgeon's energy mode, the cut of least
    device energy under the cost model (compute + radio with its tail + waiting). Ties: the
    shallower cut (Neurosurgeon's first minimum).
    """
    bw = _bandwidth(bandwidth_mbps)
    cat = inputs.catalog
    n = cat.n_stages
    if inputs.objective is Objective.LATENCY:
        dev, _ = device_stage_ms(cat, inputs.device)
        cloud = list(inputs.cloud.stage_latency_ms(cat))
        cloud[-1] += inputs.cloud.fixed_ms  # one request's queueing + overhead, paid once per offload
        act = cat.codec(Codec.FP32).activation_bytes[:n]
        if bw <= 0:
            return Choice(n)
        return Choice(neurosurgeon_argmin(dev, cloud, act, bw, inputs.rtt_ms))
    link = LinkState(bw, inputs.rtt_ms)
    energies = [estimate(cat, inputs.device, link, inputs.cloud, Choice(k)).energy_mj for k in range(n + 1)]
    best = min(range(n + 1), key=lambda k: (energies[k], k))
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
        grid = estimate_grid(
            self.inputs.catalog, self.inputs.device, [LinkState(v, self.inputs.rtt_ms) for v in todo], self.inputs.cloud
        )
        for b, v in enumerate(todo):
            self._cache[v] = grid.choices[select(grid, b, self.inputs.constraints).index]

    def choose(self, bandwidth_mbps: float) -> Choice:
        bw = _bandwidth(bandwidth_mbps)
        choice = self._cache.get(bw)
        if choice is None:
            self.prime([bw])
            choice = self._cache[bw]
        return choice

    def __len__(self) -> int:
        return len(self._cache)


def _bandwidth(value: float) -> float:
    bw = float(value)
    if math.isnan(bw) or bw < 0:
        raise ConfigError(f"bandwidth must be >= 0 Mbit/s, got {value!r}")
    if bw < 1e-9:  # a bit per 1000 s: nothing gets through (and no float overflow downstream)
        return 0.0
    return min(bw, 1e6)  # +inf and absurd values: a link no transfer waits on


# ---------------------------------------------------------------------------------------------
# Knowing the simulated hardware


def calibrated_catalog(catalog: ModelCatalog, host_stage_ms: Sequence[float]) -> ModelCatalog:
    """`catalog` with its per-stage host latency replaced by `host_stage_ms` (measured where the
    simulated devices actually run), every compression level's front scaled by the same per-cut
    ratio. What the oracle and fixed_cut know of the device's compute: the truth of this host."""
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
    return replace(catalog, stage_latency_ms=tuple(new), levels=tuple(levels))


def choice_text(catalog: ModelCatalog, choice: Choice) -> str:
    """'local', or 'cut 3 int8' (plus the level when the front is compressed)."""
    if choice.cut >= catalog.n_stages:
        return "local"
    lvl = "" if choice.level >= 1.0 else f" level {choice.level:g}"
    return f"cut {choice.cut} {choice.codec.value}{lvl}"
