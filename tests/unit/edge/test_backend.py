"""The device's backend seam (edge/backend.py): ONNX Runtime on the exported files computes what
PyTorch computes on the weights, on real windows, and an EdgeDevice on either predicts the same;
the ONNX Runtime backend runs without torch."""

from __future__ import annotations

import itertools
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from edge.backend import FrontBackend, OnnxBackend, TorchBackend, choose_backend, make_backend
from edge.runtime import EdgeDevice
from edge.sink import MemorySink
from edge.sources import SensorWindow, recorded_windows
from pipelines.codecs import decode
from pipelines.export import ATOL, RTOL
from pipelines.models import get_spec
from pipelines.training import load_trained
from splitsense.config import BreakerConfig, EdgeConfig
from splitsense.errors import ConfigError
from splitsense.wire import OffloadRequest, OffloadResponse, TelemetryAck, TelemetryReport, Timing

MODEL = "uci_har"
LEVEL = 0.98  # tests/unit/conftest.py
N = 6
REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def backends(uci_har_export: Path) -> tuple[TorchBackend, OnnxBackend]:
    torch.set_num_threads(1)
    return TorchBackend([load_trained(MODEL)]), OnnxBackend.for_models([MODEL], uci_har_export)


def real_windows(n: int) -> list[SensorWindow]:
    got = itertools.islice(recorded_windows(get_spec(MODEL)), n)
    return [SensorWindow(w.window_id, i, w.label, w.raw, 0.0) for i, w in enumerate(got)]


def close(got: np.ndarray, ref: np.ndarray) -> bool:
    scale = np.abs(ref).reshape(len(ref), -1).max(axis=1)
    err = np.abs(got - ref).reshape(len(ref), -1).max(axis=1)
    return got.shape == ref.shape and got.dtype == ref.dtype == np.float32 and bool((err <= ATOL + RTOL * scale).all())


def test_both_backends_describe_the_model_alike(backends: tuple[TorchBackend, OnnxBackend]) -> None:
    tb, ob = backends
    assert isinstance(tb, FrontBackend) and isinstance(ob, FrontBackend)
    a, b = tb.info(MODEL), ob.info(MODEL)
    assert (a.n_stages, a.num_classes, a.input_shape, a.activation_shapes) == (
        b.n_stages, b.num_classes, b.input_shape, b.activation_shapes,
    )  # fmt: skip
    assert a.priors.keys() == b.priors.keys() == {1}
    assert a.priors[1].digest == b.priors[1].digest and np.array_equal(a.priors[1].pmf, b.priors[1].pmf)
    assert (tb.models(), ob.models()) == ((MODEL,), (MODEL,))


@pytest.mark.parametrize("level", [1.0, LEVEL])
def test_onnx_backend_equals_torch_backend_on_real_windows(
    backends: tuple[TorchBackend, OnnxBackend], level: float
) -> None:
    tb, ob = backends
    for w in real_windows(30):
        x_t, x_o = tb.prepare(MODEL, w.raw), ob.prepare(MODEL, w.raw)
        assert close(x_o, x_t)
        a = x_t
        for i in range(N):  # stage by stage, each from PyTorch's own input
            ref, got = tb.run_stage(MODEL, i, level, a), ob.run_stage(MODEL, i, level, a)
            assert close(got, ref), (i, float(np.abs(got - ref).max()))
            a = ref
        assert close(ob.run_front(MODEL, N, level, x_t), tb.run_front(MODEL, N, level, x_t))
        full_t, full_o = tb.run_full(MODEL, x_t), ob.run_full(MODEL, x_o)
        assert int(full_t.argmax()) == int(full_o.argmax())
    assert tb.shares_front(MODEL, MODEL, 1) and ob.shares_front(MODEL, MODEL, 1)


def test_exported_preprocessing_graph_equals_numpy(uci_har_export: Path) -> None:
    numpy_prep = OnnxBackend.for_models([MODEL], uci_har_export)
    graph_prep = OnnxBackend.for_models([MODEL], uci_har_export, prep="onnx", file_format="ort")
    for w in real_windows(5):
        assert close(graph_prep.prepare(MODEL, w.raw), numpy_prep.prepare(MODEL, w.raw))


class CloudTwin:
    """The cloud's tail in process: decodes the activation and runs stages [cut, N) in PyTorch."""

    def __init__(self) -> None:
        self.model = load_trained(MODEL).model
        self.requests: list[OffloadRequest] = []

    async def offload(self, request: OffloadRequest, timeout_s: float) -> OffloadResponse:
        self.requests.append(request)
        x = torch.from_numpy(decode(request.activation, self.model.symbol_prior(request.cut)))
        with torch.inference_mode():
            y = self.model.run(x, request.cut, self.model.n_stages)[0]
        return OffloadResponse(request.window_id, tuple(float(v) for v in y), int(y.argmax()), Timing(0.1, 0.4, 1))

    async def get_plan(self, *args: Any, **kwargs: Any) -> None:
        return None

    async def watch_plans(self, *args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        return
        yield

    async def report_telemetry(self, report: TelemetryReport, timeout_s: float = 5.0) -> TelemetryAck:
        return TelemetryAck(0)

    async def close(self) -> None:
        pass


async def run_device(backend: FrontBackend | None, ws: Sequence[SensorWindow], offload: bool, **kw: Any) -> list[Any]:
    async def source() -> AsyncIterator[SensorWindow]:
        for w in ws:
            yield w

    cfg = EdgeConfig(model=MODEL, replay_speed=0, breaker=BreakerConfig(backoff_jitter=0.0), **kw)
    trained = load_trained(MODEL) if backend is None else None
    sink = MemorySink()
    summary = await EdgeDevice(cfg, trained, CloudTwin() if offload else None, backend=backend).run(source(), sink)
    assert summary.lost == 0 and summary.windows == len(ws)
    mode = "offloaded" if offload else "local"
    assert summary.by_mode[mode] == len(ws)
    return [(r.prediction, r.cut, r.codec, len(r.stage_ms)) for r in sink.results]


@pytest.mark.parametrize(
    ("offload", "kw"),
    [
        (False, {"default_cut": N}),  # fully local: the whole model on the device
        (False, {"default_cut": N, "compression_energy_kept": LEVEL}),
        (True, {"default_cut": 1, "default_codec": "ans"}),  # the bottleneck's code, entropy coded
        (True, {"default_cut": 3, "compression_energy_kept": LEVEL}),
    ],
)
async def test_edge_device_predicts_the_same_on_either_backend(
    backends: tuple[TorchBackend, OnnxBackend], offload: bool, kw: dict[str, Any]
) -> None:
    ws = real_windows(40)
    on_torch = await run_device(None, ws, offload, **kw)  # the constructor's default: PyTorch
    on_onnx = await run_device(backends[1], ws, offload, **kw)
    assert on_onnx == on_torch


def test_device_without_weights_needs_a_backend_holding_its_model(backends: tuple[TorchBackend, OnnxBackend]) -> None:
    with pytest.raises(ConfigError, match="trained model or a backend"):
        EdgeDevice(EdgeConfig(model=MODEL), None, None)
    with pytest.raises(ConfigError, match="lacks model"):
        EdgeDevice(EdgeConfig(model="fsdd_digit"), None, None, backend=backends[1])
    device = EdgeDevice(EdgeConfig(model=MODEL), None, None, backend=backends[1])
    assert device.n_stages == N and device.info.symbol_prior(1) is not None and device.backend.kind == "onnx"


def test_choosing_a_backend(uci_har_export: Path, tmp_path: Path) -> None:
    assert choose_backend("auto", [MODEL], root=uci_har_export) == ("onnx", "auto: every model has a current export")
    kind, why = choose_backend("auto", [MODEL, "fsdd_digit"], root=uci_har_export)
    assert kind == "torch" and "no exported model" in why and "fsdd_digit" in why
    assert choose_backend("torch", [MODEL], root=uci_har_export) == ("torch", "asked for")
    with pytest.raises(ConfigError, match="onnx backend cannot run"):
        choose_backend("onnx", [MODEL], root=tmp_path)
    with pytest.raises(ConfigError, match="must be one of"):
        choose_backend("tensorrt", [MODEL])
    with pytest.raises(ConfigError, match="edge.backend"):
        EdgeConfig(backend="tensorrt")
    assert make_backend("onnx", [MODEL], root=uci_har_export).kind == "onnx"
    assert make_backend("torch", [MODEL]).kind == "torch"


def test_onnx_backend_runs_without_torch(uci_har_export: Path) -> None:
    code = f"""
import sys
sys.modules["torch"] = None  # any import of torch fails
import numpy as np
from edge.backend import OnnxBackend
b = OnnxBackend.for_models(["{MODEL}"], __import__("pathlib").Path({str(uci_har_export)!r}))
x = b.prepare("{MODEL}", np.zeros((9, 128), dtype=np.float32))
print(b.run_full("{MODEL}", x).shape, b.run_front("{MODEL}", 3, {LEVEL}, x).shape)
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "(1, 6) (1, 256, 16)"
