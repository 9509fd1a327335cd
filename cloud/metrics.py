"""The broker's Prometheus metrics, and the devices' telemetry it re-exports.

Broker (labels model, device_class, cut, codec where they apply; `code` is a gRPC status name):

    splitsense_broker_request_duration_seconds   histogram  receipt -> answer, answered windows
    splitsense_broker_queue_duration_seconds     histogram  waiting for a batch
    splitsense_broker_compute_duration_seconds   histogram  the batch's tail call (cloud compute)
    splitsense_broker_received_bytes_total       counter    activation payload bytes received
    splitsense_broker_batch_size                 histogram  windows per tail call {model, cut}
    splitsense_broker_batches_total              counter    tail calls {model, cut}
    splitsense_broker_shed_total                 counter    windows shed by admission control
    splitsense_broker_errors_total               counter    windows/calls not answered, by code
                                                            and reason {model, device_class, code,
                                                            reason} (reason: ErrorReason)
    splitsense_broker_requests_in_flight         gauge      windows between receipt and answer
    splitsense_broker_queue_depth                gauge      windows waiting per {model, cut}
    splitsense_broker_telemetry_reports_total    counter    ReportTelemetry calls {device_class}

Devices, from the estimates every request carries and from ReportTelemetry (they sit behind NAT
and cannot be scraped); by device_class, never by device id:

    splitsense_device_bandwidth_bytes_per_second   histogram  uplink estimate {device_class}
    splitsense_device_rtt_seconds                  histogram  RTT estimate {device_class}
    splitsense_device_battery_ratio                histogram  battery fraction {device_class}
    splitsense_device_windows_total                counter    {model, device_class, cut, mode}
    splitsense_device_offload_failures_total       counter    same labels
    splitsense_device_latency_seconds_total        counter    sum of window latencies, same labels
    splitsense_device_front_seconds_total          counter    sum of front compute, same labels
    splitsense_device_sent_bytes_total             counter    same labels
    splitsense_device_energy_joules_total          counter    same labels
    splitsense_device_stage_seconds_total          counter    on-device time of one stage
    splitsense_device_stage_windows_total          counter    windows that measured it
                                                              {model, device_class, stage}
    splitsense_device_fallbacks_total              counter    windows the cloud did not answer,
                                                              {model, device_class, kind}: kind a
                                                              FallbackKind (plan, link_down, late...)
    splitsense_device_front_reports_total          counter    telemetry reports that listed the
                                                              fronts the device holds of a model
                                                              {model, device_class}
    splitsense_device_front_held_reports_total     counter    of those, the reports whose device
                                                              holds one front {model, device_class,
                                                              cut, level}: held / front_reports over
                                                              a window is the share of the class's
                                                              reporting devices that hold it (1: all)

Label values only ever take values the broker knows, whatever a device sends: a model this broker
does not serve is "unknown" (and so is a cut or stage outside 0..N of a served model); a device
class is its own label only if it is one of the classes the broker was given (the planner's,
config.planner.classes) or one a published plan names (the controller's, from the same config):
any other is "other", in every metric with a device_class label. A front's `level` is the
compression level as `%g` ("1", "0.995"), only on a 1e-6 grid and at most MAX_LEVEL_LABELS
distinct ones per model (the first seen; else "other"). `reason` is an ErrorReason,
chosen by the broker. Every holder takes `registry=` (None: prometheus_client's global REGISTRY),
so tests use a fresh CollectorRegistry().
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from enum import StrEnum
from types import MappingProxyType
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

from splitsense.kinds import FallbackKind
from splitsense.metric_names import NAMESPACE, exposed_names
from splitsense.wire import DeviceEstimates, TelemetryReport

__all__ = ["BrokerMetrics", "ErrorReason"]

UNKNOWN = "unknown"
OTHER = "other"
MAX_LEVEL_LABELS = 16  # distinct compression level labels per model (a catalog has a handful)
_LEVEL_GRID = 1_000_000  # level labels are multiples of 1 / _LEVEL_GRID (%g writes 6 digits)
_FALLBACK_KINDS = frozenset(k.value for k in FallbackKind)


class ErrorReason(StrEnum):
    """Why a window or call got no result: the `reason` label of splitsense_broker_errors_total.

    A fixed set the broker chooses (cloud.broker.reason_of), finer than the status code: e.g.
    INVALID_ARGUMENT is a refused field or a tail output that overflows.
    """

    AUTH = "auth"  # no, a bad or another device's credential (UNAUTHENTICATED, PERMISSION_DENIED)
    UNDECODABLE = "undecodable"  # bytes that are not a message of the call's type
    INVALID_REQUEST = "invalid_request"  # a field refused by the wire or validation checks
    NON_FINITE_OUTPUT = "non_finite_output"  # a finite activation the tail turns into NaN/inf logits
    UNKNOWN_MODEL = "unknown_model"  # NOT_FOUND: a model this broker does not serve
    SHED = "shed"  # RESOURCE_EXHAUSTED by admission control
    DEADLINE = "deadline"  # DEADLINE_EXCEEDED
    BACKEND_UNAVAILABLE = "backend_unavailable"  # UNAVAILABLE: the tails could not answer
    INTERNAL = "internal"  # a bug of ours (INTERNAL), logged


_LATENCY_BUCKETS_S = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 2.5)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# The planner's bandwidth bucket edges (0.1 .. 50 Mbit/s and beyond), in bytes per second.
_BANDWIDTH_BUCKETS = tuple(mbps * 125_000 for mbps in (0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 50, 100, 1000))
_RTT_BUCKETS_S = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)
_BATTERY_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0)

_REQ = ("model", "device_class", "cut")
_OBS = ("model", "device_class", "cut", "mode")


_MAX_CACHED_CHILDREN = 4096


class _WindowChildren:
    """The labelled children of one (model, device class, cut, codec), each made on first use (a
    series appears when it is first written, as with labels())."""

    __slots__ = ("_made", "_metrics", "window", "lane", "device")

    def __init__(self, metrics: BrokerMetrics, window: tuple[str, ...], lane: tuple[str, ...], device: str) -> None:
        self._metrics = metrics
        self.window, self.lane, self.device = window, lane, device
        self._made: dict[str, Any] = {}

    def get(self, name: str) -> Any:
        child = self._made.get(name)
        if child is None:
            metric = getattr(self._metrics, name)
            labels = {"received_bytes": self.window, "request_duration": self.window}.get(name)
            if labels is None:
                labels = self.lane if name in ("queue_duration", "compute_duration") else (self.device,)
            child = self._made[name] = metric.labels(*labels)
        return child


class BrokerMetrics:
    """Every metric of the broker, registered on one registry."""

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        models: Mapping[str, int] | None = None,
        device_classes: Iterable[str] = (),
    ) -> None:
        self.registry = REGISTRY if registry is None else registry
        r = self.registry
        broker: dict[str, Any] = {"namespace": NAMESPACE, "subsystem": "broker", "registry": r}
        device: dict[str, Any] = {"namespace": NAMESPACE, "subsystem": "device", "registry": r}
        self._stages = dict(models or {})  # model -> number of stages N
        self._classes: frozenset[str] = frozenset()  # the device classes with a label of their own
        # The labelled children one window touches, per (model, device class, cut, codec) as sent:
        # prometheus_client's labels() checks and locks on every call (~3% of the broker's CPU at
        # 64 devices). Reset when the known classes change (a class may stop being "other").
        self._window_children: dict[tuple[str, str, int, str], _WindowChildren] = {}
        self.add_device_classes(device_classes)
        self._levels: dict[str, set[str]] = {}  # model -> the level labels given out
        self._levels_lock = threading.Lock()

        self.request_duration = Histogram(
            "request_duration_seconds",
            "Time from receiving a window to answering it with a result.",
            (*_REQ, "codec"),
            buckets=_LATENCY_BUCKETS_S,
            **broker,
        )
        self.queue_duration = Histogram(
            "queue_duration_seconds",
            "Time a window waited in the broker's batching queue.",
            _REQ,
            buckets=_LATENCY_BUCKETS_S,
            **broker,
        )
        self.compute_duration = Histogram(
            "compute_duration_seconds",
            "Time the tail call of the batch that held a window took (cloud compute and the hop).",
            _REQ,
            buckets=_LATENCY_BUCKETS_S,
            **broker,
        )
        self.received_bytes = Counter(
            "received_bytes",
            "Activation payload bytes received in offload requests.",
            (*_REQ, "codec"),
            **broker,
        )
        self.batch_size = Histogram(
            "batch_size",
            "Windows per tail call.",
            ("model", "cut"),
            buckets=_BATCH_BUCKETS,
            **broker,
        )
        self.batches = Counter(
            "batches",
            "Tail calls made, by model and cut.",
            ("model", "cut"),
            **broker,
        )
        self.local_batches = Counter(
            "local_batches",
            "Batches run by the broker's own tail, not Ray (broker.local_tail, local_tail_when), by model and cut.",
            ("model", "cut"),
            **broker,
        )
        self.local_windows = Counter(
            "local_windows",
            "Windows run by the broker's own tail, not Ray (broker.local_tail, local_tail_when), by model and cut.",
            ("model", "cut"),
            **broker,
        )
        self.shed = Counter(
            "shed",
            "Windows shed by admission control (answered RESOURCE_EXHAUSTED).",
            _REQ,
            **broker,
        )
        self.errors = Counter(
            "errors",
            "Windows and calls not answered with a result, by gRPC status code and reason.",
            ("model", "device_class", "code", "reason"),
            **broker,
        )
        self.token_rejections = Counter(
            "token_rejections",
            "Calls refused for their stored device token (broker.token_store redis), by reason.",
            ("reason",),
            **broker,
        )
        self.in_flight = Gauge(
            "requests_in_flight",
            "Windows received and not yet answered.",
            **broker,
        )
        self.queue_depth = Gauge(
            "queue_depth",
            "Windows waiting for a batch, by model and cut.",
            ("model", "cut"),
            **broker,
        )
        self.telemetry_reports = Counter(
            "telemetry_reports",
            "ReportTelemetry calls accepted.",
            ("device_class",),
            **broker,
        )
        self.device_bandwidth = Histogram(
            "bandwidth_bytes_per_second",
            "Devices' own estimates of their uplink bandwidth.",
            ("device_class",),
            buckets=_BANDWIDTH_BUCKETS,
            **device,
        )
        self.device_rtt = Histogram(
            "rtt_seconds",
            "Devices' own estimates of their round-trip time to the broker.",
            ("device_class",),
            buckets=_RTT_BUCKETS_S,
            **device,
        )
        self.device_battery = Histogram(
            "battery_ratio",
            "Devices' remaining battery charge (0..1) while on battery.",
            ("device_class",),
            buckets=_BATTERY_BUCKETS,
            **device,
        )
        self.device_windows = Counter(
            "windows",
            "Windows devices finished, from telemetry.",
            _OBS,
            **device,
        )
        self.device_failures = Counter(
            "offload_failures",
            "Offload attempts that produced no result (the device finished the window itself).",
            _OBS,
            **device,
        )
        self.device_latency = Counter(
            "latency_seconds",
            "Sum of window latencies (ready -> result) reported by devices.",
            _OBS,
            **device,
        )
        self.device_front = Counter(
            "front_seconds",
            "Sum of on-device compute time of the front stages [0, cut).",
            _OBS,
            **device,
        )
        self.device_sent_bytes = Counter("sent_bytes", "Activation bytes devices sent.", _OBS, **device)
        self.device_energy = Counter(
            "energy_joules",
            "Energy devices estimate they spent.",
            _OBS,
            **device,
        )
        self.device_fallbacks = Counter(
            "fallbacks",
            "Windows the cloud did not answer, by why (kind: a FallbackKind value; others are 'other').",
            ("model", "device_class", "kind"),
            **device,
        )
        self.device_stage_seconds = Counter(
            "stage_seconds",
            "Sum of on-device compute time of one stage (index `stage`).",
            ("model", "device_class", "stage"),
            **device,
        )
        self.device_stage_windows = Counter(
            "stage_windows",
            "Windows whose on-device time of stage `stage` was measured.",
            ("model", "device_class", "stage"),
            **device,
        )
        self.device_front_reports = Counter(
            "front_reports",
            "Telemetry reports that listed which fronts of the model the device holds.",
            ("model", "device_class"),
            **device,
        )
        self.device_front_held = Counter(
            "front_held_reports",
            "Telemetry reports whose device holds the front of cut `cut` at compression level `level`.",
            ("model", "device_class", "cut", "level"),
            **device,
        )

    @staticmethod
    @functools.cache
    def names() -> Mapping[str, str]:
        """{attribute: exposed name} of every metric here, read off a scratch registry: what the
        controller's queries use (cloud/controller/metrics_source.py MetricNames)."""
        return MappingProxyType(exposed_names(BrokerMetrics(CollectorRegistry())))

    # --- label hygiene ------------------------------------------------------------------------

    def model_label(self, model: str) -> str:
        return model if model in self._stages else UNKNOWN

    def cut_label(self, model: str, cut: int) -> str:
        """str(cut) for a cut 0..N of a served model, else "unknown"."""
        n = self._stages.get(model)
        return str(cut) if n is not None and 0 <= cut <= n else UNKNOWN

    def level_label(self, model: str, level: float) -> str:
        """A compression level as `%g` when it is on the 1e-6 grid in (0, 1] and one of the first
        MAX_LEVEL_LABELS levels seen for `model`, else "other" (labels stay bounded whatever
        devices send). Safe from any thread."""
        steps = round(level * _LEVEL_GRID)
        if not 0 < steps <= _LEVEL_GRID or abs(level * _LEVEL_GRID - steps) > 1e-3:
            return OTHER
        label = f"{steps / _LEVEL_GRID:g}"
        with self._levels_lock:
            seen = self._levels.setdefault(model, set())
            if label not in seen:
                if len(seen) >= MAX_LEVEL_LABELS:
                    return OTHER
                seen.add(label)
        return label

    def device_class_label(self, device_class: str) -> str:
        """The class itself if the broker knows it (add_device_classes), else "other"."""
        return device_class if device_class in self._classes else OTHER

    def add_device_classes(self, device_classes: Iterable[str]) -> None:
        """Give these classes labels of their own: the configured planner classes, or those a
        published plan names. Never a class a device sent. Safe from any thread."""
        self._classes = self._classes | {c for c in device_classes if isinstance(c, str) and c}
        self._window_children = {}

    # --- broker -------------------------------------------------------------------------------

    def _children(self, model: str, device_class: str, cut: int, codec: str) -> _WindowChildren:
        key = (model, device_class, cut, codec)
        children = self._window_children.get(key)
        if children is None:
            m, c, k = self.model_label(model), self.device_class_label(device_class), self.cut_label(model, cut)
            children = _WindowChildren(self, (m, c, k, codec), (m, c, k), c)
            if len(self._window_children) < _MAX_CACHED_CHILDREN:  # label values are bounded; keys may not be
                self._window_children[key] = children
        return children

    def received(self, model: str, device_class: str, cut: int, codec: str, nbytes: int) -> None:
        self._children(model, device_class, cut, codec).get("received_bytes").inc(nbytes)

    def window_in(
        self,
        model: str,
        device_class: str,
        cut: int,
        codec: str,
        nbytes: int,
        bandwidth_bytes_per_s: float | None,
        rtt_s: float,
        battery_fraction: float | None,
    ) -> None:
        """What one offloaded window brings: its bytes and its device's estimates (`received` and
        `estimates` at once, with one lookup of the labelled children). `bandwidth_bytes_per_s`
        None: the device left its estimates out; `battery_fraction` None: not on battery."""
        children = self._children(model, device_class, cut, codec)
        children.get("received_bytes").inc(nbytes)
        if bandwidth_bytes_per_s is not None:
            children.get("device_bandwidth").observe(bandwidth_bytes_per_s)
            children.get("device_rtt").observe(rtt_s)
            if battery_fraction is not None:
                children.get("device_battery").observe(battery_fraction)

    def answered(
        self,
        model: str,
        device_class: str,
        cut: int,
        codec: str,
        *,
        queue_s: float,
        compute_s: float,
        total_s: float,
    ) -> None:
        children = self._children(model, device_class, cut, codec)
        children.get("request_duration").observe(total_s)
        children.get("queue_duration").observe(queue_s)
        children.get("compute_duration").observe(compute_s)

    def failed(self, model: str, device_class: str, code: str, reason: ErrorReason) -> None:
        c = self.device_class_label(device_class)
        self.errors.labels(self.model_label(model), c, code, ErrorReason(reason).value).inc()

    def token_rejected(self, reason: str) -> None:
        """`reason`: a cloud.tokens.TokenRejection value (a fixed set, never a token or an id)."""
        self.token_rejections.labels(reason).inc()

    def shed_window(self, model: str, device_class: str, cut: int) -> None:
        c = self.device_class_label(device_class)
        self.shed.labels(self.model_label(model), c, self.cut_label(model, cut)).inc()

    def batch_done(self, model: str, cut: int, size: int, local: bool = False) -> None:
        m, k = self.model_label(model), self.cut_label(model, cut)
        self.batch_size.labels(m, k).observe(size)
        self.batches.labels(m, k).inc()
        if local:
            self.local_batches.labels(m, k).inc()
            self.local_windows.labels(m, k).inc(size)

    def follow_queue_depth(self, model: str, cut: int, depth: Callable[[], float]) -> None:
        """Read a lane's queue depth when scraped (Gauge.set_function): exact, at no cost per window."""
        self.queue_depth.labels(self.model_label(model), self.cut_label(model, cut)).set_function(depth)

    @contextlib.contextmanager
    def tracking(self) -> Iterator[None]:
        """Counts a window in flight for the duration of the block."""
        self.in_flight.inc()
        try:
            yield
        finally:
            self.in_flight.dec()

    # --- devices ------------------------------------------------------------------------------

    def estimates(self, device_class: str, e: DeviceEstimates | None) -> None:
        """One sample of a device's link and battery; none when its estimates are unknown (None)."""
        if e is None:
            return
        c = self.device_class_label(device_class)
        self.device_bandwidth.labels(c).observe(e.bandwidth_mbps * 125_000)
        self.device_rtt.labels(c).observe(e.rtt_ms / 1000)
        if e.on_battery:
            self.device_battery.labels(c).observe(e.battery_fraction)

    def telemetry(self, report: TelemetryReport) -> None:
        c = self.device_class_label(report.device_class)
        self.telemetry_reports.labels(c).inc()
        self.estimates(report.device_class, report.estimates)
        for o in report.observations:
            m = self.model_label(o.model)
            labels = (m, c, self.cut_label(o.model, o.cut), o.mode.value)
            self.device_windows.labels(*labels).inc(o.window_count)
            self.device_failures.labels(*labels).inc(o.failure_count)
            self.device_latency.labels(*labels).inc(o.latency_ms_total / 1000)
            self.device_front.labels(*labels).inc(o.front_ms_total / 1000)
            self.device_sent_bytes.labels(*labels).inc(o.bytes_sent)
            self.device_energy.labels(*labels).inc(o.energy_mj / 1000)
            for kind, n in o.fallback_kinds:
                self.device_fallbacks.labels(m, c, kind if kind in _FALLBACK_KINDS else OTHER).inc(n)
            for i, ms in enumerate(o.stage_ms_total[: self._stages.get(o.model, 0)]):
                self.device_stage_seconds.labels(m, c, str(i)).inc(ms / 1000)
                self.device_stage_windows.labels(m, c, str(i)).inc(o.window_count)
        for h in report.held_fronts:
            if h.model not in self._stages:  # a model this broker does not serve: nothing to plan
                continue
            self.device_front_reports.labels(h.model, c).inc()
            held = {(self.cut_label(h.model, k), self.level_label(h.model, lv)) for k, lv in h.fronts}
            for k, lv in sorted(held):
                if UNKNOWN not in (k, lv) and lv != OTHER:
                    self.device_front_held.labels(h.model, c, k, lv).inc()
