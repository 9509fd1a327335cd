"""A fleet run's figures: the summary object, the report folder, and its plots.

    summarize(result)        the `simulate --json` object: {"config", "objective", "policies":
                             {policy: {class: {windows, lost, accuracy, latency_ms_p50,
                             latency_ms_p95, latency_ms_mean, energy_mj_per_window, offload_ratio,
                             split_ratio, split_attempt_ratio, mechanisms, estimate_error,
                             radio_overhead_mj_per_window}}},
                             "realtime_factor"}; a policy that cannot run on a class (the device
                             cannot hold what it needs) has {"infeasible": true, "reason": ...} for
                             that class instead
    comparison(result)       per class, on its objective: adaptive against all_local, all_cloud,
                             cloud_input and oracle, its accuracy against the local full model, and
                             its budget (the energy budget of a latency class, the deadline of an
                             energy class): each policy's mean against it, and the share of windows
                             at which any choice could meet it at all
    write_report(result, d)  d/report.json (every figure and the configuration it was measured
                             with), d/windows.jsonl (one line per window), and PNG plots:
                             latency_cdf.png, energy_per_window.png, device_timeline.png
    render_summary(...)      the table printed at the end of a run

The objective metric of a class is what its planner minimises per window: mean latency (ms) for
"latency" classes, mean energy per window (mJ) for "energy" classes.

Which mechanisms were really used, per policy and class (N: the model's number of stages):
    split_ratio          share of windows whose result came from the cloud after an intermediate
                         cut 0 < k < N (the front ran on the device, the activation went up)
    split_attempt_ratio  share of windows whose choice was an intermediate cut, answered or not
    mechanisms           shares of windows: "mode" (offloaded | local | fallback), "cut" (the
                         choice's k, "local" for k = N), "codec" (of what was sent, "none" when
                         nothing was), "level" (front compression, energy kept), and "fallback"
                         (per typed kind, edge.route.FallbackKind: windows whose choice offloaded
                         but that ran on the device, e.g. "deadline", "late" (hedged: the local tail
                         answered first), "link_down", "breaker", "probing"), and "stored"
                         (per typed kind: windows of a device without local fallback that were
                         stored and forwarded later, by why they were stored, e.g. "deadline",
                         "breaker")
    estimate_error       the device's own bandwidth estimate against the link's true bandwidth when
                         the window ran, estimate / true, over the windows the cloud answered that
                         sent something on a live link (true > 0): {median_ratio, p10_ratio,
                         p90_ratio, windows}; null when the policy sent no such window

A budget no choice can meet is not one a policy exceeds: `comparison` gives each class's budget a
`feasible_share`, the share of its windows (the oracle's, at their true bandwidth) at which some choice
within the accuracy budget and the device's memory met it under the cost model
(`simulators.policies.budget_feasibility`, the planner's own test), and the summary says "infeasible
for every choice at N% of windows" where that share is below 1. It needs the class's policy inputs,
`result.extra["policy_inputs"]` ({class: PolicyInputs}); without them the share is null.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.devices import DEVICE_CLASSES
from pipelines.groups import group_members
from simulators.capacity import capacity_verdict
from simulators.fleet import FleetProgress, FleetResult, PolicyRun, WindowRecord
from simulators.link import ShapingSchedule
from simulators.policies import BudgetFeasibility, PolicyInputs
from simulators.policies import budget_feasibility as _feasibility
from simulators.scenario import DeviceSpec
from splitsense.config import Config

__all__ = [
    "BASELINES",
    "CLASS_KEYS",
    "ConsoleProgress",
    "MECHANISM_KEYS",
    "PLOTS",
    "TIE_TOLERANCE",
    "budget_feasibility",
    "class_stats",
    "comparison",
    "estimate_error",
    "infeasible_entry",
    "mechanisms",
    "budget_verdict",
    "render_summary",
    "summarize",
    "timeline_device",
    "write_report",
]

CLASS_KEYS = (
    "windows",
    "lost",
    "accuracy",
    "latency_ms_p50",
    "latency_ms_p95",
    "latency_ms_mean",
    "energy_mj_per_window",
    "offload_ratio",
    "split_ratio",
    "split_attempt_ratio",
    "mechanisms",
    "estimate_error",
    "radio_overhead_mj_per_window",  # set by the policy tables from PolicyRun.radio_overhead_mj
)
MECHANISM_KEYS = ("mode", "cut", "codec", "level", "fallback", "stored")
BASELINES = ("all_local", "all_cloud", "cloud_input")  # what adaptive is compared with, besides the oracle
PLOTS = ("latency_cdf.png", "energy_per_window.png", "device_timeline.png")
# A tie with a baseline: the oracle chose that baseline's choice for at least TIE_SHARE of the
# windows (it is optimal throughout: there is nothing to beat), adaptive made the same choice for at
# least TIE_SHARE of them, and its objective is within TIE_TOLERANCE of the baseline's. Two runs of
# the same choices differ by the host's noise alone (the event loop of a shared 2-core machine).
TIE_SHARE = 0.9
TIE_TOLERANCE = 0.15
ORACLE_MARGIN = 0.15  # adaptive must come within 15% of the oracle
ACCURACY_POINTS = 1.0  # adaptive accuracy within 1 point of the local full model

_STRETCHED = {
    "reference": "each stage's and the preprocessing's host time from the model's catalog (this host, "
    "uncontended: the basis of the speed factors, and what the planner's cost model uses)",
    "measured": "the CPU time this host's thread actually took for the window",
}


def simulated_hardware_note(compute_time: str) -> str:
    """What the report says about the simulated devices."""
    return (
        "Devices are simulated hardware: their preprocessing and stages run for real on this host (one "
        f"torch thread), and {_STRETCHED.get(compute_time, compute_time)} is stretched by the class's speed "
        "factor, the device waiting out the difference (a microcontroller: MACs at its rate). A call after "
        "the radio went idle first waits the promotion the device's own radio state says is due; the link "
        "plays TCP slow start after idle; the platform reports a scripted outage a radio-specific detection "
        "time after it starts. Energy is the class's active power times the stretched compute time, plus "
        "the radio state's energy of the window's own calls, airtime on the true link (Huang et al. 2012 "
        "model with promotion and tails, as the controller uses), plus idle power while waiting for the "
        "cloud; radio energy no window carries (telemetry, pings, probes) is radio_overhead_mj_per_window."
    )


_POLICY_COLORS = {
    "adaptive": "#1b9e77",
    "all_local": "#7570b3",
    "all_cloud": "#d95f02",
    "cloud_input": "#e6ab02",
    "fixed_cut": "#e7298a",
    "oracle": "#444444",
}
_MODE_COLORS = {"offloaded": "#1b9e77", "local": "#7570b3", "fallback": "#d62728"}


# ---------------------------------------------------------------------------------------------
# Numbers


def _by_class(records: Iterable[WindowRecord]) -> dict[str, list[WindowRecord]]:
    out: dict[str, list[WindowRecord]] = defaultdict(list)
    for r in records:
        out[r.device_class].append(r)
    return out


def _expected_by_class(run: PolicyRun, specs: Sequence[DeviceSpec]) -> dict[str, int]:
    cls = {s.device_id: s.device_class for s in specs}
    out: dict[str, int] = defaultdict(int)
    for device_id, n in run.windows_expected.items():
        out[cls[device_id]] += n
    return out


def _r(x: float | np.floating[Any], digits: int = 3) -> float:
    return round(float(x), digits)


def _is_split(r: WindowRecord) -> bool:
    return 0 < r.cut < r.n_stages


def _cloud_answered(r: WindowRecord) -> bool:
    """The cloud ran the tail: offloaded now, or stored and forwarded later (deferred)."""
    return r.mode in ("offloaded", "deferred")


def _cut_key(r: WindowRecord) -> str:
    return "local" if r.cut >= r.n_stages else str(r.cut)


def _fallback_kind(r: WindowRecord) -> str | None:
    """The kind of fallback of a window whose choice offloaded but that ran on the device (None:
    not one): the failure ("deadline", "unavailable", ...) or why it was not sent ("circuit
    breaker open", "no broker")."""
    if r.mode == "fallback" or (r.mode == "local" and r.cut < r.n_stages):
        return r.reason or "unknown"
    return None


def _shares(keys: Iterable[str | None], n: int, order: Any = None) -> dict[str, float]:
    counts: dict[str, int] = defaultdict(int)
    for k in keys:
        if k is not None:
            counts[k] += 1
    return {k: _r(counts[k] / n, 4) for k in sorted(counts, key=order)}


def mechanisms(records: Sequence[WindowRecord]) -> dict[str, dict[str, float]]:
    """Shares of `records` per mode, cut, codec sent, front level, fallback kind and why a deferred
    window was stored (MECHANISM_KEYS)."""
    n = len(records)
    if n == 0:
        return {k: {} for k in MECHANISM_KEYS}
    return {
        "mode": _shares((r.mode for r in records), n),
        "cut": _shares((_cut_key(r) for r in records), n, lambda k: (k == "local", int(k) if k.isdigit() else 0)),
        "codec": _shares((r.codec or "none" for r in records), n, lambda k: (k == "none", k)),
        "level": _shares((f"{r.level:g}" for r in records), n, lambda k: -float(k)),
        "fallback": _shares((_fallback_kind(r) for r in records), n),
        "stored": _shares(((r.reason or "unknown") if r.mode == "deferred" else None for r in records), n),
    }


def estimate_error(records: Sequence[WindowRecord]) -> dict[str, Any] | None:
    """estimate_mbps / true_mbps over the windows the cloud answered (offloaded or deferred) that sent
    something while the link was up: {median_ratio, p10_ratio, p90_ratio, windows}; None without any."""
    ratios = np.array(
        [
            r.estimate_mbps / r.true_mbps
            for r in records
            if _cloud_answered(r) and r.bytes_sent > 0 and r.true_mbps > 0 and math.isfinite(r.estimate_mbps)
        ]
    )
    if ratios.size == 0:
        return None
    return {
        "median_ratio": _r(np.median(ratios), 4),
        "p10_ratio": _r(np.percentile(ratios, 10), 4),
        "p90_ratio": _r(np.percentile(ratios, 90), 4),
        "windows": int(ratios.size),
    }


def class_stats(records: Sequence[WindowRecord], expected: int, *, full: bool = False) -> dict[str, Any]:
    """The per-class figures of one policy (CLASS_KEYS; `full` adds tails, energy parts, counts)."""
    n = len(records)
    if n == 0:
        base: dict[str, Any] = dict.fromkeys(CLASS_KEYS, 0)
        base.update(windows=0, lost=expected, accuracy=None, latency_ms_p50=None, latency_ms_p95=None)
        base.update(latency_ms_mean=None, energy_mj_per_window=None, offload_ratio=None)
        base.update(split_ratio=None, split_attempt_ratio=None, mechanisms=mechanisms([]), estimate_error=None)
        base.update(radio_overhead_mj_per_window=None)
        return base
    lat = np.array([r.latency_ms for r in records])
    energy = np.array([r.energy_mj for r in records])
    out: dict[str, Any] = {
        "windows": n,
        "lost": max(expected - n, 0),
        "accuracy": _r(sum(r.correct for r in records) / n, 4),
        "latency_ms_p50": _r(np.percentile(lat, 50)),
        "latency_ms_p95": _r(np.percentile(lat, 95)),
        "latency_ms_mean": _r(lat.mean()),
        "energy_mj_per_window": _r(energy.mean(), 4),
        "offload_ratio": _r(sum(_cloud_answered(r) for r in records) / n, 4),
        "split_ratio": _r(sum(_cloud_answered(r) and _is_split(r) for r in records) / n, 4),
        "split_attempt_ratio": _r(sum(_is_split(r) for r in records) / n, 4),
        "mechanisms": mechanisms(records),
        "estimate_error": estimate_error(records),
        "radio_overhead_mj_per_window": None,
    }
    tasks: dict[str, list[bool]] = defaultdict(list)
    for r in records:
        for m, ok in r.tasks_correct:
            tasks[m].append(ok)
    if tasks:  # a window that served several tasks: each extra task's accuracy too
        out["task_accuracy"] = {m: _r(sum(v) / len(v), 4) for m, v in tasks.items()}
    if full:
        modes: dict[str, int] = defaultdict(int)
        reasons: dict[str, int] = defaultdict(int)
        cuts: dict[str, int] = defaultdict(int)
        for r in records:
            modes[r.mode] += 1
            cuts["local" if r.cut >= r.n_stages else str(r.cut)] += 1
            if r.mode == "fallback":
                reasons[r.reason or "unknown"] += 1
        out.update(
            latency_ms_p99=_r(np.percentile(lat, 99)),
            lag_ms_p95=_r(np.percentile([r.lag_ms for r in records], 95)),
            compute_mj_per_window=_r(np.mean([r.compute_mj for r in records]), 4),
            radio_mj_per_window=_r(np.mean([r.radio_mj for r in records]), 4),
            wait_mj_per_window=_r(np.mean([r.wait_mj for r in records]), 4),
            bytes_sent_per_window=_r(np.mean([r.bytes_sent for r in records]), 1),
            modes=dict(modes),
            cuts=dict(cuts),
            fallbacks_by_reason=dict(reasons),
            true_mbps_mean=_r(np.mean([r.true_mbps for r in records])),
        )
    return out


def _class_order(result: FleetResult) -> list[str]:
    return list(result.config.simulator.device_classes)


def infeasible_entry(reason: str) -> dict[str, Any]:
    """What a policy reports for a class it cannot run on, instead of figures."""
    return {"infeasible": True, "reason": reason}


def _policy_tables(result: FleetResult, *, full: bool) -> dict[str, dict[str, dict[str, Any]]]:
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for policy, run in result.runs.items():
        groups = _by_class(run.records)
        expected = _expected_by_class(run, result.specs)
        out[policy] = {
            c: (
                infeasible_entry(run.infeasible[c])
                if c in run.infeasible
                else class_stats(groups.get(c, []), expected.get(c, 0), full=full)
            )
            for c in _class_order(result)
        }
        overhead = _radio_overhead_by_class(run, result.specs)
        for c, entry in out[policy].items():
            if not entry.get("infeasible") and entry.get("windows"):
                entry["radio_overhead_mj_per_window"] = _r(overhead.get(c, 0.0) / entry["windows"], 4)
    return out


def _radio_overhead_by_class(run: PolicyRun, specs: Sequence[DeviceSpec]) -> dict[str, float]:
    """Radio energy no window carries (telemetry reports, breaker probes, the tail pending at the
    end; PolicyRun.radio_overhead_mj), summed per class: the same for every policy but the probes."""
    cls = {s.device_id: s.device_class for s in specs}
    out: dict[str, float] = defaultdict(float)
    for device_id, mj in run.radio_overhead_mj.items():
        out[cls[device_id]] += mj
    return out


def realtime_factor(result: FleetResult) -> float:
    """The slowest policy's sensor time / wall time (1.0: the fleet kept up with its sensors);
    a policy that ran no device (infeasible on every class) does not count."""
    factors = [run.realtime_factor for run in result.runs.values() if sum(run.windows_expected.values()) > 0]
    return _r(min(factors), 4) if factors else 0.0


def config_echo(result: FleetResult, report_dir: Path | None = None) -> dict[str, Any]:
    sim = result.config.to_dict()["simulator"]
    sim.update(
        backend=result.backend,
        # how the fleet ran: one process, or shards (Ray actors) with fronts computed or reused
        fleet=result.extra.get("fleet") or {"mode": "one_process", "shards": 1, "reuse": False},
        controller_period_s=result.config.controller.period_s,
        cloud_overhead_ms_assumed=result.cloud_overhead_ms,
        report_dir=str(report_dir) if report_dir is not None else None,
    )
    return sim


def summarize(result: FleetResult, report_dir: Path | None = None) -> dict[str, Any]:
    """The `simulate --json` object."""
    return {
        "config": config_echo(result, report_dir),
        "objective": dict(result.objectives),
        "policies": _policy_tables(result, full=False),
        "realtime_factor": realtime_factor(result),
    }


def _objective_metric(records: Sequence[WindowRecord], objective: str) -> float | None:
    if not records:
        return None
    if objective == "energy":
        return float(np.mean([r.energy_mj for r in records]))
    return float(np.mean([r.latency_ms for r in records]))


def _share(records: Sequence[WindowRecord], pred: Any) -> float | None:
    return sum(bool(pred(r)) for r in records) / len(records) if records else None


def _input_codec(records: Sequence[WindowRecord]) -> str | None:
    """The codec cloud_input sent (its most frequent; None: it sent nothing)."""
    counts: dict[str, int] = defaultdict(int)
    for r in records:
        if r.codec is not None:
            counts[r.codec] += 1
    return max(sorted(counts), key=lambda c: counts[c]) if counts else None


def comparison(result: FleetResult) -> dict[str, Any]:
    """Per class, on its objective: adaptive vs every baseline, and whether the issue's targets hold.

    A baseline that is infeasible on the class (the device cannot hold what it needs) gets
    `{"infeasible": true, "reason", "ratio": null, "met": true}`: there is nothing to beat."""
    out: dict[str, Any] = {}
    groups = {p: _by_class(run.records) for p, run in result.runs.items()}
    for cls in _class_order(result):
        objective = result.objectives[cls]
        metric = {p: _objective_metric(g.get(cls, []), objective) for p, g in groups.items()}
        infeasible = {p: run.infeasible[cls] for p, run in result.runs.items() if cls in run.infeasible}
        oracle_recs = groups.get("oracle", {}).get(cls, [])
        adaptive_recs = groups.get("adaptive", {}).get(cls, [])
        input_codec = _input_codec(groups.get("cloud_input", {}).get(cls, []))
        is_local = lambda r: r.cut >= r.n_stages  # noqa: E731
        is_cloud = lambda r: r.cut == 0 and (r.codec or "fp32") == "fp32"  # noqa: E731  (all_cloud's choice)
        is_input = lambda r, c=input_codec: r.cut == 0 and r.codec in (None, c)  # noqa: E731  (cloud_input's)
        preds = {"all_local": is_local, "all_cloud": is_cloud, "cloud_input": is_input}
        oracle_shares = {b: _share(oracle_recs, preds[b]) for b in BASELINES}
        adaptive_shares = {b: _share(adaptive_recs, preds[b]) for b in BASELINES}
        local_share, cloud_share = oracle_shares["all_local"], oracle_shares["all_cloud"]
        split = _share(adaptive_recs, lambda r: _cloud_answered(r) and _is_split(r))
        entry: dict[str, Any] = {
            "objective": objective,
            "metric": "mean energy per window (mJ)" if objective == "energy" else "mean latency (ms)",
            "values": {p: (None if v is None else _r(v, 4)) for p, v in metric.items()},
            "oracle_local_share": None if local_share is None else _r(local_share, 4),
            "oracle_cloud_share": None if cloud_share is None else _r(cloud_share, 4),
            "adaptive_local_share": None
            if adaptive_shares["all_local"] is None
            else _r(adaptive_shares["all_local"], 4),
            "adaptive_cloud_share": None
            if adaptive_shares["all_cloud"] is None
            else _r(adaptive_shares["all_cloud"], 4),
            "oracle_input_share": None if oracle_shares["cloud_input"] is None else _r(oracle_shares["cloud_input"], 4),
            "adaptive_input_share": None
            if adaptive_shares["cloud_input"] is None
            else _r(adaptive_shares["cloud_input"], 4),
            "adaptive_split_ratio": None if split is None else _r(split, 4),
        }
        if infeasible:
            entry["infeasible"] = dict(infeasible)
        budget = _budget(result, cls, objective)
        if budget is not None:  # the objective's constraint: is each policy within it?
            key = "energy_mj_per_window" if objective == "latency" else "latency_ms_mean"
            other = {
                p: (
                    float(np.mean([r.energy_mj if objective == "latency" else r.latency_ms for r in recs]))
                    if recs
                    else None
                )
                for p, g in groups.items()
                for recs in [g.get(cls, [])]
            }
            feas = budget_feasibility(result, cls)
            infeasible_least = None if feas is None else feas.least[~feas.feasible]
            if infeasible_least is not None:  # inf: no choice the device can hold runs there at all
                infeasible_least = infeasible_least[np.isfinite(infeasible_least)]
            entry["budget"] = {
                "what": f"{key} <= {budget:g}",
                "values": {p: None if v is None else _r(v, 4) for p, v in other.items()},
                "within": {p: None if v is None else v <= budget * (1 + 1e-9) for p, v in other.items()},
                # the share of the class's windows at which some choice met the budget (cost model)
                "feasible_share": None if feas is None or feas.share is None else _r(feas.share, 4),
                "windows": None if feas is None else int(feas.feasible.size),
                # where none could: the least value any choice reached, median over those windows
                # (null: none, or no choice the device can hold could run at all)
                "least_where_infeasible": None
                if infeasible_least is None or infeasible_least.size == 0
                else _r(np.median(infeasible_least), 4),
            }
        a = metric.get("adaptive")
        if a is not None:
            for base in BASELINES:
                if base in infeasible:
                    entry[f"adaptive_vs_{base}"] = {
                        "infeasible": True,
                        "reason": infeasible[base],
                        "ratio": None,
                        "beats": None,
                        "ties_where_optimal": None,
                        "met": True,
                    }
                    continue
                share = oracle_shares[base]
                b = metric.get(base)
                if b is None or b <= 0:
                    continue
                ratio = a / b
                beats = a < b
                mine = adaptive_shares[base]
                ties = (
                    share is not None
                    and share >= TIE_SHARE
                    and mine is not None
                    and mine >= TIE_SHARE
                    and ratio <= 1 + TIE_TOLERANCE
                )
                entry[f"adaptive_vs_{base}"] = {
                    "ratio": _r(ratio, 4),
                    "beats": beats,
                    "ties_where_optimal": ties,
                    "met": beats or ties,
                }
            o = metric.get("oracle")
            if o is not None and o > 0:
                same = same_choice_share(adaptive_recs, oracle_recs)
                within = a <= o * (1 + ORACLE_MARGIN)
                entry["adaptive_vs_oracle"] = {
                    "ratio": _r(a / o, 4),
                    # windows (device, index) both ran where adaptive chose what the oracle chose
                    "same_choice_share": None if same is None else _r(same, 4),
                    # identical choices on every window: what is left between them is host timing
                    "met": within or same == 1.0,
                }
            recs_a = groups.get("adaptive", {}).get(cls, [])
            recs_l = groups.get("all_local", {}).get(cls, [])
            acc_a, acc_l = _accuracy(recs_a), _accuracy(recs_l)
            if acc_a is not None and acc_l is not None:
                drop, noise, paired = paired_accuracy_drop(recs_a, recs_l)
                entry["accuracy"] = {
                    "adaptive": _r(acc_a, 4),
                    "local_full_model": _r(acc_l, 4),
                    "points_below_local": _r((acc_l - acc_a) * 100, 3),
                    # on the same windows (device, index) under both policies, and what sampling
                    # alone can move that by (95%): a drop within budget + noise is not a breach
                    "paired_windows": paired,
                    "paired_points_below_local": _r(drop * 100, 3),
                    "noise_points_95": _r(noise * 100, 3),
                    "met": drop * 100 <= ACCURACY_POINTS + noise * 100 + 1e-9,
                }
        out[cls] = entry
    out["zero_lost_windows"] = all(run.lost == 0 for run in result.runs.values())
    return out


def budget_feasibility(result: FleetResult, cls: str) -> BudgetFeasibility | None:
    """Whether some choice could meet the class's budget at each of its windows, at the bandwidth the
    window really had: the oracle's windows (else the first policy's that ran the class). None when
    the result carries no policy inputs for the class (`extra["policy_inputs"]`) or no window."""
    inputs = result.extra.get("policy_inputs", {}).get(cls)
    if not isinstance(inputs, PolicyInputs):
        return None
    runs = [result.runs["oracle"]] if "oracle" in result.runs else []
    runs += [run for name, run in result.runs.items() if name != "oracle"]
    for run in runs:
        bandwidths = [r.true_mbps for r in run.records if r.device_class == cls]
        if bandwidths:
            return _feasibility(inputs, bandwidths)
    return None


def _budget(result: FleetResult, cls: str, objective: str) -> float | None:
    """The budget of the class's objective, per window: energy (mJ) for latency classes (the power
    budget x the model's window, as the planner reads it), the deadline (ms) for energy classes."""
    from pipelines.models import get_spec

    obj = result.config.planner.classes.get(cls)
    if obj is None:
        return None
    if objective == "latency":
        if obj.energy_budget_mw is None:
            return None
        return obj.energy_budget_mw * get_spec(group_members(result.config.simulator.models[cls])[0]).window_s
    return obj.deadline_ms


def _choice_key(r: WindowRecord) -> tuple[Any, ...]:
    """What a window chose and how it ended up being answered (cloud or device)."""
    return (r.cut, r.codec, r.level, _cloud_answered(r))


def same_choice_share(adaptive: Sequence[WindowRecord], other: Sequence[WindowRecord]) -> float | None:
    """Share of the windows both policies ran (paired by device and window index) on which adaptive
    made the same choice as `other` and was answered the same way (None: no window paired)."""
    by_key = {(r.device_id, r.index): _choice_key(r) for r in other}
    pairs = [(by_key[(r.device_id, r.index)], _choice_key(r)) for r in adaptive if (r.device_id, r.index) in by_key]
    if not pairs:
        return None
    return sum(a == b for a, b in pairs) / len(pairs)


def paired_accuracy_drop(adaptive: Sequence[WindowRecord], local: Sequence[WindowRecord]) -> tuple[float, float, int]:
    """(accuracy of `local` minus `adaptive` on the windows both saw, the 95% half-width of that
    difference from sampling alone, how many windows were paired). Paired by (device, window index):
    only windows answered differently count (McNemar): drop = (b - c) / n, its standard error
    sqrt(b + c) / n, with b = local right and adaptive wrong, c = the other way round."""
    by_key = {(r.device_id, r.index): r.correct for r in local}
    pairs = [(by_key[(r.device_id, r.index)], r.correct) for r in adaptive if (r.device_id, r.index) in by_key]
    n = len(pairs)
    if n == 0:
        return 0.0, 0.0, 0
    b = sum(1 for lc, ac in pairs if lc and not ac)
    c = sum(1 for lc, ac in pairs if ac and not lc)
    return (b - c) / n, 1.96 * math.sqrt(b + c) / n, n


def _accuracy(records: Sequence[WindowRecord]) -> float | None:
    return sum(r.correct for r in records) / len(records) if records else None


def _longest_deadline_s(config: Config) -> float:
    """The longest a window of the fleet may take: its classes' deadlines (edge.deadline_ms where a
    class has none)."""
    classes = config.simulator.device_classes
    ms = [
        config.planner.classes[c].deadline_ms or config.edge.deadline_ms for c in classes if c in config.planner.classes
    ]
    return max(ms, default=config.edge.deadline_ms) / 1000.0


def realtime(result: FleetResult) -> dict[str, Any]:
    deadline_s = _longest_deadline_s(result.config)
    out = {}
    for policy, run in result.runs.items():
        lags = [r.lag_ms for r in run.records]
        answered = sum(1 for r in run.records if r.mode in ("offloaded", "deferred"))
        out[policy] = {
            "duration_s": run.duration_s,
            "wall_s": _r(run.wall_s),
            "realtime_factor": _r(run.realtime_factor, 4),
            "windows": len(run.records),
            "windows_per_s": _r(len(run.records) / run.wall_s if run.wall_s > 0 else 0.0),
            # windows the cloud answered (offloaded, or stored and forwarded): what it computed
            "offloaded_windows_per_s": _r(answered / run.wall_s if run.wall_s > 0 else 0.0),
            "lag_ms_p95": _r(np.percentile(lags, 95)) if lags else None,
            "lag_ms_max": _r(max(lags)) if lags else None,
            "event_loop_lag_ms": dict(run.loop_lag_ms),
            "device_errors": dict(run.device_errors),
            # the lost windows, by why they got no result (PolicyRun.lost_by_reason)
            "lost": run.lost,
            "lost_by_reason": dict(run.lost_by_reason),
            "broker": run.broker,
            "plan_versions": run.plan_versions,
            "shards": list(run.shards),  # a sharded fleet: each shard's devices, wall time, loop lag
            # was a shortfall the host's? (simulators/capacity.py; this node's CPU only on a cluster)
            "capacity": _capacity(run, deadline_s),
        }
    return out


def _capacity(run: PolicyRun, deadline_s: float | None = None) -> dict[str, Any] | None:
    if not run.host_cpu or run.duration_s <= 0:
        return None
    return capacity_verdict(
        late_s=max(run.wall_s - run.sensor_s, 0.0) if run.records else None,
        deadline_s=deadline_s,
        realtime_factor=run.realtime_factor,
        windows=len(run.records),
        offered_windows_per_s=sum(run.windows_expected.values()) / run.duration_s,
        busy_cpu_s=run.host_cpu["busy_cpu_s"],
        busy_share=run.host_cpu["busy_share"],
        cores=run.host_cpu["cores"],
    )


# ---------------------------------------------------------------------------------------------
# The report folder


def timeline_device(result: FleetResult) -> DeviceSpec | None:
    """The device whose adaptive run changed its choice most often (then: the widest trace swing)."""
    if not result.specs:
        return None
    records = result.runs.get("adaptive") or next(iter(result.runs.values()), None)
    if records is None:
        return result.specs[0]
    per: dict[str, list[WindowRecord]] = defaultdict(list)
    for r in records.records:
        per[r.device_id].append(r)

    oracle: dict[str, list[WindowRecord]] = defaultdict(list)
    for r in result.runs["oracle"].records if "oracle" in result.runs else ():
        oracle[r.device_id].append(r)

    def changes(recs: list[WindowRecord]) -> int:
        recs = sorted(recs, key=lambda r: r.index)
        return sum(1 for a, b in zip(recs, recs[1:], strict=False) if (a.cut, a.mode) != (b.cut, b.mode))

    def score(spec: DeviceSpec) -> tuple[int, int, bool, float]:
        recs = per.get(spec.device_id, [])
        offloads = any(r.mode == "offloaded" for r in recs)
        spread = float(np.ptp([r.true_mbps for r in recs])) if recs else 0.0
        return changes(recs), changes(oracle.get(spec.device_id, [])), offloads, spread

    return max(result.specs, key=score)


def _bandwidth_series(result: FleetResult, spec: DeviceSpec, step_s: float = 0.05) -> dict[str, list[float]]:
    sim = result.config.simulator
    schedule = ShapingSchedule(spec.trace, time_offset_s=spec.trace_offset_s, outages=sim.outages)
    ts = np.arange(0.0, sim.duration_s + step_s, step_s)
    return {"t_s": [_r(t, 3) for t in ts], "mbps": [_r(schedule.bandwidth_at(float(t)), 4) for t in ts]}


def write_report(result: FleetResult, directory: str | Path) -> Path:
    """Write report.json, windows.jsonl and the PNG plots into `directory` (created); returns it."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    spec = timeline_device(result)
    timeline: dict[str, Any] | None = None
    if spec is not None:
        timeline = {
            "device": spec.to_dict(),
            "bandwidth": _bandwidth_series(result, spec),
            "windows": {
                p: [r.to_dict() for r in sorted(run.records, key=lambda r: r.index) if r.device_id == spec.device_id]
                for p, run in result.runs.items()
            },
        }
    report = {
        "summary": summarize(result, out),
        "comparison": comparison(result),
        "policies": _policy_tables(result, full=True),
        "realtime": realtime(result),
        "simulated_hardware": {
            "note": simulated_hardware_note(result.config.simulator.compute_time),
            "compute_time": result.config.simulator.compute_time,
            "host_stage_ms_measured_at_start": {m: [_r(v, 4) for v in ms] for m, ms in result.host_stage_ms.items()},
            **{k: v for k, v in result.extra.items() if k.startswith("host_")},
            "device_backend": result.extra.get("device_backend"),  # edge.backend: what the devices ran on
            "cloud_tails": result.extra.get("cloud_tails"),  # serving.tail_engine: what ran the tails
            "event_loop": result.extra.get("event_loop"),  # SPLITSENSE_EVENT_LOOP: the broker process's
            "classes": {
                c: {
                    **{k: v for k, v in asdict(DEVICE_CLASSES[c]).items() if k != "radio"},
                    "radio": DEVICE_CLASSES[c].radio.value,
                    "rtt_ms": result.config.simulator.rtt_ms.get(DEVICE_CLASSES[c].radio.value),
                }
                for c in _class_order(result)
            },
        },
        "devices": [s.to_dict() for s in result.specs],
        "timeline": timeline,
        "figures": {
            "latency_cdf.png": "CDF of per-window latency, one panel per device class, one line per policy",
            "energy_per_window.png": "mean energy per window (compute, radio, waiting), per class and policy",
            "device_timeline.png": "one device: its true bandwidth and estimate, and its cut and mode per window",
        },
        "config": result.config.to_dict(),
        "wall_s": _r(result.wall_s),
    }
    (out / "report.json").write_text(json.dumps(_clean(report), indent=1, allow_nan=False) + "\n")
    with (out / "windows.jsonl").open("w") as f:
        for run in result.runs.values():
            for r in run.records:
                f.write(json.dumps(_clean(r.to_dict()), allow_nan=False) + "\n")
    plot_all(result, out, spec)
    return out


def _clean(obj: Any) -> Any:
    """JSON-safe: non-finite floats become null (strict JSON has no NaN/Infinity)."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, np.generic):
        return _clean(obj.item())
    if isinstance(obj, Path):
        return str(obj)
    return obj


# ---------------------------------------------------------------------------------------------
# Plots


def plot_all(result: FleetResult, out: Path, spec: DeviceSpec | None) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    return [
        _plot_latency_cdf(result, out / PLOTS[0]),
        _plot_energy(result, out / PLOTS[1]),
        _plot_timeline(result, out / PLOTS[2], spec),
    ]


def _panel_title(result: FleetResult, cls: str) -> str:
    model = result.config.simulator.models[cls]
    return f"{cls} ({model}) - objective: {result.objectives[cls]}"


def _plot_latency_cdf(result: FleetResult, path: Path) -> Path:
    import matplotlib.pyplot as plt

    classes = _class_order(result)
    fig, axes = plt.subplots(1, len(classes), figsize=(5.2 * len(classes), 4.2), squeeze=False)
    for ax, cls in zip(axes[0], classes, strict=True):
        for policy, run in result.runs.items():
            lat = np.sort([r.latency_ms for r in run.records if r.device_class == cls])
            if lat.size == 0:
                continue
            y = np.arange(1, lat.size + 1) / lat.size
            ax.step(
                lat,
                y,
                where="post",
                label=f"{policy} (p50 {np.median(lat):.0f} ms)",
                color=_POLICY_COLORS.get(policy),
                lw=2.2 if policy == "adaptive" else 1.4,
            )
        _log_ms_axis(ax)
        ax.set_xlabel("latency per window (ms, log scale)")
        ax.set_ylabel("fraction of windows")
        ax.set_ylim(0, 1.02)
        ax.grid(True, which="both", alpha=0.3)
        ax.set_title(_panel_title(result, cls), fontsize=10)
        ax.legend(fontsize=8, loc="lower right")
    sim = result.config.simulator
    fig.suptitle(
        f"Latency CDF per device class - {sim.devices} devices x {sim.duration_s:g} s per policy, real traces"
        + (f", outages {list(sim.outages)}" if sim.outages else ""),
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _log_ms_axis(ax: Any) -> None:
    """A log x axis labelled with plain milliseconds at 1-2-5 steps (no overlapping minor labels)."""
    from matplotlib.ticker import FixedLocator, NullFormatter, StrMethodFormatter

    ax.set_xscale("log")
    lo, hi = ax.get_xlim()
    mantissas = (1, 2, 5) if hi / max(lo, 1e-9) >= 10 else (1, 1.5, 2, 3, 4, 5, 7)
    ticks = [m * 10**e for e in range(-1, 6) for m in mantissas if lo <= m * 10**e <= hi]
    if len(ticks) >= 2:
        ax.xaxis.set_major_locator(FixedLocator(ticks))
        ax.xaxis.set_major_formatter(StrMethodFormatter("{x:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())


def _plot_energy(result: FleetResult, path: Path) -> Path:
    import matplotlib.pyplot as plt

    classes = _class_order(result)
    policies = list(result.runs)
    fig, axes = plt.subplots(1, len(classes), figsize=(5.2 * len(classes), 4.2), squeeze=False)
    parts = (("compute_mj", "compute", 1.0), ("radio_mj", "radio", 0.65), ("wait_mj", "waiting", 0.35))
    for ax, cls in zip(axes[0], classes, strict=True):
        x = np.arange(len(policies))
        bottom = np.zeros(len(policies))
        for attr, label, alpha in parts:
            vals = np.array(
                [
                    np.mean([getattr(r, attr) for r in result.runs[p].records if r.device_class == cls] or [0.0])
                    for p in policies
                ]
            )
            ax.bar(
                x,
                vals,
                bottom=bottom,
                color=[_POLICY_COLORS.get(p, "#888") for p in policies],
                alpha=alpha,
                edgecolor="black",
                linewidth=0.4,
                label=label,
            )
            bottom += vals
        # One bar far above the others (LTE's 11.6-s tail paid on every window) would flatten them:
        # cut the axis above the second highest and write the clipped bar's total on it.
        ordered = np.sort(bottom)
        top = bottom.max() * 1.15
        if len(ordered) > 1 and ordered[-2] > 0 and ordered[-1] > 4 * ordered[-2]:
            top = ordered[-2] * 2.2
        for xi, total, policy in zip(x, bottom, policies, strict=True):
            clipped = total > top
            ax.text(
                xi,
                min(total, top * 0.97),
                "infeasible"
                if cls in result.runs[policy].infeasible
                else f"{total:.1f}" + (" (cut)" if clipped else ""),
                ha="center",
                va="top" if clipped else "bottom",
                fontsize=8,
                fontweight="bold" if clipped else None,
            )
        ax.set_xticks(x, policies, rotation=20, fontsize=9)
        ax.set_ylabel("energy per window (mJ)")
        ax.set_title(_panel_title(result, cls), fontsize=10)
        ax.grid(True, axis="y", alpha=0.3)
        ax.set_ylim(0, max(top, 1e-3))
    handles = [plt.Rectangle((0, 0), 1, 1, facecolor="#999", alpha=a, edgecolor="black") for _, _, a in parts]
    fig.legend(
        handles,
        ["device compute", "radio (transfer, promotion, tails)", "waiting for the cloud (idle power)"],
        loc="lower center",
        ncol=3,
        fontsize=9,
        frameon=False,
    )
    fig.suptitle("Mean energy per window, by policy and device class", fontsize=11)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_timeline(result: FleetResult, path: Path, spec: DeviceSpec | None) -> Path:
    import matplotlib.pyplot as plt

    fig, (ax_bw, ax_cut) = plt.subplots(2, 1, figsize=(11, 6.5), sharex=True, height_ratios=(1, 1.2))
    if spec is None:
        ax_bw.text(0.5, 0.5, "no device", ha="center")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path
    sim = result.config.simulator
    series = _bandwidth_series(result, spec)
    ax_bw.step(series["t_s"], series["mbps"], where="post", color="#333", lw=1.4, label="true link bandwidth (trace)")
    main = "adaptive" if "adaptive" in result.runs else next(iter(result.runs))
    recs = sorted((r for r in result.runs[main].records if r.device_id == spec.device_id), key=lambda r: r.index)
    if recs:
        ax_bw.plot(
            [r.t_s for r in recs],
            [r.estimate_mbps for r in recs],
            "o",
            ms=4,
            color=_POLICY_COLORS["adaptive"],
            label=f"device's own estimate ({main})",
        )
    for edge in result.config.planner.bandwidth_edges_mbps:
        ax_bw.axhline(edge, color="#bbb", lw=0.6, ls=":", zorder=0)
    for start, end in sim.outages:
        for ax in (ax_bw, ax_cut):
            ax.axvspan(start, end, color="#d62728", alpha=0.12, lw=0)
    ax_bw.set_yscale("symlog", linthresh=0.1)
    ax_bw.set_ylabel("uplink Mbit/s (symlog)")
    ax_bw.legend(fontsize=8, loc="upper right")
    ax_bw.grid(True, alpha=0.3)
    ax_bw.set_title(
        f"{spec.device_id} ({spec.model}) on {spec.trace.family}/{spec.trace.name} from {spec.trace_offset_s:.0f} s"
        "  -  dotted: plan bucket edges" + ("; red: outages" if sim.outages else ""),
        fontsize=10,
    )
    n = recs[0].n_stages if recs else 0
    for policy, style in (("oracle", "--"), ("fixed_cut", ":")):
        if policy in result.runs and policy != main:
            other = sorted(
                (r for r in result.runs[policy].records if r.device_id == spec.device_id), key=lambda r: r.index
            )
            if other:
                ax_cut.step(
                    [r.t_s for r in other],
                    [r.cut for r in other],
                    where="post",
                    ls=style,
                    lw=1.2,
                    color=_POLICY_COLORS.get(policy),
                    label=f"{policy} cut",
                )
    if recs:
        ax_cut.step([r.t_s for r in recs], [r.cut for r in recs], where="post", color="#999", lw=1.0)
        for mode, color in _MODE_COLORS.items():
            pts = [r for r in recs if r.mode == mode]
            if pts:
                ax_cut.plot(
                    [r.t_s for r in pts],
                    [r.cut for r in pts],
                    "o",
                    ms=6,
                    color=color,
                    label=f"{main}: {mode} ({len(pts)})",
                )
    ax_cut.set_yticks(
        range(n + 1), [("input (cloud)" if k == 0 else "local" if k == n else str(k)) for k in range(n + 1)]
    )
    ax_cut.set_ylim(-0.5, n + 0.5)
    ax_cut.set_ylabel("cut chosen (device runs [0, k));\ncolour: where the window ran", fontsize=9)
    ax_cut.set_xlabel("time since the policy's start (s)")
    ax_cut.grid(True, alpha=0.3)
    ax_cut.legend(fontsize=8, loc="center right", ncol=1)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------
# The table


def render_summary(result: FleetResult, console: Any, report_dir: Path | None = None) -> None:
    """Print the per-policy, per-class table and the targets (rich Console)."""
    from rich.table import Table

    tables = _policy_tables(result, full=True)
    table = Table(title="splitsense simulate: per policy and device class", show_lines=False)
    for col, justify in (
        ("policy", "left"),
        ("class", "left"),
        ("windows", "right"),
        ("lost", "right"),
        ("accuracy", "right"),
        ("p50 ms", "right"),
        ("p95 ms", "right"),
        ("mean ms", "right"),
        ("mJ/window", "right"),
        ("offload", "right"),
        ("split %", "right"),
    ):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    notes: list[str] = []
    for policy, classes in tables.items():
        for cls, s in classes.items():
            if s.get("infeasible"):
                table.add_row(policy, cls, "infeasible", *["-"] * 8)
                notes.append(f"{policy} on {cls}: infeasible: {s['reason']}")
                continue
            if not s["windows"]:
                table.add_row(policy, cls, "0", str(s["lost"]), *["-"] * 7)
                continue
            table.add_row(
                policy,
                cls,
                str(s["windows"]),
                str(s["lost"]),
                f"{s['accuracy']:.3f}",
                f"{s['latency_ms_p50']:.1f}",
                f"{s['latency_ms_p95']:.1f}",
                f"{s['latency_ms_mean']:.1f}",
                f"{s['energy_mj_per_window']:.2f}",
                f"{s['offload_ratio']:.0%}",
                f"{s['split_ratio']:.0%}",
            )
        table.add_section()
    console.print(table)
    for note in notes:
        console.print(f"  {note}", highlight=False)
    comp = comparison(result)
    rt = realtime(result)
    short = sorted(p for p, v in rt.items() if (v.get("capacity") or {}).get("verdict") in _SHORT_OF_CORES)
    for cls in _class_order(result):
        c = comp[cls]
        parts = [f"{cls} ({c['objective']}, {c['metric']}):"]
        for key, word in (
            ("adaptive_vs_all_local", "local"),
            ("adaptive_vs_all_cloud", "cloud"),
            ("adaptive_vs_cloud_input", "input"),
            ("adaptive_vs_oracle", "oracle"),
        ):
            v = c.get(key)
            if v is not None and v.get("infeasible"):
                parts.append(f"vs {word}: infeasible on this class")
            elif v is not None:
                tag = "ok" if v["met"] else "NOT MET"
                same = v.get("same_choice_share")
                if key == "adaptive_vs_oracle" and same is not None:
                    tag += f", same choice on {same:.0%} of windows"
                parts.append(f"vs {word} x{v['ratio']:.2f} ({tag})")
        if c.get("adaptive_split_ratio") is not None:
            parts.append(f"adaptive split {c['adaptive_split_ratio']:.0%}")
        bud = c.get("budget")
        if bud is not None:
            parts.append(f"{bud['what']}: {budget_verdict(bud, short)}")
        acc = c.get("accuracy")
        if acc is not None:
            parts.append(
                f"accuracy {-acc['paired_points_below_local']:+.2f} pts vs local on {acc['paired_windows']} same"
                f" windows (budget {ACCURACY_POINTS:g} + noise {acc['noise_points_95']:.2f}:"
                f" {'ok' if acc['met'] else 'NOT MET'})"
            )
        console.print("  " + "  ".join(parts))
        err = tables.get("adaptive", {}).get(cls, {}).get("estimate_error")
        if err is not None:
            console.print(
                f"    {cls} adaptive estimate/true: median {err['median_ratio']:.2f} (p10 {err['p10_ratio']:.2f}, "
                f"p90 {err['p90_ratio']:.2f}) over {err['windows']} offloaded windows",
                highlight=False,
            )
    line = ", ".join(
        f"{p} x{v['realtime_factor']:.3f} ({v['windows_per_s']:.0f} windows/s, loop lag p95 "
        f"{v['event_loop_lag_ms'].get('p95', 0):.0f} ms)"
        for p, v in rt.items()
    )
    lost = sum(r.lost for r in result.runs.values())
    why = ", ".join(
        f"{p}: " + ", ".join(f"{k} {n}" for k, n in r.lost_by_reason.items())
        for p, r in result.runs.items()
        if r.lost and r.lost_by_reason
    )
    console.print(f"  real-time factor: {line}; lost windows: {lost}" + (f" ({why})" if why else ""))
    for p, v in rt.items():
        cap = v.get("capacity")
        if cap and cap["verdict"] != "kept up":
            colour = "red" if cap["verdict"] in _SHORT_OF_CORES else "yellow"
            console.print(f"    [{colour}]{p}: {cap['verdict']}[/]: {cap['why']}", highlight=False)
    fleet = result.extra.get("fleet")
    if fleet:
        lag = "; ".join(
            f"{p}: " + ", ".join(f"#{x.get('shard')} {x['loop_lag_ms'].get('p95', 0):.0f} ms" for x in v["shards"])
            for p, v in rt.items()
            if v["shards"]
        )
        console.print(
            f"  fleet: {fleet['shards']} shard(s) on {len(fleet.get('nodes', []))} node(s)"
            + (f" ({fleet['placement']})" if fleet.get("placement") else "")
            + f", front {fleet['front']}; "
            f"loop lag p95 per shard: {lag}",
            highlight=False,
        )
    engine = result.extra.get("device_backend")
    if engine:
        console.print(f"  devices ran on: {engine['kind']} ({engine['why']})", highlight=False)
    tails = result.extra.get("cloud_tails")
    if tails:
        console.print(f"  cloud tails ran on: {tails['kind']} ({tails['why']})", highlight=False)
    loop = result.extra.get("event_loop")
    if loop:
        console.print(f"  event loop (broker process): {loop}", highlight=False)
    if report_dir is not None:
        console.print(f"  report: {report_dir}")


_SHORT_OF_CORES = ("saturated", "infeasible", "no headroom")  # capacity verdicts of a host short of cores


def budget_verdict(budget: dict[str, Any], short_of_cores: Sequence[str] = ()) -> str:
    """The summary's words for a `comparison` budget entry. Where no choice could meet the budget at
    some windows, it says so instead of "exceeded by" every policy: none could have met it there.
    `short_of_cores`: the policies whose run the host could not carry (simulators/capacity.py): a
    budget every policy exceeded although the cost model had a choice within it is then the host's
    queueing as much as the choices, and the words say so."""
    within = {p: ok for p, ok in budget["within"].items() if ok is not None}
    outside = [p for p, ok in within.items() if not ok]
    share = budget.get("feasible_share")
    if share is not None and share < 1:
        text = f"infeasible for every choice at {_percent(1 - share)} of windows"
        least = budget.get("least_where_infeasible")
        if least is not None:
            unit = "ms" if str(budget.get("what", "")).startswith("latency") else "mJ"
            text += f" (the least any choice reached there: median {least:g} {unit})"
        if outside and len(outside) < len(within):
            text += f"; exceeded by {', '.join(outside)}"
        elif within:  # all or none: the windows no choice could meet may be why
            text += "; no policy within it on average" if outside else "; every policy within it on average"
        return text
    if not outside:
        return "all within"
    text = f"exceeded by {', '.join(outside)}"
    if share is not None and len(outside) == len(within):  # the cost model said some choice met it
        late = [p for p in outside if p in short_of_cores]
        if late:
            text += (
                " (the cost model had a choice within it at every window, on a host short of cores for "
                f"{', '.join(late)}: see the real-time verdicts)"
            )
        else:
            text += " (though the cost model had a choice within it at every window)"
    return text


def _percent(x: float) -> str:
    """'37%'; '<1%' for a share above 0 that rounds to 0, '>99%' for one below 1 that rounds to 100."""
    if 0 < x < 0.005:
        return "<1%"
    if 0.995 <= x < 1:
        return ">99%"
    return f"{x:.0%}"


# ---------------------------------------------------------------------------------------------
# Progress on the console


class ConsoleProgress(FleetProgress):
    """A rich progress bar per policy on a terminal; one line per policy when not a terminal."""

    def __init__(self, console: Any) -> None:
        self.console = console
        self.live = bool(getattr(console, "is_terminal", False))
        self._bar: Any = None
        self._task: Any = None
        self._counts: dict[str, int] = defaultdict(int)

    def policy_started(self, policy: str, windows_expected: int) -> None:
        self._counts = defaultdict(int)
        if not self.live:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self._bar = Progress(
            TextColumn("[bold]{task.description:<10}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            console=self.console,
            transient=False,
        )
        self._bar.start()
        self._task = self._bar.add_task(policy, total=windows_expected, info="")

    def window_done(self, policy: str, record: WindowRecord) -> None:
        self._counts[record.mode] += 1
        if self._bar is not None:
            info = " ".join(f"{m} {n}" for m, n in sorted(self._counts.items()))
            self._bar.update(self._task, advance=1, info=info)

    def policy_done(self, policy: str, run: PolicyRun) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
        modes = " ".join(f"{m} {n}" for m, n in sorted(self._counts.items()))
        self.console.print(
            f"{policy}: {len(run.records)} windows ({modes}), lost {run.lost}, "
            f"{run.wall_s:.1f} s wall, real-time x{run.realtime_factor:.3f}"
            + (f"; not run on {', '.join(run.infeasible)} (infeasible)" if run.infeasible else ""),
            highlight=False,
        )
