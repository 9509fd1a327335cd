"""The link estimator (a Kalman filter on rtt and seconds per Mbit): pure, on a scripted clock.

Every transfer's time is scripted from the model the estimator inverts (pipelines/tcp.py: gRPC and
TCP/IP framing, slow start after idle): the round trip, the request's bytes under slow start at
the true rate, the answer's bytes at the same rate, plus whatever the test adds (the cloud's time,
a promotion, a stall).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pytest

from edge.estimator import LinkEstimator
from pipelines.tcp import burst_completion_s, wire_bytes
from splitsense.config import EstimatorConfig

# (bytes up, bytes down): a telemetry-like report, a 4 KB and a 16 KB offload with their answers
TELEMETRY, SMALL, LARGE = (300, 8), (4000, 40), (16000, 40)
MIXED = (TELEMETRY, SMALL, TELEMETRY, LARGE)


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def make(hint_mbps: float | None = None, **kw: object) -> tuple[LinkEstimator, Clock]:
    clock = Clock()
    return LinkEstimator(EstimatorConfig(**kw), clock, hint_mbps=hint_mbps), clock  # type: ignore[arg-type]


def network_s(bytes_up: int, bytes_down: int, mbps: float, rtt_s: float) -> float:
    """The true network time of one request/response: what the estimator should learn to predict.
    The answer comes back on an unshaped downlink (as on the simulator's links): its bytes cost
    no serialisation time."""
    del bytes_down
    up = wire_bytes(bytes_up)
    return rtt_s + burst_completion_s(up, rtt_s, mbps)


def feed(
    est: LinkEstimator,
    clock: Clock,
    sizes: Sequence[tuple[int, int]],
    n: int,
    mbps: float,
    rtt_s: float,
    *,
    every_s: float = 1.0,
    server_s: float = 0.0,
) -> list[float]:
    """`n` transfers cycling through `sizes`, one every `every_s`; the bandwidth estimate after each."""
    out = []
    for i in range(n):
        clock.t += every_s
        up, down = sizes[i % len(sizes)]
        est.record_transfer(up, down, network_s(up, down, mbps, rtt_s) + server_s, server_s)
        out.append(est.bandwidth_mbps)
    return out


def test_prior_before_any_transfer() -> None:
    est, clock = make(prior_bandwidth_mbps=3.0, prior_rtt_ms=40.0, prior_rel_std=0.5)
    e = est.estimate()
    assert (e.bandwidth_mbps, e.rtt_ms, e.bandwidth_samples, e.rtt_samples) == (3.0, 40.0, 0, 0)
    assert e.bandwidth_rel_std == pytest.approx(0.5)
    clock.t += 5.0
    assert (est.bandwidth_mbps, est.rtt_ms) == (3.0, 40.0)  # time alone moves nothing


@pytest.mark.parametrize(("mbps", "rtt_ms"), [(0.5, 100.0), (1.0, 80.0), (3.0, 50.0), (5.0, 40.0), (20.0, 20.0)])
def test_converges_to_the_true_rate_and_rtt_on_mixed_sizes(mbps: float, rtt_ms: float) -> None:
    est, clock = make()
    feed(est, clock, MIXED, 20, mbps, rtt_ms / 1000)
    e = est.estimate()
    # at 20 Mbit/s a 4 KB call is on the air for 1.6 ms of 22: the rate is only roughly observable
    assert e.bandwidth_mbps == pytest.approx(mbps, rel=0.10 if mbps < 10 else 0.20)
    assert e.rtt_ms == pytest.approx(rtt_ms, rel=0.10)
    assert (e.bandwidth_samples, e.rtt_samples) == (10, 20)  # the 4 KB and 16 KB ones inform the rate
    assert e.bandwidth_rel_std < 1.0  # narrower than the prior


def test_server_time_is_not_link_time() -> None:
    slow_cloud, c1 = make()
    fast_cloud, c2 = make()
    feed(slow_cloud, c1, MIXED, 12, 3.0, 0.05, server_s=0.4)
    feed(fast_cloud, c2, MIXED, 12, 3.0, 0.05)
    assert slow_cloud.bandwidth_mbps == pytest.approx(fast_cloud.bandwidth_mbps, rel=1e-6)
    assert slow_cloud.rtt_ms == pytest.approx(fast_cloud.rtt_ms, rel=1e-6)


def _promoted(pass_promotion: bool) -> LinkEstimator:
    """WiFi's 79 ms promotion on a 20 ms, 5 Mbit/s link, paid by every other call (those after an
    idle gap longer than the tail)."""
    est, clock = make()
    for i in range(24):
        clock.t += 1.0
        up, down = MIXED[i % len(MIXED)]
        promotion = 0.0791 if i % 2 == 0 else 0.0
        elapsed = network_s(up, down, 5.0, 0.020) + promotion
        est.record_transfer(up, down, elapsed, 0.0, promotion if pass_promotion else 0.0)
    return est


def test_a_promotion_the_call_paid_is_not_link_time() -> None:
    e = _promoted(pass_promotion=True).estimate()
    assert e.bandwidth_mbps == pytest.approx(5.0, rel=0.10)
    assert e.rtt_ms == pytest.approx(20.0, rel=0.10)


def test_slow_start_rounds_are_accounted() -> None:
    # 60 KB at 20 Mbit/s, 50 ms: the serialisation is 25 ms, slow start adds two round trips.
    sizes = (TELEMETRY, (60_000, 40))
    est, clock = make()
    feed(est, clock, sizes, 20, 20.0, 0.050)
    assert est.bandwidth_mbps == pytest.approx(20.0, rel=0.15)
    assert est.rtt_ms == pytest.approx(50.0, rel=0.10)
    naive, clock = make(slow_start=False)  # the extra rounds read as a slow link
    feed(naive, clock, sizes, 20, 20.0, 0.050)
    assert naive.bandwidth_mbps < 0.5 * 20.0


def test_tracks_a_step_change_of_the_rate_within_a_few_samples() -> None:
    est, clock = make()
    feed(est, clock, MIXED, 20, 3.0, 0.05)
    assert est.bandwidth_mbps == pytest.approx(3.0, rel=0.10)
    after = feed(est, clock, MIXED, 12, 0.5, 0.05)
    # a few samples: one call moves the rate by 2x at most, and the first 6x-slower call is a stall
    assert after[5] == pytest.approx(0.5, rel=0.5)
    assert all(v == pytest.approx(0.5, rel=0.10) for v in after[7:])
    assert est.rtt_ms == pytest.approx(50.0, rel=0.10)


@pytest.mark.parametrize("at", [0, 1, 3])  # the stall hits a telemetry report, a 4 KB or a 16 KB offload
def test_one_outlier_moves_the_estimate_by_a_bounded_amount(at: int) -> None:
    est, clock = make()
    feed(est, clock, MIXED, 20, 3.0, 0.05)
    before = est.bandwidth_mbps
    clock.t += 1.0
    up, down = MIXED[at]
    est.record_transfer(up, down, network_s(up, down, 3.0, 0.05) + 0.200)  # one event-loop stall
    assert before / 10 < est.bandwidth_mbps <= before * 1.01  # slower, but not off the scale
    i = MIXED.index((up, down))
    rest = [MIXED[(i + 1 + j) % len(MIXED)] for j in range(12)]
    after = feed(est, clock, rest, 12, 3.0, 0.05)
    assert after[-1] == pytest.approx(3.0, rel=0.10)  # and it recovers


def test_the_samples_after_an_outlier_stay_within_a_factor_of_two() -> None:
    est, clock = make()
    feed(est, clock, MIXED, 20, 3.0, 0.05)  # the next is a telemetry report
    clock.t += 1.0
    est.record_transfer(*TELEMETRY, network_s(*TELEMETRY, 3.0, 0.05) + 0.200)
    after = feed(est, clock, (SMALL, TELEMETRY, LARGE, TELEMETRY), 8, 3.0, 0.05)
    assert all(1.5 < v < 6.0 for v in after), after


def test_a_call_given_up_is_a_lower_bound_on_its_time() -> None:
    est, clock = make()
    feed(est, clock, MIXED, 20, 3.0, 0.05)
    clock.t += 1.0
    predicted, _ = est.expected_network_s(*SMALL)
    state = (est.bandwidth_mbps, est.rtt_ms)
    assert est.record_lower_bound(*SMALL, 0.5 * predicted) is None  # says nothing the estimate did not
    assert est.record_lower_bound(*SMALL, predicted + 0.05, server_s=0.03, promotion_s=0.03) is None
    assert (est.bandwidth_mbps, est.rtt_ms) == state
    assert est.record_lower_bound(*SMALL, predicted + 0.05) is not None  # the link is slower than believed
    assert est.expected_network_s(*SMALL)[0] > predicted
    assert est.bandwidth_mbps < state[0]


def test_silence_longer_than_max_sample_age_resets_to_the_prior() -> None:
    est, clock = make(prior_bandwidth_mbps=2.0, prior_rtt_ms=50.0, max_sample_age_s=30.0)
    feed(est, clock, MIXED, 8, 0.3, 0.150)
    assert est.bandwidth_mbps < 0.5 and est.rtt_ms > 100.0
    clock.t += 29.0
    assert est.bandwidth_mbps < 0.5
    assert est.estimate().rtt_samples > 0
    clock.t += 2.0
    e = est.estimate()
    assert (e.bandwidth_mbps, e.rtt_ms, e.bandwidth_samples, e.rtt_samples) == (2.0, 50.0, 0, 0)
    feed(est, clock, MIXED, 12, 0.3, 0.150)  # learns the link again from the prior
    assert est.bandwidth_mbps == pytest.approx(0.3, rel=0.10)


def test_silence_resets_to_the_prior_even_when_the_estimate_is_read_meanwhile() -> None:
    # The runtime reads the estimate every window (to pick its plan row) even when it sends nothing.
    est, clock = make(prior_bandwidth_mbps=2.0, prior_rtt_ms=50.0, max_sample_age_s=30.0)
    feed(est, clock, MIXED, 8, 0.3, 0.150)
    for _ in range(40):
        clock.t += 1.0
        est.estimate()
        _ = est.bandwidth_mbps
    e = est.estimate()
    assert (e.bandwidth_mbps, e.rtt_ms, e.bandwidth_samples, e.rtt_samples) == (2.0, 50.0, 0, 0)


def test_the_platform_hint_is_the_prior() -> None:
    est, clock = make(hint_mbps=8.0, prior_bandwidth_mbps=2.0, max_sample_age_s=30.0)
    assert est.bandwidth_mbps == 8.0 and est.estimate().bandwidth_samples == 0
    feed(est, clock, MIXED, 12, 1.0, 0.05)
    assert est.bandwidth_mbps == pytest.approx(1.0, rel=0.10)
    clock.t += 31.0
    assert est.bandwidth_mbps == 8.0  # silence: back to the hint, not the configured prior
    est.set_hint(None)
    feed(est, clock, MIXED, 1, 1.0, 0.05)
    clock.t += 31.0
    assert est.bandwidth_mbps == 2.0
    for bad in (0.0, -1.0, math.nan, math.inf):
        est.set_hint(bad)  # no usable hint: the configured prior
        clock.t += 31.0
        assert est.bandwidth_mbps == 2.0
    assert LinkEstimator(EstimatorConfig(prior_bandwidth_mbps=2.0), Clock(), hint_mbps=0.0).bandwidth_mbps == 2.0


@pytest.mark.parametrize("size", [(0, 0), (300, 8), (4000, 40), (16000, 40), (60_000, 40), (250_000, 100)])
def test_expected_network_time_is_the_model_at_the_current_estimate(size: tuple[int, int]) -> None:
    est, clock = make()
    prior_s, prior_sigma = est.expected_network_s(*size)
    assert prior_s == pytest.approx(network_s(*size, 2.0, 0.050), rel=1e-9)
    feed(est, clock, MIXED, 7, 4.0, 0.030)  # part way: the state is not the truth yet
    mbps, rtt_s = est.bandwidth_mbps, est.rtt_ms / 1000
    expected, sigma = est.expected_network_s(*size)
    assert expected == pytest.approx(network_s(*size, mbps, rtt_s), rel=1e-9)
    assert 0 < sigma < prior_sigma  # evidence narrows the spread
    feed(est, clock, MIXED, 20, 4.0, 0.030)
    assert est.expected_network_s(*size)[0] == pytest.approx(network_s(*size, 4.0, 0.030), rel=0.05)


def test_loopback_speed_is_capped_not_infinite() -> None:
    est, clock = make(prior_rtt_ms=1.0)
    for _ in range(5):
        clock.t += 1.0
        est.record_transfer(10_000_000, 0, 1e-6)
    assert math.isfinite(est.bandwidth_mbps) and est.bandwidth_mbps <= 100_000.0


@pytest.mark.parametrize(
    "args",
    [
        (-1, 0, 0.1),
        (10, -1, 0.1),
        (1.5, 0, 0.1),
        (True, 0, 0.1),
        (10, 0, -0.1),
        (10, 0, math.nan),
        (10, 0, math.inf),
        (10, 0, 0.1, -0.01),
        (10, 0, 0.1, math.inf),
        (10, 0, 0.1, 0.0, -0.01),
        (10, 0, 0.1, 0.0, math.nan),
    ],
)
def test_bad_arguments_are_refused(args: tuple) -> None:
    est, _ = make()
    with pytest.raises(ValueError):
        est.record_transfer(*args)
    assert est.estimate().rtt_samples == 0  # and nothing was recorded
    with pytest.raises(ValueError):
        est.record_rtt(-0.001)
