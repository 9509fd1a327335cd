"""Model catalog: what build_catalog measures (and reuses) on a toy model, JSON and file round trips."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from pipelines.bottleneck import Encoder, Quantizer
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


# --- codecs that exist only at some cuts (ans at a bottleneck) ---------------------------------


def bottleneck_model() -> StagedModel:
    torch.manual_seed(0)
    encoder = Encoder(nn.Sequential(nn.Conv1d(6, 4, 5, padding=2), nn.MaxPool1d(2)), Quantizer(4, 7))
    stages = [
        ("encoder", encoder),  # cut 1 carries a quantised code (4 x 16 symbols)
        ("decoder", nn.Sequential(nn.Conv1d(4, 16, 3, padding=1), nn.ReLU(), nn.Flatten())),
        ("head", nn.Linear(16 * 16, 4)),
    ]
    return StagedModel("toy_bn", stages, (6, 32), ["a", "b", "c", "d"])


def test_toy_without_a_bottleneck_has_no_ans(built: tuple[ModelCatalog, Recorder, StagedModel]) -> None:
    cat, rec, _ = built
    assert [c.codec for c in cat.codecs] == [Codec.FP32, Codec.FP16, Codec.INT8]
    assert all(c.available is None and "available" not in c.to_dict() for c in cat.codecs)
    assert all(codec is not Codec.ANS for _, codec in rec.codec_calls)
    with pytest.raises(ModelError, match="has no codec 'ans'; known: fp32, fp16, int8"):
        cat.codec(Codec.ANS)


def test_ans_is_measured_only_at_the_bottleneck_and_round_trips(tmp_path: Path) -> None:
    model = bottleneck_model()
    rec = Recorder(model)
    coded: list[tuple[int, Codec]] = []

    def coded_bytes(m: StagedModel, k: int, codec: Codec) -> float:
        coded.append((k, codec))
        return 20.25  # mean bytes per window: rounded up to whole bytes in the catalog

    cat = build_catalog(model, rec.evaluate, rec.with_codec, levels=(1.0,), repeats=1, warmup=0, window_s=1.0,
                        entropy_coded_bytes=coded_bytes)  # fmt: skip
    assert coded == [(1, Codec.ANS)] and (1, Codec.ANS) in rec.codec_calls
    assert {k for k, c in rec.codec_calls if c is Codec.ANS} == {1}
    ans = cat.codec("ans")
    assert ans.available == (False, True, False, True)  # cut 3 is fully local: nothing to carry
    assert [ans.available_at(k) for k in range(4)] == [False, True, False, True]
    assert ans.activation_bytes == (0, 21, 0, 0) and ans.accuracy == (0.0, 0.9, 0.0, cat.base_accuracy)
    fp32 = cat.codec("fp32")
    assert fp32.available is None and all(fp32.available_at(k) for k in range(4))
    assert fp32.activation_bytes[1] == encoded_nbytes((1, 4, 16), "fp32")
    d = ans.to_dict()
    assert d["available"] == [False, True, False, True] and "available" not in fp32.to_dict()
    again = ModelCatalog.from_dict(json.loads(json.dumps(cat.to_dict())))
    assert again == cat and again.codec("ans").available == ans.available
    save_catalog(cat, tmp_path)
    assert load_catalog("toy_bn", tmp_path).codec(Codec.ANS).available == (False, True, False, True)
    # a data-dependent codec cannot be measured without a way to code real windows
    with pytest.raises(ModelError, match=r"measuring ans needs entropy_coded_bytes\(model, k, codec\)"):
        build_catalog(model, rec.evaluate, rec.with_codec, levels=(1.0,), repeats=1, warmup=0, window_s=1.0)


def test_available_is_checked_and_all_true_means_every_cut() -> None:
    fp32 = CodecEntry(Codec.FP32, (16, 8, 0), (0.8, 0.8, 0.8))
    ans = _tiny(codecs=(fp32, CodecEntry(Codec.ANS, (0, 3, 0), (0.0, 0.8, 0.8), (False, True, True))))
    assert ans.codec(Codec.ANS).available == (False, True, True)
    every = _tiny(codecs=(fp32, CodecEntry(Codec.INT8, (4, 2, 0), (0.8, 0.8, 0.8), (True, True, True))))
    assert every.codec(Codec.INT8).available is None  # normalised: every cut
    assert "available" not in every.codec(Codec.INT8).to_dict()
    with pytest.raises(ModelError, match=r"available needs 3 entries \(cuts 0..2\)"):
        _tiny(codecs=(fp32, CodecEntry(Codec.ANS, (0, 3, 0), (0.0, 0.8, 0.8), (False, True))))
    with pytest.raises(ModelError, match=r"cut 2 \(fully local, nothing sent\) is always available"):
        _tiny(codecs=(fp32, CodecEntry(Codec.ANS, (0, 3, 0), (0.0, 0.8, 0.8), (False, True, False))))


@pytest.mark.parametrize("name", ["fsdd_speaker", "fsdd_digit", "uci_har"])
def test_shipped_catalogs_carry_ans_at_the_bottleneck_only(name: str) -> None:
    cat = load_catalog(name)
    n = cat.n_stages
    assert n == 6 and cat.stage_names[:2] == ("encoder", "decoder")
    ans = cat.codec(Codec.ANS)
    assert ans.available == (False, True) + (False,) * (n - 2) + (True,)
    int8 = cat.codec(Codec.INT8)
    assert 0 < ans.activation_bytes[1] < int8.activation_bytes[1]  # fewer than a byte per symbol
    assert ans.accuracy[1] == pytest.approx(cat.base_accuracy)  # lossless at the code
