"""GrpcTransport on real loopback sockets against a scripted stub broker (no cloud/ code).

Checks what only a real grpc.aio channel can show: metadata on the wire, answers matched by
window id on one pipelined stream, status codes and trailing metadata mapped to the error tree,
a broken stream failing every window in flight and reopening, the unary fallback, deadlines that
leave the stream usable, and the plan and telemetry calls.
"""

from __future__ import annotations

import asyncio
import math
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import grpc.aio
import numpy as np
import pytest

from edge.transport import GrpcTransport
from pipelines.codecs import Codec, encode
from splitsense.errors import BrokerUnavailableError, OffloadDeadlineError, RejectedError, ShedError
from splitsense.plan import BatteryState, Objective, Plan, PlanRow, PlanSet
from splitsense.v1 import offload_pb2 as pb
from splitsense.v1 import offload_pb2_grpc as pb_grpc
from splitsense.wire import (
    DeviceEstimates,
    OffloadRequest,
    RadioKind,
    TelemetryAck,
    TelemetryReport,
    to_pb,
)

pytestmark = pytest.mark.integration

TOKEN = "device-token-123"
DEVICE = "dev-7"


def request(window_id: str, n: int = 4) -> OffloadRequest:
    return OffloadRequest(
        window_id=window_id,
        model="m",
        cut=1,
        device_id=DEVICE,
        device_class="phone",
        estimates=DeviceEstimates(2.0, 50.0, 1.0, True, RadioKind.LTE),
        plan_version=0,
        activation=encode(np.ones((1, n), np.float32), Codec.FP32),
        sent_unix_ms=int(time.time() * 1000),
    )


def answer(window_id: str) -> pb.OffloadResponse:
    return pb.OffloadResponse(
        window_id=window_id,
        logits=[0.1, 0.9],
        prediction=1,
        timing=pb.Timing(queue_ms=1, compute_ms=2, batch_size=1),
    )


def plans(version: int) -> PlanSet:
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


class StubBroker(pb_grpc.OffloadServiceServicer, pb_grpc.PlanServiceServicer):
    def __init__(self) -> None:
        self.mode = "answer"
        self.stream_unimplemented = False
        self.metadata: list[dict[str, Any]] = []
        self.streams = 0
        self.unary_calls = 0
        self.plan_sets: list[PlanSet] = []
        self.reports: list[pb.ReportTelemetryRequest] = []

    async def Offload(self, request: pb.OffloadRequest, context: Any) -> pb.OffloadResponse:  # noqa: N802
        self.unary_calls += 1
        self.metadata.append(dict(context.invocation_metadata()))
        if self.mode == "shed":
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                "queue full",
                trailing_metadata=(("x-splitsense-retry-after-ms", "250"),),
            )
        if self.mode == "reject":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "OffloadRequest.cut: expected 0..7, got 9")
        return answer(request.window_id)

    async def OffloadStream(self, request_iterator: Any, context: Any) -> AsyncIterator[pb.OffloadStreamResponse]:  # noqa: N802
        self.streams += 1
        self.metadata.append(dict(context.invocation_metadata()))
        if self.stream_unimplemented:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "no streams on this broker")
        held: list[str] = []
        received = 0
        async for msg in request_iterator:
            wid = msg.request.window_id
            received += 1
            if self.mode == "reverse":
                held.append(wid)
                if len(held) == 4:
                    for w in reversed(held):
                        yield pb.OffloadStreamResponse(window_id=w, result=answer(w))
                    held.clear()
            elif self.mode == "shed":
                yield pb.OffloadStreamResponse(
                    window_id=wid, error=pb.WindowError(code=8, message="queue full", retry_after_ms=250)
                )
            elif self.mode == "reject":
                yield pb.OffloadStreamResponse(window_id=wid, error=pb.WindowError(code=3, message="bad cut"))
            elif self.mode == "break":
                if received == 3:
                    await context.abort(grpc.StatusCode.UNAVAILABLE, "replica died")
            elif self.mode == "slow" and wid.startswith("slow"):
                continue  # never answered
            else:
                yield pb.OffloadStreamResponse(window_id=wid, result=answer(wid))

    async def ReportTelemetry(self, request: pb.ReportTelemetryRequest, context: Any) -> pb.ReportTelemetryResponse:  # noqa: N802
        self.reports.append(request)
        return pb.ReportTelemetryResponse(plan_version=42)

    async def GetPlan(self, request: pb.GetPlanRequest, context: Any) -> pb.GetPlanResponse:  # noqa: N802
        newest = self.plan_sets[-1] if self.plan_sets else None
        if newest is None or request.known_version >= newest.version:
            return pb.GetPlanResponse()
        return pb.GetPlanResponse(plan_set=to_pb(newest))

    async def WatchPlan(self, request: pb.WatchPlanRequest, context: Any) -> AsyncIterator[pb.WatchPlanResponse]:  # noqa: N802
        for ps in self.plan_sets:
            if ps.version > request.known_version:
                yield pb.WatchPlanResponse(plan_set=to_pb(ps))
        await context.abort(grpc.StatusCode.UNAVAILABLE, "watch over")


@pytest.fixture
async def stub() -> AsyncIterator[tuple[StubBroker, str]]:
    servicer = StubBroker()
    server = grpc.aio.server()
    pb_grpc.add_OffloadServiceServicer_to_server(servicer, server)
    pb_grpc.add_PlanServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield servicer, f"127.0.0.1:{port}"
    finally:
        await server.stop(0)


@pytest.fixture
async def transport(stub: tuple[StubBroker, str]) -> AsyncIterator[GrpcTransport]:
    t = GrpcTransport(stub[1], TOKEN, device_id=DEVICE)
    try:
        yield t
    finally:
        await t.close()


async def test_stream_pipelines_windows_and_matches_answers_by_id(stub: Any, transport: GrpcTransport) -> None:
    servicer, _ = stub
    servicer.mode = "reverse"  # answers come back in the opposite order
    ids = [f"w{i}" for i in range(8)]
    out = await asyncio.gather(*(transport.offload(request(i), 5.0) for i in ids))
    assert [r.window_id for r in out] == ids
    assert servicer.streams == 1 and servicer.unary_calls == 0
    md = servicer.metadata[0]
    assert md["authorization"] == f"Bearer {TOKEN}" and md["x-splitsense-device-id"] == DEVICE


async def test_unary_calls_carry_the_same_metadata(stub: Any) -> None:
    servicer, address = stub
    t = GrpcTransport(address, TOKEN, device_id=DEVICE, use_stream=False)
    try:
        assert (await t.offload(request("u1"), 5.0)).prediction == 1
    finally:
        await t.close()
    assert servicer.unary_calls == 1 and servicer.streams == 0
    assert servicer.metadata[0]["authorization"] == f"Bearer {TOKEN}"


@pytest.mark.parametrize("use_stream", [True, False])
async def test_shed_becomes_shed_error_with_its_retry_hint(stub: Any, use_stream: bool) -> None:
    servicer, address = stub
    servicer.mode = "shed"
    t = GrpcTransport(address, TOKEN, device_id=DEVICE, use_stream=use_stream)
    try:
        with pytest.raises(ShedError) as e:
            await t.offload(request("s1"), 5.0)
    finally:
        await t.close()
    assert e.value.retry_after_ms == 250


@pytest.mark.parametrize("use_stream", [True, False])
async def test_invalid_argument_is_rejected_with_its_code(stub: Any, use_stream: bool) -> None:
    servicer, address = stub
    servicer.mode = "reject"
    t = GrpcTransport(address, TOKEN, device_id=DEVICE, use_stream=use_stream)
    try:
        with pytest.raises(RejectedError) as e:
            await t.offload(request("r1"), 5.0)
    finally:
        await t.close()
    assert e.value.code == "INVALID_ARGUMENT"


async def test_broken_stream_fails_every_window_in_flight_then_reopens(stub: Any, transport: GrpcTransport) -> None:
    servicer, _ = stub
    servicer.mode = "break"  # the broker aborts the stream after its third window
    results = await asyncio.gather(
        *(transport.offload(request(f"b{i}"), 5.0) for i in range(3)), return_exceptions=True
    )
    assert all(isinstance(r, BrokerUnavailableError) for r in results), results
    assert "replica died" in str(results[0])
    servicer.mode = "answer"
    assert (await transport.offload(request("after"), 5.0)).window_id == "after"
    assert servicer.streams == 2


async def test_a_broker_without_streams_gets_unary_calls(stub: Any, transport: GrpcTransport) -> None:
    servicer, _ = stub
    servicer.stream_unimplemented = True
    assert (await transport.offload(request("x1"), 5.0)).window_id == "x1"  # retried by unary
    # one stream, or two when the first write raced the refusal and gRPC core lost its status
    # (INTERNAL "Internal error from Core": the window goes once more on a new stream)
    opened = servicer.streams
    assert opened in (1, 2)
    assert (await transport.offload(request("x2"), 5.0)).window_id == "x2"
    assert servicer.streams == opened and servicer.unary_calls == 2, "once refused, no more streams"


async def test_a_missed_deadline_leaves_the_stream_usable(stub: Any, transport: GrpcTransport) -> None:
    servicer, _ = stub
    servicer.mode = "slow"
    t0 = time.monotonic()
    with pytest.raises(OffloadDeadlineError):
        await transport.offload(request("slow-1"), 0.1)
    assert 0.09 <= time.monotonic() - t0 < 0.6
    assert (await transport.offload(request("fast-1"), 5.0)).window_id == "fast-1"
    assert servicer.streams == 1


async def test_no_broker_listening_is_unavailable_at_once() -> None:
    with socket.socket() as s:  # a free port, closed again: nobody listens on it
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t = GrpcTransport(f"127.0.0.1:{port}", TOKEN, device_id=DEVICE)
    try:
        t0 = time.monotonic()
        with pytest.raises(BrokerUnavailableError):
            await t.offload(request("n1"), 2.0)
        assert time.monotonic() - t0 < 1.0
    finally:
        await t.close()


async def test_oversize_request_is_refused_before_sending(stub: Any) -> None:
    servicer, address = stub
    t = GrpcTransport(address, TOKEN, device_id=DEVICE, max_message_bytes=1000)
    try:
        with pytest.raises(RejectedError, match="message limit"):
            await t.offload(request("big", n=1000), 5.0)
    finally:
        await t.close()
    assert servicer.streams == 0 and servicer.unary_calls == 0


async def test_plans_and_telemetry(stub: Any, transport: GrpcTransport) -> None:
    servicer, _ = stub
    assert await transport.get_plan("phone", ["m"]) is None
    servicer.plan_sets = [plans(1), plans(2)]
    got = await transport.get_plan("phone", ["m"], known_version=0)
    assert got is not None and got.version == 2 and got.plans[0].rows[0].codec is Codec.FP16
    assert await transport.get_plan("phone", ["m"], known_version=2) is None
    watched = []
    with pytest.raises(BrokerUnavailableError):
        async for ps in transport.watch_plans("phone", ["m"], known_version=0):
            watched.append(ps.version)
    assert watched == [1, 2]
    report = TelemetryReport(DEVICE, "phone", DeviceEstimates(2.0, 50.0, 1.0, True, RadioKind.LTE), 2, 0, 10, ())
    assert await transport.report_telemetry(report) == TelemetryAck(42)  # this servicer does not time it
    assert servicer.reports[0].device_id == DEVICE


async def test_closed_transport_refuses_calls(stub: Any) -> None:
    t = GrpcTransport(stub[1], TOKEN, device_id=DEVICE)
    await t.close()
    with pytest.raises(BrokerUnavailableError, match="closed"):
        await t.offload(request("c1"), 1.0)
