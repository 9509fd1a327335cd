"""The seam between the broker and whatever runs the tail stages [k, N).

`TailBackend.run_tail(model, cut, batch)` takes a stacked, decoded activation batch and returns
logits. Two implementations: `RayTailBackend` (cloud/serving.py, the real Ray Serve deployments)
and `InProcessTailBackend` here, the in-process twin that unit tests and the `in_process`
benchmark row use. The broker never knows which one it talks to.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from pipelines.artifacts import ExportedModel, choose_runtime, model_export_dir
from pipelines.stages import StagedModel
from pipelines.training import TrainedModel, load_trained
from splitsense.config import TAIL_ENGINES
from splitsense.errors import ConfigError, DependencyError, ModelError
from splitsense.kinds import SymbolPrior


class TailUnavailableError(DependencyError):
    """The tail could not be run (replica dead, Ray down): the broker answers UNAVAILABLE."""


class TailBackend(Protocol):
    async def run_tail(self, model: str, cut: int, batch: np.ndarray) -> np.ndarray:
        """Run stages [cut, N) of `model` on a (B, *activation_shape) float32 batch -> (B, classes)."""
        ...

    async def close(self) -> None: ...


@dataclass(frozen=True)
class ModelInfo:
    """What the broker validates a request against."""

    name: str
    n_stages: int
    num_classes: int
    input_shape: tuple[int, ...]
    activation_shapes: tuple[tuple[int, ...], ...]  # index k: shape that crosses the wire at cut k
    # index k: the coding table of the quantised code at cut k (a bottleneck), None elsewhere
    symbol_priors: tuple[SymbolPrior | None, ...] = ()
    # index k: a digest of everything that makes the activation at cut k (preprocessing statistics
    # and the weights of stages [0, k)): two models with equal digests at k can share one upload
    front_digests: tuple[str, ...] = ()

    def activation_shape(self, cut: int) -> tuple[int, ...]:
        return self.activation_shapes[cut]

    def symbol_prior(self, cut: int) -> SymbolPrior | None:
        return self.symbol_priors[cut] if cut < len(self.symbol_priors) else None


class ModelRegistry:
    """The trained models this cloud serves, loaded once."""

    def __init__(self, names: Iterable[str], weights_dir: object = None) -> None:
        self.weights_dir: Path | None = Path(weights_dir) if weights_dir is not None else None  # type: ignore[arg-type]
        self._trained: dict[str, TrainedModel] = {}
        for name in names:
            self._trained[name] = load_trained(name, weights_dir)  # type: ignore[arg-type]
        if not self._trained:
            raise ModelError("the model registry is empty: name at least one model")

    @property
    def names(self) -> list[str]:
        return list(self._trained)

    def trained(self, name: str) -> TrainedModel:
        try:
            return self._trained[name]
        except KeyError:
            raise ModelError(f"unknown model {name!r}; served models: {', '.join(self._trained)}") from None

    def model(self, name: str) -> StagedModel:
        return self.trained(name).model

    @cached_property
    def info(self) -> dict[str, ModelInfo]:
        out = {}
        for name, tm in self._trained.items():
            m = tm.model
            out[name] = ModelInfo(
                name=name,
                n_stages=m.n_stages,
                num_classes=m.num_classes,
                input_shape=m.input_shape,
                activation_shapes=tuple(m.activation_shape(k) for k in range(m.n_stages + 1)),
                symbol_priors=tuple(m.symbol_prior(k) for k in range(m.n_stages + 1)),
                front_digests=front_digests(tm),
            )
        return out


def front_digests(tm: TrainedModel) -> tuple[str, ...]:
    """Per cut k in 0..N: sha256 (16 hex digits) of the input shape, the standardiser's statistics and
    the weights and buffers of stages [0, k), in order."""
    h = hashlib.sha256(repr(tuple(tm.model.input_shape)).encode())
    for key, value in sorted(tm.standardizer.state().items()):
        h.update(key.encode())
        h.update(value.detach().contiguous().cpu().numpy().tobytes())
    out = [h.hexdigest()[:16]]
    for stage in tm.model.stages:
        for key, value in stage.state_dict().items():
            h.update(key.encode())
            h.update(value.detach().contiguous().cpu().numpy().tobytes())
        out.append(h.hexdigest()[:16])
    return tuple(out)


def run_tail_sync(model: StagedModel, cut: int, batch: np.ndarray) -> np.ndarray:
    """Stages [cut, N) on a batch, no autograd; shared by the in-process twin and the Ray replicas."""
    with torch.inference_mode():
        x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))
        return model.run(x, cut, model.n_stages).numpy()


class TailRunner(Protocol):
    """Stages [cut, N) of one model on a stacked float32 batch -> (B, classes) float32 logits."""

    engine: str  # "onnx" or "torch": what runs it

    def __call__(self, cut: int, batch: np.ndarray) -> np.ndarray: ...


class TorchTail:
    """The trained weights in PyTorch (`run_tail_sync`)."""

    engine = "torch"

    def __init__(self, model: StagedModel) -> None:
        self.model = model

    def __call__(self, cut: int, batch: np.ndarray) -> np.ndarray:
        return run_tail_sync(self.model, cut, batch)


class OnnxTail:
    """ONNX Runtime on the model's export: the stage graphs [cut, N) at level 1.0, one after another
    (a tail is never compressed; the exported stages take any batch size)."""

    engine = "onnx"

    def __init__(self, exported: ExportedModel) -> None:
        self.exported = exported
        self.n_stages = exported.manifest.n_stages

    def __call__(self, cut: int, batch: np.ndarray) -> np.ndarray:
        self.exported.manifest.check_cut(cut)
        x = np.ascontiguousarray(batch, dtype=np.float32)
        return self.exported.run_stages(x, cut, self.n_stages, 1.0) if cut < self.n_stages else x

    def warm_up(self) -> None:
        """Open every level-1.0 stage session now, not inside the first batch."""
        self.exported.open_all([1.0])


def choose_tail_engine(
    kind: str, models: Iterable[str], weights_dir: Path | None = None, root: Path | None = None
) -> tuple[str, str]:
    """(the engine to run, why) for serving.tail_engine `kind`: "torch" and "onnx" as asked ("onnx"
    with onnxruntime missing or an export missing or stale: ConfigError saying how to export);
    "auto": "onnx" when onnxruntime is installed and every model has a current export, else "torch".
    `root`: the exports' root (default `<weights_dir>/export`, where `splitsense models export` writes)."""
    if kind not in TAIL_ENGINES:
        raise ConfigError(f"serving.tail_engine must be one of {TAIL_ENGINES}, got {kind!r}")
    return choose_runtime(kind, list(models), "serving.tail_engine onnx", root, weights_dir)


def make_tail(
    name: str,
    kind: str,
    model: StagedModel,
    weights_dir: Path | None = None,
    threads: int = 1,
    root: Path | None = None,
) -> TailRunner:
    """The tail runner of model `name` for serving.tail_engine `kind` (`choose_tail_engine`);
    `model` is its loaded torch twin, run when the engine is torch."""
    engine, _ = choose_tail_engine(kind, [name], weights_dir, root)
    if engine == "torch":
        return TorchTail(model)
    ex = ExportedModel(model_export_dir(name, root, weights_dir), intra_op_threads=threads)
    if ex.manifest.n_stages != model.n_stages:
        raise ModelError(f"the export of {name!r} has {ex.manifest.n_stages} stages, its weights {model.n_stages}")
    tail = OnnxTail(ex)
    tail.warm_up()
    return tail


class InProcessTailBackend:
    """Runs tails in this process on a small thread pool (torch and ONNX Runtime release the GIL in
    their kernels). `engine`: serving.tail_engine ("torch" by default: the registry's weights)."""

    def __init__(
        self, registry: ModelRegistry, threads: int = 1, engine: str = "torch", export_root: Path | None = None
    ) -> None:
        self._registry = registry
        self._root = export_root
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="tail")
        self._kind = engine
        self._tails: dict[str, TailRunner] = {}
        if engine != "torch":  # opened now (sessions included), not inside the first batch
            for name in registry.names:
                self.tail(name)

    def tail(self, model: str) -> TailRunner:
        t = self._tails.get(model)
        if t is None:
            t = self._tails[model] = make_tail(
                model, self._kind, self._registry.model(model), self._registry.weights_dir, root=self._root
            )
        return t

    @property
    def engines(self) -> dict[str, str]:
        """{model: "onnx" | "torch"} of the tails opened so far."""
        return {m: t.engine for m, t in self._tails.items()}

    async def run_tail(self, model: str, cut: int, batch: np.ndarray) -> np.ndarray:
        tail = self.tail(model)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, tail, cut, batch)

    async def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
