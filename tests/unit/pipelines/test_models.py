"""Every model cut at every boundary reproduces the full model; the shipped weights load."""

from __future__ import annotations

import pytest
import torch

from pipelines.models import MODEL_SPECS, get_spec
from pipelines.stages import StagedModel
from splitsense.errors import ModelError


@pytest.fixture(scope="module", params=sorted(MODEL_SPECS))
def model(request: pytest.FixtureRequest) -> StagedModel:
    torch.manual_seed(0)
    m = MODEL_SPECS[request.param].build()
    m.eval()
    return m


def test_front_then_tail_equals_full_model_at_every_cut(model: StagedModel) -> None:
    x = torch.randn(3, *model.input_shape)
    with torch.no_grad():
        full = model(x)
        for k in range(model.n_stages + 1):
            split = model.tail(k)(model.front(k)(x))
            assert (split - full).abs().max().item() <= 1e-5, f"cut {k}"


def test_at_least_five_interior_cuts_with_varied_activation_sizes(model: StagedModel) -> None:
    interior = range(1, model.n_stages)
    assert len(interior) >= 5
    sizes = [int(torch.tensor(model.activation_shape(k)).prod()) for k in range(model.n_stages + 1)]
    input_size = sizes[0]
    assert max(sizes[1:-1]) > input_size, "some cut must be larger than the input"
    assert min(sizes[1:-1]) * 8 <= input_size, "some cut must be much smaller than the input"


def test_cut_out_of_range_is_a_clear_error(model: StagedModel) -> None:
    with pytest.raises(ModelError, match="out of range"):
        model.front(model.n_stages + 1)
    with pytest.raises(ModelError, match="out of range"):
        model.tail(-1)


def test_unknown_model_lists_known_ones() -> None:
    with pytest.raises(ModelError, match="known models: fsdd_speaker"):
        get_spec("resnet")


def test_cut_names() -> None:
    m = MODEL_SPECS["uci_har"].build()
    assert m.cut_name(0) == "input"
    assert m.cut_name(m.n_stages) == "classifier"
