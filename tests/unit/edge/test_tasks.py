"""Several tasks on one window: one shared front, one upload, every task answered (edge/runtime.py)."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Sequence
from functools import cache
from typing import Any

import pytest
import torch

from edge.runtime import EdgeDevice
from edge.sink import MemorySink
from edge.sources import SensorWindow, recorded_windows
from pipelines.codecs import decode
from pipelines.models import get_spec
from pipelines.training import TrainedModel, load_trained
from splitsense.config import BreakerConfig, EdgeConfig
from splitsense.errors import BrokerUnavailableError, ConfigError
from splitsense.wire import OffloadRequest, OffloadResponse, TaskResult, TelemetryAck, Timing

MAIN, TASK = "fsdd_speaker", "fsdd_digit"
GROUP = f"{MAIN}+{TASK}"


@cache
def model(name: str) -> TrainedModel:
    return load_trained(name)


def windows(n: int) -> list[SensorWindow]:
    recs = itertools.islice(recorded_windows(get_spec(MAIN), tasks=(get_spec(TASK),)), n)
    return [SensorWindow(r.window_id, i, r.label, r.raw, 0.0, r.task_labels) for i, r in enumerate(recs)]


async def source(ws: Sequence[SensorWindow]) -> AsyncIterator[SensorWindow]:
    for w in ws:
        yield w


class TaskTransport:
    """Runs the tail of the request's model and of each extra model on the one activation."""

    def __init__(self) -> None:
        self.requests: list[OffloadRequest] = []
        self.down = False

    async def offload(self, request: OffloadRequest, timeout_s: float) -> OffloadResponse:
        self.requests.append(request)
        if self.down:
            raise BrokerUnavailableError("link down")
        main = model(request.model).model
        x = torch.from_numpy(decode(request.activation, main.symbol_prior(request.cut)))
        with torch.inference_mode():
            y = main.run(x, request.cut, main.n_stages)[0]
            tasks = []
            for name in request.extra_models:
                m = model(name).model
                z = m.run(x, request.cut, m.n_stages)[0]
                tasks.append(TaskResult(name, tuple(float(v) for v in z), int(z.argmax())))
        return OffloadResponse(
            request.window_id, tuple(float(v) for v in y), int(y.argmax()), Timing(0.1, 0.4, 1), tuple(tasks)
        )

    async def get_plan(self, *args: Any, **kwargs: Any) -> None:
        return None

    async def watch_plans(self, *args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        return
        yield

    async def report_telemetry(self, report: Any, timeout_s: float = 5.0) -> TelemetryAck:
        return TelemetryAck(0)

    async def close(self) -> None:
        pass


def device(transport: TaskTransport, **kw: Any) -> EdgeDevice:
    cfg = EdgeConfig(model=GROUP, replay_speed=0, breaker=BreakerConfig(backoff_jitter=0.0), **kw)
    return EdgeDevice(cfg, model(MAIN), transport, tasks=(model(TASK),))


def local_predictions(ws: Sequence[SensorWindow]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for name in (MAIN, TASK):
        tm = model(name)
        with torch.inference_mode():
            out[name] = [int(tm.model(tm.prepare_window(w.raw)).argmax()) for w in ws]
    return out


async def test_one_upload_at_the_bottleneck_answers_both_tasks_as_locally() -> None:
    ws = windows(40)
    transport = TaskTransport()
    sink = MemorySink()
    summary = await device(transport, default_cut=1, default_codec="ans").run(source(ws), sink)
    assert summary.windows == 40 and summary.lost == 0 and summary.by_mode["offloaded"] == 40
    assert len(transport.requests) == 40  # one upload per window, not one per task
    assert all(r.extra_models == (TASK,) and r.activation.codec.value == "ans" for r in transport.requests)
    local = local_predictions(ws)
    assert [r.prediction for r in sink.results] == local[MAIN]
    assert [r.tasks[0][2] for r in sink.results] == local[TASK]
    assert [r.tasks[0][1] for r in sink.results] == [dict(w.task_labels)[TASK] for w in ws]


async def test_fallback_runs_every_task_locally_from_the_shared_front() -> None:
    ws = windows(12)
    transport = TaskTransport()
    transport.down = True
    sink = MemorySink()
    summary = await device(transport, default_cut=1, default_codec="ans").run(source(ws), sink)
    assert summary.lost == 0 and summary.by_mode["offloaded"] == 0
    local = local_predictions(ws)
    assert [r.prediction for r in sink.results] == local[MAIN]
    assert [r.tasks[0][2] for r in sink.results] == local[TASK]


async def test_past_the_shared_front_the_task_does_not_ride_along() -> None:
    ws = windows(6)
    transport = TaskTransport()
    sink = MemorySink()
    await device(transport, default_cut=3).run(source(ws), sink)
    assert all(r.extra_models == () for r in transport.requests)
    assert [r.tasks[0][2] for r in sink.results] == local_predictions(ws)[TASK]  # run on the device


def test_a_model_with_another_front_cannot_be_a_task() -> None:
    cfg = EdgeConfig(model=f"{MAIN}+uci_har")
    with pytest.raises(Exception, match="same sensor data|share"):
        EdgeDevice(cfg, model(MAIN), TaskTransport(), tasks=(load_trained("uci_har"),))
    with pytest.raises(ConfigError, match="edge.model"):
        EdgeDevice(EdgeConfig(model=MAIN), model(MAIN), TaskTransport(), tasks=(model(TASK),))


class FlakyTransport(TaskTransport):
    """Down for the first `down_for` calls, then up."""

    def __init__(self, down_for: int) -> None:
        super().__init__()
        self.down_for = down_for

    async def offload(self, request: OffloadRequest, timeout_s: float) -> OffloadResponse:
        self.down = len(self.requests) < self.down_for
        return await super().offload(request, timeout_s)


async def test_a_node_without_the_whole_model_stores_the_code_not_the_input_and_loses_nothing() -> None:
    ws = windows(10)
    transport = FlakyTransport(down_for=4)
    cfg = EdgeConfig(
        model=GROUP,
        replay_speed=0,
        default_cut=0,  # the plan says: upload the fp32 input (16 KB a window)
        default_codec="fp32",
        breaker=BreakerConfig(failure_threshold=1, backoff_base_s=0.05, backoff_max_s=0.1, backoff_jitter=0.0),
    )
    node = EdgeDevice(
        cfg, model(MAIN), transport, tasks=(model(TASK),), local_fallback=False, max_cut=2, store_capacity_bytes=8192
    )
    sink = MemorySink()
    summary = await node.run(source(ws), sink)
    assert summary.lost == 0 and summary.pending == 0 and len(sink.results) == 10
    deferred = [r for r in sink.results if r.mode.value == "deferred"]
    assert deferred, "the outage must have stored some windows"
    # 8 KiB holds no 16 KB fp32 input: every stored window was kept (and forwarded) as its ~370 B code
    assert all(r.cut == 1 and r.codec == "ans" for r in deferred)
    local = local_predictions(ws)
    by_id = {r.window_id: r for r in sink.results}
    assert [by_id[w.window_id].prediction for w in ws] == local[MAIN]
    assert [by_id[w.window_id].tasks[0][2] for w in ws] == local[TASK]
