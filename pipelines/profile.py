"""Per-stage profile of a StagedModel: what each stage costs and what crosses the wire after it.

The cost model (Neurosurgeon-style) needs, per stage: parameters, multiply-accumulates, output
size and host latency. MACs are counted for batch 1 by forward hooks on the layers that do the
arithmetic (Linear, Conv1d/2d, RNN/LSTM/GRU, and their int8 twins from pipelines.compress; an
SVD-compressed layer is a LowRank made of plain Linear/Conv, so it counts itself). Elementwise
ops, pooling and normalisation count 0 MACs. Latency is the median of `repeats` timed runs of
each stage alone on its real input, after `warmup` runs, under torch.no_grad and in eval mode.

Preprocessing (log-mel for audio, standardisation for IMU: ``TrainedModel.prepare_window``) runs on
the device before stage 0 for every window, whatever the cut. ``profile_prep`` times it the same way
as the stages (one thread, median of `repeats` runs after `warmup`); ``prep_ops`` counts its
operations for a device without a framework, timed at its MAC rate (pipelines/devices.py).

A profile is plain data: `to_dict()` / `from_dict()` round-trip through JSON.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pipelines.compress import Int8Conv, Int8Linear, count_params
from pipelines.features import log_mel_ops
from pipelines.models import get_spec
from pipelines.stages import StagedModel
from splitsense.errors import ModelError

FP32_BYTES = 4


@dataclass(frozen=True)
class StageProfile:
    index: int
    name: str
    params: int
    macs: int  # multiply-accumulates for one sample (batch 1)
    output_shape: tuple[int, ...]  # without the batch dimension
    output_bytes: int  # fp32
    host_latency_ms: float  # median, batch 1, on the machine that profiled

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "name": self.name,
            "params": self.params,
            "macs": self.macs,
            "output_shape": list(self.output_shape),
            "output_bytes": self.output_bytes,
            "host_latency_ms": self.host_latency_ms,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StageProfile:
        try:
            return cls(
                index=int(data["index"]),
                name=str(data["name"]),
                params=int(data["params"]),
                macs=int(data["macs"]),
                output_shape=tuple(int(d) for d in data["output_shape"]),
                output_bytes=int(data["output_bytes"]),
                host_latency_ms=float(data["host_latency_ms"]),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ModelError(f"malformed stage profile {data!r}: {e!r}") from None


@dataclass(frozen=True)
class ModelProfile:
    model: str
    input_shape: tuple[int, ...]  # without the batch dimension
    input_bytes: int  # fp32
    stages: list[StageProfile]

    @property
    def n_stages(self) -> int:
        return len(self.stages)

    def _check(self, k: int) -> int:
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= self.n_stages:
            raise ModelError(f"cut {k!r} is out of range for profile of {self.model!r}: expected 0..{self.n_stages}")
        return k

    def front_macs(self, k: int) -> int:
        """MACs of stages [0, k) (the device's part at cut k)."""
        return sum(s.macs for s in self.stages[: self._check(k)])

    def tail_macs(self, k: int) -> int:
        """MACs of stages [k, N) (the cloud's part at cut k)."""
        return sum(s.macs for s in self.stages[self._check(k) :])

    def front_params(self, k: int) -> int:
        return sum(s.params for s in self.stages[: self._check(k)])

    def tail_params(self, k: int) -> int:
        return sum(s.params for s in self.stages[self._check(k) :])

    def front_latency_ms(self, k: int) -> float:
        return sum(s.host_latency_ms for s in self.stages[: self._check(k)])

    def tail_latency_ms(self, k: int) -> float:
        return sum(s.host_latency_ms for s in self.stages[self._check(k) :])

    def activation_shape(self, k: int) -> tuple[int, ...]:
        """Shape (without batch) of what crosses the wire at cut k (the input for k = 0)."""
        return self.input_shape if self._check(k) == 0 else self.stages[k - 1].output_shape

    def activation_bytes(self, k: int) -> int:
        """fp32 bytes crossing the wire at cut k (the input for k = 0)."""
        return self.input_bytes if self._check(k) == 0 else self.stages[k - 1].output_bytes

    @property
    def total_macs(self) -> int:
        return self.front_macs(self.n_stages)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "input_shape": list(self.input_shape),
            "input_bytes": self.input_bytes,
            "stages": [s.to_dict() for s in self.stages],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelProfile:
        try:
            stages = [StageProfile.from_dict(s) for s in data["stages"]]
            profile = cls(
                model=str(data["model"]),
                input_shape=tuple(int(d) for d in data["input_shape"]),
                input_bytes=int(data["input_bytes"]),
                stages=stages,
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ModelError(f"malformed model profile: {e!r}") from None
        if [s.index for s in stages] != list(range(len(stages))):
            raise ModelError(f"profile of {profile.model!r} has stage indices {[s.index for s in stages]}")
        return profile


# ---------------------------------------------------------------------------------------------
# MAC counting


def _rnn_macs(m: nn.RNNBase, x: torch.Tensor) -> int:
    if not isinstance(x, torch.Tensor):  # PackedSequence: count the real steps
        data = x[0]
        steps = int(data.shape[0])
        batch = 1
    else:
        seq_dim = 1 if m.batch_first else 0
        steps = int(x.shape[seq_dim]) if x.dim() == 3 else int(x.shape[0])
        batch = int(x.shape[1 - seq_dim]) if x.dim() == 3 else 1
    gates = {"LSTM": 4, "GRU": 3}.get(m.mode, 1)
    dirs = 2 if m.bidirectional else 1
    h = m.hidden_size
    out_h = m.proj_size if getattr(m, "proj_size", 0) else h
    total = 0
    for layer in range(m.num_layers):
        inp = m.input_size if layer == 0 else out_h * dirs
        per_step = gates * h * (inp + out_h) + (h * out_h if out_h != h else 0)
        total += dirs * steps * per_step
    return total * batch


def layer_macs(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> int | None:
    """MACs of one call of a counted layer (for the whole batch); None for modules not counted."""
    if isinstance(module, (nn.Linear, Int8Linear)):
        return int(output.numel()) * module.in_features
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, Int8Conv)):
        per_output = (module.in_channels // module.groups) * math.prod(module.kernel_size)
        return int(output.numel()) * per_output
    if isinstance(module, nn.RNNBase):
        return _rnn_macs(module, inputs[0])
    return None


def stage_peak_elems(stage: nn.Module, x: torch.Tensor) -> int:
    """Largest input + output element count of any leaf layer of `stage` on x (per sample): the
    activation memory a layer-by-layer runtime needs at once inside the stage."""
    peak = 0

    def hook(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        nonlocal peak
        if any(True for _ in module.children()):
            return
        n_in = sum(int(t[0].numel()) for t in inputs if isinstance(t, torch.Tensor) and t.dim() > 0)
        n_out = int(output[0].numel()) if isinstance(output, torch.Tensor) and output.dim() > 0 else 0
        peak = max(peak, n_in + n_out)

    handles = [m.register_forward_hook(hook) for m in stage.modules()]
    try:
        with torch.no_grad():
            stage(x)
    finally:
        for h in handles:
            h.remove()
    return max(peak, int(x[0].numel()))


def stage_macs(stage: nn.Module, x: torch.Tensor) -> tuple[int, torch.Tensor]:
    """(MACs per sample, output) of running `stage` on x; x carries a batch dimension."""
    total = 0

    def hook(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        nonlocal total
        n = layer_macs(module, inputs, output)
        if n is not None:
            total += n

    handles = [m.register_forward_hook(hook) for m in stage.modules()]
    try:
        with torch.no_grad():
            y = stage(x)
    finally:
        for h in handles:
            h.remove()
    batch = int(x.shape[0]) if x.dim() > 0 else 1
    return total // max(batch, 1), y


# ---------------------------------------------------------------------------------------------
# Profiling


def _sequence_median_ms(model: StagedModel, x: torch.Tensor, repeats: int, warmup: int) -> list[float]:
    """Per-stage median over `repeats` runs of the whole model, stages timed in sequence on the real
    activations (as a device runs them: a noise burst hits every stage of a run alike instead of all
    the runs of one stage, which is what made single stages look 10-60x slow)."""
    n = model.n_stages
    samples: list[list[float]] = [[] for _ in range(n)]
    with torch.no_grad():
        for r in range(warmup + repeats):
            y = x
            for i, stage in enumerate(model.stages):
                t0 = time.perf_counter()
                y = stage(y)
                if r >= warmup:
                    samples[i].append((time.perf_counter() - t0) * 1000.0)
    return [float(statistics.median(v)) for v in samples]


def profile_model(model: StagedModel, repeats: int = 30, warmup: int = 5) -> ModelProfile:
    """Profile every stage of `model` for batch 1 on one thread, stages in sequence, median of
    `repeats` runs (eval mode; the model's mode and torch's thread count are restored)."""
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ModelError(f"repeats must be an int >= 1, got {repeats!r}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ModelError(f"warmup must be an int >= 0, got {warmup!r}")
    was_training = model.training
    model.eval()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as a device runs its front: one thread
    try:
        x = torch.zeros((1, *model.input_shape))
        stage_ms = _sequence_median_ms(model, x, repeats, warmup)
        stages = []
        for i, (name, stage) in enumerate(zip(model.stage_names, model.stages, strict=True)):
            macs, y = stage_macs(stage, x)
            if not isinstance(y, torch.Tensor):
                raise ModelError(f"stage {name!r} of {model.name!r} returned {type(y).__name__}, not a tensor")
            shape = tuple(int(d) for d in y.shape[1:])
            stages.append(
                StageProfile(
                    index=i,
                    name=name,
                    params=count_params(stage),
                    macs=macs,
                    output_shape=shape,
                    output_bytes=math.prod(shape) * FP32_BYTES,
                    host_latency_ms=stage_ms[i],
                )
            )
            x = y
    finally:
        torch.set_num_threads(threads)
        model.train(was_training)
    return ModelProfile(
        model=model.name,
        input_shape=tuple(model.input_shape),
        input_bytes=math.prod(model.input_shape) * FP32_BYTES,
        stages=stages,
    )


# ---------------------------------------------------------------------------------------------
# Preprocessing


IMU_PREP_OPS = 9 * 128  # standardise each value of a (9 channels, 128 steps) window: a multiply-add


def prep_ops(model: str) -> int:
    """Operations of one window's preprocessing of the shipped model `model` on a device without a
    framework (timed at its MAC rate): the log-mel's (``features.log_mel_ops``) for audio, one
    multiply-add per value for IMU. A task group preprocesses once: pass its first member."""
    spec = get_spec(model)
    return log_mel_ops() if spec.modality == "audio" else IMU_PREP_OPS


def profile_prep(prepare: Callable[[], object], repeats: int = 30, warmup: int = 5) -> float:
    """Host ms of one window's preprocessing, `prepare()`, timed as `profile_model` times the stages:
    one thread, batch 1, under torch.no_grad, median of `repeats` runs after `warmup` (torch's
    thread count is restored)."""
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ModelError(f"repeats must be an int >= 1, got {repeats!r}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ModelError(f"warmup must be an int >= 0, got {warmup!r}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as a device preprocesses: one thread
    samples = []
    try:
        with torch.no_grad():
            for r in range(warmup + repeats):
                t0 = time.perf_counter()
                prepare()
                if r >= warmup:
                    samples.append((time.perf_counter() - t0) * 1000.0)
    finally:
        torch.set_num_threads(threads)
    return float(statistics.median(samples))
