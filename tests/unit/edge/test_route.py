"""The pure route decision of one window and the hedge delay: every branch, no I/O."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from edge.breaker import BreakerState, FailureKind
from edge.route import FallbackKind, Route, RouteInputs, decide_route, hedge_after_s

# A closed breaker, the link up, a transport, a cut inside the model: the window offloads.
OFFLOADABLE = RouteInputs(
    cut=3,
    n_stages=6,
    plan_why="row for 2-5 Mbit/s",
    local_fallback=True,
    has_transport=True,
    link_up=True,
    breaker=BreakerState.CLOSED,
    breaker_allows=True,
    breaker_reason="no failures yet",
)


def decide(**kw: object) -> tuple[Route, FallbackKind | None, str]:
    d = decide_route(replace(OFFLOADABLE, **kw))  # type: ignore[arg-type]
    return d.route, d.kind, d.reason


def test_closed_breaker_offloads() -> None:
    assert decide() == (Route.OFFLOAD, None, "")


@pytest.mark.parametrize("local_fallback", [True, False])
def test_closed_breaker_offloads_with_or_without_local_fallback(local_fallback: bool) -> None:
    assert decide(local_fallback=local_fallback)[:2] == (Route.OFFLOAD, None)


def test_plan_keeping_the_whole_model_runs_local_and_says_why() -> None:
    route, kind, reason = decide(cut=6, link_up=False, has_transport=False)  # the plan wins over the rest
    assert (route, kind) == (Route.LOCAL, FallbackKind.PLAN)
    assert "row for 2-5 Mbit/s" in reason


def test_without_local_fallback_a_local_plan_is_not_local() -> None:
    # such a device cannot finish a window itself; the runtime sends it at its deepest cut instead
    assert decide(cut=6, local_fallback=False)[:2] == (Route.OFFLOAD, None)


@pytest.mark.parametrize(("local_fallback", "route"), [(True, Route.LOCAL), (False, Route.STORE)])
def test_no_broker(local_fallback: bool, route: Route) -> None:
    got = decide(has_transport=False, local_fallback=local_fallback, breaker=BreakerState.OPEN, breaker_allows=False)
    assert got[:2] == (route, FallbackKind.NO_BROKER)


@pytest.mark.parametrize(("local_fallback", "route"), [(True, Route.LOCAL), (False, Route.STORE)])
def test_link_down(local_fallback: bool, route: Route) -> None:
    got = decide(link_up=False, local_fallback=local_fallback, breaker=BreakerState.OPEN, breaker_allows=True)
    assert got[:2] == (route, FallbackKind.LINK_DOWN)  # before the breaker: no probe into a dead link
    assert "link down" in got[2]


@pytest.mark.parametrize(("local_fallback", "route"), [(True, Route.LOCAL), (False, Route.STORE)])
@pytest.mark.parametrize("state", list(BreakerState))
def test_breaker_not_allowing(local_fallback: bool, route: Route, state: BreakerState) -> None:
    # open and backing off, half open (a probe is out), or closed but holding after a shed
    got = decide(breaker=state, breaker_allows=False, breaker_reason="3 failures", local_fallback=local_fallback)
    assert got[:2] == (route, FallbackKind.BREAKER)
    assert state.value in got[2] and "3 failures" in got[2]


def test_open_breaker_past_its_back_off_probes_in_the_background() -> None:
    route, kind, reason = decide(breaker=BreakerState.OPEN, breaker_allows=True)
    assert (route, kind) == (Route.PROBE, FallbackKind.PROBING)
    assert "probing" in reason


def test_open_breaker_past_its_back_off_without_local_fallback_stores() -> None:
    # the drain task's oldest stored window is the probe, not this one
    got = decide(breaker=BreakerState.OPEN, breaker_allows=True, local_fallback=False, breaker_reason="link back")
    assert got[:2] == (Route.STORE, FallbackKind.BREAKER) and "link back" in got[2]


def test_half_open_without_local_fallback_stores() -> None:
    got = decide(breaker=BreakerState.HALF_OPEN, breaker_allows=True, local_fallback=False)
    assert got[:2] == (Route.STORE, FallbackKind.BREAKER)


def test_every_failure_has_a_fallback_kind() -> None:
    for kind in FailureKind:
        assert FallbackKind.of_failure(kind).value == kind.value


# --- hedge_after_s --------------------------------------------------------------------------


def test_hedge_is_the_factor_times_the_expected_time() -> None:
    assert hedge_after_s(0.100, 0.001, 0.3, 2.0, 0.030) == pytest.approx(0.200)


def test_hedge_is_at_least_the_margin_after_the_expected_time() -> None:
    assert hedge_after_s(0.020, 0.001, 0.3, 2.0, 0.030) == pytest.approx(0.050)  # 2 x 20 ms < 20 + 30 ms


def test_hedge_is_at_least_three_sigma_after_the_expected_time() -> None:
    assert hedge_after_s(0.020, 0.025, 0.3, 2.0, 0.030) == pytest.approx(0.095)  # 20 ms + 3 x 25 ms
    assert hedge_after_s(0.020, -1.0, 0.3, 2.0, 0.030) == pytest.approx(0.050)  # a negative sigma counts as 0


def test_hedge_never_waits_past_the_deadline() -> None:
    assert hedge_after_s(0.200, 0.001, 0.3, 2.0, 0.030) == 0.3
    assert hedge_after_s(0.050, 1.0, 0.3, 2.0, 0.030) == 0.3


@pytest.mark.parametrize("factor", [0.0, -1.0])
def test_factor_zero_turns_hedging_off(factor: float) -> None:
    assert hedge_after_s(0.010, 0.0, 0.3, factor, 0.030) == 0.3


@pytest.mark.parametrize("expected", [math.inf, math.nan])
def test_unknown_expected_time_waits_for_the_deadline(expected: float) -> None:
    assert hedge_after_s(expected, 0.0, 0.3, 2.0, 0.030) == 0.3
