"""Several tasks on one sensor stream: models that share their front, planned as one window.

The FSDD speaker and digit models share one bottleneck encoder (trained jointly, shipped identical;
pipelines/models.py ``encoder_group``). A device with a microphone runs that encoder once per
window and one upload of its code serves both tasks: the broker runs each task's tail on it
(``OffloadRequest.extra_models``). Ladon (WACV 2025) and DeepEar run several audio inferences on one
stream the same way.

A *group* is named by its members joined with "+", e.g. ``"fsdd_speaker+fsdd_digit"``; the first
member is the main one (the window's ``model`` on the wire). :func:`group_catalog` folds the members'
catalogs into one :class:`~pipelines.catalog.ModelCatalog`, so that the cost model and the planner
optimise the whole window without knowing about groups:

    stages [0, shared)   once (the shared front: its latency, MACs and parameters)
    stages [shared, N)   the sum over the members (every task's own tail)
    bytes at cut k       one upload for k <= shared; cuts shared < k < N are not offered (each task
                         would need its own upload): the codecs are marked unavailable there
    result bytes         the sum (every task's logits come back)
    accuracy             mean(base) - max over members of (base_i - accuracy_i): the planner's budget
                         on "points lost" then binds the worst task, so both tasks' budgets hold
    preprocessing        the first member's (prep_ms, prep_ops): the window is preprocessed once

The name helpers (`group_members`, `shared_cut`, `served_groups`, `is_group`) need no torch: a
device reads them. Only `group_catalog` loads pipelines.catalog.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from pipelines.specs import get_spec
from splitsense.errors import ModelError

if TYPE_CHECKING:
    from pipelines.catalog import ModelCatalog

__all__ = ["GROUP_SEPARATOR", "group_catalog", "group_members", "is_group", "served_groups", "shared_cut"]

GROUP_SEPARATOR = "+"


def is_group(name: str) -> bool:
    return GROUP_SEPARATOR in name


def group_members(name: str) -> tuple[str, ...]:
    """The member models of a group name ("a+b" -> ("a", "b")); a plain model name is its own group."""
    members = tuple(m.strip() for m in name.split(GROUP_SEPARATOR))
    if any(not m for m in members) or len(set(members)) != len(members):
        raise ModelError(f"a task group names distinct models joined by '{GROUP_SEPARATOR}', got {name!r}")
    return members


def shared_cut(names: Sequence[str]) -> int:
    """The deepest cut at which every model of `names` reads the same activation (0: only the input)."""
    specs = [get_spec(n) for n in names]
    if len({s.dataset for s in specs}) != 1:
        raise ModelError(f"models {list(names)} do not read the same sensor data; they cannot share a window")
    groups = {s.encoder_group for s in specs}
    if len(names) > 1 and len(groups) == 1 and set(names) <= set(next(iter(groups))):
        return 1  # one shared bottleneck encoder: stage 0
    return 0


def _combine(values: Sequence[Sequence[float]], shared: int) -> list[float]:
    """Per index: the first member's below `shared`, the sum over members from `shared` on."""
    return [values[0][i] if i < shared else sum(v[i] for v in values) for i in range(len(values[0]))]


def _acc(bases: Sequence[float], accs: Sequence[float]) -> float:
    return max(0.0, sum(bases) / len(bases) - max(b - a for b, a in zip(bases, accs, strict=True)))


def served_groups(models: Sequence[str]) -> list[tuple[str, ...]]:
    """The encoder groups (pipelines.specs.ModelSpec.encoder_group) all of whose models are in
    `models` (what a cloud serving `models` plans and answers as one window)."""
    out: list[tuple[str, ...]] = []
    for name in models:
        group = get_spec(name).encoder_group
        if len(group) > 1 and set(group) <= set(models) and group not in out:
            out.append(group)
    return out


def group_catalog(catalogs: Sequence[ModelCatalog], shared: int) -> ModelCatalog:
    """One catalog for a window that runs every model of `catalogs` (see the module docstring)."""
    from pipelines.catalog import CodecEntry, LevelEntry, ModelCatalog

    if len(catalogs) < 2:
        raise ModelError("a task group needs at least two models")
    first = catalogs[0]
    n = first.n_stages
    if any(c.n_stages != n for c in catalogs) or any(c.window_s != first.window_s for c in catalogs):
        raise ModelError("the models of a task group need the same stages and the same window")
    if not 0 <= shared < n:
        raise ModelError(f"shared cut {shared} is out of range 0..{n - 1}")
    bases = [c.base_accuracy for c in catalogs]
    names = [c.model for c in catalogs]

    def stage_diffs(values: Sequence[float]) -> list[float]:
        return [values[i + 1] - values[i] for i in range(n)]

    def cumsum(values: Sequence[float]) -> list[float]:
        out = [0.0]
        for v in values:
            out.append(out[-1] + v)
        return out

    levels = []
    common = set.intersection(*({e.energy_kept for e in c.levels} for c in catalogs))
    for energy in sorted(common, reverse=True):
        entries = [c.level(energy) for c in catalogs]
        lat = cumsum(_combine([stage_diffs(e.front_latency_ms) for e in entries], shared))
        params = cumsum(_combine([stage_diffs([float(p) for p in e.front_params]) for e in entries], shared))
        acc = [_acc(bases, [e.accuracy[k] for e in entries]) for k in range(n + 1)]
        levels.append(LevelEntry(energy, tuple(lat), tuple(int(round(p)) for p in params), tuple(acc)))

    codecs = []
    for entry in first.codecs:
        try:
            per = [c.codec(entry.codec) for c in catalogs]
        except ModelError:
            continue
        avail = [k <= shared and all(e.available_at(k) for e in per) for k in range(n)] + [True]
        nbytes = [per[0].activation_bytes[k] if avail[k] else 0 for k in range(n)] + [0]
        acc = [_acc(bases, [e.accuracy[k] for e in per]) if avail[k] else 0.0 for k in range(n)]
        acc.append(_acc(bases, bases))
        codecs.append(CodecEntry(entry.codec, tuple(nbytes), tuple(acc), tuple(avail)))

    peaks = first.stage_peak_elems
    if peaks and all(c.stage_peak_elems for c in catalogs):
        # the tasks' tails run one after the other: the peak is the largest of theirs
        peaks = tuple(max(c.stage_peak_elems[i] for c in catalogs) for i in range(n))
    return ModelCatalog(
        model=GROUP_SEPARATOR.join(names),
        stage_names=first.stage_names,
        stage_latency_ms=tuple(_combine([c.stage_latency_ms for c in catalogs], shared)),
        stage_macs=tuple(int(v) for v in _combine([c.stage_macs for c in catalogs], shared)),
        stage_params=tuple(int(v) for v in _combine([c.stage_params for c in catalogs], shared)),
        activation_shapes=first.activation_shapes,
        result_bytes=sum(c.result_bytes for c in catalogs),
        window_s=first.window_s,
        base_accuracy=sum(bases) / len(bases),
        levels=tuple(levels),
        codecs=tuple(codecs),
        stage_peak_elems=tuple(peaks),
        prep_ms=first.prep_ms,  # one window, preprocessed once for every task
        prep_ops=first.prep_ops,
    )
