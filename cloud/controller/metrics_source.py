"""What the controller knows about the fleet and the cloud: one `FleetSnapshot` per period.

    MetricsSource            the seam: ``async snapshot() -> FleetSnapshot``
    ├── PrometheusSource     PromQL over a real Prometheus's HTTP API (/api/v1/query)
    ├── DirectExporterSource scrapes the brokers' /metrics itself (the embedded default, no
    │                        Prometheus): rates come from its own earlier scrapes
    └── FileSource           a snapshot saved as JSON (`controller plan --snapshot FILE`)

Both live sources ask the same questions of the broker's metrics (cloud/metrics.py, names in
`MetricNames`) through two operations, so what a snapshot means does not depend on the source:

    increase(sample, by)       how much a counter (or a histogram's _sum/_count) grew in the window,
                               summed by the labels `by`
    quantile(q, histogram, by) Prometheus's histogram_quantile over the window's bucket increases

Rates are increases / `window_s`; means are increase(_sum) / increase(_count). The direct source's
first scrape has no earlier one: it reports means and quantiles over everything since the broker
started, `window_s` None, and the rates as missing.

Degrading: a source that cannot reach anything raises DependencyError (the controller keeps its
last plan); anything absent from what it could read is None in the snapshot and named in
`FleetSnapshot.missing`, never a crash.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import defaultdict, deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from prometheus_client.parser import text_string_to_metric_families

from cloud.controller.costmodel import TelemetryStats
from cloud.metrics import BrokerMetrics
from splitsense.errors import ConfigError, DataError, DependencyError

__all__ = [
    "ClassSnapshot",
    "CutSnapshot",
    "DeviceModelSnapshot",
    "DirectExporterSource",
    "FileSource",
    "FleetSnapshot",
    "MetricNames",
    "MetricsSource",
    "PrometheusSource",
    "StageLatency",
    "bucket_quantile",
    "front_key",
    "parse_exposition",
    "parse_front_key",
    "snapshot_from_file",
]

_BYTES_PER_S_PER_MBPS = 125_000.0  # the broker exports bandwidth in bytes/s; plans speak Mbit/s
_MS_PER_S = 1000.0
_OFFLOADED, _FALLBACK = "offloaded", "fallback"  # splitsense.wire.ExecutionMode values (mode label)


_EXPORTED = BrokerMetrics.names()  # defined once, by the exporter


@dataclass(frozen=True)
class MetricNames:
    """The broker's metric names as exposed (counters with `_total`), read off cloud/metrics.py
    BrokerMetrics, which alone spells them (namespace and subsystem as client_python joins them)."""

    request_duration: str = _EXPORTED["request_duration"]  # histogram {model, device_class, cut, codec}
    queue_duration: str = _EXPORTED["queue_duration"]  # histogram {model, device_class, cut}
    compute_duration: str = _EXPORTED["compute_duration"]  # histogram, same labels
    batch_size: str = _EXPORTED["batch_size"]  # histogram {model, cut}
    shed: str = _EXPORTED["shed"]  # {model, device_class, cut}
    errors: str = _EXPORTED["errors"]  # {model, device_class, code, reason}
    bandwidth: str = _EXPORTED["device_bandwidth"]  # histogram {device_class}
    rtt: str = _EXPORTED["device_rtt"]  # histogram {device_class}
    battery: str = _EXPORTED["device_battery"]  # histogram {device_class}
    windows: str = _EXPORTED["device_windows"]  # {model, device_class, cut, mode}
    failures: str = _EXPORTED["device_failures"]  # same labels
    latency: str = _EXPORTED["device_latency"]  # same labels
    energy: str = _EXPORTED["device_energy"]  # same labels
    stage_seconds: str = _EXPORTED["device_stage_seconds"]  # {model, device_class, stage}
    stage_windows: str = _EXPORTED["device_stage_windows"]  # same labels
    front_reports: str = _EXPORTED["device_front_reports"]  # {model, device_class}
    front_held: str = _EXPORTED["device_front_held"]  # {model, device_class, cut, level}


# ---------------------------------------------------------------------------------------------
# The snapshot


@dataclass(frozen=True)
class ClassSnapshot:
    """One device class. Bandwidth and RTT are the devices' own estimates (carried by every
    request and telemetry report); rates are per second over the window."""

    device_class: str
    bandwidth_p25_mbps: float | None = None
    bandwidth_p50_mbps: float | None = None
    bandwidth_mean_mbps: float | None = None
    rtt_p50_ms: float | None = None
    rtt_mean_ms: float | None = None
    battery_mean: float | None = None  # fraction 0..1 of devices on battery
    battery_p25: float | None = None
    windows_per_s: float | None = None  # every window the class finished (telemetry)
    offload_windows: float | None = None  # windows the plan sent to the cloud (offloaded + fallback)
    failure_rate: float | None = None  # failed offload attempts / attempts (offloaded + failed)
    fallback_rate: float | None = None  # fallback windows / offload windows
    request_rate_per_s: float | None = None  # requests the broker answered


@dataclass(frozen=True)
class StageLatency:
    """Mean on-device time of one stage, and how many windows measured it."""

    stage: int
    mean_ms: float
    samples: int


@dataclass(frozen=True)
class DeviceModelSnapshot:
    """One (model, device class) as its devices report it."""

    model: str
    device_class: str
    windows_per_s: float | None = None
    windows_by_cut: dict[int, float] = field(default_factory=dict, hash=False)  # windows in the window
    offload_windows: float | None = None
    failure_rate: float | None = None
    fallback_rate: float | None = None
    mean_latency_ms: float | None = None
    energy_mj_per_window: float | None = None
    stages: tuple[StageLatency, ...] = ()
    # Telemetry reports in the window that listed the fronts their device holds (None: none did,
    # the fronts are unknown), and per front "cut@level" the share of them whose device holds it
    front_reports: float | None = None
    front_shares: dict[str, float] = field(default_factory=dict, hash=False)

    def held_fronts(self, tol: float = 1e-6) -> frozenset[tuple[int, float]] | None:
        """The fronts (cut, level) every reporting device holds (share 1); None when unknown (no
        report listed any: no restriction). Cut 0 needs no front: the planner never restricts it."""
        if not self.front_reports:
            return None
        out = set()
        for key, share in self.front_shares.items():
            front = parse_front_key(key)
            if front is not None and share >= 1.0 - tol:
                out.add(front)
        return frozenset(out)

    def telemetry_stats(self, n_stages: int) -> TelemetryStats | None:
        """The planner's view of the stages, N entries (an unmeasured stage has 0 samples);
        None when no stage was measured."""
        if not self.stages:
            return None
        ms, samples = [0.0] * n_stages, [0] * n_stages
        for s in self.stages:
            if 0 <= s.stage < n_stages:
                ms[s.stage], samples[s.stage] = s.mean_ms, s.samples
        return TelemetryStats(stage_ms=tuple(ms), samples=tuple(samples))


@dataclass(frozen=True)
class CutSnapshot:
    """One (model, cut) on the broker: means over the answered windows of the window."""

    model: str
    cut: int
    compute_ms: float | None = None  # the tail call of the window's batch (cloud compute + Ray hop)
    queue_ms: float | None = None  # waiting for a batch
    request_p99_ms: float | None = None  # receipt -> answer
    requests_per_s: float | None = None
    shed_per_s: float | None = None
    batch_size_mean: float | None = None


@dataclass(frozen=True)
class FleetSnapshot:
    """Everything one planning pass reads about the fleet, and what could not be read."""

    taken_unix_ms: int
    source: str
    window_s: float | None  # None: since the exporters started (direct source, first scrape)
    classes: tuple[ClassSnapshot, ...] = ()
    device_models: tuple[DeviceModelSnapshot, ...] = ()
    cuts: tuple[CutSnapshot, ...] = ()
    shed_per_s: float | None = None
    shed_fraction: float | None = None  # shed / (shed + answered)
    missing: tuple[str, ...] = ()

    def device_class(self, name: str) -> ClassSnapshot | None:
        return next((c for c in self.classes if c.device_class == name), None)

    def device_model(self, model: str, device_class: str) -> DeviceModelSnapshot | None:
        return next((d for d in self.device_models if (d.model, d.device_class) == (model, device_class)), None)

    def cut(self, model: str, cut: int) -> CutSnapshot | None:
        return next((c for c in self.cuts if (c.model, c.cut) == (model, cut)), None)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for dm in d["device_models"]:
            dm["windows_by_cut"] = {str(k): v for k, v in dm["windows_by_cut"].items()}
        d["missing"] = list(self.missing)
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FleetSnapshot:
        """The inverse of `to_dict`; raises DataError naming the first thing that is wrong."""
        try:
            d = _only(cls, data, "FleetSnapshot")
            d["classes"] = tuple(ClassSnapshot(**_only(ClassSnapshot, c, "classes[]")) for c in d.get("classes", ()))
            dms = []
            for raw in d.get("device_models", ()):
                dm = _only(DeviceModelSnapshot, raw, "device_models[]")
                dm["windows_by_cut"] = {int(k): float(v) for k, v in dict(dm.get("windows_by_cut", {})).items()}
                dm["front_shares"] = {str(k): float(v) for k, v in dict(dm.get("front_shares", {})).items()}
                dm["stages"] = tuple(StageLatency(**_only(StageLatency, s, "stages[]")) for s in dm.get("stages", ()))
                dms.append(DeviceModelSnapshot(**dm))
            d["device_models"] = tuple(dms)
            d["cuts"] = tuple(CutSnapshot(**_only(CutSnapshot, c, "cuts[]")) for c in d.get("cuts", ()))
            d["missing"] = tuple(str(m) for m in d.get("missing", ()))
            return cls(**d)
        except (TypeError, ValueError, AttributeError) as e:
            raise DataError(f"not a fleet snapshot: {e}") from None

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, allow_nan=False)

    def save(self, path: str | Path) -> Path:
        p = Path(path)
        p.write_text(self.to_json() + "\n")
        return p


def front_key(cut: int, level: float) -> str:
    """How a snapshot names a front: "cut@level", the level as %g (DeviceModelSnapshot.front_shares)."""
    return f"{cut}@{level:g}"


def parse_front_key(key: str) -> tuple[int, float] | None:
    """(cut, level) of a `front_key`; None when it is not one (e.g. a level labelled "other")."""
    cut, sep, level = key.partition("@")
    try:
        k, lv = int(cut), float(level)
    except ValueError:
        return None
    if not sep or k < 0 or not 0 < lv <= 1:
        return None
    return k, lv


def _only(cls: Any, data: Any, where: str) -> dict[str, Any]:
    if not isinstance(data, Mapping):
        raise ValueError(f"{where} must be a JSON object, got {type(data).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"{where} has unknown keys {sorted(unknown)}")
    return dict(data)


def snapshot_from_file(path: str | Path) -> FleetSnapshot:
    """A snapshot saved with `FleetSnapshot.save` (or written by hand); DataError names the file."""
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        raise DataError(f"snapshot file {p} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"snapshot file {p} cannot be read: {e}") from None
    except json.JSONDecodeError as e:
        raise DataError(f"snapshot file {p} is not valid JSON: line {e.lineno}: {e.msg}") from None
    try:
        return FleetSnapshot.from_dict(data)
    except DataError as e:
        raise DataError(f"snapshot file {p}: {e}") from None


# ---------------------------------------------------------------------------------------------
# Sources


@runtime_checkable
class MetricsSource(Protocol):
    async def snapshot(self) -> FleetSnapshot:
        """The fleet now; DependencyError when nothing could be read."""
        ...


class FileSource:
    """A saved snapshot, returned as is (its `missing` included)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    async def snapshot(self) -> FleetSnapshot:
        return snapshot_from_file(self.path)


Labels = tuple[str, ...]


class _Evaluator(Protocol):
    """The two questions both live sources answer (see the module docstring)."""

    window_s: float | None

    def increase(self, sample: str, by: Sequence[str]) -> dict[Labels, float]: ...

    def quantile(self, q: float, histogram: str, by: Sequence[str]) -> dict[Labels, float]: ...


class PrometheusSource:
    """PromQL instant queries against a Prometheus server (stdlib HTTP, no client library).

    `window_s` is the range of rate()/increase(): at least 4 scrape intervals. A Prometheus that
    cannot be reached (or refuses a query) raises DependencyError naming its URL.
    """

    def __init__(
        self,
        url: str,
        *,
        window_s: float = 60.0,
        timeout_s: float = 5.0,
        device_classes: Iterable[str] = (),
        names: MetricNames = MetricNames(),
    ) -> None:
        if not window_s > 0 or not timeout_s > 0:
            raise ConfigError("PrometheusSource: window_s and timeout_s must be > 0")
        self.url = url.rstrip("/")
        self.window_s = float(window_s)
        self.timeout_s = float(timeout_s)
        self.device_classes = tuple(device_classes)
        self.names = names

    async def snapshot(self) -> FleetSnapshot:
        return await asyncio.to_thread(self.snapshot_sync)

    def snapshot_sync(self) -> FleetSnapshot:
        now = time.time()
        ev = _PromQL(self, now)
        return _assemble(ev, self.names, f"prometheus {self.url}", int(now * 1000), self.device_classes)

    def query(self, promql: str, at_unix_s: float | None = None) -> list[tuple[dict[str, str], float]]:
        """One instant query -> [(labels, value)]; NaN values are dropped."""
        params = {"query": promql}
        if at_unix_s is not None:
            params["time"] = f"{at_unix_s:.3f}"
        url = f"{self.url}/api/v1/query?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=self.timeout_s) as resp:
                body = json.loads(resp.read())
        except urllib.error.HTTPError as e:
            detail = _prom_error(e)
            raise DependencyError(f"Prometheus at {self.url} refused query {promql!r}: {detail}") from None
        except (urllib.error.URLError, OSError, ValueError) as e:
            reason = getattr(e, "reason", e)
            raise DependencyError(
                f"Prometheus at {self.url} cannot be reached ({type(e).__name__}: {reason}); "
                "the controller keeps its last plan"
            ) from None
        if body.get("status") != "success":
            raise DependencyError(f"Prometheus at {self.url} answered {promql!r} with {body.get('error')!r}")
        data = body.get("data", {})
        if data.get("resultType") != "vector":
            raise DependencyError(f"Prometheus at {self.url}: {promql!r} is not an instant vector query")
        out = []
        for r in data.get("result", []):
            try:
                value = float(r["value"][1])
            except (KeyError, IndexError, TypeError, ValueError):
                continue
            if math.isfinite(value):
                out.append((dict(r.get("metric", {})), value))
        return out


def _prom_error(e: urllib.error.HTTPError) -> str:
    try:
        return str(json.loads(e.read()).get("error", e))
    except (ValueError, OSError):
        return str(e)


class _PromQL:
    def __init__(self, source: PrometheusSource, at_unix_s: float) -> None:
        self.src, self.at = source, at_unix_s
        self.window_s: float | None = source.window_s
        self.range = f"[{_duration(source.window_s)}]"

    def _run(self, promql: str, by: Sequence[str]) -> dict[Labels, float]:
        return {tuple(m.get(k, "") for k in by): v for m, v in self.src.query(promql, self.at)}

    def increase(self, sample: str, by: Sequence[str]) -> dict[Labels, float]:
        return self._run(f"sum by ({', '.join(by)}) (increase({sample}{self.range}))", by)

    def quantile(self, q: float, histogram: str, by: Sequence[str]) -> dict[Labels, float]:
        labels = ", ".join(("le", *by))
        return self._run(f"histogram_quantile({q}, sum by ({labels}) (rate({histogram}_bucket{self.range})))", by)


def _duration(seconds: float) -> str:
    ms = max(1, round(seconds * 1000))
    return f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms}ms"


# One exporter scrape: sample name -> {(exporter index, sorted label items): value}
_Scrape = dict[str, dict[tuple[int, tuple[tuple[str, str], ...]], float]]


def parse_exposition(text: str, exporter: int = 0, into: _Scrape | None = None) -> _Scrape:
    """Prometheus text exposition -> samples (`_created` samples dropped). Raises ValueError."""
    out: _Scrape = into if into is not None else defaultdict(dict)
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.endswith("_created"):
                continue
            out[s.name][(exporter, tuple(sorted(s.labels.items())))] = float(s.value)
    return out


class DirectExporterSource:
    """Scrapes the brokers' exporters itself (no Prometheus), summing over them.

    Keeps its scrapes of the last `window_s` (at most `max_scrapes`) and answers over the oldest
    one: the same window a Prometheus would use. An exporter that does not answer is named in
    `missing`; when none answers, DependencyError.
    """

    def __init__(
        self,
        urls: Iterable[str],
        *,
        window_s: float = 60.0,
        timeout_s: float = 5.0,
        device_classes: Iterable[str] = (),
        names: MetricNames = MetricNames(),
        max_scrapes: int = 64,
    ) -> None:
        self.urls = tuple(_metrics_url(u) for u in urls)
        if not self.urls:
            raise ConfigError("DirectExporterSource needs at least one exporter URL")
        if not window_s > 0 or not timeout_s > 0:
            raise ConfigError("DirectExporterSource: window_s and timeout_s must be > 0")
        self.window_s = float(window_s)
        self.timeout_s = float(timeout_s)
        self.device_classes = tuple(device_classes)
        self.names = names
        self._history: deque[tuple[float, _Scrape]] = deque(maxlen=max_scrapes)

    async def snapshot(self) -> FleetSnapshot:
        return await asyncio.to_thread(self.snapshot_sync)

    def snapshot_sync(self) -> FleetSnapshot:
        scrape: _Scrape = defaultdict(dict)
        down = []
        for i, url in enumerate(self.urls):
            try:
                with urllib.request.urlopen(url, timeout=self.timeout_s) as resp:
                    text = resp.read().decode("utf-8", errors="replace")
                for sample, series in parse_exposition(text, i).items():  # all or nothing per exporter
                    scrape[sample].update(series)
            except (urllib.error.URLError, OSError) as e:
                down.append(f"exporter {url} cannot be reached ({getattr(e, 'reason', e)})")
            except ValueError as e:
                down.append(f"exporter {url} does not serve the Prometheus text format ({e})")
        if len(down) == len(self.urls):
            raise DependencyError("no broker exporter answered: " + "; ".join(down))
        now = time.time()
        return self.snapshot_of(scrape, now, extra_missing=down)

    def snapshot_of(self, scrape: _Scrape, now_unix_s: float, extra_missing: Sequence[str] = ()) -> FleetSnapshot:
        """The snapshot of one scrape taken at `now_unix_s` over the kept earlier ones (the
        scraping left out; what a recorded exposition goes through)."""
        # keep at most one scrape older than the window: the baseline spans about `window_s`
        while len(self._history) >= 2 and now_unix_s - self._history[1][0] >= self.window_s:
            self._history.popleft()
        base = self._history[0] if self._history else None
        self._history.append((now_unix_s, scrape))
        ev = _Diff(scrape, base[1] if base else None, now_unix_s - base[0] if base else None)
        source = "exporters " + ", ".join(self.urls)
        return _assemble(ev, self.names, source, int(now_unix_s * 1000), self.device_classes, extra_missing)


def _metrics_url(url: str) -> str:
    u = url if "://" in url else f"http://{url}"
    parts = urllib.parse.urlsplit(u)
    return u if parts.path not in ("", "/") else urllib.parse.urlunsplit(parts._replace(path="/metrics"))


class _Diff:
    """increase/quantile over (scrape - base); everything since start when there is no base."""

    def __init__(self, now: _Scrape, base: _Scrape | None, window_s: float | None) -> None:
        self.now, self.base = now, base
        self.window_s = window_s if window_s and window_s > 0 else None
        if self.window_s is None:
            self.base = None

    def _increases(self, sample: str) -> Iterable[tuple[dict[str, str], float]]:
        base = self.base.get(sample, {}) if self.base is not None else {}
        for key, value in self.now.get(sample, {}).items():
            before = base.get(key, 0.0)
            yield dict(key[1]), value - before if value >= before else value  # a reset starts over

    def increase(self, sample: str, by: Sequence[str]) -> dict[Labels, float]:
        out: dict[Labels, float] = defaultdict(float)
        for labels, inc in self._increases(sample):
            out[tuple(labels.get(k, "") for k in by)] += inc
        return dict(out)

    def quantile(self, q: float, histogram: str, by: Sequence[str]) -> dict[Labels, float]:
        groups: dict[Labels, dict[float, float]] = defaultdict(lambda: defaultdict(float))
        for labels, inc in self._increases(f"{histogram}_bucket"):
            groups[tuple(labels.get(k, "") for k in by)][float(labels["le"])] += inc
        out = {}
        for key, buckets in groups.items():
            v = bucket_quantile(q, sorted(buckets.items()))
            if v is not None:
                out[key] = v
        return out


def bucket_quantile(q: float, buckets: Sequence[tuple[float, float]]) -> float | None:
    """Prometheus's histogram_quantile on one histogram: `buckets` are (upper bound `le`,
    cumulative count), sorted by le, the last one +Inf. None where Prometheus gives NaN."""
    if not buckets or not math.isinf(buckets[-1][0]) or len(buckets) < 2:
        return None
    if q < 0:
        return -math.inf
    if q > 1:
        return math.inf
    counts = [c for _, c in buckets]
    for i in range(1, len(counts)):  # ensureMonotonic: scrapes are not atomic
        counts[i] = max(counts[i], counts[i - 1])
    total = counts[-1]
    if total <= 0:
        return None
    rank = q * total
    b = next((i for i in range(len(counts) - 1) if counts[i] >= rank), len(counts) - 1)
    if b == len(counts) - 1:
        return buckets[-2][0]
    if b == 0 and buckets[0][0] <= 0:
        return buckets[0][0]
    start, end, count = 0.0, buckets[b][0], counts[b]
    if b > 0:
        start, count, rank = buckets[b - 1][0], count - counts[b - 1], rank - counts[b - 1]
    return start + (end - start) * (rank / count)


# ---------------------------------------------------------------------------------------------
# Assembly (pure: the evaluator holds the data)


def _ratio(num: float | None, den: float | None, scale: float = 1.0) -> float | None:
    if num is None or den is None or den <= 0:
        return None
    return num / den * scale


def _assemble(
    ev: _Evaluator,
    n: MetricNames,
    source: str,
    taken_unix_ms: int,
    expected_classes: Sequence[str] = (),
    extra_missing: Sequence[str] = (),
) -> FleetSnapshot:
    w = ev.window_s
    missing: list[str] = list(extra_missing)
    if w is None:
        missing.append("rates per second: only one scrape so far (means cover everything since start)")

    def rate(x: float | None) -> float | None:
        return None if x is None or w is None else x / w

    C = ("device_class",)
    MC = ("model", "device_class")
    bw25 = ev.quantile(0.25, n.bandwidth, C)
    bw50 = ev.quantile(0.5, n.bandwidth, C)
    bw_sum, bw_count = ev.increase(f"{n.bandwidth}_sum", C), ev.increase(f"{n.bandwidth}_count", C)
    rtt50 = ev.quantile(0.5, n.rtt, C)
    rtt_sum, rtt_count = ev.increase(f"{n.rtt}_sum", C), ev.increase(f"{n.rtt}_count", C)
    bat25 = ev.quantile(0.25, n.battery, C)
    bat_sum, bat_count = ev.increase(f"{n.battery}_sum", C), ev.increase(f"{n.battery}_count", C)
    windows = ev.increase(n.windows, ("model", "device_class", "cut", "mode"))
    failures = ev.increase(n.failures, MC)
    latency = ev.increase(n.latency, MC)
    energy = ev.increase(n.energy, MC)
    stage_s = ev.increase(n.stage_seconds, ("model", "device_class", "stage"))
    stage_n = ev.increase(n.stage_windows, ("model", "device_class", "stage"))
    front_reports = {k: v for k, v in ev.increase(n.front_reports, MC).items() if v > 0}
    front_held = ev.increase(n.front_held, ("model", "device_class", "cut", "level"))
    MK = ("model", "cut")
    answered = ev.increase(f"{n.request_duration}_count", ("model", "device_class", "cut"))
    p99 = ev.quantile(0.99, n.request_duration, MK)
    comp_sum, comp_count = (
        ev.increase(f"{n.compute_duration}_sum", MK),
        ev.increase(f"{n.compute_duration}_count", MK),
    )
    q_sum, q_count = ev.increase(f"{n.queue_duration}_sum", MK), ev.increase(f"{n.queue_duration}_count", MK)
    bs_sum, bs_count = ev.increase(f"{n.batch_size}_sum", MK), ev.increase(f"{n.batch_size}_count", MK)
    shed = ev.increase(n.shed, MK)

    # windows per (model, class): by mode, by cut
    mc_mode: dict[Labels, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    mc_cut: dict[Labels, dict[int, float]] = defaultdict(lambda: defaultdict(float))
    for (model, cls, cut, mode), v in windows.items():
        mc_mode[(model, cls)][mode] += v
        if cut.isdigit():
            mc_cut[(model, cls)][int(cut)] += v

    def health(modes: Mapping[str, float], failed: float) -> tuple[float | None, float | None, float | None]:
        off, fb = modes.get(_OFFLOADED, 0.0), modes.get(_FALLBACK, 0.0)
        return off + fb, _ratio(failed, off + failed), _ratio(fb, off + fb)

    stages: dict[Labels, list[StageLatency]] = defaultdict(list)
    for (model, cls, stage), secs in stage_s.items():
        count = stage_n.get((model, cls, stage), 0.0)
        if stage.isdigit() and count > 0:
            stages[(model, cls)].append(StageLatency(int(stage), secs / count * _MS_PER_S, int(round(count))))

    shares: dict[Labels, dict[str, float]] = defaultdict(dict)
    for (model, cls, cut, level), v in front_held.items():
        reports = front_reports.get((model, cls))
        front = parse_front_key(f"{cut}@{level}")
        if reports and front is not None:
            shares[(model, cls)][front_key(*front)] = min(v / reports, 1.0)

    device_models = []
    for key in sorted(set(mc_mode) | set(failures) | set(stages) | set(front_reports)):
        model, cls = key
        modes = mc_mode.get(key, {})
        total = sum(modes.values()) if modes else None
        off, fr, fb = health(modes, failures.get(key, 0.0))
        device_models.append(
            DeviceModelSnapshot(
                model=model,
                device_class=cls,
                windows_per_s=rate(total),
                windows_by_cut=dict(sorted(mc_cut.get(key, {}).items())),
                offload_windows=off,
                failure_rate=fr,
                fallback_rate=fb,
                mean_latency_ms=_ratio(latency.get(key), total, _MS_PER_S),
                energy_mj_per_window=_ratio(energy.get(key), total, _MS_PER_S),
                stages=tuple(sorted(stages.get(key, []), key=lambda s: s.stage)),
                front_reports=front_reports.get(key),
                front_shares=dict(sorted(shares.get(key, {}).items())),
            )
        )
        if not stages.get(key):
            missing.append(f"device stage latency of model={model} device_class={cls} ({n.stage_seconds})")

    cls_modes: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for (_, cls), modes in mc_mode.items():
        for mode, v in modes.items():
            cls_modes[cls][mode] += v
    cls_failed: dict[str, float] = defaultdict(float)
    for (_, cls), v in failures.items():
        cls_failed[cls] += v
    cls_answered: dict[str, float] = defaultdict(float)
    for (_, cls, _), v in answered.items():
        cls_answered[cls] += v

    seen = {k[0] for d in (bw50, bw_count, rtt_count, bat_count) for k in d} | set(cls_modes) | set(cls_answered)
    classes = []
    for cls in sorted(seen | set(expected_classes)):
        k = (cls,)
        modes = cls_modes.get(cls, {})
        off, fr, fb = health(modes, cls_failed.get(cls, 0.0))
        snap = ClassSnapshot(
            device_class=cls,
            bandwidth_p25_mbps=_ratio(bw25.get(k), _BYTES_PER_S_PER_MBPS),
            bandwidth_p50_mbps=_ratio(bw50.get(k), _BYTES_PER_S_PER_MBPS),
            bandwidth_mean_mbps=_ratio(bw_sum.get(k), bw_count.get(k), 1 / _BYTES_PER_S_PER_MBPS),
            rtt_p50_ms=None if rtt50.get(k) is None else rtt50[k] * _MS_PER_S,
            rtt_mean_ms=_ratio(rtt_sum.get(k), rtt_count.get(k), _MS_PER_S),
            battery_mean=_ratio(bat_sum.get(k), bat_count.get(k)),
            battery_p25=bat25.get(k),
            windows_per_s=rate(sum(modes.values())) if modes else None,
            offload_windows=off if modes else None,
            failure_rate=fr,
            fallback_rate=fb,
            request_rate_per_s=rate(cls_answered.get(cls)),
        )
        classes.append(snap)
        for fname, metric in (
            ("bandwidth_p50_mbps", n.bandwidth),
            ("rtt_mean_ms", n.rtt),
            ("battery_mean", n.battery),
            ("windows_per_s", n.windows),
        ):
            if getattr(snap, fname) is None and (w is not None or fname != "windows_per_s"):
                missing.append(f"{fname} of device_class={cls} ({metric})")

    cut_answered: dict[Labels, float] = defaultdict(float)
    for (model, _, cut), v in answered.items():
        cut_answered[(model, cut)] += v
    cuts = []
    for key in sorted(set(comp_count) | set(cut_answered) | set(shed) | set(bs_count)):
        model, cut = key
        if not cut.isdigit():
            continue  # "unknown": a request the broker refused
        cuts.append(
            CutSnapshot(
                model=model,
                cut=int(cut),
                compute_ms=_ratio(comp_sum.get(key), comp_count.get(key), _MS_PER_S),
                queue_ms=_ratio(q_sum.get(key), q_count.get(key), _MS_PER_S),
                request_p99_ms=None if p99.get(key) is None else p99[key] * _MS_PER_S,
                requests_per_s=rate(cut_answered.get(key)),
                shed_per_s=rate(shed.get(key, 0.0)),
                batch_size_mean=_ratio(bs_sum.get(key), bs_count.get(key)),
            )
        )
    if not cuts:
        missing.append(f"cloud compute and queue time per (model, cut) ({n.compute_duration}): no answered requests")

    # A counter with labels has no series until it first counts: no shed series beside answered
    # requests means nothing was shed.
    total_shed: float | None = None
    shed_fraction = None
    if shed or answered:
        total_shed = sum(shed.values())
        shed_fraction = _ratio(total_shed, total_shed + sum(answered.values()))
    else:
        missing.append(f"broker requests and shed rate ({n.request_duration}, {n.shed}): no series")
    return FleetSnapshot(
        taken_unix_ms=taken_unix_ms,
        source=source,
        window_s=w,
        classes=tuple(classes),
        device_models=tuple(device_models),
        cuts=tuple(cuts),
        shed_per_s=rate(total_shed),
        shed_fraction=shed_fraction,
        missing=tuple(missing),
    )
