"""GrpcTransport when its connection goes away: the broker's max connection age (GOAWAY, then the
grace), and a broker gone with windows in flight. Stub brokers on loopback (no cloud/ code), each
answering with its own index as the prediction so that a test sees who answered.

Checked: on the GOAWAY the stream moves to a new connection without losing or resending a window
(the old one is half-closed and answers what it read); a window cut off by the end of the grace,
or by its broker going away, is sent once more on a new stream (the next broker of the list) and
answered there, once; the plan watch follows the connection too.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import grpc.aio
import numpy as np
import pytest

from edge.transport import GrpcTransport
from pipelines.codecs import Codec, encode
from splitsense.errors import BrokerUnavailableError
from splitsense.v1 import offload_pb2 as pb
from splitsense.v1 import offload_pb2_grpc as pb_grpc
from splitsense.wire import DeviceEstimates, OffloadRequest, RadioKind
from tests.integration.conftest import free_port

pytestmark = pytest.mark.integration

TOKEN = "device-token-123"
DEVICE = "dev-age"


def request(window_id: str) -> OffloadRequest:
    return OffloadRequest(
        window_id=window_id,
        model="m",
        cut=1,
        device_id=DEVICE,
        device_class="phone",
        estimates=DeviceEstimates(2.0, 50.0, 1.0, True, RadioKind.LTE),
        plan_version=0,
        activation=encode(np.ones((1, 4), np.float32), Codec.FP32),
        sent_unix_ms=int(time.time() * 1000),
    )


class StubBroker(pb_grpc.OffloadServiceServicer, pb_grpc.PlanServiceServicer):
    """Answers every window after `delay_s` (never, when `hold`), prediction = its index."""

    def __init__(self, index: int, delay_s: float = 0.0) -> None:
        self.index = index
        self.delay_s = delay_s
        self.hold = False
        self.streams = 0
        self.streams_ended_ok = 0
        self.read: list[str] = []
        self.answered: list[str] = []
        self.watches = 0

    async def OffloadStream(self, request_iterator: Any, context: Any) -> AsyncIterator[pb.OffloadStreamResponse]:  # noqa: N802
        self.streams += 1
        out: asyncio.Queue[pb.OffloadStreamResponse | None] = asyncio.Queue()
        tasks: set[asyncio.Task[None]] = set()

        async def answer(wid: str) -> None:
            await asyncio.sleep(self.delay_s)
            while self.hold:
                await asyncio.sleep(0.01)
            self.answered.append(wid)
            result = pb.OffloadResponse(
                window_id=wid, logits=[0.0, 1.0], prediction=self.index, timing=pb.Timing(batch_size=1)
            )
            out.put_nowait(pb.OffloadStreamResponse(window_id=wid, result=result))

        async def reader() -> None:
            async for msg in request_iterator:
                self.read.append(msg.request.window_id)
                task = asyncio.create_task(answer(msg.request.window_id))
                tasks.add(task)
            if tasks:
                await asyncio.wait(tasks)
            out.put_nowait(None)

        reading = asyncio.create_task(reader())
        try:
            while (item := await out.get()) is not None:
                yield item
        finally:
            reading.cancel()
            for t in tasks:
                t.cancel()
        self.streams_ended_ok += 1

    async def WatchPlan(self, request: pb.WatchPlanRequest, context: Any) -> AsyncIterator[pb.WatchPlanResponse]:  # noqa: N802
        self.watches += 1
        await asyncio.Event().wait()  # nothing new, ever
        yield pb.WatchPlanResponse()  # pragma: no cover


class StubServer:
    def __init__(self, index: int, port: int = 0, age_s: float = 0.0, grace_s: float = 5.0, delay_s: float = 0.0):
        self.servicer = StubBroker(index, delay_s)
        options: list[tuple[str, Any]] = [("grpc.so_reuseport", 0)]
        if age_s:
            options += [
                ("grpc.max_connection_age_ms", int(age_s * 1000)),
                ("grpc.max_connection_age_grace_ms", int(grace_s * 1000)),
            ]
        self.server = grpc.aio.server(options=options)
        pb_grpc.add_OffloadServiceServicer_to_server(self.servicer, self.server)
        pb_grpc.add_PlanServiceServicer_to_server(self.servicer, self.server)
        self.port = self.server.add_insecure_port(f"127.0.0.1:{port}")

    async def __aenter__(self) -> StubServer:
        await self.server.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.server.stop(0)


def transport(*ports: int) -> GrpcTransport:
    target = "ipv4:" + ",".join(f"127.0.0.1:{p}" for p in ports)
    return GrpcTransport(target, TOKEN, device_id=DEVICE, load_balancing="pick_first", shuffle_addresses=False)


async def steady(t: GrpcTransport, seconds: float, every_s: float = 0.02, timeout_s: float = 2.0) -> list[Any]:
    """A window every `every_s` for `seconds`, each awaited in the background; every outcome."""
    calls = []
    end = time.monotonic() + seconds
    i = 0
    while time.monotonic() < end:
        calls.append(asyncio.ensure_future(t.offload(request(f"w{i}"), timeout_s)))
        i += 1
        await asyncio.sleep(every_s)
    return list(await asyncio.gather(*calls, return_exceptions=True))


async def test_the_stream_moves_on_goaway_without_losing_or_resending_a_window() -> None:
    async with StubServer(0, age_s=0.3, grace_s=5.0, delay_s=0.05) as broker:
        t = transport(broker.port)
        try:
            out = await steady(t, 1.5)
        finally:
            await t.close()
    failures = [r for r in out if isinstance(r, BaseException)]
    assert not failures, failures[:3]
    assert [r.window_id for r in out] == [f"w{i}" for i in range(len(out))]
    s = broker.servicer
    assert t.streams_opened >= 3, "the stream never moved"
    assert t.windows_resent == 0, "a GOAWAY alone cost a window its stream"
    assert sorted(s.read) == sorted(s.answered) == sorted(set(s.read)), "a window was read twice"
    assert s.streams_ended_ok >= t.streams_opened - 1, "the old streams were not half-closed and ended OK"


async def test_a_window_cut_off_by_the_grace_is_sent_again_and_answered_once() -> None:
    # a grace far shorter than an answer: the old connection is closed under its windows
    async with StubServer(0, age_s=0.5, grace_s=0.01, delay_s=0.1) as broker:
        t = transport(broker.port)
        try:
            out = await steady(t, 1.5, every_s=0.05)
        finally:
            await t.close()
    failures = [r for r in out if isinstance(r, BaseException)]
    assert not failures, failures[:3]
    assert t.windows_resent >= 1, "no window was in flight when a connection was closed"
    assert len({r.window_id for r in out}) == len(out)


async def test_windows_in_flight_on_a_broker_that_goes_away_are_answered_by_the_next() -> None:
    async with StubServer(1) as second:
        first = StubServer(0)
        await first.server.start()
        t = transport(first.port, second.port)
        try:
            assert (await t.offload(request("warm"), 2.0)).prediction == 0
            first.servicer.hold = True  # read, never answered
            calls = [asyncio.ensure_future(t.offload(request(f"held{i}"), 2.0)) for i in range(4)]
            while len(first.servicer.read) < 5:
                await asyncio.sleep(0.01)
            await first.server.stop(None)  # gone at once, its windows unanswered
            out = await asyncio.gather(*calls)
            after = await t.offload(request("after"), 2.0)
        finally:
            await t.close()
    assert [r.prediction for r in out] == [1, 1, 1, 1], "held windows were not answered by the next broker"
    assert after.prediction == 1
    assert t.windows_resent == 4
    assert sorted(second.servicer.answered) == sorted(["after", *(f"held{i}" for i in range(4))])


async def test_no_broker_left_still_fails_the_window_at_once() -> None:
    first = StubServer(0)
    await first.server.start()
    t = transport(first.port, free_port())
    try:
        await t.offload(request("warm"), 2.0)
        first.servicer.hold = True
        call = asyncio.ensure_future(t.offload(request("held"), 2.0))
        while len(first.servicer.read) < 2:
            await asyncio.sleep(0.01)
        t0 = time.monotonic()
        await first.server.stop(None)
        with pytest.raises(BrokerUnavailableError):
            await call
        assert time.monotonic() - t0 < 1.0
    finally:
        await t.close()


async def test_the_plan_watch_follows_the_connection() -> None:
    async with StubServer(0, age_s=0.3, grace_s=30.0) as broker:
        t = transport(broker.port)
        watch = t.watch_plans("phone", ["m"])
        reading = asyncio.ensure_future(anext(aiter(watch)))
        try:
            await asyncio.sleep(1.5)
            assert not reading.done(), reading  # no error reached the caller
            assert broker.servicer.watches >= 3, "the watch stayed on its first connection"
        finally:
            reading.cancel()
            await asyncio.gather(reading, return_exceptions=True)
            await watch.aclose()
            await t.close()


def test_the_stub_service_config_is_pick_first() -> None:
    options = dict(transport(1, 2)._options)
    assert json.loads(options["grpc.service_config"])["loadBalancingConfig"] == [
        {"pick_first": {"shuffleAddressList": False}}
    ]
