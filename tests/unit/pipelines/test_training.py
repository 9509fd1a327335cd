"""The training path on a small slice, the shipped weights, and their failure messages."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.models import MODEL_SPECS
from pipelines.training import load_trained, save_trained, train_model, train_student_group, weights_path
from splitsense.config import TrainConfig
from splitsense.errors import ModelError


def test_short_teacher_training_run_saves_and_reloads(tmp_path: Path) -> None:
    tm = train_model("uci_har", TrainConfig(batch_size=32), epochs=1, limit=96)
    assert tm.model.stage_names == MODEL_SPECS["uci_har"].build_teacher().stage_names  # a plain (teacher) model
    assert tm.model.symbol_prior(1) is None
    assert tm.meta["train_windows"] == 96 and 0.0 <= tm.meta["test_accuracy"] <= 1.0
    path = weights_path("uci_har", tmp_path, teacher=True)
    assert path.name == "uci_har.teacher.safetensors"
    save_trained(tm, path)
    again = load_trained("uci_har", tmp_path, teacher=True)
    x = torch.randn(2, *again.model.input_shape)
    with torch.no_grad():
        assert torch.allclose(again.model(x), tm.model.eval()(x), atol=1e-6)
    assert again.meta["train_windows"] == 96
    # a teacher is not the served (split-aware) model: its weights at the served path are refused
    save_trained(tm, weights_path("uci_har", tmp_path))
    with pytest.raises(ModelError, match="does not match model 'uci_har'"):
        load_trained("uci_har", tmp_path)


def test_short_student_training_run_saves_and_reloads(tmp_path: Path) -> None:
    shipped = weights_path("uci_har", teacher=True)
    shutil.copy(shipped, weights_path("uci_har", tmp_path, teacher=True))
    (tm,) = train_student_group(("uci_har",), TrainConfig(batch_size=32), epochs=1, limit=96,
                                weights_dir=tmp_path).values()  # fmt: skip
    assert tm.model.stage_names == ["encoder", "decoder", "conv4", "fc1", "fc2", "classifier"]
    assert tm.meta["model"] == "uci_har" and tm.meta["train_windows"] == 96
    assert 0.0 <= tm.meta["test_accuracy"] <= 1.0 and tm.meta["code_shape"] == [8, 32]
    prior = tm.model.symbol_prior(1)
    assert prior is not None and tm.meta["prior_digest"] == prior.digest
    assert not np.allclose(prior.pmf, 1 / prior.n_symbols)  # fitted to the training codes, not uniform
    save_trained(tm, weights_path("uci_har", tmp_path))
    again = load_trained("uci_har", tmp_path)
    again_prior = again.model.symbol_prior(1)
    assert again_prior is not None and again_prior.digest == prior.digest  # the coding table ships in the weights
    x = torch.randn(2, *again.model.input_shape)
    with torch.no_grad():
        assert torch.allclose(again.model(x), tm.model.eval()(x), atol=1e-6)
    assert again.meta["prior_digest"] == prior.digest


def test_student_training_needs_its_teacher(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="no weights for model 'uci_har'.*uci_har.teacher.safetensors"):
        train_student_group(("uci_har",), epochs=1, limit=8, weights_dir=tmp_path)
    with pytest.raises(ModelError, match="do not share a dataset"):
        train_student_group(("uci_har", "fsdd_digit"), epochs=1, limit=8)


def test_training_is_seeded() -> None:
    a = train_model("uci_har", TrainConfig(batch_size=32), epochs=1, limit=64)
    b = train_model("uci_har", TrainConfig(batch_size=32), epochs=1, limit=64)
    for pa, pb in zip(a.model.parameters(), b.model.parameters(), strict=True):
        assert torch.equal(pa, pb)


@pytest.mark.parametrize("name", sorted(MODEL_SPECS))
def test_shipped_weights_load(name: str) -> None:
    tm = load_trained(name)
    assert tm.meta["model"] == name and tm.meta["test_accuracy"] > 0.9
    prior = tm.model.symbol_prior(1)
    assert prior is not None and tm.meta["prior_digest"] == prior.digest
    teacher = load_trained(name, teacher=True)
    assert teacher.meta["model"] == name and teacher.meta["test_accuracy"] > 0.9
    assert teacher.model.n_stages == 7 and teacher.model.symbol_prior(1) is None


def test_missing_weights_say_how_to_make_them(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="splitsense models train --model uci_har"):
        load_trained("uci_har", tmp_path)


def test_corrupt_weights_are_named(tmp_path: Path) -> None:
    weights_path("uci_har", tmp_path).write_bytes(b"not a safetensors file")
    with pytest.raises(ModelError, match="unreadable"):
        load_trained("uci_har", tmp_path)


def test_weights_of_another_model_are_refused(tmp_path: Path) -> None:
    tm = train_model("fsdd_digit", epochs=1, limit=8)  # a teacher with 10 classes, not 6
    save_trained(tm, weights_path("fsdd_speaker", tmp_path, teacher=True))
    with pytest.raises(ModelError, match=r"(?s)does not match model 'fsdd_speaker'.*size mismatch for stages.6.weight"):
        load_trained("fsdd_speaker", tmp_path, teacher=True)
