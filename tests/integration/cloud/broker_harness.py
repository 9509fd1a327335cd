"""A real broker for load and fuzz tests, on loopback with the in-process tails, in its own thread.

The broker runs on an event loop of its own, so a client can drive it from pytest's loop (the
load test) or with blocking calls and hard timeouts (the fuzz test) without the two competing
for one loop. Also: the credentials of a device and a good request of the shipped uci_har model.
"""

from __future__ import annotations

import asyncio
import threading
import time
from types import TracebackType
from typing import Any

import grpc
import numpy as np
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry

from cloud.auth import DEVICE_ID_METADATA, device_token
from cloud.backend import InProcessTailBackend, ModelRegistry
from cloud.broker import Broker
from pipelines import training
from pipelines.codecs import Codec, encode
from splitsense.config import BrokerConfig
from splitsense.v1 import offload_pb2 as pb
from splitsense.wire import DeviceEstimates, OffloadRequest, RadioKind, to_pb

SECRET = "integration-test-secret-0123456789"
GOOD_MODEL, GOOD_CUT = "uci_har", 2
EST = DeviceEstimates(bandwidth_mbps=12.0, rtt_ms=25.0, battery_fraction=0.7, on_battery=True, radio=RadioKind.WIFI)


def creds(device: str) -> tuple[tuple[str, str], ...]:
    return ((DEVICE_ID_METADATA, device), ("authorization", f"Bearer {device_token(SECRET, device)}"))


def good_activation(registry: ModelRegistry, index: int = 0) -> np.ndarray:
    """A real window's activation of uci_har at GOOD_CUT."""
    x, _ = training.held_out_set(registry.trained(GOOD_MODEL))
    with torch.inference_mode():
        return registry.model(GOOD_MODEL).run(x[index : index + 1], 0, GOOD_CUT).numpy()


def good_request(act: np.ndarray, device: str, window_id: str = "good", deadline_ms: int = 0) -> pb.OffloadRequest:
    return to_pb(
        OffloadRequest(
            window_id=window_id,
            model=GOOD_MODEL,
            cut=GOOD_CUT,
            device_id=device,
            device_class="phone",
            estimates=EST,
            plan_version=1,
            activation=encode(act, Codec.FP32),
            sent_unix_ms=int(time.time() * 1000),
            deadline_ms=deadline_ms,
        )
    )


class BrokerThread:
    """`with BrokerThread(registry) as b:` serves a real Broker at b.address until the block ends."""

    def __init__(self, registry: ModelRegistry, **config: Any) -> None:
        self._registry = registry
        self._config = BrokerConfig(
            **{"host": "127.0.0.1", "port": 0, "auth_secret": SECRET, "metrics_port": None, **config}
        )
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="broker-loop", daemon=True)
        self.broker: Broker | None = None
        self._backend: InProcessTailBackend | None = None

    def run(self, coro: Any, timeout_s: float = 30.0) -> Any:
        """Run a coroutine on the broker's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout_s)

    @property
    def address(self) -> str:
        assert self.broker is not None
        return self.broker.address

    async def _start(self) -> None:
        self._backend = InProcessTailBackend(self._registry, threads=1)
        self.broker = Broker(self._config, self._registry, self._backend, metrics_registry=CollectorRegistry())
        await self.broker.start()

    async def _stop(self) -> None:
        if self.broker is not None:
            await self.broker.stop(0.5)
        if self._backend is not None:
            await self._backend.close()

    def __enter__(self) -> BrokerThread:
        self._thread.start()
        self.run(self._start())
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        try:
            self.run(self._stop())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop.close()


def health_status(channel: grpc.Channel) -> int:
    """The broker's overall health (a blocking call), e.g. health_pb2.HealthCheckResponse.SERVING."""
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status


SERVING = health_pb2.HealthCheckResponse.SERVING
