"""A device against the real broker on real Ray Serve: kill the model's replica mid-stream.

Real Ray (the session's, tests/integration/conftest.py) with the uci_har tail deployed by
start_serving, a real grpc.aio broker on loopback over RayTailBackend, and an EdgeDevice with the
real GrpcTransport replaying the UCI HAR test recording at 12.8x real time (a window every 100 ms)
at a fixed cut 3, fp32. Once 15 windows in a row have been offloaded, the replica actor is killed
(`ray.kill`); Serve notices and starts a new one, whose restart time is measured from Serve's own
status. Checked: no window is lost (every window id has exactly one result, in order); the device
spends at most one deadline (plus slack) on any window and is local within one deadline of the
kill; while no replica runs nothing is offloaded and the breaker sends the device fully local; it
offloads again within the replica's restart time plus its back-off bound; and every offloaded
prediction, before the kill and on the new replica, equals the local full-model prediction.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass

import pytest

from cloud.auth import device_token
from cloud.backend import ModelRegistry
from cloud.broker import Broker
from cloud.serving import RayTailBackend, app_name, replica_actor_names, start_serving, stop_serving
from edge.route import FallbackKind
from edge.runtime import EdgeDevice
from edge.sink import MemorySink, WindowResult
from edge.sources import SensorWindow, source_for_model
from edge.transport import GrpcTransport
from splitsense.config import BreakerConfig, BrokerConfig, EdgeConfig, ServingConfig
from splitsense.wire import ExecutionMode

pytestmark = pytest.mark.integration

MODEL = "uci_har"  # the smallest shipped model: the quickest replica to (re)start
SECRET = "ray-fault-integration-secret-0123456789"
DEVICE = "edge-ray-fault-1"
CUT = 3  # a real split: stages [0, 3) on the device, [3, 7) on the Ray replica
SPEED = 12.8  # UCI HAR windows come every 1.28 s: one every 100 ms
PERIOD_S = 1.28 / SPEED
KILL_AFTER = 15  # windows offloaded in a row before the kill: a steady stream, whatever a cold first call cost
AFTER_RECOVERY = 10  # offloaded windows after the recovery, then the stream ends
MAX_WINDOWS = 600  # hard bound on the stream: 60 s (about 6 s when the machine is not overloaded)
# Serve replaces a replica in ~2.5 s here (a new worker imports torch and loads the weights),
# far slower on an overloaded machine: fail after this instead of hanging.
RESTART_TIMEOUT_S = 45.0
DEADLINE_MS = 300.0
BREAKER = BreakerConfig(
    failure_threshold=2, backoff_base_s=0.3, backoff_factor=2.0, backoff_max_s=1.0, backoff_jitter=0.2
)
BACKOFF_BOUND_S = BREAKER.backoff_max_s * (1 + BREAKER.backoff_jitter)
SLACK_S = 1.0  # local compute, Serve's routing update and scheduling on 2 shared, loaded cores


@pytest.fixture(scope="module")
def tails(ray_cluster: str) -> Iterator[RayTailBackend]:
    backend = start_serving(ServingConfig(models=(MODEL,), num_replicas=1, request_timeout_s=1.0))
    yield backend
    stop_serving()


@dataclass
class Restart:
    """What the watcher saw of one replica kill, on time.monotonic()."""

    killed_at: float
    dead_at: float  # the old actor was confirmed gone
    # the start of the last look that found no new replica running: none could serve before it
    last_down_at: float
    running_at: float  # Serve reported the new replica RUNNING (and the old one gone)
    new_name: str


def kill_and_watch(old: str) -> Restart:
    """Kill replica actor `old`, then watch (bounded, ~20 polls/s) until Serve runs a new one.

    Blocking Ray calls: run it in a thread so that the device and the broker keep going."""
    import ray
    from ray import serve

    actor = ray.get_actor(old, namespace="serve")
    killed_at = time.monotonic()
    ray.kill(actor, no_restart=False)  # Serve's replicas have max_restarts=0: Serve starts a new one
    end = killed_at + RESTART_TIMEOUT_S
    dead_at = None
    while dead_at is None and time.monotonic() < end:  # ray.kill is asynchronous
        try:
            ray.get(actor.__ray_ready__.remote(), timeout=0.5)
            time.sleep(0.02)
        except ray.exceptions.GetTimeoutError:  # busy or dying: ask again
            pass
        except ray.exceptions.RayActorError:
            dead_at = time.monotonic()
    assert dead_at is not None, f"replica {old} still answers {RESTART_TIMEOUT_S:g} s after ray.kill"

    last_down_at, new_name = dead_at, ""
    while time.monotonic() < end:
        look = time.monotonic()
        names = replica_actor_names(MODEL)
        new = [n for n in names if n != old]
        if new and old not in names:
            new_name = new[0]
            deployment = serve.status().applications[app_name(MODEL)].deployments["tail"]
            states = {str(k).rsplit(".", 1)[-1]: v for k, v in deployment.replica_states.items()}
            if states.get("RUNNING", 0) >= 1 and not states.get("STARTING", 0):
                return Restart(killed_at, dead_at, last_down_at, time.monotonic(), new_name)
        last_down_at = look  # Serve read afterwards, and no new replica was running yet
        time.sleep(0.05)
    raise AssertionError(
        f"Serve did not run a new replica of {MODEL} within {RESTART_TIMEOUT_S:g} s (saw {new_name!r})"
    )


async def test_killed_ray_replica_mid_stream_loses_nothing_and_the_device_comes_back(
    tails: RayTailBackend, record_property: Callable[[str, object], None]
) -> None:
    registry = ModelRegistry([MODEL])
    trained = registry.trained(MODEL)
    # local_tail off: a lone device's windows would otherwise run in the broker itself (an idle lane)
    # and never see the dead replica, which is the path under test here.
    cfg_b = BrokerConfig(
        port=0, metrics_port=None, auth_secret=SECRET, static_plan_cut=CUT, shutdown_grace_s=0.5, local_tail=False
    )
    broker = Broker(cfg_b, registry, tails)
    port = await broker.start()
    token = device_token(SECRET, DEVICE)
    transport = GrpcTransport(f"127.0.0.1:{port}", token, device_id=DEVICE)
    cfg = EdgeConfig(
        model=MODEL,
        device_id=DEVICE,
        token=token,
        deadline_ms=DEADLINE_MS,
        default_cut=CUT,
        default_codec="fp32",
        breaker=BREAKER,
        replay_speed=SPEED,
    )
    device = EdgeDevice(cfg, trained, transport)

    done: list[tuple[WindowResult, float]] = []
    emitted: dict[str, float] = {}
    enough = asyncio.Event()
    stop = asyncio.Event()
    watch: dict[str, float] = {}  # recovery_from: offloaded results after it count towards stopping

    def progress(r: WindowResult) -> None:
        now = time.monotonic()
        done.append((r, now))
        if len(done) >= KILL_AFTER and all(x.mode is ExecutionMode.OFFLOADED for x, _ in done[-KILL_AFTER:]):
            enough.set()
        since = watch.get("recovery_from")
        if since is not None and r.mode is ExecutionMode.OFFLOADED:
            if sum(1 for x, t in done if t >= since and x.mode is ExecutionMode.OFFLOADED) >= AFTER_RECOVERY:
                stop.set()

    async def tracked() -> AsyncIterator[SensorWindow]:
        it = aiter(source_for_model(MODEL, speed=SPEED, limit=MAX_WINDOWS))
        while not stop.is_set():
            try:
                w = await anext(it)
            except StopAsyncIteration:
                return
            emitted[w.window_id] = w.t_emit
            yield w

    run = asyncio.ensure_future(device.run(tracked(), progress=progress))
    try:
        try:  # a kill needs a steady stream first
            await asyncio.wait_for(enough.wait(), 30)
        except TimeoutError:
            seen = Counter(f"{r.mode.value} {r.kind.value if r.kind else ''}".strip() for r, _ in done)
            pytest.fail(f"no {KILL_AFTER} windows offloaded in a row within 30 s; {len(done)} windows: {dict(seen)}")
        (old,) = replica_actor_names(MODEL)
        restart = await asyncio.to_thread(kill_and_watch, old)
        # count offloads from when the new replica could first serve
        watch["recovery_from"] = restart.last_down_at
        summary = await asyncio.wait_for(run, MAX_WINDOWS * PERIOD_S + 10)
    finally:
        run.cancel()
        await transport.close()
        await broker.stop(0)
    t_kill, t_dead = restart.killed_at, restart.dead_at
    # the timeline, relative to the kill (pytest shows it when a check below fails)
    print(f"\n{restart}\n  emitted     done  mode       latency  reason")
    for r, t in done:
        e = emitted[r.window_id] - t_kill
        print(f"{e:9.3f} {t - t_kill:8.3f}  {r.mode.value:9s} {r.latency_ms:6.1f} ms  {r.reason[:100]}")

    # nothing lost: every window has exactly one result, in order
    ids = [r.window_id for r, _ in done]
    assert summary.lost == 0 and summary.windows == len(emitted) == len(done)
    assert ids == sorted(emitted, key=emitted.__getitem__) and len(set(ids)) == len(ids)
    before = [r for r, t in done if t < t_kill]
    assert len(before) >= KILL_AFTER and all(r.mode is ExecutionMode.OFFLOADED for r in before[-KILL_AFTER:])
    assert all(r.cut == CUT for r, _ in done) and all(r.codec == "fp32" for r in before[-KILL_AFTER:])

    # from the kill on, no window waits on the dead replica past its deadline: the device spends at
    # most one deadline (plus its own compute) on any window. It finishes windows one at a time, so
    # a window may also wait for the one before it: until the breaker opens, up to
    # failure_threshold deadlines in all.
    prev_done = [t for _, t in done[:-1]]
    pairs = [(r, t, p) for (r, t), p in zip(done[1:], prev_done, strict=True) if t >= t_kill]
    service_s = max(t - max(emitted[r.window_id], p) for r, t, p in pairs)
    slowest_ms = max(r.latency_ms for r, _, _ in pairs)
    assert service_s <= DEADLINE_MS / 1000 + SLACK_S
    assert slowest_ms <= BREAKER.failure_threshold * DEADLINE_MS + SLACK_S * 1000
    # ... and it is local within one deadline of the replica's death
    first_local_done = min(t for r, t in done if t >= t_kill and r.mode is not ExecutionMode.OFFLOADED)
    local_s = first_local_done - t_kill
    assert local_s <= (t_dead - t_kill) + DEADLINE_MS / 1000 + PERIOD_S + SLACK_S

    # while no replica runs (an attempt started by then ends within its deadline): nothing is
    # offloaded, the breaker sends the device fully local, fallbacks say why
    down = [r for r, _ in done if t_dead <= emitted[r.window_id] < restart.last_down_at - DEADLINE_MS / 1000]
    assert down and all(r.mode is not ExecutionMode.OFFLOADED for r in down)
    assert any(r.mode is ExecutionMode.LOCAL and r.kind is FallbackKind.BREAKER for r in down)
    fallback_kinds = {r.kind for r, _ in done if r.mode is ExecutionMode.FALLBACK}
    assert fallback_kinds <= {FallbackKind.UNAVAILABLE, FallbackKind.DEADLINE, FallbackKind.SHED, FallbackKind.LATE}, (
        fallback_kinds
    )

    # offloading again within the restart time plus the back-off bound (plus the probe that may
    # have just missed the new replica: one deadline, and one window period), and from then on
    restart_s = restart.running_at - t_kill
    # (a window emitted after the old replica died can only have been answered by the new one)
    back = [t for r, t in done if emitted[r.window_id] >= t_dead and r.mode is ExecutionMode.OFFLOADED]
    assert back, "the device never offloaded again after Serve restarted the replica"
    offload_s = back[0] - t_kill
    bound_s = restart_s + BACKOFF_BOUND_S + DEADLINE_MS / 1000 + PERIOD_S + SLACK_S
    print(
        f"\nray.kill -> replica gone {t_dead - t_kill:.3f} s, device local {local_s:.3f} s, "
        f"new replica RUNNING {restart_s:.3f} s, offloading again {offload_s:.3f} s "
        f"({back[0] - restart.running_at:+.3f} s after RUNNING; bound {bound_s:.3f} s); "
        f"slowest window after the kill {slowest_ms:.0f} ms ({service_s * 1000:.0f} ms on itself); "
        f"{summary.windows} windows {summary.by_mode}, fallbacks {summary.fallbacks_by_reason}, lost {summary.lost}"
    )
    for key, value in (("local_s", local_s), ("restart_s", restart_s), ("offload_again_s", offload_s)):
        record_property(key, round(value, 3))
    assert offload_s <= bound_s
    assert sum(1 for r, t in done if t >= back[0] and r.mode is ExecutionMode.OFFLOADED) >= AFTER_RECOVERY
    assert replica_actor_names(MODEL) == [restart.new_name]

    # every offloaded prediction (before the kill and on the new replica) equals the local
    # full-model prediction of the same window
    local = MemorySink()
    await EdgeDevice(cfg, trained, None).run(source_for_model(MODEL, speed=0, limit=len(done)), local)
    expected = {r.window_id: r.prediction for r in local.results}
    offloaded = [r for r, _ in done if r.mode is ExecutionMode.OFFLOADED]
    assert len(offloaded) >= KILL_AFTER + AFTER_RECOVERY - 1
    assert [r.prediction for r in offloaded] == [expected[r.window_id] for r in offloaded]
