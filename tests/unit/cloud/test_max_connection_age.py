"""broker.max_connection_age_s / max_connection_age_grace_s: validation, and the gRPC server options."""

from __future__ import annotations

import math
from typing import Any

import pytest

from cloud.broker import server_options
from splitsense.config import BrokerConfig
from splitsense.errors import ConfigError


def test_connections_are_aged_by_default_and_0_turns_it_off() -> None:
    cfg = BrokerConfig()
    assert (cfg.max_connection_age_s, cfg.max_connection_age_grace_s) == (60.0, 10.0)
    options = dict(server_options(cfg))
    assert options["grpc.max_connection_age_ms"] == 60_000
    assert options["grpc.max_connection_age_grace_ms"] == 10_000
    assert options["grpc.so_reuseport"] == 0
    assert options["grpc.max_receive_message_length"] == cfg.max_receive_message_bytes

    off = dict(server_options(BrokerConfig(max_connection_age_s=0)))
    assert "grpc.max_connection_age_ms" not in off and "grpc.max_connection_age_grace_ms" not in off


def test_the_options_are_whole_milliseconds() -> None:
    options = dict(server_options(BrokerConfig(max_connection_age_s=1.5, max_connection_age_grace_s=0.25)))
    assert options["grpc.max_connection_age_ms"] == 1500
    assert options["grpc.max_connection_age_grace_ms"] == 250
    tiny = dict(server_options(BrokerConfig(max_connection_age_s=0.001, max_connection_age_grace_s=0.001)))
    assert tiny["grpc.max_connection_age_ms"] == 1 and tiny["grpc.max_connection_age_grace_ms"] == 1


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_connection_age_s", -1),
        ("max_connection_age_s", 0.0001),  # under a millisecond: gRPC could not take it
        ("max_connection_age_s", math.inf),
        ("max_connection_age_s", math.nan),
        ("max_connection_age_s", 3e6),  # over gRPC's int32 milliseconds
        ("max_connection_age_s", True),
        ("max_connection_age_s", "60"),
        ("max_connection_age_grace_s", 0),  # a grace of nothing would cut every window in flight
        ("max_connection_age_grace_s", -5),
        ("max_connection_age_grace_s", math.nan),
        ("max_connection_age_grace_s", None),
    ],
)
def test_bad_ages_are_refused_naming_the_key(field: str, value: Any) -> None:
    with pytest.raises(ConfigError, match=f"broker.{field}"):
        BrokerConfig(**{field: value})


def test_an_int_number_of_seconds_is_fine() -> None:
    cfg = BrokerConfig(max_connection_age_s=120, max_connection_age_grace_s=30)
    assert dict(server_options(cfg))["grpc.max_connection_age_ms"] == 120_000
