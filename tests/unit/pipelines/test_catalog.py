"""Model catalog: what build_catalog measures (and reuses) on a toy model, JSON and file round trips."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn

from pipelines.bottleneck import Encoder, Quantizer
from pipelines.catalog import (
    CodecEntry,
    DroppedLevel,
    LevelEntry,
    ModelCatalog,
    build_catalog,
    catalog_path,
    drop_dominated_levels,
    load_catalog,
    save_catalog,
    update_prep,
)
from pipelines.codecs import Codec, encoded_nbytes
from pipelines.compress import (
    LowRank,
    compress_front_at_level,
    compress_with_ranks,
    count_params,
    layer_ranks,
    weights_digest,
)
from pipelines.features import log_mel_ops
from pipelines.profile import prep_ops
from pipelines.stages import StagedModel
from pipelines.training import load_trained
from splitsense.errors import ModelError

LEVELS = (1.0, 0.95, 0.8)  # uncompressed, ranks under a 5-point and under a 20-point budget


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

    def calibrate(self, m: StagedModel) -> float:
        """The 'calibration' accuracy ranks are chosen on: 0.9 less 0.3 per share of weights removed."""
        return 0.9 - 0.3 * (1 - count_params(m) / self.params)

    @property
    def params(self) -> int:
        return 34084  # toy_model's


@pytest.fixture(scope="module")
def built() -> tuple[ModelCatalog, Recorder, StagedModel]:
    model = toy_model()
    rec = Recorder(model)
    x = torch.randn((1, 6, 32))
    cat = build_catalog(
        model, rec.evaluate, rec.with_codec, levels=LEVELS, repeats=2, warmup=0, window_s=2.0, calibrate=rec.calibrate,
        prepare=lambda: (x - x.mean()) / x.std(), prep_ops=6 * 32,
    )  # fmt: skip
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
    assert [e.energy_kept for e in cat.levels] == [1.0, 0.95, 0.8] and cat.dropped_levels == ()
    assert [e.budget_points for e in cat.levels] == [None, 5.0, 20.0]
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
    for energy in (0.95, 0.8):
        full = compress_with_ranks(model, 4, cat.level(energy).rank_map())
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
    assert not any(isinstance(m, LowRank) for m in full.stages[1].modules())


def test_measures_accuracy_only_where_the_front_changes(
    built: tuple[ModelCatalog, Recorder, StagedModel],
) -> None:
    cat, rec, model = built
    expected = 1  # the uncompressed model
    for energy in (0.95, 0.8):
        full = compress_with_ranks(model, 4, cat.level(energy).rank_map())
        expected += sum(any(isinstance(m, LowRank) for m in s.modules()) for s in full.stages)
    assert rec.evaluate_calls == expected < 1 + 2 * 4
    # fp32 is exact and cut N encodes nothing: only fp16 and int8 at cuts 0..3 are evaluated
    assert sorted(rec.codec_calls) == sorted((k, c) for k in range(4) for c in (Codec.FP16, Codec.INT8))
    assert cat.codec(Codec.INT8).accuracy == (0.89, 0.89, 0.89, 0.89, cat.base_accuracy)
    assert cat.codec("fp32").accuracy == (cat.base_accuracy,) * 5


def test_levels_carry_the_ranks_that_meet_their_budget_on_the_calibration_data(
    built: tuple[ModelCatalog, Recorder, StagedModel],
) -> None:
    cat, rec, model = built
    base = rec.calibrate(model)
    for entry in cat.levels[1:]:
        assert entry.ranks and entry.weights_sha256 == weights_digest(model)
        assert [name for name, _ in entry.ranks] == [n for n in ("conv1.0", "fc.0", "head") if n in entry.rank_map()]
        drop = (base - rec.calibrate(compress_with_ranks(model, 4, entry.rank_map()))) * 100
        assert drop == pytest.approx(entry.calibration_drop_points, abs=1e-4)
        assert entry.budget_points is not None and 0 < drop <= entry.budget_points + 1e-9
    # a bigger budget buys a smaller model
    assert cat.level(0.8).front_params[4] < cat.level(0.95).front_params[4] < cat.levels[0].front_params[4]
    assert cat.levels[0].ranks is None and "ranks" not in cat.levels[0].to_dict()


def test_the_ranks_round_trip_and_rebuild_the_catalogs_front_exactly(
    built: tuple[ModelCatalog, Recorder, StagedModel], tmp_path: Path
) -> None:
    cat, rec, model = built
    save_catalog(cat, tmp_path)
    data = json.loads(catalog_path("toy", tmp_path).read_text())
    assert data["levels"][1]["ranks"] == dict(cat.levels[1].ranks or ())
    assert data["levels"][1]["budget_points"] == 5.0 and data["dropped_levels"] == []
    shipped = load_catalog("toy", tmp_path)
    assert shipped == cat and shipped.level(0.8).ranks == cat.level(0.8).ranks
    x = torch.randn((5, 6, 32), generator=torch.Generator().manual_seed(7))
    for entry in cat.levels[1:]:
        reference = compress_with_ranks(model, 4, entry.rank_map())  # what build_catalog measured
        for k in range(1, 5):
            front = compress_front_at_level(model, k, entry.energy_kept, weights_dir=tmp_path)
            assert count_params(front.front(k)) == entry.front_params[k]
            in_front = set(cat.stage_names[:k])
            assert layer_ranks(front) == {n: r for n, r in entry.rank_map().items() if n.split(".")[0] in in_front}
            assert rec.evaluate(front) == pytest.approx(entry.accuracy[k])
            with torch.no_grad():
                assert torch.equal(front.run(x, 0, k), reference.run(x, 0, k))


def test_levels_that_cannot_be_rebuilt_say_why(
    built: tuple[ModelCatalog, Recorder, StagedModel], tmp_path: Path
) -> None:
    cat, _, model = built
    save_catalog(cat, tmp_path)
    with pytest.raises(ModelError, match="has no level 0.9; known: 1, 0.95, 0.8"):
        compress_front_at_level(model, 2, 0.9, weights_dir=tmp_path)
    other = toy_model()
    with torch.no_grad():
        conv = other.stages[0][0]  # type: ignore[index]
        assert isinstance(conv, nn.Conv1d)
        conv.weight.add_(0.01)
    with pytest.raises(ModelError, match="chosen for other weights"):
        compress_front_at_level(other, 2, 0.95, weights_dir=tmp_path)
    old = cat.to_dict()  # a catalog measured before ranks were recorded still loads ...
    for e in old["levels"]:
        for key in ("ranks", "budget_points", "weights_sha256", "calibration_drop_points"):
            e.pop(key, None)
    del old["dropped_levels"]
    legacy = ModelCatalog.from_dict(old)
    assert legacy.level(0.95).ranks is None and legacy.dropped_levels == ()
    catalog_path("toy", tmp_path).write_text(json.dumps(old))
    with pytest.raises(ModelError, match="has no per-layer ranks"):  # ... but cannot make a level's front
        compress_front_at_level(model, 2, 0.95, weights_dir=tmp_path)


def test_a_level_that_is_neither_smaller_nor_faster_is_dropped_with_its_reason(tmp_path: Path) -> None:
    model = toy_model()
    rec = Recorder(model)
    # compression that costs nothing: every budget picks the same ranks, only the smallest is kept
    cat = build_catalog(model, rec.evaluate, rec.with_codec, levels=(1.0, 0.99, 0.98), repeats=1, warmup=0,
                        window_s=2.0, calibrate=lambda m: 0.9)  # fmt: skip
    assert [e.energy_kept for e in cat.levels] == [1.0, 0.99]
    assert cat.dropped_levels == (DroppedLevel(0.98, 2.0, "the same per-layer ranks as level 0.99"),)
    save_catalog(cat, tmp_path)
    assert load_catalog("toy", tmp_path).dropped_levels == cat.dropped_levels
    with pytest.raises(ModelError, match="dropped level 0.98 .2-point budget.: the same per-layer ranks"):
        compress_front_at_level(model, 2, 0.98, weights_dir=tmp_path)

    def level(
        key: float, params: tuple[int, ...], ms: tuple[float, ...], ranks: tuple[tuple[str, int], ...]
    ) -> LevelEntry:
        budget = None if key == 1.0 else round((1 - key) * 100, 6)
        return LevelEntry(key, ms, params, (0.8,) * 3, budget, None if key == 1.0 else ranks)

    top = level(1.0, (0, 5, 11), (0.0, 1.0, 3.0), ())
    half = level(0.995, (0, 3, 9), (0.0, 1.0, 3.0), (("a", 1),))  # smaller: kept
    same_size_slower = level(0.99, (0, 3, 9), (0.0, 1.2, 3.1), (("a", 1), ("b", 2)))
    faster_at_2 = level(0.98, (0, 3, 9), (0.0, 1.0, 2.0), (("a", 1), ("b", 3)))
    kept, dropped = drop_dominated_levels([faster_at_2, same_size_slower, top, half])
    assert [e.energy_kept for e in kept] == [1.0, 0.995, 0.98]
    assert [d.energy_kept for d in dropped] == [0.99] and dropped[0].budget_points == 1.0
    assert dropped[0].reason == (
        "neither smaller nor faster than a cheaper level at any cut (cut 1: 3 params / 1.200 ms vs level 0.995 "
        "3 / 1.000; cut 2: 9 params / 3.100 ms vs level 0.995 9 / 3.000)"
    )
    nothing = level(0.97, (0, 5, 11), (0.0, 1.0, 3.0), ())
    assert drop_dominated_levels([top, nothing])[1][0].reason.startswith("compresses nothing")


def test_json_and_file_round_trip(built: tuple[ModelCatalog, Recorder, StagedModel], tmp_path: Path) -> None:
    cat, _, _ = built
    assert cat.prep_ms > 0 and cat.prep_ops == 6 * 32  # the preprocessing, measured and recorded
    again = ModelCatalog.from_dict(json.loads(json.dumps(cat.to_dict())))
    assert again == cat and (again.prep_ms, again.prep_ops) == (cat.prep_ms, cat.prep_ops)
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


def test_a_catalog_measured_before_preprocessing_was_recorded_loads_with_none(
    built: tuple[ModelCatalog, Recorder, StagedModel], tmp_path: Path
) -> None:
    cat, _, _ = built
    old = cat.to_dict()
    del old["prep_ms"], old["prep_ops"]
    (tmp_path / "toy.catalog.json").write_text(json.dumps(old))
    loaded = load_catalog("toy", tmp_path)
    assert (loaded.prep_ms, loaded.prep_ops) == (0.0, 0)
    assert replace(loaded, prep_ms=cat.prep_ms, prep_ops=cat.prep_ops) == cat
    bare = build_catalog(toy_model(), lambda m: 0.9, lambda m, k, c: 0.9, levels=(1.0,), repeats=1, window_s=1.0)
    assert bare.prep_ms == 0.0  # nothing to time: a model fed its input directly


def test_update_prep_measures_the_preprocessing_into_the_file_and_keeps_the_rest(tmp_path: Path) -> None:
    shipped = json.loads(catalog_path("uci_har").read_text())
    old = {k: v for k, v in shipped.items() if k not in ("prep_ms", "prep_ops")}
    (tmp_path / "uci_har.catalog.json").write_text(json.dumps(old, indent=1))
    cat = update_prep("uci_har", tmp_path, repeats=3, warmup=0, trained=load_trained("uci_har"))
    assert cat.prep_ms > 0 and cat.prep_ops == prep_ops("uci_har") == 9 * 128
    new = json.loads((tmp_path / "uci_har.catalog.json").read_text())
    assert (new.pop("prep_ms"), new.pop("prep_ops")) == (cat.prep_ms, cat.prep_ops)
    assert new == old  # every other figure as it was
    assert prep_ops("fsdd_digit") == log_mel_ops()


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
    with pytest.raises(ModelError, match="prep_ms"):
        _tiny(prep_ms=-1.0)
    with pytest.raises(ModelError, match="prep_ops"):
        _tiny(prep_ops=1.5)


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
