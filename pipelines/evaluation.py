"""`splitsense models eval`: accuracy, per-cut profile, RLC compression and codecs of each model.

Every figure is measured here on the dataset's own test split; compression ranks are chosen on a
calibration slice of the training split (never on the test split) and then reported on test.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from pipelines import codecs
from pipelines.compress import compress_front, count_params
from pipelines.profile import profile_model
from pipelines.stages import StagedModel
from pipelines.training import TrainedModel, accuracy_of, augment, held_out_set, load_trained, split_for
from splitsense.config import CompressionConfig

CALIBRATION_WINDOWS = 800


def calibration_set(tm: TrainedModel, n: int = CALIBRATION_WINDOWS) -> tuple[torch.Tensor, torch.Tensor]:
    """The data compression ranks are chosen on: a seeded random slice of the training split, passed
    through the training augmentation (time shift + frequency mask for audio, scaling + jitter for IMU).

    Random, because the splits are stored sorted by speaker/class and a prefix covers few classes.
    Augmented, because the model fits its clean training windows almost perfectly: on them an
    aggressive rank looks free and then loses points on test; augmented windows are not saturated,
    so accuracy drops show up where they will happen. The test split is never used to choose.
    """
    train = split_for(tm.spec, "train")
    idx = torch.randperm(len(train.x), generator=torch.Generator().manual_seed(0))[:n]
    gen = torch.Generator().manual_seed(1)
    xs = [augment(tm.spec, tm.prepare(train.x[idx[i : i + 64]]), gen) for i in range(0, len(idx), 64)]
    return torch.cat(xs), train.y[idx]


def compression_cut(model: StagedModel, activation_bytes: list[int]) -> int:
    """The cut the compression report is about: the interior cut with the smallest activation
    (shallowest on ties), i.e. the natural offload point whose front holds the big FC layers."""
    interior = range(1, model.n_stages)
    return min(interior, key=lambda k: (activation_bytes[k], k))


def accuracy_with_codec(
    model: StagedModel, x: torch.Tensor, y: torch.Tensor, cut: int, codec: codecs.Codec, batch: int = 256
) -> float:
    """Accuracy when the activation at `cut` goes through encode -> bytes -> decode."""
    correct = 0
    with torch.no_grad():
        for i in range(0, len(x), batch):
            act = model.run(x[i : i + batch], 0, cut)
            wire = torch.from_numpy(codecs.decode(codecs.encode(act, codec)))
            logits = model.run(wire, cut, model.n_stages)
            correct += int((logits.argmax(1) == y[i : i + batch]).sum())
    return correct / len(x)


def evaluate_model(
    name: str,
    repeats: int = 30,
    cfg: CompressionConfig | None = None,
    log: Callable[[str], None] = lambda _m: None,
    trained: TrainedModel | None = None,
) -> dict[str, Any]:
    cfg = cfg or CompressionConfig()
    tm = trained or load_trained(name)
    model = tm.model.eval()
    x, y = held_out_set(tm)
    acc = accuracy_of(model, x, y)
    log(f"{name}: accuracy {acc:.4f} on {len(x)} test windows; profiling stages")
    prof = profile_model(model, repeats=repeats)
    n = model.n_stages
    cuts = []
    for k in range(n + 1):
        lat = sum(s.host_latency_ms for s in prof.stages[:k])
        cuts.append(
            {
                "index": k,
                "name": model.cut_name(k),
                "activation_bytes": prof.activation_bytes(k),
                "front_macs": prof.front_macs(k),
                "front_params": prof.front_params(k),
                "host_latency_ms": round(lat, 4),
            }
        )

    # RLC (DeepX runtime layer compression) under the accuracy budget, ranks chosen on calibration data.
    cut = compression_cut(model, [prof.activation_bytes(k) for k in range(n + 1)])
    xc, yc = calibration_set(tm)
    log(f"{name}: compressing front at cut {cut} under a {cfg.accuracy_budget_points}-point budget")
    result = compress_front(
        model,
        cut,
        evaluate=lambda m: accuracy_of(m, xc, yc),
        budget_points=cfg.accuracy_budget_points,
        levels=cfg.energy_kept,
    )
    comp_acc = accuracy_of(result.model, x, y)
    compressed = {
        "accuracy": round(comp_acc, 4),
        "accuracy_drop_points": round((acc - comp_acc) * 100, 2),
        "cut": cut,
        "front_params": count_params(result.model.front(cut)),
        "front_params_uncompressed": count_params(model.front(cut)),
        "layers": {d.name: {"rank": d.rank, "full_rank": d.full_rank, "reason": d.reason} for d in result.layers},
    }

    log(f"{name}: activation codecs at every cut")
    codec_report: dict[str, Any] = {}
    for codec in (codecs.Codec.FP16, codecs.Codec.INT8):
        worst_acc, worst_ratio, per_cut = 1.0, 0.0, []
        for k in range(n):  # cut n is fully local: nothing crosses the wire
            shape = (1, *model.activation_shape(k))
            ratio = codecs.encoded_nbytes(shape, codec) / codecs.encoded_nbytes(shape, codecs.Codec.FP32)
            a = accuracy_with_codec(model, x, y, k, codec)
            per_cut.append({"cut": k, "accuracy": round(a, 4), "bytes_ratio": round(ratio, 4)})
            worst_acc, worst_ratio = min(worst_acc, a), max(worst_ratio, ratio)
        codec_report[codec.value] = {
            "worst_accuracy": round(worst_acc, 4),
            "worst_accuracy_loss_points": round((acc - worst_acc) * 100, 2),
            "worst_bytes_ratio": round(worst_ratio, 4),
            "per_cut": per_cut,
        }
    return {
        "task": tm.spec.task,
        "accuracy": round(acc, 4),
        "n_test": len(x),
        "params": count_params(model),
        "total_macs": prof.front_macs(n),
        "cuts": cuts,
        "compressed": compressed,
        "codecs": codec_report,
    }


def render_eval(out: dict[str, Any], console: Console) -> None:
    for name, e in out.items():
        t = Table(title=f"{name} ({e['task']}): accuracy {e['accuracy']:.4f} on {e['n_test']} test windows")
        for col in ("cut", "after", "activation KiB", "front MMACs", "front params", "host ms"):
            t.add_column(col, justify="right")
        for c in e["cuts"]:
            t.add_row(
                str(c["index"]),
                c["name"],
                f"{c['activation_bytes'] / 1024:.1f}",
                f"{c['front_macs'] / 1e6:.1f}",
                f"{c['front_params']:,}",
                f"{c['host_latency_ms']:.2f}",
            )
        console.print(t)
        cp = e["compressed"]
        console.print(
            f"  RLC at cut {cp['cut']}: front params {cp['front_params_uncompressed']:,} -> {cp['front_params']:,}"
            f" ({cp['front_params'] / cp['front_params_uncompressed']:.2f}x), accuracy {cp['accuracy']:.4f}"
            f" ({cp['accuracy_drop_points']:+.2f} points lost)"
        )
        for codec, r in e["codecs"].items():
            console.print(
                f"  {codec}: worst accuracy {r['worst_accuracy']:.4f}"
                f" ({r['worst_accuracy_loss_points']:.2f} points lost),"
                f" worst bytes ratio {r['worst_bytes_ratio']:.3f} of fp32"
            )


def build_model_catalog(name: str, repeats: int = 30, trained: TrainedModel | None = None) -> Any:
    """Measure and return the planner's catalog of a shipped model (accuracies on the test split)."""
    from pipelines.catalog import build_catalog

    tm = trained or load_trained(name)
    x, y = held_out_set(tm)
    return build_catalog(
        tm.model.eval(),
        evaluate=lambda m: accuracy_of(m, x, y),
        accuracy_with_codec=lambda m, k, c: accuracy_with_codec(m, x, y, k, c),
        repeats=repeats,
        window_s=tm.spec.window_s,
    )
