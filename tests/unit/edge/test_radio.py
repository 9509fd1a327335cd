"""The device's one radio state: phases, promotions, tails and energy, on a scripted clock."""

from __future__ import annotations

import math

import pytest

from edge.radio import RadioPhase, RadioState, TrafficKind
from pipelines.power import RadioEnergyMeter, radio_model, tail_energy_mj, transfer_energy_mj, transfer_seconds

WIFI, LTE, THREEG, BLE = (radio_model(r) for r in ("wifi", "lte", "3g", "ble"))


class Clock:
    def __init__(self, t: float = 100.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def make(radio: str = "wifi", t: float = 100.0) -> tuple[RadioState, Clock]:
    clock = Clock(t)
    return RadioState(radio_model(radio), clock), clock


def call(radio: RadioState, clock: Clock, up: int, down: int, mbps: float, wait_s: float = 0.0) -> float:
    """One call starting now that waits its promotion, puts its bytes on the air at `mbps` and then
    waits `wait_s` connected; the clock ends at its end. Returns the energy it was charged."""
    ticket = radio.begin(TrafficKind.OFFLOAD)
    on_air = transfer_seconds(up, mbps) + transfer_seconds(down, mbps)
    clock.t += ticket.promotion_s + on_air + wait_s
    return radio.end(ticket, up, down, on_air_s=on_air).energy_mj


# --- phases ---------------------------------------------------------------------------------


def test_phases_over_one_call_idle_promoting_active_tail_idle() -> None:
    radio, clock = make("wifi")
    assert radio.phase() is RadioPhase.IDLE and radio.idle_gap_s() == math.inf
    assert radio.promotion_due_s() == WIFI.promotion_s
    ticket = radio.begin(TrafficKind.OFFLOAD)
    assert ticket.phase is RadioPhase.IDLE and ticket.promotion_s == WIFI.promotion_s and ticket.tail_mj == 0.0
    assert radio.promotions == 1 and radio.idle_gap_s() == 0.0
    clock.t += 0.05
    assert radio.phase() is RadioPhase.PROMOTING
    assert radio.promotion_due_s() == pytest.approx(WIFI.promotion_s - 0.05)  # what a second call would wait
    clock.t += 0.05
    assert radio.phase() is RadioPhase.ACTIVE and radio.promotion_due_s() == 0.0
    radio.end(ticket, 4000, 40, on_air_s=0.01)
    end = clock.t
    assert radio.phase() is RadioPhase.TAIL and radio.idle_gap_s() == 0.0
    assert radio.phase(end + WIFI.tail_s - 0.001) is RadioPhase.TAIL
    assert radio.promotion_due_s(end + WIFI.tail_s - 0.001) == 0.0
    assert radio.phase(end + WIFI.tail_s + 0.001) is RadioPhase.IDLE
    assert radio.promotion_due_s(end + WIFI.tail_s + 0.001) == WIFI.promotion_s
    clock.t = end + 1.0
    assert radio.phase() is RadioPhase.IDLE and radio.idle_gap_s() == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("radio_name", "inside_s", "after_s"),
    [
        ("wifi", 0.23, 0.25),  # 238 ms tail
        ("lte", 11.5, 11.7),  # 11.576 s tail
        ("3g", 8.8, 9.0),  # DCH 8.088 s + FACH 0.824 s
    ],
)
def test_promotion_only_after_the_whole_tail(radio_name: str, inside_s: float, after_s: float) -> None:
    model = radio_model(radio_name)
    for gap, promoted in ((inside_s, False), (after_s, True)):
        radio, clock = make(radio_name)
        call(radio, clock, 1000, 10, 5.0)
        clock.t += gap
        ticket = radio.begin(TrafficKind.OFFLOAD)
        assert ticket.phase is (RadioPhase.IDLE if promoted else RadioPhase.TAIL)
        assert ticket.promotion_s == (model.promotion_s if promoted else 0.0)
        assert ticket.tail_mj == pytest.approx(tail_energy_mj(model, gap))
        assert radio.promotions == 1 + promoted


def test_3g_tail_has_two_stages() -> None:
    radio, clock = make("3g")
    call(radio, clock, 1000, 10, 1.0)
    end = clock.t
    assert THREEG.tail2_s > 0 and THREEG.tail2_mw < THREEG.tail_mw
    in_fach = end + THREEG.tail_s + 0.5  # past DCH, inside FACH: still connected, no promotion
    assert radio.phase(in_fach) is RadioPhase.TAIL and radio.promotion_due_s(in_fach) == 0.0
    assert radio.energy_until(in_fach) - radio.total_mj == pytest.approx(
        THREEG.tail_mw * THREEG.tail_s + THREEG.tail2_mw * 0.5
    )
    assert radio.energy_until(end + 60.0) - radio.total_mj == pytest.approx(THREEG.full_tail_mj)
    assert radio.phase(end + THREEG.total_tail_s + 0.01) is RadioPhase.IDLE


def test_ble_has_no_tail_and_promotes_after_any_gap() -> None:
    radio, clock = make("ble")
    assert BLE.total_tail_s == 0.0
    call(radio, clock, 500, 0, 0.5)
    end = clock.t
    assert radio.energy_until(end + 10.0) == radio.total_mj  # no tail to pay
    assert radio.phase(end + 0.001) is RadioPhase.IDLE
    back_to_back = radio.begin(TrafficKind.OFFLOAD)  # at the very end of the last: still connected
    assert back_to_back.promotion_s == 0.0
    radio.end(back_to_back, 10)
    clock.t += 0.001
    assert radio.begin(TrafficKind.OFFLOAD).promotion_s == BLE.promotion_s == pytest.approx(0.015)
    assert radio.promotions == 2


def test_overlapping_calls_pay_one_promotion() -> None:
    radio, clock = make("wifi")
    first = radio.begin(TrafficKind.OFFLOAD)
    clock.t += 0.03
    second = radio.begin(TrafficKind.PROBE)  # joins the promotion in progress
    assert second.phase is RadioPhase.PROMOTING
    assert second.promotion_s == pytest.approx(WIFI.promotion_s - 0.03)  # waits what is left of it
    assert radio.promotions == 1
    clock.t += 0.1
    a = radio.end(first, 2000, 20, on_air_s=0.005)
    assert radio.phase() is RadioPhase.ACTIVE  # the second is still in flight
    clock.t += 0.05
    b = radio.end(second, 2000, 20, on_air_s=0.005)
    assert a.promotion_mj == pytest.approx(WIFI.promotion_mw * WIFI.promotion_s)
    assert b.promotion_mj == 0.0 and b.tail_mj == 0.0  # charged once, to the call that started it
    third = radio.begin(TrafficKind.OFFLOAD)  # right after: inside the tail
    assert third.promotion_s == 0.0 and radio.promotions == 1
    assert radio.energy_by_kind[TrafficKind.PROBE] == pytest.approx(b.energy_mj)


# --- energy ---------------------------------------------------------------------------------


@pytest.mark.parametrize("radio_name", ["wifi", "lte", "3g", "ble"])
def test_back_to_back_calls_cost_what_the_energy_meter_says(radio_name: str) -> None:
    # Sequential transfers with no wait beyond the promotion and the bytes on the air: the radio
    # state and pipelines.power agree (tail over the gap + promotion + active energy).
    model = radio_model(radio_name)
    radio, clock = make(radio_name, t=0.0)
    meter = RadioEnergyMeter(model)
    mbps = 3.0
    script = [(0.0, 4000, 40), (0.1, 300, 8), (0.35, 16000, 40), (5.0, 4000, 40), (30.0, 300, 8), (30.01, 60, 8)]
    for start, up, down in script:
        clock.t = max(clock.t, start)
        gap = radio.idle_gap_s()
        charged = call(radio, clock, up, down, mbps)
        expected = meter.record(start, up, mbps, down, mbps)
        assert charged == pytest.approx(expected, rel=1e-9)
        assert charged == pytest.approx(transfer_energy_mj(model, up, down, mbps, mbps, gap), rel=1e-9)
        assert meter.busy_until_s == pytest.approx(clock.t)
    assert radio.total_mj == pytest.approx(meter.total_mj, rel=1e-9)
    assert radio.promotions == meter.promotions
    for later in (0.0, 0.1, 1.0, 20.0):
        assert radio.energy_until(clock.t + later) == pytest.approx(meter.energy_until(clock.t + later), rel=1e-9)


def test_waiting_connected_inside_a_call_is_charged_at_tail_power() -> None:
    # What the meter does not know: the device waits for the cloud's answer with the radio connected.
    radio, clock = make("lte", t=0.0)
    wait = 0.120
    charged = call(radio, clock, 4000, 40, 5.0, wait_s=wait)
    bare = transfer_energy_mj(LTE, 4000, 40, 5.0, 5.0, math.inf)
    assert charged == pytest.approx(bare + LTE.tail_mw * wait)
    t = radio.transfers[-1]
    assert t.connected_mj == pytest.approx(LTE.tail_mw * wait)
    assert t.promotion_mj == pytest.approx(LTE.promotion_mw * LTE.promotion_s)
    assert t.elapsed_s == pytest.approx(LTE.promotion_s + t.on_air_s + wait)
    assert t.energy_mj == pytest.approx(t.tail_mj + t.promotion_mj + t.active_mj + t.connected_mj)


def test_without_on_air_time_the_bytes_go_at_the_given_rate() -> None:
    radio, clock = make("wifi", t=0.0)
    ticket = radio.begin(TrafficKind.TELEMETRY)
    clock.t += 0.2
    t = radio.end(ticket, 10_000, 0, mbps=2.0)
    assert t.on_air_s == pytest.approx(transfer_seconds(10_000, 2.0))
    # no rate either: nothing is known to have been on the air, the whole call is connected wait
    ticket = radio.begin(TrafficKind.TELEMETRY)
    clock.t += 0.2
    t = radio.end(ticket, 10_000, 0)
    assert t.on_air_s == 0.0 and t.connected_mj == pytest.approx(WIFI.tail_mw * 0.2)
    # the platform's figure is capped at the call's time less its promotion
    ticket = radio.begin(TrafficKind.OFFLOAD)
    clock.t += 0.05
    assert radio.end(ticket, 10, 0, on_air_s=5.0).on_air_s == pytest.approx(0.05)


def test_energy_until_includes_the_pending_tail_and_kinds_add_up() -> None:
    radio, clock = make("lte", t=0.0)
    assert radio.energy_until(50.0) == 0.0
    call(radio, clock, 4000, 40, 5.0)
    clock.t += 1.0
    ticket = radio.begin(TrafficKind.TELEMETRY)
    assert radio.energy_until(clock.t + 5.0) == radio.total_mj  # busy: no tail pending
    clock.t += 0.08
    radio.end(ticket, 300, 8, on_air_s=0.001)
    end = clock.t
    assert radio.energy_until(end) == radio.total_mj
    assert radio.energy_until(end - 1.0) == radio.total_mj
    assert radio.energy_until(end + 2.0) == pytest.approx(radio.total_mj + LTE.tail_mw * 2.0)
    assert radio.energy_until(end + 100.0) == pytest.approx(radio.total_mj + LTE.full_tail_mj)
    assert sum(radio.energy_by_kind.values()) == pytest.approx(radio.total_mj)
    assert radio.energy_by_kind[TrafficKind.TELEMETRY] == pytest.approx(radio.transfers[-1].energy_mj)
    assert radio.transfers[-1].tail_mj == pytest.approx(LTE.tail_mw * 1.0)  # the first call's tail over the gap


# --- signals and checks ---------------------------------------------------------------------


def test_link_signal_changes_are_reported_once() -> None:
    radio, clock = make("wifi")
    assert radio.link_up and radio.link_changed_s is None
    assert radio.set_link(True) is False
    clock.t = 105.0
    assert radio.set_link(False) is True and not radio.link_up and radio.link_changed_s == 105.0
    assert radio.set_link(False, now=106.0) is False and radio.link_changed_s == 105.0
    assert radio.set_link(True, now=107.0) is True and radio.link_up and radio.link_changed_s == 107.0


def test_hint_is_kept() -> None:
    assert RadioState(BLE, Clock(), hint_mbps=0.8).hint_mbps == 0.8
    assert RadioState(BLE, Clock()).hint_mbps is None


def test_bad_calls_are_refused() -> None:
    radio, clock = make("wifi")
    ticket = radio.begin(TrafficKind.OFFLOAD)
    for args, kw in (((-1, 0), {}), ((1.5, 0), {}), ((True, 0), {}), ((10, -1), {}), ((10, 0), {"on_air_s": math.nan})):
        with pytest.raises(ValueError):
            radio.end(ticket, *args, **kw)  # type: ignore[arg-type]
    assert radio.phase() is RadioPhase.PROMOTING and radio.total_mj == 0.0  # a refused end changes nothing
    with pytest.raises(ValueError):
        radio.begin("carrier pigeon")
    radio.end(ticket, 10, 0)
    with pytest.raises(ValueError, match="without a matching begin"):
        radio.end(ticket, 10, 0)
