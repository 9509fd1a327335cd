"""Sensor sources: a real test recording from the project's data, replayed at its real rate.

Audio (FSDD, 8 kHz). The microphone delivers frames of `frame_ms` (80 ms = 640 samples). A keyword
or speaker front-end behind a voice-activity detector hands the model one window per utterance;
here each test utterance sits centred in its own 1-s slot of an otherwise silent stream (exactly
what `pipelines.features.fix_length` makes of it: 99.3% of FSDD clips are shorter than 1 s, the
rest are centre-cropped), so the stream is continuous 8 kHz audio that carries one utterance per
second. Frames are assembled into 1-s windows; a window is emitted when the frame holding its
last sample has arrived (window 0 at 1.04 s with 80-ms frames, window 1 at 2.00 s, ...).

IMU (UCI HAR test split, 50 Hz, 9 channels). The dataset's windows are 128 samples (2.56 s) that
overlap by 50%, so once the first window is full a new one completes every 64 samples (1.28 s):
window i is emitted at (128 + 64 i) / 50 s.

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
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass

import numpy as np

from pipelines import datasets, features
from pipelines.models import ModelSpec, get_spec
from splitsense.errors import ConfigError, DataError

__all__ = [
    "FrameAssembler",
    "RecordedWindow",
    "ReplaySource",
    "SensorWindow",
    "audio_windows",
    "imu_windows",
    "recorded_windows",
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
    sample_rate_hz: int = features.SAMPLE_RATE_HZ,
    prefix: str = "fsdd-test",
) -> Iterator[RecordedWindow]:
    """One 1-s window per utterance, assembled from `frame_ms` frames of the slotted stream."""
    frame = round(sample_rate_hz * frame_ms / 1000.0)
    if frame < 1:
        raise ConfigError(f"audio frame of {frame_ms} ms is shorter than one sample at {sample_rate_hz} Hz")
    window = features.WINDOW_SAMPLES
    assembler = FrameAssembler(window)
    leftover = np.zeros(0, dtype=np.float32)  # samples of the stream not yet framed
    samples_sent = 0
    emitted = 0
    for i, wave in enumerate(waveforms):
        stream = np.concatenate([leftover, features.fix_length(np.asarray(wave, dtype=np.float32), window)])
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
    spec: ModelSpec, *, frame_ms: float = 80.0, tasks: tuple[ModelSpec, ...] = ()
) -> Iterator[RecordedWindow]:
    """The test recording of a model's dataset, with the labels of its task (and of every extra task
    in `tasks`, models of the same dataset, in each window's `task_labels`)."""
    if any(t.dataset != spec.dataset for t in tasks):
        raise DataError(f"extra tasks {[t.name for t in tasks]} do not read {spec.name!r}'s {spec.dataset} stream")
    if spec.dataset == "fsdd":
        clips = datasets.load_fsdd()
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
        s = datasets.load_uci_har("test")
        return imu_windows(s.x, s.y, sample_rate_hz=s.sample_rate_hz)
    raise DataError(f"no recording to replay for dataset {spec.dataset!r} of model {spec.name!r}")


def source_for_model(
    model: str,
    *,
    speed: float = 1.0,
    limit: int | None = None,
    frame_ms: float = 80.0,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], Awaitable[None]] = _asyncio_sleep,
) -> ReplaySource:
    """The paced replay of the test recording `model` was evaluated on (a task group "a+b": the first
    member's recording, with every member's labels)."""
    names = [m.strip() for m in model.split("+")]
    spec = get_spec(names[0])
    tasks = tuple(get_spec(n) for n in names[1:])
    windows = recorded_windows(spec, frame_ms=frame_ms, tasks=tasks)
    return ReplaySource(windows, speed=speed, limit=limit, clock=clock, sleep=sleep)
