"""The findings of issue 10's independent fuzzing client, each fixed and pinned on the real broker
(loopback grpc.aio server, in-process tails with the shipped weights, a fresh metrics registry):

1. a finite activation whose tail output overflows is INVALID_ARGUMENT (the device: "rejected"),
   not UNAVAILABLE ("the cloud is down"), unary and on a stream, counted under reason
   "non_finite_output";
2. every string a device sends has a length limit, and a refused value is never echoed;
3. a request or report without `estimates` is served: unset means unknown;
4. a device-chosen device_class never becomes a metric label value.

After each bad input a good request is still served.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry

from cloud.auth import DEVICE_ID_METADATA, device_token
from cloud.backend import InProcessTailBackend, ModelRegistry
from cloud.broker import Broker
from edge.transport import error_from_status
from pipelines import training
from pipelines.codecs import Codec, encode
from splitsense.config import BrokerConfig, ServingConfig
from splitsense.errors import BrokerUnavailableError, RejectedError
from splitsense.plan import BatteryState, Objective, Plan, PlanRow, PlanSet
from splitsense.v1 import offload_pb2 as pb
from splitsense.v1 import offload_pb2_grpc as pb_grpc
from splitsense.wire import MAX_ID_CHARS, MAX_NAME_CHARS, DeviceEstimates, OffloadRequest, RadioKind, to_pb

pytestmark = pytest.mark.integration

SECRET = "integration-test-secret-0123456789"
MODEL, CUT = "uci_har", 2  # every value 3e38 at cut 2 overflows in uci_har's tail (NaN/inf logits)
KNOWN_CLASSES = ("phone", "iot_board", "watch", "sensor_node", "lab_rig")  # static plans' + the planner's
EST = DeviceEstimates(bandwidth_mbps=12.0, rtt_ms=25.0, battery_fraction=0.7, on_battery=True, radio=RadioKind.WIFI)


@pytest.fixture(scope="module")
def registry() -> ModelRegistry:
    return ModelRegistry(ServingConfig().models)


@pytest.fixture(scope="module")
def activation(registry: ModelRegistry) -> np.ndarray:
    """A real window's activation at the cut."""
    x, _ = training.held_out_set(registry.trained(MODEL))
    with torch.inference_mode():
        return registry.model(MODEL).run(x[:1], 0, CUT).numpy()


@pytest.fixture
async def broker(registry: ModelRegistry) -> AsyncIterator[Broker]:
    backend = InProcessTailBackend(registry, threads=1)
    cfg = BrokerConfig(host="127.0.0.1", port=0, auth_secret=SECRET, metrics_port=None)
    b = Broker(cfg, registry, backend, metrics_registry=CollectorRegistry(), device_classes=("lab_rig",))
    await b.start()
    yield b
    await b.stop(0.5)
    await backend.close()


@pytest.fixture
async def channel(broker: Broker) -> AsyncIterator[grpc.aio.Channel]:
    ch = grpc.aio.insecure_channel(broker.address)
    yield ch
    await ch.close()


@pytest.fixture
def stub(channel: grpc.aio.Channel) -> pb_grpc.OffloadServiceStub:
    return pb_grpc.OffloadServiceStub(channel)


def creds(device: str = "dev-1") -> tuple[tuple[str, str], ...]:
    return ((DEVICE_ID_METADATA, device), ("authorization", f"Bearer {device_token(SECRET, device)}"))


def request(x: np.ndarray, *, window_id: str = "w", device_class: str = "phone", **kw: Any) -> pb.OffloadRequest:
    args: dict[str, Any] = dict(
        window_id=window_id,
        model=MODEL,
        cut=CUT,
        device_id="dev-1",
        device_class=device_class,
        estimates=EST,
        plan_version=1,
        activation=encode(x, Codec.FP32),
        sent_unix_ms=int(time.time() * 1000),
    )
    args.update(kw)
    return to_pb(OffloadRequest(**args))


def overflowing(x: np.ndarray) -> np.ndarray:
    return np.full_like(x, 3e38)  # finite float32, so it passes validation; the tail overflows


async def rpc_error(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await call
    return e.value


async def still_serving(stub: pb_grpc.OffloadServiceStub, channel: grpc.aio.Channel, x: np.ndarray) -> None:
    resp = await stub.Offload(request(x, window_id="good"), metadata=creds(), timeout=5)
    assert resp.window_id == "good" and np.isfinite(resp.logits).all()
    health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert health.status == health_pb2.HealthCheckResponse.SERVING


def errors(broker: Broker, **labels: str) -> float:
    base = {"model": MODEL, "device_class": "phone", "code": "INVALID_ARGUMENT"}
    return broker.metrics.registry.get_sample_value("splitsense_broker_errors_total", {**base, **labels}) or 0.0


# --- 1. a tail output that overflows -----------------------------------------------------------


async def test_overflowing_tail_output_is_rejected_not_unavailable(
    broker: Broker, stub: pb_grpc.OffloadServiceStub, channel: grpc.aio.Channel, activation: np.ndarray
) -> None:
    err = await rpc_error(stub.Offload(request(overflowing(activation)), metadata=creds(), timeout=5))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    assert f"the activation at cut {CUT} gives non-finite logits for model {MODEL!r}" in (err.details() or "")
    # The device reads it as "rejected": finished locally, its breaker and the fallback alert untouched.
    on_device = error_from_status(err.code(), err.details() or "")
    assert isinstance(on_device, RejectedError) and not isinstance(on_device, BrokerUnavailableError)
    assert errors(broker, reason="non_finite_output") == 1
    assert errors(broker, code="UNAVAILABLE", reason="backend_unavailable") == 0
    await still_serving(stub, channel, activation)


async def test_an_overflowing_window_fails_alone_in_its_batch(
    stub: pb_grpc.OffloadServiceStub, activation: np.ndarray
) -> None:
    calls = [
        stub.Offload(
            request(overflowing(activation) if i == 3 else activation, window_id=f"b{i}"), metadata=creds(), timeout=5
        )
        for i in range(8)
    ]
    results = await asyncio.gather(*calls, return_exceptions=True)
    for i, r in enumerate(results):
        if i == 3:
            assert isinstance(r, grpc.aio.AioRpcError) and r.code() == grpc.StatusCode.INVALID_ARGUMENT
        else:
            assert isinstance(r, pb.OffloadResponse) and r.window_id == f"b{i}", r


async def test_overflowing_tail_output_on_a_stream_is_an_invalid_argument_window_error(
    broker: Broker, stub: pb_grpc.OffloadServiceStub, activation: np.ndarray
) -> None:
    sent = [request(activation, window_id="s0"), request(overflowing(activation), window_id="s1")]
    sent.append(request(activation, window_id="s2"))

    async def requests() -> AsyncIterator[pb.OffloadStreamRequest]:
        for r in sent:
            yield pb.OffloadStreamRequest(request=r)

    answers = {r.window_id: r async for r in stub.OffloadStream(requests(), metadata=creds(), timeout=10)}
    assert answers["s1"].WhichOneof("outcome") == "error"
    assert answers["s1"].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "gives non-finite logits" in answers["s1"].error.message
    assert answers["s0"].WhichOneof("outcome") == answers["s2"].WhichOneof("outcome") == "result"
    assert errors(broker, reason="non_finite_output") == 1


# --- 2. string lengths -------------------------------------------------------------------------


def _set(field: str, value: Any) -> Callable[[pb.OffloadRequest], None]:
    def mutate(msg: pb.OffloadRequest) -> None:
        if field == "extra_models":
            msg.extra_models.append(value)
        elif field == "prior_digest":
            msg.activation.prior_digest = value
        else:
            setattr(msg, field, value)

    return mutate


@pytest.mark.parametrize(
    ("field", "limit"),
    [
        ("window_id", MAX_ID_CHARS),
        ("device_id", MAX_ID_CHARS),
        ("model", MAX_NAME_CHARS),
        ("device_class", MAX_NAME_CHARS),
        ("extra_models", MAX_NAME_CHARS),
        ("prior_digest", MAX_NAME_CHARS),
    ],
)
async def test_an_overlong_offload_string_is_refused_naming_field_and_limit(
    field: str,
    limit: int,
    stub: pb_grpc.OffloadServiceStub,
    channel: grpc.aio.Channel,
    activation: np.ndarray,
) -> None:
    msg = request(activation)
    _set(field, "x" * 100_000)(msg)
    err = await rpc_error(stub.Offload(msg, metadata=creds(), timeout=5))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    details = err.details() or ""
    path = "OffloadRequest.activation.prior_digest" if field == "prior_digest" else f"OffloadRequest.{field}"
    assert details.startswith(f"{path}: expected "), details
    assert f"at most {limit} characters" in details and "100000" in details, details
    assert len(details) < 300, "the refused value is not echoed"
    await still_serving(stub, channel, activation)


async def test_an_overlong_window_id_on_a_stream_is_not_echoed(
    stub: pb_grpc.OffloadServiceStub, activation: np.ndarray
) -> None:
    async def requests() -> AsyncIterator[pb.OffloadStreamRequest]:
        yield pb.OffloadStreamRequest(request=_with(request(activation), window_id="w" * 100_000))
        yield pb.OffloadStreamRequest(request=request(activation, window_id="ok"))

    answers = {r.window_id: r async for r in stub.OffloadStream(requests(), metadata=creds(), timeout=10)}
    assert set(answers) == {"#0", "ok"}  # named by its position in the stream instead
    assert answers["#0"].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert answers["#0"].error.message.startswith("OffloadRequest.window_id: expected at most 128 characters")
    assert answers["ok"].WhichOneof("outcome") == "result"


def _with(msg: pb.OffloadRequest, **fields: Any) -> pb.OffloadRequest:
    out = pb.OffloadRequest()
    out.CopyFrom(msg)
    for k, v in fields.items():
        setattr(out, k, v)
    return out


def _report(**kw: Any) -> pb.ReportTelemetryRequest:
    msg = pb.ReportTelemetryRequest(
        device_id="dev-1",
        device_class="phone",
        estimates=to_pb(EST),
        plan_version=1,
        period_start_unix_ms=1000,
        period_end_unix_ms=2000,
        observations=[pb.TelemetryObservation(model=MODEL, cut=6, mode=pb.EXECUTION_MODE_LOCAL, window_count=1)],
    )
    for k, v in kw.items():
        if k == "observation_model":
            msg.observations[0].model = v
        else:
            setattr(msg, k, v)
    return msg


@pytest.mark.parametrize(
    ("field", "path", "limit"),
    [
        ("device_id", "ReportTelemetryRequest.device_id", MAX_ID_CHARS),
        ("device_class", "ReportTelemetryRequest.device_class", MAX_NAME_CHARS),
        ("observation_model", "ReportTelemetryRequest.observations[0].model", MAX_NAME_CHARS),
    ],
)
async def test_an_overlong_telemetry_string_is_refused(
    field: str, path: str, limit: int, stub: pb_grpc.OffloadServiceStub
) -> None:
    err = await rpc_error(stub.ReportTelemetry(_report(**{field: "x" * 100_000}), metadata=creds(), timeout=5))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (err.details() or "").startswith(f"{path}: expected at most {limit} characters, got 100000")


@pytest.mark.parametrize("method", ["GetPlan", "WatchPlan"])
async def test_an_overlong_plan_request_string_is_refused(
    method: str, broker: Broker, channel: grpc.aio.Channel
) -> None:
    plans = pb_grpc.PlanServiceStub(channel)
    cls = pb.GetPlanRequest if method == "GetPlan" else pb.WatchPlanRequest
    name = cls.DESCRIPTOR.name
    cases = [
        (cls(device_class="c" * 100_000), f"{name}.device_class: expected at most {MAX_NAME_CHARS} characters"),
        (cls(device_class="phone", models=["m" * 100_000]), f"{name}.models: expected names of at most"),
    ]
    for msg, expected in cases:
        call = getattr(plans, method)(msg, metadata=creds(), timeout=5)
        err = await rpc_error(call if method == "GetPlan" else call.read())
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
        assert (err.details() or "").startswith(expected), err.details()
    # Counted too; the overlong class under "other", the known one under its own label.
    assert errors(broker, model="unknown", device_class="other", reason="invalid_request") == 1
    assert errors(broker, model="unknown", device_class="phone", reason="invalid_request") == 1
    ok = await plans.GetPlan(pb.GetPlanRequest(device_class="phone", models=[MODEL]), metadata=creds(), timeout=5)
    assert [p.model for p in ok.plan_set.plans] == [MODEL]


# --- 3. no estimates -----------------------------------------------------------------------------


async def test_a_window_without_estimates_is_served_and_records_no_link_sample(
    broker: Broker, stub: pb_grpc.OffloadServiceStub, activation: np.ndarray
) -> None:
    msg = request(activation, window_id="no-est")
    msg.ClearField("estimates")
    resp = await stub.Offload(msg, metadata=creds(), timeout=5)
    assert resp.window_id == "no-est" and len(resp.logits) == 6

    async def requests() -> AsyncIterator[pb.OffloadStreamRequest]:
        yield pb.OffloadStreamRequest(request=_with(msg, window_id="no-est-stream"))

    [answer] = [r async for r in stub.OffloadStream(requests(), metadata=creds(), timeout=10)]
    assert answer.WhichOneof("outcome") == "result"
    report = _report()
    report.ClearField("estimates")
    assert (await stub.ReportTelemetry(report, metadata=creds(), timeout=5)).plan_version == broker.plans.version
    v = broker.metrics.registry.get_sample_value
    assert v("splitsense_device_rtt_seconds_count", {"device_class": "phone"}) is None  # unknown: no sample
    assert v("splitsense_broker_telemetry_reports_total", {"device_class": "phone"}) == 1
    labels = {"model": MODEL, "device_class": "phone", "cut": str(CUT), "codec": "fp32"}
    assert v("splitsense_broker_request_duration_seconds_count", labels) == 2


# --- 4. device_class labels ----------------------------------------------------------------------


async def test_device_classes_a_device_sends_never_become_label_values(
    broker: Broker, stub: pb_grpc.OffloadServiceStub, activation: np.ndarray
) -> None:
    sent = [f"fuzz-{i}" for i in range(40)]
    calls = []
    for i, c in enumerate(sent):
        x = overflowing(activation) if i % 2 else activation  # answered and failed windows alike
        calls.append(stub.Offload(request(x, window_id=f"c{i}", device_class=c), metadata=creds(), timeout=10))
        calls.append(stub.ReportTelemetry(_report(device_class=c), metadata=creds(), timeout=10))
    calls.append(stub.Offload(request(activation, device_class="lab_rig"), metadata=creds(), timeout=10))
    await asyncio.gather(*calls, return_exceptions=True)

    seen: dict[str, set[str]] = {}
    for family in broker.metrics.registry.collect():
        for sample in family.samples:
            if "device_class" in sample.labels:
                seen.setdefault(family.name, set()).add(sample.labels["device_class"])
    values = set().union(*seen.values())
    assert values <= {*KNOWN_CLASSES, "other"}, values
    assert "lab_rig" in values and "other" in values  # a configured planner class keeps its own label
    assert {"splitsense_broker_errors", "splitsense_broker_received_bytes", "splitsense_device_windows"} <= set(seen)

    # A class a published plan names is known from then on (the controller plans planner.classes).
    rows = (
        PlanRow(
            min_bandwidth_mbps=0.0,
            max_bandwidth_mbps=float("inf"),
            battery=BatteryState.NORMAL,
            cut=CUT,
            codec=Codec.FP32,
            reason="test",
            predicted_latency_ms=1.0,
            predicted_energy_mj=1.0,
        ),
    )
    plan = Plan(model=MODEL, device_class="drone", rows=rows, objective=Objective.LATENCY)
    assert broker.set_plans(PlanSet(version=broker.plans.version + 1, plans=(plan,), created_unix_ms=1, reason="t"))
    assert broker.metrics.device_class_label("drone") == "drone"
    assert broker.metrics.device_class_label("fuzz-0") == "other"
