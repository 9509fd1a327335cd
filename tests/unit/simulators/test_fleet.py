"""The fleet runner's pure parts: simulated compute and radio, recordings, fronts, broker figures."""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry, Histogram

from cloud.controller.costmodel import CloudState
from cloud.stack import load_catalogs
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
    cat = load_catalog("uci_har")
    ref = ReferenceTime(cat, prep_ms=0.2, speed_factor=100.0)
    assert ref(-1, 1.0, 123.0) == pytest.approx(20.0)  # preprocessing, whatever the host measured
    for i in range(cat.n_stages):
        assert ref(i, 1.0, 9.9) == pytest.approx(cat.stage_latency_ms[i] * 100.0)
    whole = sum(ref(i, 1.0, 0.0) for i in range(cat.n_stages))
    assert whole == pytest.approx(cat.levels[0].front_latency_ms[-1] * 100.0)
    low = cat.levels[-1]  # a compressed level: its own per-stage times
    assert sum(ref(i, low.energy_kept, 0.0) for i in range(cat.n_stages)) == pytest.approx(
        low.front_latency_ms[-1] * 100.0
    )
    assert ref(0, 0.123, 0.0) == ref(0, 1.0, 0.0)  # a level the catalog lacks: the uncompressed time


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
