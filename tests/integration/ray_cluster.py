"""A real multi-node Ray cluster on this machine, started with `ray start --block` as an operator would.

A head and worker nodes at 127.0.0.2 (Ray replaces 127.0.0.1 by the machine's routable address; any
other loopback address it keeps), each with free ports of its own, one short temp dir, token
authentication on (RAY_AUTH_MODE=token and one RAY_AUTH_TOKEN for every node and driver, as
deploy/ray/raycluster.yaml does) and a custom resource naming it (`splitsense_<name>`). GCS health
checks run every 1 s and declare a node dead after 3 misses (Ray's defaults take ~15 s). stop()
ends every process it started, workers first. Used by tests/integration/cloud/test_multinode.py and
tests/integration/simulators/test_shards_multinode.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

IP = "127.0.0.2"  # loopback; Ray swaps 127.0.0.1 for the machine's routable address
NODE_HEALTH = {"RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3"}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((IP, 0))
        return int(s.getsockname()[1])


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        kids.setdefault(ppid, []).append(int(d.name))
    return kids


def _tree(pid: int) -> list[int]:
    """`pid` and every process below it (Ray's workers set up process groups of their own)."""
    kids, out, todo = _children(), [pid], [pid]
    while todo:
        for child in kids.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def _alive(pids: list[int]) -> list[int]:
    left = []
    for pid in pids:
        try:
            state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state != "Z":
            left.append(pid)
    return left


@dataclass
class Node:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path
    started_s: float = 0.0
    node_id: str = ""


class LocalRayCluster:
    """Ray nodes started with `ray start --block` on this machine; stop() ends what it started."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        # Short: Ray's socket paths (<temp dir>/session_<date>_<pid>/sockets/...) must fit 107 bytes.
        self.temp_dir = Path(tempfile.mkdtemp(prefix="ssmn-", dir="/tmp"))
        self.token = secrets.token_hex(32)
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH")}
        self.env = {**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token}
        self.address = f"{IP}:{_free_port()}"
        self.nodes: dict[str, Node] = {}
        self.ray = str(Path(sys.executable).parent / "ray")

    def start(self, name: str, num_cpus: int, timeout_s: float = 90.0) -> Node:
        args = [self.ray, "start", "--block", "--node-ip-address", IP, "--num-cpus", str(num_cpus)]
        args += ["--resources", json.dumps({f"splitsense_{name}": 1}), "--object-store-memory", str(100 << 20)]
        args += ["--temp-dir", str(self.temp_dir), "--disable-usage-stats"]
        for flag in (
            "--dashboard-agent-listen-port",  # 52365 by default: another cluster on this machine has it
            "--dashboard-agent-grpc-port",
            "--runtime-env-agent-port",
            "--metrics-export-port",
        ):
            args += [flag, str(_free_port())]
        env = dict(self.env)
        if not self.nodes:  # the head: GCS, Ray client server, dashboard (off, but it still binds)
            port = self.address.rsplit(":", 1)[1]
            args += ["--head", "--port", port, "--ray-client-server-port", str(_free_port())]
            args += ["--include-dashboard", "false", "--dashboard-port", str(_free_port())]
            env.update(NODE_HEALTH)
        else:
            args += ["--address", self.address]
        log = self.dir / f"ray-{name}.log"
        t0 = time.monotonic()
        with log.open("wb") as out:
            proc = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=env, start_new_session=True
            )
        node = self.nodes[name] = Node(name, proc, log)
        deadline = t0 + timeout_s
        while time.monotonic() < deadline and proc.poll() is None:
            if "Ray runtime started" in log.read_text(errors="replace"):
                node.started_s = time.monotonic() - t0
                return node
            time.sleep(0.2)
        raise AssertionError(f"ray node {name} did not start within {timeout_s:g} s; its log ends:\n{self.tail(name)}")

    def tail(self, name: str) -> str:
        return self.nodes[name].log.read_text(errors="replace")[-2000:]

    def kill(self, name: str) -> list[int]:
        """The node dies as its machine would: SIGKILL to every process it started, at once."""
        node = self.nodes[name]
        pids = _tree(node.proc.pid)
        _signal_all(pids, signal.SIGKILL)
        node.proc.wait(10)
        return pids

    def stop(self) -> None:
        for node in reversed(list(self.nodes.values())):  # workers first, the head (GCS) last
            pids = _tree(node.proc.pid)
            _signal_all(pids, signal.SIGTERM)
            end = time.monotonic() + 5.0
            while _alive(pids) and time.monotonic() < end:
                time.sleep(0.1)
            _signal_all(_alive(pids), signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                node.proc.wait(10)
        shutil.rmtree(self.temp_dir, ignore_errors=True)
