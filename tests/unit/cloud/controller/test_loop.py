"""The controller loop with an in-memory metrics source and plan store (no sockets, no Redis).

The fakes implement the two seams the loop talks through, `MetricsSource.snapshot()` and the plan
store's `current()`/`put(plan_set, validate)` (with the real store's version rule). The fleet is one
synthetic model on one synthetic board whose rows differ sharply between objectives: locally it
computes for 60 ms at 2.9 W (174 mJ); offloading its input costs a WiFi promotion (~80 ms) but
~50 mJ. So a full-battery row (least latency) is local and a low-battery row (least energy)
offloads, at any RTT used here.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math

import pytest
from prometheus_client import CollectorRegistry

from cloud.controller.inputs import (
    PRIOR_RTT_MS,
    Memory,
    inputs_from_snapshot,
    plan_differences,
    plan_from_snapshot,
)
from cloud.controller.loop import Controller, PassReport
from cloud.controller.metrics_source import (
    ClassSnapshot,
    CutSnapshot,
    DeviceModelSnapshot,
    FleetSnapshot,
    StageLatency,
)
from pipelines.catalog import CodecEntry, LevelEntry, ModelCatalog
from pipelines.codecs import Codec
from pipelines.devices import DeviceClass
from pipelines.power import Radio
from splitsense.config import ClassObjectiveConfig, Config, ControllerConfig, PlannerConfig
from splitsense.errors import ConfigError, DependencyError, PlanError
from splitsense.plan import BatteryState, Objective, Plan, PlanSet

MODEL, CLASS = "toy", "board"
N = 3
WINDOW_S = 10.0  # query window: holds are counted in these


def toy_catalog() -> ModelCatalog:
    stage_ms = (2.0, 2.0, 2.0)
    cum = (0.0, 2.0, 4.0, 6.0)
    return ModelCatalog(
        model=MODEL,
        stage_names=("a", "b", "c"),
        stage_latency_ms=stage_ms,
        stage_macs=(1, 1, 1),
        stage_params=(10, 10, 10),
        activation_shapes=((1000,), (1000,), (100,), (10,)),
        result_bytes=40,
        window_s=1.0,
        base_accuracy=0.9,
        levels=(LevelEntry(1.0, cum, (0, 10, 20, 30), (0.9,) * (N + 1)),),
        codecs=(
            CodecEntry(Codec.FP32, (4000, 4000, 400, 0), (0.9,) * (N + 1)),
            CodecEntry(Codec.INT8, (1000, 1000, 100, 0), (0.9,) * (N + 1)),
        ),
    )


BOARD = DeviceClass(
    name=CLASS, speed_factor=10.0, active_mw=2900.0, idle_mw=600.0, radio=Radio.WIFI, battery_mwh=3700.0, source="t"
)


def config(**controller: object) -> Config:
    ctl = ControllerConfig(period_s=0.01, query_window_s=WINDOW_S, local_only_min_windows=10)
    return Config(
        planner=PlannerConfig(classes={CLASS: ClassObjectiveConfig("latency", deadline_ms=300.0)}),
        controller=dataclasses.replace(ctl, **controller),  # type: ignore[arg-type]
    )


def snap(**cls: object) -> FleetSnapshot:
    """A snapshot of the board class (fields of ClassSnapshot), with one measured cut."""
    cuts = (CutSnapshot(MODEL, 0, compute_ms=7.0, queue_ms=1.0, requests_per_s=5.0),)
    return FleetSnapshot(0, "fake", WINDOW_S, classes=(ClassSnapshot(CLASS, **cls),), cuts=cuts)  # type: ignore[arg-type]


class FakeSource:
    """MetricsSource: returns `.snapshot_value`, or raises `.error`."""

    def __init__(self, value: FleetSnapshot | None = None) -> None:
        self.snapshot_value = value or snap(rtt_p50_ms=5.0)
        self.error: BaseException | None = None
        self.calls = 0

    async def snapshot(self) -> FleetSnapshot:
        self.calls += 1
        if self.error is not None:
            raise self.error
        return self.snapshot_value


class FakeStore:
    """The plan store's contract in memory: validate first, version max(current + 1, given)."""

    def __init__(self) -> None:
        self.sets: list[PlanSet] = []
        self.down = False
        self.puts = 0

    def _check(self) -> None:
        if self.down:
            raise DependencyError("Redis at redis://fake cannot be reached (test)")

    async def current(self) -> PlanSet | None:
        self._check()
        return self.sets[-1] if self.sets else None

    async def put(self, plan_set: PlanSet, validate: object) -> int:
        self._check()
        validate(plan_set)  # type: ignore[operator]
        version = max(self.sets[-1].version + 1 if self.sets else 1, plan_set.version)
        self.sets.append(dataclasses.replace(plan_set, version=version))
        self.puts += 1
        return version

    def lose_everything(self) -> None:
        self.sets.clear()


class Clock:
    def __init__(self, t: float = 1_700_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def make(
    source: FakeSource | None = None, store: FakeStore | None = None, clock: Clock | None = None, **controller: object
) -> tuple[Controller, FakeSource, FakeStore, CollectorRegistry]:
    source, store, registry = source or FakeSource(), store or FakeStore(), CollectorRegistry()
    ctl = Controller(
        config(**controller), source, store, {MODEL: toy_catalog()}, {CLASS: BOARD}, registry, clock=clock or Clock()
    )
    return ctl, source, store, registry


def plan_of(ps: PlanSet) -> Plan:
    plan = ps.get(MODEL, CLASS)
    assert plan is not None
    return plan


def row(ps: PlanSet, battery: float, bw: float = 10.0) -> tuple[int, Codec]:
    r = plan_of(ps).lookup(bw, battery, 0.2)
    return r.cut, r.codec


def up(registry: CollectorRegistry, dependency: str) -> float | None:
    return registry.get_sample_value("splitsense_controller_dependency_up", {"dependency": dependency})


def last(ctl: Controller) -> PassReport:
    assert ctl.last is not None
    return ctl.last


# --- publishing only on change ------------------------------------------------------------------


async def test_first_pass_publishes_above_the_static_version_and_says_why() -> None:
    ctl, _, store, registry = make()
    published = await ctl.run_once()
    assert published is not None and published.version == 2  # 1 is the brokers' static plan set
    assert store.sets[-1] == published and last(ctl).outcome == "published"
    assert published.reason.startswith("the store held no plan set; 1 plans, 20 rows")
    assert row(published, 1.0) == (N, Codec.FP32)  # full battery: least latency, local
    assert row(published, 0.1) == (0, Codec.INT8)  # low battery: least energy, offload the input
    assert registry.get_sample_value("splitsense_controller_plan_version") == 2
    assert registry.get_sample_value("splitsense_controller_plans_published_total") == 1
    assert registry.get_sample_value("splitsense_controller_last_success_timestamp_seconds") == Clock().t


async def test_replans_only_when_a_row_changes() -> None:
    ctl, source, store, registry = make()
    await ctl.run_once()
    for _ in range(3):  # same fleet, or moved by noise the hysteresis absorbs
        source.snapshot_value = snap(rtt_p50_ms=5.0 + _ * 0.2)
        assert await ctl.run_once() is None
        assert last(ctl).outcome == "unchanged" and last(ctl).version == 2
    assert store.puts == 1
    assert registry.get_sample_value("splitsense_controller_replans_total") == 4
    assert registry.get_sample_value("splitsense_controller_plans_published_total") == 1


async def test_a_quarter_of_the_class_on_low_battery_switches_its_normal_rows_to_energy() -> None:
    ctl, source, store, registry = make()
    first = await ctl.run_once()
    assert first is not None and plan_of(first).objective is Objective.LATENCY
    source.snapshot_value = snap(rtt_p50_ms=5.0, battery_p25=0.12)
    saving = await ctl.run_once()
    assert saving is not None and saving.version == 3
    assert plan_of(saving).objective is Objective.ENERGY
    assert row(saving, 1.0) == (0, Codec.INT8)  # a full battery now saves energy too
    assert "inputs changed: board battery saving off -> on" in saving.reason
    assert "board saves energy: a quarter of its battery reports are low (p25 12% < 20%)" in saving.reason
    assert registry.get_sample_value("splitsense_controller_class_battery_saving", {"device_class": CLASS}) == 1
    source.snapshot_value = snap(rtt_p50_ms=5.0, battery_p25=0.35)
    back = await ctl.run_once()
    assert back is not None and plan_of(back).objective is Objective.LATENCY and row(back, 1.0) == (N, Codec.FP32)


async def test_rows_whose_budget_no_choice_meets_are_counted_per_class_model_and_budget() -> None:
    # 1 mW x the 1-s window = 1 mJ: local (174 mJ) and offloading (~50 mJ) both exceed it
    tight = ClassObjectiveConfig("latency", energy_budget_mw=1.0, deadline_ms=300.0)
    cfg = dataclasses.replace(config(), planner=PlannerConfig(classes={CLASS: tight}))
    source, store, registry = FakeSource(), FakeStore(), CollectorRegistry()
    ctl = Controller(cfg, source, store, {MODEL: toy_catalog()}, {CLASS: BOARD}, registry, clock=Clock())
    published = await ctl.run_once()
    assert published is not None
    normal = plan_of(published).rows_for(BatteryState.NORMAL)
    assert all(r.reason.startswith("infeasible: energy budget 1.0 mJ met by no choice; ") for r in normal)

    def gauge(budget: str) -> float | None:
        labels = {"device_class": CLASS, "model": MODEL, "budget": budget}
        return registry.get_sample_value("splitsense_controller_infeasible_rows", labels)

    assert gauge("energy") == len(normal)  # every NORMAL row
    assert gauge("deadline") == 0  # the LOW rows meet their 300-ms deadline
    # a budget every row can meet: the gauge follows the next plan
    ctl.config = config()
    await ctl.run_once()
    assert gauge("energy") == 0 and gauge("deadline") == 0


# --- failures --------------------------------------------------------------------------------


async def test_a_failure_rate_above_the_threshold_makes_the_class_local_only() -> None:
    ctl, source, _, registry = make()
    await ctl.run_once()
    source.snapshot_value = snap(rtt_p50_ms=5.0, offload_windows=40, failure_rate=0.7, fallback_rate=0.6)
    local = await ctl.run_once()
    assert local is not None
    assert all(r.cut == N for r in plan_of(local).rows)
    assert all(
        r.reason.startswith("local only (cloud failure rate 70% > 50% over 40 offload windows)")
        for r in plan_of(local).rows
    )
    assert "board local only off -> on" in local.reason
    assert registry.get_sample_value("splitsense_controller_class_local_only", {"device_class": CLASS}) == 1


@pytest.mark.parametrize(
    "fields",
    [
        {"offload_windows": 9, "failure_rate": 1.0},  # too few windows to say
        {"offload_windows": 40, "failure_rate": 0.5, "fallback_rate": 0.3},  # not above the threshold
        {"offload_windows": None, "failure_rate": None},  # nobody offloaded
    ],
)
async def test_weak_failure_evidence_keeps_the_cloud(fields: dict[str, object]) -> None:
    ctl, source, _, _ = make()
    source.snapshot_value = snap(rtt_p50_ms=5.0, **fields)
    published = await ctl.run_once()
    assert published is not None and row(published, 0.1) == (0, Codec.INT8)


async def test_local_only_is_held_then_probed_with_growing_holds_and_forgotten_when_healthy() -> None:
    clock = Clock()
    ctl, source, _, _ = make(clock=clock)
    failing = snap(rtt_p50_ms=5.0, offload_windows=40, failure_rate=0.9)
    quiet = snap(rtt_p50_ms=5.0)  # local: no offloads, no evidence either way
    source.snapshot_value = failing
    assert (ps := await ctl.run_once()) is not None and row(ps, 0.1)[0] == N
    source.snapshot_value = quiet
    clock.t += WINDOW_S * 0.9  # the hold (one window) is not over: still local
    assert await ctl.run_once() is None and last(ctl).outcome == "unchanged"
    assert "held 1 s more" in plan_of(last(ctl).plan_set).rows[-1].reason  # type: ignore[arg-type]
    clock.t += WINDOW_S * 0.2  # over: the cloud is offered again (the probe)
    assert (ps := await ctl.run_once()) is not None and row(ps, 0.1) == (0, Codec.INT8)
    source.snapshot_value = failing  # the probe fails: a second hold, twice as long
    clock.t += 1
    assert (ps := await ctl.run_once()) is not None and row(ps, 0.1)[0] == N
    assert ctl.memory.holds[CLASS].strikes == 2
    source.snapshot_value = quiet
    clock.t += WINDOW_S * 1.5
    assert await ctl.run_once() is None  # still held
    clock.t += WINDOW_S * 0.6
    assert (ps := await ctl.run_once()) is not None and row(ps, 0.1) == (0, Codec.INT8)
    source.snapshot_value = snap(rtt_p50_ms=5.0, offload_windows=40, failure_rate=0.05)  # healthy again
    await ctl.run_once()
    assert CLASS not in ctl.memory.holds


# --- telemetry, memory, priors ---------------------------------------------------------------------


def _with_telemetry(samples: int) -> FleetSnapshot:
    stages = tuple(StageLatency(i, 0.5, samples) for i in range(N))
    dm = DeviceModelSnapshot(MODEL, CLASS, stages=stages)
    return dataclasses.replace(snap(rtt_p50_ms=5.0), device_models=(dm,))


@pytest.mark.parametrize(("samples", "source"), [(30, "device telemetry 3/3 stages"), (29, "device profile x10")])
def test_device_telemetry_replaces_the_profile_once_it_has_enough_samples(samples: int, source: str) -> None:
    ps, inputs = plan_from_snapshot(config(), _with_telemetry(samples), {MODEL: toy_catalog()}, {CLASS: BOARD})
    assert inputs.classes[0].telemetry_models == (MODEL,)
    assert all(source in r.reason for r in plan_of(ps).rows if r.cut > 0)
    if samples >= 30:  # the board reports 1.5 ms for the model, not the profile's 60 ms
        assert row(ps, 1.0) == (N, Codec.FP32) and plan_of(ps).rows[-1].predicted_latency_ms == pytest.approx(1.5)


def test_rtt_and_cloud_come_from_the_snapshot_then_memory_then_priors() -> None:
    cfg, cats, devs = config(), {MODEL: toy_catalog()}, {CLASS: BOARD}
    measured = inputs_from_snapshot(cfg, snap(rtt_p50_ms=12.0), cats, devs, now_unix_ms=1_000)
    d, cloud = measured.classes[0], measured.cloud
    assert (d.rtt_ms, d.rtt_source) == (12.0, "p50 of device estimates")
    assert cloud.queue_ms == 1.0 and cloud.overhead_ms == pytest.approx(7.0 - 6.0)  # tail call - host tail
    empty = FleetSnapshot(0, "fake", WINDOW_S)
    later = inputs_from_snapshot(cfg, empty, cats, devs, now_unix_ms=31_000, memory=measured.memory)
    assert (later.classes[0].rtt_ms, later.classes[0].rtt_source) == (12.0, "last measured 30 s ago")
    assert later.cloud.overhead_ms == pytest.approx(1.0) and later.cloud.source == "last measured 30 s ago"
    too_old = 1_000 + int(WINDOW_S * 10 * 1000) + 1
    stale = inputs_from_snapshot(cfg, empty, cats, devs, now_unix_ms=too_old, memory=later.memory)
    assert (stale.classes[0].rtt_ms, stale.classes[0].rtt_source) == (PRIOR_RTT_MS, "prior (no reports)")
    assert stale.cloud.source == "prior (no answered requests)" and stale.memory == Memory()


def test_a_class_without_an_objective_is_refused_when_the_controller_is_built() -> None:
    with pytest.raises(ConfigError, match="device class 'board' has no planner objective"):
        Controller(Config(), FakeSource(), FakeStore(), {MODEL: toy_catalog()}, {CLASS: BOARD}, CollectorRegistry())


def test_an_objective_change_alone_counts_as_a_difference() -> None:
    ps, _ = plan_from_snapshot(config(), snap(rtt_p50_ms=5.0), {MODEL: toy_catalog()}, {CLASS: BOARD})
    switched = dataclasses.replace(ps, plans=(dataclasses.replace(plan_of(ps), objective=Objective.ENERGY),))
    assert plan_differences(ps, ps) == 0 and plan_differences(ps, switched) == 1
    assert plan_differences(None, ps) == len(plan_of(ps).rows)


# --- dependencies down -------------------------------------------------------------------------


async def test_redis_down_keeps_going_and_catches_up_above_the_last_version(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="cloud.controller")
    ctl, source, store, registry = make()
    await ctl.run_once()
    store.down = True
    source.snapshot_value = snap(rtt_p50_ms=5.0, battery_p25=0.1)  # a change that cannot be stored
    for _ in range(3):
        assert await ctl.run_once() is None
        assert last(ctl).outcome == "store-down" and last(ctl).changed_rows > 0
    assert up(registry, "redis") == 0 and up(registry, "metrics") == 1
    assert registry.get_sample_value("splitsense_controller_pass_failures_total", {"dependency": "redis"}) == 3
    assert sum("redis is down" in r.getMessage() for r in caplog.records) == 1  # once, not every period
    store.down = False
    store.lose_everything()  # a Redis restarted without persistence
    published = await ctl.run_once()
    assert published is not None and published.version == 3  # never back to an old number
    assert published.reason.startswith("the store held no plan set (this controller's last was v2)")
    assert up(registry, "redis") == 1 and any("redis is back" in r.getMessage() for r in caplog.records)


async def test_metrics_down_keeps_the_last_plan_and_still_probes_redis() -> None:
    ctl, source, store, registry = make()
    await ctl.run_once()
    source.error = DependencyError("Prometheus at http://fake:9090 cannot be reached (test)")
    assert await ctl.run_once() is None
    report = last(ctl)
    assert report.outcome == "no-metrics" and report.version == 2 and "http://fake:9090" in report.reason
    assert up(registry, "metrics") == 0 and up(registry, "redis") == 1
    store.down = True
    await ctl.run_once()
    assert up(registry, "redis") == 0 and store.puts == 1
    assert ctl.summary()["dependencies"]["metrics"]["up"] is False


async def test_run_forever_survives_a_broken_source_and_stops_when_asked() -> None:
    ctl, source, store, registry = make()
    source.error = RuntimeError("a bug in a source")
    stop = asyncio.Event()
    seen: list[PassReport] = []

    def on_pass(r: PassReport) -> None:
        seen.append(r)
        if len(seen) == 3:
            source.error = None  # the bug is fixed
        if len(seen) == 5:
            stop.set()

    await asyncio.wait_for(ctl.run_forever(stop, on_pass), 5)
    assert [r.outcome for r in seen] == ["error", "error", "error", "published", "unchanged"]
    assert registry.get_sample_value("splitsense_controller_pass_failures_total", {"dependency": "controller"}) == 3
    assert ctl.summary()["outcomes"]["published"] == 1 and store.puts == 1


async def test_a_plan_naming_an_unknown_model_cut_or_level_is_refused_and_not_stored() -> None:
    ctl, _, store, registry = make()
    good = await ctl.run_once()
    assert good is not None
    plan = plan_of(good)
    bad_rows = (*plan.rows[:-1], dataclasses.replace(plan.rows[-1], cut=N + 1))
    for bad, message in (
        (Plan("resnet", CLASS, plan.rows, plan.objective), "unknown model 'resnet'"),
        (Plan(MODEL, CLASS, bad_rows, plan.objective), f"cut {N + 1} is out of range"),
        (
            Plan(
                MODEL,
                CLASS,
                (*plan.rows[:-1], dataclasses.replace(plan.rows[-1], cut=1, compression_energy_kept=0.5)),
                plan.objective,
            ),
            "compression level 0.5",
        ),
        (
            Plan(
                MODEL,
                CLASS,
                (*plan.rows[:-1], dataclasses.replace(plan.rows[-1], cut=1, codec=Codec.FP16)),
                plan.objective,
            ),
            "codec 'fp16' is not allowed",
        ),
    ):
        with pytest.raises(PlanError, match=message):
            await ctl.publish(dataclasses.replace(good, version=good.version + 1, plans=(bad,)))
    assert store.sets == [good]
    assert registry.get_sample_value("splitsense_controller_pass_failures_total", {"dependency": "validation"}) == 4
    assert not math.isnan(registry.get_sample_value("splitsense_controller_plan_version") or math.nan)
