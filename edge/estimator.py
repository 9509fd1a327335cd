"""The device's own estimate of its uplink bandwidth and round-trip time, from its own transfers.

Pure: no sockets, no sleeping; the clock is injected. Every offload tells the estimator how many
bytes went up and down and how long the call took; the cloud's answer says how long the window
waited and ran there (queue + compute), which is subtracted so that only network time counts:

    network_s = elapsed_s - server_s
    transfer  = network_s - rtt_s          (what the bytes themselves took on the wire)

Bandwidth: the **harmonic mean of the last few samples** (`window_samples`, default 5), the
estimator of FESTIVE (Jiang, Sekar, Zhang, CoNEXT 2012) and of MPC's throughput predictor (Yin
et al., "A Control-Theoretic Approach for Dynamic Adaptive Video Streaming over HTTP", SIGCOMM
2015, which uses the last 5 chunks). A harmonic mean is dominated by the *slow* samples, so one
lucky fast transfer does not talk the device into sending a big activation over a weak link, and
it is the right mean of rates for equal-sized transfers (total bytes / total time).

RTT: an EWMA of small transfers (RFC 6298's SRTT with alpha = 1/8). A transfer too small to
measure bandwidth (below `min_bandwidth_sample_bytes`, or one that took no longer than the current
RTT estimate) is an RTT sample instead: its network time is almost all propagation and set-up.

Samples older than `max_sample_age_s` are forgotten; with none left the estimate falls back to the
prior. That is also how a device that went fully local on a bad link eventually tries its plan's
offloading rows again: without fresh evidence it believes the prior, not the outage of long ago.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from splitsense.config import EstimatorConfig

__all__ = ["LinkEstimate", "LinkEstimator", "TransferSample"]

_BITS_PER_BYTE = 8
_MAX_MBPS = 100_000.0  # 100 Gbit/s: a loopback transfer of a few bytes must not read as infinity


@dataclass(frozen=True)
class TransferSample:
    """What one recorded transfer contributed (None fields: it did not count as that kind)."""

    network_s: float
    bandwidth_mbps: float | None
    rtt_ms: float | None


@dataclass(frozen=True)
class LinkEstimate:
    """The estimator's current belief, with how much evidence it rests on."""

    bandwidth_mbps: float
    rtt_ms: float
    bandwidth_samples: int  # live samples behind bandwidth_mbps; 0: it is the prior
    rtt_samples: int  # RTT samples seen since the last reset; 0: it is the prior


class LinkEstimator:
    """Harmonic-mean bandwidth and EWMA RTT of one device's uplink."""

    def __init__(self, config: EstimatorConfig | None = None, clock: Callable[[], float] = time.monotonic):
        self.config = config or EstimatorConfig()
        self._clock = clock
        self._bw: deque[tuple[float, float]] = deque(maxlen=self.config.window_samples)  # (t, Mbit/s)
        self._srtt_ms: float | None = None
        self._rtt_t = -math.inf
        self._rtt_count = 0

    # --- evidence ---------------------------------------------------------------------------

    def record_transfer(
        self, bytes_up: int, bytes_down: int, elapsed_s: float, server_s: float = 0.0
    ) -> TransferSample:
        """One request/response: `elapsed_s` from sending to the answer, `server_s` of which the
        cloud spent queueing and computing. Returns what the transfer counted as."""
        for name, value in (("bytes_up", bytes_up), ("bytes_down", bytes_down)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        for name, v in (("elapsed_s", elapsed_s), ("server_s", server_s)):
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be finite and >= 0, got {v!r}")
        now = self._clock()
        network_s = max(elapsed_s - server_s, 0.0)  # clocks of two machines: never below zero
        total_bytes = bytes_up + bytes_down
        transfer_s = network_s - self.rtt_ms / 1000.0
        if total_bytes >= self.config.min_bandwidth_sample_bytes and transfer_s > 0:
            mbps = min(total_bytes * _BITS_PER_BYTE / transfer_s / 1e6, _MAX_MBPS)
            self._bw.append((now, mbps))
            return TransferSample(network_s=network_s, bandwidth_mbps=mbps, rtt_ms=None)
        rtt_ms = network_s * 1000.0
        self._record_rtt(now, rtt_ms)
        return TransferSample(network_s=network_s, bandwidth_mbps=None, rtt_ms=rtt_ms)

    def record_rtt(self, rtt_s: float) -> None:
        """A round trip measured some other way (a telemetry call, a plan fetch)."""
        if not (math.isfinite(rtt_s) and rtt_s >= 0):
            raise ValueError(f"rtt_s must be finite and >= 0, got {rtt_s!r}")
        self._record_rtt(self._clock(), rtt_s * 1000.0)

    def _record_rtt(self, now: float, rtt_ms: float) -> None:
        if self._srtt_ms is None or now - self._rtt_t > self.config.max_sample_age_s:
            self._srtt_ms = rtt_ms  # RFC 6298 (2.2): the first measurement sets SRTT
            self._rtt_count = 0
        else:
            a = self.config.rtt_ewma_alpha
            self._srtt_ms = (1 - a) * self._srtt_ms + a * rtt_ms
        self._rtt_t = now
        self._rtt_count += 1

    # --- belief -----------------------------------------------------------------------------

    def _live_bandwidths(self) -> list[float]:
        horizon = self._clock() - self.config.max_sample_age_s
        return [mbps for t, mbps in self._bw if t >= horizon]

    @property
    def bandwidth_mbps(self) -> float:
        """Harmonic mean of the live samples, or the prior when there are none."""
        live = self._live_bandwidths()
        if not live:
            return self.config.prior_bandwidth_mbps
        return len(live) / sum(1.0 / x for x in live)

    @property
    def rtt_ms(self) -> float:
        """Smoothed RTT, or the prior when there is no fresh sample."""
        if self._srtt_ms is None or self._clock() - self._rtt_t > self.config.max_sample_age_s:
            return self.config.prior_rtt_ms
        return self._srtt_ms

    def estimate(self) -> LinkEstimate:
        live = self._live_bandwidths()
        rtt_fresh = self._srtt_ms is not None and self._clock() - self._rtt_t <= self.config.max_sample_age_s
        return LinkEstimate(
            bandwidth_mbps=self.bandwidth_mbps,
            rtt_ms=self.rtt_ms,
            bandwidth_samples=len(live),
            rtt_samples=self._rtt_count if rtt_fresh else 0,
        )
