"""Userspace, trace-driven link emulation between a device and the broker.

The kernel here has no ``netem``, so the device's uplink is a TCP proxy in asyncio: a device dials
``link.address`` instead of the broker, and every byte it sends is held back the way the trace's
link would hold it. The gRPC client and the broker are unchanged (the same seam a real uplink uses).

Two halves, as everywhere in splitsense: the decision is pure and tested without sockets, the I/O
wraps it.

* Pure: :class:`ShapingSchedule` maps wall-clock seconds since the link started to the trace's
  capacity (time offset, time compression, bandwidth scale, scripted outages) and answers
  ``bytes_between(t0, t1)`` and ``time_to_send(nbytes, now)``; :class:`TokenBucket` queues
  transfers on it FIFO; :func:`retransmission_delay_s` is the loss model;
  :func:`slow_start_release_s`, :func:`burst_completion_s` and :class:`SlowStart` are the slow-start
  model, and ``ShapingSchedule.time_to_deliver`` applies it to the trace.
* Pure, too: :class:`LinkDirection` runs one direction of one connection through the proxy's steps
  on virtual time, for a message written at once: when its last byte arrives.
* I/O: :class:`LinkEmulator` is the proxy; :class:`ShapedTransport` is the inline link
  (``simulator.link: inline``, below).

How each impairment is emulated (and why):

bandwidth  Each direction reads at most one *quantum* (about ``quantum_s`` of link time, 1500 B to
           16 KiB) from its source, reserves it on its :class:`TokenBucket` and sleeps until the
           bucket says the bytes have been serialised. No per-byte Python: one read, one sleep and
           one write per chunk. The bucket is a virtual clock: a chunk starts when the previous
           one finished if that was at most ``catch_up_s`` ago (a sender that woke up late: its
           lateness costs no capacity), else now (an idle link gives no head start, so a lone
           message pays its full serialisation time).
delay      Every chunk is delivered ``rtt_ms / 2`` after it was serialised, in each direction;
           chunks are pipelined, so delay does not cut throughput. The TCP handshake with the
           proxy is local, so connection set-up itself pays no RTT; the first bytes (for gRPC, the
           HTTP/2 preface and SETTINGS exchange) do.
loss       TCP never loses bytes, it resends them. A chunk of ``n`` bytes spans ``ceil(n / 1448)``
           segments; with segment loss probability ``loss`` at least one is lost with probability
           ``1 - (1 - loss) ** segments``, and then the chunk (and, in order, everything behind it:
           head-of-line blocking) arrives one retransmission timeout later. The RTO is ``rto_ms``,
           by default ``max(200 ms, 2 * rtt)`` (Linux's minimum RTO is 200 ms). Congestion-window
           effects of loss on throughput are not modelled.
outages    Scripted ``(start_s, end_s)`` windows, in wall seconds since the link started, plus
           :meth:`LinkEmulator.set_outage` at run time. A real outage (coverage hole, tunnel) does
           not reset connections: packets just stop. So during an outage no byte passes in either
           direction, existing connections stall, and new connections are accepted by the proxy
           but black-holed (nothing is forwarded, the upstream is not even dialled) until the
           outage ends. Callers see their deadlines fire (gRPC DEADLINE_EXCEEDED), as on a real
           phone, not an instant connection refusal. When the outage ends, traffic resumes.
slow start A TCP sender does not fill the link at once: its congestion window starts at IW = 10
           segments (RFC 6928) and, with no loss, doubles every RTT (RFC 5681 slow start). Linux
           (``tcp_slow_start_after_idle=1``, the default) shrinks it back when the send side has
           been idle for longer than one RTO (RFC 2861, RFC 7661; Linux halves it per idle RTO down
           to IW, the emulator resets it to IW at once, as RFC 5681 4.1 does). So each direction of
           each connection counts *bursts*: bytes that arrive when nothing is in flight and the
           last byte left more than one RTO ago start one, and the byte at offset ``o`` of a burst
           leaves no sooner than ``start + slow_start_release_s(o, rtt)`` (round ``k``, of
           ``IW * 2**k`` segments, starts ``k * rtt`` after the burst). A chunk is split where a
           round ends and each part is held until its round, then shaped as above, so a lone
           transfer takes :func:`burst_completion_s` plus the one-way delay. Bytes that arrive later
           in a burst (less than an RTO after the previous ones left) count on from its start: the
           rounds that passed are credited to them (Linux would not grow the window of a sender that
           did not fill it). Both directions, shaped or not; ``slow_start=False`` turns it off.
time       ``time_offset_s`` is the trace time at which the link starts (200 devices can start at
           200 places of a trace); ``time_scale`` is trace seconds per wall second (2.0 replays the
           trace twice as fast, at the trace's own Mbit/s); ``bandwidth_scale`` multiplies Mbit/s.

The inline link (``simulator.link: "inline"``; "proxy", the default, is the proxy above). For a
large fleet the proxy costs more than the devices: every message crosses loopback twice more and is
copied through asyncio streams in its four tasks per connection. :class:`ShapedTransport` wraps the
device's own transport (a GrpcTransport that dials the broker directly) and, per call, holds the
request until :class:`LinkDirection` says its last byte has crossed the uplink, makes the call,
then holds the answer for the downlink, within the call's deadline. The model is the proxy's, on
the same objects: bandwidth (the trace's :class:`ShapingSchedule` and a :class:`TokenBucket` per
direction, chunked by the same quantum), delay (``rtt / 2`` each way), loss (the same draw per
chunk, head-of-line blocking included), slow start (a :class:`SlowStart` per direction: a device
has one gRPC connection) and outages (nothing is read or serialised during one, and what would
arrive in one waits for its end: a call runs into its deadline, as through the stalled proxy).
Telemetry reports, the device's ping (GetPlan) and the plan watch (its request up, each plan set
down) are shaped as well. A call's bytes are its message's size plus the framing and control bytes
a call was measured to cost through the proxy (``STREAM_CALL_BYTES``, ``UNARY_CALL_BYTES``).

What inline does not model, against the proxy: bytes that belong to no call (HTTP/2 PINGs,
WINDOW_UPDATEs and SETTINGS between calls, keepalives, the connection preface) do not queue on the
link; a connection's and a stream's set-up cost nothing (through the proxy a device's first stream
call took ~0.6 RTT more: the device never takes that call as a link sample); a request whose
deadline passes while it is still on the link never reaches the broker (through the proxy it would,
and its late answer would be dropped); TCP's own behaviour beyond the model (its real windows,
Nagle, the loopback hop, now unshaped, ~0.1 ms) is absent either way. Measured on real gRPC calls,
both take the same time to within ~2 ms (tests/integration/simulators/test_link.py). What it saves,
measured on `simulate --scenario scale --devices 1000` (2 shards, 2 cores): the shards' CPU per
window falls from 2.6 ms through the proxies to 1.9 ms inline, the whole run's (cloud included)
from 5.8 to 4.9 ms, kernel time from 14% to 12% of it (README, "Scaling out").
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import TypeVar

from edge.transport import OffloadTransport
from pipelines.tcp import INITIAL_WINDOW_SEGMENTS as TCP_INITIAL_WINDOW_SEGMENTS
from pipelines.tcp import (
    TCP_MIN_RTO_S,
    TCP_MSS_BYTES,
    burst_completion_s,
    check_window,
    default_rto_s,
    round_first_byte,
    round_of,
    slow_start_release_s,
    slow_start_rounds,
)
from simulators.traces import Trace
from splitsense import wire
from splitsense.errors import ConfigError, OffloadDeadlineError, OffloadError
from splitsense.plan import PlanSet
from splitsense.v1 import offload_pb2 as pb

__all__ = [
    "STREAM_CALL_BYTES",
    "UNARY_CALL_BYTES",
    "LinkCounters",
    "LinkDirection",
    "LinkEmulator",
    "ShapedTransport",
    "ShapingSchedule",
    "SlowStart",
    "TokenBucket",
    "TCP_INITIAL_WINDOW_SEGMENTS",
    "TCP_MIN_RTO_S",
    "TCP_MSS_BYTES",
    "burst_completion_s",
    "check_link",
    "default_rto_s",
    "link_schedules",
    "merge_outages",
    "outage_end",
    "retransmission_delay_s",
    "slow_start_release_s",
]

BYTES_PER_MBIT = 1e6 / 8
MIN_CHUNK_BYTES = 1500  # one packet
MAX_CHUNK_BYTES = 16 * 1024
_WAITED_S = 0.001  # a read that took longer than this waited for its bytes
_QUEUE_CHUNKS = 4096  # chunks in flight per direction and connection (delay x rate / chunk)

Outage = tuple[float, float]
_T = TypeVar("_T")
_MAX_SIZES = 256
_plan_sizes: dict[tuple[int, type], tuple[PlanSet, int]] = {}  # (id, answer type) -> (the set, bytes)


def _plan_answer_bytes(plan_set: PlanSet, answer: type[pb.GetPlanResponse] | type[pb.WatchPlanResponse]) -> int:
    """The wire size of an answer carrying `plan_set`, worked out once per plan set object: the
    devices of a class share the one their transport decoded (edge/transport.py), and each
    publication reaches them all."""
    key = (id(plan_set), answer)
    hit = _plan_sizes.get(key)
    if hit is not None and hit[0] is plan_set:
        return hit[1]
    size = answer(plan_set=wire.to_pb(plan_set)).ByteSize()
    if len(_plan_sizes) >= _MAX_SIZES:
        _plan_sizes.clear()
    _plan_sizes[key] = (plan_set, size)
    return size


def merge_outages(outages: Sequence[Outage]) -> tuple[Outage, ...]:
    """Outage windows checked, sorted and merged where they overlap or touch."""
    cleaned: list[Outage] = []
    for window in outages:
        if len(window) != 2:
            raise ConfigError(f"an outage is a (start_s, end_s) pair, got {window!r}")
        start, end = float(window[0]), float(window[1])
        if not (math.isfinite(start) and math.isfinite(end) and 0 <= start < end):
            raise ConfigError(f"outage {window!r} must satisfy 0 <= start_s < end_s (finite seconds)")
        cleaned.append((start, end))
    cleaned.sort()
    merged: list[Outage] = []
    for start, end in cleaned:
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return tuple(merged)


def outage_end(outages: Sequence[Outage], now_s: float) -> float | None:
    """End of the (merged) outage that ``now_s`` falls in, or None when the link is up."""
    for start, end in outages:
        if start <= now_s < end:
            return end
        if start > now_s:
            break
    return None


def retransmission_delay_s(nbytes: int, loss: float, rto_s: float, uniform: float) -> float:
    """Extra delay of a chunk of ``nbytes`` given one uniform draw in [0, 1).

    ``rto_s`` when at least one of its ``ceil(nbytes / TCP_MSS_BYTES)`` segments is lost (each with
    probability ``loss``), else 0. Several losses in one chunk are recovered in the same RTO.
    """
    if not 0.0 <= loss < 1.0:
        raise ConfigError(f"loss must be in [0, 1), got {loss!r}")
    if loss == 0.0 or nbytes <= 0:
        return 0.0
    segments = math.ceil(nbytes / TCP_MSS_BYTES)
    p_chunk = 1.0 - (1.0 - loss) ** segments
    return rto_s if uniform < p_chunk else 0.0


@dataclass(frozen=True)
class ShapingSchedule:
    """The capacity of one direction of the link on the wall clock (seconds since the link started)."""

    trace: Trace
    time_offset_s: float = 0.0  # trace time at wall time 0
    time_scale: float = 1.0  # trace seconds per wall second
    bandwidth_scale: float = 1.0  # multiplies the trace's Mbit/s
    outages: Sequence[Outage] = ()  # wall-time windows with no capacity; stored merged, as a tuple

    def __post_init__(self) -> None:
        if not (math.isfinite(self.time_offset_s)):
            raise ConfigError(f"time_offset_s must be finite, got {self.time_offset_s!r}")
        if not (math.isfinite(self.time_scale) and self.time_scale > 0):
            raise ConfigError(f"time_scale must be > 0 (trace seconds per wall second), got {self.time_scale!r}")
        if not (math.isfinite(self.bandwidth_scale) and self.bandwidth_scale > 0):
            raise ConfigError(f"bandwidth_scale must be > 0, got {self.bandwidth_scale!r}")
        object.__setattr__(self, "outages", merge_outages(self.outages))

    def _trace_time(self, t_s: float) -> float:
        return self.time_offset_s + self.time_scale * t_s

    def in_outage(self, t_s: float) -> bool:
        return outage_end(self.outages, t_s) is not None

    def bandwidth_at(self, t_s: float) -> float:
        """Capacity in Mbit/s at wall time ``t_s`` (0 during an outage)."""
        if self.in_outage(t_s):
            return 0.0
        return self.bandwidth_scale * self.trace.bandwidth_at(self._trace_time(t_s))

    def _raw_bytes(self, t0_s: float, t1_s: float) -> float:
        carried = self.trace.bytes_deliverable(self._trace_time(t0_s), self._trace_time(t1_s))
        return carried * self.bandwidth_scale / self.time_scale

    def _raw_finish(self, t0_s: float, nbytes: float) -> float:
        trace_bytes = nbytes * self.time_scale / self.bandwidth_scale
        t1 = self.trace.time_to_deliver(self._trace_time(t0_s), trace_bytes)
        return max((t1 - self.time_offset_s) / self.time_scale, t0_s)

    def bytes_between(self, t0_s: float, t1_s: float) -> float:
        """Bytes the link can carry between wall times ``t0_s`` and ``t1_s``, outages excluded."""
        if t1_s < t0_s:
            raise ValueError(f"bytes_between needs t0_s <= t1_s, got {t0_s} > {t1_s}")
        total = 0.0
        cursor = t0_s
        for start, end in self.outages:
            if end <= cursor:
                continue
            if start >= t1_s:
                break
            if start > cursor:
                total += self._raw_bytes(cursor, start)
            cursor = min(end, t1_s)
            if cursor >= t1_s:
                return total
        if cursor < t1_s:
            total += self._raw_bytes(cursor, t1_s)
        return total

    def time_to_send(self, nbytes: float, now_s: float) -> float:
        """Seconds from ``now_s`` until ``nbytes`` have been serialised on an otherwise idle link."""
        if not (math.isfinite(nbytes) and nbytes >= 0):
            raise ValueError(f"nbytes must be finite and >= 0, got {nbytes!r}")
        if nbytes == 0:
            return 0.0
        cursor = now_s
        remaining = float(nbytes)
        for start, end in self.outages:
            if end <= cursor:
                continue
            if start <= cursor:  # inside this outage: nothing moves until it ends
                cursor = end
                continue
            capacity = self._raw_bytes(cursor, start)
            if capacity >= remaining:
                break
            remaining -= capacity
            cursor = end
        return self._raw_finish(cursor, remaining) - now_s

    def time_to_deliver(
        self,
        nbytes: float,
        now_s: float,
        rtt_s: float,
        slow_start: bool = True,
        *,
        mss: int = TCP_MSS_BYTES,
        iw_segments: int = TCP_INITIAL_WINDOW_SEGMENTS,
    ) -> float:
        """Seconds from ``now_s`` until the last of ``nbytes`` has left the sender: a lone transfer on an
        idle link (and an idle connection: the window starts at ``iw_segments``), as the link emulator
        carries it.

        :meth:`time_to_send` with each slow-start round held until ``k * rtt_s`` after ``now_s``
        (:func:`slow_start_release_s`), serialised FIFO on the trace. The one-way delay is not
        included (the last byte arrives ``rtt_s / 2`` later). ``slow_start=False``: ``time_to_send``.
        """
        check_window(rtt_s, mss, iw_segments)
        if not slow_start or rtt_s == 0:
            return self.time_to_send(nbytes, now_s)
        if not (math.isfinite(nbytes) and nbytes >= 0):
            raise ValueError(f"nbytes must be finite and >= 0, got {nbytes!r}")
        cursor = now_s
        for k, _, size in slow_start_rounds(nbytes, mss, iw_segments):
            start = max(cursor, now_s + k * rtt_s)
            cursor = start + self.time_to_send(size, start)
        return cursor - now_s

    def quantum_bytes(self, t_s: float, quantum_s: float) -> int:
        """How much to move in one step: about ``quantum_s`` of link time, within [1500 B, 16 KiB]."""
        ideal = self.bandwidth_at(t_s) * BYTES_PER_MBIT * quantum_s
        return int(min(MAX_CHUNK_BYTES, max(MIN_CHUNK_BYTES, ideal)))


class TokenBucket:
    """FIFO reservations on a :class:`ShapingSchedule` (pure: the caller passes the time).

    A virtual clock: a reservation starts when the previous one finished, if that was at most
    ``catch_up_s`` before ``now_s`` (the caller slept until then and the event loop woke it late;
    without this every late wake-up would lose capacity), otherwise at ``now_s`` (an idle link
    banks nothing). It finishes when the schedule has carried its bytes. In token-bucket terms:
    tokens accrue from the trace and are kept for at most ``catch_up_s`` of idleness. Several
    connections sharing one direction share one bucket (FIFO).
    """

    def __init__(self, schedule: ShapingSchedule, catch_up_s: float = 0.02) -> None:
        if not (math.isfinite(catch_up_s) and catch_up_s >= 0):
            raise ConfigError(f"catch_up_s must be >= 0, got {catch_up_s!r}")
        self.schedule = schedule
        self.catch_up_s = catch_up_s
        self._busy_until_s = 0.0
        self.reserved_bytes = 0

    @property
    def busy_until_s(self) -> float:
        return self._busy_until_s

    def reserve(self, nbytes: int, now_s: float, backlogged: bool = True) -> float:
        """Queue ``nbytes`` at ``now_s``; returns the wall time at which they have been serialised.

        ``backlogged=False`` says the bytes have just arrived (the caller waited for them), so they
        cannot have started before ``now_s``: no catch-up.
        """
        busy = self._busy_until_s
        if backlogged and now_s - busy <= self.catch_up_s:
            start = busy
        else:
            start = max(busy, now_s)
        finish = start + self.schedule.time_to_send(nbytes, start)
        self._busy_until_s = finish
        self.reserved_bytes += nbytes
        return finish


class SlowStart:
    """When the bytes of one direction of one TCP connection may leave, by slow start (pure).

    The caller passes the time. :meth:`admit` takes bytes as they arrive and returns them as pieces
    that never straddle a round, each with its release time (admitted bytes count as queued, not
    idle, until then); :meth:`sent` records when the last of them left. Bytes that arrive when
    nothing is in flight (the last byte left at least ``rtt_s`` ago, so its ACK is back) and the last
    byte left more than ``rto_s`` ago start a new burst (Linux's ``tcp_slow_start_after_idle`` test,
    which compares the RTO with the time since the last send); others continue the current one. A
    new connection starts with a burst.
    """

    def __init__(
        self,
        rtt_s: float,
        rto_s: float,
        mss: int = TCP_MSS_BYTES,
        iw_segments: int = TCP_INITIAL_WINDOW_SEGMENTS,
    ) -> None:
        check_window(rtt_s, mss, iw_segments)
        if not (math.isfinite(rto_s) and rto_s > 0):
            raise ConfigError(f"rto_s must be > 0, got {rto_s!r}")
        self.rtt_s = rtt_s
        self.rto_s = rto_s
        self.mss = mss
        self.iw_segments = iw_segments
        self.burst_start_s = -math.inf
        self.offset_bytes = 0  # bytes admitted since the burst started
        self.bursts = 0
        self._last_sent_s = -math.inf

    def admit(self, nbytes: int, now_s: float) -> list[tuple[int, float]]:
        """``(bytes, release time)`` pieces, in order, of ``nbytes`` that arrived at ``now_s``."""
        idle_s = now_s - self._last_sent_s
        if idle_s > self.rto_s and idle_s >= self.rtt_s:
            self.burst_start_s, self.offset_bytes = now_s, 0
            self.bursts += 1
        pieces: list[tuple[int, float]] = []
        offset, end = self.offset_bytes, self.offset_bytes + nbytes
        while offset < end:
            k = round_of(offset, self.mss, self.iw_segments)
            stop = min(end, round_first_byte(k + 1, self.mss, self.iw_segments))
            pieces.append((stop - offset, self.burst_start_s + k * self.rtt_s))
            offset = stop
        self.offset_bytes = end
        if pieces:  # queued: not idle before they have left
            self._last_sent_s = max(self._last_sent_s, now_s, pieces[-1][1])
        return pieces

    def sent(self, t_s: float) -> None:
        """The admitted bytes have left the sender (been serialised) by ``t_s``."""
        self._last_sent_s = max(self._last_sent_s, t_s)


def check_link(
    trace: Trace | None,
    uplink_mbps: float | None,
    downlink_trace: Trace | None,
    downlink_mbps: float | None,
    rtt_ms: float,
    loss: float,
    rto_ms: float | None,
    quantum_s: float,
) -> None:
    """ConfigError for link parameters that :class:`LinkEmulator` and :class:`ShapedTransport` refuse."""
    if trace is not None and uplink_mbps is not None:
        raise ConfigError("give the uplink a trace or a fixed uplink_mbps, not both")
    if downlink_trace is not None and downlink_mbps is not None:
        raise ConfigError("give the downlink a trace or a fixed downlink_mbps, not both")
    for label, mbps in (("uplink_mbps", uplink_mbps), ("downlink_mbps", downlink_mbps)):
        if mbps is not None and not (math.isfinite(mbps) and mbps > 0):
            raise ConfigError(f"{label} must be > 0 Mbit/s (leave it None for an unshaped link), got {mbps!r}")
    if not (math.isfinite(rtt_ms) and rtt_ms >= 0):
        raise ConfigError(f"rtt_ms must be >= 0, got {rtt_ms!r}")
    if not 0.0 <= loss < 1.0:
        raise ConfigError(f"loss must be in [0, 1) (a segment loss probability), got {loss!r}")
    if rto_ms is not None and not (math.isfinite(rto_ms) and rto_ms > 0):
        raise ConfigError(f"rto_ms must be > 0, got {rto_ms!r}")
    if not (math.isfinite(quantum_s) and quantum_s > 0):
        raise ConfigError(f"quantum_s must be > 0, got {quantum_s!r}")


def link_schedules(
    trace: Trace | None,
    uplink_mbps: float | None,
    downlink_trace: Trace | None,
    downlink_mbps: float | None,
    outages: Sequence[Outage],
    time_offset_s: float,
    time_scale: float,
    bandwidth_scale: float,
) -> tuple[ShapingSchedule | None, ShapingSchedule | None]:
    """The (uplink, downlink) schedules of a link; None: that direction is unshaped."""

    def schedule(t: Trace | None, mbps: float | None) -> ShapingSchedule | None:
        if t is not None:
            shaped = t
        elif mbps is not None:
            shaped = Trace.constant(float(mbps))
        else:
            return None
        return ShapingSchedule(
            shaped,
            time_offset_s=time_offset_s,
            time_scale=time_scale,
            bandwidth_scale=bandwidth_scale,
            outages=outages,
        )

    return schedule(trace, uplink_mbps), schedule(downlink_trace, downlink_mbps)


@dataclass
class LinkCounters:
    """What a :class:`LinkEmulator` has done so far (a snapshot when read from ``link.counters``)."""

    bytes_up: int = 0  # device -> upstream, delivered
    bytes_down: int = 0  # upstream -> device, delivered
    connections_total: int = 0
    connections_active: int = 0
    connections_failed: int = 0  # the upstream could not be dialled
    retransmissions: int = 0  # chunks that drew a loss (RTO) delay


class LinkEmulator:
    """A shaping TCP proxy on 127.0.0.1 in front of ``upstream`` (see the module docstring).

    ``async with LinkEmulator(upstream=("127.0.0.1", port), trace=trace, rtt_ms=60) as link:``
    then dial ``link.address``. Without ``trace`` (and ``uplink_mbps``) the uplink is unshaped;
    the downlink is shaped by ``downlink_trace`` or ``downlink_mbps`` if given, else unshaped.
    Delay, slow start (``slow_start=False`` turns it off), loss and outages apply to both directions.
    """

    def __init__(
        self,
        upstream: tuple[str, int],
        trace: Trace | None = None,
        *,
        uplink_mbps: float | None = None,
        downlink_trace: Trace | None = None,
        downlink_mbps: float | None = None,
        rtt_ms: float = 0.0,
        loss: float = 0.0,
        rto_ms: float | None = None,
        outages: Sequence[Outage] = (),
        time_offset_s: float = 0.0,
        time_scale: float = 1.0,
        bandwidth_scale: float = 1.0,
        quantum_s: float = 0.02,
        catch_up_s: float = 0.02,
        host: str = "127.0.0.1",
        port: int = 0,
        seed: int | None = 0,
        slow_start: bool = True,
    ) -> None:
        check_link(trace, uplink_mbps, downlink_trace, downlink_mbps, rtt_ms, loss, rto_ms, quantum_s)
        self.upstream = (upstream[0], int(upstream[1]))
        self.outages = merge_outages(outages)
        self.rtt_s = rtt_ms / 1000.0
        self.one_way_s = self.rtt_s / 2.0
        self.slow_start = bool(slow_start)  # TCP slow start after idle (see the module docstring)
        self.loss = loss
        self.rto_s = default_rto_s(rtt_ms / 1000.0) if rto_ms is None else rto_ms / 1000.0
        self.quantum_s = quantum_s
        self._host = host
        self._port = port
        self._rng = random.Random(seed)

        self.uplink, self.downlink = link_schedules(
            trace, uplink_mbps, downlink_trace, downlink_mbps, self.outages, time_offset_s, time_scale, bandwidth_scale
        )
        self._up_bucket = TokenBucket(self.uplink, catch_up_s) if self.uplink else None
        self._down_bucket = TokenBucket(self.downlink, catch_up_s) if self.downlink else None
        self._counters = LinkCounters()
        self._manual_outage = False
        self._link_restored = asyncio.Event()
        self._link_restored.set()
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self._t0 = 0.0

    # --- lifecycle --------------------------------------------------------------------------------

    async def start(self) -> LinkEmulator:
        if self._server is not None:
            raise RuntimeError("LinkEmulator already started")
        self._server = await asyncio.start_server(self._accept, self._host, self._port, backlog=1024)
        self._port = self._server.sockets[0].getsockname()[1]
        self._t0 = asyncio.get_running_loop().time()
        return self

    async def close(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        handlers = list(self._handlers)
        for task in handlers:
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.wait_closed(), timeout=1.0)

    async def __aenter__(self) -> LinkEmulator:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # --- what callers read and steer --------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("LinkEmulator is not started: use `async with LinkEmulator(...)`")
        return self._port

    @property
    def address(self) -> str:
        """``host:port`` to dial instead of the upstream."""
        return f"{self._host}:{self.port}"

    @property
    def started_at(self) -> float:
        """Event-loop time (``loop.time()``) at which the link's clock reads 0."""
        return self._t0

    def elapsed_s(self) -> float:
        """Seconds on the link's clock (the clock the schedules and outages use)."""
        return asyncio.get_running_loop().time() - self._t0

    @property
    def counters(self) -> LinkCounters:
        return dataclasses.replace(self._counters)

    def set_outage(self, on: bool) -> None:
        """Start (True) or end (False) an outage now, on top of the scripted ones."""
        self._manual_outage = on
        if on:
            self._link_restored.clear()
        else:
            self._link_restored.set()

    @property
    def outage_active(self) -> bool:
        return self._manual_outage or outage_end(self.outages, self.elapsed_s()) is not None

    # --- the proxy --------------------------------------------------------------------------------

    async def _wait_link_up(self) -> None:
        while True:
            if self._manual_outage:
                await self._link_restored.wait()
                continue
            now = self.elapsed_s()
            end = outage_end(self.outages, now)
            if end is None:
                return
            await asyncio.sleep(end - now)

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Our own task (not asyncio's), so that close() can cancel it and collect the result.
        task = asyncio.create_task(self._handle(reader, writer))
        self._handlers.add(task)
        task.add_done_callback(self._handlers.discard)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._counters.connections_total += 1
        self._counters.connections_active += 1
        upstream_writer: asyncio.StreamWriter | None = None
        try:
            await self._wait_link_up()  # black-hole new connections during an outage
            try:
                upstream_reader, upstream_writer = await asyncio.open_connection(*self.upstream)
            except OSError:
                self._counters.connections_failed += 1
                return
            up: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue(_QUEUE_CHUNKS)
            down: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue(_QUEUE_CHUNKS)
            tasks = [
                asyncio.create_task(self._shape(reader, up, self._up_bucket)),
                asyncio.create_task(self._deliver(up, upstream_writer, upstream=True)),
                asyncio.create_task(self._shape(upstream_reader, down, self._down_bucket)),
                asyncio.create_task(self._deliver(down, writer, upstream=False)),
            ]
            try:
                await asyncio.gather(*tasks)
            except (OSError, asyncio.IncompleteReadError):
                pass  # one side reset: drop the whole connection, as a middlebox would
            finally:
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            for w in (writer, upstream_writer):
                if w is not None:
                    w.close()
            self._counters.connections_active -= 1

    async def _shape(
        self,
        src: asyncio.StreamReader,
        queue: asyncio.Queue[tuple[float, bytes] | None],
        bucket: TokenBucket | None,
    ) -> None:
        loop = asyncio.get_running_loop()
        # One per direction and connection: a TCP congestion window is the connection's own.
        window = SlowStart(self.rtt_s, self.rto_s) if self.slow_start and self.rtt_s > 0 else None
        last_delivery = 0.0
        while True:
            await self._wait_link_up()  # an outage stops reading: the sender's buffers fill, it stalls
            before = loop.time() - self._t0
            size = bucket.schedule.quantum_bytes(before, self.quantum_s) if bucket else MAX_CHUNK_BYTES
            data = await src.read(size)
            if not data:
                await queue.put(None)
                return
            now = loop.time() - self._t0
            # Bytes that were already waiting queued behind the previous chunk (catch-up allowed);
            # bytes we had to wait for start now.
            at, backlogged = now, now - before < _WAITED_S
            pieces = window.admit(len(data), now) if window else [(len(data), now)]
            cut = 0
            for i, (n, release) in enumerate(pieces):
                piece, cut = data[cut : cut + n], cut + n
                if i:  # queued behind the previous piece
                    at, backlogged = loop.time() - self._t0, True
                if release > at:  # slow start: not before its round; then it starts no sooner
                    hold = release - (loop.time() - self._t0)
                    if hold > 0:
                        await asyncio.sleep(hold)
                    at, backlogged = release, False
                done = bucket.reserve(n, at, backlogged) if bucket else at
                if window:
                    window.sent(max(done, at))
                wait = done - (loop.time() - self._t0)
                if wait > 0:
                    await asyncio.sleep(wait)
                extra = retransmission_delay_s(n, self.loss, self.rto_s, self._rng.random())
                if extra:
                    self._counters.retransmissions += 1
                # Never before it was read (catch-up recovers capacity, it does not shorten latency);
                # in order: a chunk held back by a retransmission holds back the ones behind it.
                last_delivery = max(last_delivery, max(done, at) + self.one_way_s + extra)
                await queue.put((last_delivery, piece))

    async def _deliver(
        self,
        queue: asyncio.Queue[tuple[float, bytes] | None],
        dst: asyncio.StreamWriter,
        *,
        upstream: bool,
    ) -> None:
        loop = asyncio.get_running_loop()
        while True:
            item = await queue.get()
            if item is None:
                if dst.can_write_eof():
                    dst.write_eof()
                return
            at, data = item
            wait = at - (loop.time() - self._t0)
            if wait > 0:
                await asyncio.sleep(wait)
            await self._wait_link_up()
            dst.write(data)
            if upstream:
                self._counters.bytes_up += len(data)
            else:
                self._counters.bytes_down += len(data)
            await dst.drain()


# --- the inline link: the same model, no proxy ---------------------------------------------------

# Bytes one call puts on the link beyond its message (``(up, down)``), measured through the proxy
# (grpcio 1.85, loopback, a fleet device's metadata, after the channel's first call): HTTP/2 frame
# headers, the gRPC length prefix, and the control frames each call sets off (WINDOW_UPDATE, and the
# PING and PING ACK of gRPC's BDP probe). The channel's first call carries more (the connection
# preface, SETTINGS, headers not yet HPACK-indexed: ~400 B up and ~140 B down); not counted.
STREAM_CALL_BYTES = (100, 120)  # a window on the open OffloadStream: request up, answer down
UNARY_CALL_BYTES = (185, 64)  # a unary call (GetPlan, ReportTelemetry, a WatchPlan request): HEADERS, trailers


class LinkDirection:
    """One direction of one connection through the link, as :class:`LinkEmulator` shapes it (pure).

    The caller passes the time (link-clock seconds). :meth:`transfer` takes a message that is
    written at once at ``now_s`` and returns when its last byte arrives at the far end, by the same
    steps the proxy's reader and writer take for it, on virtual time: chunks of one quantum, each
    cut where a slow-start round ends and held until its round, reserved FIFO on the direction's
    :class:`TokenBucket` (scripted outages carry nothing), delivered ``rtt_s / 2`` after they were
    serialised plus a retransmission timeout when a loss draw hits them, in order (a chunk held by
    a retransmission holds back everything behind it, later messages included), and no sooner than
    a scripted outage at the reader ends. Messages queue behind each other: a message written while
    an earlier one is still being serialised starts when it ends (the proxy's reader reads it then).
    What it does not do is hold a delivery that falls inside an outage: the I/O around it does that
    (:class:`ShapedTransport`), as the proxy's writer does.
    """

    def __init__(
        self,
        schedule: ShapingSchedule | None,
        *,
        rtt_s: float = 0.0,
        rto_s: float | None = None,
        loss: float = 0.0,
        rng: random.Random | None = None,
        slow_start: bool = True,
        quantum_s: float = 0.02,
        catch_up_s: float = 0.02,
        outages: Sequence[Outage] | None = None,
    ) -> None:
        if not (math.isfinite(rtt_s) and rtt_s >= 0):
            raise ConfigError(f"rtt_s must be >= 0, got {rtt_s!r}")
        if not 0.0 <= loss < 1.0:
            raise ConfigError(f"loss must be in [0, 1) (a segment loss probability), got {loss!r}")
        if not (math.isfinite(quantum_s) and quantum_s > 0):
            raise ConfigError(f"quantum_s must be > 0, got {quantum_s!r}")
        self.schedule = schedule
        self.bucket = TokenBucket(schedule, catch_up_s) if schedule is not None else None
        self.rtt_s = rtt_s
        self.one_way_s = rtt_s / 2.0
        self.rto_s = default_rto_s(rtt_s) if rto_s is None else rto_s
        self.window = SlowStart(rtt_s, self.rto_s) if slow_start and rtt_s > 0 else None
        self.loss = loss
        self.rng = rng or random.Random(0)
        self.quantum_s = quantum_s
        if outages is None:
            self.outages: tuple[Outage, ...] = tuple(schedule.outages) if schedule is not None else ()
        else:
            self.outages = merge_outages(outages)
        self.bytes = 0
        self.messages = 0
        self.retransmissions = 0
        self._reader_at_s = -math.inf  # when the proxy's reader is done with the bytes before
        self._last_delivery_s = -math.inf

    def transfer(self, nbytes: int, now_s: float) -> float:
        """Link-clock time at which the last of ``nbytes`` written at ``now_s`` has arrived."""
        if nbytes < 0:
            raise ValueError(f"nbytes must be >= 0, got {nbytes!r}")
        bucket, window = self.bucket, self.window
        # The reader takes the bytes when it is done with those before them (they were waiting:
        # backlogged), else as they arrive (it waited for them: no catch-up).
        at, backlogged = (self._reader_at_s, True) if self._reader_at_s > now_s else (now_s, False)
        remaining = nbytes
        arrival = at + self.one_way_s
        while remaining > 0:
            end = outage_end(self.outages, at)  # the reader reads nothing during an outage
            if end is not None:
                at = end
            size = bucket.schedule.quantum_bytes(at, self.quantum_s) if bucket else MAX_CHUNK_BYTES
            chunk = min(size, remaining)
            remaining -= chunk
            pieces = window.admit(chunk, at) if window else [(chunk, at)]
            for n, release in pieces:
                if release > at:  # slow start: not before its round, and then it starts no sooner
                    at, backlogged = release, False
                done = bucket.reserve(n, at, backlogged) if bucket else at
                left = max(done, at)
                if window:
                    window.sent(left)
                extra = retransmission_delay_s(n, self.loss, self.rto_s, self.rng.random()) if self.loss else 0.0
                if extra:
                    self.retransmissions += 1
                arrival = left + self.one_way_s + extra
                at, backlogged = left, True  # the rest was waiting behind this piece
                self._last_delivery_s = max(self._last_delivery_s, arrival)
        self._reader_at_s = at
        self.bytes += nbytes
        self.messages += 1
        return max(self._last_delivery_s, arrival)


class ShapedTransport:
    """The device's transport with the link inline: each call's bytes wait out the link model
    (:class:`LinkDirection`, one per direction, as :class:`LinkEmulator` shapes one connection)
    in this process, then go to the broker on ``inner`` (a GrpcTransport that dials the broker
    directly). ``simulator.link: inline`` (simulators/fleet.py); see the fleet docs and below.

    Per call: the request's bytes (its wire message's size plus the measured per-call framing and
    control bytes, ``STREAM_CALL_BYTES`` / ``UNARY_CALL_BYTES``) cross the uplink, then ``inner``
    makes the call, then the answer's bytes cross the downlink (a refusal, a shed or a reset too),
    all within the call's deadline: a call held by an outage runs into it and fails with
    OffloadDeadlineError, as a call through the stalled proxy does. A delivery that falls in an
    outage (scripted, or :meth:`set_outage`) waits until the outage ends. ``watch_plans``: its
    request crosses the uplink once, each plan set the downlink. Takes the same link parameters as
    :class:`LinkEmulator`; its clock starts at :meth:`start`.

    Differences from the proxy (what is not modelled): the bytes that do not belong to a call
    (HTTP/2 PINGs and WINDOW_UPDATEs between calls, keepalives, the connection's preface and
    SETTINGS) are not shaped, but the per-call constants count the control frames a call sets off;
    a connection's set-up costs nothing (through the proxy a channel's first stream call took
    ~0.6 RTT longer; the device never takes such a call as a link sample); TCP itself is not
    there (the bytes cross real loopback unshaped afterwards, ~0.1 ms); a request whose deadline
    passes while its bytes are still on the link never reaches the broker (through the proxy it
    would, and the broker's late answer would be dropped on the device), so the broker sees a
    little less load from windows that were already lost; a message is shaped as written at once
    (gRPC writes a message whole, so the proxy reads it whole too, up to its quantum); one
    connection is modelled for the transport's life, so a reconnection (the broker's
    max_connection_age) starts no fresh slow-start state (a device idle for an RTO between windows
    starts a new burst either way), and a window ``inner`` sends again on a new stream
    (GrpcTransport.windows_resent) does not cross the link a second time.
    """

    def __init__(
        self,
        inner: OffloadTransport,
        trace: Trace | None = None,
        *,
        uplink_mbps: float | None = None,
        downlink_trace: Trace | None = None,
        downlink_mbps: float | None = None,
        rtt_ms: float = 0.0,
        loss: float = 0.0,
        rto_ms: float | None = None,
        outages: Sequence[Outage] = (),
        time_offset_s: float = 0.0,
        time_scale: float = 1.0,
        bandwidth_scale: float = 1.0,
        quantum_s: float = 0.02,
        catch_up_s: float = 0.02,
        seed: int | None = 0,
        slow_start: bool = True,
    ) -> None:
        check_link(trace, uplink_mbps, downlink_trace, downlink_mbps, rtt_ms, loss, rto_ms, quantum_s)
        self.inner = inner
        self.outages = merge_outages(outages)
        self.rtt_s = rtt_ms / 1000.0
        self.one_way_s = self.rtt_s / 2.0
        self.loss = loss
        self.rto_s = default_rto_s(self.rtt_s) if rto_ms is None else rto_ms / 1000.0
        self.slow_start = bool(slow_start)
        self.uplink, self.downlink = link_schedules(
            trace, uplink_mbps, downlink_trace, downlink_mbps, self.outages, time_offset_s, time_scale, bandwidth_scale
        )
        rng = random.Random(seed)

        def direction(schedule: ShapingSchedule | None) -> LinkDirection:
            return LinkDirection(
                schedule,
                rtt_s=self.rtt_s,
                rto_s=self.rto_s,
                loss=loss,
                rng=rng,
                slow_start=self.slow_start,
                quantum_s=quantum_s,
                catch_up_s=catch_up_s,
                outages=self.outages,
            )

        self._up = direction(self.uplink)
        self._down = direction(self.downlink)
        self._manual_outage = False
        self._link_restored = asyncio.Event()
        self._link_restored.set()
        self._t0: float | None = None

    # --- lifecycle and what callers read (as LinkEmulator's) ------------------------------------

    async def start(self) -> ShapedTransport:
        """Start the link's clock (now); the transport is usable from here."""
        if self._t0 is not None:
            raise RuntimeError("ShapedTransport already started")
        self._t0 = asyncio.get_running_loop().time()
        return self

    async def close(self) -> None:
        await self.inner.close()

    async def __aenter__(self) -> ShapedTransport:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def started_at(self) -> float:
        """Event-loop time (``loop.time()``) at which the link's clock reads 0."""
        if self._t0 is None:
            raise RuntimeError("ShapedTransport is not started: `await transport.start()` first")
        return self._t0

    def elapsed_s(self) -> float:
        """Seconds on the link's clock (the clock the schedules and outages use)."""
        return asyncio.get_running_loop().time() - self.started_at

    @property
    def counters(self) -> LinkCounters:
        return LinkCounters(
            bytes_up=self._up.bytes,
            bytes_down=self._down.bytes,
            connections_total=1 if self._t0 is not None else 0,
            connections_active=1 if self._t0 is not None else 0,
            retransmissions=self._up.retransmissions + self._down.retransmissions,
        )

    def set_outage(self, on: bool) -> None:
        """Start (True) or end (False) an outage now, on top of the scripted ones."""
        self._manual_outage = on
        if on:
            self._link_restored.clear()
        else:
            self._link_restored.set()

    @property
    def outage_active(self) -> bool:
        return self._manual_outage or outage_end(self.outages, self.elapsed_s()) is not None

    @property
    def streams_opened(self) -> int:
        """The inner transport's (the device does not time the link by a call that opened a stream)."""
        return int(getattr(self.inner, "streams_opened", 0))

    # --- the link -------------------------------------------------------------------------------

    async def _cross(self, direction: LinkDirection, nbytes: int) -> None:
        """Return when ``nbytes`` written now have crossed ``direction``."""
        while self._manual_outage:  # the proxy's reader reads nothing in an outage
            await self._link_restored.wait()
        loop = asyncio.get_running_loop()
        t0 = self.started_at
        arrival = direction.transfer(nbytes, loop.time() - t0)
        while True:
            wait = t0 + arrival - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            if self._manual_outage:  # ... and its writer delivers nothing
                await self._link_restored.wait()
                continue
            end = outage_end(self.outages, loop.time() - t0)
            if end is None:
                return
            arrival = end

    def _offload_bytes(self) -> tuple[int, int]:
        return STREAM_CALL_BYTES if getattr(self.inner, "use_stream", True) else UNARY_CALL_BYTES

    @staticmethod
    def _left(deadline: float, what: str) -> float:
        left = deadline - asyncio.get_running_loop().time()
        if not left > 0:
            raise OffloadDeadlineError(f"{what}: no time left before its deadline (inline link)")
        return left

    # --- OffloadTransport -----------------------------------------------------------------------

    async def offload(self, request: wire.OffloadRequest, timeout_s: float) -> wire.OffloadResponse:
        if not timeout_s > 0:
            raise OffloadDeadlineError(f"window {request.window_id}: no time left before its deadline")
        msg = wire.to_pb(request)
        size = msg.ByteSize()
        # the message is built once: a transport that takes it as built (GrpcTransport) gets it
        send_message = getattr(self.inner, "offload_message", None)

        def send(left_s: float) -> Awaitable[wire.OffloadResponse]:
            if send_message is not None:
                return send_message(request.window_id, msg, size, left_s)
            return self.inner.offload(request, left_s)

        if size > getattr(self.inner, "max_message_bytes", math.inf):
            return await send(timeout_s)  # refused before a byte goes
        up, down = self._offload_bytes()
        deadline = asyncio.get_running_loop().time() + timeout_s
        try:
            async with asyncio.timeout(timeout_s):
                await self._cross(self._up, size + up)
                try:
                    response = await send(self._left(deadline, f"window {request.window_id}"))
                except OffloadDeadlineError:
                    raise
                except OffloadError:  # the broker's refusal (or a reset) crosses the downlink too
                    await self._cross(self._down, down)
                    raise
                await self._cross(self._down, wire.to_pb(response).ByteSize() + down)
                return response
        except TimeoutError:
            raise OffloadDeadlineError(
                f"window {request.window_id}: no answer within its deadline of {timeout_s * 1000:.0f} ms"
            ) from None

    async def _unary(
        self,
        what: str,
        up_bytes: int,
        timeout_s: float,
        call: Callable[[float], Awaitable[_T]],
        answer_bytes: Callable[[_T], int],
    ) -> _T:
        """A unary call through the link: the request up, ``call(time left)``, the answer down."""
        up, down = UNARY_CALL_BYTES
        deadline = asyncio.get_running_loop().time() + timeout_s
        try:
            async with asyncio.timeout(timeout_s):
                await self._cross(self._up, up_bytes + up)
                try:
                    out = await call(self._left(deadline, what))
                except OffloadDeadlineError:
                    raise
                except OffloadError:
                    await self._cross(self._down, down)
                    raise
                await self._cross(self._down, answer_bytes(out) + down)
                return out
        except TimeoutError:
            raise OffloadDeadlineError(f"{what}: no answer within {timeout_s * 1000:.0f} ms") from None

    async def get_plan(
        self, device_class: str, models: Sequence[str] = (), known_version: int = 0, timeout_s: float = 5.0
    ) -> PlanSet | None:
        req = pb.GetPlanRequest(device_class=device_class, models=list(models), known_version=known_version)

        def answer(plan_set: PlanSet | None) -> int:
            return 0 if plan_set is None else _plan_answer_bytes(plan_set, pb.GetPlanResponse)

        return await self._unary(
            "GetPlan",
            req.ByteSize(),
            timeout_s,
            lambda left: self.inner.get_plan(device_class, models, known_version, left),
            answer,
        )

    async def report_telemetry(self, report: wire.TelemetryReport, timeout_s: float = 5.0) -> wire.TelemetryAck:
        msg = wire.to_pb(report)
        send_message = getattr(self.inner, "report_message", None)  # built once, as for offload
        return await self._unary(
            "ReportTelemetry",
            msg.ByteSize(),
            timeout_s,
            (lambda left: send_message(msg, left))
            if send_message is not None
            else (lambda left: self.inner.report_telemetry(report, left)),
            lambda ack: wire.to_pb(ack).ByteSize(),
        )

    async def watch_plans(
        self, device_class: str, models: Sequence[str] = (), known_version: int = 0
    ) -> AsyncIterator[PlanSet]:
        req = pb.WatchPlanRequest(device_class=device_class, models=list(models), known_version=known_version)
        up, down = UNARY_CALL_BYTES
        await self._cross(self._up, req.ByteSize() + up)
        plans = self.inner.watch_plans(device_class, models, known_version)
        try:
            async for plan_set in plans:
                size = _plan_answer_bytes(plan_set, pb.WatchPlanResponse)
                await self._cross(self._down, size + STREAM_CALL_BYTES[1])
                yield plan_set
        except OffloadError:  # the stream's end (its status) crosses the downlink too
            await self._cross(self._down, down)
            raise
        finally:
            close = getattr(plans, "aclose", None)
            if close is not None:
                await close()
