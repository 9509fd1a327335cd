"""cloud.plans: the static plan set served until the controller publishes."""

from __future__ import annotations

import math

import pytest

from cloud.backend import ModelInfo
from cloud.plans import STATIC_PLAN_VERSION, static_plan_set
from pipelines.codecs import Codec
from splitsense.config import BrokerConfig
from splitsense.errors import ConfigError
from splitsense.plan import BatteryState

MODELS = {
    "a": ModelInfo("a", 3, 4, (2,), ((2,), (3,), (4,), (4,))),
    "b": ModelInfo("b", 5, 2, (2,), tuple((2,) for _ in range(6))),
}


def test_one_plan_per_model_and_class_one_row_per_battery_state() -> None:
    cfg = BrokerConfig(static_plan_cut=1, static_plan_cuts={"b": 4}, static_plan_codec="fp16")
    ps = static_plan_set(cfg, MODELS, created_unix_ms=123)
    assert ps.version == STATIC_PLAN_VERSION and ps.created_unix_ms == 123
    assert len(ps.plans) == len(MODELS) * len(cfg.static_plan_device_classes)
    for device_class in cfg.static_plan_device_classes:
        plan_a, plan_b = ps.get("a", device_class), ps.get("b", device_class)
        assert plan_a is not None and plan_b is not None
        assert {r.battery for r in plan_a.rows} == set(BatteryState)
        for bw in (0.0, 3.0, math.inf):
            for frac in (0.05, 0.9):
                row = plan_a.lookup(bw, frac, 0.2)
                assert row.cut == 1 and row.codec is Codec.FP16
                assert plan_b.lookup(bw, frac, 0.2).cut == 4
        assert "static" in plan_a.rows[0].reason


def test_fully_local_cut_is_allowed() -> None:
    ps = static_plan_set(BrokerConfig(static_plan_cuts={"a": 3}), MODELS)
    assert ps.get("a", "phone").rows[0].cut == 3  # type: ignore[union-attr]


def test_bad_cuts_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="out of range for model 'a'"):
        static_plan_set(BrokerConfig(static_plan_cut=4), MODELS)
    with pytest.raises(ConfigError, match="does not serve"):
        static_plan_set(BrokerConfig(static_plan_cuts={"zzz": 1}), MODELS)
