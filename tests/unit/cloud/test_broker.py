"""cloud.broker's error mapping: each error of ours to a gRPC status and a fixed metric reason.

No server here (tests/integration/cloud/test_broker*.py run the real one).
"""

from __future__ import annotations

import grpc
import pytest

from cloud.backend import TailUnavailableError
from cloud.broker import reason_of, status_of
from cloud.metrics import ErrorReason
from edge.transport import error_from_status
from splitsense.errors import (
    BrokerUnavailableError,
    ModelError,
    NonFiniteOutputError,
    OffloadDeadlineError,
    RejectedError,
    ShedError,
    WireError,
)

CASES = [
    (RejectedError("no token", code="UNAUTHENTICATED"), grpc.StatusCode.UNAUTHENTICATED, ErrorReason.AUTH),
    (RejectedError("not yours", code="PERMISSION_DENIED"), grpc.StatusCode.PERMISSION_DENIED, ErrorReason.AUTH),
    (WireError("OffloadRequest.cut: ..."), grpc.StatusCode.INVALID_ARGUMENT, ErrorReason.INVALID_REQUEST),
    (NonFiniteOutputError("NaN logits"), grpc.StatusCode.INVALID_ARGUMENT, ErrorReason.NON_FINITE_OUTPUT),
    (ModelError("no such model"), grpc.StatusCode.NOT_FOUND, ErrorReason.UNKNOWN_MODEL),
    (ShedError("full", 120.0), grpc.StatusCode.RESOURCE_EXHAUSTED, ErrorReason.SHED),
    (OffloadDeadlineError("late"), grpc.StatusCode.DEADLINE_EXCEEDED, ErrorReason.DEADLINE),
    (TailUnavailableError("replica died"), grpc.StatusCode.UNAVAILABLE, ErrorReason.BACKEND_UNAVAILABLE),
    (RuntimeError("a bug"), grpc.StatusCode.INTERNAL, ErrorReason.INTERNAL),
]


@pytest.mark.parametrize(
    ("error", "code", "reason"), CASES, ids=[type(c[0]).__name__ + str(i) for i, c in enumerate(CASES)]
)
def test_each_error_has_one_status_and_one_reason(
    error: BaseException, code: grpc.StatusCode, reason: ErrorReason
) -> None:
    assert status_of(error)[0] is code
    assert reason_of(error) is reason


def test_a_tail_output_that_overflows_is_rejected_not_unavailable() -> None:
    """Finding 1 of issue 10: the device must count it as "rejected" (finish locally, breaker
    untouched), never as "the cloud is down"."""
    code, message, retry = status_of(NonFiniteOutputError("OffloadRequest.activation: ... non-finite logits"))
    assert code is grpc.StatusCode.INVALID_ARGUMENT and retry == 0
    on_device = error_from_status(code, message)
    assert isinstance(on_device, RejectedError) and not isinstance(on_device, BrokerUnavailableError)
    assert on_device.code == "INVALID_ARGUMENT"
