"""The device's own metrics, and the telemetry reports that carry them to the broker.

A device sits behind NAT and cannot be scraped, so its Prometheus metrics live in a registry of
its own (pass `registry=` to share one, e.g. to expose it locally while debugging) and what the
controller needs is pushed: `EdgeMetrics.observe` also adds every window into per-(model, cut,
mode) sums that `drain_report` turns into a `TelemetryReport` (ReportTelemetry), sums that add
up across devices and periods.

    splitsense_edge_windows_total{model,device_class,cut,mode}                 counter
    splitsense_edge_window_latency_seconds{model,device_class,mode}           histogram
    splitsense_edge_sent_bytes_total{model,device_class,cut,codec}            counter
    splitsense_edge_fallbacks_total{model,device_class,reason}                counter
    splitsense_edge_energy_joules_total{model,device_class,mode}              counter
    splitsense_edge_breaker_state{model,device_class}                         gauge 0 closed, 1 half, 2 open
    splitsense_edge_estimated_bandwidth_bytes_per_second{model,device_class}  gauge
    splitsense_edge_estimated_rtt_seconds{model,device_class}                 gauge
    splitsense_edge_battery_ratio{model,device_class}                         gauge 0..1
    splitsense_edge_stored_windows{model,device_class}                        gauge (store-and-forward)
    splitsense_edge_store_bytes{model,device_class}                           gauge
    splitsense_edge_deferred_windows_total{model,device_class}                counter
    splitsense_edge_store_forward_delay_seconds{model,device_class}           histogram
    splitsense_edge_unanswered_windows_total{model,device_class,reason}       counter
    splitsense_edge_missing_front_windows_total{model,device_class,cut,level} counter

The last five are those of a device without local fallback (edge/store.py): windows it keeps
while the cloud cannot answer them, forwarded later (mode deferred) with the delay from the window
being ready to its answer; `unanswered` counts the windows that got no result, by `reason`:
refused (the store was full), expired (stored past its age bound), rejected (the broker refused
it, so no retry can help), codec (it could not be encoded), pending (still stored when the device
stopped).

`missing_front_windows` counts the windows whose plan row (or default choice) named a front, at
cut `cut` and compression level `level`, that the device's backend does not hold: the device ran
the nearest one it holds instead (edge/runtime.py). Every report carries the fronts the device
holds (`drain_report(held_fronts=...)`), so the planner stops naming the ones it lacks.

Labels are low-cardinality only (never ids): the fallbacks' `reason` is the result's typed kind
(edge/route.py FallbackKind: unavailable, deadline, rejected, shed, error, late, codec).
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from edge.breaker import BreakerState
from edge.sink import WindowResult
from splitsense.metric_names import NAMESPACE
from splitsense.wire import DeviceEstimates, ExecutionMode, HeldFronts, TelemetryObservation, TelemetryReport

__all__ = ["EdgeMetrics"]

_NS = NAMESPACE
_SUB = "edge"
# 1 ms .. 5 s: an in-process tail answers in ~1 ms, a deadline is 300 ms, a slow local audio model
# on a watch-class device takes seconds.
_LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 2.5, 5.0)
# 100 ms .. 10 min: a deferred window waits at least one failed attempt, at most the store's age
# bound (edge/store.py, 600 s by default); scripted outages are seconds, real ones minutes.
_DELAY_BUCKETS_S = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)


@dataclass
class _Sums:
    windows: int = 0
    front_ms: float = 0.0
    latency_ms: float = 0.0
    bytes_sent: int = 0
    energy_mj: float = 0.0
    failures: int = 0
    kinds: collections.Counter[str] = field(default_factory=collections.Counter)  # FallbackKind -> windows
    stage_ms: list[float] = field(default_factory=list)
    stage_ok: bool = True  # False once windows with different stage counts were mixed

    def add_stages(self, stage_ms: tuple[float, ...]) -> None:
        """Add per-stage times (call before counting the windows they belong to)."""
        if not self.stage_ok:
            return
        if self.windows == 0:
            self.stage_ms = list(stage_ms)
        elif len(stage_ms) == len(self.stage_ms):
            self.stage_ms = [a + b for a, b in zip(self.stage_ms, stage_ms, strict=True)]
        else:
            self.stage_ok, self.stage_ms = False, []


class EdgeMetrics:
    def __init__(self, model: str, device_class: str, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.model = model
        self.device_class = device_class
        ids = ("model", "device_class")

        def counter(name: str, doc: str, *labels: str) -> Counter:
            return Counter(name, doc, [*ids, *labels], namespace=_NS, subsystem=_SUB, registry=self.registry)

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, ids, namespace=_NS, subsystem=_SUB, registry=self.registry)

        self.windows = counter("windows", "Sensor windows finished, by where they ran.", "cut", "mode")
        self.latency = Histogram(
            "window_latency_seconds",
            "Time from a window being available to its result.",
            [*ids, "mode"],
            namespace=_NS,
            subsystem=_SUB,
            registry=self.registry,
            buckets=_LATENCY_BUCKETS_S,
        )
        self.sent_bytes = counter("sent_bytes", "Activation payload bytes sent to the broker.", "cut", "codec")
        self.fallbacks = counter(
            "fallbacks", "Windows whose offload failed and that the device finished itself.", "reason"
        )
        self.energy = counter("energy_joules", "Estimated device energy (compute + radio).", "mode")
        self.breaker_state = gauge("breaker_state", "Circuit breaker: 0 closed, 1 half-open, 2 open (fully local).")
        self.bandwidth = gauge("estimated_bandwidth_bytes_per_second", "The device's uplink bandwidth estimate.")
        self.rtt = gauge("estimated_rtt_seconds", "The device's round-trip time estimate to the broker.")
        self.battery = gauge("battery_ratio", "Remaining battery charge, 0..1.")
        self.stored_windows = gauge("stored_windows", "Windows kept for store-and-forward, not yet answered.")
        self.store_bytes = gauge("store_bytes", "Encoded bytes held by the store-and-forward buffer.")
        self.deferred = counter("deferred_windows", "Stored windows forwarded and answered later (mode deferred).")
        self.deferred_delay = Histogram(
            "store_forward_delay_seconds",
            "Time from a stored window being available to its forwarded answer.",
            list(ids),
            namespace=_NS,
            subsystem=_SUB,
            registry=self.registry,
            buckets=_DELAY_BUCKETS_S,
        )
        self.unanswered = counter(
            "unanswered_windows",
            "Windows of a device without local fallback that got no result (refused, expired, ...).",
            "reason",
        )
        self.missing_fronts = counter(
            "missing_front_windows",
            "Windows whose plan named a front (cut, compression level) the device does not hold; run at another.",
            "cut",
            "level",
        )
        self._sums: dict[tuple[str, int, ExecutionMode], _Sums] = {}
        # Every window touches the same few series: their children are looked up once (a
        # `labels()` call validates and locks each time; ~10 us a window over the eight here).
        self._children: dict[tuple[Any, ...], Any] = {}
        self._breaker_g = self.breaker_state.labels(model, device_class)
        self._bandwidth_g = self.bandwidth.labels(model, device_class)
        self._rtt_g = self.rtt.labels(model, device_class)
        self._battery_g = self.battery.labels(model, device_class)

    def _child(self, metric: Any, *labels: str) -> Any:
        """metric.labels(model, device_class, *labels), looked up once per series."""
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(self.model, self.device_class, *labels)
        return child

    # --- per window -------------------------------------------------------------------------

    def observe(self, result: WindowResult, fallback_reason: str | None = None) -> None:
        """Count one finished window. `fallback_reason` is the low-cardinality label of a
        fallback (a FallbackKind value; `result.reason` carries the full text)."""
        mode, child = result.mode.value, self._child
        child(self.windows, str(result.cut), mode).inc()
        child(self.latency, mode).observe(result.latency_ms / 1000.0)
        child(self.energy, mode).inc(result.energy_mj / 1000.0)
        if result.bytes_sent:
            child(self.sent_bytes, str(result.cut), result.codec or "none").inc(result.bytes_sent)
        if result.mode is ExecutionMode.FALLBACK:
            child(self.fallbacks, fallback_reason or "error").inc()
        if result.mode is ExecutionMode.DEFERRED:
            child(self.deferred).inc()
            child(self.deferred_delay).observe(result.latency_ms / 1000.0)
        s = self._sums.setdefault((self.model, result.cut, result.mode), _Sums())
        s.add_stages(result.stage_ms)
        s.windows += 1
        s.front_ms += result.front_ms
        s.latency_ms += result.latency_ms
        s.bytes_sent += result.bytes_sent
        s.energy_mj += result.energy_mj
        s.failures += result.mode is ExecutionMode.FALLBACK
        if result.kind is not None:
            s.kinds[result.kind.value] += 1

    def set_store(self, windows: int, nbytes: int) -> None:
        """What the store-and-forward buffer holds now."""
        self._child(self.stored_windows).set(windows)
        self._child(self.store_bytes).set(nbytes)

    def observe_missing_front(self, cut: int, level: float) -> None:
        """A window whose chosen front (cut, level) the device lacks (it ran another one)."""
        self._child(self.missing_fronts, str(cut), f"{level:g}").inc()

    def observe_unanswered(self, reason: str) -> None:
        """A window that got no result: refused, expired, rejected, codec or pending."""
        self._child(self.unanswered, reason).inc()

    def set_state(self, breaker: BreakerState, estimates: DeviceEstimates) -> None:
        self._breaker_g.set(breaker.gauge_value)
        self._bandwidth_g.set(estimates.bandwidth_mbps * 1e6 / 8)
        self._rtt_g.set(estimates.rtt_ms / 1000.0)
        self._battery_g.set(estimates.battery_fraction)

    # --- telemetry --------------------------------------------------------------------------

    def pending_windows(self) -> int:
        return sum(s.windows for s in self._sums.values())

    def drain_report(
        self,
        device_id: str,
        estimates: DeviceEstimates,
        plan_version: int,
        period_start_unix_ms: int,
        period_end_unix_ms: int,
        held_fronts: tuple[HeldFronts, ...] = (),
    ) -> TelemetryReport:
        """The sums since the last drain as one report; the sums start again from zero.
        `held_fronts`: what the device's backend can run, carried by every report."""
        observations = tuple(
            TelemetryObservation(
                model=model,
                cut=cut,
                mode=mode,
                window_count=s.windows,
                front_ms_total=s.front_ms,
                latency_ms_total=s.latency_ms,
                bytes_sent=s.bytes_sent,
                energy_mj=s.energy_mj,
                failure_count=s.failures,
                stage_ms_total=tuple(s.stage_ms) if s.stage_ok else (),
                fallback_kinds=tuple(s.kinds.items()),
            )
            for (model, cut, mode), s in self._sums.items()
        )
        self._sums = {}
        return TelemetryReport(
            device_id=device_id,
            device_class=self.device_class,
            estimates=estimates,
            plan_version=plan_version,
            period_start_unix_ms=period_start_unix_ms,
            period_end_unix_ms=max(period_end_unix_ms, period_start_unix_ms),
            observations=observations,
            held_fronts=held_fronts,
        )

    def restore(self, report: TelemetryReport) -> None:
        """Put back the sums of a report that could not be sent, so the next one carries them."""
        for o in report.observations:
            s = self._sums.setdefault((o.model, o.cut, o.mode), _Sums())
            s.add_stages(o.stage_ms_total)
            s.windows += o.window_count
            s.front_ms += o.front_ms_total
            s.latency_ms += o.latency_ms_total
            s.bytes_sent += o.bytes_sent
            s.energy_mj += o.energy_mj
            s.failures += o.failure_count
            s.kinds.update(dict(o.fallback_kinds))
