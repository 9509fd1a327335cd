"""Front compression: SVD factors, redundancy-driven greedy search, int8 weights. Toy models only."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from pipelines.compress import (
    Int8Conv,
    Int8Linear,
    LowRank,
    budget_level,
    compress_front,
    compress_front_at_level,
    compress_front_uniform,
    compress_with_ranks,
    count_params,
    estimate_redundancy,
    front_param_bytes,
    layer_ranks,
    level_budget_points,
    param_bytes,
    quantize_front_int8,
    rank_for_energy,
    svd_conv,
    svd_linear,
    weights_digest,
)
from pipelines.stages import StagedModel
from splitsense.errors import ConfigError, ModelError


def toy_model(seed: int = 0) -> StagedModel:
    torch.manual_seed(seed)
    stages = [
        ("conv1", nn.Sequential(nn.Conv1d(6, 32, 5, padding=2), nn.ReLU())),
        ("conv2", nn.Sequential(nn.Conv1d(32, 32, 3, padding=1, stride=2), nn.ReLU(), nn.Flatten())),
        ("fc", nn.Sequential(nn.Linear(32 * 16, 64), nn.ReLU())),
        ("head", nn.Linear(64, 4)),
    ]
    return StagedModel("toy", stages, (6, 32), ["a", "b", "c", "d"]).eval()


def first_layer(model: StagedModel, stage: int) -> Any:
    """The first module inside stage `stage` (the stages of the toy models are Sequentials)."""
    seq: Any = model.stages[stage]
    return seq[0]


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- SVD of one layer -------------------------------------------------------------------------


def test_svd_linear_full_rank_reproduces_outputs() -> None:
    torch.manual_seed(1)
    layer = nn.Linear(40, 24)
    low = svd_linear(layer, 24)
    assert isinstance(low, nn.Sequential) and isinstance(low, LowRank)
    first, second = low[0], low[1]
    assert (first.in_features, first.out_features, first.bias) == (40, 24, None)
    assert (second.in_features, second.out_features) == (24, 24)
    x = torch.randn(8, 40)
    torch.testing.assert_close(low(x), layer(x), atol=1e-5, rtol=1e-5)


def test_svd_linear_rank_r_error_is_the_dropped_singular_values() -> None:
    torch.manual_seed(2)
    layer = nn.Linear(30, 20)
    w = layer.weight.detach().double()
    s = torch.linalg.svdvals(w)
    for r in (1, 5, 12):
        low: Any = svd_linear(layer, r)
        w_r = (low[1].weight.double() @ low[0].weight.double()).detach()
        # Eckart-Young: spectral error = s[r], Frobenius error = sqrt(sum of dropped s^2)
        assert torch.linalg.matrix_norm(w - w_r, ord=2).item() == pytest.approx(s[r].item(), rel=1e-4)
        fro = torch.linalg.matrix_norm(w - w_r).item()
        assert fro == pytest.approx(s[r:].square().sum().sqrt().item(), rel=1e-4)
        # so the output error of any input is bounded by s[r] * |x|
        x = torch.randn(16, 30)
        err = (low(x) - layer(x)).norm(dim=1)
        assert torch.all(err <= s[r].float() * x.norm(dim=1) * (1 + 1e-4) + 1e-5)


def test_svd_linear_checks_rank() -> None:
    layer = nn.Linear(8, 4)
    for bad in (0, 5, 2.0):
        with pytest.raises(ModelError, match="rank"):
            svd_linear(layer, bad)  # type: ignore[arg-type]
    with pytest.raises(ModelError):
        svd_linear(nn.Conv1d(2, 2, 3), 1)  # type: ignore[arg-type]


@pytest.mark.parametrize("dims", [1, 2])
def test_svd_conv_shapes_and_full_rank_equivalence(dims: int) -> None:
    torch.manual_seed(3)
    conv_cls = nn.Conv1d if dims == 1 else nn.Conv2d
    layer = conv_cls(5, 12, 3, stride=2, padding=1, dilation=1)
    full = min(12, 5 * 9 if dims == 2 else 5 * 3)
    low = svd_conv(layer, full)
    first, second = low[0], low[1]
    assert type(first) is conv_cls and type(second) is conv_cls
    assert (first.in_channels, first.out_channels, first.bias) == (5, full, None)
    assert first.kernel_size == layer.kernel_size and first.stride == layer.stride
    assert first.padding == layer.padding and first.dilation == layer.dilation
    assert second.kernel_size == (1,) * dims and (second.in_channels, second.out_channels) == (full, 12)
    torch.testing.assert_close(second.bias, layer.bias)
    x = torch.randn(2, 5, *([11] * dims))
    torch.testing.assert_close(low(x), layer(x), atol=1e-5, rtol=1e-5)
    assert low(x).shape == layer(x).shape
    assert svd_conv(layer, 2)(x).shape == layer(x).shape


def test_rank_for_energy() -> None:
    s = np.array([3.0, 2.0, 1.0, 0.0])  # energies 9, 4, 1 of 14
    assert rank_for_energy(s, 0.5) == 1
    assert rank_for_energy(s, 9 / 14) == 1
    assert rank_for_energy(s, 0.9) == 2
    assert rank_for_energy(s, 0.99) == 3
    assert rank_for_energy(s, 1.0) == 3
    assert rank_for_energy(np.zeros(3), 0.9) == 1
    with pytest.raises(ConfigError):
        rank_for_energy(s, 0.0)


def test_estimate_redundancy_covers_front_layers_only() -> None:
    model = toy_model()
    red = estimate_redundancy(model, 2, levels=(0.5, 0.9))
    assert [r.name for r in red] == ["conv1.0", "conv2.0"]
    conv2 = red[1]
    assert conv2.full_rank == 32 and conv2.params == 32 * 32 * 3 + 32
    assert conv2.ranks[0.5] <= conv2.ranks[0.9] <= conv2.full_rank
    assert estimate_redundancy(model, 0) == []


# --- compress_front ---------------------------------------------------------------------------


class FakeAccuracy:
    """Accuracy falls with the fraction of front weights removed: deterministic, no data."""

    def __init__(self, base: float, points_per_percent_removed: float, full_params: int) -> None:
        self.base, self.slope, self.full = base, points_per_percent_removed, full_params
        self.calls: list[StagedModel] = []

    def __call__(self, model: StagedModel) -> float:
        self.calls.append(model)
        removed = 1 - count_params(model.front(3)) / self.full
        return max(0.0, self.base - self.slope * removed)


def test_compress_front_touches_only_the_front_and_never_the_original() -> None:
    model = toy_model()
    before = _state(model)
    fake = FakeAccuracy(0.9, 0.0, count_params(model.front(3)))  # compression costs nothing
    res = compress_front(model, 2, fake, budget_points=1.0)
    assert _same_state(_state(model), before)  # original untouched
    assert res.model is not model and all(m is not model for m in fake.calls)
    # tail [2, N) identical, front compressed
    new_state = res.model.state_dict()
    for k, v in before.items():
        if k.startswith(("stages.2.", "stages.3.")):
            assert torch.equal(new_state[k], v)
    assert isinstance(first_layer(res.model, 1), LowRank)
    assert [d.name for d in res.layers] == ["conv1.0", "conv2.0"]
    assert res.front_params_after < res.front_params_before
    assert res.front_params_before == count_params(model.front(2))
    assert res.front_params_after == count_params(res.model.front(2))
    assert res.accuracy_after == res.accuracy_before == 0.9
    x = torch.randn(3, 6, 32)
    assert res.model(x).shape == (3, 4)
    # with free compression the most aggressive level that saves parameters wins
    conv2 = res.layers[1]
    assert conv2.compressed and conv2.energy == 0.5 and conv2.reason.startswith("compressed: rank")


def test_compress_front_respects_the_budget() -> None:
    model = toy_model()
    full = count_params(model.front(3))
    fake = FakeAccuracy(0.9, 0.5, full)  # 0.5 points per percent of weights removed
    res = compress_front(model, 3, fake, budget_points=2.0)
    assert res.accuracy_drop_points <= 2.0 + 1e-9
    assert res.front_params_after < res.front_params_before  # something fit within 2 points
    assert res.evaluations == len(fake.calls)
    for d in res.layers:
        assert d.reason.startswith(("compressed", "kept"))
        if not d.compressed:
            assert d.params_after == d.params_before and d.rank == d.full_rank
    # a zero budget with a costly compression keeps everything and says why
    strict = compress_front(model, 3, FakeAccuracy(0.9, 0.5, full), budget_points=0.0)
    assert strict.front_params_after == strict.front_params_before
    assert all("exceeds the budget" in d.reason or "saves nothing" in d.reason for d in strict.layers)
    report = res.to_dict()
    assert report["cut"] == 3 and len(report["layers"]) == 3 and "model" in report


def test_compress_front_says_when_a_rank_saves_nothing() -> None:
    torch.manual_seed(0)
    stages = [("a", nn.Linear(4, 3)), ("b", nn.Linear(3, 2))]
    model = StagedModel("tiny", stages, (4,), ["x", "y"])
    res = compress_front(model, 2, lambda m: 1.0, budget_points=1.0, levels=(0.99,))
    # rank r of a 3x4 matrix costs 7r params vs 12: rank 1 would save, rank >= 2 not
    for d in res.layers:
        if not d.compressed:
            assert "saves nothing" in d.reason


def test_compress_front_checks_arguments() -> None:
    model = toy_model()
    with pytest.raises(ModelError, match="cut"):
        compress_front(model, 9, lambda m: 1.0, 1.0)
    with pytest.raises(ConfigError):
        compress_front(model, 2, lambda m: 1.0, 101.0)
    with pytest.raises(ModelError, match="accuracy in"):
        compress_front(model, 2, lambda m: 87.0, 1.0)


def test_compress_front_uniform() -> None:
    model = toy_model()
    before = _state(model)
    same = compress_front_uniform(model, 3, 1.0)
    assert same is not model and _same_state(_state(same), before)
    low = compress_front_uniform(model, 3, 0.5)
    high = compress_front_uniform(model, 3, 0.99)
    assert _same_state(_state(model), before)
    assert count_params(low.front(3)) < count_params(high.front(3)) <= count_params(model.front(3))
    assert count_params(low.tail(3)) == count_params(model.tail(3))
    assert isinstance(low.stages[3], nn.Linear)  # tail untouched
    # more energy kept -> closer to the original
    x = torch.randn(4, 6, 32)
    with torch.no_grad():
        ref = model(x)
        assert low(x).shape == ref.shape
        assert (low(x) - ref).abs().max() >= (high(x) - ref).abs().max()
    with pytest.raises(ConfigError):
        compress_front_uniform(model, 3, 1.5)


# --- levels: per-layer ranks under a budget, applied from what ships -------------------------


def test_level_and_budget_convert_both_ways() -> None:
    assert [level_budget_points(v) for v in (0.995, 0.99, 0.98, 1.0)] == [0.5, 1.0, 2.0, 0.0]
    assert [budget_level(b) for b in (0.5, 1.0, 2.0)] == [0.995, 0.99, 0.98]
    with pytest.raises(ConfigError):
        budget_level(100.0)


def test_compress_with_ranks_reproduces_the_greedy_choice_and_touches_only_the_front() -> None:
    model = toy_model()
    fake = FakeAccuracy(0.9, 0.05, count_params(model.front(3)))
    chosen = compress_front(model, model.n_stages, fake, budget_points=2.0)
    ranks = {d.name: d.rank for d in chosen.layers if d.compressed}
    assert ranks and layer_ranks(chosen.model) == ranks
    again = compress_with_ranks(model, model.n_stages, ranks)
    assert _same_state(_state(again), _state(chosen.model))  # the same factors, bit for bit
    front = compress_with_ranks(model, 2, ranks)  # the front takes its part of the whole-model ranks
    assert layer_ranks(front) == {k: v for k, v in ranks.items() if k.startswith(("conv1", "conv2"))}
    assert front.stages[2] is not model.stages[2] and _same_state(_state(front.stages[2]), _state(model.stages[2]))
    x = torch.randn(3, 6, 32)
    with torch.no_grad():
        torch.testing.assert_close(front.run(x, 0, 2), again.run(x, 0, 2), rtol=0, atol=0)
    with pytest.raises(ModelError, match="no compressible layer"):
        compress_with_ranks(model, 2, {"nope.0": 3})
    with pytest.raises(ModelError, match=r"must be an int in 1\.\.31"):
        compress_with_ranks(model, 2, {"conv2.0": 32})
    with pytest.raises(ModelError, match="saves no parameters"):
        compress_with_ranks(model, 2, {"conv2.0": 31})


def test_compress_front_at_level_needs_shipped_ranks(tmp_path: Any) -> None:
    model = toy_model()
    same = compress_front_at_level(model, 3, 1.0)  # uncompressed: nothing needs shipping
    assert _same_state(_state(same), _state(model))
    with pytest.raises(ModelError, match="no catalog for model 'toy'"):
        compress_front_at_level(model, 3, 0.99, weights_dir=tmp_path)
    given = compress_front_at_level(model, 3, 0.99, ranks={"fc.0": 8})
    assert layer_ranks(given) == {"fc.0": 8}


def test_weights_digest_tells_weights_apart() -> None:
    a, b = toy_model(0), toy_model(0)
    assert weights_digest(a) == weights_digest(b) and len(weights_digest(a)) == 64
    assert weights_digest(a) != weights_digest(toy_model(1))
    assert weights_digest(compress_front_uniform(a, 3, 0.5)) != weights_digest(a)


# --- int8 -------------------------------------------------------------------------------------


def test_quantize_front_int8_error_bound_and_bytes() -> None:
    model = toy_model()
    before = _state(model)
    q = quantize_front_int8(model, 3)
    assert _same_state(_state(model), before)
    assert isinstance(first_layer(q, 0), Int8Conv) and isinstance(first_layer(q, 2), Int8Linear)
    assert isinstance(q.stages[3], nn.Linear)  # tail stays float
    # elementwise weight error <= scale / 2 per output channel
    for orig, quant in (
        (first_layer(model, 0), first_layer(q, 0)),
        (first_layer(model, 2), first_layer(q, 2)),
    ):
        w = orig.weight.detach()
        view = (-1,) + (1,) * (w.dim() - 1)
        err = (quant.dequantized_weight() - w).abs()
        assert torch.all(err <= quant.scale.view(view) / 2 * (1 + 1e-5))
        assert quant.weight_q.dtype == torch.int8
    # same weight count, ~4x fewer bytes
    assert count_params(q.front(3)) == count_params(model.front(3))
    ratio = front_param_bytes(model, 3) / front_param_bytes(q, 3)
    assert 3.5 < ratio <= 4.0
    assert param_bytes(q.tail(3)) == param_bytes(model.tail(3))
    x = torch.randn(5, 6, 32)
    with torch.no_grad():
        torch.testing.assert_close(q(x), model(x), atol=0.05, rtol=0.05)


def test_int8_after_svd_quantises_the_factors() -> None:
    model = compress_front_uniform(toy_model(), 2, 0.5)
    q = quantize_front_int8(model, 2)
    low = first_layer(q, 1)
    assert isinstance(low, LowRank) and all(isinstance(m, Int8Conv) for m in low)
    assert q(torch.randn(2, 6, 32)).shape == (2, 4)


def test_int8_conv_padding_modes_and_groups() -> None:
    torch.manual_seed(4)
    for layer in (
        nn.Conv2d(4, 8, 3, padding=1, padding_mode="reflect"),
        nn.Conv1d(4, 8, 3, groups=2, dilation=2, padding="same"),
    ):
        stages = [("c", layer), ("f", nn.Flatten())]
        dims = 2 if isinstance(layer, nn.Conv2d) else 1
        model = StagedModel("c", stages, (4, *([9] * dims)), ["a"])
        q = quantize_front_int8(model, 1)
        x = torch.randn(2, 4, *([9] * dims))
        with torch.no_grad():
            torch.testing.assert_close(q(x), model(x), atol=0.05, rtol=0.05)
