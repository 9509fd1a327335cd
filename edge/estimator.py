"""The device's own estimate of its uplink bandwidth and round-trip time, from its own transfers.

Pure: no sockets, no sleeping; the clock is injected.

Why not the streaming estimators as they are. FESTIVE (Jiang et al., CoNEXT 2012) and MPC (Yin et
al., SIGCOMM 2015) take the harmonic mean of the last chunks' throughputs, bytes / time: right for
video chunks of megabytes, where the round trip is a rounding error. A device here sends a few
hundred bytes to a few kilobytes: at 5 Mbit/s a 4 KB activation is on the air for 6.5 ms of a
70 ms round trip, so bytes / time says nothing about the link, and bytes / (time - a guessed RTT -
a guessed promotion) is a small difference of two large numbers that explodes when the guesses
are off (a promotion subtracted that never happened read 45 Mbit/s on a 3.9 Mbit/s link). BBR
(Cardwell et al., ACM Queue 2016) shows the way out: keep the round-trip propagation time and the
bottleneck rate as two separate quantities, each estimated from the evidence that carries it.
A device in user space has no per-ACK delivery samples, so here the two are estimated jointly.

The model of one request/response (network time, i.e. the call's time less the cloud's queue and
compute it reports, less the radio promotion the device's radio state says this call paid):

    network_s = rtt + max_k (k x rtt + s x Mbit_k)

with s = seconds per Mbit of the uplink (1 / bandwidth), Mbit_k the wire bits of the request from
slow-start round k on (pipelines/tcp.py: framing, TCP/IP headers, IW10 slow start after idle); the
answer (a few hundred bytes, the same for every window) rides in the round trip. It is linear in (rtt, s) for
a given binding round, so a Kalman filter tracks both (extended: the binding round is taken at the
current estimate):

* state x = (rtt, s), each a random walk (the link drifts between samples, so the state's
  uncertainty grows with the time since the last one); after `max_sample_age_s` without any
  transfer the state is the prior again (the platform's link-speed hint when it has one, else the
  configured prior), which is also how a device that went local on a bad link comes to try
  offloading again;
* a small transfer (a telemetry report, a 300-byte bottleneck code) mostly informs rtt, a large
  one mostly s: the filter weighs each by how much its size says about each quantity, instead of
  a byte threshold below which a sample is thrown away;
* the noise of a call's time is the configured jitter or, when the innovations show more (a
  cloud's batching waits, a busy scheduler), what they show (Sage-Husa's adaptive estimate), so
  small calls on a noisy path stop moving the rate;
* a call faster than its round trips alone moves only the round trip, and a round-trip sample (a
  ping, a tiny code) slower than predicted is queueing, not propagation, and moves nothing unless
  the next one is slow too (BBR's RTprop is the minimum recent round trip for the same reason);
* one call changes the rate by a factor of 2 at most (real links rarely halve or double between
  two windows; several calls in a row follow any change);
* a sample far outside its predicted spread is clipped to 3 sigma (one event-loop stall must not
  move it far; a real change of the link shows in the next samples too, and the random walk's
  growing uncertainty lets them through); a call more than 2x (+ 50 ms) slower than predicted
  is a stall (an outage not yet reported, a retransmission timeout) and ignored, unless the next
  one is too.

`bandwidth_mbps` is 1 / s. `expected_network_s(bytes_up, bytes_down)` is the model's prediction,
what the runtime hedges against (a window whose answer is much later than this starts its local
tail).
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from pipelines.tcp import binding_round, wire_bytes
from splitsense.config import EstimatorConfig

__all__ = ["LinkEstimate", "LinkEstimator", "TransferSample"]

_MAX_MBPS = 100_000.0  # 100 Gbit/s: a loopback transfer must not read as infinity
_MIN_S = 1.0 / _MAX_MBPS
_MAX_S = 1.0 / 0.005  # 5 kbit/s: below that, nothing a device sends arrives in time anyway
_GATE_SIGMA = 3.0
_NOISE_ALPHA = 0.05  # the learned noise follows the last ~20 calls ...
_NOISE_SETTLE = 10  # ... after the first 10 (the prior's error is not noise)
_NOISE_MAX_S = 0.02  # and says at most 20 ms (1 sigma): more is a stall or a changed link
_MAX_STEP = 2.0  # the most one call changes the rate by (either way)
_STALL_FACTOR = 2.0  # a call this many times slower than predicted (+ _STALL_S) is a stall ...
_STALL_S = 0.05
_STALLS_TO_BELIEVE = 2  # ... unless it is the second in a row


@dataclass(frozen=True)
class TransferSample:
    """What one recorded transfer contributed."""

    network_s: float  # the call's time less the cloud's and the promotion
    predicted_s: float  # what the model expected before this sample
    bandwidth_mbps: float  # the estimate after it
    rtt_ms: float  # the estimate after it
    informs_bandwidth: bool  # large enough to say something about the rate


@dataclass(frozen=True)
class LinkEstimate:
    """The estimator's current belief, with how much evidence it rests on."""

    bandwidth_mbps: float
    rtt_ms: float
    bandwidth_samples: int  # transfers within max_sample_age_s that informed the rate; 0: the prior
    rtt_samples: int  # transfers within max_sample_age_s
    bandwidth_rel_std: float  # relative 1-sigma uncertainty of the rate (0.3: +-30%)


class LinkEstimator:
    """Kalman estimate of one device's uplink round trip and rate."""

    def __init__(
        self,
        config: EstimatorConfig | None = None,
        clock: Callable[[], float] = time.monotonic,
        *,
        hint_mbps: float | None = None,
    ) -> None:
        self.config = config or EstimatorConfig()
        self._clock = clock
        c = self.config
        self._prior_s = 1.0 / (hint_mbps if hint_mbps is not None and hint_mbps > 0 else c.prior_bandwidth_mbps)
        self._r = c.prior_rtt_ms / 1000.0
        self._s = self._prior_s
        # prior spread: the rtt within about +-100%, the rate within a factor of ~2.7 either way
        self._prior_var_s = (c.prior_rel_std * self._prior_s) ** 2
        self._p = [[self._r**2, 0.0], [0.0, self._prior_var_s]]
        self._t: float | None = None  # time of the last predict step
        self._samples: deque[tuple[float, bool]] = deque(maxlen=256)  # (t, informs bandwidth)
        self._stalls = 0  # stalls in a row (see record_transfer)
        self._slow_rtts = 0  # slow round-trip samples in a row (see record_transfer)
        self._learned_noise = 0.0  # EWMA of the innovations' excess variance (Sage-Husa), s^2
        self._updates = 0

    # --- the prior --------------------------------------------------------------------------

    def set_hint(self, hint_mbps: float | None) -> None:
        """The platform's link-speed hint (None: the configured prior) is what the rate relaxes to."""
        mbps = hint_mbps if hint_mbps is not None and math.isfinite(hint_mbps) and hint_mbps > 0 else None
        self._prior_s = 1.0 / (mbps or self.config.prior_bandwidth_mbps)
        self._prior_var_s = (self.config.prior_rel_std * self._prior_s) ** 2

    # --- the model --------------------------------------------------------------------------

    def _predict(self, now: float) -> None:
        if self._t is None:
            self._t = now
            return
        dt = max(now - self._t, 0.0)
        self._t = now
        if dt == 0:
            return
        c = self.config
        # Nothing heard for that long (reading the estimate is not hearing): the evidence is forgotten.
        stale = bool(self._samples) and now - self._samples[-1][0] > c.max_sample_age_s
        if dt > c.max_sample_age_s or stale:
            self._r = c.prior_rtt_ms / 1000.0
            self._s = self._prior_s
            self._p = [[self._r**2, 0.0], [0.0, self._prior_var_s]]
            self._updates, self._learned_noise = 0, 0.0
            return
        p = self._p
        p[0][0] += (c.rtt_drift_ms_per_sqrt_s / 1000.0) ** 2 * dt
        p[1][1] = min(p[1][1] + (c.rate_drift_per_sqrt_s * self._s) ** 2 * dt, max(self._prior_var_s, p[1][1]))

    def _h(self, bits_up: float, bits_down: float, nbytes_up: int) -> tuple[float, float, float]:
        """(predicted network seconds, d/d rtt, d/d s) at the current state. The answer's bits are
        not charged at the uplink's rate: a few hundred bytes of logits, the same for every window
        of a model, on a downlink that is usually faster; their time rides in the round trip."""
        del bits_down
        k, first = binding_round(nbytes_up, self._r, 1.0 / self._s) if self.config.slow_start else (0, 0)
        mbit = max(bits_up - first * 8.0, 0.0) / 1e6
        return self._r * (1 + k) + self._s * mbit, 1.0 + k, mbit

    def expected_network_s(self, bytes_up: int, bytes_down: int = 0) -> tuple[float, float]:
        """(expected network seconds of a call carrying these message bytes, its 1-sigma spread)."""
        self._predict(self._clock())
        up, down = wire_bytes(bytes_up), wire_bytes(bytes_down)
        y, h_r, h_s = self._h(up * 8.0, down * 8.0, up)
        var = h_r * h_r * self._p[0][0] + 2 * h_r * h_s * self._p[0][1] + h_s * h_s * self._p[1][1] + self._noise(y)
        return y, math.sqrt(max(var, 0.0))

    def _noise(self, y: float) -> float:
        """Variance of one call's time: the configured jitter, or what the innovations show when
        they say it is larger (a loaded cloud's batching waits, a busy device's scheduler)."""
        c = self.config
        return max((c.jitter_ms / 1000.0) ** 2 + (c.jitter_rel * y) ** 2, self._learned_noise)

    # --- evidence ---------------------------------------------------------------------------

    def record_transfer(
        self,
        bytes_up: int,
        bytes_down: int,
        elapsed_s: float,
        server_s: float = 0.0,
        promotion_s: float = 0.0,
    ) -> TransferSample:
        """One request/response: `bytes_up`/`bytes_down` its messages' sizes (the estimator adds
        framing and headers), `elapsed_s` from sending to the answer, `server_s` of which the cloud
        spent queueing and computing, `promotion_s` the radio promotion the call paid (from the
        device's radio state)."""
        for name, value in (("bytes_up", bytes_up), ("bytes_down", bytes_down)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        for name, v in (("elapsed_s", elapsed_s), ("server_s", server_s), ("promotion_s", promotion_s)):
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be finite and >= 0, got {v!r}")
        now = self._clock()
        self._predict(now)
        network_s = max(elapsed_s - server_s - promotion_s, 0.0)
        up, down = wire_bytes(bytes_up), wire_bytes(bytes_down)
        predicted, h_r, h_s = self._h(up * 8.0, down * 8.0, up)
        informs = up >= self.config.min_bandwidth_sample_bytes
        if network_s > _STALL_FACTOR * predicted + _STALL_S and self._stalls + 1 < _STALLS_TO_BELIEVE:
            # Many times what any plausible rate explains: a stall (an outage the platform had not
            # reported yet, a retransmission timeout), not the link's rate. A second one in a row
            # is believed: the link really is that slow now.
            self._stalls += 1
            self._samples.append((now, False))
            return TransferSample(network_s, predicted, self.bandwidth_mbps, self.rtt_ms, False)
        self._stalls = 0
        floor = self._r * h_r  # the round trips alone: what the call takes on an infinitely fast link
        if network_s < floor:
            # Faster than the round trips alone allow: no rate explains it, the round trip is
            # shorter than believed. Only the round trip moves (else a too-high rtt, e.g. from a
            # ping that queued behind an upload, would double the rate call after call).
            self._p[0][0] = max(self._p[0][0], ((floor - network_s) / h_r) ** 2)
            self._update(network_s, predicted, h_r, 0.0)
        elif (
            self._updates > _NOISE_SETTLE
            and h_s < 0.1 * self._r
            and network_s - predicted > 2.0 * math.sqrt(self._p[0][0] + self._noise(network_s))
            and self._slow_rtts < 1
        ):
            # A round-trip sample (its bytes say almost nothing about the rate) slower than
            # predicted: queueing or the cloud's handling, not propagation, unless the next one is
            # too. (BBR keeps the minimum recent round trip as its RTprop for the same reason.)
            self._slow_rtts += 1
            self._samples.append((now, False))
            return TransferSample(network_s, predicted, self.bandwidth_mbps, self.rtt_ms, False)
        else:
            self._slow_rtts = 0
            self._update(network_s, predicted, h_r, h_s)
        self._samples.append((now, informs))
        return TransferSample(network_s, predicted, self.bandwidth_mbps, self.rtt_ms, informs)

    def record_lower_bound(
        self, bytes_up: int, bytes_down: int, waited_s: float, server_s: float = 0.0, promotion_s: float = 0.0
    ) -> TransferSample | None:
        """A call given up after `waited_s` without an answer (a hedged window whose local tail
        answered first): its network time was at least that. A censored sample: it moves the
        estimate only when the bound says the link is slower than believed, as if it had taken
        exactly that long (a conservative step toward the truth). None when it says nothing."""
        predicted, _ = self.expected_network_s(bytes_up, bytes_down)
        if waited_s - server_s - promotion_s <= predicted:
            return None
        return self.record_transfer(bytes_up, bytes_down, waited_s, server_s, promotion_s)

    def record_rtt(self, rtt_s: float) -> None:
        """A round trip of an (almost) empty call measured some other way."""
        if not (math.isfinite(rtt_s) and rtt_s >= 0):
            raise ValueError(f"rtt_s must be finite and >= 0, got {rtt_s!r}")
        self.record_transfer(0, 0, rtt_s)

    def _update(self, y: float, predicted: float, h_r: float, h_s: float) -> None:
        p = self._p
        r_noise = self._noise(y)
        ph0 = p[0][0] * h_r + p[0][1] * h_s
        ph1 = p[1][0] * h_r + p[1][1] * h_s
        s = max(h_r * ph0 + h_s * ph1, 0.0) + r_noise
        nu = y - predicted
        gate = _GATE_SIGMA * math.sqrt(s)
        nu = max(-gate, min(gate, nu))  # one odd sample moves the belief by 3 sigma at most
        # Sage-Husa: the innovations' variance beyond what the state's uncertainty explains is noise
        # (not from the first calls, whose innovations are the prior's error, not noise)
        self._updates += 1
        if self._updates > _NOISE_SETTLE:
            excess = nu * nu - (s - r_noise)
            learned = (1 - _NOISE_ALPHA) * self._learned_noise + _NOISE_ALPHA * excess
            self._learned_noise = min(max(learned, 0.0), _NOISE_MAX_S**2)
        k0, k1 = ph0 / s, ph1 / s
        self._r = max(self._r + k0 * nu, 0.0)
        # One call moves the rate by a factor of 2 at most: a small call's time is mostly round trip,
        # and its noise, leaking through the state's correlations, must not send the rate to a bound.
        self._s = min(max(self._s + k1 * nu, self._s / _MAX_STEP, _MIN_S), self._s * _MAX_STEP, _MAX_S)
        # Joseph form, P = (I - K H) P (I - K H)^T + K R K^T: stays symmetric and positive
        a00, a01 = 1.0 - k0 * h_r, -k0 * h_s
        a10, a11 = -k1 * h_r, 1.0 - k1 * h_s
        m00 = a00 * p[0][0] + a01 * p[1][0]
        m01 = a00 * p[0][1] + a01 * p[1][1]
        m10 = a10 * p[0][0] + a11 * p[1][0]
        m11 = a10 * p[0][1] + a11 * p[1][1]
        q00 = m00 * a00 + m01 * a01 + k0 * k0 * r_noise
        q01 = m00 * a10 + m01 * a11 + k0 * k1 * r_noise
        q11 = m10 * a10 + m11 * a11 + k1 * k1 * r_noise
        self._p = [[max(q00, 1e-12), q01], [q01, max(q11, 1e-18)]]

    # --- belief -----------------------------------------------------------------------------

    @property
    def bandwidth_mbps(self) -> float:
        self._predict(self._clock())
        return min(1.0 / self._s, _MAX_MBPS)

    @property
    def rtt_ms(self) -> float:
        self._predict(self._clock())
        return self._r * 1000.0

    def estimate(self) -> LinkEstimate:
        now = self._clock()
        self._predict(now)
        horizon = now - self.config.max_sample_age_s
        live = [informs for t, informs in self._samples if t >= horizon]
        return LinkEstimate(
            bandwidth_mbps=min(1.0 / self._s, _MAX_MBPS),
            rtt_ms=self._r * 1000.0,
            bandwidth_samples=sum(live),
            rtt_samples=len(live),
            bandwidth_rel_std=math.sqrt(max(self._p[1][1], 0.0)) / self._s,
        )
