"""cloud.validation: every field of an offload request checked against a (toy) model's profile."""

from __future__ import annotations

import numpy as np
import pytest

from cloud.backend import ModelInfo, TailUnavailableError
from cloud.validation import check_logits, validate_offload
from pipelines.codecs import Codec, EncodedTensor, encode
from splitsense.errors import ModelError, NonFiniteOutputError, WireError
from splitsense.kinds import SymbolPrior
from splitsense.wire import DeviceEstimates, OffloadRequest, RadioKind

# Cut 1 of the toy is a bottleneck: a quantised code of 4 channels with symbols -3..3.
PRIOR = SymbolPrior(low=-3, pmf=np.arange(1.0, 29.0).reshape(4, 7))
TOY = ModelInfo(
    name="toy",
    n_stages=3,
    num_classes=4,
    input_shape=(2, 8),
    activation_shapes=((2, 8), (4, 8), (16,), (4,)),
    symbol_priors=(None, PRIOR, None, None),
)
MODELS = {"toy": TOY}


def request(activation: EncodedTensor, *, model: str = "toy", cut: int = 1) -> OffloadRequest:
    return OffloadRequest(
        window_id="w1",
        model=model,
        cut=cut,
        device_id="dev-1",
        device_class="phone",
        estimates=DeviceEstimates(
            bandwidth_mbps=5.0, rtt_ms=20.0, battery_fraction=0.8, on_battery=True, radio=RadioKind.WIFI
        ),
        plan_version=1,
        activation=activation,
        sent_unix_ms=1,
    )


def code(seed: int = 0) -> np.ndarray:
    """A quantised code as the toy's bottleneck (cut 1) emits it: integers in the prior's range."""
    rng = np.random.default_rng(seed)
    return rng.integers(PRIOR.low, PRIOR.high + 1, size=(1, *TOY.activation_shapes[1])).astype(np.float32)


def act(cut: int = 1, codec: Codec = Codec.FP32, seed: int = 0) -> EncodedTensor:
    if codec is Codec.ANS:
        return encode(code(seed), codec, TOY.symbol_prior(cut))
    x = np.random.default_rng(seed).standard_normal((1, *TOY.activation_shapes[cut])).astype(np.float32)
    return encode(x, codec)


FIXED_SIZE_CODECS = [c for c in Codec if c.fixed_size]


@pytest.mark.parametrize(("codec", "cut"), [(c, k) for c in FIXED_SIZE_CODECS for k in (0, 1, 2)] + [(Codec.ANS, 1)])
def test_valid_request_is_decoded(codec: Codec, cut: int) -> None:
    t = act(cut, codec)
    v = validate_offload(request(t, cut=cut), MODELS)
    assert v.info is TOY
    assert v.activation.dtype == np.float32
    assert v.activation.shape == (1, *TOY.activation_shapes[cut])
    assert np.isfinite(v.activation).all()


def test_ans_at_the_bottleneck_decodes_exactly() -> None:
    x = code(seed=3)
    t = encode(x, Codec.ANS, PRIOR)
    assert t.prior_digest == PRIOR.digest
    v = validate_offload(request(t, cut=1), MODELS)
    assert np.array_equal(v.activation, x)


@pytest.mark.parametrize("cut", [0, 2])
def test_ans_at_a_plain_cut_names_the_codec(cut: int) -> None:
    # A well-formed ans payload (coded against some prior of the right width) sent at a cut whose
    # activation is not a quantised code: the broker holds no prior there and refuses.
    shape = (1, *TOY.activation_shapes[cut])
    other = SymbolPrior(low=-3, pmf=np.ones((shape[1], 7)))
    t = encode(np.zeros(shape, dtype=np.float32), Codec.ANS, other)
    with pytest.raises(WireError) as e:
        validate_offload(request(t, cut=cut), MODELS)
    msg = str(e.value)
    assert msg.startswith("OffloadRequest.activation.codec:")
    assert f"cut {cut}" in msg and "'toy'" in msg and "plain activation" in msg


def test_ans_with_another_prior_names_the_prior_digest() -> None:
    other = SymbolPrior(low=-3, pmf=np.ones((4, 7)))  # same shape, another table: other weights
    assert other.digest != PRIOR.digest
    t = encode(code(), Codec.ANS, other)
    with pytest.raises(WireError) as e:
        validate_offload(request(t, cut=1), MODELS)
    msg = str(e.value)
    assert msg.startswith("OffloadRequest.activation.prior_digest:")
    assert PRIOR.digest in msg and other.digest in msg
    # a payload that names no prior at all is refused the same way
    blank = EncodedTensor(Codec.ANS, t.shape, t.data)
    with pytest.raises(WireError, match=r"^OffloadRequest\.activation\.prior_digest:"):
        validate_offload(request(blank, cut=1), MODELS)


def test_ans_truncated_payload_names_the_data() -> None:
    t = act(codec=Codec.ANS)
    cut_short = EncodedTensor(Codec.ANS, t.shape, t.data[:-4], prior_digest=t.prior_digest)
    with pytest.raises(WireError, match=r"^OffloadRequest\.activation\.data: .*ans payload"):
        validate_offload(request(cut_short, cut=1), MODELS)
    ragged = EncodedTensor(Codec.ANS, t.shape, t.data[:-1], prior_digest=t.prior_digest)
    with pytest.raises(WireError, match=r"^OffloadRequest\.activation\.data: .*whole number of 4-byte words"):
        validate_offload(request(ragged, cut=1), MODELS)


def test_fp32_decodes_exactly() -> None:
    x = np.arange(32, dtype=np.float32).reshape(1, 4, 8) / 7
    v = validate_offload(request(encode(x, Codec.FP32)), MODELS)
    assert np.array_equal(v.activation, x)


def test_unknown_model_is_model_error_naming_the_field_and_served_models() -> None:
    with pytest.raises(ModelError) as e:
        validate_offload(request(act(), model="nope"), MODELS)
    msg = str(e.value)
    assert msg.startswith("OffloadRequest.model:")
    assert "'toy'" in msg and "'nope'" in msg


@pytest.mark.parametrize("cut", [3, 4, 1000])
def test_cut_out_of_range_names_the_field_and_the_range(cut: int) -> None:
    with pytest.raises(WireError) as e:
        validate_offload(request(act(), cut=cut), MODELS)
    msg = str(e.value)
    assert msg.startswith("OffloadRequest.cut:")
    assert "0..2" in msg and f"got {cut}" in msg
    if cut == 3:
        assert "never offloaded" in msg


def test_wrong_shape_says_what_was_expected() -> None:
    t = act(cut=2)  # (1, 16) sent as if it were cut 1's (1, 4, 8)
    with pytest.raises(WireError) as e:
        validate_offload(request(t, cut=1), MODELS)
    msg = str(e.value)
    assert msg.startswith("OffloadRequest.activation.shape:")
    assert "[1, 4, 8]" in msg and "[1, 16]" in msg and "cut 1" in msg


def test_missing_batch_dimension_is_a_shape_error() -> None:
    x = np.zeros((4, 8), dtype=np.float32)
    with pytest.raises(WireError, match=r"^OffloadRequest\.activation\.shape: expected \[1, 4, 8\]"):
        validate_offload(request(encode(x, Codec.FP32)), MODELS)


def test_batch_of_two_is_rejected() -> None:
    x = np.zeros((2, 4, 8), dtype=np.float32)
    with pytest.raises(WireError, match=r"activation\.shape"):
        validate_offload(request(encode(x, Codec.FP32)), MODELS)


def test_codec_not_accepted() -> None:
    with pytest.raises(WireError) as e:
        validate_offload(request(act(codec=Codec.INT8)), MODELS, accepted_codecs={Codec.FP32, Codec.FP16})
    msg = str(e.value)
    assert msg.startswith("OffloadRequest.activation.codec:")
    assert "fp32, fp16" in msg and "got int8" in msg


def test_codec_mismatch_with_payload_size_names_the_data() -> None:
    good = act()  # fp32 bytes
    lying = EncodedTensor(Codec.FP16, good.shape, good.data)  # says fp16: twice too many bytes
    with pytest.raises(WireError) as e:
        validate_offload(request(lying), MODELS)
    msg = str(e.value)
    assert msg.startswith("OffloadRequest.activation.data:")
    assert "fp16 payload is 128 bytes" in msg and "needs 64" in msg


def test_truncated_payload() -> None:
    good = act()
    with pytest.raises(WireError, match=r"^OffloadRequest\.activation\.data: fp32 payload is 124 bytes"):
        validate_offload(request(EncodedTensor(Codec.FP32, good.shape, good.data[:-4])), MODELS)


def test_nan_payload_is_counted() -> None:
    x = np.zeros((1, 4, 8), dtype=np.float32)
    x[0, 0, :3] = np.nan
    x[0, 1, 0] = np.inf
    raw = EncodedTensor(Codec.FP32, x.shape, x.astype("<f4").tobytes())  # encode() would refuse
    with pytest.raises(WireError) as e:
        validate_offload(request(raw), MODELS)
    msg = str(e.value)
    assert msg.startswith("OffloadRequest.activation.data: expected finite numbers after fp32 decoding")
    assert "3 NaN and 1 inf among 32 values" in msg


def test_fp16_inf_payload() -> None:
    x = np.full((1, 4, 8), np.float16(1.0))
    x[0, 0, 0] = np.float16(np.inf)
    raw = EncodedTensor(Codec.FP16, x.shape, x.astype("<f2").tobytes())
    with pytest.raises(WireError, match=r"0 NaN and 1 inf"):
        validate_offload(request(raw), MODELS)


@pytest.mark.parametrize("scale", [0.0, -1.0, float("nan"), float("inf")])
def test_int8_bad_scale(scale: float) -> None:
    good = act(codec=Codec.INT8)
    raw = EncodedTensor(Codec.INT8, good.shape, good.data, scale=scale, zero_point=good.zero_point)
    with pytest.raises(WireError, match=r"^OffloadRequest\.activation\.data: int8 scale"):
        validate_offload(request(raw), MODELS)


def test_checks_run_in_order_model_first() -> None:
    # Everything is wrong: the model is reported, since nothing else can be judged without it.
    with pytest.raises(ModelError):
        validate_offload(request(EncodedTensor(Codec.FP16, (3,), b"x"), model="nope", cut=99), MODELS)
    # Known model, bad cut and bad shape: the cut is reported.
    with pytest.raises(WireError, match=r"^OffloadRequest\.cut"):
        validate_offload(request(EncodedTensor(Codec.FP16, (3,), b"x"), cut=99), MODELS)


# --- the tail's output (finding 1 of issue 10) --------------------------------------------------


def test_finite_logits_pass_as_float32() -> None:
    out = check_logits(np.array([0.5, -1.0, 3e38, 0.0], dtype=np.float64), TOY, 1)
    assert out.dtype == np.float32 and np.isfinite(out).all()


@pytest.mark.parametrize(
    ("logits", "counts"),
    [
        ([np.nan] * 4, "4 NaN and 0 inf among 4"),
        ([np.inf, -np.inf, np.nan, 1.0], "1 NaN and 2 inf among 4"),
        ([1e39, 0.0, 0.0, 0.0], "0 NaN and 1 inf among 4"),  # finite float64, inf as float32 (the wire's type)
    ],
)
def test_non_finite_logits_are_the_requests_fault(logits: list[float], counts: str) -> None:
    with pytest.raises(NonFiniteOutputError) as e:
        check_logits(np.array(logits), TOY, 2)
    assert isinstance(e.value, WireError)  # answered INVALID_ARGUMENT, like every field the device got wrong
    msg = str(e.value)
    assert msg.startswith("OffloadRequest.activation: the activation at cut 2 gives non-finite logits for model 'toy'")
    assert counts in msg


@pytest.mark.parametrize("shape", [(3,), (1, 4), ()])
def test_wrong_number_of_logits_is_the_tails_fault(shape: tuple[int, ...]) -> None:
    with pytest.raises(TailUnavailableError, match=r"expected \[4\]"):
        check_logits(np.zeros(shape, dtype=np.float32), TOY, 1)
