"""pipelines.datasets: the real data the project carries, and refusal of broken files."""

from __future__ import annotations

import io
import re
import zipfile
from pathlib import Path

import numpy as np
import pytest

from pipelines import datasets
from pipelines.datasets import (
    DATA_DIR,
    AudioClips,
    InertialSet,
    load_basicmotions,
    load_fsdd,
    load_uci_har,
)
from splitsense.errors import DataError

# ---------------------------------------------------------------------------------------------
# The real data
# ---------------------------------------------------------------------------------------------


def test_data_dir_is_the_data_package() -> None:
    """The datasets are the splitsense-assets package (installed, or the checkout's assets/), never
    the shared workspace folder, and never inside the code packages a device installs."""
    from splitsense.config import assets_root

    repo = Path(datasets.__file__).resolve().parent.parent
    root = assets_root()
    assert root is not None and root.name == "splitsense_assets"
    assert DATA_DIR.resolve() == (root / "data").resolve()
    assert (DATA_DIR / "README.md").is_file()  # the licences travel with the data
    assert not (repo / "pipelines" / "data").exists() and not (repo / "pipelines" / "weights").exists()
    assert "shared" not in DATA_DIR.resolve().parts


def test_fsdd_real() -> None:
    clips = load_fsdd()
    assert isinstance(clips, AudioClips)
    assert len(clips) == len(clips.waveforms) == 3000
    assert clips.sample_rate == 8000
    assert clips.speaker_names == ["george", "jackson", "lucas", "nicolas", "theo", "yweweler"]
    assert np.bincount(clips.digits).tolist() == [300] * 10
    assert np.bincount(clips.speakers).tolist() == [500] * 6
    assert np.bincount(clips.index).tolist() == [60] * 50
    assert int(clips.test_mask.sum()) == 300 and int(clips.train_mask.sum()) == 2700
    lengths = np.array([w.size for w in clips.waveforms])
    assert lengths.min() >= 0.1 * 8000 and lengths.max() <= 2.5 * 8000
    for w in clips.waveforms[::97]:
        assert w.dtype == np.float32 and w.ndim == 1
        assert -1.0 <= float(w.min()) and float(w.max()) < 1.0
    # file names agree with the labels
    for i in range(0, 3000, 131):
        digit, speaker, index = clips.files[i].removesuffix(".wav").split("_")
        assert int(digit) == clips.digits[i]
        assert speaker == clips.speaker_names[clips.speakers[i]]
        assert int(index) == clips.index[i]


def test_fsdd_subset_and_cache() -> None:
    clips = load_fsdd()
    again = load_fsdd()
    assert again.waveforms[0] is clips.waveforms[0]  # cached: no second decode
    assert again.waveforms is not clips.waveforms  # but the lists are the caller's own
    assert not clips.digits.flags.writeable and not clips.waveforms[0].flags.writeable

    test = clips.subset(clips.test_mask)
    assert len(test) == 300 and set(test.index.tolist()) == {0, 1, 2, 3, 4}
    assert np.bincount(test.digits).tolist() == [30] * 10
    assert test.speaker_names == clips.speaker_names and test.sample_rate == 8000
    assert test.waveforms[0].flags.writeable
    picked = clips.subset(np.array([5, 7]))
    assert picked.files == [clips.files[5], clips.files[7]]
    with pytest.raises(ValueError):
        clips.subset(np.ones(3, dtype=bool))


@pytest.mark.parametrize(
    ("split", "n", "counts"),
    [
        ("train", 2400, [400, 350, 322, 420, 449, 459]),
        ("test", 950, [160, 152, 135, 158, 172, 173]),
    ],
)
def test_uci_har_real(split: str, n: int, counts: list[int]) -> None:
    ds = load_uci_har(split)  # type: ignore[arg-type]
    assert isinstance(ds, InertialSet)
    assert ds.x.shape == (n, 9, 128) and ds.x.dtype == np.float32
    assert ds.y.dtype == np.int64 and np.bincount(ds.y).tolist() == counts
    assert ds.num_classes == len(ds.class_names) == 6 and ds.class_names[0] == "WALKING"
    assert ds.channel_names[0] == "body_acc_x" and ds.channel_names[-1] == "total_acc_z"
    assert ds.sample_rate_hz == 50.0
    # channels first: total_acc - body_acc is gravity, ~1 g per window
    gravity = ds.x[:, 6:9, :] - ds.x[:, 0:3, :]
    assert 0.9 < float(np.median(np.linalg.norm(gravity.mean(axis=2), axis=1))) < 1.1


@pytest.mark.parametrize("split", ["train", "test"])
def test_basicmotions_real(split: str) -> None:
    ds = load_basicmotions(split)  # type: ignore[arg-type]
    assert ds.x.shape == (40, 6, 100) and ds.x.dtype == np.float32
    assert np.bincount(ds.y).tolist() == [10, 10, 10, 10]
    assert ds.class_names == ["Standing", "Running", "Walking", "Badminton"]
    assert ds.channel_names == ["acc_x", "acc_y", "acc_z", "gyro_x", "gyro_y", "gyro_z"]
    assert ds.sample_rate_hz == 10.0
    # running shakes the watch far more than standing
    std = ds.x.std(axis=2).mean(axis=1)
    assert std[ds.y == 1].mean() > 5 * std[ds.y == 0].mean()


def test_bad_split_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="split"):
        load_uci_har("val")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="split"):
        load_basicmotions("TRAIN")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# Broken files in tmp_path
# ---------------------------------------------------------------------------------------------


def _names(path: Path) -> str:
    return re.escape(str(path))


def _savez(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """np.savez_compressed, but a key named 'file' (as in fsdd.npz) cannot be a keyword there."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, arr in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.asanyarray(arr), allow_pickle=False)
            zf.writestr(f"{name}.npy", buf.getvalue())


def _fsdd_arrays(n: int = 4) -> dict[str, np.ndarray]:
    lengths = np.array([800, 900, 1000, 1100][:n], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    rng = np.random.default_rng(0)
    return {
        "samples": rng.integers(-32768, 32767, int(offsets[-1]), dtype=np.int16),
        "offsets": offsets,
        "digit": np.array([0, 1, 2, 9][:n], dtype=np.int8),
        "speaker": np.array([0, 1, 0, 1][:n], dtype=np.int8),
        "speaker_names": np.array(["george", "theo"]),
        "index": np.array([0, 4, 5, 49][:n], dtype=np.int8),
        "file": np.array(["0_george_0.wav", "1_theo_4.wav", "2_george_5.wav", "9_theo_49.wav"][:n]),
        "sample_rate": np.array(8000, dtype=np.int64),
    }


def _write_fsdd(data_dir: Path, **changes: np.ndarray | None) -> Path:
    arrays = _fsdd_arrays()
    for k, v in changes.items():
        if v is None:
            del arrays[k]
        else:
            arrays[k] = v
    path = datasets.fsdd_path(data_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    _savez(path, arrays)
    return path


def test_small_fsdd_roundtrip(tmp_path: Path) -> None:
    _write_fsdd(tmp_path)
    clips = load_fsdd(tmp_path)
    assert len(clips) == 4 and [w.size for w in clips.waveforms] == [800, 900, 1000, 1100]
    assert clips.test_mask.tolist() == [True, True, False, False]
    assert clips.digits.tolist() == [0, 1, 2, 9]


def test_missing_data_dir(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match=_names(datasets.fsdd_path(missing))):
        load_fsdd(missing)
    with pytest.raises(DataError, match=_names(datasets.uci_har_path("train", missing))):
        load_uci_har("train", missing)
    with pytest.raises(DataError, match=_names(datasets.basicmotions_path("test", missing))):
        load_basicmotions("test", missing)


def test_corrupt_npz(tmp_path: Path) -> None:
    path = datasets.fsdd_path(tmp_path)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"this is not a zip file at all")
    with pytest.raises(DataError, match=_names(path)):
        load_fsdd(tmp_path)


def test_truncated_npz(tmp_path: Path) -> None:
    path = _write_fsdd(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=_names(path)):
        load_fsdd(tmp_path)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"sample_rate": np.array(16000, dtype=np.int64)}, "16000 Hz"),
        ({"samples": np.zeros(3800, dtype=np.float32)}, "int16"),
        ({"offsets": np.array([0, 800, 1700, 2700, 3000], dtype=np.int64)}, "truncated"),
        ({"offsets": np.array([0, 900, 800, 2700, 3800], dtype=np.int64)}, "increasing"),
        ({"offsets": np.array([5, 800, 1700, 2700, 3800], dtype=np.int64)}, "start at 0"),
        ({"digit": np.array([0, 1, 2, 10], dtype=np.int8)}, "digit out of range"),
        ({"speaker": np.array([0, 1, 2, 0], dtype=np.int8)}, "speaker out of range"),
        ({"index": np.array([0, 1, 50, 3], dtype=np.int8)}, "index out of range"),
        ({"digit": np.array([0, 1, 2], dtype=np.int8)}, "digit must have shape"),
        ({"file": np.array(["a.wav"])}, "file must have 4"),
        ({"speaker": None}, "missing array"),
    ],
)
def test_fsdd_inconsistent(tmp_path: Path, change: dict[str, np.ndarray | None], message: str) -> None:
    path = _write_fsdd(tmp_path, **change)
    with pytest.raises(DataError, match=_names(path)) as e:
        load_fsdd(tmp_path)
    assert message in str(e.value)


def _write_uci(data_dir: Path, **changes: np.ndarray) -> Path:
    arrays: dict[str, np.ndarray] = {
        "X": np.zeros((6, 128, 9), dtype=np.float32),
        "y": np.arange(1, 7, dtype=np.int8),
        "channels": np.array(datasets.UCI_HAR_CHANNEL_NAMES),
        "activity_names": np.array(datasets.UCI_HAR_CLASS_NAMES),
    }
    arrays.update(changes)
    path = datasets.uci_har_path("train", data_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    _savez(path, arrays)
    return path


def test_small_uci_roundtrip_is_channels_first(tmp_path: Path) -> None:
    x = np.zeros((6, 128, 9), dtype=np.float32)
    x[:, :, 3] = 1.0  # channel 3 (body_gyro_x) on disk is (N, T, C)
    _write_uci(tmp_path, X=x)
    ds = load_uci_har("train", tmp_path)
    assert ds.x.shape == (6, 9, 128)
    assert (ds.x[:, 3, :] == 1.0).all() and ds.x.sum() == 6 * 128
    assert ds.y.tolist() == [0, 1, 2, 3, 4, 5]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"X": np.zeros((6, 9, 128), dtype=np.float32)}, "shape"),
        ({"X": np.zeros((6, 128, 9), dtype=np.float64)}, "float32"),
        ({"X": np.full((6, 128, 9), np.nan, dtype=np.float32)}, "NaN"),
        ({"y": np.array([0, 1, 2, 3, 4, 5], dtype=np.int8)}, "y out of range"),
        ({"y": np.array([1, 2, 3, 4, 5, 7], dtype=np.int8)}, "y out of range"),
        ({"y": np.array([1, 2, 3], dtype=np.int8)}, "y must have shape"),
        ({"y": np.ones(6, dtype=np.float32)}, "integers"),
        ({"channels": np.array(["a"] * 9)}, "channels"),
    ],
)
def test_uci_wrong(tmp_path: Path, change: dict[str, np.ndarray], message: str) -> None:
    path = _write_uci(tmp_path, **change)
    with pytest.raises(DataError, match=_names(path)) as e:
        load_uci_har("train", tmp_path)
    assert message in str(e.value)


def test_uci_truncated(tmp_path: Path) -> None:
    path = _write_uci(tmp_path, X=np.random.default_rng(1).normal(size=(6, 128, 9)).astype(np.float32))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 200])
    with pytest.raises(DataError, match=_names(path)):
        load_uci_har("train", tmp_path)


# --- .ts ---------------------------------------------------------------------------------------

_REAL_TS = (DATA_DIR / "inertial" / "BasicMotions_TEST.ts").read_text().splitlines()
_FIRST_DATA = next(i for i, line in enumerate(_REAL_TS) if line.strip().lower() == "@data") + 1


def _write_ts(data_dir: Path, lines: list[str]) -> Path:
    path = datasets.basicmotions_path("test", data_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def _with_row(row_fn: object, row: int = 3) -> tuple[list[str], int]:
    lines = list(_REAL_TS)
    i = _FIRST_DATA + row
    lines[i] = row_fn(lines[i])  # type: ignore[operator]
    return lines, i + 1  # 1-based line number


def test_ts_copy_parses(tmp_path: Path) -> None:
    _write_ts(tmp_path, _REAL_TS)
    ds = load_basicmotions("test", tmp_path)
    assert ds.x.shape == (40, 6, 100)
    assert np.array_equal(ds.x, load_basicmotions("test").x)


@pytest.mark.parametrize(
    ("row_fn", "message"),
    [
        (lambda s: s.rsplit(":", 2)[0] + ":" + s.rsplit(":", 1)[1], "expected 6 dimensions"),
        (lambda s: s.rsplit(":", 1)[0] + ":Swimming", "class label 'Swimming'"),
        (lambda s: s.replace(",", ",abc,", 1), "dimension 1 has 101 values"),
        (lambda s: "oops," + s.split(",", 1)[1], "'oops' is not a number"),
        (lambda s: s.split(",", 1)[1], "dimension 1 has 99 values"),
        (lambda s: "nan," + s.split(",", 1)[1], "NaN"),
    ],
)
def test_ts_malformed_row_names_file_and_line(tmp_path: Path, row_fn: object, message: str) -> None:
    lines, lineno = _with_row(row_fn)
    path = _write_ts(tmp_path, lines)
    with pytest.raises(DataError, match=_names(path) + f":{lineno}:") as e:
        load_basicmotions("test", tmp_path)
    assert message in str(e.value)


def test_ts_truncated_and_wrong_headers(tmp_path: Path) -> None:
    path = _write_ts(tmp_path, _REAL_TS[: _FIRST_DATA - 3])  # cut before @data
    with pytest.raises(DataError, match=_names(path) + ": no @data"):
        load_basicmotions("test", tmp_path)

    path = _write_ts(tmp_path, _REAL_TS[:_FIRST_DATA])  # header only
    with pytest.raises(DataError, match="holds no series"):
        load_basicmotions("test", tmp_path)

    cut = list(_REAL_TS[: _FIRST_DATA + 2]) + [_REAL_TS[_FIRST_DATA + 2][:500]]  # row cut mid-way
    path = _write_ts(tmp_path, cut)
    with pytest.raises(DataError, match=_names(path) + f":{_FIRST_DATA + 3}:"):
        load_basicmotions("test", tmp_path)

    wrong_dims = ["@dimensions 5" if line.startswith("@dimensions") else line for line in _REAL_TS[:_FIRST_DATA]]
    five = [":".join(r.split(":")[:5] + [r.split(":")[-1]]) for r in _REAL_TS[_FIRST_DATA:] if r.strip()]
    path = _write_ts(tmp_path, wrong_dims + five)
    with pytest.raises(DataError, match=_names(path) + ": series must be 6 dimensions"):
        load_basicmotions("test", tmp_path)

    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(DataError, match=_names(path)):
        load_basicmotions("test", tmp_path)


def test_cache_sees_a_replaced_file(tmp_path: Path) -> None:
    path = _write_uci(tmp_path)
    assert len(load_uci_har("train", tmp_path)) == 6
    x = np.zeros((12, 128, 9), dtype=np.float32)
    y = np.tile(np.arange(1, 7, dtype=np.int8), 2)
    _write_uci(tmp_path, X=x, y=y)
    datasets.clear_cache()  # same-tick rewrites may keep mtime; size differs anyway
    assert len(load_uci_har("train", tmp_path)) == 12
    path.unlink()
    with pytest.raises(DataError, match="does not exist"):
        load_uci_har("train", tmp_path)
