"""Hedged offloads, the platform's link signal and the radio's energy, end to end in one device.

A real small trained model and real test windows; the transport is the cloud's in-process twin (it
runs stages [cut, N) of its own copy of the model) whose answer comes after a scripted delay, or
never. Real time on the event loop, with delays of tens of milliseconds: the hedge fires after
hedge_after_s (edge/route.py) of the link estimate, well before the 300 ms deadline.
"""

from __future__ import annotations

import asyncio
import itertools
import math
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from functools import cache
from typing import Any

import pytest
import torch

from edge.breaker import BreakerState
from edge.hardware import Hardware
from edge.radio import TrafficKind
from edge.route import FallbackKind, hedge_after_s
from edge.runtime import EdgeDevice
from edge.sink import MemorySink, WindowResult
from edge.sources import SensorWindow, recorded_windows
from pipelines.models import get_spec
from pipelines.power import radio_model, tail_energy_mj
from pipelines.training import TrainedModel, load_trained
from splitsense.config import BreakerConfig, EdgeConfig, EstimatorConfig
from splitsense.wire import ExecutionMode, OffloadRequest, OffloadResponse
from tests.unit.edge.test_runtime import FakeTransport

MODEL = "uci_har"  # small and fast
CUT = 3  # a 16 KB fp32 activation; stages 3-5 are the local tail
DEADLINE_MS = 300.0


@cache
def trained(name: str = MODEL) -> TrainedModel:
    return load_trained(name)


@cache
def recording(n: int) -> tuple[tuple[str, int, Any], ...]:
    return tuple((w.window_id, w.label, w.raw) for w in itertools.islice(recorded_windows(get_spec(MODEL)), n))


def windows(n: int) -> list[SensorWindow]:
    return [SensorWindow(wid, i, label, raw, 0.0) for i, (wid, label, raw) in enumerate(recording(n))]


def now_ready(w: SensorWindow) -> SensorWindow:
    return replace(w, t_emit=asyncio.get_running_loop().time())


def local_prediction(w: SensorWindow) -> int:
    with torch.inference_mode():
        return int(trained().model(trained().prepare_window(w.raw)).argmax(dim=1)[0])


class DelayedTransport(FakeTransport):
    """The cloud's twin (test_runtime's FakeTransport) answering each offload after `delay_s`
    (math.inf: never); `delays` scripts the next calls' delays one by one, before falling back to
    `delay_s`."""

    def __init__(self, delay_s: float = 0.0, delays: Sequence[float] = ()) -> None:
        super().__init__(MODEL)
        self.delay_s = delay_s
        self.delays = list(delays)
        self.answered = 0

    async def offload(self, request: OffloadRequest, timeout_s: float) -> OffloadResponse:
        delay = self.delays.pop(0) if self.delays else self.delay_s
        if math.isinf(delay):
            self.requests.append(request)
            await asyncio.Event().wait()  # a dead path: no answer, no error
        await asyncio.sleep(delay)
        response = await super().offload(request, timeout_s)
        self.answered += 1
        return response


def make(transport: DelayedTransport, hardware: Hardware | None = None, **kw: Any) -> EdgeDevice:
    kw.setdefault("breaker", BreakerConfig(backoff_jitter=0.0))
    config = EdgeConfig(
        model=MODEL,
        default_cut=CUT,
        deadline_ms=DEADLINE_MS,
        replay_speed=0,
        radio=kw.pop("radio", "wifi"),  # 79 ms promotion, 238 ms tail
        estimator=EstimatorConfig(prior_bandwidth_mbps=20.0, prior_rtt_ms=10.0),
        battery_mwh=10.0,  # 36 J: every drain shows in the fraction
        **kw,
    )
    return EdgeDevice(config, trained(), transport, hardware=hardware or Hardware())


def hedge_s(device: EdgeDevice, nbytes: int) -> float:
    """When a window sent now would start its local tail."""
    c = device.config
    expected, sigma = device.expected_offload_s(nbytes)
    return hedge_after_s(expected, sigma, c.deadline_ms / 1000, c.hedge_factor, c.hedge_margin_ms / 1000)


async def test_an_answer_in_time_is_offloaded() -> None:
    transport = DelayedTransport(delay_s=0.005)
    device = make(transport)
    for w in windows(3):
        r = await device.process(now_ready(w))
        assert r.mode is ExecutionMode.OFFLOADED and r.kind is None and r.reason == ""
        assert r.radio_mj > 0 and r.energy_mj > r.radio_mj
        assert r.prediction == local_prediction(w)
        assert r.estimate_mbps is not None and r.estimate_mbps > 0
    assert len(transport.requests) == transport.answered == 3
    assert device.radio.promotions == 1  # back to back: the later calls start inside the tail
    assert device.breaker.state is BreakerState.CLOSED


async def test_a_late_answer_is_hedged_by_the_local_tail_well_before_the_deadline() -> None:
    transport = DelayedTransport(delay_s=0.002)
    device = make(transport)
    ws = windows(4)
    await device.process(now_ready(ws[0]))  # the radio is connected now (the first call warms the path)
    await device.process(now_ready(ws[1]))  # ... and the estimate learnt
    nbytes = transport.requests[0].activation.nbytes
    wait = hedge_s(device, nbytes)
    assert wait < 0.1  # the link estimate says a few tens of ms
    transport.delay_s = 0.25  # before the deadline, but far later than the estimate
    for w in ws[2:]:
        wait = hedge_s(device, nbytes)
        before = device.estimator.bandwidth_mbps
        r = await device.process(now_ready(w))
        assert r.mode is ExecutionMode.FALLBACK and r.kind is FallbackKind.LATE
        assert r.reason.startswith("late: no answer after")
        assert 0.9 * wait * 1000 <= r.latency_ms < 0.5 * DEADLINE_MS  # hedged, not waited out to the deadline
        assert r.prediction == local_prediction(w)
        assert r.radio_mj > 0  # the bytes went up even though the answer was not waited for
        assert r.bytes_sent == nbytes
        assert device.estimator.bandwidth_mbps < before  # no answer that long: the link is slower than believed
    assert transport.answered == 2  # the late calls were cancelled
    assert device.breaker.snapshot(0.0).consecutive_failures == 2  # LATE counts as a failure


async def test_link_down_goes_local_at_once_and_link_up_probes() -> None:
    transport = DelayedTransport(delay_s=math.inf)  # a dead path: nothing comes back
    hardware = Hardware(link_up=True)
    long_backoff = BreakerConfig(backoff_jitter=0.0, backoff_base_s=60.0, backoff_max_s=60.0)
    device = make(transport, hardware, breaker=long_backoff)
    ws = windows(7)
    first = await device.process(now_ready(ws[0]))
    assert first.kind is FallbackKind.LATE and first.latency_ms < DEADLINE_MS  # no link signal yet: hedged
    assert len(transport.requests) == 1

    device.hardware.set_link(False)  # the platform noticed: association lost
    for w in ws[1:4]:
        r = await device.process(now_ready(w))
        assert r.mode is ExecutionMode.LOCAL and r.kind is FallbackKind.LINK_DOWN
        assert r.latency_ms < 0.5 * DEADLINE_MS and r.radio_mj == 0.0 and r.bytes_sent == 0
        assert r.prediction == local_prediction(w)
    assert len(transport.requests) == 1  # nothing was sent into the dead link
    assert device.breaker.state is BreakerState.OPEN and not device.radio.link_up

    transport.delay_s = 0.002  # the path is back with the link
    device.hardware.set_link(True)
    probe = await device.process(now_ready(ws[4]))  # at once, not after the 60 s back-off
    assert probe.mode is ExecutionMode.LOCAL and probe.kind is FallbackKind.PROBING
    assert probe.prediction == local_prediction(ws[4])
    async with asyncio.timeout(1.0):  # the probe's answer closes the breaker
        while device.breaker.state is not BreakerState.CLOSED:
            await asyncio.sleep(0.005)
    assert len(transport.requests) == 2  # the window's activation went as the probe, in the background
    assert transport.requests[-1].window_id == ws[4].window_id
    assert device.radio.energy_by_kind[TrafficKind.PROBE] > 0
    for w in ws[5:]:
        r = await device.process(now_ready(w))
        assert r.mode is ExecutionMode.OFFLOADED and r.kind is None


async def test_the_battery_drains_by_compute_and_the_radio_counted_once() -> None:
    transport = DelayedTransport(delays=[0.002, 0.25, 0.002, math.inf, 0.002])
    device = make(transport, breaker=BreakerConfig(backoff_jitter=0.0, failure_threshold=5))
    results = [await device.process(now_ready(w)) for w in windows(5)]
    assert [r.kind for r in results] == [None, FallbackKind.LATE, None, FallbackKind.LATE, None]
    battery = device.battery
    drained = battery.capacity_mj * (1.0 - battery.fraction)
    compute = sum(r.energy_mj - r.radio_mj for r in results)
    assert compute > 0 and device.radio.total_mj > 0
    assert drained == pytest.approx(compute + device.radio.total_mj, rel=1e-9)
    assert sum(r.radio_mj for r in results) == pytest.approx(device.radio.total_mj, rel=1e-12)
    assert sum(r.energy_mj for r in results) == pytest.approx(drained, rel=1e-9)


async def test_results_and_background_calls_add_up_to_the_radio_energy() -> None:
    # Telemetry is "off": one report after the first window and the final one at the end.
    transport = DelayedTransport(delays=[0.002, 0.002, 0.25, 0.002], delay_s=0.002)
    device = make(transport, radio="lte", telemetry_period_s=3600.0)
    sink = MemorySink()
    loop = asyncio.get_running_loop()
    ws = [replace(w, t_emit=loop.time()) for w in windows(6)]

    async def source() -> AsyncIterator[SensorWindow]:
        for w in ws:
            yield replace(w, t_emit=loop.time())

    summary = await device.run(source(), sink)
    results: list[WindowResult] = sink.results
    assert summary.windows == 6 and summary.lost == 0
    assert FallbackKind.LATE in [r.kind for r in results]
    radio = device.radio
    by_kind = radio.energy_by_kind
    assert len(transport.reports) >= 1 and by_kind[TrafficKind.TELEMETRY] > 0
    windows_mj = sum(r.radio_mj for r in results)
    assert windows_mj == pytest.approx(by_kind[TrafficKind.OFFLOAD], rel=1e-12)
    last_end = max(t.end_s for t in radio.transfers)
    assert windows_mj + by_kind[TrafficKind.TELEMETRY] + by_kind[TrafficKind.PROBE] + by_kind[
        TrafficKind.PING
    ] == pytest.approx(radio.energy_until(last_end), rel=1e-12)
    lte = radio_model("lte")
    later = last_end + 5.0  # the tail after the last call is pending, not yet charged to anything
    assert radio.energy_until(later) == pytest.approx(radio.total_mj + tail_energy_mj(lte, 5.0), rel=1e-12)
    assert radio.promotions == 1  # everything within LTE's 11.6 s tail
