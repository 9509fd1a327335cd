"""The broker on real loopback sockets, with the in-process tails and the shipped weights.

No Ray here (the Ray Serve tails are cloud/serving.py's and have their own integration tests);
everything else is real: grpc.aio server and client, auth metadata, health, reflection, the
micro-batcher and admission control.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
import urllib.request
from collections.abc import AsyncIterator
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client import CollectorRegistry

from cloud.auth import DEVICE_ID_METADATA, TOKEN_METADATA, device_token
from cloud.backend import InProcessTailBackend, ModelRegistry
from cloud.broker import RETRY_AFTER_METADATA, Broker, run_broker_forever
from pipelines import training
from pipelines.codecs import Codec, EncodedTensor, encode
from splitsense.config import BrokerConfig, ServingConfig
from splitsense.errors import ConfigError
from splitsense.plan import BatteryState, Objective, Plan, PlanRow, PlanSet
from splitsense.v1 import offload_pb2 as pb
from splitsense.v1 import offload_pb2_grpc as pb_grpc
from splitsense.wire import DeviceEstimates, OffloadRequest, RadioKind, from_pb, to_pb

pytestmark = pytest.mark.integration

SECRET = "integration-test-secret-0123456789"
MODELS = ServingConfig().models
WINDOWS_PER_MODEL = 3


# --- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def registry() -> ModelRegistry:
    return ModelRegistry(MODELS)


@pytest.fixture(scope="module")
def windows(registry: ModelRegistry) -> dict[str, torch.Tensor]:
    """A few real, preprocessed test windows per model (spread over the test set)."""
    out = {}
    for name in MODELS:
        x, _ = training.held_out_set(registry.trained(name))  # not imported bare: pytest would collect it
        idx = torch.linspace(0, len(x) - 1, WINDOWS_PER_MODEL).long()
        out[name] = x[idx]
    return out


class ControlledBackend(InProcessTailBackend):
    """The in-process tails, with faults on demand."""

    def __init__(self, registry: ModelRegistry) -> None:
        super().__init__(registry, threads=1)
        self.error: BaseException | None = None
        self.delay_s = 0.0
        self.hang = False

    async def run_tail(self, model: str, cut: int, batch: np.ndarray) -> np.ndarray:
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self.hang:
            await asyncio.sleep(3600)
        if self.error is not None:
            raise self.error
        return await super().run_tail(model, cut, batch)


@pytest.fixture
async def backend(registry: ModelRegistry) -> AsyncIterator[ControlledBackend]:
    be = ControlledBackend(registry)
    yield be
    await be.close()


def broker_config(**kw: Any) -> BrokerConfig:
    # local_tail off: these tests put faults and delays into the backend, which a lone window on an
    # idle lane would otherwise never reach (it runs in the broker; test_a_lone_window_... below).
    base: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": 0,
        "auth_secret": SECRET,
        "metrics_port": None,
        "local_tail": False,
    }
    base.update(kw)
    return BrokerConfig(**base)


@pytest.fixture
async def broker(registry: ModelRegistry, backend: ControlledBackend) -> AsyncIterator[Broker]:
    b = Broker(broker_config(backend_timeout_ms=300.0), registry, backend, metrics_registry=CollectorRegistry())
    await b.start()
    yield b
    await b.stop(0.5)


@pytest.fixture
async def channel(broker: Broker) -> AsyncIterator[grpc.aio.Channel]:
    ch = grpc.aio.insecure_channel(broker.address, options=[("grpc.max_receive_message_length", 16 << 20)])
    yield ch
    await ch.close()


@pytest.fixture
def stub(channel: grpc.aio.Channel) -> pb_grpc.OffloadServiceStub:
    return pb_grpc.OffloadServiceStub(channel)


def creds(device: str) -> tuple[tuple[str, str], ...]:
    return ((DEVICE_ID_METADATA, device), ("authorization", f"Bearer {device_token(SECRET, device)}"))


EST = DeviceEstimates(bandwidth_mbps=12.0, rtt_ms=25.0, battery_fraction=0.7, on_battery=True, radio=RadioKind.WIFI)


def offload_request(
    model: str,
    cut: int,
    activation: EncodedTensor,
    *,
    device: str = "dev-1",
    window_id: str = "w",
    deadline_ms: int = 0,
) -> pb.OffloadRequest:
    return to_pb(
        OffloadRequest(
            window_id=window_id,
            model=model,
            cut=cut,
            device_id=device,
            device_class="phone",
            estimates=EST,
            plan_version=1,
            activation=activation,
            sent_unix_ms=int(time.time() * 1000),
            deadline_ms=deadline_ms,
        )
    )


def front(registry: ModelRegistry, model: str, x: torch.Tensor, cut: int) -> np.ndarray:
    with torch.inference_mode():
        return registry.model(model).run(x, 0, cut).numpy()


def good_request(
    registry: ModelRegistry, windows: dict[str, torch.Tensor], device: str = "dev-ok"
) -> pb.OffloadRequest:
    act = front(registry, "uci_har", windows["uci_har"][:1], 2)
    return offload_request("uci_har", 2, encode(act, Codec.FP32), device=device, window_id="good")


async def assert_good_request_succeeds(
    stub: pb_grpc.OffloadServiceStub, registry: ModelRegistry, windows: dict[str, torch.Tensor]
) -> None:
    resp = await stub.Offload(good_request(registry, windows), metadata=creds("dev-ok"), timeout=5)
    assert resp.window_id == "good" and len(resp.logits) == registry.info["uci_har"].num_classes


async def rpc_error(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await call
    return e.value


# --- health, reflection -----------------------------------------------------------------------


async def test_health_is_serving_without_a_token(channel: grpc.aio.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "splitsense.v1.OffloadService", "splitsense.v1.PlanService"):
        resp = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING


async def test_reflection_lists_the_services(channel: grpc.aio.Channel) -> None:
    refl = reflection_pb2_grpc.ServerReflectionStub(channel)

    async def requests() -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
        yield reflection_pb2.ServerReflectionRequest(list_services="")

    names = set()
    async for resp in refl.ServerReflectionInfo(requests(), timeout=5):
        names |= {s.name for s in resp.list_services_response.service}
    assert {"splitsense.v1.OffloadService", "splitsense.v1.PlanService", "grpc.health.v1.Health"} <= names


# --- correctness ------------------------------------------------------------------------------


async def test_offloaded_fp32_logits_equal_local_logits_at_every_cut(
    stub: pb_grpc.OffloadServiceStub, registry: ModelRegistry, windows: dict[str, torch.Tensor]
) -> None:
    for name in MODELS:
        info = registry.info[name]
        x = windows[name]
        with torch.inference_mode():
            local = registry.model(name)(x).numpy()
        calls, expected = [], []
        for i in range(len(x)):
            for cut in range(info.n_stages):
                act = front(registry, name, x[i : i + 1], cut)
                req = offload_request(name, cut, encode(act, Codec.FP32), window_id=f"{name}-{i}-{cut}")
                calls.append(stub.Offload(req, metadata=creds("dev-1"), timeout=10))
                expected.append(local[i])
        answers = await asyncio.gather(*calls)  # concurrent: batched across windows and cuts
        for resp, want in zip(answers, expected, strict=True):
            got = np.asarray(resp.logits, dtype=np.float32)
            assert resp.prediction == int(np.argmax(want)), resp.window_id
            assert np.max(np.abs(got - want)) <= 1e-4, resp.window_id
            assert resp.timing.batch_size >= 1 and resp.timing.compute_ms > 0


async def test_ans_at_the_bottleneck_gives_the_local_logits_and_other_priors_are_refused(
    stub: pb_grpc.OffloadServiceStub, registry: ModelRegistry, windows: dict[str, torch.Tensor]
) -> None:
    for name in MODELS:
        model = registry.model(name)
        prior = model.symbol_prior(1)
        assert prior is not None and registry.info[name].symbol_prior(1) is not None
        assert registry.info[name].symbol_prior(1).digest == prior.digest  # type: ignore[union-attr]
        x = windows[name]
        with torch.inference_mode():
            local = model(x).numpy()
        calls = []
        for i in range(len(x)):
            t = encode(front(registry, name, x[i : i + 1], 1), Codec.ANS, prior)
            assert t.prior_digest == prior.digest
            calls.append(
                stub.Offload(
                    offload_request(name, 1, t, window_id=f"{name}-ans-{i}"), metadata=creds("dev-1"), timeout=10
                )
            )
        for resp, want in zip(await asyncio.gather(*calls), local, strict=True):
            assert resp.prediction == int(np.argmax(want)), resp.window_id
            assert np.max(np.abs(np.asarray(resp.logits, dtype=np.float32) - want)) <= 1e-4, resp.window_id
    good = encode(
        front(registry, "uci_har", windows["uci_har"][:1], 1), Codec.ANS, registry.model("uci_har").symbol_prior(1)
    )
    req = offload_request("uci_har", 1, good, device="dev-bad", window_id="other-prior")
    req.activation.prior_digest = "0123456789abcdef"
    err = await rpc_error(stub.Offload(req, metadata=creds("dev-bad"), timeout=5))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "OffloadRequest.activation.prior_digest" in (err.details() or ""), err.details()
    await assert_good_request_succeeds(stub, registry, windows)


# --- malformed requests -----------------------------------------------------------------------


def _mutate(req: pb.OffloadRequest, **fields: Any) -> pb.OffloadRequest:
    out = pb.OffloadRequest()
    out.CopyFrom(req)
    for key, value in fields.items():
        if key == "activation.shape":
            del out.activation.shape[:]
            out.activation.shape.extend(value)
        elif key.startswith("activation."):
            setattr(out.activation, key.split(".", 1)[1], value)
        else:
            setattr(out, key, value)
    return out


def _malformed(case: str, base: pb.OffloadRequest, registry: ModelRegistry) -> tuple[pb.OffloadRequest, Any]:
    """The request of a case and the metadata to send it with."""
    md = creds("dev-bad")
    n = registry.info["uci_har"].n_stages
    if case == "wrong_shape":
        # Cut 2's numbers in another layout: the payload length fits, the shape does not.
        return _mutate(base, **{"activation.shape": [1, 128, 64]}), md
    if case == "codec_mismatch":  # fp32 bytes labelled fp16: the payload length gives it away
        return _mutate(base, **{"activation.codec": pb.CODEC_FP16}), md
    if case == "codec_unspecified":
        return _mutate(base, **{"activation.codec": pb.CODEC_UNSPECIFIED}), md
    if case == "codec_unknown":
        return _mutate(base, **{"activation.codec": 7}), md
    if case == "cut_fully_local":
        return _mutate(base, cut=n), md
    if case == "cut_huge":
        return _mutate(base, cut=2**32 - 1), md
    if case == "nan_payload":
        x = np.frombuffer(base.activation.data, dtype="<f4").copy()
        x[5] = np.nan
        return _mutate(base, **{"activation.data": x.tobytes()}), md
    if case == "oversize":
        big = np.zeros(2 << 20, dtype=np.uint8).tobytes()  # 2 MiB > the 1 MiB receive limit
        return _mutate(base, **{"activation.data": big}), md
    if case == "bad_token":
        return base, ((DEVICE_ID_METADATA, "dev-bad"), (TOKEN_METADATA, device_token(SECRET, "someone-else")))
    if case == "missing_token":
        return base, ((DEVICE_ID_METADATA, "dev-bad"),)
    if case == "unknown_model":
        return _mutate(base, model="resnet50"), md
    if case == "other_device_id":
        return _mutate(base, device_id="dev-victim"), md
    raise AssertionError(case)


MALFORMED = {
    "wrong_shape": (
        grpc.StatusCode.INVALID_ARGUMENT,
        "OffloadRequest.activation.shape: expected [1, 256, 32]",
    ),
    "codec_mismatch": (grpc.StatusCode.INVALID_ARGUMENT, "OffloadRequest.activation: fp16 payload"),
    "codec_unspecified": (
        grpc.StatusCode.INVALID_ARGUMENT,
        "OffloadRequest.activation.codec: expected one of",
    ),
    "codec_unknown": (grpc.StatusCode.INVALID_ARGUMENT, "OffloadRequest.activation.codec: expected one of"),
    "cut_fully_local": (grpc.StatusCode.INVALID_ARGUMENT, "OffloadRequest.cut: expected 0..5"),
    "cut_huge": (grpc.StatusCode.INVALID_ARGUMENT, "OffloadRequest.cut: expected 0..5"),
    "nan_payload": (
        grpc.StatusCode.INVALID_ARGUMENT,
        "OffloadRequest.activation.data: expected finite numbers",
    ),
    "oversize": (grpc.StatusCode.RESOURCE_EXHAUSTED, "larger than max"),
    "bad_token": (grpc.StatusCode.UNAUTHENTICATED, "not valid for device 'dev-bad'"),
    "missing_token": (grpc.StatusCode.UNAUTHENTICATED, "missing token"),
    "unknown_model": (grpc.StatusCode.NOT_FOUND, "OffloadRequest.model: expected a model this broker serves"),
    "other_device_id": (grpc.StatusCode.PERMISSION_DENIED, "OffloadRequest.device_id"),
    # (a request without estimates is served: test_broker_fuzz_findings.py)
}


@pytest.mark.parametrize("case", list(MALFORMED))
async def test_malformed_request_gets_its_status_and_others_are_still_served(
    case: str, stub: pb_grpc.OffloadServiceStub, registry: ModelRegistry, windows: dict[str, torch.Tensor]
) -> None:
    req, md = _malformed(case, good_request(registry, windows, device="dev-bad"), registry)
    err = await rpc_error(stub.Offload(req, metadata=md, timeout=5))
    code, text = MALFORMED[case]
    assert err.code() == code, err.details()
    assert text in (err.details() or ""), err.details()
    await assert_good_request_succeeds(stub, registry, windows)


async def test_plan_service_needs_a_token_too(channel: grpc.aio.Channel) -> None:
    plans = pb_grpc.PlanServiceStub(channel)
    err = await rpc_error(plans.GetPlan(pb.GetPlanRequest(device_class="phone"), timeout=5))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_failures_are_counted_by_code(
    broker: Broker,
    stub: pb_grpc.OffloadServiceStub,
    registry: ModelRegistry,
    windows: dict[str, torch.Tensor],
) -> None:
    req, md = _malformed("unknown_model", good_request(registry, windows, device="dev-bad"), registry)
    await rpc_error(stub.Offload(req, metadata=md, timeout=5))
    await rpc_error(stub.Offload(good_request(registry, windows), timeout=5))  # no token at all
    v = broker.metrics.registry.get_sample_value
    assert (
        v(
            "splitsense_broker_errors_total",
            {"model": "unknown", "device_class": "phone", "code": "NOT_FOUND", "reason": "unknown_model"},
        )
        == 1
    )
    assert (
        v(
            "splitsense_broker_errors_total",
            {"model": "unknown", "device_class": "other", "code": "UNAUTHENTICATED", "reason": "auth"},
        )
        == 1
    )


# --- streams ----------------------------------------------------------------------------------


async def test_stream_answers_every_window_and_survives_a_bad_one(
    stub: pb_grpc.OffloadServiceStub, registry: ModelRegistry, windows: dict[str, torch.Tensor]
) -> None:
    good = good_request(registry, windows, device="dev-s")
    bad, _ = _malformed("nan_payload", good, registry)
    sent = []
    for i in range(6):
        req = _mutate(bad if i == 2 else good, window_id=f"s{i}")
        sent.append(pb.OffloadStreamRequest(request=req))
    sent.append(pb.OffloadStreamRequest())  # no request at all: named by its position, "#6"
    sent.append(pb.OffloadStreamRequest(request=_mutate(good, window_id="after")))

    async def requests() -> AsyncIterator[pb.OffloadStreamRequest]:
        for msg in sent:
            yield msg

    answers = {}
    async for resp in stub.OffloadStream(requests(), metadata=creds("dev-s"), timeout=10):
        answers[resp.window_id] = resp
    assert set(answers) == {"s0", "s1", "s2", "s3", "s4", "s5", "#6", "after"}
    assert answers["s2"].WhichOneof("outcome") == "error"
    assert answers["s2"].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "OffloadRequest.activation.data" in answers["s2"].error.message
    assert answers["#6"].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "OffloadStreamRequest.request" in answers["#6"].error.message
    for wid in ("s0", "s1", "s3", "s4", "s5", "after"):
        assert answers[wid].WhichOneof("outcome") == "result", answers[wid]


async def test_stream_pipelines_windows(
    broker: Broker,
    stub: pb_grpc.OffloadServiceStub,
    registry: ModelRegistry,
    windows: dict[str, torch.Tensor],
) -> None:
    good = good_request(registry, windows, device="dev-p")
    n = 40

    async def requests() -> AsyncIterator[pb.OffloadStreamRequest]:
        for i in range(n):
            yield pb.OffloadStreamRequest(request=_mutate(good, window_id=f"p{i}"))

    ids = [r.window_id async for r in stub.OffloadStream(requests(), metadata=creds("dev-p"), timeout=20)]
    assert sorted(ids) == sorted(f"p{i}" for i in range(n))
    # the queue depth gauge reads the lane when scraped: nothing queued once every window is answered
    depth = broker.metrics.registry.get_sample_value("splitsense_broker_queue_depth", {"model": "uci_har", "cut": "2"})
    assert depth == 0
    batches = broker.metrics.registry.get_sample_value(
        "splitsense_broker_batches_total", {"model": "uci_har", "cut": "2"}
    )
    assert batches is not None and batches <= n


async def test_stream_windows_take_the_quick_intake_and_answer_like_the_local_model(
    broker: Broker,
    stub: pb_grpc.OffloadServiceStub,
    registry: ModelRegistry,
    windows: dict[str, torch.Tensor],
) -> None:
    """The rebuilt per-window path (cloud/intake.py, Broker.start_window): after a device's first
    window its header is known and the rest are checked the quick way; the logits are the model's."""
    x = windows["uci_har"][:8]
    acts = front(registry, "uci_har", x, 2)
    with torch.inference_mode():
        local = registry.model("uci_har").run(x, 0, registry.model("uci_har").n_stages).numpy()
    before = broker._intake.quick

    async def requests() -> AsyncIterator[pb.OffloadStreamRequest]:
        for i in range(len(acts)):
            act = encode(acts[i : i + 1], Codec.FP32)
            yield pb.OffloadStreamRequest(request=offload_request("uci_har", 2, act, device="dev-q", window_id=f"q{i}"))

    answers = {r.window_id: r async for r in stub.OffloadStream(requests(), metadata=creds("dev-q"), timeout=20)}
    assert broker._intake.quick - before == len(acts) - 1
    for i in range(len(acts)):
        got = answers[f"q{i}"].result
        np.testing.assert_allclose(got.logits, local[i], rtol=1e-4, atol=1e-5)
        assert got.prediction == int(local[i].argmax())
    assert broker.metrics.registry.get_sample_value("splitsense_broker_requests_in_flight") == 0


async def test_a_stream_window_past_its_deadline_is_answered_once_and_its_late_batch_ignored(
    broker: Broker,
    backend: ControlledBackend,
    stub: pb_grpc.OffloadServiceStub,
    registry: ModelRegistry,
    windows: dict[str, torch.Tensor],
) -> None:
    backend.delay_s = 0.25  # the batch answers after the window's 80 ms deadline, within backend_timeout_ms
    good = good_request(registry, windows, device="dev-d")

    async def requests() -> AsyncIterator[pb.OffloadStreamRequest]:
        yield pb.OffloadStreamRequest(request=_mutate(good, window_id="late", deadline_ms=80))
        await asyncio.sleep(0.5)  # the late batch comes back while the stream is still open
        backend.delay_s = 0.0
        yield pb.OffloadStreamRequest(request=_mutate(good, window_id="next", deadline_ms=2000))

    t0 = time.monotonic()
    answers = [r async for r in stub.OffloadStream(requests(), metadata=creds("dev-d"), timeout=10)]
    assert [a.window_id for a in answers] == ["late", "next"]
    assert answers[0].error.code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
    assert "deadline of 80 ms" in answers[0].error.message
    assert answers[1].WhichOneof("outcome") == "result"
    assert time.monotonic() - t0 < 5
    assert broker.metrics.registry.get_sample_value("splitsense_broker_requests_in_flight") == 0


# --- deadlines, shedding, backend failures ----------------------------------------------------


async def test_a_lone_window_runs_in_the_broker_and_a_busy_lane_goes_to_the_backend(
    backend: ControlledBackend, registry: ModelRegistry, windows: dict[str, torch.Tensor]
) -> None:
    """broker.local_tail (on by default): an idle lane's window skips the backend hop; windows that
    arrive while a batch is in flight go to the backend, batched."""
    b = Broker(broker_config(local_tail=True), registry, backend, metrics_registry=CollectorRegistry())
    await b.start()
    calls: list[int] = []
    run_tail = backend.run_tail

    async def counted(model: str, cut: int, batch: np.ndarray) -> np.ndarray:
        calls.append(len(batch))
        return await run_tail(model, cut, batch)

    backend.run_tail = counted  # type: ignore[method-assign]
    try:
        async with grpc.aio.insecure_channel(b.address) as ch:
            stub = pb_grpc.OffloadServiceStub(ch)
            lone = await stub.Offload(good_request(registry, windows), metadata=creds("dev-ok"), timeout=5)
            assert lone.timing.batch_size == 1 and calls == [], "a lone window never reaches the backend"
            v = b.metrics.registry.get_sample_value
            assert v("splitsense_broker_local_batches_total", {"model": "uci_har", "cut": "2"}) == 1.0
            assert v("splitsense_broker_local_windows_total", {"model": "uci_har", "cut": "2"}) == 1.0

            # a burst: the first window takes the broker's tail, the rest queue behind it and go to
            # the backend while it runs (or take the broker's tail again once it is idle)
            def request(i: int) -> Any:
                device = f"dev-{i}"
                return stub.Offload(good_request(registry, windows, device=device), metadata=creds(device), timeout=5)

            many = await asyncio.gather(*(request(i) for i in range(24)))
            assert all(len(r.logits) == registry.info["uci_har"].num_classes for r in many)
            np.testing.assert_allclose([r.logits for r in many], [lone.logits] * 24, rtol=1e-5, atol=1e-6)
            local = v("splitsense_broker_local_batches_total", {"model": "uci_har", "cut": "2"}) or 0.0
            assert sum(calls) + local >= 2
    finally:
        await b.stop(0.5)


async def test_deadline_exceeded_when_the_tail_is_too_slow(
    backend: ControlledBackend,
    stub: pb_grpc.OffloadServiceStub,
    registry: ModelRegistry,
    windows: dict[str, torch.Tensor],
) -> None:
    backend.delay_s = 0.25
    req = _mutate(good_request(registry, windows), deadline_ms=60)
    t0 = time.monotonic()
    err = await rpc_error(stub.Offload(req, metadata=creds("dev-ok"), timeout=5))
    assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED, err.details()
    assert "deadline of 60 ms" in (err.details() or "")
    assert time.monotonic() - t0 < 0.25


async def test_call_deadline_is_honoured(
    backend: ControlledBackend,
    stub: pb_grpc.OffloadServiceStub,
    registry: ModelRegistry,
    windows: dict[str, torch.Tensor],
) -> None:
    backend.delay_s = 0.5
    t0 = time.monotonic()
    err = await rpc_error(stub.Offload(good_request(registry, windows), metadata=creds("dev-ok"), timeout=0.1))
    assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - t0 < 0.4


async def test_a_unary_call_whose_client_left_is_not_answered_and_leaves_nothing_behind(
    broker: Broker,
    backend: ControlledBackend,
    stub: pb_grpc.OffloadServiceStub,
    registry: ModelRegistry,
    windows: dict[str, torch.Tensor],
    caplog: pytest.LogCaptureFixture,
) -> None:
    backend.delay_s = 0.2  # the batch answers after the client has cancelled, well before the window's deadline
    call = stub.Offload(_mutate(good_request(registry, windows), deadline_ms=2000), metadata=creds("dev-ok"), timeout=5)
    await asyncio.sleep(0.05)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    await asyncio.sleep(0.4)  # the batch comes back to a call that is gone
    backend.delay_s = 0.0
    await assert_good_request_succeeds(stub, registry, windows)
    assert broker.metrics.registry.get_sample_value("splitsense_broker_requests_in_flight") == 0
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], [r.getMessage() for r in caplog.records]


async def test_shed_with_a_retry_hint_when_the_queue_cannot_make_the_deadline(
    broker: Broker,
    backend: ControlledBackend,
    stub: pb_grpc.OffloadServiceStub,
    registry: ModelRegistry,
    windows: dict[str, torch.Tensor],
) -> None:
    backend.delay_s = 0.15
    # One slow batch teaches admission control that this lane takes ~150 ms.
    await stub.Offload(_mutate(good_request(registry, windows), deadline_ms=2000), metadata=creds("dev-ok"), timeout=5)
    t0 = time.monotonic()
    err = await rpc_error(
        stub.Offload(_mutate(good_request(registry, windows), deadline_ms=50), metadata=creds("dev-ok"), timeout=5)
    )
    assert time.monotonic() - t0 < 0.1  # shed at once, not queued
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "shed" in (err.details() or "") and "left of the deadline" in (err.details() or "")
    trailing = dict(err.trailing_metadata() or ())
    assert int(trailing[RETRY_AFTER_METADATA]) >= 100
    v = broker.metrics.registry.get_sample_value
    assert v("splitsense_broker_shed_total", {"model": "uci_har", "device_class": "phone", "cut": "2"}) == 1


async def test_shed_on_a_stream_carries_the_hint(
    backend: ControlledBackend,
    stub: pb_grpc.OffloadServiceStub,
    registry: ModelRegistry,
    windows: dict[str, torch.Tensor],
) -> None:
    backend.delay_s = 0.15
    await stub.Offload(_mutate(good_request(registry, windows), deadline_ms=2000), metadata=creds("dev-ok"), timeout=5)

    async def requests() -> AsyncIterator[pb.OffloadStreamRequest]:
        yield pb.OffloadStreamRequest(request=_mutate(good_request(registry, windows), deadline_ms=50))

    answers = [r async for r in stub.OffloadStream(requests(), metadata=creds("dev-ok"), timeout=5)]
    assert len(answers) == 1 and answers[0].WhichOneof("outcome") == "error"
    assert answers[0].error.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    assert answers[0].error.retry_after_ms >= 100


async def test_backend_raising_is_unavailable_within_the_deadline(
    backend: ControlledBackend,
    stub: pb_grpc.OffloadServiceStub,
    registry: ModelRegistry,
    windows: dict[str, torch.Tensor],
) -> None:
    backend.error = RuntimeError("replica died")
    t0 = time.monotonic()
    err = await rpc_error(
        stub.Offload(_mutate(good_request(registry, windows), deadline_ms=300), metadata=creds("dev-ok"), timeout=5)
    )
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    assert "RuntimeError: replica died" in (err.details() or "")
    assert time.monotonic() - t0 < 0.3
    backend.error = None
    await assert_good_request_succeeds(stub, registry, windows)


async def test_hung_backend_is_unavailable_after_the_backend_timeout(
    backend: ControlledBackend,
    stub: pb_grpc.OffloadServiceStub,
    registry: ModelRegistry,
    windows: dict[str, torch.Tensor],
) -> None:
    backend.hang = True  # the broker's backend_timeout_ms is 300 ms here, the window's deadline 2 s
    t0 = time.monotonic()
    err = await rpc_error(
        stub.Offload(_mutate(good_request(registry, windows), deadline_ms=2000), metadata=creds("dev-ok"), timeout=5)
    )
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    assert "did not answer within 300 ms" in (err.details() or "")
    assert time.monotonic() - t0 < 1.0


# --- telemetry and plans ----------------------------------------------------------------------


async def test_report_telemetry_updates_metrics(broker: Broker, stub: pb_grpc.OffloadServiceStub) -> None:
    report = pb.ReportTelemetryRequest(
        device_id="dev-t",
        device_class="watch",
        estimates=pb.DeviceEstimates(
            bandwidth_mbps=2.0, rtt_ms=80.0, battery_fraction=0.3, on_battery=True, radio=pb.RADIO_KIND_LTE
        ),
        plan_version=1,
        period_start_unix_ms=1000,
        period_end_unix_ms=11_000,
        observations=[
            pb.TelemetryObservation(
                model="uci_har",
                cut=6,
                mode=pb.EXECUTION_MODE_LOCAL,
                window_count=5,
                latency_ms_total=50.0,
                stage_ms_total=[1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
            )
        ],
    )
    resp = await stub.ReportTelemetry(report, metadata=creds("dev-t"), timeout=5)
    assert resp.plan_version == broker.plans.version
    # how long the broker took with it: the device's link sample is the call less this
    assert resp.HasField("handling_ms") and 0.0 < resp.handling_ms < 1000.0
    v = broker.metrics.registry.get_sample_value
    labels = {"model": "uci_har", "device_class": "watch", "cut": "6", "mode": "local"}
    assert v("splitsense_device_windows_total", labels) == 5
    assert v("splitsense_device_rtt_seconds_count", {"device_class": "watch"}) == 1
    # A cut the model does not have is refused, naming the field.
    report.observations[0].cut = 9
    err = await rpc_error(stub.ReportTelemetry(report, metadata=creds("dev-t"), timeout=5))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "ReportTelemetryRequest.observations[0].cut: expected 0..6" in (err.details() or "")


async def test_telemetry_of_a_task_group_is_counted_under_its_group(
    broker: Broker, stub: pb_grpc.OffloadServiceStub
) -> None:
    """A sensor node reports its windows under the task group it runs ("fsdd_speaker+fsdd_digit":
    one front, both tails), which the controller plans as one: not "unknown"."""
    group = "fsdd_speaker+fsdd_digit"
    report = pb.ReportTelemetryRequest(
        device_id="dev-g",
        device_class="sensor_node",
        plan_version=1,
        period_start_unix_ms=1000,
        period_end_unix_ms=11_000,
        observations=[
            pb.TelemetryObservation(
                model=group, cut=1, mode=pb.EXECUTION_MODE_OFFLOADED, window_count=3, latency_ms_total=600.0
            )
        ],
    )
    await stub.ReportTelemetry(report, metadata=creds("dev-g"), timeout=5)
    v = broker.metrics.registry.get_sample_value
    labels = {"model": group, "device_class": "sensor_node", "cut": "1", "mode": "offloaded"}
    assert v("splitsense_device_windows_total", labels) == 3


def _plan_set(version: int, cut: int) -> PlanSet:
    rows = tuple(
        PlanRow(
            min_bandwidth_mbps=0.0,
            max_bandwidth_mbps=float("inf"),
            battery=BatteryState.NORMAL,
            cut=cut,
            codec=Codec.INT8,
            reason="test",
            predicted_latency_ms=1.0,
            predicted_energy_mj=1.0,
        )
        for _ in range(1)
    )
    plans = tuple(
        Plan(model=m, device_class=c, rows=rows, objective=Objective.ENERGY) for m in MODELS for c in ("phone", "watch")
    )
    return PlanSet(version=version, plans=plans, created_unix_ms=5, reason=f"test v{version}")


async def test_get_plan_serves_the_static_set_then_nothing_new(broker: Broker, channel: grpc.aio.Channel) -> None:
    plans = pb_grpc.PlanServiceStub(channel)
    resp = await plans.GetPlan(
        pb.GetPlanRequest(device_class="phone", models=["uci_har"]), metadata=creds("d"), timeout=5
    )
    ps = from_pb(resp.plan_set)
    assert ps.version == 1 and [p.model for p in ps.plans] == ["uci_har"] and ps.plans[0].device_class == "phone"
    again = await plans.GetPlan(
        pb.GetPlanRequest(device_class="phone", known_version=1), metadata=creds("d"), timeout=5
    )
    assert not again.HasField("plan_set")
    err = await rpc_error(plans.GetPlan(pb.GetPlanRequest(), metadata=creds("d"), timeout=5))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "GetPlanRequest.device_class" in (err.details() or "")


async def test_watch_plan_sends_the_current_set_then_every_change(broker: Broker, channel: grpc.aio.Channel) -> None:
    plans = pb_grpc.PlanServiceStub(channel)
    call = plans.WatchPlan(pb.WatchPlanRequest(device_class="watch"), metadata=creds("d"), timeout=10)
    first = from_pb((await call.read()).plan_set)
    assert first.version == 1 and {p.device_class for p in first.plans} == {"watch"}
    assert broker.set_plans(_plan_set(2, cut=3))
    second = from_pb((await asyncio.wait_for(call.read(), 5)).plan_set)
    assert second.version == 2 and second.reason == "test v2"
    assert {p.device_class for p in second.plans} == {"watch"} and all(p.rows[0].cut == 3 for p in second.plans)
    assert not broker.set_plans(_plan_set(2, cut=4))  # not newer: ignored
    assert broker.set_plans(_plan_set(3, cut=1))
    third = from_pb((await asyncio.wait_for(call.read(), 5)).plan_set)
    assert third.version == 3
    call.cancel()


async def test_a_publication_goes_on_the_wire_once_per_class_and_models(broker: Broker) -> None:
    phone = broker.plan_set_pb("phone", ("uci_har",))
    assert broker.plan_set_pb("phone", ("uci_har",)) is phone  # every device of the class shares it
    assert from_pb(phone) == broker.plans.select("phone", ("uci_har",))
    watch = broker.plan_set_pb("watch", ())
    assert watch is not phone and from_pb(watch) == broker.plans.select("watch", ())
    assert broker.set_plans(_plan_set(2, cut=3))
    newer = broker.plan_set_pb("phone", ("uci_har",))
    assert newer is not phone and from_pb(newer) == broker.plans.select("phone", ("uci_har",))
    assert from_pb(newer).version == 2


async def test_set_plans_from_another_thread_reaches_watchers(broker: Broker, channel: grpc.aio.Channel) -> None:
    plans = pb_grpc.PlanServiceStub(channel)
    call = plans.WatchPlan(pb.WatchPlanRequest(device_class="phone", known_version=1), metadata=creds("d"), timeout=10)
    await asyncio.sleep(0.05)
    await asyncio.to_thread(broker.set_plans, _plan_set(2, cut=2))
    got = from_pb((await asyncio.wait_for(call.read(), 5)).plan_set)
    assert got.version == 2  # the watch started at version 1: nothing was sent before the change
    call.cancel()


# --- lifecycle --------------------------------------------------------------------------------


async def test_stop_ends_watches_and_streams_with_unavailable(
    registry: ModelRegistry, backend: ControlledBackend
) -> None:
    b = Broker(broker_config(), registry, backend, metrics_registry=CollectorRegistry())
    await b.start()
    ch = grpc.aio.insecure_channel(b.address)
    try:
        watch = pb_grpc.PlanServiceStub(ch).WatchPlan(pb.WatchPlanRequest(device_class="phone"), metadata=creds("d"))
        await watch.read()
        stream = pb_grpc.OffloadServiceStub(ch).OffloadStream(metadata=creds("d"))
        await asyncio.sleep(0.05)
        t0 = time.monotonic()
        await b.stop(5.0)
        assert time.monotonic() - t0 < 2.0  # nothing held the grace period
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await watch.read()
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stream.read()
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await ch.close()


async def test_a_taken_port_is_a_clear_error(
    broker: Broker, registry: ModelRegistry, backend: ControlledBackend
) -> None:
    other = Broker(broker_config(port=broker.port), registry, backend, metrics_registry=CollectorRegistry())
    with pytest.raises(ConfigError, match="cannot listen"):
        await other.start()


async def test_run_broker_forever_serves_metrics_and_stops_on_sigterm(
    registry: ModelRegistry, backend: ControlledBackend, unused_tcp_port: int
) -> None:
    started: asyncio.Queue[Broker] = asyncio.Queue()
    cfg = broker_config(metrics_port=unused_tcp_port, shutdown_grace_s=1.0)
    task = asyncio.create_task(run_broker_forever(cfg, registry, backend, on_started=started.put_nowait))
    b = await asyncio.wait_for(started.get(), 10)
    ch = grpc.aio.insecure_channel(b.address)
    try:
        health = health_pb2_grpc.HealthStub(ch)
        resp = await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
        url = f"http://127.0.0.1:{unused_tcp_port}/metrics"
        body = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read().decode())
        assert "splitsense_broker_requests_in_flight" in body
        # The handler is the loop's, not the default one (which would end this test process).
        assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, signal.SIG_IGN, None)
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.wait_for(task, 10)
    finally:
        await ch.close()
        if not task.done():
            task.cancel()
    with pytest.raises(OSError):  # the exporter is gone too
        await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=2).read())


async def test_undecodable_bytes_are_invalid_argument(
    channel: grpc.aio.Channel,
    stub: pb_grpc.OffloadServiceStub,
    registry: ModelRegistry,
    windows: dict[str, torch.Tensor],
) -> None:
    garbage = b"\xff\xff\xff\x01not a protobuf"
    raw = channel.unary_unary("/splitsense.v1.OffloadService/Offload")
    err = await rpc_error(raw(garbage, metadata=creds("dev-bad"), timeout=5))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid splitsense.v1.OffloadRequest message" in (err.details() or "")
    raw_plan = channel.unary_stream("/splitsense.v1.PlanService/WatchPlan")
    with pytest.raises(grpc.aio.AioRpcError) as e:
        async for _ in raw_plan(garbage, metadata=creds("dev-bad"), timeout=5):
            pass
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # On a stream, only that message is answered with an error.
    raw_stream = channel.stream_stream("/splitsense.v1.OffloadService/OffloadStream")
    good = pb.OffloadStreamRequest(request=good_request(registry, windows, device="dev-bad")).SerializeToString()

    async def frames() -> AsyncIterator[bytes]:
        for frame in (good, garbage, good):
            yield frame

    answers = [
        pb.OffloadStreamResponse.FromString(r) async for r in raw_stream(frames(), metadata=creds("dev-bad"), timeout=5)
    ]
    assert sorted(str(a.WhichOneof("outcome")) for a in answers) == ["error", "result", "result"]
    err_answer = next(a for a in answers if a.WhichOneof("outcome") == "error")
    assert err_answer.window_id == "#1" and err_answer.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    await assert_good_request_succeeds(stub, registry, windows)
