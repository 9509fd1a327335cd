"""The link emulator with real sockets on 127.0.0.1: throughput tracks a real trace, outages stall
traffic and it resumes, RTT and loss add their delays, many connections and devices in one process;
and the inline link (ShapedTransport) times real gRPC calls as the proxy does."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import grpc
import grpc.aio
import numpy as np
import pytest

from edge.transport import GrpcTransport
from pipelines.codecs import Codec, encode
from simulators.link import LinkEmulator, ShapedTransport, burst_completion_s
from simulators.traces import Trace, default_trace_dir, load_trace
from splitsense.v1 import offload_pb2 as pb
from splitsense.v1 import offload_pb2_grpc as pb_grpc
from splitsense.wire import DeviceEstimates, OffloadRequest, RadioKind

pytestmark = pytest.mark.integration


class Sink:
    """A TCP server that reads everything and records (loop time, bytes) of each read."""

    def __init__(self) -> None:
        self.arrivals: list[tuple[float, int]] = []
        self.connections = 0
        self.server: asyncio.Server | None = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        loop = asyncio.get_running_loop()
        try:
            while data := await reader.read(65536):
                self.arrivals.append((loop.time(), len(data)))
        finally:
            writer.close()

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    def bytes_in(self, t0: float, t1: float) -> int:
        return sum(n for t, n in self.arrivals if t0 <= t < t1)


class Echo:
    def __init__(self) -> None:
        self.connections = 0
        self.server: asyncio.Server | None = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])


@asynccontextmanager
async def serving(app: Sink | Echo) -> AsyncIterator[None]:
    # A broker-sized accept backlog: 200 devices dial at once (asyncio's default is 100).
    app.server = await asyncio.start_server(app._handle, "127.0.0.1", 0, backlog=1024)
    try:
        yield
    finally:
        app.server.close()


async def dial(link: LinkEmulator) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = link.address.rsplit(":", 1)
    return await asyncio.open_connection(host, int(port))


async def echo_rtt(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, payload: bytes) -> float:
    start = time.perf_counter()
    writer.write(payload)
    await writer.drain()
    got = await reader.readexactly(len(payload))
    assert got == payload
    return time.perf_counter() - start


async def flood(link: LinkEmulator, until_s: float) -> float:
    """Push bytes through ``link`` as fast as it takes them until its clock reads ``until_s``.

    Returns the link time at which sending began.
    """
    _, writer = await dial(link)
    started = link.elapsed_s()
    block = b"\x5a" * 65536

    async def push() -> None:
        while True:
            writer.write(block)
            await writer.drain()

    pusher = asyncio.create_task(push())
    await asyncio.sleep(until_s - link.elapsed_s())
    pusher.cancel()
    await asyncio.gather(pusher, return_exceptions=True)
    writer.transport.abort()
    return started


def varied_window(trace: Trace, length_s: float, floor_mbps: float, swing: float) -> float:
    """The first trace time from which the bandwidth stays >= floor_mbps for length_s while its
    maximum is at least ``swing`` times its minimum (so the test sees the rate change)."""
    for start in np.arange(0.0, trace.duration_s - length_s, 0.5):
        rates = [trace.bandwidth_at(float(t)) for t in np.arange(start, start + length_s, 0.05)]
        if min(rates) >= floor_mbps and max(rates) >= swing * min(rates):
            return float(start)
    raise AssertionError(f"no {length_s} s window >= {floor_mbps} Mbit/s with a x{swing} swing in {trace.name}")


async def test_throughput_tracks_a_real_trace() -> None:
    trace = load_trace(default_trace_dir() / "norway_hsdpa_3g" / "norway_bus_1.txt")
    seconds, scale = 6, 2.0  # 12 s of the trace replayed in 6 s of wall time
    offset = varied_window(trace, seconds * scale, floor_mbps=1.0, swing=2.0)
    sink = Sink()
    async with (
        serving(sink),
        LinkEmulator(
            upstream=("127.0.0.1", sink.port), trace=trace, time_offset_s=offset, time_scale=scale, rtt_ms=20
        ) as link,
    ):
        assert link.uplink is not None
        sent_from = await flood(link, seconds + 0.1)
        t0, d = link.started_at, link.one_way_s
        measured, expected = [], []
        for k in range(seconds):
            measured.append(sink.bytes_in(t0 + k, t0 + k + 1))
            lo = max(k - d, sent_from - 0.02)
            expected.append(link.uplink.bytes_between(lo, k + 1 - d))
        counters = link.counters
    m, e = np.array(measured, dtype=float), np.array(expected)
    mare = float(np.mean(np.abs(m - e) / e))
    total_err = abs(m.sum() - e.sum()) / e.sum()
    print(
        f"\nlink tracking on {trace.name} from {offset:.1f} s (x{scale}): "
        f"per-second Mbit/s measured {np.round(m * 8 / 1e6, 3).tolist()} "
        f"expected {np.round(e * 8 / 1e6, 3).tolist()}; MARE {mare:.2%}, total error {total_err:.2%}"
    )
    assert mare < 0.10
    assert total_err < 0.10
    assert counters.bytes_up >= m.sum()
    assert counters.connections_total == 1


async def test_scripted_outage_stalls_then_resumes() -> None:
    sink = Sink()
    async with (
        serving(sink),
        LinkEmulator(upstream=("127.0.0.1", sink.port), uplink_mbps=8.0, rtt_ms=10, outages=[(0.8, 1.8)]) as link,
    ):
        await flood(link, 2.6)
        t0 = link.started_at
        before = sink.bytes_in(t0 + 0.2, t0 + 0.8)
        during = sink.bytes_in(t0 + 0.85, t0 + 1.8)
        after = sink.bytes_in(t0 + 2.0, t0 + 2.6)
    assert during == 0
    assert before == pytest.approx(0.6 * 1e6, rel=0.15)  # 8 Mbit/s = 1 MB/s
    assert after == pytest.approx(0.6 * 1e6, rel=0.15)


async def test_manual_outage_black_holes_new_connections_and_stalls_old_ones() -> None:
    echo = Echo()
    async with serving(echo), LinkEmulator(upstream=("127.0.0.1", echo.port), uplink_mbps=50.0) as link:
        r1, w1 = await dial(link)
        assert await echo_rtt(r1, w1, b"ping") < 0.1
        link.set_outage(True)
        assert link.outage_active
        w1.write(b"stalled")
        r2, w2 = await dial(link)  # the proxy accepts, but nothing reaches the upstream
        w2.write(b"new")
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(r1.readexactly(7), timeout=0.5)
        assert echo.connections == 1
        link.set_outage(False)
        assert await asyncio.wait_for(r1.readexactly(7), timeout=1.0) == b"stalled"
        assert await asyncio.wait_for(r2.readexactly(3), timeout=1.0) == b"new"
        assert echo.connections == 2
        w1.close()
        w2.close()


async def test_rtt_adds_the_configured_delay() -> None:
    echo = Echo()
    async with serving(echo):
        for rtt_ms in (0.0, 200.0):
            async with LinkEmulator(
                upstream=("127.0.0.1", echo.port), uplink_mbps=100.0, downlink_mbps=100.0, rtt_ms=rtt_ms
            ) as link:
                reader, writer = await dial(link)
                rtts = [await echo_rtt(reader, writer, b"r" * 100) for _ in range(3)]
                writer.close()
            print(f"\nconfigured rtt {rtt_ms} ms: measured {[round(r * 1000, 1) for r in rtts]} ms")
            assert rtt_ms / 1000 <= min(rtts)
            assert max(rtts) < rtt_ms / 1000 + 0.05


async def test_loss_shows_as_retransmission_delay() -> None:
    echo = Echo()
    async with (
        serving(echo),
        LinkEmulator(
            upstream=("127.0.0.1", echo.port), uplink_mbps=100.0, rtt_ms=10, loss=0.2, rto_ms=60, seed=1
        ) as link,
    ):
        reader, writer = await dial(link)
        rtts = [await echo_rtt(reader, writer, b"l" * 1000) for _ in range(30)]
        writer.close()
        retransmissions = link.counters.retransmissions
    slow = sum(r >= 0.06 for r in rtts)
    # P(a round trip draws at least one loss) = 1 - 0.8**2 = 0.36 -> about 11 of 30
    assert 3 <= slow <= 22
    assert retransmissions >= slow
    assert min(rtts) < 0.05


async def test_many_connections_share_one_link() -> None:
    echo = Echo()
    n, size = 20, 50_000
    async with serving(echo), LinkEmulator(upstream=("127.0.0.1", echo.port), uplink_mbps=8.0) as link:

        async def one(i: int) -> None:
            reader, writer = await dial(link)
            payload = bytes([i]) * size
            writer.write(payload)
            await writer.drain()
            assert await reader.readexactly(size) == payload
            writer.close()

        start = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(n)))
        elapsed = time.perf_counter() - start
        counters = link.counters
    # 1 MB through a shared 8 Mbit/s (1 MB/s) uplink: about 1 s, not 1/20 s.
    assert elapsed == pytest.approx(n * size / 1e6, rel=0.2)
    assert counters.bytes_up == counters.bytes_down == n * size
    assert counters.connections_total == n


async def test_two_hundred_devices_in_one_process() -> None:
    echo = Echo()
    trace = load_trace(default_trace_dir() / "norway_hsdpa_3g" / "norway_bus_1.txt")
    async with serving(echo):
        links = [
            LinkEmulator(upstream=("127.0.0.1", echo.port), trace=trace, time_offset_s=float(i % 150), rtt_ms=40)
            for i in range(200)
        ]
        await asyncio.gather(*(link.start() for link in links))
        try:

            async def device(link: LinkEmulator) -> float:
                reader, writer = await dial(link)
                rtt = max([await echo_rtt(reader, writer, b"a" * 4096) for _ in range(3)])
                writer.close()
                return rtt

            start = time.perf_counter()
            rtts = await asyncio.gather(*(device(link) for link in links))
            elapsed = time.perf_counter() - start
        finally:
            await asyncio.gather(*(link.close() for link in links))
    assert len(rtts) == 200 and min(rtts) >= 0.04
    # 4 KiB at >= 0.2 Mbit/s plus 40 ms per round trip; all 200 devices run concurrently.
    assert elapsed < 8.0
    print(f"\n200 devices: 3 echoes each in {elapsed:.2f} s, worst rtt {max(rtts) * 1000:.0f} ms")


async def test_a_lone_message_pays_its_serialisation_and_delay() -> None:
    echo = Echo()
    async with (
        serving(echo),
        LinkEmulator(upstream=("127.0.0.1", echo.port), uplink_mbps=8.0, rtt_ms=50, slow_start=False) as link,
    ):
        reader, writer = await dial(link)
        await asyncio.sleep(0.1)  # an idle link banks nothing
        rtt = await echo_rtt(reader, writer, b"s" * 100_000)  # 0.1 s at 1 MB/s, plus 50 ms
        writer.close()
    assert 0.15 <= rtt < 0.2


async def test_a_lone_message_pays_slow_start_after_idle() -> None:
    # 5 Mbit/s, rtt 100 ms (RTO 200 ms): 4 kB fits the initial window (14480 B); 20 kB needs a second
    # round 100 ms later, 60 kB a third at 200 ms. Each message follows more than an RTO of idleness
    # on the same connection, so each starts from the initial window again.
    sink = Sink()
    mbps, rtt_ms = 5.0, 100.0
    async with (
        serving(sink),
        LinkEmulator(upstream=("127.0.0.1", sink.port), uplink_mbps=mbps, rtt_ms=rtt_ms) as link,
    ):
        assert link.uplink is not None
        _, writer = await dial(link)
        loop = asyncio.get_running_loop()
        rows = []
        received = 0
        for size in (4_000, 20_000, 60_000, 20_000):
            await asyncio.sleep(0.35)  # idle: > RTO since the last byte left, and its ACK is back
            sent = loop.time()
            writer.write(b"m" * size)
            await writer.drain()
            modelled = burst_completion_s(size, rtt_ms / 1000, mbps) + link.one_way_s
            await asyncio.sleep(modelled + 0.1)
            received += size
            arrived = next(t for t, total in accumulate(sink.arrivals) if total >= received)
            rows.append((size, arrived - sent, modelled))
        writer.close()
        without = link.uplink.time_to_send(60_000, 0.0) + link.one_way_s
        schedule = link.uplink.time_to_deliver(60_000, 0.0, link.rtt_s) + link.one_way_s
    shown = ", ".join(f"{n} B measured {m * 1000:.1f} ms, modelled {e * 1000:.1f} ms" for n, m, e in rows)
    print(f"\nslow start at 5 Mbit/s, rtt 100 ms: {shown}; 60 kB without slow start {without * 1000:.1f} ms")
    assert schedule == pytest.approx(rows[2][2])
    for _, measured, modelled in rows:
        assert measured == pytest.approx(modelled, abs=0.005)


def accumulate(arrivals: list[tuple[float, int]]) -> list[tuple[float, int]]:
    """(time, bytes received so far) after each read."""
    total, out = 0, []
    for t, n in arrivals:
        total += n
        out.append((t, total))
    return out


# --- the inline link (ShapedTransport) against the proxy, with real gRPC ------------------------


class StubBroker(pb_grpc.OffloadServiceServicer, pb_grpc.PlanServiceServicer):
    """Answers every window on the stream at once, and GetPlan with nothing (the device's ping)."""

    async def OffloadStream(self, request_iterator: Any, context: Any) -> AsyncIterator[pb.OffloadStreamResponse]:  # noqa: N802
        async for msg in request_iterator:
            wid = msg.request.window_id
            answer = pb.OffloadResponse(window_id=wid, logits=[0.1, 0.9], prediction=1, timing=pb.Timing(batch_size=1))
            yield pb.OffloadStreamResponse(window_id=wid, result=answer)

    async def GetPlan(self, request: pb.GetPlanRequest, context: Any) -> pb.GetPlanResponse:  # noqa: N802
        return pb.GetPlanResponse()

    async def Offload(self, request: pb.OffloadRequest, context: Any) -> pb.OffloadResponse:  # noqa: N802
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "streams only")
        raise AssertionError("abort raises")

    async def ReportTelemetry(self, request: pb.ReportTelemetryRequest, context: Any) -> pb.ReportTelemetryResponse:  # noqa: N802
        return pb.ReportTelemetryResponse(plan_version=1)

    async def WatchPlan(self, request: pb.WatchPlanRequest, context: Any) -> AsyncIterator[pb.WatchPlanResponse]:  # noqa: N802
        await context.abort(grpc.StatusCode.UNAVAILABLE, "no plans here")
        yield pb.WatchPlanResponse()


def window(i: int, floats: int) -> OffloadRequest:
    return OffloadRequest(
        window_id=f"w{i}",
        model="m",
        cut=1,
        device_id="sim-000-phone",
        device_class="phone",
        estimates=DeviceEstimates(2.0, 50.0, 1.0, True, RadioKind.LTE),
        plan_version=1,
        activation=encode(np.ones((1, floats), np.float32), Codec.FP32),
        sent_unix_ms=1,
    )


async def timed_calls(transport: Any, sizes: list[int]) -> list[float]:
    """Seconds each call took: a warm-up window (opens the stream), then one window per size 0.3 s
    apart (an idle RTO or more: each starts a slow-start burst), then a ping."""
    await transport.offload(window(-1, 4), 5.0)
    out = []
    for i, floats in enumerate(sizes):
        await asyncio.sleep(0.3)
        t = time.perf_counter()
        await transport.offload(window(i, floats), 5.0)
        out.append(time.perf_counter() - t)
    t = time.perf_counter()
    await transport.get_plan("phone", ["m"], 2**62, 5.0)
    out.append(time.perf_counter() - t)
    return out


async def test_inline_link_times_calls_as_the_proxy_does() -> None:
    """The same gRPC calls through the proxy and through ShapedTransport (2 Mbit/s each way, 60 ms
    RTT, slow start): each takes the same time to within a few milliseconds (the per-call bytes
    are calibrated on the proxy; the rest is the one model)."""
    server = grpc.aio.server()
    stub = StubBroker()
    pb_grpc.add_OffloadServiceServicer_to_server(stub, server)
    pb_grpc.add_PlanServiceServicer_to_server(stub, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    sizes = [4, 1000, 4000, 16000]  # 0.1 kB to 64 kB: one to four slow-start rounds
    shape: dict[str, Any] = {"downlink_trace": Trace.constant(2.0), "rtt_ms": 60.0}
    try:
        async with LinkEmulator(("127.0.0.1", port), Trace.constant(2.0), **shape) as link:
            client = GrpcTransport(link.address, "t" * 64, device_id="sim-000-phone")
            try:
                proxy = await timed_calls(client, sizes)
            finally:
                await client.close()
        direct = GrpcTransport(f"127.0.0.1:{port}", "t" * 64, device_id="sim-000-phone")
        async with ShapedTransport(direct, Trace.constant(2.0), **shape) as inline:
            inline_s = await timed_calls(inline, sizes)
            assert inline.counters.bytes_up > 4 * 16000
    finally:
        await server.stop(0)
    assert proxy[-2] > 0.3  # 64 kB at 2 Mbit/s: the link, not the host, sets these times
    for p, s in zip(proxy, inline_s, strict=True):
        assert s == pytest.approx(p, abs=0.015 + 0.05 * p), (proxy, inline_s)
