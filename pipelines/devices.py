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
    sensor_node: Arduino Nano 33 BLE Sense, nRF52840 (one Cortex-M4F @ 64 MHz; its only SIMD is the
        DSP extension's dual 16-bit multiply-accumulate, SMLAD). CMSIS-NN (Lai, Suda & Chandra, "CMSIS-NN:
        Efficient Neural Network Kernels for Arm Cortex-M CPUs", arXiv:1801.06601, 2018) runs its
        CIFAR-10 CNN (~12.3 M MACs by our count of its three 5x5 convolutions) in 99.1 ms on a
        Cortex-M7 @ 216 MHz (10.1 images/s), ~124 M MAC/s int8 = ~0.57 MAC/cycle. The M4 runs the
        same SMLAD kernels single-issue (the M7 dual-issues): ~half per cycle, ~0.29 MAC/cycle x
        64 MHz                                                                       ~18 M MAC/s -> 3000x
        That is int8 (how a front runs on an MCU); fp32 on the M4F's scalar FPU is ~2x slower still.

These are approximations with a factor-of-2 uncertainty (the sensor node's, factor 2-3); the watch
is the least certain of the application processors. They are the simulated hardware: the fleet runs
each front for real on this host and stretches its time.

Power figures: ``active_mw`` is the whole device's draw while it runs a model (CPU busy), and
``idle_mw`` its draw with the screen off and the CPU idle; the radio's own power is modelled apart
(:mod:`pipelines.power`). Where a figure is an estimate and not a measurement, ``source`` says so.

Memory. ``storage_bytes`` is what one app's model weights may take of the device's storage (flash,
eMMC, microSD) and ``ram_bytes`` what the running front may take of its RAM: its peak activation,
plus its weights where the runtime loads them into RAM (``weights_in_ram``: phones, boards and
watches do; a microcontroller's TensorFlow Lite Micro reads them in place from flash). Each is a
stated share of the device's memory, not all of it: the OS, the app and other models need the rest.
:func:`front_memory` says what the front [0, k) of a model needs (fp32 weights and activations,
as the catalog measures them) and :func:`front_fits` whether a class can hold it. A class with
``None`` budgets is unlimited.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from pipelines.power import Radio
from splitsense.errors import ConfigError

if TYPE_CHECKING:
    from pipelines.catalog import ModelCatalog

__all__ = [
    "DEVICE_CLASSES",
    "DeviceClass",
    "stage_device_ms",
    "FrontMemory",
    "MemoryBudget",
    "device_class",
    "format_bytes",
    "edge_fallback",
    "front_fits",
    "front_memory",
    "stretch",
]

FP32_BYTES = 4  # the catalog's weights and activations are float32
_KIB = 1024
_MIB = 1024 * 1024
_GIB = 1024 * 1024 * 1024


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
    # Memory budgets of one app's model (see the module docstring); None: unlimited.
    ram_bytes: int | None = None  # peak activation of the front (+ its weights when weights_in_ram)
    storage_bytes: int | None = None  # the front's weights at rest (flash, eMMC, microSD)
    weights_in_ram: bool = True  # False: the runtime reads weights in place from flash (an MCU)
    # Sustained MAC/s of the device's inference runtime. None: a stage takes its host time x
    # speed_factor (an application processor running the same kind of framework as the host). Set
    # for a microcontroller: TensorFlow Lite Micro / CMSIS-NN has no per-operator framework overhead
    # to stretch (the host's eager PyTorch spends most of a tiny stage's time on dispatch, and x3000
    # of that is not what an MCU pays), so a stage takes its MACs / macs_per_s, as MCU latency
    # models do (MCUNet, NeurIPS 2020, profiles kernels the same way).
    macs_per_s: float | None = None

    def __post_init__(self) -> None:
        if not self.name:
            raise ConfigError("DeviceClass.name must not be empty")
        for field_name in ("ram_bytes", "storage_bytes"):
            budget = getattr(self, field_name)
            if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget <= 0):
                raise ConfigError(f"DeviceClass {self.name!r}: {field_name} must be an int > 0 or None, got {budget!r}")
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
            "Battery: Pixel 3 spec, 2915 mAh x 3.85 V. Radio: LTE. "
            "Memory: 4 GB RAM, 64 GB storage (Pixel 3 spec, base model); one model may use 256 MiB of RAM "
            "(Android's per-app heap growth limit on 4 GB phones, dalvik.vm.heapgrowthlimit) and 100 MB of "
            "storage (Google Play's APK size limit: weights ship inside the app)."
        ),
        # Pixel 3 spec sheet: 4 GB LPDDR4x RAM, 64 or 128 GB storage (the 64 GB base model here).
        # One app's model gets the per-app heap Android grants a normal app on a 4 GB phone (256 MiB,
        # dalvik.vm.heapgrowthlimit; a native runtime is not bound by it, but it is the OS's own
        # statement of one app's fair share, 1/16 of RAM), and 100 MB of storage, Google Play's APK
        # size limit (the weights ship inside the app).
        ram_bytes=256 * _MIB,
        storage_bytes=100 * 1000 * 1000,
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
            "RPi docs 600 mA typical active). Battery: assumed 10,000 mAh x 3.7 V power bank. Radio: WiFi. "
            "Memory: the 4 GB RAM model with a 32 GB microSD; one model may use 1 GiB of each (a quarter of "
            "RAM, the rest for the OS, the Python runtime and other services; estimate)."
        ),
        # Raspberry Pi 4 Model B comes with 1, 2, 4 or 8 GB (Raspberry Pi product brief); the 4 GB
        # model here, with a 32 GB microSD card (the size the Raspberry Pi documentation recommends
        # for Raspberry Pi OS). The board is dedicated to sensing but shares its RAM with the OS,
        # the Python runtime (torch alone is a few hundred MB resident) and other services: one
        # model gets a quarter of RAM, 1 GiB, and 1 GiB of the card. Scenario assumptions.
        ram_bytes=1 * _GIB,
        storage_bytes=1 * _GIB,
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
            "Battery: LG Watch Urbane spec, 410 mAh x 3.8 V. Radio: WiFi. "
            "Memory: 512 MB RAM, 4 GB storage (LG Watch Urbane spec); one model may use 64 MiB of RAM (1/8) "
            "and 256 MiB of storage (1/16); estimates."
        ),
        # LG Watch Urbane spec: 512 MB RAM, 4 GB eMMC. Android Wear itself takes most of the RAM
        # and about half the storage: one model gets 1/8 of RAM (64 MiB) and 1/16 of storage
        # (256 MiB). Estimates.
        ram_bytes=64 * _MIB,
        storage_bytes=256 * _MIB,
    ),
    "sensor_node": DeviceClass(
        name="sensor_node",
        # Cortex-M4F @ 64 MHz: ~18 M MAC/s int8 with CMSIS-NN (module docstring: Lai et al. 2018's
        # Cortex-M7 figure scaled per cycle to the single-issue M4) vs the host's ~58 G MAC/s.
        speed_factor=3000.0,
        macs_per_s=18e6,
        # nRF52840 Product Specification (v1.x, 3 V supply, DC/DC on): CPU running CoreMark from
        # flash at 64 MHz, cache on, 3.3 mA (52 uA/MHz) -> 9.9 mW; ~10 mW for the SoC computing.
        # The board's power LED and sensors are not counted (no class is charged for sensing).
        active_mw=10.0,
        # nRF52840 PS, System ON sleep with all 256 KB of RAM retained and the RTC running: a few uA
        # (~3 uA) -> ~0.01 mW. The BLE connection's own duty cycle is the radio model's idle_mw.
        idle_mw=0.01,
        radio=Radio.BLE,
        # The Nano 33 BLE Sense has no battery: assumed a small 3.7 V 500 mAh LiPo (a common size
        # for the board's form factor) = 1850 mWh. A scenario assumption, not a measurement.
        battery_mwh=500 * 3.7,
        source=(
            "Arduino Nano 33 BLE Sense / nRF52840 (Cortex-M4F @ 64 MHz, 1 MB flash, 256 KB RAM, BLE 5, on-board "
            "PDM microphone and IMU; the TinyML reference board). Speed: ~18 M MAC/s int8 with CMSIS-NN (Lai et al. "
            "2018: 99.1 ms for a ~12.3 M MAC CNN on a Cortex-M7 @ 216 MHz, scaled per cycle to the single-issue M4) "
            "vs host ~58 G MAC/s, estimate. Active ~10 mW: nRF52840 PS, CoreMark from flash @ 64 MHz, 3.3 mA at 3 V "
            "(DC/DC). Idle ~0.01 mW: nRF52840 PS, System ON with RAM retained, ~3 uA. Battery: assumed 500 mAh x "
            "3.7 V LiPo. Radio: BLE (pipelines.power). Memory: one model may use 640 KiB of the 1 MB flash (the "
            "64 KB bootloader, Mbed OS and the BLE stack take the rest) and 128 KiB of the 256 KB RAM for "
            "activations (half: Mbed OS, the BLE stack and the audio buffers need the other half); weights are "
            "read in place from flash (TensorFlow Lite Micro), not copied to RAM."
        ),
        # nRF52840 PS: 1 MB flash, 256 KB RAM. The Arduino core's bootloader takes 64 KB (the IDE
        # gives sketches 983,040 bytes), and Mbed OS with the Cordio BLE stack and the application
        # take ~300 KB of the rest: 640 KiB of flash for weights. Mbed OS, the BLE stack, thread
        # stacks and the microphone's PDM/window buffers take about half the RAM: 128 KiB for the
        # front's activations (TensorFlow Lite Micro's tensor arena). Estimates.
        ram_bytes=128 * _KIB,
        storage_bytes=640 * _KIB,
        weights_in_ram=False,
    ),
}


def device_class(name: str) -> DeviceClass:
    """The device class called ``name``; a :class:`ConfigError` lists the known ones otherwise."""
    try:
        return DEVICE_CLASSES[name]
    except KeyError:
        known = ", ".join(sorted(DEVICE_CLASSES))
        raise ConfigError(f"unknown device class {name!r}; use one of: {known}") from None


def stage_device_ms(device: DeviceClass | object, macs: float, host_ms: float) -> float:
    """Device time of one stage: its MACs at the device's runtime rate when the class has one
    (``macs_per_s``), else its host time x the speed factor."""
    rate = getattr(device, "macs_per_s", None)
    if rate:
        return float(macs) / float(rate) * 1000.0
    return float(host_ms) * float(getattr(device, "speed_factor", 1.0))


def stretch(host_seconds: float, device: DeviceClass) -> float:
    """Device time for work that took ``host_seconds`` on this host."""
    if not (math.isfinite(host_seconds) and host_seconds >= 0):
        raise ValueError(f"host_seconds must be finite and >= 0, got {host_seconds!r}")
    return host_seconds * device.speed_factor


# ---------------------------------------------------------------------------------------------
# Memory feasibility of a front


class MemoryBudget(Protocol):
    """What :func:`front_fits` reads of a device: a :class:`DeviceClass`, or the cost model's profile."""

    @property
    def name(self) -> str: ...

    @property
    def ram_bytes(self) -> int | None: ...

    @property
    def storage_bytes(self) -> int | None: ...

    @property
    def weights_in_ram(self) -> bool: ...


@dataclass(frozen=True)
class FrontMemory:
    """What the front [0, cut) of a model needs: its weights and its peak activation, in bytes (fp32)."""

    weights_bytes: int  # parameters of stages [0, cut) at the level x 4 bytes
    peak_activation_bytes: int  # the largest input + output of one front stage (both live at once)

    def ram_bytes(self, weights_in_ram: bool) -> int:
        """RAM the running front needs: its peak activation, plus its weights when they are loaded."""
        return self.peak_activation_bytes + (self.weights_bytes if weights_in_ram else 0)


def front_memory(catalog: ModelCatalog, cut: int, level: float = 1.0) -> FrontMemory:
    """Weights (``LevelEntry.front_params[cut]`` x 4 bytes) and peak activation (max over the front's
    stages, and over the layers inside them where the catalog recorded ``stage_peak_elems``, of input
    + output elements x 4 bytes) of the front
    [0, cut) compressed at ``level``. Cut 0 (no front) needs nothing."""
    n = catalog.n_stages
    if isinstance(cut, bool) or not isinstance(cut, int) or not 0 <= cut <= n:
        raise ConfigError(f"cut {cut!r} is out of range for {catalog.model!r}: expected 0..{n}")
    if cut == 0:
        return FrontMemory(0, 0)
    weights = int(catalog.level(level).front_params[cut]) * FP32_BYTES
    numel = [math.prod(shape) for shape in catalog.activation_shapes]
    peaks = [numel[i] + numel[i + 1] for i in range(cut)]
    if catalog.stage_peak_elems:  # layer by layer inside each stage, when the catalog measured it
        peaks += list(catalog.stage_peak_elems[:cut])
    peak = max(peaks) * FP32_BYTES
    return FrontMemory(weights, peak)


def front_fits(device: MemoryBudget, catalog: ModelCatalog, cut: int, level: float = 1.0) -> str | None:
    """None when ``device`` can hold the front [0, cut) of ``catalog`` at ``level``; otherwise one line
    saying why not. Cut 0 (no front) always fits; a budget of None is unlimited."""
    if cut == 0 or (device.ram_bytes is None and device.storage_bytes is None):
        return None
    need = front_memory(catalog, cut, level)
    what = f"front of {catalog.model} at cut {cut}" + ("" if level == 1.0 else f" level {level:g}")
    storage = device.storage_bytes
    if storage is not None and need.weights_bytes > storage:
        return (
            f"{what} needs {format_bytes(need.weights_bytes)} of weights > "
            f"{format_bytes(storage)} {_storage_word(device)} budget of {device.name}"
        )
    ram = device.ram_bytes
    ram_need = need.ram_bytes(device.weights_in_ram)
    if ram is not None and ram_need > ram:
        parts = f"{format_bytes(need.peak_activation_bytes)} peak activation"
        if device.weights_in_ram:
            parts += f" + {format_bytes(need.weights_bytes)} weights"
        return (
            f"{what} needs {format_bytes(ram_need)} of RAM ({parts}) > {format_bytes(ram)} RAM budget of {device.name}"
        )
    return None


def edge_fallback(device: MemoryBudget, catalog: ModelCatalog) -> dict[str, object]:
    """How an EdgeDevice of this class runs `catalog`'s model: {} when the whole model fits (local
    fallback), else {"local_fallback": False, "max_cut": the deepest cut whose front fits} (it
    stores and forwards instead). Cut 0 always fits."""
    n = catalog.n_stages
    if front_fits(device, catalog, n) is None:
        return {}
    return {"local_fallback": False, "max_cut": max(k for k in range(n) if front_fits(device, catalog, k) is None)}


def _storage_word(device: MemoryBudget) -> str:
    return "storage" if device.weights_in_ram else "flash"


def format_bytes(n: int) -> str:
    """'512 B', '37.5 KiB', '6.3 MiB', '1.0 GiB' (binary units, one decimal)."""
    if n < _KIB:
        return f"{n} B"
    for unit, size in (("GiB", _GIB), ("MiB", _MIB)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n / _KIB:.1f} KiB"
