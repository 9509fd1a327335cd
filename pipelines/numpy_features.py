"""The preprocessing before stage 0 in numpy alone: what a device without torch runs.

The same computation as `pipelines.features` (which defines the models' inputs with torch.stft,
and takes its constants and `fix_length` from here): a centred, reflect-padded STFT of N_FFT
points with a periodic Hann window of WIN_LENGTH samples centred in it, the power spectrum, the
HTK mel filterbank and the log; then per-feature standardisation with the training split's
statistics. `log_mel` here agrees with `features.log_mel` to 1e-4 in log units at worst (float32
FFTs of two libraries, in the quietest bins; 3e-5 once standardised; measured on every FSDD test
window by tests/unit/pipelines/test_numpy_features.py), and is what the ONNX Runtime backend
(edge/backend.py) preprocesses with: ONNX Runtime's own STFT kernel is slower here than numpy's
pocketfft (~0.6 vs ~0.35 ms a window on one thread, `splitsense bench edge`), so the exported
preprocessing graph (`pipelines.export`) is for a runtime without numpy (a phone app).

Nothing here imports torch.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

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
    "Preprocessor",
    "fix_length",
    "hann_window",
    "log_mel",
    "mel_filterbank",
]

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
def _mel_filterbank(n_mels: int, n_fft: int, sample_rate: int) -> np.ndarray:
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
    out = fb.astype(np.float32)
    out.flags.writeable = False  # cached: shared by every caller
    return out


def mel_filterbank(n_mels: int = N_MELS, n_fft: int = N_FFT, sample_rate: int = SAMPLE_RATE_HZ) -> np.ndarray:
    """Triangular HTK mel filters, float32, shape (n_mels, n_fft // 2 + 1) (read-only)."""
    return _mel_filterbank(n_mels, n_fft, sample_rate)


@lru_cache(maxsize=4)
def _hann(win_length: int, n_fft: int) -> np.ndarray:
    n = np.arange(win_length, dtype=np.float64)
    w = (0.5 - 0.5 * np.cos(2.0 * np.pi * n / win_length)).astype(np.float32)  # periodic, as torch.hann_window
    out = np.zeros(n_fft, dtype=np.float32)
    left = (n_fft - win_length) // 2  # torch.stft centres a shorter window in the FFT frame
    out[left : left + win_length] = w
    out.flags.writeable = False
    return out


def hann_window(win_length: int = WIN_LENGTH, n_fft: int = N_FFT) -> np.ndarray:
    """The periodic Hann window of `win_length` samples centred in `n_fft` (zeros around it), float32."""
    return _hann(win_length, n_fft)


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


def log_mel(waves: np.ndarray) -> np.ndarray:
    """Log-mel spectrogram of fixed-length waveforms, float32: (B, WINDOW_SAMPLES) or (WINDOW_SAMPLES,)
    -> (B, 1, N_MELS, AUDIO_FRAMES); `features.log_mel` in numpy."""
    x = np.asarray(waves, dtype=np.float32)
    if x.ndim == 1:
        x = x[None]
    if x.ndim != 2 or x.shape[1] != WINDOW_SAMPLES:
        raise DataError(f"log_mel expects (batch, {WINDOW_SAMPLES}) samples, got {tuple(x.shape)}")
    if not np.isfinite(x).all():
        raise DataError("audio window contains NaN or inf samples")
    half = N_FFT // 2
    padded = np.pad(x, ((0, 0), (half, half)), mode="reflect")
    frames = np.lib.stride_tricks.sliding_window_view(padded, N_FFT, axis=-1)[:, ::HOP_LENGTH]  # (B, frames, N_FFT)
    spec = np.fft.rfft(frames * hann_window(), axis=-1)  # (B, frames, bins)
    power = (spec.real**2 + spec.imag**2).astype(np.float32)
    mel = np.matmul(mel_filterbank(), power.transpose(0, 2, 1))  # (B, mels, frames)
    out: np.ndarray = np.log(mel + np.float32(LOG_FLOOR))[:, None].astype(np.float32, copy=False)
    return out


class Preprocessor:
    """One raw sensor window -> the standardised model input (1, ...), float32: `TrainedModel.
    prepare_window` without torch. `mean` and `std` are the statistics shipped with the weights
    (`features.Standardizer`), broadcast over the batch dimension."""

    def __init__(self, modality: str, mean: np.ndarray, std: np.ndarray) -> None:
        if modality not in ("audio", "inertial"):
            raise DataError(f"no preprocessing for modality {modality!r}")
        self.modality = modality
        self.mean = np.asarray(mean, dtype=np.float32)
        self.std = np.asarray(std, dtype=np.float32)

    def raw_input(self, window: np.ndarray) -> np.ndarray:
        """The unstandardised input (1, ...) of one raw window (`training.preprocess_raw`)."""
        if self.modality == "audio":
            return log_mel(fix_length(np.asarray(window, dtype=np.float32)))
        x = np.asarray(window, dtype=np.float32)
        return x[None] if x.ndim == 2 else x

    def raw_inputs(self, windows: np.ndarray) -> np.ndarray:
        """`raw_input` of a batch of windows already of the model's length: (B, WINDOW_SAMPLES) of
        audio, (B, channels, T) of IMU."""
        if self.modality == "audio":
            return log_mel(windows)
        return np.asarray(windows, dtype=np.float32)

    def standardize(self, x: np.ndarray) -> np.ndarray:
        out: np.ndarray = ((x - self.mean) / self.std).astype(np.float32, copy=False)
        return out

    def __call__(self, window: np.ndarray) -> np.ndarray:
        return self.standardize(self.raw_input(window))
