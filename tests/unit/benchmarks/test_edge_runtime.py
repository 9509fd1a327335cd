"""`splitsense bench edge` (benchmarks/edge_runtime.py) measures what it says, on a small export."""

from __future__ import annotations

from io import StringIO
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from benchmarks.edge_runtime import (
    EdgeBenchConfig,
    _cold,
    _device_recording,
    installed_size,
    render,
    run_edge_bench,
    run_edge_cli,
    torch_addition,
)
from pipelines.training import load_trained
from splitsense.config import PathsConfig
from splitsense.errors import ConfigError


def test_latency_rows_cover_every_cut_of_every_level(uci_har_export: Path) -> None:
    cfg = EdgeBenchConfig(
        models=("uci_har",), repeats=3, warmup=1, levels="all", cold_runs=0, export_root=uci_har_export, install=False
    )
    r = run_edge_bench(cfg)
    cuts = {(row["cut"], row["level"]) for row in r["latency"]}
    # cut 1 is the encoder at every level (never compressed): measured once, at 1.0
    assert cuts == {(k, 1.0) for k in range(1, 7)} | {(k, 0.98) for k in range(2, 7)}
    for row in r["latency"]:
        assert row["torch_ms"] > 0 and row["onnx_ms"] > 0 and row["ort_format_ms"] > 0
        assert row["onnx_no_worse"] == (row["onnx_ms"] <= row["torch_ms"])
    assert r["prep"][0]["model"] == "uci_har" and r["cold_start"] == []
    assert r["disk"][0]["onnx_all_levels_mb"] > r["disk"][0]["onnx_level1_mb"] > 0
    assert r["config"]["levels"] == "all" and r["summary"]["cuts"] == len(r["latency"])
    out = StringIO()
    render(r, Console(file=out, width=200))
    assert "front latency per cut" in out.getvalue() and "uci_har" in out.getvalue()


def test_cold_start_of_the_onnx_backend_loads_no_torch(uci_har_export: Path, tmp_path: Path) -> None:
    raw = tmp_path / "w.npy"
    np.save(raw, np.zeros((9, 128), dtype=np.float32))
    row = _cold("onnx", "backend", "uci_har", uci_har_export, PathsConfig().weights_dir, raw, runs=1)
    assert row["torch_imported"] is False and row["onnxruntime_imported"] is True
    assert row["cold_start_ms"] > row["first_inference_ms"] > 0 and row["rss_mb"] > 0
    assert 0 <= row["prediction"] < len(load_trained("uci_har").model.class_names)


def test_missing_exports_and_bad_settings_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="needs the exports"):
        run_edge_bench(EdgeBenchConfig(models=("uci_har",), export_root=tmp_path, cold_runs=0, install=False))
    with pytest.raises(ConfigError, match="levels"):
        EdgeBenchConfig(levels="some")


def test_installed_size_counts_each_distribution_and_leaves_the_installer_aside(tmp_path: Path) -> None:
    site = tmp_path / "site-packages"
    for name, files in (("pip", {"pip/__init__.py": 3000}), ("tiny", {"tiny/__init__.py": 1000,
                        "tiny/__pycache__/__init__.cpython-311.pyc": 500, "tiny/data.bin": 2_000_000})):  # fmt: skip
        info = site / f"{name}-1.0.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
        for rel, size in files.items():
            (site / rel).parent.mkdir(parents=True, exist_ok=True)
            (site / rel).write_bytes(b"x" * size)
        (info / "RECORD").write_text("".join(f"{rel},,\n" for rel in files) + f"{info.name}/RECORD,,\n")
    r = installed_size(site)
    assert r["names"] == ["tiny"] and r["installer_mb"] == 0.0
    assert r["mb"] == 2.0 and r["mb_without_bytecode"] == 2.0 and r["largest"][0]["name"] == "tiny"


def test_torch_adds_torch_and_what_it_needs_beyond_the_edge_install() -> None:
    added = torch_addition(["numpy", "typing-extensions"])
    assert added["torch_mb"] > 100 and "safetensors" in added["distributions"]
    assert "numpy" not in added["distributions"] and added["mb"] >= added["torch_mb"]


def test_edge_run_cli_is_timed_to_its_first_result(uci_har_export: Path, tmp_path: Path) -> None:
    import sys

    rec = _device_recording("uci_har", 5, tmp_path)
    args = ["--model", "uci_har", "--local-only", "--speed", "0", "--recording", str(rec)]
    r = run_edge_cli(Path(sys.executable), [*args, "--backend", "onnx", "--export-dir", str(uci_har_export)])
    assert r["results"] == 5 and r["summary"]["windows"] == 5 and r["summary"]["backend"] == "onnx"
    assert 0 < r["first_result_ms"] <= r["exit_ms"] and r["peak_rss_mb"] > 20
