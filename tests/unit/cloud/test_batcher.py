"""cloud.batcher: batching policy, fan-out, failures and cancellations, with a fake backend."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from cloud.backend import TailUnavailableError
from cloud.batcher import BatchReport, MicroBatcher
from splitsense.errors import ConfigError, OffloadDeadlineError, WireError


class FakeBackend:
    """Row i of the answer is [sum(x_i), batch size]; `gate` holds calls until it is set."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, int]] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.error: BaseException | None = None
        self.hang = False
        self.bad_shape = False

    async def __call__(self, model: str, cut: int, batch: np.ndarray) -> np.ndarray:
        self.calls.append((model, cut, batch.shape[0]))
        await self.gate.wait()
        if self.hang:
            await asyncio.sleep(3600)
        if self.error is not None:
            raise self.error
        n = batch.shape[0]
        if self.bad_shape:
            return np.zeros((n + 1, 2), dtype=np.float32)
        sums = batch.reshape(n, -1).sum(axis=1)
        return np.stack([sums, np.full(n, n, dtype=np.float32)], axis=1).astype(np.float32)


def window(value: float) -> np.ndarray:
    return np.full((1, 3), value / 3, dtype=np.float32)  # sums to `value`


def batcher(backend: FakeBackend, **kw: object) -> MicroBatcher:
    args: dict[str, object] = {"max_batch_size": 4, "max_batch_wait_ms": 5.0, "max_inflight_batches": 1}
    args.update(kw)
    return MicroBatcher(backend, **args)  # type: ignore[arg-type]


async def test_idle_lane_dispatches_at_once() -> None:
    be = FakeBackend()
    b = batcher(be, max_batch_wait_ms=10_000.0)  # the wait must not apply to an idle lane
    t0 = time.monotonic()
    r = await b.submit("m", 1, window(6.0))
    assert time.monotonic() - t0 < 1.0
    assert r.logits.tolist() == pytest.approx([6.0, 1.0])
    assert r.batch_size == 1 and r.queue_ms >= 0 and r.compute_ms >= 0
    assert be.calls == [("m", 1, 1)]
    await b.close()


async def test_windows_pile_up_behind_a_running_batch_and_leave_together() -> None:
    be = FakeBackend()
    be.gate.clear()
    b = batcher(be)
    first = asyncio.create_task(b.submit("m", 0, window(1.0)))
    await asyncio.sleep(0.01)
    assert be.calls == [("m", 0, 1)]
    rest = [asyncio.create_task(b.submit("m", 0, window(float(v)))) for v in (2, 3, 4)]
    await asyncio.sleep(0.01)
    assert b.load("m", 0).queued == 3 and b.load("m", 0).inflight_batches == 1
    be.gate.set()
    results = await asyncio.gather(first, *rest)
    assert be.calls == [("m", 0, 1), ("m", 0, 3)]
    # Every waiter gets its own row back.
    assert [r.logits[0] for r in results] == pytest.approx([1.0, 2.0, 3.0, 4.0])
    assert [r.batch_size for r in results] == [1, 3, 3, 3]
    await b.close()


async def test_max_batch_size_splits_the_queue() -> None:
    be = FakeBackend()
    be.gate.clear()
    b = batcher(be, max_batch_size=4)
    first = asyncio.create_task(b.submit("m", 0, window(0.0)))
    await asyncio.sleep(0.01)
    waiters = [asyncio.create_task(b.submit("m", 0, window(float(v)))) for v in range(1, 11)]
    await asyncio.sleep(0.01)
    be.gate.set()
    results = await asyncio.gather(first, *waiters)
    assert [c[2] for c in be.calls] == [1, 4, 4, 2]
    assert [r.logits[0] for r in results] == pytest.approx([float(v) for v in range(11)])
    await b.close()


async def test_lanes_are_separate_per_model_and_cut() -> None:
    be = FakeBackend()
    b = batcher(be)
    r = await asyncio.gather(
        b.submit("a", 0, window(1.0)), b.submit("b", 0, window(2.0)), b.submit("a", 2, window(3.0))
    )
    assert sorted(be.calls) == [("a", 0, 1), ("a", 2, 1), ("b", 0, 1)]
    assert [x.logits[0] for x in r] == pytest.approx([1.0, 2.0, 3.0])
    await b.close()


async def test_a_free_slot_waits_max_batch_wait_to_fill() -> None:
    be = FakeBackend()
    be.gate.clear()
    b = batcher(be, max_inflight_batches=2, max_batch_wait_ms=50.0)
    first = asyncio.create_task(b.submit("m", 0, window(1.0)))
    await asyncio.sleep(0.01)
    second = asyncio.create_task(b.submit("m", 0, window(2.0)))
    await asyncio.sleep(0.02)
    assert len(be.calls) == 1  # still filling: a batch is running and the wait is not over
    await asyncio.sleep(0.08)
    assert len(be.calls) == 2  # the wait expired: dispatched alone into the second slot
    be.gate.set()
    await asyncio.gather(first, second)
    await b.close()


async def test_a_failed_batch_fails_every_waiter() -> None:
    be = FakeBackend()
    be.gate.clear()
    be.error = RuntimeError("replica died")
    b = batcher(be)
    tasks = [asyncio.create_task(b.submit("m", 0, window(float(v)))) for v in range(3)]
    await asyncio.sleep(0.01)
    be.gate.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(r, TailUnavailableError) for r in results)
    assert "RuntimeError: replica died" in str(results[0])
    # The lane recovers: the next batch works.
    be.error = None
    r = await b.submit("m", 0, window(5.0))
    assert r.logits[0] == pytest.approx(5.0)
    await b.close()


async def test_tail_unavailable_is_passed_through() -> None:
    be = FakeBackend()
    be.error = TailUnavailableError("no replica of m")
    b = batcher(be)
    with pytest.raises(TailUnavailableError, match="no replica of m"):
        await b.submit("m", 0, window(1.0))
    await b.close()


async def test_a_cancelled_waiter_does_not_break_its_batch() -> None:
    be = FakeBackend()
    be.gate.clear()
    b = batcher(be)
    first = asyncio.create_task(b.submit("m", 0, window(1.0)))
    await asyncio.sleep(0.01)
    a, gone, c = (asyncio.create_task(b.submit("m", 0, window(float(v)))) for v in (2, 3, 4))
    await asyncio.sleep(0.01)
    gone.cancel()  # gives up while queued
    await asyncio.sleep(0.01)
    be.gate.set()
    ra, rc, _ = await asyncio.gather(a, c, first)
    assert (ra.logits[0], rc.logits[0]) == pytest.approx((2.0, 4.0))
    assert be.calls[-1] == ("m", 0, 2)  # the cancelled window was not sent
    assert gone.cancelled()
    await b.close()


async def test_a_waiter_cancelled_in_flight_does_not_break_its_batch() -> None:
    be = FakeBackend()
    be.gate.clear()
    b = batcher(be)
    a = asyncio.create_task(b.submit("m", 0, window(1.0)))
    await asyncio.sleep(0.01)
    x, y = (asyncio.create_task(b.submit("m", 0, window(float(v)))) for v in (2, 3))
    await asyncio.sleep(0.01)
    be.gate.set()
    await asyncio.sleep(0)  # first batch done, second (x, y) dispatched
    x.cancel()
    ry = await y
    assert ry.logits[0] == pytest.approx(3.0)
    await a
    await b.close()


async def test_deadline_with_asyncio_timeout_withdraws_the_window() -> None:
    be = FakeBackend()
    be.gate.clear()
    b = batcher(be)
    first = asyncio.create_task(b.submit("m", 0, window(1.0)))
    await asyncio.sleep(0.01)
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.02):
            await b.submit("m", 0, window(2.0))
    be.gate.set()
    await first
    assert len(be.calls) == 1  # the timed-out window never reached the backend
    await b.close()


async def test_window_past_its_deadline_is_failed_not_sent() -> None:
    be = FakeBackend()
    be.gate.clear()
    b = batcher(be)
    first = asyncio.create_task(b.submit("m", 0, window(1.0)))
    await asyncio.sleep(0.01)
    late = asyncio.create_task(b.submit("m", 0, window(2.0), deadline=time.monotonic() + 0.01))
    await asyncio.sleep(0.03)
    be.gate.set()
    await first
    with pytest.raises(OffloadDeadlineError, match="deadline passed"):
        await late
    assert len(be.calls) == 1
    await b.close()


async def test_a_hung_backend_fails_the_batch_within_the_timeout() -> None:
    be = FakeBackend()
    be.hang = True
    b = batcher(be, batch_timeout_ms=50.0)
    t0 = time.monotonic()
    with pytest.raises(TailUnavailableError, match="did not answer within 50 ms"):
        await b.submit("m", 0, window(1.0))
    assert time.monotonic() - t0 < 1.0
    assert b.load("m", 0).batch_service_ms >= 40.0  # admission learns the lane is slow
    await b.close()


async def test_batch_timeout_follows_the_windows_deadlines() -> None:
    be = FakeBackend()
    be.hang = True
    b = batcher(be, batch_timeout_ms=10_000.0)
    t0 = time.monotonic()
    with pytest.raises(TailUnavailableError, match="did not answer"):
        await b.submit("m", 0, window(1.0), deadline=time.monotonic() + 0.05)
    assert time.monotonic() - t0 < 1.0
    await b.close()


async def test_a_malformed_backend_answer_fails_the_batch() -> None:
    be = FakeBackend()
    be.bad_shape = True
    b = batcher(be)
    with pytest.raises(TailUnavailableError, match=r"returned shape \[2, 2\] for a batch of 1"):
        await b.submit("m", 0, window(1.0))
    await b.close()


async def test_submit_checks_the_window_shape() -> None:
    b = batcher(FakeBackend())
    with pytest.raises(WireError, match="batch dimension 1"):
        await b.submit("m", 0, np.zeros((2, 3), dtype=np.float32))
    await b.submit("m", 0, window(1.0))
    with pytest.raises(WireError, match=r"does not match the batches"):
        await b.submit("m", 0, np.zeros((1, 4), dtype=np.float32))
    await b.close()


async def test_load_and_service_time_ewma() -> None:
    b = batcher(FakeBackend(), initial_service_ms=123.0)
    assert b.load("m", 0).batch_service_ms == 123.0
    await b.submit("m", 0, window(1.0))
    load = b.load("m", 0)
    assert load.queued == 0 and load.inflight_batches == 0
    assert load.batch_service_ms < 123.0  # replaced by the measured (fast) call
    await b.close()


async def test_on_batch_reports_every_call() -> None:
    reports: list[BatchReport] = []
    be = FakeBackend()
    b = batcher(be, on_batch=reports.append)
    await b.submit("m", 1, window(1.0))
    be.error = RuntimeError("x")
    with pytest.raises(TailUnavailableError):
        await b.submit("m", 1, window(1.0))
    assert [(r.model, r.cut, r.size, r.ok) for r in reports] == [("m", 1, 1, True), ("m", 1, 1, False)]
    await b.close()


async def test_close_fails_queued_and_running_windows() -> None:
    be = FakeBackend()
    be.gate.clear()
    b = batcher(be)
    tasks = [asyncio.create_task(b.submit("m", 0, window(float(v)))) for v in range(3)]
    await asyncio.sleep(0.01)
    await b.close()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(r, TailUnavailableError) for r in results)
    with pytest.raises(TailUnavailableError, match="shutting down"):
        await b.submit("m", 0, window(1.0))


async def test_many_concurrent_windows_all_answered_correctly() -> None:
    be = FakeBackend()

    async def slow(model: str, cut: int, batch: np.ndarray) -> np.ndarray:
        await asyncio.sleep(0.002)
        return await be(model, cut, batch)

    b = MicroBatcher(slow, max_batch_size=16, max_batch_wait_ms=1.0, max_inflight_batches=2)
    values = [float(v) for v in range(200)]
    results = await asyncio.gather(*(b.submit("m", 0, window(v)) for v in values))
    assert [r.logits[0] for r in results] == pytest.approx(values)
    assert len(be.calls) < 100  # batched
    assert max(c[2] for c in be.calls) <= 16
    await b.close()


# --- the broker's own tail for an idle lane (broker.local_tail) --------------------------------


async def test_an_idle_lane_runs_its_batch_locally_a_busy_one_goes_to_the_backend() -> None:
    remote, local = FakeBackend(), FakeBackend()
    reports: list[BatchReport] = []
    b = batcher(remote, max_inflight_batches=2, run_local=local, local_max_batch=2, on_batch=reports.append)
    r = await b.submit("m", 1, window(6.0))  # a lone window: the local tail, not the hop
    assert r.logits.tolist() == pytest.approx([6.0, 1.0]) and r.batch_size == 1
    assert local.calls == [("m", 1, 1)] and remote.calls == []
    local.gate.clear()  # a local batch in flight: the lane is busy, the next windows go to the backend
    first = asyncio.create_task(b.submit("m", 1, window(1.0)))
    await asyncio.sleep(0.01)
    rest = [asyncio.create_task(b.submit("m", 1, window(float(v)))) for v in (2, 3, 4)]
    await asyncio.sleep(0.05)
    assert remote.calls == [("m", 1, 3)]
    local.gate.set()
    results = await asyncio.gather(first, *rest)
    assert [x.logits[0] for x in results] == pytest.approx([1.0, 2.0, 3.0, 4.0])
    assert [rep.local for rep in reports] == [True, False, True]
    await b.close()


async def test_local_batches_hold_at_most_local_max_batch_and_leave_the_estimate_alone() -> None:
    remote, local = FakeBackend(), FakeBackend()
    local.gate.clear()
    b = batcher(remote, max_inflight_batches=1, run_local=local, local_max_batch=2, initial_service_ms=10.0)
    tasks = [asyncio.create_task(b.submit("m", 0, window(float(v)))) for v in range(5)]
    await asyncio.sleep(0.01)
    assert local.calls == [("m", 0, 2)]  # the first two; the lane is busy until they are answered
    local.gate.set()
    results = await asyncio.gather(*tasks)
    assert sorted(r.logits[0] for r in results) == pytest.approx([0.0, 1.0, 2.0, 3.0, 4.0])
    assert all(n <= 2 for _, _, n in local.calls)
    assert b.load("m", 0).batch_service_ms == 10.0, "admission's estimate is the backend's, not the local tail's"
    await b.close()


async def test_when_free_the_local_tail_takes_a_busy_lanes_batch_and_leaves_the_backend_its_slots() -> None:
    """local_when_free (broker.local_tail_when "free"): a lane with a backend batch in flight still
    sends its next batch to the local tail when no batch runs there; while one does, the backend
    takes the rest with all of its max_inflight_batches slots."""
    remote, local = FakeBackend(), FakeBackend()
    remote.gate.clear()
    b = batcher(remote, max_inflight_batches=1, run_local=local, local_max_batch=2, local_when_free=True)
    local.gate.clear()
    t1 = [asyncio.create_task(b.submit("m", 1, window(float(v)))) for v in (1, 2, 3)]
    await asyncio.sleep(0.02)
    # the idle lane's first two windows on the local tail; the third to the backend, whose one slot
    # the local batch does not take
    assert local.calls == [("m", 1, 2)] and remote.calls == [("m", 1, 1)]
    local.gate.set()  # the local tail frees while the backend batch is still out
    await asyncio.sleep(0.02)
    t2 = [asyncio.create_task(b.submit("m", 1, window(float(v)))) for v in (4, 5)]
    await asyncio.sleep(0.02)
    assert local.calls == [("m", 1, 2), ("m", 1, 2)], "a busy lane's batch went to the free local tail"
    assert remote.calls == [("m", 1, 1)]
    remote.gate.set()
    results = await asyncio.gather(*t1, *t2)
    assert [r.logits[0] for r in results] == pytest.approx([1.0, 2.0, 3.0, 4.0, 5.0])
    await b.close()


async def test_a_failed_local_batch_fails_its_windows_as_unavailable() -> None:
    remote, local = FakeBackend(), FakeBackend()
    local.error = RuntimeError("torch broke")
    b = batcher(remote, run_local=local)
    with pytest.raises(TailUnavailableError, match="torch broke"):
        await b.submit("m", 0, window(1.0))
    assert remote.calls == []
    await b.close()


def test_local_max_batch_is_checked() -> None:
    with pytest.raises(ConfigError):
        MicroBatcher(FakeBackend(), max_batch_size=4, max_batch_wait_ms=1.0, local_max_batch=0)


async def test_a_stale_estimate_sends_an_idle_lanes_batch_to_the_backend_and_a_good_one_resets_it() -> None:
    """With the broker's own tail an idle lane runs locally; once the backend's estimate is older
    than refresh_after_ms the next idle batch probes the backend, and the first answer after
    timeouts replaces the outage's estimate instead of blending into it."""
    be, local_calls = FakeBackend(), []

    async def local(model: str, cut: int, batch: np.ndarray) -> np.ndarray:
        local_calls.append(batch.shape[0])
        return np.zeros((batch.shape[0], 2), dtype=np.float32)

    b = batcher(
        be, run_local=local, local_max_batch=2, refresh_after_ms=50.0, batch_timeout_ms=30.0, max_inflight_batches=2
    )
    await b.submit("m", 1, window(1.0))
    assert local_calls == [1] and be.calls == []  # never measured: local
    lane = b._lanes[("m", 1)]
    # An outage: a backend batch (the lane busy with its own tail) times out and inflates the estimate.
    be.hang = True
    lane.inflight = lane.local_inflight = 1  # as while a local batch runs
    with pytest.raises(TailUnavailableError):
        await b.submit("m", 1, window(1.0))
    lane.inflight = lane.local_inflight = 0
    inflated = b.load("m", 1).batch_service_ms
    assert inflated >= 25.0 and lane.inflated
    await b.submit("m", 1, window(1.0))  # estimate fresh: the idle lane runs locally
    assert len(local_calls) == 2
    be.hang = False
    await asyncio.sleep(0.06)  # now stale: the idle batch goes to the backend
    calls = len(be.calls)
    await b.submit("m", 1, window(1.0))
    assert len(be.calls) == calls + 1 and len(local_calls) == 2
    assert b.load("m", 1).batch_service_ms < inflated / 2 and not lane.inflated
    await b.close()


def test_broker_local_tail_when_is_idle_or_free() -> None:
    from splitsense.config import BrokerConfig

    assert BrokerConfig().local_tail_when == "idle"
    assert BrokerConfig(local_tail_when="free").local_tail_when == "free"
    with pytest.raises(ConfigError, match="broker.local_tail_when must be 'idle' or 'free'"):
        BrokerConfig(local_tail_when="always")
