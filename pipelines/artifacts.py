"""Exported fronts on disk: the manifest `splitsense models export` writes, and the ONNX Runtime
sessions that run what it lists. No torch here (numpy, and onnxruntime when a session is opened):
this is what a device reads.

One folder per model (default `<weights_dir>/export/<model>/`, `model_export_dir`):

    manifest.json                 this module's `Manifest` (format EXPORT_FORMAT)
    prep.onnx                     the preprocessing as a tensor program: raw window -> standardised
                                  model input (log-mel + standardisation for audio, standardisation
                                  for IMU); for a runtime without numpy (a phone app)
    stage{i}.{name}.onnx          stage i uncompressed, batch dimension dynamic ("batch")
    stage{i}.{name}.l{L}.onnx     stage i at compression level L (its layers at the level's ranks);
                                  one file per distinct variant: levels whose ranks leave stage i
                                  unchanged, or equal, share one file (`StageArtifact.levels`)
    model.onnx                    the whole model uncompressed, in one graph (local fallback from
                                  the input, for an app that wants one file)
    *.ort                         ONNX Runtime's mobile format of each, where the converter that
                                  ships with onnxruntime converted it (optimisations fixed at
                                  conversion, portable: no x86-only layouts)
    ort_files.json                {file: {sha256, bytes}} of the .ort files. Not in the manifest:
                                  ORT's serializer lays its tables out in the order of hash maps
                                  seeded by memory addresses, so an .ort file's bytes (not its
                                  graph, kernels or tensors) change from one conversion to the next,
                                  while manifest.json and every .onnx file are byte-reproducible
    required_operators.config     the operators the .ort files use (for a reduced ORT Mobile build)

Why stages and not one file per (cut, level): the runtime times every stage (telemetry's
per-stage device times feed the planner's cost model), runs the tail [k, N) from the activation it
already has when an offload fails, and runs every task's own tail on a shared front; one file per
stage variant gives all of it, and costs the device storage once per variant instead of once per
front (a front at cut k repeats the k stages before it). `Manifest.fronts` lists, per (cut, level),
the chain of stage files and the checked error of that front against PyTorch.

The manifest records what the files came from (the sha256 of the weights file and of the catalog
whose ranks make the levels) and the sha256 of every file, so a device can refuse stale or damaged
exports (`check_export`, `verify_files`), and carries what the runtime needs besides the graphs:
activation shapes per cut, the symbol prior of every bottleneck (the ans codec's table, exactly
the float32 table in the weights), and the standardisation statistics.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from splitsense.config import PathsConfig
from splitsense.errors import ConfigError, ModelError
from splitsense.kinds import SymbolPrior

__all__ = [
    "BATCH",
    "EXPORT_FORMAT",
    "MANIFEST_NAME",
    "ORT_SUMS_NAME",
    "Artifact",
    "ExportedModel",
    "FrontEntry",
    "Manifest",
    "StageArtifact",
    "TensorSpec",
    "check_export",
    "export_root",
    "load_manifest",
    "model_export_dir",
    "session_options",
    "sha256_file",
    "verify_files",
]

EXPORT_FORMAT = 1  # bumped when the manifest's layout changes; load_manifest refuses other formats
MANIFEST_NAME = "manifest.json"
ORT_SUMS_NAME = "ort_files.json"
BATCH = "batch"  # the name of every graph's dynamic first axis
_LEVEL_TOL = 1e-9


def export_root(weights_dir: Path | None = None) -> Path:
    """Where exports go by default: an `export` folder beside the weights they come from."""
    return (weights_dir or PathsConfig().weights_dir) / "export"


def model_export_dir(model: str, root: Path | None = None, weights_dir: Path | None = None) -> Path:
    return (root or export_root(weights_dir)) / model


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def same_level(a: float, b: float) -> bool:
    return abs(float(a) - float(b)) <= _LEVEL_TOL


@dataclass(frozen=True)
class TensorSpec:
    """A graph input or output: its name, shape (BATCH for the dynamic first axis) and dtype."""

    name: str
    shape: tuple[int | str, ...]
    dtype: str = "float32"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TensorSpec:
        return cls(str(d["name"]), tuple(d["shape"]), str(d.get("dtype", "float32")))


@dataclass(frozen=True)
class Artifact:
    """One exported graph: its ONNX file and, where it converted, its ORT-format twin."""

    file: str
    sha256: str
    nbytes: int
    input: TensorSpec
    output: TensorSpec
    ort_file: str | None = None  # its digest is in ORT_SUMS_NAME (module docstring)

    def to_dict(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "sha256": self.sha256,
            "bytes": self.nbytes,
            "input": self.input.to_dict(),
            "output": self.output.to_dict(),
            "ort_file": self.ort_file,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Artifact:
        return cls(
            file=str(d["file"]),
            sha256=str(d["sha256"]),
            nbytes=int(d["bytes"]),
            input=TensorSpec.from_dict(d["input"]),
            output=TensorSpec.from_dict(d["output"]),
            ort_file=d.get("ort_file"),
        )


@dataclass(frozen=True)
class StageArtifact:
    """Stage `stage` at the compression `levels` that share this variant (`ranks`: its layers'
    ranks; empty for the uncompressed stage)."""

    key: str
    stage: int
    name: str
    levels: tuple[float, ...]
    ranks: Mapping[str, int]
    artifact: Artifact

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "stage": self.stage,
            "name": self.name,
            "levels": list(self.levels),
            "ranks": dict(self.ranks),
            **self.artifact.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> StageArtifact:
        return cls(
            key=str(d["key"]),
            stage=int(d["stage"]),
            name=str(d["name"]),
            levels=tuple(float(x) for x in d["levels"]),
            ranks={str(k): int(v) for k, v in d["ranks"].items()},
            artifact=Artifact.from_dict(d),
        )


@dataclass(frozen=True)
class FrontEntry:
    """The device side of cut `cut` at compression `level`: stages [0, cut) as the chain of stage
    variants `stages` (keys of `Manifest.stages`), and how far it is from PyTorch's front (`check`:
    filled by `pipelines.export.check_export_dir`, empty when the export was not checked)."""

    cut: int
    level: float
    stages: tuple[str, ...]
    input: TensorSpec
    output: TensorSpec
    check: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "cut": self.cut,
            "level": self.level,
            "stages": list(self.stages),
            "input": self.input.to_dict(),
            "output": self.output.to_dict(),
            "check": dict(self.check),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FrontEntry:
        return cls(
            cut=int(d["cut"]),
            level=float(d["level"]),
            stages=tuple(str(s) for s in d["stages"]),
            input=TensorSpec.from_dict(d["input"]),
            output=TensorSpec.from_dict(d["output"]),
            check=dict(d.get("check") or {}),
        )


@dataclass(frozen=True)
class Manifest:
    """Everything a device needs to run a model's exported fronts (module docstring)."""

    model: str
    modality: str
    stage_names: tuple[str, ...]
    input_shape: tuple[int, ...]
    raw_shape: tuple[int, ...]  # one raw sensor window: (samples,) of audio, (channels, T) of IMU
    class_names: tuple[str, ...]
    activation_shapes: tuple[tuple[int, ...], ...]  # per cut 0..N, without the batch dimension
    levels: tuple[float, ...]  # exported compression levels, 1.0 first
    opset: int
    weights: Mapping[str, str]  # {"file", "sha256"} of the weights the graphs come from
    catalog: Mapping[str, str] | None  # {"file", "sha256"} of the catalog whose ranks make the levels
    tools: Mapping[str, str]  # versions of torch, onnx, onnxscript, onnxruntime that made the files
    mean: np.ndarray  # standardisation statistics (float32), broadcast over the batch dimension
    std: np.ndarray
    # cut -> (lowest symbol, the bottleneck's float32 coding table as the weights hold it)
    priors: Mapping[int, tuple[int, np.ndarray]]
    stages: tuple[StageArtifact, ...]
    fronts: tuple[FrontEntry, ...]
    whole: Artifact
    prep: Artifact | None = None
    tolerance: Mapping[str, Any] = field(default_factory=dict)
    check: Mapping[str, Any] = field(default_factory=dict)  # accuracy torch vs onnx, prep errors
    format: int = EXPORT_FORMAT

    @property
    def n_stages(self) -> int:
        return len(self.stage_names)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def activation_shape(self, k: int) -> tuple[int, ...]:
        self.check_cut(k)
        return self.activation_shapes[k]

    def symbol_prior(self, k: int) -> SymbolPrior | None:
        """The coding table of the code at cut k (a bottleneck), else None: the very SymbolPrior the
        torch side makes (`Quantizer.prior`: the float32 table as float64)."""
        self.check_cut(k)
        return self._symbol_priors.get(k)

    @cached_property
    def _symbol_priors(self) -> dict[int, SymbolPrior]:
        return {k: SymbolPrior(low=low, pmf=pmf.astype(np.float64)) for k, (low, pmf) in self.priors.items()}

    def check_cut(self, k: int) -> int:
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= self.n_stages:
            raise ModelError(f"cut {k!r} is out of range for model {self.model!r}: expected 0..{self.n_stages}")
        return k

    def level_of(self, level: float) -> float:
        """The exported level equal to `level` (float noise aside); ModelError if it was not exported."""
        for lv in self.levels:
            if same_level(lv, level):
                return lv
        raise ModelError(
            f"model {self.model!r} has no exported front at compression level {level:g} (exported: "
            f"{', '.join(f'{x:g}' for x in self.levels)}); re-export it: "
            f"`splitsense models export --model {self.model}`"
        )

    def stage(self, stage: int, level: float) -> StageArtifact:
        """The variant of stage `stage` at `level`."""
        lv = self.level_of(level)
        for s in self.stages:
            if s.stage == stage and any(same_level(lv, x) for x in s.levels):
                return s
        raise ModelError(f"the export of {self.model!r} lacks stage {stage} at level {level:g}; re-export it")

    def front(self, cut: int, level: float) -> FrontEntry:
        lv = self.level_of(level)
        for f in self.fronts:
            if f.cut == cut and same_level(f.level, lv):
                return f
        raise ModelError(f"the export of {self.model!r} lacks the front of cut {cut} at level {level:g}")

    def chain_digest(self, cut: int) -> str:
        """sha256 over the preprocessing statistics and the files of stages [0, cut) uncompressed:
        two models with equal digests compute the same activation at `cut` from the same window
        (a task group's shared front, pipelines/groups.py)."""
        h = hashlib.sha256()
        h.update(self.modality.encode())
        h.update(np.ascontiguousarray(self.mean, dtype="<f4").tobytes())
        h.update(np.ascontiguousarray(self.std, dtype="<f4").tobytes())
        for i in range(self.check_cut(cut)):
            h.update(self.stage(i, 1.0).artifact.sha256.encode())
        return h.hexdigest()

    def artifacts(self) -> list[tuple[str, Artifact]]:
        """(key, artifact) of every graph: the stage variants, "whole", "prep"."""
        out = [(s.key, s.artifact) for s in self.stages] + [("whole", self.whole)]
        if self.prep is not None:
            out.append(("prep", self.prep))
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "model": self.model,
            "modality": self.modality,
            "stage_names": list(self.stage_names),
            "input_shape": list(self.input_shape),
            "raw_shape": list(self.raw_shape),
            "class_names": list(self.class_names),
            "activation_shapes": [list(s) for s in self.activation_shapes],
            "levels": list(self.levels),
            "opset": self.opset,
            "weights": dict(self.weights),
            "catalog": None if self.catalog is None else dict(self.catalog),
            "tools": dict(self.tools),
            "standardizer": {
                "shape": list(self.mean.shape),
                "mean": [float(v) for v in self.mean.reshape(-1)],
                "std": [float(v) for v in self.std.reshape(-1)],
            },
            "priors": {
                str(k): {"low": low, "pmf_float32": [[float(v) for v in row] for row in pmf]}
                for k, (low, pmf) in sorted(self.priors.items())
            },
            "prep": None if self.prep is None else self.prep.to_dict(),
            "stages": [s.to_dict() for s in self.stages],
            "whole": self.whole.to_dict(),
            "fronts": [f.to_dict() for f in self.fronts],
            "tolerance": dict(self.tolerance),
            "check": dict(self.check),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Manifest:
        fmt = d.get("format")
        if fmt != EXPORT_FORMAT:
            raise ModelError(
                f"export manifest format {fmt!r} is not {EXPORT_FORMAT}; re-export with `splitsense models export`"
            )
        std = d["standardizer"]
        shape = tuple(int(x) for x in std["shape"])
        priors = {
            int(k): (int(p["low"]), np.asarray(p["pmf_float32"], dtype=np.float32))
            for k, p in d.get("priors", {}).items()
        }
        return cls(
            model=str(d["model"]),
            modality=str(d["modality"]),
            stage_names=tuple(d["stage_names"]),
            input_shape=tuple(int(x) for x in d["input_shape"]),
            raw_shape=tuple(int(x) for x in d["raw_shape"]),
            class_names=tuple(d["class_names"]),
            activation_shapes=tuple(tuple(int(x) for x in s) for s in d["activation_shapes"]),
            levels=tuple(float(x) for x in d["levels"]),
            opset=int(d["opset"]),
            weights=dict(d["weights"]),
            catalog=None if d.get("catalog") is None else dict(d["catalog"]),
            tools=dict(d.get("tools", {})),
            mean=np.asarray(std["mean"], dtype=np.float32).reshape(shape),
            std=np.asarray(std["std"], dtype=np.float32).reshape(shape),
            priors=priors,
            stages=tuple(StageArtifact.from_dict(s) for s in d["stages"]),
            fronts=tuple(FrontEntry.from_dict(f) for f in d["fronts"]),
            whole=Artifact.from_dict(d["whole"]),
            prep=None if d.get("prep") is None else Artifact.from_dict(d["prep"]),
            tolerance=dict(d.get("tolerance", {})),
            check=dict(d.get("check", {})),
        )

    def dumps(self) -> str:
        """The manifest's JSON text: deterministic (same export, same bytes)."""
        return json.dumps(self.to_dict(), indent=1, sort_keys=False, allow_nan=False) + "\n"


def load_manifest(directory: Path) -> Manifest:
    path = Path(directory) / MANIFEST_NAME
    if not path.exists():
        raise ModelError(f"no exported model at {directory} (no {MANIFEST_NAME}); run `splitsense models export`")
    try:
        data = json.loads(path.read_text())
        return Manifest.from_dict(data)
    except ModelError:
        raise
    except (ValueError, KeyError, TypeError) as e:
        raise ModelError(f"export manifest {path} is unreadable ({type(e).__name__}: {e}); re-export") from e


def verify_files(manifest: Manifest, directory: Path) -> list[str]:
    """Problems with the files the manifest lists (missing, or a sha256 that differs from the
    manifest's, or for an .ort file from ORT_SUMS_NAME's); [] if none."""
    problems = []
    sums_path = Path(directory) / ORT_SUMS_NAME
    try:
        sums = json.loads(sums_path.read_text()).get("files", {}) if sums_path.exists() else {}
    except ValueError:
        sums, problems = {}, [f"{ORT_SUMS_NAME}: unreadable"]
    for _, a in manifest.artifacts():
        wanted = [(a.file, a.sha256)]
        if a.ort_file is not None:
            entry = sums.get(a.ort_file)
            if entry is None:
                problems.append(f"{a.ort_file}: not in {ORT_SUMS_NAME}")
            else:
                wanted.append((a.ort_file, str(entry.get("sha256"))))
        for name, digest in wanted:
            p = Path(directory) / name
            if not p.exists():
                problems.append(f"{name}: missing")
            elif sha256_file(p) != digest:
                problems.append(f"{name}: sha256 differs from the recorded one")
    return problems


def check_export(model: str, root: Path | None = None, weights_dir: Path | None = None) -> str | None:
    """Why the export of `model` under `root` cannot stand in for its weights in `weights_dir`
    (None: it can): no export, an unreadable manifest, or weights that changed since (sha256).
    Cheap (hashes the weights file, not the graphs): `verify_files` checks the graphs. Where the
    weights are absent (a device: splitsense[edge] carries the exports, not the weights) there is
    nothing for the export to be stale against, and it stands on its own."""
    directory = model_export_dir(model, root, weights_dir)
    try:
        m = load_manifest(directory)
    except ModelError as e:
        return str(e)
    weights = (weights_dir or PathsConfig().weights_dir) / m.weights["file"]
    if not weights.exists():
        return None
    if sha256_file(weights) != m.weights["sha256"]:
        return (
            f"{weights} changed since {directory} was exported; re-export: `splitsense models export --model {model}`"
        )
    return None


def choose_runtime(
    kind: str, models: Sequence[str], onnx_name: str, root: Path | None = None, weights_dir: Path | None = None
) -> tuple[str, str]:
    """(the runtime to run, why) for a "torch" | "onnx" | "auto" setting `kind` (a device's
    edge.backend, the cloud's serving.tail_engine; the caller checks the value): "torch" and "onnx"
    as asked ("onnx" with onnxruntime missing or an export missing or stale: ConfigError naming
    `onnx_name` and saying how to export), "auto": "onnx" when onnxruntime is installed and every
    model in `models` has a current export, else "torch" with the first reason why not."""
    if kind == "torch":
        return "torch", "asked for"
    problems = [p for m in models if (p := check_export(m, root, weights_dir)) is not None]
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        problems.insert(0, "onnxruntime is not installed (pip install 'splitsense[edge]')")
    if kind == "onnx":
        if problems:
            raise ConfigError(f"{onnx_name} cannot run: {problems[0]}")
        return "onnx", "asked for"
    if problems:
        return "torch", f"auto: {problems[0]}"
    return "onnx", "auto: every model has a current export"


# ---------------------------------------------------------------------------------------------
# Running the files


def session_options(intra_op_threads: int = 1) -> Any:
    """ONNX Runtime session options for a device: `intra_op_threads` threads inside an operator,
    operators one after another, every graph optimisation."""
    import onnxruntime as ort

    if isinstance(intra_op_threads, bool) or not isinstance(intra_op_threads, int) or intra_op_threads < 1:
        raise ModelError(f"intra_op_threads must be an int >= 1, got {intra_op_threads!r}")
    so = ort.SessionOptions()
    so.intra_op_num_threads = intra_op_threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3  # errors only
    # Spinning worker threads burn a core between runs; a device runs one window at a time.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return so


class ExportedModel:
    """The sessions of one exported model, opened on first use and kept.

    `file_format` "onnx" loads the ONNX files (a full ONNX Runtime build applies every optimisation
    it has for this CPU when it opens them), "ort" the ORT-format files (what ONNX Runtime Mobile
    loads; their optimisations were fixed, portably, at conversion); a graph without an ORT-format
    twin is loaded from its ONNX file."""

    def __init__(
        self,
        directory: Path,
        *,
        intra_op_threads: int = 1,
        file_format: str = "onnx",
        verify: bool = False,
        manifest: Manifest | None = None,
    ) -> None:
        """`manifest`: the one in `directory` (default: read from it)."""
        if file_format not in ("onnx", "ort"):
            raise ModelError(f"file_format must be 'onnx' or 'ort', got {file_format!r}")
        self.directory = Path(directory)
        self.manifest = manifest if manifest is not None else load_manifest(self.directory)
        if verify:
            problems = verify_files(self.manifest, self.directory)
            if problems:
                raise ModelError(f"the export at {self.directory} is damaged: {'; '.join(problems)}; re-export it")
        self.file_format = file_format
        self.intra_op_threads = intra_op_threads
        self._options = session_options(intra_op_threads)
        self._sessions: dict[str, Any] = {}

    def _path(self, artifact: Artifact) -> Path:
        name = artifact.ort_file if self.file_format == "ort" and artifact.ort_file else artifact.file
        return self.directory / name

    def session(self, key: str, artifact: Artifact) -> Any:
        s = self._sessions.get(key)
        if s is None:
            import onnxruntime as ort

            path = self._path(artifact)
            try:
                s = ort.InferenceSession(str(path), self._options, providers=["CPUExecutionProvider"])
            except Exception as e:  # ORT raises its own exception types for a missing or bad file
                raise ModelError(f"cannot open {path} in ONNX Runtime ({e}); re-export the model") from e
            self._sessions[key] = s
        return s

    def _run(self, key: str, artifact: Artifact, x: np.ndarray) -> np.ndarray:
        out: np.ndarray = self.session(key, artifact).run(None, {artifact.input.name: x})[0]
        return out

    def run_stage(self, stage: int, level: float, x: np.ndarray) -> np.ndarray:
        """Stage `stage` at compression `level` on a batch (float32, batch first)."""
        s = self.manifest.stage(stage, level)
        return self._run(s.key, s.artifact, x)

    def run_stages(self, x: np.ndarray, start: int, stop: int, level: float = 1.0) -> np.ndarray:
        """Stages [start, stop), each at `level` (1.0 for a tail: only a front is compressed)."""
        for i in range(start, stop):
            x = self.run_stage(i, level, x)
        return x

    def run_front(self, cut: int, level: float, x: np.ndarray) -> np.ndarray:
        return self.run_stages(x, 0, self.manifest.check_cut(cut), level)

    def run_whole(self, x: np.ndarray) -> np.ndarray:
        """The whole uncompressed model in one graph: logits."""
        return self._run("whole", self.manifest.whole, x)

    def run_prep(self, raw: np.ndarray) -> np.ndarray:
        """The exported preprocessing graph on a batch of raw windows."""
        if self.manifest.prep is None:
            raise ModelError(f"the export of {self.manifest.model!r} has no preprocessing graph")
        return self._run("prep", self.manifest.prep, np.ascontiguousarray(raw, dtype=np.float32))

    def open_all(self, levels: Sequence[float] | None = None) -> int:
        """Open every stage session (of `levels`, default all exported) now, not inside a window.
        Returns the sessions open."""
        wanted = self.manifest.levels if levels is None else [self.manifest.level_of(lv) for lv in levels]
        for s in self.manifest.stages:
            if any(same_level(a, b) for a in s.levels for b in wanted):
                self.session(s.key, s.artifact)
        return len(self._sessions)
