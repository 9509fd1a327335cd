"""A device knows which fronts it holds (issue 11, item 3): its backend says (`fronts`), its
telemetry carries them, and a plan row naming one it lacks is refused with a reason, the window
run the nearest way it can, never failed. Real weights and windows; the backend runs PyTorch but
holds only some fronts (as an ONNX export of some levels does) and fails on any other."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge.backend import OnnxBackend, TorchBackend
from edge.metrics import EdgeMetrics
from edge.runtime import EdgeDevice
from edge.sink import MemorySink, WindowResult
from pipelines.catalog import load_catalog
from splitsense.errors import ModelError
from splitsense.kinds import Codec, FallbackKind
from splitsense.wire import ExecutionMode, HeldFronts
from tests.unit.edge.test_runtime import MODEL, FakeTransport, N, config, plan_set, row, source, trained, windows


class PartialBackend(TorchBackend):
    """PyTorch, holding only `held` fronts (cut, level); running a stage of any other front fails."""

    def __init__(self, held: Sequence[tuple[int, float]]) -> None:
        super().__init__([trained(MODEL)])
        self.held = tuple(held)
        self.ran: set[tuple[int, float]] = set()

    def fronts(self, model: str) -> tuple[tuple[int, float], ...]:
        return self.held

    def run_stage(self, model: str, stage: int, level: float, x: np.ndarray) -> np.ndarray:
        if level < 1.0 and not any(k > stage and lv == level for k, lv in self.held):
            raise ModelError(f"this backend lacks stage {stage} at level {level:g}")
        self.ran.add((stage, level))
        return super().run_stage(model, stage, level, x)


UNCOMPRESSED = tuple((k, 1.0) for k in range(N + 1))
LEVELS = (1.0, 0.98)
TWO_LEVELS = tuple((k, lv) for lv in LEVELS for k in range(N + 1) if lv == 1.0 or k > 0)


def missing_count(metrics: EdgeMetrics, cut: int, level: str) -> float | None:
    labels = {"model": MODEL, "device_class": "phone", "cut": str(cut), "level": level}
    return metrics.registry.get_sample_value("splitsense_edge_missing_front_windows_total", labels)


async def run(device: EdgeDevice, n: int) -> list[WindowResult]:
    sink = MemorySink()
    summary = await device.run(source(windows(MODEL, n)), sink)
    assert summary.lost == 0 and summary.windows == n
    return list(sink.results)


def test_backends_say_which_fronts_they_hold(uci_har_export: Path) -> None:
    torch_fronts = set(TorchBackend([trained(MODEL)]).fronts(MODEL))
    catalog_levels = {e.energy_kept for e in load_catalog(MODEL).levels}
    assert torch_fronts == {(k, lv) for lv in catalog_levels for k in range(N + 1) if lv == 1.0 or k > 0}
    onnx = set(OnnxBackend.for_models([MODEL], uci_har_export).fronts(MODEL))
    assert onnx == set(TWO_LEVELS)  # the export holds levels 1.0 and 0.98 only (tests/unit/conftest.py)


async def test_a_missing_level_runs_the_same_cut_at_the_nearest_held_level() -> None:
    backend = PartialBackend(TWO_LEVELS)
    transport = FakeTransport()
    device = EdgeDevice(config(), None, transport, plan_set(2, row(3, compression_energy_kept=0.995)), backend=backend)
    assert not device.holds(3, 0.995) and device.holds(3, 0.98) and device.holds(0, 0.5)
    results = await run(device, 8)
    assert {(s, lv) for s, lv in backend.ran if lv < 1.0} == set()  # nothing ran at a level it lacks
    for r in results:
        assert r.mode is ExecutionMode.OFFLOADED and r.kind is None
        assert (r.cut, r.compression_energy_kept) == (3, 1.0)  # 1.0 is nearer 0.995 than 0.98
        assert r.reason.startswith("missing front: the device's torch backend does not hold cut 3 at level 0.995")
        assert "(levels held at that cut: 1, 0.98); ran cut 3 at level 1 instead" in r.reason
    assert {q.cut for q in transport.requests} == {3}
    assert missing_count(device.metrics, 3, "0.995") == 8
    # the nearest held level, whichever side
    device = EdgeDevice(
        config(), None, FakeTransport(), plan_set(2, row(3, compression_energy_kept=0.97)), backend=backend
    )
    assert {(r.cut, r.compression_energy_kept) for r in await run(device, 3)} == {(3, 0.98)}


async def test_a_missing_local_front_runs_the_whole_model_with_a_typed_kind() -> None:
    backend, transport = PartialBackend(TWO_LEVELS), FakeTransport()
    device = EdgeDevice(config(), None, transport, plan_set(2, row(N, compression_energy_kept=0.99)), backend=backend)
    reference = EdgeDevice(config(default_cut=N), trained(MODEL), None)
    results, expected = await run(device, 10), await run(reference, 10)
    assert [r.prediction for r in results] == [r.prediction for r in expected]
    for r in results:
        assert r.mode is ExecutionMode.LOCAL and r.kind is FallbackKind.MISSING_FRONT
        assert (r.cut, r.compression_energy_kept) == (N, 1.0)
        assert f"does not hold cut {N} at level 0.99" in r.reason and "(the whole model here)" in r.reason
    kinds = [dict(o.fallback_kinds) for r in transport.reports for o in r.observations]  # told the cloud
    assert sum(k.get("missing_front", 0) for k in kinds) == 10 and all(set(k) == {"missing_front"} for k in kinds)


async def test_a_missing_cut_runs_locally_or_at_the_nearest_cut_the_device_can_send() -> None:
    held = ((1, 1.0), (2, 1.0), (N, 1.0))
    device = EdgeDevice(config(), None, FakeTransport(), plan_set(2, row(4, Codec.FP16)), backend=PartialBackend(held))
    for r in await run(device, 3):
        assert (r.mode, r.kind, r.cut) == (ExecutionMode.LOCAL, FallbackKind.MISSING_FRONT, N)
    # a device without local fallback (it holds the front up to cut 5) sends at the nearest held cut
    transport = FakeTransport()
    node = EdgeDevice(
        config(),
        None,
        transport,
        plan_set(2, row(4, Codec.FP16)),
        backend=PartialBackend(held[:2]),
        local_fallback=False,
        max_cut=N - 1,
    )
    for r in await run(node, 3):
        assert (r.mode, r.cut, r.codec) == (ExecutionMode.OFFLOADED, 2, "fp16")
        assert "does not hold cut 4 at level 1 (levels held at that cut: none); ran cut 2 at level 1" in r.reason
    await node.close()
    assert {q.cut for q in transport.requests} == {2}


async def test_telemetry_carries_the_fronts_the_device_holds() -> None:
    transport = FakeTransport()
    device = EdgeDevice(config(default_cut=3), None, transport, backend=PartialBackend(TWO_LEVELS))
    assert device.held_fronts() == (HeldFronts(MODEL, TWO_LEVELS),)
    await run(device, 4)
    assert transport.reports and all(r.held_fronts == (HeldFronts(MODEL, TWO_LEVELS),) for r in transport.reports)
    assert all(math.isclose(lv, 1.0) or lv == 0.98 for h in transport.reports[0].held_fronts for _, lv in h.fronts)


def test_a_device_whose_backend_does_not_say_holds_everything() -> None:
    class Quiet:
        def __init__(self) -> None:
            self.inner = TorchBackend([trained(MODEL)])
            self.kind = "quiet"

        def __getattr__(self, name: str) -> Any:
            if name == "fronts":
                raise AttributeError(name)
            return getattr(self.inner, name)

    device = EdgeDevice(config(), None, None, backend=Quiet())  # type: ignore[arg-type]
    assert device.held_fronts() == () and device.holds(3, 0.123)


@pytest.mark.parametrize("level", [0.995, 0.99])
async def test_the_default_choice_is_checked_too(level: float) -> None:
    device = EdgeDevice(
        config(default_cut=2, compression_energy_kept=level), None, None, backend=PartialBackend(UNCOMPRESSED)
    )
    for r in await run(device, 2):
        assert (r.cut, r.compression_energy_kept, r.mode) == (2, 1.0, ExecutionMode.LOCAL)  # no transport
        assert r.kind is FallbackKind.NO_BROKER and f"does not hold cut 2 at level {level:g}" in r.reason
