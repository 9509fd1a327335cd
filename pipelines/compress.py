"""Compression of a model's front (the stages a device runs), after DeepX (Lane et al., IPSN 2016).

Runtime Layer Compression (RLC): a weight matrix W (out x in; a conv's kernel flattened to
out x in*k) is replaced by its rank-r SVD, W ~= (U_r sqrt(S_r)) (sqrt(S_r) V_r^T), i.e. two
smaller layers. The redundancy estimate of a layer is the smallest r that keeps a fraction e of
its singular-value energy (sum of S^2), for each e of `CompressionConfig.energy_kept`. A layer is
replaced only when the factors hold fewer parameters than the original.

    svd_linear / svd_conv        one layer -> LowRank (an nn.Sequential of the two factors)
    estimate_redundancy          rank per energy level for every front layer (decides nothing)
    compress_front               greedy per-layer rank under an accuracy budget, with a reason per layer
    compress_with_ranks          the front with given per-layer ranks {layer name: rank}
    compress_front_at_level      the planner's knob: the front at a catalog level, from its shipped ranks
    compress_front_uniform       one energy fraction for every front layer (analysis only, not a level)
    quantize_front_int8          int8 weights + per-output-channel scales, dequantised in forward
    count_params / param_bytes   how many weights, and how many bytes they really take

Compression levels (the float key of plans, PlanRow.compression_energy_kept and the cost model):
1.0 is the uncompressed model; a level L < 1 is "the per-layer ranks chosen by `compress_front`
for the whole model (every compressible layer of every stage; a bottleneck `Encoder` is never
touched) under an accuracy budget of (1 - L) x 100 points on the calibration data", e.g. 0.99 =
a 1-point budget (`level_budget_points` / `budget_level` convert). The catalog build
(`pipelines.catalog.build_catalog`) chooses those ranks once per level and records them, with the
digest of the weights they were chosen for, in the level's entry of `{model}.catalog.json`; the
front at cut k is the first k stages of that compressed model. `compress_front_at_level` rebuilds
exactly that front from the shipped ranks, so a device and the catalog run the same layers. A
layer's name is "<stage name>.<path inside the stage>" (e.g. "fc1.1"; "classifier" for a stage
that is itself the layer).

Only stages [0, cut) are touched, always on a deep copy: the model passed in is never modified.
"""

from __future__ import annotations

import copy
import hashlib
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from functools import reduce
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipelines.bottleneck import Encoder
from pipelines.levels import budget_level, level_budget_points
from pipelines.levels import check_energy as _check_energy
from pipelines.stages import StagedModel
from splitsense.config import CompressionConfig
from splitsense.errors import ConfigError, ModelError

DEFAULT_LEVELS: tuple[float, ...] = CompressionConfig().energy_kept
_ACC_EPS = 1e-9  # accuracy comparisons tolerate float noise of the evaluator


# ---------------------------------------------------------------------------------------------
# Replacement modules


class LowRank(nn.Sequential):
    """A Linear or Conv replaced by two factors: `first` (in -> rank), `second` (rank -> out, bias)."""

    def __init__(self, first: nn.Module, second: nn.Module, rank: int, full_rank: int) -> None:
        super().__init__(first, second)
        self.rank = rank
        self.full_rank = full_rank

    def extra_repr(self) -> str:
        return f"rank={self.rank}/{self.full_rank}"


def _quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output channel: w ~= q * scale[c], q in -127..127, |error| <= scale / 2."""
    w = weight.detach().to(torch.float32)
    absmax = w.reshape(w.shape[0], -1).abs().amax(dim=1)
    scale = torch.where(absmax > 0, absmax / 127.0, torch.ones_like(absmax))
    view = (-1,) + (1,) * (w.dim() - 1)
    q = torch.clamp(torch.round(w / scale.view(view)), -127, 127).to(torch.int8)
    return q, scale


class _Int8Weights(nn.Module):
    """Holds int8 weights (buffer `weight_q`), float32 `scale` per output channel, float bias."""

    weight_q: torch.Tensor
    scale: torch.Tensor

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        q, scale = _quantize_per_channel(weight)
        self.register_buffer("weight_q", q)
        self.register_buffer("scale", scale)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def dequantized_weight(self) -> torch.Tensor:
        view = (-1,) + (1,) * (self.weight_q.dim() - 1)
        return self.weight_q.to(torch.float32) * self.scale.view(view)


class Int8Linear(_Int8Weights):
    def __init__(self, layer: nn.Linear) -> None:
        super().__init__(layer.weight, layer.bias)
        self.in_features = layer.in_features
        self.out_features = layer.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


class Int8Conv(_Int8Weights):
    """Int8 twin of an nn.Conv1d / nn.Conv2d (all padding modes, groups, dilation)."""

    def __init__(self, layer: nn.Conv1d | nn.Conv2d) -> None:
        super().__init__(layer.weight, layer.bias)
        self.dims = 1 if isinstance(layer, nn.Conv1d) else 2
        self.in_channels = layer.in_channels
        self.out_channels = layer.out_channels
        self.kernel_size = tuple(layer.kernel_size)
        self.stride = tuple(layer.stride)
        self.padding = layer.padding
        self.dilation = tuple(layer.dilation)
        self.groups = layer.groups
        self.padding_mode = layer.padding_mode
        self._reversed_padding = tuple(layer._reversed_padding_repeated_twice)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = F.conv1d if self.dims == 1 else F.conv2d
        padding: Any = self.padding
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding, mode=self.padding_mode)
            padding = 0
        return conv(x, self.dequantized_weight(), self.bias, self.stride, padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, conv{self.dims}d, int8"
        )


# ---------------------------------------------------------------------------------------------
# Counting


def count_params(module: nn.Module) -> int:
    """Number of weight and bias values, wherever they are stored (an int8 weight counts once)."""
    n = sum(p.numel() for p in module.parameters())
    n += sum(m.weight_q.numel() for m in module.modules() if isinstance(m, _Int8Weights))
    return n


def param_bytes(module: nn.Module) -> int:
    """Bytes the module's state really takes: every parameter and buffer at its own dtype
    (int8 weights 1 byte, their scales 4, BatchNorm statistics included)."""
    n = sum(p.numel() * p.element_size() for p in module.parameters())
    n += sum(b.numel() * b.element_size() for b in module.buffers())
    return n


def front_param_bytes(model: StagedModel, cut: int) -> int:
    return param_bytes(model.front(model.check_cut(cut)))


# ---------------------------------------------------------------------------------------------
# SVD of one layer


_SVD_KINDS = (nn.Linear, nn.Conv1d, nn.Conv2d)


def _weight_matrix(layer: nn.Module) -> torch.Tensor:
    if isinstance(layer, nn.Linear):
        return layer.weight.detach()
    if isinstance(layer, (nn.Conv1d, nn.Conv2d)):
        if layer.groups != 1:
            raise ModelError(f"SVD of a grouped conv (groups={layer.groups}) is not supported")
        return layer.weight.detach().reshape(layer.out_channels, -1)
    raise ModelError(f"SVD applies to nn.Linear, nn.Conv1d and nn.Conv2d, not {type(layer).__name__}")


def full_rank(layer: nn.Module) -> int:
    rows, cols = _weight_matrix(layer).shape
    return min(rows, cols)


def singular_values(layer: nn.Module) -> np.ndarray:
    """Singular values of the layer's weight matrix, descending (float64)."""
    result: np.ndarray = np.linalg.svd(_as_f64(_weight_matrix(layer)), compute_uv=False)
    return result


def _as_f64(w: torch.Tensor) -> np.ndarray:
    # numpy's LAPACK, not torch.linalg: torch's OpenMP SVD slows down by ~500x when the cores
    # are shared with other processes (measured: 64x512 takes 1 s with 2 threads vs 2 ms with 1).
    return w.detach().cpu().to(torch.float64).numpy()


def lowrank_params(layer: nn.Module, rank: int) -> int:
    """Parameters of the two factors of rank `rank` (bias included)."""
    rows, cols = _weight_matrix(layer).shape
    bias = getattr(layer, "bias", None)
    return rank * (rows + cols) + (0 if bias is None else bias.numel())


class LayerSvd(NamedTuple):
    """Thin SVD of a layer's weight matrix (float64): W = u @ diag(s) @ vh, s descending."""

    u: np.ndarray
    s: np.ndarray
    vh: np.ndarray


def layer_svd(layer: nn.Module) -> LayerSvd:
    """Compute once, then build any rank from it (`svd=` of svd_linear / svd_conv / svd_layer)."""
    u, s, vh = np.linalg.svd(_as_f64(_weight_matrix(layer)), full_matrices=False)
    return LayerSvd(u, s, vh)


def _factors(layer: nn.Module, rank: int, svd: LayerSvd | None) -> tuple[torch.Tensor, torch.Tensor]:
    w = _weight_matrix(layer)
    r_full = min(w.shape)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= r_full:
        raise ModelError(f"rank must be an int in 1..{r_full} for {type(layer).__name__}, got {rank!r}")
    u, s, vh = layer_svd(layer) if svd is None else svd
    if u.shape[0] != w.shape[0] or vh.shape[1] != w.shape[1]:
        raise ModelError(f"svd= was computed for a {u.shape[0]}x{vh.shape[1]} matrix, not {tuple(w.shape)}")
    root = np.sqrt(s[:rank])
    first = torch.from_numpy(root[:, None] * vh[:rank]).to(w.dtype)  # (rank, in)
    second = torch.from_numpy(u[:, :rank] * root[None, :]).to(w.dtype)  # (out, rank)
    return first, second


def svd_linear(layer: nn.Linear, rank: int, *, svd: LayerSvd | None = None) -> LowRank:
    """Linear(in, out) -> Linear(in, rank, bias=False), Linear(rank, out) with the original bias."""
    if not isinstance(layer, nn.Linear):
        raise ModelError(f"svd_linear needs an nn.Linear, got {type(layer).__name__}")
    a, b = _factors(layer, rank, svd)
    kw: dict[str, Any] = {"device": layer.weight.device, "dtype": layer.weight.dtype}
    first = nn.Linear(layer.in_features, rank, bias=False, **kw)
    second = nn.Linear(rank, layer.out_features, bias=layer.bias is not None, **kw)
    with torch.no_grad():
        first.weight.copy_(a)
        second.weight.copy_(b)
        if layer.bias is not None:
            second.bias.copy_(layer.bias)
    out = LowRank(first, second, rank, min(layer.in_features, layer.out_features))
    return out.train(layer.training)


def svd_conv(layer: nn.Conv1d | nn.Conv2d, rank: int, *, svd: LayerSvd | None = None) -> LowRank:
    """Conv(in, out, k) -> Conv(in, rank, k, same stride/padding/dilation, no bias), then a 1x1
    Conv(rank, out) with the original bias."""
    if not isinstance(layer, (nn.Conv1d, nn.Conv2d)):
        raise ModelError(f"svd_conv needs an nn.Conv1d or nn.Conv2d, got {type(layer).__name__}")
    a, b = _factors(layer, rank, svd)
    cls = type(layer)
    kw: dict[str, Any] = {"device": layer.weight.device, "dtype": layer.weight.dtype}
    first = cls(
        layer.in_channels,
        rank,
        layer.kernel_size,  # type: ignore[arg-type]
        stride=layer.stride,  # type: ignore[arg-type]
        padding=layer.padding,  # type: ignore[arg-type]
        dilation=layer.dilation,  # type: ignore[arg-type]
        bias=False,
        padding_mode=layer.padding_mode,
        **kw,
    )
    second = cls(rank, layer.out_channels, 1, bias=layer.bias is not None, **kw)
    with torch.no_grad():
        first.weight.copy_(a.reshape(first.weight.shape))
        second.weight.copy_(b.reshape(second.weight.shape))
        if layer.bias is not None:
            assert second.bias is not None
            second.bias.copy_(layer.bias)
    out = LowRank(first, second, rank, min(a.shape[1], layer.out_channels))
    return out.train(layer.training)


def svd_layer(layer: nn.Module, rank: int, *, svd: LayerSvd | None = None) -> LowRank:
    if isinstance(layer, nn.Linear):
        return svd_linear(layer, rank, svd=svd)
    if isinstance(layer, (nn.Conv1d, nn.Conv2d)):
        return svd_conv(layer, rank, svd=svd)
    raise ModelError(f"SVD applies to nn.Linear, nn.Conv1d and nn.Conv2d, not {type(layer).__name__}")


# ---------------------------------------------------------------------------------------------
# Finding the front's layers


@dataclass(frozen=True)
class _Site:
    name: str  # human: "<stage name>.<path inside the stage>"
    path: tuple[str, ...]  # attribute path from the model root, stable across deep copies
    layer: nn.Module


def _front_sites(model: StagedModel, cut: int, kinds: tuple[type, ...], into_lowrank: bool) -> list[_Site]:
    model.check_cut(cut)
    sites: list[_Site] = []

    def walk(module: nn.Module, path: tuple[str, ...], name: str) -> None:
        if isinstance(module, Encoder):
            return  # a bottleneck encoder is already tiny, and its code must keep the distribution it was coded for
        if isinstance(module, kinds):
            sites.append(_Site(name, path, module))
            return
        if isinstance(module, LowRank) and not into_lowrank:
            return
        for child_name, child in module.named_children():
            walk(child, (*path, child_name), f"{name}.{child_name}")

    for i in range(cut):
        walk(model.stages[i], ("stages", str(i)), model.stage_names[i])
    return sites


def _get(root: nn.Module, path: tuple[str, ...]) -> nn.Module:
    module: nn.Module = reduce(getattr, path, root)
    return module


def _replace(root: nn.Module, path: tuple[str, ...], new: nn.Module) -> None:
    setattr(_get(root, path[:-1]), path[-1], new)


def _copy(model: StagedModel) -> StagedModel:
    result: StagedModel = copy.deepcopy(model)
    return result


# ---------------------------------------------------------------------------------------------
# Redundancy estimate


def rank_for_energy(svals: np.ndarray | Sequence[float], energy: float) -> int:
    """Smallest r such that the top r singular values hold >= `energy` of sum(S^2); at least 1."""
    energy = _check_energy(energy)
    s2 = np.square(np.asarray(svals, dtype=np.float64))
    total = float(s2.sum())
    if s2.size == 0:
        raise ModelError("no singular values")
    if total <= 0:
        return 1
    cum = np.cumsum(s2) / total
    r = int(np.searchsorted(cum, energy - 1e-12, side="left")) + 1
    return min(max(r, 1), s2.size)


@dataclass(frozen=True)
class LayerRedundancy:
    name: str
    kind: str
    rows: int  # weight matrix out x (in * kernel)
    cols: int
    bias_params: int
    ranks: dict[float, int]  # energy kept -> smallest rank keeping it

    @property
    def full_rank(self) -> int:
        return min(self.rows, self.cols)

    @property
    def params(self) -> int:
        return self.rows * self.cols + self.bias_params

    def params_at(self, rank: int) -> int:
        """Parameters of the two factors at `rank` (bias included)."""
        return rank * (self.rows + self.cols) + self.bias_params

    def saves(self, rank: int) -> bool:
        return self.params_at(rank) < self.params


def _redundancy(site: _Site, levels: Sequence[float], svd: LayerSvd | None = None) -> LayerRedundancy:
    layer = site.layer
    rows, cols = _weight_matrix(layer).shape
    bias = getattr(layer, "bias", None)
    s = singular_values(layer) if svd is None else svd.s
    return LayerRedundancy(
        name=site.name,
        kind=type(layer).__name__,
        rows=int(rows),
        cols=int(cols),
        bias_params=0 if bias is None else bias.numel(),
        ranks={float(e): rank_for_energy(s, e) for e in levels},
    )


def _svd_sites(model: StagedModel, cut: int) -> tuple[list[_Site], list[_Site]]:
    """(SVD-able sites, grouped convs that are not)."""
    sites = _front_sites(model, cut, _SVD_KINDS, into_lowrank=False)
    ok = [s for s in sites if not (isinstance(s.layer, (nn.Conv1d, nn.Conv2d)) and s.layer.groups != 1)]
    return ok, [s for s in sites if s not in ok]


def estimate_redundancy(
    model: StagedModel, cut: int, levels: Sequence[float] = DEFAULT_LEVELS
) -> list[LayerRedundancy]:
    """Rank per energy level of every SVD-able layer in stages [0, cut). Pure: decides nothing."""
    levels = _check_levels(levels)
    ok, _ = _svd_sites(model, cut)
    return [_redundancy(s, levels) for s in ok]


def _check_levels(levels: Sequence[float]) -> tuple[float, ...]:
    checked = tuple(sorted({_check_energy(e) for e in levels}))
    if not checked:
        raise ConfigError("at least one energy level is needed")
    return checked


# ---------------------------------------------------------------------------------------------
# Levels: per-layer ranks chosen under an accuracy budget, shipped with the model


# level_budget_points and budget_level: pipelines/levels.py (no torch: catalogs read them), re-exported.


def weights_digest(model: nn.Module) -> str:
    """sha256 of the model's state (every parameter and buffer: name, dtype, shape, bytes), so that
    ranks chosen for one set of weights are never applied to another."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        a = t.detach().cpu().contiguous()
        h.update(f"{name}|{a.dtype}|{tuple(a.shape)}|".encode())
        h.update(a.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def layer_ranks(model: StagedModel) -> dict[str, int]:
    """{layer name: rank} of every LowRank layer of `model` (what a compressed model carries)."""
    out: dict[str, int] = {}

    def walk(module: nn.Module, name: str) -> None:
        if isinstance(module, LowRank):
            out[name] = module.rank
            return
        for child_name, child in module.named_children():
            walk(child, f"{name}.{child_name}")

    for stage_name, stage in zip(model.stage_names, model.stages, strict=True):
        walk(stage, stage_name)
    return out


def compress_with_ranks(model: StagedModel, cut: int, ranks: Mapping[str, int]) -> StagedModel:
    """The layers of stages [0, cut) named in `ranks` replaced by their rank-r SVD; every other
    layer (and every stage from `cut` on) untouched. `ranks` may name layers of the whole model
    (the front takes its part); a name the model lacks, or a rank that is not in 1..full rank - 1
    or does not save parameters, is a ModelError: ranks are applied exactly or not at all.
    Returns a new model."""
    out = _copy(model)
    ok, _ = _svd_sites(out, out.n_stages)
    by_name = {s.name: s for s in ok}
    unknown = sorted(set(ranks) - set(by_name))
    if unknown:
        raise ModelError(
            f"ranks name layers {unknown} that {model.name!r} has no compressible layer for "
            f"(known: {sorted(by_name)}); were they chosen for another model?"
        )
    front = {s.name for s in _svd_sites(out, cut)[0]}
    for name, rank in ranks.items():
        site = by_name[name]
        r_full = full_rank(site.layer)
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank < r_full:
            raise ModelError(f"rank of {model.name!r} layer {name!r} must be an int in 1..{r_full - 1}, got {rank!r}")
        if lowrank_params(site.layer, rank) >= count_params(site.layer):
            raise ModelError(f"rank {rank} of {model.name!r} layer {name!r} saves no parameters")
        if name in front:
            _replace(out, site.path, svd_layer(site.layer, rank))
    return out


def compress_front_at_level(
    model: StagedModel,
    cut: int,
    level: float,
    *,
    ranks: Mapping[str, int] | None = None,
    weights_dir: Path | None = None,
) -> StagedModel:
    """Stages [0, cut) of `model` compressed at catalog level `level` (1.0 = uncompressed, a copy).

    A level < 1 applies the per-layer ranks the catalog build chose for the whole model under a
    (1 - level) x 100-point accuracy budget (module docstring), read from the level's entry in
    `{weights_dir}/{model.name}.catalog.json` (default: the shipped weights folder) and checked
    against the digest of the weights they were chosen for; `ranks=` gives them directly instead.
    A level the catalog lacks, one measured before ranks were recorded, or ranks chosen for other
    weights: ModelError saying what to rebuild. Returns a new model."""
    level = _check_energy(level)
    if level >= 1.0:
        model.check_cut(cut)
        return _copy(model)
    if ranks is None:
        from pipelines.catalog import shipped_level_ranks  # the catalog imports this module

        ranks, digest = shipped_level_ranks(model.name, level, weights_dir)
        if digest is not None and digest != weights_digest(model):
            raise ModelError(
                f"the shipped ranks of {model.name!r} level {level:g} were chosen for other weights "
                f"(sha256 {digest[:12]}..., this model {weights_digest(model)[:12]}...); rebuild its catalog "
                f"(`splitsense models catalog --model {model.name}`) after training"
            )
    return compress_with_ranks(model, cut, ranks)


def compress_front_uniform(model: StagedModel, cut: int, energy: float) -> StagedModel:
    """Every SVD-able layer of stages [0, cut) at the rank keeping `energy` of its singular-value
    energy, where that saves parameters; energy 1.0 = uncompressed. One threshold for every layer
    is not a planner level (it loses accuracy unevenly): for analysis and tests. Returns a new model."""
    energy = _check_energy(energy)
    out = _copy(model)
    if energy >= 1.0:
        return out
    ok, _ = _svd_sites(out, cut)
    for site in ok:
        svd = layer_svd(site.layer)
        rank = rank_for_energy(svd.s, energy)
        if lowrank_params(site.layer, rank) < count_params(site.layer):
            _replace(out, site.path, svd_layer(site.layer, rank, svd=svd))
    return out


# ---------------------------------------------------------------------------------------------
# Greedy search under an accuracy budget


@dataclass(frozen=True)
class LayerDecision:
    name: str
    kind: str
    full_rank: int
    rank: int  # chosen rank; full_rank when the layer was kept
    energy: float | None  # energy level chosen; None when kept
    params_before: int
    params_after: int
    accuracy: float | None  # accuracy of the model once this decision was applied (None: not evaluated)
    reason: str

    @property
    def compressed(self) -> bool:
        return self.energy is not None


@dataclass(frozen=True)
class CompressionResult:
    model: StagedModel
    cut: int
    budget_points: float
    levels: tuple[float, ...]
    layers: list[LayerDecision]  # in model order
    front_params_before: int
    front_params_after: int
    accuracy_before: float
    accuracy_after: float
    evaluations: int

    @property
    def accuracy_drop_points(self) -> float:
        return (self.accuracy_before - self.accuracy_after) * 100.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly report (the model itself is left out)."""
        return {
            "model": self.model.name,
            "cut": self.cut,
            "budget_points": self.budget_points,
            "levels": list(self.levels),
            "front_params_before": self.front_params_before,
            "front_params_after": self.front_params_after,
            "accuracy_before": self.accuracy_before,
            "accuracy_after": self.accuracy_after,
            "accuracy_drop_points": self.accuracy_drop_points,
            "evaluations": self.evaluations,
            "layers": [asdict(d) for d in self.layers],
        }


def _run_evaluate(evaluate: Callable[[StagedModel], float], model: StagedModel) -> float:
    acc = evaluate(model)
    if isinstance(acc, bool) or not isinstance(acc, numbers.Real) or not 0.0 <= float(acc) <= 1.0:
        raise ModelError(f"evaluate must return an accuracy in [0, 1] (a fraction, not percent), got {acc!r}")
    return float(acc)


def compress_front(
    model: StagedModel,
    cut: int,
    evaluate: Callable[[StagedModel], float],
    budget_points: float,
    levels: Sequence[float] = DEFAULT_LEVELS,
) -> CompressionResult:
    """Choose a rank per front layer (stages [0, cut)) so that accuracy drops by at most
    `budget_points` percentage points (evaluate returns accuracy in 0..1).

    Greedy, DeepX-style: layers are visited largest first (they have the most to give); for each,
    the distinct ranks of `levels` are tried from the most aggressive, each on a deep copy of the
    model compressed so far, and the first whose accuracy stays within the budget (measured
    against the uncompressed model, so drops accumulate) is kept. A rank that does not save
    parameters is never tried. The model passed in is never modified.
    """
    if isinstance(budget_points, bool) or not isinstance(budget_points, (int, float)):
        raise ConfigError(f"budget_points must be a number of accuracy points, got {budget_points!r}")
    if not 0 <= budget_points <= 100:
        raise ConfigError(f"budget_points must be in [0, 100], got {budget_points!r}")
    levels = _check_levels(levels)
    current = _copy(model)
    ok, grouped = _svd_sites(current, cut)
    front_before = count_params(current.front(cut))
    acc_before = _run_evaluate(evaluate, _copy(current))
    acc_current = acc_before
    allowed_drop = budget_points / 100.0
    evaluations = 1
    decisions: dict[str, LayerDecision] = {}

    for site in grouped:
        n = count_params(site.layer)
        decisions[site.name] = LayerDecision(  # full_rank/rank 0: not applicable
            site.name, type(site.layer).__name__, 0, 0, None, n, n, None,
            "kept: SVD of a grouped conv is not supported",
        )  # fmt: skip

    for site in sorted(ok, key=lambda s: -count_params(s.layer)):
        layer = _get(current, site.path)
        svd = layer_svd(layer)  # once per layer, reused for every rank tried
        red = _redundancy(_Site(site.name, site.path, layer), levels, svd)
        tried: dict[int, float] = {}
        chosen: LayerDecision | None = None
        for energy in levels:  # ascending energy = most aggressive first
            rank = red.ranks[energy]
            if rank in tried or not red.saves(rank):
                continue
            trial = _copy(current)
            _replace(trial, site.path, svd_layer(_get(trial, site.path), rank, svd=svd))
            acc = _run_evaluate(evaluate, trial)
            evaluations += 1
            tried[rank] = acc
            if acc_before - acc <= allowed_drop + _ACC_EPS:
                after = red.params_at(rank)
                chosen = LayerDecision(
                    site.name, red.kind, red.full_rank, rank, energy, red.params, after, acc,
                    f"compressed: rank {rank}/{red.full_rank} keeps {energy:g} of the energy, "
                    f"{red.params} -> {after} params, accuracy {acc:.4f} "
                    f"(total drop {(acc_before - acc) * 100:.2f} of {budget_points:g} points)",
                )  # fmt: skip
                current, acc_current = trial, acc
                break
        if chosen is None:
            if not tried:
                r_min = red.ranks[levels[0]]
                reason = (
                    f"kept: rank {r_min}/{red.full_rank} (energy {levels[0]:g}) saves nothing "
                    f"({red.params_at(r_min)} >= {red.params} params)"
                )
            else:
                best_rank = max(tried, key=lambda r: (tried[r], -r))
                drop = (acc_before - tried[best_rank]) * 100
                reason = (
                    f"kept: every level tried exceeds the budget (best: rank {best_rank}/{red.full_rank} "
                    f"drops {drop:.2f} > {budget_points:g} points)"
                )
            chosen = LayerDecision(
                site.name, red.kind, red.full_rank, red.full_rank, None, red.params, red.params, None, reason
            )
        decisions[site.name] = chosen

    order = [s.name for s in _front_sites(model, cut, _SVD_KINDS, into_lowrank=False)]
    return CompressionResult(
        model=current,
        cut=cut,
        budget_points=float(budget_points),
        levels=levels,
        layers=[decisions[name] for name in order],
        front_params_before=front_before,
        front_params_after=count_params(current.front(cut)),
        accuracy_before=acc_before,
        accuracy_after=acc_current,
        evaluations=evaluations,
    )


# ---------------------------------------------------------------------------------------------
# int8 weights


def quantize_front_int8(model: StagedModel, cut: int) -> StagedModel:
    """Every Linear / Conv1d / Conv2d in stages [0, cut) (inside LowRank factors too) replaced by
    its int8 twin: symmetric per-output-channel int8 weights, |w - w_q| <= scale / 2 elementwise.
    Returns a new model; compare `front_param_bytes` before and after for the saving (~4x on weights)."""
    out = _copy(model)
    for site in _front_sites(out, cut, _SVD_KINDS, into_lowrank=True):
        layer = site.layer
        new: nn.Module = Int8Linear(layer) if isinstance(layer, nn.Linear) else Int8Conv(layer)  # type: ignore[arg-type]
        _replace(out, site.path, new.train(layer.training))
    return out


__all__ = [
    "CompressionResult",
    "Int8Conv",
    "Int8Linear",
    "LayerDecision",
    "LayerRedundancy",
    "LayerSvd",
    "LowRank",
    "compress_front",
    "budget_level",
    "compress_front_at_level",
    "compress_front_uniform",
    "compress_with_ranks",
    "count_params",
    "estimate_redundancy",
    "front_param_bytes",
    "full_rank",
    "layer_ranks",
    "layer_svd",
    "level_budget_points",
    "lowrank_params",
    "param_bytes",
    "quantize_front_int8",
    "rank_for_energy",
    "singular_values",
    "svd_conv",
    "svd_layer",
    "svd_linear",
    "weights_digest",
]
