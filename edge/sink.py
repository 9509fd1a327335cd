"""Where a device's per-window results go: one JSON object per line, written as each window ends.

    {"window_id": "fsdd-test-0007", "label": 3, "prediction": 3, "mode": "offloaded", "cut": 5,
     "codec": "fp32", "compression_energy_kept": 1.0, "latency_ms": 12.4, "front_ms": 9.8,
     "bytes_sent": 1024, "energy_mj": 31.2, "reason": "", "plan_version": 2, "stage_ms": [...]}

`mode` is offloaded (the cloud answered in time), local (the plan or the breaker kept the whole
window on the device), fallback (an offload was tried and failed; the device finished the
window itself and `reason` says why) or deferred (a device that cannot hold the whole model
stored the window while the cloud could not answer it and forwarded it later: its line comes when
the answer does, after lines of later windows; `latency_ms` is the whole store-and-forward delay
and `reason`, "stored: ...", says how long it was stored and why). `codec` is null when nothing
was sent. `kind` is why a window was not answered by the cloud, typed (edge/route.py FallbackKind:
plan, no_broker, link_down, breaker, probing, codec, late, unavailable, deadline, rejected, shed,
error; null when the cloud answered), and `radio_mj` the radio energy of this window's own
transfers (part of `energy_mj`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol

from edge.route import FallbackKind
from splitsense.wire import ExecutionMode

__all__ = ["JsonlSink", "MemorySink", "ResultSink", "WindowResult"]


@dataclass(frozen=True)
class WindowResult:
    """The outcome of one sensor window; every window gets exactly one."""

    window_id: str
    label: int
    prediction: int
    mode: ExecutionMode
    cut: int  # the plan's cut (N for a fully local plan)
    codec: str | None  # the codec of the activation sent; None when nothing was sent
    compression_energy_kept: float
    latency_ms: float  # from the window being available to its result (deferred: its answer, however late)
    front_ms: float  # on-device compute before the send (preprocessing + stages [0, cut))
    bytes_sent: int  # activation payload bytes sent (0 when local; deferred: every attempt that carried it)
    energy_mj: float  # device compute + radio energy of this window
    reason: str  # why local, fallback or deferred; "" when offloaded
    plan_version: int  # 0: no plan, the config's default
    stage_ms: tuple[float, ...] = ()  # on-device time of each stage that ran here, stage 0 first
    # (model, label, prediction) of each extra task that read this window's front (one upload, or
    # the shared front run once on the device); empty for a single-task window
    tasks: tuple[tuple[str, int, int], ...] = ()
    task_ms: float = 0.0  # on-device time of the extra tasks' tails that ran here
    # why the cloud did not answer it at once: a fallback's kind, or why a deferred window was
    # stored (None: the cloud answered it at once)
    kind: FallbackKind | None = None
    radio_mj: float = 0.0  # radio energy of this window's own transfers (included in energy_mj)
    estimate_mbps: float | None = None  # the device's bandwidth estimate when it chose this window's row

    @property
    def correct(self) -> bool:
        return self.prediction == self.label

    def to_dict(self) -> dict[str, Any]:
        return {
            "window_id": self.window_id,
            "label": self.label,
            "prediction": self.prediction,
            "mode": self.mode.value,
            "cut": self.cut,
            "codec": self.codec,
            "compression_energy_kept": self.compression_energy_kept,
            "latency_ms": round(self.latency_ms, 3),
            "front_ms": round(self.front_ms, 3),
            "bytes_sent": self.bytes_sent,
            "energy_mj": round(self.energy_mj, 4),
            "reason": self.reason,
            "plan_version": self.plan_version,
            "stage_ms": [round(x, 3) for x in self.stage_ms],
            "tasks": [{"model": m, "label": lab, "prediction": p} for m, lab, p in self.tasks],
            "kind": self.kind.value if self.kind is not None else None,
            "radio_mj": round(self.radio_mj, 4),
            "estimate_mbps": None if self.estimate_mbps is None else round(self.estimate_mbps, 4),
        }


class ResultSink(Protocol):
    def write(self, result: WindowResult) -> None: ...

    def close(self) -> None: ...


class JsonlSink:
    """Appends one JSON line per result to a file (or an open text stream), flushed per line so
    that the results of a run cut short are all on disk."""

    def __init__(self, target: str | Path | IO[str]) -> None:
        if isinstance(target, (str, Path)):
            path = Path(target)
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file: IO[str] = path.open("w", encoding="utf-8")
            self._owned = True
        else:
            self._file = target
            self._owned = False
        self.count = 0

    def write(self, result: WindowResult) -> None:
        self._file.write(json.dumps(result.to_dict(), allow_nan=False) + "\n")
        self._file.flush()
        self.count += 1

    def close(self) -> None:
        if self._owned and not self._file.closed:
            self._file.close()

    def __enter__(self) -> JsonlSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class MemorySink:
    """Keeps results in a list (tests, summaries)."""

    def __init__(self) -> None:
        self.results: list[WindowResult] = []

    def write(self, result: WindowResult) -> None:
        self.results.append(result)

    def close(self) -> None:
        pass
