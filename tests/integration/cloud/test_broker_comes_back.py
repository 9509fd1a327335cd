"""A broker that comes back (or is added) gets devices again: the max connection age.

Two real brokers (tests/integration/cloud/broker_harness.py: loopback, in-process uci_har tails,
each on a thread of its own) with broker.max_connection_age_s = AGE_S. Six EdgeDevices, each with
one GrpcTransport given both addresses (pick_first, the device default; half list broker B first,
in place of the per-device shuffle), replay the UCI HAR test recording at 12.8x (a window every
100 ms) at cut 3 while only broker A is up: every device offloads to A. Then B starts on the port
the devices already know. Each connection to A is sent a GOAWAY within AGE_S (+-10%); the devices
that list B first move their streams to it.

Checked: within a few max ages broker B answers a fair share of the windows (its own metrics:
the count of its request-duration histogram), every window of every device has exactly one
result (none lost, none twice), no window fell back because its stream moved (kind
`unavailable`), and the streams did move without a window being sent twice.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator

import pytest

from cloud.auth import device_token
from cloud.backend import ModelRegistry
from edge.runtime import EdgeDevice, RunSummary
from edge.sink import WindowResult
from edge.sources import SensorWindow, source_for_model
from edge.transport import GrpcTransport
from splitsense.config import BreakerConfig, EdgeConfig
from splitsense.kinds import FallbackKind
from splitsense.wire import ExecutionMode
from tests.integration.cloud.broker_harness import SECRET, BrokerThread
from tests.integration.conftest import free_port

pytestmark = pytest.mark.integration

MODEL = "uci_har"
CUT = 3
DEVICES = 6
SPEED = 12.8  # a UCI HAR window every 100 ms
AGE_S = 1.0  # broker.max_connection_age_s: short, for the test (the default is 60 s)
GRACE_S = 5.0  # longer than any window's deadline (300 ms): the old streams answer what they read
WARM = 3  # offloaded windows per device (all on A) before B starts
AFTER_S = 5.0  # how long the fleet runs once B is up: five max ages
SAMPLE_S = 0.1
MAX_WINDOWS = 300  # per device: 30 s at most
BREAKER = BreakerConfig(failure_threshold=3, backoff_base_s=0.3, backoff_factor=2.0, backoff_max_s=1.0)


@pytest.fixture(scope="module")
def registry() -> ModelRegistry:
    return ModelRegistry([MODEL])


def answered(b: BrokerThread) -> float:
    """Windows the broker answered: the count of its request-duration histogram."""
    assert b.broker is not None
    return sum(
        s.value
        for metric in b.broker.metrics.registry.collect()
        for s in metric.samples
        if s.name.endswith("request_duration_seconds_count")
    )


@pytest.fixture
def broker_a(registry: ModelRegistry) -> Iterator[BrokerThread]:
    with BrokerThread(
        registry, static_plan_cut=CUT, max_connection_age_s=AGE_S, max_connection_age_grace_s=GRACE_S
    ) as b:
        yield b


async def test_a_broker_that_comes_back_gets_devices_within_a_few_max_ages(
    registry: ModelRegistry, broker_a: BrokerThread
) -> None:
    port_b = free_port()  # known to the devices from the start; nobody listens on it yet
    ports = [broker_a.broker.port if broker_a.broker else 0, port_b]
    trained = registry.trained(MODEL)
    results: dict[str, list[tuple[WindowResult, float]]] = {}
    emitted: dict[str, list[str]] = {}
    stop = asyncio.Event()
    warm = asyncio.Event()
    transports: list[GrpcTransport] = []
    runs: list[asyncio.Future[RunSummary]] = []

    def offloads(device: str) -> int:
        return sum(1 for r, _ in results[device] if r.mode is ExecutionMode.OFFLOADED)

    def progress(device: str, r: WindowResult) -> None:
        results[device].append((r, time.monotonic()))
        if all(offloads(d) >= WARM for d in results):
            warm.set()

    async def windows(device: str) -> AsyncIterator[SensorWindow]:
        it = aiter(source_for_model(MODEL, speed=SPEED, limit=MAX_WINDOWS))
        while not stop.is_set():
            try:
                w = await anext(it)
            except StopAsyncIteration:
                return
            emitted[device].append(w.window_id)
            yield w

    broker_b: BrokerThread | None = None
    samples: list[tuple[float, float, float]] = []  # (seconds since B started, answered by A, by B)
    try:
        for i in range(DEVICES):
            device_id = f"comeback-{i}"
            order = ports if i % 2 == 0 else ports[::-1]  # half the fleet lists B first
            target = "ipv4:" + ",".join(f"127.0.0.1:{p}" for p in order)
            token = device_token(SECRET, device_id)
            transport = GrpcTransport(
                target,
                token,
                device_id=device_id,
                load_balancing="pick_first",
                shuffle_addresses=False,
                # its own connections, as a real device has (in one process gRPC shares them)
                channel_options=[("grpc.use_local_subchannel_pool", 1)],
            )
            transports.append(transport)
            cfg = EdgeConfig(
                broker_address=target,
                model=MODEL,
                device_id=device_id,
                token=token,
                default_cut=CUT,
                default_codec="fp32",
                breaker=BREAKER,
                replay_speed=SPEED,
            )
            results[device_id], emitted[device_id] = [], []
            device = EdgeDevice(cfg, trained, transport)
            runs.append(
                asyncio.ensure_future(device.run(windows(device_id), progress=functools.partial(progress, device_id)))
            )
        try:
            await asyncio.wait_for(warm.wait(), 30)
        except TimeoutError:
            seen = {d: dict(Counter(r.mode.value for r, _ in rs)) for d, rs in results.items()}
            pytest.fail(f"the fleet did not offload {WARM} windows per device to broker A within 30 s: {seen}")
        assert answered(broker_a) >= DEVICES * WARM

        broker_b = BrokerThread(
            registry, port=port_b, static_plan_cut=CUT, max_connection_age_s=AGE_S, max_connection_age_grace_s=GRACE_S
        )
        await asyncio.to_thread(broker_b.__enter__)
        t_b = time.monotonic()
        marks = {"b": t_b}
        base_a = answered(broker_a)
        while (now := time.monotonic()) < t_b + AFTER_S:
            samples.append((now - t_b, answered(broker_a) - base_a, answered(broker_b)))
            await asyncio.sleep(SAMPLE_S)
        samples.append((time.monotonic() - t_b, answered(broker_a) - base_a, answered(broker_b)))
        stop.set()
        summaries = await asyncio.wait_for(asyncio.gather(*runs), 30)
    finally:
        stop.set()
        for r in runs:
            if not r.done():
                r.cancel()
        await asyncio.gather(*runs, return_exceptions=True)
        for t in transports:
            await t.close()
        if broker_b is not None:
            await asyncio.to_thread(broker_b.__exit__, None, None, None)

    # exactly once: every emitted window has one result, none twice, none lost
    for (device_id, rs), summary in zip(results.items(), summaries, strict=True):
        ids = [r.window_id for r, _ in rs]
        assert summary.lost == 0, (device_id, summary)
        assert sorted(ids) == sorted(emitted[device_id]) and len(set(ids)) == len(ids), device_id
    after = [r for rs in results.values() for r, t in rs if t >= marks["b"]]
    kinds = Counter(r.kind.value for r in after if r.kind is not None)
    assert kinds[FallbackKind.UNAVAILABLE.value] == 0, f"windows fell back when their stream moved: {kinds}"
    offloaded_after = sum(r.mode is ExecutionMode.OFFLOADED for r in after)
    assert offloaded_after >= 0.9 * len(after), Counter(r.mode.value for r in after)

    # B got devices: its share of the windows answered over the last two max ages
    t_end, a_end, b_end = samples[-1]
    t0, a0, b0 = next(s for s in samples if s[0] >= t_end - 2 * AGE_S)
    share_b = (b_end - b0) / max(1.0, (a_end - a0) + (b_end - b0))
    first_b = next((t for t, _, b in samples if b > 0), None)
    assert first_b is not None, f"broker B answered no window in {AFTER_S} s: {samples}"
    streams = sum(t.streams_opened for t in transports)
    resent = sum(t.windows_resent for t in transports)
    print(
        f"\nbroker B answered its first window {first_b:.2f} s after it started; its share over "
        f"{t_end - t0:.1f} s up to {t_end:.1f} s: {share_b:.0%} (A {a_end - a0:.0f}, B {b_end - b0:.0f}); "
        f"streams opened {streams}, windows resent {resent}; fallbacks after B started {dict(kinds)}"
    )
    assert first_b <= 3 * AGE_S, samples
    assert share_b >= 0.3, f"broker B answered {share_b:.0%} of the last windows: {samples}"
    # the streams moved (at least once per device per max age on A) without resending windows
    assert streams >= DEVICES * 3, streams
    assert resent <= DEVICES, resent
