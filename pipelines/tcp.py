"""What a message really costs on a TCP link: framing bytes and slow start. Pure, standard library only.

Shared by the device's link estimator (edge/estimator.py), which inverts it, and the simulator's
link (simulators/link.py), which emulates it, so that both agree on one model.

Framing. One gRPC message on an open HTTP/2 stream is a DATA frame (9-byte header, RFC 9113 4.1)
holding the gRPC length prefix (5 bytes: compressed flag + uint32 length, gRPC's PROTOCOL-HTTP2) and
the message; the stream's wrapper message (OffloadStreamRequest) adds a tag and a length (3 bytes
up to 16 KiB). On the wire each TCP segment of at most 1448 payload bytes (1500-byte MTU) carries
52 bytes of IPv4 + TCP headers with the timestamp option.

Slow start. Linux resets the congestion window to the initial window (IW = 10 segments, RFC 6928)
when a connection's send side has been idle for longer than one RTO (`tcp_slow_start_after_idle`,
on by default; RFC 2861 / RFC 7661), which is the case for a device sending one window every second
or so. Then cwnd doubles every round trip (RFC 5681): round k (from 0) may send segments
[IW (2^k - 1), IW (2^(k+1) - 1)), no earlier than k round trips after the burst started. A message
of at most IW segments (~14 KB) fits the first round and pays no extra round trip.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

from splitsense.errors import ConfigError

__all__ = [
    "GRPC_STREAM_OVERHEAD_BYTES",
    "INITIAL_WINDOW_SEGMENTS",
    "TCP_HEADER_BYTES",
    "TCP_MIN_RTO_S",
    "TCP_MSS_BYTES",
    "binding_round",
    "check_window",
    "round_first_byte",
    "round_of",
    "slow_start_rounds",
    "burst_completion_s",
    "burst_rounds",
    "default_rto_s",
    "slow_start_release_s",
    "wire_bytes",
]

TCP_MSS_BYTES = 1448  # 1500-byte MTU minus IPv4, TCP and timestamp-option headers
TCP_HEADER_BYTES = 52  # IPv4 (20) + TCP (20) + timestamp option (12), per segment
TCP_MIN_RTO_S = 0.2  # Linux TCP_RTO_MIN
INITIAL_WINDOW_SEGMENTS = 10  # RFC 6928
# HTTP/2 DATA frame header (9) + gRPC length prefix (5) + the stream wrapper's tag and length (3)
GRPC_STREAM_OVERHEAD_BYTES = 17


def default_rto_s(rtt_s: float) -> float:
    """Retransmission timeout: ``max(200 ms, 2 * rtt)``."""
    return max(TCP_MIN_RTO_S, 2.0 * rtt_s)


def wire_bytes(message_bytes: int, *, framing: int = GRPC_STREAM_OVERHEAD_BYTES, headers: bool = True) -> int:
    """Bytes a gRPC message of `message_bytes` puts on the link (framing, and TCP/IP headers)."""
    if message_bytes < 0:
        raise ValueError(f"message_bytes must be >= 0, got {message_bytes!r}")
    payload = message_bytes + framing
    if not headers:
        return payload
    return payload + TCP_HEADER_BYTES * max(1, math.ceil(payload / TCP_MSS_BYTES))


def check_window(rtt_s: float, mss: int, iw_segments: int) -> None:
    if not (math.isfinite(rtt_s) and rtt_s >= 0):
        raise ConfigError(f"rtt_s must be finite and >= 0 seconds, got {rtt_s!r}")
    if mss < 1 or iw_segments < 1:
        raise ConfigError(f"mss and iw_segments must be >= 1, got mss={mss!r}, iw_segments={iw_segments!r}")


def round_of(offset_bytes: int, mss: int, iw_segments: int) -> int:
    # Segment i is in round floor(log2(i / iw + 1)) = floor(log2(i // iw + 1)): exact in integers.
    return (offset_bytes // mss // iw_segments + 1).bit_length() - 1


def round_first_byte(k: int, mss: int, iw_segments: int) -> int:
    # Rounds 0..k-1 hold iw * (1 + 2 + ... + 2**(k-1)) = iw * (2**k - 1) segments.
    return iw_segments * ((1 << k) - 1) * mss


def slow_start_rounds(nbytes: float, mss: int, iw_segments: int) -> Iterator[tuple[int, int, float]]:
    """``(k, first byte, bytes)`` of each slow-start round of a burst of ``nbytes``."""
    k = 0
    first = 0
    while first < nbytes:
        nxt = round_first_byte(k + 1, mss, iw_segments)
        yield k, first, min(float(nxt), nbytes) - first
        k, first = k + 1, nxt


def slow_start_release_s(
    offset_bytes: int,
    rtt_s: float,
    mss: int = TCP_MSS_BYTES,
    iw_segments: int = INITIAL_WINDOW_SEGMENTS,
) -> float:
    """Earliest time, from the start of a burst, at which its byte ``offset_bytes`` may leave.

    By the congestion window alone (no loss, ssthresh infinite): the window starts at
    ``iw_segments`` segments of ``mss`` bytes and doubles every RTT, so round ``k`` holds segments
    ``iw * (2**k - 1)`` to ``iw * (2**(k+1) - 1) - 1`` and starts at ``k * rtt_s``. The byte's segment
    is ``offset_bytes // mss``, its round ``floor(log2(segment / iw + 1))``.
    """
    check_window(rtt_s, mss, iw_segments)
    if offset_bytes < 0:
        raise ValueError(f"offset_bytes must be >= 0, got {offset_bytes!r}")
    return round_of(offset_bytes, mss, iw_segments) * rtt_s


def burst_completion_s(
    nbytes: int,
    rtt_s: float,
    mbps: float,
    mss: int = TCP_MSS_BYTES,
    iw_segments: int = INITIAL_WINDOW_SEGMENTS,
) -> float:
    """Seconds from the start of a burst of ``nbytes`` until its last byte has been serialised.

    At a constant ``mbps`` (``math.inf``: no serialisation), under slow start
    (:func:`slow_start_release_s`) and FIFO serialisation: the maximum over rounds ``k`` of
    ``k * rtt_s`` plus the time to serialise everything from round ``k``'s first byte to the end.
    The one-way delay is not included: the last byte arrives ``rtt_s / 2`` later.
    """
    check_window(rtt_s, mss, iw_segments)
    if nbytes < 0:
        raise ValueError(f"nbytes must be >= 0, got {nbytes!r}")
    if not mbps > 0:
        raise ConfigError(f"mbps must be > 0, got {mbps!r}")
    rate = mbps * 1e6 / 8
    rounds = slow_start_rounds(nbytes, mss, iw_segments)
    return max((k * rtt_s + (nbytes - first) / rate for k, first, _ in rounds), default=0.0)


def burst_rounds(nbytes: int, mss: int = TCP_MSS_BYTES, iw_segments: int = INITIAL_WINDOW_SEGMENTS) -> int:
    """Slow-start rounds a burst of `nbytes` spans (1 within the initial window, 0 for nothing)."""
    return sum(1 for _ in slow_start_rounds(nbytes, mss, iw_segments))


def binding_round(
    nbytes: int, rtt_s: float, mbps: float, mss: int = TCP_MSS_BYTES, iw_segments: int = INITIAL_WINDOW_SEGMENTS
) -> tuple[int, int]:
    """(k, first byte of round k) of the round that bounds `burst_completion_s`: the burst's time
    is k x rtt + the serialisation of its bytes from that first byte on (the estimator's model)."""
    if nbytes <= 0 or not mbps > 0:
        return 0, 0
    rate = mbps * 1e6 / 8
    return max(
        ((k, first) for k, first, _ in slow_start_rounds(nbytes, mss, iw_segments)),
        key=lambda kf: kf[0] * rtt_s + (nbytes - kf[1]) / rate,
    )
