"""The bandwidth/RTT estimator: pure, on a fake clock."""

from __future__ import annotations

import math

import pytest

from edge.estimator import LinkEstimator
from splitsense.config import EstimatorConfig


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def make(**kw: float) -> tuple[LinkEstimator, Clock]:
    clock = Clock()
    return LinkEstimator(EstimatorConfig(**kw), clock), clock  # type: ignore[arg-type]


def transfer_s(nbytes: int, mbps: float, rtt_ms: float, server_s: float = 0.0) -> float:
    """What a transfer of nbytes at mbps would take end to end."""
    return nbytes * 8 / (mbps * 1e6) + rtt_ms / 1000 + server_s


def test_prior_before_any_transfer() -> None:
    est, _ = make(prior_bandwidth_mbps=3.0, prior_rtt_ms=40.0)
    e = est.estimate()
    assert (e.bandwidth_mbps, e.rtt_ms, e.bandwidth_samples, e.rtt_samples) == (3.0, 40.0, 0, 0)


def test_large_transfer_measures_bandwidth_with_rtt_and_server_time_removed() -> None:
    est, _ = make(prior_rtt_ms=50.0)
    # 100 kB at 4 Mbit/s = 0.2 s on the wire, plus 50 ms of RTT and 30 ms in the cloud
    sample = est.record_transfer(100_000, 0, transfer_s(100_000, 4.0, 50.0, 0.030), server_s=0.030)
    assert sample.bandwidth_mbps == pytest.approx(4.0)
    assert sample.rtt_ms is None
    assert est.bandwidth_mbps == pytest.approx(4.0)


def test_server_time_is_not_counted_as_network_time() -> None:
    slow_cloud, _ = make()
    fast_cloud, _ = make()
    slow_cloud.record_transfer(100_000, 0, transfer_s(100_000, 4.0, 50.0, 0.5), server_s=0.5)
    fast_cloud.record_transfer(100_000, 0, transfer_s(100_000, 4.0, 50.0, 0.0), server_s=0.0)
    assert slow_cloud.bandwidth_mbps == pytest.approx(fast_cloud.bandwidth_mbps)


def test_harmonic_mean_is_dominated_by_slow_samples() -> None:
    est, _ = make(prior_rtt_ms=10.0, window_samples=5)
    rates = [1.0, 10.0, 10.0, 10.0, 10.0]
    for mbps in rates:
        est.record_transfer(50_000, 0, transfer_s(50_000, mbps, 10.0))
    harmonic = len(rates) / sum(1 / r for r in rates)
    assert est.bandwidth_mbps == pytest.approx(harmonic)
    assert est.bandwidth_mbps < sum(rates) / len(rates)  # well below the arithmetic mean (8.2)
    assert est.bandwidth_mbps == pytest.approx(50 / 14)


def test_only_the_last_window_samples_count() -> None:
    est, _ = make(prior_rtt_ms=10.0, window_samples=3)
    for mbps in (0.5, 0.5, 8.0, 8.0, 8.0):
        est.record_transfer(50_000, 0, transfer_s(50_000, mbps, 10.0))
    assert est.bandwidth_mbps == pytest.approx(8.0)
    assert est.estimate().bandwidth_samples == 3


def test_small_transfers_are_rtt_samples_smoothed_as_rfc6298() -> None:
    est, _ = make(prior_rtt_ms=50.0, min_bandwidth_sample_bytes=4096)
    first = est.record_transfer(1024, 40, 0.020)
    assert first.bandwidth_mbps is None and first.rtt_ms == pytest.approx(20.0)
    assert est.rtt_ms == pytest.approx(20.0)  # the first sample sets SRTT
    est.record_transfer(1024, 40, 0.060)
    assert est.rtt_ms == pytest.approx(0.875 * 20.0 + 0.125 * 60.0)
    assert est.bandwidth_mbps == est.config.prior_bandwidth_mbps  # small transfers say nothing of it


def test_transfer_faster_than_the_rtt_estimate_is_an_rtt_sample() -> None:
    est, _ = make(prior_rtt_ms=50.0)
    sample = est.record_transfer(100_000, 0, 0.010)  # 10 ms < 50 ms: no time left for the bytes
    assert sample.bandwidth_mbps is None
    assert est.rtt_ms == pytest.approx(10.0)


def test_old_samples_expire_back_to_the_prior() -> None:
    est, clock = make(prior_bandwidth_mbps=2.0, prior_rtt_ms=50.0, max_sample_age_s=30.0)
    est.record_transfer(100_000, 0, transfer_s(100_000, 0.2, 50.0))
    est.record_transfer(100, 0, 0.005)
    assert est.bandwidth_mbps < 1.0
    clock.t += 29.0
    assert est.bandwidth_mbps < 1.0
    clock.t += 2.0
    e = est.estimate()
    assert (e.bandwidth_mbps, e.rtt_ms, e.bandwidth_samples, e.rtt_samples) == (2.0, 50.0, 0, 0)
    est.record_transfer(100, 0, 0.080)  # a fresh sample after the gap restarts SRTT
    assert est.rtt_ms == pytest.approx(80.0)


def test_loopback_speed_is_capped_not_infinite() -> None:
    est, _ = make(prior_rtt_ms=0.001)
    est.record_transfer(10_000_000, 0, 1e-7)
    assert math.isfinite(est.bandwidth_mbps)


@pytest.mark.parametrize(
    "args",
    [
        (-1, 0, 0.1, 0.0),
        (10, 0, -0.1, 0.0),
        (10, 0, math.nan, 0.0),
        (10, 0, 0.1, math.inf),
        (1.5, 0, 0.1, 0.0),
    ],
)
def test_bad_arguments_are_refused(args: tuple) -> None:
    est, _ = make()
    with pytest.raises(ValueError):
        est.record_transfer(*args)
