"""Model catalog: what build_catalog measures (and reuses) on a toy model, JSON and file round trips."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from pipelines.catalog import (
    CodecEntry,
    LevelEntry,
    ModelCatalog,
    build_catalog,
    catalog_path,
    load_catalog,
    save_catalog,
)
from pipelines.codecs import Codec, encoded_nbytes
from pipelines.compress import LowRank, compress_front_at_level
from pipelines.stages import StagedModel
from splitsense.errors import ModelError

LEVELS = (1.0, 0.9, 0.5)


def toy_model() -> StagedModel:
    torch.manual_seed(0)
    stages = [
        ("conv1", nn.Sequential(nn.Conv1d(6, 32, 5, padding=2), nn.ReLU())),
        ("pool", nn.Sequential(nn.MaxPool1d(2), nn.Flatten())),  # nothing to compress: reused
        ("fc", nn.Sequential(nn.Linear(32 * 16, 64), nn.ReLU())),
        ("head", nn.Linear(64, 4)),
    ]
    return StagedModel("toy", stages, (6, 32), ["a", "b", "c", "d"])


class Recorder:
    """Deterministic 'accuracy': agreement with the uncompressed model on a fixed batch."""

    def __init__(self, model: StagedModel) -> None:
        self.x = torch.randn((16, 6, 32), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            self.ref = model.eval()(self.x).argmax(1)
        self.evaluate_calls = 0
        self.codec_calls: list[tuple[int, Codec]] = []

    def evaluate(self, m: StagedModel) -> float:
        self.evaluate_calls += 1
        with torch.no_grad():
            return float((m(self.x).argmax(1) == self.ref).float().mean()) * 0.9  # base 0.9

    def with_codec(self, m: StagedModel, k: int, codec: Codec) -> float:
        self.codec_calls.append((k, codec))
        return 0.9 - (0.01 if codec is Codec.INT8 else 0.0)


@pytest.fixture(scope="module")
def built() -> tuple[ModelCatalog, Recorder, StagedModel]:
    model = toy_model()
    rec = Recorder(model)
    cat = build_catalog(model, rec.evaluate, rec.with_codec, levels=LEVELS, repeats=2, warmup=0, window_s=2.0)
    return cat, rec, model


def test_stages_shapes_and_wire_bytes(built: tuple[ModelCatalog, Recorder, StagedModel]) -> None:
    cat, _, model = built
    assert cat.model == "toy" and cat.n_stages == 4 and cat.stage_names == ("conv1", "pool", "fc", "head")
    assert cat.activation_shapes == ((6, 32), (32, 32), (512,), (64,), (4,))
    assert cat.result_bytes == 4 * 4 and cat.window_s == 2.0 and cat.base_accuracy == pytest.approx(0.9)
    assert [c.codec for c in cat.codecs] == [Codec.FP32, Codec.FP16, Codec.INT8]
    for entry in cat.codecs:
        expected = [encoded_nbytes(cat.activation_shapes[k], entry.codec) for k in range(4)] + [0]
        assert list(entry.activation_bytes) == expected
    assert cat.stage_macs[1] == 0 and cat.stage_macs[2] == 512 * 64
    assert cat.stage_params[2] == 512 * 64 + 64
    assert all(v > 0 for v in cat.stage_latency_ms)
    assert cat.cut_name(0) == "input" and cat.cut_name(3) == "fc"
    _ = model


def test_levels_sorted_and_uncompressed_level_is_the_profile(
    built: tuple[ModelCatalog, Recorder, StagedModel],
) -> None:
    cat, _, _ = built
    assert [e.energy_kept for e in cat.levels] == [1.0, 0.9, 0.5]
    top = cat.levels[0]
    assert top.accuracy == (cat.base_accuracy,) * 5
    running = 0.0
    for k in range(5):
        assert top.front_latency_ms[k] == pytest.approx(running)
        running += cat.stage_latency_ms[k] if k < 4 else 0.0
    assert top.front_params[4] == sum(cat.stage_params)


def test_compressed_levels_shrink_changed_stages_and_reuse_the_rest(
    built: tuple[ModelCatalog, Recorder, StagedModel],
) -> None:
    cat, _, model = built
    for energy in (0.9, 0.5):
        full = compress_front_at_level(model, 4, energy)
        changed = [any(isinstance(m, LowRank) for m in s.modules()) for s in full.stages]
        entry = cat.level(energy)
        assert entry.front_params[0] == 0 and entry.accuracy[0] == cat.base_accuracy
        for k in range(1, 5):
            stage_params = entry.front_params[k] - entry.front_params[k - 1]
            stage_ms = entry.front_latency_ms[k] - entry.front_latency_ms[k - 1]
            if changed[k - 1]:
                assert stage_params < cat.stage_params[k - 1]
            else:  # untouched stage: same params, same latency, same accuracy as the cut before
                assert stage_params == cat.stage_params[k - 1]
                assert stage_ms == pytest.approx(cat.stage_latency_ms[k - 1])
                assert entry.accuracy[k] == entry.accuracy[k - 1]
    assert not any(isinstance(m, LowRank) for m in compress_front_at_level(model, 4, 0.5).stages[1].modules())


def test_measures_accuracy_only_where_the_front_changes(
    built: tuple[ModelCatalog, Recorder, StagedModel],
) -> None:
    cat, rec, model = built
    expected = 1  # the uncompressed model
    for energy in (0.9, 0.5):
        full = compress_front_at_level(model, 4, energy)
        expected += sum(any(isinstance(m, LowRank) for m in s.modules()) for s in full.stages)
    assert rec.evaluate_calls == expected < 1 + 2 * 4
    # fp32 is exact and cut N encodes nothing: only fp16 and int8 at cuts 0..3 are evaluated
    assert sorted(rec.codec_calls) == sorted((k, c) for k in range(4) for c in (Codec.FP16, Codec.INT8))
    assert cat.codec(Codec.INT8).accuracy == (0.89, 0.89, 0.89, 0.89, cat.base_accuracy)
    assert cat.codec("fp32").accuracy == (cat.base_accuracy,) * 5


def test_json_and_file_round_trip(built: tuple[ModelCatalog, Recorder, StagedModel], tmp_path: Path) -> None:
    cat, _, _ = built
    again = ModelCatalog.from_dict(json.loads(json.dumps(cat.to_dict())))
    assert again == cat
    path = save_catalog(cat, tmp_path)
    assert path == catalog_path("toy", tmp_path) == tmp_path / "toy.catalog.json"
    assert load_catalog("toy", tmp_path) == cat


def test_load_errors_say_what_to_do(built: tuple[ModelCatalog, Recorder, StagedModel], tmp_path: Path) -> None:
    cat, _, _ = built
    with pytest.raises(ModelError, match="no catalog for model 'toy'"):
        load_catalog("toy", tmp_path)
    (tmp_path / "toy.catalog.json").write_text("{not json")
    with pytest.raises(ModelError, match="unreadable"):
        load_catalog("toy", tmp_path)
    data = cat.to_dict()
    data["format"] = 99
    with pytest.raises(ModelError, match="format"):
        ModelCatalog.from_dict(data)
    data = cat.to_dict()
    del data["stage_macs"]
    with pytest.raises(ModelError, match="malformed"):
        ModelCatalog.from_dict(data)
    save_catalog(cat, tmp_path)
    (tmp_path / "toy.catalog.json").rename(tmp_path / "other.catalog.json")
    with pytest.raises(ModelError, match="is for model 'toy'"):
        load_catalog("other", tmp_path)


def _tiny(**overrides: object) -> ModelCatalog:
    kw: dict[str, object] = {
        "model": "tiny",
        "stage_names": ("a", "b"),
        "stage_latency_ms": (1.0, 2.0),
        "stage_macs": (10, 20),
        "stage_params": (5, 6),
        "activation_shapes": ((4,), (2,), (3,)),
        "result_bytes": 12,
        "window_s": 1.0,
        "base_accuracy": 0.8,
        "levels": (LevelEntry(1.0, (0.0, 1.0, 3.0), (0, 5, 11), (0.8, 0.8, 0.8)),),
        "codecs": (CodecEntry(Codec.FP32, (16, 8, 0), (0.8, 0.8, 0.8)),),
    }
    kw.update(overrides)
    return ModelCatalog(**kw)  # type: ignore[arg-type]


def test_validation_names_the_problem() -> None:
    assert _tiny().n_stages == 2
    with pytest.raises(ModelError, match="must include 1.0"):
        _tiny(levels=(LevelEntry(0.5, (0.0, 1.0, 3.0), (0, 5, 11), (0.8, 0.8, 0.8)),))
    with pytest.raises(ModelError, match="base accuracy"):
        _tiny(levels=(LevelEntry(1.0, (0.0, 1.0, 3.0), (0, 5, 11), (0.8, 0.7, 0.8)),))
    with pytest.raises(ModelError, match="running sum"):
        _tiny(levels=(LevelEntry(1.0, (0.0, 2.0, 3.0), (0, 5, 11), (0.8, 0.8, 0.8)),))
    with pytest.raises(ModelError, match="must include fp32"):
        _tiny(codecs=(CodecEntry(Codec.FP16, (8, 4, 0), (0.8, 0.8, 0.8)),))
    with pytest.raises(ModelError, match="nothing crosses"):
        _tiny(codecs=(CodecEntry(Codec.FP32, (16, 8, 4), (0.8, 0.8, 0.8)),))
    with pytest.raises(ModelError, match="fp32 is exact"):
        _tiny(codecs=(CodecEntry(Codec.FP32, (16, 8, 0), (0.8, 0.7, 0.8)),))
    with pytest.raises(ModelError, match="stage_macs has 1 entries"):
        _tiny(stage_macs=(10,))
    with pytest.raises(ModelError, match="window_s"):
        _tiny(window_s=0.0)
