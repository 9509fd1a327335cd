"""The export of what a device runs (pipelines/export.py) and its manifest (pipelines/artifacts.py),
on the shipped uci_har weights: every front within the stated tolerance of PyTorch on real test
windows, the accuracy equal, the manifest complete, and the export reproducible byte for byte."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.artifacts import (
    MANIFEST_NAME,
    ORT_SUMS_NAME,
    ExportedModel,
    check_export,
    load_manifest,
    sha256_file,
    verify_files,
)
from pipelines.catalog import catalog_path
from pipelines.compress import compress_front_at_level
from pipelines.export import ATOL, OPSET, RTOL, export_model, raw_test_windows
from pipelines.training import load_trained, weights_path
from splitsense.errors import ModelError

MODEL = "uci_har"
LEVEL = 0.98  # tests/unit/conftest.py
N = 6


@pytest.fixture(scope="module")
def export_dir(uci_har_export: Path) -> Path:
    return uci_har_export / MODEL


def test_manifest_names_every_front_stage_and_source(export_dir: Path) -> None:
    m = load_manifest(export_dir)
    assert m.model == MODEL and m.opset == OPSET and m.n_stages == N and m.levels == (1.0, LEVEL)
    assert m.weights == {"file": f"{MODEL}.safetensors", "sha256": sha256_file(weights_path(MODEL))}
    assert m.catalog == {"file": f"{MODEL}.catalog.json", "sha256": sha256_file(catalog_path(MODEL))}
    assert set(m.tools) == {"torch", "onnx", "onnxscript", "onnxruntime"}
    # every cut at 1.0 (cut 0: nothing runs) and every cut >= 1 at the level
    assert sorted((f.cut, f.level) for f in m.fronts) == sorted(
        [(k, 1.0) for k in range(N + 1)] + [(k, LEVEL) for k in range(1, N + 1)]
    )
    keys = {s.key for s in m.stages}
    tm = load_trained(MODEL)
    for f in m.fronts:
        assert len(f.stages) == f.cut and set(f.stages) <= keys
        assert f.input.shape == ("batch", *tm.model.input_shape)
        assert f.output.shape == ("batch", *tm.model.activation_shape(f.cut)) and f.output.dtype == "float32"
    # the encoder is never compressed: one file at both levels; the other stages have a variant each
    assert m.stage(0, LEVEL).key == m.stage(0, 1.0).key == "stage0"
    assert m.stage(0, 1.0).levels == (1.0, LEVEL)
    for i in range(1, N - 1):  # the classifier is too small to compress
        assert m.stage(i, LEVEL).key != m.stage(i, 1.0).key and m.stage(i, LEVEL).ranks
    # what the runtime needs besides graphs: shapes, the bottleneck's table, the statistics
    assert m.activation_shapes == tuple(tm.model.activation_shape(k) for k in range(N + 1))
    prior, ours = tm.model.symbol_prior(1), m.symbol_prior(1)
    assert prior is not None and ours is not None
    assert ours.digest == prior.digest and np.array_equal(ours.pmf, prior.pmf) and ours.low == prior.low
    assert [k for k in range(N + 1) if m.symbol_prior(k) is not None] == [1]
    assert np.array_equal(m.mean, tm.standardizer.mean.numpy()) and np.array_equal(m.std, tm.standardizer.std.numpy())
    # every graph and its mobile twin are there, with the digests recorded
    assert verify_files(m, export_dir) == []
    for _, a in m.artifacts():
        assert a.file.endswith(".onnx") and a.ort_file == a.file[: -len(".onnx")] + ".ort"
        assert (export_dir / a.ort_file).exists()
        assert a.nbytes == (export_dir / a.file).stat().st_size
    assert (export_dir / "required_operators.config").read_text().startswith("# Generated from model/s:")


def test_every_front_is_within_tolerance_and_keeps_the_accuracy(export_dir: Path) -> None:
    m = load_manifest(export_dir)
    assert m.check["ok"] and m.check["problems"] == [] and m.check["accuracy_equal_every_front"]
    assert m.tolerance["atol"] == ATOL and m.tolerance["rtol"] == RTOL
    for f in m.fronts:
        c = f.check
        assert c["ok"] and c["windows"] == 64 and c["windows_over_tolerance"] == 0
        assert c["accuracy_onnx"] == c["accuracy_torch"] and c["predictions_differ"] == 0
        assert c["max_abs_err"] <= 1e-4 and c["max_rel_err"] <= RTOL
    assert m.check["accuracy_whole_graph"] == m.check["accuracy_torch"]
    assert m.check["prep_onnx_max_abs_err"] <= 1e-4 and m.check["prep_numpy_max_abs_err"] <= 1e-4


@pytest.mark.parametrize("level", [1.0, LEVEL])
def test_exported_fronts_equal_pytorch_on_real_windows(export_dir: Path, level: float) -> None:
    tm = load_trained(MODEL)
    raw, labels = raw_test_windows(tm, limit=200)
    x = tm.prepare(torch.from_numpy(raw))
    model = tm.model if level >= 1.0 else compress_front_at_level(tm.model, N, level).eval()
    for file_format in ("onnx", "ort"):
        ex = ExportedModel(export_dir, file_format=file_format)
        for k in range(1, N + 1):
            with torch.inference_mode():
                ref = model.run(x, 0, k).numpy()
            got = ex.run_front(k, level, x.numpy())
            assert got.shape == ref.shape and got.dtype == np.float32
            scale = np.abs(ref).reshape(len(ref), -1).max(axis=1)
            err = np.abs(got - ref).reshape(len(ref), -1).max(axis=1)
            assert (err <= ATOL + RTOL * scale).all(), (file_format, k, float(err.max()))
    with torch.inference_mode():
        local = tm.model(x).argmax(1).numpy()
    whole = ExportedModel(export_dir).run_whole(x.numpy()).argmax(1)
    assert np.array_equal(whole, local) and (local == labels).mean() > 0.85


def test_export_is_reproducible(export_dir: Path, tmp_path: Path) -> None:
    again = tmp_path / MODEL
    export_model(MODEL, again, levels=[LEVEL], check_windows=64)
    first = sorted(p.name for p in export_dir.iterdir())
    assert sorted(p.name for p in again.iterdir()) == first
    for name in first:
        if name.endswith(".ort") or name == ORT_SUMS_NAME:
            continue  # ONNX Runtime lays .ort tables out in address-seeded order (pipelines/artifacts.py)
        assert (again / name).read_bytes() == (export_dir / name).read_bytes(), name
    # the .ort files hold the same graphs: the same outputs, bit for bit
    x = np.random.default_rng(0).standard_normal((8, 9, 128)).astype(np.float32)
    a = ExportedModel(export_dir, file_format="ort").run_front(N, LEVEL, x)
    b = ExportedModel(again, file_format="ort").run_front(N, LEVEL, x)
    assert np.array_equal(a, b)


def test_unknown_level_and_missing_exports_are_refused(export_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="no compression level"):
        export_model(MODEL, tmp_path / "x", levels=[0.5], check=False)
    m = load_manifest(export_dir)
    with pytest.raises(ModelError, match="no exported front at compression level 0.5"):
        m.stage(1, 0.5)
    with pytest.raises(ModelError, match="no exported model"):
        load_manifest(tmp_path / "nowhere")
    assert check_export(MODEL, export_dir.parent) is None
    assert "no exported model" in (check_export("fsdd_digit", export_dir.parent) or "")


def test_changed_weights_and_damaged_files_are_detected(export_dir: Path, tmp_path: Path) -> None:
    weights = tmp_path / "weights"
    weights.mkdir()
    data = bytearray(weights_path(MODEL).read_bytes())
    data[-1] ^= 1
    (weights / f"{MODEL}.safetensors").write_bytes(bytes(data))
    assert "changed since" in (check_export(MODEL, export_dir.parent, weights) or "")
    damaged = tmp_path / "export" / MODEL
    shutil.copytree(export_dir, damaged)
    target = damaged / load_manifest(damaged).stage(2, 1.0).artifact.file
    blob = bytearray(target.read_bytes())
    blob[-1] ^= 1
    target.write_bytes(bytes(blob))
    (damaged / load_manifest(damaged).whole.ort_file).unlink()  # type: ignore[operator]
    problems = verify_files(load_manifest(damaged), damaged)
    assert any("stage2.conv4.onnx: sha256" in p for p in problems) and any("model.ort: missing" in p for p in problems)
    with pytest.raises(ModelError, match="damaged"):
        ExportedModel(damaged, verify=True)
    bad = json.loads((damaged / MANIFEST_NAME).read_text())
    bad["format"] = 99
    (damaged / MANIFEST_NAME).write_text(json.dumps(bad))
    with pytest.raises(ModelError, match="format 99"):
        load_manifest(damaged)


def test_the_export_carries_its_catalog_for_a_device_without_the_data_package(export_dir: Path) -> None:
    """A device reads which fronts fit its memory from the catalog (`edge run --device-class`):
    the export holds the very file its manifest names, so the device needs no data package."""
    from pipelines.artifacts import sha256_file
    from pipelines.catalog import catalog_path, load_catalog

    m = load_manifest(export_dir)
    assert m.catalog is not None
    copy = export_dir / m.catalog["file"]
    assert sha256_file(copy) == m.catalog["sha256"] == sha256_file(catalog_path(MODEL))
    assert load_catalog(MODEL, export_dir).n_stages == N
