"""The small vocabulary every layer shares: codec kinds, radio kinds, the encoded tensor, the symbol prior.

A leaf module: it imports only numpy and the error tree, so that config, wire, plan, pipelines and
edge can all import it without an arrow pointing the wrong way (the wire contract used to reach
into ``pipelines.codecs`` for its types). The codecs themselves (encode/decode) live in
:mod:`pipelines.codecs`; the radio power model in :mod:`pipelines.power`.

    Codec          fp32 | fp16 | int8 | ans   (how a tensor's numbers are laid out on the wire)
    Radio          wifi | lte | 3g | ble      (the kind of uplink a device has)
    FallbackKind   plan | link_down | breaker | late | ...  (why the cloud did not answer a window)
    SymbolPrior    a per-channel coding table of integer symbols (what the ANS codec codes against)
    EncodedTensor  one encoded activation, as it crosses the wire
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import numpy as np

from splitsense.errors import CodecError

__all__ = [
    "ANS_WORD_BYTES",
    "INT8_LEVELS",
    "VALID_CODECS",
    "Codec",
    "EncodedTensor",
    "FallbackKind",
    "Radio",
    "SymbolPrior",
    "check_shape",
    "parse_codec",
]

ANS_WORD_BYTES = 4  # constriction's ANS coder emits 32-bit words
INT8_LEVELS = 255  # uint8 codes 0..255


class FallbackKind(StrEnum):
    """Why a window was not answered by the cloud (None on a result the cloud answered): typed on
    every edge result (edge/route.py decides it), counted in telemetry, a metric label in the cloud."""

    PLAN = "plan"  # the plan keeps the whole model on the device
    NO_BROKER = "no_broker"  # the device has no transport
    LINK_DOWN = "link_down"  # the platform says the radio has no link (association / bearer lost)
    BREAKER = "breaker"  # the circuit breaker is open, or holding after a shed
    PROBING = "probing"  # ran here while its activation probes the cloud in the background
    CODEC = "codec"  # the activation could not be encoded with the chosen codec
    LATE = "late"  # hedged: the answer was late relative to the link estimate; the local tail answered
    MISSING_FRONT = "missing_front"  # the plan named a front (cut, level) the device does not hold
    # an offload that failed (edge.breaker.FailureKind)
    UNAVAILABLE = "unavailable"
    DEADLINE = "deadline"
    REJECTED = "rejected"
    SHED = "shed"
    ERROR = "error"

    @classmethod
    def of_failure(cls, kind: StrEnum) -> FallbackKind:
        """The kind of a failed offload (edge.breaker.FailureKind, whose values are a subset)."""
        return cls(kind.value)


class Codec(StrEnum):
    """A str enum (StrEnum): Codec.FP16 == 'fp16' and str(Codec.FP16) == 'fp16'.

    fp32, fp16 and int8 have a fixed size per element (``itemsize``); ans is an entropy code of
    integer symbols against the model's :class:`SymbolPrior` at that cut, so its size depends on
    the data and it exists only at cuts whose activation is a quantised code (a bottleneck)."""

    FP32 = "fp32"
    FP16 = "fp16"
    INT8 = "int8"
    ANS = "ans"

    @property
    def fixed_size(self) -> bool:
        return self is not Codec.ANS

    @property
    def itemsize(self) -> int:
        """Bytes per element on the wire (fixed-size codecs only)."""
        try:
            return _WIRE_DTYPE[self].itemsize
        except KeyError:
            raise CodecError(f"codec {self.value} has no fixed size per element") from None

    @property
    def wire_dtype(self) -> np.dtype[Any]:
        try:
            return _WIRE_DTYPE[self]
        except KeyError:
            raise CodecError(f"codec {self.value} has no fixed element type") from None


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


class Radio(StrEnum):
    """The kind of uplink a device uses."""

    WIFI = "wifi"
    LTE = "lte"
    THREEG = "3g"
    BLE = "ble"


@dataclass(frozen=True, eq=False)
class SymbolPrior:
    """Probabilities of the integer symbols low .. low + S - 1, one row of S per channel (axis 1 of a
    batch-first tensor). Both ends of a split hold the same table (it ships inside the model's
    weights); ``digest`` names it on the wire so that a device and a broker with different tables
    refuse instead of decoding garbage."""

    low: int
    pmf: np.ndarray  # (channels, symbols), float64, rows > 0

    def __post_init__(self) -> None:
        pmf = np.ascontiguousarray(np.asarray(self.pmf, dtype=np.float64))
        if pmf.ndim != 2 or pmf.shape[0] < 1 or pmf.shape[1] < 2:
            raise CodecError(f"a symbol prior needs a (channels, symbols >= 2) table, got shape {pmf.shape}")
        if not np.isfinite(pmf).all() or (pmf < 0).any() or (pmf.sum(axis=1) <= 0).any():
            raise CodecError("a symbol prior's probabilities must be finite, >= 0, and sum to > 0 per channel")
        object.__setattr__(self, "pmf", pmf / pmf.sum(axis=1, keepdims=True))
        object.__setattr__(self, "low", int(self.low))

    @property
    def channels(self) -> int:
        return int(self.pmf.shape[0])

    @property
    def n_symbols(self) -> int:
        return int(self.pmf.shape[1])

    @property
    def high(self) -> int:
        return self.low + self.n_symbols - 1

    @property
    def digest(self) -> str:
        """16 hex digits of the sha256 of (low, the float32 table): the table's name on the wire."""
        h = hashlib.sha256(f"{self.low}:{self.pmf.shape}".encode())
        h.update(self.pmf.astype("<f4").tobytes())
        return h.hexdigest()[:16]

    def bits(self, symbols: np.ndarray) -> float:
        """Ideal code length in bits of integer `symbols` (batch first, channels on axis 1).

        CodecError for values that are not integers in [low, high] (a negative index would
        otherwise wrap around to another symbol's probability) or a tensor of another width."""
        arr = np.asarray(symbols)
        if arr.ndim < 2 or arr.shape[1] != self.channels:
            raise CodecError(
                f"the symbol prior has {self.channels} channels but the symbols' shape {list(arr.shape)} has "
                f"{arr.shape[1] if arr.ndim > 1 else 'no'} on axis 1 (batch first, channels second)"
            )
        if arr.size == 0:
            return 0.0
        with np.errstate(invalid="ignore"):
            idx = arr.astype(np.int64)
        if not np.array_equal(idx, arr) or idx.min() < self.low or idx.max() > self.high:
            raise CodecError(f"symbols must be integers in [{self.low}, {self.high}]")
        idx -= self.low
        ch = np.broadcast_to(np.arange(self.channels).reshape((1, -1) + (1,) * (idx.ndim - 2)), idx.shape)
        return float(-np.log2(self.pmf[ch, idx]).sum())


def check_shape(shape: Any) -> tuple[int, ...]:
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

    `prior_digest` names the SymbolPrior an ans payload was coded against ("" for the other codecs).
    Construction does not check the payload (so a wire message can always be mirrored into one);
    `validate()` does, and `decode` calls it.
    """

    codec: Codec
    shape: tuple[int, ...]
    data: bytes
    scale: float = 1.0
    zero_point: int = 0
    prior_digest: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "codec", parse_codec(self.codec))
        object.__setattr__(self, "shape", check_shape(self.shape))
        if isinstance(self.data, (bytearray, memoryview)):
            object.__setattr__(self, "data", bytes(self.data))
        elif not isinstance(self.data, bytes):
            raise CodecError(f"data must be bytes, got {type(self.data).__name__}")
        if not isinstance(self.prior_digest, str):
            raise CodecError(f"prior_digest must be a string, got {type(self.prior_digest).__name__}")

    @property
    def nbytes(self) -> int:
        """Payload size in bytes (what crosses the wire, without framing)."""
        return len(self.data)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def validate(self) -> None:
        """Raise CodecError unless the payload can be decoded into `shape` (ans: as far as can be
        told without the prior: whole 32-bit words, and a named prior)."""
        n = self.numel
        if n == 0:
            raise CodecError(f"encoded tensor has shape {self.shape} with no elements")
        if self.codec is Codec.ANS:
            if len(self.data) % ANS_WORD_BYTES:
                raise CodecError(
                    f"ans payload is {len(self.data)} bytes, not a whole number of {ANS_WORD_BYTES}-byte words; "
                    "the message is truncated"
                )
            if not self.prior_digest:
                raise CodecError("an ans payload must name the symbol prior it was coded with (prior_digest)")
            return
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
