"""A sharded fleet: the devices of one scenario split over several processes (Ray actors), one cloud.

One process cannot carry a large fleet: every device's link emulator, gRPC channel, paced sensor
and simulated hardware share its one event loop (simulators/fleet.py). `simulate_sharded` runs the
fleet as `simulator.shards` shards instead, each a Ray actor (`FleetShard`: its own process, on any
node of the Ray cluster the cloud runs on, so the same command runs on a multi-node cluster) that
holds a `FleetRunner` for its share of the devices, against the one cloud the driver starts:

    the driver   starts the cloud (CloudStack: broker, tails, Redis, controller) and Ray, prepares
                 the whole fleet (the same seeded `assign_devices` as every shard: what the report
                 names), starts the shards, and for each policy waits for the controller's first
                 plan (adaptive, read from the broker in its own process), sets one clock origin (a
                 wall time a few seconds ahead), runs the policy in every shard at once, reads the
                 broker's batch sizes around it, and merges the shards' `PolicyRun`s into one
                 (`merge_runs`); one `FleetResult`, one report
    a shard      device i is shard (i // classes) % shards's (`shard_of`: every class in each
                 shard); it prepares the fleet as the driver does, keeps its own devices, dials
                 the broker's address with the driver's token for each device (`ShardCloud`, the
                 fleet's `CloudSide` without a broker in process), and runs a policy from the
                 shared origin (`FleetRunner.run_policy(start_wall=...)`), its own event-loop
                 lag watched as in one process

With `simulator.reuse` (compute_time "reference" only) a shard's devices reuse their front results
per (window, cut, level, codec), computed once for real in that shard (simulators/reuse.py): the
front's compute stops limiting the fleet; the cloud still receives and computes every offloaded
window. The report says which mode ran (`FleetResult.extra["fleet"]`, and per policy each shard's
devices, wall time and loop lag in `PolicyRun.shards`).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import socket
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pipelines.catalog import ModelCatalog
from simulators.capacity import read_host_cpu, usage_since
from simulators.fleet import (
    FleetProgress,
    FleetResult,
    FleetRunner,
    PolicyRun,
    _batch_delta,
    _batch_totals,
    device_windows,
)
from simulators.policies import Policy
from splitsense import aio
from splitsense.config import Config, ServingConfig
from splitsense.errors import ConfigError, DependencyError

__all__ = ["FleetShard", "ShardCloud", "merge_runs", "shard_of", "simulate_sharded"]

log = logging.getLogger(__name__)

SHARD_CPUS = 0.1  # Ray's logical CPUs per shard actor: scheduling only, never a limit on its threads
_LEAD_S = 2.0  # the clock origin lies this far after the driver's call, plus ...
_LEAD_PER_DEVICE_S = 0.004  # ... this per device of a shard (links and channels built before it)
_LAG_KEYS = ("p50", "p95", "p99", "max")
_GROUP_READY_S = 30.0  # how long the shards' placement group may take to be placed
# A shard's bundle in the placement group reserves Ray's logical memory, not CPU: the Serve replicas
# may hold every logical CPU of a small node (the tests' worker has 1, two replicas take 0.5 each),
# and a shard is placed to spread the fleet's event loops, not to own a core. What a shard of a few
# hundred devices really holds (its RSS) is of this order.
SHARD_MEMORY_BYTES = 256 << 20


def shard_strategy(nodes: int, shards: int) -> str | None:
    """The placement-group strategy that spreads `shards` over a cluster of `nodes` alive nodes:
    STRICT_SPREAD (one shard per node, as far as there are nodes) when every shard can have a node
    of its own, SPREAD (as even as the nodes allow) when there are fewer nodes than shards, None on
    one node (nothing to spread). An actor's own scheduling_strategy="SPREAD" is only best effort:
    on a fresh two-node cluster it put both shards on the head."""
    if nodes <= 1 or shards <= 1:
        return None
    return "STRICT_SPREAD" if nodes >= shards else "SPREAD"


def _shard_group(ray_mod: Any, shards: int) -> tuple[Any, str]:
    """A ready placement group of one bundle per shard (shard_strategy), or None and why not.
    A group that is not placed within _GROUP_READY_S (a node short of memory) is removed and
    the shards fall back to best-effort SPREAD: the fleet still runs, the report names the nodes."""
    nodes = [
        x for x in ray_mod.nodes() if x.get("Alive") and x.get("Resources", {}).get("memory", 0) >= SHARD_MEMORY_BYTES
    ]
    strategy = shard_strategy(len(nodes), shards)
    if strategy is None:
        return None, f"{len(nodes)} node{'s' if len(nodes) != 1 else ''}: nothing to spread"
    group = ray_mod.util.placement_group([{"memory": SHARD_MEMORY_BYTES}] * shards, strategy=strategy)
    ready, _ = ray_mod.wait([group.ready()], timeout=_GROUP_READY_S)
    if not ready:
        with contextlib.suppress(Exception):
            ray_mod.util.remove_placement_group(group)
        why = f"a {strategy} group over {len(nodes)} nodes was not placed in {_GROUP_READY_S:g} s"
        log.warning("shard placement: %s; best-effort SPREAD", why)
        return None, f"best-effort SPREAD: {why}"
    return group, f"{strategy} placement group over {len(nodes)} nodes, {shards} shards"


def _shard_options(group: Any, index: int) -> dict[str, Any]:
    """Shard `index`'s actor options: its bundle of the group, or Ray's best-effort SPREAD."""
    if group is None:
        return {"num_cpus": SHARD_CPUS, "scheduling_strategy": "SPREAD"}
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    strategy = PlacementGroupSchedulingStrategy(placement_group=group, placement_group_bundle_index=index)
    return {"num_cpus": 0, "memory": SHARD_MEMORY_BYTES, "scheduling_strategy": strategy}


def shard_of(index: int, shards: int, classes: int = 1) -> int:
    """Which shard runs device `index` of a fleet whose classes go round-robin over `classes`
    (assign_devices): whole rounds of classes in turn, so that every shard gets every class."""
    return (index // max(classes, 1)) % shards


@dataclass
class ShardCloud:
    """The fleet's CloudSide in a shard: the broker's address and each device's token from the
    driver, the cloud's catalogs; no broker in this process (the driver reads its metrics)."""

    broker_address: str
    tokens: dict[str, str]
    catalogs: dict[str, ModelCatalog] = field(default_factory=dict)
    broker: Any = None

    def token_for(self, device_id: str) -> str:
        try:
            return self.tokens[device_id]
        except KeyError:
            raise ConfigError(f"shard has no token for device {device_id!r}") from None


def _node() -> str:
    with contextlib.suppress(Exception):
        import ray

        if ray.is_initialized():
            return str(ray.get_runtime_context().get_node_id())[:12]
    return socket.gethostname()


class FleetShard:
    """One shard of the fleet (a Ray actor: `ray.remote(FleetShard)`; plain in tests)."""

    def __init__(
        self, config: Mapping[str, Any], shard: int, shards: int, cloud: ShardCloud, backend: str = "ray"
    ) -> None:
        self.config = Config.from_dict(dict(config))
        self.shard = shard
        self.shards = shards
        self.cloud = cloud
        self.runner = FleetRunner(self.config, backend=backend)  # the tails' kind: the policies' cloud cost
        self._scope = contextlib.ExitStack()
        self._engines: dict[str, Any] = {}
        self._encoder: Any = None

    async def setup(self) -> dict[str, Any]:
        """Prepare the fleet, keep this shard's devices, build what the policies need."""
        t = time.monotonic()
        runner = self.runner
        await asyncio.to_thread(runner.prepare)
        classes = len(self.config.simulator.device_classes)
        runner.specs = [s for s in runner.specs if shard_of(s.index, self.shards, classes) == self.shard]
        if self.config.simulator.reuse:
            from simulators.reuse import ReuseBackend, ReuseEncoder

            for m, engine in list(runner.engines.items()):
                runner.engines[m] = self._engines[m] = ReuseBackend(engine)
            self._encoder = runner.encoder = ReuseEncoder(runner.encoder)
        runner.cloud = self.cloud
        runner._prepare_policies(self.cloud.catalogs)
        await asyncio.to_thread(runner._build_fronts, self.cloud.catalogs)
        return {
            "shard": self.shard,
            "devices": len(runner.specs),
            "node": _node(),
            "pid": os.getpid(),
            "setup_s": round(time.monotonic() - t, 3),
        }

    async def run_policy(self, policy: str, start_wall: float) -> PolicyRun:
        """This shard's devices under `policy`, from the shared clock origin `start_wall`."""
        try:
            return await self.runner.run_policy(Policy(policy), start_wall=start_wall)
        finally:
            gc.unfreeze()

    def reuse_stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {m: b.stats.to_dict() for m, b in self._engines.items()}
        if self._encoder is not None:
            out["encode"] = self._encoder.stats.to_dict()
        return out

    def close(self) -> None:
        self._scope.close()


def _worst_lag(parts: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Per statistic, the worst shard's (every shard must keep up: the fleet is as late as its worst)."""
    out: dict[str, float] = {}
    for key in _LAG_KEYS:
        vals = [p[key] for p in parts if key in p]
        if vals:
            out[key] = max(vals)
    return out


def merge_runs(
    policy: str,
    parts: Sequence[PolicyRun],
    infos: Sequence[Mapping[str, Any]] = (),
    broker: Mapping[str, Any] | None = None,
) -> PolicyRun:
    """One PolicyRun of the whole fleet from its shards' (same policy, same clock origin): records
    and expected windows joined, wall time the longest shard's, event-loop lag the worst shard's
    per statistic, each shard's own in `shards`; `broker`: the driver's reading around the run."""
    if not parts:
        raise ConfigError("no shard ran: nothing to merge")
    if any(p.policy != policy for p in parts):
        raise ConfigError(f"shards ran other policies than {policy!r}: {sorted({p.policy for p in parts})}")
    expected: dict[str, int] = {}
    for p in parts:
        dup = expected.keys() & p.windows_expected.keys()
        if dup:
            raise ConfigError(f"devices in two shards: {sorted(dup)[:5]}")
        expected.update(p.windows_expected)
    records = sorted((r for p in parts for r in p.records), key=lambda r: (r.t_s, r.device_id))
    shards = []
    for i, p in enumerate(parts):
        info = dict(infos[i]) if i < len(infos) else {"shard": i}
        offloaded = sum(1 for r in p.records if r.mode in ("offloaded", "deferred"))
        shards.append(
            {
                **info,
                "devices": len(p.windows_expected),
                "windows": len(p.records),
                "lost": p.lost,
                "offloaded": offloaded,
                "wall_s": round(p.wall_s, 3),
                "realtime_factor": round(p.realtime_factor, 4),
                "loop_lag_ms": dict(p.loop_lag_ms),
                "device_errors": len(p.device_errors),
            }
        )
    return PolicyRun(
        policy=policy,
        duration_s=max(p.duration_s for p in parts),
        wall_s=max(p.wall_s for p in parts),
        windows_expected=expected,
        records=records,
        device_errors={k: v for p in parts for k, v in p.device_errors.items()},
        broker=dict(broker) if broker is not None else {},
        plan_versions=sorted({v for p in parts for v in p.plan_versions}),
        loop_lag_ms=_worst_lag([p.loop_lag_ms for p in parts]),
        infeasible={k: v for p in parts for k, v in p.infeasible.items()},
        radio_overhead_mj={k: v for p in parts for k, v in sorted(p.radio_overhead_mj.items())},
        shards=shards,
        lost_by_reason=dict(sorted(sum((Counter(p.lost_by_reason) for p in parts), Counter()).items())),
    )


def _ray(serving: ServingConfig) -> tuple[Any, bool]:
    """Ray, joined or started here (True: this process started it and shuts it down); one started
    here has the config's worker nice value, as the cloud's (cloud.serving.ray_system_config)."""
    try:
        import ray
    except ImportError as e:  # pragma: no cover - ray is a dependency
        raise DependencyError(f"a sharded fleet runs its shards as Ray actors: {e}") from e
    if ray.is_initialized():
        return ray, False
    from cloud.serving import ray_system_config  # the cloud's own rule (imported late, as CloudStack is)

    ray.init(
        address=serving.ray_address or "local", namespace=serving.namespace, include_dashboard=False,
        log_to_driver=False, logging_level=logging.WARNING, **ray_system_config(serving),
    )  # fmt: skip
    return ray, True


async def simulate_sharded(
    config: Config,
    *,
    with_ray: bool = True,
    progress: FleetProgress | None = None,
    stack_progress: Callable[[str], None] | None = None,
) -> FleetResult:
    """`simulate` with the fleet in `simulator.shards` Ray actors (module docstring)."""
    import torch

    from cloud.stack import CloudStack, with_ports

    sim = config.simulator
    n = sim.shards
    say = stack_progress or (lambda _s: None)
    progress = progress or FleetProgress()
    stack_config = with_ports(config, broker_port=0, metrics_port=0)
    runner = FleetRunner(stack_config, backend="ray" if with_ray else "in_process")  # the whole fleet, for the report
    torch.set_num_threads(sim.torch_threads)
    runner.traces()
    preparing = asyncio.ensure_future(asyncio.to_thread(runner.prepare))
    handles: list[Any] = []
    ray_mod: Any = None
    group: Any = None  # the shards' placement group, on a cluster of several nodes
    placement: str | None = None
    own_ray = False
    try:
        async with CloudStack(stack_config, with_ray=with_ray, progress=stack_progress) as stack:
            ray_mod, own_ray = _ray(stack_config.serving)
            await preparing
            runner.cloud = stack
            runner._prepare_policies(stack.catalogs)
            say(f"starting {n} fleet shard(s) as Ray actors{' (front reuse)' if sim.reuse else ''}")
            actor = ray_mod.remote(FleetShard)
            cfg_dict = stack_config.to_dict()
            group, placement = await asyncio.to_thread(_shard_group, ray_mod, n)
            say(f"shard placement: {placement}")
            for i in range(n):
                mine = [s.device_id for s in runner.specs if shard_of(s.index, n, len(sim.device_classes)) == i]
                cloud = ShardCloud(stack.broker_address, {d: stack.token_for(d) for d in mine}, dict(stack.catalogs))
                handles.append(actor.options(**_shard_options(group, i)).remote(cfg_dict, i, n, cloud, runner.backend))
            infos: list[dict[str, Any]] = list(await asyncio.gather(*(h.setup.remote() for h in handles)))
            say(
                "shards ready: "
                + ", ".join(f"#{x['shard']} {x['devices']} devices ({x['setup_s']:g} s)" for x in infos)
            )
            per_shard = max(x["devices"] for x in infos)
            t_start = time.monotonic()
            runs: dict[str, PolicyRun] = {}
            for name in sim.policies:
                policy = Policy(name)
                if policy is Policy.ADAPTIVE:
                    await runner._wait_for_plan()
                infeasible = runner.infeasible(policy)
                progress.policy_started(
                    name,
                    sum(
                        len(device_windows(runner.recordings[s.model], s.recording_offset, sim.duration_s, s.phase_s))
                        for s in runner.specs
                        if s.device_class not in infeasible
                    ),
                )
                before = _batch_totals(stack.broker.metrics.registry)
                start_wall = time.time() + _LEAD_S + _LEAD_PER_DEVICE_S * per_shard
                cpu0 = read_host_cpu()
                parts = await asyncio.gather(*(h.run_policy.remote(name, start_wall) for h in handles))
                host_cpu = usage_since(cpu0)  # this node's: the driver's, the cloud's and local shards'
                after = _batch_totals(stack.broker.metrics.registry)
                run = merge_runs(name, parts, infos, _batch_delta(before, after))
                run.host_cpu = host_cpu
                runs[name] = run
                progress.policy_done(name, run)
            reuse = list(await asyncio.gather(*(h.reuse_stats.remote() for h in handles))) if sim.reuse else []
            return FleetResult(
                config=stack_config,
                specs=runner.specs,
                runs=runs,
                objectives={c: stack_config.planner.classes[c].objective for c in sim.device_classes},
                backend=runner.backend,
                host_stage_ms=runner.host_stage_ms,
                cloud_overhead_ms=runner.cloud_overhead_ms,
                wall_s=time.monotonic() - t_start,
                extra={
                    "host_prep_ms": {m: round(c.prep_ms, 4) for m, c in runner.catalogs.items()},
                    "policy_inputs": dict(runner.inputs),
                    "device_backend": {"kind": runner.engine_kind, "why": runner.engine_why},
                    "cloud_tails": stack.tail_engine,
                    "event_loop": aio.running_loop_name(),  # the broker's (the shards': Ray's choice)
                    "fleet": fleet_mode(
                        sim.shards, sim.reuse, stack_config.serving.ray_address, infos, reuse, placement
                    ),
                },
            )
    finally:
        if not preparing.done():
            preparing.cancel()
        with contextlib.suppress(BaseException):
            await preparing
        for h in handles:
            with contextlib.suppress(Exception):
                ray_mod.kill(h)
        if group is not None:
            with contextlib.suppress(Exception):
                ray_mod.util.remove_placement_group(group)
        if own_ray and ray_mod is not None:
            with contextlib.suppress(Exception):
                ray_mod.shutdown()


def fleet_mode(
    shards: int,
    reuse: bool,
    ray_address: str | None = None,
    infos: Sequence[Mapping[str, Any]] = (),
    reuse_stats: Sequence[Mapping[str, Any]] = (),
    placement: str | None = None,
) -> dict[str, Any]:
    """What `FleetResult.extra["fleet"]` says of how the fleet ran (report: config.fleet)."""
    return {
        "mode": "sharded" if infos else "one_process",
        "shards": shards,
        "front": "reused per (window, cut, level, codec)" if reuse else "computed for every window",
        "reuse": reuse,
        "ray_address": ray_address,
        "nodes": sorted({str(x.get("node")) for x in infos}),
        "shard_devices": [int(x.get("devices", 0)) for x in infos],
        "placement": placement,  # how the shards were spread over the nodes (_shard_group)
        "reuse_stats": [dict(s) for s in reuse_stats],
    }
