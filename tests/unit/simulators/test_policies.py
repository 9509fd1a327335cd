"""The baselines' pure choice logic: all_local, all_cloud, cloud_input, fixed_cut (Neurosurgeon), the oracle."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cloud.controller.costmodel import Choice, CloudState, DeviceCostProfile, LinkState, estimate
from cloud.controller.planner import chain_split_latency_ms, exhaustive_best
from pipelines.catalog import CodecEntry, LevelEntry, ModelCatalog
from pipelines.codecs import Codec
from pipelines.power import Radio
from simulators.policies import (
    POLICIES,
    OracleTable,
    Policy,
    all_cloud_choice,
    all_local_choice,
    calibrated_catalog,
    choice_text,
    cloud_input_choice,
    fixed_cut_choice,
    infeasible_reason,
    oracle_choice,
    policy_inputs,
)
from splitsense.config import ClassObjectiveConfig, SimulatorConfig
from splitsense.errors import ConfigError
from tests.unit.cloud.controller.synthetic import make_catalog

# A toy chain of 3 stages whose middle activation is small: a real split point exists.
STAGE_MS = (2.0, 6.0, 1.0)
FP32_BYTES = (40_000, 200_000, 2_000, 0)


def toy_catalog(stage_ms: tuple[float, ...] = STAGE_MS) -> ModelCatalog:
    cum = [0.0]
    for v in stage_ms:
        cum.append(cum[-1] + v)
    half = [0.0, *[0.6 * c for c in cum[1:]]]
    return ModelCatalog(
        model="toy",
        stage_names=("a", "b", "c"),
        stage_latency_ms=stage_ms,
        stage_macs=(1, 1, 1),
        stage_params=(10, 10, 10),
        activation_shapes=((10_000,), (50_000,), (500,), (4,)),
        result_bytes=16,
        window_s=1.0,
        base_accuracy=0.9,
        levels=(
            LevelEntry(1.0, tuple(cum), (0, 10, 20, 30), (0.9,) * 4),
            LevelEntry(0.5, tuple(half), (0, 5, 10, 15), (0.9, 0.89, 0.85, 0.85)),
        ),
        codecs=(
            CodecEntry(Codec.FP32, FP32_BYTES, (0.9,) * 4),
            CodecEntry(Codec.INT8, tuple(b // 4 for b in FP32_BYTES), (0.9, 0.9, 0.895, 0.9)),
        ),
    )


PHONE = DeviceCostProfile("phone", 4.0, 2000.0, 11.4, Radio.LTE)
WATCH = DeviceCostProfile("watch", 15.0, 400.0, 25.0, Radio.WIFI)
CLOUD = CloudState(overhead_ms=8.0)
LATENCY = ClassObjectiveConfig("latency", energy_budget_mw=None, deadline_ms=300.0)
ENERGY = ClassObjectiveConfig("energy", deadline_ms=300.0)


def test_policy_names_are_the_configs() -> None:
    assert tuple(p.value for p in POLICIES) == SimulatorConfig().policies
    assert Policy("oracle") is Policy.ORACLE


def test_all_local_and_all_cloud() -> None:
    cat = toy_catalog()
    assert all_local_choice(cat) == Choice(3)
    assert all_cloud_choice(cat) == Choice(0, 1.0, Codec.FP32)


@settings(max_examples=60, deadline=None)
@given(bw=st.floats(0.01, 200.0), rtt=st.floats(0.0, 200.0))
def test_fixed_cut_latency_is_neurosurgeons_argmin(bw: float, rtt: float) -> None:
    inputs = policy_inputs(toy_catalog(), PHONE, LATENCY, rtt, CLOUD)
    choice = fixed_cut_choice(inputs, bw)
    assert choice.level == 1.0 and choice.codec is Codec.FP32  # Neurosurgeon's search space: cuts only
    dev = [v * PHONE.speed_factor for v in STAGE_MS]
    cloud = [*STAGE_MS[:-1], STAGE_MS[-1] + CLOUD.fixed_ms]
    costs = [chain_split_latency_ms(dev, cloud, FP32_BYTES[:3], bw, rtt, k) for k in range(4)]
    assert costs[choice.cut] == min(costs)
    assert choice.cut == min(range(4), key=lambda k: (costs[k], k))


def test_fixed_cut_moves_with_the_probed_bandwidth() -> None:
    inputs = policy_inputs(toy_catalog((2.0, 60.0, 1.0)), PHONE, LATENCY, 20.0, CLOUD)
    assert fixed_cut_choice(inputs, 0.05) == Choice(3)  # slow link: everything local
    assert fixed_cut_choice(inputs, 1000.0) == Choice(0)  # fast link: everything up
    assert fixed_cut_choice(inputs, 0.0) == Choice(3)  # nothing gets through


@settings(max_examples=40, deadline=None)
@given(bw=st.floats(0.0, 100.0), rtt=st.floats(0.0, 150.0))
def test_fixed_cut_energy_is_the_least_energy_cut(bw: float, rtt: float) -> None:
    cat = toy_catalog()
    inputs = policy_inputs(cat, WATCH, ENERGY, rtt, CLOUD)
    choice = fixed_cut_choice(inputs, bw)
    energies = [estimate(cat, WATCH, LinkState(bw, rtt), CLOUD, Choice(k)).energy_mj for k in range(4)]
    assert energies[choice.cut] == min(energies)


@settings(max_examples=60, deadline=None)
@given(
    bw=st.floats(0.0, 100.0),
    rtt=st.floats(0.0, 150.0),
    objective=st.sampled_from([LATENCY, ENERGY, ClassObjectiveConfig("latency", energy_budget_mw=50.0)]),
    device=st.sampled_from([PHONE, WATCH]),
)
def test_oracle_is_the_exhaustive_optimum(
    bw: float, rtt: float, objective: ClassObjectiveConfig, device: DeviceCostProfile
) -> None:
    cat = toy_catalog()
    inputs = policy_inputs(cat, device, objective, rtt, CLOUD)
    best, _, _ = exhaustive_best(cat, device, LinkState(bw, rtt), CLOUD, inputs.constraints)
    assert oracle_choice(inputs, bw) == best


def test_oracle_goes_local_when_nothing_gets_through() -> None:
    inputs = policy_inputs(toy_catalog((2.0, 600.0, 1.0)), WATCH, LATENCY, 10.0, CLOUD)
    assert oracle_choice(inputs, 0.0).cut == 3
    assert oracle_choice(inputs, 1000.0).cut < 3  # a watch 15x slower: a fast link pays


def test_oracle_table_memoises_and_rejects_nonsense() -> None:
    table = OracleTable(policy_inputs(toy_catalog(), PHONE, LATENCY, 50.0, CLOUD))
    table.prime([0.5, 1.0, 1.0, 2.0, 0.0])
    assert len(table) == 4
    first = table.choose(1.0)
    assert table.choose(1.0) is first and len(table) == 4
    table.choose(3.0)
    assert len(table) == 5
    assert table.choose(math.inf) == table.choose(1e9)  # an unlimited link is a fast link
    with pytest.raises(ConfigError):
        table.choose(-1.0)
    with pytest.raises(ConfigError):
        table.choose(math.nan)


def test_calibrated_catalog_replaces_host_latency_and_scales_levels() -> None:
    cat = toy_catalog()
    cal = calibrated_catalog(cat, (4.0, 12.0, 2.0))  # this host is 2x slower than the catalog's
    assert cal.stage_latency_ms == (4.0, 12.0, 2.0)
    assert cal.levels[0].front_latency_ms == (0.0, 4.0, 16.0, 18.0)
    for old, new in zip(cat.levels[1].front_latency_ms, cal.levels[1].front_latency_ms, strict=True):
        assert new == pytest.approx(2 * old)
    assert cal.codecs == cat.codecs and cal.levels[1].accuracy == cat.levels[1].accuracy
    with pytest.raises(ConfigError):
        calibrated_catalog(cat, (1.0, 2.0))
    with pytest.raises(ConfigError):
        calibrated_catalog(cat, (1.0, -2.0, 1.0))


def test_calibrated_catalog_takes_this_hosts_preprocessing_when_given() -> None:
    cat = replace(toy_catalog(), prep_ms=0.3, prep_ops=1000)
    assert calibrated_catalog(cat, (4.0, 12.0, 2.0)).prep_ms == 0.3  # not measured: the catalog's
    cal = calibrated_catalog(cat, (4.0, 12.0, 2.0), host_prep_ms=0.5)
    assert (cal.prep_ms, cal.prep_ops) == (0.5, 1000)
    with pytest.raises(ConfigError):
        calibrated_catalog(cat, (4.0, 12.0, 2.0), host_prep_ms=math.nan)


def test_choice_text() -> None:
    cat = toy_catalog()
    assert choice_text(cat, Choice(3)) == "local"
    assert choice_text(cat, Choice(1, 0.5, Codec.INT8)) == "cut 1 int8 level 0.5"
    assert choice_text(cat, Choice(0)) == "cut 0 fp32"


# ---------------------------------------------------------------------------------------------
# cloud_input: the input with the best codec (SC2's baseline)


def _input_catalog() -> ModelCatalog:
    # cut 0: fp32 4000 B (exact), fp16 2000 B (-0.5 points), int8 1000 B (-2 points)
    return make_catalog(
        [1.0, 2.0, 3.0],
        [4000, 8000, 400],
        codec_drops={Codec.FP16: [0.005, 0.0, 0.0], Codec.INT8: [0.02, 0.0, 0.0]},
    )


def test_cloud_input_takes_the_fewest_bytes_within_the_accuracy_budget() -> None:
    cat = _input_catalog()
    assert cloud_input_choice(cat) == Choice(0, 1.0, Codec.INT8)  # no budget: the smallest
    assert cloud_input_choice(cat, 2.0) == Choice(0, 1.0, Codec.INT8)  # exactly on the budget
    assert cloud_input_choice(cat, 1.0) == Choice(0, 1.0, Codec.FP16)
    assert cloud_input_choice(cat, 0.4) == Choice(0, 1.0, Codec.FP32)  # only the exact one is left
    assert cloud_input_choice(cat, 0.0) == Choice(0, 1.0, Codec.FP32)
    # only cut 0 matters: int8's bytes and accuracy at deeper cuts change nothing
    assert cloud_input_choice(make_catalog([1.0, 1.0], [4000, 10], codec_drops={Codec.INT8: [0.0, 0.5]})).codec is (
        Codec.INT8
    )
    with pytest.raises(ConfigError):
        cloud_input_choice(cat, -1.0)


def test_cloud_input_ties_go_to_the_more_accurate_codec() -> None:
    cat = toy_catalog()
    fp32, int8 = cat.codecs
    same = replace(int8, activation_bytes=fp32.activation_bytes, accuracy=(0.89, *int8.accuracy[1:]))
    tied = replace(cat, codecs=(fp32, same))
    assert cloud_input_choice(tied) == Choice(0, 1.0, Codec.FP32)


def test_cloud_input_follows_the_class_budget_in_the_fleet() -> None:
    cat = _input_catalog()
    strict = ClassObjectiveConfig("latency", deadline_ms=300.0, accuracy_budget_points=1.0)
    inputs = policy_inputs(cat, PHONE, strict, 20.0, CLOUD)
    assert cloud_input_choice(cat, inputs.constraints.accuracy_budget_points).codec is Codec.FP16


# ---------------------------------------------------------------------------------------------
# Device memory: fronts that do not fit


TOO_BIG = "front needs 9 MB, the device has 1 MB"


def _unfit(cuts: range, levels: tuple[float, ...] = (1.0, 0.5)) -> dict[tuple[int, float], str]:
    return {(k, lvl): TOO_BIG for k in cuts for lvl in levels}


def test_infeasible_is_all_local_without_room_for_the_whole_model() -> None:
    cat = toy_catalog()
    roomy = policy_inputs(cat, WATCH, LATENCY, 10.0, CLOUD)
    tight = policy_inputs(cat, WATCH, LATENCY, 10.0, CLOUD, {(3, 1.0): TOO_BIG, (0, 1.0): "never"})
    assert tight.unfit == {(3, 1.0): TOO_BIG}  # cut 0 is preprocessing only: it always fits
    assert tight.fits(0) and tight.fits(2) and not tight.fits(3)
    for policy in POLICIES:
        assert infeasible_reason(policy, roomy) is None
        why = infeasible_reason(policy, tight)
        if policy is Policy.ALL_LOCAL:
            assert why is not None and "whole model" in why and TOO_BIG in why
        else:  # a choice that fits always exists (cut 0)
            assert why is None, policy


def test_fixed_cut_only_considers_cuts_that_fit() -> None:
    cat = toy_catalog((2.0, 60.0, 1.0))
    inputs = policy_inputs(cat, PHONE, LATENCY, 20.0, CLOUD, _unfit(range(3, 4), (1.0,)))
    assert fixed_cut_choice(inputs, 0.0) == Choice(0)  # nothing gets through, and local does not fit
    slow = fixed_cut_choice(inputs, 0.05)
    assert slow.cut < 3
    dev = [v * PHONE.speed_factor for v in cat.stage_latency_ms]
    cloud = [*cat.stage_latency_ms[:-1], cat.stage_latency_ms[-1] + CLOUD.fixed_ms]
    costs = [chain_split_latency_ms(dev, cloud, FP32_BYTES[:3], 0.05, 20.0, k) for k in range(3)]
    assert slow.cut == min(range(3), key=lambda k: (costs[k], k))
    energy = policy_inputs(cat, WATCH, ENERGY, 20.0, CLOUD, _unfit(range(2, 4), (1.0,)))
    for bw in (0.0, 0.05, 1.0, 100.0):
        assert fixed_cut_choice(energy, bw).cut in (0, 1)


@settings(max_examples=40, deadline=None)
@given(
    bw=st.floats(0.0, 100.0),
    rtt=st.floats(0.0, 150.0),
    objective=st.sampled_from([LATENCY, ENERGY, ClassObjectiveConfig("latency", energy_budget_mw=50.0)]),
    device=st.sampled_from([PHONE, WATCH]),
)
def test_oracle_skips_fronts_that_do_not_fit(
    bw: float, rtt: float, objective: ClassObjectiveConfig, device: DeviceCostProfile
) -> None:
    cat = toy_catalog()
    # level 0.5 fits nowhere: the oracle is the optimum of the catalog without it
    no_level = policy_inputs(cat, device, objective, rtt, CLOUD, _unfit(range(1, 4), (0.5,)))
    best, _, _ = exhaustive_best(
        replace(cat, levels=cat.levels[:1]), device, LinkState(bw, rtt), CLOUD, no_level.constraints
    )
    assert oracle_choice(no_level, bw) == best
    # only cut 0 fits: the input goes up, whatever the link
    only_input = policy_inputs(cat, device, objective, rtt, CLOUD, _unfit(range(1, 4)))
    assert oracle_choice(only_input, bw).cut == 0


def test_oracle_without_room_for_the_model_uploads_in_an_outage() -> None:
    inputs = policy_inputs(toy_catalog((2.0, 600.0, 1.0)), WATCH, LATENCY, 10.0, CLOUD, _unfit(range(3, 4)))
    assert oracle_choice(inputs, 0.0) == cloud_input_choice(inputs.catalog, inputs.constraints.accuracy_budget_points)
    assert oracle_choice(inputs, 1000.0).cut < 3
