"""Checks of one offload request against the model it names; pure (no gRPC, no I/O).

`validate_offload` runs after `splitsense.wire.from_pb` (which already rejects what the wire cannot
carry: an unset activation, an UNSPECIFIED codec, a payload whose length does not match its
shape) and checks, in this order:

    OffloadRequest.model              a model this broker serves            ModelError  -> NOT_FOUND
    OffloadRequest.cut                0..N-1 (N is fully local, never sent) WireError   -> INVALID_ARGUMENT
    OffloadRequest.activation.codec   one of the accepted codecs; ans only  WireError   -> INVALID_ARGUMENT
                                      at a bottleneck, with the broker's
                                      own prior digest
    OffloadRequest.activation.shape   (1, *activation shape at the cut)     WireError   -> INVALID_ARGUMENT
    OffloadRequest.activation.data    length, int8 scale/zero point, and    WireError   -> INVALID_ARGUMENT
                                      only finite numbers once decoded
    OffloadRequest.extra_models       served models (else NOT_FOUND) whose  WireError   -> INVALID_ARGUMENT
                                      front [0, cut) is this model's

and `check_logits` checks what the tail made of the activation, per window and per task:

    the tail's logits                 num_classes of them                   TailUnavailableError -> UNAVAILABLE
                                      all finite as float32                 NonFiniteOutputError -> INVALID_ARGUMENT

A finite activation can still overflow on its way through the tail (every value 3e38): that is
the request's fault, not the cloud's (the same window fails alike on every broker and replica), so
it is INVALID_ARGUMENT, which the device counts as "rejected" and finishes locally, and not
UNAVAILABLE, which would open its circuit breaker and raise the fallback alert. A wrong number of
logits is the tail's own fault (a replica serving other weights): UNAVAILABLE.

An unknown model is NOT_FOUND rather than INVALID_ARGUMENT: the request is well formed, but names
something this broker does not have (another broker, or this one after a deploy, may serve it),
and a device can tell "my message is broken" from "this cloud lacks my model" by the code alone.

Each message starts with the path of the field at fault and says what was expected and what
came, e.g. `OffloadRequest.activation.shape: expected [1, 64, 10, 25] for model 'fsdd_digit' at
cut 3 (one window, batch dimension first), got [1, 48, 20, 50]`.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass

import numpy as np

from cloud.backend import ModelInfo, TailUnavailableError
from pipelines.codecs import decode
from splitsense.errors import CodecError, ModelError, NonFiniteOutputError, WireError
from splitsense.kinds import Codec
from splitsense.wire import OffloadRequest

__all__ = ["ValidOffload", "check_logits", "validate_offload"]

_PATH = "OffloadRequest"


@dataclass(frozen=True)
class ValidOffload:
    """A request that passed every check, with its activation decoded."""

    request: OffloadRequest
    info: ModelInfo
    activation: np.ndarray  # float32, shape (1, *info.activation_shape(request.cut)), all finite
    extra: tuple[ModelInfo, ...] = ()  # the request's extra models, each sharing the front [0, cut)


def validate_offload(
    request: OffloadRequest,
    models: Mapping[str, ModelInfo],
    *,
    accepted_codecs: Collection[Codec] = tuple(Codec),
) -> ValidOffload:
    """The request decoded, or ModelError (unknown model) / WireError (any other field) naming it."""
    info = models.get(request.model)
    if info is None:
        served = ", ".join(repr(m) for m in sorted(models)) or "none"
        raise ModelError(f"{_PATH}.model: expected a model this broker serves ({served}), got {request.model!r}")

    n = info.n_stages
    if not 0 <= request.cut < n:
        raise WireError(
            f"{_PATH}.cut: expected 0..{n - 1} for model {info.name!r} (cut {n} runs the whole model on "
            f"the device and is never offloaded), got {request.cut}"
        )

    t = request.activation
    if t.codec not in accepted_codecs:
        accepted = ", ".join(c.value for c in Codec if c in accepted_codecs)
        raise WireError(f"{_PATH}.activation.codec: expected one of {accepted}, got {t.codec.value}")
    prior = info.symbol_prior(request.cut)
    if t.codec is Codec.ANS:
        if prior is None:
            raise WireError(
                f"{_PATH}.activation.codec: ans carries only a bottleneck's quantised code; cut {request.cut} "
                f"of model {info.name!r} is a plain activation (send fp32, fp16 or int8)"
            )
        if t.prior_digest != prior.digest:
            raise WireError(
                f"{_PATH}.activation.prior_digest: this broker's {info.name!r} codes cut {request.cut} with prior "
                f"{prior.digest!r}, the device used {t.prior_digest!r}: the device runs other weights of the model "
                "(update the device's model or send int8)"
            )

    expected = (1, *info.activation_shape(request.cut))
    if tuple(t.shape) != expected:
        raise WireError(
            f"{_PATH}.activation.shape: expected {list(expected)} for model {info.name!r} at cut "
            f"{request.cut} (one window, batch dimension first), got {list(t.shape)}"
        )

    try:
        x = decode(t, prior)  # checks the payload length and the int8 scale / zero point first
    except CodecError as e:
        raise WireError(f"{_PATH}.activation.data: {e}") from None
    finite = np.isfinite(x)
    if not finite.all():
        n_nan = int(np.isnan(x).sum())
        n_inf = int(x.size - finite.sum()) - n_nan
        raise WireError(
            f"{_PATH}.activation.data: expected finite numbers after {t.codec.value} decoding, got "
            f"{n_nan} NaN and {n_inf} inf among {x.size} values"
        )
    extra = tuple(_shared_task(request, models, info, m) for m in request.extra_models)
    return ValidOffload(request=request, info=info, activation=x, extra=extra)


def check_logits(logits: np.ndarray, info: ModelInfo, cut: int) -> np.ndarray:
    """The tail's logits of one window as float32, if they are info.num_classes finite numbers.

    TailUnavailableError for a wrong shape (the tail's fault), NonFiniteOutputError for NaN or inf
    (the activation's: see the module docstring). Logits travel as float32, so a float64 logit past
    float32's range counts as inf.
    """
    shape = list(np.shape(logits))
    if shape != [info.num_classes]:
        raise TailUnavailableError(
            f"the tail of {info.name!r} at cut {cut} returned {shape} logits; expected [{info.num_classes}]"
        )
    with np.errstate(over="ignore", invalid="ignore"):
        out = np.asarray(logits, dtype=np.float32)
    finite = np.isfinite(out)
    if not finite.all():
        n_nan = int(np.isnan(out).sum())
        n_inf = int(out.size - finite.sum()) - n_nan
        raise NonFiniteOutputError(
            f"{_PATH}.activation: the activation at cut {cut} gives non-finite logits for model {info.name!r} "
            f"({n_nan} NaN and {n_inf} inf among {out.size}): its values overflow in the tail; the window "
            "cannot be offloaded as sent (finish it on the device, or send an activation in the model's range)"
        )
    return out


def _shared_task(request: OffloadRequest, models: Mapping[str, ModelInfo], info: ModelInfo, name: str) -> ModelInfo:
    """The ModelInfo of extra model `name`, if it reads exactly the activation `info` gets at the cut
    (splitsense.wire has already capped their number at MAX_EXTRA_MODELS)."""
    other = models.get(name)
    if other is None:
        served = ", ".join(repr(m) for m in sorted(models)) or "none"
        raise ModelError(f"{_PATH}.extra_models: expected models this broker serves ({served}), got {name!r}")
    k = request.cut
    if (
        k >= other.n_stages
        or other.activation_shape(k) != info.activation_shape(k)
        or k >= len(other.front_digests)
        or k >= len(info.front_digests)
        or other.front_digests[k] != info.front_digests[k]
    ):
        raise WireError(
            f"{_PATH}.extra_models: model {name!r} does not share stages [0, {k}) with {info.name!r}, so the "
            f"activation at cut {k} is not its input there (send it its own window)"
        )
    return other
