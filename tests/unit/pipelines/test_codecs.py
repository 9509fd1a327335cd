"""Activation codecs: round trips within their error bounds, and every malformed input refused."""

from __future__ import annotations

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
    x = _x((10,))
    x[3] = bad
    with pytest.raises(CodecError, match="NaN|inf"):
        encode(x, codec)


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


@pytest.mark.parametrize("codec", list(Codec))
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
        with pytest.raises(CodecError, match="valid codecs: fp32, fp16, int8"):
            parse_codec(bad)  # type: ignore[arg-type]
    with pytest.raises(CodecError, match="unknown codec"):
        encode(_x(), "bf16")
    with pytest.raises(CodecError, match="unknown codec"):
        EncodedTensor("zip", (1,), b"\0")  # type: ignore[arg-type]


def test_encoded_nbytes_matches_encode_without_encoding() -> None:
    x = _x((3, 7, 5))
    for codec in Codec:
        assert encoded_nbytes(x.shape, codec) == encode(x, codec).nbytes
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
