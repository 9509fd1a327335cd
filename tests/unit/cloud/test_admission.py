"""cloud.admission: queue or shed, from the lane's load and the window's remaining deadline."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cloud.admission import AdmissionPolicy, Ewma, LaneLoad, admit
from splitsense.errors import ConfigError

POLICY = AdmissionPolicy(max_batch_size=8, max_batch_wait_ms=2.0, max_inflight_batches=2, max_queue_depth=100)


def test_idle_lane_admits_with_one_service_time() -> None:
    a = admit(LaneLoad(queued=0, inflight_batches=0, batch_service_ms=10.0), 300.0, POLICY)
    assert a.admitted
    assert a.predicted_ms == pytest.approx(10.0)  # no fill wait on an idle lane
    assert a.retry_after_ms == 0
    assert "0 queued" in a.reason


def test_busy_lane_adds_the_fill_wait() -> None:
    a = admit(LaneLoad(queued=1, inflight_batches=1, batch_service_ms=10.0), 300.0, POLICY)
    assert a.admitted
    assert a.predicted_ms == pytest.approx(2.0 + 10.0)


def test_full_batch_does_not_wait_to_fill() -> None:
    a = admit(LaneLoad(queued=7, inflight_batches=1, batch_service_ms=10.0), 300.0, POLICY)
    assert a.predicted_ms == pytest.approx(10.0)  # 7 + this one = a full batch of 8


def test_rounds_count_batches_ahead_over_slots() -> None:
    # 2 running + 24 queued (3 full batches) ahead: 5 batches before ours -> 5 // 2 + 1 = 3 rounds.
    load = LaneLoad(queued=24, inflight_batches=2, batch_service_ms=10.0)
    a = admit(load, 300.0, POLICY)
    assert a.predicted_ms == pytest.approx(2.0 + 3 * 10.0)


def test_sheds_when_the_deadline_cannot_be_met() -> None:
    load = LaneLoad(queued=24, inflight_batches=2, batch_service_ms=10.0)
    a = admit(load, 20.0, POLICY)
    assert not a.admitted
    assert a.predicted_ms == pytest.approx(32.0)
    assert a.retry_after_ms == 30  # the backlog drains in 3 rounds of 10 ms
    assert "32.0 ms > 20.0 ms" in a.reason and "24 queued" in a.reason and a.reason.startswith("shed:")


def test_queue_full_sheds_whatever_the_deadline() -> None:
    a = admit(LaneLoad(queued=100, inflight_batches=0, batch_service_ms=1.0), 10_000.0, POLICY)
    assert not a.admitted
    assert "queue full" in a.reason and "limit 100" in a.reason


def test_retry_hint_is_bounded() -> None:
    policy = AdmissionPolicy(
        max_batch_size=1,
        max_batch_wait_ms=0,
        max_inflight_batches=1,
        max_queue_depth=10**6,
        min_retry_after_ms=10,
        max_retry_after_ms=500,
    )
    tiny = admit(LaneLoad(queued=1, inflight_batches=0, batch_service_ms=0.1), 0.01, policy)
    assert not tiny.admitted and tiny.retry_after_ms == 10
    huge = admit(LaneLoad(queued=10_000, inflight_batches=1, batch_service_ms=100.0), 1.0, policy)
    assert not huge.admitted and huge.retry_after_ms == 500


def test_idle_lane_probes_even_when_the_estimate_is_stale() -> None:
    # After an outage, timed-out batches leave a huge service estimate; an idle lane must still try
    # (it delays nobody), or it would shed forever and never measure the recovered tail.
    stale = LaneLoad(queued=0, inflight_batches=0, batch_service_ms=5_000.0, estimate_age_ms=1_500.0)
    a = admit(stale, 300.0, POLICY)
    assert a.admitted and "probe" in a.reason
    fresh = LaneLoad(queued=0, inflight_batches=0, batch_service_ms=5_000.0, estimate_age_ms=10.0)
    assert not admit(fresh, 300.0, POLICY).admitted  # a recent slow batch: shed at once
    busy = LaneLoad(queued=1, inflight_batches=1, batch_service_ms=5_000.0, estimate_age_ms=1_500.0)
    assert not admit(busy, 300.0, POLICY).admitted


def test_with_the_brokers_own_tail_an_idle_lane_admits_whatever_the_backend_estimate() -> None:
    inflated = LaneLoad(queued=0, inflight_batches=0, batch_service_ms=5_000.0, runs_local_when_idle=True)
    a = admit(inflated, 300.0, POLICY)
    assert a.admitted and "broker's own tail" in a.reason
    # Busy only with its own tail and a stale backend estimate: the next window probes the backend
    # (found by the fault test: otherwise the estimate of an outage never came down).
    busy_local = LaneLoad(
        queued=0, inflight_batches=1, batch_service_ms=5_000.0, estimate_age_ms=1_500.0,
        local_batches=1, runs_local_when_idle=True,
    )  # fmt: skip
    p = admit(busy_local, 300.0, POLICY)
    assert p.admitted and "probe" in p.reason
    busy_backend = LaneLoad(
        queued=0, inflight_batches=1, batch_service_ms=5_000.0, estimate_age_ms=1_500.0,
        local_batches=0, runs_local_when_idle=True,
    )  # fmt: skip
    assert not admit(busy_backend, 300.0, POLICY).admitted  # a backend batch is already measuring it


def test_ewma_reset_starts_from_the_sample() -> None:
    e = Ewma(0.2, 10.0)
    for _ in range(5):
        e.update(1_000.0)
    assert e.reset(12.0) == 12.0 and e.samples == 1
    assert e.reset(math.nan) == 12.0


def test_no_time_left_is_shed() -> None:
    a = admit(LaneLoad(queued=0, inflight_batches=0, batch_service_ms=5.0), 0.0, POLICY)
    assert not a.admitted


@given(
    queued=st.integers(0, 1000),
    inflight=st.integers(0, 4),
    service=st.floats(0, 1000, allow_nan=False),
    remaining=st.floats(-10, 5000, allow_nan=False),
)
def test_decisions_are_consistent(queued: int, inflight: int, service: float, remaining: float) -> None:
    load = LaneLoad(queued=queued, inflight_batches=inflight, batch_service_ms=service)
    a = admit(load, remaining, POLICY)
    if a.admitted:
        assert a.predicted_ms <= remaining and queued < POLICY.max_queue_depth and a.retry_after_ms == 0
    else:
        assert POLICY.min_retry_after_ms <= a.retry_after_ms <= POLICY.max_retry_after_ms
    # More waiting ahead never makes a window more welcome.
    more = admit(LaneLoad(queued=queued + 8, inflight_batches=inflight, batch_service_ms=service), remaining, POLICY)
    assert more.predicted_ms >= a.predicted_ms
    assert not (more.admitted and not a.admitted)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_batch_size": 0},
        {"max_inflight_batches": 0},
        {"max_queue_depth": 0},
        {"max_batch_wait_ms": -1.0},
        {"min_retry_after_ms": 20, "max_retry_after_ms": 10},
    ],
)
def test_policy_checks_its_values(kwargs: dict[str, float]) -> None:
    base = {"max_batch_size": 8, "max_batch_wait_ms": 2.0, "max_inflight_batches": 2, "max_queue_depth": 100}
    with pytest.raises(ConfigError):
        AdmissionPolicy(**{**base, **kwargs})  # type: ignore[arg-type]


def test_ewma_prior_then_first_sample_then_blend() -> None:
    e = Ewma(alpha=0.5, initial=10.0)
    assert e.value == 10.0 and e.samples == 0
    assert e.update(20.0) == 20.0  # the first measurement replaces the prior
    assert e.update(10.0) == pytest.approx(15.0)
    assert e.update(math.nan) == pytest.approx(15.0)  # ignored
    assert e.samples == 2


def test_ewma_checks_alpha() -> None:
    with pytest.raises(ConfigError):
        Ewma(alpha=0.0, initial=1.0)


def test_the_probe_interval_is_the_brokers_to_set() -> None:
    from splitsense.config import BrokerConfig

    assert BrokerConfig().admission_probe_after_ms == AdmissionPolicy(1, 0.0, 1, 1).probe_after_ms
    with pytest.raises(ConfigError, match="broker.admission_probe_after_ms"):
        BrokerConfig(admission_probe_after_ms=0.0)
    stale = LaneLoad(queued=0, inflight_batches=0, batch_service_ms=900.0, estimate_age_ms=5_000.0)
    assert admit(stale, 300.0, POLICY).admitted  # a probe after 1 s (the default)
    patient = AdmissionPolicy(8, 2.0, 2, 100, probe_after_ms=30_000.0)
    assert not admit(stale, 300.0, patient).admitted  # shed until 30 s have passed
