"""PlanStore against a real redis-server: versions, history, watch, refusal, outages."""

from __future__ import annotations

import asyncio
import math
import re
import socket
from collections.abc import AsyncIterator

import pytest

from cloud.planstore import EmbeddedRedis, PlanStore, plan_validator, redact_url
from pipelines.codecs import Codec
from splitsense.errors import DependencyError, PlanError
from splitsense.plan import BatteryState, Objective, Plan, PlanRow, PlanSet

pytestmark = pytest.mark.integration

N_STAGES = {"uci_har": 4, "fsdd_digit": 5}
VALIDATE = plan_validator(N_STAGES)


def plan_set(version: int = 1, *, cut: int = 2, model: str = "uci_har", codec: Codec = Codec.FP16) -> PlanSet:
    rows = (
        PlanRow(
            min_bandwidth_mbps=0.0,
            max_bandwidth_mbps=1.0,
            battery=BatteryState.NORMAL,
            cut=N_STAGES.get(model, 4),
            codec=Codec.FP32,
            reason="slow link: local",
            predicted_latency_ms=20.0,
            predicted_energy_mj=40.0,
        ),
        PlanRow(
            min_bandwidth_mbps=1.0,
            max_bandwidth_mbps=math.inf,
            battery=BatteryState.NORMAL,
            cut=cut,
            codec=codec,
            reason=f"fast link: cut {cut}",
            predicted_latency_ms=12.0,
            predicted_energy_mj=9.0,
        ),
    )
    return PlanSet(
        version=version,
        plans=(Plan(model, "phone", rows, Objective.LATENCY),),
        created_unix_ms=1_700_000_000_000,
        reason=f"test set cut {cut}",
    )


@pytest.fixture
async def store(redis_server) -> AsyncIterator[PlanStore]:
    async with PlanStore(redis_server.url, history_versions=3, timeout_s=1.0) as s:
        yield s


async def test_put_current_previous(store: PlanStore) -> None:
    assert await store.current() is None and await store.previous() is None
    assert await store.put(plan_set(cut=1), VALIDATE) == 1
    assert await store.previous() is None
    assert await store.put(plan_set(cut=3), VALIDATE) == 2
    current, previous = await store.current(), await store.previous()
    assert current is not None and previous is not None
    assert (current.version, previous.version) == (2, 1)
    assert current == plan_set(2, cut=3)  # the JSON round trip loses nothing (inf bucket included)
    assert previous == plan_set(1, cut=1)
    assert await store.get(1) == previous


async def test_history_is_trimmed_and_old_versions_expire(store: PlanStore, redis_server) -> None:
    for _ in range(5):
        await store.put(plan_set(), VALIDATE)
    assert await store.versions() == [5, 4, 3]
    client = store._client
    assert await client.get(store.current_key) == "5"
    assert await client.ttl(store.version_key(5)) == -1  # kept for good
    assert 0 < await client.ttl(store.version_key(1)) <= 60  # trimmed: expires


async def test_version_never_goes_below_the_callers(store: PlanStore) -> None:
    assert await store.put(plan_set(10), VALIDATE) == 10
    assert await store.put(plan_set(1), VALIDATE) == 11
    stored = await store.current()
    assert stored is not None and stored.version == 11


async def test_two_concurrent_writers_never_collide(redis_server) -> None:
    async with (
        PlanStore(redis_server.url, history_versions=3) as a,
        PlanStore(redis_server.url, history_versions=3) as b,
    ):
        versions = await asyncio.gather(*(s.put(plan_set(), VALIDATE) for _ in range(20) for s in (a, b)))
        assert sorted(versions) == list(range(1, 41))
        current = await b.current()
        assert current is not None and current.version == 40


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (plan_set(model="no_such_model"), "unknown model 'no_such_model'"),
        (plan_set(cut=5), "cut 5 is out of range for 'uci_har': expected 0..4"),
        (plan_set(codec=Codec.INT8), "codec 'int8' is not allowed"),
    ],
)
async def test_invalid_plan_is_refused_before_storing(store: PlanStore, bad: PlanSet, message: str) -> None:
    validate = plan_validator(N_STAGES, codecs=("fp32", "fp16"))
    pubsub = store._client.pubsub()
    await pubsub.subscribe(store.channel)
    await pubsub.get_message(timeout=1.0)  # the subscribe confirmation
    with pytest.raises(PlanError, match=message):
        await store.put(bad, validate)
    assert await store.current() is None and await store.versions() == []
    assert await store.current() is None and await store._client.get(store.current_key) is None  # nothing stored
    assert await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.2) is None  # nothing published
    await pubsub.aclose()


async def test_watch_yields_current_then_changes(store: PlanStore) -> None:
    await store.put(plan_set(cut=1), VALIDATE)
    seen: list[PlanSet] = []

    async def consume() -> None:
        async for ps in store.watch(poll_s=0.2):
            seen.append(ps)
            if len(seen) == 3:
                return

    task = asyncio.create_task(consume())
    await _until(lambda: len(seen) == 1)
    await store.put(plan_set(cut=2), VALIDATE)
    await _until(lambda: len(seen) == 2)
    await store.put(plan_set(cut=3), VALIDATE)
    await asyncio.wait_for(task, 5)
    assert [(p.version, p.plans[0].rows[-1].cut) for p in seen] == [(1, 1), (2, 2), (3, 3)]


async def test_watch_skips_what_the_caller_holds(store: PlanStore) -> None:
    await store.put(plan_set(), VALIDATE)
    gen = store.watch(since_version=1, poll_s=0.2)
    nxt = asyncio.ensure_future(gen.__anext__())
    await asyncio.sleep(0.3)
    assert not nxt.done()
    await store.put(plan_set(cut=3), VALIDATE)
    got = await asyncio.wait_for(nxt, 5)
    assert got.version == 2
    await gen.aclose()


async def test_redis_down_is_a_dependency_error_then_recovers(store: PlanStore, redis_server) -> None:
    await store.put(plan_set(), VALIDATE)
    seen: list[PlanSet] = []

    async def consume() -> None:
        async for ps in store.watch(poll_s=0.2, retry_initial_s=0.05, retry_max_s=0.2):
            seen.append(ps)

    task = asyncio.create_task(consume())
    await _until(lambda: len(seen) == 1)
    redis_server.stop()
    for call in (store.current(), store.previous(), store.put(plan_set(), VALIDATE), store.ping()):
        # the URL in the message has its password redacted
        with pytest.raises(
            DependencyError, match=re.escape(f"Redis at {redact_url(redis_server.url)} cannot be reached")
        ):
            await call
    await asyncio.sleep(0.3)
    assert not task.done()  # the watch keeps retrying, never raises
    redis_server.start()  # same port, empty (no persistence)
    assert await store.current() is None  # the same client reconnects by itself
    assert await store.put(plan_set(2, cut=3), VALIDATE) == 2  # the caller's version carries on
    await _until(lambda: len(seen) == 2)
    assert seen[-1].version == 2 and seen[-1].plans[0].rows[-1].cut == 3
    task.cancel()


async def test_redis_url_password_is_never_shown() -> None:
    port = _closed_port()
    async with PlanStore(f"redis://:s3cret@127.0.0.1:{port}/0", timeout_s=0.5) as s:
        with pytest.raises(DependencyError) as info:
            await s.current()
    assert "s3cret" not in str(info.value) and f"redis://:***@127.0.0.1:{port}/0" in str(info.value)


async def test_embedded_redis_starts_and_stops() -> None:
    embedded = EmbeddedRedis()
    url = embedded.start()
    assert embedded.running and url.startswith("redis://controller:") and "@127.0.0.1:" in url
    try:
        async with PlanStore(url) as s:
            assert await s.put(plan_set(), VALIDATE) == 1
            assert (await s.current()) == plan_set(1)
    finally:
        directory = embedded._dir
        embedded.stop()
    assert not embedded.running and directory is not None and not directory.exists()
    embedded.stop()  # twice is fine
    with pytest.raises(DependencyError, match="not running"):
        _ = embedded.url


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _until(cond, timeout_s: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not cond():
        if loop.time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


async def test_each_role_may_do_only_its_part(redis_server) -> None:  # type: ignore[no-untyped-def]
    """The controller's Redis user writes plans; a broker's reads and follows them but cannot write
    one; the default user is off; neither reaches a key outside the plan store (deploy/redis)."""
    import redis.asyncio as aioredis

    async with (
        PlanStore(redis_server.url_for("controller"), history_versions=3) as controller,
        PlanStore(redis_server.url_for("broker"), history_versions=3) as broker,
    ):
        seen: list[int] = []

        async def follow() -> None:
            async for ps in broker.watch(since_version=0):
                seen.append(ps.version)
                return

        watcher = asyncio.create_task(follow())
        await asyncio.sleep(0.2)
        put = await controller.put(plan_set(), VALIDATE)
        assert (await broker.current()).version == put  # type: ignore[union-attr]
        await asyncio.wait_for(watcher, 5)
        assert seen == [put]
        with pytest.raises(DependencyError, match="refused the plan write"):
            await broker.put(plan_set(), VALIDATE)
    anonymous = aioredis.Redis(port=redis_server.port)
    with pytest.raises(Exception, match="(?i)auth|NOAUTH|HELLO"):
        await anonymous.ping()
    await anonymous.aclose()
    elsewhere = aioredis.from_url(redis_server.url_for("controller"))
    with pytest.raises(Exception, match="(?i)permission"):
        await elsewhere.set("not-a-plan", "1")
    await elsewhere.aclose()
