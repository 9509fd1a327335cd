"""Whether a fleet run that fell behind real time was short of host CPU, measured, not assumed.

A simulated fleet is real software on a real host: the devices' runtimes, their gRPC clients, the
links, the broker, Ray Serve's replicas and the controller share its cores. When a run's real-time
factor (windows answered per window expected, simulators/fleet.py) falls short, the report says
which of two things happened:

    saturated   the host's CPUs were (nearly) all busy during the run: at the CPU the run spent per
                window, this host cannot keep up with the window rate the fleet offers, whatever the
                policy does; the report gives the cores the fleet would need at that cost
    infeasible  not (nearly) all busy, but at the CPU the run spent per window even every core busy
                would carry fewer windows than the fleet offers: the same shortfall of cores
    no headroom the cores could carry the offered rate, but only just: it needs at least
                HEADROOM_SHARE of them at that cost, and event loops that must wake on time (every
                shard's, the broker's) queue for a core at such a load; more cores, or less CPU a
                window (the 500-device scale run here needed 1.87 of 2 cores and ran at 0.974)
    fell behind the host had CPU to spare, enough for the offered rate at that cost, so the
                shortfall is the software's (a queue, a lock, an event loop that blocked), not the host's

The measure is the host's own accounting, /proc/stat's aggregate line (every process on the
machine: the fleet's and anyone else's, so a noisy neighbour counts as busy), sampled at the
start and the end of each policy's run. On a multi-node Ray cluster it covers the node the
command runs on only; the report says so. Pure apart from `read_host_cpu`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "REALTIME_TARGET",
    "HEADROOM_SHARE",
    "SATURATED_SHARE",
    "HostCpu",
    "capacity_verdict",
    "read_host_cpu",
    "usage_since",
]

REALTIME_TARGET = 0.99  # a run keeps up when it answers at least this share of its windows in time
SATURATED_SHARE = 0.90  # the host counts as saturated when its CPUs were at least this busy
# A run that needs at least this share of the host's cores at its CPU per window has no headroom:
# real-time work on a host that busy waits for a core (an M/M/1 queue at 85% load waits ~6 service
# times on average), so falling behind there is not the software's fault alone.
HEADROOM_SHARE = 0.85


@dataclass(frozen=True)
class HostCpu:
    """Cumulative CPU seconds of the whole host since boot: busy (user, nice, system, irq, softirq,
    steal) and in all (busy + idle + iowait), and its logical CPUs."""

    busy_s: float
    total_s: float
    cores: int

    def since(self, earlier: HostCpu) -> dict[str, float]:
        """The interval from `earlier` to this sample: CPU-seconds busy, and the busy share of all."""
        busy = max(0.0, self.busy_s - earlier.busy_s)
        # idle and iowait are not monotonic on every kernel (iowait is known to step back, notably
        # in VMs), so over a short interval `total` may come out under `busy`: a share, clamped
        total = max(0.0, self.total_s - earlier.total_s)
        share = min(1.0, busy / total) if total > 0 else (1.0 if busy > 0 else 0.0)
        return {"busy_cpu_s": busy, "busy_share": share}


def read_host_cpu(stat: Path = Path("/proc/stat")) -> HostCpu | None:
    """The host's CPU counters now, or None where /proc/stat is not there (not Linux)."""
    try:
        first = stat.read_text().splitlines()[0].split()
    except (OSError, IndexError):
        return None
    if not first or first[0] != "cpu":
        return None
    ticks = [float(x) for x in first[1:]]
    ticks += [0.0] * (8 - len(ticks))
    user, nice, system, idle, iowait, irq, softirq, steal = ticks[:8]  # guest is inside user already
    hz = float(os.sysconf("SC_CLK_TCK")) if hasattr(os, "sysconf") else 100.0
    busy = user + nice + system + irq + softirq + steal
    return HostCpu(busy_s=busy / hz, total_s=(busy + idle + iowait) / hz, cores=os.cpu_count() or 1)


def usage_since(start: HostCpu | None) -> dict[str, float]:
    """The host's CPU from `start` (read_host_cpu) to now: busy CPU-seconds, busy share, cores; {}
    without accounting."""
    now = read_host_cpu()
    if start is None or now is None:
        return {}
    return {**now.since(start), "cores": float(now.cores)}


def capacity_verdict(
    *,
    realtime_factor: float,
    windows: int,
    offered_windows_per_s: float,
    busy_cpu_s: float,
    busy_share: float,
    cores: float,
    late_s: float | None = None,
    deadline_s: float | None = None,
) -> dict[str, Any]:
    """What a run's CPU says about its real-time factor (module docstring).

    `windows`: the windows the run handled; `offered_windows_per_s`: the rate the fleet's sensors
    produce (every device's windows expected per second of the run); `busy_cpu_s`, `busy_share`:
    `HostCpu.since` over the run; `cores`: the host's logical CPUs. `late_s`: how long after its
    last window was due the run ended, and `deadline_s` the longest a window may take: a run that
    ended within a window's deadline of its last window kept up (the factor of a short run counts
    its last windows' own latency: 0.28 s is 5.6% of a 5-s run), whatever its factor."""
    cpu_ms = 1000.0 * busy_cpu_s / windows if windows > 0 else None
    cores = int(cores)
    out: dict[str, Any] = {
        "cores": cores,
        "busy_share": round(busy_share, 3),
        "cpu_ms_per_window": None if cpu_ms is None else round(cpu_ms, 3),
        "offered_windows_per_s": round(offered_windows_per_s, 1),
    }
    if cpu_ms is None or cpu_ms <= 0:
        out.update(verdict="unknown", why="no windows, or no CPU accounting on this host")
        return out
    keeps_up = 1000.0 * cores / cpu_ms  # windows/s this host could carry at that cost, all cores busy
    needed = offered_windows_per_s * cpu_ms / 1000.0
    out["host_windows_per_s"] = round(keeps_up, 1)
    out["cores_needed"] = round(needed, 2)
    if realtime_factor >= REALTIME_TARGET:
        out.update(verdict="kept up", why=f"real-time factor {realtime_factor:.3f} >= {REALTIME_TARGET}")
    elif late_s is not None and deadline_s is not None and late_s <= deadline_s:
        out.update(
            verdict="kept up",
            why=(
                f"ended {late_s:.2f} s after its last window was due, within a window's deadline ({deadline_s:g} s): "
                f"its last windows' latency, not a backlog (real-time factor {realtime_factor:.3f})"
            ),
        )
    elif busy_share >= SATURATED_SHARE:
        out.update(
            verdict="saturated",
            why=(
                f"the host's {cores} CPUs were {busy_share:.0%} busy; at {cpu_ms:.1f} ms of CPU a window "
                f"they carry ~{keeps_up:.0f} windows/s and the fleet offers {offered_windows_per_s:.0f}/s: "
                f"infeasible on this host, it needs ~{needed:.1f} cores at this cost"
            ),
        )
    elif needed > cores:
        # Not all busy, but even all busy these cores could not carry the offered rate at the CPU the
        # run spent per window: the host is short whatever the idle part was doing.
        out.update(
            verdict="infeasible",
            why=(
                f"at {cpu_ms:.1f} ms of CPU a window the host's {cores} CPUs carry ~{keeps_up:.0f} windows/s "
                f"even all busy (they were {busy_share:.0%} busy) and the fleet offers "
                f"{offered_windows_per_s:.0f}/s: infeasible on this host, it needs ~{needed:.1f} cores at this cost"
            ),
        )
    elif needed >= HEADROOM_SHARE * cores:
        out.update(
            verdict="no headroom",
            why=(
                f"at {cpu_ms:.1f} ms of CPU a window the fleet's {offered_windows_per_s:.0f} windows/s need "
                f"~{needed:.2f} of the host's {cores} CPUs ({needed / cores:.0%}; they were {busy_share:.0%} busy): "
                f"too little headroom for real time on this host (>= {HEADROOM_SHARE:.0%} of the cores), "
                "it needs more cores or less CPU a window"
            ),
        )
    else:
        out.update(
            verdict="fell behind",
            why=(
                f"real-time factor {realtime_factor:.3f} with the host's CPUs {busy_share:.0%} busy: "
                "CPU to spare, so the shortfall is the software's, not the host's"
            ),
        )
    return out
