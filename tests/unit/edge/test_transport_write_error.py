"""How a failed write on the offload stream is explained: the reader's verdict (the status the
call ended with) first, then the call's own status, and a generic INTERNAL from gRPC core that
nothing explains is a stream that ended under the window (sent once more), never a final error."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest

from edge.transport import GrpcTransport, _Stream, _StreamEnded, _StreamUnsupported
from splitsense.errors import RejectedError


class _Call:
    """What `_write_error` reads of a grpc.aio stream call: a status that may never come."""

    def __init__(self, code: grpc.StatusCode | None = None, details: str = "") -> None:
        self._code, self._details = code, details

    async def code(self) -> grpc.StatusCode:
        if self._code is None:
            await asyncio.Event().wait()  # the call never reports a status
        assert self._code is not None
        return self._code

    async def details(self) -> str:
        return self._details

    async def trailing_metadata(self) -> tuple[Any, ...]:
        return ()

    def cancel(self) -> bool:
        return True


def _core_internal() -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(
        grpc.StatusCode.INTERNAL, grpc.aio.Metadata(), grpc.aio.Metadata(), details="Internal error from Core"
    )


@pytest.fixture
def transport(monkeypatch: pytest.MonkeyPatch) -> GrpcTransport:
    monkeypatch.setattr("edge.transport._STATUS_WAIT_S", 0.05)
    return GrpcTransport("127.0.0.1:1", "token", device_id="dev-1")


async def test_the_readers_verdict_explains_a_failed_write(transport: GrpcTransport) -> None:
    stream = _Stream(_Call(), connection=0)
    verdict = _StreamUnsupported("OffloadStream is not implemented by the broker")

    async def reader() -> None:
        await asyncio.sleep(0.01)  # the status reaches the reader just after the write failed
        stream.error = verdict

    stream.reader = asyncio.ensure_future(reader())
    assert await transport._write_error(stream, _core_internal()) is verdict


async def test_the_calls_status_explains_a_failed_write(transport: GrpcTransport) -> None:
    stream = _Stream(_Call(grpc.StatusCode.UNAUTHENTICATED, "unknown token"), connection=0)
    err = await transport._write_error(stream, _core_internal())
    assert isinstance(err, RejectedError) and err.code == "UNAUTHENTICATED"
    assert "unknown token" in str(err)


async def test_an_unexplained_core_internal_sends_the_window_again(transport: GrpcTransport) -> None:
    stream = _Stream(_Call(), connection=0)  # no reader verdict, no status within the wait
    err = await transport._write_error(stream, _core_internal())
    assert isinstance(err, _StreamEnded)
    assert "Internal error from Core" in str(err)


async def test_another_write_error_is_final(transport: GrpcTransport) -> None:
    stream = _Stream(_Call(), connection=0)
    e = grpc.aio.AioRpcError(
        grpc.StatusCode.PERMISSION_DENIED, grpc.aio.Metadata(), grpc.aio.Metadata(), details="not yours"
    )
    err = await transport._write_error(stream, e)
    assert not isinstance(err, _StreamEnded)
    assert "not yours" in str(err)


async def test_a_reader_that_got_core_internal_sends_the_window_again(transport: GrpcTransport) -> None:
    # the same race seen from the read side: the call itself ended INTERNAL "Internal error from Core"
    err = transport._stream_error(_Stream(_Call(), connection=0), _core_internal())
    assert isinstance(err, _StreamEnded) and "no status to say why" in str(err)
