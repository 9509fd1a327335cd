"""Plans know what a device holds (issue 11, item 3), end to end: a device on ONNX Runtime whose
export holds only the uncompressed fronts (`splitsense models export --level` none: level 1.0)
runs against the real broker, its exporter, the embedded Redis and the controller reading the
exporter directly, with the in-process tails.

1. Before any report the controller plans the phone class's best fronts, which on the shipped
   uci_har catalog are compressed (level 0.995, run locally). The device receives that plan, lacks
   those fronts, and refuses them: every window runs the whole model uncompressed instead, with kind
   missing_front and a reason naming the front; none fails, none is lost.
2. Its telemetry says which fronts it holds; the controller's next pass names only those (each
   row's reason says which front it avoided), and the plan reaches the device through the broker.
3. The device runs that plan as planned: no window is refused any more.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from cloud.stack import CloudStack
from edge.backend import OnnxBackend
from edge.runtime import EdgeDevice
from edge.sink import WindowResult
from edge.sources import source_for_model
from edge.transport import GrpcTransport
from pipelines.catalog import ModelCatalog, load_catalog
from pipelines.export import export_model
from splitsense.config import (
    BrokerConfig,
    ClassObjectiveConfig,
    Config,
    ControllerConfig,
    EdgeConfig,
    PlannerConfig,
    ServingConfig,
)
from splitsense.errors import ModelError
from splitsense.kinds import FallbackKind
from splitsense.plan import Plan, PlanSet

pytestmark = pytest.mark.integration

MODEL = "uci_har"
CLASS = "phone"
N = 6
SECRET = "held-fronts-integration-secret-0123"


@pytest.fixture(scope="module")
def catalog() -> ModelCatalog:
    try:
        return load_catalog(MODEL)
    except ModelError:  # not shipped yet: measure it (once per module)
        from pipelines.evaluation import build_model_catalog

        return build_model_catalog(MODEL, repeats=3)  # type: ignore[no-any-return]


def config() -> Config:
    return Config(
        # pinned to the class profile: this host's stage times would rightly move the plan
        planner=PlannerConfig(min_telemetry_samples=10**9, classes={CLASS: ClassObjectiveConfig("latency")}),
        serving=ServingConfig(models=(MODEL,)),
        broker=BrokerConfig(
            port=0,
            metrics_port=0,
            auth_secret=SECRET,
            static_plan_cut=N,
            static_plan_device_classes=(CLASS,),
            shutdown_grace_s=0.5,
        ),  # fmt: skip
        controller=ControllerConfig(period_s=60.0, query_window_s=60.0, prometheus_timeout_s=2.0),
    )


async def until(what: str, check: Callable[[], bool], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")
        await asyncio.sleep(0.1)


async def served_plan(transport: GrpcTransport, version: int) -> Plan:
    """The plan the broker serves this device once it has plan set `version`."""
    got: PlanSet | None = None
    deadline = time.monotonic() + 15
    while got is None or got.version < version:
        assert time.monotonic() < deadline, f"the broker never served plan set v{version}"
        got = await transport.get_plan(CLASS, [MODEL], 0, 5.0)
        await asyncio.sleep(0.1)
    plan = got.get(MODEL, CLASS)
    assert plan is not None
    return plan


async def run_device(stack: CloudStack, backend: OnnxBackend, plan: PlanSet, windows: int) -> list[WindowResult]:
    token = stack.token_for("phone-onnx")
    cfg = EdgeConfig(
        broker_address=stack.broker_address, device_id="phone-onnx", device_class=CLASS, token=token, model=MODEL,
        replay_speed=0, telemetry_period_s=0.1, backend="onnx",
    )  # fmt: skip
    transport = GrpcTransport(stack.broker_address, token, device_id="phone-onnx")
    results: list[WindowResult] = []
    try:
        device = EdgeDevice(cfg, None, transport, plan, backend=backend)
        summary = await device.run(source_for_model(MODEL, speed=0, limit=windows), progress=results.append)
        assert summary.lost == 0 and summary.windows == windows
    finally:
        await transport.close()
    return results


async def test_a_device_holding_some_fronts_is_planned_only_those(tmp_path: Path, catalog: ModelCatalog) -> None:
    export_model(MODEL, tmp_path / MODEL, levels=[], check=False, ort_format=False)  # level 1.0 only
    backend = OnnxBackend.for_models([MODEL], tmp_path)
    held = set(backend.fronts(MODEL))
    assert {lv for _, lv in held} == {1.0}
    async with CloudStack(config(), with_ray=False, catalogs={MODEL: catalog}, with_controller=False) as stack:
        transport = GrpcTransport(stack.broker_address, stack.token_for("observer"), device_id="observer")
        try:
            # 1. nothing reported yet: the best fronts, compressed ones among them
            first = await stack.controller.run_once()
            assert first is not None
            plan = await served_plan(transport, first.version)
            assert any(r.cut > 0 and (r.cut, r.compression_energy_kept) not in held for r in plan.rows)
            results = await run_device(stack, backend, first, 12)
            refused = [r for r in results if r.kind is FallbackKind.MISSING_FRONT]
            assert refused, [(r.mode, r.kind, r.reason) for r in results]
            for r in refused:
                assert (
                    r.compression_energy_kept == 1.0
                    and "missing front: the device's onnx backend does not hold" in r.reason
                )
            # 2. the device's telemetry said what it holds: the next plan names only that
            await until(
                "the device's held fronts at the broker",
                lambda: bool(
                    stack.registry.get_sample_value(
                        "splitsense_device_front_reports_total", {"model": MODEL, "device_class": CLASS}
                    )
                ),
                10,
            )
            second = await stack.controller.run_once()
            assert second is not None and second.version > first.version, stack.controller.last
            plan = await served_plan(transport, second.version)
            assert all(r.cut == 0 or (r.cut, r.compression_energy_kept) in held for r in plan.rows), plan.rows
            assert any(
                "avoided: " in r.reason and "is not held by every device of the class" in r.reason for r in plan.rows
            )
            assert "rows avoided a front not every device of the class holds" in second.reason
            # 3. the device runs it as planned
            again = await run_device(stack, backend, second, 8)
            assert all(r.kind is not FallbackKind.MISSING_FRONT and "missing front" not in r.reason for r in again)
        finally:
            await transport.close()
