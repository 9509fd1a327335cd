"""Mutual TLS: the client certificate's CN must be the call's device id (cloud/auth.py).

The decision is pure (an auth context in, an error or nothing out); the interceptor's wrapper is
run here with fake servicer contexts, no sockets. The real handshake is in
tests/integration/cloud/test_tls.py.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, NamedTuple

import grpc
import pytest

from cloud.auth import DEVICE_ID_METADATA, Authenticator, AuthInterceptor, check_peer_identity, device_token
from splitsense.errors import RejectedError

SECRET = "unit-test-secret-0123456789"
DEVICE = "phone-1"


def ctx_of(*names: str) -> dict[str, list[bytes]]:
    """An auth context as grpc gives it after a verified client certificate."""
    out: dict[str, list[bytes]] = {"transport_security_type": [b"ssl"]}
    if names:
        out["x509_common_name"] = [n.encode() for n in names]
    return out


def test_the_certificate_of_the_calling_device_passes() -> None:
    check_peer_identity(DEVICE, ctx_of(DEVICE))


def test_a_certificate_of_another_device_is_unauthenticated_and_says_whose_it_is() -> None:
    with pytest.raises(RejectedError) as e:
        check_peer_identity(DEVICE, ctx_of("phone-2"))
    assert e.value.code == "UNAUTHENTICATED"
    assert "phone-2" in str(e.value) and repr(DEVICE) in str(e.value)


@pytest.mark.parametrize("names", [(), ("phone-1", "phone-2"), ("Phone-1",), ("phone-1 ",)])
def test_no_certificate_several_names_or_a_near_miss_are_refused(names: tuple[str, ...]) -> None:
    with pytest.raises(RejectedError) as e:
        check_peer_identity(DEVICE, ctx_of(*names))
    assert e.value.code == "UNAUTHENTICATED"


# --- the interceptor's wrapper ------------------------------------------------------------------


class Details(NamedTuple):
    method: str
    invocation_metadata: tuple[tuple[str, str], ...]


class Aborted(Exception):
    pass


class FakeContext:
    def __init__(self, auth: dict[str, list[bytes]]) -> None:
        self._auth = auth
        self.aborted: tuple[grpc.StatusCode, str] | None = None

    def auth_context(self) -> dict[str, list[bytes]]:
        return self._auth

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.aborted = (code, details)
        raise Aborted


async def unary(request: Any, context: Any) -> str:
    return f"answer to {request}"


async def streaming(request: Any, context: Any) -> AsyncIterator[str]:
    for i in range(2):
        yield f"{request}-{i}"


HANDLERS = {
    "/splitsense.v1.OffloadService/Offload": grpc.unary_unary_rpc_method_handler(unary),
    "/splitsense.v1.PlanService/WatchPlan": grpc.unary_stream_rpc_method_handler(streaming),
    "/splitsense.v1.OffloadService/OffloadStream": grpc.stream_stream_rpc_method_handler(streaming),
}


async def intercepted(method: str, *, require_peer_identity: bool, rejects: list[RejectedError]) -> Any:
    interceptor = AuthInterceptor(
        Authenticator(SECRET), on_reject=rejects.append, require_peer_identity=require_peer_identity
    )
    metadata = ((DEVICE_ID_METADATA, DEVICE), ("authorization", f"Bearer {device_token(SECRET, DEVICE)}"))

    async def continuation(_: Any) -> grpc.RpcMethodHandler:
        return HANDLERS[method]

    return await interceptor.intercept_service(continuation, Details(method, metadata))  # type: ignore[arg-type]


async def run(handler: Any, context: FakeContext) -> Any:
    if handler.response_streaming:
        behavior = handler.stream_stream if handler.request_streaming else handler.unary_stream
        return [item async for item in behavior("req", context)]
    return await handler.unary_unary("req", context)


@pytest.mark.parametrize("method", list(HANDLERS))
async def test_the_wrapper_serves_the_right_certificate_and_refuses_another(method: str) -> None:
    rejects: list[RejectedError] = []
    handler = await intercepted(method, require_peer_identity=True, rejects=rejects)
    assert handler.request_streaming == HANDLERS[method].request_streaming
    assert handler.response_streaming == HANDLERS[method].response_streaming
    good = FakeContext(ctx_of(DEVICE))
    assert await run(handler, good) == await run(HANDLERS[method], good)
    assert good.aborted is None and not rejects

    bad = FakeContext(ctx_of("phone-2"))
    with pytest.raises(Aborted):
        await run(handler, bad)
    assert bad.aborted is not None and bad.aborted[0] is grpc.StatusCode.UNAUTHENTICATED
    assert "phone-2" in bad.aborted[1] and len(rejects) == 1 and rejects[0].code == "UNAUTHENTICATED"


async def test_without_mutual_tls_the_handler_is_left_alone() -> None:
    method = "/splitsense.v1.OffloadService/Offload"
    handler = await intercepted(method, require_peer_identity=False, rejects=[])
    assert handler is HANDLERS[method]
