"""The circuit breaker that sends a device fully local when the cloud stops answering.

Pure: no clock of its own (every call takes `now`, seconds on the caller's monotonic clock) and
the jitter comes from an injected `random.Random`. The runtime asks it before every offload.

    CLOSED --(failure_threshold consecutive failures)--> OPEN
    OPEN --(back-off elapsed: allow_offload grants ONE probe)--> HALF_OPEN
    HALF_OPEN --(probe succeeds)--> CLOSED        back-off level reset
    HALF_OPEN --(probe fails)--> OPEN             next level: a longer back-off

While OPEN (and while a probe is out) the device runs every window fully local. The back-off of
level L (1 for the first opening) follows gRPC's connection-backoff spec
(grpc/grpc doc/connection-backoff.md): `min(backoff_max_s, backoff_base_s * backoff_factor**(L-1))`,
then jittered by a uniform factor in `[1 - backoff_jitter, 1 + backoff_jitter]` so that devices
which lost the cloud together do not all probe it together when it returns. The longest a device
stays local after the cloud is back is therefore `backoff_max_s * (1 + backoff_jitter)`
(`backoff_bound_s()`), plus one window.

Evidence, not only a count. The platform's link signal (association or bearer lost: edge/hardware.py)
opens the breaker at once (`record_link_down`), with no probe until the link is back; the link's
return (`record_link_up`) lets the next window probe at once instead of after the back-off. A
window whose answer is late relative to the link estimate (FailureKind.LATE, hedged: its local
tail answered first) counts as a failure, so a dead path opens the breaker after a few windows that
each cost a hedge delay, not a deadline.

A shed (RESOURCE_EXHAUSTED) is not a link failure: the broker answered, it is just full. It never
trips the breaker (it even counts as proof that the link works, so it resets the run of failures
and closes a half-open breaker), but the device honours its retry-after hint: no offload until the
hint has passed (`backoff_base_s` when the broker gave none, never more than `backoff_max_s`).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from enum import StrEnum

from splitsense.config import BreakerConfig

__all__ = ["BreakerSnapshot", "BreakerState", "CircuitBreaker", "FailureKind"]


class BreakerState(StrEnum):
    CLOSED = "closed"  # offloading as the plan says
    HALF_OPEN = "half_open"  # one probe is out; everything else runs locally
    OPEN = "open"  # fully local until the back-off has passed

    @property
    def gauge_value(self) -> int:
        """0 closed, 1 half-open, 2 open (the `splitsense_edge_breaker_state` gauge)."""
        return _GAUGE[self]


_GAUGE = {BreakerState.CLOSED: 0, BreakerState.HALF_OPEN: 1, BreakerState.OPEN: 2}


class FailureKind(StrEnum):
    """Why an offload produced no result (also the `reason` of a fallback)."""

    UNAVAILABLE = "unavailable"  # broker or tail unreachable, stream broken, UNAVAILABLE
    DEADLINE = "deadline"  # no answer within the window's deadline
    REJECTED = "rejected"  # the broker refused the request (auth, invalid argument)
    SHED = "shed"  # the broker shed the request (RESOURCE_EXHAUSTED): not a link failure
    ERROR = "error"  # anything else the transport raised
    LATE = "late"  # no answer yet, much later than the link estimate says it should be (hedged)


@dataclass(frozen=True)
class BreakerSnapshot:
    """The breaker's state for telemetry and logs."""

    state: BreakerState
    reason: str  # why it is in this state, with the inputs used
    consecutive_failures: int
    level: int  # back-off level: 0 while closed, L for the L-th opening in a row
    open_until: float | None  # when the next probe may go (OPEN only)
    hold_until: float | None  # a shed's retry-after, if it has not passed yet


class CircuitBreaker:
    def __init__(self, config: BreakerConfig | None = None, rng: random.Random | None = None) -> None:
        self.config = config or BreakerConfig()
        self._rng = rng or random.Random()
        self._state = BreakerState.CLOSED
        self._reason = "no failures yet"
        self._failures = 0
        self._level = 0
        self._open_until = -math.inf
        self._hold_until = -math.inf
        self._hold_reason = ""
        self._link_down = False

    @property
    def state(self) -> BreakerState:
        return self._state

    @property
    def reason(self) -> str:
        return self._reason

    def backoff_s(self, level: int) -> float:
        """The un-jittered back-off of opening number `level` (>= 1)."""
        if level < 1:
            raise ValueError(f"back-off level must be >= 1, got {level}")
        c = self.config
        # exponent capped: factor**level overflows a float long after the cap has taken over
        return min(c.backoff_max_s, c.backoff_base_s * c.backoff_factor ** min(level - 1, 1000))

    def backoff_bound_s(self) -> float:
        """The longest any back-off can last, jitter included."""
        return self.config.backoff_max_s * (1 + self.config.backoff_jitter)

    # --- questions --------------------------------------------------------------------------

    def peek(self, now: float) -> bool:
        """Whether `allow_offload(now)` would say yes, without granting a probe."""
        if now < self._hold_until:
            return False
        if self._state is BreakerState.CLOSED:
            return True
        return self._state is BreakerState.OPEN and now >= self._open_until

    def allow_offload(self, now: float) -> bool:
        """Whether the device may offload now. When OPEN and the back-off has passed, this grants
        the one probe (the breaker goes HALF_OPEN): the caller must then report its outcome."""
        if not self.peek(now):
            return False
        if self._state is BreakerState.OPEN:
            self._state = BreakerState.HALF_OPEN
            self._reason = f"probing after a back-off of level {self._level}"
        return True

    def snapshot(self, now: float) -> BreakerSnapshot:
        held = now < self._hold_until
        return BreakerSnapshot(
            state=self._state,
            reason=self._hold_reason if held and self._state is BreakerState.CLOSED else self._reason,
            consecutive_failures=self._failures,
            level=self._level,
            open_until=self._open_until if self._state is BreakerState.OPEN else None,
            hold_until=self._hold_until if held else None,
        )

    # --- outcomes ---------------------------------------------------------------------------

    def record_success(self, now: float) -> None:
        if self._state is not BreakerState.CLOSED:
            self._reason = f"probe succeeded after a back-off of level {self._level}; offloading again"
        elif self._failures:
            self._reason = f"offload succeeded after {self._failures} failure(s)"
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._level = 0

    def record_failure(self, now: float, kind: FailureKind | str, retry_after_s: float = 0.0, detail: str = "") -> None:
        """An offload attempt produced no result. `retry_after_s` is a shed's hint (ignored
        otherwise); `detail` goes into the reason."""
        kind = FailureKind(kind)
        what = f"{kind.value}: {detail}" if detail else kind.value
        if kind is FailureKind.SHED:
            self._shed(now, retry_after_s, what)
            return
        if self._state is BreakerState.HALF_OPEN:
            self._open(now, self._level + 1, f"probe failed ({what})")
            return
        self._failures += 1
        if self._state is BreakerState.CLOSED and self._failures >= self.config.failure_threshold:
            self._open(now, 1, f"{self._failures} consecutive failed offloads, last {what}")
        # OPEN: a late answer to a call sent before the breaker opened; it changes nothing

    def _open(self, now: float, level: int, reason: str) -> None:
        c = self.config
        backoff = self.backoff_s(level) * self._rng.uniform(1 - c.backoff_jitter, 1 + c.backoff_jitter)
        self._state = BreakerState.OPEN
        self._level = level
        self._open_until = now + backoff
        self._reason = f"{reason}; fully local for {backoff:.2f} s (back-off level {level})"

    def record_link_down(self, now: float, detail: str = "") -> None:
        """The platform says the link is gone: fully local (or storing) until it is back."""
        what = f"link down ({detail})" if detail else "link down"
        self._state = BreakerState.OPEN
        self._level = max(self._level, 1)
        self._open_until = math.inf
        self._link_down = True
        self._reason = f"{what}: no offload until the platform reports the link back"

    def record_link_up(self, now: float) -> None:
        """The link is back: the next window may probe at once."""
        if not self._link_down:
            return
        self._link_down = False
        if self._state is BreakerState.OPEN:
            # -inf, not `now`: a caller that read its clock before reporting the link (the runtime
            # peeks with the time its window started) must still see the probe allowed
            self._open_until = -math.inf
            self._reason = "link back: the next window probes the cloud"

    def _shed(self, now: float, retry_after_s: float, what: str) -> None:
        c = self.config
        hint = retry_after_s if math.isfinite(retry_after_s) and retry_after_s > 0 else c.backoff_base_s
        hold = min(hint, c.backoff_max_s)
        self._hold_until = max(self._hold_until, now + hold)
        self._hold_reason = f"shed by the broker ({what}); local for {hold:.2f} s as it asked"
        if self._state is BreakerState.OPEN:
            return  # a late answer to a call sent before the breaker opened
        if self._state is BreakerState.HALF_OPEN:  # the broker answered: the link is back
            self._reason = "probe was shed: the broker is reachable but full"
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._level = 0
