"""Admission control: queue a window for its (model, cut) batch, or shed it now; pure.

A window is worth queueing only if its answer can come back before its deadline. The broker's
micro-batcher (cloud/batcher.py) runs at most P batches of up to B windows at once per
(model, cut), each taking about S ms (an EWMA of measured batch service times). A new window with
q windows queued ahead of it and f batches in flight waits for

    batches ahead    a = f + q // B                (its own batch is the next one after those)
    rounds           r = a // P + 1                (P batches at a time)
    fill wait        w = 0 if the lane is idle or its batch is already full, else max_batch_wait_ms
    predicted        w + r * S

and is shed (RESOURCE_EXHAUSTED) when that exceeds what is left of its deadline, or when q has
reached max_queue_depth whatever the deadline (memory is bounded either way). A shed window costs
the device nothing but a round trip: it finishes the window locally, and the `retry_after_ms`
hint, the time the current backlog needs to drain (r * S, within bounds), tells it when
offloading is worth trying again. The decision carries its reason and the inputs it used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from splitsense.errors import ConfigError

__all__ = ["Admission", "AdmissionPolicy", "Ewma", "LaneLoad", "admit"]


@dataclass(frozen=True)
class LaneLoad:
    """The state of one (model, cut) lane of the batcher when a window arrives."""

    queued: int  # windows waiting for a batch (not counting the new one)
    inflight_batches: int  # batches running on the backend now
    batch_service_ms: float  # EWMA of one batch's service time (backend call)
    estimate_age_ms: float = 0.0  # since a batch last finished on this lane (the estimate's last update)
    # The broker's own tail (broker.local_tail): an idle lane runs its next window there, not on the
    # backend, and `local_batches` of the running batches are such; the estimate is the backend's.
    local_batches: int = 0
    runs_local_when_idle: bool = False


@dataclass(frozen=True)
class AdmissionPolicy:
    max_batch_size: int
    max_batch_wait_ms: float
    max_inflight_batches: int
    max_queue_depth: int
    min_retry_after_ms: int = 10  # below this a retry hint is noise: a few batch times
    max_retry_after_ms: int = 10_000  # a device probes again at least this often
    # An idle lane whose estimate has not been refreshed for this long admits a window as a probe:
    # batches that timed out during an outage inflate the estimate, and a lane that sheds on it runs
    # no batch that could correct it.
    probe_after_ms: float = 1_000.0

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_inflight_batches", "max_queue_depth"):
            if getattr(self, name) < 1:
                raise ConfigError(f"admission {name} must be >= 1, got {getattr(self, name)!r}")
        if self.max_batch_wait_ms < 0:
            raise ConfigError(f"admission max_batch_wait_ms must be >= 0, got {self.max_batch_wait_ms!r}")
        if not 0 <= self.min_retry_after_ms <= self.max_retry_after_ms:
            raise ConfigError("admission retry bounds must satisfy 0 <= min_retry_after_ms <= max_retry_after_ms")


@dataclass(frozen=True)
class Admission:
    """The decision for one window, with why and the numbers behind it."""

    admitted: bool
    predicted_ms: float  # when its answer would be ready, from now
    remaining_ms: float  # what was left of its deadline
    retry_after_ms: int  # 0 when admitted
    reason: str


def admit(load: LaneLoad, remaining_ms: float, policy: AdmissionPolicy) -> Admission:
    """Admit the window or shed it; `remaining_ms` is what is left of its deadline."""
    b, p = policy.max_batch_size, policy.max_inflight_batches
    q, f = max(load.queued, 0), max(load.inflight_batches, 0)
    s = max(load.batch_service_ms, 0.0)
    rounds = (f + q // b) // p + 1
    idle = q == 0 and f == 0
    own_batch_full = q % b + 1 >= b
    fill_ms = 0.0 if idle or own_batch_full else policy.max_batch_wait_ms
    predicted = fill_ms + rounds * s
    inputs = f"{q} queued, {f} batches running, batch service {s:.1f} ms"

    if q >= policy.max_queue_depth:
        return _shed(
            predicted,
            remaining_ms,
            rounds * s,
            policy,
            f"queue full ({inputs}; limit {policy.max_queue_depth})",
        )
    if idle and load.runs_local_when_idle and remaining_ms > 0:
        # It runs on the broker's own tail at once: the backend's estimate says nothing about it.
        return Admission(
            admitted=True,
            predicted_ms=0.0,
            remaining_ms=remaining_ms,
            retry_after_ms=0,
            reason=f"idle lane: runs on the broker's own tail ({inputs})",
        )
    no_backend_batch = q == 0 and f - max(load.local_batches, 0) <= 0
    if (
        no_backend_batch
        and remaining_ms > 0
        and predicted > remaining_ms
        and load.estimate_age_ms >= policy.probe_after_ms
    ):
        # Nothing queued or running on the backend and a stale estimate: trying delays no other
        # window, and its batch (on the backend: the lane is busy only with its own tail, or idle)
        # refreshes the estimate (see probe_after_ms). Without this, a lane whose windows run on the
        # broker's tail when idle and are shed on an outage's estimate when busy never corrects it.
        return Admission(
            admitted=True,
            predicted_ms=predicted,
            remaining_ms=remaining_ms,
            retry_after_ms=0,
            reason=f"no backend batch running, admitted as a probe: estimate {load.estimate_age_ms:.0f} ms old, "
            f"predicted {predicted:.1f} ms, {remaining_ms:.1f} ms left ({inputs})",
        )
    if predicted > remaining_ms:
        return _shed(
            predicted,
            remaining_ms,
            rounds * s,
            policy,
            f"predicted {predicted:.1f} ms > {remaining_ms:.1f} ms left of the deadline ({inputs})",
        )
    return Admission(
        admitted=True,
        predicted_ms=predicted,
        remaining_ms=remaining_ms,
        retry_after_ms=0,
        reason=f"predicted {predicted:.1f} ms <= {remaining_ms:.1f} ms left ({inputs})",
    )


def _shed(predicted: float, remaining: float, drain_ms: float, policy: AdmissionPolicy, why: str) -> Admission:
    retry = int(min(max(math.ceil(drain_ms), policy.min_retry_after_ms), policy.max_retry_after_ms))
    return Admission(
        admitted=False,
        predicted_ms=predicted,
        remaining_ms=remaining,
        retry_after_ms=retry,
        reason=f"shed: {why}; retry after {retry} ms",
    )


class Ewma:
    """Exponentially weighted moving average with a prior: `value` is `initial` until updated."""

    def __init__(self, alpha: float, initial: float) -> None:
        if not 0 < alpha <= 1:
            raise ConfigError(f"EWMA alpha must be in (0, 1], got {alpha!r}")
        self.alpha = alpha
        self.value = float(initial)
        self.samples = 0

    def update(self, x: float) -> float:
        if not math.isfinite(x):
            return self.value
        self.value = x if self.samples == 0 else self.alpha * x + (1 - self.alpha) * self.value
        self.samples += 1
        return self.value

    def reset(self, x: float) -> float:
        """Start again from the sample `x` (non-finite: unchanged)."""
        if math.isfinite(x):
            self.value, self.samples = float(x), 1
        return self.value
