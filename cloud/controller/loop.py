"""The controller loop: a fleet snapshot in, a plan set out to the plan store, every period.

One pass (`Controller.run_once`):

    source.snapshot()          FleetSnapshot (PromQL, or the brokers' exporters)   dependency "prometheus"
    store.current()            the stored plan set: the planner's previous one      dependency "redis"
    inputs_from_snapshot()     PlannerInputs + what decided them (pure: controller/inputs.py)
    plan_fleet(previous)       the exact optimum per row, hysteresis against `previous`
    publish()                  only when a row changed: validate, store, the store publishes

What a snapshot changes (RTT, cloud queue and overhead, device telemetry, failure rate ->
local only, battery -> energy saving) and what carries over between passes is decided in
cloud/controller/inputs.py, without I/O; this module is the I/O around it.

Failure. Nothing here raises out of `run_once`/`run_forever` except cancellation: a dependency that
is down is logged (a warning when it goes down, then every 10th period, an info when it is back),
exported as `splitsense_controller_dependency_up{dependency}` = 0 and counted, and the pass ends
without publishing: brokers and devices keep their last plan. A plan the validator refuses is
logged and never stored.

Metrics (registry= like every holder here; None: prometheus_client's global registry):

    splitsense_controller_dependency_up{dependency}          gauge   1 up, 0 down (prometheus|exporters|redis|...)
    splitsense_controller_replans_total                      counter passes that computed a plan
    splitsense_controller_plans_published_total              counter plan sets stored
    splitsense_controller_pass_failures_total{dependency}    counter passes cut short, by cause
    splitsense_controller_plan_version                       gauge   the version last stored (or read)
    splitsense_controller_replan_duration_seconds            histogram  one whole pass
    splitsense_controller_last_success_timestamp_seconds     gauge   end of the last complete pass
    splitsense_controller_last_publish_timestamp_seconds     gauge   the last publication
    splitsense_controller_snapshot_missing                   gauge   what the last snapshot lacked
    splitsense_controller_class_local_only{device_class}     gauge   1 while a class is local only
    splitsense_controller_class_battery_saving{device_class} gauge   1 while a class saves energy
    splitsense_controller_infeasible_rows{device_class,model,budget}
                                                             gauge   rows of the last plan no choice can meet:
                                                                     budget "energy" (a latency row's) or
                                                                     "deadline" (an energy row's)
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

from cloud.controller.inputs import Memory, SnapshotInputs, inputs_from_snapshot, plan_differences, plan_from_snapshot
from cloud.controller.metrics_source import FleetSnapshot, MetricsSource
from cloud.controller.planner import infeasible_rows
from cloud.planstore import plan_validator
from pipelines.catalog import ModelCatalog
from pipelines.devices import DeviceClass
from splitsense.config import Config
from splitsense.errors import ConfigError, DataError, DependencyError, PlanError, SplitsenseError
from splitsense.metric_names import NAMESPACE
from splitsense.plan import PlanSet

__all__ = ["OUTCOMES", "Controller", "ControllerMetrics", "PassReport", "PlanStoreLike"]

log = logging.getLogger(__name__)

# Version 1 is the static plan set every broker serves until a controller publishes
# (cloud/plans.py): the controller's versions start above it, or brokers would ignore the first.
STATIC_PLAN_VERSION = 1
_LOG_EVERY_N_FAILURES = 10  # a dependency that stays down is logged again every 10th pass
_DURATION_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


# ---------------------------------------------------------------------------------------------
# What the controller reads and writes


class PlanStoreLike(Protocol):
    """What the loop needs of cloud.planstore.PlanStore (tests plug an in-memory one in)."""

    async def current(self) -> PlanSet | None: ...

    async def put(self, plan_set: PlanSet, validate: Callable[[PlanSet], None]) -> int: ...


# ---------------------------------------------------------------------------------------------
# Metrics


class ControllerMetrics:
    """The controller's own metrics (module docstring), on one registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = REGISTRY if registry is None else registry
        r = self.registry
        controller: dict[str, Any] = {"namespace": NAMESPACE, "subsystem": "controller", "registry": r}
        self.dependency_up = Gauge(
            "dependency_up",
            "Whether the controller reached a dependency on its last pass (1) or not (0).",
            ("dependency",),
            **controller,
        )
        self.replans = Counter(
            "replans",
            "Planning passes that computed a plan set.",
            **controller,
        )
        self.published = Counter(
            "plans_published",
            "Plan sets stored in the plan store.",
            **controller,
        )
        self.pass_failures = Counter(
            "pass_failures",
            "Passes cut short, by the dependency (or step) that failed.",
            ("dependency",),
            **controller,
        )
        self.plan_version = Gauge(
            "plan_version",
            "Version of the plan set last stored or read.",
            **controller,
        )
        self.duration = Histogram(
            "replan_duration_seconds",
            "Wall time of one controller pass: snapshot, plan, publish.",
            buckets=_DURATION_BUCKETS_S,
            **controller,
        )
        self.last_success = Gauge(
            "last_success_timestamp_seconds",
            "Unix time at which the last complete pass (published or unchanged) ended.",
            **controller,
        )
        self.last_publish = Gauge(
            "last_publish_timestamp_seconds",
            "Unix time of the last plan set stored.",
            **controller,
        )
        self.missing = Gauge(
            "snapshot_missing",
            "Items the last fleet snapshot could not read (named in the controller's log).",
            **controller,
        )
        self.local_only = Gauge(
            "class_local_only",
            "1 while the controller keeps a device class local only (its cloud path fails).",
            ("device_class",),
            **controller,
        )
        self.battery_saving = Gauge(
            "class_battery_saving",
            "1 while a device class's NORMAL rows minimise energy (a quarter of it is low on battery).",
            ("device_class",),
            **controller,
        )
        self.infeasible_rows = Gauge(
            "infeasible_rows",
            "Rows of the last plan computed whose budget no choice can meet (energy: a latency row's energy "
            "budget, deadline: an energy row's deadline); they take the least energy or least latency choice.",
            ("device_class", "model", "budget"),
            **controller,
        )

    def set_infeasible_rows(self, plan_set: PlanSet) -> None:
        """The infeasible-row gauge from `plan_set` alone: a (class, model) it no longer plans disappears."""
        self.infeasible_rows.clear()
        for (device_class, model, budget), n in infeasible_rows(plan_set).items():
            self.infeasible_rows.labels(device_class, model, budget).set(n)


# ---------------------------------------------------------------------------------------------
# The loop


OUTCOMES = ("published", "unchanged", "no-metrics", "store-down", "refused", "error")


@dataclass(frozen=True)
class PassReport:
    """What one pass did, and why (the CLI's status line and `controller plan` print it)."""

    started_unix_ms: int
    duration_s: float
    outcome: str  # one of OUTCOMES
    reason: str  # one line
    version: int | None = None  # stored version (published), else the current one if known
    changed_rows: int = 0
    plan_set: PlanSet | None = None  # the plan computed this pass (stored or not)
    snapshot: FleetSnapshot | None = None
    inputs: SnapshotInputs | None = None
    dependencies: Mapping[str, bool] = field(default_factory=dict)

    @property
    def missing(self) -> tuple[str, ...]:
        return self.snapshot.missing if self.snapshot is not None else ()


@dataclass
class _Dependency:
    name: str
    up: bool | None = None
    down_since: float | None = None
    failures: int = 0  # consecutive
    last_error: str = ""


class Controller:
    """Replans the fleet from `source` into `store`, once (`run_once`) or every period."""

    def __init__(
        self,
        config: Config,
        source: MetricsSource,
        store: PlanStoreLike,
        catalogs: Mapping[str, ModelCatalog],
        devices: Mapping[str, DeviceClass],
        registry: CollectorRegistry | None = None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not catalogs:
            raise ConfigError("the controller needs at least one model catalog (splitsense models catalog)")
        if not devices:
            raise ConfigError("the controller needs at least one device class")
        for name, cat in catalogs.items():
            if cat.model != name:
                raise ConfigError(f"catalog under the name {name!r} is the catalog of {cat.model!r}")
        self.config = config
        self.source = source
        self.store = store
        self.catalogs = dict(catalogs)
        self.devices = dict(devices)
        self.metrics = ControllerMetrics(registry)
        self._clock = clock
        self.validate = plan_validator(
            {m: c.n_stages for m, c in self.catalogs.items()},
            codecs={e.codec for c in self.catalogs.values() for e in c.codecs},
            compression_levels={m: [lv.energy_kept for lv in c.levels] for m, c in self.catalogs.items()},
        )
        self.metrics_dependency = _source_name(source)
        self._deps = {
            self.metrics_dependency: _Dependency(self.metrics_dependency),
            "redis": _Dependency("redis"),
        }
        # Every cause a pass can fail for exports 0 from the start, so that rate() and alerts see
        # a series before the first failure (Prometheus' advice on known label values).
        for cause in (*self._deps, "controller", "planner", "validation"):
            self.metrics.pass_failures.labels(cause)
        self._last_version = 0  # the highest version this controller stored
        self._last_plan: PlanSet | None = None  # what it last stored or read: planning falls back on it
        self._last_digest: dict[str, str] = {}
        self.memory = Memory()  # what the last pass measured and held, for the next one
        self._last_missing: tuple[str, ...] = ()
        self.last: PassReport | None = None
        self.passes = 0
        self.outcomes: dict[str, int] = dict.fromkeys(OUTCOMES, 0)
        self.published_versions: list[int] = []
        # Validation of the config's classes against the devices happens now, not in the loop.
        inputs_from_snapshot(config, None, self.catalogs, self.devices)

    # --- one pass -------------------------------------------------------------------------------

    async def run_once(self) -> PlanSet | None:
        """One pass; returns the plan set it stored, None when it stored nothing (see `last`)."""
        t0 = time.perf_counter()
        started = int(self._clock() * 1000)
        try:
            report = await self._pass(started, t0)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a bug: logged with its traceback, the loop goes on
            log.exception("controller pass failed unexpectedly; keeping the last plan")
            self.metrics.pass_failures.labels("controller").inc()
            report = self._report(started, t0, "error", f"unexpected {type(e).__name__}: {e}")
        self.passes += 1
        self.outcomes[report.outcome] = self.outcomes.get(report.outcome, 0) + 1
        self.metrics.duration.observe(report.duration_s)
        if report.outcome in ("published", "unchanged"):
            self.metrics.last_success.set(self._clock())
        self.last = report
        return report.plan_set if report.outcome == "published" else None

    def _report(self, started: int, t0: float, outcome: str, reason: str, **kw: Any) -> PassReport:
        deps = {d.name: bool(d.up) for d in self._deps.values() if d.up is not None}
        return PassReport(started, time.perf_counter() - t0, outcome, reason, dependencies=deps, **kw)

    async def _pass(self, started: int, t0: float) -> PassReport:
        c = self.config.controller
        src = self.metrics_dependency
        # 1. the fleet
        snapshot: FleetSnapshot | None = None
        metrics_error = ""
        try:
            snapshot = await asyncio.wait_for(self.source.snapshot(), _snapshot_timeout_s(self.config))
        except (DependencyError, DataError, OSError, TimeoutError) as e:
            metrics_error = str(e) or f"no answer within {_snapshot_timeout_s(self.config):g} s"
            self._down(src, metrics_error)
        else:
            self._up(src)
            self._note_missing(snapshot)

        # 2. the stored plan, read even without a snapshot (so the Redis gauge stays true): the
        # planner's previous one (this controller's last one when the store cannot say, or lost
        # its data: hysteresis carries on across a Redis restart)
        store_ok = True
        stored: PlanSet | None = None
        try:
            stored = await asyncio.wait_for(self.store.current(), c.redis_timeout_s * 2)
        except (DependencyError, OSError, TimeoutError) as e:
            store_ok = False
            self._down("redis", str(e) or f"no answer within {c.redis_timeout_s * 2:g} s")
        except PlanError as e:
            log.error("the stored plan set is unreadable (%s); planning from this controller's last one", e)
        else:
            self._up("redis")
            if stored is not None:
                self._last_plan = stored
                self.metrics.plan_version.set(stored.version)
        previous = stored if stored is not None else self._last_plan
        if snapshot is None:
            known = previous.version if previous is not None else None
            return self._report(
                started, t0, "no-metrics", f"{src} unavailable: {metrics_error}; keeping the last plan", version=known
            )

        # 3. the plan
        try:
            plan, inputs = plan_from_snapshot(
                self.config, snapshot, self.catalogs, self.devices, previous,
                now_unix_ms=started, memory=self.memory,
            )  # fmt: skip
        except SplitsenseError as e:
            log.error("cannot plan from this snapshot: %s; keeping the last plan", e)
            self.metrics.pass_failures.labels("planner").inc()
            return self._report(started, t0, "error", f"planner: {e}", snapshot=snapshot)
        self.metrics.replans.inc()
        self.memory = inputs.memory
        for d in inputs.classes:
            self.metrics.local_only.labels(d.device_class).set(1 if d.local_only_reason else 0)
            self.metrics.battery_saving.labels(d.device_class).set(1 if d.battery_saving_reason else 0)
        self.metrics.set_infeasible_rows(plan)
        changed = plan_differences(previous, plan)
        known = previous.version if previous is not None else None
        if not store_ok:
            what = f"{changed} rows would change" if changed else "no row changed"
            return self._report(
                started, t0, "store-down",
                f"{what}, but Redis is down; brokers and devices keep v{known if known is not None else '?'}",
                version=known, changed_rows=changed, plan_set=plan, snapshot=snapshot, inputs=inputs,
            )  # fmt: skip
        if stored is not None and changed == 0:
            return self._report(
                started, t0, "unchanged", f"no row changed since v{stored.version}",
                version=known, plan_set=plan, snapshot=snapshot, inputs=inputs,
            )  # fmt: skip

        # 4. publish
        why = self._why(stored, previous, inputs)
        plan = dataclasses.replace(
            plan,
            version=max(plan.version, self._last_version + 1, STATIC_PLAN_VERSION + 1),
            reason=f"{why}; {plan.reason}",
        )
        try:
            stored = await self.publish(plan)
        except PlanError as e:
            return self._report(
                started, t0, "refused", f"plan refused: {e}",
                version=known, changed_rows=changed, plan_set=plan, snapshot=snapshot, inputs=inputs,
            )  # fmt: skip
        except (DependencyError, OSError, TimeoutError) as e:
            self._down("redis", str(e) or "no answer")
            return self._report(
                started, t0, "store-down", f"{changed} rows changed but the plan could not be stored: {e}",
                version=known, changed_rows=changed, plan_set=plan, snapshot=snapshot, inputs=inputs,
            )  # fmt: skip
        self._last_digest = inputs.digest()
        return self._report(
            started, t0, "published", stored.reason,
            version=stored.version, changed_rows=changed, plan_set=stored, snapshot=snapshot, inputs=inputs,
        )  # fmt: skip

    async def publish(self, plan_set: PlanSet) -> PlanSet:
        """Validate and store `plan_set`; returns it under the version the store gave it.

        PlanError (logged, nothing stored) when it names an unknown model, cut, codec or
        compression level; DependencyError when Redis is down.
        """
        try:
            self.validate(plan_set)
        except PlanError as e:
            log.error("refused to store plan set v%d: %s", plan_set.version, e)
            self.metrics.pass_failures.labels("validation").inc()
            raise
        try:
            version = await asyncio.wait_for(
                self.store.put(plan_set, self.validate), self.config.controller.redis_timeout_s * 2
            )
        except PlanError as e:
            log.error("the plan store refused plan set v%d: %s", plan_set.version, e)
            self.metrics.pass_failures.labels("validation").inc()
            raise
        except TimeoutError:
            raise DependencyError(
                f"the plan store did not answer within {self.config.controller.redis_timeout_s * 2:g} s"
            ) from None
        self._up("redis")
        stored = plan_set if version == plan_set.version else dataclasses.replace(plan_set, version=version)
        self._last_version = max(self._last_version, version)
        self._last_plan = stored
        self.published_versions.append(version)
        self.metrics.published.inc()
        self.metrics.plan_version.set(version)
        self.metrics.last_publish.set(self._clock())
        log.info("published plan set v%d: %s", version, stored.reason)
        return stored

    def _why(self, stored: PlanSet | None, previous: PlanSet | None, inputs: SnapshotInputs) -> str:
        if stored is None or previous is None:
            mine = f" (this controller's last was v{previous.version})" if previous is not None else ""
            return f"the store held no plan set{mine}"
        last = self._last_digest
        moved = [f"{k} {last.get(k, '-')} -> {v}" for k, v in inputs.digest().items() if last and last.get(k) != v]
        return "inputs changed: " + ", ".join(moved) if moved else f"rows differ from the stored v{previous.version}"

    # --- dependencies ---------------------------------------------------------------------------

    def _down(self, name: str, message: str) -> None:
        dep = self._deps.setdefault(name, _Dependency(name))
        dep.failures += 1
        dep.last_error = message
        self.metrics.dependency_up.labels(name).set(0)
        self.metrics.pass_failures.labels(name).inc()
        if dep.up is not False:
            dep.down_since = time.monotonic()
            log.warning("controller: %s is down, keeping the last plan: %s", name, message)
        elif dep.failures % _LOG_EVERY_N_FAILURES == 0:
            down_s = time.monotonic() - (dep.down_since or time.monotonic())
            log.warning("controller: %s still down after %.0f s (%d passes): %s", name, down_s, dep.failures, message)
        dep.up = False

    def _up(self, name: str) -> None:
        dep = self._deps.setdefault(name, _Dependency(name))
        if dep.up is False:
            down_s = time.monotonic() - (dep.down_since or time.monotonic())
            log.info("controller: %s is back after %.1f s", name, down_s)
        dep.up, dep.failures, dep.down_since, dep.last_error = True, 0, None, ""
        self.metrics.dependency_up.labels(name).set(1)

    def _note_missing(self, snapshot: FleetSnapshot) -> None:
        self.metrics.missing.set(len(snapshot.missing))
        if snapshot.missing != self._last_missing:
            if snapshot.missing:
                log.info(
                    "the fleet snapshot lacks %d item(s), planned from priors instead: %s",
                    len(snapshot.missing),
                    "; ".join(snapshot.missing),
                )
            else:
                log.info("the fleet snapshot is complete again")
            self._last_missing = snapshot.missing

    def dependencies(self) -> dict[str, dict[str, Any]]:
        """{name: {"up": bool | None, "failures": consecutive, "error": last message}}."""
        return {d.name: {"up": d.up, "failures": d.failures, "error": d.last_error} for d in self._deps.values()}

    # --- the loop -------------------------------------------------------------------------------

    async def run_forever(self, stop: asyncio.Event, on_pass: Callable[[PassReport], None] | None = None) -> None:
        """A pass every `controller.period_s` (fixed rate; a slow pass delays only the next one)
        until `stop` is set. Never raises but for cancellation."""
        period = self.config.controller.period_s
        log.info("controller: replanning every %g s from %s into the plan store", period, self.metrics_dependency)
        next_at = time.monotonic()
        while not stop.is_set():
            await self.run_once()
            if on_pass is not None and self.last is not None:
                try:
                    on_pass(self.last)
                except Exception:
                    log.exception("controller on_pass callback failed")
            next_at = max(next_at + period, time.monotonic())
            try:
                await asyncio.wait_for(stop.wait(), timeout=max(next_at - time.monotonic(), 0.0))
            except TimeoutError:
                pass
        log.info("controller stopped after %d passes (%d published)", self.passes, self.outcomes["published"])

    def summary(self) -> dict[str, Any]:
        """Counts since start: what `controller run` prints on exit."""
        return {
            "passes": self.passes,
            "outcomes": dict(self.outcomes),
            "published_versions": list(self.published_versions),
            "last_version": self._last_plan.version if self._last_plan is not None else None,
            "dependencies": self.dependencies(),
        }


def _snapshot_timeout_s(config: Config) -> float:
    # The source bounds each request itself; this bounds the whole snapshot (a few dozen queries).
    return max(config.controller.prometheus_timeout_s * 2, config.controller.period_s)


def _source_name(source: Any) -> str:
    kind = type(source).__name__
    return {
        "PrometheusSource": "prometheus",
        "DirectExporterSource": "exporters",
        "FileSource": "snapshot_file",
    }.get(kind, str(getattr(source, "dependency", "metrics")))
