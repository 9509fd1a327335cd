"""The link emulator's slow-start model: release times, burst completion, bursts after idle."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from simulators.link import (
    TCP_INITIAL_WINDOW_SEGMENTS,
    TCP_MSS_BYTES,
    LinkEmulator,
    ShapingSchedule,
    SlowStart,
    burst_completion_s,
    default_rto_s,
    slow_start_release_s,
)
from simulators.traces import Trace
from splitsense.errors import ConfigError

MSS, IW = TCP_MSS_BYTES, TCP_INITIAL_WINDOW_SEGMENTS
W = IW * MSS  # round 0: 14480 bytes; round 1 the next 2 W, round 2 the next 4 W, ...
RATE = 5e6 / 8  # 5 Mbit/s in bytes/s

# 1 Mbit/s for 2 s, then 4 Mbit/s for 2 s; loops every 4 s.
STEP = Trace("step", "test", np.array([0.0, 2.0]), np.array([1.0, 4.0]), duration_s=4.0)


def segment_fifo_s(nbytes: int, rtt_s: float, mbps: float) -> float:
    """Brute force: each segment leaves at its release or when the one before it has, FIFO."""
    rate, finish = mbps * 1e6 / 8, 0.0
    for first in range(0, nbytes, MSS):
        start = max(finish, slow_start_release_s(first, rtt_s))
        finish = start + min(MSS, nbytes - first) / rate
    return finish


@pytest.mark.parametrize(
    ("offset", "rounds"),
    [(0, 0), (W - 1, 0), (W, 1), (3 * W - 1, 1), (3 * W, 2), (7 * W - 1, 2), (7 * W, 3), (15 * W, 4)],
)
def test_release_time_is_the_round_times_rtt(offset: int, rounds: int) -> None:
    assert slow_start_release_s(offset, 0.1) == pytest.approx(rounds * 0.1)


def test_release_time_counts_whole_segments_of_the_given_size() -> None:
    # iw 2, mss 100: round 0 = segments 0-1 (bytes 0-199), round 1 = segments 2-5 (bytes 200-599)
    assert slow_start_release_s(199, 1.0, mss=100, iw_segments=2) == 0.0
    assert slow_start_release_s(200, 1.0, mss=100, iw_segments=2) == 1.0
    assert slow_start_release_s(599, 1.0, mss=100, iw_segments=2) == 1.0
    assert slow_start_release_s(600, 1.0, mss=100, iw_segments=2) == 2.0
    assert slow_start_release_s(10**12, 0.0) == 0.0
    # exact at huge offsets (integer arithmetic, no float log2)
    assert slow_start_release_s((2**40 - 1) * W, 1.0) == 40.0
    assert slow_start_release_s((2**40 - 1) * W - 1, 1.0) == 39.0


def test_checks_arguments() -> None:
    with pytest.raises(ValueError, match="offset_bytes"):
        slow_start_release_s(-1, 0.1)
    with pytest.raises(ConfigError, match="rtt_s"):
        slow_start_release_s(0, -0.1)
    with pytest.raises(ConfigError, match="iw_segments"):
        burst_completion_s(10, 0.1, 5.0, iw_segments=0)
    with pytest.raises(ConfigError, match="mbps"):
        burst_completion_s(10, 0.1, 0.0)
    with pytest.raises(ConfigError, match="rto_s"):
        SlowStart(0.1, 0.0)


def test_burst_completion_at_the_round_boundaries() -> None:
    assert burst_completion_s(0, 0.1, 5.0) == 0.0
    # exactly one initial window: one round, serialisation only
    assert burst_completion_s(W, 0.1, 5.0) == pytest.approx(W / RATE)
    # one byte more: that byte waits for the second round
    assert burst_completion_s(W + 1, 0.1, 5.0) == pytest.approx(0.1 + 1 / RATE)
    # 20 kB: 14480 B in round 0 (23 ms), the other 5520 B at 100 ms
    assert burst_completion_s(20_000, 0.1, 5.0) == pytest.approx(0.1 + 5520 / RATE)
    # 60 kB: rounds of 14480, 28960 and 16560 B; the third starts at 200 ms
    assert burst_completion_s(60_000, 0.1, 5.0) == pytest.approx(0.2 + 16_560 / RATE)


def test_huge_bandwidth_pays_the_rounds() -> None:
    for nbytes, rounds in ((W, 0), (W + 1, 1), (3 * W, 1), (3 * W + 1, 2), (1_000_000, 6)):
        assert burst_completion_s(nbytes, 0.1, math.inf) == pytest.approx(rounds * 0.1)
        assert burst_completion_s(nbytes, 0.1, 1e9) == pytest.approx(rounds * 0.1, abs=1e-5)


def test_tiny_bandwidth_pays_only_serialisation() -> None:
    # 0.1 Mbit/s: the initial window takes 1.16 s, far more than the 100 ms the next round waits
    for nbytes in (1000, W + 1, 60_000, 1_000_000):
        assert burst_completion_s(nbytes, 0.1, 0.1) == pytest.approx(nbytes / (0.1e6 / 8))
    # and a zero RTT never holds anything back
    assert burst_completion_s(60_000, 0.0, 5.0) == pytest.approx(60_000 / RATE)


@given(
    nbytes=st.integers(min_value=0, max_value=400_000),
    rtt_s=st.floats(min_value=0.0, max_value=0.5),
    mbps=st.floats(min_value=0.05, max_value=500.0),
)
def test_burst_completion_is_per_segment_fifo(nbytes: int, rtt_s: float, mbps: float) -> None:
    got = burst_completion_s(nbytes, rtt_s, mbps)
    assert got == pytest.approx(segment_fifo_s(nbytes, rtt_s, mbps), rel=1e-9, abs=1e-12)
    serialise = nbytes / (mbps * 1e6 / 8)
    assert serialise - 1e-12 <= got <= serialise + (slow_start_release_s(max(nbytes - 1, 0), rtt_s)) + 1e-12
    # the constant-rate schedule does the same by its own (FIFO over rounds) route
    deliver = ShapingSchedule(Trace.constant(mbps)).time_to_deliver(nbytes, 3.0, rtt_s)
    assert deliver == pytest.approx(got, rel=1e-9, abs=1e-9)


def test_time_to_deliver_keeps_time_to_send_without_slow_start() -> None:
    s = ShapingSchedule(STEP, outages=[(1.0, 1.5)])
    for nbytes, now in ((0, 0.0), (5000, 0.2), (300_000, 0.9), (2e6, 3.1)):
        assert s.time_to_deliver(nbytes, now, 0.1, slow_start=False) == s.time_to_send(nbytes, now)
        assert s.time_to_deliver(nbytes, now, 0.0) == s.time_to_send(nbytes, now)
        assert s.time_to_deliver(nbytes, now, 0.1) >= s.time_to_send(nbytes, now) - 1e-9
    with pytest.raises(ValueError, match="nbytes"):
        s.time_to_deliver(-1, 0.0, 0.1)


def test_time_to_deliver_on_a_trace_with_an_outage() -> None:
    # 8 Mbit/s (1 MB/s), outage 0.15-0.35 s, rtt 100 ms, 60 kB from t=0:
    # round 0 (14480 B) 0-14.5 ms; round 1 (28960 B) 100-129 ms; round 2 (16560 B) released at
    # 200 ms, inside the outage: it leaves from 350 ms and is done at 366.6 ms.
    s = ShapingSchedule(Trace.constant(8.0), outages=[(0.15, 0.35)])
    assert s.time_to_deliver(60_000, 0.0, 0.1) == pytest.approx(0.35 + 16_560 / 1e6)
    assert s.time_to_send(60_000, 0.0) == pytest.approx(0.06)


def test_a_connection_starts_with_a_burst_split_at_round_boundaries() -> None:
    ss = SlowStart(rtt_s=0.1, rto_s=0.2)
    assert ss.admit(12_500, 5.0) == [(12_500, 5.0)]
    # offset 12500..25000 straddles the end of round 0 at 14480 (and the first chunk, admitted but
    # not yet reported sent, is still queued: no new burst)
    assert ss.admit(12_500, 5.001) == [(W - 12_500, 5.0), (25_000 - W, 5.1)]
    # 25000..60000 straddles the end of round 1 at 3 W = 43440
    assert ss.admit(35_000, 5.002) == [(3 * W - 25_000, 5.1), (60_000 - 3 * W, 5.2)]
    assert ss.bursts == 1 and ss.offset_bytes == 60_000


def test_idle_for_longer_than_the_rto_restarts_slow_start() -> None:
    ss = SlowStart(rtt_s=0.1, rto_s=default_rto_s(0.1))  # rto 200 ms
    ss.admit(30_000, 0.0)
    ss.sent(0.25)
    # 150 ms after the last byte left: still the same burst; its rounds have long passed
    assert ss.admit(20_000, 0.4) == [(3 * W - 30_000, 0.1), (50_000 - 3 * W, 0.2)]
    ss.sent(0.41)
    assert ss.bursts == 1
    # 200 ms is not *longer* than the RTO
    assert ss.admit(100, 0.61) == [(100, 0.2)]
    ss.sent(0.61)
    # 201 ms is: back to the initial window
    assert ss.admit(20_000, 0.811) == [(W, 0.811), (20_000 - W, pytest.approx(0.911))]
    assert ss.bursts == 2 and ss.burst_start_s == 0.811


def test_no_restart_while_bytes_are_in_flight() -> None:
    # an RTO below the RTT (rto_ms set by hand): idle only once the last byte's ACK is back
    ss = SlowStart(rtt_s=0.3, rto_s=0.1)
    ss.admit(100, 0.0)
    ss.sent(0.01)
    ss.admit(100, 0.2)
    assert ss.bursts == 1
    ss.sent(0.2)
    ss.admit(100, 0.5)
    assert ss.bursts == 2


def test_emulator_takes_the_option() -> None:
    on = LinkEmulator(("127.0.0.1", 1), uplink_mbps=5.0, rtt_ms=100.0)
    off = LinkEmulator(("127.0.0.1", 1), uplink_mbps=5.0, rtt_ms=100.0, slow_start=False)
    assert on.slow_start and not off.slow_start
    assert on.rtt_s == pytest.approx(0.1)
