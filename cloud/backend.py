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
from typing import Protocol

import numpy as np
import torch

from pipelines.stages import StagedModel
from pipelines.training import TrainedModel, load_trained
from splitsense.errors import DependencyError, ModelError
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


class InProcessTailBackend:
    """Runs tails in this process on a small thread pool (torch releases the GIL in its kernels)."""

    def __init__(self, registry: ModelRegistry, threads: int = 1) -> None:
        self._registry = registry
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="tail")

    async def run_tail(self, model: str, cut: int, batch: np.ndarray) -> np.ndarray:
        m = self._registry.model(model)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, run_tail_sync, m, cut, batch)

    async def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
