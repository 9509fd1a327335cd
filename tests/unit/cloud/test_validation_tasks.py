"""cloud.validation: a window's extra models (tasks sharing its front) are checked before any tail runs."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from cloud.backend import ModelInfo
from cloud.validation import validate_offload
from pipelines.codecs import Codec, encode
from splitsense.errors import ModelError, WireError
from splitsense.wire import DeviceEstimates, OffloadRequest, RadioKind

BASE = ModelInfo(
    name="speaker",
    n_stages=3,
    num_classes=6,
    input_shape=(2, 8),
    activation_shapes=((2, 8), (4, 8), (16,), (6,)),
    front_digests=("in", "enc", "spk2", "spk3"),
)
DIGIT = dataclasses.replace(
    BASE,
    name="digit",
    num_classes=10,
    activation_shapes=((2, 8), (4, 8), (16,), (10,)),
    front_digests=("in", "enc", "dig2", "dig3"),
)
OTHER = dataclasses.replace(BASE, name="other", front_digests=("in", "other-enc", "o2", "o3"))
MODELS = {m.name: m for m in (BASE, DIGIT, OTHER)}


def request(cut: int, extra: tuple[str, ...]) -> OffloadRequest:
    shape = (1, *BASE.activation_shapes[cut])
    return OffloadRequest(
        window_id="w",
        model="speaker",
        cut=cut,
        device_id="d",
        device_class="watch",
        estimates=DeviceEstimates(1.0, 20.0, 1.0, True, RadioKind.WIFI),
        plan_version=1,
        activation=encode(np.ones(shape, dtype=np.float32), Codec.FP32),
        sent_unix_ms=1,
        extra_models=extra,
    )


def test_a_task_sharing_the_front_rides_along() -> None:
    valid = validate_offload(request(1, ("digit",)), MODELS)
    assert [i.name for i in valid.extra] == ["digit"]


def test_a_task_with_another_front_is_refused_naming_the_field() -> None:
    with pytest.raises(WireError, match=r"OffloadRequest.extra_models: model 'other' does not share stages \[0, 1\)"):
        validate_offload(request(1, ("other",)), MODELS)


def test_past_the_shared_front_nothing_rides_along() -> None:
    with pytest.raises(WireError, match="does not share stages"):
        validate_offload(request(2, ("digit",)), MODELS)


def test_an_unknown_extra_model_is_not_found() -> None:
    with pytest.raises(ModelError, match="extra_models"):
        validate_offload(request(1, ("nope",)), MODELS)


def test_duplicates_or_the_main_model_are_refused_by_the_wire_type() -> None:
    with pytest.raises(WireError, match="extra_models"):
        request(1, ("digit", "digit"))
    with pytest.raises(WireError, match="extra_models"):
        request(1, ("speaker",))
