"""Plans name only the fronts a class's devices hold (issue 11, item 3): the planner's restriction
(exact against brute force), the reason it gives, hysteresis, and the controller's inputs from a
snapshot (the fronts every reporting device holds; remembered while reports pause)."""

from __future__ import annotations

import dataclasses
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cloud.controller.costmodel import (
    CloudState,
    DeviceCostProfile,
    LinkState,
    choices_of,
    estimate_grid,
    front_held,
)
from cloud.controller.inputs import Memory, inputs_from_snapshot
from cloud.controller.metrics_source import DeviceModelSnapshot, FleetSnapshot, front_key
from cloud.controller.planner import (
    ClassInputs,
    PlannerInputs,
    exhaustive_best,
    plan_fleet,
    row_constraints,
)
from pipelines.catalog import ModelCatalog
from pipelines.devices import DeviceClass
from pipelines.power import Radio
from splitsense.config import ClassObjectiveConfig, Config, PlannerConfig
from splitsense.plan import BatteryState, Objective, Plan, PlanRow
from tests.unit.cloud.controller.synthetic import catalogs, clouds, devices, make_catalog

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DEVICE = DeviceCostProfile("phone", 1.0, 2000.0, 100.0, Radio.WIFI)


def inputs(
    cat: ModelCatalog,
    device: DeviceCostProfile = DEVICE,
    held: frozenset[tuple[int, float]] | None = None,
    *,
    objective: Objective = Objective.LATENCY,
    deadline_ms: float | None = None,
    cloud: CloudState | None = None,
    edges: tuple[float, ...] = (1.0, 10.0),
    cloud_available: bool = True,
) -> PlannerInputs:
    cls = ClassInputs(
        device=device,
        objective=objective,
        rtt_ms=20.0,
        deadline_ms=deadline_ms,
        accuracy_budget_points=100.0,
        cloud_available=cloud_available,
        held_fronts={} if held is None else {cat.model: held},
    )
    return PlannerInputs((cls,), (cat,), cloud or CloudState(), bandwidth_edges_mbps=edges, now_unix_ms=1)


def the_row(plan: Plan, battery: BatteryState, mbps: float) -> PlanRow:
    return next(r for r in plan.rows_for(battery) if r.contains(mbps))


def fast_compressed_catalog() -> ModelCatalog:
    """Level 0.5 is 10x faster at no accuracy cost: every row's optimum past cut 0 is compressed."""
    return make_catalog(
        [20.0, 20.0, 20.0],
        [400_000, 40_000, 40_000],
        level_factors={0.5: [0.1, 0.1, 0.1]},
        level_drops={0.5: [0.0] * 4},
        window_s=1.0,
    )


@SETTINGS
@given(
    cat=catalogs(),
    device=devices,
    cloud=clouds,
    objective=st.sampled_from(list(Objective)),
    deadline=st.one_of(st.none(), st.floats(1.0, 2000.0)),
    cloud_available=st.booleans(),
    data=st.data(),
)
def test_rows_name_only_held_fronts_and_are_the_restricted_optimum(
    cat: ModelCatalog,
    device: DeviceCostProfile,
    cloud: CloudState,
    objective: Objective,
    deadline: float | None,
    cloud_available: bool,
    data: st.DataObject,
) -> None:
    fronts = sorted({(c.cut, c.level) for c in choices_of(cat) if c.cut > 0})
    held = frozenset(data.draw(st.lists(st.sampled_from(fronts), unique=True)) if fronts else [])
    inp = inputs(
        cat, device, held, objective=objective, deadline_ms=deadline, cloud=cloud, cloud_available=cloud_available
    )
    (plan,) = plan_fleet(inp).plans
    cls = inp.classes[0]
    for row in plan.rows:
        if "NO choice is held by every dev device" in row.reason:
            continue  # nothing held has a finite cost: planned as if every front were held
        assert row.cut == 0 or (row.cut, row.compression_energy_kept) in held, row.reason
        cons = row_constraints(cls, cat, row.battery)
        link = LinkState(row.min_bandwidth_mbps, cls.rtt_ms)
        best, best_est, _ = exhaustive_best(
            cat, device, link, cloud, cons, local_only=not cloud_available, held_fronts=held
        )
        assert front_held(held, best.cut, best.level)
        metric = "total_ms" if cons.objective is Objective.LATENCY else "energy_mj"
        want = getattr(best_est, metric)
        got = row.predicted_latency_ms if metric == "total_ms" else row.predicted_energy_mj
        if math.isfinite(want):
            assert got == pytest.approx(want, rel=1e-9, abs=1e-9)


def test_unknown_fronts_restrict_nothing() -> None:
    cat = fast_compressed_catalog()
    free = plan_fleet(inputs(cat))
    assert plan_fleet(inputs(cat, held=None)).plans == free.plans
    everything = frozenset((c.cut, c.level) for c in choices_of(cat))
    assert [r.cut for r in plan_fleet(inputs(cat, held=everything)).plans[0].rows] == [
        r.cut for r in free.plans[0].rows
    ]
    grid = estimate_grid(cat, DEVICE, [LinkState(10.0, 20.0)], CloudState())
    assert grid.held is None and grid.held_mask.all() and not grid.missing


def test_a_front_no_device_holds_is_avoided_and_the_reason_says_so() -> None:
    cat = fast_compressed_catalog()
    (free,) = plan_fleet(inputs(cat)).plans
    assert any(r.compression_energy_kept == 0.5 for r in free.rows)  # the optimum compresses
    held = frozenset((k, 1.0) for k in range(1, 4))  # an export of level 1.0 only
    plan_set = plan_fleet(inputs(cat, held=held))
    (plan,) = plan_set.plans
    avoided = 0
    for row, was in zip(plan.rows, free.rows, strict=True):
        assert row.compression_energy_kept == 1.0
        if was.compression_energy_kept == 0.5:
            avoided += 1
            where = "the whole model" if was.cut == 3 else f"the front of cut {was.cut}"
            assert f"level 0.5 avoided: {where} at level 0.5 is not held by every device of the class; " in row.reason
        else:
            assert "avoided" not in row.reason
    assert avoided and f"{avoided} rows avoided a front not every device of the class holds" in plan_set.reason
    # hysteresis never keeps a previous choice the class no longer holds
    again = plan_fleet(inputs(cat, held=held), previous=plan_fleet(inputs(cat)))
    assert all(r.compression_energy_kept == 1.0 for r in again.plans[0].rows)


def test_with_nothing_held_that_can_run_the_row_is_planned_as_if_and_says_so() -> None:
    cat = fast_compressed_catalog()
    held = frozenset({(1, 0.5)})  # no local front held, and the cloud is unreachable
    plan_set = plan_fleet(inputs(cat, held=held, cloud_available=False))
    for row in plan_set.plans[0].rows:
        assert row.reason.startswith("NO choice is held by every phone device, planned as if it were (")
        assert row.cut == 3
    assert "rows where NO choice is held by every device of the class" in plan_set.reason
    # cut 0 needs no front: with the cloud reachable a row can always upload the input
    (plan,) = plan_fleet(inputs(cat, held=frozenset())).plans
    row = the_row(plan, BatteryState.NORMAL, 10.0)
    assert row.cut == 0 and "NO choice" not in row.reason


# ---------------------------------------------------------------------------------------------
# From a snapshot


BOARD = DeviceClass(
    name="phone", speed_factor=1.0, active_mw=2000.0, idle_mw=100.0, radio=Radio.WIFI, battery_mwh=3000.0, source="test"
)


def snapshot(taken: int, dm: DeviceModelSnapshot | None) -> FleetSnapshot:
    return FleetSnapshot(taken_unix_ms=taken, source="test", window_s=60.0, device_models=() if dm is None else (dm,))


def test_snapshot_fronts_held_by_every_reporting_device_reach_the_planner() -> None:
    cat = dataclasses.replace(fast_compressed_catalog(), model="m")
    shares = {front_key(k, 1.0): 1.0 for k in range(1, 4)} | {front_key(k, 0.5): 0.5 for k in range(1, 4)}
    dm = DeviceModelSnapshot("m", "phone", front_reports=4.0, front_shares=shares)
    assert dm.held_fronts() == frozenset((k, 1.0) for k in range(1, 4))
    assert DeviceModelSnapshot("m", "phone").held_fronts() is None  # nobody said: unknown
    assert FleetSnapshot.from_dict(snapshot(1, dm).to_dict()) == snapshot(1, dm)
    config = Config(planner=PlannerConfig(classes={"phone": ClassObjectiveConfig("latency")}))
    got = inputs_from_snapshot(config, snapshot(1_000, dm), {"m": cat}, {"phone": BOARD}, now_unix_ms=1_000)
    (cls,) = got.planner.classes
    assert cls.held_fronts == {"m": frozenset((k, 1.0) for k in range(1, 4))}
    assert got.classes[0].held_fronts == ("m: 3 of 6 fronts held (4 reports)",)
    assert got.digest()["phone held fronts"] == "m: 3 of 6 fronts held"
    assert all(r.compression_energy_kept == 1.0 for r in plan_fleet(got.planner).plans[0].rows)
    # reports pause: the last known fronts stand in for a while, then the restriction lapses
    later = inputs_from_snapshot(
        config, snapshot(31_000, None), {"m": cat}, {"phone": BOARD}, now_unix_ms=31_000, memory=got.memory
    )
    assert later.planner.classes[0].held_fronts == cls.held_fronts
    assert later.classes[0].held_fronts == ("m: 3 of 6 fronts held (last reported 30 s ago)",)
    stale = 1_000 + int(config.controller.query_window_s * 10 * 1000) + 1
    gone = inputs_from_snapshot(
        config, snapshot(stale, None), {"m": cat}, {"phone": BOARD}, now_unix_ms=stale, memory=later.memory
    )
    assert gone.planner.classes[0].held_fronts == {} and gone.classes[0].held_fronts == ()
    assert (
        inputs_from_snapshot(config, None, {"m": cat}, {"phone": BOARD}, memory=Memory()).classes[0].held_fronts == ()
    )
