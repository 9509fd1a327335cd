"""The broker's asyncio micro-batcher: windows of many devices, one backend call per batch.

One lane per (model, cut). A lane dispatches a batch when a backend slot is free (at most
`max_inflight_batches` batches of a lane run at once) and

    - it holds `max_batch_size` windows, or
    - no batch of the lane is running (an idle lane never waits: a lone device pays nothing), or
    - its oldest window has waited `max_batch_wait_ms`.

While the lane's slots are busy, windows pile up and leave together in the next batch: that is
where throughput comes from when one backend call costs ~8 ms (a Ray Serve hop).

With `run_local` (the broker's in-process tail, broker.local_tail), a lane with nothing in flight
sends its next batch of at most `local_max_batch` windows there instead: a lone window skips the
Ray hop (~3-5 ms here against ~0.3 ms for the tail itself). Without `local_when_free` a lane under
load, whose batches are always in flight, goes on batching into Ray; with it (broker.local_tail_when
"free") a lane also sends its next batch there whenever no batch of any lane runs on it, so the
local tail works as one more replica, beside the broker, of one batch at a time, and its batch
takes none of the lane's `max_inflight_batches` backend slots. Local batches do not feed the
service-time estimate admission control reads: that stays the Ray hop's.

One backend call per batch, on the stacked activations; row i of its result goes back to the
i-th window. A failed, timed-out or malformed batch fails every waiter of it with
TailUnavailableError (the broker answers UNAVAILABLE); a waiter that gives up (its deadline, its
call cancelled) simply is not answered and never breaks the batch it is in; a window whose
deadline passed before its batch left is failed with OffloadDeadlineError and not sent. A batch
is given `batch_timeout_ms`, or less when every one of its windows has an earlier deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import cast

import numpy as np

from cloud.admission import Ewma, LaneLoad
from cloud.backend import TailUnavailableError
from splitsense.errors import ConfigError, OffloadDeadlineError, WireError

__all__ = ["BatchFn", "BatchReport", "BatchResult", "MicroBatcher"]

log = logging.getLogger(__name__)

BatchFn = Callable[[str, int, np.ndarray], Awaitable[np.ndarray]]
Clock = Callable[[], float]


@dataclass(frozen=True)
class BatchResult:
    """What one window gets back from its batch."""

    logits: np.ndarray  # (classes,) as the backend returned them
    queue_ms: float  # from submit to its batch leaving
    compute_ms: float  # the batch's backend call
    batch_size: int
    # Worked out once per batch (one numpy call each, not one per window): the row as float32
    # values in a list, its argmax, and whether all of it is finite as float32.
    values: list[float] = field(default_factory=list)
    prediction: int = 0
    finite: bool = True


@dataclass(frozen=True)
class BatchReport:
    """One finished backend call, for metrics."""

    model: str
    cut: int
    size: int
    compute_s: float
    ok: bool
    local: bool = False  # run by `run_local` (the broker's own tail), not the backend


@dataclass(eq=False)
class _Item:
    x: np.ndarray
    future: asyncio.Future[BatchResult]
    enqueued: float
    deadline: float | None


@dataclass(eq=False)
class _Lane:
    model: str
    cut: int
    ewma: Ewma
    queue: deque[_Item] = field(default_factory=deque)
    inflight: int = 0
    local_inflight: int = 0  # of `inflight`, the batches on the broker's own tail (run_local)
    wakeup: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    row_shape: tuple[int, ...] | None = None
    last_done: float | None = None  # clock time the last batch finished (estimate refreshed)
    inflated: bool = False  # the estimate's last samples were timeouts (an outage), not service times


class MicroBatcher:
    """Batches `submit`ted windows per (model, cut) into calls of `run_batch(model, cut, stacked)`."""

    def __init__(
        self,
        run_batch: BatchFn,
        *,
        max_batch_size: int,
        max_batch_wait_ms: float,
        max_inflight_batches: int = 1,
        batch_timeout_ms: float | None = None,
        ewma_alpha: float = 0.2,
        initial_service_ms: float = 10.0,
        on_batch: Callable[[BatchReport], None] | None = None,
        clock: Clock = time.monotonic,
        run_local: BatchFn | None = None,
        local_max_batch: int = 1,
        refresh_after_ms: float = 1_000.0,
        local_when_free: bool = False,
    ) -> None:
        if max_batch_size < 1 or max_inflight_batches < 1:
            raise ConfigError("max_batch_size and max_inflight_batches must be >= 1")
        if local_max_batch < 1:
            raise ConfigError(f"local_max_batch must be >= 1, got {local_max_batch!r}")
        if max_batch_wait_ms < 0:
            raise ConfigError(f"max_batch_wait_ms must be >= 0, got {max_batch_wait_ms!r}")
        if batch_timeout_ms is not None and not batch_timeout_ms > 0:
            raise ConfigError(f"batch_timeout_ms must be > 0 or None, got {batch_timeout_ms!r}")
        self._run_batch = run_batch
        self._run_local = run_local
        self._local_when_free = local_when_free and run_local is not None
        self._local_running = 0  # batches on run_local now, over every lane
        self._refresh_after_s = refresh_after_ms / 1000.0
        self._local_max = min(local_max_batch, max_batch_size)
        self._max_batch = max_batch_size
        self._wait_s = max_batch_wait_ms / 1000.0
        self._max_inflight = max_inflight_batches
        self._timeout_s = None if batch_timeout_ms is None else batch_timeout_ms / 1000.0
        self._alpha = ewma_alpha
        self._initial_ms = initial_service_ms
        self._on_batch = on_batch
        self._clock = clock
        self._lanes: dict[tuple[str, int], _Lane] = {}
        self._dispatches: set[asyncio.Task[None]] = set()
        self._closed = False

    # --- public -------------------------------------------------------------------------------

    def enqueue(
        self, model: str, cut: int, x: np.ndarray, deadline: float | None = None
    ) -> asyncio.Future[BatchResult]:
        """Queue one window (x: (1, *shape)); its future gets its row of the batch result.

        `deadline` is on this batcher's clock (time.monotonic by default). Cancelling the future
        withdraws the window without disturbing its batch. No task, no await: the broker's stream
        answers a window from the future's callback."""
        if self._closed:
            raise TailUnavailableError("the broker is shutting down")
        if x.ndim < 1 or x.shape[0] != 1:
            raise WireError(f"a window's activation must have batch dimension 1, got shape {list(x.shape)}")
        lane = self._lane(model, cut)
        row_shape = x.shape[1:]
        if lane.row_shape is None:
            lane.row_shape = tuple(row_shape)
        elif row_shape != lane.row_shape:
            raise WireError(
                f"activation shape {list(x.shape)} does not match the batches of model {model!r} at cut "
                f"{cut} ({[1, *lane.row_shape]})"
            )
        fut: asyncio.Future[BatchResult] = asyncio.get_running_loop().create_future()
        lane.queue.append(_Item(x=x, future=fut, enqueued=self._clock(), deadline=deadline))
        lane.wakeup.set()
        if lane.task is None:
            lane.task = asyncio.create_task(self._run_lane(lane), name=f"batcher-{model}-{cut}")
        return fut

    async def submit(self, model: str, cut: int, x: np.ndarray, deadline: float | None = None) -> BatchResult:
        """`enqueue` and wait for the window's row. Cancelling the caller (e.g. asyncio.wait_for
        timing out) withdraws the window without disturbing its batch."""
        fut = self.enqueue(model, cut, x, deadline)
        try:
            return await fut
        finally:
            if not fut.done():
                fut.cancel()  # the caller gave up: the lane skips or ignores this window

    def load(self, model: str, cut: int) -> LaneLoad:
        """What admission control needs to know about a lane now."""
        lane = self._lanes.get((model, cut))
        local = self._run_local is not None
        if lane is None:
            return LaneLoad(queued=0, inflight_batches=0, batch_service_ms=self._initial_ms, runs_local_when_idle=local)
        age_ms = 0.0 if lane.last_done is None else (self._clock() - lane.last_done) * 1000
        return LaneLoad(
            queued=len(lane.queue),
            inflight_batches=lane.inflight,
            batch_service_ms=lane.ewma.value,
            estimate_age_ms=age_ms,
            local_batches=lane.local_inflight,
            runs_local_when_idle=local,
        )

    def queued(self) -> dict[tuple[str, int], int]:
        """Windows waiting per (model, cut)."""
        return {key: len(lane.queue) for key, lane in self._lanes.items()}

    async def close(self) -> None:
        """Stop every lane; windows still queued or in flight fail with TailUnavailableError."""
        self._closed = True
        tasks = [lane.task for lane in self._lanes.values() if lane.task is not None]
        tasks += list(self._dispatches)
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        for lane in self._lanes.values():
            while lane.queue:
                _fail(lane.queue.popleft(), TailUnavailableError("the broker is shutting down"))

    # --- lanes --------------------------------------------------------------------------------

    def _lane(self, model: str, cut: int) -> _Lane:
        lane = self._lanes.get((model, cut))
        if lane is None:
            lane = _Lane(model=model, cut=cut, ewma=Ewma(self._alpha, self._initial_ms))
            self._lanes[(model, cut)] = lane
        return lane

    async def _wait(self, lane: _Lane, timeout: float | None = None) -> None:
        lane.wakeup.clear()
        if timeout is None:
            await lane.wakeup.wait()
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(timeout, 0.0)):
                await lane.wakeup.wait()

    async def _run_lane(self, lane: _Lane) -> None:
        while True:
            _drop_abandoned(lane.queue)
            if not lane.queue:
                await self._wait(lane)
                continue
            free = self._local_when_free and self._local_running == 0
            if self._run_local is not None and (lane.inflight == 0 or free) and not self._stale(lane):
                # An idle lane, or (local_when_free) a local tail with no batch running: the next
                # windows skip the backend hop. (Once the backend's estimate is older than
                # refresh_after_ms, the batch goes to the backend instead: a probe that keeps the
                # estimate admission reads true, after an outage above all.)
                batch = self._take(lane, self._local_max)
                if batch:
                    self._start(lane, batch, local=True)
                continue
            # local_when_free: the local tail's batch takes none of the backend's slots
            if lane.inflight - (lane.local_inflight if self._local_when_free else 0) >= self._max_inflight:
                await self._wait(lane)  # a finished batch sets the event
                continue
            if lane.inflight > 0 and len(lane.queue) < self._max_batch:
                fill_until = lane.queue[0].enqueued + self._wait_s
                now = self._clock()
                if now < fill_until:
                    await self._wait(lane, fill_until - now)
                    continue  # re-check everything: more windows, or the fill time is up
            batch = self._take(lane, self._max_batch)
            if batch:
                self._start(lane, batch, local=False)

    def _stale(self, lane: _Lane) -> bool:
        return lane.last_done is not None and self._clock() - lane.last_done >= self._refresh_after_s

    def _start(self, lane: _Lane, batch: list[_Item], *, local: bool) -> None:
        lane.inflight += 1
        lane.local_inflight += local
        self._local_running += local
        task = asyncio.create_task(self._dispatch(lane, batch, local), name=f"batch-{lane.model}-{lane.cut}")
        self._dispatches.add(task)
        task.add_done_callback(self._dispatches.discard)

    def _take(self, lane: _Lane, limit: int) -> list[_Item]:
        now = self._clock()
        batch: list[_Item] = []
        while lane.queue and len(batch) < limit:
            item = lane.queue.popleft()
            if item.future.done():
                continue
            if item.deadline is not None and item.deadline <= now:
                late_ms = (now - item.enqueued) * 1000
                _fail(item, OffloadDeadlineError(f"the deadline passed after {late_ms:.1f} ms in the queue"))
                continue
            batch.append(item)
        return batch

    async def _dispatch(self, lane: _Lane, batch: list[_Item], local: bool = False) -> None:
        run = self._run_local if local and self._run_local is not None else self._run_batch
        start = self._clock()
        error: BaseException | None = None
        timed_out = False
        out: np.ndarray | None = None
        timeout = self._batch_timeout(batch, start)
        try:
            stacked = batch[0].x if len(batch) == 1 else np.concatenate([it.x for it in batch], axis=0)
            async with asyncio.timeout(timeout):
                out = np.asarray(await run(lane.model, lane.cut, stacked))
            if out.ndim != 2 or out.shape[0] != len(batch):
                raise TailUnavailableError(
                    f"the tail of {lane.model!r} at cut {lane.cut} returned shape {list(out.shape)} "
                    f"for a batch of {len(batch)}; expected [{len(batch)}, classes]"
                )
        except TimeoutError:
            timed_out = True
            error = TailUnavailableError(
                f"the tail of {lane.model!r} at cut {lane.cut} did not answer within {(timeout or 0) * 1000:.0f} ms"
            )
        except asyncio.CancelledError:
            error = TailUnavailableError("the broker is shutting down")
            raise
        except TailUnavailableError as e:
            error = e
        except Exception as e:  # anything from the backend hop: the device falls back locally
            log.warning("tail of %r at cut %d failed: %s: %s", lane.model, lane.cut, type(e).__name__, e)
            error = TailUnavailableError(
                f"the tail of {lane.model!r} at cut {lane.cut} failed: {type(e).__name__}: {e}"
            )
        finally:
            end = self._clock()
            compute_s = end - start
            lane.inflight -= 1
            lane.local_inflight -= local
            self._local_running -= local
            lane.wakeup.set()
            if timed_out and not local:
                lane.ewma.update(compute_s * 1000)  # a timeout is service time too: admission backs off
                lane.last_done, lane.inflated = end, True
            elif error is None and not local:
                # The first batch answered after timeouts is the service time again: start from it
                # rather than blend it into the outage's figures (one probe a second would take
                # many seconds to bring them down, shedding windows the backend could answer).
                if lane.inflated:
                    lane.ewma.reset(compute_s * 1000)
                else:
                    lane.ewma.update(compute_s * 1000)
                lane.last_done, lane.inflated = end, False
            if error is not None:
                for it in batch:
                    _fail(it, TailUnavailableError(str(error)))
            elif out is not None:
                compute_ms = compute_s * 1000
                with np.errstate(over="ignore", invalid="ignore"):
                    out32 = out.astype(np.float32, copy=False)  # logits travel as float32
                values = out32.tolist()
                predictions = out32.argmax(axis=1).tolist() if out32.shape[1] else [0] * len(batch)
                finite = cast(list[bool], np.isfinite(out32).all(axis=1).tolist())
                n = len(batch)
                for i, it in enumerate(batch):
                    if not it.future.done():
                        it.future.set_result(
                            BatchResult(
                                out[i],
                                (start - it.enqueued) * 1000,
                                compute_ms,
                                n,
                                values[i],
                                predictions[i],
                                finite[i],
                            )
                        )
            if self._on_batch is not None:
                try:
                    self._on_batch(BatchReport(lane.model, lane.cut, len(batch), compute_s, error is None, local))
                except Exception:  # metrics must never break a batch
                    log.exception("on_batch hook failed")

    def _batch_timeout(self, batch: list[_Item], now: float) -> float | None:
        deadlines = [it.deadline for it in batch]
        latest = None if any(d is None for d in deadlines) else max(d for d in deadlines if d is not None)
        budget = None if latest is None else max(latest - now, 0.0)
        if self._timeout_s is None:
            return budget
        return self._timeout_s if budget is None else min(self._timeout_s, budget)


def _drop_abandoned(queue: deque[_Item]) -> None:
    while queue and queue[0].future.done():
        queue.popleft()


def _fail(item: _Item, error: BaseException) -> None:
    if not item.future.done():
        item.future.set_exception(error)
