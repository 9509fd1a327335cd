"""splitsense.plan: validation, lookup at bucket edges, battery states, JSON round trips."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from pipelines.codecs import Codec
from splitsense.errors import PlanError
from splitsense.plan import BatteryState, Objective, Plan, PlanRow, PlanSet, battery_state

REPO = Path(__file__).resolve().parents[3]


def row(lo: float, hi: float, cut: int = 1, battery: BatteryState | str = BatteryState.NORMAL, **kw: object) -> PlanRow:
    args: dict[str, object] = dict(
        min_bandwidth_mbps=lo,
        max_bandwidth_mbps=hi,
        battery=battery,
        cut=cut,
        codec=Codec.INT8,
        reason=f"cut {cut} is cheapest for {lo}-{hi} Mbit/s",
        predicted_latency_ms=12.5,
        predicted_energy_mj=3.25,
        compression_energy_kept=0.9,
    )
    args.update(kw)
    return PlanRow(**args)  # type: ignore[arg-type]


LOW = BatteryState.LOW


def make_plan(**kw: object) -> Plan:
    args: dict[str, object] = dict(
        model="har_cnn",
        device_class="phone",
        rows=(
            row(0, 1, 6),
            row(1, 5, 3),
            row(5, math.inf, 0),
            row(0, 2, 6, LOW),
            row(2, math.inf, 2, LOW),
        ),
        objective=Objective.LATENCY,
    )
    args.update(kw)
    return Plan(**args)  # type: ignore[arg-type]


def make_set() -> PlanSet:
    return PlanSet(
        version=7,
        plans=(
            make_plan(),
            make_plan(model="fsdd_speaker", objective=Objective.ENERGY),
            make_plan(device_class="watch", rows=(row(0, math.inf, 6),)),
        ),
        created_unix_ms=1_700_000_000_000,
        reason="bandwidth p50 of phones fell from 8 to 3 Mbit/s",
    )


# --- lookup -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bandwidth", "cut"),
    [
        (0.0, 6),
        (0.999, 6),
        (1.0, 3),  # half-open: the edge belongs to the upper bucket
        (4.999999, 3),
        (5.0, 0),
        (1e9, 0),  # the last bucket is open-ended
        (math.inf, 0),
    ],
)
def test_lookup_normal_battery_at_bucket_edges(bandwidth: float, cut: int) -> None:
    assert make_plan().lookup(bandwidth, 0.9, 0.2).cut == cut


@pytest.mark.parametrize(("bandwidth", "cut"), [(0.0, 6), (1.999, 6), (2.0, 2), (1000.0, 2)])
def test_lookup_low_battery_uses_low_rows(bandwidth: float, cut: int) -> None:
    found = make_plan().lookup(bandwidth, 0.1, 0.2)
    assert found.battery is LOW
    assert found.cut == cut


def test_battery_threshold_is_strict_and_mains_power_is_normal() -> None:
    plan = make_plan()
    assert plan.lookup(3.0, 0.19999, 0.2).battery is LOW
    assert plan.lookup(3.0, 0.2, 0.2).battery is BatteryState.NORMAL
    assert plan.lookup(3.0, 0.05, 0.2, on_battery=False).battery is BatteryState.NORMAL
    assert battery_state(0.0, 0.0) is BatteryState.NORMAL  # threshold 0 never reports LOW


def test_plan_without_low_rows_uses_normal_rows_on_low_battery() -> None:
    plan = make_plan(rows=(row(0, 2, 6), row(2, math.inf, 1)))
    assert plan.lookup(3.0, 0.01, 0.2).cut == 1
    assert plan.rows_for(LOW) == plan.rows_for(BatteryState.NORMAL)


def test_lookup_returns_the_row_with_its_reason() -> None:
    found = make_plan().lookup(2.0, 0.9, 0.2)
    assert found.reason.startswith("cut 3")
    assert (found.codec, found.compression_energy_kept) == (Codec.INT8, 0.9)


@pytest.mark.parametrize(
    ("args", "kwargs", "what"),
    [
        ((-0.1, 0.5, 0.2), {}, "bandwidth_mbps"),
        ((math.nan, 0.5, 0.2), {}, "bandwidth_mbps"),
        ((1.0, 1.5, 0.2), {}, "battery_fraction"),
        ((1.0, 0.5, -0.1), {}, "low_battery_threshold"),
        ((1.0, 0.5, 0.2), {"on_battery": True}, None),
    ],
)
def test_lookup_rejects_impossible_estimates(args: tuple[float, float, float], kwargs: dict, what: str | None) -> None:
    plan = make_plan()
    if what is None:
        plan.lookup(*args, **kwargs)
        return
    with pytest.raises(PlanError, match=what):
        plan.lookup(*args, **kwargs)


# --- validation -------------------------------------------------------------------------------


def test_rows_are_kept_in_canonical_order() -> None:
    plan = make_plan()
    shuffled = make_plan(rows=tuple(reversed(plan.rows)))
    assert shuffled == plan
    assert [r.battery for r in plan.rows] == [BatteryState.NORMAL] * 3 + [LOW] * 2
    assert [r.min_bandwidth_mbps for r in plan.rows[:3]] == [0, 1, 5]


@pytest.mark.parametrize(
    ("rows", "what"),
    [
        ((row(0, 1, 6), row(2, math.inf, 0)), "gap"),
        ((row(0, 3, 6), row(2, math.inf, 0)), "overlap"),
        ((row(1, math.inf, 6),), "must start at 0"),
        ((row(0, 1, 6), row(1, 50, 0)), "open-ended"),
        ((row(0, math.inf, 6, LOW),), "no rows for battery state 'normal'"),
        ((), "no rows for battery state 'normal'"),
        ((row(0, math.inf, 6), row(0, 2, 6, LOW), row(3, math.inf, 1, LOW)), "battery low.*gap"),
    ],
)
def test_plan_rejects_buckets_that_do_not_tile(rows: tuple[PlanRow, ...], what: str) -> None:
    with pytest.raises(PlanError, match=what):
        make_plan(rows=rows)


@pytest.mark.parametrize(
    ("kw", "what"),
    [
        ({"min_bandwidth_mbps": -1}, "min_bandwidth_mbps"),
        ({"max_bandwidth_mbps": 0}, "max_bandwidth_mbps must be > min"),
        ({"max_bandwidth_mbps": math.nan}, "max_bandwidth_mbps"),
        ({"battery": "empty"}, "PlanRow.battery"),
        ({"cut": -1}, "PlanRow.cut"),
        ({"cut": True}, "PlanRow.cut"),
        ({"cut": 2.0}, "PlanRow.cut"),
        ({"codec": "fp64"}, "PlanRow.codec"),
        ({"reason": ""}, "PlanRow.reason"),
        ({"reason": "   "}, "PlanRow.reason"),
        ({"compression_energy_kept": 0.0}, "compression_energy_kept"),
        ({"compression_energy_kept": 1.01}, "compression_energy_kept"),
        ({"predicted_latency_ms": -1.0}, "predicted_latency_ms"),
        ({"predicted_energy_mj": math.inf}, "predicted_energy_mj"),
    ],
)
def test_plan_row_rejects_bad_values(kw: dict, what: str) -> None:
    with pytest.raises(PlanError, match=what):
        row(0, math.inf, **kw)


def test_plan_row_accepts_enum_values_as_strings() -> None:
    r = row(0, math.inf, 1, battery="low", codec="fp16")
    assert r.battery is LOW and r.codec is Codec.FP16
    assert make_plan(objective="energy").objective is Objective.ENERGY


@pytest.mark.parametrize(
    ("kw", "what"),
    [
        ({"model": ""}, "Plan.model"),
        ({"device_class": None}, "Plan.device_class"),
        ({"objective": "throughput"}, "Plan.objective"),
        ({"rows": ("not a row",)}, r"Plan.rows\[0\]"),
    ],
)
def test_plan_rejects_bad_values(kw: dict, what: str) -> None:
    with pytest.raises(PlanError, match=what):
        make_plan(**kw)


def test_plan_set_validation() -> None:
    good = make_set()
    with pytest.raises(PlanError, match="version"):
        replace(good, version=0)
    with pytest.raises(PlanError, match="created_unix_ms"):
        replace(good, created_unix_ms=-1)
    with pytest.raises(PlanError, match="reason"):
        replace(good, reason="")
    with pytest.raises(PlanError, match=r"plans\[1\].*one plan per"):
        replace(good, plans=(make_plan(), make_plan(objective=Objective.ENERGY)))


def test_plan_set_get_and_select() -> None:
    s = make_set()
    plan = s.get("fsdd_speaker", "phone")
    assert plan is not None and plan.objective is Objective.ENERGY
    assert s.get("fsdd_speaker", "watch") is None
    phones = s.select("phone")
    assert [p.model for p in phones.plans] == ["har_cnn", "fsdd_speaker"]
    assert (phones.version, phones.reason, phones.created_unix_ms) == (s.version, s.reason, s.created_unix_ms)
    assert [p.model for p in s.select("phone", ["har_cnn"]).plans] == ["har_cnn"]
    assert s.select("toaster").plans == ()


# --- JSON -------------------------------------------------------------------------------------


def test_plan_set_round_trips_through_dict_and_strict_json() -> None:
    s = make_set()
    assert PlanSet.from_dict(s.to_dict()) == s
    text = s.to_json()
    assert "Infinity" not in text and "NaN" not in text
    json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert PlanSet.from_json(text) == s
    assert PlanSet.from_json(text.encode()) == s
    assert s.to_dict()["plans"][0]["rows"][2]["max_bandwidth_mbps"] is None


def test_plan_row_round_trips_and_compression_defaults_to_uncompressed() -> None:
    r = row(0, 4.5, 2)
    assert PlanRow.from_dict(r.to_dict()) == r
    d = r.to_dict()
    del d["compression_energy_kept"]
    assert PlanRow.from_dict(d).compression_energy_kept == 1.0


@pytest.mark.parametrize(
    ("mutate", "what"),
    [
        (lambda d: d.update(extra=1), "unknown keys"),
        (lambda d: d.pop("version"), r"missing keys \['version'\]"),
        (lambda d: d.update(plans={}), "PlanSet.plans must be a JSON array"),
        (lambda d: d["plans"].__setitem__(0, 3), r"PlanSet.plans\[0\] must be a JSON object"),
        (lambda d: d["plans"][0]["rows"][0].pop("cut"), r"PlanRow is missing keys \['cut'\]"),
        (lambda d: d["plans"][0]["rows"][0].update(cut="3"), "PlanRow.cut"),
        (lambda d: d["plans"][0]["rows"][0].update(min_bandwidth_mbps="0"), "min_bandwidth_mbps"),
    ],
)
def test_from_dict_names_what_is_wrong(mutate, what: str) -> None:
    d = make_set().to_dict()
    mutate(d)
    with pytest.raises(PlanError, match=what):
        PlanSet.from_dict(d)


def test_from_json_rejects_garbage() -> None:
    with pytest.raises(PlanError, match="not valid JSON"):
        PlanSet.from_json("{")
    with pytest.raises(PlanError, match="JSON object"):
        PlanSet.from_json("[]")


def test_plan_module_is_pure() -> None:
    code = (
        "import sys, splitsense.plan; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('grpc', 'redis', 'ray') "
        "or m.startswith('google.protobuf') or m.startswith('splitsense.v1')]; "
        "assert not bad, bad"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, env=env)
