"""The metrics source's parsing and arithmetic, on recorded expositions (no sockets)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from cloud.controller.metrics_source import (
    DirectExporterSource,
    FileSource,
    FleetSnapshot,
    MetricNames,
    MetricsSource,
    PrometheusSource,
    bucket_quantile,
    parse_exposition,
    snapshot_from_file,
)
from cloud.metrics import BrokerMetrics
from splitsense.errors import DataError

# A broker's /metrics, recorded (trimmed to what the controller reads; HELP lines dropped).
RECORDED = """\
# TYPE splitsense_device_bandwidth_bytes_per_second histogram
splitsense_device_bandwidth_bytes_per_second_bucket{device_class="phone",le="125000.0"} 0.0
splitsense_device_bandwidth_bytes_per_second_bucket{device_class="phone",le="250000.0"} 4.0
splitsense_device_bandwidth_bytes_per_second_bucket{device_class="phone",le="625000.0"} 8.0
splitsense_device_bandwidth_bytes_per_second_bucket{device_class="phone",le="+Inf"} 8.0
splitsense_device_bandwidth_bytes_per_second_count{device_class="phone"} 8.0
splitsense_device_bandwidth_bytes_per_second_sum{device_class="phone"} 2.5e6
splitsense_device_bandwidth_bytes_per_second_created{device_class="phone"} 1.7e9
# TYPE splitsense_device_rtt_seconds histogram
splitsense_device_rtt_seconds_bucket{device_class="phone",le="0.05"} 8.0
splitsense_device_rtt_seconds_bucket{device_class="phone",le="+Inf"} 8.0
splitsense_device_rtt_seconds_count{device_class="phone"} 8.0
splitsense_device_rtt_seconds_sum{device_class="phone"} 0.32
# TYPE splitsense_device_battery_ratio histogram
splitsense_device_battery_ratio_bucket{device_class="phone",le="0.5"} 2.0
splitsense_device_battery_ratio_bucket{device_class="phone",le="1.0"} 8.0
splitsense_device_battery_ratio_bucket{device_class="phone",le="+Inf"} 8.0
splitsense_device_battery_ratio_count{device_class="phone"} 8.0
splitsense_device_battery_ratio_sum{device_class="phone"} 5.6
# TYPE splitsense_device_windows counter
splitsense_device_windows_total{cut="2",device_class="phone",mode="offloaded",model="uci_har"} 90.0
splitsense_device_windows_total{cut="2",device_class="phone",mode="fallback",model="uci_har"} 10.0
splitsense_device_windows_total{cut="4",device_class="phone",mode="local",model="uci_har"} 50.0
# TYPE splitsense_device_offload_failures counter
splitsense_device_offload_failures_total{cut="2",device_class="phone",mode="fallback",model="uci_har"} 10.0
# TYPE splitsense_device_latency_seconds counter
splitsense_device_latency_seconds_total{cut="2",device_class="phone",mode="offloaded",model="uci_har"} 3.0
splitsense_device_latency_seconds_total{cut="4",device_class="phone",mode="local",model="uci_har"} 1.5
# TYPE splitsense_device_energy_joules counter
splitsense_device_energy_joules_total{cut="2",device_class="phone",mode="offloaded",model="uci_har"} 1.5
# TYPE splitsense_device_stage_seconds counter
splitsense_device_stage_seconds_total{device_class="phone",model="uci_har",stage="0"} 0.3
splitsense_device_stage_seconds_total{device_class="phone",model="uci_har",stage="1"} 0.6
# TYPE splitsense_device_stage_windows counter
splitsense_device_stage_windows_total{device_class="phone",model="uci_har",stage="0"} 150.0
splitsense_device_stage_windows_total{device_class="phone",model="uci_har",stage="1"} 150.0
# TYPE splitsense_broker_request_duration_seconds histogram
splitsense_broker_request_duration_seconds_bucket{codec="fp32",cut="2",device_class="phone",model="uci_har",le="0.01"} 0.0
splitsense_broker_request_duration_seconds_bucket{codec="fp32",cut="2",device_class="phone",model="uci_har",le="0.02"} 80.0
splitsense_broker_request_duration_seconds_bucket{codec="fp32",cut="2",device_class="phone",model="uci_har",le="0.05"} 90.0
splitsense_broker_request_duration_seconds_bucket{codec="fp32",cut="2",device_class="phone",model="uci_har",le="+Inf"} 90.0
splitsense_broker_request_duration_seconds_count{codec="fp32",cut="2",device_class="phone",model="uci_har"} 90.0
splitsense_broker_request_duration_seconds_sum{codec="fp32",cut="2",device_class="phone",model="uci_har"} 1.6
# TYPE splitsense_broker_compute_duration_seconds histogram
splitsense_broker_compute_duration_seconds_count{cut="2",device_class="phone",model="uci_har"} 90.0
splitsense_broker_compute_duration_seconds_sum{cut="2",device_class="phone",model="uci_har"} 0.9
# TYPE splitsense_broker_queue_duration_seconds histogram
splitsense_broker_queue_duration_seconds_count{cut="2",device_class="phone",model="uci_har"} 90.0
splitsense_broker_queue_duration_seconds_sum{cut="2",device_class="phone",model="uci_har"} 0.18
# TYPE splitsense_broker_shed counter
splitsense_broker_shed_total{cut="2",device_class="phone",model="uci_har"} 10.0
splitsense_broker_shed_total{cut="unknown",device_class="phone",model="unknown"} 1.0
"""  # noqa: E501


def _scrape(text: str = RECORDED) -> DirectExporterSource:
    return DirectExporterSource(["127.0.0.1:9464"], window_s=60, device_classes=("phone", "watch"))


def test_recorded_exposition_gives_the_snapshot() -> None:
    src = _scrape()
    snap = src.snapshot_of(parse_exposition(RECORDED), 1_000.0)
    assert snap.source == "exporters http://127.0.0.1:9464/metrics" and snap.taken_unix_ms == 1_000_000
    phone = snap.device_class("phone")
    assert phone is not None
    assert phone.bandwidth_mean_mbps == pytest.approx(2.5)  # 2.5e6 B/s / 8 / 125000
    assert phone.bandwidth_p50_mbps == pytest.approx(2.0)  # rank 4 = top of the (1, 2] Mbit/s bucket
    assert phone.bandwidth_p25_mbps == pytest.approx(1.5)
    assert phone.rtt_mean_ms == pytest.approx(40.0) and phone.rtt_p50_ms == pytest.approx(25.0)
    assert phone.battery_mean == pytest.approx(0.7) and phone.battery_p25 == pytest.approx(0.5)
    assert phone.offload_windows == 100 and phone.fallback_rate == pytest.approx(0.1)
    assert phone.failure_rate == pytest.approx(10 / 100)  # 10 failed of 90 + 10 attempts
    assert phone.windows_per_s is None and phone.request_rate_per_s is None  # one scrape: no rates
    dm = snap.device_model("uci_har", "phone")
    assert dm is not None
    assert dm.windows_by_cut == {2: 100.0, 4: 50.0}
    assert dm.mean_latency_ms == pytest.approx(4.5 / 150 * 1000)
    assert dm.energy_mj_per_window == pytest.approx(1.5 / 150 * 1000)
    assert [(s.stage, s.samples) for s in dm.stages] == [(0, 150), (1, 150)]
    assert [s.mean_ms for s in dm.stages] == pytest.approx([2.0, 4.0])
    stats = dm.telemetry_stats(4)
    assert stats is not None and stats.samples == (150, 150, 0, 0) and stats.stage_ms[1] == pytest.approx(4.0)
    cut = snap.cut("uci_har", 2)
    assert cut is not None and snap.cut("unknown", 0) is None and len(snap.cuts) == 1
    assert cut.compute_ms == pytest.approx(10.0) and cut.queue_ms == pytest.approx(2.0)
    assert 20.0 < cut.request_p99_ms <= 50.0  # type: ignore[operator]
    assert snap.shed_fraction == pytest.approx(11 / 101)


def test_missing_metrics_are_listed() -> None:
    snap = _scrape().snapshot_of(parse_exposition(RECORDED), 1_000.0)
    missing = "\n".join(snap.missing)
    assert "only one scrape" in missing
    for field in ("bandwidth_p50_mbps", "rtt_mean_ms", "battery_mean"):
        assert f"{field} of device_class=watch" in missing  # expected, never seen
        assert f"{field} of device_class=phone" not in missing
    watch = snap.device_class("watch")
    assert watch is not None and watch.bandwidth_mean_mbps is None and watch.failure_rate is None

    empty = _scrape().snapshot_of(parse_exposition(""), 1_000.0)
    assert empty.cuts == () and empty.shed_per_s is None
    assert any("compute and queue" in m for m in empty.missing)
    assert any("shed" in m for m in empty.missing)


def test_second_scrape_gives_rates_over_the_window() -> None:
    src = _scrape()
    src.snapshot_of(parse_exposition(RECORDED), 1_000.0)
    later = RECORDED.replace(
        'mode="offloaded",model="uci_har"} 90.0', 'mode="offloaded",model="uci_har"} 110.0'
    ).replace('splitsense_broker_shed_total{cut="2",device_class="phone",model="uci_har"} 10.0', "")
    snap = src.snapshot_of(parse_exposition(later), 1_010.0)
    assert snap.window_s == pytest.approx(10.0)
    phone = snap.device_class("phone")
    assert phone is not None and phone.windows_per_s == pytest.approx(2.0)  # 20 windows in 10 s
    assert phone.fallback_rate == 0.0 and phone.offload_windows == 20
    # the shed series vanished (broker restarted it): a reset counts from zero, never negative
    assert snap.shed_per_s == pytest.approx(0.0)
    assert not any("only one scrape" in m for m in snap.missing)


def test_scrapes_older_than_the_window_are_dropped() -> None:
    src = DirectExporterSource(["http://b:9464/metrics"], window_s=30)
    for t in (0.0, 10.0, 20.0, 40.0, 50.0):
        snap = src.snapshot_of(parse_exposition(RECORDED), t)
    assert snap.window_s == pytest.approx(30.0)  # against t=20: the one scrape just past the window


def test_exporters_are_summed() -> None:
    src = DirectExporterSource(["a:1", "b:2"])
    both = parse_exposition(RECORDED, 0)
    parse_exposition(RECORDED, 1, both)
    snap = src.snapshot_of(both, 0.0)
    phone = snap.device_class("phone")
    assert phone is not None and phone.offload_windows == 200 and phone.bandwidth_mean_mbps == pytest.approx(2.5)


def test_bucket_quantile_matches_prometheus() -> None:
    inf = math.inf
    assert bucket_quantile(0.5, [(1.0, 0.0), (2.0, 10.0), (inf, 10.0)]) == pytest.approx(1.5)
    assert bucket_quantile(0.5, [(1.0, 10.0), (inf, 10.0)]) == pytest.approx(0.5)  # first bucket from 0
    assert bucket_quantile(0.99, [(1.0, 0.0), (2.0, 5.0), (inf, 10.0)]) == 2.0  # +Inf bucket: its lower edge
    assert bucket_quantile(0.5, [(1.0, 0.0), (inf, 0.0)]) is None  # no observations: NaN
    assert bucket_quantile(0.5, [(1.0, 3.0)]) is None  # no +Inf bucket
    assert bucket_quantile(0.5, [(1.0, 6.0), (2.0, 4.0), (inf, 10.0)]) == pytest.approx(5 / 6)  # monotonic fix
    assert bucket_quantile(1.5, [(1.0, 1.0), (inf, 1.0)]) == inf


def test_snapshot_json_round_trip(tmp_path: Path) -> None:
    snap = _scrape().snapshot_of(parse_exposition(RECORDED), 1_000.0)
    assert FleetSnapshot.from_dict(json.loads(snap.to_json())) == snap
    path = snap.save(tmp_path / "snap.json")
    assert snapshot_from_file(path) == snap


async def test_file_source(tmp_path: Path) -> None:
    snap = _scrape().snapshot_of(parse_exposition(RECORDED), 1_000.0)
    source = FileSource(snap.save(tmp_path / "snap.json"))
    assert isinstance(source, MetricsSource)
    assert await source.snapshot() == snap


def test_bad_snapshot_files_are_data_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        snapshot_from_file(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(DataError, match="not valid JSON"):
        snapshot_from_file(tmp_path / "bad.json")
    (tmp_path / "odd.json").write_text(json.dumps({"taken_unix_ms": 1, "source": "x", "window_s": 1, "nope": 2}))
    with pytest.raises(DataError, match=r"odd.json.*unknown keys \['nope'\]"):
        snapshot_from_file(tmp_path / "odd.json")
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(DataError, match="must be a JSON object"):
        snapshot_from_file(tmp_path / "list.json")


def test_metric_names_are_the_brokers() -> None:
    """Every name the controller reads exists in what cloud.metrics.BrokerMetrics exports."""
    registry = CollectorRegistry()
    BrokerMetrics(registry, models={"uci_har": 4})
    exported = {s.name for fam in registry.collect() for s in fam.samples} | {fam.name for fam in registry.collect()}
    exported |= {f"{n}_total" for n in exported}  # a labelled counter shows no sample until used
    text = generate_latest(registry).decode()
    for name in vars(MetricNames()).values():
        assert name in exported or f"# TYPE {name} " in text, f"{name} is not exported by BrokerMetrics"


def test_promql_the_prometheus_source_sends(monkeypatch: pytest.MonkeyPatch) -> None:
    sent: list[str] = []

    def fake_query(self: PrometheusSource, promql: str, at_unix_s: float | None = None) -> list:
        sent.append(promql)
        return []

    monkeypatch.setattr(PrometheusSource, "query", fake_query)
    snap = PrometheusSource("http://prom:9090/", window_s=90).snapshot_sync()
    assert snap.source == "prometheus http://prom:9090" and snap.window_s == 90
    assert (
        "histogram_quantile(0.5, sum by (le, device_class) "
        "(rate(splitsense_device_bandwidth_bytes_per_second_bucket[90s])))" in sent
    )
    assert "sum by (model, device_class) (increase(splitsense_device_offload_failures_total[90s]))" in sent
    assert PrometheusSource("http://p", window_s=2.5).window_s == 2.5
