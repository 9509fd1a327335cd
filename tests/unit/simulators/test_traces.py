"""Throughput traces: both formats, malformed files, looping and the integral."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from simulators.traces import Trace, default_trace_dir, load_trace, load_trace_dir
from splitsense.errors import DataError


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_two_column_parses_and_shifts_to_zero(tmp_path: Path) -> None:
    path = _write(tmp_path, "fam/a.txt", "# comment\n10.0 2.0\n11.0\t4.0\n\n13.0 1.0\n")
    trace = load_trace(path)
    assert (trace.name, trace.family) == ("a", "fam")
    np.testing.assert_allclose(trace.times_s, [0.0, 1.0, 3.0])
    np.testing.assert_allclose(trace.mbps, [2.0, 4.0, 1.0])
    assert trace.duration_s == pytest.approx(3.0 + 1.5)  # last sample holds for the median step (1.5 s)
    assert trace.bandwidth_at(0.5) == 2.0
    assert trace.bandwidth_at(1.0) == 4.0
    assert trace.bandwidth_at(3.2) == 1.0
    # integral: 2*1 + 4*2 + 1*1.5 = 11.5 Mbit per loop
    assert trace.bytes_per_loop == pytest.approx(11.5e6 / 8)
    assert trace.mean_mbps == pytest.approx(11.5 / 4.5)


def test_mahimahi_is_exact(tmp_path: Path) -> None:
    # Opportunities at 0, 0, 3, 4 ms; period 10 ms (the last line); 10 mod 10 = 0.
    path = _write(tmp_path, "link.up", "0\n0\n3\n4\n10\n")
    trace = load_trace(path)
    assert trace.name == "link.up"
    assert trace.duration_s == pytest.approx(0.010)
    assert trace.bytes_per_loop == pytest.approx(5 * 1500)
    assert trace.bandwidth_at(0.0005) == pytest.approx(3 * 12.0)  # three packets in ms 0
    assert trace.bandwidth_at(0.0015) == 0.0
    assert trace.bandwidth_at(0.0035) == pytest.approx(12.0)
    # Bytes by the end of each millisecond match Mahimahi's delivery opportunities.
    assert trace.bytes_deliverable(0.0, 0.001) == pytest.approx(4500)
    assert trace.bytes_deliverable(0.0, 0.003) == pytest.approx(4500)
    assert trace.bytes_deliverable(0.0, 0.005) == pytest.approx(7500)
    assert trace.bytes_deliverable(0.0, 0.021) == pytest.approx(2 * 7500 + 4500)


def test_single_column_txt_is_detected_as_mahimahi(tmp_path: Path) -> None:
    trace = load_trace(_write(tmp_path, "x.txt", "1\n2\n2\n5\n"))
    assert trace.bytes_per_loop == pytest.approx(4 * 1500)
    assert trace.duration_s == pytest.approx(0.005)


@pytest.mark.parametrize(
    ("name", "text", "line", "what"),
    [
        ("bad.txt", "0 1\n1 abc\n", 2, "not a number"),
        ("neg.txt", "0 1\n1 -2\n", 2, "negative"),
        ("negt.txt", "-1 1\n", 1, "negative"),
        ("back.txt", "0 1\n2 1\n1 1\n", 3, "backwards"),
        ("cols.txt", "0 1\n1 2 3\n", 2, "2 columns"),
        ("nan.txt", "0 1\n1 nan\n", 2, "not finite"),
        ("m.mahi", "1\n2\nx\n", 3, "not an integer"),
        ("m2.up", "1\n5\n3\n", 3, "backwards"),
        ("m3.down", "1\n-5\n", 2, "negative"),
        ("m4.up", "1 2\n", 1, "one integer"),
    ],
)
def test_malformed_files_name_file_and_line(tmp_path: Path, name: str, text: str, line: int, what: str) -> None:
    path = _write(tmp_path, name, text)
    with pytest.raises(DataError, match=what) as info:
        load_trace(path)
    assert f"{path}:{line}:" in str(info.value)


@pytest.mark.parametrize(
    ("name", "text", "what"),
    [
        ("empty.txt", "", "no data lines"),
        ("blank.txt", "# only a comment\n\n", "no data lines"),
        ("zero.txt", "0 0\n1 0\n", "no bytes"),
        ("zero.mahi", "0\n0\n", "last timestamp > 0"),
    ],
)
def test_empty_or_useless_files_are_refused(tmp_path: Path, name: str, text: str, what: str) -> None:
    path = _write(tmp_path, name, text)
    with pytest.raises(DataError, match=what) as info:
        load_trace(path)
    assert str(path) in str(info.value)


def test_missing_file_and_empty_dir(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        load_trace(tmp_path / "nope.txt")
    with pytest.raises(DataError, match="no trace files"):
        load_trace_dir(tmp_path)
    with pytest.raises(DataError, match="not found"):
        load_trace_dir(tmp_path / "missing")


def test_load_dir_is_recursive_and_sorted(tmp_path: Path) -> None:
    _write(tmp_path, "b/z.txt", "0 1\n1 2\n")
    _write(tmp_path, "a/y.mahi", "1\n2\n")
    _write(tmp_path, "a/notes.md", "not a trace")
    traces = load_trace_dir(tmp_path)
    assert [(t.family, t.name) for t in traces] == [("a", "y"), ("b", "z")]


def test_shipped_traces_load() -> None:
    traces = load_trace_dir(default_trace_dir())
    families = {t.family for t in traces}
    assert {"norway_hsdpa_3g", "fcc_broadband", "oboe"} <= families
    assert len(traces) == 438  # <paths.data_dir>/traces/manifest.csv
    norway = next(t for t in traces if t.name == "norway_bus_1")
    assert 2.5 < norway.mean_mbps < 4.0  # manifest: sample mean 3.34 Mbit/s
    assert norway.duration_s == pytest.approx(154.76, abs=1.0)


def test_loops_modulo_duration() -> None:
    trace = Trace("t", "f", np.array([0.0, 1.0]), np.array([1.0, 3.0]), duration_s=2.0)
    for t in (0.5, 1.5):
        assert trace.bandwidth_at(t + 2.0) == trace.bandwidth_at(t)
        assert trace.bandwidth_at(t + 20.0) == trace.bandwidth_at(t)
        assert trace.bandwidth_at(t - 2.0) == trace.bandwidth_at(t)
    assert trace.bytes_deliverable(0.0, 2.0) == pytest.approx(4e6 / 8)
    assert trace.bytes_deliverable(0.5, 4.5) == pytest.approx(8e6 / 8)
    assert trace.bytes_deliverable(1.5, 2.5) == pytest.approx((1.5 + 0.5) * 1e6 / 8)


def test_trace_checks_itself() -> None:
    with pytest.raises(DataError):
        Trace("t", "f", np.array([0.0, 0.0]), np.array([1.0, 1.0]), duration_s=1.0)
    with pytest.raises(DataError):
        Trace("t", "f", np.array([0.0]), np.array([1.0]), duration_s=0.0)
    trace = Trace.constant(8.0)
    assert trace.bytes_deliverable(0.0, 10.0) == pytest.approx(1e7)
    with pytest.raises(ValueError):
        trace.times_s[0] = 1.0  # read-only


_RANDOM_TRACE = Trace(
    "r",
    "f",
    np.array([0.0, 0.3, 0.7, 1.1, 2.0]),
    np.array([2.0, 0.0, 5.0, 0.5, 0.0]),
    duration_s=2.5,
)


@given(
    t0=st.floats(min_value=-10.0, max_value=50.0),
    a=st.floats(min_value=0.0, max_value=20.0),
    b=st.floats(min_value=0.0, max_value=20.0),
)
def test_integral_is_additive(t0: float, a: float, b: float) -> None:
    tr = _RANDOM_TRACE
    whole = tr.bytes_deliverable(t0, t0 + a + b)
    parts = tr.bytes_deliverable(t0, t0 + a) + tr.bytes_deliverable(t0 + a, t0 + a + b)
    assert whole == pytest.approx(parts, rel=1e-9, abs=1e-6)


@given(
    t0=st.floats(min_value=-10.0, max_value=50.0),
    nbytes=st.floats(min_value=0.0, max_value=5e6),
)
def test_time_to_deliver_inverts_the_integral(t0: float, nbytes: float) -> None:
    tr = _RANDOM_TRACE
    t1 = tr.time_to_deliver(t0, nbytes)
    assert t1 >= t0
    assert tr.bytes_deliverable(t0, t1) == pytest.approx(nbytes, rel=1e-7, abs=1e-3)
    if nbytes > 1.0:
        # earliest: a moment before, not all bytes were through yet
        assert tr.bytes_deliverable(t0, max(t0, t1 - 1e-4)) < nbytes
