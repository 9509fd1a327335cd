"""One device's radio: its state, every transfer it carried, and what each one cost.

Pure: no sockets, no sleeping; the clock is injected. There is exactly one `RadioState` per device,
and everything that needs to know about the radio reads it:

* the runtime marks every call that uses the radio (an offload, a background probe, a telemetry
  report) with `begin` and `end`; `begin` says whether the call first pays a promotion (the radio
  had dropped to idle) and how long it is;
* simulated hardware (simulators/hardware.py) makes a call wait that promotion, because the state
  here says it is due, not because a second model of the radio thinks so; real hardware promotes
  by itself, inside the call;
* the estimator (edge/estimator.py) takes that same promotion off the call's time, so a promotion
  that never happened is never subtracted;
* the energy of every transfer is charged here, once, with the published power model
  (pipelines.power, Huang et al. MobiSys 2012; BLE from the nRF52840 figures).

States (Huang12's RRC machine; BLE has no tail):

    IDLE --begin--> PROMOTING (promotion_s) --> ACTIVE (calls in flight) --end of the last-->
    TAIL (tail_s [+ tail2_s]) --> IDLE

Energy of one call, charged when it ends (mJ):

    tail       the previous call's tail over the gap before this one started (capped at the tail)
    promotion  promotion_mw x promotion_s, when the radio had dropped to idle
    active     alpha_u x Mbit_up + alpha_d x Mbit_down + beta x on_air_s
    connected  tail_mw x (call time - promotion - on air): the radio stays connected while the
               device waits for the answer (the cost model charges that wait as tail too)

`on_air_s` is what the platform says the bytes took on the air (a modem's counters; the simulated
radio's serialisation on the trace); without it, the bytes at the device's bandwidth estimate.
Two calls may overlap (a window and a background probe): the second reuses the connected state
and pays no promotion and no tail.

The platform's link signals live here too: `link_up` (association / cellular bearer; False means
nothing will get through, so the device does not try) and `hint_mbps` (the platform's own idea of
the link's speed, e.g. Android's `NetworkCapabilities.getLinkUpstreamBandwidthKbps` or a BLE
stack's PHY rate), which the estimator uses as its prior.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

from pipelines.power import BITS_PER_BYTE, RadioPowerModel, promotion_delay_s, tail_energy_mj, transfer_seconds

__all__ = ["RadioPhase", "RadioState", "RadioTicket", "RadioTransfer", "TrafficKind"]

_BITS_PER_MBIT = 1e6


class RadioPhase(StrEnum):
    IDLE = "idle"  # paging only; the next transfer pays a promotion
    PROMOTING = "promoting"  # IDLE -> connected, no byte moves yet
    ACTIVE = "active"  # at least one call in flight
    TAIL = "tail"  # connected, no call in flight, inactivity timer running


class TrafficKind(StrEnum):
    """What a transfer was for (energy is kept per kind)."""

    OFFLOAD = "offload"  # a window's activation and its answer
    PROBE = "probe"  # a breaker probe sent in the background while the window ran locally
    TELEMETRY = "telemetry"  # a telemetry report
    PING = "ping"  # an empty round trip that times the link (GetPlan for a version no plan reaches)


@dataclass(frozen=True)
class RadioTicket:
    """A call that has started on the radio (`RadioState.begin`)."""

    kind: TrafficKind
    start_s: float
    promotion_s: float  # the promotion this call pays before its first byte (0: already connected)
    phase: RadioPhase  # the radio's state when it started
    tail_mj: float  # the previous call's tail over the gap before this one
    serial: int


@dataclass(frozen=True)
class RadioTransfer:
    """A finished call and what it cost."""

    kind: TrafficKind
    start_s: float
    end_s: float
    promotion_s: float
    bytes_up: int
    bytes_down: int
    on_air_s: float
    tail_mj: float
    promotion_mj: float
    active_mj: float
    connected_mj: float
    answered: bool

    @property
    def energy_mj(self) -> float:
        return self.tail_mj + self.promotion_mj + self.active_mj + self.connected_mj

    @property
    def elapsed_s(self) -> float:
        return self.end_s - self.start_s


class RadioState:
    """The one model of a device's radio."""

    def __init__(
        self,
        model: RadioPowerModel,
        clock: Callable[[], float] = time.monotonic,
        *,
        hint_mbps: float | None = None,
        history: int = 256,
    ) -> None:
        self.model = model
        self._clock = clock
        self._active = 0
        self._last_end: float | None = None  # when the last call ended (the inactivity timer's start)
        self._promoted_until = -math.inf  # end of the promotion in progress
        self._serial = 0
        self.link_up = True
        self.link_changed_s: float | None = None
        self.hint_mbps = hint_mbps
        self.promotions = 0
        self.total_mj = 0.0
        self.energy_by_kind: dict[TrafficKind, float] = {k: 0.0 for k in TrafficKind}
        self.transfers: deque[RadioTransfer] = deque(maxlen=history)  # the latest, for inspection

    # --- state ------------------------------------------------------------------------------

    def phase(self, now: float | None = None) -> RadioPhase:
        t = self._clock() if now is None else now
        if self._active:
            return RadioPhase.PROMOTING if t < self._promoted_until else RadioPhase.ACTIVE
        if self._last_end is None or t - self._last_end > self.model.total_tail_s:
            return RadioPhase.IDLE
        return RadioPhase.TAIL

    def idle_gap_s(self, now: float | None = None) -> float:
        """Seconds since the radio last carried traffic (inf before the first call, 0 while busy)."""
        if self._active:
            return 0.0
        if self._last_end is None:
            return math.inf
        t = self._clock() if now is None else now
        return max(t - self._last_end, 0.0)

    def promotion_due_s(self, now: float | None = None) -> float:
        """The promotion a call starting now would pay (what the cost model calls the promotion delay)."""
        t = self._clock() if now is None else now
        if self._active:
            return max(self._promoted_until - t, 0.0)
        return promotion_delay_s(self.model, self.idle_gap_s(t))

    def set_link(self, up: bool, now: float | None = None) -> bool:
        """The platform's association / bearer signal. Returns whether it changed."""
        if bool(up) is self.link_up:
            return False
        self.link_up = bool(up)
        self.link_changed_s = self._clock() if now is None else now
        return True

    # --- calls ------------------------------------------------------------------------------

    def begin(self, kind: TrafficKind | str) -> RadioTicket:
        """A call starts using the radio now."""
        kind = TrafficKind(kind)
        now = self._clock()
        phase = self.phase(now)
        tail_mj = 0.0
        if self._active:  # connected already: wait out a promotion in progress, if any
            promotion = max(self._promoted_until - now, 0.0)
        else:
            gap = self.idle_gap_s(now)
            promotion = promotion_delay_s(self.model, gap)
            if math.isfinite(gap):
                tail_mj = tail_energy_mj(self.model, gap)
            if promotion > 0:
                self.promotions += 1
                self._promoted_until = now + promotion
        self._active += 1
        self._serial += 1
        return RadioTicket(kind, now, promotion, phase, tail_mj, self._serial)

    def end(
        self,
        ticket: RadioTicket,
        bytes_up: int,
        bytes_down: int = 0,
        *,
        on_air_s: float | None = None,
        mbps: float | None = None,
        answered: bool = True,
    ) -> RadioTransfer:
        """The call of `ticket` ended now, having moved these bytes; charges its energy.

        `on_air_s`: the time its bytes took on the air, from the platform; None: the bytes at
        `mbps` (the device's own estimate)."""
        for name, v in (("bytes_up", bytes_up), ("bytes_down", bytes_down)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be an int >= 0, got {v!r}")
        now = self._clock()
        m = self.model
        if self._active <= 0:
            raise ValueError("RadioState.end without a matching begin")
        elapsed = max(now - ticket.start_s, 0.0)
        if on_air_s is None:
            rate = mbps if mbps is not None and math.isfinite(mbps) and mbps > 0 else None
            on_air_s = (
                transfer_seconds(bytes_up, rate) + transfer_seconds(bytes_down, rate) if rate is not None else 0.0
            )
        if not (math.isfinite(on_air_s) and on_air_s >= 0):
            raise ValueError(f"on_air_s must be finite and >= 0, got {on_air_s!r}")
        self._active -= 1  # checked first: a refused call leaves the state as it was
        self._last_end = now if self._last_end is None else max(self._last_end, now)
        on_air_s = min(on_air_s, max(elapsed - ticket.promotion_s, 0.0)) if elapsed > 0 else on_air_s
        # a promotion in progress is charged to the call that started it
        promotion_mj = m.promotion_mw * ticket.promotion_s if ticket.phase is RadioPhase.IDLE else 0.0
        active_mj = (
            m.uplink_mw_per_mbps * bytes_up * BITS_PER_BYTE / _BITS_PER_MBIT
            + m.downlink_mw_per_mbps * bytes_down * BITS_PER_BYTE / _BITS_PER_MBIT
            + m.base_mw * on_air_s
        )
        connected_mj = m.tail_mw * max(elapsed - ticket.promotion_s - on_air_s, 0.0)
        transfer = RadioTransfer(
            kind=ticket.kind,
            start_s=ticket.start_s,
            end_s=now,
            promotion_s=ticket.promotion_s,
            bytes_up=bytes_up,
            bytes_down=bytes_down,
            on_air_s=on_air_s,
            tail_mj=ticket.tail_mj,
            promotion_mj=promotion_mj,
            active_mj=active_mj,
            connected_mj=connected_mj,
            answered=answered,
        )
        self.total_mj += transfer.energy_mj
        self.energy_by_kind[ticket.kind] += transfer.energy_mj
        self.transfers.append(transfer)
        return transfer

    def energy_until(self, t_s: float) -> float:
        """Energy charged so far plus the pending tail of the last call, up to `t_s`."""
        if self._active or self._last_end is None or t_s <= self._last_end:
            return self.total_mj
        return self.total_mj + tail_energy_mj(self.model, t_s - self._last_end)
