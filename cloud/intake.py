"""The broker's intake of one offloaded window: the wire message checked and decoded; pure.

The full way to check a window is `splitsense.wire.from_pb` (the message into dataclasses, every
field checked) and then `cloud/validation.validate_offload` (the model, cut, codec, shape and the
decoded values). It costs ~55 us of Python a window here, most of it re-checking what does not
change from one window of a device to the next: the model, the cut, the codec, the shape, the
prior's digest, the extra models, the device's id and class (the window's *header*).

`Intake` takes the full way the first time it sees a header and remembers that the header passed.
A later window with the same header gets only the checks of what is its own, the same ones the
full way makes of those fields:

    window_id         a non-empty string of at most MAX_ID_CHARS
    estimates         bandwidth and RTT finite and >= 0, battery in [0, 1], a known radio (when set)
    plan_version,     >= 0 (int64 on the wire; deadline_ms is a uint32, always in range)
    sent_unix_ms
    activation        set; its payload as long as the header's shape and codec need (ans: whole
                      32-bit words); int8: a finite scale > 0 and a zero point in 0..255
    the values        decoded as `pipelines.codecs.decode` does, all finite

and is decoded without the dataclasses: ~10 us. The contract: the quick way accepts a message only
if the full way accepts it, and decodes it to the same array; whatever fails a quick check goes
the full way, which raises the error that names the field (so every error message still comes
from splitsense.wire and cloud/validation.py). tests/unit/cloud/test_intake.py checks the contract
on mutated messages. The remembered headers are bounded (`max_headers`, oldest forgotten first).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from cloud.backend import ModelInfo
from cloud.validation import validate_offload
from pipelines.codecs import decode
from splitsense.kinds import INT8_LEVELS, Codec, EncodedTensor, SymbolPrior
from splitsense.v1 import offload_pb2 as pb
from splitsense.wire import MAX_ID_CHARS, from_pb

__all__ = ["Intake", "Window"]

_WIRE_CODEC = {pb.CODEC_FP32: Codec.FP32, pb.CODEC_FP16: Codec.FP16, pb.CODEC_INT8: Codec.INT8, pb.CODEC_ANS: Codec.ANS}
_RADIOS = frozenset((pb.RADIO_KIND_WIFI, pb.RADIO_KIND_LTE, pb.RADIO_KIND_3G, pb.RADIO_KIND_BLE))
_ANS_WORD_BYTES = 4
_INF = math.inf

# (model, cut, device_id, device_class, codec, shape, prior_digest, extra_models) as on the wire
_HeaderKey = tuple[str, int, str, str, int, tuple[int, ...], str, tuple[str, ...]]


@dataclass(frozen=True, slots=True)
class Window:
    """One window that passed every check, with its activation decoded."""

    window_id: str
    model: str
    cut: int
    device_id: str
    device_class: str
    codec: str  # the Codec's value, as metrics label it
    nbytes: int  # the activation's payload bytes
    deadline_ms: int  # 0: the call's own deadline
    activation: np.ndarray  # float32, (1, *info.activation_shape(cut)), all finite
    info: ModelInfo
    extra: tuple[ModelInfo, ...]  # the extra models reading the same activation
    # the device's link and battery as metrics record them (None: the message left them out)
    bandwidth_bytes_per_s: float | None = None
    rtt_s: float = 0.0
    battery_fraction: float | None = None  # None also when the device is not on battery


@dataclass(frozen=True, slots=True)
class _Header:
    """What a header that passed the full checks fixes for its windows."""

    info: ModelInfo
    extra: tuple[ModelInfo, ...]
    codec: Codec
    shape: tuple[int, ...]
    nbytes: int  # the payload length the shape needs; 0 for ans (data-dependent)
    prior: SymbolPrior | None


class Intake:
    """Checks and decodes OffloadRequest messages against the models a broker serves."""

    def __init__(self, models: Mapping[str, ModelInfo], *, max_headers: int = 8192) -> None:
        self._models = dict(models)
        self._headers: dict[_HeaderKey, _Header] = {}
        self._max_headers = max(1, max_headers)
        self.quick = 0  # windows checked the quick way (tests and benchmarks read these)
        self.full = 0

    def accept(self, msg: pb.OffloadRequest) -> Window:
        """The window, or the WireError / ModelError of the full way naming the field at fault."""
        a = msg.activation
        key: _HeaderKey = (
            msg.model,
            msg.cut,
            msg.device_id,
            msg.device_class,
            a.codec,
            tuple(a.shape),
            a.prior_digest,
            tuple(msg.extra_models),
        )
        header = self._headers.get(key)
        if header is not None:
            window = self._quick(msg, header)
            if window is not None:
                self.quick += 1
                return window
        window = self._full(msg)
        if header is None:
            if len(self._headers) >= self._max_headers:
                del self._headers[next(iter(self._headers))]  # the oldest header goes
            info = window.info
            codec = Codec(window.codec)
            shape = tuple(window.activation.shape)
            self._headers[key] = _Header(
                info=info,
                extra=window.extra,
                codec=codec,
                shape=shape,
                nbytes=0 if codec is Codec.ANS else math.prod(shape) * codec.itemsize,
                prior=info.symbol_prior(window.cut),
            )
        return window

    def _full(self, msg: pb.OffloadRequest) -> Window:
        self.full += 1
        req = from_pb(msg)
        valid = validate_offload(req, self._models)
        e = req.estimates
        return Window(
            window_id=req.window_id,
            model=req.model,
            cut=req.cut,
            device_id=req.device_id,
            device_class=req.device_class,
            codec=req.activation.codec.value,
            nbytes=req.activation.nbytes,
            deadline_ms=req.deadline_ms,
            activation=valid.activation,
            info=valid.info,
            extra=valid.extra,
            bandwidth_bytes_per_s=None if e is None else e.bandwidth_mbps * 125_000,
            rtt_s=0.0 if e is None else e.rtt_ms / 1000,
            battery_fraction=e.battery_fraction if e is not None and e.on_battery else None,
        )

    def _quick(self, msg: pb.OffloadRequest, h: _Header) -> Window | None:
        """The window if every check of its own fields passes; None sends it the full way."""
        wid = msg.window_id
        if not wid or len(wid) > MAX_ID_CHARS or msg.plan_version < 0 or msg.sent_unix_ms < 0:
            return None
        if not msg.HasField("activation"):
            return None
        bandwidth: float | None = None
        rtt = 0.0
        battery: float | None = None
        if msg.HasField("estimates"):
            e = msg.estimates
            bw, rtt, frac = e.bandwidth_mbps, e.rtt_ms, e.battery_fraction
            # NaN fails every comparison; inf fails `< _INF`
            if not (0.0 <= bw < _INF and 0.0 <= rtt < _INF and 0.0 <= frac <= 1.0) or e.radio not in _RADIOS:
                return None
            bandwidth, rtt = bw * 125_000, rtt / 1000
            battery = frac if e.on_battery else None
        a = msg.activation
        data = a.data
        codec = h.codec
        if codec is Codec.ANS:
            if not data or len(data) % _ANS_WORD_BYTES:
                return None
            try:
                x = decode(EncodedTensor(codec=codec, shape=h.shape, data=data, prior_digest=a.prior_digest), h.prior)
            except Exception:  # CodecError: the full way names it
                return None
        else:
            if len(data) != h.nbytes:
                return None
            raw = np.frombuffer(data, dtype=codec.wire_dtype)
            if codec is Codec.INT8:
                scale, zp = a.scale, a.zero_point
                if not (0.0 < scale < _INF) or not 0 <= zp <= INT8_LEVELS:
                    return None
                x = raw.astype(np.float32)
                x -= np.float32(zp)
                x *= np.float32(scale)
            else:
                x = raw.astype(np.float32)
            x = x.reshape(h.shape)
        if not np.isfinite(x).all():
            return None
        return Window(
            window_id=wid,
            model=msg.model,
            cut=msg.cut,
            device_id=msg.device_id,
            device_class=msg.device_class,
            codec=codec.value,
            nbytes=len(data),
            deadline_ms=msg.deadline_ms,
            activation=x,
            info=h.info,
            extra=h.extra,
            bandwidth_bytes_per_s=bandwidth,
            rtt_s=rtt,
            battery_fraction=battery,
        )
