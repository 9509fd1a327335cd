"""Log-mel and standardisation behave as documented."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipelines import features
from splitsense.errors import DataError


def test_log_mel_shape_and_tone_peak() -> None:
    t = np.arange(features.WINDOW_SAMPLES) / features.SAMPLE_RATE_HZ
    tone = (0.5 * np.sin(2 * np.pi * 1000.0 * t)).astype(np.float32)
    m = features.log_mel(tone)
    assert m.shape == (1, 1, features.N_MELS, features.AUDIO_FRAMES)
    # A 1 kHz tone puts its energy in one band; its mel index is where 1 kHz falls on a 0-4 kHz mel axis.
    band = int(m[0, 0].mean(dim=1).argmax())
    mel = 2595 * np.log10(1 + np.array([0.0, 1000.0, 4000.0]) / 700)
    expected = (mel[1] - mel[0]) / (mel[2] - mel[0]) * (features.N_MELS + 1) - 1
    assert abs(band - expected) <= 1.5


def test_fix_length_pads_and_crops_centred() -> None:
    short = np.ones(100, dtype=np.float32)
    out = features.fix_length(short, 200)
    assert out.shape == (200,) and out[:50].sum() == 0 and out[50:150].sum() == 100
    long = np.arange(300, dtype=np.float32)
    assert features.fix_length(long, 100)[0] == 100


def test_log_mel_rejects_bad_input() -> None:
    with pytest.raises(DataError, match="expects"):
        features.log_mel(np.zeros((1, 10), dtype=np.float32))
    bad = np.zeros(features.WINDOW_SAMPLES, dtype=np.float32)
    bad[3] = np.nan
    with pytest.raises(DataError, match="NaN"):
        features.log_mel(bad)


def test_standardizer_round_trip_state() -> None:
    x = torch.randn(50, 9, 128) * 3 + 1
    s = features.Standardizer.fit(x, (0, 2))
    y = s(x)
    assert y.mean(dim=(0, 2)).abs().max() < 1e-4
    s2 = features.Standardizer.from_state(s.state())
    assert torch.equal(s2(x), y)
