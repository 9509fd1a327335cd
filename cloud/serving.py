"""Ray Serve tails: one deployment per model, running stages [k, N) for any cut k.

    start_serving(cfg) -> RayTailBackend     ray.init (local, or join cfg.ray_address), Serve without
                                             HTTP proxies, one app per model, wait until RUNNING
    RayTailBackend.run_tail(model, cut, b)   one DeploymentHandle call per (already stacked) batch
    stop_serving()                           undo what start_serving started, and nothing else

Each model is its own Serve application holding exactly one deployment (`tail`), so a model is
deployed, scaled and restarted on its own, and the broker calls each deployment's handle
directly: there is no router deployment in front, because every Ray hop costs 4-8 ms here (p50,
a 32 KiB window) and ~5 ms of CPU between caller and replica, whatever the batch size.

The broker batches requests across devices per (model, cut) *before* this hop
(cloud/backend.py, `run_tail_sync`); a replica therefore sees few, large requests. That is why
`max_ongoing_requests` is set on purpose (ServingConfig explains the numbers) and why a replica
runs one batch at a time on its pinned torch threads: a second batch waits queued inside the
replica (its bytes already there) instead of contending for the same cores.

How the broker's handles reach a replica (`handle_factory`, ServingConfig.handle_transport and
handle_router; measured here with one uci_har window per call, `bench serve`'s workload):

    Serve's default handle (router thread, Ray actor call)     p50 5.0-5.7 ms, caller CPU 2.8 ms/call
    router on the caller's event loop                          p50 4.1-5.0 ms, caller CPU 2.6 ms/call
    ... and Serve's gRPC path (_by_reference=False, pickle)    p50 2.7 ms,     caller CPU 1.2-1.3 ms/call

so the broker runs Serve's router on its own loop (no thread hop, no call_soon_threadsafe per
call) and sends batches by value to the replica's own gRPC server: the batch is pickled (a numpy
array: its buffer, no copy through the object store) and the answer comes back the same way.
Those are private options of Ray Serve (the ones its own proxy uses); another Ray without them
gets Serve's default handle and a warning. A handle whose router runs on the caller's loop is
bound to that loop, so the backend keeps one set of handles per event loop that calls it. Not
taken: running the replica's user code on its main loop (RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=0:
no gain at one caller, and our replica blocks its loop while it computes, which would stall
Serve's health checks), Ray compiled graphs (actors only, not Serve deployments: they would bypass
Serve's replica management and autoscaling), `_prefer_local_routing` (one node here: every
replica is local). For a lone window the broker skips this hop altogether (broker.local_tail,
cloud/batcher.py). Every replica loads the shipped weights itself (`load_trained`), so no model
object crosses process boundaries. Whatever goes wrong on the Ray side (replica died,
actor error, Serve down, no answer within `request_timeout_s`) surfaces as
`TailUnavailableError`, which the broker answers with UNAVAILABLE: never a hang.

On a cluster (`cloud up --ray-address`, nodes started with `ray start`), Serve's SPREAD scheduling
puts a model's replicas on different nodes, and when a node dies Serve starts its replicas again on
the survivors; serving.max_replicas_per_node makes that a hard cap, serving.autoscaling lets Serve
scale each tail on ongoing requests per replica (`_scaling_options`; ServingConfig explains the
numbers). tests/integration/cloud/test_multinode.py runs both on a two-node cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cloud.backend import TailUnavailableError, choose_tail_engine, make_tail
from splitsense.config import ServingConfig
from splitsense.errors import ConfigError, DependencyError, ModelError

log = logging.getLogger(__name__)

APP_PREFIX = "splitsense_"  # Serve application of model m: f"{APP_PREFIX}{m}"
DEPLOYMENT_NAME = "tail"  # the one deployment inside each of those applications

ProgressFn = Callable[[str], None]


def app_name(model: str) -> str:
    return f"{APP_PREFIX}{model}"


class TailReplica:
    """One Serve replica of one model: loads the shipped weights, runs [cut, N) on a batch.

    Wrapped by `serve.deployment` in `build_app`; kept a plain class so unit tests can call it.
    """

    def __init__(self, model: str, weights_dir: str | None, threads: int, engine: str = "torch") -> None:
        import torch

        from pipelines.training import load_trained

        torch.set_num_threads(threads)
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:  # already set in this worker process
            pass
        wdir = Path(weights_dir) if weights_dir else None
        self._model = load_trained(model, wdir).model
        self._name = model
        # serving.tail_engine: ONNX Runtime on the export, or the weights above in torch
        self._tail = make_tail(model, engine, self._model, wdir, threads)
        self.engine = self._tail.engine
        log.info("tail of %s runs on %s", model, self.engine)
        # Computed once: activation_shape runs the front on zeros, far too slow per request.
        self._shapes = [tuple(self._model.activation_shape(k)) for k in range(self._model.n_stages + 1)]
        self._warm_up()

    def _warm_up(self) -> None:
        """One forward per cut, so the first real batch does not pay for lazy kernel set-up."""
        for k in range(self._model.n_stages):
            self._tail(k, np.zeros((1, *self._shapes[k]), dtype=np.float32))

    async def __call__(self, cut: int, batch: np.ndarray) -> np.ndarray:
        """Runs inline on the replica's user-code event loop, deliberately blocking it: a replica
        computes one batch at a time on its pinned threads and the next requests (already
        transferred) wait on the loop. A sync method would go through Serve's thread pool: one
        more thread hop per call (measured: 3.6 vs 3.0 ms p50 per hop, 285 vs 435 calls/s at 8
        concurrent callers) and batches contending for the same cores."""
        m = self._model
        m.check_cut(cut)
        expected = self._shapes[cut]
        if batch.ndim != len(expected) + 1 or tuple(batch.shape[1:]) != expected:
            raise ModelError(
                f"{self._name} cut {cut}: expected a batch of shape (B, {', '.join(map(str, expected))}), "
                f"got {tuple(batch.shape)}"
            )
        return self._tail(cut, batch)


def _scaling_options(cfg: ServingConfig) -> dict[str, Any]:
    """How many replicas and where (ServingConfig explains the numbers): a fixed `num_replicas`, or
    Serve's autoscaling on ongoing requests per replica starting from num_replicas (within
    min..max); and Serve's hard per-node cap when one is set (else Serve's SPREAD placement)."""
    options: dict[str, Any] = {}
    if cfg.autoscaling:
        options["autoscaling_config"] = {
            "min_replicas": cfg.min_replicas,
            "max_replicas": cfg.max_replicas,
            "initial_replicas": min(max(cfg.num_replicas, cfg.min_replicas), cfg.max_replicas),
            "target_ongoing_requests": cfg.target_ongoing_requests,
            "upscale_delay_s": cfg.upscale_delay_s,
            "downscale_delay_s": cfg.downscale_delay_s,
            "look_back_period_s": cfg.look_back_period_s,
            "metrics_interval_s": cfg.metrics_interval_s,
        }
    else:
        options["num_replicas"] = cfg.num_replicas
    if cfg.max_replicas_per_node is not None:
        options["max_replicas_per_node"] = cfg.max_replicas_per_node
    return options


def _deployment_options(cfg: ServingConfig) -> dict[str, Any]:
    return {
        "name": DEPLOYMENT_NAME,
        **_scaling_options(cfg),
        "max_ongoing_requests": cfg.max_ongoing_requests,
        "ray_actor_options": {"num_cpus": cfg.replica_cpus},
        # A dead or wedged replica is noticed and replaced within a few seconds.
        "health_check_period_s": 2.0,
        "health_check_timeout_s": 10.0,
        "graceful_shutdown_timeout_s": 2.0,
        "graceful_shutdown_wait_loop_s": 0.5,
        # Serve writes an access-log line per request by default: hundreds of lines a second under
        # load that no one reads (the broker's Prometheus metrics count every window and batch).
        "logging_config": {"enable_access_log": cfg.access_log},
    }


def build_app(model: str, cfg: ServingConfig, weights_dir: Path | None = None) -> Any:
    """The Serve application (one `tail` deployment) of one model."""
    from ray import serve

    deployment = serve.deployment(**_deployment_options(cfg))(TailReplica)
    return deployment.bind(model, str(weights_dir) if weights_dir else None, cfg.replica_threads, cfg.tail_engine)


def replica_actor_names(model: str) -> list[str]:
    """Names of the live Ray actors of `model`'s replicas (namespace "serve"), for fault drills.

    Relies on Serve's naming of replica actors, "SERVE_REPLICA::<app>#<deployment>#<id>", which
    is internal to Serve: it needs no dashboard, unlike ray.util.state.list_actors.
    """
    import ray

    prefix = f"SERVE_REPLICA::{app_name(model)}#{DEPLOYMENT_NAME}#"
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix))


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


HandleFactory = Callable[[str], Any]


def handle_factory(cfg: ServingConfig, app_of: Callable[[str], str] = app_name) -> HandleFactory:
    """Makes the DeploymentHandle of a model's tail (in application `app_of(model)`) as `cfg` asks
    (see ServingConfig.handle_transport and handle_router). Called inside the event loop that will
    use the handle: a router on the caller's loop is bound to the loop running when the handle is
    initialised."""

    def make(model: str) -> Any:
        from ray.serve.handle import DeploymentHandle

        handle: Any = DeploymentHandle(DEPLOYMENT_NAME, app_of(model))
        try:
            # Private but stable since Ray 2.9 (Serve's own proxy initialises its handles this way).
            handle._init(_run_router_in_separate_loop=cfg.handle_router == "thread")
            if cfg.handle_transport == "grpc":
                handle = handle.options(
                    _by_reference=False, request_serialization="pickle", response_serialization="pickle"
                )
        except (AttributeError, TypeError, RuntimeError) as e:  # another Ray: its defaults
            log.warning("Serve handle options unavailable (%s); using Serve's default handle", _short(e))
            from ray import serve

            handle = serve.get_deployment_handle(DEPLOYMENT_NAME, app_of(model))
        return handle

    return make


class RayTailBackend:
    """TailBackend over Ray Serve DeploymentHandles, one per model.

    `handles` are used as given (tests pass fakes); with `factory` (start_serving, connect_serving)
    each event loop that calls run_tail gets handles of its own, made on first use in it: a handle
    whose router runs on the caller's loop serves that loop only."""

    def __init__(
        self, handles: Mapping[str, Any], request_timeout_s: float, *, factory: HandleFactory | None = None
    ) -> None:
        if not handles:
            raise ModelError("RayTailBackend needs at least one model handle")
        self._handles = dict(handles)
        self._factory = factory
        self._loop_handles: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, Any]] = (
            weakref.WeakKeyDictionary()
        )
        self._timeout_s = request_timeout_s
        self._closed = False
        # (engine, why) the replicas run their tails on (serving.tail_engine), as start_serving resolved it
        self.tail_engine: tuple[str, str] = ("unknown", "handles given")

    @property
    def models(self) -> list[str]:
        return list(self._handles)

    def _handle(self, model: str) -> Any:
        if self._factory is None or model not in self._handles:
            return self._handles.get(model)
        loop = asyncio.get_running_loop()
        handles = self._loop_handles.get(loop)
        if handles is None:
            handles = self._loop_handles[loop] = {}
        handle = handles.get(model)
        if handle is None:
            handle = handles[model] = self._factory(model)
        return handle

    async def run_tail(self, model: str, cut: int, batch: np.ndarray) -> np.ndarray:
        """Stages [cut, N) of `model` on a (B, ...) float32 batch -> (B, classes) logits.

        Raises TailUnavailableError when Ray cannot produce the answer within the timeout
        (replica died, Serve down, actor error), ModelError for an unknown model or a batch
        that does not fit the cut (the broker validates first, so that means a bug upstream).
        """
        if self._closed:
            raise TailUnavailableError("the Ray tail backend is closed")
        if model not in self._handles:
            raise ModelError(f"unknown model {model!r}; Ray Serve serves: {', '.join(self._handles)}")
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        try:
            response = self._handle(model).remote(int(cut), batch)
        except Exception as e:  # Serve not running, controller gone
            raise TailUnavailableError(f"cannot call the Ray Serve tail of {model}: {_short(e)}") from e
        try:
            async with asyncio.timeout(self._timeout_s):  # unlike wait_for, no extra task per call
                out = await response
        except TimeoutError:
            response.cancel()
            raise TailUnavailableError(
                f"the Ray Serve tail of {model} (cut {cut}, batch {len(batch)}) did not answer within "
                f"{self._timeout_s:g} s"
            ) from None
        except asyncio.CancelledError:
            response.cancel()
            raise
        except Exception as e:
            # The replica's own error: the exception itself over gRPC (handle_transport "grpc"),
            # its `cause` in a RayTaskError over an actor call.
            cause = e if isinstance(e, ModelError) else getattr(e, "cause", None)
            if isinstance(cause, ModelError):
                raise ModelError(str(cause)) from None
            raise TailUnavailableError(f"the Ray Serve tail of {model} failed: {_short(e)}") from e
        out = np.asarray(out)
        if out.ndim != 2 or out.shape[0] != len(batch):
            raise TailUnavailableError(
                f"the Ray Serve tail of {model} returned shape {out.shape} for a batch of {len(batch)}"
            )
        return out

    async def warm_up(self, windows: Mapping[str, tuple[int, tuple[int, ...]]], timeout_s: float) -> float:
        """One window of zeros per model, {model: (cut, activation shape)}, through this loop's
        handles; returns the seconds it took. A process's first calls through Serve (its router
        learning the replicas, the channels to them) take 100-200 ms here: made while serving, they
        inflate the batch service time admission control reads and shed the first seconds of real
        windows (bench serve's broker_x2 shed 300-3,500 of them before the broker warmed up). A
        failure is logged, not raised: the broker serves anyway and its breaker-free path answers
        UNAVAILABLE as usual."""
        t0 = time.monotonic()
        for model, (cut, shape) in windows.items():
            if model not in self._handles:
                continue
            try:
                async with asyncio.timeout(timeout_s):
                    await self.run_tail(model, cut, np.zeros((1, *shape), dtype=np.float32))
            except Exception as e:
                log.warning("warming up the Ray Serve tail of %s: %s", model, _short(e))
        return time.monotonic() - t0

    async def close(self) -> None:
        self._closed = True
        # Routers on this loop stop with it (Serve logs an error for one left polling a dead loop).
        try:
            handles = self._loop_handles.pop(asyncio.get_running_loop(), {})
        except RuntimeError:
            handles = {}
        for handle in handles.values():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(handle.shutdown_async(), 2.0)


# --- lifecycle ---------------------------------------------------------------------------------


@dataclass
class _Started:
    ray: bool  # this process called ray.init (and so shuts it down)
    local: bool  # ... and that started a local cluster, which ray.shutdown tears down whole
    serve: bool  # this process started the Serve controller
    apps: tuple[str, ...]


_started: _Started | None = None


def _noop(_: str) -> None:
    pass


def start_serving(
    cfg: ServingConfig, weights_dir: Path | None = None, progress: ProgressFn | None = None
) -> RayTailBackend:
    """Start (or join) Ray, deploy one tail app per model of `cfg`, wait until all are RUNNING.

    Ray: a process that already called ray.init (a test session) keeps its instance; otherwise
    `cfg.ray_address` None starts a local one (dashboard off), and an address joins that cluster
    (its nodes must have splitsense installed). Raises DependencyError when Ray cannot be started
    or reached, or the apps are not RUNNING within `cfg.startup_timeout_s`.
    """
    global _started
    say = progress or _noop
    from pipelines.models import get_spec

    for m in cfg.models:
        get_spec(m)  # unknown model: a ModelError now, not a replica crash loop later
    # serving.tail_engine "onnx" without a current export: a ConfigError now, before Ray starts
    engine = choose_tail_engine(cfg.tail_engine, cfg.models, weights_dir)
    import ray
    from ray import serve

    t0 = time.monotonic()
    own_ray = not ray.is_initialized()
    if own_ray:
        say("starting Ray" if cfg.ray_address is None else f"joining Ray at {cfg.ray_address}")
        try:
            ray.init(
                # "local": a new local cluster, never one a stale /tmp/ray/ray_current_cluster names
                # (ray.init's default joins whatever `ray start` last ran on this machine)
                address=cfg.ray_address or "local",
                namespace=cfg.namespace,
                include_dashboard=False,
                log_to_driver=False,
                logging_level=logging.WARNING,
                **ray_system_config(cfg),
            )
        except Exception as e:  # ConnectionError, RuntimeError, ValueError, ...
            raise DependencyError(f"cannot start or join Ray ({cfg.ray_address or 'local'}): {_short(e)}") from e
    if _started is None:
        _started = _Started(ray=own_ray, local=own_ray and cfg.ray_address is None, serve=False, apps=())
    apps = tuple(app_name(m) for m in cfg.models)
    try:
        from ray.serve.context import _get_global_client

        if _get_global_client(raise_if_no_controller_running=False) is None:
            _started.serve = True  # no Serve controller yet: the one we start is ours to stop
        say("starting Ray Serve (no HTTP proxy)")
        serve.start(proxy_location="Disabled")
        _started.apps = tuple(dict.fromkeys(_started.apps + apps))  # twice in one process: one stop
        say(f"deploying {len(apps)} tail app(s): {', '.join(cfg.models)}")
        serve.run_many(
            [serve.RunTarget(build_app(m, cfg, weights_dir), name=app_name(m), route_prefix=None) for m in cfg.models],
            wait_for_ingress_deployment_creation=False,
            wait_for_applications_running=False,
        )
        _wait_running(apps, cfg.startup_timeout_s - (time.monotonic() - t0), say)
        handles = {m: serve.get_deployment_handle(DEPLOYMENT_NAME, app_name(m)) for m in cfg.models}
    except BaseException:
        stop_serving()
        raise
    say(f"Ray Serve ready in {time.monotonic() - t0:.1f} s; tails run on {engine[0]} ({engine[1]})")
    backend = RayTailBackend(handles, cfg.request_timeout_s, factory=handle_factory(cfg))
    backend.tail_engine = engine
    return backend


def ray_system_config(cfg: ServingConfig) -> dict[str, Any]:
    """ray.init's extra arguments for a Ray started here (none when joining a cluster, whose
    raylets fixed their config at `ray start`): the workers' nice value (serving.worker_niceness)."""
    if cfg.ray_address is not None or cfg.worker_niceness is None:
        return {}
    return {"_system_config": {"worker_niceness": cfg.worker_niceness}}


def connect_serving(cfg: ServingConfig, progress: ProgressFn | None = None) -> RayTailBackend:
    """A backend over tail apps that are already running (another process deployed them).

    For a second broker process, or the benchmark's server process: joins Ray at
    `cfg.ray_address` (unless this process already did), deploys nothing, and raises
    DependencyError if an app of `cfg.models` is not RUNNING.
    """
    say = progress or _noop
    import ray
    from ray import serve

    if not ray.is_initialized():
        if cfg.ray_address is None:
            raise DependencyError("connect_serving joins a running Ray: set serving.ray_address")
        say(f"joining Ray at {cfg.ray_address}")
        try:
            ray.init(
                address=cfg.ray_address,
                namespace=cfg.namespace,
                include_dashboard=False,
                log_to_driver=False,
                logging_level=logging.WARNING,
            )
        except Exception as e:
            raise DependencyError(f"cannot join Ray at {cfg.ray_address}: {_short(e)}") from e
    _wait_running(tuple(app_name(m) for m in cfg.models), 0.0, say)
    handles = {m: serve.get_deployment_handle(DEPLOYMENT_NAME, app_name(m)) for m in cfg.models}
    backend = RayTailBackend(handles, cfg.request_timeout_s, factory=handle_factory(cfg))
    try:  # what a replica on this node picks (another node's may differ under "auto")
        backend.tail_engine = choose_tail_engine(cfg.tail_engine, cfg.models)
    except ConfigError as e:
        backend.tail_engine = (cfg.tail_engine, f"as deployed; not on this node: {e}")
    return backend


def _wait_running(apps: tuple[str, ...], timeout_s: float, say: ProgressFn) -> None:
    from ray import serve

    deadline = time.monotonic() + max(timeout_s, 0.0)
    last = ""
    while True:
        status = serve.status().applications
        states = {a: str(getattr(status.get(a), "status", "NOT_STARTED")) for a in apps}
        states = {a: s.rsplit(".", 1)[-1] for a, s in states.items()}
        failed = [a for a, s in states.items() if s in ("DEPLOY_FAILED", "UNHEALTHY")]
        if failed:
            msgs = "; ".join(f"{a}: {status[a].message}" for a in failed)
            raise DependencyError(f"Ray Serve could not deploy {', '.join(failed)}: {msgs}"[:2000])
        ready = sum(s == "RUNNING" for s in states.values())
        line = f"waiting for replicas: {ready}/{len(apps)} apps running"
        if line != last:
            say(line)
            last = line
        if ready == len(apps):
            return
        if time.monotonic() >= deadline:
            raise DependencyError(
                f"Ray Serve tail apps are not running: {states} (waited {timeout_s:.0f} s, "
                "serving.startup_timeout_s); are there enough CPUs for num_replicas x replica_cpus?"
            )
        time.sleep(0.25)


def stop_serving() -> None:
    """Delete our apps; shut Serve and Ray down only if this process started them."""
    global _started
    started, _started = _started, None
    if started is None:
        return
    import ray
    from ray import serve

    if not ray.is_initialized():
        return
    if started.local:
        # Our own local cluster: ray.shutdown stops it whole, Serve included. serve.shutdown first
        # would only add a wait, up to 30 s when a group-wide SIGTERM already took the raylet down.
        ray.shutdown()
        return
    try:
        if started.serve:
            serve.shutdown()
        else:
            for a in started.apps:
                serve.delete(a)
    except Exception as e:  # Serve already gone: nothing left to stop
        log.warning("stopping Ray Serve: %s", _short(e))
    if started.ray:
        ray.shutdown()
