"""How many tail replicas Serve runs and where: ServingConfig's autoscaling and placement fields,
as start_serving hands them to each tail deployment (tests/integration/cloud/test_multinode.py
runs them on a real two-node cluster)."""

from __future__ import annotations

from typing import Any

import pytest

from cloud.serving import TailReplica, _deployment_options
from splitsense.config import Config, ServingConfig
from splitsense.errors import ConfigError


def test_defaults_keep_a_fixed_replica_count_and_serves_own_placement() -> None:
    cfg = ServingConfig()
    assert not cfg.autoscaling and cfg.max_replicas_per_node is None
    options = _deployment_options(cfg)
    assert options["num_replicas"] == cfg.num_replicas
    assert "autoscaling_config" not in options and "max_replicas_per_node" not in options


def test_autoscaling_replaces_the_fixed_count_and_starts_from_num_replicas_within_bounds() -> None:
    cfg = ServingConfig(
        autoscaling=True,
        num_replicas=5,
        min_replicas=2,
        max_replicas=3,
        target_ongoing_requests=1.5,
        upscale_delay_s=1.0,
        downscale_delay_s=3.0,
        look_back_period_s=2.0,
        metrics_interval_s=0.5,
        max_replicas_per_node=2,
    )
    options = _deployment_options(cfg)
    assert "num_replicas" not in options  # Serve refuses both
    assert options["autoscaling_config"] == {
        "min_replicas": 2,
        "max_replicas": 3,
        "initial_replicas": 3,  # num_replicas 5, clamped to max
        "target_ongoing_requests": 1.5,
        "upscale_delay_s": 1.0,
        "downscale_delay_s": 3.0,
        "look_back_period_s": 2.0,
        "metrics_interval_s": 0.5,
    }
    assert options["max_replicas_per_node"] == 2
    low = _deployment_options(ServingConfig(autoscaling=True, num_replicas=1, min_replicas=2, max_replicas=4))
    assert low["autoscaling_config"]["initial_replicas"] == 2


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Serve's own, for metrics_interval_s
def test_serve_accepts_the_options_it_is_given() -> None:
    serve = pytest.importorskip("ray.serve")
    scaled = ServingConfig(autoscaling=True, min_replicas=1, max_replicas=3, max_replicas_per_node=1)
    d = serve.deployment(**_deployment_options(scaled))(TailReplica)
    a = d._deployment_config.autoscaling_config
    assert (a.min_replicas, a.max_replicas, a.target_ongoing_requests) == (1, 3, 1.0)
    assert (a.upscale_delay_s, a.downscale_delay_s, a.metrics_interval_s) == (10.0, 60.0, 2.0)
    assert d._replica_config.max_replicas_per_node == 1
    fixed = serve.deployment(**_deployment_options(ServingConfig(num_replicas=2)))(TailReplica)
    assert fixed.num_replicas == 2 and fixed._deployment_config.autoscaling_config is None


def test_scenario_files_set_them_and_bad_values_name_the_field() -> None:
    cfg = Config.from_dict({"serving": {"autoscaling": True, "max_replicas": 3, "max_replicas_per_node": 1}}).serving
    assert cfg.autoscaling and cfg.max_replicas == 3 and cfg.max_replicas_per_node == 1
    bad: dict[str, Any]
    for bad in (
        {"autoscaling": "yes"},
        {"min_replicas": 0},  # a cold replica takes seconds: never scale a tail to zero
        {"max_replicas": 1.5},
        {"min_replicas": 3, "max_replicas": 2},
        {"max_replicas_per_node": 0},
        {"max_replicas_per_node": True},
        {"target_ongoing_requests": 0},
        {"upscale_delay_s": -1},
        {"downscale_delay_s": float("nan")},
        {"metrics_interval_s": 0},
        {"look_back_period_s": 2.0, "metrics_interval_s": 2.0},
    ):
        with pytest.raises(ConfigError, match="serving"):
            ServingConfig(**bad)
