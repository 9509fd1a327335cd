"""The fleet runner's pure parts: simulated compute and radio, recordings, fronts, broker figures."""

from __future__ import annotations

import asyncio
import math
from dataclasses import replace
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry, Histogram

from cloud.controller.costmodel import Choice, CloudState, LinkState, device_prep_ms, estimate
from cloud.wiring import load_catalogs
from edge.sources import RecordedWindow
from pipelines.catalog import ModelCatalog, load_catalog
from pipelines.codecs import Codec
from pipelines.compress import compress_front_at_level
from pipelines.devices import DEVICE_CLASSES
from pipelines.training import load_trained
from simulators.fleet import (
    FleetRunner,
    ReferenceTime,
    _batch_delta,
    _batch_totals,
    compressed_fronts,
    cost_profile,
    device_windows,
    unfit_fronts,
    usable_levels,
)
from simulators.policies import Policy, policy_inputs
from splitsense.config import Config
from tests.unit.cloud.controller.synthetic import make_catalog


def test_reference_time_is_the_catalog_times_the_speed_factor() -> None:
    cat = replace(load_catalog("uci_har"), prep_ms=0.2, prep_ops=1152)
    ref = ReferenceTime(cat, speed_factor=100.0)
    assert ref(-1, 1.0, 123.0) == pytest.approx(20.0)  # the catalog's preprocessing, whatever the host measured
    for i in range(cat.n_stages):
        assert ref(i, 1.0, 9.9) == pytest.approx(cat.stage_latency_ms[i] * 100.0)
    whole = sum(ref(i, 1.0, 0.0) for i in range(cat.n_stages))
    assert whole == pytest.approx(cat.levels[0].front_latency_ms[-1] * 100.0)
    low = cat.levels[-1]  # a compressed level: its own per-stage times
    assert sum(ref(i, low.energy_kept, 0.0) for i in range(cat.n_stages)) == pytest.approx(
        low.front_latency_ms[-1] * 100.0
    )
    assert ref(0, 0.123, 0.0) == ref(0, 1.0, 0.0)  # a level the catalog lacks: the uncompressed time


@pytest.mark.parametrize("cls", ["watch", "sensor_node"])  # speed factor; a MAC rate
@pytest.mark.parametrize("name", ["uci_har", "fsdd_digit", "fsdd_speaker+fsdd_digit"])
def test_reference_preprocessing_is_what_the_cost_model_charges(cls: str, name: str) -> None:
    cat = load_catalogs(("fsdd_speaker", "fsdd_digit", "uci_har"))[name]  # and their task group
    assert cat.prep_ms > 0 and cat.prep_ops > 0  # the shipped catalogs carry their preprocessing
    dev = DEVICE_CLASSES[cls]
    ref = ReferenceTime(cat, dev.speed_factor, dev.macs_per_s)
    want = device_prep_ms(cat, cost_profile(dev))
    assert want > 0 and ref(-1, 1.0, 0.0) == pytest.approx(want, rel=1e-12)
    if dev.macs_per_s:
        assert want == pytest.approx(cat.prep_ops / dev.macs_per_s * 1000.0)
    else:
        assert want == pytest.approx(cat.prep_ms * dev.speed_factor)
    local = estimate(cat, cost_profile(dev), LinkState(1.0, 50.0), CloudState(), Choice(cat.n_stages))
    stages = sum(ref(i, 1.0, 0.0) for i in range(cat.n_stages))
    assert local.device_ms == pytest.approx(ref(-1, 1.0, 0.0) + stages)  # the simulator charges the plan's figure


def test_device_windows_rotate_the_recording_and_keep_its_timing() -> None:
    base = [RecordedWindow(f"w{i}", i % 3, np.zeros(2, np.float32), 1.0 + i) for i in range(4)]
    out = device_windows(base, offset=2, duration_s=5.5, phase_s=0.3)
    assert [w.label for w in out] == [2, 0, 0, 1, 2]  # from position 2, wrapping
    assert [w.stream_t_s for w in out] == [1.0, 2.0, 3.0, 4.0, 5.0]  # past the end: one period on
    assert [w.window_id for w in out] == ["w2@0", "w3@1", "w0@2", "w1@3", "w2@4"]
    assert device_windows(base, 0, 1.2, 0.3) == []


def test_shared_fronts_equal_compressing_each_cut() -> None:
    model = load_trained("uci_har").model.eval()
    fronts = compressed_fronts(model, (1.0, 0.99))
    assert set(fronts) == {(k, 0.99) for k in range(1, model.n_stages + 1)}
    x = torch.randn(2, *model.input_shape, generator=torch.Generator().manual_seed(0))
    k = 4
    with torch.inference_mode():
        ours = fronts[(k, 0.99)](x)
        theirs = compress_front_at_level(model, k, 0.99).eval()(x)
    torch.testing.assert_close(ours, theirs)


def test_usable_levels_are_those_within_an_accuracy_budget() -> None:
    cfg = Config()
    cats = load_catalogs(tuple(cfg.serving.models))  # the models and their task groups
    levels = usable_levels(cfg, cats)
    for model, kept in levels.items():
        cat = cats[model]
        for lvl in cat.levels:
            if lvl.energy_kept >= 1.0:
                continue
            best_loss = min((cat.base_accuracy - a) * 100 for a in lvl.accuracy[1:])
            assert (lvl.energy_kept in kept) == (best_loss <= 1.0 + 1e-9)


def test_batch_figures_are_the_runs_delta() -> None:
    registry = CollectorRegistry()
    hist = Histogram("splitsense_broker_batch_size", "x", ("model", "cut"), buckets=(1, 2, 4, 8), registry=registry)
    hist.labels("m", "0").observe(1)
    before = _batch_totals(registry)
    for size in (1, 3, 3, 8):
        hist.labels("m", "0").observe(size)
    hist.labels("n", "2").observe(2)
    delta = _batch_delta(before, _batch_totals(registry))
    assert delta["tail_calls"] == 5 and delta["windows_batched"] == 17
    assert delta["mean_batch_size"] == pytest.approx(3.4)
    assert delta["histogram"] == {"<=1": 1, "<=2": 1, "<=4": 2, "<=8": 1}
    assert delta["p50_batch_size_le"] == 4.0 and delta["p95_batch_size_le"] == 8.0
    empty = _batch_delta(before, before)
    assert empty["tail_calls"] == 0 and empty["mean_batch_size"] is None
    assert not math.isnan(float(delta["mean_batch_size"]))


# ---------------------------------------------------------------------------------------------
# Policies that need memory the device lacks; cloud_input's forced choice


def _small_catalog() -> ModelCatalog:
    return make_catalog(
        [1.0, 2.0, 3.0],
        [4000, 8000, 400],
        level_factors={0.5: [0.5, 0.5, 0.5]},
        codec_drops={Codec.FP16: [0.0, 0.0, 0.0], Codec.INT8: [0.02, 0.0, 0.0]},
    )


def test_unfit_fronts_asks_the_device_class_for_every_cut_and_level(monkeypatch: pytest.MonkeyPatch) -> None:
    import simulators.fleet as fleet

    cat = _small_catalog()
    watch = DEVICE_CLASSES["watch"]
    asked: list[tuple[str, int, float]] = []

    def front_fits(device: Any, catalog: ModelCatalog, cut: int, level: float) -> str | None:
        asked.append((device.name, cut, level))
        return f"cut {cut} at {level:g} needs more RAM" if cut >= 2 and level == 1.0 else None

    monkeypatch.setattr(fleet, "front_fits", front_fits)
    assert unfit_fronts(watch, cat) == {(2, 1.0): "cut 2 at 1 needs more RAM", (3, 1.0): "cut 3 at 1 needs more RAM"}
    assert sorted(asked) == sorted(("watch", k, lvl) for k in (1, 2, 3) for lvl in (1.0, 0.5))  # never cut 0
    monkeypatch.undo()
    assert unfit_fronts(watch, cat) == {}  # the real memory model: a watch holds this toy model


def _runner_with(unfit: dict[str, dict[tuple[int, float], str]]) -> FleetRunner:
    cfg = Config()
    runner = FleetRunner(cfg, backend="in_process")
    cat = _small_catalog()
    for cls in cfg.simulator.device_classes:
        dev = DEVICE_CLASSES[cls]
        runner.inputs[cls] = policy_inputs(
            cat, cost_profile(dev), cfg.planner.classes[cls], 20.0, CloudState(overhead_ms=1.0), unfit.get(cls)
        )
    return runner


def test_infeasible_classes_per_policy() -> None:
    runner = _runner_with({"watch": {(3, 1.0): "2 MB of weights, 256 KB of RAM"}, "phone": {(1, 0.5): "x"}})
    assert set(runner.infeasible(Policy.ALL_LOCAL)) == {"watch"}
    assert "256 KB of RAM" in runner.infeasible(Policy.ALL_LOCAL)["watch"]
    for policy in Policy:
        if policy is not Policy.ALL_LOCAL:
            assert runner.infeasible(policy) == {}, policy
    assert FleetRunner(Config()).infeasible(Policy.ALL_LOCAL) == {}  # before the catalogs are read


def test_cloud_input_forces_the_input_with_the_best_codec() -> None:
    runner = _runner_with({})
    spec = SimpleNamespace(device_class="watch")
    choose = runner._chooser(Policy.CLOUD_INPUT, spec, None, 0.0, 0.0)  # type: ignore[arg-type]
    assert choose is not None
    forced = choose()
    assert forced is not None
    # the watch's accuracy budget (1 point) rules out int8 (-2 points): fp16 is the smallest left
    assert (forced.cut, forced.codec, forced.level) == (0, Codec.FP16, 1.0)
    assert forced.why.startswith("policy cloud_input")


async def test_the_ledger_books_exactly_the_energy_the_device_radio_state_charged() -> None:
    """Window radio energy + the overhead no window carries (telemetry, the final tail) equals the
    device radio state's total; the windows carry exactly the offloads' energy."""
    import time as _time

    from edge.radio import TrafficKind
    from edge.runtime import EdgeDevice
    from simulators.fleet import _Ledger
    from simulators.hardware import SimulatedHardware
    from simulators.link import ShapingSchedule
    from simulators.scenario import DeviceSpec
    from simulators.traces import Trace
    from tests.unit.edge.test_runtime import MODEL, FakeTransport, config, plan_set, row, trained, windows

    trace = Trace.constant(2.0)
    schedule = ShapingSchedule(trace)
    zero = _time.monotonic()
    hw = SimulatedHardware(speed_factor=1.0, schedule=schedule, link_zero=lambda: zero)
    device = EdgeDevice(
        config(default_cut=3, radio="wifi", telemetry_period_s=0.05, deadline_ms=2000.0),
        trained(MODEL),
        FakeTransport(),
        plan_set(1, row(1, Codec.ANS)),
        hardware=hw,
    )
    spec = DeviceSpec(0, "d0", "phone", MODEL, trace, 0.0, 0, 0.0, 0)
    out: list[Any] = []
    ledger = _Ledger("adaptive", spec, DEVICE_CLASSES["phone"], 6, schedule, lambda: zero, zero, out, _NoProgress())
    ledger.device = device
    now = _time.monotonic()

    async def paced() -> Any:
        for i, w in enumerate(windows(MODEL, 6, t_emit=now)):
            await asyncio.sleep(0.12 if i else 0.0)  # past WiFi's 238 ms tail every other window
            yield replace(w, window_id=f"{w.window_id}@{i}")  # the fleet's ids: recording id @ index

    await device.run(ledger.watch(paced()), progress=ledger.on_result)  # type: ignore[arg-type]
    end = _time.monotonic()
    ledger.close(end)
    assert len(ledger.mine) == 6 and all(r.mode == "offloaded" for r in ledger.mine)
    windows_mj = sum(r.radio_mj for r in ledger.mine)
    assert windows_mj == pytest.approx(device.radio.energy_by_kind[TrafficKind.OFFLOAD])
    assert device.radio.energy_by_kind[TrafficKind.TELEMETRY] > 0  # reports went and were charged
    pending_tail = device.radio.energy_until(end) - device.radio.total_mj
    assert ledger.overhead_mj == pytest.approx(
        device.radio.energy_by_kind[TrafficKind.TELEMETRY]
        + device.radio.energy_by_kind[TrafficKind.PROBE]
        + device.radio.energy_by_kind[TrafficKind.PING]
        + pending_tail
    )
    assert windows_mj + ledger.overhead_mj == pytest.approx(device.radio.energy_until(end))
    assert device.battery.capacity_mj - device.battery._left_mj == pytest.approx(
        device.radio.total_mj + sum(r.compute_mj for r in ledger.mine), rel=1e-6
    )


class _NoProgress:
    def window_done(self, policy: str, record: Any) -> None:
        pass
