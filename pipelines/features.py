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

from splitsense.errors import DataError

SAMPLE_RATE_HZ = 8000
WINDOW_SAMPLES = 8000  # 1.0 s covers 99.3% of FSDD clips; longer ones are centre-cropped
N_FFT = 256
WIN_LENGTH = 200  # 25 ms at 8 kHz
HOP_LENGTH = 80  # 10 ms
N_MELS = 40
LOG_FLOOR = 1e-6
AUDIO_FRAMES = 1 + WINDOW_SAMPLES // HOP_LENGTH  # 101 with centred frames


def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
    return 2595.0 * np.log10(1.0 + hz / 700.0)


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    return 700.0 * (10.0 ** (mel / 2595.0) - 1.0)


@lru_cache(maxsize=4)
def mel_filterbank(n_mels: int = N_MELS, n_fft: int = N_FFT, sample_rate: int = SAMPLE_RATE_HZ) -> torch.Tensor:
    """Triangular HTK mel filters, shape (n_mels, n_fft // 2 + 1)."""
    n_bins = n_fft // 2 + 1
    fft_hz = np.linspace(0.0, sample_rate / 2, n_bins)
    mel_pts = np.linspace(_hz_to_mel(np.array(0.0)), _hz_to_mel(np.array(sample_rate / 2)), n_mels + 2)
    hz_pts = _mel_to_hz(mel_pts)
    fb = np.zeros((n_mels, n_bins), dtype=np.float64)
    for m in range(n_mels):
        lo, centre, hi = hz_pts[m], hz_pts[m + 1], hz_pts[m + 2]
        up = (fft_hz - lo) / (centre - lo)
        down = (hi - fft_hz) / (hi - centre)
        fb[m] = np.maximum(0.0, np.minimum(up, down))
    return torch.from_numpy(fb.astype(np.float32))


def fix_length(wave: np.ndarray, n: int = WINDOW_SAMPLES) -> np.ndarray:
    """Zero-pad (centred) or centre-crop a 1-D waveform to n samples."""
    if wave.ndim != 1:
        raise DataError(f"audio window must be 1-D, got shape {wave.shape}")
    if len(wave) >= n:
        start = (len(wave) - n) // 2
        return wave[start : start + n]
    out = np.zeros(n, dtype=np.float32)
    start = (n - len(wave)) // 2
    out[start : start + len(wave)] = wave
    return out


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
