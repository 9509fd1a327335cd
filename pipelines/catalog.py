"""What the planner knows about one model, measured offline: the model catalog.

A :class:`ModelCatalog` holds, for one StagedModel with N stages,

    per stage                     host latency (ms), MACs, parameters
    per cut k in 0..N and codec   bytes on the wire (``codecs.encoded_nbytes``; 0 at k = N, where
                                  nothing crosses), accuracy with the activation through the codec
    per cut k and level           host latency and parameters of the front [0, k) compressed at
                                  that level (``compress_front_at_level``; 1.0 = uncompressed), and
                                  the model's accuracy with that front (activation sent as fp32)

plus the window period (how often a device runs the model) and the size of the result (fp32
logits) that comes back. The cost model (``cloud.controller.costmodel``) reads nothing else.

Combining the two accuracy tables is the cost model's job (it adds the two drops); the catalog
records only what was measured. By construction the uncompressed level and the fp32 codec cost
no accuracy at any cut, and no codec costs any at k = N (nothing is encoded): these are checked
when a catalog is built, so the fully local, uncompressed choice always meets any accuracy budget.

Affordability (``build_catalog``): one profile of the model, one profile per level of the model
with every stage compressed (a layer's rank at a level does not depend on the cut, so the front at
cut k is exactly the first k stages of that model), and an accuracy evaluation per level only at
the cuts whose last front stage was actually changed by the compression; the other cuts reuse the
accuracy of the cut before. The fp32 codec is exact and is not evaluated. Stages a level leaves
untouched keep the uncompressed latency, so timing noise never makes an unchanged front look
faster or slower.

Catalogs are plain data: ``to_dict``/``from_dict`` round-trip through JSON, and
``save_catalog``/``load_catalog`` keep them beside the weights as ``{name}.catalog.json``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.codecs import Codec, encoded_nbytes, parse_codec
from pipelines.compress import LowRank, compress_front_at_level
from pipelines.profile import FP32_BYTES, profile_model
from pipelines.stages import StagedModel
from splitsense.config import PathsConfig, PlannerConfig
from splitsense.errors import ModelError

__all__ = [
    "CATALOG_FORMAT",
    "CodecEntry",
    "LevelEntry",
    "ModelCatalog",
    "build_catalog",
    "catalog_path",
    "load_catalog",
    "save_catalog",
]

CATALOG_FORMAT = 1  # bumped when the JSON layout changes; load_catalog refuses other formats
_ACC_TOL = 1e-9  # accuracies that must equal the base one may differ by float noise only


@dataclass(frozen=True)
class LevelEntry:
    """One compression level: the front [0, k) with every SVD-able layer keeping `energy_kept`."""

    energy_kept: float  # 1.0 = uncompressed
    front_latency_ms: tuple[float, ...]  # per cut 0..N, host latency of the compressed front
    front_params: tuple[int, ...]  # per cut 0..N
    accuracy: tuple[float, ...]  # per cut 0..N, activation sent as fp32

    def to_dict(self) -> dict[str, Any]:
        return {
            "energy_kept": self.energy_kept,
            "front_latency_ms": list(self.front_latency_ms),
            "front_params": list(self.front_params),
            "accuracy": list(self.accuracy),
        }


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

    def __post_init__(self) -> None:
        where = f"catalog of {self.model!r}"
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
        top = levels[0]
        if any(abs(a - self.base_accuracy) > _ACC_TOL for a in top.accuracy):
            raise ModelError(f"{where}: level 1.0 (uncompressed) must have the base accuracy at every cut")
        cum = _cumsum(self.stage_latency_ms)
        if any(
            not math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9) for a, b in zip(top.front_latency_ms, cum, strict=True)
        ):
            raise ModelError(f"{where}: level 1.0 front_latency_ms must be the running sum of stage_latency_ms")
        object.__setattr__(self, "levels", levels)

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
            if c.available is not None and codec is Codec.FP32 and not all(c.available):
                raise ModelError(f"{w}: fp32 carries every cut")
            if c.activation_bytes[n] != 0:
                raise ModelError(f"{w}: nothing crosses the wire at cut {n} (fully local): bytes must be 0")
            if abs(c.accuracy[n] - self.base_accuracy) > _ACC_TOL:
                raise ModelError(f"{w}: at cut {n} (fully local) nothing is encoded: accuracy must be the base")
            if codec is Codec.FP32 and any(abs(a - self.base_accuracy) > _ACC_TOL for a in c.accuracy):
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
                levels=tuple(
                    LevelEntry(
                        energy_kept=float(e["energy_kept"]),
                        front_latency_ms=tuple(float(v) for v in e["front_latency_ms"]),
                        front_params=tuple(int(v) for v in e["front_params"]),
                        accuracy=tuple(float(v) for v in e["accuracy"]),
                    )
                    for e in data["levels"]
                ),
                codecs=tuple(
                    CodecEntry(
                        codec=parse_codec(c["codec"]),
                        activation_bytes=tuple(int(v) for v in c["activation_bytes"]),
                        accuracy=tuple(float(v) for v in c["accuracy"]),
                        available=tuple(bool(v) for v in c["available"]) if "available" in c else None,
                    )
                    for c in data["codecs"]
                ),
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
    from pipelines.models import MODEL_SPECS

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
) -> ModelCatalog:
    """Measure `model`'s catalog (see the module docstring for what is measured and reused).

    `evaluate(m)` is the accuracy in [0, 1] of a (compressed) copy `m`; `accuracy_with_codec(m, k,
    codec)` the accuracy of the uncompressed model with the activation at cut k through `codec`;
    `entropy_coded_bytes(m, k, codec)` the mean bytes per window of a data-dependent codec (ans),
    measured only at the cuts whose activation is a quantised code.
    `repeats`/`warmup` are profile_model's. `window_s` defaults to the model's ModelSpec.
    """
    level_set = sorted({float(e) for e in levels} | {1.0}, reverse=True)
    for e in level_set:
        if not 0 < e <= 1:
            raise ModelError(f"compression levels must be in (0, 1], got {e!r}")
    codec_set = [c for c in Codec if c in {parse_codec(x) for x in codecs} | {Codec.FP32}]
    n = model.n_stages
    window = _default_window_s(model.name) if window_s is None else float(window_s)

    was_training = model.training
    model.eval()
    try:
        base_profile = profile_model(model, repeats=repeats, warmup=warmup)
        base_acc = _checked_accuracy("evaluate", evaluate(model))
        shapes = [base_profile.activation_shape(k) for k in range(n + 1)]
        stage_ms = [s.host_latency_ms for s in base_profile.stages]
        stage_params = [s.params for s in base_profile.stages]

        level_entries = []
        for energy in level_set:
            if energy >= 1.0:
                lat, params, acc = stage_ms, stage_params, [base_acc] * (n + 1)
            else:
                lat, params, acc = _measure_level(model, energy, evaluate, base_acc, stage_ms, repeats, warmup)
            level_entries.append(LevelEntry(energy, _cumsum(lat), tuple(int(p) for p in _cumsum(params)), tuple(acc)))

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
        levels=tuple(level_entries),
        codecs=tuple(codec_entries),
    )


def _measure_level(
    model: StagedModel,
    energy: float,
    evaluate: Callable[[StagedModel], float],
    base_acc: float,
    base_stage_ms: Sequence[float],
    repeats: int,
    warmup: int,
) -> tuple[list[float], list[int], list[float]]:
    """(per-stage host ms, per-stage params, accuracy per cut 0..N) at one compression level.

    Stages the level leaves untouched keep their uncompressed latency `base_stage_ms`."""
    n = model.n_stages
    full = compress_front_at_level(model, n, energy)
    prof = profile_model(full, repeats=repeats, warmup=warmup)
    changed = [any(isinstance(m, LowRank) for m in stage.modules()) for stage in full.stages]
    acc = [base_acc]
    for k in range(1, n + 1):
        if not changed[k - 1]:
            acc.append(acc[-1])  # the front at k is the front at k - 1 plus an untouched stage
        elif k == n:
            acc.append(_checked_accuracy("evaluate", evaluate(full)))
        else:
            acc.append(_checked_accuracy("evaluate", evaluate(compress_front_at_level(model, k, energy))))
    lat = [s.host_latency_ms if c else b for s, c, b in zip(prof.stages, changed, base_stage_ms, strict=True)]
    return lat, [s.params for s in prof.stages], acc


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
