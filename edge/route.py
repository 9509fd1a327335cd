"""What one window does (local, offload, probe or store) and why: pure decisions, no I/O.

`decide_route` is the whole decision the runtime takes for a window once its front has run; the
runtime (edge/runtime.py) only carries it out. `hedge_after_s` says when a window whose answer is
late relative to the link estimate stops waiting for it and starts its local tail. Every window
that does not end with the cloud's answer carries a `FallbackKind`: typed, so nothing parses text.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum

from edge.breaker import BreakerState
from splitsense.kinds import FallbackKind

__all__ = ["FallbackKind", "Route", "RouteDecision", "RouteInputs", "decide_route", "hedge_after_s"]


class Route(StrEnum):
    LOCAL = "local"  # finish the window here
    OFFLOAD = "offload"  # send the activation and wait for the answer (hedged)
    PROBE = "probe"  # finish here, and send the activation in the background as the breaker's probe
    STORE = "store"  # a device without local fallback that cannot send now: keep it for later


@dataclass(frozen=True)
class RouteInputs:
    cut: int  # the chosen cut (n_stages: the plan keeps the whole model here)
    n_stages: int
    plan_why: str  # why the plan (or policy) chose that cut
    local_fallback: bool  # False: the device cannot finish a window itself (edge/store.py)
    has_transport: bool
    link_up: bool  # the platform's link signal
    breaker: BreakerState
    breaker_allows: bool  # CircuitBreaker.peek(now): an offload (or the probe) may go now
    breaker_reason: str


@dataclass(frozen=True)
class RouteDecision:
    route: Route
    kind: FallbackKind | None  # why not offloaded (None for OFFLOAD)
    reason: str


def decide_route(i: RouteInputs) -> RouteDecision:
    """The route of one window. A device without local fallback never gets LOCAL or PROBE: what it
    cannot send now it stores (its drain task probes with the oldest stored window)."""
    not_now = Route.LOCAL if i.local_fallback else Route.STORE
    if i.local_fallback and i.cut >= i.n_stages:
        return RouteDecision(Route.LOCAL, FallbackKind.PLAN, f"plan keeps the whole model on the device: {i.plan_why}")
    if not i.has_transport:
        return RouteDecision(not_now, FallbackKind.NO_BROKER, "no broker: running local only")
    if not i.link_up:
        return RouteDecision(not_now, FallbackKind.LINK_DOWN, "link down: the radio has no association or bearer")
    if not i.breaker_allows:
        return RouteDecision(not_now, FallbackKind.BREAKER, f"circuit breaker {i.breaker.value}: {i.breaker_reason}")
    if i.breaker is BreakerState.OPEN:  # its back-off has passed: this window carries the probe
        if i.local_fallback:
            return RouteDecision(
                Route.PROBE,
                FallbackKind.PROBING,
                "circuit breaker half open: probing the cloud in the background; this window runs locally",
            )
        return RouteDecision(Route.STORE, FallbackKind.BREAKER, f"circuit breaker open: {i.breaker_reason}")
    if i.breaker is not BreakerState.CLOSED and not i.local_fallback:  # a stored window is the probe
        return RouteDecision(
            Route.STORE, FallbackKind.BREAKER, f"circuit breaker {i.breaker.value}: {i.breaker_reason}"
        )
    return RouteDecision(Route.OFFLOAD, None, "")


def hedge_after_s(expected_s: float, sigma_s: float, deadline_s: float, factor: float, margin_s: float) -> float:
    """How long after sending a window waits for its answer before it starts its local tail too:
    `factor` x the expected time (link estimate + the cloud's usual time + promotion), and at least
    the expected time + max(`margin_s`, 3 sigma of the estimate), never past the deadline.
    `factor` <= 0 turns hedging off (the deadline alone)."""
    if factor <= 0 or not math.isfinite(expected_s):
        return deadline_s
    late = max(factor * expected_s, expected_s + max(margin_s, 3.0 * max(sigma_s, 0.0)))
    return min(max(late, 0.0), deadline_s)
