"""The CLI answers bad input with one clear line and exit code 2, never a traceback."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from splitsense.cli import app

runner = CliRunner()


def test_help_lists_the_command_groups() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    assert "models" in result.output


def test_unknown_model_is_a_clear_error() -> None:
    result = runner.invoke(app, ["models", "eval", "--model", "resnet50"])
    assert result.exit_code == 2
    assert "unknown model 'resnet50'" in result.output
    assert "Traceback" not in result.output


def test_unknown_model_for_training() -> None:
    result = runner.invoke(app, ["models", "train", "--model", "nope"])
    assert result.exit_code == 2
    assert "known models" in result.output


def test_simulate_knows_the_cloud_input_policy() -> None:
    result = runner.invoke(app, ["simulate", "--policy", "upload_everything"], env={"COLUMNS": "200"})
    assert result.exit_code == 2
    assert "unknown simulator policy 'upload_everything'" in result.output and "cloud_input" in result.output
    assert "Traceback" not in result.output
    assert "cloud_input" in runner.invoke(app, ["simulate", "--help"], env={"COLUMNS": "200"}).output


def test_data_export_recording_writes_what_a_device_replays(tmp_path: Path) -> None:
    out = tmp_path / "har.npz"
    result = runner.invoke(
        app, ["data", "export-recording", "-m", "uci_har", "--windows", "7", "-o", str(out), "--json"]
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["dataset"] == "uci_har" and summary["models"] == ["uci_har"] and summary["windows"] == 7
    assert summary["bytes"] == out.stat().st_size
    from edge.sources import load_recording

    assert len(load_recording(out)) == 7
    bad = runner.invoke(app, ["data", "export-recording", "-o", str(out)])
    assert bad.exit_code == 2 and "--model or --dataset" in bad.output


def test_the_data_paths_default_to_the_data_package_and_say_what_is_missing(tmp_path: Path) -> None:
    from splitsense.config import ASSETS_HINT, PathsConfig, assets_root, missing_asset

    root = assets_root()
    assert root is not None and root.name == "splitsense_assets"
    paths = PathsConfig()
    assert paths.data_dir == root / "data" and paths.weights_dir == root / "weights"
    assert (paths.weights_dir / "uci_har.safetensors").is_file()
    msg = missing_asset("data file", tmp_path / "x.npz")
    assert str(tmp_path / "x.npz") in msg and ASSETS_HINT in msg and "pip install -e assets" in msg
    # a scenario file still points them anywhere
    from splitsense.config import Config

    cfg = Config.from_dict({"paths": {"data_dir": str(tmp_path)}})
    assert cfg.paths.data_dir == tmp_path and cfg.paths.weights_dir == paths.weights_dir
