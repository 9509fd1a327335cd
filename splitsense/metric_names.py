"""Metric names as client_python builds them: one namespace, a subsystem per exporter.

Each exporter (cloud/metrics.py BrokerMetrics: subsystems broker and device; cloud/controller/loop.py
ControllerMetrics: controller; edge/metrics.py EdgeMetrics: edge) declares its metrics with
`namespace=NAMESPACE, subsystem=...` and a short name; the full name exists only where
prometheus_client joins them. Whoever needs a name (the controller's PromQL, the tests that hold
the alert rules and the dashboard to what is exported) reads it off a holder with these helpers
instead of writing the string again.
"""

from __future__ import annotations

from typing import Any

from prometheus_client.metrics import MetricWrapperBase

__all__ = ["NAMESPACE", "exposed_name", "exposed_names", "sample_names"]

NAMESPACE = "splitsense"

# The series prometheus_client writes for one metric of each type (besides `_created`, which
# Prometheus drops unless asked).
_SUFFIXES = {
    "counter": ("_total",),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count"),
    "summary": ("", "_sum", "_count"),
    "info": ("_info",),
    "stateset": ("",),
    "enum": ("",),
}


def _family(metric: MetricWrapperBase) -> Any:
    return next(iter(metric.describe()))


def exposed_name(metric: MetricWrapperBase) -> str:
    """The name a query uses for `metric`: a counter's with `_total`, a histogram's base name."""
    fam = _family(metric)
    return f"{fam.name}_total" if fam.type == "counter" else str(fam.name)


def _metrics_of(holder: object) -> dict[str, MetricWrapperBase]:
    return {k: v for k, v in vars(holder).items() if isinstance(v, MetricWrapperBase)}


def exposed_names(holder: object) -> dict[str, str]:
    """{attribute: exposed name} of every metric an exporter object holds as an attribute."""
    return {attr: exposed_name(m) for attr, m in _metrics_of(holder).items()}


def sample_names(holder: object) -> set[str]:
    """Every series name the holder's metrics can write (what PromQL may select)."""
    out: set[str] = set()
    for m in _metrics_of(holder).values():
        fam = _family(m)
        out |= {f"{fam.name}{s}" for s in _SUFFIXES.get(fam.type, ("",))}
    return out
