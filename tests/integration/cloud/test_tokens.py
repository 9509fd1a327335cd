"""Stored device tokens (cloud/tokens.py) with a real Redis and two real brokers on loopback.

The brokers read tokens as the Redis "broker" user; tokens are issued and revoked as the
"operator" user, through TokenStore and through the CLI. The tails are the in-process ones.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import numpy as np
import pytest
from prometheus_client import CollectorRegistry
from typer.testing import CliRunner

from cloud.auth import DEVICE_ID_METADATA
from cloud.backend import InProcessTailBackend, ModelRegistry
from cloud.broker import Broker
from cloud.tokens import INVALID_TOKEN_MESSAGE, TokenStore, hash_token
from pipelines.codecs import Codec, encode
from splitsense.config import BrokerConfig
from splitsense.v1 import offload_pb2 as pb
from splitsense.v1 import offload_pb2_grpc as pb_grpc
from splitsense.wire import DeviceEstimates, OffloadRequest, RadioKind, to_pb

pytestmark = pytest.mark.integration

MODEL, CUT = "uci_har", 1  # the activation at cut 1 is (8, 32)
EST = DeviceEstimates(bandwidth_mbps=12.0, rtt_ms=25.0, battery_fraction=0.7, on_battery=True, radio=RadioKind.WIFI)


@pytest.fixture(scope="module")
def registry() -> ModelRegistry:
    return ModelRegistry((MODEL,))


@pytest.fixture
async def backend(registry: ModelRegistry) -> AsyncIterator[InProcessTailBackend]:
    be = InProcessTailBackend(registry, threads=1)
    yield be
    await be.close()


class Node:
    """A broker, its channel and stubs."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.channel = grpc.aio.insecure_channel(broker.address)
        self.offload = pb_grpc.OffloadServiceStub(self.channel)
        self.plans = pb_grpc.PlanServiceStub(self.channel)


@pytest.fixture
async def nodes(redis_server: Any, registry: ModelRegistry, backend: InProcessTailBackend) -> AsyncIterator[list[Node]]:
    """Two brokers sharing the Redis; a cached token is trusted 30 s, so only the revocation
    channel can make a revocation take effect within the 1 s the tests allow."""
    cfg = BrokerConfig(
        host="127.0.0.1",
        port=0,
        metrics_port=None,
        token_store="redis",
        redis_url=redis_server.url_for("broker"),
        token_cache_ttl_s=30.0,
    )
    out = []
    for _ in range(2):
        b = Broker(cfg, registry, backend, metrics_registry=CollectorRegistry())
        await b.start()
        out.append(Node(b))
    yield out
    for n in out:
        await n.channel.close()
        await n.broker.stop(0.2)


@pytest.fixture
async def operator(redis_server: Any) -> AsyncIterator[TokenStore]:
    async with TokenStore(redis_server.url_for("operator")) as store:
        yield store


def request(device: str) -> pb.OffloadRequest:
    act = np.random.default_rng(0).standard_normal((1, 8, 32)).astype(np.float32)
    return to_pb(
        OffloadRequest(
            window_id="w",
            model=MODEL,
            cut=CUT,
            device_id=device,
            device_class="phone",
            estimates=EST,
            plan_version=1,
            activation=encode(act, Codec.FP32),
            sent_unix_ms=int(time.time() * 1000),
        )
    )


def creds(device: str, token: str) -> tuple[tuple[str, str], ...]:
    return ((DEVICE_ID_METADATA, device), ("authorization", f"Bearer {token}"))


async def call(node: Node, device: str, token: str) -> grpc.StatusCode:
    """OK, or the status the call failed with."""
    try:
        resp = await node.offload.Offload(request(device), metadata=creds(device, token), timeout=5)
    except grpc.aio.AioRpcError as e:
        return e.code()
    assert len(resp.logits) == 6
    return grpc.StatusCode.OK


async def refused_within(node: Node, device: str, token: str, limit_s: float) -> float:
    """Seconds until a call of `token` is refused UNAUTHENTICATED (fails past `limit_s`)."""
    start = time.monotonic()
    while (code := await call(node, device, token)) == grpc.StatusCode.OK:
        assert time.monotonic() - start < limit_s, "still served"
        await asyncio.sleep(0.02)
    assert code == grpc.StatusCode.UNAUTHENTICATED
    return time.monotonic() - start


def rejections(node: Node) -> dict[str, float]:
    out = {}
    for metric in node.broker.metrics.registry.collect():
        if metric.name == "splitsense_broker_token_rejections":
            for s in metric.samples:
                if s.name.endswith("_total"):
                    out[s.labels["reason"]] = s.value
    return out


async def test_revocation_takes_effect_at_every_broker_within_a_second(nodes: list[Node], operator: TokenStore) -> None:
    issued = await operator.issue("dev-a", ttl_s=3600)
    other = await operator.issue("dev-b", ttl_s=3600)
    for n in nodes:  # served at both, and now cached for 30 s at both
        assert await call(n, "dev-a", issued.token) == grpc.StatusCode.OK
        assert await call(n, "dev-b", other.token) == grpc.StatusCode.OK
    assert [r.token_id for r in await operator.revoke("dev-a")] == [issued.record.token_id]  # type: ignore[union-attr]
    for n in nodes:
        assert await refused_within(n, "dev-a", issued.token, 1.0) < 1.0
        assert await call(n, "dev-b", other.token) == grpc.StatusCode.OK  # another device is untouched
        assert rejections(n).get("revoked") == 1.0


async def test_expired_unknown_and_wrong_device_are_refused_alike(nodes: list[Node], operator: TokenStore) -> None:
    node = nodes[0]
    past = await operator.issue("dev-x", ttl_s=60, now_s=time.time() - 120)
    short = await operator.issue("dev-y", ttl_s=1)
    assert await call(node, "dev-y", short.token) == grpc.StatusCode.OK  # cached now, for 30 s
    details = []
    for device, token in [
        ("dev-x", past.token),  # expired
        ("dev-x", "sst_" + "A" * 43),  # well-formed, unknown
        ("dev-x", "garbage"),  # malformed
        ("dev-z", short.token),  # another device's
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await node.offload.Offload(request(device), metadata=creds(device, token), timeout=5)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        details.append(e.value.details())
    assert set(details) == {INVALID_TOKEN_MESSAGE}
    # The cache honours the expiry: refused once it passes, though cached for 30 s.
    await asyncio.sleep(max(0.0, short.record.expires_s - time.time()) + 0.05)  # type: ignore[union-attr]
    assert await call(node, "dev-y", short.token) == grpc.StatusCode.UNAUTHENTICATED
    assert rejections(node) == {"expired": 2.0, "unknown": 1.0, "malformed": 1.0, "wrong_device": 1.0}


async def test_no_token_in_logs_metrics_errors_or_plans(
    nodes: list[Node], operator: TokenStore, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    node = nodes[0]
    valid = await operator.issue("dev-l", ttl_s=3600)
    revoked = await operator.issue("dev-l", ttl_s=3600)
    await operator.revoke(revoked.record.token_id)  # type: ignore[union-attr]
    garbage = "sst_" + "Z" * 42 + "!"
    secrets_ = [valid.token, revoked.token, garbage]
    details: list[str] = []
    plan = await node.plans.GetPlan(pb.GetPlanRequest(device_class="phone"), metadata=creds("dev-l", valid.token))
    assert await call(node, "dev-l", valid.token) == grpc.StatusCode.OK
    for token in (revoked.token, garbage):
        for device in ("dev-l", "dev-other"):
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await node.offload.Offload(request(device), metadata=creds(device, token), timeout=5)
            details += [e.value.details() or "", str(e.value), repr(e.value)]
    await operator.records()
    assert caplog.records  # the capture works: the store and the brokers log at INFO
    texts = [r.getMessage() for r in caplog.records] + [repr(r.args) for r in caplog.records]
    labels = [json.dumps(s.labels) for b in nodes for m in b.broker.metrics.registry.collect() for s in m.samples]
    blob = plan.SerializeToString()
    for secret in secrets_:
        assert not any(secret in t for t in texts)
        assert not any(secret in t for t in labels)
        assert not any(secret in t for t in details)
        assert secret.encode() not in blob
    assert repr(valid).count(valid.token) == 0


def test_cli_issues_lists_and_revokes(redis_server: Any, tmp_path: Any) -> None:
    from splitsense.cli import app

    scenario = tmp_path / "s.json"
    scenario.write_text(json.dumps({"broker": {"token_store": "redis", "redis_url": redis_server.url_for("broker")}}))
    env = {"SPLITSENSE_OPERATOR_REDIS_URL": redis_server.url_for("operator")}
    runner = CliRunner()
    issued = runner.invoke(app, ["cloud", "token", "issue", "dev-c", "--ttl", "2h", "-c", str(scenario)], env=env)
    assert issued.exit_code == 0, issued.output
    token = issued.stdout.strip().splitlines()[-1]
    assert token.startswith("sst_")
    listed = runner.invoke(app, ["cloud", "token", "list", "--json"], env=env)
    assert listed.exit_code == 0, listed.output
    (row,) = json.loads(listed.stdout)
    assert (
        row["device_id"] == "dev-c" and row["state"] == "active" and 7190 < row["expires_s"] - row["created_s"] <= 7200
    )
    assert token not in listed.output and hash_token(token) not in listed.output
    table = runner.invoke(app, ["cloud", "token", "list"], env=env)
    assert row["token_id"] in table.stdout and token not in table.output
    revoked = runner.invoke(app, ["cloud", "token", "revoke", row["token_id"]], env=env)
    assert revoked.exit_code == 0 and f"revoked {row['token_id']}" in revoked.stdout
    listed = runner.invoke(app, ["cloud", "token", "list", "--json"], env=env)
    assert json.loads(listed.stdout)[0]["state"] == "revoked"
    again = runner.invoke(app, ["cloud", "token", "revoke", "dev-c"], env=env)  # nothing left to revoke
    assert again.exit_code == 2 and "no token to revoke" in again.output
    # The broker's user may read token records but not write them, nor list them.
    denied = runner.invoke(
        app,
        ["cloud", "token", "issue", "dev-d", "-c", str(scenario)],
        env={"SPLITSENSE_OPERATOR_REDIS_URL": redis_server.url_for("broker")},
    )
    assert denied.exit_code == 2 and redis_server.passwords["broker"] not in denied.output


async def test_broker_user_cannot_write_tokens_and_controller_cannot_touch_them(redis_server: Any) -> None:
    import redis.asyncio as aioredis
    from redis.exceptions import NoPermissionError

    for role in ("broker", "controller"):
        client = aioredis.from_url(redis_server.url_for(role))
        try:
            with pytest.raises(NoPermissionError):
                await client.set("splitsense:tokens:h:" + "0" * 64, "{}")
            with pytest.raises(NoPermissionError):
                await client.publish("splitsense:tokens:revoked", "tok_000000000000")
        finally:
            await client.aclose()
