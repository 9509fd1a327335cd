"""The simulated hardware a fleet device runs on: one object, the device's only hook into the simulator.

`SimulatedHardware` implements edge.hardware.Hardware for one simulated device:

compute   a stage's device time is `ReferenceTime` (the catalog's host time x the class's speed
          factor, or MACs at a microcontroller's rate) or, with compute_time "measured", the CPU
          time it took here (`time.thread_time`) x the speed factor; the device waits it out.
radio     a call waits the promotion the device's own radio state (edge/radio.py) says is due:
          one model of the radio, shared with the estimator and the energy meter. The bytes' time
          on the air is their serialisation on the device's trace (`ShapingSchedule.time_to_send`),
          what a modem's counters would tell the platform.
link      the platform's link signal follows the emulated link's scripted outages: the link is
          reported lost `detect_s` after an outage starts (how long a real radio takes to notice
          that its link is gone, below) and back as soon as it ends.
hint      the platform's rate hint: BLE's application throughput at its PHY (the radio's cap in
          the simulator), what a BLE stack knows; none for WiFi and cellular (their platform hints
          are per-technology constants or PHY rates, no better than the configured prior).

How long a radio takes to notice a dead link (`LINK_LOSS_DETECT_S`):
    LTE   radio link failure: N310 = 1 out-of-sync indication (evaluated over 200 ms, 3GPP TS
          36.133) then T310 = 1000 ms (the TS 36.331 default): ~1.2 s
    3G    the same procedure (TS 25.331, N313/T313 ~ 1 s): ~1.2 s
    WiFi  Linux mac80211 declares beacon loss after 7 missed beacons (102.4 ms apart), ~0.7 s,
          then probes the AP once before it disconnects: ~1.0 s
    BLE   the connection supervision timeout: 4.2 s (BlueZ's default, 420 x 10 ms, for a Linux
          gateway as central)
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Sequence

from edge.hardware import Hardware
from simulators.link import ShapingSchedule

__all__ = ["LINK_LOSS_DETECT_S", "SimulatedHardware"]

LINK_LOSS_DETECT_S = {"lte": 1.2, "3g": 1.2, "wifi": 1.0, "ble": 4.2}


def _no_host_time() -> float:
    return 0.0


class SimulatedHardware(Hardware):
    """One simulated device's compute, radio timing and link signals."""

    compute_clock: Callable[[], float] = staticmethod(time.thread_time)  # type: ignore[assignment]

    def __init__(
        self,
        *,
        device_time_ms: Callable[[int, float, float], float] | None = None,
        speed_factor: float = 1.0,
        schedule: ShapingSchedule | None = None,
        link_zero: Callable[[], float] = lambda: 0.0,
        outages: Sequence[tuple[float, float]] = (),
        detect_s: float = 1.0,
        hint_mbps: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`device_time_ms(stage, level, host_ms)` (a ReferenceTime) or `speed_factor` stretch the
        compute; `schedule` read at `clock() - link_zero()` is the device's true uplink, and
        `outages` are its scripted outages on that same clock."""
        super().__init__(hint_mbps=hint_mbps)
        if not (math.isfinite(speed_factor) and speed_factor > 0):
            raise ValueError(f"speed_factor must be > 0, got {speed_factor!r}")
        if not (math.isfinite(detect_s) and detect_s >= 0):
            raise ValueError(f"detect_s must be >= 0, got {detect_s!r}")
        self._device_time_ms = device_time_ms
        if device_time_ms is not None:
            # the device's time comes from the reference alone: nothing reads the host's CPU time,
            # which costs a system call (~0.7 us here) at every stage of every window
            self.compute_clock = _no_host_time
        self.speed_factor = speed_factor
        self.schedule = schedule
        self._zero = link_zero
        self.outages = tuple(sorted((float(a), float(b)) for a, b in outages))
        self.detect_s = detect_s
        self._clock = clock
        self.promotion_waits = 0

    @property
    def simulated(self) -> bool:
        return True

    def link_time(self, t: float | None = None) -> float:
        return (self._clock() if t is None else t) - self._zero()

    def device_ms(self, stage: int, level: float, host_ms: float) -> float:
        if self._device_time_ms is not None:
            return self._device_time_ms(stage, level, host_ms)
        return host_ms * self.speed_factor

    async def wait_compute(self, since: float, device_ms: float) -> None:
        wait = since + device_ms / 1000.0 - self._clock()
        if wait > 0:
            await asyncio.sleep(wait)

    async def promote(self, promotion_s: float) -> None:
        if promotion_s > 0:
            self.promotion_waits += 1
            await asyncio.sleep(promotion_s)

    def on_air_s(self, bytes_up: int, bytes_down: int, start_s: float) -> float | None:
        if self.schedule is None:
            return None
        t = self.link_time(start_s)
        up = self.schedule.time_to_send(bytes_up, t)
        down = self.schedule.time_to_send(bytes_down, t + up) if math.isfinite(up) else math.inf
        total = up + down
        return total if math.isfinite(total) else None

    def link_up(self) -> bool:
        if self._link_up is False:  # forced down from outside (set_link)
            return False
        t = self.link_time()
        return not any(start + self.detect_s <= t < end for start, end in self.outages)
