"""Reuse of a fleet's front results: each (window, cut, level, codec) computed once for real.

In a large simulated fleet many devices replay the same test recording, so the same window meets
the same front (cut, compression level) and the same codec again and again; with compute_time
"reference" its device time comes from the catalog, not from this host, so computing it again
changes nothing the simulation measures but costs the host CPU that the fleet's own event loop
needs. `ReuseBackend` wraps a device backend (edge/backend.py's `FrontBackend` seam) and returns
the first result of each call on the same input object; `ReuseEncoder` does the same for the
encoding of an activation (EdgeDevice's `encoder`). The cloud still receives and computes every offloaded window
for real: only the device side is reused.

Keys are the identity of the input array (the recording's raw window, then each stage's cached
output, so a chain of stages stays on cached objects), checked with `is` against a strong
reference held in the entry: an id reused by another object is a miss, never a wrong answer. An
input the cache never produced (another device's fresh array) is simply computed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from edge.backend import FrontBackend, ModelInfo

__all__ = ["ReuseBackend", "ReuseEncoder", "ReuseStats"]

_MAX_ENTRIES = 200_000  # per cache; past it the cache starts over (a bound, never reached in practice)


@dataclass
class ReuseStats:
    hits: int = 0
    misses: int = 0

    @property
    def hit_rate(self) -> float:
        n = self.hits + self.misses
        return self.hits / n if n else 0.0

    def to_dict(self) -> dict[str, float]:
        return {"hits": self.hits, "misses": self.misses, "hit_rate": round(self.hit_rate, 4)}


class _IdentityCache:
    """{(identity of an input object, *rest): (input, output)}; a hit needs the same object."""

    def __init__(self, stats: ReuseStats, max_entries: int = _MAX_ENTRIES) -> None:
        self._d: dict[tuple[Any, ...], tuple[Any, Any]] = {}
        self.stats = stats
        self.max_entries = max_entries

    def get(self, obj: Any, rest: tuple[Any, ...], compute: Callable[[], Any]) -> Any:
        key = (id(obj), *rest)
        hit = self._d.get(key)
        if hit is not None and hit[0] is obj:
            self.stats.hits += 1
            return hit[1]
        self.stats.misses += 1
        out = compute()
        if len(self._d) >= self.max_entries:
            self._d.clear()
        self._d[key] = (obj, out)  # holds `obj`: its id cannot be reused while the entry lives
        return out

    def __len__(self) -> int:
        return len(self._d)


class ReuseBackend:
    """A `FrontBackend` that computes each call once per input object (module docstring)."""

    def __init__(self, inner: FrontBackend) -> None:
        self.inner = inner
        self.kind = inner.kind
        self.stats = ReuseStats()
        self._cache = _IdentityCache(self.stats)

    def models(self) -> tuple[str, ...]:
        return self.inner.models()

    def info(self, model: str) -> ModelInfo:
        return self.inner.info(model)

    def prepare(self, model: str, raw: np.ndarray) -> np.ndarray:
        out: np.ndarray = self._cache.get(raw, ("prepare", model), lambda: self.inner.prepare(model, raw))
        return out

    def run_stage(self, model: str, stage: int, level: float, x: np.ndarray) -> np.ndarray:
        out: np.ndarray = self._cache.get(
            x, ("stage", model, stage, level), lambda: self.inner.run_stage(model, stage, level, x)
        )
        return out

    def run_front(self, model: str, cut: int, level: float, x: np.ndarray) -> np.ndarray:
        out: np.ndarray = self._cache.get(
            x, ("front", model, cut, level), lambda: self.inner.run_front(model, cut, level, x)
        )
        return out

    def run_full(self, model: str, x: np.ndarray) -> np.ndarray:
        out: np.ndarray = self._cache.get(x, ("full", model), lambda: self.inner.run_full(model, x))
        return out

    def shares_front(self, main: str, task: str, cut: int) -> bool:
        return self.inner.shares_front(main, task, cut)

    def warm_up(self, model: str) -> None:
        self.inner.warm_up(model)

    def load(self, model: str, levels: Sequence[float]) -> None:
        self.inner.load(model, levels)

    def fronts(self, model: str) -> tuple[tuple[int, float], ...]:
        return self.inner.fronts(model)

    def __getattr__(self, name: str) -> Any:  # anything else the wrapped backend offers (trained, ...)
        return getattr(self.inner, name)


class ReuseEncoder:
    """`encode(x, codec, prior)` of pipelines.codecs, once per (activation object, codec, prior)."""

    def __init__(self, encode: Callable[..., Any]) -> None:
        self.encode = encode
        self.stats = ReuseStats()
        self._cache = _IdentityCache(self.stats)

    def __call__(self, x: Any, codec: Any, prior: Any = None) -> Any:
        return self._cache.get(x, (str(codec), id(prior)), lambda: self.encode(x, codec, prior))  # priors live all run
