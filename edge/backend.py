"""How a device computes: the seam between the runtime (edge/runtime.py) and an inference engine.

The runtime asks a `FrontBackend` for five things, numpy in and numpy out, by model name:

    info(model)                         what the model is: stages, classes, activation shape and
                                        symbol prior (the ans codec's table) per cut
    prepare(model, raw)                 one raw sensor window -> the standardised input (1, ...)
    run_stage(model, i, level, x)       stage i at compression level `level` (1.0 = uncompressed;
                                        a level's stage i is the same module at every cut > i, so
                                        the front [0, k) at L is stages 0..k-1 each at L, and a
                                        tail [k, N) is stages k..N-1 at 1.0). The runtime calls it
                                        stage by stage: each stage's device time goes to telemetry,
                                        which feeds the planner's cost model
    run_front(model, cut, level, x)     stages [0, cut) at `level`; run_full(model, x): the whole
                                        uncompressed model (local fallback): logits
    shares_front(main, task, cut)       whether `task` computes exactly `main`'s activation at `cut`
                                        (a task group's shared encoder, pipelines/groups.py)
    fronts(model)                       the (cut, level) fronts it can run: what the device advertises
                                        in telemetry (the planner names only those) and checks every
                                        plan row against (a row naming another is refused, not run)

Two implementations:

    TorchBackend   PyTorch eager, from the weights (`TrainedModel`): what the runtime did before the
                   seam, compressed fronts built by `compress_front_at_level` once per level (or
                   taken from a shared `front_cache`, the simulator's)
    OnnxBackend    ONNX Runtime on the files `splitsense models export` wrote (pipelines/artifacts.py),
                   `intra_op_threads` threads (1 by default: a device runs one window at a time),
                   preprocessing in numpy (pipelines/numpy_features.py). It never imports torch:
                   this module imports torch only inside TorchBackend.

Which one (`EdgeConfig.backend`, `splitsense edge run --backend`): "onnx", "torch", or "auto" (the
default): ONNX Runtime when every model the device runs has an export whose manifest names the
current weights (sha256) and onnxruntime is installed, PyTorch otherwise, with the reason
(`choose_backend`). `EdgeDevice` built without a backend runs PyTorch, as before.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from pipelines.artifacts import ExportedModel, choose_runtime, model_export_dir
from pipelines.numpy_features import Preprocessor, fix_length
from splitsense.config import EDGE_BACKENDS
from splitsense.errors import ConfigError, DataError, ModelError
from splitsense.kinds import SymbolPrior

if TYPE_CHECKING:
    from pipelines.stages import StagedModel
    from pipelines.training import TrainedModel

__all__ = [
    "BACKEND_CHOICES",
    "FrontBackend",
    "ModelInfo",
    "OnnxBackend",
    "TorchBackend",
    "choose_backend",
    "make_backend",
]

BACKEND_CHOICES = EDGE_BACKENDS  # EdgeConfig.backend


@dataclass(frozen=True)
class ModelInfo:
    """What the runtime needs to know of a model besides running it."""

    name: str
    n_stages: int
    num_classes: int
    input_shape: tuple[int, ...]
    activation_shapes: tuple[tuple[int, ...], ...]  # per cut 0..N, without the batch dimension
    priors: Mapping[int, SymbolPrior] = field(default_factory=dict)  # cut -> coding table of a bottleneck

    def check_cut(self, k: int) -> int:
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= self.n_stages:
            raise ModelError(f"cut {k!r} is out of range for model {self.name!r}: expected 0..{self.n_stages}")
        return k

    def activation_shape(self, k: int) -> tuple[int, ...]:
        return self.activation_shapes[self.check_cut(k)]

    def symbol_prior(self, k: int) -> SymbolPrior | None:
        return self.priors.get(self.check_cut(k))


@runtime_checkable
class FrontBackend(Protocol):
    """The inference engine a device runs its model on (module docstring)."""

    kind: str  # "torch" | "onnx"

    def models(self) -> tuple[str, ...]: ...

    def info(self, model: str) -> ModelInfo: ...

    def prepare(self, model: str, raw: np.ndarray) -> np.ndarray: ...

    def run_stage(self, model: str, stage: int, level: float, x: np.ndarray) -> np.ndarray: ...

    def run_front(self, model: str, cut: int, level: float, x: np.ndarray) -> np.ndarray: ...

    def run_full(self, model: str, x: np.ndarray) -> np.ndarray: ...

    def shares_front(self, main: str, task: str, cut: int) -> bool: ...

    def warm_up(self, model: str) -> None: ...

    def load(self, model: str, levels: Sequence[float]) -> None: ...

    def fronts(self, model: str) -> tuple[tuple[int, float], ...]: ...


def _all_cuts(n_stages: int, levels: Sequence[float]) -> tuple[tuple[int, float], ...]:
    """Every cut 0..N at each level (cut 0 runs nothing: at 1.0 only), levels from 1.0 down."""
    return tuple((k, lv) for lv in sorted(set(levels), reverse=True) for k in range(n_stages + 1) if lv >= 1.0 or k > 0)


def _unknown(kind: str, model: str, known: Sequence[str]) -> ModelError:
    return ModelError(f"the {kind} backend holds no model {model!r} (it holds {', '.join(known) or 'none'})")


class TorchBackend:
    """PyTorch eager mode on the weights (module docstring). `front_caches` maps a model name to a
    dict {(cut, level): StagedModel} shared between devices (`simulators.fleet.compressed_fronts`);
    the backend reads the front of cut N (the whole model compressed at a level) from it, or builds
    and stores it there."""

    kind = "torch"

    def __init__(
        self,
        trained: Sequence[TrainedModel],
        *,
        front_caches: Mapping[str, MutableMapping[tuple[int, float], StagedModel]] | None = None,
        weights_dir: Path | None = None,
    ) -> None:
        import torch  # only here: the ONNX Runtime backend runs without it

        self._torch = torch
        self._trained = {t.spec.name: t for t in trained}
        if not self._trained:
            raise ConfigError("a backend needs at least one model")
        self._caches: dict[str, MutableMapping[tuple[int, float], StagedModel]] = {
            name: (front_caches or {}).get(name, {}) for name in self._trained
        }
        self._weights_dir = weights_dir
        self._infos: dict[str, ModelInfo] = {}
        self._fronts: dict[str, tuple[tuple[int, float], ...]] = {}

    def models(self) -> tuple[str, ...]:
        return tuple(self._trained)

    def fronts(self, model: str) -> tuple[tuple[int, float], ...]:
        """Every cut uncompressed, and every cut at each level the weights can build: a level of
        the model's catalog whose per-layer ranks were chosen for these very weights (what
        `compress_front_at_level` needs), or one already in the shared front cache."""
        out = self._fronts.get(model)
        if out is None:
            base = self.trained(model).model
            levels = {1.0} | {lv for (_, lv) in self._caches[model]}
            from pipelines.catalog import load_catalog
            from pipelines.compress import weights_digest

            try:
                catalog = load_catalog(model, self._weights_dir)
            except ModelError:
                catalog = None
            if catalog is not None:
                digest: str | None = None
                for e in catalog.levels:
                    if e.energy_kept >= 1.0 or e.ranks is None:
                        continue
                    if e.weights_sha256 is not None:
                        digest = digest or weights_digest(base)
                        if e.weights_sha256 != digest:
                            continue
                    levels.add(e.energy_kept)
            out = self._fronts[model] = _all_cuts(base.n_stages, sorted(levels))
        return out

    def trained(self, model: str) -> TrainedModel:
        t = self._trained.get(model)
        if t is None:
            raise _unknown(self.kind, model, list(self._trained))
        return t

    def info(self, model: str) -> ModelInfo:
        info = self._infos.get(model)
        if info is None:
            m = self.trained(model).model
            n = m.n_stages
            priors = {k: p for k in range(n + 1) if (p := m.symbol_prior(k)) is not None}
            shapes = tuple(m.activation_shape(k) for k in range(n + 1))
            info = ModelInfo(model, n, m.num_classes, tuple(m.input_shape), shapes, priors)
            self._infos[model] = info
        return info

    def staged(self, model: str, level: float) -> StagedModel:
        """The model with every stage compressed at `level` (1.0: the model itself)."""
        base = self.trained(model).model
        if level >= 1.0:
            return base
        cache = self._caches[model]
        key = (base.n_stages, level)
        m = cache.get(key)
        if m is None:
            from pipelines.compress import compress_front_at_level

            m = compress_front_at_level(base, base.n_stages, level, weights_dir=self._weights_dir).eval()
            cache[key] = m
        return m

    def prepare(self, model: str, raw: np.ndarray) -> np.ndarray:
        with self._torch.inference_mode():
            out: np.ndarray = self.trained(model).prepare_window(raw).numpy()
        return out

    def run_stage(self, model: str, stage: int, level: float, x: np.ndarray) -> np.ndarray:
        torch = self._torch
        module = self.staged(model, level).stages[stage]
        with torch.inference_mode():
            out: np.ndarray = module(torch.from_numpy(x)).numpy()
        return out

    def run_front(self, model: str, cut: int, level: float, x: np.ndarray) -> np.ndarray:
        torch = self._torch
        with torch.inference_mode():
            out: np.ndarray = self.staged(model, level).run(torch.from_numpy(x), 0, cut).numpy()
        return out

    def run_full(self, model: str, x: np.ndarray) -> np.ndarray:
        torch = self._torch
        with torch.inference_mode():
            out: np.ndarray = self.trained(model).model(torch.from_numpy(x)).numpy()
        return out

    def shares_front(self, main: str, task: str, cut: int) -> bool:
        """Same preprocessing statistics and the same weights of stages [0, cut)."""
        torch = self._torch
        a_t, b_t = self.trained(main), self.trained(task)
        a, b = a_t.standardizer.state(), b_t.standardizer.state()
        same = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        for i in range(cut):
            sa, sb = a_t.model.stages[i].state_dict(), b_t.model.stages[i].state_dict()
            same = same and sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
        return bool(same)

    def warm_up(self, model: str) -> None:
        """One inference on zeros, so that the first real window does not pay torch's lazy set-up."""
        m = self.trained(model).model
        with self._torch.inference_mode():
            m(self._torch.zeros((1, *m.input_shape)))

    def load(self, model: str, levels: Sequence[float]) -> None:
        for level in levels:
            self.staged(model, float(level))


class OnnxBackend:
    """ONNX Runtime on exported models (module docstring). `directories` maps each model name to
    its export folder (`pipelines.artifacts.model_export_dir`). `file_format` "onnx" (default: a
    full ONNX Runtime build optimises for this CPU as it opens them) or "ort" (the mobile format);
    `prep` "numpy" (default) or "onnx" (the exported preprocessing graph); `verify` checks every
    file's sha256 against the manifest when opening."""

    kind = "onnx"

    def __init__(
        self,
        directories: Mapping[str, Path],
        *,
        intra_op_threads: int = 1,
        file_format: str = "onnx",
        prep: str = "numpy",
        verify: bool = False,
    ) -> None:
        if not directories:
            raise ConfigError("a backend needs at least one model")
        if prep not in ("numpy", "onnx"):
            raise ConfigError(f"prep must be 'numpy' or 'onnx', got {prep!r}")
        self._models = {
            name: ExportedModel(Path(d), intra_op_threads=intra_op_threads, file_format=file_format, verify=verify)
            for name, d in directories.items()
        }
        for name, ex in self._models.items():
            if ex.manifest.model != name:
                raise ModelError(f"{ex.directory} holds the export of {ex.manifest.model!r}, not {name!r}")
        self.intra_op_threads = intra_op_threads
        self.file_format = file_format
        self.prep_kind = prep
        self._preps = {
            name: Preprocessor(ex.manifest.modality, ex.manifest.mean, ex.manifest.std)
            for name, ex in self._models.items()
        }
        self._infos: dict[str, ModelInfo] = {}

    @classmethod
    def for_models(
        cls, models: Sequence[str], root: Path | None = None, weights_dir: Path | None = None, **kw: Any
    ) -> OnnxBackend:
        """The exports of `models` under `root` (default `<weights_dir>/export`)."""
        return cls({m: model_export_dir(m, root, weights_dir) for m in models}, **kw)

    def models(self) -> tuple[str, ...]:
        return tuple(self._models)

    def fronts(self, model: str) -> tuple[tuple[int, float], ...]:
        """What the export's manifest lists (`Manifest.fronts`): an export limited to some levels
        (`splitsense models export --level L`) holds only those."""
        return tuple((f.cut, f.level) for f in self.exported(model).manifest.fronts)

    def exported(self, model: str) -> ExportedModel:
        ex = self._models.get(model)
        if ex is None:
            raise _unknown(self.kind, model, list(self._models))
        return ex

    def info(self, model: str) -> ModelInfo:
        info = self._infos.get(model)
        if info is None:
            m = self.exported(model).manifest
            priors = {k: p for k in range(m.n_stages + 1) if (p := m.symbol_prior(k)) is not None}
            info = ModelInfo(model, m.n_stages, m.num_classes, m.input_shape, m.activation_shapes, priors)
            self._infos[model] = info
        return info

    def prepare(self, model: str, raw: np.ndarray) -> np.ndarray:
        prep = self._preps.get(model)
        if prep is None:
            raise _unknown(self.kind, model, list(self._models))
        if self.prep_kind == "numpy":
            return prep(raw)
        if prep.modality == "audio":  # the graph takes fixed-length samples and checks nothing
            wave = fix_length(np.asarray(raw, dtype=np.float32))[None]
            if not np.isfinite(wave).all():
                raise DataError("audio window contains NaN or inf samples")
            return self.exported(model).run_prep(wave)
        return self.exported(model).run_prep(prep.raw_input(raw))

    def run_stage(self, model: str, stage: int, level: float, x: np.ndarray) -> np.ndarray:
        return self.exported(model).run_stage(stage, level, x)

    def run_front(self, model: str, cut: int, level: float, x: np.ndarray) -> np.ndarray:
        return self.exported(model).run_front(cut, level, x)

    def run_full(self, model: str, x: np.ndarray) -> np.ndarray:
        return self.exported(model).run_whole(x)

    def shares_front(self, main: str, task: str, cut: int) -> bool:
        """Same standardisation statistics and byte-identical stage graphs [0, cut)."""
        a, b = self.exported(main).manifest, self.exported(task).manifest
        return a.chain_digest(cut) == b.chain_digest(cut)

    def warm_up(self, model: str) -> None:
        """Open the uncompressed stages' sessions and run each once on zeros."""
        info = self.info(model)
        x = np.zeros((1, *info.input_shape), dtype=np.float32)
        self.exported(model).run_stages(x, 0, info.n_stages, 1.0)

    def load(self, model: str, levels: Sequence[float]) -> None:
        self.exported(model).open_all([float(lv) for lv in levels])


def choose_backend(
    kind: str, models: Sequence[str], *, root: Path | None = None, weights_dir: Path | None = None
) -> tuple[str, str]:
    """(the backend to run, why) for `EdgeConfig.backend` `kind`: "torch" and "onnx" as asked
    ("onnx" with an export missing or stale: ConfigError saying how to export), "auto": "onnx"
    when onnxruntime is installed and every model in `models` has a current export, else "torch"."""
    if kind not in BACKEND_CHOICES:
        raise ConfigError(f"edge backend must be one of {', '.join(BACKEND_CHOICES)}, got {kind!r}")
    return choose_runtime(kind, models, "the onnx backend", root, weights_dir)


def make_backend(
    kind: str,
    models: Sequence[str],
    *,
    root: Path | None = None,
    weights_dir: Path | None = None,
    intra_op_threads: int = 1,
    trained: Sequence[TrainedModel] | None = None,
    front_caches: Mapping[str, MutableMapping[tuple[int, float], StagedModel]] | None = None,
) -> FrontBackend:
    """The backend `kind` ("torch" or "onnx", as `choose_backend` resolved it) for `models`. The
    torch one uses `trained` when given (else it loads the weights)."""
    if kind == "onnx":
        return OnnxBackend.for_models(models, root, weights_dir, intra_op_threads=intra_op_threads)
    if kind == "torch":
        if trained is None:
            from pipelines.training import load_trained

            trained = [load_trained(m, weights_dir) for m in models]
        return TorchBackend(trained, front_caches=front_caches, weights_dir=weights_dir)
    raise ConfigError(f"no backend {kind!r}: expected 'torch' or 'onnx'")
