"""Two broker processes serving one fleet: one Ray Serve app, one Redis, gRPC client-side balancing.

The uci_har tail is deployed here (start_serving on the session's Ray); two `splitsense cloud up
--join` processes join it, each a broker on its own port following the same Redis plan store.
A plan set published to Redis reaches both. Six EdgeDevices, each with one GrpcTransport given
both addresses (`ipv4:127.0.0.1:P1,127.0.0.1:P2`, pick_first, the device default; half of them
list the other broker first, in place of the per-device shuffle, so that both brokers get
devices), replay the UCI HAR test recording at 12.8x (a window every 100 ms) at cut 3. Once every
device offloads steadily and both brokers answer windows, the busier broker is killed (SIGKILL)
2 ms into a window one of its devices sent, so that at least that window is in flight on it.
Checked: every window of every device has exactly one result (none lost, none twice), every
device offloads again, through the surviving broker, which answers more windows than before, and
the windows in flight on the dead broker were sent again to the survivor (edge/transport.py:
their stream ended UNAVAILABLE with its connection gone), at most one falling back as `unavailable`.
"""

from __future__ import annotations

import asyncio
import functools
import json
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from cloud.auth import device_token
from cloud.backend import ModelRegistry
from cloud.plans import static_plan_set
from cloud.planstore import PlanStore, plan_validator
from cloud.serving import RayTailBackend, start_serving, stop_serving
from edge.runtime import EdgeDevice, RunSummary
from edge.sink import WindowResult
from edge.sources import SensorWindow, source_for_model
from edge.transport import GrpcTransport
from splitsense.config import REPO_ROOT, BreakerConfig, BrokerConfig, EdgeConfig, ServingConfig
from splitsense.kinds import FallbackKind
from splitsense.wire import ExecutionMode, OffloadRequest, OffloadResponse
from tests.integration.conftest import RedisServer, free_port

pytestmark = pytest.mark.integration

MODEL = "uci_har"
CUT = 3
SECRET = "side-by-side-integration-secret-0123456789"
DEVICES = 6
SPEED = 12.8  # a UCI HAR window every 100 ms
STEADY = 8  # offloaded windows per device before the kill
AFTER = 8  # offloaded windows per device after the kill, then the streams end
MAX_WINDOWS = 400  # per device: 40 s at most
START_TIMEOUT_S = 180.0  # two processes importing torch and joining Ray on 2 busy cores
BREAKER = BreakerConfig(failure_threshold=3, backoff_base_s=0.3, backoff_factor=2.0, backoff_max_s=1.0)


@pytest.fixture(scope="module")
def tails(ray_cluster: str) -> Iterator[RayTailBackend]:
    backend = start_serving(ServingConfig(models=(MODEL,), num_replicas=1, request_timeout_s=1.0))
    yield backend
    stop_serving()


class BrokerProcess:
    """`splitsense cloud up --join` in a process of its own; its port is read off its log."""

    def __init__(self, index: int, ray_address: str, redis: RedisServer, directory: Path) -> None:
        self.metrics_port = free_port()
        config = {
            "serving": {"models": [MODEL]},
            "broker": {
                "port": 0,
                "metrics_port": self.metrics_port,
                "auth_secret": SECRET,
                "static_plan_cut": CUT,
                "shutdown_grace_s": 0.5,
                "redis_url": redis.url_for("broker"),
            },
        }
        path = directory / f"broker{index}.json"
        path.write_text(json.dumps(config))
        self.log = directory / f"broker{index}.log"
        command = [sys.executable, "-m", "splitsense.cli", "cloud", "up", "--join", "--ray-address", ray_address]
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [*command, "--config", str(path)], stdin=subprocess.DEVNULL, stdout=out, stderr=out, cwd=REPO_ROOT
            )
        self.port = 0

    def wait_listening(self, deadline: float) -> int:
        while time.monotonic() < deadline and self.proc.poll() is None:
            found = re.search(r"broker listening on [\w.]+:(\d+)", self.log.read_text(errors="replace"))
            if found:
                self.port = int(found.group(1))
                return self.port
            time.sleep(0.2)
        raise AssertionError(f"broker process did not listen; its log ends:\n{self.tail()}")

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-2000:]

    def answered(self) -> float:
        """Windows answered, from its exporter: the count of the request-duration histogram."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as r:
            text = r.read().decode()
        name = "splitsense_broker_request_duration_seconds_count"
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


class _Trigger:
    """Armed with a broker process: kills it 2 ms into the next window sent to it."""

    def __init__(self) -> None:
        self.victim: BrokerProcess | None = None
        self.fired: asyncio.Event = asyncio.Event()
        self.window: tuple[str, str] | None = None  # (device id, window id) in flight at the kill


class KillingTransport(GrpcTransport):
    """A device's transport that kills an armed victim while one of its windows is in flight.

    `first_port` is the broker it dials first (pick_first, no shuffle): while both brokers are up,
    its stream is on that broker."""

    def __init__(self, *args: Any, trigger: _Trigger, first_port: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._trigger = trigger
        self._first_port = first_port

    async def offload(self, request: OffloadRequest, timeout_s: float) -> OffloadResponse:
        call = asyncio.ensure_future(super().offload(request, timeout_s))
        t = self._trigger
        if t.victim is not None and not t.fired.is_set() and t.victim.port == self._first_port:
            await asyncio.sleep(0.002)  # written, and on its way through the broker
            if not call.done() and not t.fired.is_set():
                t.victim.proc.send_signal(signal.SIGKILL)
                t.window = (request.device_id, request.window_id)
                t.fired.set()
        return await call


async def _plans_reach(brokers: list[BrokerProcess], version: int, timeout_s: float) -> list[int]:
    """The plan version each broker serves once all serve `version` (or the deadline passes)."""
    seen = [0] * len(brokers)
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        for i, b in enumerate(brokers):
            t = GrpcTransport(f"127.0.0.1:{b.port}", device_token(SECRET, "plan-reader"), device_id="plan-reader")
            try:
                plans = await t.get_plan("phone", [MODEL], timeout_s=2.0)
                seen[i] = plans.version if plans is not None else seen[i]
            finally:
                await t.close()
        if min(seen) >= version:
            break
        await asyncio.sleep(0.2)
    return seen


async def test_two_brokers_share_a_fleet_and_one_dying_loses_no_window(
    tails: RayTailBackend, ray_cluster: str, redis_server: RedisServer, tmp_path: Path
) -> None:
    brokers = [BrokerProcess(i, ray_cluster, redis_server, tmp_path) for i in range(2)]
    transports: list[GrpcTransport] = []
    trigger = _Trigger()
    runs: list[asyncio.Future[RunSummary]] = []
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        ports = [await asyncio.to_thread(b.wait_listening, deadline) for b in brokers]

        # plans reach every broker through Redis
        registry = ModelRegistry([MODEL])
        published = replace(
            static_plan_set(BrokerConfig(static_plan_cut=CUT), registry.info), version=2, reason="side by side"
        )
        async with PlanStore(redis_server.url, timeout_s=2.0) as store:
            version = await store.put(published, plan_validator({MODEL: registry.info[MODEL].n_stages}))
        assert await _plans_reach(brokers, version, 20.0) == [version, version]

        trained = registry.trained(MODEL)
        results: dict[str, list[tuple[WindowResult, float]]] = {}
        emitted: dict[str, list[str]] = {}
        stop = asyncio.Event()
        steady, recovered = asyncio.Event(), asyncio.Event()
        marks: dict[str, float] = {}

        def offloads(device: str, since: float = 0.0) -> int:
            return sum(1 for r, t in results[device] if t >= since and r.mode is ExecutionMode.OFFLOADED)

        def progress(device: str, r: WindowResult) -> None:
            results[device].append((r, time.monotonic()))
            if all(offloads(d) >= STEADY for d in results):
                steady.set()
            if "kill" in marks and all(offloads(d, marks["kill"]) >= AFTER for d in results):
                recovered.set()

        async def windows(device: str) -> AsyncIterator[SensorWindow]:
            it = aiter(source_for_model(MODEL, speed=SPEED, limit=MAX_WINDOWS))
            while not stop.is_set():
                try:
                    w = await anext(it)
                except StopAsyncIteration:
                    return
                emitted[device].append(w.window_id)
                yield w

        for i in range(DEVICES):
            device_id = f"side-{i}"
            order = ports if i % 2 == 0 else ports[::-1]  # half the fleet dials the other broker first
            token = device_token(SECRET, device_id)
            target = "ipv4:" + ",".join(f"127.0.0.1:{p}" for p in order)
            transport = KillingTransport(
                target,
                token,
                device_id=device_id,
                load_balancing="pick_first",
                shuffle_addresses=False,
                # its own connections, as a real device has (in one process gRPC shares them)
                channel_options=[("grpc.use_local_subchannel_pool", 1)],
                trigger=trigger,
                first_port=order[0],
            )
            transports.append(transport)
            cfg = EdgeConfig(
                broker_address=target,
                model=MODEL,
                device_id=device_id,
                token=token,
                default_cut=CUT,
                default_codec="fp32",
                breaker=BREAKER,
                replay_speed=SPEED,
            )
            device = EdgeDevice(cfg, trained, transport)
            results[device_id], emitted[device_id] = [], []
            runs.append(
                asyncio.ensure_future(device.run(windows(device_id), progress=functools.partial(progress, device_id)))
            )

        try:
            await asyncio.wait_for(steady.wait(), 60)
        except TimeoutError:
            seen = {d: dict(Counter(r.mode.value for r, _ in rs)) for d, rs in results.items()}
            pytest.fail(f"the fleet did not offload {STEADY} windows per device within 60 s: {seen}")
        before = [await asyncio.to_thread(b.answered) for b in brokers]
        assert all(n > 0 for n in before), f"a broker got no device: answered {before}"
        victim = 0 if before[0] >= before[1] else 1
        survivor = brokers[1 - victim]
        trigger.victim = brokers[victim]  # the next window sent to it kills it
        await asyncio.wait_for(trigger.fired.wait(), 10)
        marks["kill"] = time.monotonic()
        await asyncio.to_thread(brokers[victim].proc.wait, 10)
        try:
            await asyncio.wait_for(recovered.wait(), 30)
        except TimeoutError:
            seen = {d: dict(Counter(r.mode.value for r, t in rs if t >= marks["kill"])) for d, rs in results.items()}
            pytest.fail(f"devices did not offload {AFTER} windows each after the kill within 30 s: {seen}")
        stop.set()
        summaries = await asyncio.wait_for(asyncio.gather(*runs), 30)
        answered_after = await asyncio.to_thread(survivor.answered)
    finally:
        stop_all = [r for r in runs if not r.done()]
        for r in stop_all:
            r.cancel()
        for t in transports:
            await t.close()
        for b in brokers:
            await asyncio.to_thread(b.stop)

    t_kill = marks["kill"]
    for (device_id, rs), summary in zip(results.items(), summaries, strict=True):
        ids = [r.window_id for r, _ in rs]
        # exactly once: every emitted window has one result, none twice, none lost
        assert summary.lost == 0, (device_id, summary)
        assert sorted(ids) == sorted(emitted[device_id]) and len(set(ids)) == len(ids), device_id
        after = [r for r, t in rs if t >= t_kill]
        assert sum(r.mode is ExecutionMode.OFFLOADED for r in after) >= AFTER, (
            device_id,
            Counter(r.mode for r in after),
        )
        assert all(r.mode in (ExecutionMode.OFFLOADED, ExecutionMode.LOCAL, ExecutionMode.FALLBACK) for r, _ in rs)
    # the survivor carried the whole fleet after the kill
    assert answered_after >= before[1 - victim] + DEVICES * AFTER
    fallbacks = Counter(r.kind.value for rs in results.values() for r, t in rs if t >= t_kill and r.kind)
    resent = sum(t.windows_resent for t in transports)
    assert trigger.window is not None
    device_id, window_id = trigger.window
    in_flight = next(r for r, _ in results[device_id] if r.window_id == window_id)
    print(
        f"\nanswered before the kill {before}, survivor after {answered_after}; fallbacks after the kill "
        f"{fallbacks}; windows resent {resent}; the window in flight at the kill: {in_flight.mode.value} "
        f"{in_flight.kind.value if in_flight.kind else ''} {in_flight.latency_ms:.0f} ms"
    )
    # the windows in flight on the dead broker went to the survivor, none fell back for it (the
    # one in flight at the kill: sent again, unless its answer was already on its way back)
    assert resent >= 1 or in_flight.mode is ExecutionMode.OFFLOADED, "no window was sent again after the kill"
    # A window is sent again once: one whose resend also reached the dying broker (its channel had
    # not yet moved on) falls back as `unavailable`; seen once in CI on two loaded cores, against
    # 1-3 resent, so at most one, where every in-flight window fell back before.
    assert fallbacks[FallbackKind.UNAVAILABLE.value] <= 1, fallbacks
