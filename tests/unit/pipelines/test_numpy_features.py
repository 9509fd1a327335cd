"""The numpy preprocessing (what a device without torch runs) equals the torch one it mirrors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines import features, numpy_features
from pipelines.export import raw_test_windows
from pipelines.training import load_trained
from splitsense.errors import DataError

REPO = Path(__file__).resolve().parents[3]


def test_log_mel_equals_torch_on_every_fsdd_test_window() -> None:
    raw, _ = raw_test_windows(load_trained("fsdd_digit"))
    assert raw.shape == (300, numpy_features.WINDOW_SAMPLES)
    ours = numpy_features.log_mel(raw)
    ref = features.log_mel(raw).numpy()
    assert ours.shape == ref.shape == (300, 1, numpy_features.N_MELS, numpy_features.AUDIO_FRAMES)
    assert ours.dtype == np.float32
    # log units (values -13.8..5): float32 FFTs of two libraries; the largest errors (~1e-4, measured)
    # are in the quietest bins, where the log magnifies a relative difference of the energy
    assert float(np.abs(ours - ref).max()) < 5e-4


@pytest.mark.parametrize("name", ["fsdd_speaker", "uci_har"])
def test_preprocessor_equals_prepare_window(name: str) -> None:
    tm = load_trained(name)
    raw, _ = raw_test_windows(tm, limit=20)
    prep = numpy_features.Preprocessor(tm.spec.modality, tm.standardizer.mean.numpy(), tm.standardizer.std.numpy())
    for w in raw:
        with torch.inference_mode():
            ref = tm.prepare_window(w).numpy()
        got = prep(w)
        assert got.shape == ref.shape and got.dtype == np.float32
        assert float(np.abs(got - ref).max()) < 1e-4
    batch = prep.standardize(prep.raw_inputs(raw))
    assert np.allclose(batch, np.concatenate([prep(w) for w in raw]), atol=1e-6)


def test_shared_constants_and_checks() -> None:
    assert features.WINDOW_SAMPLES is numpy_features.WINDOW_SAMPLES and features.fix_length is numpy_features.fix_length
    assert torch.equal(features.mel_filterbank(), torch.from_numpy(numpy_features.mel_filterbank().copy()))
    w = numpy_features.hann_window()
    assert np.allclose(w[28:228], torch.hann_window(200).numpy(), rtol=0, atol=1e-6)  # torch: float32 cos
    assert not w[:28].any() and not w[228:].any()
    with pytest.raises(DataError, match="expects"):
        numpy_features.log_mel(np.zeros((1, 10), dtype=np.float32))
    bad = np.zeros(numpy_features.WINDOW_SAMPLES, dtype=np.float32)
    bad[3] = np.inf
    with pytest.raises(DataError, match="NaN or inf"):
        numpy_features.log_mel(bad)


def test_imports_no_torch() -> None:
    code = "import sys; sys.modules['torch'] = None; import pipelines.numpy_features; print('ok')"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
