"""Tail runners (serving.tail_engine): ONNX Runtime on the export against the torch weights."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
import torch

from cloud.backend import (
    InProcessTailBackend,
    ModelRegistry,
    OnnxTail,
    TorchTail,
    choose_tail_engine,
    make_tail,
    run_tail_sync,
)
from splitsense.errors import ConfigError, ModelError
from tests.unit.conftest import EXPORTED_MODEL

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def registry() -> ModelRegistry:
    return ModelRegistry([EXPORTED_MODEL])


def _activations(registry: ModelRegistry, cut: int, batch: int) -> np.ndarray:
    m = registry.model(EXPORTED_MODEL)
    x = torch.randn(batch, *m.input_shape, generator=torch.Generator().manual_seed(cut + batch))
    with torch.inference_mode():
        return m.run(x, 0, cut).numpy()


def test_the_onnx_tail_gives_the_torch_logits_at_every_cut_and_batch(
    registry: ModelRegistry, uci_har_export: Path
) -> None:
    m = registry.model(EXPORTED_MODEL)
    onnx = make_tail(EXPORTED_MODEL, "onnx", m, root=uci_har_export)
    torch_tail = make_tail(EXPORTED_MODEL, "torch", m, root=uci_har_export)
    assert isinstance(onnx, OnnxTail) and onnx.engine == "onnx"
    assert isinstance(torch_tail, TorchTail) and torch_tail.engine == "torch"
    for cut in range(m.n_stages):
        for batch in (1, 7):
            a = _activations(registry, cut, batch)
            got, want = onnx(cut, a), run_tail_sync(m, cut, a)
            assert got.dtype == np.float32 and got.shape == want.shape == (batch, m.num_classes)
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
            assert (got.argmax(1) == want.argmax(1)).all()
    with pytest.raises(ModelError):
        onnx(m.n_stages + 1, np.zeros((1, 6), np.float32))


def test_auto_takes_onnx_only_with_a_current_export(uci_har_export: Path, tmp_path: Path) -> None:
    assert choose_tail_engine("auto", [EXPORTED_MODEL], root=uci_har_export) == (
        "onnx",
        "auto: every model has a current export",
    )
    engine, why = choose_tail_engine("auto", [EXPORTED_MODEL], root=tmp_path)  # nothing exported there
    assert engine == "torch" and why.startswith("auto: ") and "manifest" in why
    assert choose_tail_engine("torch", [EXPORTED_MODEL], root=tmp_path) == ("torch", "asked for")
    with pytest.raises(ConfigError, match="tail_engine onnx cannot run"):
        choose_tail_engine("onnx", [EXPORTED_MODEL], root=tmp_path)
    with pytest.raises(ConfigError, match="must be one of"):
        choose_tail_engine("gpu", [EXPORTED_MODEL])


def test_the_in_process_backend_runs_the_engine_it_was_given(registry: ModelRegistry, uci_har_export: Path) -> None:
    async def run(engine: str) -> tuple[np.ndarray, dict[str, str]]:
        be = InProcessTailBackend(registry, threads=1, engine=engine, export_root=uci_har_export)
        try:
            return await be.run_tail(EXPORTED_MODEL, 2, _activations(registry, 2, 4)), be.engines
        finally:
            await be.close()

    a, engines_a = asyncio.run(run("onnx"))
    b, engines_b = asyncio.run(run("torch"))
    assert engines_a == {EXPORTED_MODEL: "onnx"} and engines_b == {EXPORTED_MODEL: "torch"}
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
