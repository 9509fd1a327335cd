"""The device transport decodes a plan set once per distinct message and process."""

from __future__ import annotations

import math

import pytest

from edge.transport import _plan_set
from splitsense import wire
from splitsense.errors import BrokerUnavailableError
from splitsense.kinds import Codec
from splitsense.plan import BatteryState, Objective, Plan, PlanRow, PlanSet
from splitsense.v1 import offload_pb2 as pb


def plan_set(version: int, cut: int = 2) -> PlanSet:
    row = PlanRow(
        min_bandwidth_mbps=0.0,
        max_bandwidth_mbps=math.inf,
        battery=BatteryState.NORMAL,
        cut=cut,
        codec=Codec.FP16,
        reason="test",
        predicted_latency_ms=1.0,
        predicted_energy_mj=1.0,
    )
    plan = Plan(model="m", device_class="phone", rows=(row,), objective=Objective.LATENCY)
    return PlanSet(version=version, plans=(plan,), created_unix_ms=1, reason=f"v{version}")


def test_devices_that_receive_the_same_message_share_one_plan_set() -> None:
    data = wire.to_pb(plan_set(5)).SerializeToString()
    first = _plan_set(pb.PlanSet.FromString(data))  # two devices, two messages off the wire
    second = _plan_set(pb.PlanSet.FromString(data))
    assert first is second and first == plan_set(5)
    other = _plan_set(wire.to_pb(plan_set(5, cut=3)))
    assert other is not first and other.plans[0].rows[0].cut == 3


def test_a_malformed_plan_set_is_the_brokers_fault_every_time() -> None:
    bad = wire.to_pb(plan_set(6))
    bad.version = 0  # versions start at 1
    for _ in range(2):  # never remembered
        with pytest.raises(BrokerUnavailableError, match="malformed plan set"):
            _plan_set(bad)
