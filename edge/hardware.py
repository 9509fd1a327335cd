"""What the runtime asks of the platform it runs on: clocks, compute time, the radio's signals.

`Hardware` is a real device: compute takes the time it takes (nothing to wait for), the radio
promotes by itself inside a call, and the platform's link signals are whatever the app feeds in
(`set_link` from the OS's connectivity callbacks: Android's ConnectivityManager.NetworkCallback
onLost/onAvailable, iOS's NWPathMonitor, a BLE stack's disconnect event; `hint_mbps` from
NetworkCapabilities.getLinkUpstreamBandwidthKbps or the BLE PHY).

The simulator's devices run on `simulators.hardware.SimulatedHardware`, one object that stretches
compute to the simulated device's speed, makes a call wait the promotion the device's radio state
says is due, knows how long bytes really took on the emulated link, and raises the link signals
when the emulated radio loses and regains its link. The runtime sees only this interface.
"""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["Hardware"]


class Hardware:
    """A real device's platform (the defaults change nothing)."""

    compute_clock: Callable[[], float] = staticmethod(time.perf_counter)  # type: ignore[assignment]

    def __init__(self, *, link_up: bool = True, hint_mbps: float | None = None) -> None:
        self._link_up = link_up
        self._hint_mbps = hint_mbps

    @property
    def simulated(self) -> bool:
        """Whether compute and radio waits are simulated (the runtime then waits them out)."""
        return False

    def device_ms(self, stage: int, level: float, host_ms: float) -> float:
        """Device time of a stage (-1: preprocessing) at compression `level` that took `host_ms` here."""
        return host_ms

    async def wait_compute(self, since: float, device_ms: float) -> None:
        """Wait until `device_ms` of device time has passed since `since` (real: it has)."""
        return None

    async def promote(self, promotion_s: float) -> None:
        """Wait the radio's promotion before a call's first byte (real: the modem does it)."""
        return None

    def on_air_s(self, bytes_up: int, bytes_down: int, start_s: float) -> float | None:
        """How long these bytes were on the air, if the platform knows (None: it does not)."""
        return None

    def link_up(self) -> bool:
        """The platform's association / bearer state: False means nothing gets through now."""
        return self._link_up

    def set_link(self, up: bool) -> None:
        self._link_up = bool(up)

    def hint_mbps(self) -> float | None:
        """The platform's own idea of the uplink's rate, the estimator's prior (None: none)."""
        return self._hint_mbps
