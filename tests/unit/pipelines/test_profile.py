"""Per-stage profiles: exact MACs of known layers, wire sizes, front/tail sums, JSON round trip."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from torch import nn

from pipelines.compress import compress_front_uniform, quantize_front_int8, svd_conv
from pipelines.features import log_mel_ops
from pipelines.profile import ModelProfile, layer_macs, prep_ops, profile_model, profile_prep, stage_macs
from pipelines.stages import StagedModel
from splitsense.errors import ModelError

# conv1: 32 out ch x 32 steps x (6 in x 5 taps); conv2: 32 x 16 x (32 x 3); fc: 64 x 512; head: 4 x 64
TOY_MACS = [32 * 32 * 6 * 5, 32 * 16 * 32 * 3, 64 * 512, 4 * 64]
TOY_PARAMS = [6 * 32 * 5 + 32, 32 * 32 * 3 + 32, 512 * 64 + 64, 64 * 4 + 4]


def toy_model() -> StagedModel:
    torch.manual_seed(0)
    stages = [
        ("conv1", nn.Sequential(nn.Conv1d(6, 32, 5, padding=2), nn.BatchNorm1d(32), nn.ReLU())),
        ("conv2", nn.Sequential(nn.Conv1d(32, 32, 3, padding=1, stride=2), nn.ReLU(), nn.Flatten())),
        ("fc", nn.Sequential(nn.Linear(32 * 16, 64), nn.ReLU())),
        ("head", nn.Linear(64, 4)),
    ]
    return StagedModel("toy", stages, (6, 32), ["a", "b", "c", "d"])


def first_layer(model: StagedModel, stage: int) -> Any:
    """The first module inside stage `stage` (the stages of the toy models are Sequentials)."""
    seq: Any = model.stages[stage]
    return seq[0]


@pytest.fixture(scope="module")
def profile() -> ModelProfile:
    return profile_model(toy_model(), repeats=3, warmup=1)


def test_macs_params_and_shapes_per_stage(profile: ModelProfile) -> None:
    assert profile.model == "toy" and profile.n_stages == 4
    assert [s.name for s in profile.stages] == ["conv1", "conv2", "fc", "head"]
    assert [s.index for s in profile.stages] == [0, 1, 2, 3]
    assert [s.macs for s in profile.stages] == TOY_MACS
    bn = 2 * 32  # BatchNorm weight + bias
    assert [s.params for s in profile.stages] == [TOY_PARAMS[0] + bn, *TOY_PARAMS[1:]]
    assert [s.output_shape for s in profile.stages] == [(32, 32), (512,), (64,), (4,)]
    assert all(s.host_latency_ms > 0 for s in profile.stages)


def test_activation_bytes_and_front_tail_sums(profile: ModelProfile) -> None:
    assert profile.input_shape == (6, 32) and profile.input_bytes == 6 * 32 * 4
    assert [profile.activation_bytes(k) for k in range(5)] == [6 * 32 * 4, 32 * 32 * 4, 512 * 4, 64 * 4, 16]
    assert profile.activation_shape(0) == (6, 32) and profile.activation_shape(2) == (512,)
    for k in range(5):
        assert profile.front_macs(k) == sum(TOY_MACS[:k])
        assert profile.tail_macs(k) == sum(TOY_MACS[k:])
        assert profile.front_macs(k) + profile.tail_macs(k) == profile.total_macs
        assert profile.front_params(k) + profile.tail_params(k) == profile.front_params(4)
    assert profile.front_params(0) == 0
    for bad in (-1, 5, 1.5):
        with pytest.raises(ModelError, match="out of range"):
            profile.front_macs(bad)  # type: ignore[arg-type]


def test_dict_round_trip(profile: ModelProfile) -> None:
    again = ModelProfile.from_dict(json.loads(json.dumps(profile.to_dict())))
    assert again == profile
    with pytest.raises(ModelError, match="malformed"):
        ModelProfile.from_dict({"model": "x"})


def test_profile_restores_training_mode() -> None:
    model = toy_model().train()
    profile_model(model, repeats=1, warmup=0)
    assert model.training
    with pytest.raises(ModelError):
        profile_model(model, repeats=0)


def test_conv2d_macs_exact() -> None:
    conv = nn.Conv2d(3, 8, (3, 5), stride=(1, 2), padding=(1, 2), groups=1)
    macs, y = stage_macs(nn.Sequential(conv, nn.ReLU()), torch.zeros(2, 3, 10, 20))
    assert y.shape == (2, 8, 10, 10)
    assert macs == 8 * 10 * 10 * 3 * 3 * 5  # per sample, although the batch was 2
    grouped = nn.Conv2d(4, 8, 3, groups=2)
    out = grouped(torch.zeros(1, 4, 5, 5))
    assert layer_macs(grouped, (), out) == 8 * 3 * 3 * (4 // 2) * 9


def test_gru_macs() -> None:
    gru = nn.GRU(10, 16, batch_first=True)
    x = torch.zeros(1, 7, 10)
    out = gru(x)
    assert layer_macs(gru, (x,), out) == 7 * 3 * 16 * (10 + 16)


def test_compressed_fronts_are_counted_correctly() -> None:
    model = toy_model().eval()
    low = svd_conv(first_layer(model, 1), 4)
    macs, _ = stage_macs(low, torch.zeros(1, 32, 32))
    assert macs == 4 * 16 * 32 * 3 + 32 * 16 * 4  # k-tap conv to rank 4, then 1x1 to 32
    svd = profile_model(compress_front_uniform(model, 3, 0.5), repeats=1, warmup=0)
    assert svd.front_macs(3) < sum(TOY_MACS[:3])
    assert svd.tail_macs(3) == TOY_MACS[3]
    assert svd.front_params(3) < sum(TOY_PARAMS[:3]) + 64
    q = profile_model(quantize_front_int8(model, 3), repeats=1, warmup=0)
    assert [s.macs for s in q.stages] == TOY_MACS  # int8 weights, same arithmetic
    assert q.front_params(4) == sum(TOY_PARAMS) + 64


def test_profile_prep_is_the_median_on_one_thread_and_restores_the_thread_count() -> None:
    threads = torch.get_num_threads()
    seen: list[int] = []

    def prepare() -> None:
        seen.append(torch.get_num_threads())

    assert profile_prep(prepare, repeats=7, warmup=2) >= 0.0
    assert seen == [1] * 9 and torch.get_num_threads() == threads
    with pytest.raises(ModelError, match="repeats"):
        profile_prep(prepare, repeats=0)


def test_prep_ops_of_the_shipped_models() -> None:
    assert prep_ops("fsdd_digit") == prep_ops("fsdd_speaker") == log_mel_ops() > 0  # log-mel
    assert prep_ops("uci_har") == 9 * 128  # one multiply-add per IMU value
