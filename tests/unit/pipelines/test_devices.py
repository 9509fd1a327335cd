"""Device classes: cited figures, memory budgets, and the memory feasibility of a front."""

from __future__ import annotations

import math

import pytest

from pipelines.catalog import CodecEntry, LevelEntry, ModelCatalog
from pipelines.codecs import Codec
from pipelines.devices import (
    DEVICE_CLASSES,
    DeviceClass,
    FrontMemory,
    device_class,
    format_bytes,
    front_fits,
    front_memory,
)
from pipelines.power import Radio
from splitsense.config import PlannerConfig, SimulatorConfig
from splitsense.errors import ConfigError


def tiny_catalog() -> ModelCatalog:
    """Two stages: input (1, 100) -> (8, 100) -> (10,); 1,000 and 2,000 params (level 0.5: half)."""
    shapes = ((1, 100), (8, 100), (10,))
    return ModelCatalog(
        model="tiny",
        stage_names=("conv", "fc"),
        stage_latency_ms=(1.0, 1.0),
        stage_macs=(1, 1),
        stage_params=(1000, 2000),
        activation_shapes=shapes,
        result_bytes=40,
        window_s=1.0,
        base_accuracy=0.9,
        levels=(
            LevelEntry(1.0, (0.0, 1.0, 2.0), (0, 1000, 3000), (0.9, 0.9, 0.9)),
            LevelEntry(0.5, (0.0, 1.0, 2.0), (0, 500, 1500), (0.9, 0.9, 0.9)),
        ),
        codecs=(CodecEntry(Codec.FP32, (400, 3200, 0), (0.9, 0.9, 0.9)),),
    )


def test_every_class_has_cited_memory_budgets() -> None:
    for dc in DEVICE_CLASSES.values():
        assert dc.ram_bytes is not None and dc.ram_bytes > 0
        assert dc.storage_bytes is not None and dc.storage_bytes > 0
        assert "Memory:" in dc.source
    assert "4 GB RAM" in DEVICE_CLASSES["phone"].source
    assert "4 GB RAM model" in DEVICE_CLASSES["iot_board"].source
    assert "512 MB RAM, 4 GB storage" in DEVICE_CLASSES["watch"].source


def test_sensor_node_is_a_ble_microcontroller() -> None:
    node = device_class("sensor_node")
    assert node.radio is Radio.BLE and not node.weights_in_ram
    assert "nRF52840" in node.source and "CMSIS-NN" in node.source
    # 640 KiB of its 1 MB flash for weights, 128 KiB of its 256 KB RAM for activations
    assert node.storage_bytes == 640 * 1024 and node.ram_bytes == 128 * 1024
    # the slowest and most frugal class by far
    assert node.speed_factor > 10 * max(d.speed_factor for n, d in DEVICE_CLASSES.items() if n != "sensor_node")
    assert node.active_mw < 20 and node.idle_mw < 0.1 and math.isclose(node.battery_mwh, 1850.0)
    # the planner and the simulator know it (it is not in the default fleet yet)
    assert PlannerConfig().classes["sensor_node"].objective == "energy"
    assert SimulatorConfig().rtt_ms["ble"] > 0
    sim = SimulatorConfig()
    assert "sensor_node" in sim.device_classes and sim.models["sensor_node"] == "fsdd_speaker+fsdd_digit"
    assert sim.radio_cap_mbps["ble"] < 1.0


def test_budgets_are_checked() -> None:
    with pytest.raises(ConfigError, match="ram_bytes"):
        DeviceClass("x", 1.0, 1.0, 0.0, Radio.WIFI, 1.0, "s", ram_bytes=0)
    with pytest.raises(ConfigError, match="storage_bytes"):
        DeviceClass("x", 1.0, 1.0, 0.0, Radio.WIFI, 1.0, "s", storage_bytes=1.5)  # type: ignore[arg-type]


def test_front_memory_is_fp32_weights_and_the_largest_stage_input_plus_output() -> None:
    cat = tiny_catalog()
    assert front_memory(cat, 0) == FrontMemory(0, 0)
    assert front_memory(cat, 1) == FrontMemory(1000 * 4, (100 + 800) * 4)
    assert front_memory(cat, 2) == FrontMemory(3000 * 4, (100 + 800) * 4)  # fc: 800 + 10 < 900
    assert front_memory(cat, 2, 0.5).weights_bytes == 1500 * 4
    assert front_memory(cat, 1).ram_bytes(weights_in_ram=True) == 4000 + 3600
    assert front_memory(cat, 1).ram_bytes(weights_in_ram=False) == 3600
    with pytest.raises(ConfigError, match="out of range"):
        front_memory(cat, 3)


def node(ram: int | None, storage: int | None, weights_in_ram: bool = False) -> DeviceClass:
    return DeviceClass("node", 1.0, 1.0, 0.0, Radio.BLE, 1.0, "test", ram, storage, weights_in_ram)


def test_front_fits_says_why_not() -> None:
    cat = tiny_catalog()
    assert front_fits(node(1, 1), cat, 0) is None  # no front: always fits
    assert front_fits(node(None, None), cat, 2) is None  # unlimited
    assert front_fits(node(10_000, 20_000), cat, 2) is None
    why = front_fits(node(10_000, 10_000), cat, 2)
    assert why == "front of tiny at cut 2 needs 11.7 KiB of weights > 9.8 KiB flash budget of node"
    assert front_fits(node(10_000, 10_000), cat, 2, 0.5) is None  # compressed hard enough, it fits
    why = front_fits(node(3000, 10_000), cat, 1)
    assert why == "front of tiny at cut 1 needs 3.5 KiB of RAM (3.5 KiB peak activation) > 2.9 KiB RAM budget of node"
    # where the runtime loads weights into RAM they count against it too
    why = front_fits(node(5000, 10_000, weights_in_ram=True), cat, 1, 0.5)
    assert why is not None and "level 0.5" in why and "+ 2.0 KiB weights" in why and "storage" not in why


def test_shipped_models_do_not_fit_the_sensor_node_whole() -> None:
    from pipelines.catalog import load_catalog

    node = DEVICE_CLASSES["sensor_node"]
    for name in ("fsdd_digit", "fsdd_speaker", "uci_har"):
        cat = load_catalog(name)
        why = front_fits(node, cat, cat.n_stages)
        assert why is not None and "flash budget of sensor_node" in why
        for other in ("phone", "iot_board", "watch"):
            assert front_fits(DEVICE_CLASSES[other], cat, cat.n_stages) is None


def test_format_bytes() -> None:
    assert format_bytes(512) == "512 B"
    assert format_bytes(1536) == "1.5 KiB"
    assert format_bytes(6_548_680) == "6.2 MiB"
    assert format_bytes(1024**3) == "1.0 GiB"
