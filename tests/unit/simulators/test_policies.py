"""The baselines' pure choice logic: all_local, all_cloud, fixed_cut (Neurosurgeon) and the oracle."""

from __future__ import annotations

import math

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
    fixed_cut_choice,
    oracle_choice,
    policy_inputs,
)
from splitsense.config import ClassObjectiveConfig, SimulatorConfig
from splitsense.errors import ConfigError

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


def test_choice_text() -> None:
    cat = toy_catalog()
    assert choice_text(cat, Choice(3)) == "local"
    assert choice_text(cat, Choice(1, 0.5, Codec.INT8)) == "cut 1 int8 level 0.5"
    assert choice_text(cat, Choice(0)) == "cut 0 fp32"
