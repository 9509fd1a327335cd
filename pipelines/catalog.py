"""What the planner knows about one model, measured offline: the model catalog.

A :class:`ModelCatalog` holds, for one StagedModel with N stages,

    per stage                     host latency (ms), MACs, parameters
    per cut k in 0..N and codec   bytes on the wire (``codecs.encoded_nbytes``; 0 at k = N, where
                                  nothing crosses), accuracy with the activation through the codec
    per cut k and level           host latency and parameters of the front [0, k) compressed at
                                  that level (``compress_front_at_level``; 1.0 = uncompressed), and
                                  the model's accuracy with that front (activation sent as fp32)
    per level < 1                 its accuracy budget in points, the per-layer ranks that make it
                                  and the digest of the weights they were chosen for
    dropped levels                the levels asked for but not kept, each with the reason

plus the window period (how often a device runs the model), the size of the result (fp32
logits) that comes back, and the preprocessing every window pays on the device before stage 0,
whatever the cut (log-mel for audio, standardisation for IMU: ``TrainedModel.prepare_window``):
``prep_ms`` its host latency, measured like the stages (``profile.profile_prep``), and ``prep_ops``
its operations on a device without a framework (``profile.prep_ops``). Both are 0 in catalogs
measured before they were recorded; ``update_prep`` adds them to a catalog file in place, leaving
every other figure as it was (``splitsense models catalog --prep-only``). The cost model
(``cloud.controller.costmodel``) reads nothing else.

Combining the two accuracy tables is the cost model's job (it adds the two drops); the catalog
records only what was measured. By construction the uncompressed level and the fp32 codec cost
no accuracy at any cut, and no codec costs any at k = N (nothing is encoded): these are checked
when a catalog is built, so the fully local, uncompressed choice always meets any accuracy budget.

Compression levels. The float key plans, the wire (PlanRow.compression_energy_kept) and the cost
model use: 1.0 is the uncompressed model; a level L < 1 is the per-layer SVD ranks that DeepX-style
greedy search (``compress.compress_front``) chooses for the whole model's compressible layers (all
stages; a bottleneck ``Encoder`` is never touched) under an accuracy budget of (1 - L) x 100 points,
measured on the calibration data (an augmented slice of the training split, never the test split):
0.995, 0.99 and 0.98 are the 0.5-, 1- and 2-point budgets. The ranks are stored in the level's entry
({layer name: rank}, layers not named keep their full rank) with the sha256 of the weights they were
chosen for; ``compress_front_at_level`` rebuilds the front from them, so a device runs exactly the
front the catalog measured. A level whose front is, at every cut k >= 1, neither smaller (params)
nor faster (latency, by more than 5%) than the front of a cheaper kept level (1.0 or a smaller
budget) is dropped and listed in ``dropped_levels`` with the reason: it would only cost accuracy.

Affordability (``build_catalog``): one profile of the model, one profile per level of the model
with every stage compressed (a layer's rank at a level does not depend on the cut, so the front at
cut k is exactly the first k stages of that model), and an accuracy evaluation per level only at
the cuts whose last front stage was actually changed by the compression; the other cuts reuse the
accuracy of the cut before. The fp32 codec is exact and is not evaluated. Stages a level leaves
untouched keep the uncompressed latency, and a stage compressed with the same ranks as at a level
measured before keeps that level's latency, so timing noise never makes an unchanged front look
faster or slower. Profiles are taken the way a device runs (``profile.profile_model``: one thread,
stages in sequence, median of `repeats` runs); a compressed stage more than 10x slower or faster than
uncompressed is profiled again with 3x the runs, and a warning gives the figures if it stays so.

A task group's catalog (pipelines/groups.py) preprocesses once, as its first member does.

Catalogs are plain data: ``to_dict``/``from_dict`` round-trip through JSON, and
``save_catalog``/``load_catalog`` keep them beside the weights as ``{name}.catalog.json``.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipelines.codecs import Codec, encoded_nbytes, parse_codec
from pipelines.levels import level_budget_points
from pipelines.numpy_features import WINDOW_SAMPLES
from splitsense.config import CompressionConfig, PathsConfig, PlannerConfig, missing_asset
from splitsense.errors import ModelError

if TYPE_CHECKING:
    from torch import nn

    from pipelines.stages import StagedModel
    from pipelines.training import TrainedModel

# Reading, writing and combining catalogs needs no torch (a device reads its model's catalog to
# know which fronts fit it; the planner reads them all); measuring one does: compress, profile and
# torch are imported by the functions that measure.

__all__ = [
    "CATALOG_FORMAT",
    "CodecEntry",
    "DroppedLevel",
    "LevelEntry",
    "ModelCatalog",
    "build_catalog",
    "catalog_path",
    "drop_dominated_levels",
    "load_catalog",
    "measure_prep",
    "prep_window",
    "save_catalog",
    "shipped_level_ranks",
    "update_prep",
]

CATALOG_FORMAT = 1  # bumped when the JSON layout changes; load_catalog refuses other formats
_ACC_TOL = 1e-9  # accuracies that must equal the base one may differ by float noise only
FASTER_BY = 0.05  # a front is "faster" than another only when at least 5% faster (timing noise)
OUTLIER_RATIO = 10.0  # a compressed stage this many times slower/faster than uncompressed is re-profiled


@dataclass(frozen=True)
class LevelEntry:
    """One compression level (module docstring): the front [0, k) of the model whose layers have
    the per-layer `ranks` chosen under an accuracy budget of `budget_points` = (1 - energy_kept) x 100.

    The last four fields are None for the uncompressed level and in catalogs measured before they
    were recorded (such a level cannot be rebuilt by `compress_front_at_level`)."""

    energy_kept: float  # the level key; 1.0 = uncompressed, L < 1 = ranks under a (1 - L) x 100-point budget
    front_latency_ms: tuple[float, ...]  # per cut 0..N, host latency of the compressed front
    front_params: tuple[int, ...]  # per cut 0..N
    accuracy: tuple[float, ...]  # per cut 0..N, activation sent as fp32
    budget_points: float | None = None  # accuracy budget the ranks were chosen under
    ranks: tuple[tuple[str, int], ...] | None = None  # (layer name, rank), model order; others keep full rank
    weights_sha256: str | None = None  # compress.weights_digest of the weights the ranks were chosen for
    calibration_drop_points: float | None = None  # accuracy lost on the calibration data (<= budget_points)

    def rank_map(self) -> dict[str, int]:
        return dict(self.ranks or ())

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "energy_kept": self.energy_kept,
            "front_latency_ms": list(self.front_latency_ms),
            "front_params": list(self.front_params),
            "accuracy": list(self.accuracy),
        }
        if self.budget_points is not None:
            out["budget_points"] = self.budget_points
        if self.ranks is not None:
            out["ranks"] = dict(self.ranks)
        if self.weights_sha256 is not None:
            out["weights_sha256"] = self.weights_sha256
        if self.calibration_drop_points is not None:
            out["calibration_drop_points"] = self.calibration_drop_points
        return out

    @classmethod
    def from_dict(cls, e: Mapping[str, Any]) -> LevelEntry:
        ranks = e.get("ranks")
        if ranks is not None and not isinstance(ranks, Mapping):
            raise TypeError(f"level ranks must be an object {{layer: rank}}, got {type(ranks).__name__}")
        return cls(
            energy_kept=float(e["energy_kept"]),
            front_latency_ms=tuple(float(v) for v in e["front_latency_ms"]),
            front_params=tuple(int(v) for v in e["front_params"]),
            accuracy=tuple(float(v) for v in e["accuracy"]),
            budget_points=None if e.get("budget_points") is None else float(e["budget_points"]),
            ranks=None if ranks is None else tuple((str(k), _int(v)) for k, v in ranks.items()),
            weights_sha256=None if e.get("weights_sha256") is None else str(e["weights_sha256"]),
            calibration_drop_points=(
                None if e.get("calibration_drop_points") is None else float(e["calibration_drop_points"])
            ),
        )


@dataclass(frozen=True)
class DroppedLevel:
    """A level that was asked for but is not in the catalog, and why."""

    energy_kept: float
    budget_points: float
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"energy_kept": self.energy_kept, "budget_points": self.budget_points, "reason": self.reason}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DroppedLevel:
        return cls(float(d["energy_kept"]), float(d["budget_points"]), str(d["reason"]))


def _int(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"a rank must be an integer, got {v!r}")
    return v


@dataclass(frozen=True)
class CodecEntry:
    """One activation codec: bytes on the wire and accuracy at every cut (uncompressed front)."""

    codec: Codec
    activation_bytes: tuple[int, ...]  # per cut 0..N; 0 at k = N (nothing crosses); ans: mean over test windows
    accuracy: tuple[float, ...]  # per cut 0..N
    # per cut 0..N: whether the codec can carry that cut's activation (ans only carries a bottleneck's
    # quantised code); None = every cut. Unavailable cuts hold 0 bytes and accuracy 0 as placeholders.
    available: tuple[bool, ...] | None = None

    def available_at(self, k: int) -> bool:
        return self.available is None or self.available[k]

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "codec": self.codec.value,
            "activation_bytes": list(self.activation_bytes),
            "accuracy": list(self.accuracy),
        }
        if self.available is not None:
            out["available"] = list(self.available)
        return out


@dataclass(frozen=True)
class ModelCatalog:
    """Everything the planner needs to know about one model (see the module docstring).

    Checked when built: a malformed catalog raises ModelError naming the field. `levels` are
    kept sorted from 1.0 (uncompressed, always present) down; `codecs` in Codec order (fp32,
    always present, first).
    """

    model: str
    stage_names: tuple[str, ...]
    stage_latency_ms: tuple[float, ...]  # host, median, batch 1
    stage_macs: tuple[int, ...]
    stage_params: tuple[int, ...]
    activation_shapes: tuple[tuple[int, ...], ...]  # per cut 0..N (N: the logits)
    result_bytes: int  # fp32 logits sent back to the device
    window_s: float  # a device runs the model once per window of this many seconds
    base_accuracy: float  # uncompressed model, fp32
    levels: tuple[LevelEntry, ...]
    codecs: tuple[CodecEntry, ...]
    # per stage: the largest input + output element count of any layer inside it (what a layer-by-
    # layer runtime holds at once); () for catalogs measured before it was recorded
    stage_peak_elems: tuple[int, ...] = ()
    # levels asked for but not kept (neither smaller nor faster than a cheaper one), with the reason
    dropped_levels: tuple[DroppedLevel, ...] = ()
    # one window's preprocessing on the device, before stage 0, at every cut: host latency (median,
    # one thread, batch 1, as the stages) and operations on a device without a framework; 0 for
    # catalogs measured before they were recorded
    prep_ms: float = 0.0
    prep_ops: int = 0

    def __post_init__(self) -> None:
        where = f"catalog of {self.model!r}"
        _check_nonneg(f"{where}: prep_ms", (self.prep_ms,))
        if isinstance(self.prep_ops, bool) or not isinstance(self.prep_ops, int) or self.prep_ops < 0:
            raise ModelError(f"{where}: prep_ops must be an int >= 0, got {self.prep_ops!r}")
        object.__setattr__(self, "prep_ms", float(self.prep_ms))
        peaks = tuple(int(v) for v in self.stage_peak_elems)
        if peaks and len(peaks) != len(self.stage_names):
            raise ModelError(f"{where}: stage_peak_elems needs one entry per stage or none")
        object.__setattr__(self, "stage_peak_elems", peaks)
        if not isinstance(self.model, str) or not self.model:
            raise ModelError("ModelCatalog.model must be a non-empty string")
        n = len(self.stage_names)
        if n < 1:
            raise ModelError(f"{where}: needs at least one stage")
        for name in ("stage_latency_ms", "stage_macs", "stage_params"):
            values = tuple(getattr(self, name))
            if len(values) != n:
                raise ModelError(f"{where}: {name} has {len(values)} entries, expected {n} (one per stage)")
            _check_nonneg(f"{where}: {name}", values)
            object.__setattr__(self, name, values)
        object.__setattr__(self, "stage_names", tuple(self.stage_names))
        shapes = tuple(tuple(int(d) for d in s) for s in self.activation_shapes)
        if len(shapes) != n + 1:
            raise ModelError(f"{where}: activation_shapes needs {n + 1} entries (cuts 0..{n}), got {len(shapes)}")
        object.__setattr__(self, "activation_shapes", shapes)
        _check_nonneg(f"{where}: result_bytes", (self.result_bytes,))
        if not (math.isfinite(self.window_s) and self.window_s > 0):
            raise ModelError(f"{where}: window_s must be > 0 seconds, got {self.window_s!r}")
        _check_acc(f"{where}: base_accuracy", (self.base_accuracy,))

        levels = tuple(sorted(self.levels, key=lambda e: -e.energy_kept))
        if not levels or levels[0].energy_kept != 1.0:
            raise ModelError(f"{where}: levels must include 1.0 (uncompressed)")
        if len({e.energy_kept for e in levels}) != len(levels):
            raise ModelError(f"{where}: duplicate compression levels {[e.energy_kept for e in levels]}")
        for e in levels:
            w = f"{where}, level {e.energy_kept:g}"
            if not 0 < e.energy_kept <= 1:
                raise ModelError(f"{w}: energy_kept must be in (0, 1]")
            for name in ("front_latency_ms", "front_params", "accuracy"):
                if len(getattr(e, name)) != n + 1:
                    raise ModelError(f"{w}: {name} needs {n + 1} entries (cuts 0..{n})")
            _check_nonneg(f"{w}: front_latency_ms", e.front_latency_ms)
            _check_nonneg(f"{w}: front_params", e.front_params)
            _check_acc(f"{w}: accuracy", e.accuracy)
            if e.front_latency_ms[0] != 0 or e.front_params[0] != 0:
                raise ModelError(f"{w}: the empty front (cut 0) must cost 0 ms and hold 0 params")
            if e.energy_kept >= 1.0 and (e.ranks or e.budget_points):
                raise ModelError(f"{w}: the uncompressed level has no ranks and no budget")
            if e.budget_points is not None and abs(e.budget_points - level_budget_points(e.energy_kept)) > 1e-6:
                raise ModelError(
                    f"{w}: budget_points {e.budget_points:g} is not (1 - level) x 100 = "
                    f"{level_budget_points(e.energy_kept):g}"
                )
            if e.ranks is not None and any(not isinstance(r, int) or isinstance(r, bool) or r < 1 for _, r in e.ranks):
                raise ModelError(f"{w}: ranks must be integers >= 1")
        top = levels[0]
        if any(abs(a - self.base_accuracy) > _ACC_TOL for a in top.accuracy):
            raise ModelError(f"{where}: level 1.0 (uncompressed) must have the base accuracy at every cut")
        cum = _cumsum(self.stage_latency_ms)
        if any(
            not math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9) for a, b in zip(top.front_latency_ms, cum, strict=True)
        ):
            raise ModelError(f"{where}: level 1.0 front_latency_ms must be the running sum of stage_latency_ms")
        object.__setattr__(self, "levels", levels)
        dropped = tuple(self.dropped_levels)
        kept_keys = {e.energy_kept for e in levels}
        for d in dropped:
            if d.energy_kept in kept_keys or not 0 < d.energy_kept < 1:
                raise ModelError(f"{where}: dropped level {d.energy_kept!r} must be < 1 and not a kept level")
        object.__setattr__(self, "dropped_levels", dropped)

        by_codec = {parse_codec(c.codec): c for c in self.codecs}
        if len(by_codec) != len(self.codecs):
            raise ModelError(f"{where}: duplicate codecs")
        if Codec.FP32 not in by_codec:
            raise ModelError(f"{where}: codecs must include fp32")
        entries = []
        for codec in Codec:
            if codec not in by_codec:
                continue
            c = by_codec[codec]
            w = f"{where}, codec {codec.value}"
            if len(c.activation_bytes) != n + 1 or len(c.accuracy) != n + 1:
                raise ModelError(f"{w}: activation_bytes and accuracy need {n + 1} entries (cuts 0..{n})")
            _check_nonneg(f"{w}: activation_bytes", c.activation_bytes)
            _check_acc(f"{w}: accuracy", c.accuracy)
            if c.available is not None and len(c.available) != n + 1:
                raise ModelError(f"{w}: available needs {n + 1} entries (cuts 0..{n})")
            if c.available is not None and not c.available[n]:
                raise ModelError(f"{w}: cut {n} (fully local, nothing sent) is always available")
            if c.activation_bytes[n] != 0:
                raise ModelError(f"{w}: nothing crosses the wire at cut {n} (fully local): bytes must be 0")
            if abs(c.accuracy[n] - self.base_accuracy) > _ACC_TOL:
                raise ModelError(f"{w}: at cut {n} (fully local) nothing is encoded: accuracy must be the base")
            if codec is Codec.FP32 and any(
                abs(a - self.base_accuracy) > _ACC_TOL
                for k, a in enumerate(c.accuracy)
                if c.available is None or c.available[k]
            ):
                raise ModelError(f"{w}: fp32 is exact: accuracy must be the base at every cut")
            avail = None if c.available is None or all(c.available) else tuple(bool(a) for a in c.available)
            entries.append(CodecEntry(codec, tuple(c.activation_bytes), tuple(c.accuracy), avail))
        object.__setattr__(self, "codecs", tuple(entries))

    @property
    def n_stages(self) -> int:
        return len(self.stage_names)

    def cut_name(self, k: int) -> str:
        """'input' for 0, otherwise the stage whose output crosses ('local' is the caller's word for N)."""
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= self.n_stages:
            raise ModelError(f"cut {k!r} is out of range for {self.model!r}: expected 0..{self.n_stages}")
        return "input" if k == 0 else self.stage_names[k - 1]

    def level(self, energy_kept: float) -> LevelEntry:
        for e in self.levels:
            if e.energy_kept == energy_kept:
                return e
        known = ", ".join(f"{e.energy_kept:g}" for e in self.levels)
        for d in self.dropped_levels:
            if d.energy_kept == energy_kept:
                raise ModelError(
                    f"catalog of {self.model!r} dropped level {energy_kept:g} ({d.budget_points:g}-point budget): "
                    f"{d.reason}; known: {known}"
                )
        raise ModelError(f"catalog of {self.model!r} has no level {energy_kept!r}; known: {known}")

    def codec(self, codec: Codec | str) -> CodecEntry:
        c = parse_codec(codec)
        for e in self.codecs:
            if e.codec is c:
                return e
        known = ", ".join(e.codec.value for e in self.codecs)
        raise ModelError(f"catalog of {self.model!r} has no codec {c.value!r}; known: {known}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": CATALOG_FORMAT,
            "model": self.model,
            "stage_names": list(self.stage_names),
            "stage_latency_ms": list(self.stage_latency_ms),
            "stage_macs": list(self.stage_macs),
            "stage_params": list(self.stage_params),
            "activation_shapes": [list(s) for s in self.activation_shapes],
            "result_bytes": self.result_bytes,
            "window_s": self.window_s,
            "base_accuracy": self.base_accuracy,
            "levels": [e.to_dict() for e in self.levels],
            "codecs": [c.to_dict() for c in self.codecs],
            "stage_peak_elems": list(self.stage_peak_elems),
            "dropped_levels": [d.to_dict() for d in self.dropped_levels],
            "prep_ms": self.prep_ms,
            "prep_ops": self.prep_ops,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelCatalog:
        if not isinstance(data, Mapping):
            raise ModelError(f"a model catalog must be a JSON object, got {type(data).__name__}")
        if data.get("format") != CATALOG_FORMAT:
            raise ModelError(
                f"model catalog format {data.get('format')!r} is not {CATALOG_FORMAT}; rebuild it with build_catalog"
            )
        try:
            return cls(
                model=str(data["model"]),
                stage_names=tuple(str(s) for s in data["stage_names"]),
                stage_latency_ms=tuple(float(v) for v in data["stage_latency_ms"]),
                stage_macs=tuple(int(v) for v in data["stage_macs"]),
                stage_params=tuple(int(v) for v in data["stage_params"]),
                activation_shapes=tuple(tuple(int(d) for d in s) for s in data["activation_shapes"]),
                result_bytes=int(data["result_bytes"]),
                window_s=float(data["window_s"]),
                base_accuracy=float(data["base_accuracy"]),
                levels=tuple(LevelEntry.from_dict(e) for e in data["levels"]),
                codecs=tuple(
                    CodecEntry(
                        codec=parse_codec(c["codec"]),
                        activation_bytes=tuple(int(v) for v in c["activation_bytes"]),
                        accuracy=tuple(float(v) for v in c["accuracy"]),
                        available=tuple(bool(v) for v in c["available"]) if "available" in c else None,
                    )
                    for c in data["codecs"]
                ),
                stage_peak_elems=tuple(int(v) for v in data.get("stage_peak_elems", ())),
                dropped_levels=tuple(DroppedLevel.from_dict(d) for d in data.get("dropped_levels", ())),
                prep_ms=float(data.get("prep_ms", 0.0)),
                prep_ops=_int(data.get("prep_ops", 0)),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ModelError(f"malformed model catalog: {e!r}") from None


def _cumsum(values: Iterable[float]) -> tuple[float, ...]:
    out = [0.0]
    for v in values:
        out.append(out[-1] + v)
    return tuple(out)


def _check_nonneg(what: str, values: Sequence[float]) -> None:
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v >= 0):
            raise ModelError(f"{what} must hold finite numbers >= 0, got {v!r}")


def _check_acc(what: str, values: Sequence[float]) -> None:
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
            raise ModelError(f"{what} must hold accuracies in [0, 1], got {v!r}")


# ---------------------------------------------------------------------------------------------
# Measuring


def _checked_accuracy(what: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise ModelError(f"{what} must return an accuracy in [0, 1], got {value!r}")
    return float(value)


def _default_window_s(name: str) -> float:
    from pipelines.specs import MODEL_SPECS

    spec = MODEL_SPECS.get(name)
    if spec is None:
        raise ModelError(f"model {name!r} is not in MODEL_SPECS: pass window_s to build_catalog")
    return spec.window_s


def build_catalog(
    model: StagedModel,
    evaluate: Callable[[StagedModel], float],
    accuracy_with_codec: Callable[[StagedModel, int, Codec], float],
    levels: Sequence[float] = PlannerConfig().compression_levels,
    repeats: int = 30,
    *,
    codecs: Sequence[Codec | str] = tuple(Codec),
    window_s: float | None = None,
    warmup: int = 5,
    entropy_coded_bytes: Callable[[StagedModel, int, Codec], float] | None = None,
    calibrate: Callable[[StagedModel], float] | None = None,
    rank_energies: Sequence[float] = CompressionConfig().energy_kept,  # compress.DEFAULT_LEVELS
    log: Callable[[str], None] | None = None,
    prepare: Callable[[], object] | None = None,
    prep_ops: int = 0,
) -> ModelCatalog:
    """Measure `model`'s catalog (see the module docstring for what is measured and reused).

    `evaluate(m)` is the accuracy in [0, 1] of a (compressed) copy `m` (on the test split: what the
    catalog reports); `calibrate(m)` the accuracy the per-layer ranks of each level < 1 are chosen on
    (a calibration slice of the training split; defaults to `evaluate` for callers that have only
    one set); `rank_energies` the singular-value energy fractions the greedy search tries per layer.
    `accuracy_with_codec(m, k, codec)` is the accuracy of the uncompressed model with the activation
    at cut k through `codec`; `entropy_coded_bytes(m, k, codec)` the mean bytes per window of a
    data-dependent codec (ans), measured only at the cuts whose activation is a quantised code.
    `repeats`/`warmup` are profile_model's. `window_s` defaults to the model's ModelSpec. `log`
    receives progress lines and the outlier warnings. `prepare()` preprocesses one raw window as the
    device does (see `measure_prep`), timed into `prep_ms` with the same repeats; `prep_ops` is
    recorded as given. Without `prepare` (a model fed its input directly) `prep_ms` is 0.
    """
    from pipelines.compress import compress_front, weights_digest
    from pipelines.profile import FP32_BYTES, profile_model, profile_prep

    level_set = sorted({float(e) for e in levels} | {1.0}, reverse=True)
    for e in level_set:
        if not 0 < e <= 1:
            raise ModelError(f"compression levels must be in (0, 1], got {e!r}")
    codec_set = [c for c in Codec if c in {parse_codec(x) for x in codecs} | {Codec.FP32}]
    n = model.n_stages
    window = _default_window_s(model.name) if window_s is None else float(window_s)
    say = log or (lambda _m: None)

    was_training = model.training
    model.eval()
    try:
        base_profile = profile_model(model, repeats=repeats, warmup=warmup)
        prep_ms = 0.0 if prepare is None else profile_prep(prepare, repeats=repeats, warmup=warmup)
        base_acc = _checked_accuracy("evaluate", evaluate(model))
        shapes = [base_profile.activation_shape(k) for k in range(n + 1)]
        stage_ms = [s.host_latency_ms for s in base_profile.stages]
        stage_params = [s.params for s in base_profile.stages]

        level_entries = [LevelEntry(1.0, _cumsum(stage_ms), tuple(int(p) for p in _cumsum(stage_params)),
                                    (base_acc,) * (n + 1))]  # fmt: skip
        if any(e < 1.0 for e in level_set):
            digest = weights_digest(model)
            choose = _memo_by_ranks(calibrate or evaluate)
            stage_cache: dict[tuple[int, tuple[tuple[str, int], ...]], float] = {}
            for energy in level_set[1:]:
                budget = level_budget_points(energy)
                say(f"{model.name}: level {energy:g}: choosing per-layer ranks under a {budget:g}-point budget")
                chosen = compress_front(model, n, choose, budget, rank_energies)
                ranks = tuple((d.name, d.rank) for d in chosen.layers if d.compressed)
                say(f"{model.name}: level {energy:g}: {len(ranks)} layers compressed; profiling and evaluating")
                lat, params, acc = _measure_level(
                    model, dict(ranks), evaluate, base_acc, stage_ms, repeats, warmup, stage_cache, say
                )
                level_entries.append(
                    LevelEntry(
                        energy, _cumsum(lat), tuple(int(p) for p in _cumsum(params)), tuple(acc),
                        budget_points=budget, ranks=ranks, weights_sha256=digest,
                        calibration_drop_points=round(chosen.accuracy_drop_points, 6),
                    )
                )  # fmt: skip
        kept, dropped = drop_dominated_levels(level_entries)
        for d in dropped:
            say(f"{model.name}: dropped level {d.energy_kept:g} ({d.budget_points:g}-point budget): {d.reason}")

        codec_entries = []
        for codec in codec_set:
            if codec.fixed_size:
                avail = [True] * (n + 1)
                nbytes = [encoded_nbytes(shapes[k], codec) for k in range(n)] + [0]
            else:
                avail = [k < n and model.symbol_prior(k) is not None for k in range(n)] + [True]
                if not any(avail[:n]):
                    continue  # no cut of this model carries a quantised code
                if entropy_coded_bytes is None:
                    raise ModelError(f"measuring {codec.value} needs entropy_coded_bytes(model, k, codec)")
                nbytes = [int(math.ceil(entropy_coded_bytes(model, k, codec))) if avail[k] else 0 for k in range(n)]
                nbytes.append(0)
            if codec is Codec.FP32:
                accs = [base_acc] * (n + 1)
            else:
                accs = [
                    _checked_accuracy("accuracy_with_codec", accuracy_with_codec(model, k, codec)) if avail[k] else 0.0
                    for k in range(n)
                ] + [base_acc]
            codec_entries.append(CodecEntry(codec, tuple(nbytes), tuple(accs), tuple(avail)))
    finally:
        model.train(was_training)

    return ModelCatalog(
        model=model.name,
        stage_names=tuple(model.stage_names),
        stage_latency_ms=tuple(stage_ms),
        stage_macs=tuple(s.macs for s in base_profile.stages),
        stage_params=tuple(stage_params),
        activation_shapes=tuple(shapes),
        result_bytes=math.prod(shapes[n]) * FP32_BYTES,
        window_s=window,
        base_accuracy=base_acc,
        levels=tuple(kept),
        codecs=tuple(codec_entries),
        stage_peak_elems=tuple(_stage_peaks(model)),
        dropped_levels=tuple(dropped),
        prep_ms=prep_ms,
        prep_ops=prep_ops,
    )


def _memo_by_ranks(evaluate: Callable[[StagedModel], float]) -> Callable[[StagedModel], float]:
    """`evaluate` remembered by the model's per-layer ranks: the greedy searches of the several
    budgets retrace the same first steps, and a model is fully defined by its ranks here."""
    from pipelines.compress import layer_ranks

    seen: dict[tuple[tuple[str, int], ...], float] = {}

    def run(m: StagedModel) -> float:
        key = tuple(sorted(layer_ranks(m).items()))
        if key not in seen:
            seen[key] = evaluate(m)
        return seen[key]

    return run


def _stage_peaks(model: StagedModel) -> list[int]:
    import torch

    from pipelines.profile import stage_peak_elems

    x = torch.zeros((1, *model.input_shape))
    out = []
    with torch.no_grad():
        for stage in model.stages:
            out.append(stage_peak_elems(stage, x))
            x = stage(x)
    return out


def _stage_key(stage: nn.Module) -> tuple[tuple[str, int], ...]:
    """What defines a stage's compressed form: the (path, rank) of each LowRank inside it."""
    from pipelines.compress import LowRank

    return tuple((name, m.rank) for name, m in stage.named_modules() if isinstance(m, LowRank))


def _measure_level(
    model: StagedModel,
    ranks: Mapping[str, int],
    evaluate: Callable[[StagedModel], float],
    base_acc: float,
    base_stage_ms: Sequence[float],
    repeats: int,
    warmup: int,
    stage_cache: dict[tuple[int, tuple[tuple[str, int], ...]], float],
    say: Callable[[str], None],
) -> tuple[list[float], list[int], list[float]]:
    """(per-stage host ms, per-stage params, accuracy per cut 0..N) of the model with `ranks`.

    Stages left untouched keep their uncompressed latency `base_stage_ms`; a stage compressed the
    same way as at a level measured before (same `stage_cache` key) keeps that latency. A newly
    measured stage more than OUTLIER_RATIO x off its uncompressed time is profiled again with 3x the
    runs; if it stays off, a warning gives the figures."""
    from pipelines.compress import compress_with_ranks
    from pipelines.profile import profile_model

    n = model.n_stages
    full = compress_with_ranks(model, n, ranks)
    keys = [_stage_key(stage) for stage in full.stages]
    changed = [bool(k) for k in keys]
    prof = profile_model(full, repeats=repeats, warmup=warmup)
    lat = []
    for i, (s, key, base) in enumerate(zip(prof.stages, keys, base_stage_ms, strict=True)):
        if not key:
            lat.append(base)
        elif (i, key) in stage_cache:
            lat.append(stage_cache[(i, key)])
        else:
            lat.append(s.host_latency_ms)
    fresh = [i for i in range(n) if keys[i] and (i, keys[i]) not in stage_cache]
    odd = [i for i in fresh if _outlier(lat[i], base_stage_ms[i])]
    if odd:
        again = profile_model(full, repeats=3 * max(repeats, 11), warmup=warmup)
        for i in odd:
            lat[i] = again.stages[i].host_latency_ms
            if _outlier(lat[i], base_stage_ms[i]):
                runs = 3 * max(repeats, 11)
                msg = (
                    f"{model.name}: stage {model.stage_names[i]} compressed ({dict(keys[i])}) takes "
                    f"{lat[i]:.3f} ms vs {base_stage_ms[i]:.3f} ms uncompressed "
                    f"({lat[i] / max(base_stage_ms[i], 1e-12):.1f}x) after re-profiling with {runs} runs"
                )
                warnings.warn(msg, RuntimeWarning, stacklevel=3)
                say(f"warning: {msg}")
    for i in fresh:
        stage_cache[(i, keys[i])] = lat[i]
    acc = [base_acc]
    for k in range(1, n + 1):
        if not changed[k - 1]:
            acc.append(acc[-1])  # the front at k is the front at k - 1 plus an untouched stage
        elif k == n:
            acc.append(_checked_accuracy("evaluate", evaluate(full)))
        else:
            acc.append(_checked_accuracy("evaluate", evaluate(compress_with_ranks(model, k, ranks))))
    return lat, [s.params for s in prof.stages], acc


def _outlier(ms: float, base_ms: float) -> bool:
    if base_ms <= 0 or ms <= 0:
        return False
    return not 1.0 / OUTLIER_RATIO <= ms / base_ms <= OUTLIER_RATIO


def drop_dominated_levels(entries: Sequence[LevelEntry]) -> tuple[list[LevelEntry], list[DroppedLevel]]:
    """(kept, dropped): from the cheapest level (1.0) down, a level is kept only when at some cut
    k >= 1 its front is smaller (fewer params) or faster (by more than FASTER_BY) than the front of
    every cheaper level kept so far; otherwise it could only cost accuracy, and it is dropped with
    the figures that show it."""
    ordered = sorted(entries, key=lambda e: -e.energy_kept)
    kept: list[LevelEntry] = []
    dropped: list[DroppedLevel] = []
    for e in ordered:
        if not kept:
            kept.append(e)
            continue
        budget = e.budget_points if e.budget_points is not None else level_budget_points(e.energy_kept)
        same = next((c for c in kept if c.ranks is not None and e.ranks is not None and c.ranks == e.ranks), None)
        if e.ranks is not None and not e.ranks:
            dropped.append(
                DroppedLevel(e.energy_kept, budget, f"compresses nothing: no layer fits a {budget:g}-point budget")
            )
            continue
        if same is not None:
            dropped.append(
                DroppedLevel(e.energy_kept, budget, f"the same per-layer ranks as level {same.energy_kept:g}")
            )
            continue
        n = len(e.front_params) - 1
        why = []
        useful = False
        for k in range(1, n + 1):
            dom = next((c for c in kept if not _better(e, c, k)), None)
            if dom is None:
                useful = True
                break
            why.append(
                f"cut {k}: {e.front_params[k]:,} params / {e.front_latency_ms[k]:.3f} ms vs level "
                f"{dom.energy_kept:g} {dom.front_params[k]:,} / {dom.front_latency_ms[k]:.3f}"
            )
        if useful:
            kept.append(e)
        else:
            dropped.append(
                DroppedLevel(
                    e.energy_kept, budget,
                    "neither smaller nor faster than a cheaper level at any cut (" + "; ".join(why) + ")",
                )
            )  # fmt: skip
    return kept, dropped


def _better(e: LevelEntry, c: LevelEntry, k: int) -> bool:
    """Whether level e's front at cut k is smaller or faster than level c's."""
    smaller = e.front_params[k] < c.front_params[k]
    faster = e.front_latency_ms[k] < c.front_latency_ms[k] * (1.0 - FASTER_BY)
    return smaller or faster


# ---------------------------------------------------------------------------------------------
# Files


def catalog_path(name: str, weights_dir: Path | None = None) -> Path:
    return (weights_dir or PathsConfig().weights_dir) / f"{name}.catalog.json"


def save_catalog(catalog: ModelCatalog, weights_dir: Path | None = None) -> Path:
    """Write `catalog` to `{weights_dir}/{model}.catalog.json` (atomically); returns the path."""
    path = catalog_path(catalog.model, weights_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(catalog.to_dict(), indent=1, allow_nan=False) + "\n")
    tmp.replace(path)
    return path


def load_catalog(name: str, weights_dir: Path | None = None) -> ModelCatalog:
    """The catalog of model `name`; ModelError (saying how to make it) when missing or malformed."""
    path = catalog_path(name, weights_dir)
    if not path.exists():
        if not path.parent.is_dir():  # no weights folder at all: no data package
            raise ModelError(missing_asset(f"the catalog of model {name!r}", path))
        raise ModelError(
            f"no catalog for model {name!r} at {path}; measure it with pipelines.catalog.build_catalog "
            "after `splitsense models train`"
        )
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelError(f"catalog file {path} is unreadable ({e}); rebuild it") from None
    catalog = ModelCatalog.from_dict(data)
    if catalog.model != name:
        raise ModelError(f"catalog file {path} is for model {catalog.model!r}, not {name!r}")
    return catalog


_SHIPPED: dict[Path, tuple[tuple[int, int], ModelCatalog]] = {}


def shipped_level_ranks(name: str, level: float, weights_dir: Path | None = None) -> tuple[dict[str, int], str | None]:
    """({layer: rank}, weights sha256) of level `level` < 1 in model `name`'s catalog file (read
    once per file version). ModelError when the catalog, the level or its ranks are missing."""
    path = catalog_path(name, weights_dir)
    try:
        st = path.stat()
        stamp = (st.st_mtime_ns, st.st_size)
    except OSError:
        stamp = (-1, -1)
    cached = _SHIPPED.get(path)
    if cached is None or cached[0] != stamp:
        cached = (stamp, load_catalog(name, weights_dir))
        _SHIPPED[path] = cached
    entry = cached[1].level(float(level))  # names the dropped or known levels when absent
    if entry.ranks is None:
        raise ModelError(
            f"level {level:g} of the catalog of {name!r} ({path}) has no per-layer ranks (measured before "
            f"they were recorded); rebuild it: `splitsense models catalog --model {name}`"
        )
    return entry.rank_map(), entry.weights_sha256


# ---------------------------------------------------------------------------------------------
# Preprocessing


def prep_window(trained: TrainedModel) -> np.ndarray:
    """One raw sensor window to time `trained`'s preprocessing on: a second of noise for audio, a
    window of the model's input shape for IMU (neither's cost depends on the values)."""
    shape = (WINDOW_SAMPLES,) if trained.spec.modality == "audio" else tuple(trained.model.input_shape)
    return (0.1 * np.random.default_rng(0).standard_normal(shape)).astype(np.float32)


def measure_prep(trained: TrainedModel, repeats: int = 30, warmup: int = 5) -> tuple[float, int]:
    """(prep_ms, prep_ops) of `trained`'s preprocessing (``prepare_window``) of one `prep_window`,
    timed as the stages are (``profile.profile_prep``)."""
    from pipelines.profile import prep_ops, profile_prep

    window = prep_window(trained)
    ms = profile_prep(lambda: trained.prepare_window(window), repeats=repeats, warmup=warmup)
    return ms, prep_ops(trained.spec.name)


def update_prep(
    name: str,
    weights_dir: Path | None = None,
    repeats: int = 101,
    warmup: int = 5,
    trained: TrainedModel | None = None,
) -> ModelCatalog:
    """Measure model `name`'s preprocessing (`measure_prep`) into its catalog file in place; every
    other figure of the file stays as it was. Returns the updated catalog."""
    from pipelines.training import load_trained

    catalog = load_catalog(name, weights_dir)
    tm = trained or load_trained(name, weights_dir)
    ms, ops = measure_prep(tm, repeats=repeats, warmup=warmup)
    updated = replace(catalog, prep_ms=ms, prep_ops=ops)
    save_catalog(updated, weights_dir)
    return updated
