"""The inline link (simulator.link "inline"): `LinkDirection` gives a message the times the proxy
would (pure, against the schedule's own formulas), and `ShapedTransport` holds each call's bytes
for them around a fake transport (no sockets: the broker side is a stub that answers at once)."""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import AsyncIterator, Sequence
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipelines.codecs import Codec, encode
from simulators.link import (
    STREAM_CALL_BYTES,
    UNARY_CALL_BYTES,
    LinkDirection,
    LinkEmulator,
    ShapedTransport,
    ShapingSchedule,
    burst_completion_s,
    default_rto_s,
)
from simulators.traces import Trace
from splitsense import wire
from splitsense.errors import ConfigError, OffloadDeadlineError, ShedError
from splitsense.plan import BatteryState, Objective, Plan, PlanRow, PlanSet
from splitsense.wire import (
    DeviceEstimates,
    OffloadRequest,
    OffloadResponse,
    RadioKind,
    TelemetryAck,
    TelemetryReport,
    Timing,
)

MBIT = 1e6 / 8
# 1 Mbit/s for 2 s, then 4 Mbit/s for 2 s; loops every 4 s.
STEP = Trace("step", "test", np.array([0.0, 2.0]), np.array([1.0, 4.0]), duration_s=4.0)


class Always(random.Random):
    """A loss draw that always (0.0) or never (0.999) hits."""

    def __init__(self, value: float) -> None:
        super().__init__(0)
        self.value = value

    def random(self) -> float:
        return self.value


def direction(trace: Trace | None = STEP, **kw: Any) -> LinkDirection:
    outages = kw.pop("outages", ())
    schedule = ShapingSchedule(trace, outages=outages) if trace is not None else None
    return LinkDirection(schedule, outages=outages, **kw)


# --- LinkDirection: the proxy's timing, computed -------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    nbytes=st.integers(1, 400_000),
    now=st.floats(0.0, 8.0),
    rtt_ms=st.sampled_from([0.0, 20.0, 60.0, 150.0]),
)
def test_a_lone_message_takes_time_to_deliver_plus_the_one_way_delay(nbytes: int, now: float, rtt_ms: float) -> None:
    rtt = rtt_ms / 1000.0
    d = direction(rtt_s=rtt)
    expected = now + d.schedule.time_to_deliver(nbytes, now, rtt) + rtt / 2  # type: ignore[union-attr]
    assert d.transfer(nbytes, now) == pytest.approx(expected, abs=1e-9)


def test_a_lone_message_on_a_constant_link_takes_burst_completion() -> None:
    d = direction(Trace.constant(5.0), rtt_s=0.1)
    n = 100_000
    assert d.transfer(n, 1.0) == pytest.approx(1.0 + burst_completion_s(n, 0.1, 5.0) + 0.05)


@pytest.mark.parametrize("now", [0.0, 1.5, 3.9])
def test_without_slow_start_it_is_serialisation_plus_the_one_way_delay(now: float) -> None:
    d = direction(rtt_s=0.06, slow_start=False)
    assert d.transfer(30_000, now) == pytest.approx(now + d.schedule.time_to_send(30_000, now) + 0.03)  # type: ignore[union-attr]


def test_messages_queue_fifo_behind_each_other() -> None:
    d = direction(Trace.constant(8.0), rtt_s=0.05, slow_start=False)
    first = d.transfer(100_000, 0.0)  # 0.1 s of serialisation
    second = d.transfer(50_000, 0.01)  # written while the first is still going: starts after it
    assert first == pytest.approx(0.1 + 0.025)
    assert second == pytest.approx(0.15 + 0.025)


def test_an_idle_link_banks_nothing() -> None:
    d = direction(Trace.constant(8.0), rtt_s=0.05, slow_start=False)
    d.transfer(100_000, 0.0)
    assert d.transfer(10_000, 5.0) == pytest.approx(5.0 + 0.01 + 0.025)


def test_an_unshaped_direction_only_delays_and_slow_starts() -> None:
    d = direction(None, rtt_s=0.08, slow_start=False)
    assert d.transfer(10**7, 2.0) == pytest.approx(2.04)
    assert d.transfer(0, 3.0) == pytest.approx(3.04)
    # slow start holds each round of an unshaped transfer too (the proxy's windows, shaped or not)
    d = direction(None, rtt_s=0.08)
    assert d.transfer(3 * 14_480, 2.0) == pytest.approx(2.0 + 0.08 + 0.04)  # rounds 0 and 1


def test_bytes_written_in_an_outage_leave_when_it_ends() -> None:
    d = direction(Trace.constant(8.0), rtt_s=0.05, slow_start=False, outages=[(1.0, 3.0)])
    assert d.transfer(10_000, 2.0) == pytest.approx(3.0 + 0.01 + 0.025)
    # a message that straddles the outage's start is finished after it: nothing moves meanwhile
    d = direction(Trace.constant(8.0), rtt_s=0.0, slow_start=False, outages=[(1.0, 3.0)])
    assert d.transfer(200_000, 0.9) == pytest.approx(3.1)


def test_a_loss_adds_one_rto_and_holds_back_what_follows() -> None:
    d = direction(Trace.constant(8.0), rtt_s=0.05, slow_start=False, loss=0.5, rng=Always(0.0))
    rto = default_rto_s(0.05)
    assert d.transfer(1_000, 0.0) == pytest.approx(0.001 + 0.025 + rto)
    assert d.retransmissions == 1
    d.rng = Always(0.999)  # no loss for the next one, but it is behind the retransmission (in order)
    assert d.transfer(1_000, 0.01) == pytest.approx(0.001 + 0.025 + rto)
    assert d.transfer(1_000, 1.0) == pytest.approx(1.001 + 0.025)


def test_loss_draws_per_chunk_as_the_proxy_does() -> None:
    rng = random.Random(7)
    d = direction(Trace.constant(20.0), rtt_s=0.02, slow_start=False, loss=0.01, rng=rng)
    for i in range(2000):
        d.transfer(20_000, float(i))
    # 20 kB at 20 Mbit/s: chunks of 16 KiB (the most a quantum takes) and 3,616 B, 12 and 3
    # segments: 1 - 0.99^12 + 1 - 0.99^3 = 0.144 retransmissions per message
    assert 0.12 < d.retransmissions / 2000 < 0.17


def test_slow_start_restarts_after_an_idle_rto_and_not_before() -> None:
    rtt = 0.1
    fresh = direction(Trace.constant(5.0), rtt_s=rtt)
    lone = fresh.transfer(60_000, 0.0)
    again = fresh.transfer(60_000, 10.0)  # idle for much longer than the RTO: a new burst
    assert again - 10.0 == pytest.approx(lone)
    warm = direction(Trace.constant(5.0), rtt_s=rtt)
    first = warm.transfer(60_000, 0.0)
    second = warm.transfer(60_000, first + 0.05)  # within an RTO: the window has grown
    assert second - (first + 0.05) < lone - 0.05


def test_bad_parameters_are_refused_as_the_proxy_refuses_them() -> None:
    for kwargs in ({"rtt_ms": -1.0}, {"loss": 1.0}, {"rto_ms": 0.0}, {"quantum_s": 0.0}, {"uplink_mbps": 0.0}):
        with pytest.raises(ConfigError):
            LinkEmulator(("127.0.0.1", 1), **kwargs)  # type: ignore[arg-type]
        with pytest.raises(ConfigError):
            ShapedTransport(Fake(), **kwargs)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="not both"):
        ShapedTransport(Fake(), STEP, uplink_mbps=1.0)


# --- ShapedTransport: the calls wait out those times ----------------------------------------------


def request(window_id: str = "w", n: int = 1000) -> OffloadRequest:
    return OffloadRequest(
        window_id=window_id,
        model="m",
        cut=1,
        device_id="dev",
        device_class="phone",
        estimates=DeviceEstimates(2.0, 50.0, 1.0, True, RadioKind.LTE),
        plan_version=1,
        activation=encode(np.ones((1, n), np.float32), Codec.FP32),
        sent_unix_ms=1,
    )


def response(window_id: str) -> OffloadResponse:
    return OffloadResponse(
        window_id=window_id,
        logits=(0.1, 0.9),
        prediction=1,
        timing=Timing(queue_ms=1.0, compute_ms=2.0, batch_size=1),
    )


def plan_set(version: int) -> PlanSet:
    row = PlanRow(
        min_bandwidth_mbps=0.0,
        max_bandwidth_mbps=math.inf,
        battery=BatteryState.NORMAL,
        cut=2,
        codec=Codec.FP16,
        reason="test",
        predicted_latency_ms=1.0,
        predicted_energy_mj=1.0,
    )
    plan = Plan(model="m", device_class="phone", rows=(row,), objective=Objective.LATENCY)
    return PlanSet(version=version, plans=(plan,), created_unix_ms=1, reason=f"v{version}")


class Fake:
    """The inner transport: records when (loop time) each call reached it, answers at once."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, float, float]] = []  # (what, loop time, timeout given)
        self.streams_opened = 3
        self.use_stream = True
        self.max_message_bytes = 1 << 20
        self.fail: Exception | None = None
        self.closed = False
        self.watch_closed = False

    def _seen(self, what: str, timeout_s: float) -> None:
        self.calls.append((what, asyncio.get_running_loop().time(), timeout_s))
        if self.fail is not None:
            raise self.fail

    async def offload(self, request: OffloadRequest, timeout_s: float) -> OffloadResponse:
        self._seen("offload", timeout_s)
        return response(request.window_id)

    async def get_plan(
        self, device_class: str, models: Sequence[str] = (), known_version: int = 0, timeout_s: float = 5.0
    ) -> PlanSet | None:
        self._seen("get_plan", timeout_s)
        return None

    async def watch_plans(
        self, device_class: str, models: Sequence[str] = (), known_version: int = 0
    ) -> AsyncIterator[PlanSet]:
        self._seen("watch", math.inf)
        try:
            for v in (2, 3):
                yield plan_set(v)
            await asyncio.sleep(3600)
        finally:
            self.watch_closed = True

    async def report_telemetry(self, report: TelemetryReport, timeout_s: float = 5.0) -> TelemetryAck:
        self._seen("telemetry", timeout_s)
        return TelemetryAck(7, 0.5)

    async def close(self) -> None:
        self.closed = True


SLACK_S = 0.08  # how late a sleeper may wake on a busy 2-core host


def ideal(trace: Trace, rtt_s: float, up: int, down: int, start: float) -> tuple[float, float]:
    """(request arrives, answer arrives) on fresh directions of `trace`: what the proxy does."""
    a = LinkDirection(ShapingSchedule(trace), rtt_s=rtt_s).transfer(up, start)
    b = LinkDirection(ShapingSchedule(trace), rtt_s=rtt_s).transfer(down, a)
    return a, b


async def test_an_offload_waits_its_request_up_and_its_answer_down() -> None:
    fake = Fake()
    link = await ShapedTransport(fake, Trace.constant(1.0), downlink_trace=Trace.constant(1.0), rtt_ms=60).start()
    loop = asyncio.get_running_loop()
    req = request(n=4000)  # ~16 kB: 130 ms at 1 Mbit/s, and two slow-start rounds
    start = loop.time() - link.started_at
    out = await link.offload(req, 5.0)
    end = loop.time() - link.started_at
    assert out.window_id == "w"
    up = wire.to_pb(req).ByteSize() + STREAM_CALL_BYTES[0]
    down = wire.to_pb(out).ByteSize() + STREAM_CALL_BYTES[1]
    reach, back = ideal(Trace.constant(1.0), 0.06, up, down, start)
    ((what, at, timeout_s),) = fake.calls
    assert what == "offload" and reach - 1e-3 <= at - link.started_at <= reach + SLACK_S
    assert timeout_s == pytest.approx(5.0 - (at - link.started_at - start), abs=0.01)  # the time left
    assert back - 0.01 <= end <= back + 2 * SLACK_S
    assert link.counters.bytes_up == up and link.counters.bytes_down == down
    assert link.streams_opened == 3  # the device reads it to skip calls that opened a stream
    await link.close()
    assert fake.closed


async def test_an_outage_holds_the_bytes_until_the_deadline_fires() -> None:
    fake = Fake()
    link = await ShapedTransport(fake, Trace.constant(10.0), rtt_ms=40, outages=[(0.0, 5.0)]).start()
    loop = asyncio.get_running_loop()
    t = loop.time()
    with pytest.raises(OffloadDeadlineError, match="deadline"):
        await link.offload(request(), 0.3)
    assert 0.3 - 1e-3 <= loop.time() - t <= 0.3 + SLACK_S
    assert not fake.calls  # nothing reached the broker
    assert link.outage_active


async def test_an_answer_that_arrives_in_an_outage_waits_for_its_end() -> None:
    fake = Fake()
    # the request is up at ~20 ms; the outage starts at 25 ms, before the answer has come down:
    # it is held (as the proxy's writer holds bytes in flight) and delivered when the link is back
    link = await ShapedTransport(fake, Trace.constant(10.0), rtt_ms=40, outages=[(0.025, 0.4)]).start()
    loop = asyncio.get_running_loop()
    await link.offload(request(n=4), 2.0)
    assert 0.4 - 1e-3 <= loop.time() - link.started_at <= 0.42 + SLACK_S


async def test_set_outage_stops_the_link_until_it_is_lifted() -> None:
    fake = Fake()
    link = await ShapedTransport(fake, rtt_ms=0).start()
    link.set_outage(True)
    task = asyncio.ensure_future(link.offload(request(), 2.0))
    await asyncio.sleep(0.1)
    assert not fake.calls and link.outage_active
    link.set_outage(False)
    assert (await task).window_id == "w"


async def test_a_shed_crosses_the_downlink_and_is_raised() -> None:
    fake = Fake()
    fake.fail = ShedError("full", retry_after_ms=250)
    link = await ShapedTransport(fake, rtt_ms=100).start()
    loop = asyncio.get_running_loop()
    t = loop.time()
    with pytest.raises(ShedError):
        await link.offload(request(), 2.0)
    assert 0.1 - 1e-3 <= loop.time() - t <= 0.1 + SLACK_S  # up and back down


async def test_an_oversized_request_goes_to_the_inner_transport_at_once() -> None:
    fake = Fake()
    fake.max_message_bytes = 100
    link = await ShapedTransport(fake, rtt_ms=500).start()
    loop = asyncio.get_running_loop()
    t = loop.time()
    await link.offload(request(), 2.0)  # the fake does not refuse it; a GrpcTransport would
    assert loop.time() - t < 0.1 and link.counters.bytes_up == 0


async def test_plan_and_telemetry_calls_are_shaped_too() -> None:
    fake = Fake()
    link = await ShapedTransport(fake, Trace.constant(0.5), downlink_mbps=0.5, rtt_ms=50).start()
    loop = asyncio.get_running_loop()
    t = loop.time()
    assert await link.get_plan("phone", ["m"], 2**62, 2.0) is None
    ping = loop.time() - t
    assert 0.05 <= ping <= 0.05 + (UNARY_CALL_BYTES[0] + UNARY_CALL_BYTES[1] + 64) * 8 / 0.5e6 + SLACK_S
    report = TelemetryReport("dev", "phone", None, 1, 1, 2, ())
    assert await link.report_telemetry(report, 2.0) == TelemetryAck(7, 0.5)
    assert [c[0] for c in fake.calls] == ["get_plan", "telemetry"]
    assert link.counters.bytes_up >= 2 * UNARY_CALL_BYTES[0] + wire.to_pb(report).ByteSize()
    with pytest.raises(OffloadDeadlineError):
        link.set_outage(True)
        await link.report_telemetry(report, 0.1)


class WireFake(Fake):
    """An inner transport that takes messages as built, as GrpcTransport does."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[tuple[Any, int | None]] = []

    async def offload_message(self, window_id: str, msg: Any, size: int, timeout_s: float) -> OffloadResponse:
        self.messages.append((msg, size))
        self._seen("offload", timeout_s)
        return response(window_id)

    async def report_message(self, msg: Any, timeout_s: float = 5.0) -> TelemetryAck:
        self.messages.append((msg, None))
        self._seen("telemetry", timeout_s)
        return TelemetryAck(7, 0.5)


async def test_a_message_built_to_measure_it_is_the_one_sent() -> None:
    fake = WireFake()
    link = await ShapedTransport(fake, rtt_ms=10).start()
    req = request()
    assert (await link.offload(req, 2.0)).window_id == "w"
    report = TelemetryReport("dev", "phone", None, 1, 1, 2, ())
    assert await link.report_telemetry(report, 2.0) == TelemetryAck(7, 0.5)
    (sent, size), (reported, _) = fake.messages
    assert sent == wire.to_pb(req) and size == sent.ByteSize()
    assert reported == wire.to_pb(report)
    assert link.counters.bytes_up == size + STREAM_CALL_BYTES[0] + reported.ByteSize() + UNARY_CALL_BYTES[0]
    fake.max_message_bytes = 100  # refused before a byte goes: the inner transport says why
    await link.offload(req, 2.0)
    assert (
        len(fake.messages) == 3
        and link.counters.bytes_up == size + STREAM_CALL_BYTES[0] + reported.ByteSize() + UNARY_CALL_BYTES[0]
    )


async def test_watch_plans_shapes_each_plan_set_and_closes_the_inner_watch() -> None:
    fake = Fake()
    link = await ShapedTransport(fake, rtt_ms=60).start()
    loop = asyncio.get_running_loop()
    t = loop.time()
    got = []
    watch = link.watch_plans("phone", ["m"], 0)
    async for ps in watch:
        got.append((ps.version, loop.time() - t))
        if len(got) == 2:
            break
    await watch.aclose()  # type: ignore[attr-defined]
    assert [v for v, _ in got] == [2, 3]
    assert got[0][1] >= 0.06 - 1e-3  # the request up, the first plan set down
    assert fake.watch_closed


async def test_calls_before_start_are_refused() -> None:
    link = ShapedTransport(Fake(), rtt_ms=10)
    with pytest.raises(RuntimeError, match="not started"):
        await link.offload(request(), 1.0)
