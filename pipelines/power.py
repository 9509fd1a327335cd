"""Radio power model with promotion and tail states, shared by the edge, the controller and the simulators.

Pure: imports nothing but the standard library, so a device, the cloud and the simulators agree on
one model. Units are in the names: mW, s, mJ (1 mW x 1 s = 1 mJ), Mbit/s (10**6 bit/s), bytes.

The model (Huang et al., "A Close Examination of Performance and Power Characteristics of 4G LTE
Networks", MobiSys 2012; below "Huang12") is a state machine per radio:

    IDLE --(promotion_s at promotion_mw)--> ACTIVE --(transfer)--> TAIL (tail_s at tail_mw,
    then tail2_s at tail2_mw) --> IDLE (idle_mw, paging duty cycle)

* While a transfer runs, the radio draws ``alpha_u * up_mbps + alpha_d * down_mbps + beta``
  (Huang12 Table 4, fitted to LTE, 3G and WiFi). Uplink and downlink are charged one after the
  other (the request goes up, the answer comes down), so the transfer costs
  ``alpha_u * Mbit_up + alpha_d * Mbit_down + beta * (t_up + t_down)`` mJ.
* After a transfer the radio stays in its high-power tail for ``tail_s`` (LTE: 11.6 s at 1060 mW,
  the RRC_CONNECTED inactivity timer). A transfer that starts inside the tail reuses the
  connected state: it pays the tail only for the gap it actually waited, and no promotion.
* A transfer that starts after the radio went back to idle (gap longer than the whole tail)
  pays the full tail of the previous transfer plus a promotion (LTE: 260 ms at 1211 mW).
* 3G has a two-stage tail, DCH then FACH (Huang12 Table 3); ``tail2_*`` holds the second stage and
  is zero for LTE and WiFi. A transfer that starts in FACH is charged no promotion (Huang12 gives
  no FACH->DCH figure; its delay is small next to IDLE->DCH).
* ``idle_mw`` is the radio's average paging power while idle (DRX/beacon duty cycle). It is paid
  whether or not a device offloads, so :func:`transfer_energy_mj` and :class:`RadioEnergyMeter`
  do not charge it; simulators add ``idle_mw`` x time to a device's baseline.

Balasubramanian et al. ("Energy Consumption in Mobile Phones: A Measurement Study and Implications
for Network Applications", IMC 2009) measured a longer 3G tail on another carrier (~12.5 s); we keep
Huang12's figures for LTE, 3G and WiFi so that they come from one testbed.

BLE (a microcontroller sensor node's radio, to a phone or gateway as BLE central) fits the same state
machine with figures from the nRF52840 Product Specification (3 V, DC/DC on): the radio transmits at
4.8 mA (0 dBm) and receives at 4.6 mA, so ``alpha`` is the energy per Mbit on the air at the 1 Mbit/s
PHY (each data packet is followed by the peer's short acknowledgement, which it receives); the
"promotion" is the wait for the next connection event, on average half the connection interval,
during which the SoC sleeps; there is no tail (the radio sleeps right after the connection event
that carried the last packet); and ``idle_mw`` is the duty cycle of the empty connection events
that keep the link alive. BLE carries at most ~0.8 Mbit/s of application data on the 1M PHY
(~1.4 Mbit/s on the 2M PHY): a link faster than that on paper is capped by the radio.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from splitsense.kinds import Radio

__all__ = [
    "BITS_PER_BYTE",
    "Radio",
    "RadioEnergyMeter",
    "RadioPowerModel",
    "RADIO_MODELS",
    "compute_energy_mj",
    "promotion_delay_s",
    "radio_model",
    "tail_energy_mj",
    "transfer_energy_mj",
    "transfer_seconds",
]

BITS_PER_BYTE = 8
_BITS_PER_MBIT = 1e6


@dataclass(frozen=True)
class RadioPowerModel:
    """Power figures of one radio. Checked when built: every figure is finite and >= 0."""

    radio: Radio
    uplink_mw_per_mbps: float  # alpha_u: extra power per Mbit/s of uplink throughput
    downlink_mw_per_mbps: float  # alpha_d: extra power per Mbit/s of downlink throughput
    base_mw: float  # beta: power of the active state at zero throughput
    promotion_s: float  # IDLE -> connected promotion delay
    promotion_mw: float  # power drawn during the promotion
    tail_s: float  # first (high-power) tail after the last transfer
    tail_mw: float
    idle_mw: float  # average paging power while idle (duty-cycled DRX / WiFi beacons)
    tail2_s: float = 0.0  # second, lower-power tail stage (3G FACH); 0 for LTE, WiFi and BLE
    tail2_mw: float = 0.0
    source: str = ""

    def __post_init__(self) -> None:
        for name in (
            "uplink_mw_per_mbps",
            "downlink_mw_per_mbps",
            "base_mw",
            "promotion_s",
            "promotion_mw",
            "tail_s",
            "tail_mw",
            "idle_mw",
            "tail2_s",
            "tail2_mw",
        ):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"RadioPowerModel.{name} must be finite and >= 0, got {value!r}")

    @property
    def total_tail_s(self) -> float:
        """How long the radio stays connected after a transfer before it drops to idle."""
        return self.tail_s + self.tail2_s

    @property
    def full_tail_mj(self) -> float:
        """Energy of one whole tail (paid when the next transfer comes after it ended)."""
        return self.tail_mw * self.tail_s + self.tail2_mw * self.tail2_s


# --- Published constants -------------------------------------------------------------------------
# Huang12 Table 4 ("data transfer power model", P = alpha_u*t_u + alpha_d*t_d + beta, t in Mbit/s):
#                 alpha_u (mW/Mbps)  alpha_d (mW/Mbps)  beta (mW)
#   LTE               438.39              51.97          1288.04
#   3G                868.98             122.12           817.88
#   WiFi              283.17             137.01           132.86
# Huang12 Table 3 ("power model parameters", mean of repeated measurements):
#   LTE promotion 1210.7 mW for 260.1 ms; LTE tail base 1060.0 mW for Ttail = 11576.0 ms;
#   LTE DRX in RRC_IDLE: 594.3 mW on for 43.2 ms every 1280.2 ms.
#   3G promotion 659.4 mW for 582.1 ms; DCH tail 803.9 mW for 8088.2 ms; FACH tail 601.3 mW for
#   824.2 ms; 3G DRX (idle): 374.2 mW on for 55.4 ms every 5112.4 ms.
#   WiFi promotion 124.4 mW for 79.1 ms; WiFi tail 119.3 mW for 238.1 ms; WiFi beacon (idle):
#   77.2 mW on for 7.6 ms every 308.2 ms.
# The LTE tail also has 1 ms DRX on-periods at ~1680 mW every 20-40 ms; they add <2% to the tail
# base power and are left out, as in Huang12's own simplified model.
_HUANG12 = "Huang et al., MobiSys 2012, Tables 3 and 4"


def _duty_mw(on_mw: float, on_ms: float, period_ms: float) -> float:
    """Average power of a duty-cycled paging state."""
    return on_mw * on_ms / period_ms


# BLE, from the nRF52840 Product Specification v1.x (Nordic Semiconductor), 3 V supply, DC/DC on:
#   radio TX at 0 dBm 4.8 mA = 14.4 mW; radio RX at 1 Mbit/s 4.6 mA = 13.8 mW;
#   radio ramp-up before each packet ~40 us (fast ramp-up) to 140 us (default).
# Energy per Mbit on the air at the 1M PHY (1 us per bit): uplink, each 251-byte LL payload (2120 us
# on air incl. headers) is followed by IFS + the peer's empty acknowledgement (150 + 80 + 150 us,
# received at RX power): (2120 x 14.4 + 380 x 13.8) uJ / (244 x 8 bit of application data) ~ 18.3
# mJ/Mbit; downlink symmetrically ~ (2120 x 13.8 + 380 x 14.4) / 1952 ~ 17.8 mJ/Mbit.
# beta: the HFXO (needed by the radio) and the radio's ramp-ups between packets, ~1 mW: estimate.
# Promotion: data queued between connection events waits for the next one, on average half the
# connection interval. A phone central grants 15-30 ms (7.5 ms is the BLE minimum; Android asks for
# 7.5-50 ms by default, iOS 15-30 ms): a 30 ms interval -> 15 ms. The SoC sleeps meanwhile
# (System ON, ~3 uA: the device's own idle power), so the radio draws nothing extra.
# Tail: none; the radio sleeps at the end of the connection event that carried the last packet.
# Idle: one empty connection event per interval, two 80 us empty packets + 150 us IFS + 140 us
# ramp-up ~ 0.45 ms at ~14.1 mW (mean of TX and RX) every 30 ms -> ~0.21 mW.
_NRF52840 = "nRF52840 Product Specification v1.x (Nordic Semiconductor), 3 V, DC/DC; BLE 1M PHY, 30 ms interval"
_BLE_INTERVAL_MS = 30.0
_BLE_TX_MW = 4.8 * 3.0
_BLE_RX_MW = 4.6 * 3.0


RADIO_MODELS: dict[Radio, RadioPowerModel] = {
    Radio.LTE: RadioPowerModel(
        radio=Radio.LTE,
        uplink_mw_per_mbps=438.39,
        downlink_mw_per_mbps=51.97,
        base_mw=1288.04,
        promotion_s=0.2601,
        promotion_mw=1210.7,
        tail_s=11.576,
        tail_mw=1060.0,
        idle_mw=_duty_mw(594.3, 43.2, 1280.2),  # ~20.1 mW
        source=_HUANG12,
    ),
    Radio.THREEG: RadioPowerModel(
        radio=Radio.THREEG,
        uplink_mw_per_mbps=868.98,
        downlink_mw_per_mbps=122.12,
        base_mw=817.88,
        promotion_s=0.5821,
        promotion_mw=659.4,
        tail_s=8.0882,  # DCH tail
        tail_mw=803.9,
        tail2_s=0.8242,  # FACH tail
        tail2_mw=601.3,
        idle_mw=_duty_mw(374.2, 55.4, 5112.4),  # ~4.1 mW
        source=_HUANG12,
    ),
    Radio.WIFI: RadioPowerModel(
        radio=Radio.WIFI,
        uplink_mw_per_mbps=283.17,
        downlink_mw_per_mbps=137.01,
        base_mw=132.86,
        promotion_s=0.0791,
        promotion_mw=124.4,
        tail_s=0.2381,
        tail_mw=119.3,
        idle_mw=_duty_mw(77.2, 7.6, 308.2),  # ~1.9 mW
        source=_HUANG12,
    ),
    Radio.BLE: RadioPowerModel(
        radio=Radio.BLE,
        uplink_mw_per_mbps=(2120 * _BLE_TX_MW + 380 * _BLE_RX_MW) / (244 * 8),  # ~18.3
        downlink_mw_per_mbps=(2120 * _BLE_RX_MW + 380 * _BLE_TX_MW) / (244 * 8),  # ~17.8
        base_mw=1.0,
        promotion_s=_BLE_INTERVAL_MS / 2 / 1000,  # 15 ms: half a connection interval
        promotion_mw=0.0,
        tail_s=0.0,
        tail_mw=0.0,
        idle_mw=_duty_mw((_BLE_TX_MW + _BLE_RX_MW) / 2, 0.45, _BLE_INTERVAL_MS),  # ~0.21 mW
        source=_NRF52840,
    ),
}


def radio_model(radio: Radio | str) -> RadioPowerModel:
    """The published power model of ``radio`` ("wifi", "lte", "3g", "ble" or a :class:`Radio`)."""
    try:
        return RADIO_MODELS[Radio(radio)]
    except ValueError:
        known = ", ".join(r.value for r in Radio)
        raise ValueError(f"unknown radio {radio!r}; use one of: {known}") from None


def compute_energy_mj(active_mw: float, seconds: float) -> float:
    """Energy of drawing ``active_mw`` for ``seconds`` (mW x s = mJ)."""
    if not (math.isfinite(active_mw) and active_mw >= 0):
        raise ValueError(f"active_mw must be finite and >= 0, got {active_mw!r}")
    if not (math.isfinite(seconds) and seconds >= 0):
        raise ValueError(f"seconds must be finite and >= 0, got {seconds!r}")
    return active_mw * seconds


def _check_transfer(nbytes: float, mbps: float, what: str) -> None:
    if not (math.isfinite(nbytes) and nbytes >= 0):
        raise ValueError(f"{what} bytes must be finite and >= 0, got {nbytes!r}")
    if nbytes > 0 and not (math.isfinite(mbps) and mbps > 0):
        raise ValueError(f"{what} bandwidth must be finite and > 0 Mbit/s to move bytes, got {mbps!r}")


def transfer_seconds(nbytes: float, mbps: float) -> float:
    """Time to move ``nbytes`` at ``mbps`` Mbit/s (0 for no bytes)."""
    _check_transfer(nbytes, mbps, "transfer")
    if nbytes == 0:
        return 0.0
    return nbytes * BITS_PER_BYTE / (mbps * _BITS_PER_MBIT)


def tail_energy_mj(model: RadioPowerModel, gap_s: float) -> float:
    """Tail energy paid between the end of one transfer and ``gap_s`` later (capped at the whole tail)."""
    if math.isnan(gap_s) or gap_s < 0:
        raise ValueError(f"gap_s must be >= 0, got {gap_s!r}")
    first = min(gap_s, model.tail_s)
    second = min(max(gap_s - model.tail_s, 0.0), model.tail2_s)
    return model.tail_mw * first + model.tail2_mw * second


def promotion_delay_s(model: RadioPowerModel, idle_gap_s: float) -> float:
    """Extra latency before a transfer: the promotion, only when the radio had dropped to idle."""
    if math.isnan(idle_gap_s) or idle_gap_s < 0:
        raise ValueError(f"idle_gap_s must be >= 0, got {idle_gap_s!r}")
    return model.promotion_s if idle_gap_s > model.total_tail_s else 0.0


def transfer_energy_mj(
    model: RadioPowerModel,
    bytes_up: float,
    bytes_down: float,
    bandwidth_up_mbps: float,
    bandwidth_down_mbps: float,
    idle_gap_s: float,
) -> float:
    """Radio energy of one request/response, given the time since the previous transfer ended.

    ``idle_gap_s`` is the time from the end of the previous transfer to the start of this one;
    pass ``math.inf`` when there was none. The result is the tail of the previous transfer over
    ``min(idle_gap_s, tail)``, plus a promotion if the radio had gone idle, plus the active energy
    ``alpha_u*Mbit_up + alpha_d*Mbit_down + beta*(t_up + t_down)``. The tail that follows this
    transfer is charged to the next one (or by :meth:`RadioEnergyMeter.energy_until`).
    """
    t_up = transfer_seconds(bytes_up, bandwidth_up_mbps)
    t_down = transfer_seconds(bytes_down, bandwidth_down_mbps)
    active = (
        model.uplink_mw_per_mbps * bytes_up * BITS_PER_BYTE / _BITS_PER_MBIT
        + model.downlink_mw_per_mbps * bytes_down * BITS_PER_BYTE / _BITS_PER_MBIT
        + model.base_mw * (t_up + t_down)
    )
    promotion = model.promotion_mw * promotion_delay_s(model, idle_gap_s)
    tail = tail_energy_mj(model, idle_gap_s) if math.isfinite(idle_gap_s) else 0.0
    return tail + promotion + active


class RadioEnergyMeter:
    """Accumulates the radio energy of a stream of transfers, tails between them included.

    Pure (no clock, no I/O): the caller passes each transfer's start time ``t_s`` on its own clock,
    in non-decreasing order. A transfer that arrives while the previous one is still on the air
    queues behind it (the radio is one FIFO). The tail after the last transfer is not charged
    until asked: :meth:`energy_until` includes it up to a given time.
    """

    def __init__(self, model: RadioPowerModel) -> None:
        self.model = model
        self.total_mj = 0.0  # tails + promotions + active energy of the transfers recorded so far
        self.transfers = 0
        self.promotions = 0
        self._last_start_s = -math.inf
        self._busy_until_s: float | None = None  # end of the last transfer on the air

    @property
    def busy_until_s(self) -> float | None:
        """When the last recorded transfer ends (None before the first)."""
        return self._busy_until_s

    def record(
        self,
        t_s: float,
        bytes_up: float,
        bandwidth_up_mbps: float,
        bytes_down: float = 0.0,
        bandwidth_down_mbps: float | None = None,
    ) -> float:
        """Record a transfer starting at ``t_s``; returns the energy it was charged (mJ)."""
        if not math.isfinite(t_s):
            raise ValueError(f"t_s must be finite, got {t_s!r}")
        if t_s < self._last_start_s:
            raise ValueError(f"transfers must be recorded in time order: t_s={t_s} < previous {self._last_start_s}")
        down_mbps = bandwidth_up_mbps if bandwidth_down_mbps is None else bandwidth_down_mbps
        start = t_s if self._busy_until_s is None else max(t_s, self._busy_until_s)
        gap = math.inf if self._busy_until_s is None else start - self._busy_until_s
        energy = transfer_energy_mj(self.model, bytes_up, bytes_down, bandwidth_up_mbps, down_mbps, gap)
        delay = promotion_delay_s(self.model, gap)
        self.promotions += delay > 0
        self._busy_until_s = (
            start + delay + transfer_seconds(bytes_up, bandwidth_up_mbps) + transfer_seconds(bytes_down, down_mbps)
        )
        self._last_start_s = t_s
        self.total_mj += energy
        self.transfers += 1
        return energy

    def energy_until(self, t_s: float) -> float:
        """Energy so far plus the pending tail of the last transfer, up to ``t_s``."""
        if self._busy_until_s is None or t_s <= self._busy_until_s:
            return self.total_mj
        return self.total_mj + tail_energy_mj(self.model, t_s - self._busy_until_s)
