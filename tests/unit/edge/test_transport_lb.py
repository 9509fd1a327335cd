"""edge/transport.py's load-balancing helpers: the service config and the per-device address order."""

from __future__ import annotations

import json
import random

import pytest

from edge.transport import GrpcTransport, lb_service_config, shuffled_target
from splitsense.config import EdgeConfig
from splitsense.errors import ConfigError


def test_service_config_names_the_policy_and_health_checks_by_default() -> None:
    config = json.loads(lb_service_config("round_robin"))
    assert config == {"loadBalancingConfig": [{"round_robin": {}}], "healthCheckConfig": {"serviceName": ""}}
    assert json.loads(lb_service_config("round_robin", health_check=False)) == {
        "loadBalancingConfig": [{"round_robin": {}}]
    }
    assert json.loads(lb_service_config("pick_first")) == {
        "loadBalancingConfig": [{"pick_first": {"shuffleAddressList": True}}]
    }
    assert json.loads(lb_service_config("pick_first", shuffle=False))["loadBalancingConfig"] == [
        {"pick_first": {"shuffleAddressList": False}}
    ]
    with pytest.raises(ConfigError, match="round_robin"):
        lb_service_config("random")


def test_an_address_list_is_shuffled_per_device_and_anything_else_kept() -> None:
    target = "ipv4:127.0.0.1:5001,127.0.0.1:5002,127.0.0.1:5003"
    orders = {shuffled_target(target, random.Random(seed)) for seed in range(20)}
    assert len(orders) > 1, "devices do not all dial the brokers in one order"
    for order in orders:
        assert order.startswith("ipv4:")
        assert sorted(order[5:].split(",")) == sorted(target[5:].split(","))
    for kept in ("127.0.0.1:5001", "dns:///brokers.example:50051", "ipv4:127.0.0.1:5001", "unix:/tmp/b.sock"):
        assert shuffled_target(kept, random.Random(0)) == kept


def test_the_transport_carries_the_policy_in_its_channel_options() -> None:
    t = GrpcTransport("ipv4:127.0.0.1:5001,127.0.0.1:5002", "token", load_balancing="round_robin")
    options = dict(t._options)
    assert json.loads(options["grpc.service_config"])["loadBalancingConfig"] == [{"round_robin": {}}]
    assert sorted(t.address[5:].split(",")) == ["127.0.0.1:5001", "127.0.0.1:5002"]
    target = "ipv4:127.0.0.1:5001,127.0.0.1:5002"
    fixed = GrpcTransport(target, "t", load_balancing="pick_first", shuffle_addresses=False)
    assert fixed.address == target
    plain = GrpcTransport("127.0.0.1:5001", "token")
    assert "grpc.service_config" not in dict(plain._options)


def test_edge_config_checks_the_policy() -> None:
    assert EdgeConfig().lb_policy == "pick_first"
    assert EdgeConfig(lb_policy="round_robin").lb_policy == "round_robin"
    with pytest.raises(ConfigError, match="edge.lb_policy"):
        EdgeConfig(lb_policy="least_request")
