"""The plan store's pure parts: validation, URL redaction, argument checks (no Redis)."""

from __future__ import annotations

import math

import pytest

from cloud.planstore import EmbeddedRedis, PlanStore, plan_validator, redact_url, validate_plan_set
from pipelines.codecs import Codec
from splitsense.errors import DependencyError, ModelError, PlanError
from splitsense.plan import BatteryState, Objective, Plan, PlanRow, PlanSet


def _set(model: str = "uci_har", cut: int = 2, codec: Codec = Codec.FP16, kept: float = 1.0) -> PlanSet:
    row = PlanRow(
        min_bandwidth_mbps=0.0,
        max_bandwidth_mbps=math.inf,
        battery=BatteryState.NORMAL,
        cut=cut,
        codec=codec,
        compression_energy_kept=kept,
        reason="test",
        predicted_latency_ms=1.0,
        predicted_energy_mj=1.0,
    )
    return PlanSet(1, (Plan(model, "phone", (row,), Objective.LATENCY),), 0, "test")


def test_a_valid_plan_passes() -> None:
    validate_plan_set(_set(cut=0), {"uci_har": 4})
    validate_plan_set(_set(cut=4), {"uci_har": 4})  # k = N: fully local
    plan_validator({"uci_har": 4}, compression_levels={"uci_har": (1.0, 0.7)})(_set(kept=0.7))


@pytest.mark.parametrize(
    ("plan_set", "message"),
    [
        (_set(model="resnet"), "unknown model 'resnet'; known: fsdd_digit, uci_har"),
        (_set(cut=5), r"cut 5 is out of range for 'uci_har': expected 0..4"),
    ],
)
def test_unknown_model_or_cut_is_refused(plan_set: PlanSet, message: str) -> None:
    with pytest.raises(PlanError, match=message):
        validate_plan_set(plan_set, {"uci_har": 4, "fsdd_digit": 5})


def test_codec_and_level_must_be_available() -> None:
    with pytest.raises(PlanError, match="codec 'int8' is not allowed; allowed: fp16, fp32"):
        plan_validator({"uci_har": 4}, codecs=("fp32", "fp16"))(_set(codec=Codec.INT8))
    with pytest.raises(PlanError, match=r"compression level 0.5 is not one of \[0.7, 1.0\]"):
        plan_validator({"uci_har": 4}, compression_levels={"uci_har": (1.0, 0.7)})(_set(kept=0.5))


def test_validator_needs_a_sane_catalog() -> None:
    with pytest.raises(PlanError, match="n_stages >= 1"):
        plan_validator({"uci_har": 0})


async def test_put_refuses_before_touching_redis() -> None:
    # Nothing listens on port 1: a refused plan must fail with PlanError, not with a connection error.
    store = PlanStore("redis://127.0.0.1:1/0", timeout_s=0.2)
    with pytest.raises(PlanError, match="out of range"):
        await store.put(_set(cut=9), plan_validator({"uci_har": 4}))

    def catalog_says_no(_: PlanSet) -> None:
        raise ModelError("no weights for model 'uci_har'")

    with pytest.raises(PlanError, match="plan set refused: no weights"):
        await store.put(_set(), catalog_says_no)
    await store.aclose()


def test_store_arguments_are_checked() -> None:
    with pytest.raises(PlanError, match="history_versions must be an int >= 2"):
        PlanStore("redis://127.0.0.1:1/0", history_versions=1)
    with pytest.raises(DependencyError, match="is not valid"):
        PlanStore("http://127.0.0.1:1/0")


def test_redact_url() -> None:
    assert redact_url("redis://:pw@host:6379/0") == "redis://:***@host:6379/0"
    assert redact_url("rediss://user:pw@host/1") == "rediss://user:***@host/1"
    assert redact_url("redis://host:6379/0") == "redis://host:6379/0"


def test_embedded_redis_without_a_binary_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("cloud.planstore.find_redis_server", lambda: None)
    embedded = EmbeddedRedis()
    with pytest.raises(DependencyError, match=r"pip install 'splitsense\[cloud\]'"):
        embedded.start()
