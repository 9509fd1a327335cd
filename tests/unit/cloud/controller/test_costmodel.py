"""Cost model: the vectorised grid equals the scalar estimate, and each term is what the docs say."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cloud.controller.costmodel import (
    Choice,
    CloudState,
    DeviceCostProfile,
    LinkState,
    TelemetryStats,
    choices_of,
    device_prep_ms,
    device_stage_ms,
    estimate,
    estimate_grid,
)
from pipelines.catalog import ModelCatalog
from pipelines.codecs import Codec
from pipelines.power import Radio, RadioEnergyMeter, radio_model, transfer_energy_mj
from splitsense.errors import ConfigError
from tests.unit.cloud.controller.synthetic import catalogs, clouds, devices, make_catalog

DEVICE = DeviceCostProfile("phone", speed_factor=2.0, active_mw=2000.0, idle_mw=11.4, radio=Radio.LTE)


# a class with a speed factor, or a microcontroller that times MACs (and preprocessing operations)
any_devices = st.one_of(devices, st.builds(replace, devices, macs_per_s=st.floats(1e6, 1e10)))

links = st.builds(
    LinkState,
    bandwidth_mbps=st.one_of(st.just(0.0), st.floats(0.01, 100.0)),
    rtt_ms=st.floats(0.0, 300.0),
    downlink_mbps=st.one_of(st.none(), st.floats(0.01, 100.0)),
)


def _close(a: float, b: float) -> bool:
    return a == b or math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    cat=catalogs(prep=True),
    device=any_devices,
    link_list=st.lists(links, min_size=1, max_size=3),
    cloud=clouds,
    data=st.data(),
)
def test_grid_equals_scalar_estimate_for_every_choice_and_link(
    cat: ModelCatalog,
    device: DeviceCostProfile,
    link_list: list[LinkState],
    cloud: CloudState,
    data: st.DataObject,
) -> None:
    n = cat.n_stages
    telemetry = None
    if data.draw(st.booleans()):
        telemetry = TelemetryStats(
            tuple(data.draw(st.lists(st.floats(0.0, 500.0), min_size=n, max_size=n))),
            tuple(data.draw(st.lists(st.integers(0, 60), min_size=n, max_size=n))),
        )
    grid = estimate_grid(cat, device, link_list, cloud, telemetry, min_telemetry_samples=30)
    assert grid.choices == choices_of(cat)
    for b, link in enumerate(link_list):
        for m, choice in enumerate(grid.choices):
            want = estimate(cat, device, link, cloud, choice, telemetry, min_telemetry_samples=30)
            got = grid.estimate(b, m)
            for name in ("device_ms", "transfer_ms", "cloud_ms", "total_ms", "energy_mj", "accuracy"):
                assert _close(getattr(got, name), getattr(want, name)), (name, choice, got, want)
            assert set(got.breakdown) == set(want.breakdown)
            for key, value in want.breakdown.items():
                assert _close(got.breakdown[key], value), (key, choice)
            assert _close(got.total_ms, got.device_ms + got.transfer_ms + got.cloud_ms)


def test_choices_enumerate_every_distinct_choice_in_tie_break_order() -> None:
    cat = make_catalog(
        [1.0, 2.0, 3.0],
        [400, 800, 40],
        level_factors={0.5: [0.5, 0.5, 0.5]},
        codec_drops={Codec.INT8: [0.0, 0.0, 0.0]},
    )
    choices = choices_of(cat)
    # cut 0: level 1.0 only (no front) x 2 codecs; cuts 1, 2: 2 levels x 2 codecs; cut 3: 2 levels, fp32
    assert len(choices) == 2 + 2 * 4 + 2
    assert choices[0] == Choice(0, 1.0, Codec.FP32) and choices[1] == Choice(0, 1.0, Codec.INT8)
    assert choices[2:6] == (
        Choice(1, 1.0, Codec.FP32),
        Choice(1, 1.0, Codec.INT8),
        Choice(1, 0.5, Codec.FP32),
        Choice(1, 0.5, Codec.INT8),
    )
    assert choices[-2:] == (Choice(3, 1.0), Choice(3, 0.5))
    assert choices_of(cat, local_only=True) == (Choice(3, 1.0), Choice(3, 0.5))


def test_local_choice_costs_only_device_compute() -> None:
    cat = make_catalog([1.0, 2.0, 3.0], [400, 800, 40])
    est = estimate(cat, DEVICE, LinkState(0.0, 50.0), CloudState(queue_ms=9.0), Choice(3))
    assert est.device_ms == pytest.approx(12.0)  # (1 + 2 + 3) x speed 2
    assert est.transfer_ms == est.cloud_ms == 0.0 and est.total_ms == pytest.approx(12.0)
    assert est.energy_mj == pytest.approx(2000.0 * 0.012)  # 2 W x 12 ms
    assert est.breakdown["radio_mj"] == 0.0 and est.accuracy == cat.base_accuracy


MCU = DeviceCostProfile("mcu", 3000.0, 10.0, 0.5, Radio.BLE, macs_per_s=18e6)


@pytest.mark.parametrize(("device", "prep_ms"), [(DEVICE, 0.3 * 2.0), (MCU, 990_810 / 18e6 * 1000.0)])
def test_every_choice_pays_the_preprocessing(device: DeviceCostProfile, prep_ms: float) -> None:
    bare = make_catalog([1.0, 2.0, 3.0], [400, 800, 40], level_factors={0.5: [0.5, 0.5, 0.5]},
                        codec_drops={Codec.INT8: [0.0, 0.0, 0.0]})  # fmt: skip
    cat = replace(bare, prep_ms=0.3, prep_ops=990_810)
    assert device_prep_ms(cat, device) == pytest.approx(prep_ms)  # prep_ms x speed, or prep_ops at the MAC rate
    assert device_prep_ms(bare, device) == 0.0  # a catalog measured before preprocessing was recorded
    links = [LinkState(1.0, 50.0), LinkState(0.0, 50.0)]
    grid, bare_grid = (estimate_grid(c, device, links, CloudState()) for c in (cat, bare))
    assert len({c.cut for c in grid.choices}) == cat.n_stages + 1  # k = 0..N, cut 0 included
    prep_mj = device.active_mw * prep_ms / 1000.0
    for b, link in enumerate(links):
        for m, choice in enumerate(grid.choices):
            est, without = estimate(cat, device, link, CloudState(), choice), bare_grid.estimate(b, m)
            assert est.device_ms == pytest.approx(without.device_ms + prep_ms), choice
            assert est.total_ms == pytest.approx(without.total_ms + prep_ms) or math.isinf(est.total_ms)
            assert est.energy_mj == pytest.approx(without.energy_mj + prep_mj) or math.isinf(est.energy_mj)
            assert est.breakdown["compute_mj"] == pytest.approx(without.breakdown["compute_mj"] + prep_mj)
            assert est.breakdown["prep_device_ms"] == pytest.approx(prep_ms)
            assert est.breakdown["prep_mj"] == pytest.approx(prep_mj)
            assert without.breakdown["prep_device_ms"] == without.breakdown["prep_mj"] == 0.0
            got = grid.estimate(b, m)  # the grid charges it the same
            for name in ("device_ms", "total_ms", "energy_mj"):
                assert _close(getattr(got, name), getattr(est, name)), (name, choice)
            assert dict(got.breakdown) == pytest.approx(dict(est.breakdown))


def test_offload_terms_follow_the_docs() -> None:
    cat = make_catalog([1.0, 2.0, 3.0], [400, 8000, 40], window_s=1.0, result_bytes=40)
    cloud = CloudState(speedup_vs_host=2.0, queue_ms=5.0, overhead_ms=8.0)
    link = LinkState(bandwidth_mbps=1.0, rtt_ms=50.0)
    est = estimate(cat, DEVICE, link, cloud, Choice(1))
    assert est.device_ms == pytest.approx(2.0)
    up_s, down_s = 8000 * 8 / 1e6, 40 * 8 / 1e6
    # LTE: the 1 s window is shorter than the 11.6 s tail, so no promotion, and the whole gap is tail
    assert est.breakdown["promotion_ms"] == 0.0
    assert est.transfer_ms == pytest.approx((up_s + down_s) * 1000 + 50.0)
    assert est.cloud_ms == pytest.approx((2.0 + 3.0) / 2 + 5.0 + 8.0)
    lte = radio_model(Radio.LTE)
    gap = 1.0 - up_s - down_s
    radio = transfer_energy_mj(lte, 8000, 40, 1.0, 1.0, gap)
    assert est.breakdown["radio_mj"] == pytest.approx(radio)
    assert radio > lte.tail_mw * gap  # the tail dominates
    wait = 11.4 * (50.0 + est.cloud_ms) / 1000
    assert est.energy_mj == pytest.approx(2000.0 * 0.002 + radio + wait)


def test_promotion_when_the_radio_went_idle_between_windows() -> None:
    wifi = DeviceCostProfile("watch", 15.0, 400.0, 25.0, Radio.WIFI)
    cat = make_catalog([1.0, 1.0], [400, 400], window_s=2.0)
    est = estimate(cat, wifi, LinkState(10.0, 20.0), CloudState(), Choice(0))
    model = radio_model(Radio.WIFI)
    assert est.breakdown["promotion_ms"] == pytest.approx(model.promotion_s * 1000)
    assert est.transfer_ms == pytest.approx(
        model.promotion_s * 1000 + est.breakdown["upload_ms"] + 20.0 + est.breakdown["download_ms"]
    )
    assert est.breakdown["radio_mj"] >= model.full_tail_mj + model.promotion_mw * model.promotion_s


@pytest.mark.parametrize(("radio", "window_s"), [(Radio.LTE, 1.0), (Radio.WIFI, 1.0), (Radio.THREEG, 2.56)])
def test_radio_energy_is_the_steady_state_of_the_energy_meter(radio: Radio, window_s: float) -> None:
    device = DeviceCostProfile("d", 1.0, 1000.0, 0.0, radio)
    cat = make_catalog([1.0, 1.0], [20_000, 4_000], window_s=window_s, result_bytes=24)
    link = LinkState(2.0, 30.0)
    est = estimate(cat, device, link, CloudState(), Choice(1))
    meter = RadioEnergyMeter(radio_model(radio))
    charges = [meter.record(i * window_s, 4_000, 2.0, 24, 2.0) for i in range(4)]
    assert est.breakdown["radio_mj"] == pytest.approx(charges[-1])


def test_zero_bandwidth_makes_offloading_infinite_but_not_local() -> None:
    cat = make_catalog([1.0, 2.0], [400, 80])
    grid = estimate_grid(cat, DEVICE, [LinkState(0.0, 40.0)], CloudState())
    for m, choice in enumerate(grid.choices):
        est = grid.estimate(0, m)
        if choice.cut == cat.n_stages:
            assert math.isfinite(est.total_ms) and math.isfinite(est.energy_mj)
        else:
            assert math.isinf(est.total_ms) and math.isinf(est.energy_mj)


def test_telemetry_replaces_the_profile_per_stage_once_it_has_enough_samples() -> None:
    cat = make_catalog([1.0, 2.0, 3.0], [400, 800, 40], level_factors={0.5: [0.5, 1.0, 0.5]})
    tel = TelemetryStats(stage_ms=(10.0, 20.0, 30.0), samples=(100, 5, 30))
    ms, source = device_stage_ms(cat, DEVICE, tel, min_telemetry_samples=30)
    assert ms == (10.0, 4.0, 30.0) and source == "telemetry 2/3 stages"
    assert device_stage_ms(cat, DEVICE, None)[1] == "profile x2"
    full = estimate(cat, DEVICE, LinkState(1.0, 10.0), CloudState(), Choice(2), tel, min_telemetry_samples=30)
    assert full.device_ms == pytest.approx(14.0)
    # a compressed front scales the measured front by the host's compressed/uncompressed ratio
    half = estimate(cat, DEVICE, LinkState(1.0, 10.0), CloudState(), Choice(2, 0.5), tel, min_telemetry_samples=30)
    assert half.device_ms == pytest.approx(14.0 * (0.5 + 2.0) / 3.0)
    with pytest.raises(ConfigError, match="stages"):
        device_stage_ms(cat, DEVICE, TelemetryStats((1.0,), (100,)))


def test_measured_cloud_latency_beats_the_speedup_guess() -> None:
    cat = make_catalog([1.0, 2.0, 3.0], [400, 800, 40])
    measured = CloudState(stage_ms={"synthetic": (0.1, 0.2, 0.3)}, speedup_vs_host=100.0)
    est = estimate(cat, DEVICE, LinkState(10.0, 0.0), measured, Choice(1))
    assert est.breakdown["cloud_compute_ms"] == pytest.approx(0.5)
    with pytest.raises(ConfigError, match="has 2 stages"):
        CloudState(stage_ms={"synthetic": (0.1, 0.2)}).stage_latency_ms(cat)


def test_accuracy_adds_the_level_and_codec_drops() -> None:
    cat = make_catalog(
        [1.0, 2.0],
        [400, 80],
        level_factors={0.5: [0.5, 0.5]},
        level_drops={0.5: [0.0, 0.02, 0.05]},
        codec_drops={Codec.INT8: [0.03, 0.01]},
        base=0.9,
    )
    link, cloud = LinkState(1.0, 1.0), CloudState()
    est = estimate(cat, DEVICE, link, cloud, Choice(1, 0.5, Codec.INT8))
    assert est.accuracy == pytest.approx(0.9 - 0.02 - 0.01)
    assert est.breakdown["accuracy_loss_points"] == pytest.approx(3.0)
    assert estimate(cat, DEVICE, link, cloud, Choice(2, 0.5)).accuracy == pytest.approx(0.85)
    assert estimate(cat, DEVICE, link, cloud, Choice(0, 1.0, Codec.INT8)).accuracy == pytest.approx(0.87)


def test_inputs_are_checked() -> None:
    with pytest.raises(ConfigError, match="bandwidth_mbps"):
        LinkState(-1.0, 10.0)
    with pytest.raises(ConfigError, match="speed_factor"):
        DeviceCostProfile("x", 0.0, 1.0, 1.0, Radio.LTE)
    with pytest.raises(ConfigError, match="unknown radio"):
        DeviceCostProfile("x", 1.0, 1.0, 1.0, "5g")  # type: ignore[arg-type]
    assert DeviceCostProfile("x", 1.0, 1.0, 1.0, "wifi").radio_name == "wifi"  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="Choice.level"):
        Choice(1, 0.0)
    with pytest.raises(ConfigError, match="at least one link"):
        estimate_grid(make_catalog([1.0, 1.0], [4, 4]), DEVICE, [], CloudState())
