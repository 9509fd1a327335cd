"""A device install, as a new user makes one: `pip install "splitsense[edge]"` into a fresh venv.

Checked (issue 11, "What it must show"): in that venv torch cannot be imported, no dataset and no
weights were installed, and `splitsense edge run --backend onnx --recording FILE` against a real
broker on loopback answers every window of a real recording (UCI HAR test windows, written by
`splitsense data export-recording`'s code in the dev venv): offloaded at a forced cut, and all
local when the broker is unreachable or not asked for. Counts come from the CLI's JSON summary.

The wheel is built once from the working tree's packages (copied aside, so the checkout's build/
is untouched) with the dev venv's setuptools; its dependencies come from the package index
(skipped, saying so, only when the index cannot be reached). The fronts are exported in the dev
venv (uci_har, level 1.0, checked on 16 windows) into a temporary folder, as an operator would
before copying them to devices; the device's config points paths.* at nothing, as a device without
the data package has.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from benchmarks.edge_runtime import EdgeInstallError, build_edge_venv
from cloud.auth import device_token
from cloud.backend import ModelRegistry
from tests.integration.cloud.broker_harness import SECRET, BrokerThread
from tests.integration.conftest import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MODEL = "uci_har"
WINDOWS = 40
DEVICE = "edge-venv-1"
CUT = 2  # offload the activation after stage 2


def _pip(python: Path, *args: str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    cmd = [str(python), "-m", "pip", "--disable-pip-version-check", "--no-input", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)


@pytest.fixture(scope="module")
def edge_python(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh venv with splitsense[edge] (benchmarks.edge_runtime.build_edge_venv: what `splitsense
    bench edge` measures); skipped only when the package index is unreachable."""
    root = tmp_path_factory.mktemp("device")
    try:
        python = build_edge_venv(root / "edge-venv")
    except EdgeInstallError as e:
        if e.unreachable:
            pytest.skip(f"the package index is unreachable from here: {e}")
        raise
    yield python
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The exports' root (uci_har, uncompressed fronts only), made in the dev venv."""
    from pipelines.export import export_model

    root = tmp_path_factory.mktemp("export")
    export_model(MODEL, root / MODEL, levels=[1.0], check_windows=16, ort_format=False)
    return root


@pytest.fixture(scope="module")
def recording(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from edge.sources import recording_from_datasets, save_recording

    return save_recording(recording_from_datasets("uci_har", limit=WINDOWS), tmp_path_factory.mktemp("rec") / "h.npz")


@pytest.fixture(scope="module")
def device_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """No data package, no weights: paths.* point at nothing, as on a device."""
    d = tmp_path_factory.mktemp("cfg")
    nowhere = d / "nowhere"
    cfg = {
        "paths": {"data_dir": str(nowhere / "data"), "weights_dir": str(nowhere / "weights")},
        "edge": {"deadline_ms": 2000.0},  # 2 shared cores: the first offload warms the broker's tail
    }
    (d / "device.json").write_text(json.dumps(cfg))
    return d / "device.json"


def edge_run(python: Path, *args: str, timeout_s: float = 120) -> dict[str, Any]:
    """`<venv>/bin/splitsense edge run ... --json` as a device runs it; its summary."""
    exe = python.parent / "splitsense"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["SPLITSENSE_TOKEN"] = device_token(SECRET, DEVICE)
    cmd = [str(exe), "edge", "run", "--model", MODEL, "--backend", "onnx", "--speed", "0", "--json", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, cwd="/", env=env)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stderr[-3000:]}"
    summary: dict[str, Any] = json.loads(proc.stdout)
    assert summary["backend"] == "onnx"
    assert summary["windows"] == WINDOWS and summary["lost"] == 0  # every window of the recording answered
    assert sum(summary["by_mode"].values()) == WINDOWS
    return summary


def test_the_edge_install_has_no_torch_no_data_and_no_weights(edge_python: Path) -> None:
    proc = subprocess.run([str(edge_python), "-c", "import torch"], capture_output=True, text=True, cwd="/")
    assert proc.returncode != 0 and "No module named 'torch'" in proc.stderr
    listed = _pip(edge_python, "list", "--format", "json", timeout_s=60)
    installed = {d["name"].lower() for d in json.loads(listed.stdout)}
    assert {"splitsense", "onnxruntime", "grpcio", "numpy"} <= installed
    assert not installed & {"torch", "safetensors", "ray", "redis", "onnx", "onnxscript", "splitsense-assets"}
    site = next((edge_python.parent.parent / "lib").glob("python3*/site-packages"))
    shipped = [p for p in site.rglob("*") if p.suffix in (".safetensors", ".npz", ".onnx") and "splitsense" in str(p)]
    assert not shipped, shipped[:5]
    assert not (site / "splitsense_assets").exists() and not (site / "pipelines" / "data").exists()
    # and the device path imports in it (the CLI, every edge module)
    code = "import importlib, pkgutil, edge, splitsense.cli; [importlib.import_module(f'edge.{m.name}') for m in " \
        "pkgutil.iter_modules(edge.__path__)]; import sys; assert 'torch' not in sys.modules"  # fmt: skip
    proc = subprocess.run([str(edge_python), "-c", code], capture_output=True, text=True, cwd="/")
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_edge_run_in_the_edge_install_answers_every_window_offloaded_and_local(
    edge_python: Path, exported: Path, recording: Path, device_config: Path
) -> None:
    common = ["--recording", str(recording), "--export-dir", str(exported), "--config", str(device_config)]
    common += ["--device-id", DEVICE]

    # against a real broker on loopback, the cut forced to 2: the windows go to the cloud
    with BrokerThread(ModelRegistry([MODEL])) as b:
        offloaded = edge_run(edge_python, *common, "--broker", b.address, "--cut", str(CUT), "--codec", "fp32")
    assert offloaded["by_mode"]["offloaded"] >= WINDOWS - 2, offloaded  # a window may miss while the tail warms
    assert offloaded["bytes_sent"] > 0

    # the broker unreachable (nothing listens there): every window finished on the device
    down = edge_run(edge_python, *common, "--broker", f"127.0.0.1:{free_port()}", "--cut", str(CUT))
    assert down["by_mode"]["offloaded"] == 0, down
    assert down["by_mode"]["local"] + down["by_mode"]["fallback"] == WINDOWS

    # and not asked to offload at all
    local = edge_run(edge_python, *common, "--local-only")
    assert local["by_mode"]["local"] == WINDOWS and local["bytes_sent"] == 0

    # the same predictions whichever way a window went (fp32 on the wire is exact; the cloud's tail
    # is PyTorch on the weights, the device's ONNX Runtime on the export checked against it)
    assert abs(offloaded["accuracy"] - local["accuracy"]) <= 1 / WINDOWS
    assert down["accuracy"] == local["accuracy"] > 0.5
