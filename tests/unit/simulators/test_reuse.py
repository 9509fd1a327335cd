"""Reusing front results per input object: computed once, the same object back, never a wrong one."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from edge.backend import FrontBackend, ModelInfo
from pipelines.codecs import Codec, encode
from simulators.reuse import ReuseBackend, ReuseEncoder


class _Counting:
    """A FrontBackend whose every call is counted: stage i adds i + 1."""

    kind = "fake"

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def models(self) -> tuple[str, ...]:
        return ("m",)

    def info(self, model: str) -> ModelInfo:
        return ModelInfo(model, 2, 3, (4,), ((4,), (4,), (3,)))

    def prepare(self, model: str, raw: np.ndarray) -> np.ndarray:
        self.calls.append(("prepare", model))
        return raw * 2.0

    def run_stage(self, model: str, stage: int, level: float, x: np.ndarray) -> np.ndarray:
        self.calls.append(("stage", stage, level))
        return x + (stage + 1)

    def run_front(self, model: str, cut: int, level: float, x: np.ndarray) -> np.ndarray:
        self.calls.append(("front", cut, level))
        return x + cut

    def run_full(self, model: str, x: np.ndarray) -> np.ndarray:
        self.calls.append(("full",))
        return x - 1

    def shares_front(self, main: str, task: str, cut: int) -> bool:
        return False

    def warm_up(self, model: str) -> None:
        self.calls.append(("warm_up",))

    def load(self, model: str, levels: Sequence[float]) -> None:
        self.calls.append(("load", tuple(levels)))

    def fronts(self, model: str) -> tuple[tuple[int, float], ...]:
        return ((0, 1.0), (1, 1.0))


def test_reuse_backend_is_a_front_backend_and_delegates() -> None:
    inner = _Counting()
    b = ReuseBackend(inner)
    assert isinstance(b, FrontBackend) and b.kind == "fake"
    assert b.models() == ("m",) and b.info("m").n_stages == 2 and b.fronts("m") == ((0, 1.0), (1, 1.0))
    b.load("m", (1.0, 0.5))
    b.warm_up("m")
    assert inner.calls == [("load", (1.0, 0.5)), ("warm_up",)]


def test_a_chain_of_stages_runs_once_per_window_cut_and_level() -> None:
    inner = _Counting()
    b = ReuseBackend(inner)
    raw = np.arange(4, dtype=np.float32)

    def front(level: float) -> np.ndarray:
        x = b.prepare("m", raw)
        for i in range(2):
            x = b.run_stage("m", i, level, x)
        return x

    first = front(1.0)
    np.testing.assert_array_equal(first, raw * 2 + 3)
    for _ in range(5):  # five more devices on the same window: the same object, no computation
        assert front(1.0) is first
    assert len(inner.calls) == 3  # prepare + 2 stages, once
    other = front(0.5)  # another level: its stages run (the preprocessing is reused)
    assert other is not first
    assert len(inner.calls) == 5
    raw2 = raw.copy()  # another window (an equal but different array): computed for real
    assert b.prepare("m", raw2) is not b.prepare("m", raw)
    assert b.stats.hits > 0 and b.stats.misses == 6
    assert 0 < b.stats.to_dict()["hit_rate"] < 1


def test_front_and_full_are_reused_too() -> None:
    inner = _Counting()
    b = ReuseBackend(inner)
    x = np.zeros(4, dtype=np.float32)
    assert b.run_front("m", 1, 1.0, x) is b.run_front("m", 1, 1.0, x)
    assert b.run_full("m", x) is b.run_full("m", x)
    assert b.run_front("m", 2, 1.0, x) is not b.run_front("m", 1, 1.0, x)
    assert inner.calls == [("front", 1, 1.0), ("full",), ("front", 2, 1.0)]


def test_an_id_reused_by_another_object_is_a_miss() -> None:
    inner = _Counting()
    b = ReuseBackend(inner)
    b._cache._d[(id(b), "prepare", "m")] = (object(), "stale")  # a stale entry under this id
    assert b._cache.get(b, ("prepare", "m"), lambda: "fresh") == "fresh"


def test_the_cache_is_bounded() -> None:
    b = ReuseBackend(_Counting())
    b._cache.max_entries = 3
    keep = [np.zeros(1) for _ in range(5)]
    for a in keep:
        b.prepare("m", a)
    assert len(b._cache) <= 3


def test_the_encoder_is_reused_per_activation_and_codec() -> None:
    calls = []

    def counting(x: Any, codec: Any, prior: Any = None) -> Any:
        calls.append(codec)
        return encode(x, codec, prior)

    enc = ReuseEncoder(counting)
    act = np.linspace(-1, 1, 16, dtype=np.float32).reshape(1, 16)
    a = enc(act, Codec.FP32, None)
    assert enc(act, Codec.FP32, None) is a and a == encode(act, Codec.FP32)
    assert enc(act, Codec.INT8, None) is not a
    assert calls == [Codec.FP32, Codec.INT8]


async def test_a_device_encodes_through_the_encoder_it_is_given() -> None:
    """The seam the sharded fleet's reuse uses (EdgeDevice's `encoder`), not a patched module."""
    from edge.runtime import EdgeDevice
    from edge.sink import MemorySink
    from tests.unit.edge.test_runtime import MODEL, FakeTransport, config, source, trained, windows

    enc = ReuseEncoder(encode)
    ws = windows(MODEL, 3)
    device = EdgeDevice(config(default_cut=3), trained(MODEL), FakeTransport(), encoder=enc)
    summary = await device.run(source(ws + ws), MemorySink())  # the same windows twice
    assert summary.by_mode["offloaded"] == 6
    assert enc.stats.misses + enc.stats.hits == 6


def test_reused_results_equal_computed_ones() -> None:
    level = 0.5
    inner = _Counting()
    b = ReuseBackend(inner)
    raw = np.ones(4, dtype=np.float32)
    x = b.run_stage("m", 0, level, b.prepare("m", raw))
    np.testing.assert_array_equal(x, inner.run_stage("m", 0, level, inner.prepare("m", raw)))
