"""cloud.metrics: names by the conventions, bounded labels, telemetry re-exported by device class."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics import MetricWrapperBase

from cloud.metrics import BrokerMetrics, ErrorReason
from splitsense.wire import (
    DeviceEstimates,
    ExecutionMode,
    HeldFronts,
    RadioKind,
    TelemetryObservation,
    TelemetryReport,
)


def metrics(**kw: object) -> tuple[BrokerMetrics, CollectorRegistry]:
    reg = CollectorRegistry()
    return BrokerMetrics(reg, models={"m": 3}, device_classes=("phone",), **kw), reg  # type: ignore[arg-type]


EST = DeviceEstimates(bandwidth_mbps=8.0, rtt_ms=40.0, battery_fraction=0.5, on_battery=True, radio=RadioKind.LTE)


def test_request_metrics() -> None:
    m, reg = metrics()
    m.received("m", "phone", 1, "fp32", 1000)
    m.answered("m", "phone", 1, "fp32", queue_s=0.001, compute_s=0.008, total_s=0.010)
    m.batch_done("m", 1, 5)
    m.shed_window("m", "phone", 1)
    m.failed("m", "phone", "INVALID_ARGUMENT", ErrorReason.INVALID_REQUEST)
    v = reg.get_sample_value
    labels = {"model": "m", "device_class": "phone", "cut": "1"}
    assert v("splitsense_broker_received_bytes_total", {**labels, "codec": "fp32"}) == 1000
    assert v("splitsense_broker_request_duration_seconds_count", {**labels, "codec": "fp32"}) == 1
    assert v("splitsense_broker_queue_duration_seconds_sum", labels) == pytest.approx(0.001)
    assert v("splitsense_broker_compute_duration_seconds_sum", labels) == pytest.approx(0.008)
    assert v("splitsense_broker_batch_size_sum", {"model": "m", "cut": "1"}) == 5
    assert v("splitsense_broker_batches_total", {"model": "m", "cut": "1"}) == 1
    assert v("splitsense_broker_shed_total", labels) == 1
    assert (
        v(
            "splitsense_broker_errors_total",
            {"model": "m", "device_class": "phone", "code": "INVALID_ARGUMENT", "reason": "invalid_request"},
        )
        == 1
    )


def test_in_flight_gauge() -> None:
    m, reg = metrics()
    with m.tracking():
        assert reg.get_sample_value("splitsense_broker_requests_in_flight") == 1
    assert reg.get_sample_value("splitsense_broker_requests_in_flight") == 0


def test_labels_from_requests_are_bounded() -> None:
    m, _ = metrics()
    assert m.model_label("m") == "m"
    assert m.model_label("evil-model-123") == "unknown"
    assert m.cut_label("m", 3) == "3" and m.cut_label("m", 4) == "unknown" and m.cut_label("x", 0) == "unknown"
    assert m.device_class_label("phone") == "phone"
    # A class a device sends is never a label of its own, however well-formed, first or not.
    for sent in ("watch", "board", "bad class with spaces", "", "x" * 10_000):
        assert m.device_class_label(sent) == "other"
    m.add_device_classes(["watch"])  # e.g. a plan the controller published for watches
    assert m.device_class_label("watch") == "watch" and m.device_class_label("board") == "other"


def test_every_device_class_label_takes_only_known_values() -> None:
    """Finding 4 of issue 10: whatever class a device sends, every metric with a device_class label
    holds the configured classes or "other", never the device's value."""
    m, reg = metrics()
    sent = [f"fuzz-{i}" for i in range(40)] + ["phone"]
    for c in sent:
        m.received("m", c, 1, "fp32", 10)
        m.answered("m", c, 1, "fp32", queue_s=0.001, compute_s=0.002, total_s=0.003)
        m.shed_window("m", c, 1)
        m.failed("m", c, "INVALID_ARGUMENT", ErrorReason.INVALID_REQUEST)
        m.estimates(c, EST)
        obs = TelemetryObservation(
            model="m",
            cut=1,
            mode=ExecutionMode.OFFLOADED,
            window_count=1,
            front_ms_total=1.0,
            latency_ms_total=2.0,
            bytes_sent=3,
            energy_mj=4.0,
            stage_ms_total=(1.0,),
            fallback_kinds=(("late", 1),),
        )
        m.telemetry(TelemetryReport("d", c, EST, 1, 0, 1, (obs,), held_fronts=(HeldFronts("m", ((1, 1.0),)),)))
    with_class = set()
    values = set()
    for family in reg.collect():
        for sample in family.samples:
            if "device_class" in sample.labels:
                with_class.add(family.name)
                values.add(sample.labels["device_class"])
    assert values == {"phone", "other"}
    # Every metric declared with a device_class label was exercised above (a new one must be too).
    declared = {
        x._name for x in vars(m).values() if isinstance(x, MetricWrapperBase) and "device_class" in x._labelnames
    }
    assert with_class == declared and len(declared) == 21, sorted(declared ^ with_class)


def test_reason_label_is_a_fixed_set() -> None:
    m, reg = metrics()
    m.failed("m", "phone", "INVALID_ARGUMENT", ErrorReason.NON_FINITE_OUTPUT)
    labels = {"model": "m", "device_class": "phone", "code": "INVALID_ARGUMENT", "reason": "non_finite_output"}
    assert reg.get_sample_value("splitsense_broker_errors_total", labels) == 1
    with pytest.raises(ValueError):
        m.failed("m", "phone", "INVALID_ARGUMENT", "made-up")  # type: ignore[arg-type]


def test_unknown_estimates_are_no_sample() -> None:
    m, reg = metrics()
    m.estimates("phone", None)
    assert reg.get_sample_value("splitsense_device_rtt_seconds_count", {"device_class": "phone"}) is None
    m.telemetry(TelemetryReport("d", "phone", None, 1, 0, 1, ()))
    assert reg.get_sample_value("splitsense_broker_telemetry_reports_total", {"device_class": "phone"}) == 1
    assert reg.get_sample_value("splitsense_device_bandwidth_bytes_per_second_count", {"device_class": "phone"}) is None


def test_device_estimates_in_base_units() -> None:
    m, reg = metrics()
    m.estimates("phone", EST)
    assert reg.get_sample_value("splitsense_device_bandwidth_bytes_per_second_sum", {"device_class": "phone"}) == 1e6
    assert reg.get_sample_value("splitsense_device_rtt_seconds_sum", {"device_class": "phone"}) == pytest.approx(0.04)
    assert reg.get_sample_value("splitsense_device_battery_ratio_sum", {"device_class": "phone"}) == 0.5
    plugged = DeviceEstimates(bandwidth_mbps=1, rtt_ms=1, battery_fraction=0.1, on_battery=False, radio=RadioKind.WIFI)
    m.estimates("phone", plugged)
    assert reg.get_sample_value("splitsense_device_battery_ratio_count", {"device_class": "phone"}) == 1


def test_telemetry_counters() -> None:
    m, reg = metrics()
    obs = TelemetryObservation(
        model="m",
        cut=2,
        mode=ExecutionMode.OFFLOADED,
        window_count=10,
        front_ms_total=50.0,
        latency_ms_total=900.0,
        bytes_sent=4096,
        energy_mj=120.0,
        failure_count=1,
        stage_ms_total=(20.0, 30.0, 1.0, 1.0, 1.0),  # more than N = 3: the extra are ignored
        fallback_kinds=(("late", 2), ("breaker", 3), ("made-up-by-a-device", 4)),
    )
    report = TelemetryReport(
        device_id="d",
        device_class="phone",
        estimates=EST,
        plan_version=1,
        period_start_unix_ms=0,
        period_end_unix_ms=10_000,
        observations=(obs,),
    )
    m.telemetry(report)
    v = reg.get_sample_value
    labels = {"model": "m", "device_class": "phone", "cut": "2", "mode": "offloaded"}
    assert v("splitsense_device_windows_total", labels) == 10
    assert v("splitsense_device_offload_failures_total", labels) == 1
    assert v("splitsense_device_latency_seconds_total", labels) == pytest.approx(0.9)
    assert v("splitsense_device_front_seconds_total", labels) == pytest.approx(0.05)
    assert v("splitsense_device_sent_bytes_total", labels) == 4096
    assert v("splitsense_device_energy_joules_total", labels) == pytest.approx(0.12)
    assert v("splitsense_device_stage_seconds_total", {"model": "m", "device_class": "phone", "stage": "1"}) == 0.03
    assert v("splitsense_device_stage_windows_total", {"model": "m", "device_class": "phone", "stage": "2"}) == 10
    assert v("splitsense_device_stage_windows_total", {"model": "m", "device_class": "phone", "stage": "3"}) is None
    assert v("splitsense_broker_telemetry_reports_total", {"device_class": "phone"}) == 1
    kind = {"model": "m", "device_class": "phone"}
    assert v("splitsense_device_fallbacks_total", {**kind, "kind": "late"}) == 2
    assert v("splitsense_device_fallbacks_total", {**kind, "kind": "breaker"}) == 3
    assert v("splitsense_device_fallbacks_total", {**kind, "kind": "other"}) == 4  # only kinds the cloud knows


def test_every_name_is_namespaced() -> None:
    _, reg = metrics()
    for family in reg.collect():
        assert family.name.startswith(("splitsense_broker_", "splitsense_device_")), family.name


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
def test_promtool_accepts_the_exposition() -> None:
    m, reg = metrics()
    m.received("m", "phone", 1, "fp32", 10)
    m.answered("m", "phone", 1, "fp32", queue_s=0.001, compute_s=0.002, total_s=0.003)
    m.estimates("phone", EST)
    out = subprocess.run(["promtool", "check", "metrics"], input=generate_latest(reg), capture_output=True, timeout=30)
    assert out.returncode == 0, out.stdout.decode() + out.stderr.decode()
