"""cloud.intake: the quick way accepts a window only when the full way does, and decodes it alike.

Every message here is first sent once unchanged (the header is then known), then mutated one field
at a time: the intake must give exactly what `from_pb` + `validate_offload` give, the same array or
the same error, and take the quick way only for messages the full way accepts.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest

from cloud.backend import ModelInfo
from cloud.intake import Intake
from cloud.validation import validate_offload
from pipelines.codecs import Codec, EncodedTensor, encode
from splitsense.errors import ModelError, WireError
from splitsense.kinds import SymbolPrior
from splitsense.v1 import offload_pb2 as pb
from splitsense.wire import MAX_ID_CHARS, DeviceEstimates, OffloadRequest, RadioKind, from_pb, to_pb

PRIOR = SymbolPrior(low=-3, pmf=np.arange(1.0, 29.0).reshape(4, 7))
TOY = ModelInfo(
    name="toy",
    n_stages=3,
    num_classes=4,
    input_shape=(2, 8),
    activation_shapes=((2, 8), (4, 8), (16,), (4,)),
    symbol_priors=(None, PRIOR, None, None),
    front_digests=("a", "b", "c", "d"),
)
TWIN = ModelInfo(
    name="twin",
    n_stages=3,
    num_classes=2,
    input_shape=(2, 8),
    activation_shapes=((2, 8), (4, 8), (16,), (4,)),
    symbol_priors=(None, PRIOR, None, None),
    front_digests=("a", "b", "c", "d"),
)
MODELS = {"toy": TOY, "twin": TWIN}


def activation(codec: Codec, cut: int, seed: int = 0) -> EncodedTensor:
    rng = np.random.default_rng(seed)
    shape = (1, *TOY.activation_shapes[cut])
    if codec is Codec.ANS:
        return encode(rng.integers(PRIOR.low, PRIOR.high + 1, size=shape).astype(np.float32), codec, PRIOR)
    return encode(rng.standard_normal(shape).astype(np.float32), codec)


def message(codec: Codec = Codec.FP32, cut: int = 1, seed: int = 0, extra: tuple[str, ...] = ()) -> pb.OffloadRequest:
    req = OffloadRequest(
        window_id=f"w{seed}",
        model="toy",
        cut=cut,
        device_id="dev-1",
        device_class="phone",
        estimates=DeviceEstimates(
            bandwidth_mbps=5.0, rtt_ms=20.0, battery_fraction=0.8, on_battery=True, radio=RadioKind.WIFI
        ),
        plan_version=1,
        activation=activation(codec, cut, seed),
        sent_unix_ms=1,
        extra_models=extra,
    )
    msg = to_pb(req)
    assert isinstance(msg, pb.OffloadRequest)
    return msg


def full_way(msg: pb.OffloadRequest) -> np.ndarray | str:
    try:
        return validate_offload(from_pb(msg), MODELS).activation
    except (WireError, ModelError) as e:
        return f"{type(e).__name__}: {e}"


def intake_way(intake: Intake, msg: pb.OffloadRequest) -> np.ndarray | str:
    try:
        return intake.accept(msg).activation
    except (WireError, ModelError) as e:
        return f"{type(e).__name__}: {e}"


def set_field(path: str, value: object) -> Callable[[pb.OffloadRequest], None]:
    def mutate(msg: pb.OffloadRequest) -> None:
        *parents, name = path.split(".")
        target = msg
        for p in parents:
            target = getattr(target, p)
        if name == "shape":
            del target.shape[:]
            target.shape.extend(value)  # type: ignore[call-overload]
        else:
            setattr(target, name, value)

    return mutate


def clear(field: str) -> Callable[[pb.OffloadRequest], None]:
    return lambda msg: msg.ClearField(field)


def nan_payload(msg: pb.OffloadRequest) -> None:
    x = np.frombuffer(msg.activation.data, "<f4").copy()
    x[3] = np.nan
    msg.activation.data = x.tobytes()


MUTATIONS: dict[str, Callable[[pb.OffloadRequest], None]] = {
    "unchanged": lambda msg: None,
    "empty window id": set_field("window_id", ""),
    "long window id": set_field("window_id", "w" * (MAX_ID_CHARS + 1)),
    "longest window id": set_field("window_id", "w" * MAX_ID_CHARS),
    "negative plan version": set_field("plan_version", -1),
    "negative sent time": set_field("sent_unix_ms", -5),
    "a deadline": set_field("deadline_ms", 250),
    "no estimates": clear("estimates"),
    "NaN bandwidth": set_field("estimates.bandwidth_mbps", math.nan),
    "inf rtt": set_field("estimates.rtt_ms", math.inf),
    "negative rtt": set_field("estimates.rtt_ms", -1.0),
    "battery over 1": set_field("estimates.battery_fraction", 1.5),
    "plugged in": set_field("estimates.on_battery", False),
    "no radio": set_field("estimates.radio", pb.RADIO_KIND_UNSPECIFIED),
    "unknown radio": set_field("estimates.radio", 99),
    "no activation": clear("activation"),
    "short payload": lambda msg: set_field("activation.data", msg.activation.data[:-1])(msg),
    "empty payload": set_field("activation.data", b""),
    "NaN in payload": nan_payload,
    "other shape": set_field("activation.shape", [1, 8, 4]),
    "other cut": set_field("cut", 2),
    "cut past the model": set_field("cut", 3),
    "other model": set_field("model", "nope"),
    "other device": set_field("device_id", "dev-2"),
    "no device class": set_field("device_class", ""),
    "no codec": set_field("activation.codec", pb.CODEC_UNSPECIFIED),
    "int8 zero scale": set_field("activation.scale", 0.0),
    "int8 NaN scale": set_field("activation.scale", math.nan),
    "int8 zero point 256": set_field("activation.zero_point", 256),
    "other prior": set_field("activation.prior_digest", "0" * 16),
    "extra model": lambda msg: msg.extra_models.append("twin"),
    "extra model unknown": lambda msg: msg.extra_models.append("nope"),
    "extra model is the model": lambda msg: msg.extra_models.append("toy"),
}


@pytest.mark.parametrize("codec", list(Codec))
@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_the_intake_gives_what_the_full_checks_give(codec: Codec, mutation: str) -> None:
    intake = Intake(MODELS)
    first = message(codec, seed=0)
    assert isinstance(intake_way(intake, first), np.ndarray)  # the header is known from here on
    msg = message(codec, seed=1)
    MUTATIONS[mutation](msg)
    quick_before = intake.quick
    want, got = full_way(msg), intake_way(intake, msg)
    if isinstance(want, str):
        assert got == want
        assert intake.quick == quick_before  # an error always comes the full way
    else:
        assert isinstance(got, np.ndarray), got
        assert got.dtype == want.dtype and got.shape == want.shape and np.array_equal(got, want)
        assert got.flags.writeable


def test_a_known_header_takes_the_quick_way_and_an_error_never_does() -> None:
    intake = Intake(MODELS)
    for seed in range(5):
        intake.accept(message(seed=seed))
    assert (intake.full, intake.quick) == (1, 4)
    bad = message(seed=9)
    nan_payload(bad)
    with pytest.raises(WireError, match="finite"):
        intake.accept(bad)
    assert intake.quick == 4


def test_the_window_carries_the_link_estimates_as_metrics_record_them() -> None:
    intake = Intake(MODELS)
    for seed in range(2):  # the full way, then the quick way: the same figures
        w = intake.accept(message(seed=seed))
        assert w.bandwidth_bytes_per_s == 5.0 * 125_000
        assert w.rtt_s == pytest.approx(0.020)
        assert w.battery_fraction == pytest.approx(0.8)
    unplugged = message(seed=3)
    unplugged.estimates.on_battery = False
    assert intake.accept(unplugged).battery_fraction is None
    unknown = message(seed=4)
    unknown.ClearField("estimates")
    assert intake.accept(unknown).bandwidth_bytes_per_s is None


def test_extra_models_are_resolved_once_per_header() -> None:
    intake = Intake(MODELS)
    for seed in range(3):
        w = intake.accept(message(seed=seed, extra=("twin",)))
        assert [i.name for i in w.extra] == ["twin"]
    assert intake.quick == 2


def test_remembered_headers_are_bounded() -> None:
    intake = Intake(MODELS, max_headers=2)
    for device in ("a", "b", "c", "a"):
        msg = message()
        msg.device_id = device
        intake.accept(msg)
    assert intake.full == 4  # "a" was forgotten when "c" came
    assert len(intake._headers) == 2
