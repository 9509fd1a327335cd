"""`splitsense bench edge`: the device's two inference backends (edge/backend.py) side by side.

For every model, on the exports of `splitsense models export` and the shipped weights:

    front latency   per cut k (stages [0, k), level 1.0, or every exported level with `levels="all"`),
                    run as the runtime runs it: stage by stage through `run_stage`, numpy in and
                    out, batch 1, from one real preprocessed test window; PyTorch on one thread
                    (torch.set_num_threads(1)) vs ONNX Runtime on one thread (intra_op_num_threads 1)
                    on the .onnx files (what a full ONNX Runtime build loads) and on the .ort files
                    (ONNX Runtime Mobile's format); median of `repeats` runs after `warmup`, the
                    backends interleaved run by run so that a noisy neighbour hits all of them alike
    preprocessing   one raw window: torch (the weights' `prepare_window`), numpy (what the ONNX
                    Runtime backend runs), the exported graph (prep.onnx) in ONNX Runtime
    cold start      a fresh interpreter per backend (`cold_runs` times, median): from spawning it
                    to the first result (the window preprocessed and the whole model run locally),
                    with the time to import, to load the model, and the first inference, and the
                    process's resident memory then (VmRSS) and at its peak (VmHWM); in separate
                    processes so that one backend's imports never count in the other's memory.
                    Two paths: the backend alone (`edge.backend`: what a torch-free device loads)
                    and an `EdgeDevice` finishing the window (`edge.runtime`: on the ONNX Runtime
                    backend neither imports torch)
    on disk         the weights file vs the exported graphs of level 1.0 and of every level (.onnx,
                    .ort), and the installed size of the torch and onnxruntime packages
    the install     (`install`, on by default) what a device installs: `pip install -c deploy/edge/
                    constraints.txt splitsense[edge]` into a fresh venv (a wheel of this checkout,
                    its dependencies from the package index, ONNX Runtime pinned to the version the
                    exports are checked on; `edge_venv` reuses or keeps one; `unpinned` also sizes
                    one without the constraints, the newest onnxruntime), its site-packages measured with the
                    bytecode pip compiled and without it, the venv's own installer (pip,
                    setuptools) aside; against a CPU-torch install: the same plus what
                    `splitsense[torch]` adds (torch, safetensors and what they need beyond the edge
                    install), measured on this interpreter's own torch (the CPU wheel
                    scripts/setup.sh pins). Target: the edge install <= TARGET_EDGE_MB and
                    TARGET_RATIO x smaller. Then `splitsense edge run --local-only` on a recording
                    file of `cli_windows` windows, `cli_runs` fresh processes each (median), in
                    three set-ups: ONNX Runtime in the edge install (no data package, no weights:
                    the device), ONNX Runtime and PyTorch in this (dev) install: the time from
                    spawning the command to its first result (read off its results stream as it
                    is written: interpreter, imports, the model, the first window), to its exit,
                    and its peak resident memory (the kernel's ru_maxrss for that process)

Everything runs on the host's CPU; the JSON echoes the configuration.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.artifacts import check_export, model_export_dir
from splitsense.config import PathsConfig
from splitsense.errors import ConfigError

__all__ = [
    "EdgeBenchConfig",
    "EdgeInstallError",
    "build_edge_venv",
    "installed_size",
    "render",
    "run_edge_bench",
    "run_edge_cli",
    "site_packages",
    "torch_addition",
]

REPO = Path(__file__).resolve().parent.parent
TARGET_EDGE_MB = 170.0  # issue 11: the edge install at most this, and
TARGET_RATIO = 5.0  # at least this many times smaller than a CPU-torch one


@dataclass(frozen=True)
class EdgeBenchConfig:
    models: tuple[str, ...] = ("fsdd_speaker", "fsdd_digit", "uci_har")
    repeats: int = 200  # timed runs per (cut, backend), median
    warmup: int = 20
    levels: str = "1.0"  # "1.0" or "all" (every exported level)
    cold_runs: int = 3  # fresh interpreters per (backend, path), median; 0: skip cold starts
    export_root: Path | None = None  # default <weights_dir>/export
    weights_dir: Path | None = None  # default the shipped weights
    install: bool = True  # measure the edge install and `splitsense edge run` in it (module docstring)
    edge_venv: Path | None = None  # an edge venv to reuse, or where to build one and keep it; None: a temp one
    cli_runs: int = 3  # fresh `splitsense edge run` processes per set-up, median; 0: none
    cli_windows: int = 20  # windows of the recording each of them replays
    unpinned: bool = True  # also size an install without the device's constraints (newest onnxruntime)

    def __post_init__(self) -> None:
        if self.repeats < 1 or self.warmup < 0 or self.cold_runs < 0 or self.cli_runs < 0:
            raise ConfigError("repeats must be >= 1, warmup, cold_runs and cli_runs >= 0 (0: skip)")
        if self.cli_windows < 1:
            raise ConfigError(f"cli_windows must be >= 1, got {self.cli_windows}")
        if self.levels not in ("1.0", "all"):
            raise ConfigError(f"levels must be '1.0' or 'all', got {self.levels!r}")
        if not self.models:
            raise ConfigError("no models to benchmark")


def _interleaved_ms(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int) -> dict[str, float]:
    """Median ms of each function, run in turn (a, b, c, a, b, c, ...)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    clock = time.perf_counter
    for _ in range(repeats):
        for name, fn in fns.items():
            t = clock()
            fn()
            samples[name].append((clock() - t) * 1000.0)
    return {name: statistics.median(v) for name, v in samples.items()}


def _dir_bytes(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            p = os.path.join(root, f)
            if not os.path.islink(p):
                total += os.path.getsize(p)
    return total


def _package_mb(name: str) -> float | None:
    import importlib.util

    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return round(_dir_bytes(Path(list(spec.submodule_search_locations)[0])) / 1e6, 1)


_CHILD = r"""
import json, sys, time
t_start = time.time()
kind, path, model, root, weights_dir, raw_path = sys.argv[1:7]
import numpy as np
raw = np.load(raw_path)

def rss_kb():
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line.split(":")[0]] = int(line.split()[1])
    return out

t0 = time.perf_counter()
if kind == "torch":
    import torch
    torch.set_num_threads(1)
    from edge.backend import TorchBackend
    from pipelines.training import load_trained
else:
    from edge.backend import OnnxBackend
if path == "runtime":
    import asyncio
    from edge.runtime import EdgeDevice
    from edge.sources import SensorWindow
    from splitsense.config import EdgeConfig
t_imported = time.perf_counter()
if kind == "torch":
    backend = TorchBackend([load_trained(model, __import__("pathlib").Path(weights_dir))])
else:
    backend = OnnxBackend.for_models([model], __import__("pathlib").Path(root), intra_op_threads=1)
n = backend.info(model).n_stages
if path == "runtime":
    device = EdgeDevice(EdgeConfig(model=model, default_cut=n), None, None, backend=backend)
t_loaded = time.perf_counter()
if path == "runtime":
    result = asyncio.run(device.process(SensorWindow("w0", 0, -1, raw, 0.0)))
    pred = result.prediction
else:
    pred = int(np.argmax(backend.run_front(model, n, 1.0, backend.prepare(model, raw))[0]))
t_done = time.perf_counter()
t_first = time.time()
print(json.dumps({
    "t_start": t_start, "t_first": t_first, "prediction": pred,
    "import_ms": (t_imported - t0) * 1000, "load_ms": (t_loaded - t_imported) * 1000,
    "first_inference_ms": (t_done - t_loaded) * 1000, **rss_kb(),
    "torch_imported": "torch" in sys.modules, "onnxruntime_imported": "onnxruntime" in sys.modules,
}))
"""


def _cold(kind: str, path: str, model: str, root: Path, weights_dir: Path, raw_file: Path, runs: int) -> dict[str, Any]:
    """Median figures of `runs` fresh interpreters (module docstring)."""
    rows = []
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    for _ in range(runs):
        t_spawn = time.time()
        proc = subprocess.run(
            [sys.executable, "-c", _CHILD, kind, path, model, str(root), str(weights_dir), str(raw_file)],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=REPO,
            env=env,
        )
        if proc.returncode != 0:
            raise ConfigError(f"the {kind} cold-start run failed: {proc.stderr.strip().splitlines()[-1:]}")
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        r["cold_start_ms"] = (r["t_first"] - t_spawn) * 1000.0
        r["interpreter_ms"] = (r["t_start"] - t_spawn) * 1000.0
        rows.append(r)

    def med(key: str) -> float:
        return round(statistics.median(float(r[key]) for r in rows), 1)

    return {
        "backend": kind,
        "path": path,
        "runs": runs,
        "cold_start_ms": med("cold_start_ms"),
        "interpreter_ms": med("interpreter_ms"),
        "import_ms": med("import_ms"),
        "load_ms": med("load_ms"),
        "first_inference_ms": med("first_inference_ms"),
        "rss_mb": round(med("VmRSS") / 1024, 1),
        "peak_rss_mb": round(med("VmHWM") / 1024, 1),
        "torch_imported": bool(rows[0]["torch_imported"]),
        "onnxruntime_imported": bool(rows[0]["onnxruntime_imported"]),
        "prediction": rows[0]["prediction"],
    }


def _front_fn(backend: Any, model: str, x: np.ndarray, k: int, level: float) -> Callable[[], Any]:
    """Stages [0, k) at `level` on `backend`, stage by stage (as the runtime runs them)."""

    def go() -> Any:
        a = x
        for i in range(k):
            a = backend.run_stage(model, i, level, a)
        return a

    return go


def _bench_model(
    model: str, cfg: EdgeBenchConfig, root: Path, weights_dir: Path, say: Callable[[str], None]
) -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, Any], np.ndarray]:
    """(latency rows, preprocessing row, disk row, the raw window used) of one model."""
    from edge.backend import OnnxBackend, TorchBackend
    from pipelines.export import raw_test_windows
    from pipelines.training import load_trained

    say(f"{model}: front latency")
    trained = load_trained(model, weights_dir)
    tb = TorchBackend([trained], weights_dir=weights_dir)
    ob = OnnxBackend.for_models([model], root, weights_dir, intra_op_threads=1)
    rb = OnnxBackend.for_models([model], root, weights_dir, intra_op_threads=1, file_format="ort")
    gb = OnnxBackend.for_models([model], root, weights_dir, intra_op_threads=1, prep="onnx")
    raw = raw_test_windows(trained, limit=1)[0][0]
    x = tb.prepare(model, raw)
    manifest = ob.exported(model).manifest
    levels = manifest.levels if cfg.levels == "all" else (1.0,)
    rows: list[dict[str, Any]] = []
    for lv in levels:
        for b in (tb, ob, rb):
            b.load(model, [lv])
        for k in range(1, manifest.n_stages + 1):
            if lv < 1.0 and manifest.front(k, lv).stages == manifest.front(k, 1.0).stages:
                continue  # the same front as uncompressed (the encoder is never compressed)
            fns = {name: _front_fn(b, model, x, k, lv) for name, b in (("torch", tb), ("onnx", ob), ("ort", rb))}
            ms = _interleaved_ms(fns, cfg.repeats, cfg.warmup)
            rows.append(
                {
                    "model": model,
                    "cut": k,
                    "cut_name": manifest.stage_names[k - 1],
                    "level": lv,
                    "torch_ms": round(ms["torch"], 4),
                    "onnx_ms": round(ms["onnx"], 4),
                    "ort_format_ms": round(ms["ort"], 4),
                    "speedup": round(ms["torch"] / ms["onnx"], 2) if ms["onnx"] > 0 else None,
                    "onnx_no_worse": ms["onnx"] <= ms["torch"],
                }
            )
    say(f"{model}: preprocessing")
    preps = {"torch": tb, "numpy": ob, "onnx": gb}
    ms = _interleaved_ms({k: _prep_fn(b, model, raw) for k, b in preps.items()}, cfg.repeats, cfg.warmup)
    prep = {"model": model, **{f"{k}_ms": round(v, 4) for k, v in ms.items()}}
    d = model_export_dir(model, root)
    lv1 = [s for s in manifest.stages if 1.0 in s.levels]
    disk = {
        "model": model,
        "weights_mb": round((weights_dir / manifest.weights["file"]).stat().st_size / 1e6, 2),
        "onnx_level1_mb": round(sum(s.artifact.nbytes for s in lv1) / 1e6, 2),
        "onnx_all_levels_mb": round(sum(s.artifact.nbytes for s in manifest.stages) / 1e6, 2),
        "ort_all_levels_mb": round(
            sum((d / s.artifact.ort_file).stat().st_size for s in manifest.stages if s.artifact.ort_file) / 1e6, 2
        ),
        "whole_model_onnx_mb": round(manifest.whole.nbytes / 1e6, 2),
    }
    return rows, prep, disk, raw


def _prep_fn(backend: Any, model: str, raw: np.ndarray) -> Callable[[], Any]:
    return lambda: backend.prepare(model, raw)


def run_edge_bench(cfg: EdgeBenchConfig, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    import torch

    say = progress or (lambda _m: None)
    weights_dir = cfg.weights_dir or PathsConfig().weights_dir
    root = cfg.export_root or (weights_dir / "export")
    for m in cfg.models:
        why = check_export(m, root, weights_dir)
        if why is not None:
            raise ConfigError(f"bench edge needs the exports: {why}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    latency: list[dict[str, Any]] = []
    prep: list[dict[str, Any]] = []
    disk: list[dict[str, Any]] = []
    raws: dict[str, np.ndarray] = {}
    try:
        for model in cfg.models:
            rows, p, d, raws[model] = _bench_model(model, cfg, root, weights_dir, say)
            latency += rows
            prep.append(p)
            disk.append(d)
    finally:
        torch.set_num_threads(threads)
    cold: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in cfg.models:
            raw_file = Path(tmp) / f"{model}.npy"
            np.save(raw_file, raws[model])
            for path in ("backend", "runtime") if cfg.cold_runs else ():
                for kind in ("torch", "onnx"):
                    say(f"{model}: cold start, {kind}, {path} ({cfg.cold_runs} fresh interpreters)")
                    row = _cold(kind, path, model, root, weights_dir, raw_file, cfg.cold_runs)
                    cold.append({"model": model, **row})
    install = _install_figures(cfg, root, say) if cfg.install else None
    worse = [r for r in latency if not r["onnx_no_worse"]]
    speedups = [r["speedup"] for r in latency if r["speedup"]]
    return {
        "config": {
            **asdict(cfg),
            "export_root": str(root),
            "weights_dir": str(weights_dir),
            "edge_venv": None if cfg.edge_venv is None else str(cfg.edge_venv),
        },
        "host": {
            "cpus": os.cpu_count(),
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "onnxruntime": _ort_version(),
        },
        "latency": latency,
        "prep": prep,
        "cold_start": cold,
        "disk": disk,
        "packages_mb": {"torch": _package_mb("torch"), "onnxruntime": _package_mb("onnxruntime")},
        "install": install,
        "summary": {
            "cuts": len(latency),
            "onnx_no_worse_everywhere": not worse,
            "worse": [(r["model"], r["cut"], r["level"]) for r in worse],
            "speedup_min": min(speedups, default=None),
            "speedup_median": round(statistics.median(speedups), 2) if speedups else None,
        },
    }


# ---------------------------------------------------------------------------------------------
# The device install: a fresh venv with splitsense[edge], and `splitsense edge run` in it

PACKAGES = ("splitsense", "pipelines", "edge", "cloud", "simulators", "benchmarks")  # pyproject's packages
# A venv's own installer, not part of what a device installs (it has its own, or none: an image)
TOOLING = frozenset({"pip", "setuptools", "wheel"})
# The versions a device image is built with (the ONNX Runtime the exports are checked on).
DEVICE_CONSTRAINTS = REPO / "deploy" / "edge" / "constraints.txt"
_INDEX_UNREACHABLE = ("No matching distribution", "Could not find a version", "NewConnectionError", "Max retries")


class EdgeInstallError(ConfigError):
    """`pip install splitsense[edge]` into a fresh venv failed; `unreachable`: the package index
    could not be reached (nothing to fix here), else pip's own failure."""

    def __init__(self, message: str, unreachable: bool) -> None:
        super().__init__(message)
        self.unreachable = unreachable


def _pip(python: Path, *args: str, timeout_s: float = 600) -> subprocess.CompletedProcess[str]:
    cmd = [str(python), "-m", "pip", "--disable-pip-version-check", "--no-input", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)


def build_wheel(dest: Path) -> Path:
    """splitsense's wheel from this checkout's packages (copied aside, so the checkout's build/ is
    untouched), built without isolation by this interpreter's setuptools."""
    import shutil

    src = dest / "src"
    if src.exists():
        shutil.rmtree(src)
    src.mkdir(parents=True)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    for pkg in PACKAGES:
        shutil.copytree(REPO / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    wheels = dest / "wheels"
    proc = _pip(Path(sys.executable), "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), str(src))
    if proc.returncode != 0:
        raise EdgeInstallError(f"building splitsense's wheel failed: {proc.stderr.strip()[-2000:]}", False)
    shutil.rmtree(src)
    return max(wheels.glob("splitsense-*.whl"), key=lambda p: p.stat().st_mtime)


def build_edge_venv(dest: Path, extra: str = "edge", constraints: Path | None = DEVICE_CONSTRAINTS) -> Path:
    """A fresh venv at `dest` with `splitsense[extra]` installed as a device image is built (a wheel
    of this checkout, its dependencies from the package index, pinned by `constraints`: the device's
    ONNX Runtime, deploy/edge/constraints.txt; None: whatever the index serves newest); its python.
    EdgeInstallError when pip fails."""
    import venv

    wheel = build_wheel(dest.parent / f".{dest.name}-build")
    venv.EnvBuilder(with_pip=True, symlinks=True, clear=True).create(dest)
    python = dest / "bin" / "python"
    pins = ["-c", str(constraints)] if constraints is not None else []
    proc = _pip(python, "install", "-q", *pins, f"{wheel}[{extra}]")
    if proc.returncode != 0:
        text = (proc.stdout + proc.stderr).strip()
        unreachable = any(s in text for s in _INDEX_UNREACHABLE)
        last = text.splitlines()[-1] if text else "no output"
        raise EdgeInstallError(f"pip install splitsense[{extra}] into {dest} failed: {last}", unreachable)
    return python


def site_packages(python: Path) -> Path:
    """The site-packages of the venv whose interpreter is `python`."""
    found = sorted((python.parent.parent / "lib").glob("python3*/site-packages"))
    if not found:
        raise ConfigError(f"no site-packages beside {python}")
    return found[0]


def _dist_files(dist: Any) -> list[Path]:
    """Every file a distribution installed (its RECORD, the bytecode pip compiled included)."""
    return [Path(str(dist.locate_file(f))) for f in dist.files or ()]


def _files_bytes(paths: Sequence[Path], bytecode: bool = True) -> int:
    total = 0
    for p in set(paths):
        if not bytecode and p.suffix == ".pyc":
            continue
        try:
            if not p.is_symlink():
                total += p.stat().st_size
        except OSError:
            continue  # listed in RECORD, not on disk
    return total


def _dist_version(site: Path, name: str) -> str | None:
    """The version of distribution `name` installed in `site`, or None."""
    from importlib.metadata import distributions

    return next((d.version for d in distributions(path=[str(site)]) if d.metadata["Name"].lower() == name), None)


def installed_size(site: Path, top: int = 10) -> dict[str, Any]:
    """What is installed in `site` (a venv's site-packages) besides the venv's own installer
    (TOOLING): MB with the bytecode pip compiled and without it, and the largest distributions."""
    from importlib.metadata import distributions

    per: dict[str, tuple[int, int]] = {}
    tooling: list[Path] = []
    for dist in distributions(path=[str(site)]):
        name = dist.metadata["Name"].lower()
        files = _dist_files(dist)
        if name in TOOLING:
            tooling += files
            continue
        per[name] = (_files_bytes(files), _files_bytes(files, bytecode=False))
    everything = _dir_bytes(site)
    tool_bytes = _files_bytes(tooling)
    listed = sum(b for b, _ in per.values())
    ranked = sorted(per.items(), key=lambda kv: -kv[1][0])
    return {
        "site_packages": str(site),
        "mb": round((everything - tool_bytes) / 1e6, 1),  # what pip left there, the installer aside
        "mb_without_bytecode": round(sum(nb for _, nb in per.values()) / 1e6, 1),
        "unlisted_mb": round((everything - tool_bytes - listed) / 1e6, 1),  # files no RECORD names
        "installer_mb": round(tool_bytes / 1e6, 1),
        "distributions": len(per),
        "names": sorted(per),
        "largest": [{"name": n, "mb": round(b / 1e6, 1)} for n, (b, _) in ranked[:top]],
    }


def _requirement_closure(names: Sequence[str]) -> list[Any]:
    """The installed distributions `names` need in this interpreter, theirs included (markers of
    this platform; no extras)."""
    from importlib.metadata import PackageNotFoundError, distribution

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    seen: dict[str, Any] = {}
    todo = list(names)
    while todo:
        name = canonicalize_name(todo.pop())
        if name in seen:
            continue
        try:
            dist = distribution(name)
        except PackageNotFoundError:
            continue
        seen[name] = dist
        for spec in dist.requires or ():
            req = Requirement(spec)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return list(seen.values())


def torch_addition(edge_names: Sequence[str]) -> dict[str, Any]:
    """What `splitsense[torch]` adds to an edge install, measured on this interpreter's own (the
    CPU wheel scripts/setup.sh pins): torch, safetensors and what they need that the edge install
    does not already have."""
    from packaging.utils import canonicalize_name

    have = {canonicalize_name(n) for n in edge_names}
    added = [
        d for d in _requirement_closure(["torch", "safetensors"]) if canonicalize_name(d.metadata["Name"]) not in have
    ]
    sizes = {d.metadata["Name"].lower(): _files_bytes(_dist_files(d)) for d in added}
    return {
        "mb": round(sum(sizes.values()) / 1e6, 1),
        "torch_mb": round(sizes.get("torch", 0) / 1e6, 1),
        "torch_version": next((d.version for d in added if d.metadata["Name"].lower() == "torch"), None),
        "distributions": {n: round(b / 1e6, 1) for n, b in sorted(sizes.items(), key=lambda kv: -kv[1])},
    }


# Forks and execs the command, then writes when it exec'd and the child's peak RSS (wait4's
# ru_maxrss). A small interpreter (-I -S) in between because Linux starts a forked child's
# ru_maxrss at its parent's RSS: forked straight from this (torch-laden) process, every child would
# report at least this process's size.
_RSS_WRAPPER = """
import os, sys, time
stamp = sys.argv[1]
pid = os.fork()
if pid == 0:
    with open(stamp + ".exec", "w") as f:
        f.write(repr(time.time()))
    os.execv(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
with open(stamp + ".exit", "w") as f:
    f.write(repr(time.time()) + " " + str(usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run_edge_cli(
    python: Path,
    args: Sequence[str],
    *,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    timeout_s: float = 300,
) -> dict[str, Any]:
    """`splitsense edge run ARGS --json --out FIFO` in a fresh process of the venv of `python`:
    the time from starting it (its exec) to its first result (read off the results stream as it
    is written) and to its exit, its peak resident memory (the kernel's ru_maxrss for that
    process), and its summary."""
    import select
    import threading

    exe = python.parent / "splitsense"
    with tempfile.TemporaryDirectory() as tmp:
        fifo = Path(tmp) / "results.jsonl"
        os.mkfifo(fifo)
        stamp = str(Path(tmp) / "stamp")
        cmd = [str(exe), "edge", "run", *args, "--json", "--out", str(fifo)]
        run_env = {k: v for k, v in (env or os.environ).items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _RSS_WRAPPER, stamp, *cmd],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=cwd or tempfile.gettempdir(),
            env=run_env,
        )
        out: dict[str, str] = {}

        def drain(name: str, stream: Any) -> None:
            out[name] = stream.read()

        readers = [
            threading.Thread(target=drain, args=(n, s), daemon=True)
            for n, s in (("stdout", proc.stdout), ("stderr", proc.stderr))
        ]
        for r in readers:
            r.start()
        t_first: float | None = None
        fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # a reader that never blocks the child
        buf = b""
        try:
            deadline = time.monotonic() + timeout_s
            while True:
                ready, _, _ = select.select([fd], [], [], 0.05)
                if ready:
                    chunk = os.read(fd, 1 << 16)
                    if chunk:
                        if t_first is None and b"\n" in buf + chunk:
                            t_first = time.time()
                        buf += chunk
                        continue
                    if proc.poll() is not None:  # EOF after the writer closed, and the command is done
                        break
                    time.sleep(0.005)  # EOF before the writer opened it
                elif proc.poll() is not None:
                    break
                if time.monotonic() > deadline:
                    proc.kill()
                    raise ConfigError(f"`{' '.join(cmd)}` took more than {timeout_s:.0f} s")
        finally:
            os.close(fd)
        proc.wait()
        for r in readers:
            r.join(10)
        if proc.returncode != 0:
            tail = out.get("stderr", "").strip().splitlines()[-1:]
            raise ConfigError(f"`{' '.join(cmd)}` failed ({proc.returncode}): {tail}")
        t_exec = float(Path(stamp + ".exec").read_text())
        t_exit_s, maxrss_kb = Path(stamp + ".exit").read_text().split()
    summary = json.loads(out["stdout"])
    return {
        "first_result_ms": None if t_first is None else round((t_first - t_exec) * 1000.0, 1),
        "exit_ms": round((float(t_exit_s) - t_exec) * 1000.0, 1),
        "peak_rss_mb": round(int(maxrss_kb) / 1024, 1),  # kB on Linux
        "results": buf.count(b"\n"),
        "summary": summary,
    }


def _device_recording(model: str, windows: int, dest: Path) -> Path:
    from edge.sources import recording_from_datasets, save_recording
    from pipelines.specs import get_spec

    rec = recording_from_datasets(get_spec(model).dataset, models=[model], limit=windows)
    return save_recording(rec, dest / f"{model}.npz")


def _install_figures(cfg: EdgeBenchConfig, root: Path, say: Callable[[str], None]) -> dict[str, Any]:
    """The edge install's size against a CPU-torch one, and `splitsense edge run` in each (module
    docstring)."""
    import shutil

    out: dict[str, Any] = {"target_mb": TARGET_EDGE_MB, "target_ratio": TARGET_RATIO}
    dev_python = Path(sys.executable)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        edge_python: Path | None = None
        venv_dir = cfg.edge_venv or (work / "edge-venv")
        if (venv_dir / "bin" / "python").exists() and (venv_dir / "bin" / "splitsense").exists():
            edge_python = venv_dir / "bin" / "python"
            say(f"edge install: reusing {venv_dir}")
        else:
            say(f"edge install: pip install splitsense[edge] into a fresh venv ({venv_dir})")
            try:
                edge_python = build_edge_venv(venv_dir)
            except EdgeInstallError as e:
                out["error"] = str(e)
        if edge_python is not None:
            edge = installed_size(site_packages(edge_python))
            probe = subprocess.run([str(edge_python), "-c", "import torch"], capture_output=True, cwd=tmp)
            added = torch_addition(edge["names"])
            torch_env = round(edge["mb"] + added["mb"], 1)
            out.update(
                edge=edge,
                constraints=str(DEVICE_CONSTRAINTS.relative_to(REPO)),
                onnxruntime_version=_dist_version(site_packages(edge_python), "onnxruntime"),
                torch_importable_in_edge=probe.returncode == 0,
                torch_added=added,
                torch_env_mb=torch_env,
                ratio=round(torch_env / edge["mb"], 2) if edge["mb"] else None,
                meets_target=edge["mb"] <= TARGET_EDGE_MB and torch_env >= TARGET_RATIO * edge["mb"],
            )
        if cfg.unpinned:
            say("edge install without the device's constraints: the newest onnxruntime the index serves")
            try:
                loose = site_packages(build_edge_venv(work / "edge-venv-unpinned", constraints=None))
                size = installed_size(loose)
                out["edge_unpinned"] = {
                    "mb": size["mb"],
                    "mb_without_bytecode": size["mb_without_bytecode"],
                    "onnxruntime_version": _dist_version(loose, "onnxruntime"),
                    "onnxruntime_mb": next((d["mb"] for d in size["largest"] if d["name"] == "onnxruntime"), None),
                }
            except EdgeInstallError as e:
                out["edge_unpinned"] = {"error": str(e)}
        cli: list[dict[str, Any]] = []
        if cfg.cli_runs:
            nowhere = work / "nowhere"  # a device: no data package, no weights
            device_cfg = work / "device.json"
            paths = {"data_dir": str(nowhere / "data"), "weights_dir": str(nowhere / "weights")}
            device_cfg.write_text(json.dumps({"paths": paths}))
            for model in cfg.models:
                rec = _device_recording(model, cfg.cli_windows, work)
                common = ["--model", model, "--local-only", "--speed", "0", "--recording", str(rec)]
                variants: list[tuple[str, str, Path, list[str]]] = []
                if edge_python is not None:
                    onnx_args = ["--backend", "onnx", "--export-dir", str(root), "--config", str(device_cfg)]
                    variants.append(("onnx", "edge install", edge_python, onnx_args))
                variants.append(("onnx", "dev install", dev_python, ["--backend", "onnx", "--export-dir", str(root)]))
                variants.append(("torch", "dev install", dev_python, ["--backend", "torch"]))
                runs: dict[int, list[dict[str, Any]]] = {i: [] for i in range(len(variants))}
                for n in range(cfg.cli_runs):  # interleaved, so that a noisy neighbour hits all alike
                    for i, (kind, where, python, args) in enumerate(variants):
                        say(f"{model}: splitsense edge run, {kind} backend, {where} ({n + 1}/{cfg.cli_runs})")
                        runs[i].append(run_edge_cli(python, [*common, *args], cwd=work))
                for i, (kind, where, _python, _args) in enumerate(variants):
                    rows = runs[i]
                    last = rows[-1]["summary"]
                    cli.append(
                        {
                            "model": model,
                            "backend": kind,
                            "install": where,
                            "runs": len(rows),
                            "windows": last["windows"],
                            "first_result_ms": round(statistics.median(r["first_result_ms"] for r in rows), 1),
                            "exit_ms": round(statistics.median(r["exit_ms"] for r in rows), 1),
                            "peak_rss_mb": round(statistics.median(r["peak_rss_mb"] for r in rows), 1),
                            "accuracy": last["accuracy"],
                            "all_answered": all(
                                r["summary"]["lost"] == 0 and r["results"] == last["windows"] for r in rows
                            ),
                        }
                    )
        out["cli"] = cli
        if cfg.edge_venv is None and venv_dir.exists():
            shutil.rmtree(venv_dir, ignore_errors=True)
    return out


def _ort_version() -> str:
    import onnxruntime

    return str(onnxruntime.__version__)


def render(result: dict[str, Any], console: Any) -> None:
    from rich.table import Table

    t = Table(title="front latency per cut, batch 1, one thread (median ms; stage by stage, as the runtime runs it)")
    for col in ("model", "cut", "level", "torch", "onnx", "ort format", "torch / onnx"):
        t.add_column(col, justify="left" if col == "model" else "right")
    for r in result["latency"]:
        t.add_row(
            r["model"],
            f"{r['cut']} ({r['cut_name']})",
            f"{r['level']:g}",
            f"{r['torch_ms']:.3f}",
            f"{r['onnx_ms']:.3f}",
            f"{r['ort_format_ms']:.3f}",
            f"{r['speedup']:.2f}x" if r["speedup"] else "-",
        )
    console.print(t)
    t = Table(title="preprocessing of one raw window (median ms, one thread)")
    for col in ("model", "torch", "numpy (onnx backend)", "prep.onnx graph"):
        t.add_column(col, justify="left" if col == "model" else "right")
    for r in result["prep"]:
        t.add_row(r["model"], f"{r['torch_ms']:.3f}", f"{r['numpy_ms']:.3f}", f"{r['onnx_ms']:.3f}")
    console.print(t)
    t = Table(title="cold start to the first result, fresh interpreter (median); resident memory then")
    cols = (
        "model",
        "backend",
        "path",
        "cold start ms",
        "import ms",
        "load ms",
        "1st inference ms",
        "RSS MB",
        "peak MB",
    )
    for col in (*cols, "torch loaded"):
        t.add_column(col, justify="left" if col in ("model", "backend", "path") else "right")
    for r in result["cold_start"]:
        t.add_row(
            r["model"],
            r["backend"],
            r["path"],
            f"{r['cold_start_ms']:.0f}",
            f"{r['import_ms']:.0f}",
            f"{r['load_ms']:.0f}",
            f"{r['first_inference_ms']:.1f}",
            f"{r['rss_mb']:.0f}",
            f"{r['peak_rss_mb']:.0f}",
            "yes" if r["torch_imported"] else "no",
        )
    console.print(t)
    t = Table(title="on disk (MB)")
    for col in ("model", "weights", "onnx level 1.0", "onnx all levels", "ort all levels", "model.onnx"):
        t.add_column(col, justify="left" if col == "model" else "right")
    for r in result["disk"]:
        t.add_row(
            r["model"],
            f"{r['weights_mb']:.1f}",
            f"{r['onnx_level1_mb']:.1f}",
            f"{r['onnx_all_levels_mb']:.1f}",
            f"{r['ort_all_levels_mb']:.1f}",
            f"{r['whole_model_onnx_mb']:.1f}",
        )
    console.print(t)
    _render_install(result.get("install"), console)
    pk = result["packages_mb"]
    s = result["summary"]
    verdict = "yes" if s["onnx_no_worse_everywhere"] else f"NO: {s['worse']}"
    console.print(
        f"installed packages: torch {pk['torch']} MB, onnxruntime {pk['onnxruntime']} MB. "
        f"ONNX Runtime no worse than PyTorch at every cut: {verdict} "
        f"(speedup min {s['speedup_min']}x, median {s['speedup_median']}x)"
    )


def _render_install(inst: dict[str, Any] | None, console: Any) -> None:
    from rich.markup import escape
    from rich.table import Table

    if not inst:
        return
    if "edge" in inst:
        e, t = inst["edge"], inst["torch_added"]
        table = Table(title="installed size (site-packages, MB; the venv's own pip/setuptools aside)")
        for col in ("install", "MB", "without bytecode", "largest"):
            table.add_column(col, justify="left" if col in ("install", "largest") else "right")
        largest = ", ".join(f"{d['name']} {d['mb']:g}" for d in e["largest"][:6])
        table.add_row(
            escape(f"splitsense[edge], onnxruntime {inst.get('onnxruntime_version')} ({inst.get('constraints')})"),
            f"{e['mb']:.1f}",
            f"{e['mb_without_bytecode']:.1f}",
            largest,
        )
        loose = inst.get("edge_unpinned") or {}
        if "mb" in loose:
            table.add_row(
                escape(f"splitsense[edge], unpinned: onnxruntime {loose['onnxruntime_version']}"),
                f"{loose['mb']:.1f}",
                f"{loose['mb_without_bytecode']:.1f}",
                f"onnxruntime {loose['onnxruntime_mb']:g}",
            )
        added = ", ".join(f"{n} {mb:g}" for n, mb in list(t["distributions"].items())[:6])
        table.add_row(escape(f"+ splitsense[torch] (torch {t['torch_version']})"), f"+{t['mb']:.1f}", "", added)
        table.add_row("CPU-torch install", f"{inst['torch_env_mb']:.1f}", "", "")
        console.print(table)
        verdict = "met" if inst["meets_target"] else "NOT met"
        console.print(
            f"edge install {e['mb']:.1f} MB ({e['mb_without_bytecode']:.1f} MB without bytecode) vs CPU-torch "
            f"{inst['torch_env_mb']:.1f} MB: {inst['ratio']}x smaller; target <= {inst['target_mb']:g} MB and "
            f">= {inst['target_ratio']:g}x: {verdict}; torch importable in it: "
            f"{'yes' if inst['torch_importable_in_edge'] else 'no'}"
        )
    elif "error" in inst:
        console.print(f"edge install not measured: {inst['error']}")
    if inst.get("cli"):
        table = Table(title="splitsense edge run --local-only, fresh process (median): first result, exit, peak memory")
        for col in ("model", "backend", "install", "windows", "first result ms", "exit ms", "peak RSS MB", "accuracy"):
            table.add_column(col, justify="left" if col in ("model", "backend", "install") else "right")
        for r in inst["cli"]:
            table.add_row(
                r["model"], r["backend"], r["install"], str(r["windows"]), f"{r['first_result_ms']:.0f}",
                f"{r['exit_ms']:.0f}", f"{r['peak_rss_mb']:.0f}", f"{r['accuracy']:.4f}",
            )  # fmt: skip
        console.print(table)


def main(argv: Sequence[str] | None = None) -> None:  # python -m benchmarks.edge_runtime
    import argparse

    from rich.console import Console

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true")
    p.add_argument("--repeats", type=int, default=200)
    a = p.parse_args(argv)
    result = run_edge_bench(EdgeBenchConfig(repeats=a.repeats), progress=lambda m: print(m, file=sys.stderr))
    if a.json:
        print(json.dumps(result, indent=2))
    else:
        render(result, Console())


if __name__ == "__main__":
    main()
