"""The radio power model: published constants, tail and promotion accounting, the meter."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipelines.power import (
    RADIO_MODELS,
    Radio,
    RadioEnergyMeter,
    RadioPowerModel,
    compute_energy_mj,
    promotion_delay_s,
    radio_model,
    tail_energy_mj,
    transfer_energy_mj,
)

LTE = radio_model(Radio.LTE)


def test_published_constants_are_huang_2012() -> None:
    # Huang et al., MobiSys 2012, Tables 3 and 4.
    assert (LTE.uplink_mw_per_mbps, LTE.downlink_mw_per_mbps, LTE.base_mw) == (438.39, 51.97, 1288.04)
    assert (LTE.promotion_s, LTE.promotion_mw) == (0.2601, 1210.7)
    assert (LTE.tail_s, LTE.tail_mw) == (11.576, 1060.0)
    g3 = radio_model("3g")
    assert (g3.uplink_mw_per_mbps, g3.base_mw, g3.tail_s, g3.tail_mw) == (868.98, 817.88, 8.0882, 803.9)
    assert (g3.tail2_s, g3.tail2_mw) == (0.8242, 601.3)
    wifi = radio_model("wifi")
    assert (wifi.uplink_mw_per_mbps, wifi.base_mw, wifi.tail_s, wifi.tail_mw) == (
        283.17,
        132.86,
        0.2381,
        119.3,
    )
    assert set(RADIO_MODELS) == set(Radio)
    for radio, model in RADIO_MODELS.items():
        assert ("nRF52840" if radio is Radio.BLE else "Huang") in model.source
    # Idle paging power from the DRX duty cycles: LTE ~20 mW, 3G ~4 mW, WiFi ~1.9 mW.
    assert LTE.idle_mw == pytest.approx(20.05, abs=0.05)
    assert g3.idle_mw == pytest.approx(4.06, abs=0.05)
    assert wifi.idle_mw == pytest.approx(1.90, abs=0.05)
    # Huang12's headline: LTE is far less efficient per bit than WiFi on the uplink.
    assert LTE.full_tail_mj > 100 * wifi.full_tail_mj


def test_unknown_radio_says_what_to_use() -> None:
    with pytest.raises(ValueError, match="wifi, lte, 3g"):
        radio_model("5g")


def test_model_refuses_negative_figures() -> None:
    with pytest.raises(ValueError, match="tail_s"):
        RadioPowerModel(Radio.LTE, 1, 1, 1, 0.1, 1, -1.0, 1, 1)


def test_compute_energy() -> None:
    assert compute_energy_mj(2000.0, 0.5) == 1000.0
    with pytest.raises(ValueError):
        compute_energy_mj(-1.0, 1.0)


def test_first_transfer_pays_promotion_and_no_tail() -> None:
    e = transfer_energy_mj(LTE, 125_000, 0, 1.0, 1.0, math.inf)  # 1 Mbit at 1 Mbit/s: 1 s
    expected = LTE.promotion_mw * LTE.promotion_s + LTE.uplink_mw_per_mbps * 1.0 + LTE.base_mw * 1.0
    assert e == pytest.approx(expected)


def test_back_to_back_within_tail_pays_no_promotion() -> None:
    gap = 2.0
    e = transfer_energy_mj(LTE, 125_000, 0, 1.0, 1.0, gap)
    assert promotion_delay_s(LTE, gap) == 0.0
    expected = LTE.tail_mw * gap + LTE.uplink_mw_per_mbps + LTE.base_mw
    assert e == pytest.approx(expected)


def test_far_apart_pays_promotion_and_full_tail() -> None:
    e = transfer_energy_mj(LTE, 125_000, 0, 1.0, 1.0, 60.0)
    expected = LTE.full_tail_mj + LTE.promotion_mw * LTE.promotion_s + LTE.uplink_mw_per_mbps + LTE.base_mw
    assert e == pytest.approx(expected)
    assert LTE.full_tail_mj == pytest.approx(1060.0 * 11.576)


def test_three_g_two_stage_tail() -> None:
    g3 = radio_model(Radio.THREEG)
    assert tail_energy_mj(g3, 5.0) == pytest.approx(803.9 * 5.0)
    assert tail_energy_mj(g3, 8.5) == pytest.approx(803.9 * 8.0882 + 601.3 * (8.5 - 8.0882))
    assert tail_energy_mj(g3, 100.0) == pytest.approx(g3.full_tail_mj)
    assert promotion_delay_s(g3, 8.5) == 0.0  # still in FACH
    assert promotion_delay_s(g3, 9.0) == g3.promotion_s


@given(
    small=st.integers(min_value=0, max_value=10**6),
    extra=st.integers(min_value=1, max_value=10**6),
    down=st.integers(min_value=0, max_value=10**6),
    mbps=st.floats(min_value=0.1, max_value=100.0),
    gap=st.floats(min_value=0.0, max_value=100.0),
)
def test_energy_grows_with_bytes(small: int, extra: int, down: int, mbps: float, gap: float) -> None:
    for radio in Radio:
        model = radio_model(radio)
        a = transfer_energy_mj(model, small, down, mbps, mbps, gap)
        b = transfer_energy_mj(model, small + extra, down, mbps, mbps, gap)
        c = transfer_energy_mj(model, small, down + extra, mbps, mbps, gap)
        assert b > a and c > a


def test_zero_bandwidth_with_bytes_is_refused() -> None:
    with pytest.raises(ValueError, match="bandwidth"):
        transfer_energy_mj(LTE, 10, 0, 0.0, 1.0, 1.0)


def test_meter_charges_tails_between_transfers() -> None:
    meter = RadioEnergyMeter(LTE)
    first = meter.record(0.0, 125_000, 1.0)  # ends at promotion + 1 s
    end_first = LTE.promotion_s + 1.0
    assert meter.busy_until_s == pytest.approx(end_first)
    second = meter.record(end_first + 3.0, 125_000, 1.0)  # inside the tail
    third = meter.record(100.0, 125_000, 1.0)  # long after the tail
    assert meter.promotions == 2 and meter.transfers == 3
    active = LTE.uplink_mw_per_mbps + LTE.base_mw
    promo = LTE.promotion_mw * LTE.promotion_s
    assert first == pytest.approx(promo + active)
    assert second == pytest.approx(LTE.tail_mw * 3.0 + active)
    assert third == pytest.approx(LTE.full_tail_mj + promo + active)
    assert meter.total_mj == pytest.approx(first + second + third)
    # The tail after the last transfer is charged only when asked, and capped.
    end_third = 100.0 + LTE.promotion_s + 1.0
    assert meter.energy_until(end_third + 1.0) == pytest.approx(meter.total_mj + LTE.tail_mw)
    assert meter.energy_until(1e6) == pytest.approx(meter.total_mj + LTE.full_tail_mj)


def test_meter_queues_overlapping_transfers_and_orders_time() -> None:
    meter = RadioEnergyMeter(radio_model(Radio.WIFI))
    meter.record(0.0, 125_000, 1.0)
    busy = meter.busy_until_s
    assert busy is not None
    meter.record(0.5, 125_000, 1.0)  # starts when the first ends: gap 0, no promotion
    assert meter.promotions == 1
    assert meter.busy_until_s == pytest.approx(busy + 1.0)
    with pytest.raises(ValueError, match="time order"):
        meter.record(0.1, 1, 1.0)


def test_meter_matches_per_transfer_sum_for_sparse_events() -> None:
    model = radio_model(Radio.THREEG)
    meter = RadioEnergyMeter(model)
    times = [0.0, 1.0, 30.0, 31.0, 32.0, 200.0]
    total = 0.0
    prev_end: float | None = None
    for t in times:
        gap = math.inf if prev_end is None else max(t - prev_end, 0.0)
        total += transfer_energy_mj(model, 50_000, 10_000, 2.0, 4.0, gap)
        start = t if prev_end is None else max(t, prev_end)
        prev_end = start + promotion_delay_s(model, gap) + 50_000 * 8 / 2e6 + 10_000 * 8 / 4e6
        meter.record(t, 50_000, 2.0, 10_000, 4.0)
    assert meter.total_mj == pytest.approx(total)


def test_ble_model_is_the_nrf52840s() -> None:
    ble = radio_model("ble")
    assert ble.radio is Radio.BLE and "nRF52840" in ble.source
    # on the air at the 1M PHY: TX 4.8 mA / RX 4.6 mA at 3 V, plus the peer's acknowledgements
    assert 14.4 < ble.uplink_mw_per_mbps < 20 and 13.8 < ble.downlink_mw_per_mbps < 20
    # a transfer waits for the next connection event (half a 30 ms interval); no tail
    assert ble.promotion_s == pytest.approx(0.015) and ble.total_tail_s == 0 and ble.full_tail_mj == 0
    assert promotion_delay_s(ble, 0.5) == pytest.approx(0.015) and promotion_delay_s(ble, 0.0) == 0
    # empty connection events keep the link: ~0.2 mW, two orders of magnitude under LTE's paging
    assert ble.idle_mw == pytest.approx(0.21, abs=0.01) and ble.idle_mw < LTE.idle_mw / 50
    # a 4 KB window costs well under a millijoule, ~1000x less than over LTE
    ble_mj = transfer_energy_mj(ble, 4040, 40, 0.7, 0.7, math.inf)
    assert ble_mj < 1.0 and transfer_energy_mj(LTE, 4040, 40, 0.7, 0.7, math.inf) > 300 * ble_mj
