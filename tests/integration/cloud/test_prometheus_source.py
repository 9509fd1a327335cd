"""PrometheusSource against a real Prometheus scraping a real exporter of the broker's metrics."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry, start_http_server

from cloud.controller.metrics_source import DirectExporterSource, FleetSnapshot, PrometheusSource
from cloud.metrics import BrokerMetrics
from splitsense.errors import DependencyError
from splitsense.wire import DeviceEstimates, ExecutionMode, RadioKind, TelemetryObservation, TelemetryReport

pytestmark = pytest.mark.integration

TICK_S = 0.1  # the feeder's period: 10 ticks/s
PHONE = DeviceEstimates(bandwidth_mbps=2.0, rtt_ms=40.0, battery_fraction=0.6, on_battery=True, radio=RadioKind.LTE)
WATCH = DeviceEstimates(
    bandwidth_mbps=0.3, rtt_ms=120.0, battery_fraction=0.15, on_battery=True, radio=RadioKind.THREEG
)


def _report() -> TelemetryReport:
    obs = (
        TelemetryObservation(
            model="uci_har", cut=2, mode=ExecutionMode.OFFLOADED, window_count=6, front_ms_total=12.0,
            latency_ms_total=120.0, bytes_sent=6000, energy_mj=60.0, stage_ms_total=(6.0, 6.0),
        ),
        TelemetryObservation(
            model="uci_har", cut=2, mode=ExecutionMode.FALLBACK, window_count=2, front_ms_total=4.0,
            latency_ms_total=640.0, bytes_sent=2000, energy_mj=30.0, failure_count=2,
            stage_ms_total=(2.0, 2.0),
        ),
    )  # fmt: skip
    return TelemetryReport(
        device_id="phone-1", device_class="phone", estimates=PHONE, plan_version=1,
        period_start_unix_ms=0, period_end_unix_ms=1000, observations=obs,
    )  # fmt: skip


@pytest.fixture
def exporter() -> Iterator[str]:
    """The broker's metrics on a fresh registry, fed at a known pace by a thread; yields host:port."""
    registry = CollectorRegistry()
    metrics = BrokerMetrics(registry, models={"uci_har": 4}, device_classes=("phone", "watch"))
    stop = threading.Event()

    def feed() -> None:
        while not stop.wait(TICK_S):
            metrics.estimates("phone", PHONE)
            metrics.estimates("watch", WATCH)
            metrics.telemetry(_report())
            for _ in range(4):
                metrics.answered("uci_har", "phone", 2, "fp32", queue_s=0.002, compute_s=0.010, total_s=0.015)
            metrics.batch_done("uci_har", 2, 4)
            metrics.shed_window("uci_har", "phone", 2)

    server, thread = start_http_server(0, addr="127.0.0.1", registry=registry)
    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    try:
        yield f"127.0.0.1:{server.server_port}"
    finally:
        stop.set()
        feeder.join(5)
        server.shutdown()
        server.server_close()
        thread.join(5)


def _check(snap: FleetSnapshot) -> None:
    phone, watch = snap.device_class("phone"), snap.device_class("watch")
    assert phone is not None and watch is not None
    assert phone.bandwidth_mean_mbps == pytest.approx(2.0)
    assert 1.0 <= phone.bandwidth_p25_mbps <= phone.bandwidth_p50_mbps <= 2.0  # type: ignore[operator]
    assert watch.bandwidth_mean_mbps == pytest.approx(0.3)
    assert phone.rtt_mean_ms == pytest.approx(40.0)
    assert watch.battery_mean == pytest.approx(0.15)
    assert phone.fallback_rate == pytest.approx(0.25, rel=0.05)  # 2 of 8 offload windows
    assert phone.failure_rate == pytest.approx(0.25, rel=0.05)  # 2 failed of 8 attempts
    dm = snap.device_model("uci_har", "phone")
    assert dm is not None and dm.mean_latency_ms == pytest.approx(95.0, rel=0.05)  # 760 ms / 8
    assert dm.windows_by_cut.keys() == {2}
    stats = dm.telemetry_stats(4)
    assert stats is not None and stats.stage_ms[:2] == pytest.approx((1.0, 1.0)) and stats.samples[2:] == (0, 0)
    cut = snap.cut("uci_har", 2)
    assert cut is not None
    assert cut.compute_ms == pytest.approx(10.0) and cut.queue_ms == pytest.approx(2.0)
    assert cut.batch_size_mean == pytest.approx(4.0)
    assert snap.shed_fraction == pytest.approx(0.2, rel=0.05)  # 1 shed per 4 answered


def _rates_ok(snap: FleetSnapshot) -> None:
    phone, cut = snap.device_class("phone"), snap.cut("uci_har", 2)
    assert phone is not None and cut is not None
    per_tick = 1 / TICK_S  # the feeder sleeps TICK_S between ticks: at most this many per second
    assert 0.4 * 8 * per_tick < phone.windows_per_s <= 1.3 * 8 * per_tick  # type: ignore[operator]
    assert 0.4 * 4 * per_tick < cut.requests_per_s <= 1.3 * 4 * per_tick  # type: ignore[operator]
    assert 0.4 * per_tick < snap.shed_per_s <= 1.3 * per_tick  # type: ignore[operator]


async def test_prometheus_source_reflects_the_exporter(prometheus_server, exporter: str) -> None:
    source = PrometheusSource(prometheus_server.url, window_s=3, timeout_s=2, device_classes=("phone", "tablet"))
    empty = await source.snapshot()  # nothing scraped yet: a snapshot that says so, no crash
    empty_phone = empty.device_class("phone")
    assert empty_phone is not None and empty_phone.bandwidth_mean_mbps is None
    assert any("device_class=tablet" in m for m in empty.missing) and empty.cuts == ()

    prometheus_server.add_targets([exporter])
    deadline = time.monotonic() + 20
    while True:
        snap = await source.snapshot()
        phone = snap.device_class("phone")
        ready = snap.cut("uci_har", 2) is not None and phone is not None and phone.failure_rate is not None
        if ready or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.5)
    # increase() of a series younger than the window covers only its life: wait one whole window
    # of scrapes before judging rates.
    await asyncio.sleep(source.window_s + 1)
    snap = await source.snapshot()
    assert snap.window_s == 3 and snap.source == f"prometheus {prometheus_server.url}"
    _check(snap)
    _rates_ok(snap)
    assert any("device_class=tablet" in m for m in snap.missing)
    assert not any("device_class=phone" in m for m in snap.missing)

    # The direct source reads the same exporter to the same means; its second scrape gives rates.
    direct = DirectExporterSource([exporter], window_s=4)
    first = await direct.snapshot()
    _check(first)
    assert first.window_s is None and any("only one scrape" in m for m in first.missing)
    await asyncio.sleep(1.0)
    second = await direct.snapshot()
    assert second.window_s is not None and 0.9 < second.window_s < 3
    _check(second)
    _rates_ok(second)

    prometheus_server.stop()
    with pytest.raises(DependencyError, match=f"Prometheus at {prometheus_server.url} cannot be reached"):
        await source.snapshot()


async def test_direct_source_without_any_exporter_is_a_dependency_error() -> None:
    source = DirectExporterSource(["127.0.0.1:1", "http://127.0.0.1:2/metrics"], timeout_s=0.5)
    with pytest.raises(DependencyError, match="no broker exporter answered"):
        await source.snapshot()
