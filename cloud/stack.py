"""The whole cloud side in one process: what `splitsense demo`, `simulate` and the integration
tests start, on embedded defaults.

    async with CloudStack(config, progress=print) as stack:
        stack.broker_address      host:port the devices dial (stack.token_for(device_id) to log in)
        stack.metrics_url         the broker's (and the controller's) Prometheus exporter
        stack.redis_url           the plan store

Started in this order, stopped in the reverse one (each step logged, also on cancellation or
Ctrl-C, and after a start that failed half-way):

    1. models        the served models' weights (ModelRegistry) and the planner's catalogs
    2. tails         Ray Serve (start_serving: a local Ray, dashboard off; 5-12 s cold), or the
                     in-process twin (`with_ray=False`), or a backend the caller brings
    3. Redis         controller.redis_url, else a real redis-server of our own (EmbeddedRedis)
    4. broker        gRPC on broker.host:broker.port (0: a free port), static plan until step 6
    5. exporter      the broker's and controller's metrics on broker.host:broker.metrics_port
                     (None or 0: a free port; the embedded metrics source reads it)
    6. plan feed     PlanSubscriber: the store's watch -> Broker.set_plans -> WatchPlan pushes
    7. controller    metrics source (PrometheusSource on controller.prometheus_url, else the
                     exporter of step 5 read directly) -> Controller.run_forever

Every part is built by cloud/wiring.py's factories, as `splitsense cloud up` and `controller run`
build theirs: the plan store (URL or embedded Redis, one ACL user per role), the exporter, the
metrics source, the exposure check, signal handling. The plan feed is cloud/plan_feed.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import replace
from types import TracebackType
from typing import Any

from prometheus_client import CollectorRegistry

from cloud.auth import device_token
from cloud.backend import InProcessTailBackend, ModelRegistry, TailBackend
from cloud.broker import Broker
from cloud.controller.loop import Controller, PassReport
from cloud.controller.metrics_source import MetricsSource
from cloud.plan_feed import PlanSubscriber
from cloud.planstore import PlanStore, redact_url
from cloud.wiring import (
    Exporter,
    check_broker_exposure,
    describe_source,
    finish_in_thread,
    follow_plans,
    load_catalogs,
    metrics_source,
    open_plan_store,
    plan_store_urls,
    planner_devices,
    stop_on_signals,
)
from pipelines.catalog import ModelCatalog
from pipelines.devices import DeviceClass
from splitsense.config import Config
from splitsense.errors import ConfigError

__all__ = [
    "CONTROLLER_METRICS_PORT",
    "CloudStack",
    "PlanSubscriber",
    "run_controller_forever",
    "with_ports",
]

log = logging.getLogger(__name__)

ProgressFn = Callable[[str], None]
CONTROLLER_METRICS_PORT = 9465  # next to the broker's 9464; deploy/prometheus scrapes it


def _noop(_: str) -> None:
    pass


# ---------------------------------------------------------------------------------------------
# The stack


class CloudStack:
    """Ray Serve tails, broker, exporter, Redis, plan feed and controller; see the module docstring.

    `with_ray=False` uses the in-process tails (tests, quick demos); `backend=` uses the caller's
    TailBackend instead (not closed here). `catalogs=` overrides the shipped catalogs, `devices=`
    the device classes planned for (default: planner.classes, figures from pipelines.devices);
    `with_controller=False` starts everything but the controller loop (it is still built: tests
    call `stack.controller.run_once()`). `progress(step)` is told each start-up step (Ray's from a
    worker thread), e.g. for a CLI status line.
    """

    def __init__(
        self,
        config: Config | None = None,
        *,
        with_ray: bool = True,
        backend: TailBackend | None = None,
        catalogs: Mapping[str, ModelCatalog] | None = None,
        devices: Mapping[str, DeviceClass] | None = None,
        with_controller: bool = True,
        progress: ProgressFn | None = None,
        metrics_registry: CollectorRegistry | None = None,
    ) -> None:
        self.config = config or Config()
        self.with_ray = with_ray and backend is None
        self._given_backend = backend
        self._given_catalogs = dict(catalogs) if catalogs is not None else None
        self.devices = dict(devices) if devices is not None else planner_devices(self.config)
        self.with_controller = with_controller
        self._say = progress or _noop
        self.registry = CollectorRegistry() if metrics_registry is None else metrics_registry
        self.models: ModelRegistry | None = None
        self.catalogs: dict[str, ModelCatalog] = {}
        self.backend: TailBackend | None = None
        self._ray_started = False
        self._plan_store_scope = contextlib.AsyncExitStack()  # the embedded Redis, when one runs
        self._redis_url: str | None = None
        self.store: PlanStore | None = None  # the controller's (writes)
        self._broker: Broker | None = None
        self._exporter: Exporter | None = None
        self.source: MetricsSource | None = None
        self.subscriber: PlanSubscriber | None = None
        self._controller: Controller | None = None
        self._controller_stop = asyncio.Event()
        self._controller_task: asyncio.Task[None] | None = None
        self._started = False

    # --- what callers use ----------------------------------------------------------------------

    @property
    def broker(self) -> Broker:
        if self._broker is None:
            raise ConfigError("the cloud stack is not started: use `async with CloudStack(...)`")
        return self._broker

    @property
    def controller(self) -> Controller:
        if self._controller is None:
            raise ConfigError("the cloud stack is not started: use `async with CloudStack(...)`")
        return self._controller

    @property
    def tail_engine(self) -> dict[str, str]:
        """{"kind", "why"}: what runs the tails (serving.tail_engine): the replicas' engine with Ray,
        this process's otherwise (the broker's own tail, broker.local_tail, runs the same)."""
        be = self.backend
        engine = getattr(be, "tail_engine", None)
        if isinstance(engine, tuple):
            return {"kind": engine[0], "why": engine[1]}
        engines = sorted(set(be.engines.values())) if isinstance(be, InProcessTailBackend) else []
        if engines:
            return {"kind": "/".join(engines), "why": f"in process ({self.config.serving.tail_engine})"}
        return {"kind": "torch", "why": "in process"}

    @property
    def broker_address(self) -> str:
        return self.broker.address

    @property
    def metrics_address(self) -> str:
        """host:port of the exporter (a Prometheus scrape target)."""
        if self._exporter is None:
            raise ConfigError("the cloud stack is not started: use `async with CloudStack(...)`")
        return self._exporter.address

    @property
    def metrics_url(self) -> str:
        return f"http://{self.metrics_address}/metrics"

    @property
    def redis_url(self) -> str:
        if self._redis_url is None:
            raise ConfigError("the cloud stack is not started: use `async with CloudStack(...)`")
        return self._redis_url

    def token_for(self, device_id: str) -> str:
        """The token device `device_id` logs in with (HMAC under broker.auth_secret)."""
        return device_token(self.config.broker.auth_secret, device_id)

    # --- life cycle ------------------------------------------------------------------------------

    async def __aenter__(self) -> CloudStack:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    async def start(self) -> None:
        """Start every part in order; on any failure (or cancellation) stop what was started."""
        if self._started:
            raise ConfigError("a CloudStack is started once; make a new one")
        self._started = True
        t0 = time.monotonic()
        try:
            await self._start()
        except BaseException:
            log.warning("cloud stack start-up failed after %.1f s; stopping what was started", time.monotonic() - t0)
            await self.stop()
            raise
        self._say(f"cloud stack ready in {time.monotonic() - t0:.1f} s")
        log.info(
            "cloud stack ready in %.1f s: broker %s, metrics %s, redis %s",
            time.monotonic() - t0,
            self.broker_address,
            self.metrics_url,
            redact_url(self.redis_url),
        )

    async def _step(self, what: str, fn: Callable[[], Awaitable[Any]]) -> Any:
        self._say(what)
        log.info("cloud stack: %s", what)
        return await fn()

    async def _start(self) -> None:
        cfg = self.config
        models = tuple(cfg.serving.models)
        weights = cfg.paths.weights_dir

        # 1. models and catalogs
        self.models = await self._step(
            f"loading models: {', '.join(models)}", lambda: finish_in_thread(ModelRegistry, models, weights)
        )
        if self._given_catalogs is not None:
            self.catalogs = self._given_catalogs
        else:
            self.catalogs = await asyncio.to_thread(load_catalogs, models, weights)

        # 2. tails
        if self._given_backend is not None:
            self.backend = self._given_backend
        elif self.with_ray:
            self.backend = await self._step("starting Ray Serve tails (Ray cold start: 5-12 s)", self._start_ray)
        else:
            self.backend = InProcessTailBackend(self.models, engine=cfg.serving.tail_engine)

        # 3. Redis and the plan store
        # The controller writes plans with its own Redis user; the broker reads and follows them with
        # a read-only one (cloud/planstore.py ACL_RULES), in the embedded Redis as in deploy/redis.
        c = cfg.controller
        urls = await self._plan_store_scope.enter_async_context(plan_store_urls(cfg, self._say))
        self._redis_url = urls.controller
        self.store = open_plan_store(urls.controller, cfg)

        # 4. broker
        check_broker_exposure(cfg.broker)
        broker = Broker(
            cfg.broker,
            self.models,
            self.backend,
            metrics_registry=self.registry,
            device_classes=cfg.planner.classes,  # the only device classes with metric labels of their own
            tail_engine=cfg.serving.tail_engine,
        )
        port = await self._step(f"starting the broker on {cfg.broker.host}:{cfg.broker.port}", broker.start)
        self._broker = broker
        log.info("cloud stack: broker listening on %s:%d", cfg.broker.host, port)

        # 5. exporter (broker and controller share the registry)
        want = cfg.broker.metrics_port or 0
        self._say(f"starting the metrics exporter on {cfg.broker.host}:{want}")
        self._exporter = Exporter.start(self.registry, cfg.broker.host, want, option="broker.metrics_port")
        log.info("cloud stack: metrics on %s", self.metrics_url)

        # 6. store -> broker, as the broker's read-only Redis user
        self.subscriber = follow_plans(urls.broker, broker, cfg)

        # 7. controller: Prometheus if configured, else this stack's own exporter read directly
        self.source = metrics_source(cfg, tuple(self.devices), exporter_urls=[self.metrics_url])
        self._controller = Controller(cfg, self.source, self.store, self.catalogs, self.devices, registry=self.registry)
        if self.with_controller:
            self._say(f"starting the controller (every {c.period_s:g} s)")
            self._controller_task = asyncio.create_task(
                self._controller.run_forever(self._controller_stop), name="controller"
            )

    async def _start_ray(self) -> TailBackend:
        from cloud.serving import start_serving, stop_serving

        work = asyncio.ensure_future(
            asyncio.to_thread(start_serving, self.config.serving, self.config.paths.weights_dir, self._say)
        )
        try:
            backend = await asyncio.shield(work)
        except asyncio.CancelledError:
            # The thread cannot be interrupted: let it finish, then undo what it started.
            with contextlib.suppress(BaseException):
                await work
            await asyncio.to_thread(stop_serving)
            raise
        self._ray_started = True
        return backend

    async def stop(self) -> None:
        """Stop everything that was started, in reverse order; safe to call twice."""
        steps: list[tuple[str, Callable[[], Awaitable[Any]]]] = [
            ("stopping the controller", self._stop_controller),
            ("stopping the plan feed", self._stop_subscriber),
            ("stopping the broker", self._stop_broker),
            ("stopping the metrics exporter", self._stop_exporter),
            ("closing the plan store", self._close_store),
            ("stopping the embedded Redis", self._stop_redis),
            ("stopping the tails", self._stop_backend),
        ]
        for what, fn in steps:
            try:
                await fn()
            except asyncio.CancelledError:  # a second Ctrl-C: finish the shutdown anyway
                log.warning("cloud stack: %s was interrupted; going on with the shutdown", what)
            except Exception:
                log.exception("cloud stack: %s failed", what)

    async def _stop_controller(self) -> None:
        task, self._controller_task = self._controller_task, None
        if task is None:
            return
        log.info("cloud stack: stopping the controller")
        self._controller_stop.set()
        try:
            await asyncio.wait_for(asyncio.shield(task), timeout=self.config.controller.prometheus_timeout_s + 1)
        except TimeoutError:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    @property
    def broker_store(self) -> PlanStore | None:
        """The plan store as the broker's plan feed reads it (the broker's Redis user)."""
        return None if self.subscriber is None else self.subscriber.store

    async def _stop_subscriber(self) -> None:
        sub, self.subscriber = self.subscriber, None
        if sub is not None:
            log.info("cloud stack: stopping the plan feed")
            await sub.stop()
            await sub.store.aclose()

    async def _stop_broker(self) -> None:
        broker, self._broker = self._broker, None
        if broker is not None:
            log.info("cloud stack: stopping the broker")
            await broker.stop(self.config.broker.shutdown_grace_s)

    async def _stop_exporter(self) -> None:
        exporter, self._exporter = self._exporter, None
        if exporter is not None:
            log.info("cloud stack: stopping the metrics exporter")
            await exporter.astop()

    async def _close_store(self) -> None:
        store, self.store = self.store, None
        if store is not None:
            log.info("cloud stack: closing the plan store")
            await store.aclose()

    async def _stop_redis(self) -> None:
        log.info("cloud stack: stopping the embedded Redis (if one runs)")
        await self._plan_store_scope.aclose()

    async def _stop_backend(self) -> None:
        backend, self.backend = self.backend, None
        if backend is not None and backend is not self._given_backend:
            log.info("cloud stack: closing the tail backend")
            await backend.close()
        if self._ray_started:
            from cloud.serving import stop_serving

            self._ray_started = False
            log.info("cloud stack: stopping Ray Serve")
            await asyncio.to_thread(stop_serving)


def with_ports(config: Config, *, broker_port: int = 0, metrics_port: int | None = 0) -> Config:
    """`config` with the broker and its exporter on these ports (0: free ones), for tests and demos
    that must not collide with a `cloud up` running on the defaults."""
    return replace(config, broker=replace(config.broker, port=broker_port, metrics_port=metrics_port))


# ---------------------------------------------------------------------------------------------
# The controller on its own (`splitsense controller run`)


async def run_controller_forever(
    config: Config,
    *,
    catalogs: Mapping[str, ModelCatalog] | None = None,
    devices: Mapping[str, DeviceClass] | None = None,
    metrics_port: int | None = CONTROLLER_METRICS_PORT,
    on_started: Callable[[Controller, dict[str, str]], None] | None = None,
    on_pass: Callable[[PassReport], None] | None = None,
    stop: asyncio.Event | None = None,
) -> Controller:
    """The controller loop of its own process until SIGINT/SIGTERM (or `stop`); returns it, for
    its summary. Reads controller.prometheus_url (else the brokers' controller.exporter_urls),
    writes controller.redis_url (else an embedded redis-server: only this process sees it, so set
    a URL whenever brokers run elsewhere) and exports its metrics on broker.host:`metrics_port`
    (None: off; 0: a free port)."""
    catalogs = (
        dict(catalogs)
        if catalogs is not None
        else await asyncio.to_thread(load_catalogs, tuple(config.serving.models), config.paths.weights_dir)
    )
    devices = dict(devices) if devices is not None else planner_devices(config)
    stop = stop or asyncio.Event()
    async with contextlib.AsyncExitStack() as scope:
        urls = await scope.enter_async_context(plan_store_urls(config))
        if urls.embedded:
            log.warning(
                "no controller.redis_url: plans go to an embedded Redis (%s) that only this process sees",
                urls.redacted,
            )
        store = open_plan_store(urls.controller, config)
        scope.push_async_callback(store.aclose)
        source = metrics_source(config, tuple(devices))
        registry = CollectorRegistry()
        info = {
            "metrics source": describe_source(config),
            "plan store": urls.redacted,
            "period": f"{config.controller.period_s:g} s",
        }
        if metrics_port is not None:
            exporter = Exporter.start(registry, config.broker.host, metrics_port, option="--metrics-port")
            scope.push_async_callback(exporter.astop)
            info["metrics"] = exporter.url
        controller = Controller(config, source, store, catalogs, devices, registry=registry)
        scope.enter_context(stop_on_signals(stop))
        if on_started is not None:
            on_started(controller, info)
        await controller.run_forever(stop, on_pass)
    return controller
