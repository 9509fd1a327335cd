#!/usr/bin/env python3
"""Import the real sensor data from the shared data folder into the data package (run once):
``assets/splitsense_assets/data/``, the distribution splitsense-assets (``assets/pyproject.toml``).

    python scripts/import_data.py [SOURCE] [--dest assets/splitsense_assets/data]

SOURCE defaults to ``../shared/data`` relative to the repository root. The output is committed,
so the project never reads the shared folder at run time. What it writes:

- ``audio/fsdd.npz``: all 3000 FSDD WAV clips (checked to be 8 kHz, mono, 16-bit PCM) as one
  concatenated int16 array ``samples`` with ``offsets`` (int64, N+1), ``digit`` (int8),
  ``speaker`` (int8 index into ``speaker_names``), ``index`` (int8, 0..49), ``file`` and
  ``sample_rate``. Clips are ordered by (speaker, digit, index). Samples are unchanged.
- ``inertial/uci_har_subset_{train,test}.npz`` and ``inertial/BasicMotions_{TRAIN,TEST}.ts``:
  byte-for-byte copies.

The npz is written with fixed zip timestamps, so re-running the import gives identical bytes
(no spurious diff). Network traces are already in ``assets/splitsense_assets/data/traces/`` and
are left alone.
At the end every output is read back through ``pipelines.datasets`` and its sha256 printed.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import re
import shutil
import stat
import sys
import wave
import zipfile
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SOURCE = REPO_ROOT.parent / "shared" / "data"
DEFAULT_DEST = REPO_ROOT / "assets" / "splitsense_assets" / "data"

SAMPLE_RATE = 8000
EXPECTED_CLIPS = 3000
FILENAME = re.compile(r"^(\d)_([a-z]+)_(\d+)\.wav$")

INERTIAL_COPIES = {
    Path("inertial/uci_har_subset/uci_har_subset_train.npz"): Path("inertial/uci_har_subset_train.npz"),
    Path("inertial/uci_har_subset/uci_har_subset_test.npz"): Path("inertial/uci_har_subset_test.npz"),
    Path("inertial/basicmotions/BasicMotions_TRAIN.ts"): Path("inertial/BasicMotions_TRAIN.ts"),
    Path("inertial/basicmotions/BasicMotions_TEST.ts"): Path("inertial/BasicMotions_TEST.ts"),
}


class SourceDataError(Exception):
    """A source file is missing or not what the shared README says it is."""


def read_wav(path: Path) -> np.ndarray:
    try:
        with wave.open(str(path), "rb") as w:
            if w.getcomptype() != "NONE":
                raise SourceDataError(f"{path}: compressed WAV ({w.getcomptype()}), expected PCM")
            if w.getnchannels() != 1:
                raise SourceDataError(f"{path}: {w.getnchannels()} channels, expected mono")
            if w.getsampwidth() != 2:
                raise SourceDataError(f"{path}: {8 * w.getsampwidth()}-bit, expected 16-bit")
            if w.getframerate() != SAMPLE_RATE:
                raise SourceDataError(f"{path}: {w.getframerate()} Hz, expected {SAMPLE_RATE}")
            n = w.getnframes()
            raw = w.readframes(n)
    except (wave.Error, EOFError) as e:
        raise SourceDataError(f"{path}: not a readable WAV: {e}") from None
    if len(raw) != 2 * n or n == 0:
        raise SourceDataError(f"{path}: header says {n} frames, read {len(raw) // 2}")
    return np.frombuffer(raw, dtype="<i2").astype(np.int16)


def read_metadata(path: Path) -> dict[str, dict[str, str]]:
    with path.open(newline="") as f:
        return {Path(row["file"]).name: row for row in csv.DictReader(f)}


def savez_deterministic(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Like np.savez_compressed, but with fixed zip timestamps so the bytes are reproducible."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        for name, arr in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.asanyarray(arr), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, buf.getvalue(), compresslevel=9)
    tmp.replace(path)


def import_fsdd(source: Path, dest: Path) -> Path:
    rec_dir = source / "audio" / "fsdd" / "recordings"
    meta_path = source / "audio" / "fsdd" / "metadata.csv"
    if not rec_dir.is_dir():
        raise SourceDataError(f"{rec_dir} does not exist")
    meta = read_metadata(meta_path) if meta_path.is_file() else {}

    entries: list[tuple[str, int, int, Path]] = []  # (speaker, digit, index, path)
    for p in rec_dir.iterdir():
        m = FILENAME.match(p.name)
        if not m:
            raise SourceDataError(f"{p}: file name is not {{digit}}_{{speaker}}_{{index}}.wav")
        entries.append((m.group(2), int(m.group(1)), int(m.group(3)), p))
    if len(entries) != EXPECTED_CLIPS:
        raise SourceDataError(f"{rec_dir}: {len(entries)} clips, expected {EXPECTED_CLIPS}")
    entries.sort(key=lambda e: (e[0], e[1], e[2]))

    speaker_names = sorted({e[0] for e in entries})
    spk_idx = {s: i for i, s in enumerate(speaker_names)}
    clips: list[np.ndarray] = []
    for spk, digit, idx, p in entries:
        if not 0 <= idx <= 49:
            raise SourceDataError(f"{p}: recording index {idx} outside 0..49")
        clip = read_wav(p)
        row = meta.get(p.name)
        if meta and row is None:
            raise SourceDataError(f"{p.name} is not listed in {meta_path}")
        if row is not None and (
            int(row["num_samples"]) != clip.size
            or int(row["digit"]) != digit
            or row["speaker"] != spk
            or int(row["index"]) != idx
            or int(row["sample_rate"]) != SAMPLE_RATE
        ):
            raise SourceDataError(f"{p.name}: disagrees with its row in {meta_path}: {row}")
        clips.append(clip)

    lengths = np.array([c.size for c in clips], dtype=np.int64)
    offsets = np.zeros(len(clips) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    arrays: dict[str, np.ndarray] = {
        "samples": np.concatenate(clips).astype(np.int16),
        "offsets": offsets,
        "digit": np.array([e[1] for e in entries], dtype=np.int8),
        "speaker": np.array([spk_idx[e[0]] for e in entries], dtype=np.int8),
        "speaker_names": np.array(speaker_names),
        "index": np.array([e[2] for e in entries], dtype=np.int8),
        "file": np.array([e[3].name for e in entries]),
        "sample_rate": np.array(SAMPLE_RATE, dtype=np.int64),
    }
    out = dest / "audio" / "fsdd.npz"
    savez_deterministic(out, arrays)
    make_writable(out)
    print(
        f"fsdd: {len(clips)} clips, {len(speaker_names)} speakers, {offsets[-1]} samples "
        f"({offsets[-1] / SAMPLE_RATE:.1f} s) -> {out}"
    )
    return out


def make_writable(path: Path) -> None:
    path.chmod(path.stat().st_mode | stat.S_IWUSR)


def copy_inertial(source: Path, dest: Path) -> list[Path]:
    outs = []
    for src_rel, dst_rel in INERTIAL_COPIES.items():
        src, dst = source / src_rel, dest / dst_rel
        if not src.is_file():
            raise SourceDataError(f"{src} does not exist")
        dst.parent.mkdir(parents=True, exist_ok=True)
        if dst.exists():
            make_writable(dst)
        shutil.copyfile(src, dst)
        make_writable(dst)
        print(f"copied {src} -> {dst}")
        outs.append(dst)
    return outs


def verify(dest: Path, outputs: list[Path]) -> None:
    sys.path.insert(0, str(REPO_ROOT))
    from pipelines import datasets  # imported here, after the sys.path tweak

    clips = datasets.load_fsdd(dest)
    assert len(clips) == EXPECTED_CLIPS and int(clips.test_mask.sum()) == 300
    for split in ("train", "test"):
        uci = datasets.load_uci_har(split, dest)  # type: ignore[arg-type]
        bm = datasets.load_basicmotions(split, dest)  # type: ignore[arg-type]
        print(f"verified {split}: uci_har {uci.x.shape}, basicmotions {bm.x.shape}")
    for p in outputs:
        digest = hashlib.sha256(p.read_bytes()).hexdigest()
        print(f"{digest}  {p.relative_to(dest)}  ({p.stat().st_size} bytes)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("source", nargs="?", type=Path, default=DEFAULT_SOURCE, help="shared data folder")
    ap.add_argument("--dest", type=Path, default=DEFAULT_DEST, help="output folder (assets/splitsense_assets/data)")
    args = ap.parse_args(argv)
    source: Path = args.source.resolve()
    dest: Path = args.dest.resolve()
    try:
        outputs = [import_fsdd(source, dest), *copy_inertial(source, dest)]
    except SourceDataError as e:
        print(f"import_data: {e}", file=sys.stderr)
        return 1
    verify(dest, outputs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
