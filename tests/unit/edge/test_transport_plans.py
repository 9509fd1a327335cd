"""The device transport decodes a plan set once per distinct message and process."""

from __future__ import annotations

import pytest

from edge.transport import _plan_set
from splitsense import wire
from splitsense.errors import BrokerUnavailableError
from splitsense.v1 import offload_pb2 as pb
from tests.unit.edge.test_runtime import plan_set, row


def test_devices_that_receive_the_same_message_share_one_plan_set() -> None:
    data = wire.to_pb(plan_set(5, row(2))).SerializeToString()
    first = _plan_set(pb.PlanSet.FromString(data))  # two devices, two messages off the wire
    second = _plan_set(pb.PlanSet.FromString(data))
    assert first is second and first == plan_set(5, row(2))
    other = _plan_set(wire.to_pb(plan_set(5, row(3))))
    assert other is not first and other.plans[0].rows[0].cut == 3


def test_a_malformed_plan_set_is_the_brokers_fault_every_time() -> None:
    bad = wire.to_pb(plan_set(6, row(2)))
    bad.version = 0  # versions start at 1
    for _ in range(2):  # never remembered
        with pytest.raises(BrokerUnavailableError, match="malformed plan set"):
            _plan_set(bad)
