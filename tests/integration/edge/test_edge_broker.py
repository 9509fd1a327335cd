"""A device against the real broker on loopback: stop the broker in the middle of a stream.

Real grpc.aio broker (cloud.broker.Broker, in-process tails: the Ray Serve path has its own
integration tests) and the real GrpcTransport. The device replays the UCI HAR test recording at
12.8x real time (a window every 100 ms). After 15 windows the broker is stopped; 1.5 s later a
new broker starts on the same port. Checked: no window is lost; every window while the broker is
down finishes on the device within one deadline; the device goes fully local (breaker open); and
it offloads again within its back-off bound after the broker returns. A second test sends the
whole recording through the broker at fp32 and finds every prediction equal to the local one.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from cloud.auth import device_token
from cloud.backend import InProcessTailBackend, ModelRegistry
from cloud.broker import Broker
from edge.route import FallbackKind
from edge.runtime import EdgeDevice
from edge.sink import MemorySink, WindowResult
from edge.sources import source_for_model
from edge.transport import GrpcTransport
from splitsense.config import BreakerConfig, BrokerConfig, EdgeConfig
from splitsense.wire import ExecutionMode

pytestmark = pytest.mark.integration

MODEL = "uci_har"
SECRET = "edge-integration-secret-0123456789"
DEVICE = "edge-it-1"
SPEED = 12.8  # UCI HAR windows come every 1.28 s: one every 100 ms
PERIOD_S = 1.28 / SPEED
WINDOWS = 70
STOP_AFTER = 15
DOWN_S = 1.5
DEADLINE_MS = 300.0
BREAKER = BreakerConfig(
    failure_threshold=2, backoff_base_s=0.3, backoff_factor=2.0, backoff_max_s=1.0, backoff_jitter=0.2
)
RECONNECT_MAX_S = 1.0  # GrpcTransport's reconnect_backoff_max_ms default
SLACK_S = 0.5  # local compute and scheduling on 2 shared cores


def broker_config(port: int) -> BrokerConfig:
    return BrokerConfig(port=port, metrics_port=None, auth_secret=SECRET, shutdown_grace_s=0.5)


async def test_broker_stop_mid_stream_loses_nothing_and_the_device_comes_back() -> None:
    registry = ModelRegistry([MODEL])
    backend = InProcessTailBackend(registry)
    broker = Broker(broker_config(0), registry, backend)
    port = await broker.start()
    token = device_token(SECRET, DEVICE)
    transport = GrpcTransport(f"127.0.0.1:{port}", token, device_id=DEVICE)
    cfg = EdgeConfig(
        model=MODEL,
        device_id=DEVICE,
        token=token,
        deadline_ms=DEADLINE_MS,
        breaker=BREAKER,
        replay_speed=SPEED,
    )
    device = EdgeDevice(cfg, registry.trained(MODEL), transport)
    done: list[tuple[WindowResult, float]] = []
    enough = asyncio.Event()

    def progress(r: WindowResult) -> None:
        done.append((r, time.monotonic()))
        if len(done) == STOP_AFTER:
            enough.set()

    emitted: dict[str, float] = {}
    source = source_for_model(MODEL, speed=SPEED, limit=WINDOWS)

    async def tracked() -> Any:
        async for w in source:
            emitted[w.window_id] = w.t_emit
            yield w

    run = asyncio.ensure_future(device.run(tracked(), progress=progress))
    second: Broker | None = None
    try:
        await asyncio.wait_for(enough.wait(), 30)
        t_stop = time.monotonic()
        await broker.stop(0)
        await asyncio.sleep(DOWN_S)
        second = Broker(broker_config(port), registry, backend)
        assert await second.start() == port
        t_back = time.monotonic()
        summary = await asyncio.wait_for(run, 60)
    finally:
        run.cancel()
        await transport.close()
        if second is not None:
            await second.stop(0)
        await broker.stop(0)
        await backend.close()

    # nothing lost: every window of the recording has exactly one result, in order
    assert summary.windows == WINDOWS and summary.lost == 0
    assert [r.window_id for r, _ in done] == sorted(emitted, key=emitted.__getitem__)
    before = [r for r, t in done if emitted[r.window_id] < t_stop]
    assert before and all(r.mode is ExecutionMode.OFFLOADED for r in before[:-1])

    # while the broker is down: never offloaded, each window finished on the device within one
    # deadline of its arrival, and the breaker sends the device fully local
    down = [(r, t) for r, t in done if t_stop <= emitted[r.window_id] < t_back]
    assert down and all(r.mode is not ExecutionMode.OFFLOADED for r, _ in down)
    assert max(r.latency_ms for r, _ in down) <= DEADLINE_MS + SLACK_S * 1000
    first_local_done = min(t for r, t in done if t >= t_stop and r.mode is not ExecutionMode.OFFLOADED)
    assert first_local_done - t_stop <= DEADLINE_MS / 1000 + PERIOD_S + SLACK_S
    assert any(r.mode is ExecutionMode.LOCAL and r.kind is FallbackKind.BREAKER for r, _ in down)
    assert {r.kind for r, _ in down if r.mode is ExecutionMode.FALLBACK} <= {
        FallbackKind.UNAVAILABLE,
        FallbackKind.DEADLINE,
        FallbackKind.LATE,
    }

    # after it returns: offloading again within the back-off bound (plus the channel's own
    # reconnect back-off, one window period and one deadline), and from then on
    bound_s = BREAKER.backoff_max_s * (1 + BREAKER.backoff_jitter) + RECONNECT_MAX_S + PERIOD_S + DEADLINE_MS / 1000
    back = [t for r, t in done if t >= t_back and r.mode is ExecutionMode.OFFLOADED]
    assert back, "the device never offloaded again after the broker returned"
    recovery_s = back[0] - t_back
    local_s = first_local_done - t_stop
    print(f"\nlocal {local_s:.3f} s after the stop; offloading {recovery_s:.3f} s after the return")
    assert recovery_s <= bound_s + SLACK_S
    assert sum(1 for r, t in done if t >= back[0] and r.mode is ExecutionMode.OFFLOADED) >= 5


async def test_whole_recording_through_the_broker_at_fp32_equals_local() -> None:
    registry = ModelRegistry([MODEL])
    backend = InProcessTailBackend(registry)
    cfg_b = BrokerConfig(port=0, metrics_port=None, auth_secret=SECRET, static_plan_cut=3)
    broker = Broker(cfg_b, registry, backend)
    port = await broker.start()
    token = device_token(SECRET, DEVICE)
    transport = GrpcTransport(f"127.0.0.1:{port}", token, device_id=DEVICE)
    # Hedging off: this test is about the offloaded path's answers (950 of them); on 2 loaded cores a
    # loopback answer can come 30 ms late and the hedge would answer it locally (tests/unit/edge/test_hedging.py).
    cfg = EdgeConfig(
        model=MODEL,
        device_id=DEVICE,
        token=token,
        default_cut=3,
        replay_speed=0,
        telemetry_period_s=0.5,
        hedge_factor=0,
    )
    offloaded, local = MemorySink(), MemorySink()
    try:
        summary = await EdgeDevice(cfg, registry.trained(MODEL), transport).run(
            source_for_model(MODEL, speed=0), offloaded
        )
    finally:
        await transport.close()
        await broker.stop(0)
        await backend.close()
    await EdgeDevice(cfg, registry.trained(MODEL), None).run(source_for_model(MODEL, speed=0), local)
    assert summary.windows == 950 and summary.lost == 0 and summary.by_mode["offloaded"] == 950
    assert all(r.cut == 3 and r.codec == "fp32" for r in offloaded.results)
    assert [r.prediction for r in offloaded.results] == [r.prediction for r in local.results]
    # the device's telemetry reached the broker and adds up to what it did
    samples = broker.metrics.registry.get_sample_value
    total = sum(
        samples(
            "splitsense_device_windows_total",
            {"model": MODEL, "device_class": "phone", "cut": str(c), "mode": m},
        )
        or 0.0
        for c in range(8)
        for m in ("offloaded", "local", "fallback")
    )
    assert total == 950
    p50, p95 = summary.latency_p50_ms, summary.latency_p95_ms
    print(f"\n950 windows through the broker: p50 {p50:.2f} ms, p95 {p95:.2f} ms")
