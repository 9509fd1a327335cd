"""Faults during a fleet run: Redis, Prometheus, the controller, a Ray replica and the broker
restarted mid-run, one at a time and two at once (issue 10, item 6).

Everything is real and on loopback, each part restartable in place:

    Redis        Debian redis-server on a port fixed for the run, ACL users per role (the
                 controller writes, the broker reads and follows); restarted on the same port with
                 the same users, and without its data (no persistence)
    Prometheus   Debian prometheus scraping the broker's exporter every second; restarted on the
                 same port and data directory
    Ray Serve    the uci_har tail (one replica); the replica actor is killed (`ray.kill`) and Serve
                 starts a new one by itself
    broker       a grpc.aio Broker over the Ray backend (every batch to Ray: no broker-local
                 tail) with its exporter, on two ports fixed for the run, and its plan feed
                 (PlanSubscriber on the broker's Redis user); a restart stops all three (SIGTERM's
                 graceful stop) and starts new ones on the same ports
    controller   Controller.run_forever as an asyncio task (period 0.5 s) reading PrometheusSource
                 and writing the plan store; a fault cancels the task (a crash), a restart builds
                 a new one with fresh connections, as a new process would
    fleet        four EdgeDevices over GrpcTransport, one per device class, replaying the UCI HAR
                 test recording 12.8x faster than real time (a window every 100 ms; the sensor
                 node 6.4x): phone, iot_board and watch offload every window at cut 3 (a forced
                 choice: for this tiny model the planner keeps those classes local, and a device
                 that never offloads proves nothing here) with local fallback; the sensor node
                 cannot hold the whole model, follows the controller's plan (cut 0, int8) and
                 stores and forwards what the cloud cannot answer. Deadline 300 ms; breakers open
                 after 3 failures and probe again after 0.3 s doubling to 1 s (+-20%).

Each run: the fleet offloads steadily on the controller's plan; the run's faults are injected at
once; after DOWN_S the faulted parts are restarted at once (the replica: when Serve runs its new
one); the run goes on until every device offloads again, the plans agree everywhere and
Prometheus has scraped the broker's exporter again, then STABLE_S more, and the devices' streams
end. Checked for every run:

- no window lost: every window id of every device has exactly one result (none missing, none
  twice), `lost` and `pending` are 0;
- the devices offload again within OFFLOAD_BOUND_S (4.7 s) of the last part coming back (and,
  for the faults that leave the data path alone, keep offloading throughout: no offload fails
  as refused or unreachable);
- plans recover within PLAN_BOUND_S (6.2 s): a controller pass that reached every dependency and
  ended published or unchanged, and the store's current version is the broker's and every
  device's; after a Redis restart (the store lost its data) that is a version newer than before
  the fault (otherwise the controller rightly publishes only when a row changes);
- the controller's outcomes say what was down while it was down (store-down for Redis,
  no-metrics for Prometheus), none is "error", and every pass after the recovery is published or
  unchanged;
- nothing crash-loops: during STABLE_S every device offloads a third of its windows or more; after
  it the restarted Redis and Prometheus are the same processes, Serve runs the same new replica,
  the broker answers health SERVING and is scraped, the controller and the plan feed still run,
  every dependency of the controller is up, and nothing in cloud/ or edge/ logged an error.

Figures of each run (windows, results, lost, modes and fallback kinds per device, time from the
fault and from the restart to the first offload, to plan recovery, the controller's outcomes) are
printed (-s) and, when SPLITSENSE_FAULT_REPORT names a file, merged into it as JSON by run.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry, start_http_server

from cloud.auth import device_token
from cloud.backend import ModelRegistry
from cloud.broker import Broker
from cloud.controller.loop import Controller, PassReport
from cloud.controller.metrics_source import PrometheusSource
from cloud.plan_feed import PlanSubscriber
from cloud.planstore import PlanStore
from cloud.serving import RayTailBackend, app_name, replica_actor_names, start_serving, stop_serving
from edge.route import FallbackKind
from edge.runtime import EdgeDevice, ForcedChoice, RunSummary
from edge.sink import WindowResult
from edge.sources import SensorWindow, source_for_model
from edge.store import DEFAULT_CAPACITY_BYTES
from edge.transport import GrpcTransport
from pipelines.catalog import ModelCatalog, load_catalog
from pipelines.devices import DEVICE_CLASSES, edge_fallback
from pipelines.training import TrainedModel, load_trained
from splitsense.config import BreakerConfig, BrokerConfig, Config, ControllerConfig, EdgeConfig, ServingConfig
from splitsense.kinds import Codec
from splitsense.wire import ExecutionMode

pytestmark = pytest.mark.integration

MODEL = "uci_har"  # the smallest shipped model: the quickest replica to (re)start
CLASSES = ("phone", "iot_board", "watch", "sensor_node")  # config.planner.classes, one device each
SECRET = "fleet-fault-integration-secret-0123456789"
CUT = 3  # the forced cut of the devices with local fallback: stages [3, 6) in the cloud
FORCED = ForcedChoice(CUT, Codec.FP32, 1.0, "the test's fixed cut: offload every window the breaker allows")
SPEED = 12.8  # UCI HAR windows come every 1.28 s: one every 100 ms
SENSOR_SPEED = 6.4  # the sensor node: one every 200 ms
# The node replays faster than real time: its store holds the span of outage the class's default
# store holds at real time.
SENSOR_STORE_BYTES = int(DEFAULT_CAPACITY_BYTES * SENSOR_SPEED)
MAX_WINDOWS = 1500  # hard bound on a device's stream (150 s): a run that hangs still ends
DEADLINE_MS = 300.0
BREAKER = BreakerConfig(
    failure_threshold=3, backoff_base_s=0.3, backoff_factor=2.0, backoff_max_s=1.0, backoff_jitter=0.2
)
BACKOFF_BOUND_S = BREAKER.backoff_max_s * (1 + BREAKER.backoff_jitter)
RECONNECT_S = 1.0  # GrpcTransport caps the channel's own reconnect back-off at 1 s
SLACK_S = 2.0  # a cold first call on a new replica or broker, scheduling on 2 shared, loaded cores
# After the last faulted part is back: the breaker's longest back-off, the channel's reconnect, a
# deadline and a window (a probe that just missed it), and slack.
OFFLOAD_BOUND_S = BACKOFF_BOUND_S + RECONNECT_S + DEADLINE_MS / 1000 + 1.28 / SENSOR_SPEED + SLACK_S
PERIOD_S = 0.5  # controller period
FEED_RETRY_MAX_S = 1.0  # the plan feed's Redis retry back-off cap
# After the last faulted part is back: the feed's reconnection, two controller passes (one may
# have started before the part was back), the store -> feed -> broker -> WatchPlan push with a
# device's re-watch back-off (its breaker's, capped at 1 s +-20%), and slack.
PLAN_BOUND_S = FEED_RETRY_MAX_S + 2 * PERIOD_S + BACKOFF_BOUND_S + 1.0 + SLACK_S
STEADY_N = 5  # results in a row answered by the cloud, per device, before a fault
STEADY_S = 1.5  # ... then this long more of steady offloading
DOWN_S = 2.5  # how long the faulted parts stay down (the replica: however long Serve takes)
STABLE_S = 2.0  # after recovery, watched for crash loops
# ... in which every device offloads at least this share of its windows (the rest: the odd late
# answer on this loaded machine, and the breaker's short back-off after a few of them)
STABLE_SHARE = 1 / 3
# What a fault off the data path must never cause: an offload the cloud refused or could not answer
# (load alone makes late, deadline, shed, breaker and probing windows)
CLOUD_ERRORS = {FallbackKind.UNAVAILABLE, FallbackKind.REJECTED, FallbackKind.ERROR}
READY_TIMEOUT_S = 60.0  # bounds on every wait: a fault test must never hang
RECOVERY_TIMEOUT_S = 45.0
RESTART_TIMEOUT_S = 45.0  # Serve's replacement replica (2-3 s here; far slower when overloaded)
RUN_LIMIT_S = 150.0
OK = ("published", "unchanged")

# The runs: each fault alone, then two at once.
RUNS = (
    ("redis",),
    ("prometheus",),
    ("controller",),
    ("ray_replica",),
    ("broker",),
    ("redis", "broker"),
    ("prometheus", "controller"),
    ("ray_replica", "broker"),
)
INTERRUPTS_OFFLOAD = {"ray_replica", "broker"}  # the others are off the data path


@pytest.fixture(scope="module")
def tails(ray_cluster: str) -> Iterator[RayTailBackend]:
    backend = start_serving(ServingConfig(models=(MODEL,), num_replicas=1, request_timeout_s=1.0))
    yield backend
    stop_serving()


@pytest.fixture(scope="module")
def trained() -> TrainedModel:
    return load_trained(MODEL)


@pytest.fixture(scope="module")
def catalog() -> ModelCatalog:
    return load_catalog(MODEL)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def until(what: str, check: Callable[[], bool | Awaitable[bool]], timeout_s: float, step_s: float = 0.1) -> float:
    """Wait (bounded) until `check()` holds; returns time.monotonic() when it first did."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if not isinstance(value, bool):
            value = await value
        if value:
            return time.monotonic()
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")
        await asyncio.sleep(step_s)


# ---------------------------------------------------------------------------------------------
# The cloud, each part restartable in place


@dataclass(frozen=True)
class Pass:
    """One controller pass, on time.monotonic()."""

    started: float
    ended: float
    controller: int  # which controller (0, then 1 after a restart)
    outcome: str
    version: int | None
    dependencies: dict[str, bool]

    @property
    def all_up(self) -> bool:
        return bool(self.dependencies) and all(self.dependencies.values())


@dataclass
class Replica:
    """What the watcher saw of one replica kill, on time.monotonic()."""

    old: str
    killed_at: float
    running_at: float
    new: str


def kill_replica_and_watch() -> Replica:
    """Kill the model's replica actor, then watch (bounded) until Serve runs a new one. Blocking Ray
    calls: run it in a thread."""
    import ray
    from ray import serve

    (old,) = replica_actor_names(MODEL)
    actor = ray.get_actor(old, namespace="serve")
    killed_at = time.monotonic()
    ray.kill(actor, no_restart=False)  # Serve's replicas have max_restarts=0: Serve starts a new one
    end = killed_at + RESTART_TIMEOUT_S
    while time.monotonic() < end:
        names = replica_actor_names(MODEL)
        new = [n for n in names if n != old]
        if new and old not in names:
            deployment = serve.status().applications[app_name(MODEL)].deployments["tail"]
            states = {str(k).rsplit(".", 1)[-1]: v for k, v in deployment.replica_states.items()}
            if states.get("RUNNING", 0) >= 1 and not states.get("STARTING", 0):
                return Replica(old, killed_at, time.monotonic(), new[0])
        time.sleep(0.05)
    raise AssertionError(f"Serve did not run a new replica of {MODEL} within {RESTART_TIMEOUT_S:g} s")


def serve_running() -> bool:
    from ray import serve

    app = serve.status().applications.get(app_name(MODEL))
    return app is not None and str(app.status).rsplit(".", 1)[-1] == "RUNNING" and len(replica_actor_names(MODEL)) == 1


class Cloud:
    """Redis, Prometheus, the broker (with exporter and plan feed) and the controller of one run."""

    def __init__(
        self, redis: Any, prometheus: Any, backend: RayTailBackend, models: ModelRegistry, catalog: ModelCatalog
    ) -> None:
        self.redis, self.prometheus, self.backend, self.models = redis, prometheus, backend, models
        self.catalogs = {MODEL: catalog}
        self.devices = {c: DEVICE_CLASSES[c] for c in CLASSES}
        self.broker_port, self.exporter_port = _free_port(), _free_port()
        self.config = Config(
            serving=ServingConfig(models=(MODEL,)),
            controller=ControllerConfig(
                period_s=PERIOD_S,
                prometheus_url=prometheus.url,
                redis_url=redis.url,
                query_window_s=4.0,  # 4 scrape intervals
                prometheus_timeout_s=1.0,
                redis_timeout_s=0.5,
            ),
        )
        # local_tail=False: every batch goes to Ray Serve, so that a killed replica is an outage of
        # the data path (with the broker's own tail an idle lane skips Ray and hides most of it).
        # This test found that with the local tail the outage's inflated Ray estimate never came
        # down (busy-lane windows shed on it, idle-lane ones run locally); fixed in cloud/batcher.py
        # and cloud/admission.py, tested in tests/unit/cloud/test_batcher.py and test_admission.py.
        self.broker_config = BrokerConfig(
            port=self.broker_port,
            metrics_port=None,
            auth_secret=SECRET,
            static_plan_cut=CUT,
            shutdown_grace_s=0.5,
            local_tail=False,
        )
        self.broker: Broker | None = None
        self.brokers = 0
        self._exporter: tuple[Any, Any] | None = None
        self.feed: PlanSubscriber | None = None
        self._feed_store: PlanStore | None = None
        self.controller: Controller | None = None
        self.controllers = 0
        self._controller_task: asyncio.Task[None] | None = None
        self._controller_stop = asyncio.Event()
        self._controller_store: PlanStore | None = None
        self.passes: list[Pass] = []
        self.reader = PlanStore(redis.url, timeout_s=0.5)  # the test's own view of the store

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.broker_port}"

    # --- broker, exporter, plan feed ------------------------------------------------------------

    async def start_broker(self) -> None:
        registry = CollectorRegistry()
        broker = Broker(
            self.broker_config, self.models, self.backend, metrics_registry=registry, device_classes=CLASSES
        )
        await broker.start()
        self.broker = broker
        self.brokers += 1
        self._exporter = start_http_server(self.exporter_port, addr="127.0.0.1", registry=registry)
        self._feed_store = PlanStore(self.redis.url_for("broker"), timeout_s=0.5)
        self.feed = PlanSubscriber(
            self._feed_store, broker, poll_s=0.5, retry_initial_s=0.1, retry_max_s=FEED_RETRY_MAX_S
        )
        self.feed.start()

    async def stop_broker(self) -> None:
        feed, self.feed = self.feed, None
        if feed is not None:
            await feed.stop()
        store, self._feed_store = self._feed_store, None
        if store is not None:
            await store.aclose()
        broker, self.broker = self.broker, None
        if broker is not None:
            await broker.stop(self.broker_config.shutdown_grace_s)
        exporter, self._exporter = self._exporter, None
        if exporter is not None:
            server, thread = exporter

            def shut() -> None:
                server.shutdown()
                server.server_close()
                thread.join(timeout=5)

            await asyncio.to_thread(shut)

    # --- controller -------------------------------------------------------------------------------

    async def start_controller(self) -> None:
        c = self.config.controller
        assert c.prometheus_url is not None and c.redis_url is not None
        store = PlanStore(c.redis_url, history_versions=c.history_versions, timeout_s=c.redis_timeout_s)
        source = PrometheusSource(
            c.prometheus_url, window_s=c.query_window_s, timeout_s=c.prometheus_timeout_s, device_classes=CLASSES
        )
        ctl = Controller(self.config, source, store, self.catalogs, self.devices, registry=CollectorRegistry())
        generation = self.controllers

        def on_pass(report: PassReport) -> None:
            now = time.monotonic()
            self.passes.append(
                Pass(
                    now - report.duration_s, now, generation, report.outcome, report.version, dict(report.dependencies)
                )
            )

        self._controller_stop = asyncio.Event()
        self._controller_task = asyncio.create_task(ctl.run_forever(self._controller_stop, on_pass), name="controller")
        self.controller, self._controller_store = ctl, store
        self.controllers += 1

    async def crash_controller(self) -> None:
        """The controller's process dies: its loop is cancelled wherever it is, its connections go."""
        task, self._controller_task = self._controller_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        store, self._controller_store = self._controller_store, None
        if store is not None:
            await store.aclose()
        self.controller = None

    async def stop_controller(self) -> None:
        task = self._controller_task
        if task is not None:
            self._controller_stop.set()
            try:
                await asyncio.wait_for(asyncio.shield(task), 5.0)
            except TimeoutError:
                pass
        await self.crash_controller()

    @property
    def controller_running(self) -> bool:
        return self._controller_task is not None and not self._controller_task.done()

    @property
    def feed_running(self) -> bool:
        task = getattr(self.feed, "_task", None)
        return task is not None and not task.done()

    # --- the whole ------------------------------------------------------------------------------

    async def start(self) -> None:
        await self.start_broker()
        self.prometheus.add_targets([f"127.0.0.1:{self.exporter_port}"], name="broker")
        await self.start_controller()

    async def stop(self) -> None:
        for step in (self.stop_controller, self.stop_broker, self.reader.aclose):
            with contextlib.suppress(Exception):
                await step()

    async def stored_version(self) -> int | None:
        try:
            current = await self.reader.current()
        except Exception:  # Redis down: unknown
            return None
        return current.version if current is not None else None

    def scraped_since(self, unix_s: float) -> bool:
        """Whether Prometheus scraped the broker's exporter successfully after `unix_s`."""
        query = urllib.parse.urlencode({"query": f'timestamp(up{{instance="127.0.0.1:{self.exporter_port}"}} == 1)'})
        try:
            with urllib.request.urlopen(f"{self.prometheus.url}/api/v1/query?{query}", timeout=2) as r:
                result = json.loads(r.read())["data"]["result"]
        except (OSError, ValueError, KeyError):
            return False
        return bool(result) and float(result[0]["value"][1]) > unix_s

    async def health(self) -> str:
        try:
            async with grpc.aio.insecure_channel(self.address) as channel:
                stub = health_pb2_grpc.HealthStub(channel)
                resp = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2.0)
        except grpc.aio.AioRpcError as e:
            return f"unreachable ({e.code().name})"
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status))


# ---------------------------------------------------------------------------------------------
# The fleet


@dataclass
class Device:
    device_id: str
    device_class: str
    device: EdgeDevice
    transport: GrpcTransport
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    emitted: dict[str, float] = field(default_factory=dict)
    done: list[tuple[WindowResult, float]] = field(default_factory=list)
    task: asyncio.Future[RunSummary] | None = None

    @staticmethod
    def cloud(r: WindowResult) -> bool:
        """Answered by the cloud: offloaded in time, or stored and forwarded."""
        return r.mode in (ExecutionMode.OFFLOADED, ExecutionMode.DEFERRED)

    def steady(self) -> bool:
        last = self.done[-STEADY_N:]
        return len(last) == STEADY_N and all(self.cloud(r) for r, _ in last)

    def start(self, speed: float) -> None:
        async def windows() -> AsyncIterator[SensorWindow]:
            it = aiter(source_for_model(MODEL, speed=speed, limit=MAX_WINDOWS))
            while not self.stop.is_set():
                try:
                    w = await anext(it)
                except StopAsyncIteration:
                    return
                self.emitted[w.window_id] = w.t_emit
                yield w

        def progress(r: WindowResult) -> None:
            self.done.append((r, time.monotonic()))

        self.task = asyncio.ensure_future(self.device.run(windows(), progress=progress))

    def first_cloud_after(self, t: float) -> float | None:
        return next((at for r, at in self.done if at >= t and self.cloud(r)), None)

    def between(self, t0: float, t1: float) -> list[WindowResult]:
        return [r for r, at in self.done if t0 <= at < t1]

    def longest_gap(self, since: float) -> float:
        """Longest time without a cloud answer from `since` on."""
        times = [since] + [at for r, at in self.done if at >= since and self.cloud(r)]
        return max((b - a for a, b in zip(times, times[1:], strict=False)), default=0.0)


def make_fleet(address: str, trained: TrainedModel, catalog: ModelCatalog) -> list[Device]:
    fleet = []
    for cls_name in CLASSES:
        hw = DEVICE_CLASSES[cls_name]
        device_id = f"fault-{cls_name}"
        token = device_token(SECRET, device_id)
        fallback = edge_fallback(hw, catalog)  # the sensor node: no local model, store and forward
        cfg = EdgeConfig(
            broker_address=address,
            device_id=device_id,
            device_class=cls_name,
            token=token,
            model=MODEL,
            deadline_ms=DEADLINE_MS,
            default_cut=CUT if not fallback else 0,
            default_codec="fp32",
            replay_speed=SPEED if not fallback else SENSOR_SPEED,
            telemetry_period_s=0.5,
            active_mw=hw.active_mw,
            radio=hw.radio.value,
            battery_mwh=hw.battery_mwh,
            breaker=BREAKER,
        )
        transport = GrpcTransport(address, token, device_id=device_id)
        extra: dict[str, Any] = dict(fallback)
        if fallback:
            extra["store_capacity_bytes"] = SENSOR_STORE_BYTES
        device = EdgeDevice(cfg, trained, transport, choose=None if fallback else (lambda: FORCED), **extra)
        fleet.append(Device(device_id, cls_name, device, transport))
    return fleet


async def stop_fleet(fleet: list[Device], timeout_s: float = 20.0) -> list[RunSummary | BaseException]:
    for d in fleet:
        d.stop.set()
    tasks = [d.task for d in fleet if d.task is not None]
    try:
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), timeout_s)
    except TimeoutError:
        for t in tasks:
            t.cancel()
    out: list[RunSummary | BaseException] = []
    for d in fleet:
        assert d.task is not None
        if d.task.cancelled():
            out.append(TimeoutError(f"{d.device_id} did not end within {timeout_s:g} s"))
        elif d.task.exception() is not None:
            out.append(d.task.exception())  # type: ignore[arg-type]
        else:
            out.append(d.task.result())
        with contextlib.suppress(Exception):
            await d.transport.close()
    return out


# ---------------------------------------------------------------------------------------------
# One run


@dataclass
class Faults:
    """Take the run's parts down and bring them back, timing each."""

    cloud: Cloud
    names: tuple[str, ...]
    t_up: dict[str, float] = field(default_factory=dict)
    replica: Replica | None = None
    _watch: asyncio.Future[Replica] | None = None

    async def down(self, name: str) -> None:
        c = self.cloud
        if name == "redis":
            await asyncio.to_thread(c.redis.stop)
        elif name == "prometheus":
            await asyncio.to_thread(c.prometheus.stop)
        elif name == "controller":
            await c.crash_controller()
        elif name == "broker":
            await c.stop_broker()
        elif name == "ray_replica":
            self._watch = asyncio.ensure_future(asyncio.to_thread(kill_replica_and_watch))
        else:
            raise AssertionError(name)

    async def up(self, name: str) -> None:
        c = self.cloud
        if name == "redis":
            await asyncio.to_thread(c.redis.start)
        elif name == "prometheus":
            await asyncio.to_thread(c.prometheus.start)
        elif name == "controller":
            await c.start_controller()
        elif name == "broker":
            await c.start_broker()
        elif name == "ray_replica":  # Serve restarts it by itself
            assert self._watch is not None
            self.replica = await self._watch
            self.t_up[name] = self.replica.running_at
            return
        self.t_up[name] = time.monotonic()


def _write_report(run: str, figures: dict[str, Any]) -> None:
    path = os.environ.get("SPLITSENSE_FAULT_REPORT")
    if not path:
        return
    target = Path(path)
    data: dict[str, Any] = {}
    if target.exists():
        with contextlib.suppress(ValueError):
            data = json.loads(target.read_text())
    data[run] = figures
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    tmp.replace(target)


def _share(d: Device, t0: float, t1: float) -> float | None:
    """The share of `d`'s results in [t0, t1) that the cloud answered."""
    results = d.between(t0, t1)
    return sum(1 for r in results if d.cloud(r)) / len(results) if results else None


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


@pytest.mark.parametrize("faults", RUNS, ids=["+".join(r) for r in RUNS])
async def test_fleet_run_survives_restarts(
    faults: tuple[str, ...],
    tails: RayTailBackend,
    trained: TrainedModel,
    catalog: ModelCatalog,
    redis_server: Any,
    prometheus_server: Any,
    caplog: pytest.LogCaptureFixture,
    record_property: Callable[[str, object], None],
) -> None:
    caplog.set_level(logging.WARNING)
    run = "+".join(faults)
    t_start = time.monotonic()
    await until("Serve running one replica of the tail", lambda: asyncio.to_thread(serve_running), 60, 0.25)
    cloud = Cloud(redis_server, prometheus_server, tails, ModelRegistry([MODEL]), catalog)
    fleet: list[Device] = []
    summaries: list[RunSummary | BaseException] = []
    injector = Faults(cloud, faults)
    try:
        async with asyncio.timeout(RUN_LIMIT_S):
            await cloud.start()
            fleet = make_fleet(cloud.address, trained, catalog)
            for d in fleet:
                d.start(SENSOR_SPEED if not d.device.local_fallback else SPEED)

            # --- steady: the controller's plan everywhere, every device offloading -----------------
            async def settled() -> bool:
                stored = await cloud.stored_version()
                b = cloud.broker
                return (
                    stored is not None
                    and stored >= 2
                    and b is not None
                    and b.plans.version == stored
                    and all(d.device.plan_version == stored for d in fleet)
                    and any(p.outcome in OK and p.all_up for p in cloud.passes)
                    and all(d.steady() for d in fleet)
                )

            try:
                await until("a steady fleet on the controller's plan", settled, READY_TIMEOUT_S, 0.2)
            except AssertionError:
                seen = {d.device_id: Counter(r.mode.value for r, _ in d.done) for d in fleet}
                raise AssertionError(
                    f"no steady fleet within {READY_TIMEOUT_S:g} s: {seen}; "
                    f"passes {Counter(p.outcome for p in cloud.passes)}"
                ) from None
            await asyncio.sleep(STEADY_S)
            version_before = await cloud.stored_version()
            assert version_before is not None
            redis_pid = prometheus_pid = None

            # --- the faults, at once; DOWN_S later the restarts, at once ---------------------------
            t_fault = time.monotonic()
            await asyncio.gather(*(injector.down(n) for n in faults))
            t_downed = time.monotonic()
            await asyncio.sleep(max(0.0, t_fault + DOWN_S - time.monotonic()))
            await asyncio.gather(*(injector.up(n) for n in faults))
            t_restored = max(injector.t_up.values())
            restored_unix = time.time() - (time.monotonic() - t_restored)
            if "redis" in faults:
                redis_pid = redis_server.proc.pid
            if "prometheus" in faults:
                prometheus_pid = prometheus_server.proc.pid

            # --- recovery ----------------------------------------------------------------------
            async def plans_agree() -> bool:
                stored = await cloud.stored_version()
                b = cloud.broker
                ok_pass = any(p.started >= t_restored and p.outcome in OK and p.all_up for p in cloud.passes)
                return (
                    ok_pass
                    and stored is not None
                    and stored >= 2
                    and (stored > version_before or "redis" not in faults)
                    and b is not None
                    and b.plans.version == stored
                    and all(d.device.plan_version == stored for d in fleet)
                )

            t_plans = await until("the plans to agree again", plans_agree, RECOVERY_TIMEOUT_S, 0.1)
            await until(
                "every device to offload again",
                lambda: all(d.first_cloud_after(t_restored) is not None for d in fleet),
                RECOVERY_TIMEOUT_S,
            )
            t_scraped = await until(
                "Prometheus to scrape the broker's exporter again",
                lambda: asyncio.to_thread(cloud.scraped_since, restored_unix),
                RECOVERY_TIMEOUT_S,
                0.2,
            )
            t_recovered = time.monotonic()
            await asyncio.sleep(STABLE_S)

            # --- nothing crash-loops -----------------------------------------------------------
            health = await cloud.health()
            replicas = await asyncio.to_thread(replica_actor_names, MODEL)
            stored_end = await cloud.stored_version()
            controller_deps = cloud.controller.dependencies() if cloud.controller is not None else {}
            alive = {
                "redis": redis_server.proc is not None and redis_server.proc.poll() is None and redis_server.ping(),
                "prometheus": prometheus_server.proc is not None
                and prometheus_server.proc.poll() is None
                and prometheus_server.ready(),
                "controller": cloud.controller_running,
                "plan_feed": cloud.feed_running,
                "broker": health == "SERVING",
                "scraped": await asyncio.to_thread(cloud.scraped_since, time.time() - STABLE_S),
            }
            same_process = {
                "redis": redis_pid is None or redis_server.proc.pid == redis_pid,
                "prometheus": prometheus_pid is None or prometheus_server.proc.pid == prometheus_pid,
            }
            t_end = time.monotonic()
            summaries = await stop_fleet(fleet)
    finally:
        if not summaries and fleet:
            summaries = await stop_fleet(fleet)
        await cloud.stop()
        if injector._watch is not None and not injector._watch.done():  # a failed run: let Serve finish
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(injector._watch, RESTART_TIMEOUT_S)

    # --- figures --------------------------------------------------------------------------------
    devices: dict[str, dict[str, Any]] = {}
    for d, summary in zip(fleet, summaries, strict=True):
        ids = Counter(r.window_id for r, _ in d.done)
        first = d.first_cloud_after(t_restored)
        during = d.between(t_fault, t_restored)
        devices[d.device_id] = {
            "class": d.device_class,
            "windows": len(d.emitted),
            "results": len(d.done),
            "lost": len(set(d.emitted) - set(ids)) + (summary.lost if isinstance(summary, RunSummary) else 0),
            "duplicated": sum(n - 1 for n in ids.values() if n > 1),
            "pending": summary.pending if isinstance(summary, RunSummary) else None,
            "by_mode": dict(Counter(r.mode.value for r, _ in d.done)),
            "by_kind": dict(Counter(r.kind.value for r, _ in d.done if r.kind is not None)),
            "during_fault": dict(Counter(r.mode.value for r in during)),
            "offload_again_after_restart_s": _r(None if first is None else first - t_restored),
            "offload_again_after_fault_s": _r(None if first is None else first - t_fault),
            "longest_offload_gap_s": _r(d.longest_gap(t_fault)),
            "offloaded_share_after_recovery": _r(_share(d, t_recovered, t_end)),
            "plan_version": d.device.plan_version,
        }
    passes_after_plans = [p for p in cloud.passes if p.started >= t_plans]
    figures: dict[str, Any] = {
        "faults": list(faults),
        "down_s": {n: _r(injector.t_up[n] - t_fault) for n in faults},
        "inject_s": _r(t_downed - t_fault),
        "replica_restart_s": _r(injector.replica.running_at - injector.replica.killed_at) if injector.replica else None,
        "plan_version_before": version_before,
        "plan_version_after": stored_end,
        "plan_recovery_after_restart_s": _r(t_plans - t_restored),
        "plan_recovery_after_fault_s": _r(t_plans - t_fault),
        # the last device to offload again, and everything (plans, offloads, scrapes) back
        "offload_recovery_after_restart_s": max(
            (
                v["offload_again_after_restart_s"]
                for v in devices.values()
                if v["offload_again_after_restart_s"] is not None
            ),
            default=None,
        ),
        "scrape_recovery_after_restart_s": _r(t_scraped - t_restored),
        "all_recovered_after_restart_s": _r(t_recovered - t_restored),
        "controller_outcomes": dict(Counter(p.outcome for p in cloud.passes)),
        "controller_outcomes_during_fault": dict(
            Counter(p.outcome for p in cloud.passes if t_fault <= p.started < t_restored)
        ),
        "controller_outcomes_after_recovery": dict(Counter(p.outcome for p in passes_after_plans)),
        "controllers_started": cloud.controllers,
        "brokers_started": cloud.brokers,
        "stable_s": _r(t_end - t_recovered),
        "alive": alive,
        "wall_s": _r(time.monotonic() - t_start),
        "devices": devices,
    }
    _write_report(run, figures)
    for key in ("plan_recovery_after_restart_s", "offload_recovery_after_restart_s"):
        record_property(key, figures[key])
    per_device = ", ".join(
        f"{v['class']} {v['windows']}w/{v['results']}r lost {v['lost']} "
        f"{'/'.join(f'{m}:{n}' for m, n in sorted(v['by_mode'].items()))} "
        f"again {v['offload_again_after_restart_s']}s"
        for v in devices.values()
    )
    print(
        f"\n[faults {run}] down {figures['down_s']} s; plans v{version_before}->v{stored_end} "
        f"recovered {figures['plan_recovery_after_restart_s']} s after the restart "
        f"({figures['plan_recovery_after_fault_s']} s after the fault); controller {figures['controller_outcomes']}; "
        f"{per_device}"
    )

    # --- checks ---------------------------------------------------------------------------------
    # no window lost, none answered twice
    for d, summary in zip(fleet, summaries, strict=True):
        assert isinstance(summary, RunSummary), f"{d.device_id}: {summary!r}"
        ids = Counter(r.window_id for r, _ in d.done)
        assert set(ids) == set(d.emitted), f"{d.device_id}: windows without a result: {set(d.emitted) - set(ids)}"
        assert all(n == 1 for n in ids.values()), f"{d.device_id}: windows with two results"
        assert summary.lost == 0 and summary.pending == 0, (d.device_id, summary)
        assert summary.windows == len(d.emitted)

    # the fault was real: what it interrupts, it interrupted; what it does not, it left alone (on
    # this loaded machine the breaker may open on late answers now and then, but no offload fails
    # because the cloud refused it or could not be reached)
    for d in fleet:
        during = d.between(t_fault, t_restored)
        if not INTERRUPTS_OFFLOAD & set(faults):
            refused = Counter(r.kind.value for r in during if r.kind in CLOUD_ERRORS)
            assert not refused and any(d.cloud(r) for r in during), (
                f"{d.device_id} stopped offloading during {run}: {Counter(r.mode.value for r in during)}, {refused}"
            )
    if INTERRUPTS_OFFLOAD & set(faults):
        assert any(not d.cloud(r) for d in fleet for r in d.between(t_fault, t_restored)), "nothing was interrupted"

    # the devices offload again, within the bound
    for name, v in devices.items():
        again = v["offload_again_after_restart_s"]
        assert again is not None and again <= OFFLOAD_BOUND_S, f"{name} offloads again {again} s after the restart"

    # plans recover, within the bound, and agree everywhere (a Redis restart: under a new version)
    assert t_plans - t_restored <= PLAN_BOUND_S, f"plans agreed {t_plans - t_restored:.2f} s after the restart"
    assert stored_end is not None and stored_end >= version_before
    if "redis" in faults:
        assert stored_end > version_before, "the controller did not publish again into the emptied store"

    # the controller says what was down while it was, then recovers; never "error"
    outcomes = figures["controller_outcomes"]
    assert "error" not in outcomes and "refused" not in outcomes, outcomes
    if "controller" not in faults:
        during = figures["controller_outcomes_during_fault"]
        if "redis" in faults:
            assert during.get("store-down", 0) >= 1, during
        if "prometheus" in faults:
            assert during.get("no-metrics", 0) >= 1, during
    else:
        assert cloud.controllers == 2
    assert passes_after_plans and all(p.outcome in OK and p.all_up for p in passes_after_plans), [
        (p.outcome, p.dependencies) for p in passes_after_plans
    ]

    # nothing crash-loops: the fleet keeps offloading after the recovery, every restarted part
    # stayed up, as the same process or replica
    for name, v in devices.items():
        share = v["offloaded_share_after_recovery"]
        assert share is not None and share >= STABLE_SHARE, f"{name} offloaded {share} of its windows after recovery"
    assert all(alive.values()), alive
    assert all(same_process.values()), same_process
    assert controller_deps and all(dep["up"] for dep in controller_deps.values()), controller_deps
    if injector.replica is not None:
        assert replicas == [injector.replica.new], (replicas, injector.replica)
    else:
        assert len(replicas) == 1
    assert cloud.brokers == (2 if "broker" in faults else 1)
    logged = [
        f"{r.name}: {r.getMessage()}"
        for r in caplog.records
        if r.levelno >= logging.ERROR and r.name.split(".")[0] in ("cloud", "edge")
    ]
    assert not logged, logged
