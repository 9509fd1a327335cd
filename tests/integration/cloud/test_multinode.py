"""Issue 12 item 2: `splitsense cloud up --ray-address` on a real two-node Ray cluster.

The cluster is started here with `ray start --block`, as an operator would: a head (2 logical
CPUs) and a worker node (1), both on this machine at 127.0.0.2 (Ray replaces 127.0.0.1 by the
machine's routable address; any other loopback address it keeps), each with free ports of its
own, a temp dir of its own, token authentication on (RAY_AUTH_MODE=token and one RAY_AUTH_TOKEN
for every node and driver, as deploy/ray/raycluster.yaml does) and a custom resource naming it
(`splitsense_head`, `splitsense_worker`) to tell the nodes apart. GCS health checks run every
1 s and declare a node dead after 3 misses (Ray's defaults, 3 s x 5, take ~15 s). Nothing of the
test process's own Ray is touched: every Ray driver here is a process of its own, the real
`splitsense cloud up --ray-address ...` (the uci_har tail, its broker on loopback) and an
observer that reads Serve's status and the replica actors' nodes from the GCS.

1. Placement: Serve's SPREAD scheduling puts the tail's 2 replicas on the 2 nodes.
2. Node loss: an EdgeDevice (real GrpcTransport, UCI HAR replayed at 12.8x: a window every 100 ms,
   cut 3, deadline 300 ms) offloads steadily; then the worker node is killed as a machine dies
   (SIGKILL to its `ray start` process group and every process it started). Checked: every
   window has exactly one result, in order (local when the cloud could not answer), Serve runs 2
   replicas again, both on the head, and the device offloads again after that.
3. Autoscaling (serving.autoscaling, min 2, max 3, target 1 ongoing request per replica, short
   delays): concurrent clients offload windows at every cut of uci_har (6 broker lanes, up to 12
   batches in flight) until Serve runs a 3rd replica; after the load stops it goes back to 2.

The figures (placement, node death and recovery times, windows local vs offloaded during the
outage, scale-up and scale-down times) are printed, and written as JSON to the path in
SPLITSENSE_MULTINODE_REPORT when it is set. Every wait is bounded; the cluster, the observer and
`cloud up` are torn down whatever happens (only the processes started here).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import queue
import re
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch

from cloud.auth import device_token
from cloud.backend import ModelRegistry
from cloud.serving import DEPLOYMENT_NAME, app_name
from edge.runtime import EdgeDevice
from edge.sink import WindowResult
from edge.sources import SensorWindow, source_for_model
from edge.transport import GrpcTransport
from pipelines import training
from pipelines.codecs import Codec, encode
from splitsense.config import REPO_ROOT, BreakerConfig, EdgeConfig
from splitsense.v1 import offload_pb2_grpc as pb_grpc
from splitsense.wire import ExecutionMode, OffloadRequest, to_pb
from tests.integration.cloud.broker_harness import EST, SECRET, creds
from tests.integration.ray_cluster import LocalRayCluster

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MODEL = "uci_har"
APP = app_name(MODEL)
REPLICA_PREFIX = f"SERVE_REPLICA::{APP}#{DEPLOYMENT_NAME}#"
HEAD_CPUS, WORKER_CPUS = 2, 1  # logical: 3 replicas x 0.5 CPU must fit on the head alone
SERVING = {
    "models": [MODEL],
    "num_replicas": 2,
    "autoscaling": True,
    "min_replicas": 2,
    "max_replicas": 3,
    "target_ongoing_requests": 1.0,
    "upscale_delay_s": 1.0,
    "downscale_delay_s": 3.0,
    "look_back_period_s": 2.0,
    "metrics_interval_s": 0.5,
    "request_timeout_s": 1.0,
    "startup_timeout_s": 150.0,
}
DEVICE = "edge-multinode-1"
CUT = 3
SPEED = 12.8  # a UCI HAR window every 100 ms
DEADLINE_MS = 300.0
BREAKER = BreakerConfig(
    failure_threshold=2, backoff_base_s=0.3, backoff_factor=2.0, backoff_max_s=1.0, backoff_jitter=0.2
)
KILL_AFTER = 15  # windows offloaded in a row before the node is killed
AFTER_RECOVERY = 10  # offloaded windows after Serve runs 2 replicas again, then the stream ends
MAX_WINDOWS = 900  # hard bound on the stream: 90 s
START_TIMEOUT_S = 150.0  # `cloud up`: imports torch, joins Ray, 2 replicas import torch on busy cores
RECOVER_TIMEOUT_S = 60.0
LOAD_CLIENTS = 24  # 4 per lane: every lane always has windows waiting, so 2 batches in flight each
LOAD_TIMEOUT_S = 60.0
SCALE_DOWN_TIMEOUT_S = 45.0


# A Ray driver of its own (the test process may already be another cluster's driver): for each line
# on stdin, one line "@@ <JSON>" with the nodes, the replica actors (state, node) and Serve's view of
# the app (Ray prints its own notices, a node's death for one, on the driver's stdout too).
OBSERVER = r"""
import json, logging, sys
import ray
from ray._private import state as ray_state

address, app, prefix = sys.argv[1:4]
ray.init(address=address, namespace="splitsense-observer", log_to_driver=False, logging_level=logging.ERROR)
from ray import serve

print("@@", json.dumps({"ready": ray.get_runtime_context().get_node_id()}), flush=True)
for _ in sys.stdin:
    out = {"nodes": {}, "replicas": [], "serve": None, "error": ""}
    try:
        for n in ray.nodes():
            names = [k for k in n["Resources"] if k.startswith("splitsense_")]
            out["nodes"][n["NodeID"]] = {"alive": bool(n["Alive"]), "name": names[0][11:] if names else ""}
        for a in ray_state.actors().values():
            if (a.get("Name") or "").startswith(prefix):
                out["replicas"].append({"name": a["Name"], "state": a["State"], "node": a["Address"]["NodeID"]})
        status = serve.status().applications.get(app)
        if status is not None:
            d = status.deployments["tail"]
            out["serve"] = {
                "app": str(status.status).rsplit(".", 1)[-1],
                "replicas": {str(k).rsplit(".", 1)[-1]: v for k, v in d.replica_states.items()},
            }
    except Exception as e:
        out["error"] = f"{type(e).__name__}: {e}"[:300]
    print("@@", json.dumps(out), flush=True)
"""


@dataclass
class Snap:
    t: float  # time.monotonic() when the answer came
    nodes: dict[str, dict[str, Any]]
    replicas: list[dict[str, str]]
    serve: dict[str, Any] | None
    error: str

    def running(self) -> int:
        return int((self.serve or {}).get("replicas", {}).get("RUNNING", 0))

    def states(self) -> dict[str, int]:
        return dict((self.serve or {}).get("replicas", {}))

    def alive_replicas(self) -> list[str]:
        """Node names of the ALIVE replica actors ("?" for a node this snapshot does not know)."""
        return sorted(self.nodes.get(r["node"], {}).get("name", "?") for r in self.replicas if r["state"] == "ALIVE")

    def node_alive(self, name: str) -> bool:
        return any(n["alive"] for n in self.nodes.values() if n["name"] == name)


class Observer:
    def __init__(self, cluster: LocalRayCluster) -> None:
        self.log = cluster.dir / "observer.log"
        with self.log.open("wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", OBSERVER, cluster.address, APP, REPLICA_PREFIX],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                env=cluster.env,
                text=True,
            )
        self._lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, name="observer-reader", daemon=True).start()
        self._lock = threading.Lock()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("@@ "):
                self._lines.put(line[3:])

    def wait_ready(self, timeout_s: float) -> None:
        try:
            json.loads(self._lines.get(timeout=timeout_s))
        except queue.Empty:
            raise AssertionError(f"observer did not join Ray: {self.log.read_text(errors='replace')[-1500:]}") from None

    def snap(self, timeout_s: float = 20.0) -> Snap:
        with self._lock:
            assert self.proc.stdin is not None
            self.proc.stdin.write("?\n")
            self.proc.stdin.flush()
            try:
                data = json.loads(self._lines.get(timeout=timeout_s))
            except queue.Empty:
                raise AssertionError(f"observer did not answer within {timeout_s:g} s") from None
        return Snap(time.monotonic(), data["nodes"], data["replicas"], data["serve"], data["error"])

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                assert self.proc.stdin is not None
                self.proc.stdin.close()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


class CloudUp:
    """The real `splitsense cloud up --ray-address ...` in a process of its own."""

    def __init__(self, cluster: LocalRayCluster) -> None:
        config = {
            "serving": SERVING,
            "broker": {
                "port": 0,
                "metrics_port": None,
                "auth_secret": SECRET,
                "static_plan_cut": CUT,
                "local_tail": False,  # every batch to Ray: the replicas are what is under test
                "shutdown_grace_s": 0.5,
            },
        }
        path = cluster.dir / "scenario.json"
        path.write_text(json.dumps(config))
        self.log = cluster.dir / "cloud-up.log"
        command = [sys.executable, "-m", "splitsense.cli", "cloud", "up", "--config", str(path)]
        command += ["--ray-address", cluster.address]
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=out, stderr=out, cwd=REPO_ROOT, env=cluster.env
            )
        self.port = 0

    def wait_listening(self, timeout_s: float) -> int:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self.proc.poll() is None:
            found = re.search(r"broker listening on [\w.]+:(\d+)", self.log.read_text(errors="replace"))
            if found:
                self.port = int(found.group(1))
                return self.port
            time.sleep(0.2)
        raise AssertionError(f"`cloud up` did not listen within {timeout_s:g} s; its log ends:\n{self.tail()}")

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-2500:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: the broker stops, then stop_serving shuts its Serve down
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@dataclass
class Stack:
    cluster: LocalRayCluster
    observer: Observer
    cloud: CloudUp
    report: dict[str, Any] = field(default_factory=dict)


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    pytest.importorskip("ray")
    t0 = time.monotonic()
    cluster = LocalRayCluster(tmp_path)
    observer: Observer | None = None
    cloud: CloudUp | None = None
    stack: Stack | None = None
    try:
        head = cluster.start("head", HEAD_CPUS)
        worker = cluster.start("worker", WORKER_CPUS)
        cloud = CloudUp(cluster)  # starts its own clock: its Serve deploys while the observer joins
        t_cloud = time.monotonic()
        observer = Observer(cluster)
        observer.wait_ready(60.0)
        cloud.wait_listening(START_TIMEOUT_S)
        report = {
            "startup_s": {
                "head": round(head.started_s, 2),
                "worker": round(worker.started_s, 2),
                "cloud_up": round(time.monotonic() - t_cloud, 2),
            }
        }
        stack = Stack(cluster, observer, cloud, report)
        yield stack
    finally:
        t_down = time.monotonic()
        for stop in (cloud.stop if cloud else None, observer.stop if observer else None, cluster.stop):
            if stop is not None:
                try:
                    stop()
                except Exception as e:  # keep tearing down: never leave nodes behind
                    print(f"teardown: {type(e).__name__}: {e}")
        # whatever was measured, also when a check failed
        report = stack.report if stack is not None else {}
        report["teardown_s"] = round(time.monotonic() - t_down, 1)
        report["wall_s"] = round(time.monotonic() - t0, 1)
        print("\nmulti-node summary:\n" + json.dumps(report, indent=2))
        out = os.environ.get("SPLITSENSE_MULTINODE_REPORT")
        if out:
            Path(out).write_text(json.dumps(report, indent=2) + "\n")


# --- the load for autoscaling ------------------------------------------------------------------


def _requests(registry: ModelRegistry) -> list[Any]:
    """One real uci_har window's activation at every cut but the last: 6 broker lanes."""
    x, _ = training.held_out_set(registry.trained(MODEL))
    m = registry.model(MODEL)
    out = []
    for cut in range(m.n_stages):
        with torch.inference_mode():
            act = m.run(x[:1], 0, cut).numpy()
        out.append((cut, np.ascontiguousarray(act, dtype=np.float32)))
    return out


@dataclass
class LoadTally:
    lanes: int = 0
    sent: int = 0
    ok: int = 0
    refused: Counter[str] = field(default_factory=Counter)


async def _offer_load(port: int, registry: ModelRegistry, stop: asyncio.Event, tally: LoadTally) -> None:
    """LOAD_CLIENTS closed-loop clients, one unary Offload at a time each, spread over the lanes,
    until `stop` (or LOAD_TIMEOUT_S + 5 s: never unbounded)."""
    acts = _requests(registry)
    tally.lanes = len(acts)
    end = time.monotonic() + LOAD_TIMEOUT_S + 5

    async def client(i: int, stub: Any) -> None:
        cut, act = acts[i % len(acts)]
        device = f"load-{i}"
        n = 0
        while not stop.is_set() and time.monotonic() < end:
            n += 1
            req = to_pb(
                OffloadRequest(
                    window_id=f"{device}-{n}",
                    model=MODEL,
                    cut=cut,
                    device_id=device,
                    device_class="phone",
                    estimates=EST,
                    plan_version=1,
                    activation=encode(act, Codec.FP32),
                    sent_unix_ms=int(time.time() * 1000),
                    deadline_ms=1000,
                )
            )
            tally.sent += 1
            try:
                await stub.Offload(req, metadata=creds(device), timeout=5)
                tally.ok += 1
            except grpc.aio.AioRpcError as e:
                tally.refused[e.code().name] += 1
                await asyncio.sleep(0.05)

    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.OffloadServiceStub(channel)
        await asyncio.gather(*(client(i, stub) for i in range(LOAD_CLIENTS)))


# --- the test ----------------------------------------------------------------------------------


def _watch(observer: Observer, until: Callable[[Snap], bool], timeout_s: float, log: list[Snap]) -> Snap | None:
    """Poll the observer (~4 per s) until `until` holds; every snapshot goes to `log`."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        s = observer.snap()
        log.append(s)
        if until(s):
            return s
        time.sleep(0.25)
    return None


def _fmt(s: Snap, t0: float) -> str:
    alive = ",".join(sorted(n["name"] for n in s.nodes.values() if n["alive"]))
    return f"{s.t - t0:7.2f} s  nodes {alive:12s} serve {s.states()}  replicas on {s.alive_replicas()} {s.error}"


def _timeline(snaps: list[Snap], t0: float) -> str:
    """The snapshots whose state differs from the one before (times relative to t0)."""
    lines, last = [], ""
    for s in snaps:
        line = _fmt(s, t0)
        if line[9:] != last:
            lines.append(line)
            last = line[9:]
    return "\n".join(lines)


async def test_cloud_up_on_a_two_node_cluster_survives_a_node_and_autoscales(
    stack: Stack, record_property: Callable[[str, object], None]
) -> None:
    cluster, observer, cloud = stack.cluster, stack.observer, stack.cloud
    report = stack.report

    # 1. placement: the 2 replicas on the 2 nodes (SPREAD); `cloud up` waited for them RUNNING
    first = await asyncio.to_thread(
        _watch, observer, lambda s: s.running() == 2 and len(s.alive_replicas()) == 2, 30.0, []
    )
    assert first is not None, f"Serve does not report 2 RUNNING replicas: {observer.snap()}"
    report["placement"] = dict(Counter(first.alive_replicas()))
    assert first.alive_replicas() == ["head", "worker"], first
    assert first.node_alive("head") and first.node_alive("worker")

    # 2. a device offloads steadily; the worker node dies under it
    registry = ModelRegistry([MODEL])
    trained = registry.trained(MODEL)
    token = device_token(SECRET, DEVICE)
    transport = GrpcTransport(f"127.0.0.1:{cloud.port}", token, device_id=DEVICE)
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
    steady, stop = asyncio.Event(), asyncio.Event()
    marks: dict[str, float] = {}

    def progress(r: WindowResult) -> None:
        now = time.monotonic()
        done.append((r, now))
        if len(done) >= KILL_AFTER and all(x.mode is ExecutionMode.OFFLOADED for x, _ in done[-KILL_AFTER:]):
            steady.set()
        since = marks.get("recovered")
        # the same windows the test counts after recovery: emitted (not merely answered) since then;
        # counting answers stopped the stream one window short once, a window emitted just before
        if (
            since is not None
            and sum(1 for x, _ in done if emitted[x.window_id] >= since and x.mode is ExecutionMode.OFFLOADED)
            >= AFTER_RECOVERY
        ):
            stop.set()

    async def windows() -> AsyncIterator[SensorWindow]:
        it = aiter(source_for_model(MODEL, speed=SPEED, limit=MAX_WINDOWS))
        while not stop.is_set():
            try:
                w = await anext(it)
            except StopAsyncIteration:
                return
            emitted[w.window_id] = w.t_emit
            yield w

    timeline: list[Snap] = []
    run = asyncio.ensure_future(device.run(windows(), progress=progress))
    try:
        try:
            await asyncio.wait_for(steady.wait(), 30)
        except TimeoutError:
            seen = Counter(f"{r.mode.value} {r.reason[:60]}" for r, _ in done)
            pytest.fail(f"no {KILL_AFTER} windows offloaded in a row within 30 s: {dict(seen)}\n{cloud.tail()}")
        t_kill = time.monotonic()
        killed = cluster.kill("worker")
        dead = await asyncio.to_thread(_watch, observer, lambda s: not s.node_alive("worker"), 30.0, timeline)
        assert dead is not None, "the GCS never declared the killed worker node dead"

        def recovered(s: Snap) -> bool:
            return s.states() == {"RUNNING": 2} and s.alive_replicas() == ["head", "head"]

        back = await asyncio.to_thread(_watch, observer, recovered, RECOVER_TIMEOUT_S, timeline)
        assert back is not None, "Serve did not run 2 replicas on the surviving node:\n" + _timeline(timeline, t_kill)
        marks["recovered"] = back.t
        summary = await asyncio.wait_for(run, MAX_WINDOWS * 1.28 / SPEED + 10)
    finally:
        run.cancel()
        await transport.close()
    print(f"\nworker node killed ({len(killed)} processes); Ray and Serve as seen from the head:")
    print(_timeline(timeline, t_kill))

    ids = [r.window_id for r, _ in done]
    assert summary.lost == 0 and summary.windows == len(emitted) == len(done), summary
    assert ids == sorted(emitted, key=emitted.__getitem__) and len(set(ids)) == len(ids)
    dying = [r for r, _ in done if t_kill <= emitted[r.window_id] < dead.t]  # killed, not yet declared dead
    replacing = [r for r, _ in done if dead.t <= emitted[r.window_id] < back.t]  # a replica short
    after = [t for r, t in done if emitted[r.window_id] >= back.t and r.mode is ExecutionMode.OFFLOADED]
    assert len(after) >= AFTER_RECOVERY, "the device did not offload again after Serve recovered"
    first_offload_after_kill = min(
        (t for r, t in done if emitted[r.window_id] >= dead.t and r.mode is ExecutionMode.OFFLOADED), default=None
    )
    report["node_loss"] = {
        "processes_killed": len(killed),
        "node_declared_dead_s": round(dead.t - t_kill, 2),
        "replicas_back_s": round(back.t - t_kill, 2),
        "first_offload_after_node_dead_s": (
            round(first_offload_after_kill - t_kill, 2) if first_offload_after_kill is not None else None
        ),
        "windows": summary.windows,
        "by_mode": dict(summary.by_mode),
        "fallbacks_by_reason": dict(summary.fallbacks_by_reason),
        "lost": summary.lost,
        # windows by what answered them, by when they were emitted
        "emitted_kill_to_node_dead": dict(Counter(r.mode.value for r in dying)),
        "emitted_node_dead_to_replicas_back": dict(Counter(r.mode.value for r in replacing)),
        "placement_after": dict(Counter(back.alive_replicas())),
    }

    # 3. autoscaling: load at every lane until a 3rd replica runs, then none until it is gone
    load_stop = asyncio.Event()
    tally = LoadTally()
    scale_log: list[Snap] = []
    t_load = time.monotonic()
    load = asyncio.ensure_future(_offer_load(cloud.port, registry, load_stop, tally))
    try:
        up = await asyncio.to_thread(_watch, observer, lambda s: s.running() >= 3, LOAD_TIMEOUT_S, scale_log)
    finally:
        load_stop.set()
        await asyncio.wait_for(load, 20)
    t_unload = time.monotonic()
    assert up is not None, "Serve did not add a replica under load:\n" + _timeline(scale_log, t_load)
    starting = next((s.t for s in scale_log if s.states().get("STARTING", 0) or len(s.alive_replicas()) > 2), None)
    down = await asyncio.to_thread(
        _watch,
        observer,
        lambda s: s.states() == {"RUNNING": 2} and len(s.alive_replicas()) == 2,
        SCALE_DOWN_TIMEOUT_S,
        scale_log,
    )
    print(f"\nautoscaling (times from the start of the load; load stopped at {t_unload - t_load:.2f} s):")
    print(_timeline(scale_log, t_load))
    assert down is not None, "Serve did not remove the extra replica after the load stopped"
    report["autoscaling"] = {
        "config": {k: SERVING[k] for k in SERVING if k not in ("models", "request_timeout_s", "startup_timeout_s")},
        "load": {
            "clients": LOAD_CLIENTS,
            "lanes": tally.lanes,
            "sent": tally.sent,
            "ok": tally.ok,
            "ok_per_s": round(tally.ok / (t_unload - t_load), 1),
        },
        "load_refused": dict(tally.refused),
        "replica_starting_s": round(starting - t_load, 2) if starting is not None else None,
        "scale_up_s": round(up.t - t_load, 2),
        "load_s": round(t_unload - t_load, 2),
        "scale_down_s": round(down.t - t_unload, 2),
        "placement_at_peak": dict(Counter(up.alive_replicas())),
    }
    assert tally.ok > 0
    for key in ("node_declared_dead_s", "replicas_back_s"):
        record_property(key, report["node_loss"][key])
    for key in ("scale_up_s", "scale_down_s"):
        record_property(key, report["autoscaling"][key])
