"""Benchmark: one offloaded window through several paths, side by side, at several device counts.

    raw_grpc               a grpc.aio unary echo of the same request bytes (generic handler, no model):
                           the wire floor of a unary call per window
    raw_grpc_stream        the same echo over one bidirectional stream per device (a window written, its
                           echo read, in turn): the wire floor of the broker's own transport, the stream
                           every device holds (GrpcTransport): ~2.5x a unary echo's throughput here
    transport_echo         the device's own transport (GrpcTransport, one per device) against an
                           OffloadStream in the echo's process that answers each window at once with a
                           fixed result (it parses the request for its window id, nothing else): beside
                           raw_grpc_stream, its client CPU per window is what the device's transport
                           itself costs (the conversions, the stream's reader, the write task, the checks)
    in_process             the tail on the window in this process (serving.tail_engine, as the replicas
                           run it): the compute floor
    naive_ray              one Ray Serve handle call per window (batch of 1), same deployment and config
                           as the broker's (serving.max_ongoing_requests, sized for batches: it collapses)
    naive_ray_unthrottled  the same per-window call to a twin deployment whose max_ongoing_requests
                           (UNTHROTTLED_MAX_ONGOING) is high enough not to collapse: the fair baseline
    broker                 the device's own transport (edge/transport.py GrpcTransport, one per device)
                           -> gRPC broker (auth, validation, admission, micro-batcher; an idle lane runs
                           the tail in the broker, broker.local_tail) -> RayTailBackend -> the deployment
    broker_ray_only        the same with broker.local_tail off: every batch through Ray
    broker_free_tail       the same with broker.local_tail_when "free" (and local_tail_max_batch 16): the
                           broker's own tail also takes a busy lane's batch whenever it has none running
    broker_x2              two broker processes; each device's transport is given both addresses
                           (`ipv4:127.0.0.1:P1,127.0.0.1:P2`) with the device's default policy
                           (edge.lb_policy pick_first, the list shuffled per device: see
                           edge/transport.py for why not round_robin for streams)

Each cell (path, n devices) runs n asyncio tasks, each sending its next window when the previous
one is answered, until `requests` windows are answered or `max_seconds` pass. The workload is
real: test windows of the model's dataset, run through stages [0, cut) and encoded with the
codec, exactly what a device sends. The gRPC servers (echo and broker) run in a separate process
joined to the same Ray cluster, as a broker would in production, so that the simulated devices do
not share an interpreter with the server they load (a second server process holds the second broker
of broker_x2). Figures: p50/p99 latency per window and throughput (answered windows per second of
the cell's wall time); for the server paths also the server processes' CPU time per answered window
(`server_cpu_ms_per_window`: every thread of the broker or echo processes, gRPC's and Ray's included;
not the replica's) and, for broker_x2, the windows each broker answered. Every cell also gives the
whole host's busy CPU per answered window (`host_cpu_ms_per_window`, /proc/stat: the devices, the
servers, the replicas, Ray) and how busy its cores were: what a path costs in all.

The 4x throughput target is judged beside two ceilings measured in the same run, both on the echo
of the transport the broker path uses (raw_grpc_stream for streams, the default; raw_grpc for
--broker-transport unary): the echo over naive_ray_unthrottled (no gRPC server on that transport
gets past it) and the work ceiling, the host's cores over (the echo's host CPU per window + the
tail's CPU per window at the broker's batch size, measured in process after the cells): what a
broker that cost nothing beyond the wire and the tail would reach. Under either, the target is
reported infeasible on this host; over both, it is the broker's to meet. (An earlier version took
the unary echo as the ceiling of the stream path too, ~3.3x here, and called the target infeasible:
a stream echo reaches ~9x.)

    python -m benchmarks.serving_paths [--devices 1,8,64] [--requests N]  ->  {"config", "results", "summary"}
    splitsense bench serve --json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from simulators.capacity import read_host_cpu
from splitsense import aio
from splitsense.config import Config
from splitsense.errors import ConfigError, DependencyError

if TYPE_CHECKING:
    from splitsense.wire import OffloadRequest

PATHS = (
    "raw_grpc",
    "raw_grpc_stream",
    "transport_echo",
    "in_process",
    "naive_ray",
    "naive_ray_unthrottled",
    "broker",
    "broker_ray_only",
    "broker_free_tail",
    "broker_x2",
)
BROKER_PATHS = ("broker", "broker_ray_only", "broker_free_tail", "broker_x2")
# naive_ray_unthrottled's max_ongoing_requests: above any device count measured (64 by default), so
# that per-window callers queue inside the replica, never in Serve's router back-off.
UNTHROTTLED_MAX_ONGOING = 256
UNTHROTTLED_APP_PREFIX = "splitsense_bench_unthrottled_"
ECHO_METHOD = "/splitsense.bench.v1.EchoService/Echo"
ECHO_STREAM_METHOD = "/splitsense.bench.v1.EchoService/EchoStream"
# the echo path whose wire a broker transport uses: its ceiling (module docstring)
ECHO_OF_TRANSPORT = {"stream": "raw_grpc_stream", "unary": "raw_grpc"}
BROKER_TRANSPORTS = ("stream", "unary")
BENCH_SECRET = "splitsense-bench-secret"  # the server process's broker authenticates with this
MAX_MESSAGE_BYTES = 16 << 20  # gRPC message limit of both servers and of every client channel
_GRPC_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]
# A channel's own subchannels: in one process gRPC otherwise shares one connection per address
# among all channels (and a new channel's pick_first takes whichever is already connected).
_OWN_CONNECTION: list[tuple[str, Any]] = [("grpc.use_local_subchannel_pool", 1)]
# Targets of issue 12: batching must pay at load against a naive path that does not collapse, and a
# lone window must not pay the Ray hop.
TARGET_THROUGHPUT_RATIO = 4.0  # broker / naive_ray_unthrottled throughput ...
TARGET_THROUGHPUT_DEVICES = 64  # ... at 64 devices
TARGET_P50_MARGIN_MS = 2.0  # broker p50 <= raw_grpc p50 + in_process p50 + this ...
TARGET_P50_DEVICES = 1  # ... with one device

Progress = Callable[[str], None]


@dataclass(frozen=True)
class ServeBenchConfig:
    model: str = "uci_har"
    cut: int | None = None  # None: the middle stage boundary, n_stages // 2
    devices: tuple[int, ...] = (1, 8, 64)
    requests: int = 1000  # answered windows per cell, at most
    max_seconds: float = 8.0  # wall time per cell, at most
    codec: str = "fp32"
    windows: int = 256  # distinct real test windows the devices cycle through
    windows_per_device: int = 8  # pre-serialised requests per device (device id is in the request)
    call_timeout_s: float = 10.0  # gRPC deadline of one call; a miss counts as an error
    server_start_timeout_s: float = 120.0
    paths: tuple[str, ...] = PATHS  # a subset measures fewer paths (the JSON says which)
    # How the broker path's devices call, through edge/transport.py's GrpcTransport: "stream", as a
    # device does by default (one OffloadStream per device, token checked once per stream), or
    # "unary" (use_stream=False: one Offload call per window).
    broker_transport: str = "stream"
    # Each simulated device on its own TCP connection(s), as real devices are
    # (grpc.use_local_subchannel_pool); False: gRPC's default in one process, every channel to the
    # same address shares one connection (how this bench ran before issue 12).
    own_connections: bool = True

    def __post_init__(self) -> None:
        paths = tuple(self.paths)
        if not paths or any(p not in PATHS for p in paths):
            raise ConfigError(f"paths must be a non-empty subset of {', '.join(PATHS)}, got {self.paths!r}")
        object.__setattr__(self, "paths", paths)
        if self.broker_transport not in BROKER_TRANSPORTS:
            raise ConfigError(f"broker_transport must be one of {BROKER_TRANSPORTS}, got {self.broker_transport!r}")
        devices = tuple(int(d) for d in self.devices)
        if not devices or any(d < 1 for d in devices):
            raise ConfigError(f"devices must be positive ints, got {self.devices!r}")
        object.__setattr__(self, "devices", devices)
        if self.requests < 1 or self.windows < 1 or self.windows_per_device < 1:
            raise ConfigError("requests, windows and windows_per_device must be >= 1")
        if not self.max_seconds > 0 or not self.call_timeout_s > 0:
            raise ConfigError("max_seconds and call_timeout_s must be > 0")


@dataclass(frozen=True)
class Cell:
    path: str
    devices: int
    p50_ms: float
    p99_ms: float
    throughput_rps: float
    ok: int
    errors: int
    seconds: float
    first_error: str = ""
    broker_timing: dict[str, float] | None = None  # broker paths: means of the answers' Timing
    server_cpu_ms_per_window: float | None = None  # server paths: the server processes' CPU / ok
    client_cpu_ms_per_window: float | None = None  # this process's CPU / ok: the devices (and Ray's caller side)
    broker_windows: list[int] | None = None  # broker_x2: windows each broker answered
    # The whole host's busy CPU (/proc/stat: every process, the replicas' and Ray's included) per
    # answered window, and the busy share of its cores over the cell: what the path costs in all.
    host_cpu_ms_per_window: float | None = None
    host_busy_share: float | None = None
    local_tail_share: float | None = None  # broker paths: windows the brokers' own tails ran, not Ray

    def row(self) -> dict[str, Any]:
        optional = (
            "first_error",
            "broker_timing",
            "server_cpu_ms_per_window",
            "client_cpu_ms_per_window",
            "broker_windows",
            "host_cpu_ms_per_window",
            "host_busy_share",
            "local_tail_share",
        )
        return {k: v for k, v in asdict(self).items() if k not in optional or (v is not None and v != "")}


@dataclass
class Workload:
    model: str
    cut: int
    cut_name: str
    activation_shape: tuple[int, ...]
    arrays: list[np.ndarray]  # (1, *shape) float32, decoded from the wire bytes
    requests: list[list[OffloadRequest]]  # [device][j]: one window, as a device sends it
    payloads: list[list[bytes]]  # the same, serialised (splitsense.v1.OffloadRequest): the echo's bytes
    tokens: list[str]  # [device]: its bearer token
    payload_bytes: int
    n_stages: int


# --- the workload -----------------------------------------------------------------------------


def _device_id(d: int) -> str:
    return f"bench-{d:04d}"


def build_workload(bench: ServeBenchConfig, max_devices: int) -> tuple[Workload, Any]:
    """Real test windows through the front [0, cut), encoded as devices send them."""
    import torch

    from cloud.auth import device_token
    from pipelines.codecs import decode, encode
    from pipelines.training import held_out_set, load_trained
    from splitsense.wire import DeviceEstimates, OffloadRequest, RadioKind, to_pb

    tm = load_trained(bench.model)
    m = tm.model
    cut = m.n_stages // 2 if bench.cut is None else m.check_cut(bench.cut)
    if cut >= m.n_stages:
        raise ConfigError(f"cut {cut} runs {bench.model} fully on the device: nothing to offload")
    x, _ = held_out_set(tm)
    x = x[: bench.windows]
    with torch.inference_mode():
        acts = m.run(x, 0, cut).numpy()
    encoded = [encode(a[None], bench.codec) for a in acts]
    arrays = [decode(e) for e in encoded]
    estimates = DeviceEstimates(
        bandwidth_mbps=20.0, rtt_ms=20.0, battery_fraction=0.8, on_battery=True, radio=RadioKind.WIFI
    )
    now_ms = int(time.time() * 1000)
    requests: list[list[OffloadRequest]] = []
    payloads: list[list[bytes]] = []
    tokens: list[str] = []
    for d in range(max_devices):
        dev = _device_id(d)
        tokens.append(device_token(BENCH_SECRET, dev))
        row: list[OffloadRequest] = []
        for j in range(bench.windows_per_device):
            w = (d * bench.windows_per_device + j) % len(encoded)
            req = OffloadRequest(
                window_id=f"{dev}-w{w}",
                model=bench.model,
                cut=cut,
                device_id=dev,
                device_class="phone",
                estimates=estimates,
                plan_version=0,
                activation=encoded[w],
                sent_unix_ms=now_ms,
            )
            row.append(req)
        requests.append(row)
        payloads.append([to_pb(req).SerializeToString() for req in row])
    wl = Workload(
        model=bench.model,
        cut=cut,
        cut_name=m.cut_name(cut),
        activation_shape=tuple(m.activation_shape(cut)),
        arrays=arrays,
        requests=requests,
        payloads=payloads,
        tokens=tokens,
        payload_bytes=len(payloads[0][0]),
        n_stages=m.n_stages,
    )
    return wl, m


# --- the load driver --------------------------------------------------------------------------

Call = Callable[[int, int], Awaitable[None]]  # (device, request index of that device)


async def drive(path: str, devices: int, call: Call, requests: int, max_seconds: float) -> Cell:
    """n closed-loop devices; each sends its next request when the previous one is answered."""
    latencies: list[float] = []
    errors: list[str] = []
    issued = 0
    start = time.perf_counter()
    stop_at = start + max_seconds

    async def device(d: int) -> None:
        nonlocal issued
        i = 0
        while issued < requests and time.perf_counter() < stop_at:
            issued += 1
            t = time.perf_counter()
            try:
                await call(d, i)
            except Exception as e:  # counted, never fatal: the cell reports its errors
                errors.append(f"{type(e).__name__}: {str(e)[:200]}")
            else:
                latencies.append(time.perf_counter() - t)
            i += 1
            await asyncio.sleep(0)  # let the other devices in (matters for the synchronous path)

    await asyncio.gather(*(device(d) for d in range(devices)))
    seconds = time.perf_counter() - start
    lat_ms = np.asarray(latencies) * 1000.0
    return Cell(
        path=path,
        devices=devices,
        p50_ms=round(float(np.percentile(lat_ms, 50)), 3) if len(lat_ms) else float("nan"),
        p99_ms=round(float(np.percentile(lat_ms, 99)), 3) if len(lat_ms) else float("nan"),
        throughput_rps=round(len(latencies) / seconds, 1) if seconds > 0 else 0.0,
        ok=len(latencies),
        errors=len(errors),
        seconds=round(seconds, 2),
        first_error=errors[0] if errors else "",
    )


# --- the paths --------------------------------------------------------------------------------


class _Channels:
    """raw_grpc: one bare gRPC channel per simulated device, as real devices each hold their own
    connection (the broker path's devices each hold a GrpcTransport instead)."""

    def __init__(self, port: int, devices: int, own_connections: bool = True) -> None:
        import grpc

        options = _GRPC_OPTIONS + (_OWN_CONNECTION if own_connections else [])
        self.channels = [grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options) for _ in range(devices)]

    async def ready(self, timeout_s: float) -> None:
        async with asyncio.timeout(timeout_s):
            await asyncio.gather(*(c.channel_ready() for c in self.channels))

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self.channels))


async def _measure_cell(
    path: str,
    n: int,
    bench: ServeBenchConfig,
    wl: Workload,
    tail: Any,
    backends: dict[str, Any],
    servers: list[ServerProcess],
) -> Cell:
    from edge.transport import GrpcTransport

    k = bench.windows_per_device
    channels: _Channels | None = None
    transports: list[GrpcTransport] = []
    streams: list[Any] = []  # raw_grpc_stream's calls, one per device
    timings: list[tuple[int, float, float]] = []  # broker answers: (batch size, queue ms, compute ms)
    measured: list[ServerProcess] = []  # the server processes whose CPU this cell charges
    if path == "in_process":
        arrays = wl.arrays

        async def call(d: int, i: int) -> None:
            tail(wl.cut, arrays[(d * k + i) % len(arrays)])

    elif path in ("naive_ray", "naive_ray_unthrottled"):
        arrays, backend = wl.arrays, backends[path]

        async def call(d: int, i: int) -> None:
            await backend.run_tail(wl.model, wl.cut, arrays[(d * k + i) % len(arrays)])

    elif path == "raw_grpc":
        channels = _Channels(servers[0].ports["echo"], n, bench.own_connections)
        echo = [c.unary_unary(ECHO_METHOD) for c in channels.channels]
        measured = [servers[0]]

        async def call(d: int, i: int) -> None:
            payload = wl.payloads[d][i % k]
            out = await echo[d](payload, timeout=bench.call_timeout_s)
            if len(out) != len(payload):
                raise RuntimeError("echo answered other bytes")

    elif path == "raw_grpc_stream":
        channels = _Channels(servers[0].ports["echo"], n, bench.own_connections)
        streams = [c.stream_stream(ECHO_STREAM_METHOD)() for c in channels.channels]
        measured = [servers[0]]
        eof = grpc_eof()

        async def call(d: int, i: int) -> None:
            payload = wl.payloads[d][i % k]
            async with asyncio.timeout(bench.call_timeout_s):
                await streams[d].write(payload)
                out = await streams[d].read()
            if out is eof or len(out) != len(payload):
                raise RuntimeError("the stream echo ended or answered other bytes")

    elif path in BROKER_PATHS or path == "transport_echo":
        # Each simulated device drives the broker as a device does: its own GrpcTransport (one
        # channel; one OffloadStream, or unary calls), typed errors, answers checked by window id.
        if path == "transport_echo":
            measured = [servers[0]]
            target = f"127.0.0.1:{servers[0].ports['echo']}"
        elif path == "broker_x2":
            measured = servers[:2]
            target = "ipv4:" + ",".join(f"127.0.0.1:{s.ports['broker']}" for s in measured)
        else:
            measured = [servers[0]]
            target = f"127.0.0.1:{servers[0].ports[path]}"
        transports = [
            GrpcTransport(
                target,
                wl.tokens[d],
                device_id=_device_id(d),
                use_stream=bench.broker_transport == "stream",
                max_message_bytes=MAX_MESSAGE_BYTES,
                load_balancing="pick_first",  # edge.lb_policy's default: a broker at random per device
                channel_options=_OWN_CONNECTION if bench.own_connections else (),
            )
            for d in range(n)
        ]

        async def call(d: int, i: int) -> None:
            resp = await transports[d].offload(wl.requests[d][i % k], bench.call_timeout_s)
            if path != "transport_echo":
                t = resp.timing
                timings.append((t.batch_size, t.queue_ms, t.compute_ms))

    else:
        raise ConfigError(f"unknown path {path!r}; paths: {', '.join(PATHS)}")
    try:
        if channels is not None:
            await channels.ready(bench.call_timeout_s)
        # Warm-up, untimed: one window per device (connections, streams, lazy kernels, Serve routing).
        await asyncio.gather(*(call(d, 0) for d in range(n)), return_exceptions=True)
        timings.clear()
        before = [s.stats() for s in measured]
        host_before = read_host_cpu()
        client_cpu = time.process_time()
        cell = await drive(path, n, call, bench.requests, bench.max_seconds)
        client_cpu = time.process_time() - client_cpu
        host_after = read_host_cpu()
        after = [s.stats() for s in measured]
        if host_before is not None and host_after is not None and cell.ok:
            used = host_after.since(host_before)
            cell = replace(
                cell,
                host_cpu_ms_per_window=round(used["busy_cpu_s"] * 1000 / cell.ok, 3),
                host_busy_share=round(used["busy_share"], 3),
            )
        if cell.ok:
            cell = replace(cell, client_cpu_ms_per_window=round(client_cpu * 1000 / cell.ok, 3))
        if timings:
            t = np.asarray(timings)
            batch, queue, compute = (round(float(v), 3) for v in np.mean(t, axis=0))
            # each answer carries its batch's compute time: the mean of compute / batch size over
            # the answers is the tail's time per window in the broker's batches (wall time, which a
            # busy host stretches: the work ceiling uses tail_cpu_ms_per_window instead)
            per_window = round(float(np.mean(t[:, 2] / np.maximum(t[:, 0], 1.0))), 3)
            timing = {
                "batch_size": batch,
                "queue_ms": queue,
                "compute_ms": compute,
                "compute_ms_per_window": per_window,
            }
            cell = replace(cell, broker_timing=timing)
        if measured and cell.ok:
            cpu_s = sum(a["cpu_s"] - b["cpu_s"] for a, b in zip(after, before, strict=True))
            cell = replace(cell, server_cpu_ms_per_window=round(cpu_s * 1000 / cell.ok, 3))
        if path in BROKER_PATHS and measured:
            name = "broker" if path == "broker_x2" else path  # the broker(s) this cell's devices dialled
            pairs = [
                (a["by"].get(name, [0.0, 0.0]), b["by"].get(name, [0.0, 0.0]))
                for a, b in zip(after, before, strict=True)
            ]
            answered = sum(a[0] - b[0] for a, b in pairs)
            local = sum(a[1] - b[1] for a, b in pairs)
            if answered > 0:
                cell = replace(cell, local_tail_share=round(local / answered, 3))
        if path == "broker_x2":
            per_broker = [int(a["by"]["broker"][0] - b["by"]["broker"][0]) for a, b in zip(after, before, strict=True)]
            cell = replace(cell, broker_windows=per_broker)
        return cell
    finally:
        await asyncio.gather(*(t.close() for t in transports))
        for stream in streams:
            stream.cancel()
        if channels is not None:
            await channels.close()


# --- the server process -----------------------------------------------------------------------


class ServerProcess:
    """`python -m benchmarks.serving_paths --server`: echo + brokers, joined to our Ray cluster.

    The parent talks to it over its stdin and stdout, one JSON line each way: the ports once it
    listens, then `stats()` on demand ({"cpu_s": this process's CPU time, "by": {broker name:
    [windows answered, windows on its own tail]}}); closing stdin stops it gracefully."""

    def __init__(self, spec: dict[str, Any], timeout_s: float) -> None:
        self._log = tempfile.NamedTemporaryFile("w+", prefix="splitsense-bench-server-", suffix=".log")  # noqa: SIM115
        env = dict(os.environ)
        env.setdefault("OMP_NUM_THREADS", "1")
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.serving_paths", "--server"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            env=env,
        )
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._proc.stdin.write(json.dumps(spec) + "\n")
        self._proc.stdin.flush()
        self.ports = self._read_ports(timeout_s)

    @property
    def pid(self) -> int:
        return self._proc.pid

    def _read_line(self, timeout_s: float) -> dict[str, Any] | None:
        import selectors

        assert self._proc.stdout is not None
        sel = selectors.DefaultSelector()
        sel.register(self._proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if sel.select(timeout=0.5):
                line = self._proc.stdout.readline()
                if not line:
                    return None
                msg: dict[str, Any] = json.loads(line)
                return msg
            if self._proc.poll() is not None:
                return None
        return None

    def _read_ports(self, timeout_s: float) -> dict[str, int]:
        msg = self._read_line(timeout_s)
        if msg is not None and "error" in msg:
            self.close()
            raise DependencyError(f"benchmark server: {msg['error']}")
        if msg is None:
            tail = self.log_tail()
            self.close()
            raise DependencyError(f"the benchmark server process did not start; its log ends:\n{tail}")
        return {k[: -len("_port")]: int(v) for k, v in msg.items() if k.endswith("_port")}

    def stats(self, timeout_s: float = 10.0) -> dict[str, Any]:
        """This process's CPU seconds so far and `by`: {broker name: [windows answered, windows on
        its own tail]} for each of its brokers."""
        assert self._proc.stdin is not None
        self._proc.stdin.write("stats\n")
        self._proc.stdin.flush()
        msg = self._read_line(timeout_s)
        if msg is None:
            raise DependencyError(f"the benchmark server process did not answer; its log ends:\n{self.log_tail()}")
        return {
            "cpu_s": float(msg["cpu_s"]),
            "by": {k: [float(v[0]), float(v[1])] for k, v in msg["by"].items()},
        }

    def log_tail(self, chars: int = 2000) -> str:
        self._log.flush()
        self._log.seek(0)
        return self._log.read()[-chars:]

    def close(self) -> None:
        if self._proc.poll() is None:
            with contextlib.suppress(Exception):
                assert self._proc.stdin is not None
                self._proc.stdin.close()  # EOF: the server stops gracefully
            try:
                self._proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=5)
        self._log.close()


def grpc_eof() -> Any:
    import grpc

    return grpc.aio.EOF


async def _echo_stream(requests: Any, context: Any) -> Any:
    async for request in requests:
        yield request


async def _echo(request: bytes, context: Any) -> bytes:
    return request


def _answer_at_once() -> Callable[[Any, Any], Any]:
    """transport_echo's OffloadStream: each window answered at once with a fixed result."""
    from splitsense.v1 import offload_pb2 as pb

    fixed = pb.OffloadResponse(logits=[0.0], prediction=0, timing=pb.Timing(batch_size=1))

    async def stream(requests: Any, context: Any) -> Any:
        async for request in requests:
            result = pb.OffloadResponse()
            result.CopyFrom(fixed)
            result.window_id = request.request.window_id
            yield pb.OffloadStreamResponse(window_id=result.window_id, result=result)

    return stream


def _summed(metric: Any, suffix: str) -> int:
    """The sum over every label set of a metric's samples whose name ends with `suffix`."""
    return int(sum(s.value for family in metric.collect() for s in family.samples if s.name.endswith(suffix)))


def _answered(broker: Any) -> int:
    """Windows a broker answered so far: the count of its request-duration histogram."""
    return _summed(broker.metrics.request_duration, "_count")


def _local_windows(broker: Any) -> int:
    """Windows a broker's own tail ran so far (broker.local_tail), not Ray."""
    return _summed(broker.metrics.local_windows, "_total")


async def _serve_main(spec: dict[str, Any]) -> None:
    import grpc

    from cloud.backend import ModelRegistry
    from cloud.broker import Broker
    from cloud.serving import connect_serving

    cfg = Config.from_dict(spec["config"])
    ports: dict[str, int] = {}
    echo = None
    if spec.get("echo", True):
        echo = grpc.aio.server(options=_GRPC_OPTIONS)
        echo.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(
                    ECHO_METHOD.split("/")[1],
                    {
                        "Echo": grpc.unary_unary_rpc_method_handler(_echo),
                        "EchoStream": grpc.stream_stream_rpc_method_handler(_echo_stream),
                    },
                ),
            )
        )
        from splitsense.v1 import offload_pb2 as pb

        answer = grpc.stream_stream_rpc_method_handler(
            _answer_at_once(),
            request_deserializer=pb.OffloadStreamRequest.FromString,
            response_serializer=pb.OffloadStreamResponse.SerializeToString,
        )
        echo.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("splitsense.v1.OffloadService", {"OffloadStream": answer}),)
        )
        ports["echo_port"] = echo.add_insecure_port("127.0.0.1:0")
        await echo.start()
    backend = connect_serving(cfg.serving)
    registry = ModelRegistry(cfg.serving.models, cfg.paths.weights_dir)
    brokers: dict[str, Any] = {}
    for name in spec.get("brokers", ["broker"]):
        # broker_ray_only: the same broker with every batch through Ray (broker.local_tail off)
        # broker_free_tail: its own tail as a co-located replica (broker.local_tail_when "free")
        bcfg = cfg.broker
        if name == "broker_ray_only":
            bcfg = replace(cfg.broker, local_tail=False)
        elif name == "broker_free_tail":
            bcfg = replace(cfg.broker, local_tail_when="free", local_tail_max_batch=16)
        brokers[name] = Broker(bcfg, registry, backend, tail_engine=cfg.serving.tail_engine)
        ports[f"{name}_port"] = await brokers[name].start()
    print(json.dumps(ports), flush=True)
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)  # until the parent closes our stdin
        if not line:
            break
        if line.strip() == "stats":
            by = {name: [_answered(b), _local_windows(b)] for name, b in brokers.items()}
            print(json.dumps({"cpu_s": time.process_time(), "by": by}), flush=True)
    for broker in brokers.values():
        await broker.stop(1.0)
    if echo is not None:
        await echo.stop(0.5)
    await backend.close()


def server_main() -> None:
    spec = json.loads(sys.stdin.readline())
    try:
        aio.run(_serve_main(spec))
    except Exception as e:
        print(json.dumps({"error": f"{type(e).__name__}: {e}"}), flush=True)
        raise SystemExit(1) from None


# --- the whole run ----------------------------------------------------------------------------


def _bench_config(cfg: Config, bench: ServeBenchConfig) -> Config:
    """This model only; a broker on a free loopback port, with the bench secret and no exporter."""
    serving = replace(cfg.serving, models=(bench.model,))
    broker = replace(cfg.broker, host="127.0.0.1", port=0, auth_secret=BENCH_SECRET, metrics_port=None)
    return replace(cfg, serving=serving, broker=broker)


def summarize(
    cells: list[Cell],
    devices: tuple[int, ...],
    host_cores: int | None = None,
    tail_cpu_ms: float | None = None,
    transport: str = "stream",
) -> dict[str, Any]:
    """Ratios at the most devices (throughput) and the fewest (p50), and a verdict on each target
    whose device count was measured (64 for throughput, 1 for p50). `host_cores`: this host's
    logical CPUs (os.cpu_count() when None); `tail_cpu_ms`: the tail's CPU per window at the
    broker's batch size (tail_cpu_ms_per_window), for the work ceiling."""
    host_cores = host_cores or os.cpu_count() or 1
    by = {(c.path, c.devices): c for c in cells}
    hi, lo = max(devices), min(devices)
    out: dict[str, Any] = {}

    def ratio(a: str, b: str, n: int) -> float | None:
        x, y = by.get((a, n)), by.get((b, n))
        return round(x.throughput_rps / y.throughput_rps, 2) if x and y and y.throughput_rps > 0 else None

    for other, key in (
        ("naive_ray", f"broker_vs_naive_throughput_at_{hi}"),
        ("naive_ray_unthrottled", f"broker_vs_naive_unthrottled_throughput_at_{hi}"),
        ("broker_ray_only", f"broker_vs_ray_only_throughput_at_{hi}"),
    ):
        r = ratio("broker", other, hi)
        if r is not None:
            out[key] = r
    for key, (x_path, y_path) in {
        f"free_tail_vs_naive_unthrottled_throughput_at_{hi}": ("broker_free_tail", "naive_ray_unthrottled"),
        f"free_tail_vs_broker_throughput_at_{hi}": ("broker_free_tail", "broker"),
    }.items():
        r = ratio(x_path, y_path, hi)
        if r is not None:
            out[key] = r
    r = ratio("broker_x2", "broker", hi)
    if r is not None:
        out[f"broker_x2_vs_broker_throughput_at_{hi}"] = r
    r = out.get(f"broker_vs_naive_unthrottled_throughput_at_{hi}")
    if r is not None and hi == TARGET_THROUGHPUT_DEVICES:
        # The most any path through a gRPC server on the broker's transport can reach in this
        # harness on this host: its echo answers the same messages and does no work, so no broker
        # gets past it. A ceiling under the target makes the target infeasible here, whatever the
        # broker does; only the echo of the same transport bounds it (a unary echo does not bound
        # a stream: ~2.5x apart here).
        echo_path = ECHO_OF_TRANSPORT[transport]
        ceiling = ratio(echo_path, "naive_ray_unthrottled", hi)
        work = work_ceiling(by.get((echo_path, hi)), by.get(("naive_ray_unthrottled", hi)), tail_cpu_ms, host_cores)
        bounds = [c for c in (ceiling, work["ratio"] if work else None) if c is not None]
        out["throughput_target"] = {
            "devices": hi,
            "versus": "naive_ray_unthrottled",
            "ratio": r,
            "min_ratio": TARGET_THROUGHPUT_RATIO,
            "met": r >= TARGET_THROUGHPUT_RATIO,
            "ceiling_path": echo_path,
            "ceiling_ratio": ceiling,
            "work_ceiling": work,
            "feasible": min(bounds) >= TARGET_THROUGHPUT_RATIO if bounds else None,
        }
        for echo in ECHO_OF_TRANSPORT.values():
            e = ratio(echo, "naive_ray_unthrottled", hi)
            if e is not None:
                out[f"{echo}_vs_naive_unthrottled_throughput_at_{hi}"] = e
    for path in BROKER_PATHS:
        c = by.get((path, hi))
        if c is not None and c.server_cpu_ms_per_window is not None:
            out[f"{path}_server_cpu_ms_per_window_at_{hi}"] = c.server_cpu_ms_per_window
    tc, ec = by.get(("transport_echo", hi)), by.get(("raw_grpc_stream", hi))
    if tc and ec and tc.client_cpu_ms_per_window is not None and ec.client_cpu_ms_per_window is not None:
        # what the device's transport costs beyond the bare stream it runs on, on the client
        out[f"transport_client_cpu_ms_per_window_at_{hi}"] = tc.client_cpu_ms_per_window
        out[f"raw_grpc_stream_client_cpu_ms_per_window_at_{hi}"] = ec.client_cpu_ms_per_window
    b, n = by.get(("broker", lo)), by.get(("naive_ray", lo))
    if b and n:
        out[f"broker_minus_naive_p50_ms_at_{lo}"] = round(b.p50_ms - n.p50_ms, 3)
    b, ro = by.get(("broker", lo)), by.get(("broker_ray_only", lo))
    if b and ro:
        out[f"broker_ray_only_minus_broker_p50_ms_at_{lo}"] = round(ro.p50_ms - b.p50_ms, 3)
    b, g, i = by.get(("broker", lo)), by.get(("raw_grpc", lo)), by.get(("in_process", lo))
    if b and g and i:
        budget = round(g.p50_ms + i.p50_ms + TARGET_P50_MARGIN_MS, 3)
        out[f"broker_p50_budget_ms_at_{lo}"] = budget
        if lo == TARGET_P50_DEVICES:
            out["p50_target"] = {
                "devices": lo,
                "broker_p50_ms": b.p50_ms,
                "budget_ms": budget,
                "rule": f"raw_grpc + in_process + {TARGET_P50_MARGIN_MS:g} ms",
                "met": b.p50_ms <= budget,
            }
    return out


def work_ceiling(
    echo: Cell | None, naive: Cell | None, tail_cpu_ms_per_window: float | None, cores: int
) -> dict[str, float] | None:
    """The most this host could answer per second if a broker added nothing to an echo but the
    tail's compute: its cores over (the echo path's host CPU per window, clients included, + the
    tail's CPU per window at the broker's batch size, measured in process), and that over the naive
    path's throughput. An upper bound: every core busy and a broker that costs nothing else."""
    if echo is None or naive is None or echo.host_cpu_ms_per_window is None or tail_cpu_ms_per_window is None:
        return None
    if naive.throughput_rps <= 0:
        return None
    rps = cores * 1000.0 / (echo.host_cpu_ms_per_window + tail_cpu_ms_per_window)
    return {
        "host_cores": cores,
        "echo_host_cpu_ms_per_window": echo.host_cpu_ms_per_window,
        "tail_cpu_ms_per_window": tail_cpu_ms_per_window,
        "windows_per_s": round(rps, 1),
        "ratio": round(rps / naive.throughput_rps, 2),
    }


def tail_cpu_ms_per_window(tail: Any, cut: int, arrays: list[np.ndarray], batch: int, seconds: float = 1.0) -> float:
    """This process's CPU per window running the tail (`tail(cut, batch)`, a cloud.backend
    TailRunner, as a replica runs a batch) on batches of `batch` of the workload's windows, for
    about `seconds` after one warm-up."""
    batch = max(1, batch)
    x = np.concatenate([arrays[i % len(arrays)] for i in range(batch)], axis=0)
    tail(cut, x)
    windows, cpu0, end = 0, time.process_time(), time.perf_counter() + seconds
    while time.perf_counter() < end or windows == 0:
        tail(cut, x)
        windows += batch
    return round((time.process_time() - cpu0) * 1000 / windows, 4)


def _deploy_unthrottled(cfg: Config, model: str) -> Any:
    """naive_ray_unthrottled's twin deployment (max_ongoing_requests UNTHROTTLED_MAX_ONGOING) and a
    backend over it with the broker's handle options."""
    from ray import serve

    from cloud.serving import DEPLOYMENT_NAME, RayTailBackend, build_app, handle_factory

    serving = replace(cfg.serving, max_ongoing_requests=UNTHROTTLED_MAX_ONGOING)
    name = f"{UNTHROTTLED_APP_PREFIX}{model}"
    serve.run(build_app(model, serving, cfg.paths.weights_dir), name=name, route_prefix=None)
    handle = serve.get_deployment_handle(DEPLOYMENT_NAME, name)
    return RayTailBackend({model: handle}, serving.request_timeout_s, factory=handle_factory(serving, lambda _m: name))


def run_serve_bench(
    bench: ServeBenchConfig | None = None, cfg: Config | None = None, progress: Progress | None = None
) -> dict[str, Any]:
    """Run every (path, devices) cell once and return {"config", "results", "summary"}."""
    import ray
    import torch
    from ray import serve

    from cloud.backend import make_tail
    from cloud.serving import start_serving, stop_serving

    bench = bench or ServeBenchConfig()
    say = progress or (lambda _m: None)
    cfg = _bench_config(cfg or Config(), bench)
    torch.set_num_threads(1)  # the in_process row is one window at a time, like a replica's thread
    say(f"preparing {bench.model} windows")
    wl, model = build_workload(bench, max(bench.devices))
    # in_process and the tail's CPU: the engine the replicas and the broker's own tail run
    tail = make_tail(bench.model, cfg.serving.tail_engine, model, cfg.paths.weights_dir)
    backend = start_serving(cfg.serving, weights_dir=cfg.paths.weights_dir, progress=say)
    backends: dict[str, Any] = {"naive_ray": backend}
    servers: list[ServerProcess] = []
    unthrottled = "naive_ray_unthrottled" in bench.paths
    tail_cpu: float | None = None  # the tail's CPU per window at the broker's batch size
    try:
        if unthrottled:
            say(f"deploying the naive_ray_unthrottled twin (max_ongoing_requests {UNTHROTTLED_MAX_ONGOING})")
            backends["naive_ray_unthrottled"] = _deploy_unthrottled(cfg, bench.model)
        full = cfg.to_dict()
        spec_cfg = {k: full[k] for k in ("paths", "serving", "broker")}
        spec_cfg["serving"]["ray_address"] = ray.get_runtime_context().gcs_address
        say("starting the echo and broker server process")
        brokers = [p for p in ("broker", "broker_ray_only", "broker_free_tail") if p in bench.paths]
        if "broker_x2" in bench.paths and "broker" not in brokers:
            brokers.insert(0, "broker")
        servers.append(ServerProcess({"config": spec_cfg, "brokers": brokers}, bench.server_start_timeout_s))
        if "broker_x2" in bench.paths:
            say("starting the second broker process (broker_x2)")
            spec = {"config": spec_cfg, "brokers": ["broker"], "echo": False}
            servers.append(ServerProcess(spec, bench.server_start_timeout_s))
        cells: list[Cell] = []

        async def all_cells() -> None:
            for n in bench.devices:
                for path in bench.paths:
                    say(f"measuring {path} with {n} device(s)")
                    cells.append(await _measure_cell(path, n, bench, wl, tail, backends, servers))

        aio.run(all_cells())
        top = next((c for c in cells if c.path == "broker" and c.devices == max(bench.devices)), None)
        if top is not None and top.broker_timing:
            size = round(top.broker_timing["batch_size"])
            say(f"measuring the tail's CPU per window in batches of {size} (the broker's mean)")
            tail_cpu = tail_cpu_ms_per_window(tail, wl.cut, wl.arrays, size)
    finally:
        for server in servers:
            server.close()
        if unthrottled:
            with contextlib.suppress(Exception):
                serve.delete(f"{UNTHROTTLED_APP_PREFIX}{bench.model}")
        stop_serving()
    return {
        "config": {
            "model": wl.model,
            "cut": wl.cut,
            "cut_name": wl.cut_name,
            "n_stages": wl.n_stages,
            "activation_shape": list(wl.activation_shape),
            "codec": bench.codec,
            "request_bytes": wl.payload_bytes,
            "devices": list(bench.devices),
            "requests_per_cell": bench.requests,
            "max_seconds_per_cell": bench.max_seconds,
            "windows": min(bench.windows, len(wl.arrays)),
            "paths": list(bench.paths),
            "broker_transport": bench.broker_transport,
            "own_connections": bench.own_connections,
            "unthrottled_max_ongoing_requests": UNTHROTTLED_MAX_ONGOING,
            "serving": _jsonable(asdict(cfg.serving)),
            "broker": _jsonable({k: v for k, v in asdict(cfg.broker).items() if k != "auth_secret"}),
            "host_cpus": os.cpu_count(),
            "torch_threads_in_process": torch.get_num_threads(),
            "tail_engine": {"kind": backend.tail_engine[0], "why": backend.tail_engine[1]},
            "event_loop": aio.event_loop_name(),  # SPLITSENSE_EVENT_LOOP: the client's and the servers'
            "tail_cpu_ms_per_window_at_broker_batch": tail_cpu,
        },
        "results": [c.row() for c in cells],
        "summary": summarize(cells, bench.devices, tail_cpu_ms=tail_cpu, transport=bench.broker_transport),
    }


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Send file descriptor 1 to stderr for a while: Ray's raylet and workers print to stdout,
    which must carry nothing but the JSON object when `--json` is asked for."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


def render(result: dict[str, Any], console: Any) -> None:
    """A rich table of the cells, then the summary's ratios and the two targets' verdicts."""
    from rich.table import Table

    c = result["config"]
    title = f"bench serve: {c['model']} cut {c['cut']} ({c['cut_name']}), {c['request_bytes']} B per request"
    if c.get("tail_engine") and c.get("event_loop"):
        title += f"; tails on {c['tail_engine']['kind']}, event loop {c['event_loop']}"
    table = Table(title=title)
    cols = (
        "path",
        "devices",
        "p50 ms",
        "p99 ms",
        "throughput req/s",
        "server CPU ms/window",
        "host CPU ms/window",
        "broker's own tail",
        "ok",
        "errors",
    )
    for col in cols:
        table.add_column(col, justify="left" if col == "path" else "right")
    for r in sorted(result["results"], key=lambda r: (r["devices"], PATHS.index(r["path"]))):
        cpu = r.get("server_cpu_ms_per_window")
        host = r.get("host_cpu_ms_per_window")
        table.add_row(
            r["path"],
            str(r["devices"]),
            f"{r['p50_ms']:.2f}",
            f"{r['p99_ms']:.2f}",
            f"{r['throughput_rps']:.0f}",
            "" if cpu is None else f"{cpu:.3f}",
            "" if host is None else f"{host:.3f} ({r.get('host_busy_share', 0):.0%} busy)",
            "" if r.get("local_tail_share") is None else f"{r['local_tail_share']:.0%}",
            str(r["ok"]),
            str(r["errors"]),
        )
    console.print(table)
    s = result["summary"]

    def verdict(key: str) -> str:
        t = s.get(key)
        if not t:
            return ""
        bound = f">= {t['min_ratio']:g}x" if "min_ratio" in t else f"<= {t['budget_ms']:.2f} ms ({t['rule']})"
        ceilings = ""
        if t.get("ceiling_ratio") is not None:
            ceilings = f"; ceilings here: {t.get('ceiling_path', 'an echo')} {t['ceiling_ratio']:.2f}x"
            w = t.get("work_ceiling")
            if w:
                ceilings += (
                    f", an echo plus the tail's compute {w['ratio']:.2f}x ({w['host_cores']} cores / "
                    f"({w['echo_host_cpu_ms_per_window']:.2f} + {w['tail_cpu_ms_per_window']:.2f}) ms)"
                )
        if not t["met"] and t.get("feasible") is False:
            return f" (target {bound}: [red]infeasible on this host[/]{ceilings})"
        return f" (target {bound}: {'[green]met[/]' if t['met'] else '[red]missed[/]'}{ceilings})"

    labels = {
        "broker_vs_naive_throughput_at_": ("broker / naive_ray throughput at {n} devices: {v:.2f}x", ""),
        "broker_vs_naive_unthrottled_throughput_at_": (
            "broker / naive_ray_unthrottled throughput at {n} devices: {v:.2f}x",
            "throughput_target",
        ),
        "broker_vs_ray_only_throughput_at_": ("broker / broker_ray_only throughput at {n} devices: {v:.2f}x", ""),
        "free_tail_vs_naive_unthrottled_throughput_at_": (
            "broker_free_tail / naive_ray_unthrottled throughput at {n} devices: {v:.2f}x",
            "",
        ),
        "free_tail_vs_broker_throughput_at_": ("broker_free_tail / broker throughput at {n} devices: {v:.2f}x", ""),
        "raw_grpc_vs_naive_unthrottled_throughput_at_": (
            "raw_grpc (unary echo) / naive_ray_unthrottled at {n} devices: {v:.2f}x",
            "",
        ),
        "raw_grpc_stream_vs_naive_unthrottled_throughput_at_": (
            "raw_grpc_stream (stream echo) / naive_ray_unthrottled at {n} devices: {v:.2f}x",
            "",
        ),
        "broker_x2_vs_broker_throughput_at_": ("broker_x2 / broker throughput at {n} devices: {v:.2f}x", ""),
        "broker_minus_naive_p50_ms_at_": ("broker p50 - naive_ray p50 at {n} device(s): {v:+.2f} ms", ""),
        "broker_ray_only_minus_broker_p50_ms_at_": (
            "broker_ray_only p50 - broker p50 at {n} device(s): {v:+.2f} ms",
            "",
        ),
        "broker_p50_budget_ms_at_": ("broker p50 budget at {n} device(s): {v:.2f} ms", "p50_target"),
        "transport_client_cpu_ms_per_window_at_": (
            "the device's transport (transport_echo): client CPU {v:.3f} ms per window at {n} devices",
            "",
        ),
        "raw_grpc_stream_client_cpu_ms_per_window_at_": (
            "the bare stream under it (raw_grpc_stream): client CPU {v:.3f} ms per window at {n} devices",
            "",
        ),
    }
    for key, value in s.items():
        for prefix, (text, target) in labels.items():
            if key.startswith(prefix):
                line = text.format(n=key[len(prefix) :], v=value)
                console.print(line + (verdict(target) if target else ""))
        if "_server_cpu_ms_per_window_at_" in key:
            path, n = key.split("_server_cpu_ms_per_window_at_")
            console.print(f"{path}: server CPU {value:.3f} ms per window at {n} devices")
    for r in result["results"]:
        if r.get("broker_windows"):
            console.print(f"broker_x2 x{r['devices']}: windows per broker {r['broker_windows']}")
        if r.get("first_error"):
            console.print(f"[yellow]{r['path']} x{r['devices']}: {r['errors']} errors, e.g. {r['first_error']}")


def parse_devices(text: str) -> tuple[int, ...]:
    try:
        out = tuple(int(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise ConfigError(f"--devices must be a comma-separated list of ints, got {text!r}") from None
    if not out or any(d < 1 for d in out):
        raise ConfigError(f"--devices must list positive ints, got {text!r}")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--server", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--devices", default="1,8,64")
    parser.add_argument("--requests", type=int, default=ServeBenchConfig.requests)
    parser.add_argument("--model", default=ServeBenchConfig.model)
    parser.add_argument("--cut", type=int, default=None)
    parser.add_argument("--paths", default=",".join(PATHS))
    parser.add_argument("--broker-transport", choices=BROKER_TRANSPORTS, default="stream")
    parser.add_argument("--shared-connections", action="store_true", help="one connection per server for all devices")
    args = parser.parse_args(argv)
    if args.server:
        server_main()
        return
    bench = ServeBenchConfig(
        model=args.model,
        cut=args.cut,
        devices=parse_devices(args.devices),
        requests=args.requests,
        paths=tuple(args.paths.split(",")),
        broker_transport=args.broker_transport,
        own_connections=not args.shared_connections,
    )
    with stdout_to_stderr():
        result = run_serve_bench(bench, progress=lambda m: print(m, file=sys.stderr))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
