"""edge.metrics: a device's own series, and the telemetry sums it reports (fallback kinds included)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from edge.metrics import EdgeMetrics
from edge.route import FallbackKind
from edge.sink import WindowResult
from splitsense.wire import DeviceEstimates, ExecutionMode, RadioKind

EST = DeviceEstimates(bandwidth_mbps=8.0, rtt_ms=40.0, battery_fraction=0.5, on_battery=True, radio=RadioKind.LTE)


def result(i: int, mode: ExecutionMode, kind: FallbackKind | None) -> WindowResult:
    return WindowResult(
        window_id=f"w{i}", label=0, prediction=0, mode=mode, cut=2, codec=None, compression_energy_kept=1.0,
        latency_ms=10.0, front_ms=2.0, bytes_sent=0, energy_mj=1.0, reason="" if kind is None else kind.value,
        plan_version=1, kind=kind,
    )  # fmt: skip


def test_fallback_kinds_are_reported_and_restored() -> None:
    registry = CollectorRegistry()
    m = EdgeMetrics("uci_har", "phone", registry)
    m.observe(result(0, ExecutionMode.OFFLOADED, None))
    for i, kind in enumerate([FallbackKind.LATE, FallbackKind.LATE, FallbackKind.BREAKER]):
        m.observe(result(i + 1, ExecutionMode.FALLBACK, kind), kind.value)
    m.observe(result(9, ExecutionMode.LOCAL, FallbackKind.LINK_DOWN))
    report = m.drain_report("d", EST, 1, 0, 1000)
    by_mode = {o.mode: o for o in report.observations}
    assert by_mode[ExecutionMode.FALLBACK].fallback_kinds == (("breaker", 1), ("late", 2))
    assert by_mode[ExecutionMode.LOCAL].fallback_kinds == (("link_down", 1),)
    assert by_mode[ExecutionMode.OFFLOADED].fallback_kinds == ()
    assert m.pending_windows() == 0
    m.restore(report)  # not sent: the next report carries the same sums
    again = {o.mode: o for o in m.drain_report("d", EST, 1, 0, 2000).observations}
    assert again[ExecutionMode.FALLBACK].fallback_kinds == (("breaker", 1), ("late", 2))
    v = registry.get_sample_value
    labels = {"model": "uci_har", "device_class": "phone", "reason": "late"}
    assert v("splitsense_edge_fallbacks_total", labels) == 2
