"""cloud/wiring.py: the factories every cloud process builds its parts with."""

from __future__ import annotations

import asyncio
import os
import signal
import urllib.request
from dataclasses import replace

import pytest
from prometheus_client import CollectorRegistry, Counter

from cloud.controller.metrics_source import DirectExporterSource, PrometheusSource
from cloud.wiring import (
    Exporter,
    check_broker_exposure,
    describe_source,
    metrics_source,
    plan_store_urls,
    planner_devices,
    stop_on_signals,
)
from splitsense.config import BrokerConfig, Config, ControllerConfig, PlannerConfig
from splitsense.errors import ConfigError

SECRET = "a-real-secret-for-the-wiring-tests-0123456789"


def test_exposed_broker_is_refused_with_what_to_set() -> None:
    with pytest.raises(ConfigError, match=r"broker.auth_secret .*tls_cert_file"):
        check_broker_exposure(BrokerConfig(host="0.0.0.0"))
    with pytest.raises(ConfigError, match=r"tls_cert_file"):
        check_broker_exposure(BrokerConfig(host="0.0.0.0", auth_secret=SECRET))
    check_broker_exposure(BrokerConfig(host="0.0.0.0", auth_secret=SECRET, allow_plaintext=True))
    check_broker_exposure(BrokerConfig())  # loopback


def test_unreadable_certificate_is_refused_before_anything_listens(tmp_path) -> None:  # type: ignore[no-untyped-def]
    cfg = BrokerConfig(tls_cert_file=tmp_path / "missing.pem", tls_key_file=tmp_path / "missing.key")
    with pytest.raises(ConfigError, match="broker.tls_cert_file"):
        check_broker_exposure(cfg)


def test_metrics_source_prometheus_or_exporters() -> None:
    direct = Config(controller=ControllerConfig(exporter_urls=("127.0.0.1:9464",), query_window_s=30))
    src = metrics_source(direct, ("phone",))
    assert isinstance(src, DirectExporterSource) and src.window_s == 30
    assert describe_source(direct) == "exporters 127.0.0.1:9464"
    own = metrics_source(direct, ("phone",), exporter_urls=["http://127.0.0.1:1/metrics"])
    assert isinstance(own, DirectExporterSource)
    prom = Config(controller=ControllerConfig(prometheus_url="http://prom:9090"))
    assert isinstance(metrics_source(prom, ("phone",)), PrometheusSource)
    assert describe_source(prom) == "http://prom:9090"


def test_plan_store_urls_per_role_from_config() -> None:
    cfg = Config(
        controller=ControllerConfig(redis_url="redis://controller:pw@h:6379/0"),
        broker=BrokerConfig(redis_url="redis://broker:pw@h:6379/0"),
    )

    async def go() -> None:
        async with plan_store_urls(cfg) as urls:
            assert urls.controller.startswith("redis://controller:") and urls.broker.startswith("redis://broker:")
            assert not urls.embedded and "pw" not in urls.redacted
        same = replace(cfg, broker=BrokerConfig())
        async with plan_store_urls(same) as urls:
            assert urls.broker == urls.controller  # no broker user configured: the controller's URL

    asyncio.run(go())


def test_exporter_serves_and_names_the_option_when_the_port_is_taken() -> None:
    registry = CollectorRegistry()
    Counter("wiring_probe", "A probe.", registry=registry).inc()
    exporter = Exporter.start(registry, "127.0.0.1", 0, option="broker.metrics_port")
    try:
        body = urllib.request.urlopen(exporter.url, timeout=5).read().decode()
        assert "wiring_probe_total 1.0" in body
        with pytest.raises(ConfigError, match=r"cannot listen on 127.0.0.1:\d+ .*set broker.metrics_port"):
            Exporter.start(registry, "127.0.0.1", exporter.port, option="broker.metrics_port")
    finally:
        exporter.stop()


def test_stop_on_signals_sets_the_event_and_restores() -> None:
    async def go() -> None:
        stop = asyncio.Event()
        with stop_on_signals(stop):
            os.kill(os.getpid(), signal.SIGTERM)
            await asyncio.wait_for(stop.wait(), 5)

    asyncio.run(go())
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_planner_devices_names_unknown_classes() -> None:
    phone = PlannerConfig().classes["phone"]
    with pytest.raises(ConfigError, match="no hardware figures.*toaster"):
        planner_devices(Config(planner=PlannerConfig(classes={"phone": phone, "toaster": phone})))
    assert list(planner_devices(Config(planner=PlannerConfig(classes={"phone": phone})))) == ["phone"]
