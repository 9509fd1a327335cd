"""Typed loaders for the real sensor data of the data package (``splitsense_assets/data/``).

Everything read here is validated: a missing, truncated or corrupt file, a wrong shape, a
wrong sample rate, a label out of range or inconsistent offsets raises
:class:`splitsense.errors.DataError` with a message that names the file. Nothing here reads
``../shared``; ``scripts/import_data.py`` produced these files once (see
``assets/splitsense_assets/data/README.md`` for sources, licences and what was transformed). The
data package (splitsense-assets) is not part of a device install: ``DATA_DIR`` is where
``splitsense.config.PathsConfig`` finds it, and a load without it says what to install.

Loads are cached per file (path, size and mtime), so repeated calls are cheap and return the
same object. The arrays of a cached result are shared and therefore **read-only**; copy
(``np.array(x)``, ``torch.tensor(x)``) before changing them. :meth:`AudioClips.subset`
returns fresh, writable arrays.
"""

from __future__ import annotations

import functools
import math
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt

from splitsense.config import PathsConfig, missing_asset
from splitsense.errors import DataError

__all__ = [
    "DATA_DIR",
    "FSDD_SAMPLE_RATE",
    "FSDD_TEST_INDICES",
    "UCI_HAR_CLASS_NAMES",
    "UCI_HAR_CHANNEL_NAMES",
    "BASICMOTIONS_CLASS_NAMES",
    "BASICMOTIONS_CHANNEL_NAMES",
    "AudioClips",
    "InertialSet",
    "load_fsdd",
    "load_uci_har",
    "load_basicmotions",
    "fsdd_path",
    "uci_har_path",
    "basicmotions_path",
    "clear_cache",
]

DATA_DIR: Path = PathsConfig().data_dir

# --- FSDD ------------------------------------------------------------------------------------
FSDD_FILE = Path("audio") / "fsdd.npz"
FSDD_SAMPLE_RATE = 8000
FSDD_NUM_DIGITS = 10
FSDD_NUM_INDICES = 50  # each speaker says each digit 50 times, index 0..49
FSDD_TEST_INDICES = range(0, 5)  # official split: index 0..4 is test

# --- UCI HAR (subset) ------------------------------------------------------------------------
UCI_HAR_FILE = Path("inertial") / "uci_har_subset_{split}.npz"
UCI_HAR_SAMPLE_RATE_HZ = 50.0
UCI_HAR_WINDOW = 128
UCI_HAR_CLASS_NAMES: tuple[str, ...] = (
    "WALKING",
    "WALKING_UPSTAIRS",
    "WALKING_DOWNSTAIRS",
    "SITTING",
    "STANDING",
    "LAYING",
)
UCI_HAR_CHANNEL_NAMES: tuple[str, ...] = (
    "body_acc_x",
    "body_acc_y",
    "body_acc_z",
    "body_gyro_x",
    "body_gyro_y",
    "body_gyro_z",
    "total_acc_x",
    "total_acc_y",
    "total_acc_z",
)

# --- BasicMotions ----------------------------------------------------------------------------
BASICMOTIONS_FILE = Path("inertial") / "BasicMotions_{split}.ts"
BASICMOTIONS_SAMPLE_RATE_HZ = 10.0
BASICMOTIONS_LENGTH = 100
BASICMOTIONS_CLASS_NAMES: tuple[str, ...] = ("Standing", "Running", "Walking", "Badminton")
BASICMOTIONS_CHANNEL_NAMES: tuple[str, ...] = ("acc_x", "acc_y", "acc_z", "gyro_x", "gyro_y", "gyro_z")

Split = Literal["train", "test"]


# ============================================================================================
# Public types
# ============================================================================================


@dataclass(frozen=True)
class AudioClips:
    """Spoken-digit clips (FSDD), one entry per clip, all arrays aligned on the clip axis."""

    waveforms: list[npt.NDArray[np.float32]]  # each 1-D float32 in [-1, 1)
    digits: npt.NDArray[np.int64]  # (N,) 0..9
    speakers: npt.NDArray[np.int64]  # (N,) index into speaker_names
    speaker_names: list[str]
    index: npt.NDArray[np.int64]  # (N,) recording index 0..49
    files: list[str]  # original file names, e.g. "3_theo_17.wav"
    sample_rate: int

    def __len__(self) -> int:
        return len(self.waveforms)

    @property
    def test_mask(self) -> npt.NDArray[np.bool_]:
        """The official FSDD split: recording index 0..4 is test (300 clips), 5..49 train."""
        return self.index < len(FSDD_TEST_INDICES)

    @property
    def train_mask(self) -> npt.NDArray[np.bool_]:
        return ~self.test_mask

    def subset(self, mask: npt.NDArray[np.bool_] | npt.NDArray[np.integer]) -> AudioClips:
        """The clips selected by a boolean mask of length N, or by an array of clip indices."""
        sel = np.asarray(mask)
        n = len(self)
        if sel.dtype == np.bool_:
            if sel.shape != (n,):
                raise ValueError(f"boolean mask must have shape ({n},), got {sel.shape}")
            idx = np.flatnonzero(sel)
        elif np.issubdtype(sel.dtype, np.integer) and sel.ndim == 1:
            if sel.size and (sel.min() < -n or sel.max() >= n):
                raise ValueError(f"clip indices out of range for {n} clips")
            idx = sel
        else:
            raise ValueError(f"mask must be a 1-D bool or integer array, got {sel.dtype} {sel.shape}")
        return AudioClips(
            waveforms=[self.waveforms[int(i)].copy() for i in idx],
            digits=self.digits[idx].copy(),
            speakers=self.speakers[idx].copy(),
            speaker_names=list(self.speaker_names),
            index=self.index[idx].copy(),
            files=[self.files[int(i)] for i in idx],
            sample_rate=self.sample_rate,
        )


@dataclass(frozen=True)
class InertialSet:
    """Fixed-length inertial windows, channels first."""

    x: npt.NDArray[np.float32]  # (N, channels, T)
    y: npt.NDArray[np.int64]  # (N,) 0-based class index
    class_names: list[str]
    channel_names: list[str]
    sample_rate_hz: float

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


# ============================================================================================
# Paths and caching
# ============================================================================================


def _dir(data_dir: Path | str | None) -> Path:
    return DATA_DIR if data_dir is None else Path(data_dir)


def _check_split(split: str) -> str:
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    return split


def fsdd_path(data_dir: Path | str | None = None) -> Path:
    return _dir(data_dir) / FSDD_FILE


def uci_har_path(split: Split, data_dir: Path | str | None = None) -> Path:
    return _dir(data_dir) / str(UCI_HAR_FILE).format(split=_check_split(split))


def basicmotions_path(split: Split, data_dir: Path | str | None = None) -> Path:
    return _dir(data_dir) / str(BASICMOTIONS_FILE).format(split=_check_split(split).upper())


def _cache_key(path: Path) -> tuple[Path, int, int]:
    """(resolved path, mtime, size): a replaced file is read again, an unchanged one is not."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise DataError(missing_asset("data file", path)) from None
    except OSError as e:
        raise DataError(f"data file {path} cannot be read: {e}") from None
    if not path.is_file():
        raise DataError(f"data file {path} is not a regular file")
    return path.resolve(), st.st_mtime_ns, st.st_size


def clear_cache() -> None:
    """Forget every cached load (tests that rewrite files in place within one mtime tick)."""
    _load_fsdd_cached.cache_clear()
    _load_uci_har_cached.cache_clear()
    _load_basicmotions_cached.cache_clear()


def _fresh_lists(s: InertialSet) -> InertialSet:
    return replace(s, class_names=list(s.class_names), channel_names=list(s.channel_names))


def _readonly(a: npt.NDArray[np.generic]) -> None:
    a.setflags(write=False)


# ============================================================================================
# npz helpers
# ============================================================================================


def _read_npz(path: Path, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Every array of ``keys`` from an npz, without pickle; DataError naming the file otherwise."""
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in keys if k not in z.files]
            if missing:
                raise DataError(f"{path}: missing array(s) {', '.join(missing)}; it holds {z.files}")
            return {k: z[k] for k in keys}
    except DataError:
        raise
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, KeyError, zipfile.LargeZipFile) as e:
        raise DataError(f"{path}: not a readable .npz archive (corrupt or truncated?): {e}") from None


def _expect(cond: bool, path: Path, what: str) -> None:
    if not cond:
        raise DataError(f"{path}: {what}")


def _int_labels(a: np.ndarray, path: Path, name: str, lo: int, hi: int, n: int) -> npt.NDArray[np.int64]:
    _expect(a.shape == (n,), path, f"{name} must have shape ({n},), got {a.shape}")
    _expect(np.issubdtype(a.dtype, np.integer), path, f"{name} must be integers, got {a.dtype}")
    if n:
        bad = (a < lo) | (a > hi)
        if bad.any():
            raise DataError(
                f"{path}: {name} out of range [{lo}, {hi}]: {np.unique(a[bad])[:10].tolist()} "
                f"(first at row {int(np.flatnonzero(bad)[0])})"
            )
    return a.astype(np.int64)


def _str_list(a: np.ndarray, path: Path, name: str, n: int | None = None) -> list[str]:
    _expect(a.ndim == 1 and a.dtype.kind == "U", path, f"{name} must be a 1-D string array, got {a.dtype}")
    if n is not None:
        _expect(a.shape == (n,), path, f"{name} must have {n} entries, got {a.shape[0]}")
    return [str(s) for s in a]


# ============================================================================================
# FSDD
# ============================================================================================


def load_fsdd(data_dir: Path | str | None = None) -> AudioClips:
    """All 3000 FSDD clips (8 kHz mono), as float32 waveforms in [-1, 1)."""
    c = _load_fsdd_cached(*_cache_key(fsdd_path(data_dir)))
    # fresh lists around the shared read-only arrays: a caller appending to them cannot poison the cache
    return replace(c, waveforms=list(c.waveforms), speaker_names=list(c.speaker_names), files=list(c.files))


@functools.lru_cache(maxsize=4)
def _load_fsdd_cached(path: Path, _mtime_ns: int, _size: int) -> AudioClips:
    keys = ("samples", "offsets", "digit", "speaker", "speaker_names", "index", "file", "sample_rate")
    z = _read_npz(path, keys)

    sr = z["sample_rate"]
    _expect(sr.shape == () and np.issubdtype(sr.dtype, np.integer), path, "sample_rate must be an int scalar")
    _expect(int(sr) == FSDD_SAMPLE_RATE, path, f"sample_rate is {int(sr)} Hz, expected {FSDD_SAMPLE_RATE}")

    samples = z["samples"]
    _expect(samples.dtype == np.int16, path, f"samples must be int16 PCM, got {samples.dtype}")
    _expect(samples.ndim == 1, path, f"samples must be 1-D (concatenated clips), got shape {samples.shape}")

    offsets = z["offsets"]
    _expect(offsets.ndim == 1 and offsets.size >= 2, path, "offsets must be 1-D with >= 2 entries")
    _expect(offsets.dtype == np.int64, path, f"offsets must be int64, got {offsets.dtype}")
    n = offsets.size - 1
    _expect(int(offsets[0]) == 0, path, f"offsets must start at 0, got {int(offsets[0])}")
    _expect(
        int(offsets[-1]) == samples.size,
        path,
        f"offsets end at {int(offsets[-1])} but there are {samples.size} samples (truncated?)",
    )
    steps = np.diff(offsets)
    _expect(
        bool((steps > 0).all()),
        path,
        f"offsets must be strictly increasing (empty or negative clip at {np.flatnonzero(steps <= 0)[:5]})",
    )

    names = _str_list(z["speaker_names"], path, "speaker_names")
    _expect(len(names) > 0 and len(set(names)) == len(names), path, "speaker_names must be non-empty, unique")
    digits = _int_labels(z["digit"], path, "digit", 0, FSDD_NUM_DIGITS - 1, n)
    speakers = _int_labels(z["speaker"], path, "speaker", 0, len(names) - 1, n)
    index = _int_labels(z["index"], path, "index", 0, FSDD_NUM_INDICES - 1, n)
    files = _str_list(z["file"], path, "file", n)

    wave = samples.astype(np.float32) / np.float32(32768.0)
    _readonly(wave)
    waveforms = [wave[int(a) : int(b)] for a, b in zip(offsets[:-1], offsets[1:], strict=True)]
    for a in (digits, speakers, index):
        _readonly(a)
    return AudioClips(
        waveforms=waveforms,
        digits=digits,
        speakers=speakers,
        speaker_names=names,
        index=index,
        files=files,
        sample_rate=FSDD_SAMPLE_RATE,
    )


# ============================================================================================
# UCI HAR
# ============================================================================================


def load_uci_har(split: Split, data_dir: Path | str | None = None) -> InertialSet:
    """UCI HAR raw inertial windows (subset): x (N, 9, 128) float32 at 50 Hz, y 0..5."""
    return _fresh_lists(_load_uci_har_cached(*_cache_key(uci_har_path(split, data_dir))))


@functools.lru_cache(maxsize=4)
def _load_uci_har_cached(path: Path, _mtime_ns: int, _size: int) -> InertialSet:
    z = _read_npz(path, ("X", "y", "channels", "activity_names"))
    x = z["X"]
    _expect(x.dtype == np.float32, path, f"X must be float32, got {x.dtype}")
    c, t = len(UCI_HAR_CHANNEL_NAMES), UCI_HAR_WINDOW
    _expect(
        x.ndim == 3 and x.shape[1:] == (t, c) and x.shape[0] > 0,
        path,
        f"X must have shape (N>0, {t}, {c}), got {x.shape}",
    )
    _expect(bool(np.isfinite(x).all()), path, "X holds NaN or inf")
    n = x.shape[0]
    y = _int_labels(z["y"], path, "y", 1, len(UCI_HAR_CLASS_NAMES), n) - 1
    channels = _str_list(z["channels"], path, "channels", c)
    _expect(tuple(channels) == UCI_HAR_CHANNEL_NAMES, path, f"unexpected channels {channels}")
    classes = _str_list(z["activity_names"], path, "activity_names", len(UCI_HAR_CLASS_NAMES))
    _expect(tuple(classes) == UCI_HAR_CLASS_NAMES, path, f"unexpected activity_names {classes}")
    xc = np.ascontiguousarray(x.transpose(0, 2, 1))  # (N, T, C) on disk -> (N, C, T)
    _readonly(xc)
    _readonly(y)
    return InertialSet(x=xc, y=y, class_names=classes, channel_names=channels, sample_rate_hz=UCI_HAR_SAMPLE_RATE_HZ)


# ============================================================================================
# BasicMotions (.ts, sktime/aeon text format)
# ============================================================================================


@dataclass
class _TsHeader:
    dimensions: int | None = None
    series_length: int | None = None
    class_labels: list[str] | None = None
    equal_length: bool | None = None
    missing: bool | None = None
    timestamps: bool | None = None


def _ts_bool(path: Path, lineno: int, tag: str, value: str) -> bool:
    if value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise DataError(f"{path}:{lineno}: @{tag} must be true or false, got {value!r}")


def _ts_int(path: Path, lineno: int, tag: str, value: str) -> int:
    try:
        v = int(value)
    except ValueError:
        raise DataError(f"{path}:{lineno}: @{tag} must be an integer, got {value!r}") from None
    if v <= 0:
        raise DataError(f"{path}:{lineno}: @{tag} must be > 0, got {v}")
    return v


def _parse_ts(path: Path) -> tuple[npt.NDArray[np.float32], list[str], list[str]]:
    """Parse an equal-length, labelled, multivariate .ts file -> x (N, D, T), labels, classes."""
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start}): corrupt?") from None
    except OSError as e:
        raise DataError(f"{path}: cannot be read: {e}") from None

    h = _TsHeader()
    in_data = False
    rows: list[list[list[float]]] = []
    labels: list[str] = []
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if not in_data:
            if not line.startswith("@"):
                raise DataError(f"{path}:{lineno}: expected a @tag or #comment before @data, got {line[:40]!r}")
            tag, _, rest = line[1:].partition(" ")
            tag, rest = tag.lower(), rest.strip()
            if tag == "data":
                in_data = True
            elif tag == "dimensions":
                h.dimensions = _ts_int(path, lineno, tag, rest)
            elif tag == "serieslength":
                h.series_length = _ts_int(path, lineno, tag, rest)
            elif tag == "equallength":
                h.equal_length = _ts_bool(path, lineno, tag, rest)
            elif tag == "missing":
                h.missing = _ts_bool(path, lineno, tag, rest)
            elif tag == "timestamps":
                h.timestamps = _ts_bool(path, lineno, tag, rest)
            elif tag == "classlabel":
                parts = rest.split()
                if not parts or not _ts_bool(path, lineno, tag, parts[0]) or len(parts) < 2:
                    raise DataError(f"{path}:{lineno}: @classLabel must be 'true' followed by class names")
                if len(set(parts[1:])) != len(parts) - 1:
                    raise DataError(f"{path}:{lineno}: @classLabel has duplicate class names")
                h.class_labels = parts[1:]
            # other tags (@problemName, @univariate, @targetLabel ...) carry nothing we need
            continue

        # a data row: dim1_values:dim2_values:...:label
        if h.dimensions is None or h.series_length is None or h.class_labels is None:
            raise DataError(f"{path}:{lineno}: @dimensions, @seriesLength and @classLabel must precede @data")
        if h.timestamps:
            raise DataError(f"{path}:{lineno}: timestamped .ts files are not supported")
        parts = line.split(":")
        if len(parts) != h.dimensions + 1:
            raise DataError(
                f"{path}:{lineno}: expected {h.dimensions} dimensions and a label "
                f"({h.dimensions + 1} ':'-separated fields), got {len(parts)}"
            )
        label = parts[-1].strip()
        if label not in h.class_labels:
            raise DataError(f"{path}:{lineno}: class label {label!r} not in @classLabel {h.class_labels}")
        series: list[list[float]] = []
        for d, field in enumerate(parts[:-1], start=1):
            values = field.split(",")
            if len(values) != h.series_length:
                raise DataError(f"{path}:{lineno}: dimension {d} has {len(values)} values, expected {h.series_length}")
            try:
                vals = [float(v) for v in values]
            except ValueError:
                bad = next(v for v in values if not _is_float(v))
                raise DataError(f"{path}:{lineno}: dimension {d}: {bad.strip()[:20]!r} is not a number") from None
            if not all(math.isfinite(v) for v in vals):
                raise DataError(f"{path}:{lineno}: dimension {d} holds NaN/inf (missing values unsupported)")
            series.append(vals)
        rows.append(series)
        labels.append(label)

    if not in_data:
        raise DataError(f"{path}: no @data section (truncated or not a .ts file)")
    if not rows:
        raise DataError(f"{path}: @data section holds no series (truncated?)")
    assert h.class_labels is not None
    return np.asarray(rows, dtype=np.float32), labels, h.class_labels


def _is_float(v: str) -> bool:
    try:
        float(v)
    except ValueError:
        return False
    return True


def load_basicmotions(split: Split, data_dir: Path | str | None = None) -> InertialSet:
    """BasicMotions smartwatch windows: x (N, 6, 100) float32 at 10 Hz, y 0..3."""
    return _fresh_lists(_load_basicmotions_cached(*_cache_key(basicmotions_path(split, data_dir))))


@functools.lru_cache(maxsize=4)
def _load_basicmotions_cached(path: Path, _mtime_ns: int, _size: int) -> InertialSet:
    x, labels, classes = _parse_ts(path)
    d, t = len(BASICMOTIONS_CHANNEL_NAMES), BASICMOTIONS_LENGTH
    _expect(x.shape[1:] == (d, t), path, f"series must be {d} dimensions x {t} samples, got {x.shape[1:]}")
    _expect(
        tuple(classes) == BASICMOTIONS_CLASS_NAMES,
        path,
        f"@classLabel {classes} differs from {list(BASICMOTIONS_CLASS_NAMES)}",
    )
    lookup = {name: i for i, name in enumerate(classes)}
    y = np.array([lookup[s] for s in labels], dtype=np.int64)
    _readonly(x)
    _readonly(y)
    return InertialSet(
        x=x,
        y=y,
        class_names=list(classes),
        channel_names=list(BASICMOTIONS_CHANNEL_NAMES),
        sample_rate_hz=BASICMOTIONS_SAMPLE_RATE_HZ,
    )
