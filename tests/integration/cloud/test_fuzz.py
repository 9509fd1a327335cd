"""Proto-driven fuzzing of the real broker: messages generated from the descriptors, and raw bytes.

`message_of(cls)` is a hypothesis strategy that walks a message's descriptor: every field by its
type and label (repeated ones as lists), enums with their known values and unknown ones, nested
messages, strings short, long past the limits and huge, bytes of random lengths (past the 1 MiB
receive limit too), ints at and beyond the sign and width edges, floats incl. NaN and inf. Given a
good message as `base`, it instead replaces a random subset of its fields (nested ones
recursively), which keeps most of a request valid so the fuzz reaches the deeper checks (tensor
shape and data, cut, model) instead of stopping at the first. Raw requests are a good request's
bytes mutated (bit flips, cuts, splices) and sent through a generic call that does not serialize.

Every request goes to the broker with a valid token, as a blocking call with a timeout (a hang
fails the test). Each must be answered OK or with a status of ALLOWED (never UNKNOWN, INTERNAL or
UNAVAILABLE: the input is at fault, not the cloud); a stream answers each window, OK or a
WindowError with such a code. After every example a good request is served and health is SERVING.

CI runs 150 examples in all, derandomized; SPLITSENSE_FUZZ_EXAMPLES=2000 runs more by hand, and
`-s` prints the statuses seen.
"""

from __future__ import annotations

import math
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cloud.backend import ModelRegistry
from splitsense.config import ServingConfig
from splitsense.v1 import offload_pb2 as pb
from splitsense.v1 import offload_pb2_grpc as pb_grpc
from tests.integration.cloud.broker_harness import (
    SERVING,
    BrokerThread,
    creds,
    good_activation,
    good_request,
    health_status,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DEVICE = "fuzz-dev"
CALL_TIMEOUT_S = 10.0  # far above any answer on loopback: reaching it means the broker hung
ALLOWED = frozenset(
    {
        grpc.StatusCode.OK,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        # a window whose own deadline_ms passed before its answer (the broker's status, at once);
        # the client's call timeout reached instead means the broker hung: `_hung` tells them apart
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.OUT_OF_RANGE,
    }
)
TOTAL_EXAMPLES = int(os.environ.get("SPLITSENSE_FUZZ_EXAMPLES", "150"))
SEEN: Counter[str] = Counter()  # "Method STATUS" -> count, printed at the end of the module


def examples(share: float) -> settings:
    return settings(
        max_examples=max(1, round(TOTAL_EXAMPLES * share)),
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
        print_blob=True,
    )


# --- strategies from the descriptors -------------------------------------------------------------

_INT_RANGES = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}


def _ints(lo: int, hi: int) -> st.SearchStrategy[int]:
    edges = [v for v in (lo, hi, 0, 1, -1, 2, 7, 255, 256, 2**31 - 1, 2**32 - 1, -(2**31)) if lo <= v <= hi]
    return st.one_of(
        st.sampled_from(edges), st.integers(-300, 300).filter(lambda v: lo <= v <= hi), st.integers(lo, hi)
    )


def _strings() -> st.SearchStrategy[str]:
    return st.one_of(
        st.text(max_size=20),
        st.text(min_size=60, max_size=200),  # around the 64 and 128 character limits
        st.builds(lambda c, n: c * n, st.characters(codec="utf-8"), st.integers(1000, 300_000)),  # huge
    )


def _bytes() -> st.SearchStrategy[bytes]:
    return st.one_of(
        st.binary(max_size=64),
        st.integers(0, 40_000).map(lambda n: bytes([n % 251]) * n),
        st.integers((1 << 20) - 64, (1 << 20) + 4096).map(bytes),  # at the 1 MiB receive limit
    )


def _floats(width: int) -> st.SearchStrategy[float]:
    special = [math.nan, math.inf, -math.inf, 0.0, -0.0, 1e-45, 3.4e38, -3.4e38]
    return st.one_of(st.sampled_from(special), st.floats(width=width, allow_nan=True, allow_infinity=True))


def _scalar(f: FieldDescriptor, hints: dict[str, st.SearchStrategy[Any]]) -> st.SearchStrategy[Any]:
    generic: st.SearchStrategy[Any]
    if f.type in _INT_RANGES:
        generic = _ints(*_INT_RANGES[f.type])
    elif f.type == FieldDescriptor.TYPE_BOOL:
        generic = st.booleans()
    elif f.type == FieldDescriptor.TYPE_DOUBLE:
        generic = _floats(64)
    elif f.type == FieldDescriptor.TYPE_FLOAT:
        generic = _floats(32)
    elif f.type == FieldDescriptor.TYPE_STRING:
        generic = _strings()
    elif f.type == FieldDescriptor.TYPE_BYTES:
        generic = _bytes()
    elif f.type == FieldDescriptor.TYPE_ENUM:  # open (proto3) enums: unknown numbers too
        known = [v.number for v in f.enum_type.values]
        generic = st.one_of(st.sampled_from(known), _ints(-(2**31), 2**31 - 1))
    else:
        raise AssertionError(f"no strategy for {f.full_name} of type {f.type}")
    hint = hints.get(f.full_name)
    return generic if hint is None else st.one_of(hint, generic)


def _is_map(f: FieldDescriptor) -> bool:
    return f.type == FieldDescriptor.TYPE_MESSAGE and f.message_type.GetOptions().map_entry


def _value(
    f: FieldDescriptor, hints: dict[str, st.SearchStrategy[Any]], base: Message | None, depth: int
) -> st.SearchStrategy[Any]:
    if f.type == FieldDescriptor.TYPE_MESSAGE:
        return message_of(f.message_type, hints, base, depth + 1)
    return _scalar(f, hints)


def message_of(
    desc: Descriptor,
    hints: dict[str, st.SearchStrategy[Any]] | None = None,
    base: Message | None = None,
    depth: int = 0,
) -> st.SearchStrategy[Message]:
    """Messages of `desc`: all fields drawn (each maybe unset), or `base` with some fields redrawn.

    `hints` maps a field's full name to values worth trying besides the generic ones (valid model
    names, the caller's device id): random text would almost never get past those checks.
    """
    hints = hints or {}
    cls: Callable[[], Message] = pb.__dict__[desc.name]
    fields: dict[str, st.SearchStrategy[Any]] = {}
    for f in desc.fields:
        sub_base = getattr(base, f.name) if base is not None and f.type == FieldDescriptor.TYPE_MESSAGE else None
        if _is_map(f):  # map<k, v>: key and value fields of its entry message, few or very many entries
            key, value = (_value(e, hints, None, depth) for e in f.message_type.fields)
            fields[f.name] = st.one_of(
                st.dictionaries(key, value, max_size=4), st.dictionaries(key, value, min_size=40, max_size=200)
            )
        elif f.is_repeated:
            item = _value(f, hints, None, depth)
            fields[f.name] = st.one_of(st.lists(item, max_size=4), st.lists(item, min_size=100, max_size=2000))
        elif f.type == FieldDescriptor.TYPE_MESSAGE and depth >= 4:
            continue
        elif sub_base is not None:
            fields[f.name] = st.one_of(_value(f, hints, sub_base, depth), _value(f, hints, None, depth))
        else:
            fields[f.name] = _value(f, hints, None, depth)

    def build(values: dict[str, Any]) -> Message:
        msg = cls()
        if base is not None:
            msg.CopyFrom(base)
        for name, v in values.items():
            msg.ClearField(name)
            f = desc.fields_by_name[name]
            if _is_map(f):
                getattr(msg, name).update(v)
            elif f.is_repeated:
                if f.type == FieldDescriptor.TYPE_MESSAGE:
                    for item in v:
                        getattr(msg, name).add().CopyFrom(item)
                else:
                    getattr(msg, name).extend(v)
            elif f.type == FieldDescriptor.TYPE_MESSAGE:
                getattr(msg, name).CopyFrom(v)
            else:
                setattr(msg, name, v)
        return msg

    if base is not None:  # a good message with a few fields redrawn
        return st.fixed_dictionaries({}, optional=fields).filter(lambda d: 0 < len(d) <= 3).map(build)
    return st.fixed_dictionaries({}, optional=fields).map(build)


def mutated(good: bytes) -> st.SearchStrategy[bytes]:
    """A good message's bytes, bit-flipped, cut, spliced with random bytes or repeated."""

    @st.composite
    def mutate(draw: st.DrawFn) -> bytes:
        data = bytearray(good)
        for _ in range(draw(st.integers(1, 4))):
            kind = draw(st.sampled_from(["flip", "cut", "insert", "delete", "repeat", "varint"]))
            at = draw(st.integers(0, len(data)))
            if kind == "flip" and data:
                i = min(at, len(data) - 1)
                data[i] ^= 1 << draw(st.integers(0, 7))
            elif kind == "cut":
                del data[at:]
            elif kind == "insert":
                data[at:at] = draw(st.binary(min_size=1, max_size=16))
            elif kind == "delete":
                del data[at : at + draw(st.integers(1, 16))]
            elif kind == "repeat":
                data += data[: draw(st.integers(0, len(data)))]
            else:  # an over-long or huge varint, e.g. a length prefix
                data[at:at] = b"\xff" * draw(st.integers(1, 11)) + b"\x01"
        return bytes(data)

    return mutate()


# --- the broker, calls and the oracle ------------------------------------------------------------


@pytest.fixture(scope="module")
def registry() -> ModelRegistry:
    return ModelRegistry(ServingConfig().models)


@pytest.fixture(scope="module")
def broker(registry: ModelRegistry) -> Iterator[BrokerThread]:
    with BrokerThread(registry) as b:
        yield b
    if SEEN:
        print("\nfuzz statuses seen:", dict(sorted(SEEN.items())))


@pytest.fixture(scope="module")
def channel(broker: BrokerThread) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(broker.address, options=[("grpc.max_receive_message_length", 16 << 20)]) as ch:
        yield ch


@pytest.fixture(scope="module")
def good(registry: ModelRegistry) -> pb.OffloadRequest:
    return good_request(good_activation(registry), DEVICE)


@pytest.fixture(scope="module")
def hints(registry: ModelRegistry) -> dict[str, st.SearchStrategy[Any]]:
    models = st.sampled_from(sorted(registry.info))
    classes = st.sampled_from(["phone", "watch", "iot_board", "lab_rig", "other"])
    return {
        "splitsense.v1.OffloadRequest.model": models,
        "splitsense.v1.OffloadRequest.extra_models": models,
        "splitsense.v1.OffloadRequest.device_id": st.just(DEVICE),
        "splitsense.v1.OffloadRequest.cut": st.integers(0, 7),
        "splitsense.v1.OffloadRequest.device_class": classes,
        "splitsense.v1.ReportTelemetryRequest.device_id": st.just(DEVICE),
        "splitsense.v1.ReportTelemetryRequest.device_class": classes,
        "splitsense.v1.TelemetryObservation.model": models,
        "splitsense.v1.TelemetryObservation.cut": st.integers(0, 7),
        "splitsense.v1.GetPlanRequest.device_class": classes,
        "splitsense.v1.GetPlanRequest.models": models,
        "splitsense.v1.GetPlanRequest.known_version": st.integers(-1, 2),
        "splitsense.v1.WatchPlanRequest.device_class": classes,
        "splitsense.v1.WatchPlanRequest.models": models,
        "splitsense.v1.WatchPlanRequest.known_version": st.integers(-1, 2),
    }


def _record(method: str, code: grpc.StatusCode, details: str | None = None) -> None:
    SEEN[f"{method} {code.name}"] += 1
    assert code in ALLOWED, f"{method}: {code.name} for a malformed request ({details})"


def _hung(e: grpc.RpcError, t0: float) -> bool:
    """The client's own call timeout ran out (not the broker answering a window's passed deadline)."""
    return e.code() == grpc.StatusCode.DEADLINE_EXCEEDED and time.monotonic() - t0 >= CALL_TIMEOUT_S * 0.9


def unary(channel: grpc.Channel, method: str, body: bytes) -> grpc.StatusCode:
    """Send `body` as is to a unary method; the status it got (its details in the failure)."""
    call = channel.unary_unary(method)  # no serializers: the bytes go as they are
    t0 = time.monotonic()
    try:
        call(body, metadata=creds(DEVICE), timeout=CALL_TIMEOUT_S)
    except grpc.RpcError as e:
        assert not _hung(e, t0), f"{method} hung for {CALL_TIMEOUT_S} s"
        _record(method.rsplit("/", 1)[1], e.code(), e.details())
        return e.code()
    _record(method.rsplit("/", 1)[1], grpc.StatusCode.OK)
    return grpc.StatusCode.OK


def watch(channel: grpc.Channel, body: bytes) -> None:
    """WatchPlan with `body`: the same outcome as GetPlan with those bytes (both messages share their
    fields), except that a watch that is up to date waits for the next plan set instead of answering."""
    get = channel.unary_unary("/splitsense.v1.PlanService/GetPlan")
    try:
        answer = get(body, metadata=creds(DEVICE), timeout=CALL_TIMEOUT_S)
        expected, up_to_date = grpc.StatusCode.OK, not pb.GetPlanResponse.FromString(answer).HasField("plan_set")
    except grpc.RpcError as e:
        expected, up_to_date = e.code(), False
    call = channel.unary_stream("/splitsense.v1.PlanService/WatchPlan")(
        body, metadata=creds(DEVICE), timeout=0.3 if up_to_date else CALL_TIMEOUT_S
    )
    try:
        first = next(call)
        code = grpc.StatusCode.OK
        assert pb.WatchPlanResponse.FromString(first).HasField("plan_set")
    except grpc.RpcError as e:
        code = e.code()
        if up_to_date and code == grpc.StatusCode.DEADLINE_EXCEEDED:
            code = grpc.StatusCode.OK  # waiting for a newer set is the answer
        assert code != grpc.StatusCode.DEADLINE_EXCEEDED, f"WatchPlan hung for {CALL_TIMEOUT_S} s"
    finally:
        call.cancel()
    _record("WatchPlan", code)
    assert code == expected, f"WatchPlan {code.name} but GetPlan {expected.name} for the same request"


def stream(channel: grpc.Channel, frames: list[bytes]) -> None:
    """OffloadStream with these frames: one answer per frame, each OK or an allowed WindowError."""
    call = channel.stream_stream("/splitsense.v1.OffloadService/OffloadStream")
    t0 = time.monotonic()
    try:
        answers = [
            pb.OffloadStreamResponse.FromString(a)
            for a in call(iter(frames), metadata=creds(DEVICE), timeout=CALL_TIMEOUT_S)
        ]
    except grpc.RpcError as e:
        assert not _hung(e, t0), f"OffloadStream hung for {CALL_TIMEOUT_S} s"
        _record("OffloadStream", e.code(), e.details())  # e.g. a frame over the receive limit
        return
    _record("OffloadStream", grpc.StatusCode.OK)
    assert len(answers) == len(frames), f"{len(frames)} windows sent, {len(answers)} answered"
    for a in answers:
        if a.WhichOneof("outcome") == "error":
            code = next(c for c in grpc.StatusCode if c.value[0] == a.error.code)
            _record("OffloadStream/window", code, a.error.message)
        else:
            assert a.WhichOneof("outcome") == "result", a
            _record("OffloadStream/window", grpc.StatusCode.OK)


def still_serving(channel: grpc.Channel, good: pb.OffloadRequest) -> None:
    resp = pb_grpc.OffloadServiceStub(channel).Offload(good, metadata=creds(DEVICE), timeout=CALL_TIMEOUT_S)
    assert resp.window_id == good.window_id and len(resp.logits) > 0
    assert health_status(channel) == SERVING


# --- the tests -----------------------------------------------------------------------------------

OFFLOAD = "/splitsense.v1.OffloadService/Offload"


def test_offload_requests_from_the_descriptor(
    channel: grpc.Channel, good: pb.OffloadRequest, hints: dict[str, st.SearchStrategy[Any]]
) -> None:
    d = pb.OffloadRequest.DESCRIPTOR

    @examples(0.3)
    @given(st.one_of(message_of(d, hints, base=good), message_of(d, hints)))
    def check(msg: pb.OffloadRequest) -> None:
        unary(channel, OFFLOAD, msg.SerializeToString())
        still_serving(channel, good)

    check()


def test_offload_stream_requests_from_the_descriptor(
    channel: grpc.Channel, good: pb.OffloadRequest, hints: dict[str, st.SearchStrategy[Any]]
) -> None:
    d = pb.OffloadStreamRequest.DESCRIPTOR
    window = st.one_of(
        message_of(d, hints, base=pb.OffloadStreamRequest(request=good)),
        message_of(d, hints),
    )

    @examples(0.2)
    @given(
        st.lists(
            st.one_of(
                window.map(lambda m: m.SerializeToString()),
                mutated(pb.OffloadStreamRequest(request=good).SerializeToString()),
            ),
            min_size=1,
            max_size=5,
        )
    )
    def check(frames: list[bytes]) -> None:
        stream(channel, frames)
        still_serving(channel, good)

    check()


def test_telemetry_reports_from_the_descriptor(
    channel: grpc.Channel, good: pb.OffloadRequest, hints: dict[str, st.SearchStrategy[Any]]
) -> None:
    d = pb.ReportTelemetryRequest.DESCRIPTOR
    base = pb.ReportTelemetryRequest(
        device_id=DEVICE,
        device_class="phone",
        estimates=good.estimates,
        plan_version=1,
        period_start_unix_ms=int(time.time() * 1000) - 10_000,
        period_end_unix_ms=int(time.time() * 1000),
        observations=[
            pb.TelemetryObservation(
                model="uci_har", cut=2, mode=pb.EXECUTION_MODE_OFFLOADED, window_count=3, latency_ms_total=30.0
            )
        ],
    )

    @examples(0.15)
    @given(st.one_of(message_of(d, hints, base=base), message_of(d, hints)))
    def check(msg: pb.ReportTelemetryRequest) -> None:
        unary(channel, "/splitsense.v1.OffloadService/ReportTelemetry", msg.SerializeToString())
        still_serving(channel, good)

    check()


def test_plan_requests_from_the_descriptor(
    channel: grpc.Channel, good: pb.OffloadRequest, hints: dict[str, st.SearchStrategy[Any]]
) -> None:
    get, watch_ = pb.GetPlanRequest.DESCRIPTOR, pb.WatchPlanRequest.DESCRIPTOR

    @examples(0.15)
    @given(st.one_of(message_of(get, hints), message_of(watch_, hints)))
    def check(msg: Message) -> None:
        if isinstance(msg, pb.GetPlanRequest):
            unary(channel, "/splitsense.v1.PlanService/GetPlan", msg.SerializeToString())
        else:
            watch(channel, msg.SerializeToString())
        still_serving(channel, good)

    check()


def test_mutated_bytes_of_good_requests(channel: grpc.Channel, good: pb.OffloadRequest) -> None:
    targets = {
        OFFLOAD: good.SerializeToString(),
        "/splitsense.v1.OffloadService/ReportTelemetry": pb.ReportTelemetryRequest(
            device_id=DEVICE, device_class="phone", plan_version=1
        ).SerializeToString(),
        "/splitsense.v1.PlanService/GetPlan": pb.GetPlanRequest(device_class="phone").SerializeToString(),
        "/splitsense.v1.PlanService/WatchPlan": pb.WatchPlanRequest(device_class="phone").SerializeToString(),
    }
    cases = st.one_of(*(st.tuples(st.just(m), mutated(b)) for m, b in targets.items()))

    @examples(0.2)
    @given(cases)
    def check(case: tuple[str, bytes]) -> None:
        method, body = case
        if method.endswith("/WatchPlan"):
            watch(channel, body)
        else:
            unary(channel, method, body)
        still_serving(channel, good)

    check()


@pytest.mark.parametrize(
    "method", ["/splitsense.v1.OffloadService/Nope", "/splitsense.v1.Nope/Offload", "/x", "/splitsense.v1.PlanService/"]
)
def test_unknown_methods_are_unimplemented(channel: grpc.Channel, good: pb.OffloadRequest, method: str) -> None:
    with pytest.raises(grpc.RpcError) as e:
        channel.unary_unary(method)(good.SerializeToString(), metadata=creds(DEVICE), timeout=CALL_TIMEOUT_S)
    assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
    still_serving(channel, good)
