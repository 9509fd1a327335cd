"""The circuit breaker's state machine, back-off and shed handling: pure, `now` passed in."""

from __future__ import annotations

import random

import pytest

from edge.breaker import BreakerState, CircuitBreaker, FailureKind
from splitsense.config import BreakerConfig
from splitsense.errors import ConfigError


def make(jitter: float = 0.0, seed: int = 0, **kw: float) -> CircuitBreaker:
    cfg = BreakerConfig(backoff_jitter=jitter, **kw)  # type: ignore[arg-type]
    return CircuitBreaker(cfg, random.Random(seed))


def trip(b: CircuitBreaker, now: float) -> None:
    for _ in range(b.config.failure_threshold):
        b.record_failure(now, FailureKind.UNAVAILABLE)


def test_closed_until_threshold_consecutive_failures() -> None:
    b = make(failure_threshold=3)
    assert b.state is BreakerState.CLOSED and b.allow_offload(0.0)
    b.record_failure(0.0, FailureKind.DEADLINE)
    b.record_failure(0.1, FailureKind.UNAVAILABLE)
    assert b.state is BreakerState.CLOSED and b.allow_offload(0.2)
    b.record_failure(0.2, FailureKind.REJECTED, detail="UNAUTHENTICATED")
    assert b.state is BreakerState.OPEN
    assert not b.allow_offload(0.3)
    assert "3 consecutive failed offloads" in b.reason and "UNAUTHENTICATED" in b.reason


def test_a_success_resets_the_run_of_failures() -> None:
    b = make(failure_threshold=2)
    for t in range(10):
        b.record_failure(float(t), FailureKind.DEADLINE)
        b.record_success(t + 0.5)
    assert b.state is BreakerState.CLOSED


def test_open_then_one_probe_then_closed_on_success() -> None:
    b = make(failure_threshold=1, backoff_base_s=2.0)
    b.record_failure(10.0, FailureKind.UNAVAILABLE)
    assert not b.peek(11.9) and not b.allow_offload(11.9)
    assert b.snapshot(11.0).open_until == pytest.approx(12.0)
    assert b.peek(12.0) and b.state is BreakerState.OPEN  # peeking grants nothing
    assert b.allow_offload(12.0)
    assert b.state is BreakerState.HALF_OPEN
    assert not b.allow_offload(12.0) and not b.peek(12.1)  # one probe at a time
    b.record_success(12.1)
    assert b.state is BreakerState.CLOSED and b.snapshot(12.1).level == 0
    assert b.allow_offload(12.2)
    assert "probe succeeded" in b.reason


def test_failed_probe_reopens_with_a_longer_back_off() -> None:
    b = make(failure_threshold=1, backoff_base_s=1.0, backoff_factor=2.0, backoff_max_s=100.0)
    b.record_failure(0.0, FailureKind.UNAVAILABLE)
    now = 0.0
    expected = [1.0, 2.0, 4.0, 8.0]
    for level, backoff in enumerate(expected, start=1):
        snap = b.snapshot(now)
        assert snap.state is BreakerState.OPEN and snap.level == level
        assert snap.open_until is not None and snap.open_until == pytest.approx(now + backoff)
        now = snap.open_until
        assert b.allow_offload(now)
        b.record_failure(now, FailureKind.DEADLINE)
    assert "probe failed (deadline)" in b.reason


def test_back_off_grows_by_the_factor_and_stops_at_the_cap() -> None:
    b = make(backoff_base_s=1.0, backoff_factor=1.6, backoff_max_s=30.0)
    values = [b.backoff_s(level) for level in range(1, 12)]
    assert values[:4] == pytest.approx([1.0, 1.6, 2.56, 4.096])
    assert all(b2 >= b1 for b1, b2 in zip(values, values[1:], strict=False))
    assert max(values) == 30.0 and values[-1] == 30.0
    assert b.backoff_s(10_000) == 30.0  # no overflow far past the cap
    with pytest.raises(ValueError):
        b.backoff_s(0)


def test_jitter_stays_within_its_bounds_and_spreads_devices() -> None:
    durations = []
    for seed in range(200):
        b = make(jitter=0.2, seed=seed, failure_threshold=1, backoff_base_s=10.0, backoff_max_s=10.0)
        b.record_failure(0.0, FailureKind.UNAVAILABLE)
        open_until = b.snapshot(0.0).open_until
        assert open_until is not None
        durations.append(open_until)
    assert min(durations) >= 8.0 and max(durations) <= 12.0
    assert max(durations) - min(durations) > 2.0  # devices cut off together do not probe together
    assert make(jitter=0.2, backoff_max_s=30.0).backoff_bound_s() == pytest.approx(36.0)


def test_capped_back_off_with_jitter_never_exceeds_the_bound() -> None:
    b = make(jitter=0.2, seed=3, failure_threshold=1, backoff_base_s=1.0, backoff_factor=3.0, backoff_max_s=5.0)
    b.record_failure(0.0, FailureKind.UNAVAILABLE)
    now = 0.0
    for _ in range(20):
        open_until = b.snapshot(now).open_until
        assert open_until is not None and open_until - now <= b.backoff_bound_s() + 1e-9
        now = open_until
        assert b.allow_offload(now)
        b.record_failure(now, FailureKind.UNAVAILABLE)


def test_shed_never_trips_but_holds_offloads_for_its_retry_after() -> None:
    b = make(failure_threshold=2)
    for i in range(10):
        t = 10.0 * i
        b.record_failure(t, FailureKind.SHED, retry_after_s=0.5)
        assert b.state is BreakerState.CLOSED
        assert not b.allow_offload(t + 0.4)
        assert "shed" in b.snapshot(t + 0.4).reason
        assert b.allow_offload(t + 0.5)


def test_shed_resets_the_run_of_link_failures() -> None:
    b = make(failure_threshold=2)
    b.record_failure(0.0, FailureKind.UNAVAILABLE)
    b.record_failure(1.0, FailureKind.SHED, retry_after_s=0.1)
    b.record_failure(2.0, FailureKind.UNAVAILABLE)
    assert b.state is BreakerState.CLOSED


def test_shed_hint_defaults_to_base_and_is_capped() -> None:
    b = make(backoff_base_s=2.0, backoff_max_s=5.0)
    b.record_failure(0.0, FailureKind.SHED)  # no hint: base back-off
    assert b.snapshot(0.0).hold_until == pytest.approx(2.0)
    b.record_failure(10.0, FailureKind.SHED, retry_after_s=3600.0)  # absurd hint: capped
    assert b.snapshot(10.0).hold_until == pytest.approx(15.0)


def test_shed_probe_closes_the_breaker() -> None:
    b = make(failure_threshold=1, backoff_base_s=1.0)
    b.record_failure(0.0, FailureKind.UNAVAILABLE)
    assert b.allow_offload(1.0) and b.state is BreakerState.HALF_OPEN
    b.record_failure(1.0, FailureKind.SHED, retry_after_s=0.2)
    assert b.state is BreakerState.CLOSED
    assert not b.allow_offload(1.1) and b.allow_offload(1.2)


def test_late_failures_while_open_do_not_extend_the_back_off() -> None:
    b = make(failure_threshold=1, backoff_base_s=1.0)
    b.record_failure(0.0, FailureKind.UNAVAILABLE)
    b.record_failure(0.5, FailureKind.DEADLINE)
    snap = b.snapshot(0.5)
    assert snap.open_until == pytest.approx(1.0) and snap.level == 1


def test_gauge_values() -> None:
    assert [s.gauge_value for s in (BreakerState.CLOSED, BreakerState.HALF_OPEN, BreakerState.OPEN)] == [
        0,
        1,
        2,
    ]


@pytest.mark.parametrize(
    "kw",
    [
        {"failure_threshold": 0},
        {"backoff_base_s": 0.0},
        {"backoff_factor": 0.5},
        {"backoff_base_s": 5.0, "backoff_max_s": 1.0},
        {"backoff_jitter": 1.0},
    ],
)
def test_bad_config_is_refused(kw: dict) -> None:
    with pytest.raises(ConfigError):
        BreakerConfig(**kw)


# --- evidence: the platform's link signal, late answers -------------------------------------


def test_link_down_opens_at_once_and_no_probe_goes_however_long_it_lasts() -> None:
    b = make(failure_threshold=3, backoff_base_s=1.0, backoff_max_s=30.0)
    assert b.state is BreakerState.CLOSED
    b.record_link_down(10.0, "bearer lost")
    snap = b.snapshot(10.0)
    assert snap.state is BreakerState.OPEN and "link down (bearer lost)" in snap.reason
    for t in (10.0, 11.0, 50.0, 3600.0, 1e9):
        assert not b.peek(t) and not b.allow_offload(t)
    assert b.state is BreakerState.OPEN  # no probe was granted


def test_link_down_while_half_open_also_holds_every_offload() -> None:
    b = make(failure_threshold=1, backoff_base_s=1.0)
    b.record_failure(0.0, FailureKind.UNAVAILABLE)
    assert b.allow_offload(1.0) and b.state is BreakerState.HALF_OPEN
    b.record_link_down(1.1)
    assert b.state is BreakerState.OPEN and not b.peek(100.0)


def test_link_up_lets_the_next_window_probe_at_once_and_success_closes() -> None:
    b = make(failure_threshold=3, backoff_base_s=5.0)
    b.record_link_down(10.0)
    b.record_link_up(20.0)
    assert b.state is BreakerState.OPEN and "link back" in b.reason
    assert b.peek(20.0)  # not after a back-off: now
    assert b.allow_offload(20.0) and b.state is BreakerState.HALF_OPEN
    assert not b.allow_offload(20.0)  # one probe at a time
    b.record_success(20.1)
    assert b.state is BreakerState.CLOSED and b.snapshot(20.1).level == 0 and b.allow_offload(20.2)


def test_link_up_after_a_failed_probe_backs_off_again() -> None:
    b = make(failure_threshold=3, backoff_base_s=2.0, backoff_factor=2.0)
    b.record_link_down(0.0)
    b.record_link_up(1.0)
    assert b.allow_offload(1.0)
    b.record_failure(1.0, FailureKind.DEADLINE)
    snap = b.snapshot(1.0)
    assert snap.state is BreakerState.OPEN and snap.level == 2
    assert snap.open_until == pytest.approx(1.0 + 4.0) and not b.peek(4.9) and b.peek(5.0)


def test_link_up_without_a_link_down_changes_nothing() -> None:
    closed = make()
    closed.record_link_up(1.0)
    assert closed.state is BreakerState.CLOSED and closed.reason == "no failures yet"
    backing_off = make(failure_threshold=1, backoff_base_s=4.0)
    backing_off.record_failure(0.0, FailureKind.UNAVAILABLE)
    backing_off.record_link_up(1.0)  # the cloud failed, not the link: the back-off stands
    assert not backing_off.peek(3.9) and backing_off.peek(4.0)


def test_late_answers_count_towards_the_failure_threshold() -> None:
    b = make(failure_threshold=3)
    b.record_failure(0.0, FailureKind.LATE)
    b.record_failure(1.0, FailureKind.LATE, detail="no answer after 60 ms (25 ms expected)")
    assert b.state is BreakerState.CLOSED
    b.record_failure(2.0, "late")
    assert b.state is BreakerState.OPEN and "3 consecutive failed offloads, last late" in b.reason
    assert b.snapshot(2.0).consecutive_failures == 3


def test_late_answers_mix_with_other_failures_and_a_success_resets_them() -> None:
    b = make(failure_threshold=3)
    b.record_failure(0.0, FailureKind.LATE)
    b.record_success(0.5)
    b.record_failure(1.0, FailureKind.LATE)
    b.record_failure(2.0, FailureKind.DEADLINE)
    assert b.state is BreakerState.CLOSED
    b.record_failure(3.0, FailureKind.LATE)
    assert b.state is BreakerState.OPEN


def test_link_up_allows_the_probe_even_to_a_clock_read_before_it() -> None:
    # the runtime reads its clock when a window starts, then syncs the link signal, then peeks
    b = make(backoff_base_s=5.0)
    b.record_link_down(10.0)
    b.record_link_up(20.0)
    assert b.peek(19.999) and b.allow_offload(19.999)
