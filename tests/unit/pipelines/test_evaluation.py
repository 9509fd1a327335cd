"""`models eval` on the shipped inertial model: the issue's numbers hold, and the JSON has its shape."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from pipelines import codecs
from pipelines.evaluation import accuracy_with_codec, compression_cut, evaluate_model
from pipelines.training import held_out_set, load_trained


@pytest.fixture(scope="module")
def report() -> dict[str, Any]:
    return evaluate_model("uci_har", repeats=3)


def test_accuracy_and_cut_table(report: dict[str, Any]) -> None:
    assert report["accuracy"] >= 0.93 and report["n_test"] == 950
    cuts = report["cuts"]
    assert [c["index"] for c in cuts] == list(range(7))  # 6 stages: encoder, decoder, conv4, fc1, fc2, classifier
    assert [c["name"] for c in cuts[:3]] == ["input", "encoder", "decoder"]
    for c in cuts:
        assert set(c) >= {"index", "name", "activation_bytes", "front_macs", "front_params", "host_latency_ms"}
    assert cuts[0]["front_macs"] == 0 and cuts[-1]["front_macs"] == report["total_macs"]


def test_rlc_halves_the_front_within_two_points_on_test(report: dict[str, Any]) -> None:
    # The ranks meet a 1-point budget on the calibration slice of the training split; on the
    # subject-disjoint test split the split-aware uci_har loses 1.7 points there (the catalog records
    # it per level, so the planner plans with the test figure, not the budget).
    c = report["compressed"]
    assert c["front_params"] * 2 <= c["front_params_uncompressed"]
    assert report["accuracy"] - c["accuracy"] <= 0.02 + 1e-9


def test_int8_codec_budget(report: dict[str, Any]) -> None:
    int8 = report["codecs"]["int8"]
    assert int8["worst_bytes_ratio"] <= 0.26
    assert report["accuracy"] - int8["worst_accuracy"] <= 0.005 + 1e-9
    assert report["codecs"]["fp16"]["worst_bytes_ratio"] == 0.5


def test_fp32_codec_is_exact_at_every_cut() -> None:
    tm = load_trained("uci_har")
    x, y = held_out_set(tm)
    x, y = x[:64], y[:64]
    with torch.no_grad():
        full = (tm.model(x).argmax(1) == y).float().mean().item()
    for k in range(tm.model.n_stages):
        assert accuracy_with_codec(tm.model, x, y, k, codecs.Codec.FP32) == pytest.approx(full)


def test_compression_cut_is_the_smallest_interior_activation() -> None:
    m = load_trained("uci_har").model
    # Index 6 is fully local (nothing crosses) and never chosen; ties go to the shallowest cut.
    assert compression_cut(m, [100, 50, 10, 10, 10, 10, 1]) == 2
    assert compression_cut(m, [100, 50, 60, 10, 10, 9, 0]) == 5


def test_bottleneck_entry_is_lossless_and_smaller_than_the_input(report: dict[str, Any]) -> None:
    b = report["bottleneck"]
    prior = load_trained("uci_har").model.symbol_prior(1)
    assert prior is not None
    assert b["cut"] == 1 and b["codec"] == "ans" and b["prior_digest"] == prior.digest
    assert b["accuracy"] == b["accuracy_local"] == report["accuracy"]  # ans carries the code exactly
    assert 0 < b["bytes"] < b["input_bytes"] and b["bytes_vs_input"] == pytest.approx(
        b["bytes"] / b["input_bytes"], abs=1e-4
    )
    assert b["code_shape"] == [8, 32] and 0 < b["front_share_of_total"] < 1
    kinds = {r["kind"] for r in report["sc2"]}
    assert {"input", "plain cut", "bottleneck", "local", "plain cut (teacher)", "local (teacher)"} <= kinds
    (row,) = [r for r in report["sc2"] if r["kind"] == "bottleneck"]
    assert row["bytes"] == b["bytes"] and row["accuracy"] == b["accuracy"]
