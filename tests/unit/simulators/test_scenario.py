"""Named scenarios, outage strings, and the seeded assignment of traces and recordings to devices."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from simulators.scenario import SCENARIOS, assign_devices, load_scenario, parse_outages
from simulators.traces import Trace
from splitsense.config import Config, SimulatorConfig
from splitsense.errors import ConfigError

WINDOWS = {"fsdd_digit": 300, "fsdd_speaker": 300, "uci_har": 950, "fsdd_speaker+fsdd_digit": 300}
PERIODS = {"fsdd_digit": 1.0, "fsdd_speaker": 1.0, "uci_har": 1.28, "fsdd_speaker+fsdd_digit": 1.0}


def _traces(n: int) -> list[Trace]:
    return [Trace.constant(1.0 + i, duration_s=10.0 + i, name=f"t{i}") for i in range(n)]


def test_every_named_scenario_builds() -> None:
    for name in SCENARIOS:
        cfg = load_scenario(name)
        assert isinstance(cfg.simulator, SimulatorConfig)
    assert load_scenario("smoke").simulator.outages == ((2.0, 4.0),)
    mixed = load_scenario(None, {"simulator": {"models": {"watch": "uci_har"}}})
    assert mixed.simulator.models["watch"] == "uci_har"
    assert mixed.simulator.models["phone"] == "uci_har"  # the others keep their defaults
    assert load_scenario(None) == Config()


def test_overrides_and_scenario_files(tmp_path: Path) -> None:
    cfg = load_scenario("demo", {"simulator": {"devices": 5, "policies": ["oracle"]}})
    assert cfg.simulator.devices == 5 and cfg.simulator.policies == ("oracle",)
    assert cfg.simulator.duration_s == 20.0 and cfg.controller.period_s == 5.0
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"simulator": {"devices": 7, "rtt_ms": {"wifi": 5}}}))
    mine = load_scenario(path, {"simulator": {"duration_s": 3}})
    assert (mine.simulator.devices, mine.simulator.duration_s, mine.simulator.rtt_ms["wifi"]) == (7, 3.0, 5.0)
    assert mine.simulator.rtt_ms["lte"] == 70.0
    with pytest.raises(ConfigError, match="named scenarios"):
        load_scenario("no-such-scenario")
    with pytest.raises(ConfigError, match="unknown simulator policy"):
        load_scenario(None, {"simulator": {"policies": ["magic"]}})


def test_the_link_mode_is_proxy_but_for_the_scale_scenario() -> None:
    assert {name: load_scenario(name).simulator.link for name in SCENARIOS} == {
        "smoke": "proxy",
        "demo": "proxy",
        "outage": "proxy",
        "benchmark": "proxy",
        "scale": "inline",
    }
    assert load_scenario("scale", {"simulator": {"link": "proxy"}}).simulator.link == "proxy"
    assert Config.from_dict(Config(simulator=SimulatorConfig(link="inline")).to_dict()).simulator.link == "inline"
    with pytest.raises(ConfigError, match="simulator.link"):
        load_scenario(None, {"simulator": {"link": "netem"}})


def test_parse_outages() -> None:
    assert parse_outages("10+6, 40-42.5") == ((10.0, 16.0), (40.0, 42.5))
    assert parse_outages("") == ()
    for bad in ("10", "a+b", "5+0", "8-3"):
        with pytest.raises(ConfigError):
            parse_outages(bad)


def test_assignment_is_seeded_round_robin_and_covers_the_traces() -> None:
    sim = SimulatorConfig(devices=7, seed=3)
    traces = _traces(5)
    a = assign_devices(sim, traces, WINDOWS, PERIODS)
    b = assign_devices(sim, traces, WINDOWS, PERIODS)
    assert [s.to_dict() for s in a] == [s.to_dict() for s in b]
    assert [s.device_class for s in a] == ["phone", "iot_board", "watch", "sensor_node"] + [
        "phone",
        "iot_board",
        "watch",
    ]
    assert [s.model for s in a[:4]] == ["uci_har", "fsdd_speaker", "fsdd_digit", "fsdd_speaker+fsdd_digit"]
    assert max(a[3].trace.mbps) <= sim.radio_cap_mbps["ble"]  # BLE carries at most its cap
    assert {s.trace.name for s in a[:5]} == {t.name for t in traces}  # dealt round-robin
    assert len({s.device_id for s in a}) == 7
    for s in a:
        assert 0 <= s.trace_offset_s < s.trace.duration_s
        assert 0 <= s.phase_s < (1.28 if s.model == "uci_har" else 1.0)
    other = assign_devices(SimulatorConfig(devices=7, seed=4), traces, WINDOWS, PERIODS)
    assert [s.trace_offset_s for s in other] != [s.trace_offset_s for s in a]
