"""One place that wires the cloud's parts: every process that runs them builds them here.

`splitsense cloud up` (cloud.broker.run_broker_forever), `splitsense controller run`
(cloud.stack.run_controller_forever), `controller plan`, and CloudStack (`demo`, `simulate`, the
integration tests) all take these factories, so that each choice is made in exactly one place:

    check_broker_exposure(broker)     before anything listens: an exposed host without TLS or with
                                      the development secret, or an unreadable PEM file -> ConfigError
    plan_store_urls(config)           the plan store's Redis, as the controller (writes) and as the
                                      broker (reads and follows) see it: controller.redis_url and
                                      broker.redis_url, else an embedded redis-server with one ACL
                                      user per role (cloud/planstore.py ACL_RULES)
    open_plan_store(url, config)      a PlanStore with the controller's history and timeouts
    follow_plans(url, broker, config) the broker's plan feed (PlanSubscriber) on the broker's user
    metrics_source(config, classes)   where the controller reads the fleet: Prometheus
                                      (controller.prometheus_url), else the exporters directly
    Exporter.start(registry, ...)     a registry on http://host:port/metrics (ConfigError naming the
                                      option to change when the port is taken)
    stop_on_signals(stop)             SIGINT and SIGTERM set `stop` (where signals can be caught)
    load_catalogs / planner_devices   what the controller plans with

TLS and device credentials are the broker's own (cloud/tls.py `listen`, cloud/auth.py and
cloud/tokens.py, chosen by broker.token_store inside Broker): nothing else opens a listener.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from prometheus_client import CollectorRegistry, start_http_server

from cloud.controller.metrics_source import DirectExporterSource, MetricsSource, PrometheusSource
from cloud.planstore import EmbeddedRedis, PlanStore, redact_url
from cloud.tls import server_credentials
from pipelines.catalog import ModelCatalog, load_catalog
from pipelines.devices import DEVICE_CLASSES, DeviceClass
from pipelines.groups import GROUP_SEPARATOR, group_catalog, served_groups, shared_cut
from splitsense.config import BrokerConfig, Config
from splitsense.errors import ConfigError, ModelError

if TYPE_CHECKING:
    from cloud.broker import Broker
    from cloud.plan_feed import PlanSubscriber

__all__ = [
    "Exporter",
    "PlanStoreUrls",
    "check_broker_exposure",
    "finish_in_thread",
    "follow_plans",
    "load_catalogs",
    "metrics_source",
    "open_plan_store",
    "plan_store_urls",
    "planner_devices",
    "stop_on_signals",
]

log = logging.getLogger(__name__)
T = TypeVar("T")


async def finish_in_thread(fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)` in a worker thread. A thread cannot be interrupted: when the caller is cancelled
    this waits for `fn` to finish before the cancellation goes on, so that whatever `fn` started
    exists by the time the shutdown that follows looks for it."""
    work = asyncio.ensure_future(asyncio.to_thread(fn, *args))
    try:
        return await asyncio.shield(work)
    except asyncio.CancelledError:
        with contextlib.suppress(BaseException):
            await work
        raise


# ---------------------------------------------------------------------------------------------
# Security: checked before anything listens


def check_broker_exposure(broker: BrokerConfig) -> None:
    """ConfigError (one line: what to set) when serving `broker` would expose it: a non-loopback
    host without TLS or with the development secret; also when a configured PEM file cannot be
    read. Called before Ray or an exporter starts, so a refusal has no side effects."""
    problem = broker.exposure_problem()
    if problem is not None:
        raise ConfigError(problem)
    server_credentials(broker)


# ---------------------------------------------------------------------------------------------
# The plan store


@dataclass(frozen=True)
class PlanStoreUrls:
    """The plan store's Redis as each role connects to it (credentials inside: log `redacted`)."""

    controller: str  # writes plans (the controller's ACL user)
    broker: str  # reads plans and follows their channel (the broker's ACL user)
    embedded: bool  # an embedded redis-server that only this process sees

    @property
    def redacted(self) -> str:
        return redact_url(self.controller) + (" (embedded)" if self.embedded else "")


@contextlib.asynccontextmanager
async def plan_store_urls(
    config: Config, progress: Callable[[str], None] | None = None
) -> AsyncIterator[PlanStoreUrls]:
    """controller.redis_url (the broker: broker.redis_url, else the same URL), else a real
    redis-server of our own for the duration, with an ACL user per role."""
    c = config.controller
    if c.redis_url is not None:
        yield PlanStoreUrls(c.redis_url, config.broker.redis_url or c.redis_url, embedded=False)
        return
    if progress is not None:
        progress("starting an embedded Redis")
    embedded = EmbeddedRedis()
    try:
        url = await finish_in_thread(embedded.start)
        yield PlanStoreUrls(url, embedded.url_for("broker"), embedded=True)
    finally:
        await asyncio.to_thread(embedded.stop)


def open_plan_store(url: str, config: Config) -> PlanStore:
    c = config.controller
    return PlanStore(url, history_versions=c.history_versions, timeout_s=c.redis_timeout_s)


def follow_plans(url: str, broker: Broker, config: Config) -> PlanSubscriber:
    """The broker's plan feed, started: every plan set the store gets is served by `broker`."""
    from cloud.plan_feed import PlanSubscriber

    sub = PlanSubscriber(open_plan_store(url, config), broker)
    sub.start()
    return sub


# ---------------------------------------------------------------------------------------------
# Metrics: where the controller reads them, where every process exports its own


def metrics_source(
    config: Config, device_classes: tuple[str, ...], exporter_urls: tuple[str, ...] | list[str] | None = None
) -> MetricsSource:
    """controller.prometheus_url, else the brokers' exporters read directly (`exporter_urls`,
    default controller.exporter_urls)."""
    c = config.controller
    if c.prometheus_url is not None:
        return PrometheusSource(
            c.prometheus_url, window_s=c.query_window_s, timeout_s=c.prometheus_timeout_s, device_classes=device_classes
        )
    urls = list(c.exporter_urls if exporter_urls is None else exporter_urls)
    return DirectExporterSource(
        urls, window_s=c.query_window_s, timeout_s=c.prometheus_timeout_s, device_classes=device_classes
    )


def describe_source(config: Config, exporter_urls: tuple[str, ...] | list[str] | None = None) -> str:
    c = config.controller
    return c.prometheus_url or "exporters " + ", ".join(c.exporter_urls if exporter_urls is None else exporter_urls)


class Exporter:
    """A registry served on http://host:port/metrics from a daemon thread (prometheus_client)."""

    def __init__(self, server: Any, thread: threading.Thread, host: str) -> None:
        self._server = server
        self._thread = thread
        self.host = host
        self.port = int(server.server_port)

    @classmethod
    def start(cls, registry: CollectorRegistry, host: str, port: int, *, option: str) -> Exporter:
        """ConfigError naming `option` (what to change) when host:port cannot be bound."""
        try:
            server, thread = start_http_server(port, addr=host, registry=registry)
        except OSError as e:
            raise ConfigError(
                f"the metrics exporter cannot listen on {host}:{port} ({e}); set {option} (0 picks a free port)"
            ) from None
        return cls(server, thread, host)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}/metrics"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    async def astop(self) -> None:
        await asyncio.to_thread(self.stop)


# ---------------------------------------------------------------------------------------------
# Signals


@contextlib.contextmanager
def stop_on_signals(stop: asyncio.Event) -> Iterator[None]:
    """SIGINT and SIGTERM set `stop` while inside (nothing where the loop cannot take signals:
    not the main thread, or no signals on this platform)."""
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
            installed.append(sig)
        except (NotImplementedError, RuntimeError):
            pass
    try:
        yield
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)


# ---------------------------------------------------------------------------------------------
# What the controller plans with


def load_catalogs(models: tuple[str, ...] | list[str], weights_dir: Any = None) -> dict[str, ModelCatalog]:
    """The planner's catalog of every model (ModelError saying how to build a missing one), and of
    every task group whose members are all served (pipelines/groups.py: one window, several tasks
    sharing a front, planned as one)."""
    out = {}
    for name in models:
        try:
            out[name] = load_catalog(name, weights_dir)
        except ModelError as e:
            raise ModelError(f"{e} (or run: splitsense models catalog --model {name})") from None
    for group in served_groups(models):
        out[GROUP_SEPARATOR.join(group)] = group_catalog([out[m] for m in group], shared_cut(group))
    return out


def planner_devices(config: Config) -> dict[str, DeviceClass]:
    """The device classes the planner plans for: those of planner.classes that pipelines.devices
    describes (ConfigError naming any it does not)."""
    unknown = sorted(set(config.planner.classes) - set(DEVICE_CLASSES))
    if unknown:
        raise ConfigError(
            f"planner.classes names device classes with no hardware figures in pipelines.devices: {unknown}; "
            f"known: {', '.join(sorted(DEVICE_CLASSES))}"
        )
    return {name: DEVICE_CLASSES[name] for name in config.planner.classes}
