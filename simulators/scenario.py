"""Named scenarios, scripted outages, and who in the fleet gets which trace, offset and recording.

A scenario is a set of overrides of the one config object (`splitsense.config.Config`), the
`simulator` section and whatever else the set-up needs (a shorter controller period for a short
demo). `load_scenario("demo")` builds one by name; a path loads a JSON scenario file instead
(`Config.from_file`), so a user's own set-ups need no code.

    smoke      3 devices x 6 s per policy, an outage from 2 s to 4 s: the integration test
    demo       12 devices x 20 s per policy, all five policies: `splitsense demo`
    outage     12 devices x 30 s, every link down from 10 s to 16 s: fallback and recovery
    benchmark  24 devices x 60 s per policy, all five policies: the figures of the issue
    scale      200 devices x 60 s, adaptive and all_cloud, in 2 shards (Ray actors) reusing fronts,
               links inline (no proxy per device): does the fleet keep up in real time?
               (`--devices 1000`: the sharded target; `--link proxy` for the proxies)

`assign_devices` is pure and seeded: device i gets class ``device_classes[i % C]``, the model of
its class, a trace (the traces shuffled once by the seed, then dealt round-robin), a start offset
into that trace, a start position in its model's test recording, and a start phase within one
window period (real devices are not synchronised; without it all would send in the same
millisecond). The same config gives the same fleet, for every policy of a run and for every run.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.devices import DEVICE_CLASSES
from simulators.traces import Trace, load_trace_dir
from splitsense.config import Config, SimulatorConfig
from splitsense.errors import ConfigError, DataError

__all__ = [
    "SCENARIOS",
    "DeviceSpec",
    "assign_devices",
    "load_scenario",
    "parse_outages",
    "select_traces",
]

SCENARIOS: dict[str, dict[str, Any]] = {
    "smoke": {
        # one device of each class (the sensor node included: it stores and forwards in the outage)
        "simulator": {"devices": 4, "duration_s": 6.0, "outages": [[2.0, 4.0]]},
        "controller": {"period_s": 2.0},
    },
    "demo": {
        "simulator": {"devices": 12, "duration_s": 20.0},
        # 20 s per policy: replan every 5 s so that adaptive sees a few passes with telemetry.
        "controller": {"period_s": 5.0},
    },
    "outage": {
        "simulator": {"devices": 12, "duration_s": 30.0, "outages": [[10.0, 16.0]]},
        "controller": {"period_s": 5.0},
    },
    "benchmark": {
        "simulator": {"devices": 24, "duration_s": 60.0},
        "controller": {"period_s": 5.0},
    },
    "scale": {
        # a sharded fleet (simulators/shards.py): Ray actors, fronts reused per (window, cut,
        # level, codec); --devices 1000 is the target, --shards/--no-reuse/--link change the mode
        "simulator": {
            "devices": 200,
            "duration_s": 60.0,
            "policies": ["adaptive", "all_cloud"],
            "shards": 2,
            "reuse": True,
            "link": "inline",  # the link model in process: no proxy per device (simulators/link.py)
        },
        "controller": {"period_s": 15.0},
    },
}


def load_scenario(name_or_path: str | Path | None = None, overrides: Mapping[str, Any] | None = None) -> Config:
    """The Config of a named scenario (see SCENARIOS) or of a JSON scenario file, with `overrides`
    (a partial config dict, e.g. from command-line options) applied on top; None: the defaults."""
    base: dict[str, Any] = {}
    if name_or_path is not None:
        key = str(name_or_path)
        if key in SCENARIOS:
            base = _deep_copy(SCENARIOS[key])
        else:
            path = Path(key)
            if not path.exists():
                raise ConfigError(
                    f"no scenario named {key!r} and no such file; named scenarios: {', '.join(SCENARIOS)}"
                )
            cfg = Config.from_file(path)
            return cfg if not overrides else _apply(cfg.to_dict(), overrides)
    return Config.from_dict(_merge(base, dict(overrides or {})))


def _apply(data: dict[str, Any], overrides: Mapping[str, Any]) -> Config:
    return Config.from_dict(_merge(data, dict(overrides)))


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _deep_copy(data: dict[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in data.items()}


def parse_outages(text: str) -> tuple[tuple[float, float], ...]:
    """'START+DURATION,...' (seconds from each policy's start), e.g. '10+6,40+2.5' -> ((10, 16), (40, 42.5)).

    'START-END' is accepted too ('10-16'). Empty text: no outages.
    """
    out = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            if "+" in part:
                start_s, dur_s = (float(x) for x in part.split("+", 1))
                end_s = start_s + dur_s
            elif "-" in part:
                start_s, end_s = (float(x) for x in part.split("-", 1))
            else:
                raise ValueError
        except ValueError:
            raise ConfigError(f"outage {part!r} must be START+DURATION or START-END in seconds, e.g. '10+6'") from None
        if not 0 <= start_s < end_s:
            raise ConfigError(f"outage {part!r}: need 0 <= start < end")
        out.append((start_s, end_s))
    return tuple(out)


def select_traces(sim: SimulatorConfig) -> list[Trace]:
    """The traces of `sim.traces_dir` (default: the project's), restricted to `sim.trace_families`."""
    traces = load_trace_dir(sim.traces_dir)
    if not sim.trace_families:
        return traces
    wanted = set(sim.trace_families)
    chosen = [t for t in traces if t.family in wanted]
    if not chosen:
        families = sorted({t.family for t in traces})
        raise DataError(
            f"no traces of families {sorted(wanted)} under {sim.traces_dir or 'the project traces'}; "
            f"found: {', '.join(families)}"
        )
    return chosen


@dataclass(frozen=True)
class DeviceSpec:
    """One simulated device: who it is and which inputs it gets (the same under every policy)."""

    index: int
    device_id: str
    device_class: str
    model: str
    trace: Trace
    trace_offset_s: float  # trace time at the start of each policy's run
    recording_offset: int  # first window of the model's test recording it replays
    phase_s: float  # when its sensor stream starts, after the policy's start
    seed: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "device_id": self.device_id,
            "device_class": self.device_class,
            "model": self.model,
            "trace": self.trace.name,
            "trace_family": self.trace.family,
            "trace_mean_mbps": round(self.trace.mean_mbps, 4),
            "trace_offset_s": round(self.trace_offset_s, 3),
            "recording_offset": self.recording_offset,
            "phase_s": round(self.phase_s, 4),
            "seed": self.seed,
        }


def assign_devices(
    sim: SimulatorConfig,
    traces: Sequence[Trace],
    recording_windows: Mapping[str, int],
    window_period_s: Mapping[str, float],
) -> list[DeviceSpec]:
    """The fleet of `sim` (see the module docstring). `recording_windows[model]` is the length of
    its test recording, `window_period_s[model]` the time between two of its windows."""
    if not traces:
        raise DataError("the fleet needs at least one trace")
    rng = random.Random(sim.seed)
    order = list(traces)
    rng.shuffle(order)
    specs = []
    for i in range(sim.devices):
        cls = sim.device_classes[i % len(sim.device_classes)]
        model = sim.models[cls]
        n_windows = recording_windows.get(model)
        period = window_period_s.get(model)
        if not n_windows or not period or period <= 0:
            raise ConfigError(f"no test recording / window period for model {model!r} of class {cls!r}")
        trace = order[i % len(order)]
        cap = sim.radio_cap_mbps.get(DEVICE_CLASSES[cls].radio.value) if cls in DEVICE_CLASSES else None
        if cap is not None:
            trace = trace.capped(cap)
        specs.append(
            DeviceSpec(
                index=i,
                device_id=f"{sim.device_id_prefix}-{i:03d}-{cls}",
                device_class=cls,
                model=model,
                trace=trace,
                trace_offset_s=rng.uniform(0.0, trace.duration_s),
                recording_offset=rng.randrange(n_windows),
                phase_s=rng.uniform(0.0, period),
                seed=rng.randrange(2**31),
            )
        )
    return specs
