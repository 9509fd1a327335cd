"""cloud/serving.py without Ray: the backend's error mapping over fake handles, the replica class
on the shipped weights, and the serving config's checks."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Generator
from typing import Any

import numpy as np
import pytest
import torch

from cloud.backend import TailUnavailableError, run_tail_sync
from cloud.serving import RayTailBackend, TailReplica, ray_system_config
from splitsense.config import Config, ServingConfig
from splitsense.errors import ConfigError, ModelError

Behaviour = Callable[[int, np.ndarray], Awaitable[Any]]


class FakeResponse:
    """Stands in for a Serve DeploymentResponse: awaitable, cancellable."""

    def __init__(self, make: Callable[[], Awaitable[Any]]) -> None:
        self._make = make
        self.cancelled = False

    def __await__(self) -> Generator[Any, None, Any]:
        return self._make().__await__()

    def cancel(self) -> None:
        self.cancelled = True


class FakeHandle:
    def __init__(self, behaviour: Behaviour) -> None:
        self.behaviour = behaviour
        self.responses: list[FakeResponse] = []

    def remote(self, cut: int, batch: np.ndarray) -> FakeResponse:
        r = FakeResponse(lambda: self.behaviour(cut, batch))
        self.responses.append(r)
        return r


async def _logits(cut: int, batch: np.ndarray) -> np.ndarray:
    return np.full((len(batch), 6), float(cut), np.float32)


def _backend(behaviour: Behaviour, timeout_s: float = 0.2) -> tuple[RayTailBackend, FakeHandle]:
    handle = FakeHandle(behaviour)
    return RayTailBackend({"m": handle}, request_timeout_s=timeout_s), handle


async def test_answers_come_back_as_float32_logits() -> None:
    backend, _ = _backend(_logits)
    out = await backend.run_tail("m", 3, np.zeros((4, 2, 2), np.float64))
    assert out.shape == (4, 6) and (out == 3).all()


async def test_no_answer_within_the_timeout_is_unavailable_and_cancels_the_call() -> None:
    async def hang(cut: int, batch: np.ndarray) -> Any:
        await asyncio.sleep(3600)

    backend, handle = _backend(hang, timeout_s=0.05)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(TailUnavailableError, match="did not answer within 0.05 s"):
        await backend.run_tail("m", 1, np.zeros((1, 2), np.float32))
    assert loop.time() - started < 1.0
    assert handle.responses[0].cancelled


@pytest.mark.parametrize("error", [RuntimeError("The actor died unexpectedly"), ConnectionError("gone")])
async def test_any_ray_side_failure_is_unavailable(error: Exception) -> None:
    async def fail(cut: int, batch: np.ndarray) -> Any:
        raise error

    backend, _ = _backend(fail)
    with pytest.raises(TailUnavailableError, match=type(error).__name__):
        await backend.run_tail("m", 1, np.zeros((1, 2), np.float32))


async def test_a_replica_refusing_the_batch_is_a_model_error_not_unavailable() -> None:
    class WrappedTaskError(Exception):  # how Ray wraps an exception raised in the replica
        def __init__(self, cause: BaseException) -> None:
            super().__init__(f"task failed: {cause}")
            self.cause = cause

    async def refuse(cut: int, batch: np.ndarray) -> Any:
        raise WrappedTaskError(ModelError("expected a batch of shape (B, 4)"))

    backend, _ = _backend(refuse)
    with pytest.raises(ModelError, match="expected a batch of shape"):
        await backend.run_tail("m", 1, np.zeros((1, 2), np.float32))


async def test_calling_a_stopped_serve_is_unavailable() -> None:
    class DeadHandle:
        def remote(self, cut: int, batch: np.ndarray) -> Any:
            raise RuntimeError("Serve is not running")

    backend = RayTailBackend({"m": DeadHandle()}, request_timeout_s=1.0)
    with pytest.raises(TailUnavailableError, match="cannot call"):
        await backend.run_tail("m", 1, np.zeros((1, 2), np.float32))


async def test_wrong_answer_shape_unknown_model_and_closed_backend() -> None:
    async def short(cut: int, batch: np.ndarray) -> np.ndarray:
        return np.zeros((len(batch) - 1, 6), np.float32)

    backend, _ = _backend(short)
    with pytest.raises(TailUnavailableError, match="returned shape"):
        await backend.run_tail("m", 1, np.zeros((3, 2), np.float32))
    with pytest.raises(ModelError, match="unknown model 'x'"):
        await backend.run_tail("x", 1, np.zeros((1, 2), np.float32))
    await backend.close()
    with pytest.raises(TailUnavailableError, match="closed"):
        await backend.run_tail("m", 1, np.zeros((1, 2), np.float32))
    with pytest.raises(ModelError):
        RayTailBackend({}, request_timeout_s=1.0)


async def test_replica_runs_the_tail_of_the_shipped_weights_and_checks_its_batch() -> None:
    replica = TailReplica("uci_har", None, threads=1)
    m = replica._model
    x = torch.randn(5, *m.input_shape)
    for cut in (0, 3, m.n_stages - 1):
        with torch.inference_mode():
            a = m.run(x, 0, cut).numpy()
        np.testing.assert_array_equal(await replica(cut, a), run_tail_sync(m, cut, a))
    with pytest.raises(ModelError, match="expected a batch of shape"):
        await replica(3, np.zeros((2, 9, 128), np.float32))
    with pytest.raises(ModelError, match="out of range"):
        await replica(m.n_stages + 1, np.zeros((1, 6), np.float32))


def test_serving_config_defaults_and_checks() -> None:
    cfg = Config().serving
    assert cfg.ray_address is None and cfg.max_ongoing_requests >= 1 and cfg.request_timeout_s > 0
    assert Config.from_dict({"serving": {"models": ["uci_har"]}}).serving.models == ("uci_har",)
    bad: dict[str, Any]
    for bad in (
        {"models": []},
        {"num_replicas": 0},
        {"max_ongoing_requests": 1.5},
        {"replica_threads": True},
        {"request_timeout_s": 0},
        {"replica_cpus": -1},
        {"ray_address": "  "},
        {"handle_transport": "carrier"},
        {"handle_router": "elsewhere"},
        {"tail_engine": "gpu"},
    ):
        with pytest.raises(ConfigError, match="serving"):
            ServingConfig(**bad)
    assert cfg.handle_transport == "grpc" and cfg.handle_router == "caller" and cfg.tail_engine == "auto"


async def test_a_handle_factory_gives_each_event_loop_handles_of_its_own() -> None:
    made: list[tuple[str, asyncio.AbstractEventLoop]] = []

    def factory(model: str) -> FakeHandle:
        made.append((model, asyncio.get_running_loop()))
        return FakeHandle(_logits)

    backend = RayTailBackend({"m": FakeHandle(_logits)}, request_timeout_s=1.0, factory=factory)
    for _ in range(3):
        out = await backend.run_tail("m", 2, np.zeros((2, 3), np.float32))
        assert out.shape == (2, 6)
    assert [m for m, _ in made] == ["m"], "made once per loop and model, on first use"

    def other_loop() -> None:
        asyncio.run(backend.run_tail("m", 2, np.zeros((1, 3), np.float32)))

    await asyncio.to_thread(other_loop)
    assert [m for m, _ in made] == ["m", "m"] and made[0][1] is not made[1][1]
    with pytest.raises(ModelError, match="unknown model"):
        await backend.run_tail("x", 1, np.zeros((1, 2), np.float32))


def test_a_local_ray_runs_its_workers_at_the_configured_nice_value() -> None:
    assert ray_system_config(ServingConfig()) == {}  # Ray's default: 15, its workers yield to the broker
    assert ray_system_config(ServingConfig(worker_niceness=0)) == {"_system_config": {"worker_niceness": 0}}
    assert ray_system_config(ServingConfig(ray_address="auto")) == {}  # a cluster's raylets fixed theirs
    for bad in (-1, 20, True, 1.5):
        with pytest.raises(ConfigError, match="serving.worker_niceness must be null or an int in 0..19"):
            ServingConfig(worker_niceness=bad)  # type: ignore[arg-type]
