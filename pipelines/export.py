"""Export the device side of every cut a plan can name, as ONNX graphs a device runs without torch.

`export_model(name)` writes, into `<weights_dir>/export/<name>/` by default (the layout and the
manifest are `pipelines.artifacts`'s):

    every stage of the model uncompressed, and at every compression level of its catalog (the
    catalog's ranks, `compress_front_at_level`), one graph per distinct stage variant: the front
    of cut k at level L is the chain of stages [0, k) at L (the bottleneck encoder at cut 1 is
    never compressed, so it is one file); the whole model in one graph (local fallback for an app
    that wants one file); the preprocessing as a tensor program (log-mel with ONNX's STFT, then
    standardisation; standardisation alone for IMU); ORT-format twins of all of them, converted
    by the tool that ships with onnxruntime (`convert_onnx_models_to_ort`, fixed portable
    optimisations); `manifest.json`; and a copy of the catalog the levels came from (`{name}.
    catalog.json`, the file and sha256 the manifest names): a device without the data package
    reads it to know which fronts fit its memory (`splitsense edge run --device-class`).

Graphs come from torch.onnx's exporter (torch.export + onnxscript, opset OPSET, batch axis dynamic),
serialised deterministically: the same weights give the same bytes (`tests/unit/pipelines/
test_export.py` exports twice and compares every file). The export is written to a temporary
folder beside the target and moved into place only when complete.

Checked (`check=True`, the default), on every test window of the model's dataset (or the first
`check_windows`), with one thread on both sides so that the figures, and the manifest, reproduce:

    every front (cut, level)  ONNX Runtime's activation vs PyTorch's, from the same standardised
                              input: the largest absolute error and the largest error relative
                              to the largest PyTorch value (`max_rel_err`). Within TOLERANCE:
                              |onnx - torch| <= ATOL + RTOL x max|torch| elementwise. At and after a
                              bottleneck the quantiser rounds: a pre-rounding value within float
                              error of a half-integer may round the other way in one runtime (one
                              symbol off by 1); such windows are counted (`windows_code_differs`)
                              and the front is held to the tolerance on the other windows only
    accuracy per (cut, level) the exported path as a device runs it (numpy preprocessing, the
                              front's chain at L, the uncompressed tail chain) vs the local PyTorch
                              model's (torch preprocessing, `compress_front_at_level`, its tail):
                              must be equal
    the preprocessing         prep.onnx and the numpy preprocessing vs PyTorch's
    the whole-model graph     prep.onnx then model.onnx: accuracy vs the PyTorch model's

A failed check raises ModelError after the export is written (its manifest says what failed, and
`pipelines.artifacts.check_export` refuses it for a device).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipelines import datasets, features, numpy_features
from pipelines.artifacts import (
    BATCH,
    EXPORT_FORMAT,
    MANIFEST_NAME,
    ORT_SUMS_NAME,
    Artifact,
    ExportedModel,
    FrontEntry,
    Manifest,
    StageArtifact,
    TensorSpec,
    model_export_dir,
    same_level,
    sha256_file,
)
from pipelines.catalog import catalog_path, load_catalog
from pipelines.compress import compress_front_at_level, layer_ranks
from pipelines.stages import StagedModel
from pipelines.training import TrainedModel, load_trained, split_for, weights_path
from splitsense.errors import ModelError

__all__ = [
    "ATOL",
    "OPSET",
    "RTOL",
    "TOLERANCE",
    "ExportResult",
    "export_model",
    "raw_test_windows",
]

OPSET = 18  # ONNX Runtime Mobile supports it; STFT needs >= 17
# Elementwise bound on |onnx - torch| for float activations: ATOL + RTOL x max|torch| over the
# window's tensor. Measured errors are ~1e-6 relative (float32 sums in another order); 1e-4 leaves
# two orders of magnitude and still catches a wrong weight, layout or padding at once.
ATOL = 1e-5
RTOL = 1e-4
TOLERANCE = {
    "rule": "|onnx - torch| <= atol + rtol * max|torch| per window, every element of the front's output",
    "atol": ATOL,
    "rtol": RTOL,
    "bottleneck": (
        "quantised codes: a symbol may differ by 1 where the pre-rounding value is within float error of a "
        "half-integer; such windows are counted (windows_code_differs) and excluded from the bound"
    ),
    "accuracy": "equal, per (cut, level), through the exported path (numpy preprocessing, ONNX Runtime chain)",
}
_BATCH = 256  # windows per run when checking
_INPUT, _OUTPUT = "x", "y"

ProgressFn = Callable[[str], None]


@dataclass
class ExportResult:
    """What `export_model` wrote and what its check found."""

    model: str
    directory: Path
    manifest: Manifest
    files: int  # graphs written (ONNX and ORT format)
    nbytes: int  # their bytes
    ort_converted: int  # graphs with an ORT-format twin
    ort_failed: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # failed checks; [] when all passed (or unchecked)

    @property
    def checked(self) -> bool:
        return bool(self.manifest.check)

    def summary(self) -> dict[str, Any]:
        m = self.manifest
        worst = max((f.check.get("max_abs_err", 0.0) for f in m.fronts), default=0.0)
        worst_rel = max((f.check.get("max_rel_err", 0.0) for f in m.fronts), default=0.0)
        return {
            "model": self.model,
            "directory": str(self.directory),
            "files": self.files,
            "bytes": self.nbytes,
            "ort_converted": self.ort_converted,
            "ort_failed": list(self.ort_failed),
            "levels": list(m.levels),
            "fronts": len(m.fronts),
            "stage_variants": len(m.stages),
            "checked": self.checked,
            "max_abs_err": worst,
            "max_rel_err": worst_rel,
            "accuracy_torch": m.check.get("accuracy_torch"),
            "accuracy_onnx": m.check.get("accuracy_onnx"),
            "windows": m.check.get("windows"),
            "problems": list(self.problems),
        }


# ---------------------------------------------------------------------------------------------
# Graphs


class _LogMelPrep(nn.Module):
    """`TrainedModel.prepare_window` of fixed-length audio as a graph: (B, WINDOW_SAMPLES) samples
    -> standardised log-mel (B, 1, N_MELS, AUDIO_FRAMES). `features.log_mel` without its input
    checks (data-dependent: torch.export cannot trace them; the device checks in numpy)."""

    def __init__(self, standardizer: features.Standardizer) -> None:
        super().__init__()
        self.register_buffer("mean", standardizer.mean.detach().clone().float())
        self.register_buffer("std", standardizer.std.detach().clone().float())
        self.register_buffer("fb", features.mel_filterbank().clone())
        self.register_buffer("window", torch.hann_window(features.WIN_LENGTH))

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        spec = torch.stft(
            wave,
            n_fft=features.N_FFT,
            hop_length=features.HOP_LENGTH,
            win_length=features.WIN_LENGTH,
            window=self.get_buffer("window"),
            center=True,
            return_complex=True,
        )
        power = spec.real**2 + spec.imag**2
        mel = torch.matmul(self.get_buffer("fb"), power)
        x = torch.log(mel + features.LOG_FLOOR).unsqueeze(1)
        return (x - self.get_buffer("mean")) / self.get_buffer("std")


class _StandardizePrep(nn.Module):
    """IMU: (B, channels, T) raw -> standardised."""

    def __init__(self, standardizer: features.Standardizer) -> None:
        super().__init__()
        self.register_buffer("mean", standardizer.mean.detach().clone().float())
        self.register_buffer("std", standardizer.std.detach().clone().float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.get_buffer("mean")) / self.get_buffer("std")


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """torch.onnx and the ORT converter narrate on stdout, logging and warnings; keep the CLI's
    output to our own progress."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._export", "onnxscript")]
    loggers += [logging.getLogger(n) for n in ("ort_format_model", "ort_format_model.utils", "onnxruntime")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lv in zip(loggers, levels, strict=True):
            lg.setLevel(lv)


def _export_graph(module: nn.Module, sample: torch.Tensor, input_name: str, output_name: str) -> bytes:
    """`module` (one output) as ONNX bytes, batch axis dynamic, serialised deterministically."""
    out: bytes = _export_proto(module, sample, input_name, [output_name]).SerializeToString(deterministic=True)
    return out


def _export_proto(module: nn.Module, sample: torch.Tensor, input_name: str, output_names: Sequence[str]) -> Any:
    """`module` as an onnx ModelProto (torch.onnx's exporter, opset OPSET, its optimiser: BatchNorm
    folded into the convolutions), every input's and output's first axis the dynamic BATCH."""
    module = module.eval()
    batch = torch.export.Dim(BATCH, min=1)
    try:
        with _quiet(), torch.no_grad():
            program = torch.onnx.export(
                module,
                (sample,),
                dynamo=True,
                opset_version=OPSET,
                input_names=[input_name],
                output_names=list(output_names),
                dynamic_shapes=({0: batch},),
                external_data=False,
                optimize=True,
                verbose=False,
            )
    except Exception as e:  # torch.onnx raises many types; say which graph
        raise ModelError(f"torch.onnx could not export {type(module).__name__}: {type(e).__name__}: {e}") from e
    assert program is not None
    proto = program.model_proto
    for value in (*proto.graph.input, *proto.graph.output):  # name the dynamic axis the same everywhere
        dim = value.type.tensor_type.shape.dim[0]
        dim.ClearField("dim_value")
        dim.dim_param = BATCH
    proto.producer_name = "splitsense (torch.onnx)"
    return proto


class _AllStages(nn.Module):
    """A StagedModel whose forward returns every stage's output: one export per level, from which
    each stage's graph is cut out (`_cut`), instead of one export per stage variant (4 exports of a
    model instead of ~15: the exporter takes a second or two each)."""

    def __init__(self, model: StagedModel) -> None:
        super().__init__()
        self.stages = model.stages

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outs = []
        for stage in self.stages:
            x = stage(x)
            outs.append(x)
        return tuple(outs)


def _act(k: int) -> str:
    return f"act{k}"


def _cut(proto: Any, start: int, stop: int, input_name: str, output_name: str) -> bytes:
    """Stages [start, stop) of an `_AllStages` graph as a graph of its own (onnx's Extractor: the
    nodes between the activations at the two cuts and the initializers they read), its input and
    output renamed; serialised deterministically."""
    import onnx.utils

    sub = onnx.utils.Extractor(proto).extract_model([_act(start)], [_act(stop)])
    renames = {_act(start): input_name, _act(stop): output_name}
    for node in sub.graph.node:
        node.input[:] = [renames.get(v, v) for v in node.input]
        node.output[:] = [renames.get(v, v) for v in node.output]
    for value in (*sub.graph.input, *sub.graph.output):
        value.name = renames.get(value.name, value.name)
    sub.producer_name = proto.producer_name
    sub.producer_version = proto.producer_version
    sub.graph.name = f"{proto.graph.name or 'graph'}[{start}:{stop}]"
    out: bytes = sub.SerializeToString(deterministic=True)
    return out


def _spec(name: str, shape: Sequence[int]) -> TensorSpec:
    return TensorSpec(name, (BATCH, *(int(s) for s in shape)), "float32")


def _stage_ranks(model: StagedModel, stage: int) -> dict[str, int]:
    """{layer: rank} of the LowRank layers of stage `stage` (empty: the stage is uncompressed)."""
    prefix = model.stage_names[stage]
    return {k: v for k, v in layer_ranks(model).items() if k == prefix or k.startswith(prefix + ".")}


def _level_tag(level: float) -> str:
    return f"l{level:g}"


def _catalog_levels(name: str, weights_dir: Path | None) -> tuple[tuple[float, ...], dict[str, str] | None]:
    """The levels a plan can name (the catalog's kept levels; 1.0 only without a catalog) and the
    catalog's file and sha256."""
    path = catalog_path(name, weights_dir)
    if not path.exists():
        return (1.0,), None
    cat = load_catalog(name, weights_dir)
    levels = sorted({float(lv.energy_kept) for lv in cat.levels} | {1.0}, reverse=True)
    return tuple(levels), {"file": path.name, "sha256": sha256_file(path)}


def _tools() -> dict[str, str]:
    import onnx
    import onnxruntime
    import onnxscript

    return {
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxscript": onnxscript.__version__,
        "onnxruntime": onnxruntime.__version__,
    }


def _priors(model: StagedModel) -> dict[int, tuple[int, np.ndarray]]:
    """cut -> (low, the float32 table in the weights) of every bottleneck, checked to rebuild
    exactly the prior the torch side codes with."""
    out: dict[int, tuple[int, np.ndarray]] = {}
    for k in range(1, model.n_stages + 1):
        prior = model.symbol_prior(k)
        if prior is None:
            continue
        quant = getattr(model.stages[k - 1], "quant", None)
        pmf = getattr(quant, "pmf", None)
        if not isinstance(pmf, torch.Tensor):
            raise ModelError(f"stage {k - 1} of {model.name!r} has a symbol prior but no quantiser table to export")
        raw = pmf.detach().to(torch.float32).cpu().numpy().copy()
        out[k] = (prior.low, raw)
    return out


_OPS_CONFIG = "required_operators.config"


def _convert_to_ort(directory: Path, names: Sequence[str]) -> tuple[dict[str, str], list[str]]:
    """ORT-format twins of the ONNX files `names` in `directory`, by the converter that ships with
    onnxruntime (fixed, portable optimisations), and the operators they use. Returns ({onnx name:
    ort name}, names that did not convert)."""
    from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

    converted: dict[str, str] = {}
    failed: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "src", Path(tmp) / "out"
        src.mkdir()
        for n in names:
            shutil.copyfile(directory / n, src / n)
        with _quiet():
            convert_onnx_models_to_ort(
                src, output_dir=out, optimization_styles=[OptimizationStyle.Fixed], allow_conversion_failures=True
            )
        for n in names:
            ort_name = n[: -len(".onnx")] + ".ort"
            if (out / ort_name).exists():
                shutil.move(out / ort_name, directory / ort_name)
                converted[n] = ort_name
            else:
                failed.append(n)
        config = out / _OPS_CONFIG
        if config.exists():  # its comments name the converted files by their (temporary) paths
            lines = [
                f"# - {Path(line[4:].strip()).name}" if line.startswith("# - ") else line
                for line in config.read_text().splitlines()
            ]
            (directory / _OPS_CONFIG).write_text("\n".join(lines) + "\n")
    sums = {
        "note": (
            "sha256 of the ORT-format files: ONNX Runtime lays their tables out in an order seeded by "
            "memory addresses, so these bytes change from one conversion to the next (the graphs do not)"
        ),
        "files": {
            o: {"sha256": sha256_file(directory / o), "bytes": (directory / o).stat().st_size}
            for o in sorted(converted.values())
        },
    }
    (directory / ORT_SUMS_NAME).write_text(json.dumps(sums, indent=1) + "\n")
    return converted, failed


# ---------------------------------------------------------------------------------------------
# Test windows


def raw_test_windows(trained: TrainedModel, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(raw windows, labels) of the model's test split as a device sees them before preprocessing:
    fixed-length audio samples (B, WINDOW_SAMPLES), or raw IMU windows (B, channels, T)."""
    spec = trained.spec
    if spec.dataset == "fsdd":
        clips = datasets.load_fsdd()
        sub = clips.subset(clips.test_mask)
        n = len(sub.waveforms) if limit is None else min(limit, len(sub.waveforms))
        raw = np.stack([numpy_features.fix_length(w) for w in sub.waveforms[:n]]).astype(np.float32)
    else:
        raw = split_for(spec, "test").x.numpy()
        raw = raw[: len(raw) if limit is None else limit].astype(np.float32)
    labels = split_for(spec, "test").y.numpy()[: len(raw)]
    return raw, labels


def _torch_prepare(trained: TrainedModel, raw: np.ndarray) -> np.ndarray:
    x = torch.from_numpy(raw)
    with torch.inference_mode():
        if trained.spec.modality == "audio":
            x = features.log_mel(x)
        return trained.prepare(x).numpy()


def _batches(n: int) -> Iterator[slice]:
    for i in range(0, n, _BATCH):
        yield slice(i, min(n, i + _BATCH))


# ---------------------------------------------------------------------------------------------
# Export


def export_model(
    name: str,
    out_dir: Path | None = None,
    *,
    weights_dir: Path | None = None,
    levels: Sequence[float] | None = None,
    check: bool = True,
    check_windows: int | None = None,
    ort_format: bool = True,
    progress: ProgressFn | None = None,
) -> ExportResult:
    """Export model `name` (module docstring) into `out_dir` (default `<weights_dir>/export/<name>`),
    replacing what was there. `levels` limits the compression levels (default: every level of the
    catalog; 1.0 is always exported). Raises ModelError when a check fails (the export stays)."""
    say = progress or (lambda _m: None)
    trained = load_trained(name, weights_dir)
    model = trained.model.eval()
    all_levels, catalog = _catalog_levels(name, weights_dir)
    if levels is not None:
        wanted = [float(x) for x in levels]
        unknown = [x for x in wanted if not any(same_level(x, a) for a in all_levels)]
        if unknown:
            raise ModelError(
                f"model {name!r} has no compression level {unknown} in its catalog "
                f"(levels: {', '.join(f'{a:g}' for a in all_levels)})"
            )
        all_levels = tuple(a for a in all_levels if a >= 1.0 or any(same_level(a, x) for x in wanted))
    target = Path(out_dir) if out_dir is not None else model_export_dir(name, weights_dir=weights_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    work.chmod(0o755)  # mkdtemp's 0700 would stay with the export once it is moved into place
    try:
        manifest, written, ort_failed = _write(trained, model, all_levels, catalog, weights_dir, work, ort_format, say)
        problems: list[str] = []
        if check:
            manifest, problems = _check(trained, manifest, work, check_windows, weights_dir, say)
        (work / MANIFEST_NAME).write_text(manifest.dumps())
        if catalog is not None:  # the catalog the levels came from, for a device without the data package
            shutil.copyfile(catalog_path(name, weights_dir), work / catalog["file"])
        if target.exists():
            shutil.rmtree(target)
        os.replace(work, target)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    files = [p for p in target.iterdir() if p.suffix in (".onnx", ".ort")]
    result = ExportResult(
        model=name,
        directory=target,
        manifest=manifest,
        files=len(files),
        nbytes=sum(p.stat().st_size for p in files),
        ort_converted=sum(1 for _, a in manifest.artifacts() if a.ort_file is not None),
        ort_failed=ort_failed,
        problems=problems,
    )
    if problems:
        raise ModelError(f"the export of {name!r} at {target} failed its check: {'; '.join(problems)}")
    return result


def _write(
    trained: TrainedModel,
    model: StagedModel,
    levels: tuple[float, ...],
    catalog: dict[str, str] | None,
    weights_dir: Path | None,
    work: Path,
    ort_format: bool,
    say: ProgressFn,
) -> tuple[Manifest, int, list[str]]:
    name, n = model.name, model.n_stages
    shapes = [model.activation_shape(k) for k in range(n + 1)]
    compressed = {lv: (model if lv >= 1.0 else compress_front_at_level(model, n, lv, weights_dir=weights_dir).eval())
                  for lv in levels}  # fmt: skip
    # Stage variants: one per (stage, its layers' ranks); the levels that share it.
    variants: dict[tuple[int, tuple[tuple[str, int], ...]], list[float]] = {}
    for lv in levels:
        for i in range(n):
            ranks = tuple(sorted(_stage_ranks(compressed[lv], i).items()))
            variants.setdefault((i, ranks), []).append(lv)
    onnx_files: dict[str, tuple[str, TensorSpec, TensorSpec]] = {}  # key -> (file, input, output)
    stage_keys: dict[tuple[int, float], str] = {}
    stage_meta: dict[str, tuple[int, tuple[float, ...], dict[str, int]]] = {}
    tops = sorted({max(lvs) for lvs in variants.values()} | {1.0}, reverse=True)
    graphs: dict[float, Any] = {}
    for j, lv in enumerate(tops, start=1):  # one export per level whose graph a variant is cut from
        say(f"{name}: exporting level {lv:g} ({j}/{len(tops) + 1})")
        graphs[lv] = _export_proto(
            _AllStages(compressed[lv]), torch.zeros((2, *shapes[0])), _act(0), [_act(k) for k in range(1, n + 1)]
        )
    for (i, ranks), lvs in sorted(variants.items(), key=lambda kv: (kv[0][0], -max(kv[1]))):
        top = max(lvs)
        key = f"stage{i}" if not ranks else f"stage{i}.{_level_tag(top)}"
        file = f"stage{i}.{model.stage_names[i]}{'' if not ranks else '.' + _level_tag(top)}.onnx"
        (work / file).write_bytes(_cut(graphs[top], i, i + 1, _INPUT, _OUTPUT))
        onnx_files[key] = (file, _spec(_INPUT, shapes[i]), _spec(_OUTPUT, shapes[i + 1]))
        stage_meta[key] = (i, tuple(sorted(lvs, reverse=True)), dict(ranks))
        for lv in lvs:
            stage_keys[(i, lv)] = key
    (work / "model.onnx").write_bytes(_cut(graphs[1.0], 0, n, _INPUT, "logits"))
    onnx_files["whole"] = ("model.onnx", _spec(_INPUT, shapes[0]), _spec("logits", shapes[n]))
    say(f"{name}: exporting the preprocessing ({len(tops) + 1}/{len(tops) + 1})")
    if trained.spec.modality == "audio":
        prep: nn.Module = _LogMelPrep(trained.standardizer)
        raw_shape: tuple[int, ...] = (features.WINDOW_SAMPLES,)
    else:
        prep = _StandardizePrep(trained.standardizer)
        raw_shape = tuple(shapes[0])
    (work / "prep.onnx").write_bytes(_export_graph(prep, torch.zeros((2, *raw_shape)), "raw", _INPUT))
    onnx_files["prep"] = ("prep.onnx", _spec("raw", raw_shape), _spec(_INPUT, shapes[0]))

    converted: dict[str, str] = {}
    failed: list[str] = []
    if ort_format:
        say(f"{name}: converting to ORT format")
        converted, failed = _convert_to_ort(work, [f for f, _, _ in onnx_files.values()])

    def artifact(key: str) -> Artifact:
        file, inp, outp = onnx_files[key]
        ort = converted.get(file)
        return Artifact(
            file=file,
            sha256=sha256_file(work / file),
            nbytes=(work / file).stat().st_size,
            input=inp,
            output=outp,
            ort_file=ort,
        )

    stages = tuple(
        StageArtifact(key, i, model.stage_names[i], lvs, ranks, artifact(key))
        for key, (i, lvs, ranks) in stage_meta.items()
    )
    fronts = tuple(
        FrontEntry(
            cut=k,
            level=lv,
            stages=tuple(stage_keys[(i, lv)] for i in range(k)),
            input=_spec(_INPUT, shapes[0]),
            output=_spec(_INPUT if k == 0 else _OUTPUT, shapes[k]),
        )
        for lv in levels
        for k in range(n + 1)
        if lv >= 1.0 or k > 0  # cut 0 runs nothing: one entry
    )
    std = trained.standardizer
    wpath = weights_path(name, weights_dir)
    manifest = Manifest(
        model=name,
        modality=trained.spec.modality,
        stage_names=tuple(model.stage_names),
        input_shape=tuple(model.input_shape),
        raw_shape=raw_shape,
        class_names=tuple(model.class_names),
        activation_shapes=tuple(tuple(s) for s in shapes),
        levels=levels,
        opset=OPSET,
        weights={"file": wpath.name, "sha256": sha256_file(wpath)},
        catalog=catalog,
        tools=_tools(),
        mean=std.mean.detach().float().numpy().copy(),
        std=std.std.detach().float().numpy().copy(),
        priors=_priors(model),
        stages=stages,
        fronts=fronts,
        whole=artifact("whole"),
        prep=artifact("prep"),
        tolerance={},
        format=EXPORT_FORMAT,
    )
    for k in range(n + 1):  # the manifest's tables rebuild the torch side's exactly
        a, b = manifest.symbol_prior(k), model.symbol_prior(k)
        if (a is None) != (b is None) or (a is not None and b is not None and not np.array_equal(a.pmf, b.pmf)):
            raise ModelError(f"the exported symbol prior of {name!r} at cut {k} does not rebuild the model's")
    return manifest, len(onnx_files) + len(converted), failed


# ---------------------------------------------------------------------------------------------
# Check


def _sig(x: float) -> float:
    """Three significant digits: the figures a manifest records (and reproduces)."""
    return float(f"{x:.3g}")


def _check(
    trained: TrainedModel,
    manifest: Manifest,
    work: Path,
    limit: int | None,
    weights_dir: Path | None,
    say: ProgressFn,
) -> tuple[Manifest, list[str]]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _check_single_thread(trained, manifest, work, limit, weights_dir, say)
    finally:
        torch.set_num_threads(threads)


def _check_single_thread(
    trained: TrainedModel,
    manifest: Manifest,
    work: Path,
    limit: int | None,
    weights_dir: Path | None,
    say: ProgressFn,
) -> tuple[Manifest, list[str]]:
    name, n = manifest.model, manifest.n_stages
    model = trained.model.eval()
    ex = ExportedModel(work, intra_op_threads=1, manifest=manifest)
    has_ort = any(a.ort_file is not None for _, a in manifest.artifacts())
    ex_ort = ExportedModel(work, intra_op_threads=1, manifest=manifest, file_format="ort") if has_ort else None
    raw, labels = raw_test_windows(trained, limit)
    windows = len(raw)
    say(f"{name}: checking on {windows} test windows")
    x_torch = _torch_prepare(trained, raw)
    prep_np = numpy_features.Preprocessor(manifest.modality, manifest.mean, manifest.std)
    x_np = np.concatenate([prep_np.standardize(prep_np.raw_inputs(raw[s])) for s in _batches(windows)])
    x_onnx = np.concatenate([ex.run_prep(raw[s]) for s in _batches(windows)])
    bottlenecks = sorted(manifest.priors)
    problems: list[str] = []

    torch_models = {
        lv: (model if lv >= 1.0 else compress_front_at_level(model, n, lv).eval()) for lv in manifest.levels
    }

    def torch_run(lv: float, x: np.ndarray, start: int, stop: int) -> np.ndarray:
        outs = []
        with torch.inference_mode():
            for s in _batches(len(x)):
                outs.append(torch_models[lv].run(torch.from_numpy(x[s]), start, stop).numpy())
        return np.concatenate(outs)

    def onnx_run(lv: float, x: np.ndarray, start: int, stop: int, runner: ExportedModel = ex) -> np.ndarray:
        return np.concatenate([runner.run_stages(x[s], start, stop, lv) for s in _batches(len(x))])

    fronts: list[FrontEntry] = []
    acc_torch: dict[tuple[int, float], float] = {}
    acc_onnx: dict[tuple[int, float], float] = {}
    for lv in manifest.levels:
        say(f"{name}: checking level {lv:g}")
        # activations of the chain compressed at lv, stage by stage, on both sides, from one input
        a_t = [x_torch]
        a_o = [x_torch]
        a_r = [x_torch]  # the ORT-format files
        p_o = [x_np]  # the exported path: numpy preprocessing
        for i in range(n):
            a_t.append(torch_run(lv, a_t[-1], i, i + 1))
            a_o.append(onnx_run(lv, a_o[-1], i, i + 1))
            p_o.append(onnx_run(lv, p_o[-1], i, i + 1))
            if ex_ort is not None:
                a_r.append(onnx_run(lv, a_r[-1], i, i + 1, ex_ort))
        for k in range(n + 1):
            if lv < 1.0 and k == 0:
                continue
            entry = manifest.front(k, lv)
            ref, got = a_t[k], a_o[k]
            code_differs = np.zeros(windows, dtype=bool)
            for b in bottlenecks:
                if b <= k:
                    code_differs |= (a_t[b] != a_o[b]).reshape(windows, -1).any(axis=1)
                    if ex_ort is not None:
                        code_differs |= (a_t[b] != a_r[b]).reshape(windows, -1).any(axis=1)
            err = np.abs(got - ref).reshape(windows, -1)
            err_ort = np.abs(a_r[k] - ref).reshape(windows, -1) if ex_ort is not None else np.zeros_like(err)
            scale = np.abs(ref).reshape(windows, -1).max(axis=1)
            bound = ATOL + RTOL * scale
            over = ((err > bound[:, None]) | (err_ort > bound[:, None])).any(axis=1) & ~code_differs
            # the accuracy of cut k at lv: the front's activation on through the uncompressed tail
            if lv >= 1.0:
                logits_t, logits_o = a_t[n], p_o[n]
            else:
                logits_t = torch_run(1.0, a_t[k], k, n)
                logits_o = onnx_run(1.0, p_o[k], k, n)
            pred_t, pred_o = logits_t.argmax(axis=1), logits_o.argmax(axis=1)
            acc_t, acc_o = float((pred_t == labels).mean()), float((pred_o == labels).mean())
            acc_torch[(k, lv)], acc_onnx[(k, lv)] = acc_t, acc_o
            ok = not over.any() and acc_t == acc_o
            check: dict[str, Any] = {
                "windows": windows,
                "max_abs_err": _sig(float(err.max()) if err.size else 0.0),
                "max_rel_err": _sig(float((err.max(axis=1) / np.maximum(scale, 1e-30)).max()) if err.size else 0.0),
                "ort_format_max_abs_err": _sig(float(err_ort.max()) if err_ort.size else 0.0),
                "windows_over_tolerance": int(over.sum()),
                "windows_code_differs": int(code_differs.sum()),
                "accuracy_torch": round(acc_t, 6),
                "accuracy_onnx": round(acc_o, 6),
                "predictions_differ": int((pred_t != pred_o).sum()),
                "ok": bool(ok),
            }
            if not ok:
                what = []
                if over.any():
                    what.append(f"{int(over.sum())} windows beyond the tolerance (max abs err {err.max():.3g})")
                if acc_t != acc_o:
                    what.append(f"accuracy {acc_o:.4f} through ONNX Runtime vs {acc_t:.4f} in PyTorch")
                problems.append(f"cut {k} level {lv:g}: {', '.join(what)}")
            fronts.append(replace(entry, check=check))
    say(f"{name}: checking the preprocessing and the whole-model graph")
    logits_whole = np.concatenate([ex.run_whole(x_onnx[s]) for s in _batches(windows)])
    acc_whole = float((logits_whole.argmax(axis=1) == labels).mean())
    acc_local = acc_torch[(n, 1.0)]
    if acc_whole != acc_local:
        problems.append(f"whole model: accuracy {acc_whole:.4f} through prep.onnx + model.onnx vs {acc_local:.4f}")
    prep_err = float(np.abs(x_onnx - x_torch).max())
    np_err = float(np.abs(x_np - x_torch).max())
    summary = {
        "ok": not problems,
        "windows": windows,
        "accuracy_torch": round(acc_local, 6),
        "accuracy_onnx": round(acc_onnx[(n, 1.0)], 6),
        "accuracy_whole_graph": round(acc_whole, 6),
        "accuracy_equal_every_front": all(acc_torch[k] == acc_onnx[k] for k in acc_torch),
        "prep_onnx_max_abs_err": _sig(prep_err),
        "prep_numpy_max_abs_err": _sig(np_err),
        "threads": 1,
        "problems": problems,
    }
    out = replace(manifest, fronts=tuple(fronts), tolerance=dict(TOLERANCE), check=summary)
    return out, problems
