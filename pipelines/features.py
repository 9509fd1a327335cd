"""Preprocessing on the device, before stage 0: log-mel for audio, standardisation for IMU.

Log-mel is computed with torch.stft and a numpy-built HTK mel filterbank (torchaudio does not
install beside torch 2.13 here). The parameters are DeepEar-like: 25 ms windows, 10 ms hop,
40 mel bands over 0-4 kHz (8 kHz audio), one second per window.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

# The constants and fix_length are shared with the numpy twin of this module (what a device
# without torch runs): one definition, there.
from pipelines.numpy_features import (
    AUDIO_FRAMES,
    HOP_LENGTH,
    LOG_FLOOR,
    N_FFT,
    N_MELS,
    SAMPLE_RATE_HZ,
    WIN_LENGTH,
    WINDOW_SAMPLES,
    fix_length,
)
from pipelines.numpy_features import mel_filterbank as _mel_filterbank_np
from splitsense.errors import DataError

__all__ = [
    "AUDIO_FRAMES",
    "HOP_LENGTH",
    "LOG_FLOOR",
    "N_FFT",
    "N_MELS",
    "SAMPLE_RATE_HZ",
    "WINDOW_SAMPLES",
    "WIN_LENGTH",
    "Standardizer",
    "fix_length",
    "log_mel",
    "log_mel_ops",
    "mel_filterbank",
]


@lru_cache(maxsize=4)
def mel_filterbank(n_mels: int = N_MELS, n_fft: int = N_FFT, sample_rate: int = SAMPLE_RATE_HZ) -> torch.Tensor:
    """Triangular HTK mel filters, shape (n_mels, n_fft // 2 + 1)."""
    return torch.from_numpy(_mel_filterbank_np(n_mels, n_fft, sample_rate).copy())


def log_mel(waves: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Log-mel spectrogram of fixed-length waveforms: (B, WINDOW_SAMPLES) -> (B, 1, N_MELS, AUDIO_FRAMES)."""
    x = torch.as_tensor(waves, dtype=torch.float32)
    if x.ndim == 1:
        x = x.unsqueeze(0)
    if x.ndim != 2 or x.shape[1] != WINDOW_SAMPLES:
        raise DataError(f"log_mel expects (batch, {WINDOW_SAMPLES}) samples, got {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise DataError("audio window contains NaN or inf samples")
    spec = torch.stft(
        x,
        n_fft=N_FFT,
        hop_length=HOP_LENGTH,
        win_length=WIN_LENGTH,
        window=torch.hann_window(WIN_LENGTH),
        center=True,
        return_complex=True,
    )
    power = spec.real**2 + spec.imag**2  # (B, bins, frames)
    mel = torch.matmul(mel_filterbank(), power)
    return torch.log(mel + LOG_FLOOR).unsqueeze(1)


@dataclass(frozen=True)
class Standardizer:
    """Per-feature standardisation with statistics from the training split (shipped with the weights)."""

    mean: torch.Tensor
    std: torch.Tensor

    @classmethod
    def fit(cls, x: torch.Tensor, dims: tuple[int, ...]) -> Standardizer:
        mean = x.mean(dim=dims, keepdim=True)[0]
        std = x.std(dim=dims, keepdim=True)[0].clamp_min(1e-6)
        return cls(mean=mean, std=std)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def state(self, prefix: str = "preprocess.") -> dict[str, torch.Tensor]:
        return {prefix + "mean": self.mean.contiguous(), prefix + "std": self.std.contiguous()}

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor], prefix: str = "preprocess.") -> Standardizer:
        return cls(mean=state[prefix + "mean"], std=state[prefix + "std"])


def log_mel_ops(n_samples: int = WINDOW_SAMPLES) -> int:
    """Multiply-accumulates (or equivalent real operations) of one window's log-mel on a device: per
    frame a windowed real FFT of N_FFT points (~2 N log2 N), the power spectrum, the mel filterbank
    (n_bins x N_MELS) and the log. What a CMSIS-DSP front end does; used to time preprocessing on a
    microcontroller (pipelines/devices.py, macs_per_s)."""
    frames = 1 + n_samples // HOP_LENGTH
    n_bins = N_FFT // 2 + 1
    per_frame = N_FFT + 2 * N_FFT * int(np.log2(N_FFT)) + 2 * n_bins + n_bins * N_MELS + N_MELS
    return frames * per_frame
