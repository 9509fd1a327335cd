"""Sensor sources: a real test recording from the project's data, replayed at its real rate.

Audio (FSDD, 8 kHz). The microphone delivers frames of `frame_ms` (80 ms = 640 samples). A keyword
or speaker front-end behind a voice-activity detector hands the model one window per utterance;
here each test utterance sits centred in its own 1-s slot of an otherwise silent stream (exactly
what `pipelines.numpy_features.fix_length` makes of it: 99.3% of FSDD clips are shorter than 1 s, the
rest are centre-cropped), so the stream is continuous 8 kHz audio that carries one utterance per
second. Frames are assembled into 1-s windows; a window is emitted when the frame holding its
last sample has arrived (window 0 at 1.04 s with 80-ms frames, window 1 at 2.00 s, ...).

IMU (UCI HAR test split, 50 Hz, 9 channels). The dataset's windows are 128 samples (2.56 s) that
overlap by 50%, so once the first window is full a new one completes every 64 samples (1.28 s):
window i is emitted at (128 + 64 i) / 50 s.

Where the windows come from: a recording file (`save_recording` / `load_recording`: a compact .npz
of windows, labels and times that `splitsense data export-recording` writes from the datasets; what
a device replays, `splitsense edge run --recording PATH`), or the datasets of the data package
(splitsense-assets) when it is installed. Nothing here needs torch.

Pacing: `speed` is sensor seconds per wall second (1.0 real time, 2.0 twice as fast, 0 as fast as
possible). A window's `t_emit` is when it became available on the injected clock: for a paced
replay the moment its last sample arrived, even if the consumer asks for it later (so a device
that falls behind sees its backlog in its latency), for speed 0 the moment it was handed out.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import time
import zipfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipelines import datasets
from pipelines.numpy_features import SAMPLE_RATE_HZ, WINDOW_SAMPLES, fix_length
from pipelines.specs import MODEL_SPECS, ModelSpec, get_spec
from splitsense.errors import ConfigError, DataError

__all__ = [
    "RECORDING_FORMAT",
    "FrameAssembler",
    "RecordedWindow",
    "Recording",
    "ReplaySource",
    "SensorWindow",
    "audio_windows",
    "imu_windows",
    "load_recording",
    "recorded_windows",
    "recording_from_datasets",
    "save_recording",
    "source_for_model",
]

IMU_HOP_SAMPLES = 64  # the UCI HAR windows overlap by 50%


@dataclass(frozen=True)
class RecordedWindow:
    """One window of a recording and the sensor time its last sample arrives (from the start)."""

    window_id: str
    label: int
    raw: np.ndarray  # audio: (8000,) float32; IMU: (9, 128) float32
    stream_t_s: float
    task_labels: tuple[tuple[str, int], ...] = ()  # (model, label) of each extra task of the window


@dataclass(frozen=True)
class SensorWindow:
    """A window as the device sees it."""

    window_id: str
    index: int  # 0, 1, 2, ... in the order emitted
    label: int
    raw: np.ndarray
    t_emit: float  # on the source's clock: when the window became available
    task_labels: tuple[tuple[str, int], ...] = ()  # (model, label) of each extra task of the window


class FrameAssembler:
    """Cuts a stream of sample frames into windows of `window` samples every `hop` samples."""

    def __init__(self, window: int, hop: int | None = None) -> None:
        hop = window if hop is None else hop
        if window < 1 or not 1 <= hop <= window:
            raise ConfigError(f"need window >= 1 and 1 <= hop <= window, got window={window}, hop={hop}")
        self.window = window
        self.hop = hop
        self._buf = np.zeros(0, dtype=np.float32)

    def push(self, frame: np.ndarray) -> list[np.ndarray]:
        """Add a frame; return the windows it completed (oldest first)."""
        self._buf = np.concatenate([self._buf, np.asarray(frame, dtype=np.float32).ravel()])
        out = []
        while len(self._buf) >= self.window:
            out.append(self._buf[: self.window].copy())
            self._buf = self._buf[self.hop :]
        return out


def audio_windows(
    waveforms: list[np.ndarray],
    labels: np.ndarray,
    *,
    frame_ms: float = 80.0,
    sample_rate_hz: int = SAMPLE_RATE_HZ,
    prefix: str = "fsdd-test",
) -> Iterator[RecordedWindow]:
    """One 1-s window per utterance, assembled from `frame_ms` frames of the slotted stream."""
    frame = round(sample_rate_hz * frame_ms / 1000.0)
    if frame < 1:
        raise ConfigError(f"audio frame of {frame_ms} ms is shorter than one sample at {sample_rate_hz} Hz")
    window = WINDOW_SAMPLES
    assembler = FrameAssembler(window)
    leftover = np.zeros(0, dtype=np.float32)  # samples of the stream not yet framed
    samples_sent = 0
    emitted = 0
    for i, wave in enumerate(waveforms):
        stream = np.concatenate([leftover, fix_length(np.asarray(wave, dtype=np.float32), window)])
        # whole frames only, except that the recording's last, partial frame goes out at the end
        usable = len(stream) if i == len(waveforms) - 1 else len(stream) - len(stream) % frame
        for start in range(0, usable, frame):
            chunk = stream[start : min(start + frame, usable)]
            samples_sent += len(chunk)
            for raw in assembler.push(chunk):
                yield RecordedWindow(
                    window_id=f"{prefix}-{emitted:04d}",
                    label=int(labels[emitted]),
                    raw=raw,
                    stream_t_s=samples_sent / sample_rate_hz,
                )
                emitted += 1
        leftover = stream[usable:]


def imu_windows(
    x: np.ndarray, y: np.ndarray, *, sample_rate_hz: float = 50.0, prefix: str = "uci_har-test"
) -> Iterator[RecordedWindow]:
    """The dataset's overlapping windows, each due when its last sample has arrived."""
    if x.ndim != 3:
        raise DataError(f"IMU windows must be (N, channels, T), got shape {x.shape}")
    length = x.shape[2]
    for i in range(x.shape[0]):
        yield RecordedWindow(
            window_id=f"{prefix}-{i:04d}",
            label=int(y[i]),
            raw=np.array(x[i], dtype=np.float32),  # the cached dataset arrays are read-only
            stream_t_s=(length + IMU_HOP_SAMPLES * i) / sample_rate_hz,
        )


async def _asyncio_sleep(seconds: float) -> None:
    await asyncio.sleep(seconds)


class ReplaySource:
    """Replays recorded windows at `speed` x real time on an injected clock and sleep."""

    def __init__(
        self,
        windows: Iterator[RecordedWindow] | list[RecordedWindow],
        *,
        speed: float = 1.0,
        limit: int | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = _asyncio_sleep,
    ) -> None:
        if not (math.isfinite(speed) and speed >= 0):
            raise ConfigError(f"replay speed must be >= 0 (0: as fast as possible), got {speed!r}")
        if limit is not None and limit < 0:
            raise ConfigError(f"window limit must be >= 0, got {limit}")
        self._windows = iter(windows)
        self.speed = speed
        self.limit = limit
        self._clock = clock
        self._sleep = sleep

    def __aiter__(self) -> AsyncIterator[SensorWindow]:
        return self._run()

    async def _run(self) -> AsyncIterator[SensorWindow]:
        t0 = self._clock()
        for index, rec in enumerate(self._windows):
            if self.limit is not None and index >= self.limit:
                return
            if self.speed > 0:
                due = t0 + rec.stream_t_s / self.speed
                wait = due - self._clock()
                if wait > 0:
                    await self._sleep(wait)
                t_emit = due
            else:
                t_emit = self._clock()
            yield SensorWindow(
                window_id=rec.window_id,
                index=index,
                label=rec.label,
                raw=rec.raw,
                t_emit=t_emit,
                task_labels=rec.task_labels,
            )


def recorded_windows(
    spec: ModelSpec,
    *,
    frame_ms: float = 80.0,
    tasks: tuple[ModelSpec, ...] = (),
    data_dir: Path | None = None,
) -> Iterator[RecordedWindow]:
    """The test recording of a model's dataset, with the labels of its task (and of every extra task
    in `tasks`, models of the same dataset, in each window's `task_labels`), from the datasets in
    `data_dir` (default: the data package's)."""
    if any(t.dataset != spec.dataset for t in tasks):
        raise DataError(f"extra tasks {[t.name for t in tasks]} do not read {spec.name!r}'s {spec.dataset} stream")
    if spec.dataset == "fsdd":
        clips = datasets.load_fsdd(data_dir)
        test = clips.subset(clips.test_mask)

        def labels_of(s: ModelSpec) -> np.ndarray:
            return np.asarray(test.speakers if s.task.startswith("speaker") else test.digits)

        windows = audio_windows(test.waveforms, labels_of(spec), frame_ms=frame_ms)
        if not tasks:
            return windows
        extra = [(t.name, labels_of(t)) for t in tasks]
        return (
            dataclasses.replace(w, task_labels=tuple((name, int(lab[i])) for name, lab in extra))
            for i, w in enumerate(windows)
        )
    if spec.dataset == "uci_har":
        if tasks:
            raise DataError("UCI HAR has one task per window")
        s = datasets.load_uci_har("test", data_dir)
        return imu_windows(s.x, s.y, sample_rate_hz=s.sample_rate_hz)
    raise DataError(f"no recording to replay for dataset {spec.dataset!r} of model {spec.name!r}")


# ---------------------------------------------------------------------------------------------
# Recording files: what a device replays without the datasets

RECORDING_FORMAT = 1
_PCM_SCALE = 2.0**-15  # FSDD's 16-bit PCM as the loader's float32 (sample / 32768)


@dataclass(frozen=True)
class Recording:
    """A recording of one sensor stream: its windows in order, each with the label of every model
    in `models` (models that read `dataset`; labels[i, j] is window i's label for models[j])."""

    dataset: str
    models: tuple[str, ...]
    window_ids: tuple[str, ...]
    raw: np.ndarray  # (N, *window shape) float32
    labels: np.ndarray  # (N, len(models)) int64
    stream_t_s: np.ndarray  # (N,) float64: when each window's last sample arrives, from the start

    def __len__(self) -> int:
        return len(self.window_ids)

    def windows(self, model: str) -> Iterator[RecordedWindow]:
        """The windows as `model` replays them (a task group "a+b": the first member's labels, and
        every other member's in `task_labels`)."""
        names = [m.strip() for m in model.split("+")]
        missing = [n for n in names if n not in self.models]
        if missing:
            raise DataError(
                f"the recording has no labels for {', '.join(missing)} (it holds {self.dataset} windows labelled "
                f"for {', '.join(self.models)}): export one with `splitsense data export-recording --model {model}`"
            )
        cols = [self.models.index(n) for n in names]
        for i, wid in enumerate(self.window_ids):
            yield RecordedWindow(
                window_id=wid,
                label=int(self.labels[i, cols[0]]),
                raw=np.array(self.raw[i], dtype=np.float32),
                stream_t_s=float(self.stream_t_s[i]),
                task_labels=tuple((n, int(self.labels[i, c])) for n, c in zip(names[1:], cols[1:], strict=True)),
            )


def recording_from_datasets(
    dataset: str,
    *,
    frame_ms: float = 80.0,
    models: Sequence[str] | None = None,
    limit: int | None = None,
    data_dir: Path | None = None,
) -> Recording:
    """The test recording of `dataset` from the datasets in `data_dir` (default: the data
    package's; `recorded_windows`), labelled for `models` (default: every model that reads it), its
    first `limit` windows (default: all)."""
    names = tuple(models) if models is not None else tuple(n for n, s in MODEL_SPECS.items() if s.dataset == dataset)
    if not names:
        known = sorted({s.dataset for s in MODEL_SPECS.values()})
        raise DataError(f"no model reads dataset {dataset!r}; known datasets: {', '.join(known)}")
    specs = [get_spec(n) for n in names]
    if any(s.dataset != dataset for s in specs):
        raise DataError(f"models {list(names)} do not all read dataset {dataset!r}")
    if limit is not None and limit < 1:
        raise ConfigError(f"a recording needs at least one window, got limit {limit}")
    ids, raws, labels, times = [], [], [], []
    for i, w in enumerate(recorded_windows(specs[0], frame_ms=frame_ms, tasks=tuple(specs[1:]), data_dir=data_dir)):
        if limit is not None and i >= limit:
            break
        extra = dict(w.task_labels)
        ids.append(w.window_id)
        raws.append(w.raw)
        labels.append([w.label, *(extra[n] for n in names[1:])])
        times.append(w.stream_t_s)
    return Recording(
        dataset=dataset,
        models=names,
        window_ids=tuple(ids),
        raw=np.stack(raws).astype(np.float32),
        labels=np.asarray(labels, dtype=np.int64),
        stream_t_s=np.asarray(times, dtype=np.float64),
    )


def save_recording(recording: Recording, path: str | Path) -> Path:
    """Write `recording` as a compressed .npz (no pickle). Audio that is 16-bit PCM (every sample a
    multiple of 2**-15 in [-1, 1), as FSDD's are) is stored as int16, exactly."""
    path = Path(path)
    raw = np.asarray(recording.raw, dtype=np.float32)
    scaled = raw / np.float32(_PCM_SCALE)
    pcm = raw.size > 0 and bool(np.all(scaled == np.round(scaled))) and -32768 <= scaled.min() <= scaled.max() <= 32767
    arrays: dict[str, Any] = {  # Any: numpy's stubs read **kwds as its allow_pickle flag
        "format": np.asarray(RECORDING_FORMAT, dtype=np.int64),
        "dataset": np.asarray(recording.dataset),
        "models": np.asarray(recording.models),
        "window_ids": np.asarray(recording.window_ids),
        "labels": np.asarray(recording.labels, dtype=np.int64),
        "stream_t_s": np.asarray(recording.stream_t_s, dtype=np.float64),
    }
    if pcm:
        arrays["raw_pcm16"] = scaled.astype(np.int16)
    else:
        arrays["raw"] = raw
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        np.savez_compressed(f, **arrays)  # str arrays are unicode dtypes: no pickle
    return path


_RECORDING_KEYS = ("format", "dataset", "models", "window_ids", "labels", "stream_t_s")


def load_recording(path: str | Path) -> Recording:
    """A recording file (`save_recording`); DataError naming the file when it is missing or wrong."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"recording file {path} does not exist; write one with `splitsense data export-recording`")
    try:
        with np.load(path, allow_pickle=False) as z:
            files = set(z.files)
            if not set(_RECORDING_KEYS) <= files or not ({"raw", "raw_pcm16"} & files):
                raise DataError(f"{path}: not a splitsense recording (it holds {sorted(files)})")
            fmt = int(z["format"])
            if fmt != RECORDING_FORMAT:
                raise DataError(f"{path}: recording format {fmt}; this splitsense reads format {RECORDING_FORMAT}")
            if "raw_pcm16" in files:
                raw = z["raw_pcm16"].astype(np.float32) * np.float32(_PCM_SCALE)
            else:
                raw = np.asarray(z["raw"], dtype=np.float32)
            rec = Recording(
                dataset=str(z["dataset"]),
                models=tuple(str(m) for m in z["models"]),
                window_ids=tuple(str(w) for w in z["window_ids"]),
                raw=raw,
                labels=np.asarray(z["labels"], dtype=np.int64),
                stream_t_s=np.asarray(z["stream_t_s"], dtype=np.float64),
            )
    except DataError:
        raise
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{path}: not a readable recording (.npz): {e}") from None
    n = len(rec.window_ids)
    if not (
        n > 0
        and rec.raw.shape[:1] == (n,)
        and rec.labels.shape == (n, len(rec.models))
        and rec.stream_t_s.shape == (n,)
    ):
        raise DataError(
            f"{path}: inconsistent recording: {n} window ids, raw {rec.raw.shape}, labels {rec.labels.shape} "
            f"for {len(rec.models)} models, times {rec.stream_t_s.shape}"
        )
    if not np.isfinite(rec.raw).all() or bool(np.any(np.diff(rec.stream_t_s) < 0)):
        raise DataError(f"{path}: non-finite samples, or window times that go backwards")
    return rec


def source_for_model(
    model: str,
    *,
    speed: float = 1.0,
    limit: int | None = None,
    frame_ms: float = 80.0,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], Awaitable[None]] = _asyncio_sleep,
    recording: Recording | str | Path | None = None,
) -> ReplaySource:
    """The paced replay of `recording` (a `Recording` or its file) for `model`; without one, of the
    test recording `model` was evaluated on, from the data package's datasets (a task group "a+b":
    the first member's recording, with every member's labels)."""
    names = [m.strip() for m in model.split("+")]
    spec = get_spec(names[0])
    tasks = tuple(get_spec(n) for n in names[1:])
    windows: Iterator[RecordedWindow]
    if recording is not None:
        rec = recording if isinstance(recording, Recording) else load_recording(recording)
        if rec.dataset != spec.dataset:
            raise DataError(f"the recording holds {rec.dataset} windows; model {names[0]!r} reads {spec.dataset}")
        windows = rec.windows(model)
    else:
        windows = recorded_windows(spec, frame_ms=frame_ms, tasks=tasks)
    return ReplaySource(windows, speed=speed, limit=limit, clock=clock, sleep=sleep)
