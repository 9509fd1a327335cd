"""bench tail: both engines measured on real activations, their logits compared."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.tail_engines import TailBenchConfig, parse_batches, rows_for_table, run_tail_bench
from splitsense.errors import ConfigError
from tests.unit.conftest import EXPORTED_MODEL

pytest.importorskip("onnxruntime")


def test_each_row_measures_both_engines_and_compares_their_logits(uci_har_export: Path) -> None:
    bench = TailBenchConfig(models=(EXPORTED_MODEL,), batches=(1, 3), cuts=(1, 2), seconds=0.05)
    out = run_tail_bench(bench, export_root=uci_har_export)
    rows = out["results"]
    assert [(r["cut"], r["batch"]) for r in rows] == [(1, 1), (1, 3), (2, 1), (2, 3)]
    for r in rows:
        assert r["torch_us"] > 0 and r["onnx_us"] > 0
        assert r["speedup"] == pytest.approx(r["torch_us"] / r["onnx_us"], rel=0.02)
        assert r["max_abs_diff"] < 1e-4 and r["argmax_agree"] == 1.0
    assert out["summary"]["argmax_agree_min"] == 1.0
    assert len(rows_for_table(out)) == 4


def test_without_an_export_it_says_how_to_make_one(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="tail_engine onnx cannot run"):
        run_tail_bench(TailBenchConfig(models=(EXPORTED_MODEL,)), export_root=tmp_path)


def test_batches_are_checked() -> None:
    assert parse_batches("1, 4,16") == (1, 4, 16)
    for bad in ("", "0", "a,b"):
        with pytest.raises(ConfigError, match="--batches"):
            parse_batches(bad)
