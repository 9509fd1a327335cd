"""CloudStack on its embedded defaults (its own redis-server, the controller reading the broker's
exporter directly, no Prometheus), and with real Ray Serve tails: it starts in order, a device
offloads through it, the controller publishes, and everything stops (ports closed) in order."""

from __future__ import annotations

import asyncio
import socket
import time
import urllib.request
from collections.abc import Callable
from typing import Any

import pytest

from cloud.stack import CloudStack
from edge.runtime import EdgeDevice
from edge.sources import source_for_model
from edge.transport import GrpcTransport
from pipelines.catalog import ModelCatalog, load_catalog
from pipelines.devices import DEVICE_CLASSES
from pipelines.training import load_trained
from splitsense.config import BrokerConfig, Config, ControllerConfig, EdgeConfig, ServingConfig
from splitsense.errors import ModelError
from splitsense.wire import ExecutionMode

pytestmark = pytest.mark.integration

MODEL = "uci_har"  # the smallest shipped model: the quickest Ray replica to start
SECRET = "stack-integration-secret-012345678"


@pytest.fixture(scope="module")
def catalog() -> ModelCatalog:
    try:
        return load_catalog(MODEL)
    except ModelError:  # not shipped yet: measure it (once per module)
        from pipelines.evaluation import build_model_catalog

        return build_model_catalog(MODEL, repeats=3)  # type: ignore[no-any-return]


def config() -> Config:
    return Config(
        serving=ServingConfig(models=(MODEL,)),
        # static plan: offload at cut 3, so the device goes through the tails until a plan comes
        broker=BrokerConfig(port=0, metrics_port=0, auth_secret=SECRET, static_plan_cut=3, shutdown_grace_s=0.5),
        controller=ControllerConfig(period_s=0.5, query_window_s=2.0, prometheus_timeout_s=1.0),
    )


def closed(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return False
    except OSError:
        return True


async def until(what: str, check: Callable[[], bool], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")
        await asyncio.sleep(0.1)


async def _one_device_through(stack: CloudStack, windows: int = 6) -> list[Any]:
    hw = DEVICE_CLASSES["phone"]
    token = stack.token_for("phone-1")
    cfg = EdgeConfig(
        broker_address=stack.broker_address, device_id="phone-1", token=token, model=MODEL, default_cut=3,
        replay_speed=0, telemetry_period_s=0.2, active_mw=hw.active_mw, radio=hw.radio.value,
    )  # fmt: skip
    transport = GrpcTransport(stack.broker_address, token, device_id="phone-1")
    results: list[Any] = []
    try:
        device = EdgeDevice(cfg, load_trained(MODEL), transport)
        await device.run(source_for_model(MODEL, speed=0, limit=windows), progress=results.append)
    finally:
        await transport.close()
    return results


async def test_stack_on_embedded_defaults(catalog: ModelCatalog) -> None:
    steps: list[str] = []
    stack = CloudStack(config(), with_ray=False, catalogs={MODEL: catalog}, progress=steps.append)
    async with stack:
        ports = {
            "broker": stack.broker.port,
            "metrics": int(stack.metrics_address.rsplit(":", 1)[1]),
            "redis": int(stack.redis_url.rsplit(":", 1)[1].split("/")[0]),
        }
        # its own redis-server, with the controller's Redis user (the broker has a read-only one)
        assert stack.redis_url.startswith("redis://controller:") and "@127.0.0.1:" in stack.redis_url
        assert stack.broker_store is not None and stack.broker_store.url.startswith("redis://broker:")
        results = await _one_device_through(stack)
        assert any(r.mode is ExecutionMode.OFFLOADED and r.cut == 3 for r in results)
        # the controller read the exporter directly, and its plan reached the broker
        await until("a controller plan at the broker", lambda: stack.broker.plans.version >= 2, 10)
        text = urllib.request.urlopen(stack.metrics_url, timeout=2).read().decode()
        assert 'splitsense_controller_dependency_up{dependency="exporters"} 1.0' in text
        assert 'splitsense_controller_dependency_up{dependency="redis"} 1.0' in text
        assert "splitsense_broker_request_duration_seconds_count" in text
        stored = await stack.store.current()  # type: ignore[union-attr]
        assert stored is not None and stored.version == stack.broker.plans.version
    assert all(closed(p) for p in ports.values()), ports
    assert steps[0].startswith("loading models") and steps[-1].startswith("cloud stack ready")
    order = [
        "loading models",
        "starting an embedded Redis",
        "starting the broker",
        "starting the metrics",
        "starting the controller",
    ]
    assert [next(i for i, s in enumerate(steps) if s.startswith(o)) for o in order] == sorted(
        next(i for i, s in enumerate(steps) if s.startswith(o)) for o in order
    )


async def test_stack_with_ray_serve_tails(ray_cluster: str, catalog: ModelCatalog) -> None:
    steps: list[str] = []
    t0 = time.monotonic()
    async with CloudStack(config(), with_ray=True, catalogs={MODEL: catalog}, progress=steps.append) as stack:
        started_s = time.monotonic() - t0
        results = await _one_device_through(stack)
        assert any(r.mode is ExecutionMode.OFFLOADED for r in results)
        compute = stack.registry.get_sample_value(
            "splitsense_broker_compute_duration_seconds_count", {"model": MODEL, "device_class": "phone", "cut": "3"}
        )
        assert compute is not None and compute >= 1  # answered by the Ray Serve tail
    assert any(s.startswith("starting Ray Serve") for s in steps)
    assert any("Ray Serve ready" in s for s in steps)  # start_serving's own progress came through
    from cloud.serving import replica_actor_names

    await until("the stack's Ray Serve replicas to go", lambda: not replica_actor_names(MODEL), 15)
    print(f"\nstack with Ray Serve up in {started_s:.1f} s (Ray already running in this session)")
