"""`splitsense controller plan` and `splitsense bench plan` on saved snapshots and synthetic
catalogs (no Prometheus, no Redis, no sockets)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cloud.controller.metrics_source import ClassSnapshot, FleetSnapshot
from pipelines.catalog import CodecEntry, LevelEntry, ModelCatalog, save_catalog
from pipelines.codecs import Codec
from pipelines.devices import DEVICE_CLASSES
from pipelines.models import MODEL_SPECS
from splitsense.cli import app

runner = CliRunner()


def _catalog(name: str) -> ModelCatalog:
    n = 3
    return ModelCatalog(
        model=name,
        stage_names=("a", "b", "c"),
        stage_latency_ms=(2.0, 2.0, 2.0),
        stage_macs=(1, 1, 1),
        stage_params=(10, 10, 10),
        activation_shapes=((1000,), (1000,), (100,), (10,)),
        result_bytes=40,
        window_s=1.0,
        base_accuracy=0.9,
        levels=(LevelEntry(1.0, (0.0, 2.0, 4.0, 6.0), (0, 10, 20, 30), (0.9,) * (n + 1)),),
        codecs=(CodecEntry(Codec.FP32, (4000, 4000, 400, 0), (0.9,) * (n + 1)),),
    )


@pytest.fixture
def scenario(tmp_path: Path) -> Path:
    """A scenario file whose weights_dir holds a synthetic catalog of every model."""
    for name in MODEL_SPECS:
        save_catalog(_catalog(name), tmp_path)
    path = tmp_path / "scenario.json"
    path.write_text(json.dumps({"paths": {"weights_dir": str(tmp_path)}}))
    return path


def test_controller_plan_json_from_a_snapshot_prints_every_row_with_its_reason(scenario: Path, tmp_path: Path) -> None:
    snap = FleetSnapshot(
        1, "saved", 60.0, classes=(ClassSnapshot("phone", rtt_p50_ms=30.0, offload_windows=50, failure_rate=0.9),)
    )
    path = snap.save(tmp_path / "snap.json")
    result = runner.invoke(app, ["controller", "plan", "--json", "--snapshot", str(path), "-c", str(scenario)])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["source"] == "saved" and out["stored"] is False
    plans = out["plan_set"]["plans"]
    # every model and the one task group (speaker + digit share an encoder) x every device class
    assert len(plans) == (len(MODEL_SPECS) + 1) * len(DEVICE_CLASSES)
    assert "fsdd_speaker+fsdd_digit" in {p["model"] for p in plans}
    assert {p["device_class"] for p in plans} == {"phone", "iot_board", "watch", "sensor_node"}
    assert all(r["reason"] for p in plans for r in p["rows"])
    phone = [r for p in plans if p["device_class"] == "phone" for r in p["rows"]]
    assert all(r["cut"] == 3 and r["reason"].startswith("local only (cloud failure rate 90%") for r in phone)
    classes = {c["device_class"]: c for c in out["inputs"]["classes"]}
    assert classes["phone"]["rtt_ms"] == 30.0 and classes["watch"]["rtt_source"] == "prior (no reports)"


def test_controller_plan_table_and_bad_arguments(scenario: Path, tmp_path: Path) -> None:
    path = FleetSnapshot(1, "saved", 60.0).save(tmp_path / "snap.json")
    table = runner.invoke(app, ["controller", "plan", "--snapshot", str(path), "-c", str(scenario)])
    assert table.exit_code == 0, table.output
    assert "uci_har on phone" in table.stdout and "least latency" in table.stdout
    both = runner.invoke(app, ["controller", "plan", "--snapshot", str(path), "--prometheus", "http://x:9090"])
    assert both.exit_code == 2 and "alternatives" in " ".join(both.output.split())
    missing = runner.invoke(app, ["controller", "plan", "--snapshot", str(tmp_path / "nope.json"), "-c", str(scenario)])
    said = " ".join(missing.output.split())  # rich wraps long lines
    assert missing.exit_code == 2 and "does not exist" in said and "Traceback" not in said


def test_bench_plan_json(scenario: Path) -> None:
    result = runner.invoke(app, ["bench", "plan", "--json", "--repeats", "3", "-c", str(scenario)])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert set(out) == {"replan_ms", "rows", "config"} and out["rows"] == len(MODEL_SPECS) * len(DEVICE_CLASSES) * 20
    assert out["config"]["repeats"] == 3 and out["replan_ms"] > 0
    bad = runner.invoke(app, ["bench", "plan", "--repeats", "0"])
    assert bad.exit_code == 2 and "--repeats must be >= 1" in " ".join(bad.output.split())
