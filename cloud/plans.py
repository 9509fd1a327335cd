"""The static plan set a broker serves until the controller publishes real ones.

One plan per (served model, device class of `broker.static_plan_device_classes`), each with one
row per battery state covering all bandwidths `[0, inf)`: the model cut at
`broker.static_plan_cuts[model]` (default `broker.static_plan_cut`) with `broker.static_plan_codec`.
The controller (cloud/controller) replaces it with versions from 2 on; this one is version 1.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping

from cloud.backend import ModelInfo
from splitsense.config import BrokerConfig
from splitsense.errors import ConfigError
from splitsense.kinds import parse_codec
from splitsense.plan import BatteryState, Objective, Plan, PlanRow, PlanSet

__all__ = ["STATIC_PLAN_VERSION", "static_plan_set"]

STATIC_PLAN_VERSION = 1


def static_plan_set(
    config: BrokerConfig, models: Mapping[str, ModelInfo], created_unix_ms: int | None = None
) -> PlanSet:
    """The default plan set of a broker serving `models` (ConfigError for a cut a model lacks)."""
    unknown = sorted(set(config.static_plan_cuts) - set(models))
    if unknown:
        raise ConfigError(
            f"broker.static_plan_cuts names models this broker does not serve: {unknown}; served: {sorted(models)}"
        )
    codec = parse_codec(config.static_plan_codec)
    plans = []
    for name, info in models.items():
        cut = config.static_plan_cuts.get(name, config.static_plan_cut)
        if not 0 <= cut <= info.n_stages:
            raise ConfigError(
                f"broker static plan cut {cut} is out of range for model {name!r}: expected 0..{info.n_stages}"
            )
        where = "runs the whole model on the device" if cut == info.n_stages else "offloads stages"
        reason = (
            f"static default from config (cut {cut} {where}"
            + (f" [{cut}, {info.n_stages})" if cut < info.n_stages else "")
            + f", codec {codec.value}) until the controller publishes a plan"
        )
        rows = tuple(
            PlanRow(
                min_bandwidth_mbps=0.0,
                max_bandwidth_mbps=math.inf,
                battery=state,
                cut=cut,
                codec=codec,
                reason=reason,
                predicted_latency_ms=0.0,  # not predicted: no cost model behind a static plan
                predicted_energy_mj=0.0,
            )
            for state in BatteryState
        )
        for device_class in config.static_plan_device_classes:
            plans.append(Plan(model=name, device_class=device_class, rows=rows, objective=Objective.LATENCY))
    return PlanSet(
        version=STATIC_PLAN_VERSION,
        plans=tuple(plans),
        created_unix_ms=int(time.time() * 1000) if created_unix_ms is None else created_unix_ms,
        reason="static plan set from the broker config; no controller has published yet",
    )
