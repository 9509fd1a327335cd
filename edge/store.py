"""Store-and-forward: the encoded windows a device keeps while the cloud cannot answer them.

A device that cannot hold its whole model (`EdgeDevice(local_fallback=False)`, e.g. the
`sensor_node` class, which holds only the front up to the bottleneck) has no way to finish a window
by itself. When the cloud cannot answer one (a failed offload of any kind, the circuit breaker
open), the device keeps the window's encoded activation here and forwards it, oldest first, when
the link is back; its result then arrives late, with mode DEFERRED and the delay reported. The
runtime forwards `edge.store_drain_burst` windows at a time while its breaker is closed, each
taken out (`remove`) once answered: a backlog drains in a round trip per burst, not per window.

Pure: no I/O, no asyncio, no clock of its own (every call that needs time takes `now`, seconds on
the caller's monotonic clock). Items are opaque to the store; each comes with its size.

Bounds, both explicit and counted, never silent:

- **Bytes** (`capacity_bytes`): the device's budget for stored windows, counted as the encoded
  payload bytes (`EncodedTensor.nbytes`; the per-window bookkeeping is a few fixed words).
  A window that would take the store past it is **refused**: `put` returns a falsy `Admission`
  with the reason, the window is reported lost with that reason by the caller, and
  `refused_total` counts it. The windows already stored are kept. Why refuse the newest rather
  than drop the oldest: a full store loses one window per arriving window either way, so the
  count lost is the same; refusing decides each window's fate once, at the moment it arrives (the
  runtime reports it there and then), keeps the promise made to every window already accepted
  (it will be forwarded, or reported pending at the end, never evicted later), and leaves the
  FIFO order and the delay of the stored windows untouched.
- **Age** (`max_age_s`): a window stored longer than this is of no use to anyone when it finally
  arrives; `expire(now)` removes such windows (oldest first, they are at the head) and returns
  them, so that the caller reports each as lost with the reason "expired"; `expired_total` counts
  them.

Default size (`DEFAULT_CAPACITY_BYTES`, 32 KiB): the longest outage the project's scenarios script
is 6 s (simulators/scenario.py "outage": 10-16 s), after which the breaker keeps a device off the
link for at most one more back-off (the default BreakerConfig: levels of 1, 1.6, 2.56, 4.1 s by
then, x 1.2 jitter: about 5 s), so ~11 s of windows to hold. The sensor node sends one-second audio
windows at the bottleneck as an ans-coded code of ~100-370 bytes: 11 windows are ~4 KiB; 32 KiB
holds ~88 windows at 370 bytes, 8x the scripted worst case (~1.5 minutes offline), in an eighth of
the board's 256 KB of RAM (taken from the half the front's 128 KiB arena leaves to Mbed OS, the BLE
stack and the audio buffers: an estimate, as pipelines/devices.py's memory split is). `DEFAULT_MAX_AGE_S`
(600 s) never binds before the bytes do at that rate; it stops a device whose link is gone for
good from forwarding ten-minute-old windows.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

from splitsense.errors import ConfigError

__all__ = ["DEFAULT_CAPACITY_BYTES", "DEFAULT_MAX_AGE_S", "Admission", "ForwardStore", "Stored"]

DEFAULT_CAPACITY_BYTES = 32 * 1024
DEFAULT_MAX_AGE_S = 600.0

T = TypeVar("T")


@dataclass(frozen=True)
class Admission:
    """The answer of `put`: truthy when the window was stored; `reason` says why not otherwise."""

    accepted: bool
    reason: str = ""

    def __bool__(self) -> bool:
        return self.accepted


@dataclass(frozen=True)
class Stored(Generic[T]):
    """One stored window: the caller's item, its size and when it was stored."""

    item: T
    nbytes: int
    stored_at: float

    def age_s(self, now: float) -> float:
        return max(0.0, now - self.stored_at)


class ForwardStore(Generic[T]):
    """A FIFO of items bounded by their total bytes and by their age (see the module docstring)."""

    def __init__(self, capacity_bytes: int = DEFAULT_CAPACITY_BYTES, max_age_s: float = DEFAULT_MAX_AGE_S) -> None:
        if isinstance(capacity_bytes, bool) or not isinstance(capacity_bytes, int) or capacity_bytes < 0:
            raise ConfigError(f"store capacity must be an int >= 0 bytes, got {capacity_bytes!r}")
        if not max_age_s > 0:  # also refuses NaN; inf: no age bound
            raise ConfigError(f"store max age must be > 0 s, got {max_age_s!r}")
        self.capacity_bytes = capacity_bytes
        self.max_age_s = float(max_age_s)
        self._items: deque[Stored[T]] = deque()
        self._bytes = 0
        self.stored_total = 0  # windows ever accepted
        self.popped_total = 0  # windows taken out by pop (forwarded, or given up by the caller)
        self.refused_total = 0  # windows refused by put (the store was full, or the window too big)
        self.refused_bytes = 0
        self.expired_total = 0  # windows removed by expire (older than max_age_s)
        self.peak_bytes = 0

    # --- state ------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._items)

    def __bool__(self) -> bool:
        return bool(self._items)

    def __iter__(self) -> Iterator[Stored[T]]:
        """The stored windows, oldest first (a view: do not change the store while iterating)."""
        return iter(self._items)

    @property
    def nbytes(self) -> int:
        return self._bytes

    @property
    def free_bytes(self) -> int:
        return self.capacity_bytes - self._bytes

    def oldest_age_s(self, now: float) -> float:
        """Age of the oldest stored window; 0 when empty."""
        return self._items[0].age_s(now) if self._items else 0.0

    def head(self) -> Stored[T] | None:
        """The oldest stored window (the next to forward), left in the store."""
        return self._items[0] if self._items else None

    # --- changes ----------------------------------------------------------------------------

    def put(self, item: T, nbytes: int, now: float) -> Admission:
        """Store `item` (`nbytes` of payload) at the tail, or refuse it when it does not fit."""
        if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0:
            raise ValueError(f"nbytes must be an int >= 0, got {nbytes!r}")
        if not math.isfinite(now):
            raise ValueError(f"now must be finite, got {now!r}")
        why = ""
        if nbytes > self.capacity_bytes:
            why = f"store full: a window of {nbytes} B is larger than the whole store ({self.capacity_bytes} B)"
        elif nbytes > self.free_bytes:
            why = (
                f"store full: {len(self._items)} windows hold {self._bytes} of {self.capacity_bytes} B "
                f"(oldest {self.oldest_age_s(now):.1f} s); no room for {nbytes} B more"
            )
        if why:
            self.refused_total += 1
            self.refused_bytes += nbytes
            return Admission(False, why)
        self._items.append(Stored(item, nbytes, now))
        self._bytes += nbytes
        self.stored_total += 1
        self.peak_bytes = max(self.peak_bytes, self._bytes)
        return Admission(True)

    def pop(self) -> Stored[T]:
        """Take out the oldest window (IndexError when empty)."""
        s = self._items.popleft()
        self._bytes -= s.nbytes
        self.popped_total += 1
        return s

    def remove(self, stored: Stored[T]) -> bool:
        """Take out this window, wherever it is (forwarded as one of a burst); False if it is not
        stored. Searches from the oldest: a burst is taken from there."""
        for i, s in enumerate(self._items):
            if s is stored:
                del self._items[i]
                self._bytes -= s.nbytes
                self.popped_total += 1
                return True
        return False

    def expire(self, now: float) -> list[Stored[T]]:
        """Remove and return the windows stored longer than `max_age_s` at `now`, oldest first."""
        out: list[Stored[T]] = []
        while self._items and self._items[0].age_s(now) > self.max_age_s:
            s = self._items.popleft()
            self._bytes -= s.nbytes
            out.append(s)
        self.expired_total += len(out)
        return out

    def take_all(self) -> list[Stored[T]]:
        """Remove and return every stored window, oldest first (what is pending when a run ends)."""
        out = list(self._items)
        self._items.clear()
        self._bytes = 0
        return out
