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

    ans    an entropy code (asymmetric numeral systems, constriction's AnsCoder) of integer symbols
           against the model's SymbolPrior at that cut: a per-channel categorical table that ships
           inside the model's weights on both ends. Lossless for integer-valued tensors within the
           prior's range (a learned bottleneck's quantised code); anything else is refused, never
           silently rounded. The payload is the coder's 32-bit words (little-endian) and the tensor
           names the prior's digest: a decoder holding another table refuses.

Why constriction and not CompressAI's rANS (`splitsense bench coders` measures both on the real
bottleneck codes, same tables): they code the same symbols to within 2% of each other and 4-7% of
the ideal length; CompressAI's C++ coder is ~5x faster (~17 vs ~90 us a window here, both negligible
next to a 1-2.5 s window), but CompressAI 1.2.8 is a research package that pins numpy < 2 and pulls
torch, torchvision, torch-geometric, pandas and scipy, none of which a device should carry, while
constriction is one numpy-only wheel (a device install without torch stays possible: this module
imports torch only if the caller already has, to accept its tensors).

`shape` is whatever was encoded (batch dimension included if the caller had one). Everything is
vectorised numpy; nothing loops over elements in Python. Every failure is a CodecError whose
message says what was wrong and what to do.
"""

from __future__ import annotations

import functools
import math
import sys
from typing import TYPE_CHECKING

import numpy as np

from splitsense.errors import CodecError
from splitsense.kinds import (
    INT8_LEVELS,
    VALID_CODECS,
    Codec,
    EncodedTensor,
    SymbolPrior,
    check_shape,
    parse_codec,
)

if TYPE_CHECKING:
    import torch

__all__ = [
    "FP16_MAX",
    "INT8_LEVELS",
    "VALID_CODECS",
    "Codec",
    "EncodedTensor",
    "SymbolPrior",
    "decode",
    "encode",
    "encoded_nbytes",
    "parse_codec",
]

FP16_MAX = 65504.0


def _as_float_array(x: np.ndarray | torch.Tensor) -> np.ndarray:
    # torch only if the caller has it loaded (a tensor cannot exist otherwise): a device without
    # torch encodes numpy arrays and never imports it.
    th = sys.modules.get("torch")
    if th is not None and isinstance(x, th.Tensor):
        if not (x.is_floating_point()):
            raise CodecError(f"can only encode floating-point tensors, got torch {x.dtype}")
        t = x.detach().cpu()
        if t.dtype not in (th.float32, th.float16, th.float64):
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


def encode(x: np.ndarray | torch.Tensor, codec: Codec | str, prior: SymbolPrior | None = None) -> EncodedTensor:
    """Encode a float tensor for the wire. CodecError on NaN/inf, empty, non-float or unknown codec,
    and for ans without a prior or with values that are not integers in the prior's range."""
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
    if c is Codec.ANS:
        return _encode_ans(arr, shape, lo, hi, prior)
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


def decode(t: EncodedTensor, prior: SymbolPrior | None = None) -> np.ndarray:
    """Decode to a writable float32 array of `t.shape` (native byte order). ans needs the prior
    the payload names (CodecError when it is missing or another one)."""
    t.validate()
    if t.codec is Codec.ANS:
        return _decode_ans(t, prior)
    raw = np.frombuffer(t.data, dtype=t.codec.wire_dtype)
    if t.codec is Codec.INT8:
        out = raw.astype(np.float32)
        out -= np.float32(t.zero_point)
        out *= np.float32(t.scale)
    else:
        out = raw.astype(np.float32)  # always a fresh, writable, native-order copy
    return out.reshape(t.shape)


def encoded_nbytes(shape: tuple[int, ...] | list[int], codec: Codec | str) -> int:
    """Payload size of a tensor of `shape` under a fixed-size `codec`, without encoding anything."""
    c = parse_codec(codec)
    if not c.fixed_size:
        raise CodecError(f"codec {c.value} has a data-dependent size: encode the tensor and take its nbytes")
    return math.prod(check_shape(shape)) * c.itemsize


# --- ans ---------------------------------------------------------------------------------------


def _channel_of(shape: tuple[int, ...], prior: SymbolPrior) -> np.ndarray:
    """The channel index (axis 1) of every element of a batch-first tensor, in C order."""
    if len(shape) < 2 or shape[1] != prior.channels:
        raise CodecError(
            f"the symbol prior has {prior.channels} channels but the tensor's shape {list(shape)} has "
            f"{shape[1] if len(shape) > 1 else 'no'} on axis 1 (batch first, channels second)"
        )
    view = np.arange(prior.channels).reshape((1, -1) + (1,) * (len(shape) - 2))
    return np.broadcast_to(view, shape).reshape(-1)


@functools.lru_cache(maxsize=64)
def _probs(prior: SymbolPrior, shape: tuple[int, ...]) -> np.ndarray:
    """Each element's row of the prior (element i: its channel's pmf), (elements, symbols): what
    constriction codes with. Built once per (prior, shape), read-only: building it was ~30% of a
    window's ans encode or decode (a 2,000 x 31 float64 gather per call). A prior is frozen and
    hashed by identity, so an entry never outlives what it was built from."""
    probs = prior.pmf[_channel_of(shape, prior)]
    probs.flags.writeable = False
    return probs


def _ans_model() -> object:
    try:
        import constriction
    except ImportError:  # pragma: no cover - constriction is a core dependency
        raise CodecError("the ans codec needs the constriction package: pip install constriction") from None
    return constriction.stream.model.Categorical(perfect=False)


def _encode_ans(
    arr: np.ndarray, shape: tuple[int, ...], lo: float, hi: float, prior: SymbolPrior | None
) -> EncodedTensor:
    import constriction

    if prior is None:
        raise CodecError("the ans codec needs the model's symbol prior at this cut; no prior was given")
    if lo < prior.low or hi > prior.high:
        raise CodecError(f"values in [{lo:g}, {hi:g}] lie outside the prior's symbols [{prior.low}, {prior.high}]")
    flat = arr.reshape(-1)
    symbols = flat.astype(np.int32)
    if not np.array_equal(symbols, flat):
        raise CodecError("the ans codec codes integer symbols; this tensor has fractional values (use int8)")
    symbols -= prior.low
    probs = _probs(prior, tuple(shape))
    coder = constriction.stream.stack.AnsCoder()
    coder.encode_reverse(symbols, _ans_model(), probs)
    words = coder.get_compressed().astype("<u4", copy=False)
    return EncodedTensor(Codec.ANS, shape, words.tobytes(), prior_digest=prior.digest)


def _decode_ans(t: EncodedTensor, prior: SymbolPrior | None) -> np.ndarray:
    import constriction

    if prior is None:
        raise CodecError("an ans payload can only be decoded with the model's symbol prior at this cut")
    if t.prior_digest != prior.digest:
        raise CodecError(
            f"the ans payload was coded with symbol prior {t.prior_digest!r} but this end holds "
            f"{prior.digest!r}: device and cloud run different weights of the model"
        )
    probs = _probs(prior, tuple(t.shape))
    words = np.frombuffer(t.data, dtype="<u4").astype(np.uint32)
    try:
        coder = constriction.stream.stack.AnsCoder(words)
        symbols = coder.decode(_ans_model(), probs)
    except Exception as e:  # constriction raises ValueError/AssertionError on corrupt input
        raise CodecError(f"the ans payload does not decode: {e}") from None
    if not coder.is_empty():
        raise CodecError(
            "the ans payload does not match its shape (left-over or missing words): it is corrupt or truncated"
        )
    out = symbols.astype(np.float32)
    out += np.float32(prior.low)
    return out.reshape(t.shape)
