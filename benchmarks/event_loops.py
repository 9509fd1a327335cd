"""The event loop under grpc.aio: asyncio's own loop vs uvloop, on the wire a device's stream uses.

splitsense's processes run on uvloop (splitsense/aio.py). This measures what that buys on the part
of the path the loop touches most: a bidirectional gRPC stream per device, each device writing a
request of an offload's size (16,494 bytes: uci_har's cut 3 at fp32, as `bench serve` sends) and
reading its echo, `devices` at once. Per round a fresh echo server process and this (client)
process run on the loop under test; the rounds alternate asyncio, uvloop, asyncio, ... so that this
shared host's drift hits both alike. Reported per round and per loop: CPU per round trip of the
client and of the server (process time, /proc for the server) and round trips per second; the
summary is each loop's median and the ratio.

    splitsense bench loop [--rounds 5] [--devices 64] [--round-trips 20000] [--json]
    ->  {"config", "results": [{loop, round, client_us, server_us, total_us, rate_per_s}], "summary"}
"""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from splitsense import aio
from splitsense.errors import ConfigError

Progress = Callable[[str], None]

LOOPS = ("asyncio", "uvloop")
SERVICE = "splitsense.bench.v1.LoopEcho"
METHOD = f"/{SERVICE}/Stream"
REQUEST_BYTES = 16_494  # an offload request of uci_har at cut 3, fp32 (bench serve's)
_MAX_MESSAGE = 1 << 24


@dataclass(frozen=True)
class LoopBenchConfig:
    rounds: int = 5  # per loop, alternating
    devices: int = 64  # streams at once, one channel each
    round_trips: int = 20_000  # per round, over all streams
    request_bytes: int = REQUEST_BYTES
    server_start_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        for name in ("rounds", "devices", "round_trips", "request_bytes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"bench loop: {name} must be >= 1, got {getattr(self, name)}")


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of process `pid` so far (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _serve() -> None:
    """The echo server: prints its port, then echoes every message of every stream."""
    import grpc

    async def echo(requests: Any, context: Any) -> Any:
        async for message in requests:
            yield message

    options = [("grpc.max_receive_message_length", _MAX_MESSAGE), ("grpc.max_send_message_length", _MAX_MESSAGE)]
    server = grpc.aio.server(options=options)
    handler = grpc.method_handlers_generic_handler(SERVICE, {"Stream": grpc.stream_stream_rpc_method_handler(echo)})
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(port, flush=True)
    await server.wait_for_termination()


async def _drive(port: int, bench: LoopBenchConfig) -> tuple[float, float]:
    """The client: `devices` streams, one channel each; returns (CPU seconds, wall seconds) of the
    measured round trips (after one warm-up round trip per stream)."""
    import grpc

    options = [
        ("grpc.max_receive_message_length", _MAX_MESSAGE),
        ("grpc.max_send_message_length", _MAX_MESSAGE),
        ("grpc.use_local_subchannel_pool", 1),  # a connection per channel, as devices have
    ]
    payload = b"x" * bench.request_bytes
    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options) for _ in range(bench.devices)]
    try:
        streams = [c.stream_stream(METHOD)() for c in channels]
        for s in streams:
            await s.write(payload)
            if len(await s.read()) != len(payload):
                raise RuntimeError("the echo answered other bytes")
        left = bench.round_trips
        cpu0, t0 = time.process_time(), time.perf_counter()

        async def device(s: Any) -> None:
            nonlocal left
            while left > 0:
                left -= 1
                await s.write(payload)
                await s.read()

        await asyncio.gather(*(device(s) for s in streams))
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - t0
        for s in streams:
            s.cancel()
        return cpu, wall
    finally:
        await asyncio.gather(*(c.close() for c in channels))


def _round(kind: str, bench: LoopBenchConfig) -> dict[str, Any]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    server = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.event_loops", "--server", kind],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    try:
        assert server.stdout is not None
        line = server.stdout.readline().strip()
        if not line.isdigit():
            raise RuntimeError(f"bench loop: the {kind} echo server did not start (printed {line!r})")
        port = int(line)
        server_cpu0 = _cpu_s(server.pid)
        with asyncio.Runner(loop_factory=aio.loop_factory(kind)) as runner:
            client_cpu, wall = runner.run(_drive(port, bench))
        server_cpu = _cpu_s(server.pid) - server_cpu0
    finally:
        server.kill()
        server.wait()
    n = bench.round_trips
    return {
        "loop": kind,
        "client_us": round(client_cpu * 1e6 / n, 1),
        "server_us": round(server_cpu * 1e6 / n, 1),
        "total_us": round((client_cpu + server_cpu) * 1e6 / n, 1),
        "rate_per_s": round(n / wall, 1),
    }


def run_loop_bench(bench: LoopBenchConfig | None = None, progress: Progress | None = None) -> dict[str, Any]:
    bench = bench or LoopBenchConfig()
    say = progress or (lambda _m: None)
    aio.loop_factory("uvloop")  # a clear error now if it is missing, not after the first rounds
    results: list[dict[str, Any]] = []
    for r in range(1, bench.rounds + 1):
        for kind in LOOPS:
            say(f"round {r}/{bench.rounds}: {kind}, {bench.devices} streams, {bench.round_trips} round trips")
            results.append({**_round(kind, bench), "round": r})
    return {"config": asdict(bench), "results": results, "summary": summarize(results)}


def summarize(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Each loop's median per round trip, and uvloop's against asyncio's (< 1: less CPU)."""
    out: dict[str, Any] = {}
    for kind in LOOPS:
        rows = [r for r in results if r["loop"] == kind]
        if rows:
            out[kind] = {k: statistics.median(r[k] for r in rows) for k in ("client_us", "server_us", "total_us")}
            out[kind]["rate_per_s"] = statistics.median(r["rate_per_s"] for r in rows)
    if "asyncio" in out and "uvloop" in out:
        a, u = out["asyncio"], out["uvloop"]
        out["uvloop_vs_asyncio_cpu"] = round(u["total_us"] / a["total_us"], 3)
        out["uvloop_vs_asyncio_rate"] = round(u["rate_per_s"] / a["rate_per_s"], 3)
        by = {(r["loop"], r["round"]): r["total_us"] for r in results}
        rounds = [n for (kind, n) in by if kind == "asyncio" and ("uvloop", n) in by]
        less = sum(by[("uvloop", n)] < by[("asyncio", n)] for n in rounds)
        out["rounds_uvloop_used_less_cpu"] = f"{less}/{len(rounds)}"
    return out


def render(result: dict[str, Any], console: Any) -> None:
    from rich.table import Table

    c = result["config"]
    table = Table(
        title=f"bench loop: gRPC stream echo, {c['devices']} streams, {c['request_bytes']} B requests, "
        f"{c['round_trips']} round trips a round"
    )
    for col in ("round", "loop", "client us", "server us", "total us", "round trips/s"):
        table.add_column(col, justify="right")
    for r in result["results"]:
        table.add_row(
            str(r["round"]),
            r["loop"],
            f"{r['client_us']:.0f}",
            f"{r['server_us']:.0f}",
            f"{r['total_us']:.0f}",
            f"{r['rate_per_s']:.0f}",
        )
    console.print(table)
    s = result["summary"]
    if "uvloop_vs_asyncio_cpu" in s:
        console.print(
            f"median CPU per round trip: asyncio {s['asyncio']['total_us']:.0f} us, uvloop "
            f"{s['uvloop']['total_us']:.0f} us (x{s['uvloop_vs_asyncio_cpu']:.2f}; uvloop used less in "
            f"{s['rounds_uvloop_used_less_cpu']} rounds); round trips/s x{s['uvloop_vs_asyncio_rate']:.2f}"
        )


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--server" and sys.argv[2] in LOOPS:
        with asyncio.Runner(loop_factory=aio.loop_factory(sys.argv[2])) as runner:
            runner.run(_serve())
        return
    raise SystemExit("usage: python -m benchmarks.event_loops --server {asyncio|uvloop} (run `splitsense bench loop`)")


if __name__ == "__main__":
    main()
