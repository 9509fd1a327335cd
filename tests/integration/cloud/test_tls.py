"""TLS and mutual TLS on the broker's listener, with real handshakes on loopback.

The certificates are made by deploy/tls/gen_certs.sh (openssl) in a temporary directory: a CA,
the broker's certificate for localhost/127.0.0.1, and client certificates with CN = device id;
and a second, unrelated CA with a certificate for the same device id. The broker is the real one
with the in-process tails (no Ray); the device side is the real GrpcTransport with the
credentials of edge.transport.channel_credentials. `splitsense cloud up` and `edge run` are run as
subprocesses for their refusals.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry

from cloud.auth import device_token
from cloud.backend import InProcessTailBackend, ModelRegistry
from cloud.broker import Broker
from edge.transport import GrpcTransport, channel_credentials
from pipelines import training
from pipelines.codecs import Codec, encode
from splitsense.config import REPO_ROOT, BrokerConfig, EdgeConfig
from splitsense.errors import BrokerUnavailableError, ConfigError, RejectedError
from splitsense.wire import DeviceEstimates, OffloadRequest, OffloadResponse, RadioKind

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("openssl") is None, reason="deploy/tls/gen_certs.sh needs openssl"),
]

GEN_CERTS = REPO_ROOT / "deploy" / "tls" / "gen_certs.sh"
SECRET = "tls-integration-secret-0123456789"
MODEL = "uci_har"
CUT = 2
DEVICE = "tls-dev-1"
OTHER = "tls-dev-2"


@dataclass(frozen=True)
class Certs:
    dir: Path  # ca.crt, broker.crt/.key, device-<id>.crt/.key
    rogue: Path  # another CA, with a certificate for DEVICE

    def device(self, device_id: str, rogue: bool = False) -> dict[str, Any]:
        d = self.rogue if rogue else self.dir
        return {"tls_cert_file": d / f"device-{device_id}.crt", "tls_key_file": d / f"device-{device_id}.key"}


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    out = tmp_path_factory.mktemp("tls")
    for sub, devices in (("ok", (DEVICE, OTHER)), ("rogue", (DEVICE,))):
        args = ["bash", str(GEN_CERTS), "-o", str(out / sub), *(a for d in devices for a in ("-d", d))]
        subprocess.run(args, check=True, capture_output=True, timeout=60)
    return Certs(out / "ok", out / "rogue")


@pytest.fixture(scope="module")
def registry() -> ModelRegistry:
    return ModelRegistry([MODEL])


@pytest.fixture(scope="module")
def activation(registry: ModelRegistry) -> np.ndarray:
    x, _ = training.held_out_set(registry.trained(MODEL))
    with torch.inference_mode():
        return registry.model(MODEL).run(x[:1], 0, CUT).numpy()


@pytest.fixture
async def backend(registry: ModelRegistry) -> AsyncIterator[InProcessTailBackend]:
    be = InProcessTailBackend(registry, threads=1)
    yield be
    await be.close()


async def start_broker(registry: ModelRegistry, backend: InProcessTailBackend, **tls: Any) -> Broker:
    cfg = BrokerConfig(host="127.0.0.1", port=0, auth_secret=SECRET, metrics_port=None, shutdown_grace_s=0.5, **tls)
    broker = Broker(cfg, registry, backend, metrics_registry=CollectorRegistry())
    await broker.start()
    return broker


@pytest.fixture
async def tls_broker(registry: ModelRegistry, backend: InProcessTailBackend, certs: Certs) -> AsyncIterator[Broker]:
    b = await start_broker(
        registry, backend, tls_cert_file=certs.dir / "broker.crt", tls_key_file=certs.dir / "broker.key"
    )
    yield b
    await b.stop(0.5)


@pytest.fixture
async def mtls_broker(registry: ModelRegistry, backend: InProcessTailBackend, certs: Certs) -> AsyncIterator[Broker]:
    b = await start_broker(
        registry,
        backend,
        tls_cert_file=certs.dir / "broker.crt",
        tls_key_file=certs.dir / "broker.key",
        tls_client_ca_file=certs.dir / "ca.crt",
    )
    yield b
    await b.stop(0.5)


def transport(broker: Broker, *, device_id: str = DEVICE, use_stream: bool = True, **tls: Any) -> GrpcTransport:
    """The real device transport, TLS as `tls` (EdgeConfig fields) says; plaintext without."""
    ecfg = EdgeConfig(broker_address=broker.address, device_id=device_id, **tls)
    return GrpcTransport(
        broker.address,
        device_token(SECRET, device_id),
        device_id=device_id,
        use_stream=use_stream,
        tls=channel_credentials(ecfg),
        reconnect_backoff_max_ms=200,
    )


def window(activation: np.ndarray, device_id: str = DEVICE) -> OffloadRequest:
    return OffloadRequest(
        window_id="w-1",
        model=MODEL,
        cut=CUT,
        device_id=device_id,
        device_class="phone",
        estimates=DeviceEstimates(12.0, 25.0, 0.7, True, RadioKind.WIFI),
        plan_version=0,
        activation=encode(activation, Codec.FP32),
        sent_unix_ms=int(time.time() * 1000),
    )


async def offload(t: GrpcTransport, activation: np.ndarray) -> OffloadResponse:
    try:
        return await t.offload(window(activation), timeout_s=10.0)
    finally:
        await t.close()


# --- TLS ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("use_stream", [True, False])
async def test_a_device_with_a_valid_token_is_served_over_tls(
    tls_broker: Broker, certs: Certs, activation: np.ndarray, use_stream: bool
) -> None:
    t = transport(tls_broker, use_stream=use_stream, tls_ca_file=certs.dir / "ca.crt")
    resp = await offload(t, activation)
    assert resp.window_id == "w-1" and len(resp.logits) == tls_broker._models[MODEL].num_classes


async def test_a_plaintext_client_cannot_talk_to_the_tls_port(tls_broker: Broker, activation: np.ndarray) -> None:
    with pytest.raises(BrokerUnavailableError):
        await offload(transport(tls_broker), activation)


async def test_a_client_that_trusts_another_ca_does_not_connect(
    tls_broker: Broker, certs: Certs, activation: np.ndarray
) -> None:
    with pytest.raises(BrokerUnavailableError):
        await offload(transport(tls_broker, tls_ca_file=certs.rogue / "ca.crt"), activation)


async def test_tls_keeps_the_token_check(tls_broker: Broker, certs: Certs, activation: np.ndarray) -> None:
    ecfg = EdgeConfig(broker_address=tls_broker.address, tls_ca_file=certs.dir / "ca.crt")
    t = GrpcTransport(tls_broker.address, "0" * 64, device_id=DEVICE, tls=channel_credentials(ecfg))
    with pytest.raises(RejectedError) as e:
        await offload(t, activation)
    assert e.value.code == "UNAUTHENTICATED"


# --- mutual TLS -----------------------------------------------------------------------------------


@pytest.mark.parametrize("use_stream", [True, False])
async def test_mtls_serves_a_device_with_its_own_certificate(
    mtls_broker: Broker, certs: Certs, activation: np.ndarray, use_stream: bool
) -> None:
    t = transport(mtls_broker, use_stream=use_stream, tls_ca_file=certs.dir / "ca.crt", **certs.device(DEVICE))
    resp = await offload(t, activation)
    assert resp.window_id == "w-1"
    t = transport(mtls_broker, tls_ca_file=certs.dir / "ca.crt", **certs.device(DEVICE))
    try:
        plans = await t.get_plan("phone", [MODEL], known_version=0)
        assert plans is not None and plans.version >= 1
    finally:
        await t.close()


@pytest.mark.parametrize("use_stream", [True, False])
async def test_mtls_refuses_the_certificate_of_another_device(
    mtls_broker: Broker, certs: Certs, activation: np.ndarray, use_stream: bool
) -> None:
    # DEVICE's id and valid token, but OTHER's certificate and key
    t = transport(mtls_broker, use_stream=use_stream, tls_ca_file=certs.dir / "ca.crt", **certs.device(OTHER))
    with pytest.raises(RejectedError) as e:
        await offload(t, activation)
    assert e.value.code == "UNAUTHENTICATED"
    assert OTHER in str(e.value) and DEVICE in str(e.value), str(e.value)


async def test_mtls_refuses_the_certificate_of_another_device_on_the_plan_watch(
    mtls_broker: Broker, certs: Certs
) -> None:
    t = transport(mtls_broker, tls_ca_file=certs.dir / "ca.crt", **certs.device(OTHER))
    try:
        with pytest.raises(RejectedError) as e:
            async for _ in t.watch_plans("phone", [MODEL], known_version=0):
                pass
        assert e.value.code == "UNAUTHENTICATED"
    finally:
        await t.close()


async def test_mtls_refuses_a_client_without_a_certificate_or_from_another_ca(
    mtls_broker: Broker, certs: Certs, activation: np.ndarray
) -> None:
    ca = certs.dir / "ca.crt"
    with pytest.raises(BrokerUnavailableError):  # the handshake fails: no call reaches the broker
        await offload(transport(mtls_broker, tls_ca_file=ca), activation)
    with pytest.raises(BrokerUnavailableError):
        await offload(transport(mtls_broker, tls_ca_file=ca, **certs.device(DEVICE, rogue=True)), activation)


async def test_mtls_keeps_the_token_check(mtls_broker: Broker, certs: Certs, activation: np.ndarray) -> None:
    ecfg = EdgeConfig(broker_address=mtls_broker.address, tls_ca_file=certs.dir / "ca.crt", **certs.device(DEVICE))
    t = GrpcTransport(mtls_broker.address, "0" * 64, device_id=DEVICE, tls=channel_credentials(ecfg))
    with pytest.raises(RejectedError) as e:
        await offload(t, activation)
    assert e.value.code == "UNAUTHENTICATED" and "token" in str(e.value)


# --- refusing to start ----------------------------------------------------------------------------


async def test_the_broker_refuses_an_exposed_host_without_tls(
    registry: ModelRegistry, backend: InProcessTailBackend
) -> None:
    cfg = BrokerConfig(host="0.0.0.0", port=0, auth_secret=SECRET, metrics_port=None)
    with pytest.raises(ConfigError, match="broker.tls_cert_file"):
        await Broker(cfg, registry, backend, metrics_registry=CollectorRegistry()).start()


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "splitsense.cli", *args], capture_output=True, text=True, timeout=120, cwd=REPO_ROOT
    )


def test_cloud_up_on_an_exposed_host_without_tls_exits_2_with_one_line() -> None:
    r = cli("cloud", "up", "--host", "0.0.0.0", "--port", "0")
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "0.0.0.0" in lines[0] and "broker.tls_cert_file" in lines[0] and "broker.auth_secret" in lines[0]


def test_cloud_up_with_tls_but_the_development_secret_exits_2(certs: Certs) -> None:
    tls = ("--tls-cert", str(certs.dir / "broker.crt"), "--tls-key", str(certs.dir / "broker.key"))
    r = cli("cloud", "up", "--host", "0.0.0.0", "--port", "0", *tls)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "broker.auth_secret" in lines[0] and "tls_cert_file" not in lines[0], r.stderr


def test_edge_run_refuses_a_plaintext_token_to_a_far_broker() -> None:
    r = cli("edge", "run", "-m", MODEL, "--broker", "192.0.2.1:50051", "--token", "t", "--windows", "1")
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "edge.tls_ca_file" in lines[0], r.stderr
