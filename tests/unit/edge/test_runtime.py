"""The edge runtime with the real shipped weights and real test windows, and a fake transport.

The fake transport is the cloud's twin: it decodes the activation and runs stages [cut, N) of
its own copy of the model (loaded separately, as the cloud would), or fails as each test scripts.
No sockets anywhere.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import replace
from functools import cache
from io import StringIO
from typing import Any

import pytest
import torch

from edge.breaker import BreakerState
from edge.metrics import EdgeMetrics
from edge.runtime import EdgeDevice
from edge.sink import JsonlSink, MemorySink
from edge.sources import SensorWindow, recorded_windows
from pipelines.codecs import Codec, decode
from pipelines.models import MODEL_SPECS, get_spec
from pipelines.training import TrainedModel, load_trained
from splitsense.config import BreakerConfig, EdgeConfig
from splitsense.errors import BrokerUnavailableError, ConfigError, ShedError
from splitsense.kinds import FallbackKind
from splitsense.plan import BatteryState, Objective, Plan, PlanRow, PlanSet
from splitsense.wire import ExecutionMode, OffloadRequest, OffloadResponse, TelemetryAck, TelemetryReport, Timing

MODEL = "uci_har"  # small and fast; the audio model is checked too where it matters
N = 6  # stages of every shipped model: encoder, decoder, conv4, fc1, fc2, classifier


@cache
def trained(name: str) -> TrainedModel:
    return load_trained(name)


@cache
def cloud_copy(name: str) -> TrainedModel:
    return load_trained(name)  # its own modules, like the cloud's replica


@cache
def recording(name: str, n: int) -> tuple[tuple[str, int, Any], ...]:
    return tuple((w.window_id, w.label, w.raw) for w in itertools.islice(recorded_windows(get_spec(name)), n))


def windows(name: str, n: int, t_emit: float = 0.0) -> list[SensorWindow]:
    return [SensorWindow(wid, i, label, raw, t_emit) for i, (wid, label, raw) in enumerate(recording(name, n))]


async def source(ws: Sequence[SensorWindow]) -> AsyncIterator[SensorWindow]:
    for w in ws:
        yield w


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class FakeTransport:
    """Runs the tail in process; `fail(request)` may raise instead, `hook(request)` sees each call."""

    def __init__(self, name: str = MODEL) -> None:
        self.model = cloud_copy(name).model
        self.requests: list[OffloadRequest] = []
        self.reports: list[TelemetryReport] = []
        self.fail: Callable[[OffloadRequest], None] | None = None
        self.hook: Callable[[OffloadRequest], None] | None = None
        self.logits_override: tuple[float, ...] | None = None
        self.activations: list[Any] = []  # every activation as decoded here
        self.handling_ms: float | None = None  # what its telemetry answers say (None: a broker that does not)
        self.plan_calls: list[int] = []  # known_version of each GetPlan (2**62: the device's ping)

    async def offload(self, request: OffloadRequest, timeout_s: float) -> OffloadResponse:
        self.requests.append(request)
        if self.hook is not None:
            self.hook(request)
        if self.fail is not None:
            self.fail(request)
        x = torch.from_numpy(decode(request.activation, self.model.symbol_prior(request.cut)))
        self.activations.append(x)
        with torch.inference_mode():
            y = self.model.run(x, request.cut, self.model.n_stages)[0]
        if self.logits_override is not None:
            return OffloadResponse(request.window_id, self.logits_override, 0, Timing(0.1, 0.4, 1))
        return OffloadResponse(request.window_id, tuple(float(v) for v in y), int(y.argmax()), Timing(0.1, 0.4, 1))

    async def get_plan(
        self, device_class: str, models: Any = (), known_version: int = 0, timeout_s: float = 5.0
    ) -> PlanSet | None:
        self.plan_calls.append(known_version)
        return None

    async def watch_plans(self, *args: Any, **kwargs: Any) -> AsyncIterator[PlanSet]:
        return
        yield  # an async generator that ends at once

    async def report_telemetry(self, report: TelemetryReport, timeout_s: float = 5.0) -> TelemetryAck:
        self.reports.append(report)
        return TelemetryAck(0, self.handling_ms)

    async def close(self) -> None:
        pass


class LinkSwitch:
    """A FakeTransport.fail that refuses every call while `down` (the broker unreachable)."""

    def __init__(self) -> None:
        self.down = False

    def __call__(self, request: OffloadRequest) -> None:
        if self.down:
            raise BrokerUnavailableError("broker unavailable (UNAVAILABLE: connection refused)")


def config(name: str = MODEL, **kw: Any) -> EdgeConfig:
    kw.setdefault("replay_speed", 0)
    kw.setdefault("breaker", BreakerConfig(backoff_jitter=0.0))
    return EdgeConfig(model=name, **kw)


def plan_set(version: int, *rows: PlanRow, model: str = MODEL) -> PlanSet:
    plan = Plan(model=model, device_class="phone", rows=rows, objective=Objective.LATENCY)
    return PlanSet(version=version, plans=(plan,), created_unix_ms=0, reason=f"test plan v{version}")


def row(cut: int, codec: Codec = Codec.FP32, battery: BatteryState = BatteryState.NORMAL, **kw: Any) -> PlanRow:
    return PlanRow(
        min_bandwidth_mbps=0.0,
        max_bandwidth_mbps=math.inf,
        battery=battery,
        cut=cut,
        codec=codec,
        reason=kw.pop("reason", f"cut {cut} for the test"),
        predicted_latency_ms=1.0,
        predicted_energy_mj=1.0,
        **kw,
    )


async def run_local(name: str, ws: list[SensorWindow], **kw: Any) -> list[int]:
    sink = MemorySink()
    await EdgeDevice(config(name, **kw), trained(name), None).run(source(ws), sink)
    return [r.prediction for r in sink.results]


# --- correctness ----------------------------------------------------------------------------


async def test_whole_imu_recording_offloaded_at_fp32_equals_local() -> None:
    ws = windows(MODEL, 10_000)  # the whole test recording
    transport = FakeTransport()
    sink = MemorySink()
    device = EdgeDevice(config(default_cut=3), trained(MODEL), transport)
    summary = await device.run(source(ws), sink)
    assert summary.windows == len(ws) == 950 and summary.lost == 0
    assert summary.by_mode == {"offloaded": 950, "local": 0, "fallback": 0, "deferred": 0}
    assert [r.window_id for r in sink.results] == [w.window_id for w in ws]
    local = await run_local(MODEL, ws)
    assert [r.prediction for r in sink.results] == local
    assert summary.accuracy == pytest.approx(sum(p == w.label for p, w in zip(local, ws, strict=True)) / len(ws))
    assert summary.accuracy > 0.85


@pytest.mark.parametrize("cut", [0, 1, 3, 5])
async def test_audio_offloaded_at_fp32_equals_local(cut: int) -> None:
    ws = windows("fsdd_digit", 12)
    sink = MemorySink()
    device = EdgeDevice(config("fsdd_digit", default_cut=cut), trained("fsdd_digit"), FakeTransport("fsdd_digit"))
    summary = await device.run(source(ws), sink)
    assert summary.by_mode["offloaded"] == 12 and summary.lost == 0
    assert [r.prediction for r in sink.results] == await run_local("fsdd_digit", ws)
    assert all(r.cut == cut and r.codec == "fp32" and r.bytes_sent > 0 for r in sink.results)


@pytest.mark.parametrize("name", sorted(MODEL_SPECS))
async def test_bottleneck_offloaded_with_ans_equals_local(name: str) -> None:
    # Cut 1 sends the encoder's quantised code; ans codes it losslessly against the prior both ends
    # hold, so the cloud sees exactly what fp32 would have carried and predicts exactly as local.
    ws = windows(name, 40)
    prior = trained(name).model.symbol_prior(1)
    assert prior is not None
    sink, transport = MemorySink(), FakeTransport(name)
    device = EdgeDevice(config(name, default_cut=1, default_codec="ans"), trained(name), transport)
    summary = await device.run(source(ws), sink)
    assert summary.by_mode["offloaded"] == len(ws) and summary.lost == 0
    assert [r.prediction for r in sink.results] == await run_local(name, ws)
    assert all(r.cut == 1 and r.codec == "ans" and r.bytes_sent > 0 for r in sink.results)
    assert all(
        r.activation.codec is Codec.ANS and r.activation.prior_digest == prior.digest for r in transport.requests
    )
    fp32 = FakeTransport(name)
    await EdgeDevice(config(name, default_cut=1), trained(name), fp32).run(source(ws), MemorySink())
    assert len(fp32.activations) == len(transport.activations) == len(ws)
    for a, b in zip(transport.activations, fp32.activations, strict=True):
        assert torch.equal(a, b)  # bit for bit the code fp32 carries
    code_values = math.prod(trained(name).model.activation_shape(1))
    assert summary.bytes_sent < len(ws) * code_values  # fewer than int8's one byte per symbol


async def test_int8_codec_keeps_accuracy_close() -> None:
    ws = windows(MODEL, 200)
    sink = MemorySink()
    device = EdgeDevice(config(default_cut=4, default_codec="int8"), trained(MODEL), FakeTransport())
    summary = await device.run(source(ws), sink)
    local = await run_local(MODEL, ws)
    local_acc = sum(p == w.label for p, w in zip(local, ws, strict=True)) / len(ws)
    assert summary.by_mode["offloaded"] == 200
    assert abs(summary.accuracy - local_acc) <= 0.02
    fp32_bytes = math.prod(trained(MODEL).model.activation_shape(4)) * 4
    assert sink.results[0].bytes_sent == fp32_bytes // 4


async def test_compressed_front_offloaded_equals_the_same_front_run_locally() -> None:
    ws = windows(MODEL, 20)
    plans = plan_set(1, row(4, compression_energy_kept=0.99))
    sink = MemorySink()
    await EdgeDevice(config(), trained(MODEL), FakeTransport(), plans).run(source(ws), sink)
    assert all(r.mode is ExecutionMode.OFFLOADED and r.compression_energy_kept == 0.99 for r in sink.results)
    local = MemorySink()
    await EdgeDevice(config(), trained(MODEL), None, plans).run(source(ws), local)
    assert [r.prediction for r in sink.results] == [r.prediction for r in local.results]


# --- faults ---------------------------------------------------------------------------------


async def test_failures_mid_run_fall_back_then_local_until_a_probe_succeeds() -> None:
    clock = Clock()
    transport = FakeTransport()
    link = transport.fail = LinkSwitch()
    breaker = BreakerConfig(failure_threshold=2, backoff_base_s=4.0, backoff_factor=1.6, backoff_jitter=0.0)
    device = EdgeDevice(config(default_cut=5, breaker=breaker), trained(MODEL), transport, clock=clock)
    ws = windows(MODEL, 18)
    modes, calls = [], []
    for t, w in enumerate(ws):  # one window per second
        clock.t = float(t)
        link.down = 2 <= t < 10
        before = len(transport.requests)
        result = await device.process(replace(w, t_emit=clock.t))
        for _ in range(3):
            await asyncio.sleep(0)  # let a background probe finish before the next window
        modes.append(result.mode.value[0])  # o / l / f
        calls.append(len(transport.requests) - before)
        if result.mode is ExecutionMode.FALLBACK:
            assert result.reason.startswith("unavailable: ")
        if result.mode is ExecutionMode.LOCAL:
            assert result.reason.startswith("circuit breaker")
    # t: 0 1 | 2 3: fail, open until 3 + 4 = 7 | 7: probe (in the background, the window runs locally
    # at once) fails, open until 7 + 6.4 = 13.4 | 14: probe succeeds, window 14 already local | 15: offload
    assert "".join(modes) == "oo" + "ff" + "lll" + "l" + "llllll" + "l" + "ooo"
    assert calls == [1, 1, 1, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1]
    assert device.breaker.state is BreakerState.CLOSED
    assert device.metrics.pending_windows() == 18  # every window counted for telemetry


async def test_missed_deadline_finishes_locally_within_the_deadline() -> None:
    transport = FakeTransport()

    async def hang(request: OffloadRequest, timeout_s: float) -> OffloadResponse:
        await asyncio.sleep(3600)  # a broken transport that ignores its timeout
        raise AssertionError

    transport.offload = hang  # type: ignore[method-assign]
    device = EdgeDevice(config(default_cut=5, deadline_ms=80.0), trained(MODEL), transport)
    loop = asyncio.get_running_loop()
    w = windows(MODEL, 1, t_emit=loop.time())[0]
    t0 = loop.time()
    result = await device.process(w)
    elapsed = loop.time() - t0
    assert result.mode is ExecutionMode.FALLBACK and result.reason.startswith("deadline")
    assert 0.08 <= elapsed < 0.08 + 0.5  # deadline + grace + the local tail on busy cores
    assert result.prediction == (await run_local(MODEL, [w]))[0]


async def test_shed_honours_retry_after_without_tripping_the_breaker() -> None:
    clock = Clock()
    transport = FakeTransport()

    def shed(request: OffloadRequest) -> None:
        raise ShedError("queue full", retry_after_ms=1500)

    transport.fail = shed
    device = EdgeDevice(
        config(default_cut=5, breaker=BreakerConfig(failure_threshold=1, backoff_jitter=0.0)),
        trained(MODEL),
        transport,
        clock=clock,
    )
    ws = windows(MODEL, 3)
    r0 = await device.process(ws[0])
    assert r0.mode is ExecutionMode.FALLBACK and r0.reason.startswith("shed")
    assert device.breaker.state is BreakerState.CLOSED
    transport.fail = None
    clock.t = 1.0
    r1 = await device.process(ws[1])
    assert r1.mode is ExecutionMode.LOCAL and "shed" in r1.reason and len(transport.requests) == 1
    clock.t = 1.5
    r2 = await device.process(ws[2])
    assert r2.mode is ExecutionMode.OFFLOADED


@pytest.mark.parametrize(
    "breakage",
    ["wrong number of logits", "transport bug", "wrong window"],
)
async def test_bad_answers_and_transport_bugs_are_fallbacks(breakage: str) -> None:
    transport = FakeTransport()
    if breakage == "wrong number of logits":
        transport.logits_override = (1.0, 2.0)
    elif breakage == "transport bug":

        def bug(request: OffloadRequest) -> None:
            raise ZeroDivisionError("division by zero")

        transport.fail = bug
    else:
        original = transport.offload

        async def other(request: OffloadRequest, timeout_s: float) -> OffloadResponse:
            return replace(await original(request, timeout_s), window_id="someone-else")

        transport.offload = other  # type: ignore[method-assign]
    device = EdgeDevice(config(default_cut=5), trained(MODEL), transport)
    ws = windows(MODEL, 2)
    results = [await device.process(w) for w in ws]
    assert all(r.mode is ExecutionMode.FALLBACK for r in results)
    assert [r.prediction for r in results] == await run_local(MODEL, ws)
    expected = "error: ZeroDivisionError" if breakage == "transport bug" else "unavailable: answer for window"
    assert results[0].reason.startswith(expected)


# --- plans, battery -------------------------------------------------------------------------


async def test_plan_change_is_applied_between_windows_never_during_one() -> None:
    transport = FakeTransport()
    device = EdgeDevice(config(), trained(MODEL), transport, plan_set(1, row(2)))

    def mid_window_update(request: OffloadRequest) -> None:
        if len(transport.requests) == 2:  # while window 1 is in the cloud, v2 arrives
            device.apply_plan(plan_set(2, row(5, Codec.FP16)))

    transport.hook = mid_window_update
    sink = MemorySink()
    await device.run(source(windows(MODEL, 4)), sink)
    assert [(r.cut, r.codec, r.plan_version) for r in sink.results] == [
        (2, "fp32", 1),
        (2, "fp32", 1),
        (5, "fp16", 2),
        (5, "fp16", 2),
    ]
    assert [r.cut for r in transport.requests] == [2, 2, 5, 5]
    assert [r.plan_version for r in transport.requests] == [1, 1, 2, 2]
    assert device.plan_version == 2 and len(device.plan_log) == 2


async def test_older_and_out_of_range_plans_are_refused() -> None:
    device = EdgeDevice(config(), trained(MODEL), FakeTransport(), plan_set(3, row(2)))
    device.apply_plan(plan_set(2, row(5)))  # older
    await device.process(windows(MODEL, 1)[0])
    device.apply_plan(plan_set(4, row(N + 1)))  # a cut this model does not have
    result = await device.process(windows(MODEL, 1)[0])
    assert device.plan_version == 3 and result.cut == 2
    assert "out of range" in device.plan_log[-1]


async def test_cut_n_runs_locally_without_the_transport() -> None:
    transport = FakeTransport()
    plans = plan_set(1, row(N, reason="the link is too slow for any cut"))
    sink = MemorySink()
    summary = await EdgeDevice(config(), trained(MODEL), transport, plans).run(source(windows(MODEL, 5)), sink)
    assert summary.by_mode["local"] == 5 and transport.requests == []
    assert all(r.bytes_sent == 0 and r.codec is None for r in sink.results)
    assert "the link is too slow" in sink.results[0].reason


async def test_no_transport_means_local_only() -> None:
    summary = await EdgeDevice(config(), trained(MODEL), None).run(source(windows(MODEL, 3)))
    assert summary.by_mode == {"offloaded": 0, "local": 3, "fallback": 0, "deferred": 0} and summary.bytes_sent == 0


async def test_low_battery_rows_take_over_as_the_battery_drains() -> None:
    transport = FakeTransport()
    plans = plan_set(1, row(5), row(N, battery=BatteryState.LOW, reason="low battery: stay local"))
    # a 1 mWh (3.6 J) battery at 25%: the first transfer's LTE promotion alone (~0.3 J) drains it
    # below the 20% threshold
    cfg = config(battery_mwh=1.0, battery_initial_fraction=0.25)
    sink = MemorySink()
    summary = await EdgeDevice(cfg, trained(MODEL), transport, plans).run(source(windows(MODEL, 4)), sink)
    assert [r.mode for r in sink.results] == [ExecutionMode.OFFLOADED] + [ExecutionMode.LOCAL] * 3
    assert "low battery" in sink.results[1].reason
    assert summary.battery_fraction < 0.2
    assert sink.results[0].energy_mj > 300  # promotion 1210.7 mW x 0.26 s + transfer + compute


def test_default_cut_is_the_smallest_activation() -> None:
    device = EdgeDevice(config(), trained(MODEL), None)
    model = trained(MODEL).model
    sizes = [math.prod(model.activation_shape(k)) for k in range(N)]
    assert device._default.cut == sizes.index(min(sizes))
    with pytest.raises(Exception, match="out of range"):
        EdgeDevice(config(default_cut=N + 1), trained(MODEL), None)


# --- telemetry, metrics, sink ---------------------------------------------------------------


async def test_telemetry_reports_add_up_to_the_windows_and_metrics_count_modes() -> None:
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry()
    transport = FakeTransport()

    def fail(request: OffloadRequest) -> None:
        if len(transport.requests) in (4, 5):  # the 4th and 5th calls
            raise BrokerUnavailableError("down")

    transport.fail = fail
    metrics = EdgeMetrics(MODEL, "phone", registry=registry)
    device = EdgeDevice(config(default_cut=5, telemetry_period_s=1e-6), trained(MODEL), transport, metrics=metrics)
    summary = await device.run(source(windows(MODEL, 10)))
    assert summary.by_mode == {"offloaded": 8, "local": 0, "fallback": 2, "deferred": 0}
    assert summary.fallbacks_by_reason == {"unavailable": 2}
    obs = [o for r in transport.reports for o in r.observations]
    assert sum(o.window_count for o in obs) == 10
    assert sum(o.failure_count for o in obs) == 2
    assert all(len(o.stage_ms_total) == (5 if o.mode is ExecutionMode.OFFLOADED else N) for o in obs)
    assert {r.device_id for r in transport.reports} == {"edge-0"}

    def value(name: str, **labels: str) -> float:
        return registry.get_sample_value(name, {"model": MODEL, "device_class": "phone", **labels}) or 0.0

    assert value("splitsense_edge_windows_total", cut="5", mode="offloaded") == 8
    assert value("splitsense_edge_fallbacks_total", reason="unavailable") == 2
    assert value("splitsense_edge_breaker_state") == 0
    assert value("splitsense_edge_window_latency_seconds_count", mode="offloaded") == 8
    assert value("splitsense_edge_sent_bytes_total", cut="5", codec="fp32") == summary.bytes_sent


async def _report_times(device_id: str, jitter: float, n: int = 60) -> list[float]:
    """When (on the device's clock) each report of a run of `n` windows, one a second, went."""
    clock, transport, at = Clock(), FakeTransport(), []
    report = transport.report_telemetry

    async def spy(r: TelemetryReport, timeout_s: float = 5.0) -> TelemetryAck:
        at.append(clock.t)
        return await report(r, timeout_s)

    transport.report_telemetry = spy  # type: ignore[method-assign]
    cfg = config(default_cut=5, device_id=device_id, telemetry_period_s=10.0, telemetry_jitter=jitter)
    device = EdgeDevice(cfg, trained(MODEL), transport, clock=clock)

    async def paced() -> AsyncIterator[SensorWindow]:
        for t, w in enumerate(windows(MODEL, n)):
            clock.t = float(t)
            for _ in range(3):
                await asyncio.sleep(0)  # the report task's turn
            yield replace(w, t_emit=clock.t)

    await device.run(paced())
    return at[:-1]  # the last is the final report, as the run ends


async def test_telemetry_reports_are_spread_so_a_fleet_does_not_report_together() -> None:
    # (a report's task runs as the next window comes: one second after it was due)
    assert await _report_times("edge-a", 0.0) == [1.0, 11.0, 21.0, 31.0, 41.0, 51.0]  # no jitter: every period
    a, b = await _report_times("edge-a", 0.2), await _report_times("edge-b", 0.2)
    for times in (a, b):
        assert 1.0 <= times[0] <= 3.0  # within jitter x period of the first window
        assert all(
            8.0 <= y - x < 13.0 for x, y in zip(times, times[1:], strict=False)
        )  # 10 s +-20% (a window a second)
    assert a != b  # two devices that boot together report apart
    assert a == await _report_times("edge-a", 0.2)  # each device's schedule is its own, and repeatable
    for bad in (-0.1, 1.0, math.nan):
        with pytest.raises(ConfigError, match=r"edge.telemetry_jitter must be in \[0, 1\)"):
            config(telemetry_jitter=bad)


@pytest.mark.parametrize("handling_ms", [None, 0.3])
async def test_a_timed_telemetry_answer_is_the_link_sample_and_replaces_the_ping(handling_ms: float | None) -> None:
    """A broker that says how long it took to handle a report: the report's own round trip, less
    that, is a sample of the link, and no ping follows it. One that does not: a ping per report."""
    transport = FakeTransport()
    transport.handling_ms = handling_ms
    device = EdgeDevice(config(default_cut=5, telemetry_period_s=1e-6), trained(MODEL), transport)
    samples: list[tuple[int, int, float]] = []
    record = device.estimator.record_transfer

    def spy(up: int, down: int, elapsed_s: float, server_s: float = 0.0, promotion_s: float = 0.0) -> Any:
        if server_s != pytest.approx(0.5 / 1000):  # not an offload's (FakeTransport's Timing: 0.1 + 0.4 ms)
            samples.append((up, down, server_s))
        return record(up, down, elapsed_s, server_s, promotion_s)

    device.estimator.record_transfer = spy  # type: ignore[method-assign]
    await device.run(source(windows(MODEL, 6)))
    pings = [v for v in transport.plan_calls if v == 2**62]
    assert transport.reports
    if handling_ms is None:
        assert len(pings) == len(transport.reports)
        assert samples and all(up < 100 and server_s == 0.0 for up, _, server_s in samples)  # the pings
    else:
        assert pings == []
        assert len(samples) == len(transport.reports)
        for up, down, server_s in samples:
            assert up > 100 and down > 0 and server_s == pytest.approx(handling_ms / 1000)


async def test_jsonl_sink_writes_one_parseable_line_per_window() -> None:
    buf = StringIO()
    sink = JsonlSink(buf)
    await EdgeDevice(config(default_cut=5), trained(MODEL), FakeTransport()).run(source(windows(MODEL, 3)), sink)
    lines = [json.loads(line) for line in buf.getvalue().splitlines()]
    assert len(lines) == 3 == sink.count
    keys = {
        "window_id",
        "label",
        "prediction",
        "mode",
        "cut",
        "codec",
        "latency_ms",
        "bytes_sent",
        "energy_mj",
    }
    assert keys <= set(lines[0]) and lines[0]["mode"] == "offloaded"


# --- store-and-forward: a device that cannot hold the whole model ---------------------------


def sf_device(transport: FakeTransport, breaker: BreakerConfig, **kw: Any) -> EdgeDevice:
    """A device without local fallback (the front up to cut 5 fits, the whole model does not)."""
    cfg = config(default_cut=5, breaker=breaker, **kw.pop("cfg", {}))
    return EdgeDevice(cfg, trained(MODEL), transport, local_fallback=False, **kw)


@pytest.mark.parametrize("burst", [1, 4])
async def test_a_closed_breaker_forwards_the_store_in_bursts(burst: int) -> None:
    """After an outage, the stored windows go `edge.store_drain_burst` at a time (their answers
    awaited together), oldest first; the open breaker's probe is one window."""

    class Slow(FakeTransport):
        """Answers after a few loop turns, counting the calls in flight."""

        def __init__(self) -> None:
            super().__init__()
            self.in_flight = self.most = 0

        async def offload(self, request: OffloadRequest, timeout_s: float) -> OffloadResponse:
            self.in_flight += 1
            self.most = max(self.most, self.in_flight)
            try:
                for _ in range(5):
                    await asyncio.sleep(0)
                return await super().offload(request, timeout_s)
            finally:
                self.in_flight -= 1

    clock, transport = Clock(), Slow()
    link = transport.fail = LinkSwitch()
    breaker = BreakerConfig(failure_threshold=1, backoff_base_s=5.0, backoff_factor=1.0, backoff_jitter=0.0)
    device = sf_device(transport, breaker, clock=clock, cfg={"store_drain_burst": burst})
    ws = windows(MODEL, 12)

    async def paced() -> AsyncIterator[SensorWindow]:  # one window per second; down at 2 <= t < 3
        for t, w in enumerate(ws):
            clock.t, link.down = float(t), t == 2
            for _ in range(3):
                await asyncio.sleep(0)
            yield replace(w, t_emit=clock.t)

    sink = MemorySink()
    summary = await device.run(paced(), sink)
    # t 2: fails, open until 7 | 3-8: stored (the probe, window 2, is out at 7) | then the drain
    # forwards 3..8: one a round trip (burst 1), the last of them only in the flush after window 11;
    # or four at a time (burst 4): the backlog gone before window 11 is
    assert summary.lost == 0 and summary.pending == 0 and not device.store
    got = sorted(r.window_id for r in sink.results)
    assert got == [w.window_id for w in ws]  # each once
    deferred = [i for i, r in enumerate(sink.results) if r.mode is ExecutionMode.DEFERRED]
    eleven = next(i for i, r in enumerate(sink.results) if r.window_id == ws[11].window_id)
    assert len(deferred) == 7  # windows 2..8
    if burst == 4:
        assert max(deferred) < eleven and transport.most >= 4  # four of the drain's calls at once
    else:
        assert max(deferred) > eleven and transport.most <= 2  # the drain's one, and a live window's


async def test_without_local_fallback_an_outage_is_stored_then_forwarded_in_order_and_none_is_lost() -> None:
    from prometheus_client import CollectorRegistry

    clock, transport, registry = Clock(), FakeTransport(), CollectorRegistry()
    link = transport.fail = LinkSwitch()
    breaker = BreakerConfig(failure_threshold=2, backoff_base_s=3.0, backoff_factor=2.0, backoff_jitter=0.0)
    device = sf_device(transport, breaker, clock=clock, metrics=EdgeMetrics(MODEL, "sensor_node", registry=registry))
    ws = windows(MODEL, 20)

    async def paced() -> AsyncIterator[SensorWindow]:  # one window per second; the link is down 3 <= t < 8
        for t, w in enumerate(ws):
            clock.t, link.down = float(t), 3 <= t < 8
            for _ in range(12):
                await asyncio.sleep(0)  # the drain task's turns (a burst's calls gather: a few each)
            yield replace(w, t_emit=clock.t)

    sink, order = MemorySink(), []
    summary = await device.run(paced(), sink, progress=lambda r: order.append(r.window_id))
    # t 3: fails, stored | 4: the drain retries it: 2nd failure, open until 7 | 5, 6: stored | 7: the
    # drain's probe (window 3) fails, open until 13 | 8-12: the link is back, the breaker still open:
    # stored | 13: the probe succeeds and the drain forwards 3..12 before window 13 | 13-19: offloaded
    modes = [r.mode for r in sink.results]
    assert modes == [ExecutionMode.OFFLOADED] * 3 + [ExecutionMode.DEFERRED] * 10 + [ExecutionMode.OFFLOADED] * 7
    assert order == [r.window_id for r in sink.results] == [w.window_id for w in ws]  # in order, each once
    assert summary.windows == 20 and summary.lost == 0 and summary.pending == 0 and summary.lost_by_reason == {}
    assert summary.by_mode == {"offloaded": 10, "local": 0, "fallback": 0, "deferred": 10}
    assert [r.prediction for r in sink.results] == await run_local(MODEL, ws)
    deferred = sink.results[3:13]
    assert [r.latency_ms for r in deferred] == [(13 - i) * 1000.0 for i in range(3, 13)]  # the true delay
    # why each was stored, typed: window 3's own failed send, then the open breaker's
    assert deferred[0].kind is FallbackKind.UNAVAILABLE and all(r.kind is FallbackKind.BREAKER for r in deferred[5:])
    assert all(r.kind is None for r in sink.results if r.mode is ExecutionMode.OFFLOADED)
    assert all(r.latency_ms == 0.0 for r in sink.results[13:])  # later windows never wait for stored ones
    nbytes = sink.results[0].bytes_sent
    assert deferred[0].bytes_sent == 4 * nbytes  # sent at t 3, 4, 7 and 13
    assert deferred[0].reason.startswith("stored: 10.00 s in the store-and-forward buffer, forwarded on attempt 4")
    assert "stored because unavailable: broker unavailable" in deferred[0].reason
    assert all(r.bytes_sent == nbytes and "because circuit breaker open" in r.reason for r in deferred[1:])
    assert all(r.cut == 5 and r.codec == "fp32" and r.stage_ms for r in deferred)
    assert len(transport.requests) == 3 + 3 + 10 + 7
    assert [r.window_id for r in transport.requests[3:16]] == [ws[3].window_id] * 4 + [w.window_id for w in ws[4:13]]
    assert device.store.peak_bytes == 10 * nbytes and not device.store
    assert device.breaker.state is BreakerState.CLOSED

    def value(name: str, **labels: str) -> float:
        return registry.get_sample_value(name, {"model": MODEL, "device_class": "sensor_node", **labels}) or 0.0

    assert value("splitsense_edge_deferred_windows_total") == 10
    assert value("splitsense_edge_windows_total", cut="5", mode="deferred") == 10
    assert value("splitsense_edge_store_forward_delay_seconds_count") == 10
    assert value("splitsense_edge_store_forward_delay_seconds_sum") == sum(range(1, 11))
    assert value("splitsense_edge_stored_windows") == 0 and value("splitsense_edge_store_bytes") == 0


class HangingTransport(FakeTransport):
    """While `down`, a request gets no answer and hangs until its deadline (a link dropping packets)."""

    def __init__(self) -> None:
        super().__init__()
        self.down = False
        self.hanging = 0  # requests in flight that will time out

    async def offload(self, request: OffloadRequest, timeout_s: float) -> OffloadResponse:
        from splitsense.errors import OffloadDeadlineError

        if not self.down:
            return await super().offload(request, timeout_s)
        self.requests.append(request)
        self.hanging += 1
        try:
            await asyncio.sleep(timeout_s)
        finally:
            self.hanging -= 1
        raise OffloadDeadlineError(f"no answer within {timeout_s * 1000:.0f} ms")


async def test_without_local_fallback_the_window_loop_never_waits_for_stored_windows() -> None:
    transport = HangingTransport()
    # a probe every 100 ms while the link is down; each one hangs for its 40 ms deadline
    breaker = BreakerConfig(
        failure_threshold=1, backoff_base_s=0.1, backoff_factor=1.0, backoff_max_s=0.1, backoff_jitter=0.0
    )
    device = sf_device(transport, breaker, cfg={"deadline_ms": 40.0})
    ws = windows(MODEL, 60)
    during_probe: list[str] = []  # windows that arrived while a stored window's probe was hanging
    loop = asyncio.get_running_loop()

    async def paced() -> AsyncIterator[SensorWindow]:  # a window every 10 ms; down for windows 10..29
        for i, w in enumerate(ws):
            await asyncio.sleep(0.01)
            transport.down = 10 <= i < 30
            if transport.hanging:  # only a background send can hang while the loop asks for a window
                during_probe.append(w.window_id)
            yield replace(w, t_emit=loop.time())

    sink = MemorySink()
    summary = await device.run(paced(), sink)
    ids = [r.window_id for r in sink.results]
    assert sorted(ids) == sorted(w.window_id for w in ws) and len(set(ids)) == 60
    assert summary.lost == 0 and summary.pending == 0 and summary.windows == 60
    by_id = {r.window_id: r for r in sink.results}
    assert during_probe and all(by_id[i].mode is ExecutionMode.DEFERRED for i in during_probe)
    deferred = [r for r in sink.results if r.mode is ExecutionMode.DEFERRED]
    assert [r.window_id for r in deferred] == [
        w.window_id for w in ws if w.window_id in {r.window_id for r in deferred}
    ]
    assert deferred[0].window_id == ws[10].window_id and deferred[0].latency_ms >= 200.0  # the outage, at least
    assert all(r.reason.startswith("stored: ") for r in deferred)
    # after the drain, windows offload again at once, not behind the stored ones
    assert all(by_id[w.window_id].mode is ExecutionMode.OFFLOADED for w in ws[-10:])
    assert all(by_id[w.window_id].latency_ms < 40.0 for w in ws[-10:])


async def test_a_full_store_refuses_windows_as_lost_and_what_is_left_at_the_end_is_pending() -> None:
    from prometheus_client import CollectorRegistry

    from edge.runtime import WindowUnansweredError

    clock, transport, registry = Clock(), FakeTransport(), CollectorRegistry()

    def fail(request: OffloadRequest) -> None:
        if clock.t >= 1:
            raise BrokerUnavailableError("broker unavailable (UNAVAILABLE: connection refused)")

    transport.fail = fail
    nbytes = math.prod(trained(MODEL).model.activation_shape(5)) * 4  # fp32 at cut 5
    breaker = BreakerConfig(failure_threshold=1, backoff_base_s=3.0, backoff_factor=2.0, backoff_jitter=0.0)
    device = sf_device(
        transport,
        breaker,
        clock=clock,
        metrics=EdgeMetrics(MODEL, "sensor_node", registry=registry),
        store_capacity_bytes=3 * nbytes,
        drain_timeout_s=0.0,  # the link never comes back: do not wait for it at the end
    )
    ws = windows(MODEL, 7)

    async def paced() -> AsyncIterator[SensorWindow]:
        for t, w in enumerate(ws):
            clock.t = float(t)
            for _ in range(3):
                await asyncio.sleep(0)
            yield replace(w, t_emit=clock.t)

    sink = MemorySink()
    summary = await device.run(paced(), sink)
    assert [r.mode for r in sink.results] == [ExecutionMode.OFFLOADED]
    assert summary.windows == 1 and summary.pending == 3 and summary.pending_bytes == 3 * nbytes
    assert summary.lost == 3 and summary.lost_by_reason == {"refused": 3}
    assert summary.to_dict()["pending"] == 3 and not device.store

    def value(name: str, **labels: str) -> float:
        return registry.get_sample_value(name, {"model": MODEL, "device_class": "sensor_node", **labels}) or 0.0

    assert value("splitsense_edge_unanswered_windows_total", reason="refused") == 3
    assert value("splitsense_edge_unanswered_windows_total", reason="pending") == 3
    assert value("splitsense_edge_stored_windows") == 0

    # process() waits for a stored window's answer; a refused one raises, with the reason
    empty = sf_device(FakeTransport(), breaker, store_capacity_bytes=0)
    empty.transport.fail = fail  # type: ignore[union-attr]
    with pytest.raises(WindowUnansweredError, match="store full") as err:
        await empty.process(ws[1])
    assert err.value.kind == "refused" and err.value.nbytes == nbytes


async def test_without_local_fallback_a_local_plan_row_is_sent_at_the_deepest_cut_that_fits() -> None:
    from splitsense.errors import ConfigError

    ws = windows(MODEL, 6)
    transport = FakeTransport()
    cfg = config(default_codec="ans")
    device = EdgeDevice(cfg, trained(MODEL), transport, plan_set(1, row(N)), local_fallback=False, max_cut=1)
    sink = MemorySink()
    summary = await device.run(source(ws), sink)
    assert summary.by_mode["offloaded"] == 6 and summary.by_mode["local"] == 0
    assert all(r.cut == 1 and r.codec == "ans" for r in sink.results)
    assert all(r.cut == 1 and r.activation.codec is Codec.ANS for r in transport.requests)
    assert [r.prediction for r in sink.results] == await run_local(MODEL, ws)
    with pytest.raises(ConfigError, match="needs a transport"):
        EdgeDevice(cfg, trained(MODEL), None, local_fallback=False)
    with pytest.raises(ConfigError, match="out of range"):
        EdgeDevice(cfg, trained(MODEL), transport, local_fallback=False, max_cut=N)
    with pytest.raises(ConfigError, match="max_cut"):
        EdgeDevice(cfg, trained(MODEL), transport, max_cut=1)
