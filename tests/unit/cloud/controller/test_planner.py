"""Planner: exact optimum (vs brute force), baselines (Neurosurgeon, DADS), battery, fallbacks, hysteresis."""

from __future__ import annotations

import dataclasses
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cloud.controller.costmodel import (
    Choice,
    CloudState,
    CostEstimate,
    DeviceCostProfile,
    LinkState,
    TelemetryStats,
    choices_of,
    estimate,
)
from cloud.controller.planner import (
    INFEASIBLE_PREFIXES,
    ClassInputs,
    Constraints,
    PlannerInputs,
    bandwidth_buckets,
    chain_split_latency_ms,
    changed_rows,
    dads_min_cut,
    exhaustive_best,
    infeasible_rows,
    inputs_from_config,
    neurosurgeon_argmin,
    plan_fleet,
    row_constraints,
)
from pipelines.catalog import ModelCatalog
from pipelines.codecs import Codec
from pipelines.devices import front_fits
from pipelines.power import Radio, radio_model
from splitsense.config import PlannerConfig
from splitsense.errors import ConfigError
from splitsense.plan import BatteryState, Objective, Plan, PlanRow, PlanSet
from tests.unit.cloud.controller.synthetic import catalogs, clouds, devices, make_catalog

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


edge_lists = (
    st.lists(st.floats(0.01, 100.0), min_size=1, max_size=4, unique=True)
    .map(sorted)
    .filter(lambda e: all(b > a * 1.0001 for a, b in zip(e, e[1:], strict=False)))
)


def single(
    cat: ModelCatalog,
    device: DeviceCostProfile,
    *,
    objective: Objective = Objective.LATENCY,
    rtt_ms: float = 20.0,
    energy_budget_mw: float | None = None,
    deadline_ms: float | None = None,
    accuracy_budget_points: float = 100.0,
    edges: tuple[float, ...] = (1.0,),
    cloud: CloudState | None = None,
    margin: float = 0.1,
    cloud_available: bool = True,
    telemetry: TelemetryStats | None = None,
) -> PlannerInputs:
    cls = ClassInputs(
        device=device,
        objective=objective,
        rtt_ms=rtt_ms,
        energy_budget_mw=energy_budget_mw,
        deadline_ms=deadline_ms,
        accuracy_budget_points=accuracy_budget_points,
        cloud_available=cloud_available,
        cloud_unavailable_reason="cloud failure rate 40% > 20%",
        telemetry={} if telemetry is None else {cat.model: telemetry},
    )
    return PlannerInputs(
        classes=(cls,),
        catalogs=(cat,),
        cloud=cloud or CloudState(),
        bandwidth_edges_mbps=edges,
        hysteresis_margin=margin,
        now_unix_ms=1,
    )


def row_estimate(inputs: PlannerInputs, cat: ModelCatalog, row: PlanRow) -> CostEstimate:
    cls = inputs.classes[0]
    return estimate(
        cat,
        cls.device,
        LinkState(row.min_bandwidth_mbps, cls.rtt_ms),
        inputs.cloud,
        Choice(row.cut, row.compression_energy_kept, row.codec),
        cls.telemetry.get(cat.model),
        min_telemetry_samples=inputs.min_telemetry_samples,
    )


def the_row(plan: Plan, battery: BatteryState, bandwidth_mbps: float) -> PlanRow:
    return next(r for r in plan.rows_for(battery) if r.contains(bandwidth_mbps))


# ---------------------------------------------------------------------------------------------
# Exact optimum


@SETTINGS
@given(
    cat=catalogs(),
    device=devices,
    cloud=clouds,
    objective=st.sampled_from(list(Objective)),
    rtt=st.floats(0.0, 300.0),
    energy_mw=st.one_of(st.none(), st.floats(0.01, 3000.0)),
    deadline=st.one_of(st.none(), st.floats(1.0, 2000.0)),
    acc_budget=st.floats(0.0, 10.0),
    edges=edge_lists,
    cloud_available=st.booleans(),
    data=st.data(),
)
def test_every_row_is_the_exhaustive_optimum(
    cat: ModelCatalog,
    device: DeviceCostProfile,
    cloud: CloudState,
    objective: Objective,
    rtt: float,
    energy_mw: float | None,
    deadline: float | None,
    acc_budget: float,
    edges: list[float],
    cloud_available: bool,
    data: st.DataObject,
) -> None:
    n = cat.n_stages
    telemetry = None
    if data.draw(st.booleans()):
        telemetry = TelemetryStats(
            tuple(data.draw(st.lists(st.floats(0.0, 500.0), min_size=n, max_size=n))),
            tuple(data.draw(st.lists(st.integers(0, 60), min_size=n, max_size=n))),
        )
    inputs = single(
        cat,
        device,
        objective=objective,
        rtt_ms=rtt,
        energy_budget_mw=energy_mw,
        deadline_ms=deadline,
        accuracy_budget_points=acc_budget,
        edges=tuple(edges),
        cloud=cloud,
        cloud_available=cloud_available,
        telemetry=telemetry,
    )
    plan_set = plan_fleet(inputs)  # no previous: hysteresis off
    (plan,) = plan_set.plans
    assert len(plan.rows) == 2 * (len(edges) + 1)
    cls = inputs.classes[0]
    for row in plan.rows:
        cons = row_constraints(cls, cat, row.battery)
        link = LinkState(row.min_bandwidth_mbps, rtt)
        best, best_est, feasible = exhaustive_best(
            cat, device, link, cloud, cons, telemetry, local_only=not cloud_available
        )
        ours = row_estimate(inputs, cat, row)
        assert row.predicted_latency_ms == pytest.approx(ours.total_ms, rel=1e-9)
        assert row.predicted_energy_mj == pytest.approx(ours.energy_mj, rel=1e-9)
        assert ours.breakdown["accuracy_loss_points"] <= acc_budget + 1e-9
        if not cloud_available:
            assert row.cut == n
        latency_first = cons.objective is Objective.LATENCY
        if feasible:
            assert "infeasible" not in row.reason
            primary = ours.total_ms if latency_first else ours.energy_mj
            want = best_est.total_ms if latency_first else best_est.energy_mj
            assert primary == pytest.approx(want, rel=1e-9, abs=1e-9), (row, best)
            if latency_first:
                assert ours.energy_mj <= cons.energy_budget_mj * (1 + 1e-6)
            else:
                assert ours.total_ms <= cons.deadline_ms * (1 + 1e-6)
        else:
            budget = "energy" if latency_first else "deadline"
            assert row.reason.startswith(INFEASIBLE_PREFIXES[budget])
            violated = ours.energy_mj if latency_first else ours.total_ms
            want = best_est.energy_mj if latency_first else best_est.total_ms
            assert violated == pytest.approx(want, rel=1e-9, abs=1e-9)
        # one line naming the bandwidth, the RTT and the choice
        assert "\n" not in row.reason
        assert f"at {row.min_bandwidth_mbps:g} Mbit/s" in row.reason and f"rtt {rtt:g} ms" in row.reason
        assert f"cut {row.cut} (" in row.reason and f"level {row.compression_energy_kept:g}" in row.reason
        if row.battery is BatteryState.LOW:
            assert "battery low" in row.reason and ("least energy" in row.reason or "infeasible" in row.reason)


# ---------------------------------------------------------------------------------------------
# Baselines


chain = st.integers(2, 8).flatmap(
    lambda n: st.tuples(
        st.lists(st.floats(0.0, 100.0), min_size=n, max_size=n),
        st.lists(st.floats(0.0, 100.0), min_size=n, max_size=n),
        st.lists(st.integers(1, 1_000_000), min_size=n, max_size=n),
    )
)


@SETTINGS
@given(chain=chain, bw=st.one_of(st.just(0.0), st.floats(0.01, 100.0)), rtt=st.floats(0.0, 200.0))
def test_dads_min_cut_equals_the_argmin_on_chains(
    chain: tuple[list[float], list[float], list[int]], bw: float, rtt: float
) -> None:
    dev, cloud, nbytes = chain
    k_ns = neurosurgeon_argmin(dev, cloud, nbytes, bw, rtt)
    k_dads = dads_min_cut(dev, cloud, nbytes, bw, rtt)
    costs = [chain_split_latency_ms(dev, cloud, nbytes, bw, rtt, k) for k in range(len(dev) + 1)]
    assert costs[k_dads] == pytest.approx(costs[k_ns], rel=1e-9, abs=1e-9)
    assert costs[k_ns] == min(costs)
    others = [c for k, c in enumerate(costs) if k != k_ns]
    if all(c > costs[k_ns] * (1 + 1e-6) + 1e-9 for c in others):  # unique optimum: same cut
        assert k_dads == k_ns


def test_dads_and_argmin_on_a_known_chain() -> None:
    # device fast early, cloud fast late, a small activation after stage 2
    dev, cloud, nbytes = (
        [1.0, 1.0, 50.0, 50.0],
        [0.5, 0.5, 1.0, 1.0],
        [1_000_000, 1_000_000, 1_000, 1_000_000],
    )
    assert neurosurgeon_argmin(dev, cloud, nbytes, 8.0, 10.0) == dads_min_cut(dev, cloud, nbytes, 8.0, 10.0) == 2
    assert dads_min_cut(dev, cloud, nbytes, 0.0, 10.0) == 4  # nothing gets through: all local
    assert chain_split_latency_ms(dev, cloud, nbytes, 8.0, 10.0, 2) == pytest.approx(2.0 + 1.0 + 10.0 + 2.0)
    with pytest.raises(ConfigError, match="one entry per stage"):
        dads_min_cut([1.0], [1.0, 2.0], [1], 1.0, 1.0)


@SETTINGS
@given(
    chain=chain,
    bw=st.floats(0.05, 100.0),
    rtt=st.floats(0.0, 200.0),
    radio=st.sampled_from(list(Radio)),
    extras=st.booleans(),
)
def test_planner_is_at_least_as_good_as_neurosurgeon_and_dads(
    chain: tuple[list[float], list[float], list[int]], bw: float, rtt: float, radio: Radio, extras: bool
) -> None:
    dev, cloud_ms, nbytes = chain
    dev = [max(d, 1e-3) for d in dev]  # a catalog's stages take some time
    # Without extras the cost model reduces to Neurosurgeon's: a tiny window keeps the radio connected
    # (no promotion; BLE has no tail and waits for a connection event every time, so its promotion
    # is taken out), no result comes back, no queue or serving overhead.
    power = radio_model(radio)
    if not extras and power.total_tail_s == 0:
        power = dataclasses.replace(power, promotion_s=0.0)
    device = DeviceCostProfile("d", 1.0, 1000.0, 10.0, power)
    cat_fixed = make_catalog(dev, nbytes, window_s=20.0 if extras else 1e-3, result_bytes=400 if extras else 0)
    cloud = CloudState(
        stage_ms={"synthetic": tuple(cloud_ms)},
        queue_ms=5.0 if extras else 0.0,
        overhead_ms=8.0 if extras else 0.0,
    )
    (plan,) = plan_fleet(single(cat_fixed, device, rtt_ms=rtt, edges=(bw,), cloud=cloud)).plans
    row = the_row(plan, BatteryState.NORMAL, bw)
    assert row.compression_energy_kept == 1.0 and row.codec is Codec.FP32
    k_ns = neurosurgeon_argmin(dev, cloud_ms, nbytes, bw, rtt)
    k_dads = dads_min_cut(dev, cloud_ms, nbytes, bw, rtt)
    link = LinkState(bw, rtt)
    for k in (k_ns, k_dads):
        theirs = estimate(cat_fixed, device, link, cloud, Choice(k)).total_ms
        assert row.predicted_latency_ms <= theirs * (1 + 1e-9) + 1e-9
    if not extras:
        ns_ms = chain_split_latency_ms(dev, cloud_ms, nbytes, bw, rtt, k_ns)
        assert row.predicted_latency_ms == pytest.approx(ns_ms, rel=1e-9, abs=1e-9)
    # with compression and codecs free, only better
    cat_free = make_catalog(
        dev,
        nbytes,
        level_factors={0.5: [0.5] * len(dev)},
        codec_drops={Codec.FP16: [0.0] * len(dev), Codec.INT8: [0.0] * len(dev)},
        window_s=cat_fixed.window_s,
        result_bytes=cat_fixed.result_bytes,
    )
    (free,) = plan_fleet(single(cat_free, device, rtt_ms=rtt, edges=(bw,), cloud=cloud)).plans
    assert the_row(free, BatteryState.NORMAL, bw).predicted_latency_ms <= row.predicted_latency_ms * (1 + 1e-9)


# ---------------------------------------------------------------------------------------------
# Battery, fallbacks, cloud down


SLOW_FRUGAL = DeviceCostProfile("watch", speed_factor=20.0, active_mw=100.0, idle_mw=5.0, radio=Radio.WIFI)


def offload_pays_in_latency_not_energy() -> ModelCatalog:
    # local: 2 x 5 ms x 20 = 200 ms at 100 mW = 20 mJ; offloading the input: ~120 ms, WiFi tail ~40 mJ
    return make_catalog([5.0, 5.0], [4_000, 400], window_s=2.0, result_bytes=24)


def test_low_battery_rows_minimise_energy() -> None:
    cat = offload_pays_in_latency_not_energy()
    inputs = single(cat, SLOW_FRUGAL, rtt_ms=10.0, deadline_ms=1000.0, edges=(1.0, 10.0))
    (plan,) = plan_fleet(inputs).plans
    normal, low = the_row(plan, BatteryState.NORMAL, 20.0), the_row(plan, BatteryState.LOW, 20.0)
    assert plan.objective is Objective.LATENCY
    assert normal.cut < cat.n_stages and normal.reason.startswith("least latency")
    assert low.cut == cat.n_stages and low.reason.startswith("least energy") and "battery low" in low.reason
    assert low.predicted_energy_mj < normal.predicted_energy_mj
    assert low.predicted_latency_ms > normal.predicted_latency_ms
    # a device looks its row up by its battery
    assert plan.lookup(20.0, 0.1, 0.2) == low and plan.lookup(20.0, 0.9, 0.2) == normal


def test_an_infeasible_budget_takes_the_least_violating_choice_and_says_so() -> None:
    cat = offload_pays_in_latency_not_energy()
    inputs = single(cat, SLOW_FRUGAL, rtt_ms=10.0, energy_budget_mw=0.001, deadline_ms=1.0, edges=(10.0,))
    plan_set = plan_fleet(inputs)
    (plan,) = plan_set.plans
    normal, low = the_row(plan, BatteryState.NORMAL, 20.0), the_row(plan, BatteryState.LOW, 20.0)
    every = [estimate(cat, SLOW_FRUGAL, LinkState(10.0, 10.0), inputs.cloud, c) for c in choices_of(cat)]
    # the energy budget (0.001 mW x 2 s) is met by no choice: the least energy one, local, is taken
    least_energy = min(e.energy_mj for e in every)
    assert normal.cut == cat.n_stages and normal.predicted_energy_mj == pytest.approx(least_energy)
    assert normal.reason.startswith(
        f"infeasible: energy budget 0.0 mJ met by no choice; least energy any choice reaches {least_energy:.1f} mJ ("
    )
    assert f": cut {cat.n_stages} (local) level 1; local " in normal.reason
    # the 1 ms deadline of the LOW row: nothing is that fast; offloading is the least latency
    least_latency = min(e.total_ms for e in every)
    assert low.cut < cat.n_stages and low.predicted_latency_ms == pytest.approx(least_latency)
    assert low.reason.startswith(
        f"infeasible: deadline 1 ms met by no choice; least latency any choice reaches {least_latency:.1f} ms ("
    )
    # both buckets, [0, 10) and [10, inf): 4 rows, counted per class, model and budget (what the
    # controller exports)
    assert "4 infeasible rows (no choice meets their energy budget or deadline)" in plan_set.reason
    assert infeasible_rows(plan_set) == {("watch", cat.model, "energy"): 2, ("watch", cat.model, "deadline"): 2}
    met = plan_fleet(single(cat, SLOW_FRUGAL, rtt_ms=10.0, energy_budget_mw=1e6, deadline_ms=1e6, edges=(10.0,)))
    assert infeasible_rows(met) == {("watch", cat.model, "energy"): 0, ("watch", cat.model, "deadline"): 0}
    assert "infeasible" not in met.reason


def test_cloud_unavailable_forces_local_rows_with_the_reason() -> None:
    cat = make_catalog([5.0, 5.0], [4_000, 400], level_factors={0.5: [0.5, 0.5]}, level_drops={0.5: [0, 0, 0.001]})
    inputs = single(cat, SLOW_FRUGAL, rtt_ms=10.0, edges=(1.0, 10.0), cloud_available=False)
    plan_set = plan_fleet(inputs)
    for row in plan_set.plans[0].rows:
        assert row.cut == cat.n_stages
        assert row.reason.startswith("local only (cloud failure rate 40% > 20%); ")
        assert "cloud-all" not in row.reason
    assert "local only for watch" in plan_set.reason
    # compression still chosen for local rows: level 0.5 halves the latency within the budget
    assert {r.compression_energy_kept for r in plan_set.plans[0].rows} == {0.5}


def test_first_bucket_is_planned_at_zero_bandwidth_so_it_is_local() -> None:
    buckets = bandwidth_buckets((0.1, 1.0))
    assert [(b.min_mbps, b.max_mbps, b.planned_mbps) for b in buckets] == [
        (0.0, 0.1, 0.0),
        (0.1, 1.0, 0.1),
        (1.0, math.inf, 1.0),
    ]
    cat = offload_pays_in_latency_not_energy()
    (plan,) = plan_fleet(single(cat, SLOW_FRUGAL, rtt_ms=10.0, edges=(0.1, 1.0))).plans
    assert the_row(plan, BatteryState.NORMAL, 0.05).cut == cat.n_stages
    with pytest.raises(ConfigError, match="strictly increasing"):
        bandwidth_buckets((1.0, 1.0))


# ---------------------------------------------------------------------------------------------
# Hysteresis and versions


def test_hysteresis_holds_on_a_2_percent_change_and_follows_a_50_percent_change() -> None:
    device = DeviceCostProfile("phone", 1.0, 1000.0, 0.0, Radio.LTE)
    # local 100 ms; offloading the input: 1000 B at 1 Mbit/s (8 ms) + rtt 10 + cloud 1 + queue
    cat = make_catalog([50.0, 50.0], [1_000, 1_000], result_bytes=0)

    def plan(queue_ms: float, previous: PlanSet | None, margin: float = 0.1) -> tuple[PlanSet, PlanRow]:
        cloud = CloudState(speedup_vs_host=100.0, queue_ms=queue_ms)
        ps = plan_fleet(single(cat, device, rtt_ms=10.0, edges=(1.0,), cloud=cloud, margin=margin), previous)
        return ps, the_row(ps.plans[0], BatteryState.NORMAL, 1.0)

    v1, row1 = plan(79.0, None)  # offload 98 ms < local 100 ms
    assert row1.cut == 0 and row1.predicted_latency_ms == pytest.approx(98.0)
    v2, row2 = plan(83.0, v1)  # offload 102 ms: local is better by only 2%
    assert row2.cut == 0 and row2.predicted_latency_ms == pytest.approx(102.0)
    assert row2.reason.startswith("kept previous, new best cut 2 (local) level 1 100.0 ms is within 10% hysteresis")
    assert "at 1 Mbit/s" in row2.reason
    assert v2.version == 2 and "0 rows changed since v1, 1 kept by 10% hysteresis" in v2.reason
    assert plan(83.0, v1, margin=0.0)[1].cut == 2  # without hysteresis it would have flapped
    v3, row3 = plan(79.0 + 49.0, v2)  # offload 147 ms, 50% more: local wins by a wide margin
    assert row3.cut == 2 and row3.reason.startswith("least latency 100.0 ms")
    assert v3.version == 3 and changed_rows(v2, v3) >= 1
    assert changed_rows(v1, v2) == 0 and changed_rows(None, v1) == len(v1.plans[0].rows)


def test_hysteresis_never_keeps_an_infeasible_previous_choice() -> None:
    device = DeviceCostProfile("phone", 1.0, 1000.0, 0.0, Radio.LTE)
    cat = make_catalog([50.0, 50.0], [1_000, 1_000], result_bytes=0)
    cloud = CloudState(speedup_vs_host=100.0, queue_ms=79.0)
    v1 = plan_fleet(single(cat, device, rtt_ms=10.0, edges=(1.0,), cloud=cloud))
    assert the_row(v1.plans[0], BatteryState.NORMAL, 1.0).cut == 0
    # now an energy budget that offloading (LTE tail) breaks but local meets
    v2 = plan_fleet(single(cat, device, rtt_ms=10.0, edges=(1.0,), cloud=cloud, energy_budget_mw=200.0), v1)
    row = the_row(v2.plans[0], BatteryState.NORMAL, 1.0)
    assert row.cut == 2 and "kept previous" not in row.reason


# ---------------------------------------------------------------------------------------------
# Inputs


def test_inputs_from_config_plans_every_class_of_the_config() -> None:
    from pipelines.devices import DEVICE_CLASSES

    cfg = PlannerConfig()
    devices = {
        n: DeviceCostProfile(n, d.speed_factor, d.active_mw, d.idle_mw, d.radio) for n, d in DEVICE_CLASSES.items()
    }
    cats = [make_catalog([1.0, 2.0, 3.0], [4000, 800, 40], name=m) for m in ("a", "b")]
    tel = TelemetryStats((5.0, 5.0, 5.0), (100, 100, 100))
    inputs = inputs_from_config(
        cfg,
        devices,
        {n: 30.0 for n in devices},
        cats,
        CloudState(),
        now_unix_ms=123,
        telemetry={("phone", "a"): tel},
        cloud_unavailable={"watch": "breaker open"},
    )
    ps = plan_fleet(inputs)
    assert ps.version == 1 and ps.created_unix_ms == 123
    assert len(ps.plans) == len(devices) * 2
    buckets = len(cfg.bandwidth_edges_mbps) + 1
    assert all(len(p.rows) == 2 * buckets for p in ps.plans)
    objectives = {p.device_class: p.objective for p in ps.plans}
    assert objectives == {n: Objective(cfg.classes[n].objective) for n in devices}
    plan_a = ps.get("a", "phone")
    assert plan_a is not None and "device telemetry 3/3 stages" in plan_a.rows[0].reason
    watch = ps.get("a", "watch")
    assert watch is not None  # local only, after the verdict where its budget is infeasible (600 ms, 240 mJ)
    assert all(r.reason.startswith(("local only (breaker open)", "infeasible: ")) for r in watch.rows)
    assert all("local only (breaker open); " in r.reason for r in watch.rows)
    PlanSet.from_json(ps.to_json())  # what goes to the plan store round-trips
    with pytest.raises(ConfigError, match="no planner objective"):
        inputs_from_config(cfg, {"toaster": devices["phone"]}, {"toaster": 1.0}, cats, CloudState())


def test_inputs_are_checked() -> None:
    device = DeviceCostProfile("d", 1.0, 1.0, 1.0, Radio.LTE)
    cat = make_catalog([1.0, 1.0], [4, 4])
    with pytest.raises(ConfigError, match="hysteresis_margin"):
        single(cat, device, margin=1.5)
    with pytest.raises(ConfigError, match="rtt_ms"):
        single(cat, device, rtt_ms=-1.0)
    with pytest.raises(ConfigError, match="duplicate model"):
        PlannerInputs(classes=single(cat, device).classes, catalogs=(cat, cat), cloud=CloudState())
    with pytest.raises(ConfigError, match="Constraints.deadline_ms"):
        Constraints(Objective.ENERGY, deadline_ms=-1.0)


def test_exhaustive_best_reports_feasibility() -> None:
    cat = offload_pays_in_latency_not_energy()
    link, cloud = LinkState(10.0, 10.0), CloudState()
    choice, est, ok = exhaustive_best(cat, SLOW_FRUGAL, link, cloud, Constraints(Objective.ENERGY))
    assert ok and choice == Choice(cat.n_stages)
    choice, est, ok = exhaustive_best(cat, SLOW_FRUGAL, link, cloud, Constraints(Objective.ENERGY, deadline_ms=1.0))
    assert not ok and choice.cut < cat.n_stages
    assert est.total_ms > 1.0


# ---------------------------------------------------------------------------------------------
# Memory: a front the device cannot hold is never chosen


@SETTINGS
@given(
    cat=catalogs(),
    device=devices,
    objective=st.sampled_from(list(Objective)),
    ram=st.one_of(st.none(), st.integers(1, 4_000_000)),
    storage=st.one_of(st.none(), st.integers(1, 4_000)),
    weights_in_ram=st.booleans(),
    deadline=st.one_of(st.none(), st.floats(1.0, 2000.0)),
    edges=edge_lists,
    cloud_available=st.booleans(),
)
def test_rows_never_choose_a_front_that_does_not_fit(
    cat: ModelCatalog,
    device: DeviceCostProfile,
    objective: Objective,
    ram: int | None,
    storage: int | None,
    weights_in_ram: bool,
    deadline: float | None,
    edges: list[float],
    cloud_available: bool,
) -> None:
    device = dataclasses.replace(device, ram_bytes=ram, storage_bytes=storage, weights_in_ram=weights_in_ram)
    inputs = single(
        cat, device, objective=objective, deadline_ms=deadline, edges=tuple(edges), cloud_available=cloud_available
    )
    (plan,) = plan_fleet(inputs).plans
    cls = inputs.classes[0]
    for row in plan.rows:
        why = front_fits(device, cat, row.cut, row.compression_energy_kept)
        if row.reason.startswith("NO choice fits") or "met by no choice; NO choice fits" in row.reason:
            assert why is not None and why in row.reason
            continue
        assert why is None, row.reason
        cons = row_constraints(cls, cat, row.battery)
        best, best_est, _ = exhaustive_best(
            cat,
            device,
            LinkState(row.min_bandwidth_mbps, cls.rtt_ms),
            inputs.cloud,
            cons,
            local_only=not cloud_available,
        )
        assert front_fits(device, cat, best.cut, best.level) is None
        ours = row_estimate(inputs, cat, row)
        metric = (lambda e: e.total_ms) if cons.objective is Objective.LATENCY else (lambda e: e.energy_mj)
        if math.isfinite(metric(best_est)):
            assert metric(ours) == pytest.approx(metric(best_est), rel=1e-9, abs=1e-9)


def test_a_refused_front_is_named_in_the_reason() -> None:
    # Slow link, fast device: fully local is the optimum, but its weights (3 x 100 params x 4 B =
    # 1200 B) exceed the 1000 B storage budget; the front at cut 2 (800 B) fits.
    cat = make_catalog([1.0, 1.0, 1.0], [4000, 400, 400], window_s=10.0)
    device = DeviceCostProfile("node", 1.0, 10.0, 0.0, Radio.WIFI, ram_bytes=100_000, storage_bytes=1000)
    inputs = single(cat, device, edges=(1.0,), rtt_ms=20.0)
    (unlimited,) = plan_fleet(single(cat, dataclasses.replace(device, storage_bytes=None), edges=(1.0,))).plans
    assert the_row(unlimited, BatteryState.NORMAL, 1.0).cut == 3
    plan_set = plan_fleet(inputs)
    row = the_row(plan_set.plans[0], BatteryState.NORMAL, 1.0)
    assert row.cut < 3 and front_fits(device, cat, row.cut, row.compression_energy_kept) is None
    assert row.reason.startswith("cut 3 (local) level 1 refused: front of synthetic at cut 3 needs 1.2 KiB of weights")
    assert "storage budget of node" in row.reason
    assert "refused a front that does not fit" in plan_set.reason
    # hysteresis never keeps a previous choice that no longer fits
    again = plan_fleet(inputs, previous=plan_fleet(single(cat, dataclasses.replace(device, storage_bytes=None))))
    assert the_row(again.plans[0], BatteryState.NORMAL, 1.0).cut == row.cut


def test_a_row_where_no_choice_fits_says_so() -> None:
    cat = make_catalog([1.0, 1.0], [4000, 400])
    device = DeviceCostProfile("node", 1.0, 10.0, 0.0, Radio.BLE, ram_bytes=100, storage_bytes=100)
    plan_set = plan_fleet(single(cat, device, cloud_available=False))
    for row in plan_set.plans[0].rows:
        assert row.reason.startswith("NO choice fits node's memory")
        assert "front of synthetic at cut 2 needs" in row.reason
    assert "rows where NO choice fits the device's memory" in plan_set.reason
    # with the cloud reachable, uploading the input (cut 0, no front) always fits where the link is up
    (plan,) = plan_fleet(single(cat, device, edges=(1.0,))).plans
    row = the_row(plan, BatteryState.NORMAL, 5.0)
    assert row.cut == 0 and "refused" in row.reason
    # at 0 Mbit/s nothing gets through and nothing local fits
    assert the_row(plan, BatteryState.NORMAL, 0.0).reason.startswith("NO choice fits")
