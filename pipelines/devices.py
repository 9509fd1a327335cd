"""The device classes of the fleet: how fast they compute, what they draw, which radio and battery they have.

These are the *simulated* hardware. The fleet runs on this host (a 2-core x86 server, Intel Xeon
of the Sapphire Rapids generation under KVM); a device's compute time is the host's time for the
same work stretched by ``speed_factor``, and its energy is its power times that stretched time.

How the speed factors were chosen. A factor is the ratio of sustained dense-DNN throughput (float32
multiply-accumulates per second on convolution/GEMM kernels, the work our stages do) of this host
to the device. A general CPU mix such as Geekbench understates it: the host's kernels run on AVX-512,
the devices' on 128-bit NEON (or less), at lower clocks and under thermal limits.

    host: measured here, the shipped audio CNN (85.8 M MACs) in 1.46 ms on 2 threads  ~58 GMAC/s
    phone: Pixel 3, Snapdragon 845 (4x A75 + 4x A55): MobileNet-v1 1.0/224 (569 M MACs) float in
        ~24-30 ms on 4 CPU threads in the TensorFlow Lite performance benchmarks     ~20 GMAC/s  -> 3x
    iot_board: Raspberry Pi 4 B (4x A72 @ 1.5 GHz): MobileNet-v1 float in ~90-110 ms with
        TensorFlow Lite on 4 threads (published RPi 4 TFLite benchmarks)               ~6 GMAC/s  -> 10x
    watch: Snapdragon 400 / Wear 2100 (4x A7 @ 1.2 GHz): an A7 core peaks at ~1.2 GMAC/s float32
        NEON (2 lanes x FMA) and sustains about half; a watch app's inference runs on one core
        (thermal and scheduling limits; Bhattacharya & Lane, SenSys 2016, ran their watch DNNs on
        this class)                                                                   ~0.6 GMAC/s -> 100x

These are approximations with a factor-of-2 uncertainty; the watch is the least certain. They are
the simulated hardware: the fleet runs each front for real on this host and stretches its time.

Power figures: ``active_mw`` is the whole device's draw while it runs a model (CPU busy), and
``idle_mw`` its draw with the screen off and the CPU idle; the radio's own power is modelled apart
(:mod:`pipelines.power`). Where a figure is an estimate and not a measurement, ``source`` says so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pipelines.power import Radio
from splitsense.errors import ConfigError

__all__ = ["DEVICE_CLASSES", "DeviceClass", "device_class", "stretch"]


@dataclass(frozen=True)
class DeviceClass:
    """One class of simulated device. Checked when built."""

    name: str
    speed_factor: float  # device seconds / host seconds for the same work; > 1 means slower than the host
    active_mw: float  # whole-device power while computing
    idle_mw: float  # whole-device power while idle, screen off (radio paging excluded)
    radio: Radio
    battery_mwh: float
    source: str

    def __post_init__(self) -> None:
        if not self.name:
            raise ConfigError("DeviceClass.name must not be empty")
        for field_name in ("speed_factor", "active_mw", "battery_mwh"):
            value = getattr(self, field_name)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"DeviceClass {self.name!r}: {field_name} must be > 0, got {value!r}")
        if not (math.isfinite(self.idle_mw) and 0 <= self.idle_mw <= self.active_mw):
            raise ConfigError(f"DeviceClass {self.name!r}: idle_mw must be in [0, active_mw], got {self.idle_mw!r}")
        if not isinstance(self.radio, Radio):
            object.__setattr__(self, "radio", Radio(self.radio))

    @property
    def battery_mj(self) -> float:
        """Battery capacity in mJ (1 mWh = 3600 mJ)."""
        return self.battery_mwh * 3600.0


DEVICE_CLASSES: dict[str, DeviceClass] = {
    "phone": DeviceClass(
        name="phone",
        speed_factor=3.0,
        # Snapdragon 845: one Cortex-A75 core busy plus memory/uncore draws ~1.5-2.5 W (AnandTech's
        # SPEC2006 power measurements of the Snapdragon 845 reference device, 2018); 2 W is the middle.
        active_mw=2000.0,
        # Screen-off base power of a smartphone, Huang et al., MobiSys 2012, Table 3: 11.4 mW.
        idle_mw=11.4,
        radio=Radio.LTE,
        # Google Pixel 3 spec sheet: 2915 mAh at 3.85 V nominal = 11,223 mWh.
        battery_mwh=2915 * 3.85,
        source=(
            "Pixel 3 / Snapdragon 845 class. Speed: ~20 GMAC/s (TFLite MobileNet-v1 float, 4 threads) vs host ~58. "
            "Active ~2 W: AnandTech Snapdragon 845 SPEC2006 per-core power (1.5-2.5 W), estimate. "
            "Idle 11.4 mW: Huang et al. MobiSys 2012 Table 3 (screen-off base). "
            "Battery: Pixel 3 spec, 2915 mAh x 3.85 V. Radio: LTE."
        ),
    ),
    "iot_board": DeviceClass(
        name="iot_board",
        speed_factor=10.0,
        # Raspberry Pi 4 Model B, bare board: 540 mA idle (2.7 W) and 1280 mA (6.4 W) with all four
        # cores under stress-ng, measured at 5.1 V (Jeff Geerling's and RasPi.TV's published
        # measurements; the Raspberry Pi documentation gives 600 mA "typical bare-board active").
        active_mw=6400.0,
        idle_mw=2700.0,
        radio=Radio.WIFI,
        # A Pi has no battery: the simulated board runs from a common 10,000 mAh (3.7 V cell) USB
        # power bank = 37,000 mWh. This is a scenario assumption, not a measurement.
        battery_mwh=10_000 * 3.7,
        source=(
            "Raspberry Pi 4 Model B (Cortex-A72 @ 1.5 GHz). Speed: ~6 GMAC/s (TFLite MobileNet-v1 float, "
            "4 threads) vs host ~58. Power: 2.7 W idle / 6.4 W full load (Geerling, RasPi.TV measurements; "
            "RPi docs 600 mA typical active). Battery: assumed 10,000 mAh x 3.7 V power bank. Radio: WiFi."
        ),
    ),
    "watch": DeviceClass(
        name="watch",
        speed_factor=100.0,
        # Snapdragon 400 / Wear 2100 (4x Cortex-A7 @ 1.2 GHz), the smartwatch SoC of LG Watch Urbane-
        # class watches used for inertial models in Bhattacharya & Lane, "From Smart to Deep",
        # SenSys 2016. A Cortex-A7 core draws ~0.1-0.2 W at 1.2 GHz (ARM's published A7 figures);
        # with the SoC's memory and uncore busy, ~400 mW. Estimate.
        active_mw=400.0,
        # Screen-off idle of a Wear OS watch, estimate from its battery life (1.5-2 days on ~1.5 Wh
        # including display use): ~25 mW.
        idle_mw=25.0,
        radio=Radio.WIFI,
        # LG Watch Urbane: 410 mAh at 3.8 V nominal = 1558 mWh.
        battery_mwh=410 * 3.8,
        source=(
            "LG Watch Urbane / Snapdragon 400-Wear 2100 class (Cortex-A7 @ 1.2 GHz), as in Bhattacharya "
            "& Lane SenSys 2016. Speed: ~0.6 GMAC/s sustained NEON on one A7 core vs host ~58, estimate. "
            "Active ~400 mW and idle ~25 mW: estimates (ARM Cortex-A7 per-core power; battery life). "
            "Battery: LG Watch Urbane spec, 410 mAh x 3.8 V. Radio: WiFi."
        ),
    ),
}


def device_class(name: str) -> DeviceClass:
    """The device class called ``name``; a :class:`ConfigError` lists the known ones otherwise."""
    try:
        return DEVICE_CLASSES[name]
    except KeyError:
        known = ", ".join(sorted(DEVICE_CLASSES))
        raise ConfigError(f"unknown device class {name!r}; use one of: {known}") from None


def stretch(host_seconds: float, device: DeviceClass) -> float:
    """Device time for work that took ``host_seconds`` on this host."""
    if not (math.isfinite(host_seconds) and host_seconds >= 0):
        raise ValueError(f"host_seconds must be finite and >= 0, got {host_seconds!r}")
    return host_seconds * device.speed_factor
