"""The pure part of the link emulator: capacity on the wall clock, FIFO reservations, loss model."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from simulators.link import (
    LinkEmulator,
    ShapingSchedule,
    TokenBucket,
    default_rto_s,
    merge_outages,
    outage_end,
    retransmission_delay_s,
)
from simulators.traces import Trace
from splitsense.errors import ConfigError

MBIT = 1e6 / 8  # bytes per Mbit

# 1 Mbit/s for 2 s, then 4 Mbit/s for 2 s; loops every 4 s.
STEP = Trace("step", "test", np.array([0.0, 2.0]), np.array([1.0, 4.0]), duration_s=4.0)


def test_constant_rate() -> None:
    s = ShapingSchedule(Trace.constant(8.0))
    assert s.time_to_send(1_000_000, 0.0) == pytest.approx(1.0)
    assert s.time_to_send(0, 3.0) == 0.0
    assert s.bytes_between(1.0, 3.0) == pytest.approx(2e6)


def test_time_to_send_crosses_a_rate_step() -> None:
    s = ShapingSchedule(STEP)
    # from t=1: 1 s at 1 Mbit/s (1 Mbit), then 4 Mbit/s: 3 Mbit in total needs 0.5 s more.
    assert s.time_to_send(3 * MBIT, 1.0) == pytest.approx(1.5)
    assert s.time_to_send(0.5 * MBIT, 1.0) == pytest.approx(0.5)
    # loops: t=5 reads the trace at 1
    assert s.time_to_send(3 * MBIT, 5.0) == pytest.approx(1.5)
    assert s.bandwidth_at(2.5) == 4.0 and s.bandwidth_at(4.5) == 1.0


def test_offset_scale_and_bandwidth_scale() -> None:
    s = ShapingSchedule(STEP, time_offset_s=2.0)
    assert s.bandwidth_at(0.0) == 4.0 and s.bandwidth_at(2.0) == 1.0
    fast = ShapingSchedule(STEP, time_scale=2.0)  # the 4 s trace plays in 2 s of wall time
    assert fast.bandwidth_at(0.9) == 1.0 and fast.bandwidth_at(1.1) == 4.0
    # Mbit/s are the trace's own: one wall second carries 1 Mbit, the next 4.
    assert fast.bytes_between(0.0, 1.0) == pytest.approx(1 * MBIT)
    assert fast.bytes_between(1.0, 2.0) == pytest.approx(4 * MBIT)
    assert fast.time_to_send(2 * MBIT, 0.0) == pytest.approx(1.25)
    doubled = ShapingSchedule(STEP, bandwidth_scale=2.0)
    assert doubled.bytes_between(0.0, 2.0) == pytest.approx(4 * MBIT)
    assert doubled.time_to_send(2 * MBIT, 0.0) == pytest.approx(1.0)


def test_outages_carry_nothing() -> None:
    s = ShapingSchedule(Trace.constant(8.0), outages=[(1.0, 3.0)])
    assert s.bandwidth_at(2.0) == 0.0 and s.in_outage(1.0) and not s.in_outage(3.0)
    assert s.bytes_between(0.0, 4.0) == pytest.approx(2e6)
    assert s.bytes_between(1.5, 2.5) == 0.0
    # 1.5 MB from t=0.5: 0.5 MB before the outage, the rest (1 MB) after it ends at 3.
    assert s.time_to_send(1_500_000, 0.5) == pytest.approx(3.5)
    # starting inside the outage waits for its end
    assert s.time_to_send(1_000_000, 2.0) == pytest.approx(2.0)
    # fits before the outage
    assert s.time_to_send(250_000, 0.5) == pytest.approx(0.25)


def test_merge_and_lookup_outages() -> None:
    merged = merge_outages([(5.0, 6.0), (1.0, 2.0), (1.5, 3.0), (3.0, 4.0)])
    assert merged == ((1.0, 4.0), (5.0, 6.0))
    assert outage_end(merged, 2.0) == 4.0
    assert outage_end(merged, 4.0) is None
    assert outage_end(merged, 5.5) == 6.0
    for bad in ([(2.0, 1.0)], [(-1.0, 1.0)], [(0.0, float("inf"))]):
        with pytest.raises(ConfigError, match="outage"):
            merge_outages(bad)


def test_schedule_checks_arguments() -> None:
    with pytest.raises(ConfigError, match="time_scale"):
        ShapingSchedule(STEP, time_scale=0.0)
    with pytest.raises(ConfigError, match="bandwidth_scale"):
        ShapingSchedule(STEP, bandwidth_scale=-1.0)


@given(
    now=st.floats(min_value=0.0, max_value=30.0),
    nbytes=st.floats(min_value=0.0, max_value=3e6),
)
def test_time_to_send_inverts_bytes_between(now: float, nbytes: float) -> None:
    s = ShapingSchedule(STEP, time_offset_s=0.7, time_scale=1.3, outages=[(2.0, 3.0), (6.0, 6.5)])
    dt = s.time_to_send(nbytes, now)
    assert dt >= 0
    assert s.bytes_between(now, now + dt) == pytest.approx(nbytes, rel=1e-7, abs=1e-3)


def test_quantum_tracks_rate_within_bounds() -> None:
    s = ShapingSchedule(STEP)
    assert s.quantum_bytes(0.0, 0.02) == 2500  # 1 Mbit/s x 20 ms
    assert s.quantum_bytes(2.5, 0.02) == 10000
    assert s.quantum_bytes(0.0, 0.0001) == 1500
    assert s.quantum_bytes(0.0, 10.0) == 16 * 1024


def test_bucket_is_fifo_on_the_schedule() -> None:
    bucket = TokenBucket(ShapingSchedule(Trace.constant(8.0)), catch_up_s=0.0)
    assert bucket.reserve(500_000, 0.0) == pytest.approx(0.5)
    assert bucket.reserve(500_000, 0.1) == pytest.approx(1.0)  # queued behind the first
    assert bucket.reserve(1_000_000, 5.0) == pytest.approx(6.0)  # idle link starts now
    assert bucket.reserved_bytes == 2_000_000


def test_bucket_catch_up_absorbs_late_wakeups() -> None:
    bucket = TokenBucket(ShapingSchedule(Trace.constant(8.0)), catch_up_s=0.02)
    done = bucket.reserve(10_000, 0.0)
    assert done == pytest.approx(0.01)
    # the caller wakes 5 ms late; the next chunk still starts when the previous one finished
    assert bucket.reserve(10_000, done + 0.005) == pytest.approx(0.02)
    # bytes that just arrived (not backlogged) never start before they arrived
    assert bucket.reserve(10_000, 0.025, backlogged=False) == pytest.approx(0.035)
    # after an idle period nothing is banked: a lone chunk pays its full serialisation
    assert bucket.reserve(10_000, 10.0) == pytest.approx(10.01)
    assert bucket.reserve(10_000, 10.05) == pytest.approx(10.06)


@given(
    chunks=st.lists(st.integers(min_value=1, max_value=20_000), min_size=1, max_size=60),
    jitter=st.lists(st.floats(min_value=0.0, max_value=0.015), min_size=60, max_size=60),
)
def test_backlogged_sender_gets_the_trace_despite_jitter(chunks: list[int], jitter: list[float]) -> None:
    # A sender that always has data and wakes up to 15 ms late still gets exactly the trace's bytes.
    s = ShapingSchedule(STEP, time_offset_s=1.0)
    bucket = TokenBucket(s, catch_up_s=0.02)
    now = 0.0
    for size, late in zip(chunks, jitter, strict=False):
        done = bucket.reserve(size, now)
        if done > now:  # the shaper sleeps until `done` and wakes `late`
            now = done + late
    assert bucket.busy_until_s == pytest.approx(s.time_to_send(sum(chunks), 0.0), rel=1e-9, abs=1e-9)


def test_retransmission_delay() -> None:
    assert default_rto_s(0.05) == 0.2
    assert default_rto_s(0.3) == pytest.approx(0.6)
    assert retransmission_delay_s(1448, 0.0, 0.2, 0.0) == 0.0
    # one segment, 10% loss: lost when the draw is below 0.1
    assert retransmission_delay_s(1448, 0.1, 0.2, 0.05) == 0.2
    assert retransmission_delay_s(1448, 0.1, 0.2, 0.15) == 0.0
    # ten segments: 1 - 0.9**10 = 0.651
    assert retransmission_delay_s(14480, 0.1, 0.2, 0.6) == 0.2
    assert retransmission_delay_s(14480, 0.1, 0.2, 0.66) == 0.0
    with pytest.raises(ConfigError):
        retransmission_delay_s(100, 1.0, 0.2, 0.5)


def test_loss_fraction_matches_probability() -> None:
    rng = np.random.default_rng(0)
    draws = rng.random(20_000)
    hits = sum(retransmission_delay_s(1448, 0.05, 0.2, float(u)) > 0 for u in draws)
    assert hits / draws.size == pytest.approx(0.05, abs=0.006)


@pytest.mark.parametrize(
    ("kwargs", "what"),
    [
        ({"uplink_mbps": 0.0}, "uplink_mbps"),
        ({"downlink_mbps": -1.0}, "downlink_mbps"),
        ({"trace": Trace.constant(1.0), "uplink_mbps": 1.0}, "not both"),
        ({"rtt_ms": -5.0}, "rtt_ms"),
        ({"loss": 1.0}, "loss"),
        ({"outages": [(3.0, 1.0)]}, "outage"),
        ({"time_scale": 0.0, "uplink_mbps": 1.0}, "time_scale"),
    ],
)
def test_emulator_checks_its_config_before_opening_sockets(kwargs: dict[str, object], what: str) -> None:
    with pytest.raises(ConfigError, match=what):
        LinkEmulator(("127.0.0.1", 1), **kwargs)  # type: ignore[arg-type]


def test_emulator_builds_schedules_without_sockets() -> None:
    link = LinkEmulator(("127.0.0.1", 1), trace=STEP, downlink_mbps=20.0, rtt_ms=80.0, outages=[(1.0, 2.0)])
    assert link.uplink is not None and link.downlink is not None
    assert link.uplink.bandwidth_at(2.5) == 4.0 and link.uplink.bandwidth_at(1.5) == 0.0
    assert link.downlink.bandwidth_at(0.0) == 20.0
    assert link.one_way_s == pytest.approx(0.04) and link.rto_s == pytest.approx(0.2)
    unshaped = LinkEmulator(("127.0.0.1", 1))
    assert unshaped.uplink is None and unshaped.downlink is None
    with pytest.raises(RuntimeError, match="not started"):
        _ = unshaped.address
