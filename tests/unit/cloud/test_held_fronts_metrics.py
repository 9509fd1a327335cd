"""Devices' held fronts through the broker's metrics into the controller's snapshot (issue 11,
item 3): bounded labels, the share of reporting devices that hold each front, and what the
snapshot makes of it (no sockets: the exposition is parsed as a scrape)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest

from cloud.controller.metrics_source import DirectExporterSource, MetricNames, parse_exposition
from cloud.metrics import MAX_LEVEL_LABELS, BrokerMetrics
from splitsense.wire import HeldFronts, TelemetryReport

N = 3  # stages of model "m"
ALL = tuple((k, lv) for lv in (1.0, 0.98) for k in range(N + 1) if lv == 1.0 or k > 0)
UNCOMPRESSED = tuple(f for f in ALL if f[1] == 1.0)


def metrics() -> tuple[BrokerMetrics, CollectorRegistry]:
    reg = CollectorRegistry()
    return BrokerMetrics(reg, models={"m": N}, device_classes=("phone",)), reg


def report(device: str, *held: HeldFronts, device_class: str = "phone") -> TelemetryReport:
    return TelemetryReport(device, device_class, None, 1, 0, 1, (), held_fronts=held)


def test_held_fronts_are_counted_per_report_with_bounded_labels() -> None:
    m, reg = metrics()
    m.telemetry(report("a", HeldFronts("m", ALL), HeldFronts("not-served", ((1, 1.0),))))
    m.telemetry(report("b", HeldFronts("m", UNCOMPRESSED + ((9, 1.0), (2, 0.1234567)))))  # cut 9 > N, off grid
    m.telemetry(report("c"))  # says nothing: counts for neither
    m.telemetry(report("d", HeldFronts("m", ALL), device_class="made-up"))
    v = reg.get_sample_value
    assert v("splitsense_device_front_reports_total", {"model": "m", "device_class": "phone"}) == 2
    assert v("splitsense_device_front_reports_total", {"model": "m", "device_class": "other"}) == 1
    held = {"model": "m", "device_class": "phone"}
    assert v("splitsense_device_front_held_reports_total", {**held, "cut": "2", "level": "1"}) == 2
    assert v("splitsense_device_front_held_reports_total", {**held, "cut": "2", "level": "0.98"}) == 1
    assert v("splitsense_device_front_held_reports_total", {**held, "cut": "0", "level": "1"}) == 2
    labels = {
        (s.labels["model"], s.labels["cut"], s.labels["level"])
        for fam in reg.collect()
        for s in fam.samples
        if s.name == "splitsense_device_front_held_reports_total"
    }
    assert {m for m, _, _ in labels} == {"m"}  # a model the broker does not serve is not a label
    assert {lv for _, _, lv in labels} == {"1", "0.98"} and {k for _, k, _ in labels} == {"0", "1", "2", "3"}


def test_level_labels_are_a_bounded_set_per_model() -> None:
    m, _ = metrics()
    assert m.level_label("m", 1.0) == "1" and m.level_label("m", 0.995) == "0.995"
    assert m.level_label("m", 0.99500000001) == "0.995"  # float noise
    assert m.level_label("m", 0.1234567) == "other" and m.level_label("m", 0.0) == "other"
    assert m.level_label("m", 1.5) == "other"
    for i in range(100):
        m.level_label("m", (i + 1) / 1000)
    seen = {m.level_label("m", (i + 1) / 1000) for i in range(100)} - {"other"}
    assert len(seen | {"1", "0.995"}) <= MAX_LEVEL_LABELS
    assert m.level_label("other-model", 0.5) == "0.5"  # per model


def test_the_snapshot_keeps_fronts_every_reporting_device_holds() -> None:
    m, reg = metrics()
    src = DirectExporterSource(["127.0.0.1:9464"], window_s=60, device_classes=("phone",))
    m.telemetry(report("a", HeldFronts("m", ALL)))
    first = src.snapshot_of(parse_exposition(generate_latest(reg).decode()), 1_000.0)
    dm = first.device_model("m", "phone")
    assert dm is not None and dm.front_reports == 1 and dm.held_fronts() == frozenset(ALL)
    # a device with the uncompressed export only joins: level 0.98 is no longer held by every one
    m.telemetry(report("a", HeldFronts("m", ALL)))
    m.telemetry(report("b", HeldFronts("m", UNCOMPRESSED)))
    second = src.snapshot_of(parse_exposition(generate_latest(reg).decode()), 1_030.0)
    dm = second.device_model("m", "phone")
    assert dm is not None and dm.front_reports == 2
    assert dm.front_shares["2@0.98"] == 0.5 and dm.front_shares["2@1"] == 1.0
    assert dm.held_fronts() == frozenset(UNCOMPRESSED)
    # no report in the next window: unknown, not "holds nothing"
    third = src.snapshot_of(parse_exposition(generate_latest(reg).decode()), 1_100.0)
    dm = third.device_model("m", "phone")
    assert dm is None or dm.held_fronts() is None


def test_the_controller_reads_the_brokers_front_metrics() -> None:
    names = BrokerMetrics.names()
    assert MetricNames().front_reports == names["device_front_reports"] == "splitsense_device_front_reports_total"
    assert MetricNames().front_held == names["device_front_held"] == "splitsense_device_front_held_reports_total"
