"""The training path on a small slice, the shipped weights, and their failure messages."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipelines.models import MODEL_SPECS
from pipelines.training import load_trained, save_trained, train_model, weights_path
from splitsense.config import TrainConfig
from splitsense.errors import ModelError


def test_short_training_run_saves_and_reloads(tmp_path: Path) -> None:
    tm = train_model("uci_har", TrainConfig(batch_size=32), epochs=1, limit=96)
    assert tm.meta["train_windows"] == 96 and 0.0 <= tm.meta["test_accuracy"] <= 1.0
    save_trained(tm, weights_path("uci_har", tmp_path))
    again = load_trained("uci_har", tmp_path)
    x = torch.randn(2, *again.model.input_shape)
    with torch.no_grad():
        assert torch.allclose(again.model(x), tm.model.eval()(x), atol=1e-6)
    assert again.meta["train_windows"] == 96


def test_training_is_seeded() -> None:
    a = train_model("uci_har", TrainConfig(batch_size=32), epochs=1, limit=64)
    b = train_model("uci_har", TrainConfig(batch_size=32), epochs=1, limit=64)
    for pa, pb in zip(a.model.parameters(), b.model.parameters(), strict=True):
        assert torch.equal(pa, pb)


@pytest.mark.parametrize("name", sorted(MODEL_SPECS))
def test_shipped_weights_load(name: str) -> None:
    tm = load_trained(name)
    assert tm.meta["model"] == name and tm.meta["test_accuracy"] > 0.9


def test_missing_weights_say_how_to_make_them(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="splitsense models train --model uci_har"):
        load_trained("uci_har", tmp_path)


def test_corrupt_weights_are_named(tmp_path: Path) -> None:
    weights_path("uci_har", tmp_path).write_bytes(b"not a safetensors file")
    with pytest.raises(ModelError, match="unreadable"):
        load_trained("uci_har", tmp_path)


def test_weights_of_another_model_are_refused(tmp_path: Path) -> None:
    tm = train_model("fsdd_digit", epochs=1, limit=8)
    save_trained(tm, weights_path("fsdd_speaker", tmp_path))
    with pytest.raises(ModelError, match="does not match"):
        load_trained("fsdd_speaker", tmp_path)
