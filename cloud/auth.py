"""Per-device authentication of broker calls, from call metadata.

A device sends two metadata entries on every call of OffloadService and PlanService:

    x-splitsense-device-id: <device id>
    authorization: Bearer <token>          (or  x-splitsense-token: <token>)

where `token = device_token(secret, device_id)`, the hex HMAC-SHA256 of the device id under the
broker's secret. The broker recomputes it, so it verifies any device without a table of tokens;
an optional allow-list narrows the devices further. Whatever is wrong (no id, no token, a token
of another device or secret, a device not on the list) the call fails with UNAUTHENTICATED before
any servicer runs. The health and reflection services stay open, so that orchestrators and
grpcurl-style tools work without a token.

With mutual TLS (broker.tls_client_ca_file) the call must also come over a connection whose
client certificate, already verified against that CA by the TLS handshake, has a subject common
name (CN) equal to the device id of the call's metadata: a device holding another device's token
but not its certificate and key is refused UNAUTHENTICATED. The CN, not a SAN, because
deploy/tls/gen_certs.sh issues device certificates with CN = device id and no SAN. The token is
still required: the certificate binds the connection to the device, the token stays the
credential that can be managed per device.

`Authenticator` and `check_peer_identity` are the pure decisions (unit-tested without sockets);
`AuthInterceptor` applies them to a grpc.aio server. Servicers read the verified id back with
`device_id_of(metadata)`.
"""

from __future__ import annotations

import hashlib
import hmac
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from typing import Any, Protocol

import grpc

from splitsense.errors import ConfigError, RejectedError
from splitsense.wire import AUTH_METADATA_KEY, DEVICE_ID_METADATA_KEY, TOKEN_METADATA_KEY

__all__ = [
    "DEVICE_ID_METADATA",
    "OPEN_SERVICE_PREFIXES",
    "TOKEN_METADATA",
    "AuthInterceptor",
    "Authenticator",
    "DeviceAuthenticator",
    "check_peer_identity",
    "claimed_credentials",
    "device_id_of",
    "device_token",
]

DEVICE_ID_METADATA = DEVICE_ID_METADATA_KEY
TOKEN_METADATA = TOKEN_METADATA_KEY
_AUTHORIZATION = AUTH_METADATA_KEY
_BEARER = "bearer "
_MAX_DEVICE_ID_CHARS = 128
# Methods under these prefixes need no token: grpc.health.v1.Health and server reflection.
OPEN_SERVICE_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.")

Metadata = Iterable[tuple[str, str | bytes]]
# grpc's ServicerContext.auth_context(): property name -> values, e.g. "x509_common_name": [b"phone-1"]
AuthContext = Mapping[str, Iterable[bytes]]
_PEER_CN = "x509_common_name"


def device_token(secret: str, device_id: str) -> str:
    """The token of a device: hex HMAC-SHA256(secret, device_id), 64 characters."""
    if not isinstance(secret, str) or not secret:
        raise ConfigError("the auth secret must be a non-empty string (broker.auth_secret)")
    _check_device_id(device_id)
    return hmac.new(secret.encode(), device_id.encode(), hashlib.sha256).hexdigest()


def _check_device_id(device_id: Any) -> None:
    if not isinstance(device_id, str) or not device_id.strip():
        raise ConfigError(f"a device id must be a non-empty string, got {device_id!r}")
    if len(device_id) > _MAX_DEVICE_ID_CHARS:
        raise ConfigError(f"a device id must be at most {_MAX_DEVICE_ID_CHARS} characters, got {len(device_id)}")


def _first(metadata: Metadata, key: str) -> str | None:
    for k, v in metadata:
        if k.lower() == key:
            return v.decode(errors="replace") if isinstance(v, bytes) else v
    return None


def device_id_of(metadata: Metadata | None) -> str | None:
    """The device id a call's metadata claims (verified by the interceptor before any servicer)."""
    return None if metadata is None else _first(metadata, DEVICE_ID_METADATA)


def _unauthenticated(message: str) -> RejectedError:
    return RejectedError(message, code="UNAUTHENTICATED")


class Authenticator:
    """Decides whether a call's metadata authenticates a device; pure (no gRPC calls)."""

    def __init__(self, secret: str, allowed_device_ids: Iterable[str] = ()) -> None:
        if not isinstance(secret, str) or not secret:
            raise ConfigError("the auth secret must be a non-empty string (broker.auth_secret)")
        self._key = secret.encode()
        self._allowed = frozenset(allowed_device_ids)

    def authenticate(self, metadata: Metadata | None) -> str:
        """The authenticated device id; RejectedError(code="UNAUTHENTICATED") saying what is wrong."""
        device_id, token = claimed_credentials(metadata)
        expected = hmac.new(self._key, device_id.encode(), hashlib.sha256).hexdigest()
        if not hmac.compare_digest(token.strip().lower().encode(), expected.encode()):
            raise _unauthenticated(
                f"the token is not valid for device {device_id!r} on this broker "
                "(wrong device id, or a token made with another secret)"
            )
        if self._allowed and device_id not in self._allowed:
            raise _unauthenticated(f"device {device_id!r} is not on this broker's allow-list")
        return device_id


def claimed_credentials(metadata: Metadata | None) -> tuple[str, str]:
    """(device id, token) as a call's metadata claims them, not yet verified; RejectedError
    (code="UNAUTHENTICATED") when either is missing or the id is too long. Never quotes the token."""
    md = list(metadata or ())
    device_id = _first(md, DEVICE_ID_METADATA)
    if not device_id:
        raise _unauthenticated(f"missing metadata {DEVICE_ID_METADATA!r}: every call names its device, with its token")
    if len(device_id) > _MAX_DEVICE_ID_CHARS:
        raise _unauthenticated(
            f"metadata {DEVICE_ID_METADATA!r}: expected at most {_MAX_DEVICE_ID_CHARS} characters, got {len(device_id)}"
        )
    token = _token_of(md)
    if token is None:
        raise _unauthenticated(
            f"missing token: send metadata '{_AUTHORIZATION}: Bearer <token>' or "
            f"'{TOKEN_METADATA}: <token>' (get it with `splitsense cloud token issue DEVICE_ID`)"
        )
    return device_id, token


def check_peer_identity(device_id: str, auth_context: AuthContext) -> None:
    """Mutual TLS: the client certificate's subject CN must be `device_id`; else
    RejectedError(code="UNAUTHENTICATED") saying what the connection's certificate names."""
    names = [v.decode(errors="replace") for v in auth_context.get(_PEER_CN, ())]
    if not names:
        raise _unauthenticated(
            f"this broker requires a client certificate whose CN is the device id {device_id!r} "
            "(mutual TLS); the connection presented none"
        )
    if names != [device_id]:
        raise _unauthenticated(
            f"the client certificate is for {names[0] if len(names) == 1 else names!r}, not for device "
            f"{device_id!r}: with mutual TLS a device calls with its own certificate (CN = its device id)"
        )


def _token_of(metadata: list[tuple[str, str | bytes]]) -> str | None:
    auth = _first(metadata, _AUTHORIZATION)
    if auth is not None and auth[: len(_BEARER)].lower() == _BEARER:
        return auth[len(_BEARER) :]
    return _first(metadata, TOKEN_METADATA)


def is_open_method(method: str) -> bool:
    """Whether a full method name ('/pkg.Service/Method') needs no authentication."""
    return method.startswith(OPEN_SERVICE_PREFIXES)


RejectHook = Callable[[RejectedError], None]


class DeviceAuthenticator(Protocol):
    """What AuthInterceptor asks: `Authenticator` (HMAC, synchronous) or cloud/tokens.py's
    `TokenAuthenticator` (stored tokens, asynchronous). Returns the device id or raises RejectedError."""

    def authenticate(self, metadata: Metadata | None) -> str | Awaitable[str]: ...


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Rejects unauthenticated calls with UNAUTHENTICATED before their servicer runs.

    `require_peer_identity` (mutual TLS) also checks the client certificate against the device id.
    An interceptor sees only the method and the metadata, so that check runs in a wrapper of the
    handler, first thing in the call, where the servicer context gives the connection's identity."""

    def __init__(
        self,
        authenticator: DeviceAuthenticator,
        on_reject: RejectHook | None = None,
        *,
        require_peer_identity: bool = False,
    ) -> None:
        self._auth = authenticator
        self._on_reject = on_reject
        self._require_peer_identity = require_peer_identity

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = handler_call_details.method or ""
        if is_open_method(method):
            return await continuation(handler_call_details)
        try:
            verdict = self._auth.authenticate(handler_call_details.invocation_metadata)
            device_id = await verdict if inspect.isawaitable(verdict) else verdict
        except RejectedError as e:
            if self._on_reject is not None:
                self._on_reject(e)
            handler = await continuation(handler_call_details)
            return _rejecting(handler, str(e), _status_code(e))
        handler = await continuation(handler_call_details)
        if self._require_peer_identity and handler is not None:
            return _checking_peer(handler, device_id, self._on_reject)
        return handler


def _checking_peer(
    handler: grpc.RpcMethodHandler, device_id: str, on_reject: RejectHook | None
) -> grpc.RpcMethodHandler:
    """`handler`, but the call first checks the connection's client certificate (mutual TLS)."""
    kind = (handler.request_streaming, handler.response_streaming)
    behavior: Any = {
        (True, True): handler.stream_stream,
        (True, False): handler.stream_unary,
        (False, True): handler.unary_stream,
        (False, False): handler.unary_unary,
    }[kind]

    async def check(context: grpc.aio.ServicerContext[Any, Any]) -> None:
        try:
            check_peer_identity(device_id, context.auth_context())
        except RejectedError as e:
            if on_reject is not None:
                on_reject(e)
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(e))

    async def unary_response(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await check(context)
        result = behavior(request, context)
        return await result if inspect.isawaitable(result) else result

    async def stream_response(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
        await check(context)
        result = behavior(request, context)
        if inspect.isasyncgen(result):
            async for item in result:
                yield item
        elif inspect.isawaitable(result):  # a coroutine that writes with context.write()
            await result
        else:
            for item in result:
                yield item

    make = {
        (True, True): grpc.stream_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (False, False): grpc.unary_unary_rpc_method_handler,
    }[kind]
    response_streaming = handler.response_streaming
    return make(
        stream_response if response_streaming else unary_response,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


def _status_code(error: RejectedError) -> grpc.StatusCode:
    """UNAUTHENTICATED, or UNAVAILABLE when the credentials could not be checked (token store down)."""
    return grpc.StatusCode.UNAVAILABLE if error.code == "UNAVAILABLE" else grpc.StatusCode.UNAUTHENTICATED


def _rejecting(
    handler: grpc.RpcMethodHandler | None, message: str, code: grpc.StatusCode = grpc.StatusCode.UNAUTHENTICATED
) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that fails the call with `code`."""

    async def abort(_request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        await context.abort(code, message)

    if handler is None:  # an unknown method: UNAUTHENTICATED too, so probing reveals nothing
        return grpc.unary_unary_rpc_method_handler(abort)
    kwargs = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(abort, **kwargs)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(abort, **kwargs)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(abort, **kwargs)
    return grpc.unary_unary_rpc_method_handler(abort, **kwargs)
