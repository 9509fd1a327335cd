"""Activation codecs: round trips within their error bounds, and every malformed input refused."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from pipelines.codecs import (
    Codec,
    EncodedTensor,
    decode,
    encode,
    encoded_nbytes,
    parse_codec,
)
from splitsense.errors import CodecError
from splitsense.kinds import SymbolPrior

FIXED_SIZE = [c for c in Codec if c.fixed_size]


# A coding table of 3 channels, symbols -4..4, peaked at 0 like a trained bottleneck's.
PRIOR = SymbolPrior(low=-4, pmf=np.exp(-np.abs(np.arange(-4, 5)) * np.array([[0.5], [1.0], [2.0]])))


def _code(shape: tuple[int, ...] = (2, 3, 50), seed: int = 0, prior: SymbolPrior = PRIOR) -> np.ndarray:
    """Integer symbols drawn from `prior`, channel by channel, as float32 (what a quantiser emits)."""
    rng = np.random.default_rng(seed)
    out = np.empty(shape, np.float32)
    for c in range(shape[1]):
        out[:, c] = rng.choice(np.arange(prior.low, prior.high + 1), size=out[:, c].shape, p=prior.pmf[c])
    return out


def _x(shape: tuple[int, ...] = (2, 16, 32), seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32) * 3


def test_fp32_round_trip_is_exact_and_little_endian() -> None:
    x = _x()
    t = encode(x, "fp32")
    assert t.codec is Codec.FP32 and t.shape == x.shape and t.nbytes == x.size * 4
    assert t.data == x.astype("<f4").tobytes()
    y = decode(t)
    assert y.dtype == np.float32 and y.shape == x.shape
    np.testing.assert_array_equal(y, x)
    y[0] = 0  # decode returns a writable copy


def test_fp16_round_trip_relative_error() -> None:
    x = _x()
    t = encode(torch.from_numpy(x), Codec.FP16)
    assert t.nbytes == x.size * 2
    y = decode(t)
    np.testing.assert_allclose(y, x, rtol=2**-11, atol=2**-24)


def test_int8_round_trip_error_at_most_half_a_step() -> None:
    x = _x((4, 1000))
    t = encode(x, "int8")
    assert t.nbytes == x.size and t.scale > 0 and 0 <= t.zero_point <= 255
    err = np.abs(decode(t) - x).max()
    assert err <= t.scale / 2 * (1 + 1e-4)


def test_int8_keeps_zeros_exact() -> None:
    x = np.maximum(_x(), 0)  # post-ReLU activation
    y = decode(encode(x, "int8"))
    assert np.all(y[x == 0] == 0)


@pytest.mark.parametrize("value", [0.0, 3.25, -7.1, 1e-30, 1e30])
def test_int8_constant_tensor_is_exact_with_positive_scale(value: float) -> None:
    x = np.full((3, 5), value, dtype=np.float32)
    t = encode(x, "int8")
    assert t.scale > 0
    np.testing.assert_array_equal(decode(t), x)


def test_accepts_float64_and_torch_with_grad() -> None:
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    y = decode(encode(x, "fp32"))
    np.testing.assert_allclose(y, x.detach().numpy().astype(np.float32))
    b = torch.randn(8, dtype=torch.bfloat16)
    assert decode(encode(b, "fp32")).shape == (8,)


@pytest.mark.parametrize("codec", list(Codec))
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_and_inf_are_refused(codec: Codec, bad: float) -> None:
    x = np.round(_x((1, 3, 4)))
    x[0, 1, 3] = bad
    with pytest.raises(CodecError, match="NaN|inf"):
        encode(x, codec, PRIOR if codec is Codec.ANS else None)


def test_empty_and_non_float_are_refused() -> None:
    with pytest.raises(CodecError, match="empty"):
        encode(np.zeros((0, 4), np.float32), "fp32")
    with pytest.raises(CodecError, match="floating"):
        encode(np.arange(10), "int8")
    with pytest.raises(CodecError, match="floating"):
        encode(torch.arange(10), "fp16")
    with pytest.raises(CodecError, match="numpy array or torch tensor"):
        encode([1.0, 2.0], "fp32")  # type: ignore[arg-type]


def test_fp16_overflow_is_refused() -> None:
    with pytest.raises(CodecError, match="overflow fp16"):
        encode(np.array([1e5], np.float32), "fp16")


@pytest.mark.parametrize("codec", FIXED_SIZE)
def test_truncated_or_padded_payload_is_refused(codec: Codec) -> None:
    t = encode(_x((4, 8)), codec)
    for data in (t.data[:-1], t.data + b"\0", b""):
        bad = EncodedTensor(t.codec, t.shape, data, t.scale, t.zero_point)
        with pytest.raises(CodecError, match="truncated"):
            decode(bad)


def test_wrong_shape_is_refused() -> None:
    t = encode(_x((4, 8)), "fp32")
    with pytest.raises(CodecError, match="needs"):
        decode(EncodedTensor("fp32", (4, 9), t.data))  # type: ignore[arg-type]
    with pytest.raises(CodecError, match="no elements"):
        decode(EncodedTensor(Codec.FP32, (0, 8), b""))
    with pytest.raises(CodecError, match="non-negative"):
        EncodedTensor(Codec.FP32, (-1, 8), b"")


@pytest.mark.parametrize("scale", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_int8_scale_is_refused(scale: float) -> None:
    t = encode(_x((16,)), "int8")
    with pytest.raises(CodecError, match="scale"):
        decode(EncodedTensor(t.codec, t.shape, t.data, scale, t.zero_point))


@pytest.mark.parametrize("zp", [-1, 256])
def test_bad_int8_zero_point_is_refused(zp: int) -> None:
    t = encode(_x((16,)), "int8")
    with pytest.raises(CodecError, match="zero_point"):
        decode(EncodedTensor(t.codec, t.shape, t.data, t.scale, zp))


def test_parse_codec_and_unknown_codec() -> None:
    assert parse_codec("FP16") is Codec.FP16
    assert parse_codec(Codec.INT8) is Codec.INT8
    for bad in ("int4", "", None):
        with pytest.raises(CodecError, match="valid codecs: fp32, fp16, int8, ans"):
            parse_codec(bad)  # type: ignore[arg-type]
    with pytest.raises(CodecError, match="unknown codec"):
        encode(_x(), "bf16")
    with pytest.raises(CodecError, match="unknown codec"):
        EncodedTensor("zip", (1,), b"\0")  # type: ignore[arg-type]


def test_encoded_nbytes_matches_encode_without_encoding() -> None:
    x = _x((3, 7, 5))
    for codec in FIXED_SIZE:
        assert encoded_nbytes(x.shape, codec) == encode(x, codec).nbytes
    with pytest.raises(CodecError, match="ans has a data-dependent size: encode the tensor and take its nbytes"):
        encoded_nbytes(x.shape, Codec.ANS)
    assert encoded_nbytes((64, 128), "int8") == 64 * 128
    assert encoded_nbytes((), "fp32") == 4
    with pytest.raises(CodecError):
        encoded_nbytes((2, -1), "fp32")


def test_int8_is_vectorised_fast_enough() -> None:
    import time

    x = _x((1, 256, 1024))  # 1 MiB of fp32
    t0 = time.perf_counter()
    t = encode(x, "int8")
    decode(t)
    assert time.perf_counter() - t0 < 0.5


_floats = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False, width=32)


@settings(max_examples=200, deadline=None)
@given(hnp.arrays(np.float32, hnp.array_shapes(min_dims=1, max_dims=3, max_side=16), elements=_floats))
def test_int8_error_bound_property(x: np.ndarray) -> None:
    t = encode(x, "int8")
    assert t.scale > 0 and 0 <= t.zero_point <= 255
    y = decode(t)
    assert y.shape == x.shape and y.dtype == np.float32
    # scale / 2, plus float32 rounding of the arithmetic (relative to the largest magnitude)
    bound = t.scale / 2 * (1 + 1e-4) + 4 * np.finfo(np.float32).eps * float(np.abs(x).max())
    assert float(np.abs(y.astype(np.float64) - x.astype(np.float64)).max()) <= bound


# --- ans ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 3), (2, 3, 50), (1, 3, 10, 25), (5, 3, 1, 1)])
def test_ans_round_trip_is_lossless(shape: tuple[int, ...]) -> None:
    x = _code(shape)
    t = encode(x, "ans", PRIOR)
    assert t.codec is Codec.ANS and t.shape == shape and t.prior_digest == PRIOR.digest
    assert t.nbytes % 4 == 0 and t.scale == 1.0 and t.zero_point == 0
    y = decode(t, PRIOR)
    assert y.dtype == np.float32 and y.shape == shape and y.flags.writeable
    np.testing.assert_array_equal(y, x)


def test_ans_round_trip_of_every_symbol_and_the_range_ends() -> None:
    edges = np.array([[[-4, 4, 0, -4], [4, 4, -4, -4], [-3, 3, 2, -1]]], np.float32)
    np.testing.assert_array_equal(decode(encode(edges, Codec.ANS, PRIOR), PRIOR), edges)
    every = np.broadcast_to(np.arange(-4, 5, dtype=np.float32), (2, 3, 9)).copy()
    np.testing.assert_array_equal(decode(encode(every, Codec.ANS, PRIOR), PRIOR), every)
    # all of the lowest symbol is the coder's initial state: no words at all, still lossless
    low = np.full((1, 3, 7), -4, np.float32)
    t = encode(low, Codec.ANS, PRIOR)
    np.testing.assert_array_equal(decode(t, PRIOR), low)


def test_ans_accepts_torch_float64_and_negative_zero() -> None:
    x = torch.from_numpy(_code((1, 3, 8), seed=2)).to(torch.float64)
    x[0, 0, 0] = -0.0
    np.testing.assert_array_equal(decode(encode(x, Codec.ANS, PRIOR), PRIOR), x.numpy().astype(np.float32))


@settings(max_examples=100, deadline=None)
@given(
    hnp.arrays(
        np.int8,
        st.tuples(st.integers(1, 3), st.just(3), st.integers(1, 12)),
        elements=st.integers(-4, 4),
    )
)
def test_ans_round_trip_property(symbols: np.ndarray) -> None:
    x = symbols.astype(np.float32)
    np.testing.assert_array_equal(decode(encode(x, Codec.ANS, PRIOR), PRIOR), x)


def test_ans_size_is_close_to_the_ideal_code_length() -> None:
    x = _code((4, 3, 500), seed=1)
    ideal_bytes = PRIOR.bits(x) / 8
    t = encode(x, Codec.ANS, PRIOR)
    # the coder flushes a 64-bit state and quantises the table to 24 bits: a few words over the ideal
    assert ideal_bytes <= t.nbytes <= ideal_bytes * 1.01 + 12
    assert t.nbytes < x.size  # well under int8's byte per symbol (~1.9 bits a symbol here)
    # a mismatched table (uniform) costs what it should: log2(9) bits a symbol
    uniform = SymbolPrior(low=-4, pmf=np.ones((3, 9)))
    u = encode(x, Codec.ANS, uniform)
    assert x.size * math.log2(9) / 8 <= u.nbytes <= x.size * math.log2(9) / 8 * 1.01 + 12
    assert u.nbytes > t.nbytes


@pytest.mark.parametrize("value", [0.5, -1.25, 3.0001])
def test_ans_refuses_fractional_values_instead_of_rounding(value: float) -> None:
    x = _code((1, 3, 10))
    x[0, 2, 4] = value
    with pytest.raises(CodecError, match=r"codes integer symbols; this tensor has fractional values \(use int8\)"):
        encode(x, Codec.ANS, PRIOR)


@pytest.mark.parametrize(("value", "shown"), [(5.0, r"\[-4, 5\]"), (-7.0, r"\[-7, 4\]"), (1e6, r"\[-4, 1e\+06\]")])
def test_ans_refuses_symbols_outside_the_prior(value: float, shown: str) -> None:
    x = _code((1, 3, 10))
    x[0, 0, 0], x[0, 1, 0] = -4, 4  # both ends present, so the reported range is exact
    x[0, 1, 1] = value
    with pytest.raises(CodecError, match=shown + r" lie outside the prior's symbols \[-4, 4\]"):
        encode(x, Codec.ANS, PRIOR)


def test_ans_refuses_a_missing_prior_on_either_end() -> None:
    x = _code((1, 3, 10))
    with pytest.raises(CodecError, match="the ans codec needs the model's symbol prior at this cut; no prior"):
        encode(x, Codec.ANS)
    t = encode(x, Codec.ANS, PRIOR)
    with pytest.raises(CodecError, match="can only be decoded with the model's symbol prior"):
        decode(t)


def test_ans_refuses_a_prior_of_another_width() -> None:
    with pytest.raises(CodecError, match=r"3 channels but the tensor's shape \[1, 4, 10\] has 4 on axis 1"):
        encode(np.zeros((1, 4, 10), np.float32), Codec.ANS, PRIOR)
    with pytest.raises(CodecError, match=r"shape \[30\] has no on axis 1"):
        encode(np.zeros(30, np.float32), Codec.ANS, PRIOR)


def test_ans_refuses_a_payload_coded_with_another_prior() -> None:
    x = _code((1, 3, 40))
    other = SymbolPrior(low=-4, pmf=np.ones((3, 9)))
    t = encode(x, Codec.ANS, other)
    with pytest.raises(CodecError) as e:
        decode(t, PRIOR)
    msg = str(e.value)
    assert f"coded with symbol prior {other.digest!r}" in msg and f"holds {PRIOR.digest!r}" in msg
    assert "different weights" in msg
    # a payload that names no prior is refused before any decoding
    with pytest.raises(CodecError, match=r"must name the symbol prior it was coded with \(prior_digest\)"):
        decode(EncodedTensor(Codec.ANS, t.shape, t.data), other)


def test_ans_refuses_truncated_and_padded_words() -> None:
    t = encode(_code((2, 3, 50), seed=4), Codec.ANS, PRIOR)
    assert t.nbytes >= 16

    def bad(data: bytes) -> EncodedTensor:
        return EncodedTensor(Codec.ANS, t.shape, data, prior_digest=t.prior_digest)

    for data in (t.data[:-1], t.data + b"\0", t.data[:-3]):  # not whole 32-bit words
        with pytest.raises(CodecError, match="not a whole number of 4-byte words; the message is truncated"):
            decode(bad(data), PRIOR)
    for data in (t.data[:-4], t.data[4:], t.data[:-8]):  # whole words missing
        with pytest.raises(CodecError, match="corrupt or truncated"):
            decode(bad(data), PRIOR)
    with pytest.raises(CodecError, match="does not decode"):  # a trailing zero word is never emitted
        decode(bad(t.data + bytes(4)), PRIOR)
    with pytest.raises(CodecError, match="the ans payload"):  # left-over words: it was longer than its shape
        decode(EncodedTensor(Codec.ANS, (1, 3, 50), t.data, prior_digest=t.prior_digest), PRIOR)
