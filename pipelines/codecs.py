"""Activation codecs for the wire (JALAD-style quantisation of what crosses the split).

    fp32   little-endian IEEE float32, exact.
    fp16   little-endian IEEE float16; relative error <= 2**-11 for normal values, |x| <= 65504.
    int8   asymmetric per-tensor affine quantisation stored as *uint8* (q in 0..255):
               x ~= (q - zero_point) * scale,   scale > 0,   zero_point in 0..255.
           The quantised range is [min(x, 0), max(x, 0)], so zero is exactly representable
           (ReLU zeros stay zeros) and the error per element is at most scale / 2 (up to float32
           rounding). scale is always a float32 value (exact whether the wire carries it as a
           float or a double) and never 0: a constant tensor c != 0 gets scale = |c|, which
           reconstructs it exactly; an all-zero tensor gets scale = 1.

`shape` is whatever was encoded (batch dimension included if the caller had one). Everything is
vectorised numpy; nothing loops over elements in Python. Every failure is a CodecError whose
message says what was wrong and what to do.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import numpy as np
import torch

from splitsense.errors import CodecError

FP16_MAX = 65504.0
INT8_LEVELS = 255  # uint8 codes 0..255


class Codec(StrEnum):
    """A str enum (StrEnum): Codec.FP16 == 'fp16' and str(Codec.FP16) == 'fp16'."""

    FP32 = "fp32"
    FP16 = "fp16"
    INT8 = "int8"

    @property
    def itemsize(self) -> int:
        """Bytes per element on the wire."""
        return _WIRE_DTYPE[self].itemsize

    @property
    def wire_dtype(self) -> np.dtype[Any]:
        return _WIRE_DTYPE[self]


_WIRE_DTYPE: dict[Codec, np.dtype[Any]] = {
    Codec.FP32: np.dtype("<f4"),
    Codec.FP16: np.dtype("<f2"),
    Codec.INT8: np.dtype("u1"),
}

VALID_CODECS = tuple(c.value for c in Codec)


def parse_codec(name: str | Codec) -> Codec:
    """'fp32' / 'FP16' / Codec.INT8 -> Codec; anything else is a CodecError listing valid names."""
    if isinstance(name, Codec):
        return name
    if isinstance(name, str):
        try:
            return Codec(name.strip().lower())
        except ValueError:
            pass
    raise CodecError(f"unknown codec {name!r}; valid codecs: {', '.join(VALID_CODECS)}")


def _check_shape(shape: Any) -> tuple[int, ...]:
    try:
        dims = tuple(shape)
    except TypeError:
        raise CodecError(f"shape must be a sequence of ints, got {shape!r}") from None
    out = []
    for d in dims:
        if isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < 0:
            raise CodecError(f"shape must hold non-negative ints, got {shape!r}")
        out.append(int(d))
    return tuple(out)


@dataclass(frozen=True)
class EncodedTensor:
    """One encoded activation. `codec` may be given as a name; `shape` is normalised to ints.

    Construction does not check the payload (so a wire message can always be mirrored into one);
    `validate()` does, and `decode` calls it.
    """

    codec: Codec
    shape: tuple[int, ...]
    data: bytes
    scale: float = 1.0
    zero_point: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "codec", parse_codec(self.codec))
        object.__setattr__(self, "shape", _check_shape(self.shape))
        if isinstance(self.data, (bytearray, memoryview)):
            object.__setattr__(self, "data", bytes(self.data))
        elif not isinstance(self.data, bytes):
            raise CodecError(f"data must be bytes, got {type(self.data).__name__}")

    @property
    def nbytes(self) -> int:
        """Payload size in bytes (what crosses the wire, without framing)."""
        return len(self.data)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def validate(self) -> None:
        """Raise CodecError unless the payload can be decoded into `shape`."""
        n = self.numel
        if n == 0:
            raise CodecError(f"encoded tensor has shape {self.shape} with no elements")
        expected = n * self.codec.itemsize
        if len(self.data) != expected:
            raise CodecError(
                f"{self.codec.value} payload is {len(self.data)} bytes but shape {self.shape} needs "
                f"{expected} ({n} x {self.codec.itemsize}); the message is truncated or the shape is wrong"
            )
        if self.codec is Codec.INT8:
            scale = self.scale
            if (
                isinstance(scale, bool)
                or not isinstance(scale, (int, float, np.floating, np.integer))
                or not math.isfinite(scale)
                or scale <= 0
            ):
                raise CodecError(f"int8 scale must be a finite number > 0, got {scale!r}")
            zp = self.zero_point
            if isinstance(zp, bool) or not isinstance(zp, (int, np.integer)) or not 0 <= zp <= INT8_LEVELS:
                raise CodecError(f"int8 zero_point must be an int in 0..{INT8_LEVELS}, got {zp!r}")


def _as_float_array(x: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        if not (x.is_floating_point()):
            raise CodecError(f"can only encode floating-point tensors, got torch {x.dtype}")
        t = x.detach().cpu()
        if t.dtype not in (torch.float32, torch.float16, torch.float64):
            t = t.float()  # bfloat16 and friends have no numpy dtype
        arr = t.numpy()
    elif isinstance(x, np.ndarray):
        arr = x
    else:
        raise CodecError(f"can only encode a numpy array or torch tensor, got {type(x).__name__}")
    if arr.dtype.kind != "f":
        raise CodecError(f"can only encode floating-point arrays, got dtype {arr.dtype}; cast to float32")
    if arr.size == 0:
        raise CodecError(f"cannot encode an empty tensor (shape {arr.shape})")
    # float64 is narrowed first so that the range checks below see what is actually sent.
    return np.asarray(arr, dtype=np.float32)


def encode(x: np.ndarray | torch.Tensor, codec: Codec | str) -> EncodedTensor:
    """Encode a float tensor for the wire. CodecError on NaN/inf, empty, non-float or unknown codec."""
    c = parse_codec(codec)
    arr = _as_float_array(x)
    with np.errstate(over="ignore", invalid="ignore"):
        lo = float(arr.min())  # min/max propagate NaN, so these two passes also validate
        hi = float(arr.max())
    if math.isnan(lo) or math.isnan(hi):
        raise CodecError(f"cannot encode a tensor containing NaN (shape {arr.shape})")
    if math.isinf(lo) or math.isinf(hi):
        raise CodecError(f"cannot encode a tensor containing inf (shape {arr.shape}, range [{lo}, {hi}])")
    shape = tuple(int(d) for d in arr.shape)
    if c is Codec.FP32:
        return EncodedTensor(c, shape, arr.astype("<f4", copy=False).tobytes())
    if c is Codec.FP16:
        if max(-lo, hi) > FP16_MAX:
            raise CodecError(f"values up to {max(-lo, hi):.6g} overflow fp16 (max {FP16_MAX}); use fp32 or int8")
        return EncodedTensor(c, shape, arr.astype("<f2").tobytes())
    scale, zero_point = _int8_params(lo, hi)
    s = np.float32(scale)
    q = arr / s
    q += np.float32(zero_point)
    np.rint(q, out=q)
    np.clip(q, 0, INT8_LEVELS, out=q)
    return EncodedTensor(c, shape, q.astype(np.uint8).tobytes(), scale=scale, zero_point=zero_point)


def _int8_params(lo: float, hi: float) -> tuple[float, int]:
    """(scale, zero_point) for values in [lo, hi]; scale is a float32 value > 0."""
    if lo == hi:  # constant tensor: pick a grid on which it lies exactly
        if lo == 0.0:
            return 1.0, 0
        scale = float(np.float32(abs(lo)))
        return scale, (0 if lo > 0 else INT8_LEVELS)
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    s32 = np.float32((hi - lo) / INT8_LEVELS)
    if float(s32) * INT8_LEVELS < hi - lo:  # round up so that 255 steps always span the range
        s32 = np.nextafter(s32, np.float32(np.inf))
    scale = float(s32)
    if not scale > 0:  # range below float32 resolution (subnormals): smallest positive scale
        scale = float(np.finfo(np.float32).smallest_subnormal)
    zero_point = int(min(max(round(-lo / scale), 0), INT8_LEVELS))
    return scale, zero_point


def decode(t: EncodedTensor) -> np.ndarray:
    """Decode to a writable float32 array of `t.shape` (native byte order)."""
    t.validate()
    raw = np.frombuffer(t.data, dtype=t.codec.wire_dtype)
    if t.codec is Codec.INT8:
        out = raw.astype(np.float32)
        out -= np.float32(t.zero_point)
        out *= np.float32(t.scale)
    else:
        out = raw.astype(np.float32)  # always a fresh, writable, native-order copy
    return out.reshape(t.shape)


def encoded_nbytes(shape: tuple[int, ...] | list[int], codec: Codec | str) -> int:
    """Payload size of a tensor of `shape` under `codec`, without encoding anything."""
    return math.prod(_check_shape(shape)) * parse_codec(codec).itemsize
