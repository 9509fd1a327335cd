"""One upload, several tasks: the broker on real loopback sockets fans a window's bottleneck code out
to every task that shares the encoder (OffloadRequest.extra_models), and refuses one that does not."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
import torch
from prometheus_client import CollectorRegistry

from cloud.auth import DEVICE_ID_METADATA, device_token
from cloud.backend import InProcessTailBackend, ModelRegistry
from cloud.broker import Broker
from pipelines import training
from pipelines.codecs import Codec, encode
from splitsense.config import BrokerConfig
from splitsense.v1 import offload_pb2_grpc as pb_grpc
from splitsense.wire import DeviceEstimates, OffloadRequest, RadioKind, from_pb, to_pb

pytestmark = pytest.mark.integration

SECRET = "integration-test-secret-0123456789"
MODELS = ("fsdd_speaker", "fsdd_digit", "uci_har")


@pytest.fixture(scope="module")
def registry() -> ModelRegistry:
    return ModelRegistry(MODELS)


@pytest.fixture
async def stub(registry: ModelRegistry) -> AsyncIterator[pb_grpc.OffloadServiceStub]:
    backend = InProcessTailBackend(registry, threads=1)
    cfg = BrokerConfig(host="127.0.0.1", port=0, auth_secret=SECRET, metrics_port=None)
    broker = Broker(cfg, registry, backend, metrics_registry=CollectorRegistry())
    await broker.start()
    channel = grpc.aio.insecure_channel(broker.address)
    yield pb_grpc.OffloadServiceStub(channel)
    await channel.close()
    await broker.stop(0.5)
    await backend.close()


def creds(device: str) -> tuple[tuple[str, str], ...]:
    return ((DEVICE_ID_METADATA, device), ("authorization", f"Bearer {device_token(SECRET, device)}"))


def request(window: int, x: torch.Tensor, extra: tuple[str, ...], registry: ModelRegistry) -> OffloadRequest:
    main = registry.model("fsdd_speaker")
    with torch.inference_mode():
        code = main.run(x[window : window + 1], 0, 1)
    return OffloadRequest(
        window_id=f"w{window}",
        model="fsdd_speaker",
        cut=1,
        device_id="node-1",
        device_class="sensor_node",
        estimates=DeviceEstimates(0.5, 90.0, 0.9, True, RadioKind.BLE),
        plan_version=0,
        activation=encode(code, Codec.ANS, main.symbol_prior(1)),
        sent_unix_ms=1,
        extra_models=extra,
    )


async def test_one_coded_upload_answers_speaker_and_digit_as_the_local_models(
    stub: pb_grpc.OffloadServiceStub, registry: ModelRegistry
) -> None:
    x, _ = training.held_out_set(registry.trained("fsdd_speaker"))
    for i in range(0, 300, 37):
        req = request(i, x, ("fsdd_digit",), registry)
        assert req.activation.nbytes < 600  # the code, entropy coded: ~360 B against 4040 B of int8 input
        resp = from_pb(await stub.Offload(to_pb(req), metadata=creds("node-1")))
        with torch.inference_mode():
            speaker = int(registry.model("fsdd_speaker")(x[i : i + 1]).argmax())
            digit = int(registry.model("fsdd_digit")(x[i : i + 1]).argmax())
        assert resp.prediction == speaker
        assert [(t.model, t.prediction) for t in resp.task_results] == [("fsdd_digit", digit)]


async def test_a_task_that_does_not_share_the_encoder_is_refused_with_invalid_argument(
    stub: pb_grpc.OffloadServiceStub, registry: ModelRegistry
) -> None:
    x, _ = training.held_out_set(registry.trained("fsdd_speaker"))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Offload(to_pb(request(0, x, ("uci_har",), registry)), metadata=creds("node-1"))
    assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "extra_models" in (err.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Offload(to_pb(request(0, x, ("nope",), registry)), metadata=creds("node-1"))
    assert err.value.code() is grpc.StatusCode.NOT_FOUND
