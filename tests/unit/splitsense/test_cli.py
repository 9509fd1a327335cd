"""The CLI answers bad input with one clear line and exit code 2, never a traceback."""

from __future__ import annotations

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
