"""Real throughput traces, read from the two formats people publish them in.

(a) Two whitespace-separated columns ``time_s throughput_mbps`` per line (the Norway HSDPA 3G, FCC
    broadband and Oboe traces of the data package, ``<paths.data_dir>/traces``: see its ``manifest.csv``).
    Sample ``i`` holds from ``time_s[i]`` until the next sample; the last one holds for the
    median sampling interval. Times are shifted so that a trace starts at 0.
(b) Mahimahi packet-delivery traces (``.mahi``, ``.up``, ``.down``, or any file whose lines are
    single integers): one integer millisecond timestamp per line, each an opportunity to deliver
    one 1500-byte packet; several lines may share a millisecond, and the trace repeats after its
    last timestamp. They are kept exact: each millisecond that has ``k`` opportunities becomes a
    1 ms step of ``k * 1500`` bytes (``k * 12`` Mbit/s), zero elsewhere, so the bytes deliverable
    by the end of every millisecond are exactly Mahimahi's.

A :class:`Trace` is piecewise constant and loops: time ``t`` reads the trace at ``t mod duration``.
Blank lines and lines starting with ``#`` are skipped. A malformed file raises
:class:`~splitsense.errors.DataError` naming the file and the line.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from splitsense.config import PathsConfig, missing_asset
from splitsense.errors import ConfigError, DataError

__all__ = [
    "MAHIMAHI_PACKET_BYTES",
    "MAHIMAHI_SUFFIXES",
    "Trace",
    "default_trace_dir",
    "load_trace",
    "load_trace_dir",
]

MAHIMAHI_PACKET_BYTES = 1500  # Mahimahi's delivery opportunity is one MTU-sized packet
MAHIMAHI_SUFFIXES = frozenset({".mahi", ".up", ".down"})
TRACE_SUFFIXES = frozenset({".txt"}) | MAHIMAHI_SUFFIXES
BYTES_PER_MBIT = 1e6 / 8


def default_trace_dir() -> Path:
    """``traces/`` of the data package (splitsense-assets: installed, or this checkout's assets/)."""
    return PathsConfig().data_dir / "traces"


@dataclass(frozen=True, eq=False)
class Trace:
    """A looping, piecewise-constant bandwidth trace.

    ``times_s`` are the step starts (strictly increasing, ``times_s[0] == 0``); ``mbps[i]`` holds on
    ``[times_s[i], times_s[i+1])`` and the last value until ``duration_s``. Built by the loaders
    or :meth:`constant`; checked when built.
    """

    name: str
    family: str
    times_s: np.ndarray
    mbps: np.ndarray
    duration_s: float
    _grid_s: np.ndarray = field(init=False, repr=False)  # step starts, then duration_s
    _cum_bytes: np.ndarray = field(init=False, repr=False)  # bytes deliverable by each point of _grid_s

    def __post_init__(self) -> None:
        times = np.asarray(self.times_s, dtype=np.float64).copy()
        mbps = np.asarray(self.mbps, dtype=np.float64).copy()
        if times.ndim != 1 or times.shape != mbps.shape or times.size == 0:
            raise DataError(f"trace {self.name!r}: times_s and mbps must be 1-D of the same non-zero length")
        if not (np.all(np.isfinite(times)) and np.all(np.isfinite(mbps))):
            raise DataError(f"trace {self.name!r}: times and throughputs must be finite")
        if times[0] != 0.0 or np.any(np.diff(times) <= 0):
            raise DataError(f"trace {self.name!r}: times_s must start at 0 and strictly increase")
        if np.any(mbps < 0):
            raise DataError(f"trace {self.name!r}: throughput must be >= 0 Mbit/s")
        if not (math.isfinite(self.duration_s) and self.duration_s > times[-1]):
            raise DataError(f"trace {self.name!r}: duration_s must exceed the last step start")
        widths = np.diff(np.append(times, self.duration_s))
        cum = np.concatenate(([0.0], np.cumsum(mbps * widths * BYTES_PER_MBIT)))
        if cum[-1] <= 0:
            raise DataError(f"trace {self.name!r}: delivers no bytes (all throughputs are 0)")
        grid = np.append(times, float(self.duration_s))
        for array in (times, mbps, grid, cum):
            array.setflags(write=False)
        object.__setattr__(self, "times_s", times)
        object.__setattr__(self, "mbps", mbps)
        object.__setattr__(self, "duration_s", float(self.duration_s))
        object.__setattr__(self, "_grid_s", grid)
        object.__setattr__(self, "_cum_bytes", cum)

    def capped(self, max_mbps: float) -> Trace:
        """This trace behind a hop that carries at most `max_mbps` (a BLE link to the gateway whose
        uplink the trace is): min(trace, cap) at every point."""
        if not (math.isfinite(max_mbps) and max_mbps > 0):
            raise ConfigError(f"a bandwidth cap must be > 0 Mbit/s, got {max_mbps!r}")
        return Trace(
            name=self.name,
            family=self.family,
            times_s=self.times_s.copy(),
            mbps=np.minimum(self.mbps, float(max_mbps)),
            duration_s=self.duration_s,
        )

    @classmethod
    def constant(cls, mbps: float, duration_s: float = 1.0, name: str = "", family: str = "constant") -> Trace:
        """A fixed bandwidth, e.g. for an unshaped-but-limited downlink."""
        return cls(
            name=name or f"constant_{mbps:g}mbps",
            family=family,
            times_s=np.zeros(1),
            mbps=np.array([float(mbps)]),
            duration_s=duration_s,
        )

    @property
    def bytes_per_loop(self) -> float:
        """Bytes deliverable over one pass of the trace."""
        return float(self._cum_bytes[-1])

    @property
    def mean_mbps(self) -> float:
        """Time-weighted mean throughput over one loop (Mbit/s)."""
        return self.bytes_per_loop / BYTES_PER_MBIT / self.duration_s

    def bandwidth_at(self, t_s: float) -> float:
        """Throughput (Mbit/s) at time ``t_s``; the trace loops, so any real ``t_s`` is valid."""
        phase = t_s % self.duration_s
        i = int(np.searchsorted(self.times_s, phase, side="right")) - 1
        return float(self.mbps[max(i, 0)])

    def cumulative_bytes(self, t_s: float) -> float:
        """Bytes deliverable from time 0 to ``t_s`` (negative for ``t_s < 0``; loops)."""
        loops = math.floor(t_s / self.duration_s)
        phase = t_s - loops * self.duration_s
        return loops * self.bytes_per_loop + float(np.interp(phase, self._grid_s, self._cum_bytes))

    def bytes_deliverable(self, t0_s: float, t1_s: float) -> float:
        """Bytes the trace can carry between ``t0_s`` and ``t1_s`` (the integral of its bandwidth)."""
        if t1_s < t0_s:
            raise ValueError(f"bytes_deliverable needs t0_s <= t1_s, got {t0_s} > {t1_s}")
        return max(self.cumulative_bytes(t1_s) - self.cumulative_bytes(t0_s), 0.0)

    def time_to_deliver(self, t0_s: float, nbytes: float) -> float:
        """The earliest time ``t >= t0_s`` by which ``nbytes`` can have been carried, starting at ``t0_s``."""
        if not (math.isfinite(nbytes) and nbytes >= 0):
            raise ValueError(f"nbytes must be finite and >= 0, got {nbytes!r}")
        if nbytes == 0:
            return t0_s
        target = self.cumulative_bytes(t0_s) + nbytes
        per_loop = self.bytes_per_loop
        loops = math.floor(target / per_loop)
        rest = target - loops * per_loop
        if rest <= 0 and loops > 0:  # a loop boundary: the earliest time may be inside the previous loop
            loops -= 1
            rest = per_loop
        cum = self._cum_bytes
        grid = self._grid_s
        j = int(np.searchsorted(cum, rest, side="left"))
        j = min(max(j, 1), cum.size - 1)
        rate = cum[j] - cum[j - 1]
        frac = 0.0 if rate <= 0 else (rest - cum[j - 1]) / rate
        t = loops * self.duration_s + grid[j - 1] + frac * (grid[j] - grid[j - 1])
        return max(float(t), t0_s)


# --- Loading -------------------------------------------------------------------------------------


def _data_lines(path: Path, text: str) -> Iterator[tuple[int, list[str]]]:
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if line and not line.startswith("#"):
            yield number, line.split()


def _number(path: Path, line: int, token: str, what: str) -> float:
    try:
        value = float(token)
    except ValueError:
        raise DataError(f"{path}:{line}: {what} {token!r} is not a number") from None
    if not math.isfinite(value):
        raise DataError(f"{path}:{line}: {what} {token!r} is not finite")
    if value < 0:
        raise DataError(f"{path}:{line}: {what} {token!r} is negative")
    return value


def _parse_two_column(path: Path, lines: list[tuple[int, list[str]]]) -> tuple[np.ndarray, np.ndarray, float]:
    times: list[float] = []
    mbps: list[float] = []
    for number, tokens in lines:
        if len(tokens) != 2:
            raise DataError(f"{path}:{number}: expected 2 columns 'time_s mbps', got {len(tokens)}")
        t = _number(path, number, tokens[0], "time")
        if times and t < times[-1]:
            raise DataError(f"{path}:{number}: time {t} goes backwards (previous {times[-1]})")
        if times and t == times[-1]:  # a repeated timestamp: the later sample wins
            mbps[-1] = _number(path, number, tokens[1], "throughput")
            continue
        times.append(t)
        mbps.append(_number(path, number, tokens[1], "throughput"))
    t_arr = np.asarray(times) - times[0]
    steps = np.diff(t_arr)
    last = float(np.median(steps)) if steps.size else 1.0
    return t_arr, np.asarray(mbps), float(t_arr[-1] + last)


def _parse_mahimahi(path: Path, lines: list[tuple[int, list[str]]]) -> tuple[np.ndarray, np.ndarray, float]:
    stamps: list[int] = []
    for number, tokens in lines:
        if len(tokens) != 1:
            raise DataError(f"{path}:{number}: expected one integer millisecond timestamp, got {len(tokens)}")
        try:
            ms = int(tokens[0])
        except ValueError:
            raise DataError(f"{path}:{number}: timestamp {tokens[0]!r} is not an integer") from None
        if ms < 0:
            raise DataError(f"{path}:{number}: timestamp {ms} is negative")
        if stamps and ms < stamps[-1]:
            raise DataError(f"{path}:{number}: timestamp {ms} goes backwards (previous {stamps[-1]})")
        stamps.append(ms)
    period_ms = stamps[-1]
    if period_ms <= 0:
        raise DataError(f"{path}: a Mahimahi trace needs a last timestamp > 0 ms (it is the loop period)")
    # An opportunity at the period itself is the one at 0 of the next loop.
    ms_arr = np.asarray(stamps, dtype=np.int64) % period_ms
    slots, counts = np.unique(ms_arr, return_counts=True)
    starts = slots.astype(np.float64)
    ends = starts + 1.0
    rate = counts * MAHIMAHI_PACKET_BYTES / BYTES_PER_MBIT / 1e-3  # Mbit/s over one millisecond
    # Steps: `rate` on [slot, slot + 1 ms), 0 from there to the next slot (omitted when adjacent).
    gap_after = np.append(starts[1:] > ends[:-1], ends[-1] < period_ms)
    step_t = [0.0] if starts[0] > 0 else []
    step_v = [0.0] if starts[0] > 0 else []
    for s, r, gap, e in zip(starts, rate, gap_after, ends, strict=True):
        step_t.append(float(s))
        step_v.append(float(r))
        if gap:
            step_t.append(float(e))
            step_v.append(0.0)
    return np.asarray(step_t) / 1e3, np.asarray(step_v), period_ms / 1e3


def load_trace(path: str | Path, family: str | None = None) -> Trace:
    """Read one trace file; the format is found from the suffix and the content.

    ``family`` defaults to the name of the file's folder (e.g. ``norway_hsdpa_3g``).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: trace file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read trace file: {exc}") from None
    lines = list(_data_lines(path, text))
    if not lines:
        raise DataError(f"{path}: trace file has no data lines")
    first_line, first_tokens = lines[0]
    mahimahi = path.suffix.lower() in MAHIMAHI_SUFFIXES or len(first_tokens) == 1
    if mahimahi:
        times, mbps, duration = _parse_mahimahi(path, lines)
    else:
        times, mbps, duration = _parse_two_column(path, lines)
    name = path.stem if path.suffix.lower() not in {".up", ".down"} else path.name
    try:
        return Trace(
            name=name,
            family=family if family is not None else path.parent.name,
            times_s=times,
            mbps=mbps,
            duration_s=duration,
        )
    except DataError as exc:
        raise DataError(f"{path}: {exc}") from None


def load_trace_dir(directory: str | Path | None = None) -> list[Trace]:
    """Every trace under ``directory``, recursively, sorted by path (default: :func:`default_trace_dir`)."""
    root = Path(directory) if directory is not None else default_trace_dir()
    if not root.is_dir():
        if directory is None:
            raise DataError(missing_asset("the trace directory", root))
        raise DataError(f"{root}: trace directory not found")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in TRACE_SUFFIXES)
    files = [p for p in files if p.name != "manifest.csv"]
    if not files:
        raise DataError(f"{root}: no trace files (*.txt, *.mahi, *.up, *.down) in this directory")
    return [load_trace(p, family=p.parent.name) for p in files]
