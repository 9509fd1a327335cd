"""The device's one seam for I/O with the cloud, and its gRPC implementation.

`OffloadTransport` is what the runtime talks to; `GrpcTransport` is the real one (grpc.aio), and
tests or the simulators plug their own in the same place (a fake only has to implement the
protocol). Every failure comes out as one of the `OffloadError` subclasses of `splitsense.errors`;
gRPC status codes are mapped to them here and nowhere else:

    status                                                  error
    UNAVAILABLE, UNKNOWN, INTERNAL, ABORTED, CANCELLED,     BrokerUnavailableError
    DATA_LOSS, UNIMPLEMENTED; a broken stream; closed
    DEADLINE_EXCEEDED; no answer within timeout_s           OffloadDeadlineError
    RESOURCE_EXHAUSTED (a shed)                             ShedError(retry_after_ms)
    INVALID_ARGUMENT, UNAUTHENTICATED, PERMISSION_DENIED,   RejectedError(code=status name)
    NOT_FOUND, FAILED_PRECONDITION, OUT_OF_RANGE, ...

A shed's retry-after hint comes from the stream's WindowError.retry_after_ms or, for unary calls,
from the trailing metadata `x-splitsense-retry-after-ms` (or gRPC's own `grpc-retry-pushback-ms`).

Streaming: one long-lived OffloadStream per device carries every window; several may be in flight
at once (answers are matched by window id, in any order). If the stream breaks, every window in
flight on it fails with the mapped error at once and the next offload opens a new stream. A
broker without OffloadStream (UNIMPLEMENTED) is remembered, and windows go by unary calls from then
on (the window that found out is retried by unary within its own deadline).

Connections that go away: the transport follows its channel's connectivity. When the channel
leaves READY (the broker's GOAWAY at broker.max_connection_age_s, a broker stopping, or one that
died), the stream is retired: no new window goes on it, it is half-closed (the broker answers the
windows it read, then ends it OK), and the next window opens a new stream, on the connection the
load-balancing policy picks now (another broker, perhaps); the plan watch moves the same way. A
window the stream never answers because the stream ended (OK, or UNAVAILABLE once its connection
went away: a broker killed, or its max-age grace ran out) is sent once more on a new stream if its
deadline allows, so it is answered by a broker rather than finished on the device; it is not
counted as a failure then. It can only be answered once: its answer is awaited on one stream at a
time (the dead one's reader has ended), keyed by window id. A stream the broker aborts with a
status on a live connection (UNAVAILABLE "replica died") fails its windows as before.

Several brokers: the address may be any gRPC target, e.g. `ipv4:10.0.0.1:50051,10.0.0.2:50051` or
`dns:///brokers.example:50051` (a name with several A records), and `load_balancing` picks gRPC's
client-side policy through the channel's service config (`lb_service_config`):

- "pick_first" (edge.lb_policy's default): the device connects to one broker, chosen at random
  (the addresses of an `ipv4:`/`ipv6:` list are shuffled per transport, a resolved name's by gRPC's
  shuffleAddressList), and moves to the next one when that broker goes away. A device's traffic is
  one long-lived stream, so this is what spreads a fleet evenly: measured here, 32 channels
  starting together split 11/21 over two brokers.
- "round_robin": a connection to every broker and calls spread over the ready ones, with gRPC's
  client-side health checking (a broker that reports NOT_SERVING leaves the rotation). It spreads
  calls, not streams: a stream goes to the first broker whose connection is ready, so 32 channels
  starting together all put their streams on one broker (and a fleet reconnecting after an outage
  would too). For unary devices (edge.use_stream false).

When a broker dies, the windows in flight on its stream are sent again on a new stream, which
pick_first places on the next broker that answers (within each window's deadline; with no broker
left they fail with BrokerUnavailableError and the runtime finishes them locally).

Authentication is call metadata on every call: `authorization: Bearer <token>` and
`x-splitsense-device-id: <device id>` (constants of splitsense/wire.py, shared with cloud/auth.py).
`channel_credentials(edge_config)` makes the channel TLS (edge.tls_ca_file), presenting the
device's certificate for mutual TLS (edge.tls_cert_file/tls_key_file, CN = the device id).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
from collections.abc import AsyncIterator, Sequence
from typing import Any, Protocol

import grpc
import grpc.aio

from splitsense import wire
from splitsense.config import EdgeConfig, read_pem
from splitsense.errors import (
    BrokerUnavailableError,
    ConfigError,
    OffloadDeadlineError,
    OffloadError,
    RejectedError,
    ShedError,
    WireError,
)
from splitsense.plan import PlanSet
from splitsense.v1 import offload_pb2 as pb
from splitsense.v1 import offload_pb2_grpc as pb_grpc
from splitsense.wire import AUTH_METADATA_KEY, DEVICE_ID_METADATA_KEY, RETRY_AFTER_METADATA_KEY

__all__ = [
    "AUTH_METADATA_KEY",
    "DEVICE_ID_METADATA_KEY",
    "LB_POLICIES",
    "GrpcTransport",
    "OffloadTransport",
    "channel_credentials",
    "error_from_status",
    "lb_service_config",
    "shuffled_target",
]

log = logging.getLogger(__name__)

RETRY_AFTER_METADATA_KEYS = (RETRY_AFTER_METADATA_KEY, "grpc-retry-pushback-ms")

_UNAVAILABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.DATA_LOSS,
        grpc.StatusCode.UNIMPLEMENTED,
    }
)
_STATUS_BY_NUMBER = {c.value[0]: c for c in grpc.StatusCode}
_STATUS_WAIT_S = 1.0  # how long a failed write waits for the call's final status
# The details gRPC core gives a call its server's max-age grace cut off (round_robin keeps the
# channel READY through the other brokers' connections, so the channel's state cannot say it).
_MAX_AGE_DETAILS = "max connection age"
_CORE_INTERNAL = "Internal error from Core"  # gRPC core's status for a call that ended under a write
_STREAM_ATTEMPTS = 3  # streams one window may try: at most one resend, the others never got it


class OffloadTransport(Protocol):
    """What the edge runtime needs from the cloud. Every method raises OffloadError subclasses."""

    async def offload(self, request: wire.OffloadRequest, timeout_s: float) -> wire.OffloadResponse:
        """Have the cloud finish one window; an answer or an error within `timeout_s`."""
        ...

    async def get_plan(
        self, device_class: str, models: Sequence[str] = (), known_version: int = 0, timeout_s: float = 5.0
    ) -> PlanSet | None:
        """The newest plan set, or None when the device's `known_version` is current (or none exists)."""
        ...

    def watch_plans(
        self, device_class: str, models: Sequence[str] = (), known_version: int = 0
    ) -> AsyncIterator[PlanSet]:
        """Every plan set newer than `known_version`, as it is published; ends with an error."""
        ...

    async def report_telemetry(self, report: wire.TelemetryReport, timeout_s: float = 5.0) -> wire.TelemetryAck:
        """Push one telemetry report; returns the broker's answer: the newest plan version it
        knows, and how long it took to handle the report (when it says)."""
        ...

    async def close(self) -> None: ...


def error_from_status(code: grpc.StatusCode, details: str, retry_after_ms: float = 0.0) -> OffloadError:
    """The error of our tree for a gRPC status (never OK)."""
    text = f"{code.name}: {details}" if details else code.name
    if code is grpc.StatusCode.RESOURCE_EXHAUSTED:
        return ShedError(f"broker shed the window ({text})", retry_after_ms=max(0.0, retry_after_ms))
    if code is grpc.StatusCode.DEADLINE_EXCEEDED:
        return OffloadDeadlineError(f"no answer in time ({text})")
    if code in _UNAVAILABLE:
        return BrokerUnavailableError(f"broker unavailable ({text})")
    return RejectedError(f"broker rejected the window ({text})", code=code.name)


def _retry_after_ms(metadata: Any) -> float:
    for key, value in metadata or ():
        if key in RETRY_AFTER_METADATA_KEYS:
            try:
                return max(0.0, float(value))
            except (TypeError, ValueError):
                return 0.0
    return 0.0


def _from_rpc_error(e: grpc.aio.AioRpcError) -> OffloadError:
    return error_from_status(e.code(), e.details() or "", _retry_after_ms(e.trailing_metadata()))


def _from_window_error(e: wire.WindowError) -> OffloadError:
    code = _STATUS_BY_NUMBER.get(e.code, grpc.StatusCode.UNKNOWN)
    return error_from_status(code, e.message, float(e.retry_after_ms))


class _StreamUnsupported(BrokerUnavailableError):
    """The broker answered OffloadStream with UNIMPLEMENTED: use unary calls."""


class _StreamEnded(BrokerUnavailableError):
    """The stream ended, or its connection went away, before this window was answered: the window
    may go once more on a new stream."""


class _NotSent(_StreamEnded):
    """The stream was broken or retired before this window was written: it goes on the next one."""


class _Stream:
    """One open OffloadStream call, its reader and the windows waiting on it."""

    def __init__(self, call: Any, connection: int) -> None:
        self.call = call
        self.pending: dict[str, asyncio.Future[wire.OffloadResponse]] = {}
        self.write_lock = asyncio.Lock()
        self.broken = False
        self.retired = False  # half-closed: its windows are answered on it, no new one goes on it
        self.connection = connection  # GrpcTransport._connection when it was opened
        self.reader: asyncio.Task[None] | None = None
        self.error: OffloadError | None = None  # the reader's verdict once the call ended

    def fail_all(self, error: BaseException) -> None:
        self.broken = True
        for fut in self.pending.values():
            if not fut.done():
                fut.set_exception(error)
        self.pending.clear()


LB_POLICIES = ("pick_first", "round_robin")


def lb_service_config(policy: str, health_check: bool = True, shuffle: bool = True) -> str:
    """The channel's service config (JSON) for a load-balancing policy. pick_first shuffles the
    addresses a name resolves to (gRFC A62 shuffleAddressList) unless `shuffle` is False;
    round_robin, with `health_check`, uses gRPC's client-side health checking of the server's
    overall health (service name "")."""
    if policy not in LB_POLICIES:
        raise ConfigError(f"load balancing policy must be one of {LB_POLICIES}, got {policy!r}")
    config: dict[str, Any] = {"loadBalancingConfig": [{policy: {"shuffleAddressList": shuffle}}]}
    if policy == "round_robin":
        config["loadBalancingConfig"] = [{policy: {}}]
        if health_check:
            config["healthCheckConfig"] = {"serviceName": ""}
    return json.dumps(config)


def shuffled_target(target: str, rng: random.Random | None = None) -> str:
    """`target` with the addresses of an `ipv4:`/`ipv6:` list in a random order (any other target
    as it is). A device's stream lives long and round_robin places it on the first broker whose
    connection is ready, which is the first one dialled: without shuffling, every device of a fleet
    would start on the first broker of the list."""
    scheme, sep, rest = target.partition(":")
    if scheme not in ("ipv4", "ipv6") or not sep or "," not in rest:
        return target
    addresses = rest.split(",")
    (rng or random.Random()).shuffle(addresses)
    return f"{scheme}:{','.join(addresses)}"


def channel_credentials(config: EdgeConfig) -> grpc.ChannelCredentials | None:
    """TLS credentials for `GrpcTransport(tls=...)` from the edge config; None: plaintext.

    Trusts only edge.tls_ca_file (the CA of the broker's certificate), and presents
    edge.tls_cert_file/tls_key_file when given (mutual TLS). ConfigError, naming the key, for a
    file that cannot be read, and for plaintext to a broker that is not on loopback unless
    edge.allow_plaintext (the token would cross the network in the clear)."""
    problem = config.exposure_problem()
    if problem is not None:
        raise ConfigError(problem)
    if config.tls_ca_file is None:
        return None
    ca = read_pem(config.tls_ca_file, "edge.tls_ca_file")
    cert = key = None
    if config.tls_cert_file is not None and config.tls_key_file is not None:
        cert = read_pem(config.tls_cert_file, "edge.tls_cert_file")
        key = read_pem(config.tls_key_file, "edge.tls_key_file")
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)


class GrpcTransport:
    """OffloadTransport over one grpc.aio channel (created on first use, in the running loop)."""

    def __init__(
        self,
        address: str,
        token: str,
        *,
        device_id: str | None = None,
        use_stream: bool = True,
        max_message_bytes: int = 1 << 20,
        tls: grpc.ChannelCredentials | None = None,
        reconnect_backoff_max_ms: int = 1000,
        channel_options: Sequence[tuple[str, Any]] = (),
        load_balancing: str | None = None,
        shuffle_addresses: bool = True,
    ) -> None:
        """`reconnect_backoff_max_ms` caps the channel's own reconnect back-off: the circuit breaker
        decides when to try the cloud again, and the channel must then be ready to connect, not
        still waiting out a back-off of its own (gRPC's default grows to 120 s).

        `load_balancing` ("round_robin" or "pick_first", edge.lb_policy) sets the channel's policy
        over the addresses `address` resolves to, with client-side health checking; None leaves
        gRPC's default (pick_first, no health checking). With a policy, the addresses of an `ipv4:`
        or `ipv6:` list, and under pick_first those a name resolves to, are dialled in a random
        order unless `shuffle_addresses` is False (tests that place devices on purpose)."""
        if not address or not isinstance(address, str):
            raise ConfigError(f"broker address must be 'host:port', got {address!r}")
        if max_message_bytes < 1:
            raise ValueError(f"max_message_bytes must be >= 1, got {max_message_bytes}")
        if load_balancing is not None and shuffle_addresses:
            address = shuffled_target(address)
        self.address = address
        self.use_stream = use_stream
        self.max_message_bytes = max_message_bytes
        self._metadata: tuple[tuple[str, str], ...] = ((AUTH_METADATA_KEY, f"Bearer {token}"),)
        if device_id:
            self._metadata += ((DEVICE_ID_METADATA_KEY, device_id),)
        self._tls = tls
        self._options = [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.initial_reconnect_backoff_ms", min(1000, reconnect_backoff_max_ms)),
            ("grpc.max_reconnect_backoff_ms", reconnect_backoff_max_ms),
            *channel_options,
        ]
        if load_balancing is not None:
            service_config = lb_service_config(load_balancing, shuffle=shuffle_addresses)
            self._options.append(("grpc.service_config", service_config))
        self._channel: grpc.aio.Channel | None = None
        self._offload_stub: pb_grpc.OffloadServiceStub | None = None
        self._plan_stub: pb_grpc.PlanServiceStub | None = None
        self._stream: _Stream | None = None
        self._retired: set[_Stream] = set()  # half-closed streams whose windows are still answered
        self._stream_supported = True
        self._closed = False
        # The channel's connections lost so far (it left READY), and what the plan watch waits on
        self._connection = 0
        self._connection_lost = asyncio.Event()
        self._follower: asyncio.Task[None] | None = None
        # OffloadStreams opened so far: a call that opened one paid its set-up (and the channel's
        # connection, if it was the first), so the runtime does not time the link by it
        self.streams_opened = 0
        self.windows_resent = 0  # windows sent again after their stream ended without answering

    # --- channel ----------------------------------------------------------------------------

    def _stubs(self) -> tuple[pb_grpc.OffloadServiceStub, pb_grpc.PlanServiceStub]:
        if self._closed:
            raise BrokerUnavailableError("transport is closed")
        if self._channel is None:
            if self._tls is None:
                self._channel = grpc.aio.insecure_channel(self.address, options=self._options)
            else:
                self._channel = grpc.aio.secure_channel(self.address, self._tls, options=self._options)
            self._offload_stub = pb_grpc.OffloadServiceStub(self._channel)
            self._plan_stub = pb_grpc.PlanServiceStub(self._channel)
            self._follower = asyncio.ensure_future(self._follow(self._channel))
        assert self._offload_stub is not None and self._plan_stub is not None
        return self._offload_stub, self._plan_stub

    async def connect(self, timeout_s: float) -> bool:
        """Open the channel and wait, at most `timeout_s`, for its connection to be READY, as a
        device does when it boots, before its first window; False if it is not ready by then (calls
        connect on their own later, as they always do)."""
        self._stubs()
        assert self._channel is not None
        try:
            await asyncio.wait_for(self._channel.channel_ready(), timeout=max(timeout_s, 0.0))
        except TimeoutError:
            return False
        return True

    async def _follow(self, channel: grpc.aio.Channel) -> None:
        """Follow the channel's connectivity: each time it leaves READY, its connection is gone or
        going (a GOAWAY, a broker stopping or dead) and the next calls get a new one."""
        ready = grpc.ChannelConnectivity.READY
        try:
            state = channel.get_state(try_to_connect=False)
            while True:
                await channel.wait_for_state_change(state)
                new = channel.get_state(try_to_connect=False)
                if state is ready and new is not ready:
                    self._lost_connection()
                state = new
        except Exception as e:  # e.g. the channel closed under it: streams then just break as they did
            log.debug("stopped following the channel to %s: %s: %s", self.address, type(e).__name__, e)

    def _lost_connection(self) -> None:
        self._connection += 1
        self._connection_lost.set()
        self._connection_lost = asyncio.Event()
        stream = self._stream
        if stream is not None and not stream.broken and not self._closed:
            log.debug("connection to %s left READY: moving the offload stream to a new one", self.address)
            self._retire(stream)
            # Open the next one now: the next window finds it connected (a new connection and
            # stream cost a window ~2x its usual time here, enough to be hedged as late).
            try:
                self._open_stream()
            except Exception as e:  # the next window opens it then
                log.debug("opening the next offload stream to %s: %s: %s", self.address, type(e).__name__, e)

    def _retire(self, stream: _Stream) -> None:
        """No new window on `stream`; half-close it, so that the broker answers what it read and
        ends it. The next window opens a new stream."""
        if self._stream is stream:
            self._stream = None
        if stream.retired or stream.broken:
            return
        stream.retired = True
        self._retired.add(stream)
        task = asyncio.ensure_future(self._half_close(stream))
        task.add_done_callback(_consume_exception)

    async def _half_close(self, stream: _Stream) -> None:
        async with stream.write_lock:
            if stream.broken:
                return
            try:
                await stream.call.done_writing()
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError, grpc.aio.UsageError) as e:
                log.debug("half-closing a retired offload stream: %s", e)  # its reader ends it

    def _connection_gone(self, stream: _Stream) -> bool:
        """Whether `stream`'s connection went away: retired, or the channel left READY since."""
        if stream.retired or stream.connection != self._connection:
            return True
        channel = self._channel
        return channel is None or channel.get_state(try_to_connect=False) is not grpc.ChannelConnectivity.READY

    async def close(self) -> None:
        self._closed = True
        stream, self._stream = self._stream, None
        streams = [s for s in (stream, *self._retired) if s is not None]
        self._retired.clear()
        for s in streams:
            s.fail_all(BrokerUnavailableError("transport closed"))
            s.call.cancel()
            if s.reader is not None:
                s.reader.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await s.reader
        if self._follower is not None:
            self._follower.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._follower
            self._follower = None
        if self._channel is not None:
            await self._channel.close()
            self._channel = None

    # --- offload ----------------------------------------------------------------------------

    async def offload(self, request: wire.OffloadRequest, timeout_s: float) -> wire.OffloadResponse:
        msg = wire.to_pb(request)  # offload_message checks the deadline and the size
        return await self.offload_message(request.window_id, msg, msg.ByteSize(), timeout_s)

    async def offload_message(
        self, window_id: str, msg: pb.OffloadRequest, size: int, timeout_s: float
    ) -> wire.OffloadResponse:
        """`offload` of a request already on the wire (`size`: its ByteSize): for a wrapper that
        built the message to measure it (simulators/link.py's ShapedTransport)."""
        if not timeout_s > 0:
            raise OffloadDeadlineError(f"window {window_id}: no time left before its deadline")
        if size > self.max_message_bytes:
            raise RejectedError(
                f"window {window_id}: request is {size} bytes, over the "
                f"{self.max_message_bytes}-byte message limit; choose a later cut or a smaller codec",
                code="INVALID_ARGUMENT",
            )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        if self.use_stream and self._stream_supported:
            try:
                return await self._offload_stream(window_id, msg, timeout_s)
            except _StreamUnsupported:
                log.info("broker at %s has no OffloadStream; using unary calls", self.address)
        return await self._offload_unary(window_id, msg, deadline - loop.time())

    async def _offload_unary(self, window_id: str, msg: pb.OffloadRequest, timeout_s: float) -> wire.OffloadResponse:
        if not timeout_s > 0:
            raise OffloadDeadlineError(f"window {window_id}: no time left before its deadline")
        stub, _ = self._stubs()
        try:
            resp = await stub.Offload(msg, timeout=timeout_s, metadata=self._metadata)
        except grpc.aio.AioRpcError as e:
            raise _from_rpc_error(e) from None
        return self._checked(window_id, resp)

    @staticmethod
    def _checked(window_id: str, resp: pb.OffloadResponse) -> wire.OffloadResponse:
        try:
            out = wire.from_pb(resp)
        except WireError as e:
            raise BrokerUnavailableError(f"window {window_id}: malformed answer from the broker: {e}") from None
        if out.window_id != window_id:
            raise BrokerUnavailableError(f"window {window_id}: the broker answered for window {out.window_id!r}")
        return out

    async def _offload_stream(self, window_id: str, msg: pb.OffloadRequest, timeout_s: float) -> wire.OffloadResponse:
        """One window on the stream; sent once more on a new stream if the stream ended before
        answering it (_StreamEnded) and its deadline leaves time; one the stream never got (it broke
        or was retired first) simply goes on the next stream."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        left_s, resent = timeout_s, False
        for attempt in range(1, _STREAM_ATTEMPTS + 1):
            try:
                return await self._stream_attempt(window_id, msg, left_s)
            except _StreamEnded as e:
                sent = not isinstance(e, _NotSent)
                left_s = deadline - loop.time()
                if not left_s > 0 or (sent and resent) or attempt == _STREAM_ATTEMPTS:
                    raise
                if sent:
                    resent = True
                    self.windows_resent += 1
                log.debug("window %s: %s; sending it on a new stream (%.0f ms left)", window_id, e, left_s * 1000)
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def _stream_attempt(self, window_id: str, msg: pb.OffloadRequest, timeout_s: float) -> wire.OffloadResponse:
        stream = self._open_stream()
        if any(window_id in s.pending for s in (stream, *self._retired)):
            raise RejectedError(f"window {window_id} is already in flight on this stream", code="ALREADY_EXISTS")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[wire.OffloadResponse] = loop.create_future()
        stream.pending[window_id] = fut
        # The write runs in its own task: a write cancelled half-way cancels the whole call in
        # grpc.aio, so a window's deadline must not cancel it; a late write only makes a late answer.
        # The window waits on its answer alone: a failed write fails it through `fut` too (the
        # stream breaks and fails every window on it, or, not sent, `_write` fails this one), and
        # so does its deadline (a timer, not a cancellation of this task).
        write = asyncio.ensure_future(self._write(stream, pb.OffloadStreamRequest(request=msg), fut))
        write.add_done_callback(_consume_exception)
        timer = loop.call_later(timeout_s, _expire, fut, window_id, timeout_s)
        try:
            return await fut
        finally:
            timer.cancel()
            stream.pending.pop(window_id, None)
            if not fut.done():
                fut.cancel()
            elif not fut.cancelled():
                fut.exception()  # seen: the error that reached the caller came from the write

    async def _write(
        self, stream: _Stream, req: pb.OffloadStreamRequest, fut: asyncio.Future[wire.OffloadResponse]
    ) -> None:
        """Write one window on `stream`; on failure, `fut` (its answer) gets the error."""
        async with stream.write_lock:
            not_sent = None
            if stream.broken:
                not_sent = _NotSent("the offload stream broke before this window was sent")
            elif stream.retired:  # the others on it are still answered: it is not broken
                not_sent = _NotSent("the offload stream was retired (its connection left) before this window was sent")
            if not_sent is not None:
                if not fut.done():
                    fut.set_exception(not_sent)
                return
            try:
                await stream.call.write(req)
            except grpc.aio.AioRpcError as e:
                err = await self._write_error(stream, e)
            except (asyncio.InvalidStateError, grpc.aio.UsageError) as e:
                err = await self._write_error(stream, None, f"the offload stream is closed ({e})")
            else:
                return
        # A failed write may still have reached the broker: this window counts as sent, like the
        # others on the stream (no answer can come twice: the stream's reader is done with them).
        self._break(stream, err)  # fails every window waiting on it, this one included
        if not fut.done():
            fut.set_exception(err)

    def _open_stream(self) -> _Stream:
        if self._stream is not None and not self._stream.broken:
            return self._stream
        stub, _ = self._stubs()
        stream = _Stream(stub.OffloadStream(metadata=self._metadata), self._connection)
        stream.reader = asyncio.ensure_future(self._read(stream))
        self._stream = stream
        self.streams_opened += 1
        return stream

    async def _write_error(self, stream: _Stream, e: grpc.aio.AioRpcError | None, closed: str = "") -> OffloadError:
        """The error of a failed write: the call's own final status when the broker ended the
        stream (a write racing the broker's refusal fails with a generic INTERNAL "Internal error
        from Core", while the call's status says why, e.g. UNAUTHENTICATED), else the write's.
        `e` None: the call had finished already (`closed` says so) and only its status tells.
        The reader's verdict comes first (it read the status the call ended with); gRPC core's
        generic INTERNAL is a stream that ended under the window (`_status_error`): sent once more."""
        with contextlib.suppress(Exception):
            async with asyncio.timeout(_STATUS_WAIT_S):  # one wait: the reader ends with the call
                if stream.reader is not None:
                    await asyncio.wait({stream.reader})
                if stream.error is not None:
                    return stream.error
                code = await stream.call.code()
                details = await stream.call.details()
            if code is not None and code is not grpc.StatusCode.OK and (e is None or code is not e.code()):
                metadata = await stream.call.trailing_metadata()
                return self._status_error(stream, code, details or "", _retry_after_ms(metadata))
            if code is grpc.StatusCode.OK:
                return _StreamEnded(f"the broker ended the offload stream ({closed or 'OK'})")
        if e is None:
            return BrokerUnavailableError(closed)
        return self._stream_error(stream, e)

    def _stream_error(self, stream: _Stream, e: grpc.aio.AioRpcError) -> OffloadError:
        return self._status_error(stream, e.code(), e.details() or "", _retry_after_ms(e.trailing_metadata()))

    def _status_error(self, stream: _Stream, code: grpc.StatusCode, details: str, retry_ms: float) -> OffloadError:
        """The error for the windows of a stream that ended with `code`: UNAVAILABLE once its
        connection went away (or its max-age grace ran out) is _StreamEnded, sent again."""
        if code is grpc.StatusCode.UNIMPLEMENTED:
            self._stream_supported = False
            return _StreamUnsupported(f"OffloadStream is not implemented by the broker ({details})")
        if code is grpc.StatusCode.UNAVAILABLE and (_MAX_AGE_DETAILS in details or self._connection_gone(stream)):
            return _StreamEnded(f"broker unavailable (UNAVAILABLE: {details}); its connection is gone")
        if code is grpc.StatusCode.INTERNAL and _CORE_INTERNAL in details:
            # gRPC core's status for a stream that ended under a write (the broker's own status,
            # e.g. UNAUTHENTICATED, lost in the race; seen on the write and on the read alike)
            return _StreamEnded(f"the offload stream ended with no status to say why (INTERNAL: {details})")
        return error_from_status(code, details, retry_ms)

    def _break(self, stream: _Stream, error: OffloadError) -> None:
        stream.fail_all(error)
        if self._stream is stream:
            self._stream = None
        self._retired.discard(stream)
        stream.call.cancel()

    async def _read(self, stream: _Stream) -> None:
        error: OffloadError
        try:
            while True:
                msg = await stream.call.read()
                if msg is grpc.aio.EOF:  # ended OK: what it never answered, it never read
                    error = _StreamEnded("the broker closed the offload stream")
                    break
                self._deliver(stream, msg)
        except grpc.aio.AioRpcError as e:
            error = self._stream_error(stream, e)
        except asyncio.CancelledError:
            stream.fail_all(BrokerUnavailableError("transport closed"))
            raise
        except Exception as e:  # never leave windows waiting on a dead reader
            error = BrokerUnavailableError(f"offload stream reader failed: {type(e).__name__}: {e}")
        stream.error = error
        self._break(stream, error)

    @staticmethod
    def _deliver(stream: _Stream, msg: pb.OffloadStreamResponse) -> None:
        try:
            out = wire.stream_response_from_pb(msg)
        except WireError as e:
            fut = stream.pending.get(msg.window_id)
            if fut is not None and not fut.done():
                fut.set_exception(BrokerUnavailableError(f"malformed answer from the broker: {e}"))
            return
        fut = stream.pending.get(out.window_id)
        if fut is None or fut.done():
            return  # an answer after its window's deadline: the window was finished locally
        if isinstance(out, wire.OffloadResponse):
            fut.set_result(out)
        else:
            fut.set_exception(_from_window_error(out))

    # --- plans and telemetry ----------------------------------------------------------------

    async def get_plan(
        self, device_class: str, models: Sequence[str] = (), known_version: int = 0, timeout_s: float = 5.0
    ) -> PlanSet | None:
        _, stub = self._stubs()
        req = pb.GetPlanRequest(device_class=device_class, models=list(models), known_version=known_version)
        try:
            resp = await stub.GetPlan(req, timeout=timeout_s, metadata=self._metadata)
        except grpc.aio.AioRpcError as e:
            raise _from_rpc_error(e) from None
        if not resp.HasField("plan_set"):
            return None
        return _plan_set(resp.plan_set)

    async def watch_plans(
        self, device_class: str, models: Sequence[str] = (), known_version: int = 0
    ) -> AsyncIterator[PlanSet]:
        """The plan watch; when its connection goes away (the channel leaves READY) or its max-age
        grace runs out, it is opened again on the next connection from the newest version seen."""
        known = known_version
        while True:
            _, stub = self._stubs()
            lost = self._connection_lost
            req = pb.WatchPlanRequest(device_class=device_class, models=list(models), known_version=known)
            call = stub.WatchPlan(req, metadata=self._metadata)
            try:
                while True:
                    resp = await _read_unless(call, lost)
                    if resp is None:
                        log.debug("connection to %s left READY: moving the plan watch to a new one", self.address)
                        break
                    if resp is grpc.aio.EOF:
                        raise BrokerUnavailableError("the broker ended the plan watch")
                    if resp.HasField("plan_set"):
                        plan_set = _plan_set(resp.plan_set)
                        known = max(known, plan_set.version)
                        yield plan_set
            except grpc.aio.AioRpcError as e:
                if not (e.code() is grpc.StatusCode.UNAVAILABLE and _MAX_AGE_DETAILS in (e.details() or "")):
                    raise _from_rpc_error(e) from None
                log.debug("the plan watch's connection reached its max age: watching again")
            finally:
                call.cancel()

    async def report_telemetry(self, report: wire.TelemetryReport, timeout_s: float = 5.0) -> wire.TelemetryAck:
        return await self.report_message(wire.to_pb(report), timeout_s)

    async def report_message(self, msg: pb.ReportTelemetryRequest, timeout_s: float = 5.0) -> wire.TelemetryAck:
        """`report_telemetry` of a report already on the wire (as `offload_message`)."""
        stub, _ = self._stubs()
        try:
            resp = await stub.ReportTelemetry(msg, timeout=timeout_s, metadata=self._metadata)
        except grpc.aio.AioRpcError as e:
            raise _from_rpc_error(e) from None
        try:
            return wire.from_pb(resp)
        except WireError as e:
            raise BrokerUnavailableError(f"malformed answer to a telemetry report from the broker: {e}") from None


_MAX_PLAN_SETS = 256
_plan_sets: dict[bytes, PlanSet] = {}  # a plan set's wire bytes -> the PlanSet they decode to


def _plan_set(msg: pb.PlanSet) -> PlanSet:
    """The PlanSet of a message from the broker. Decoded once per distinct message in a process:
    every device of a class gets the same bytes at each publication (a simulated fleet holds
    thousands in one process), and a PlanSet is immutable, so they share one."""
    key = msg.SerializeToString()
    out = _plan_sets.get(key)
    if out is not None:
        return out
    try:
        out = wire.from_pb(msg)
    except WireError as e:
        raise BrokerUnavailableError(f"malformed plan set from the broker: {e}") from None
    if len(_plan_sets) >= _MAX_PLAN_SETS:
        _plan_sets.clear()
    _plan_sets[key] = out
    return out


async def _read_unless(call: Any, lost: asyncio.Event) -> Any:
    """The call's next message, or None (the read cancelled) once `lost` is set."""
    if lost.is_set():
        return None
    read = asyncio.ensure_future(call.read())
    waiter = asyncio.ensure_future(lost.wait())
    try:
        await asyncio.wait({read, waiter}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
        if not read.done():
            read.cancel()  # cancels the call too (grpc.aio); the caller opens the next one
            read.add_done_callback(_consume_exception)
    return read.result() if read.done() and not read.cancelled() else None


def _expire(fut: asyncio.Future[Any], window_id: str, timeout_s: float) -> None:
    """A window's deadline: its answer fails with OffloadDeadlineError unless it came."""
    if not fut.done():
        fut.set_exception(
            OffloadDeadlineError(f"window {window_id}: no answer within its deadline of {timeout_s * 1000:.0f} ms")
        )


def _consume_exception(task: asyncio.Future[Any]) -> None:
    """Mark a background write's exception as seen (its window already got the error)."""
    if not task.cancelled():
        task.exception()
