"""Training, evaluation and the shipped weights (safetensors) of the sensing models.

`splitsense models train` calls `train_model`; `splitsense models eval` calls `evaluate`.
Training is seeded and single-process so that a rerun reproduces the shipped accuracy.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from pipelines import datasets, features
from pipelines.bottleneck import Encoder, fit_prior, rate_bits
from pipelines.models import HND_TARGET_STAGE, ModelSpec, get_spec
from pipelines.stages import StagedModel
from splitsense.config import PathsConfig, TrainConfig, missing_asset
from splitsense.errors import ModelError

Split = Literal["train", "test"]
ProgressFn = Callable[[int, int, float], None]  # (epoch, epochs, train_loss)


@dataclass(frozen=True)
class SplitTensors:
    """Raw windows (before standardisation), their labels, and the split they come from."""

    x: torch.Tensor
    y: torch.Tensor


@lru_cache(maxsize=8)
def load_split(dataset: str, task: str, split: Split) -> SplitTensors:
    """Preprocessed (log-mel / raw IMU) but not yet standardised windows of a dataset split."""
    if dataset == "fsdd":
        clips = datasets.load_fsdd()
        mask = clips.test_mask if split == "test" else ~clips.test_mask
        sub = clips.subset(mask)
        waves = np.stack([features.fix_length(w) for w in sub.waveforms])
        x = features.log_mel(waves)
        labels = sub.speakers if task.startswith("speaker") else sub.digits
        return SplitTensors(x=x, y=torch.as_tensor(np.asarray(labels), dtype=torch.long))
    if dataset == "uci_har":
        s = datasets.load_uci_har(split)
        return SplitTensors(x=torch.tensor(s.x, dtype=torch.float32), y=torch.tensor(s.y, dtype=torch.long))
    raise ModelError(f"no loader for dataset {dataset!r}")


def split_for(spec: ModelSpec, split: Split) -> SplitTensors:
    return load_split(spec.dataset, spec.task, split)


def preprocess_raw(spec: ModelSpec, window: np.ndarray) -> torch.Tensor:
    """One raw sensor window (audio samples, or IMU (channels, T)) -> unstandardised model input (1, ...)."""
    if spec.modality == "audio":
        return features.log_mel(features.fix_length(np.asarray(window, dtype=np.float32)))
    x = torch.as_tensor(np.asarray(window, dtype=np.float32))
    return x.unsqueeze(0) if x.ndim == 2 else x


def _stat_dims(spec: ModelSpec) -> tuple[int, ...]:
    # Audio: one mean/std per mel band (over clips and frames). IMU: one per channel.
    return (0, 3) if spec.modality == "audio" else (0, 2)


@dataclass
class TrainedModel:
    """A model with its preprocessing statistics, ready to run (eval mode)."""

    spec: ModelSpec
    model: StagedModel
    standardizer: features.Standardizer
    meta: dict[str, Any] = field(default_factory=dict)

    def prepare(self, raw_batch: torch.Tensor) -> torch.Tensor:
        """Unstandardised inputs (as from load_split or preprocess_raw) -> stage-0 input."""
        return self.standardizer(raw_batch)

    def prepare_window(self, window: np.ndarray) -> torch.Tensor:
        return self.prepare(preprocess_raw(self.spec, window))


def weights_path(name: str, weights_dir: Path | None = None, *, teacher: bool = False) -> Path:
    """The split-aware model's weights (what is served and run), or its teacher's."""
    return (weights_dir or PathsConfig().weights_dir) / f"{name}{'.teacher' if teacher else ''}.safetensors"


def save_trained(tm: TrainedModel, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v.contiguous() for k, v in tm.model.state_dict().items()}
    tensors.update(tm.standardizer.state())
    save_file(tensors, str(path), metadata={"splitsense": json.dumps(tm.meta)})


def load_trained(name: str, weights_dir: Path | None = None, *, teacher: bool = False) -> TrainedModel:
    spec = get_spec(name)
    path = weights_path(name, weights_dir, teacher=teacher)
    if not path.exists():
        if not path.parent.is_dir():  # no weights folder at all: no data package
            raise ModelError(missing_asset(f"the weights of model {name!r}", path))
        raise ModelError(f"no weights for model {name!r} at {path}; run `splitsense models train --model {name}`")
    try:
        tensors = load_file(str(path))
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("splitsense", "{}"))
    except Exception as e:  # safetensors raises several types for corrupt files
        raise ModelError(f"weights file {path} is unreadable ({e}); retrain with `splitsense models train`") from e
    model = spec.build_teacher() if teacher else spec.build()
    state = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
    try:
        model.load_state_dict(state)
        std = features.Standardizer.from_state(tensors)
    except (RuntimeError, KeyError) as e:
        raise ModelError(f"weights file {path} does not match model {name!r}: {e}") from e
    model.eval()
    return TrainedModel(spec=spec, model=model, standardizer=std, meta=meta)


def augment(spec: ModelSpec, xb: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    if spec.modality == "audio":
        # Random time shift of up to 8 frames (80 ms) and one frequency mask (SpecAugment-lite).
        shift = int(torch.randint(-8, 9, (1,), generator=gen))
        xb = torch.roll(xb, shifts=shift, dims=3)
        f0 = int(torch.randint(0, features.N_MELS - 4, (1,), generator=gen))
        xb = xb.clone()
        xb[:, :, f0 : f0 + 4, :] = 0.0
        return xb
    # IMU: per-window amplitude scaling and sensor jitter.
    scale = 1.0 + 0.1 * torch.randn((xb.shape[0], 1, 1), generator=gen)
    return xb * scale + 0.02 * torch.randn(xb.shape, generator=gen)


def accuracy_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            correct += int((model(x[i : i + batch_size]).argmax(1) == y[i : i + batch_size]).sum())
    return correct / max(1, len(x))


def train_model(
    name: str,
    cfg: TrainConfig | None = None,
    epochs: int | None = None,
    limit: int | None = None,
    progress: ProgressFn | None = None,
) -> TrainedModel:
    """Train a model from scratch with a fixed seed; `limit` trains on the first n windows only (tests)."""
    cfg = cfg or TrainConfig()
    spec = get_spec(name)
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    gen = torch.Generator().manual_seed(cfg.seed)
    train = split_for(spec, "train")
    x_raw, y = train.x, train.y
    if limit is not None:
        x_raw, y = x_raw[:limit], y[:limit]
    std = features.Standardizer.fit(x_raw, _stat_dims(spec))
    x = std(x_raw)
    model = spec.build_teacher()
    n_epochs = epochs if epochs is not None else spec.epochs
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=1e-4)
    steps_per_epoch = max(1, (len(x) + cfg.batch_size - 1) // cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=spec.lr, total_steps=n_epochs * steps_per_epoch)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.05)
    t0 = time.perf_counter()
    for epoch in range(n_epochs):
        model.train()
        perm = torch.randperm(len(x), generator=gen)
        total = 0.0
        for i in range(0, len(x), cfg.batch_size):
            idx = perm[i : i + cfg.batch_size]
            xb = augment(spec, x[idx], gen)
            loss = loss_fn(model(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        if progress:
            progress(epoch + 1, n_epochs, total / len(x))
    model.eval()
    test = split_for(spec, "test")
    acc = accuracy_of(model, std(test.x), test.y)
    meta = {
        "model": name,
        "task": spec.task,
        "seed": cfg.seed,
        "epochs": n_epochs,
        "train_windows": len(x),
        "test_accuracy": round(acc, 4),
        "train_seconds": round(time.perf_counter() - t0, 1),
    }
    return TrainedModel(spec=spec, model=model, standardizer=std, meta=meta)


def held_out_set(tm: TrainedModel) -> tuple[torch.Tensor, torch.Tensor]:
    """Standardised test inputs and labels of a trained model's dataset."""
    test = split_for(tm.spec, "test")
    return tm.prepare(test.x), test.y


# ---------------------------------------------------------------------------------------------
# Split-aware (student) models: head network distillation, then fine-tuning with distillation


def _hnd_index(model: StagedModel) -> int:
    """Number of teacher stages the student's encoder + decoder replace (the HND target's index + 1)."""
    return model.stage_names.index(HND_TARGET_STAGE) + 1


def train_student_group(
    names: tuple[str, ...],
    cfg: TrainConfig | None = None,
    epochs: int | None = None,
    limit: int | None = None,
    progress: ProgressFn | None = None,
    weights_dir: Path | None = None,
) -> dict[str, TrainedModel]:
    """Train the split-aware models of `names` (one encoder group: same dataset, one shared encoder)
    from their teachers' shipped weights.

    Phase 1 (head network distillation, Matsubara et al. 2019): the encoder and decoders learn to
    rebuild each teacher's activation after conv3 through the quantised code (MSE) at a bounded rate
    (bits of the code under the quantiser's learned density, weighted by ``rate_weight`` per kbit);
    the teachers' later stages are copied and frozen. Phase 2: everything is fine-tuned on the task
    loss plus distillation from the teacher's logits (temperature 4) and the same rate term.
    Finally the coding table (``Quantizer.pmf``) is fitted to the training codes."""
    cfg = cfg or TrainConfig()
    specs = [get_spec(n) for n in names]
    if len({s.dataset for s in specs}) != 1:
        raise ModelError(f"models {names} do not share a dataset; they cannot share an encoder")
    spec0 = specs[0]
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    gen = torch.Generator().manual_seed(cfg.seed)
    teachers = [load_trained(n, weights_dir, teacher=True) for n in names]
    std = teachers[0].standardizer
    train = [split_for(s, "train") for s in specs]
    x = std(train[0].x)
    ys = [t.y for t in train]
    if limit is not None:
        x, ys = x[:limit], [y[:limit] for y in ys]
    with torch.no_grad():
        for t in teachers:
            t.model.eval()
    students = [s.build() for s in specs]
    encoder = students[0].stages[0]
    if not isinstance(encoder, Encoder) or not isinstance(encoder.body, nn.Sequential):
        raise ModelError(f"model {names[0]!r} does not open with a bottleneck Encoder stage")
    body = encoder.body
    t_head = teachers[0].model.stages[0]
    assert isinstance(t_head, nn.Sequential)
    if body[0].weight.shape == t_head[0].weight.shape:  # the encoder opens with the teacher's first conv: start there
        body[0].load_state_dict(t_head[0].state_dict())
        body[1].load_state_dict(t_head[1].state_dict())
    for st, te in zip(students, teachers, strict=True):
        st.stages[0] = encoder  # one module object while training: the group shares it
        start = _hnd_index(te.model)
        for i, stage in enumerate(st.stages[2:], start=2):
            stage.load_state_dict(te.model.stages[start + i - 2].state_dict())
    n_epochs = epochs if epochs is not None else spec0.student_epochs
    hnd_epochs = max(1, n_epochs // 2)
    rate_w = spec0.rate_weight / 1000.0
    ce = nn.CrossEntropyLoss(label_smoothing=0.05)
    temp = 4.0

    def run_phase(params: list[nn.Parameter], phase_epochs: int, lr: float, finetune: bool, done: int) -> None:
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
        steps = max(1, phase_epochs * ((len(x) + cfg.batch_size - 1) // cfg.batch_size))
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
        for epoch in range(phase_epochs):
            for st in students:
                st.train()
                if not finetune:
                    for stage in st.stages[2:]:
                        stage.eval()  # frozen teacher stages keep their BatchNorm statistics
            perm = torch.randperm(len(x), generator=gen)
            total = 0.0
            for i in range(0, len(x), cfg.batch_size):
                idx = perm[i : i + cfg.batch_size]
                xb = augment(spec0, x[idx], gen)
                y_pre = encoder.body(xb)
                code = encoder.quant(y_pre)
                loss = rate_w * rate_bits(encoder.quant, y_pre)
                for st, te, y in zip(students, teachers, ys, strict=True):
                    k = _hnd_index(te.model)
                    with torch.no_grad():
                        target = te.model.run(xb, 0, k)
                        t_logits = te.model.run(target, k, te.model.n_stages)
                    rebuilt = st.stages[1](code)
                    loss = loss + F.mse_loss(rebuilt, target) * (0.1 if finetune else 1.0)
                    if finetune:
                        logits = st.run(rebuilt, 2, st.n_stages)
                        kd = F.kl_div(
                            F.log_softmax(logits / temp, 1), F.softmax(t_logits / temp, 1), reduction="batchmean"
                        )
                        loss = loss + 0.5 * ce(logits, y[idx]) + 0.5 * temp * temp * kd
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                total += float(loss.detach()) * len(idx)
            if progress:
                progress(done + epoch + 1, n_epochs, total / len(x))

    t0 = time.perf_counter()
    head_params = list(encoder.parameters()) + [p for st in students for p in st.stages[1].parameters()]
    run_phase(head_params, hnd_epochs, 2e-3, finetune=False, done=0)
    all_params = list({id(p): p for st in students for p in st.parameters()}.values())
    run_phase(all_params, n_epochs - hnd_epochs, 5e-4, finetune=True, done=hnd_epochs)
    prior = fit_prior(encoder, x)

    out = {}
    for spec, st, te in zip(specs, students, teachers, strict=True):
        st.eval()
        test = split_for(spec, "test")
        xt = std(test.x)
        acc = accuracy_of(st, xt, test.y)
        with torch.no_grad():
            codes = encoder(xt)
        meta = {
            "model": spec.name,
            "task": spec.task,
            "seed": cfg.seed,
            "student_epochs": n_epochs,
            "teacher_test_accuracy": te.meta.get("test_accuracy"),
            "test_accuracy": round(acc, 4),
            "encoder_group": list(names),
            "code_shape": list(codes.shape[1:]),
            "code_bits_mean": round(prior.bits(codes.numpy()) / len(xt), 1),
            "prior_digest": prior.digest,
            "train_windows": len(x),
            "train_seconds": round(time.perf_counter() - t0, 1),
        }
        out[spec.name] = TrainedModel(spec=spec, model=st, standardizer=std, meta=meta)
    return out


def student_groups(names: tuple[str, ...] | list[str]) -> list[tuple[str, ...]]:
    """`names` arranged into encoder groups (each group trained together), in order of first mention."""
    groups: list[tuple[str, ...]] = []
    for n in names:
        g = get_spec(n).encoder_group or (n,)
        if g not in groups:
            groups.append(g)
    return groups
