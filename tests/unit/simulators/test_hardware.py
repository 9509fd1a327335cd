"""The simulated hardware a fleet device runs on: link signal, time on the air, compute, promotion."""

from __future__ import annotations

import asyncio
import math
import time

import numpy as np
import pytest

from edge.hardware import Hardware
from simulators.hardware import LINK_LOSS_DETECT_S, SimulatedHardware
from simulators.link import ShapingSchedule
from simulators.traces import Trace

# 1 Mbit/s for 2 s, then 4 Mbit/s for 2 s; loops every 4 s.
STEP = Trace("step", "test", np.array([0.0, 2.0]), np.array([1.0, 4.0]), duration_s=4.0)


class Clock:
    def __init__(self, t: float = 0.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.mark.parametrize("zero", [0.0, 1000.0])
def test_link_signal_follows_the_outages_shifted_by_the_detection_delay(zero: float) -> None:
    clock = Clock()
    hw = SimulatedHardware(outages=[(30.0, 40.0), (10.0, 20.0)], detect_s=1.2, clock=clock, link_zero=lambda: zero)
    assert hw.outages == ((10.0, 20.0), (30.0, 40.0))
    expected = {
        0.0: True,
        10.0: True,  # the outage has started, the radio has not noticed yet
        11.19: True,
        11.2: False,  # start + detect_s
        15.0: False,
        19.99: False,
        20.0: True,  # back as soon as it ends
        25.0: True,
        31.2: False,
        40.0: True,
    }
    for t, up in expected.items():
        clock.t = zero + t  # the outages are on the link's clock, which starts at link_zero()
        assert hw.link_up() is up, t


def test_an_outage_shorter_than_the_detection_delay_is_never_signalled() -> None:
    clock = Clock()
    hw = SimulatedHardware(outages=[(5.0, 5.5)], detect_s=1.0, clock=clock)
    for t in np.arange(0.0, 10.0, 0.05):
        clock.t = float(t)
        assert hw.link_up()


def test_set_link_forces_the_link_down_from_outside() -> None:
    clock = Clock(3.0)
    hw = SimulatedHardware(outages=[(10.0, 20.0)], detect_s=0.0, clock=clock)
    hw.set_link(False)
    assert not hw.link_up()
    hw.set_link(True)
    assert hw.link_up()
    clock.t = 15.0
    assert not hw.link_up()  # the scripted outage still holds


def test_on_air_time_is_the_schedules_time_to_send() -> None:
    clock = Clock()
    schedule = ShapingSchedule(Trace.constant(8.0, duration_s=10.0))  # 1 MB/s
    hw = SimulatedHardware(schedule=schedule, clock=clock, link_zero=lambda: 50.0)
    assert hw.on_air_s(1000, 100, 51.0) == pytest.approx(1100 / 1e6)
    assert hw.on_air_s(1000, 100, 51.0) == pytest.approx(
        schedule.time_to_send(1000, 1.0) + schedule.time_to_send(100, 1.0 + 0.001)
    )
    assert hw.on_air_s(0, 0, 51.0) == 0.0
    assert SimulatedHardware(clock=clock).on_air_s(1000, 100, 1.0) is None  # no schedule: not known


def test_on_air_time_follows_the_trace_at_the_calls_start() -> None:
    hw = SimulatedHardware(schedule=ShapingSchedule(STEP), clock=Clock())
    mbit = 125_000  # bytes
    assert hw.on_air_s(mbit, 0, 0.5) == pytest.approx(1.0)  # at 1 Mbit/s
    assert hw.on_air_s(mbit, 0, 2.5) == pytest.approx(0.25)  # at 4 Mbit/s
    # the answer goes after the request: 1 Mbit up from 1.5 s takes 0.5 s at 1 + 0.125 s at 4,
    # then 0.5 Mbit down from 2.125 s at 4 Mbit/s
    assert hw.on_air_s(mbit, mbit // 2, 1.5) == pytest.approx(0.5 + 0.125 + 0.125)


def test_on_air_time_through_an_outage_is_the_schedules_too() -> None:
    schedule = ShapingSchedule(Trace.constant(8.0, duration_s=10.0), outages=[(1.0, 3.0)])
    hw = SimulatedHardware(schedule=schedule, clock=Clock())
    assert hw.on_air_s(1000, 0, 2.0) == pytest.approx(schedule.time_to_send(1000, 2.0)) == pytest.approx(1.001)


def test_device_time_uses_the_reference_time_or_the_speed_factor() -> None:
    calls: list[tuple[int, float, float]] = []

    def reference(stage: int, level: float, host_ms: float) -> float:
        calls.append((stage, level, host_ms))
        return 7.0 * (stage + 2)

    hw = SimulatedHardware(device_time_ms=reference, speed_factor=100.0)
    assert hw.device_ms(-1, 1.0, 0.3) == 7.0 and hw.device_ms(2, 0.5, 0.3) == 28.0
    assert calls == [(-1, 1.0, 0.3), (2, 0.5, 0.3)]  # the reference wins over the speed factor
    assert SimulatedHardware(speed_factor=12.5).device_ms(3, 1.0, 2.0) == pytest.approx(25.0)
    assert SimulatedHardware().device_ms(3, 1.0, 2.0) == 2.0
    assert Hardware().device_ms(3, 1.0, 2.0) == 2.0  # a real device: what it took


def test_the_host_cpu_clock_is_read_only_when_the_device_time_depends_on_it() -> None:
    measured = SimulatedHardware(speed_factor=2.0)
    assert measured.compute_clock is time.thread_time  # "measured": host CPU time x the factor
    reference = SimulatedHardware(device_time_ms=lambda stage, level, host_ms: 5.0)
    assert reference.compute_clock() == 0.0  # "reference": no system call per stage
    assert reference.device_ms(1, 1.0, reference.compute_clock() - reference.compute_clock()) == 5.0


async def test_promote_sleeps_the_promotion() -> None:
    hw = SimulatedHardware()
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    await hw.promote(0.0)
    assert hw.promotion_waits == 0
    await hw.promote(0.03)
    assert hw.promotion_waits == 1 and loop.time() - t0 >= 0.03
    t1 = loop.time()
    await Hardware().promote(0.5)  # a real modem promotes inside the call: nothing to wait
    assert loop.time() - t1 < 0.1


async def test_wait_compute_waits_out_the_rest_of_the_device_time() -> None:
    loop = asyncio.get_running_loop()
    hw = SimulatedHardware(clock=loop.time)
    t0 = loop.time()
    await hw.wait_compute(t0, 30.0)
    assert loop.time() - t0 >= 0.03
    t1 = loop.time()
    await hw.wait_compute(t1 - 1.0, 30.0)  # that time has passed already
    assert loop.time() - t1 < 0.02


def test_flags_checks_and_detection_delays() -> None:
    assert SimulatedHardware().simulated and not Hardware().simulated
    assert SimulatedHardware(hint_mbps=0.8).hint_mbps() == 0.8 and Hardware().hint_mbps() is None
    assert set(LINK_LOSS_DETECT_S) == {"lte", "3g", "wifi", "ble"}
    assert LINK_LOSS_DETECT_S["ble"] > LINK_LOSS_DETECT_S["lte"] > LINK_LOSS_DETECT_S["wifi"] > 0
    for kw in ({"speed_factor": 0.0}, {"speed_factor": math.inf}, {"detect_s": -1.0}, {"detect_s": math.nan}):
        with pytest.raises(ValueError):
            SimulatedHardware(**kw)  # type: ignore[arg-type]
