"""splitsense.wire and the generated splitsense.v1 code: round trips, malformed messages, style."""

from __future__ import annotations

import importlib.util
import math
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pipelines.codecs import Codec, EncodedTensor, decode, encode
from splitsense import wire
from splitsense.errors import WireError
from splitsense.kinds import SymbolPrior
from splitsense.plan import BatteryState, Objective, Plan, PlanRow, PlanSet
from splitsense.v1 import offload_pb2 as pb
from splitsense.wire import (
    DeviceEstimates,
    ExecutionMode,
    HeldFronts,
    OffloadRequest,
    OffloadResponse,
    RadioKind,
    TelemetryObservation,
    TelemetryReport,
    Timing,
    WindowError,
    from_pb,
    to_pb,
)

REPO = Path(__file__).resolve().parents[3]
PROTO = REPO / "proto" / "splitsense" / "v1" / "offload.proto"


# --- samples ----------------------------------------------------------------------------------


# The coding table of a (pretend) bottleneck with 3 channels and symbols -2..5.
PRIOR = SymbolPrior(low=-2, pmf=np.arange(1.0, 25.0).reshape(3, 8))


def tensor(codec: Codec = Codec.INT8) -> EncodedTensor:
    x = np.linspace(-2.0, 5.0, 2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    if codec is Codec.ANS:  # ans carries a quantised code: integers in the prior's range
        return encode(np.round(x), codec, PRIOR)
    return encode(x, codec)


def decoded(t: EncodedTensor) -> np.ndarray:
    return decode(t, PRIOR if t.codec is Codec.ANS else None)


def estimates(**kw: Any) -> DeviceEstimates:
    args: dict[str, Any] = dict(
        bandwidth_mbps=7.3, rtt_ms=41.5, battery_fraction=0.62, on_battery=True, radio=RadioKind.LTE
    )
    args.update(kw)
    return DeviceEstimates(**args)


def request(**kw: Any) -> OffloadRequest:
    args: dict[str, Any] = dict(
        window_id="w-000042",
        model="har_cnn",
        cut=3,
        device_id="phone-17",
        device_class="phone",
        estimates=estimates(),
        plan_version=12,
        activation=tensor(),
        sent_unix_ms=1_700_000_123_456,
        deadline_ms=250,
    )
    args.update(kw)
    return OffloadRequest(**args)


def response(**kw: Any) -> OffloadResponse:
    args: dict[str, Any] = dict(
        window_id="w-000042",
        logits=(0.5, -1.25, 3.0, 0.0),
        prediction=2,
        timing=Timing(queue_ms=1.5, compute_ms=3.75, batch_size=8),
    )
    args.update(kw)
    return OffloadResponse(**args)


def observation(**kw: Any) -> TelemetryObservation:
    args: dict[str, Any] = dict(
        model="har_cnn",
        cut=3,
        mode=ExecutionMode.FALLBACK,
        window_count=40,
        front_ms_total=88.0,
        latency_ms_total=1234.5,
        bytes_sent=40 * 1536,
        energy_mj=512.25,
        failure_count=3,
        stage_ms_total=(30.0, 28.0, 30.0, 12.5),
    )
    args.update(kw)
    return TelemetryObservation(**args)


def report(**kw: Any) -> TelemetryReport:
    args: dict[str, Any] = dict(
        device_id="phone-17",
        device_class="phone",
        estimates=estimates(radio=RadioKind.THREEG, on_battery=False),
        plan_version=12,
        period_start_unix_ms=1_700_000_000_000,
        period_end_unix_ms=1_700_000_010_000,
        observations=(
            observation(),
            observation(mode=ExecutionMode.OFFLOADED, failure_count=0, stage_ms_total=()),
        ),
    )
    args.update(kw)
    return TelemetryReport(**args)


def held(model: str = "har_cnn", fronts: tuple[tuple[int, float], ...] = ((3, 0.98), (0, 1.0), (3, 1.0))) -> HeldFronts:
    return HeldFronts(model, fronts)


def plan_set() -> PlanSet:
    def row(lo: float, hi: float, battery: BatteryState, cut: int, codec: Codec) -> PlanRow:
        return PlanRow(
            min_bandwidth_mbps=lo,
            max_bandwidth_mbps=hi,
            battery=battery,
            cut=cut,
            codec=codec,
            reason=f"cut {cut}: predicted 20 ms vs 31 ms local at {lo} Mbit/s",
            predicted_latency_ms=20.0,
            predicted_energy_mj=4.5,
            compression_energy_kept=0.95,
        )

    plan = Plan(
        model="har_cnn",
        device_class="phone",
        rows=(
            row(0, 2.5, BatteryState.NORMAL, 6, Codec.FP32),
            row(2.5, math.inf, BatteryState.NORMAL, 2, Codec.INT8),
            row(0, math.inf, BatteryState.LOW, 0, Codec.FP16),
        ),
        objective=Objective.ENERGY,
    )
    return PlanSet(version=3, plans=(plan,), created_unix_ms=1_700_000_000_000, reason="first plan")


SAMPLES: dict[str, Callable[[], Any]] = {
    "tensor_fp32": lambda: tensor(Codec.FP32),
    "tensor_fp16": lambda: tensor(Codec.FP16),
    "tensor_int8": lambda: tensor(Codec.INT8),
    "tensor_ans": lambda: tensor(Codec.ANS),
    "estimates": estimates,
    "request": request,
    "request_ans_ble": lambda: request(cut=1, activation=tensor(Codec.ANS), estimates=estimates(radio=RadioKind.BLE)),
    "request_unknown_estimates": lambda: request(estimates=None),
    "request_longest_strings": lambda: request(
        window_id="w" * wire.MAX_ID_CHARS,
        device_id="d" * wire.MAX_ID_CHARS,
        model="m" * wire.MAX_NAME_CHARS,
        device_class="c" * wire.MAX_NAME_CHARS,
        extra_models=tuple(f"{i}" * wire.MAX_NAME_CHARS for i in range(wire.MAX_EXTRA_MODELS)),
    ),
    "timing": lambda: Timing(queue_ms=0.0, compute_ms=2.0, batch_size=1),
    "response": response,
    "observation": observation,
    "report": report,
    "report_unknown_estimates": lambda: report(estimates=None),
    "report_with_held_fronts": lambda: report(held_fronts=(held(), held("fsdd_digit", ((6, 1.0),)))),
    "held_fronts": held,
    "plan_row": lambda: plan_set().plans[0].rows[1],
    "plan": lambda: plan_set().plans[0],
    "plan_set": plan_set,
}


# --- round trips ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SAMPLES)
def test_round_trip_through_message_and_bytes(name: str) -> None:
    x = SAMPLES[name]()
    msg = to_pb(x)
    assert from_pb(msg) == x
    again = type(msg).FromString(msg.SerializeToString())
    assert again == msg
    assert from_pb(again) == x


@pytest.mark.parametrize("codec", list(Codec))
def test_tensor_round_trip_decodes_to_the_same_numbers(codec: Codec) -> None:
    t = tensor(codec)
    back = wire.tensor_from_pb(pb.Tensor.FromString(wire.tensor_to_pb(t).SerializeToString()))
    assert back == t
    np.testing.assert_array_equal(decoded(back), decoded(t))
    assert back.prior_digest == (PRIOR.digest if codec is Codec.ANS else "")


def test_to_pb_maps_every_field() -> None:
    msg = to_pb(request())
    assert msg.activation.codec == pb.CODEC_INT8
    assert list(msg.activation.shape) == [2, 3, 4]
    assert msg.estimates.radio == pb.RADIO_KIND_LTE
    row = to_pb(plan_set()).plans[0].rows[1]
    assert (row.battery, row.codec, row.max_bandwidth_mbps) == (
        pb.BATTERY_STATE_NORMAL,
        pb.CODEC_INT8,
        math.inf,
    )
    assert to_pb(report()).observations[0].mode == pb.EXECUTION_MODE_FALLBACK
    assert to_pb(report()).estimates.radio == pb.RADIO_KIND_3G
    assert msg.activation.prior_digest == ""
    ans = to_pb(request(activation=tensor(Codec.ANS), estimates=estimates(radio=RadioKind.BLE)))
    assert ans.activation.codec == pb.CODEC_ANS and ans.activation.prior_digest == PRIOR.digest
    assert ans.activation.data == tensor(Codec.ANS).data and len(ans.activation.data) % 4 == 0
    assert ans.estimates.radio == pb.RADIO_KIND_BLE


def test_stream_request_round_trip() -> None:
    msg = wire.stream_request_to_pb(request())
    assert isinstance(msg, pb.OffloadStreamRequest)
    assert wire.stream_request_from_pb(pb.OffloadStreamRequest.FromString(msg.SerializeToString())) == request()


@pytest.mark.parametrize(
    "outcome",
    [response(), WindowError(window_id="w-000042", code=8, message="broker is shedding", retry_after_ms=500)],
    ids=["result", "error"],
)
def test_stream_response_round_trip(outcome: OffloadResponse | WindowError) -> None:
    msg = wire.stream_response_to_pb(outcome)
    assert msg.window_id == "w-000042"
    assert msg.WhichOneof("outcome") == ("result" if isinstance(outcome, OffloadResponse) else "error")
    assert wire.stream_response_from_pb(pb.OffloadStreamResponse.FromString(msg.SerializeToString())) == outcome


def test_enum_tables_cover_both_sides() -> None:
    tables: list[tuple[Any, Any, Any]] = [
        (wire._CODEC, Codec, pb.Codec),
        (wire._RADIO, RadioKind, pb.RadioKind),
        (wire._BATTERY, BatteryState, pb.BatteryState),
        (wire._OBJECTIVE, Objective, pb.Objective),
        (wire._MODE, ExecutionMode, pb.ExecutionMode),
    ]
    for table, ours, theirs in tables:
        assert set(table.to_wire) == set(ours)
        assert set(table.from_wire) == {v for v in theirs.values() if v != 0}


# --- malformed messages -----------------------------------------------------------------------


def _set(path: str, value: Any) -> Callable[[Any], None]:
    """A mutation that sets a dotted field path (with [i] indices) of a message to value."""

    def mutate(msg: Any) -> None:
        *parents, last = re.findall(r"\w+|\[\d+\]", path)
        for part in parents:
            msg = msg[int(part[1:-1])] if part.startswith("[") else getattr(msg, part)
        if last.startswith("["):
            msg[int(last[1:-1])] = value
        else:
            setattr(msg, last, value)

    return mutate


def _clear(field: str) -> Callable[[Any], None]:
    return lambda msg: msg.ClearField(field)


@pytest.mark.parametrize(
    ("mutate", "field", "expected"),
    [
        (_set("activation.codec", pb.CODEC_UNSPECIFIED), "activation.codec", "got CODEC_UNSPECIFIED (0)"),
        (_set("activation.codec", 17), "activation.codec", "got unknown value 17"),
        (_set("activation.shape[1]", -3), "activation.shape", "expected dimensions >= 0, got [2, -3, 4]"),
        (_set("activation.data", b"\x00" * 5), "activation", "payload is 5 bytes"),
        (_set("activation.scale", 0.0), "activation", "int8 scale must be a finite number > 0"),
        (_set("activation.codec", pb.CODEC_ANS), "activation", "must name the symbol prior it was coded with"),
        (_clear("activation"), "activation", "expected a Tensor message, got none"),
        (_set("estimates.radio", 0), "estimates.radio", "expected one of RADIO_KIND_WIFI"),
        (_set("estimates.battery_fraction", 1.5), "estimates.battery_fraction", "in [0.0, 1.0], got 1.5"),
        (_set("estimates.bandwidth_mbps", math.nan), "estimates.bandwidth_mbps", "got nan"),
        (_set("window_id", ""), "window_id", "expected a non-empty string"),
        (_set("model", ""), "model", "expected a non-empty string"),
        (_set("plan_version", -1), "plan_version", "got -1"),
    ],
)
def test_malformed_request_names_the_field(mutate: Callable, field: str, expected: str) -> None:
    msg = to_pb(request())
    mutate(msg)
    with pytest.raises(WireError) as info:
        from_pb(msg)
    text = str(info.value)
    assert text.startswith(f"OffloadRequest.{field}: "), text
    assert expected in text, text


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (_set("activation.prior_digest", ""), "must name the symbol prior it was coded with (prior_digest)"),
        (_set("activation.data", b"\x01" * 6), "ans payload is 6 bytes, not a whole number of 4-byte words"),
    ],
)
def test_malformed_ans_activation_names_the_field(mutate: Callable, expected: str) -> None:
    msg = to_pb(request(activation=tensor(Codec.ANS)))
    mutate(msg)
    with pytest.raises(WireError) as info:
        from_pb(msg)
    text = str(info.value)
    assert text.startswith("OffloadRequest.activation: "), text
    assert expected in text, text


def test_ans_prior_digest_is_carried_not_judged_by_the_wire() -> None:
    # The wire checks the payload's framing only; whether the digest is the broker's own prior is
    # the broker's validation (cloud.validation), which knows the model.
    msg = to_pb(request(activation=tensor(Codec.ANS)))
    msg.activation.prior_digest = "0000000000000000"
    back = from_pb(msg)
    assert back.activation.prior_digest == "0000000000000000" and back.activation.codec is Codec.ANS


def test_malformed_stream_request_names_the_path() -> None:
    with pytest.raises(WireError, match=r"^OffloadStreamRequest\.request: expected"):
        wire.stream_request_from_pb(pb.OffloadStreamRequest())
    msg = wire.stream_request_to_pb(request())
    msg.request.activation.codec = pb.CODEC_UNSPECIFIED
    with pytest.raises(WireError, match=r"^OffloadStreamRequest\.request\.activation\.codec:"):
        wire.stream_request_from_pb(msg)


def test_malformed_responses_name_the_field() -> None:
    msg = to_pb(response())
    msg.prediction = 4  # only 4 logits
    with pytest.raises(WireError, match=r"^OffloadResponse\.prediction: expected an int in \[0, 3\]"):
        from_pb(msg)
    msg = to_pb(response())
    msg.ClearField("timing")
    with pytest.raises(WireError, match=r"^OffloadResponse\.timing:"):
        from_pb(msg)
    msg = to_pb(response())
    del msg.logits[:]
    with pytest.raises(WireError, match=r"^OffloadResponse\.logits: expected at least one logit"):
        from_pb(msg)


def test_malformed_stream_responses_name_the_field() -> None:
    with pytest.raises(WireError, match=r"^OffloadStreamResponse\.outcome: expected a result or an error"):
        wire.stream_response_from_pb(pb.OffloadStreamResponse(window_id="w-1"))
    with pytest.raises(WireError, match=r"^OffloadStreamResponse\.window_id"):
        wire.stream_response_from_pb(pb.OffloadStreamResponse(error=pb.WindowError(code=14)))
    with pytest.raises(WireError, match=r"^OffloadStreamResponse\.error\.code: expected an int in \[1, 16\]"):
        wire.stream_response_from_pb(pb.OffloadStreamResponse(window_id="w-1", error=pb.WindowError(code=0)))
    other = wire.stream_response_to_pb(response(window_id="w-2"))
    other.window_id = "w-1"
    with pytest.raises(WireError, match=r"^OffloadStreamResponse\.result\.window_id: .*'w-1'"):
        wire.stream_response_from_pb(other)


def test_malformed_telemetry_names_the_field() -> None:
    msg = to_pb(report())
    msg.observations[1].mode = pb.EXECUTION_MODE_UNSPECIFIED
    with pytest.raises(WireError, match=r"^ReportTelemetryRequest\.observations\[1\]\.mode: .*UNSPECIFIED"):
        from_pb(msg)
    msg = to_pb(report())
    msg.period_end_unix_ms = msg.period_start_unix_ms - 1
    with pytest.raises(WireError, match=r"^ReportTelemetryRequest\.period_end_unix_ms:"):
        from_pb(msg)
    msg = to_pb(report())
    msg.device_id = ""
    with pytest.raises(WireError, match=r"^ReportTelemetryRequest\.device_id:"):
        from_pb(msg)


@pytest.mark.parametrize(
    ("mutate", "field", "expected"),
    [
        (_set("plans[0].rows[2].battery", 0), ".plans[0].rows[2].battery", "got BATTERY_STATE_UNSPECIFIED"),
        (_set("plans[0].rows[0].codec", 0), ".plans[0].rows[0].codec", "expected one of CODEC_FP32"),
        (_set("plans[0].objective", 0), ".plans[0].objective", "got OBJECTIVE_UNSPECIFIED (0)"),
        (_set("plans[0].rows[0].compression_energy_kept", 0.0), ".plans[0].rows[0]", "in (0, 1]"),
        (_set("plans[0].rows[1].min_bandwidth_mbps", 3.0), ".plans[0]", "gap"),
        (_set("version", 0), "", "PlanSet.version must be an int >= 1"),
    ],
)
def test_malformed_plan_set_names_the_field(mutate: Callable, field: str, expected: str) -> None:
    msg = to_pb(plan_set())
    mutate(msg)
    with pytest.raises(WireError) as info:
        from_pb(msg)
    text = str(info.value)
    assert text.startswith(f"PlanSet{field}: "), text
    assert expected in text, text


# --- what a third-party device may send (issue 10: limits, optional estimates) ------------------

ID, NAME = wire.MAX_ID_CHARS, wire.MAX_NAME_CHARS


def _append(field: str, *values: Any) -> Callable[[Any], None]:
    return lambda msg: getattr(msg, field).extend(values)


@pytest.mark.parametrize(
    ("build", "mutate", "path", "expected"),
    [
        (lambda: to_pb(request()), _set("window_id", "w" * 100_000), "OffloadRequest.window_id", f"{ID} characters"),
        (lambda: to_pb(request()), _set("device_id", "d" * (ID + 1)), "OffloadRequest.device_id", f"{ID} characters"),
        (lambda: to_pb(request()), _set("model", "m" * (NAME + 1)), "OffloadRequest.model", f"{NAME} characters"),
        (
            lambda: to_pb(request()),
            _set("device_class", "c" * (NAME + 1)),
            "OffloadRequest.device_class",
            f"{NAME} characters",
        ),
        (
            lambda: to_pb(request()),
            _append("extra_models", "ok", "x" * 100_000),
            "OffloadRequest.extra_models",
            f"names of at most {NAME} characters, got 100000 at index 1",
        ),
        (
            lambda: to_pb(request()),
            _append("extra_models", *(f"m{i}" for i in range(wire.MAX_EXTRA_MODELS + 1))),
            "OffloadRequest.extra_models",
            f"at most {wire.MAX_EXTRA_MODELS} names, got {wire.MAX_EXTRA_MODELS + 1}",
        ),
        (
            lambda: to_pb(request(activation=tensor(Codec.ANS))),
            _set("activation.prior_digest", "0" * 100_000),
            "OffloadRequest.activation.prior_digest",
            f"{NAME} characters",
        ),
        (lambda: to_pb(report()), _set("device_id", "d" * (ID + 1)), "ReportTelemetryRequest.device_id", "characters"),
        (
            lambda: to_pb(report()),
            _set("device_class", "c" * (NAME + 1)),
            "ReportTelemetryRequest.device_class",
            "characters",
        ),
        (
            lambda: to_pb(report()),
            _set("observations[1].model", "m" * (NAME + 1)),
            "ReportTelemetryRequest.observations[1].model",
            f"{NAME} characters",
        ),
    ],
)
def test_every_string_a_device_sends_has_a_limit(build: Callable, mutate: Callable, path: str, expected: str) -> None:
    msg = build()
    mutate(msg)
    with pytest.raises(WireError) as info:
        from_pb(msg)
    text = str(info.value)
    assert text.startswith(f"{path}: expected "), text
    assert expected in text, text
    assert len(text) < 200, "the refused value must not be echoed"


def test_strings_at_the_limit_are_accepted() -> None:
    x = SAMPLES["request_longest_strings"]()
    assert from_pb(to_pb(x)) == x
    assert len(x.window_id) == 128 and len(x.model) == 64


@pytest.mark.parametrize("cls", [pb.GetPlanRequest, pb.WatchPlanRequest])
def test_plan_requests_are_checked(cls: Any) -> None:
    name = cls.DESCRIPTOR.name
    q = wire.plan_request_from_pb(cls(device_class="phone", models=["har_cnn"], known_version=3))
    assert q == wire.PlanRequest(device_class="phone", models=("har_cnn",), known_version=3)
    bad = [
        (cls(), f"{name}.device_class: expected a non-empty string, got ''"),
        (cls(device_class="c" * 100_000), f"{name}.device_class: expected at most {NAME} characters, got 100000"),
        (cls(device_class="phone", models=["m" * (NAME + 1)]), f"{name}.models: expected names of at most {NAME}"),
        (cls(device_class="phone", models=[""]), f"{name}.models: expected non-empty model names"),
        (
            cls(device_class="phone", models=[f"m{i}" for i in range(wire.MAX_PLAN_MODELS + 1)]),
            f"{name}.models: expected at most {wire.MAX_PLAN_MODELS} names",
        ),
        (cls(device_class="phone", known_version=-1), f"{name}.known_version: expected an int in [0, "),
    ]
    for msg, expected in bad:
        with pytest.raises(WireError) as info:
            wire.plan_request_from_pb(msg)
        assert str(info.value).startswith(expected), str(info.value)
    with pytest.raises(WireError, match="expected a splitsense.v1.GetPlanRequest or WatchPlanRequest"):
        wire.plan_request_from_pb(pb.Timing())  # type: ignore[arg-type]


@pytest.mark.parametrize("build", [lambda: to_pb(request()), lambda: to_pb(report())], ids=["request", "report"])
def test_missing_estimates_mean_unknown_not_an_error(build: Callable) -> None:
    # proto3 makes every message field optional: a third-party client may leave estimates out.
    msg = build()
    msg.ClearField("estimates")
    back = from_pb(type(msg).FromString(msg.SerializeToString()))
    assert back.estimates is None
    assert not to_pb(back).HasField("estimates")  # and None goes out as unset, not as zeros


def test_a_present_estimates_message_is_still_checked() -> None:
    msg = to_pb(request())
    msg.estimates.radio = pb.RADIO_KIND_UNSPECIFIED
    with pytest.raises(WireError, match=r"^OffloadRequest\.estimates\.radio: expected one of"):
        from_pb(msg)


def test_dataclasses_check_their_values_when_built() -> None:
    with pytest.raises(WireError, match=r"^DeviceEstimates\.rtt_ms: expected a number"):
        estimates(rtt_ms=-1.0)
    with pytest.raises(WireError, match=r"^DeviceEstimates\.radio: expected one of 'wifi', 'lte', '3g', 'ble'"):
        estimates(radio="5g")
    with pytest.raises(WireError, match=r"^OffloadRequest\.cut:"):
        request(cut=-1)
    with pytest.raises(WireError, match=r"^OffloadRequest\.activation: expected a pipelines.codecs.EncodedTensor"):
        request(activation=np.zeros(3))
    with pytest.raises(WireError, match=r"^TelemetryObservation\.stage_ms_total:"):
        observation(stage_ms_total=(1.0, math.inf))
    assert estimates(radio="wifi").radio is RadioKind.WIFI


def test_unknown_types_are_refused() -> None:
    with pytest.raises(WireError, match="to_pb: no wire message for dict"):
        to_pb({})  # type: ignore[call-overload]
    with pytest.raises(WireError, match="from_pb: no dataclass for GetPlanRequest"):
        from_pb(pb.GetPlanRequest())  # type: ignore[call-overload]
    with pytest.raises(WireError, match="expected a splitsense.v1.Tensor"):
        wire.tensor_from_pb(pb.Timing())  # type: ignore[arg-type]


# --- the generated code and the contract's style ----------------------------------------------


def test_generated_modules_live_in_our_package() -> None:
    import splitsense.v1.offload_pb2 as gen
    import splitsense.v1.offload_pb2_grpc as gen_grpc

    assert Path(gen.__file__).resolve().parent == REPO / "splitsense" / "v1"
    assert gen.DESCRIPTOR.package == "splitsense.v1"
    assert hasattr(gen_grpc, "OffloadServiceStub") and hasattr(gen_grpc, "PlanServiceServicer")
    for suffix in ("offload_pb2.pyi", "offload_pb2_grpc.pyi", "__init__.py"):
        assert (REPO / "splitsense" / "v1" / suffix).is_file()


def test_no_top_level_proto_package_of_ours() -> None:
    # proto-plus (installed by ray[serve]) owns the import name `proto`.
    assert not (REPO / "proto" / "__init__.py").exists()
    assert not list((REPO / "proto").rglob("*.py"))
    spec = importlib.util.find_spec("proto")
    if spec is not None and spec.origin is not None:  # a regular package (proto-plus): not ours
        assert REPO / "proto" not in Path(spec.origin).resolve().parents


def test_contract_follows_buf_style() -> None:
    fd = pb.DESCRIPTOR
    assert fd.name == "splitsense/v1/offload.proto"
    for name, enum in fd.enum_types_by_name.items():
        prefix = re.sub(r"(?<!^)(?=[A-Z])", "_", name).upper() + "_"
        assert enum.values_by_number[0].name == prefix + "UNSPECIFIED"
        assert all(v.name.startswith(prefix) for v in enum.values)
    for service in fd.services_by_name.values():
        assert service.name.endswith("Service")
        for method in service.methods:
            assert method.input_type.name == method.name + "Request"
            assert method.output_type.name == method.name + "Response"
    rpcs = {s.name: [m.name for m in s.methods] for s in fd.services_by_name.values()}
    assert rpcs == {
        "OffloadService": ["Offload", "OffloadStream", "ReportTelemetry"],
        "PlanService": ["GetPlan", "WatchPlan"],
    }


def test_every_declaration_has_a_comment_above_it() -> None:
    lines = PROTO.read_text().splitlines()
    decl = re.compile(r"^\s*(message|enum|service|rpc|oneof)\s|^\s*(repeated\s+)?[\w.]+\s+\w+\s*=\s*\d+;")
    missing = [
        f"{i + 1}: {line.strip()}"
        for i, line in enumerate(lines)
        if decl.match(line) and not lines[i - 1].strip().startswith("//")
    ]
    assert not missing, "declarations without a comment above them:\n" + "\n".join(missing)
    assert "pickle" not in PROTO.read_text().replace("No field ever carries pickled data", "")


@pytest.mark.skipif(
    importlib.util.find_spec("grpc_tools") is None or shutil.which("bash") is None,
    reason="needs grpcio-tools (pip install 'splitsense[dev]')",
)
def test_committed_generated_code_matches_the_proto() -> None:
    result = subprocess.run(
        ["bash", str(REPO / "scripts" / "check_proto.sh")], capture_output=True, text=True, cwd=REPO
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_wire_module_does_not_import_grpc() -> None:
    code = "import sys, splitsense.wire; assert not [m for m in sys.modules if m.split('.')[0] == 'grpc']"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, env=env)


def test_fallback_kinds_round_trip_sorted_and_bounded() -> None:
    from splitsense.wire import (
        MAX_FALLBACK_KINDS,
        ExecutionMode,
        TelemetryObservation,
        _observation_from_pb,
        _observation_to_pb,
    )

    o = TelemetryObservation(
        model="m", cut=0, mode=ExecutionMode.FALLBACK, window_count=5, front_ms_total=1.0,
        latency_ms_total=2.0, bytes_sent=0, energy_mj=1.0, failure_count=5,
        fallback_kinds=(("late", 3), ("breaker", 2)),
    )  # fmt: skip
    assert o.fallback_kinds == (("breaker", 2), ("late", 3))
    assert _observation_from_pb(_observation_to_pb(o)) == o
    too_many = tuple((f"k{i}", 1) for i in range(MAX_FALLBACK_KINDS + 1))
    with pytest.raises(WireError, match="fallback_kinds"):
        TelemetryObservation(**{**o.__dict__, "fallback_kinds": too_many})
    with pytest.raises(WireError, match="fallback_kinds"):
        TelemetryObservation(**{**o.__dict__, "fallback_kinds": (("late", -1),)})


def test_held_fronts_are_sorted_distinct_and_bounded() -> None:
    h = held()
    assert h.fronts == ((0, 1.0), (3, 1.0), (3, 0.98))  # cut ascending, level from 1.0 down
    assert h.holds(3, 0.98) and h.holds(0, 1.0) and not h.holds(3, 0.99) and not h.holds(6, 1.0)
    assert HeldFronts("m", ()).holds(0, 1.0)  # cut 0 runs no stage: implied
    msg = to_pb(report(held_fronts=(h,)))
    assert [(f.cut, f.compression_energy_kept) for f in msg.held_fronts[0].fronts] == [(0, 1.0), (3, 1.0), (3, 0.98)]
    assert from_pb(to_pb(report())).held_fronts == ()  # a device that does not say: unknown
    bad: list[tuple[Callable[[], Any], str]] = [
        (
            lambda: HeldFronts("m", ((1, 1.0), (1, 1.0))),
            r"^HeldFronts\.fronts\[1\]: expected each \(cut, level\) at most once",
        ),
        (
            lambda: HeldFronts("m", ((1, 0.0),)),
            r"^HeldFronts\.fronts\[0\]\.compression_energy_kept: expected a level in \(0, 1\]",
        ),
        (
            lambda: HeldFronts("m", ((1, 1.5),)),
            r"^HeldFronts\.fronts\[0\]\.compression_energy_kept: expected a number in",
        ),
        (lambda: HeldFronts("m", ((-1, 1.0),)), r"^HeldFronts\.fronts\[0\]\.cut: expected an int"),
        (lambda: HeldFronts("m", ((1, math.nan),)), r"^HeldFronts\.fronts\[0\]\.compression_energy_kept"),
        (lambda: HeldFronts("", ()), r"^HeldFronts\.model: expected a non-empty string"),
        (
            lambda: HeldFronts("m" * (wire.MAX_NAME_CHARS + 1), ()),
            r"^HeldFronts\.model: expected at most 64 characters",
        ),
        (
            lambda: HeldFronts("m", tuple((1, (i + 1) / 1000) for i in range(wire.MAX_FRONTS_PER_MODEL + 1))),
            rf"^HeldFronts\.fronts: expected at most {wire.MAX_FRONTS_PER_MODEL} fronts",
        ),
        (
            lambda: report(held_fronts=(held(), held())),
            r"^TelemetryReport\.held_fronts: expected each model at most once",
        ),
        (
            lambda: report(held_fronts=tuple(held(f"m{i}") for i in range(wire.MAX_HELD_MODELS + 1))),
            rf"^TelemetryReport\.held_fronts: expected at most {wire.MAX_HELD_MODELS} models",
        ),
        (lambda: report(held_fronts=("m",)), r"^TelemetryReport\.held_fronts: expected HeldFronts items"),
    ]
    for build, expected in bad:
        with pytest.raises(WireError, match=expected):
            build()
    at_limit = HeldFronts("m", tuple((1, (i + 1) / 1000) for i in range(wire.MAX_FRONTS_PER_MODEL)))
    assert from_pb(to_pb(at_limit)) == at_limit


def test_malformed_held_fronts_on_the_wire_name_the_field() -> None:
    msg = to_pb(report(held_fronts=(held(), held("fsdd_digit"))))
    msg.held_fronts[1].fronts[2].compression_energy_kept = -0.5
    with pytest.raises(
        WireError, match=r"^ReportTelemetryRequest\.held_fronts\[1\]\.fronts\[2\]\.compression_energy_kept: "
    ):
        from_pb(msg)
    msg = to_pb(report(held_fronts=(held(),)))
    msg.held_fronts[0].model = "m" * 100_000
    with pytest.raises(WireError) as info:
        from_pb(msg)
    assert str(info.value).startswith("ReportTelemetryRequest.held_fronts[0].model: expected at most 64 characters")
    assert len(str(info.value)) < 200  # the value is not echoed
    msg = to_pb(report())
    for _ in range(wire.MAX_FRONTS_PER_MODEL + 1):
        msg.held_fronts.add(model="m")
    with pytest.raises(
        WireError, match=rf"^ReportTelemetryRequest\.held_fronts: expected at most {wire.MAX_HELD_MODELS} models"
    ):
        from_pb(msg)
    msg = to_pb(report(held_fronts=(held(),)))
    for _ in range(wire.MAX_FRONTS_PER_MODEL):
        msg.held_fronts[0].fronts.add(cut=1, compression_energy_kept=0.5)
    with pytest.raises(WireError, match=r"^ReportTelemetryRequest\.held_fronts\[0\]\.fronts: expected at most"):
        from_pb(msg)
