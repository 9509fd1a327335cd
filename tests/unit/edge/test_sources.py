"""Sensor sources: real recordings, window counts and times, pacing on a fake clock."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edge.sources import (
    FrameAssembler,
    RecordedWindow,
    ReplaySource,
    audio_windows,
    load_recording,
    recorded_windows,
    recording_from_datasets,
    save_recording,
    source_for_model,
)
from pipelines import datasets, features
from pipelines.models import get_spec
from splitsense.errors import ConfigError, DataError


class FakeTime:
    """A clock that only moves when slept on."""

    def __init__(self, t: float = 1000.0) -> None:
        self.t = t
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.t

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.t += seconds


def recorded(n: int, period_s: float = 1.0) -> list[RecordedWindow]:
    return [RecordedWindow(f"w{i}", i % 3, np.zeros(4, np.float32), (i + 1) * period_s) for i in range(n)]


def test_frame_assembler_windows_and_hop() -> None:
    a = FrameAssembler(window=4, hop=2)
    assert a.push(np.arange(3)) == []
    out = a.push(np.arange(3, 7))  # 0..6: windows [0..3], [2..5]
    assert [w.tolist() for w in out] == [[0, 1, 2, 3], [2, 3, 4, 5]]
    with pytest.raises(ConfigError):
        FrameAssembler(window=4, hop=5)


def test_fsdd_test_recording_one_window_per_utterance() -> None:
    clips = datasets.load_fsdd()
    test = clips.subset(clips.test_mask)
    windows = list(recorded_windows(get_spec("fsdd_digit")))
    assert len(windows) == len(test) == 300
    assert [w.label for w in windows] == [int(d) for d in test.digits]
    speakers = [w.label for w in recorded_windows(get_spec("fsdd_speaker"))]
    assert speakers == [int(s) for s in test.speakers]
    for i in (0, 1, 137, 299):  # each window is its utterance, centred in a 1-s slot
        np.testing.assert_array_equal(windows[i].raw, features.fix_length(test.waveforms[i]))
        assert windows[i].raw.shape == (features.WINDOW_SAMPLES,)
    # 80-ms frames: a window is due at the end of the frame that holds its last sample
    assert [w.stream_t_s for w in windows[:4]] == pytest.approx([1.04, 2.0, 3.04, 4.0])
    assert windows[-1].stream_t_s == pytest.approx(300.0)
    assert len({w.window_id for w in windows}) == 300


def test_audio_frame_size_changes_only_when_windows_are_due() -> None:
    waves = [np.full(100, i, np.float32) for i in range(3)]
    labels = np.array([5, 6, 7])
    w10 = list(audio_windows(waves, labels, frame_ms=10.0))
    w80 = list(audio_windows(waves, labels, frame_ms=80.0))
    assert [w.stream_t_s for w in w10] == pytest.approx([1.0, 2.0, 3.0])
    assert [w.stream_t_s for w in w80] == pytest.approx([1.04, 2.0, 3.0])
    for a, b in zip(w10, w80, strict=True):
        np.testing.assert_array_equal(a.raw, b.raw)
    assert [w.label for w in w80] == [5, 6, 7]


def test_uci_har_test_windows_every_64_samples() -> None:
    test = datasets.load_uci_har("test")
    windows = list(recorded_windows(get_spec("uci_har")))
    assert len(windows) == len(test) == 950
    assert windows[0].stream_t_s == pytest.approx(2.56)  # 128 samples at 50 Hz
    assert windows[1].stream_t_s - windows[0].stream_t_s == pytest.approx(1.28)  # 64 new samples
    assert windows[-1].stream_t_s == pytest.approx((128 + 64 * 949) / 50)
    np.testing.assert_array_equal(windows[10].raw, test.x[10])
    assert windows[10].raw.shape == (9, 128) and windows[10].raw.flags.writeable
    assert [w.label for w in windows] == test.y.tolist()


async def test_real_time_pacing_on_a_fake_clock() -> None:
    ft = FakeTime()
    got = [w async for w in ReplaySource(recorded(5), speed=1.0, clock=ft, sleep=ft.sleep)]
    assert [w.index for w in got] == [0, 1, 2, 3, 4]
    assert [w.t_emit - 1000.0 for w in got] == pytest.approx([1.0, 2.0, 3.0, 4.0, 5.0])
    assert sum(ft.sleeps) == pytest.approx(5.0)


async def test_speed_scales_time() -> None:
    ft = FakeTime()
    got = [w async for w in ReplaySource(recorded(4), speed=4.0, clock=ft, sleep=ft.sleep)]
    assert [w.t_emit - 1000.0 for w in got] == pytest.approx([0.25, 0.5, 0.75, 1.0])


async def test_speed_zero_never_sleeps() -> None:
    ft = FakeTime()
    got = [w async for w in ReplaySource(recorded(50), speed=0, clock=ft, sleep=ft.sleep)]
    assert len(got) == 50 and ft.sleeps == []
    assert all(w.t_emit == 1000.0 for w in got)


async def test_a_slow_consumer_sees_its_backlog_in_t_emit() -> None:
    ft = FakeTime()
    source = ReplaySource(recorded(3), speed=1.0, clock=ft, sleep=ft.sleep)
    emits = []
    async for w in source:
        emits.append(w.t_emit)
        ft.t += 2.5  # the device takes 2.5 s per window: it falls behind
    # windows are stamped when their samples arrived, not when the device got round to them
    assert [t - 1000.0 for t in emits] == pytest.approx([1.0, 2.0, 3.0])


async def test_limit() -> None:
    ft = FakeTime()
    got = [w async for w in ReplaySource(recorded(10), speed=0, limit=3, clock=ft, sleep=ft.sleep)]
    assert [w.window_id for w in got] == ["w0", "w1", "w2"]


def test_bad_speed_is_refused() -> None:
    with pytest.raises(ConfigError):
        ReplaySource(recorded(1), speed=-1.0)


# ---------------------------------------------------------------------------------------------
# Recording files (what a device without the data package replays)


def test_a_recording_file_replays_exactly_the_datasets_windows(tmp_path: Path) -> None:
    rec = recording_from_datasets("fsdd", limit=12)
    assert rec.models == ("fsdd_speaker", "fsdd_digit") and len(rec) == 12
    path = save_recording(rec, tmp_path / "fsdd.npz")
    assert path.stat().st_size < 12 * 8000  # 16-bit PCM, compressed: under 1 byte a sample
    back = load_recording(path)
    spec, digit = get_spec("fsdd_speaker"), get_spec("fsdd_digit")
    want = list(recorded_windows(spec, tasks=(digit,)))[:12]
    got = list(back.windows("fsdd_speaker+fsdd_digit"))
    assert [(w.window_id, w.label, w.task_labels, w.stream_t_s) for w in got] == [
        (w.window_id, w.label, w.task_labels, w.stream_t_s) for w in want
    ]
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a.raw, b.raw)  # exact: PCM samples stored as int16
        assert a.raw.dtype == np.float32
    # one task of the recording alone: its labels, no task labels
    assert [w.label for w in back.windows("fsdd_digit")] == [w.task_labels[0][1] for w in want]
    assert all(w.task_labels == () for w in back.windows("fsdd_digit"))


async def test_source_for_model_replays_a_recording_file(tmp_path: Path) -> None:
    path = save_recording(recording_from_datasets("uci_har", limit=5), tmp_path / "har.npz")
    clock = FakeTime()
    src = source_for_model("uci_har", recording=path, speed=1.0, clock=clock, sleep=clock.sleep)
    got = [w async for w in src]
    want = list(recorded_windows(get_spec("uci_har")))[:5]
    assert [w.window_id for w in got] == [w.window_id for w in want]
    assert [w.label for w in got] == [w.label for w in want]
    np.testing.assert_array_equal(got[3].raw, want[3].raw)  # IMU windows are float32: stored as such
    assert clock.t - 1000.0 == pytest.approx(want[-1].stream_t_s)  # paced on the recording's times


def test_recording_files_that_do_not_fit_are_refused(tmp_path: Path) -> None:
    har = save_recording(recording_from_datasets("uci_har", limit=3), tmp_path / "har.npz")
    with pytest.raises(DataError, match="reads fsdd"):
        source_for_model("fsdd_digit", recording=har)
    only_digit = recording_from_datasets("fsdd", models=["fsdd_digit"], limit=2)
    with pytest.raises(DataError, match="no labels for fsdd_speaker"):
        list(only_digit.windows("fsdd_speaker"))
    with pytest.raises(DataError, match="does not exist"):
        load_recording(tmp_path / "nope.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="not a readable recording"):
        load_recording(tmp_path / "junk.npz")
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(DataError, match="not a splitsense recording"):
        load_recording(tmp_path / "other.npz")


def test_without_the_data_package_the_error_says_what_to_install(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="splitsense-assets"):
        list(recorded_windows(get_spec("uci_har"), data_dir=tmp_path / "none"))
