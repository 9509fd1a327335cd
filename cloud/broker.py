"""The broker: a grpc.aio server between the devices and the tails (cloud/backend.py).

One window on OffloadService goes through

    AuthInterceptor      metadata -> device id          UNAUTHENTICATED            (cloud/auth.py)
                         (token_store redis: hash lookup, UNAVAILABLE if Redis is down; cloud/tokens.py)
                         (mutual TLS: certificate CN == device id)
    Intake.accept        every field, the data decoded   INVALID_ARGUMENT / NOT_FOUND (cloud/intake.py: a
                         header seen before is not checked again; any error comes from wire.from_pb
                         and validate_offload, cloud/validation.py)
    identity             request.device_id == caller     PERMISSION_DENIED
    deadline             min(request.deadline_ms, call)  DEADLINE_EXCEEDED
    admit                queue vs. deadline              RESOURCE_EXHAUSTED + retry hint (cloud/admission.py)
    MicroBatcher         one tail call per batch         UNAVAILABLE on any backend failure (cloud/batcher.py);
                         an idle lane's batch runs here, in the broker's process (broker.local_tail)
    check_logits         the tail's output, per task     INVALID_ARGUMENT if NaN/inf (cloud/validation.py)

and is answered with its logits, or with the status of the first step that refused it (bytes that
do not even decode as the message are INVALID_ARGUMENT too, not gRPC's UNKNOWN). Our
errors are mapped to gRPC status codes only here (`status_of`), and counted in
splitsense_broker_errors_total by code and by a fixed reason (`reason_of`). The unary call fails with that
status (a shed also sends trailing metadata `x-splitsense-retry-after-ms`); the stream answers
the window with a WindowError carrying the same code, message and hint, and goes on with the next
window. Nothing a device sends can stop the broker serving the others.

No task and no await per window (`Broker.start_window`): the steps up to the batcher run as the
window is read, its batch futures' callbacks answer it, and a timer answers it at its deadline.
Without gRPC (64 callers, a backend that answers at once: `bench window`) this path costs ~0.12 ms
of Python a window, against ~0.22 ms for the path it replaced (from_pb into dataclasses, a task per window);
the rest of the broker process's ~0.5-0.6 ms a window is grpc.aio's and Ray's (README, `bench serve`).

Message sizes are capped in both directions by the server options; gRPC itself answers an
oversize message with RESOURCE_EXHAUSTED. Connections live at most broker.max_connection_age_s
(then GOAWAY, and broker.max_connection_age_grace_s for what still runs on them): a device's
long-lived stream then moves to a new connection, so brokers that come back get devices again
(`server_options`). The standard grpc.health.v1 service (SERVING while up,
NOT_SERVING while stopping) and server reflection are registered and need no token.

PlanService serves the current PlanSet cut down to the caller's device class and models:
GetPlan once, WatchPlan at once and then on every `set_plans`. Until the controller publishes,
that is the static set of cloud/plans.py.

The listener serves TLS or mutual TLS from the configured certificate files, and plaintext only
on a loopback host unless broker.allow_plaintext (cloud/tls.py).

`run_broker_forever` is what `splitsense cloud up` runs: the broker and its Prometheus exporter
until SIGINT/SIGTERM, then a graceful stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from typing import Any, NamedTuple

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry

from cloud.admission import AdmissionPolicy, admit
from cloud.auth import Authenticator, AuthInterceptor, device_id_of
from cloud.backend import InProcessTailBackend, ModelInfo, ModelRegistry, TailBackend, TailUnavailableError
from cloud.batcher import BatchReport, BatchResult, MicroBatcher
from cloud.intake import Intake, Window
from cloud.metrics import BrokerMetrics, ErrorReason
from cloud.plans import static_plan_set
from cloud.tls import listen
from cloud.tokens import TokenAuthenticator, TokenStore
from cloud.validation import check_logits
from cloud.wiring import Exporter, check_broker_exposure, stop_on_signals
from pipelines.groups import GROUP_SEPARATOR, served_groups
from splitsense.config import BrokerConfig
from splitsense.errors import (
    ConfigError,
    DependencyError,
    ModelError,
    NonFiniteOutputError,
    OffloadDeadlineError,
    PlanError,
    RejectedError,
    ShedError,
    WireError,
)
from splitsense.plan import PlanSet
from splitsense.v1 import offload_pb2 as pb
from splitsense.v1 import offload_pb2_grpc as pb_grpc  # servicer base classes (docs, typing)
from splitsense.wire import (
    MAX_ID_CHARS,
    RETRY_AFTER_METADATA_KEY,
    PlanRequest,
    TelemetryReport,
    WindowError,
    from_pb,
    plan_request_from_pb,
    stream_response_to_pb,
    to_pb,
)

__all__ = ["RETRY_AFTER_METADATA", "Broker", "reason_of", "run_broker_forever", "server_options", "status_of"]

log = logging.getLogger(__name__)

RETRY_AFTER_METADATA = RETRY_AFTER_METADATA_KEY
SERVICE_NAMES = (
    pb.DESCRIPTOR.services_by_name["OffloadService"].full_name,
    pb.DESCRIPTOR.services_by_name["PlanService"].full_name,
)
_MAX_SELECTIONS = 1024  # (class, models) selections of one publication kept on the wire
_HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name


class Failure(NamedTuple):
    """How one window was refused: its gRPC status, message and retry hint (0: none)."""

    code: grpc.StatusCode
    message: str
    retry_after_ms: int


Answer = Callable[["pb.OffloadResponse | Failure"], None]


def status_of(error: BaseException) -> tuple[grpc.StatusCode, str, int]:
    """(code, message, retry_after_ms) for an error of ours; INTERNAL for anything else."""
    if isinstance(error, RejectedError):
        code = getattr(grpc.StatusCode, error.code, grpc.StatusCode.UNAUTHENTICATED)
        return code, str(error), 0
    if isinstance(error, WireError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(error), 0
    if isinstance(error, ModelError):
        return grpc.StatusCode.NOT_FOUND, str(error), 0
    if isinstance(error, ShedError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(error), int(error.retry_after_ms)
    if isinstance(error, OffloadDeadlineError):
        return grpc.StatusCode.DEADLINE_EXCEEDED, str(error), 0
    if isinstance(error, DependencyError):
        return grpc.StatusCode.UNAVAILABLE, str(error), 0
    return grpc.StatusCode.INTERNAL, f"internal error in the broker ({type(error).__name__}); it is logged", 0


def reason_of(error: BaseException) -> ErrorReason:
    """The `reason` label of splitsense_broker_errors_total for an error (finer than its status)."""
    if isinstance(error, RejectedError):
        return ErrorReason.AUTH
    if isinstance(error, NonFiniteOutputError):
        return ErrorReason.NON_FINITE_OUTPUT
    if isinstance(error, WireError):
        return ErrorReason.INVALID_REQUEST
    if isinstance(error, ModelError):
        return ErrorReason.UNKNOWN_MODEL
    if isinstance(error, ShedError):
        return ErrorReason.SHED
    if isinstance(error, OffloadDeadlineError):
        return ErrorReason.DEADLINE
    if isinstance(error, DependencyError):
        return ErrorReason.BACKEND_UNAVAILABLE
    return ErrorReason.INTERNAL


def server_options(config: BrokerConfig) -> list[tuple[str, int]]:
    """The gRPC server's channel arguments: message caps, no port sharing, and the connection age.

    With broker.max_connection_age_s (> 0) gRPC sends a connection GOAWAY once it is that old
    (+-10% jitter, gRPC's own) and closes it max_connection_age_grace_s later, whatever still runs
    on it (the stream then ends UNAVAILABLE "max connection age"). The GOAWAY alone ends no call: a
    device's GrpcTransport sees its channel leave READY, half-closes its OffloadStream (the windows
    already read are answered, then the stream ends OK) and opens the next one on a new connection,
    which its load-balancing policy may place on another broker (edge/transport.py)."""
    options = [
        ("grpc.max_receive_message_length", config.max_receive_message_bytes),
        ("grpc.max_send_message_length", config.max_send_message_bytes),
        ("grpc.so_reuseport", 0),  # a port already taken fails loudly, never shares silently
    ]
    if config.max_connection_age_s > 0:
        options += [
            ("grpc.max_connection_age_ms", max(1, round(config.max_connection_age_s * 1000))),
            ("grpc.max_connection_age_grace_ms", max(1, round(config.max_connection_age_grace_s * 1000))),
        ]
    return options


class Broker:
    """The gRPC broker: `await start()`, serve, `await stop()`."""

    def __init__(
        self,
        config: BrokerConfig,
        registry: ModelRegistry,
        backend: TailBackend,
        plans: PlanSet | None = None,
        metrics_registry: CollectorRegistry | None = None,
        device_classes: Iterable[str] = (),
        tail_engine: str = "torch",
    ) -> None:
        """`tail_engine`: what runs the broker's own tail (broker.local_tail), serving.tail_engine.
        `device_classes`: the planner's classes (config.planner.classes), the only device classes
        besides broker.static_plan_device_classes and those of published plans that get a metric
        label of their own; any class a device sends that is none of these is counted as "other"."""
        self.config = config
        self._models: dict[str, ModelInfo] = dict(registry.info)
        self._intake = Intake(self._models)
        self._lanes_followed: set[tuple[str, int]] = set()  # lanes whose queue depth the gauge reads
        self._backend = backend
        self._plans: PlanSet = plans if plans is not None else static_plan_set(config, self._models)
        self._selected_of: PlanSet | None = None  # the publication `_selected` holds selections of
        self._selected: dict[tuple[str, tuple[str, ...]], pb.PlanSet] = {}
        # What a device may report telemetry for: a served model, or a task group of served models
        # ("fsdd_speaker+fsdd_digit": one window, one front, several tails; its stages are its first
        # member's), which the controller plans as one (pipelines/groups.py).
        self._telemetry_models: dict[str, ModelInfo] = {
            **self._models,
            **{GROUP_SEPARATOR.join(g): self._models[g[0]] for g in served_groups(list(self._models))},
        }
        # A registry of its own by default: several brokers (tests, benchmarks) share a process.
        self.metrics = BrokerMetrics(
            CollectorRegistry() if metrics_registry is None else metrics_registry,
            models={name: info.n_stages for name, info in self._telemetry_models.items()},
            device_classes=(
                *device_classes,
                *config.static_plan_device_classes,
                *(p.device_class for p in self._plans.plans),
            ),
        )
        self._auth: Authenticator | TokenAuthenticator
        if config.token_store == "redis":
            assert config.redis_url is not None  # BrokerConfig checks it
            self._auth = TokenAuthenticator(
                TokenStore(config.redis_url),
                cache_ttl_s=config.token_cache_ttl_s,
                allowed_device_ids=config.allowed_device_ids,
                on_reason=self.metrics.token_rejected,
            )
        else:
            self._auth = Authenticator(config.auth_secret, config.allowed_device_ids)
        self._policy = AdmissionPolicy(
            max_batch_size=config.max_batch_size,
            max_batch_wait_ms=config.max_batch_wait_ms,
            max_inflight_batches=config.max_inflight_batches,
            max_queue_depth=config.max_queue_depth,
            probe_after_ms=config.admission_probe_after_ms,
        )
        # broker.local_tail: the models are loaded here anyway (validation); an idle lane runs them.
        self._local: InProcessTailBackend | None = (
            InProcessTailBackend(registry, threads=1, engine=tail_engine) if config.local_tail else None
        )
        self._batcher = MicroBatcher(
            backend.run_tail,
            max_batch_size=config.max_batch_size,
            max_batch_wait_ms=config.max_batch_wait_ms,
            max_inflight_batches=config.max_inflight_batches,
            batch_timeout_ms=config.backend_timeout_ms,
            ewma_alpha=config.service_ewma_alpha,
            initial_service_ms=config.initial_batch_service_ms,
            on_batch=self._on_batch,
            run_local=self._local.run_tail if self._local is not None else None,
            local_max_batch=config.local_tail_max_batch,
            local_when_free=config.local_tail_when == "free",
            refresh_after_ms=self._policy.probe_after_ms,  # the admission's stale-estimate probe, too
        )
        self._server: grpc.aio.Server | None = None
        self._health: Any = None
        self._port: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = asyncio.Event()
        self._stopped = False
        self._watchers: set[asyncio.Event] = set()

    # --- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> int:
        """Bind and serve; returns the bound port (a free one when config.port is 0)."""
        if self._server is not None or self._stopped:
            raise ConfigError("a Broker is started once: this one is running or stopped; make a new one")
        cfg = self.config
        self._loop = asyncio.get_running_loop()
        # With mutual TLS the interceptor also checks that the client certificate is the caller's.
        interceptor = AuthInterceptor(self._auth, on_reject=self._on_auth_reject, require_peer_identity=cfg.uses_mtls)
        server = grpc.aio.server(interceptors=[interceptor], options=server_options(cfg))
        _add_service(server, "OffloadService", _OffloadServicer(self), self._on_undecodable)
        _add_service(server, "PlanService", _PlanServicer(self), self._on_undecodable)
        self._health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection((*SERVICE_NAMES, _HEALTH_SERVICE, reflection.SERVICE_NAME), server)
        port = listen(server, cfg)  # TLS as configured; refuses an exposed host (cloud/tls.py)
        if isinstance(self._auth, TokenAuthenticator):
            await self._auth.start()  # follow revocations before the first call
        warm_up = getattr(self._backend, "warm_up", None)  # RayTailBackend's: its first calls are slow
        if warm_up is not None:
            last = {
                name: (info.n_stages - 1, info.activation_shape(info.n_stages - 1))
                for name, info in self._models.items()
            }
            took = await warm_up(last, cfg.backend_timeout_ms / 1000)
            log.info("backend warmed up in %.0f ms", took * 1000)
        await server.start()
        self._server, self._port = server, port
        for name in ("", *SERVICE_NAMES):
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        if cfg.uses_dev_secret:  # on loopback only: listen() refuses it anywhere else
            log.warning(
                "the broker uses the built-in DEVELOPMENT auth secret: anyone with the source can mint "
                "device tokens; set broker.auth_secret before serving real devices"
            )
        security = "mutual TLS" if cfg.uses_mtls else "TLS" if cfg.uses_tls else "plaintext"
        log.info("broker serving %s on %s:%d (%s)", ", ".join(self._models), cfg.host, port, security)
        return port

    async def stop(self, grace_s: float | None = None) -> None:
        """Stop serving: health NOT_SERVING, streams end with UNAVAILABLE, in-flight windows get
        `grace_s` (default config.shutdown_grace_s) to finish, then everything is cancelled."""
        if self._server is None:
            return
        grace = self.config.shutdown_grace_s if grace_s is None else grace_s
        self._stopped = True
        self._closing.set()
        for event in self._watchers:
            event.set()
        if self._health is not None:
            await self._health.enter_graceful_shutdown()
        await self._server.stop(grace)
        await self._batcher.close()
        if self._local is not None:
            await self._local.close()
        if isinstance(self._auth, TokenAuthenticator):
            await self._auth.aclose()
        self._server = None
        log.info("broker stopped")

    @property
    def port(self) -> int:
        if self._port is None:
            raise ConfigError("the broker is not started: await broker.start() first")
        return self._port

    @property
    def address(self) -> str:
        """host:port to dial (after start)."""
        return f"{self.config.host}:{self.port}"

    @property
    def plans(self) -> PlanSet:
        return self._plans

    def plan_set_pb(self, device_class: str, models: Sequence[str]) -> pb.PlanSet:
        """The current plan set for one class and these models, on the wire: built once per
        (publication, class, models) and shared by every GetPlan and WatchPlan of it (each
        publication reaches every device of a class, and a fleet has thousands)."""
        plans = self._plans
        if self._selected_of is not plans:
            self._selected_of, self._selected = plans, {}
        key = (device_class, tuple(models))
        msg = self._selected.get(key)
        if msg is None:
            if len(self._selected) >= _MAX_SELECTIONS:
                self._selected.clear()
            msg = self._selected[key] = to_pb(plans.select(device_class, models))
        return msg

    def set_plans(self, plans: PlanSet) -> bool:
        """Serve a newer plan set and push it to every WatchPlan stream; False (and a warning)
        if it is not newer than the current one. Safe to call from any thread."""
        if not isinstance(plans, PlanSet):
            raise PlanError(f"set_plans expects a PlanSet, got {type(plans).__name__}")
        current = self._plans
        if plans.version <= current.version:
            log.warning("ignored plan set version %d: not newer than %d", plans.version, current.version)
            return False
        self.metrics.add_device_classes(p.device_class for p in plans.plans)
        self._plans = plans
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if self._loop is not None and running is not self._loop:
            self._loop.call_soon_threadsafe(self._wake_watchers)
        else:
            self._wake_watchers()
        return True

    def _wake_watchers(self) -> None:
        for event in self._watchers:
            event.set()

    # --- one window ---------------------------------------------------------------------------

    def _budget_s(self, deadline_ms: int, call_remaining_s: float | None) -> float:
        budgets = [deadline_ms / 1000.0] if deadline_ms > 0 else []
        if call_remaining_s is not None:
            budgets.append(call_remaining_s)
        return min(budgets) if budgets else self.config.default_deadline_ms / 1000.0

    def start_window(
        self,
        msg: pb.OffloadRequest,
        device_id: str | None,
        call_remaining_s: float | None,
        received: float,
        answer: Answer,
    ) -> None:
        """Take one window: `answer` gets its OffloadResponse, or the Failure of the first step that
        refused it (see `status_of`), exactly once, now or when its batch is done. Never raises.

        No task and no await per window: the checks run now (cloud/intake.py), the window joins its
        batch (one future per task it asks for), and the futures' callbacks answer it; a timer
        answers DEADLINE_EXCEEDED at its deadline if the batch has not. Errors are counted here."""
        self.metrics.in_flight.inc()
        try:
            w = self._intake.accept(msg)
            if device_id is None or w.device_id != device_id:
                raise RejectedError(
                    f"OffloadRequest.device_id: expected the authenticated device {device_id!r}, got {w.device_id!r}",
                    code="PERMISSION_DENIED",
                )
            model, cut = w.model, w.cut
            self.metrics.window_in(
                model, w.device_class, cut, w.codec, w.nbytes, w.bandwidth_bytes_per_s, w.rtt_s, w.battery_fraction
            )
            budget_s = self._budget_s(w.deadline_ms, call_remaining_s)
            deadline = received + budget_s
            remaining_s = deadline - time.monotonic()
            if remaining_s <= 0:
                raise OffloadDeadlineError(
                    f"the deadline of {budget_s * 1000:.0f} ms passed before the window was queued"
                )
            decision = admit(self._batcher.load(model, cut), remaining_s * 1000, self._policy)
            if not decision.admitted:
                self.metrics.shed_window(model, w.device_class, cut)
                raise ShedError(f"model {model!r} cut {cut}: {decision.reason}", decision.retry_after_ms)
            # One activation, every task that reads it (extra models share the front): each joins
            # its own model's batch, and the window is answered when all are.
            futures = [self._batcher.enqueue(model, cut, w.activation, deadline)]
            try:
                futures += [self._batcher.enqueue(info.name, cut, w.activation, deadline) for info in w.extra]
            except BaseException:
                for f in futures:
                    f.cancel()
                raise
            if w.extra or (model, cut) not in self._lanes_followed:
                self._follow_lanes(w)
        except Exception as e:
            self.metrics.in_flight.dec()
            answer(self._failed(e, msg.model, msg.device_class))
            return
        flight = _Flight(self, w, received, budget_s, futures, answer)
        flight.timer = asyncio.get_running_loop().call_later(remaining_s, flight.expire)
        for f in futures:
            f.add_done_callback(flight.part_done)

    def _finish(self, flight: _Flight, last: asyncio.Future[BatchResult]) -> None:
        """A window whose batches are all done, or one of whose tasks failed (`last`): its response,
        or that failure."""
        w = flight.window
        try:
            if last.cancelled() or last.exception() is not None:
                last.result()  # raises the task's error (CancelledError: the batcher closed)
            results = [f.result() for f in flight.futures]
            main = results[0]
            info, cut = w.info, w.cut
            if not main.finite or len(main.values) != info.num_classes:
                check_logits(main.logits, info, cut)  # raises the error that says which
            tasks = []
            for extra, r in zip(w.extra, results[1:], strict=True):
                if not r.finite or len(r.values) != extra.num_classes:
                    check_logits(r.logits, extra, cut)
                tasks.append(pb.TaskResult(model=extra.name, logits=r.values, prediction=r.prediction))
            total_s = time.monotonic() - flight.received
            self.metrics.answered(
                w.model,
                w.device_class,
                cut,
                w.codec,
                queue_s=main.queue_ms / 1000,
                compute_s=main.compute_ms / 1000,
                total_s=total_s,
            )
            response = pb.OffloadResponse(
                window_id=w.window_id,
                logits=main.values,
                prediction=main.prediction,
                timing=pb.Timing(queue_ms=main.queue_ms, compute_ms=main.compute_ms, batch_size=main.batch_size),
                task_results=tasks,
            )
        except asyncio.CancelledError:  # the batcher closed under it
            flight.answer(self._failed(TailUnavailableError("the broker is shutting down"), w.model, w.device_class))
        except Exception as e:
            flight.answer(self._failed(e, w.model, w.device_class))
        else:
            flight.answer(response)
        finally:
            self.metrics.in_flight.dec()

    def _expired(self, flight: _Flight) -> None:
        w = flight.window
        try:
            error = OffloadDeadlineError(
                f"model {w.model!r} cut {w.cut}: no answer within the deadline of {flight.budget_s * 1000:.0f} ms"
            )
            flight.answer(self._failed(error, w.model, w.device_class))
        finally:
            self.metrics.in_flight.dec()

    async def offload(
        self, msg: pb.OffloadRequest, device_id: str | None, call_remaining_s: float | None, received: float
    ) -> pb.OffloadResponse | Failure:
        """`start_window` awaited: the window's response or its Failure. A caller cancelled first
        (a unary call whose client left) is not answered; its window's timer still ends it."""
        done: asyncio.Future[pb.OffloadResponse | Failure] = asyncio.get_running_loop().create_future()

        def settle(out: pb.OffloadResponse | Failure) -> None:
            if not done.done():
                done.set_result(out)

        self.start_window(msg, device_id, call_remaining_s, received, settle)
        return await done

    def _failed(self, error: BaseException, model: str, device_class: str) -> Failure:
        """The Failure answering `error`, counted in splitsense_broker_errors_total."""
        code, message, retry = status_of(error)
        if code is grpc.StatusCode.INTERNAL:
            log.error("internal error answering a window", exc_info=error)
        self.metrics.failed(model, device_class, code.name, reason_of(error))
        return Failure(code, message, retry)

    def telemetry(self, msg: pb.ReportTelemetryRequest, device_id: str | None) -> int:
        """Record one telemetry report; returns the current plan set version."""
        report: TelemetryReport = from_pb(msg)
        if device_id is None or report.device_id != device_id:
            raise RejectedError(
                f"ReportTelemetryRequest.device_id: expected the authenticated device {device_id!r}, "
                f"got {report.device_id!r}",
                code="PERMISSION_DENIED",
            )
        for i, o in enumerate(report.observations):
            info = self._telemetry_models.get(o.model)
            if info is None:
                continue  # a model this broker does not serve (e.g. fully local): counted as "unknown"
            where = f"ReportTelemetryRequest.observations[{i}]"
            if o.cut > info.n_stages:
                raise WireError(f"{where}.cut: expected 0..{info.n_stages} for model {o.model!r}, got {o.cut}")
            if len(o.stage_ms_total) > info.n_stages:
                raise WireError(
                    f"{where}.stage_ms_total: expected at most {info.n_stages} stages for model {o.model!r}, "
                    f"got {len(o.stage_ms_total)}"
                )
        self.metrics.telemetry(report)
        return self._plans.version

    def _on_batch(self, report: BatchReport) -> None:
        self.metrics.batch_done(report.model, report.cut, report.size, report.local)

    def _follow_lanes(self, w: Window) -> None:
        """splitsense_broker_queue_depth of the window's (model, cut) lanes, read from the batcher
        when scraped (the first window of a lane; a group window's extra models' lanes too)."""
        for model in (w.model, *(info.name for info in w.extra)):
            if (model, w.cut) not in self._lanes_followed:
                self._lanes_followed.add((model, w.cut))
                self.metrics.follow_queue_depth(model, w.cut, self._queued_of(model, w.cut))

    def _queued_of(self, model: str, cut: int) -> Callable[[], float]:
        return lambda: float(self._batcher.load(model, cut).queued)

    def _on_auth_reject(self, error: RejectedError) -> None:
        self.metrics.failed("", "", error.code or "UNAUTHENTICATED", ErrorReason.AUTH)

    def _on_undecodable(self) -> None:
        self.metrics.failed("", "", grpc.StatusCode.INVALID_ARGUMENT.name, ErrorReason.UNDECODABLE)


class _Flight:
    """One window between its batches and its answer (Broker.start_window)."""

    __slots__ = ("_broker", "answer", "budget_s", "futures", "left", "over", "received", "timer", "window")

    def __init__(
        self,
        broker: Broker,
        window: Window,
        received: float,
        budget_s: float,
        futures: list[asyncio.Future[BatchResult]],
        answer: Answer,
    ) -> None:
        self._broker = broker
        self.window, self.received, self.budget_s = window, received, budget_s
        self.futures, self.answer = futures, answer
        self.left = len(futures)
        self.over = False
        self.timer: asyncio.TimerHandle | None = None

    def part_done(self, fut: asyncio.Future[BatchResult]) -> None:
        if self.over:
            return
        if not fut.cancelled() and fut.exception() is None:
            self.left -= 1
            if self.left:
                return
        else:
            for f in self.futures:  # a task failed: the window fails, the other tasks are withdrawn
                if f is not fut:
                    f.cancel()
        self.over = True
        if self.timer is not None:
            self.timer.cancel()
        self._broker._finish(self, fut)

    def expire(self) -> None:
        if self.over:
            return
        self.over = True
        for f in self.futures:
            f.cancel()  # withdrawn from its batch, or its result ignored
        self._broker._expired(self)


class _Undecodable:
    """What a request deserializes to when its bytes are not a valid message of its type."""

    def __init__(self, type_name: str, error: Exception) -> None:
        self.message = f"{type_name}: the bytes are not a valid splitsense.v1.{type_name} message ({error})"


def _deserializer(cls: Any) -> Callable[[bytes], Any]:
    name = cls.DESCRIPTOR.name

    def deserialize(data: bytes) -> Any:
        try:
            return cls.FromString(data)
        except DecodeError as e:  # answered INVALID_ARGUMENT by the servicer, not UNKNOWN by gRPC
            return _Undecodable(name, e)

    return deserialize


def _add_service(server: grpc.aio.Server, service: str, servicer: Any, on_undecodable: Callable[[], None]) -> None:
    """Register a servicer like the generated add_*_to_server, but with deserializers that turn
    undecodable bytes into INVALID_ARGUMENT (a stream answers them per message)."""
    desc = pb.DESCRIPTOR.services_by_name[service]
    handlers = {}
    for method in desc.methods:
        behavior = getattr(servicer, method.name)
        if not method.client_streaming:
            behavior = _guarded(behavior, method.server_streaming, on_undecodable)
        kind = {
            (False, False): grpc.unary_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler,
        }[(method.client_streaming, method.server_streaming)]
        handlers[method.name] = kind(
            behavior,
            request_deserializer=_deserializer(getattr(pb, method.input_type.name)),
            response_serializer=getattr(pb, method.output_type.name).SerializeToString,
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(desc.full_name, handlers),))


def _guarded(behavior: Any, server_streaming: bool, on_undecodable: Callable[[], None]) -> Any:
    async def reject(request: _Undecodable, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        on_undecodable()
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)

    if server_streaming:

        async def stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            if isinstance(request, _Undecodable):
                await reject(request, context)
            async for item in behavior(request, context):
                yield item

        return stream

    async def unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        if isinstance(request, _Undecodable):
            await reject(request, context)
        return await behavior(request, context)

    return unary


def _caller(context: grpc.aio.ServicerContext[Any, Any]) -> str | None:
    return device_id_of(context.invocation_metadata())


class _OffloadServicer(pb_grpc.OffloadServiceServicer):
    def __init__(self, broker: Broker) -> None:
        self._b = broker

    async def Offload(  # noqa: N802 (gRPC method name)
        self, request: pb.OffloadRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.OffloadResponse:
        received = time.monotonic()
        out = await self._b.offload(request, _caller(context), context.time_remaining(), received)
        if isinstance(out, pb.OffloadResponse):
            return out
        trailing = ((RETRY_AFTER_METADATA, str(out.retry_after_ms)),) if out.retry_after_ms else ()
        await context.abort(out.code, out.message, trailing_metadata=trailing)
        raise AssertionError("unreachable: abort raises")

    async def OffloadStream(  # noqa: N802
        self,
        request_iterator: AsyncIterator[pb.OffloadStreamRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[pb.OffloadStreamResponse]:
        """Reads windows while fewer than broker.max_stream_windows_in_flight are unanswered (flow
        control pushes back on the device), starts each at once (Broker.start_window: no task per
        window) and writes the answers in the order they come."""
        b = self._b
        device_id = _caller(context)
        out: asyncio.Queue[pb.OffloadStreamResponse | None] = asyncio.Queue()
        limit = b.config.max_stream_windows_in_flight
        room = asyncio.Event()
        outstanding = 0
        shutting_down = False

        def answer_to(window_id: str) -> Answer:
            def answer(result: pb.OffloadResponse | Failure) -> None:
                nonlocal outstanding
                outstanding -= 1
                room.set()
                if isinstance(result, Failure):  # the wire's own conversion (and checks) of a WindowError
                    error = WindowError(window_id, result.code.value[0], result.message, result.retry_after_ms)
                    out.put_nowait(stream_response_to_pb(error))
                else:
                    out.put_nowait(pb.OffloadStreamResponse(window_id=window_id, result=result))

            return answer

        async def reader() -> None:
            nonlocal outstanding, shutting_down
            it = aiter(request_iterator)
            index = 0
            try:
                while True:
                    while outstanding >= limit:  # at most N windows in flight: flow control pushes back
                        room.clear()
                        await room.wait()
                    msg = await anext(it, None)
                    if msg is None:
                        break
                    outstanding += 1
                    self._start(index, msg, device_id, context, time.monotonic(), answer_to)
                    index += 1
            except asyncio.CancelledError:
                shutting_down = True  # stop() cancelled the reading (a gone client cancels us all)
            except Exception as e:  # the request stream broke: answer what was read, then end
                log.debug("offload stream reading ended: %s: %s", type(e).__name__, e)
            finally:
                out.put_nowait(None)  # no more windows will be read

        async def stop_on_close() -> None:
            await b._closing.wait()
            reading.cancel()

        reading = asyncio.create_task(reader())
        closer = asyncio.create_task(stop_on_close())
        try:
            done_reading = False
            while True:
                item = await out.get()
                if item is None:
                    done_reading = True
                else:
                    yield item
                if done_reading and outstanding == 0 and out.empty():
                    break
        finally:
            closer.cancel()
            reading.cancel()
        if shutting_down:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the broker is shutting down; offload elsewhere")

    def _start(
        self,
        index: int,
        msg: pb.OffloadStreamRequest | _Undecodable,
        device_id: str | None,
        context: grpc.aio.ServicerContext[Any, Any],
        received: float,
        answer_to: Callable[[str], Answer],
    ) -> None:
        """Start one window of a stream; it is answered (result or WindowError) through `answer_to`."""
        b = self._b
        if isinstance(msg, _Undecodable):
            b._on_undecodable()
            answer_to(f"#{index}")(Failure(grpc.StatusCode.INVALID_ARGUMENT, msg.message, 0))
            return
        # A window without a usable id (none, or one past the limit: never echoed) is named by its
        # position in the stream, "#<index>" from 0.
        if not msg.HasField("request"):
            error = WireError("OffloadStreamRequest.request: expected an OffloadRequest message, got none")
            answer_to(f"#{index}")(b._failed(error, "", ""))
            return
        request = msg.request
        wid = request.window_id
        window_id = wid if 0 < len(wid) <= MAX_ID_CHARS else f"#{index}"
        b.start_window(request, device_id, context.time_remaining(), received, answer_to(window_id))

    async def ReportTelemetry(  # noqa: N802
        self, request: pb.ReportTelemetryRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ReportTelemetryResponse:
        b = self._b
        received = time.monotonic()
        try:
            version = b.telemetry(request, _caller(context))
        except Exception as e:
            code, message, _ = b._failed(e, "", request.device_class)
        else:
            # how long it took here: the device times its link by the rest of the call (no ping)
            handling_ms = (time.monotonic() - received) * 1000.0
            return pb.ReportTelemetryResponse(plan_version=version, handling_ms=handling_ms)
        await context.abort(code, message)
        raise AssertionError("unreachable: abort raises")


class _PlanServicer(pb_grpc.PlanServiceServicer):
    def __init__(self, broker: Broker) -> None:
        self._b = broker

    async def _query(
        self, request: pb.GetPlanRequest | pb.WatchPlanRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> PlanRequest:
        """The request's PlanRequest, or the call aborted with INVALID_ARGUMENT naming the field."""
        try:
            return plan_request_from_pb(request)
        except WireError as e:
            code, message, _ = self._b._failed(e, "", request.device_class)
        await context.abort(code, message)
        raise AssertionError("unreachable: abort raises")

    async def GetPlan(  # noqa: N802
        self, request: pb.GetPlanRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GetPlanResponse:
        q = await self._query(request, context)
        plans = self._b.plans
        if q.known_version >= plans.version:
            return pb.GetPlanResponse()  # the caller is up to date: it keeps its plan
        return pb.GetPlanResponse(plan_set=self._b.plan_set_pb(q.device_class, q.models))

    async def WatchPlan(  # noqa: N802
        self, request: pb.WatchPlanRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.WatchPlanResponse]:
        q = await self._query(request, context)
        b = self._b
        changed = asyncio.Event()
        b._watchers.add(changed)
        sent = q.known_version
        try:
            while True:
                changed.clear()  # before reading the plans: a set_plans from now on wakes us
                plans = b.plans
                if plans.version > sent:
                    yield pb.WatchPlanResponse(plan_set=b.plan_set_pb(q.device_class, q.models))
                    sent = plans.version
                    continue
                if b._closing.is_set():
                    break
                await changed.wait()
        finally:
            b._watchers.discard(changed)
        await context.abort(grpc.StatusCode.UNAVAILABLE, "the broker is shutting down; watch another one")


async def run_broker_forever(
    config: BrokerConfig,
    registry: ModelRegistry,
    backend: TailBackend,
    plans: PlanSet | None = None,
    *,
    metrics_registry: CollectorRegistry | None = None,
    on_started: Callable[[Broker], None] | None = None,
    device_classes: Iterable[str] = (),
    tail_engine: str = "torch",
) -> None:
    """Serve until SIGINT or SIGTERM, then stop gracefully (config.shutdown_grace_s).

    `device_classes` are the classes the broker labels its metrics with (the planner's classes;
    any other class a device names is "other").

    Starts the Prometheus exporter on config.host:config.metrics_port (unless None) serving the
    broker's registry. `on_started(broker)` runs once it listens (e.g. to print its address). The
    backend is the caller's: it is not closed here.
    """
    check_broker_exposure(config)  # before the exporter listens: refuse without side effects
    broker = Broker(
        config,
        registry,
        backend,
        plans,
        metrics_registry=metrics_registry,
        device_classes=device_classes,
        tail_engine=tail_engine,
    )
    exporter: Exporter | None = None
    if config.metrics_port is not None:
        exporter = Exporter.start(
            broker.metrics.registry, config.host, config.metrics_port, option="broker.metrics_port"
        )
    stop = asyncio.Event()
    try:
        await broker.start()
        with stop_on_signals(stop):
            if on_started is not None:
                on_started(broker)
            await stop.wait()
        log.info("signal received: stopping the broker")
    finally:
        with contextlib.suppress(Exception):
            await broker.stop(config.shutdown_grace_s)
        if exporter is not None:
            exporter.stop()
