"""The one typed config object of splitsense.

Every tunable lives here, with its unit in its name and the reason for its default beside it.
`Config()` gives the embedded defaults that `splitsense demo` and the tests run on; a scenario
file (JSON) overrides any subset: `Config.from_file(path)`. Values are checked when built, so a
wrong one fails at start-up with a message naming the field, never deep inside a run.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import ipaddress
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from splitsense.errors import ConfigError
from splitsense.kinds import VALID_CODECS, Radio

REPO_ROOT = Path(__file__).resolve().parent.parent


# broker.max_connection_age_s / max_connection_age_grace_s: gRPC's options are int32 milliseconds.
_MIN_AGE_S = 0.001
_MAX_AGE_S = (2**31 - 1) / 1000.0


def _positive(name: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(f"{name} must be > 0, got {value!r}")


# The datasets, the trained weights and their catalogs are a distribution of their own,
# splitsense-assets (assets/ in the repository, package splitsense_assets: see its README), so that
# a device installs splitsense[edge] without 65 MB of data and torch weights it does not run.
ASSETS_PACKAGE = "splitsense_assets"
ASSETS_CHECKOUT = REPO_ROOT / "assets" / ASSETS_PACKAGE
ASSETS_HINT = (
    "install the data package splitsense-assets (from a checkout: `pip install -e assets`, which "
    "scripts/setup.sh does) or point paths.data_dir / paths.weights_dir at a copy"
)


@functools.lru_cache(maxsize=1)
def assets_root() -> Path | None:
    """The folder of the splitsense_assets package: the installed one, else this checkout's
    assets/splitsense_assets; None when neither exists (a device install: splitsense[edge])."""
    try:
        spec = importlib.util.find_spec(ASSETS_PACKAGE)  # finds it without importing it
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            if Path(location).is_dir():
                return Path(location)
    return ASSETS_CHECKOUT if ASSETS_CHECKOUT.is_dir() else None


def asset_dir(name: str) -> Path:
    """`<assets_root()>/name` ("data", "weights"); without the assets package, where the
    checkout would hold it (it does not exist: the loaders say so, with `ASSETS_HINT`)."""
    return (assets_root() or ASSETS_CHECKOUT) / name


def missing_asset(what: str, path: Path) -> str:
    """The message for an asset file or folder that is not there: what, where, and what to do."""
    where = "the splitsense-assets package is not installed" if assets_root() is None else "it is missing"
    return f"{what} {path} does not exist ({where}): {ASSETS_HINT}"


@dataclass(frozen=True)
class PathsConfig:
    # Datasets and weights: the splitsense-assets package (see asset_dir); reports: the checkout.
    data_dir: Path = field(default_factory=lambda: asset_dir("data"))
    weights_dir: Path = field(default_factory=lambda: asset_dir("weights"))
    reports_dir: Path = REPO_ROOT / "reports"


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0  # fixed so that `splitsense models train` reproduces the shipped weights
    threads: int = 2  # the machines here have 2 cores
    batch_size: int = 64

    def __post_init__(self) -> None:
        _positive("train.batch_size", self.batch_size)
        _positive("train.threads", self.threads)


@dataclass(frozen=True)
class CompressionConfig:
    accuracy_budget_points: float = 1.0  # DeepX-style: lose at most this many points of accuracy
    energy_kept: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)  # SVD levels tried per layer

    def __post_init__(self) -> None:
        if not 0 <= self.accuracy_budget_points <= 100:
            raise ConfigError("compression.accuracy_budget_points must be in [0, 100]")


_OBJECTIVES = ("latency", "energy")


@dataclass(frozen=True)
class ClassObjectiveConfig:
    """What the planner minimises for one device class, and within which budgets."""

    # "latency": least latency within the energy and accuracy budgets (NORMAL battery rows);
    # "energy": least energy within the deadline and the accuracy budget. LOW battery rows always
    # use "energy" with this class's deadline.
    objective: str = "latency"
    # Average power the device may spend on one model (compute + radio + waiting), so the budget of
    # one window is this x the model's window period; None: no energy budget.
    energy_budget_mw: float | None = None
    deadline_ms: float | None = None  # end-to-end latency of one window ("energy" rows); None: none
    accuracy_budget_points: float = 1.0  # same meaning as CompressionConfig.accuracy_budget_points

    def __post_init__(self) -> None:
        if self.objective not in _OBJECTIVES:
            raise ConfigError(f"planner class objective must be one of {_OBJECTIVES}, got {self.objective!r}")
        for name in ("energy_budget_mw", "deadline_ms"):
            value = getattr(self, name)
            if value is not None:
                _positive(f"planner class {name}", value)
        if not 0 <= self.accuracy_budget_points <= 100:
            raise ConfigError("planner class accuracy_budget_points must be in [0, 100]")


def _default_planner_classes() -> dict[str, ClassObjectiveConfig]:
    # Budgets come from the classes' figures (pipelines/devices.py) and are checked against the cost
    # model (cloud/controller/costmodel.py, the shipped catalogs, the planner's bandwidth buckets): a
    # budget must bind in some regimes and not others, and local must meet it everywhere.
    return {
        # No energy budget: none can bind by regime. Offloading a stream holds LTE's 11.6-s, 1060-mW
        # tail (pipelines/power.py) across every 2.56-s window: >= 2715 mJ a window, >= 1060 mW,
        # at any bandwidth (2717.8 mJ at 0.1 Mbit/s, 2715.5 at 50), 9.4% of the 11.2-Wh battery an
        # hour, against 3.0 mJ (1.2 mW) locally. A budget below ~1060 mW excludes every offload at
        # every bandwidth (the former 224 mW, 2%/h: 573 mJ); one above it lets one model drain the
        # phone in under 11 h. Local is the fastest choice anyway (1.5 ms vs >= 78.8 ms); LOW-battery
        # rows minimise energy.
        "phone": ClassObjectiveConfig("latency", energy_budget_mw=None, deadline_ms=300.0),
        # A board on a power bank sized for days: latency first, no energy budget.
        "iot_board": ClassObjectiveConfig("latency", energy_budget_mw=None, deadline_ms=300.0),
        # A watch computes ~100x slower than the host: latency first, within an energy budget derived
        # from its battery. 1558 mWh lasts 1.5-2 days of normal use (devices.py); without the model
        # it lasts the long end, 2 days: 1558 / 48 h = 32.5 mW. Charged nightly, it must last a
        # waking day, 16 h, with the model listening all the time: 1558 / 16 - 32.5 = 64.9 mW, 64.9 mJ
        # per 1-s audio window (166 per 2.56-s IMU window). Cost model (preprocessing included),
        # fsdd_digit: local (level 0.99) 56.0 mJ meets it in every bucket; every upload pays WiFi's
        # promotion and tail, so below 0.5 Mbit/s every offload choice is excluded (int8 input 69-147
        # mJ, the 366-B bottleneck code 65-68), from 0.5 Mbit/s the cheapest (bottleneck code, then the
        # int8 input from ~1 Mbit/s: 65.0 at 1, 60.7 at 50) are admitted and 56 of 61 stay excluded.
        # (uci_har: 10 of 43 offload choices excluded at 0.05 Mbit/s, none from 1 Mbit/s.) Local is
        # also the fastest here, so the budget decides which uploads are allowed, not whether the
        # watch offloads.
        "watch": ClassObjectiveConfig("latency", energy_budget_mw=64.9, deadline_ms=300.0),
        # A microcontroller sensor node (pipelines.devices: nRF52840, ~3000x slower than the host,
        # ~10 mW computing, a 1.85 Wh LiPo, BLE): nobody waits on its answers, but its battery is the
        # whole point, so least energy; within 1000 ms, one audio window, so that it keeps up with
        # its own stream. Uploading an int8 window over BLE (~4 KB: ~50 ms on air + a 15 ms
        # connection-event wait + ~90 ms RTT) meets it; the whole model locally would take seconds.
        # Cost model, speaker+digit: the fp32 input upload misses it at 0.1 Mbit/s (1.4 s), every
        # choice meets it from 0.25; at 0 Mbit/s none can (nothing fits locally: "infeasible" rows).
        "sensor_node": ClassObjectiveConfig("energy", energy_budget_mw=None, deadline_ms=1000.0),
    }


@dataclass(frozen=True)
class PlannerConfig:
    # Bucket edges of a plan's rows: [0, 0.1), [0.1, 0.25), ..., [50, inf). Log-spaced from 3G-edge
    # rates to fast WiFi: the real traces of the data package (data/traces) span this range.
    bandwidth_edges_mbps: tuple[float, ...] = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0)
    # A row keeps its previous choice unless the new optimum beats it by more than this fraction
    # (and the old one is still feasible): estimates move by a few % between periods on noise alone.
    hysteresis_margin: float = 0.10
    low_battery_threshold: float = 0.20  # battery fraction below which a device uses its LOW rows
    min_telemetry_samples: int = 30  # per stage, before measured device latency replaces the profile
    # Front compression levels the catalogs measure (the key of PlanRow.compression_energy_kept):
    # 1.0 = uncompressed; L < 1 = the DeepX-style per-layer SVD ranks chosen for the whole model under
    # an accuracy budget of (1 - L) x 100 points on calibration data (0.995, 0.99, 0.98: 0.5, 1 and 2
    # points), shipped in the catalog. A uniform energy threshold lost 5-50 points at 0.7/0.5 and was
    # slower at 0.9; budgets around the classes' 1-point accuracy budget are the ones a plan can use.
    # A level neither smaller nor faster than a cheaper one is dropped (catalog `dropped_levels`).
    compression_levels: tuple[float, ...] = (1.0, 0.995, 0.99, 0.98)
    # Per device class; a scenario file replaces the whole table.
    classes: dict[str, ClassObjectiveConfig] = field(default_factory=_default_planner_classes, hash=False)

    def __post_init__(self) -> None:
        edges = tuple(float(e) for e in self.bandwidth_edges_mbps)
        if not edges or edges[0] <= 0 or any(b <= a for a, b in zip(edges, edges[1:], strict=False)):
            raise ConfigError("planner.bandwidth_edges_mbps must be > 0 and strictly increasing")
        object.__setattr__(self, "bandwidth_edges_mbps", edges)
        if not 0 <= self.hysteresis_margin < 1:
            raise ConfigError("planner.hysteresis_margin must be in [0, 1)")
        if not 0 <= self.low_battery_threshold <= 1:
            raise ConfigError("planner.low_battery_threshold must be in [0, 1]")
        if self.min_telemetry_samples < 1:
            raise ConfigError("planner.min_telemetry_samples must be >= 1")
        if not self.compression_levels or not all(0 < e <= 1 for e in self.compression_levels):
            raise ConfigError("planner.compression_levels must be non-empty, each in (0, 1]")
        classes = {}
        for name, value in dict(self.classes).items():
            if isinstance(value, dict):
                unknown = set(value) - {f.name for f in dataclasses.fields(ClassObjectiveConfig)}
                if unknown:
                    raise ConfigError(f"unknown config keys {sorted(unknown)} in planner.classes.{name}")
                value = ClassObjectiveConfig(**value)
            if not isinstance(value, ClassObjectiveConfig):
                raise ConfigError(f"planner.classes.{name} must be an object")
            classes[str(name)] = value
        object.__setattr__(self, "classes", classes)


HANDLE_TRANSPORTS = ("grpc", "actor")
TAIL_ENGINES = ("auto", "onnx", "torch")  # serving.tail_engine
HANDLE_ROUTERS = ("caller", "thread")


@dataclass(frozen=True)
class ServingConfig:
    """Ray Serve tails (cloud/serving.py): one deployment per model, fed batches by the broker."""

    # None: start a local Ray (dashboard off); "auto" or "host:6379": join that cluster, whose nodes
    # must have splitsense installed (replicas import cloud.serving and load the shipped weights).
    ray_address: str | None = None
    models: tuple[str, ...] = ("fsdd_speaker", "fsdd_digit", "uci_har")  # every shipped model
    # 2 cores here: a replica runs one batch at a time on its pinned threads, so more replicas
    # than cores only contend. On a real cluster raise it to (cores per model) / replica_threads.
    num_replicas: int = 1
    # Per replica. The broker sends few, large requests: stacked batches, at most
    # broker.max_inflight_batches (2) per (model, cut) lane, so one broker with two cuts in use
    # keeps <= 4 in flight per model. 8 is a small multiple of that: the next batch waits inside
    # the replica (already transferred) while one runs. Not larger: excess requests should wait in
    # Serve's router, which hands them to whichever replica frees first (and to a live one after a
    # crash), not pile up behind one replica. Rule: >= brokers x cuts in use x 2, else add replicas.
    # Callers sending one window per call overrun it: 64 such clients collapsed to ~30 req/s here
    # (router back-off; 19 req/s with Serve's default of 5), while 64 gave them ~370 req/s.
    max_ongoing_requests: int = 8
    replica_threads: int = 1  # torch threads per replica: 2 shared cores, the broker needs the other
    # Ray's scheduling reservation per replica, not a limit: 3 models x 1 replica fit on 2 cores.
    replica_cpus: float = 0.5
    # Serve's access log, a line per request in each replica's log: off, as the broker's Prometheus
    # metrics count every window and batch; on to debug a replica.
    access_log: bool = False
    # What runs a tail's stages [k, N) in a replica and in the broker's own tail (broker.local_tail).
    # "onnx": ONNX Runtime on the model's export (`splitsense models export`), stage by stage at
    # level 1.0, one intra-op thread per replica_threads; "torch": the trained weights in PyTorch;
    # "auto": onnx when onnxruntime is installed and every model has a current export, else torch.
    # Measured here (one thread, `splitsense bench tail`): ONNX Runtime took 1.25-3.6x less CPU per
    # window (median 1.76x over 3 models x 2 cuts x batches of 1-32), the audio tails from cut 1
    # 0.67-0.72 ms a window against 1.05-1.10 ms in torch at batches of 16-32 (about half at batch
    # 1), with logits within 2.4e-6 and the same argmax on every window.
    tail_engine: str = "auto"
    # Backstop for one batch: above every device deadline (300 ms by default), so the broker's own
    # deadline handling acts first, yet a batch stuck behind a dead replica fails within 1 s.
    request_timeout_s: float = 1.0
    startup_timeout_s: float = 120.0  # ray.init 5-12 s + replicas importing torch on busy cores
    # The nice value of a local Ray's workers (the replicas, a simulator's shards); null: Ray's
    # default, 15: on a busy host its workers yield to the driver, here the broker (which then
    # admits or sheds at once). 0 puts them level with it; at 1,000 simulated devices on 2 cores
    # that changed nothing measurable (README). A cluster started with `ray start` takes
    # RAY_worker_niceness from its environment.
    worker_niceness: int | None = None
    namespace: str = "splitsense"  # Ray namespace of the driver (Serve keeps its own, "serve")
    # How the broker's DeploymentHandles reach a replica (cloud/serving.py). "grpc": Serve's
    # by-value path (handle.options(_by_reference=False)), the batch pickled straight to the
    # replica's own gRPC server; "actor": a Ray actor call with the batch in the object store.
    # Measured here, one uci_har window per call, caller on its own loop: p50 2.7 vs 5.0 ms and 1.2
    # vs 2.8 ms of the caller's CPU per call (both router placements: `handle_router`).
    handle_transport: str = "grpc"
    # Where Serve's router (replica choice, queue-length probes) runs in the broker: "caller", on
    # the broker's own event loop (no thread hop per call, as Serve's proxy does with
    # RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP=0), or "thread", Serve's default router thread.
    handle_router: str = "caller"
    # Placement over a multi-node cluster. None: Serve's own SPREAD scheduling, which puts each
    # model's replicas on different nodes while there is room and packs them onto the survivors
    # when a node dies (tests/integration/cloud/test_multinode.py: 2 replicas on 2 nodes, 2 again on
    # the head ~7-8 s after the worker node is killed, with the GCS declaring a node dead after 3 s;
    # Ray's default health checks take ~15 s for that). An int is Serve's hard cap
    # max_replicas_per_node: replicas beyond (live nodes x cap) stay pending after a node loss.
    max_replicas_per_node: int | None = None
    # Serve autoscaling of each tail deployment on Ray's own metric: requests ongoing or queued per
    # replica, as the broker's handles report them. false (single-node demos, 2 cores): a fixed
    # num_replicas, as before. true: num_replicas is the initial count (clamped to min..max).
    autoscaling: bool = False
    # >= 1: a replica starts in ~3-10 s (a worker imports torch, loads the weights, warms up),
    # far above a window's 300 ms deadline, so a tail never scales to zero.
    min_replicas: int = 1
    # Replicas beyond the batches in flight get no work: the broker keeps <= max_inflight_batches
    # (2) per (model, cut) lane, so one broker with two cuts in use keeps <= 4 per model. Rule:
    # max_replicas <= brokers x cuts in use x 2.
    max_replicas: int = 4
    # 1, not Serve's default 2: a replica runs one batch at a time (TailReplica blocks its loop),
    # so a second ongoing request is a batch waiting inside it: time to add a replica.
    target_ongoing_requests: float = 1.0
    # Serve's defaults are 30 s up, 600 s down. Up: a device runs locally while the cloud is slow
    # (no window is lost), so a burst shorter than a replica's start is not worth one. Down: a
    # replica is cheap to keep and costly to restart; 60 s is six look-back periods.
    upscale_delay_s: float = 10.0
    downscale_delay_s: float = 60.0
    # The mean of ongoing requests over this window drives the decision (Serve's default 30 s).
    look_back_period_s: float = 10.0
    # How often handles and replicas push their counts to Serve's controller. Serve's default 10 s
    # would be a whole look-back period; deprecated in Serve (to become env variables) but it is
    # the setting Ray 2.60 reads. Must be below look_back_period_s.
    metrics_interval_s: float = 2.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "models", tuple(self.models))
        if not self.models:
            raise ConfigError("serving.models must name at least one model")
        if not isinstance(self.autoscaling, bool):
            raise ConfigError(f"serving.autoscaling must be true or false, got {self.autoscaling!r}")
        for name in ("min_replicas", "max_replicas"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"serving.{name} must be an int >= 1, got {value!r}")
        if self.max_replicas < self.min_replicas:
            raise ConfigError(
                f"serving.max_replicas ({self.max_replicas}) must be >= min_replicas ({self.min_replicas})"
            )
        cap = self.max_replicas_per_node
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 1):
            raise ConfigError(f"serving.max_replicas_per_node must be null or an int >= 1, got {cap!r}")
        for name in ("target_ongoing_requests", "look_back_period_s", "metrics_interval_s"):
            _positive(f"serving.{name}", getattr(self, name))
        for name in ("upscale_delay_s", "downscale_delay_s"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"serving.{name} must be >= 0, got {getattr(self, name)!r}")
        if not self.look_back_period_s > self.metrics_interval_s:
            raise ConfigError(
                f"serving.look_back_period_s ({self.look_back_period_s}) must be > metrics_interval_s "
                f"({self.metrics_interval_s})"
            )
        for name in ("num_replicas", "max_ongoing_requests", "replica_threads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"serving.{name} must be an int >= 1, got {value!r}")
        for name in ("replica_cpus", "request_timeout_s", "startup_timeout_s"):
            _positive(f"serving.{name}", getattr(self, name))
        nice = self.worker_niceness
        if nice is not None and (isinstance(nice, bool) or not isinstance(nice, int) or not 0 <= nice <= 19):
            raise ConfigError(f"serving.worker_niceness must be null or an int in 0..19, got {nice!r}")
        if self.ray_address is not None and not str(self.ray_address).strip():
            raise ConfigError("serving.ray_address must be null (local Ray) or an address such as 'auto'")
        if self.tail_engine not in TAIL_ENGINES:
            raise ConfigError(f"serving.tail_engine must be one of {TAIL_ENGINES}, got {self.tail_engine!r}")
        if self.handle_transport not in HANDLE_TRANSPORTS:
            raise ConfigError(
                f"serving.handle_transport must be one of {HANDLE_TRANSPORTS}, got {self.handle_transport!r}"
            )
        if self.handle_router not in HANDLE_ROUTERS:
            raise ConfigError(f"serving.handle_router must be one of {HANDLE_ROUTERS}, got {self.handle_router!r}")


# Loudly labelled: anyone with the source can mint tokens with it. `splitsense cloud up` warns when
# it is in use; a real deployment sets broker.auth_secret in its scenario file.
DEV_AUTH_SECRET = "splitsense-DEV-ONLY-secret-do-not-deploy"


def is_loopback_host(host: str) -> bool:
    """Whether `host` can only mean this machine: 'localhost', 127.0.0.0/8 or ::1 ('[::1]' too).

    The one place plaintext gRPC is allowed without a scenario saying so. '0.0.0.0', '::' and ''
    are every interface, so not loopback; other names are not resolved (a name can change owner)."""
    h = host.strip().lower()
    if h.startswith("[") and h.endswith("]"):
        h = h[1:-1]
    if h == "localhost":
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


def host_of_address(address: str) -> str:
    """The host of a gRPC target 'host:port', '[v6]:port', 'dns:///host:port' or 'ipv4:host:port'
    ('localhost' for a 'unix:' socket, which never leaves the machine)."""
    a = address.strip()
    if a.startswith(("unix:", "unix-abstract:")):
        return "localhost"
    for scheme in ("dns:///", "dns:", "ipv4:", "ipv6:"):
        if a.startswith(scheme):
            a = a[len(scheme) :]
            break
    if a.startswith("["):
        return a[: a.find("]") + 1] if "]" in a else a
    return a.rsplit(":", 1)[0] if a.count(":") == 1 else a


def read_pem(path: Path, key: str) -> bytes:
    """The bytes of the PEM file that config key `key` names; ConfigError saying which key and why."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ConfigError(f"{key}: cannot read {path} ({e.strerror or e})") from None
    if b"-----BEGIN " not in data:
        raise ConfigError(f"{key}: {path} is not a PEM file (no '-----BEGIN' line)")
    return data


def _optional_path(key: str, value: Any) -> Path | None:
    if value is None:
        return None
    if not isinstance(value, (str, Path)) or not str(value).strip():
        raise ConfigError(f"{key} must be null or a file path, got {value!r}")
    return Path(value)


TOKEN_STORES = ("hmac", "redis")
EDGE_BACKENDS = ("auto", "onnx", "torch")  # edge/backend.py


@dataclass(frozen=True)
class BrokerConfig:
    """The gRPC broker (cloud/broker.py): auth, validation, admission, micro-batching, limits."""

    host: str = "127.0.0.1"  # loopback: serving a real fleet is a deliberate "0.0.0.0"
    # The plan store as the broker sees it: a Redis user that may only read plans and follow their
    # channel (cloud/planstore.py ACL_RULES, deploy/redis/redis.conf). None: controller.redis_url.
    redis_url: str | None = field(default=None, repr=False)
    port: int = 50051  # gRPC's customary port; 0 picks a free one (tests)
    # Throughput comes from batching before the ~8 ms Ray hop; 32 windows of the largest tail
    # (audio, cut 1: 379 KiB each) stay ~12 MiB per batch, and a tail's batch time grows little.
    max_batch_size: int = 32
    # How long a batch may wait to fill while another batch of its (model, cut) is running. An
    # idle (model, cut) dispatches at once, so a lone device pays nothing for batching.
    max_batch_wait_ms: float = 2.0
    # Batches of one (model, cut) running at once: serving.max_ongoing_requests (8) is shared by
    # the cuts of a model, and 2 keeps one batch filling while the other runs.
    max_inflight_batches: int = 2
    max_queue_depth: int = 512  # per (model, cut): a hard cap whatever the deadlines say (memory)
    # The largest activation of the shipped models is 379 KiB (audio, cut 1); 1 MiB leaves room
    # for framing and bounds what a broken device can make us buffer. Answers are logits and
    # plan sets of a few KiB (server reflection descriptors ~20 KiB).
    max_receive_message_bytes: int = 1 << 20
    max_send_message_bytes: int = 256 << 10
    # Used when neither the call nor the request carries a deadline: planner classes' 300 ms.
    default_deadline_ms: float = 300.0
    # Backstop for one tail call: a hung replica fails its batch (UNAVAILABLE) within this even when
    # the windows' deadlines are longer; serving.request_timeout_s (1 s) is the Ray-side twin.
    backend_timeout_ms: float = 1000.0
    # Batch service time assumed before the first batch of a (model, cut) is measured: one Ray
    # handle call (~8 ms p50 here) plus a small tail.
    initial_batch_service_ms: float = 10.0
    service_ewma_alpha: float = 0.2  # weight of the newest batch: settles in ~10 batches
    # A lane with no batch on the backend whose estimate is this old admits a window as a probe
    # even when the estimate predicts a miss (cloud/admission.py): an outage's timeouts inflate the
    # estimate, and a lane that sheds on it runs nothing that could correct it.
    admission_probe_after_ms: float = 1000.0
    max_stream_windows_in_flight: int = 64  # per OffloadStream: back-pressure on one device
    # A (model, cut) lane with nothing in flight runs its next batch of at most local_tail_max_batch
    # windows in the broker's own process (the models it already loads to validate requests) instead
    # of calling Ray: a lone window skips the Ray hop, ~3-5 ms here against ~0.3 ms for a uci_har tail
    # (`bench serve`, one device); under load a lane always has a Ray batch in flight, so batches go
    # to Ray Serve, which scales. 4: a few windows that arrive together still cost well under the hop.
    # local_tail_when "free" also sends a lane's next batch there whenever the broker's own tail has
    # no batch running: a replica co-located with the broker (one batch at a time, one thread), Ray
    # taking what it cannot; raise local_tail_max_batch to 16 with it. One broker on this host: 1.24-
    # 1.43x the "idle" rule's windows/s at 64 devices (bench serve's broker_free_tail row). Not the
    # default: two brokers on the same two cores then missed deadlines (15 windows) and shed (193)
    # where "idle" kept 0, as Ray only sees the overflow and its estimate inflates.
    # false: every batch goes to Ray (a broker process that must not run model code).
    local_tail: bool = True
    local_tail_when: str = "idle"
    local_tail_max_batch: int = 4
    # HMAC-SHA256 key of the per-device tokens (`splitsense cloud token DEVICE_ID`).
    auth_secret: str = field(default=DEV_AUTH_SECRET, repr=False)  # never printed with the config
    allowed_device_ids: tuple[str, ...] = ()  # empty: any device with a valid token
    # Which device tokens the broker accepts (cloud/tokens.py). "hmac": HMAC of the device id under
    # auth_secret, nothing stored, never expiring (loopback stacks: tests, demo, simulate). "redis":
    # tokens an operator issues and revokes (`splitsense cloud token issue|revoke|list`), kept only
    # as hashes in the plan store's Redis, read as broker.redis_url's user.
    token_store: str = "hmac"
    # A verified stored token is trusted this long without asking Redis again; a revocation also
    # evicts it at once through the revocation channel, so this only bounds a missed notice.
    token_cache_ttl_s: float = 1.0
    # TLS of the gRPC listener, PEM files (deploy/tls/gen_certs.sh makes them). A certificate (chain)
    # and its key: the broker serves TLS. With tls_client_ca_file as well, mutual TLS: a device must
    # present a certificate signed by that CA whose subject CN is the device id it calls with
    # (x-splitsense-device-id; cloud/auth.py), and still its token. None: plaintext.
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_client_ca_file: Path | None = None
    # Plaintext on a host that is not loopback: off, since tokens and activations would cross the
    # network in the clear. Only for a scenario on a network private end to end.
    allow_plaintext: bool = False
    metrics_port: int | None = 9464  # Prometheus exporter of `cloud up` (OpenTelemetry's port); None: off
    # The static plan served until the controller publishes one: every model cut at
    # static_plan_cut (0: send the preprocessed input, the classic cloud-offload baseline) unless
    # static_plan_cuts names another cut for it, with this codec (fp32: exact), per device class.
    static_plan_cut: int = 0
    static_plan_cuts: dict[str, int] = field(default_factory=dict, hash=False)
    static_plan_codec: str = "fp32"
    static_plan_device_classes: tuple[str, ...] = ("phone", "iot_board", "watch", "sensor_node")  # planner.classes
    shutdown_grace_s: float = 5.0  # in-flight windows finish; the devices fall back after that
    # Several brokers (`cloud up --join`): a device's one long-lived OffloadStream keeps it on the
    # broker it first reached, so a broker that comes back (or is added) would get devices only as
    # their streams break. A connection older than this (gRPC's grpc.max_connection_age_ms, with
    # gRPC's own +-10% jitter) is sent a GOAWAY: the device moves its stream, and its plan watch,
    # to a new connection, which pick_first places on the first broker of its (shuffled) list that
    # answers, so the fleet spreads over every live broker within about this long. Windows in flight
    # finish on the old stream; one the old stream never answers is sent again (edge/transport.py).
    # 0: off, a connection lives until it breaks. A reconnect costs the device a handshake (TLS: a
    # few round trips) per this period, so not much under a minute for a real fleet.
    max_connection_age_s: float = 60.0
    # After the GOAWAY, how long the old connection's calls may still run before it is closed
    # (grpc.max_connection_age_grace_ms): the windows in flight on it answered, as long as this
    # exceeds the windows' deadlines (edge.deadline_ms); one cut off is sent again on the new stream.
    max_connection_age_grace_s: float = 10.0

    def __post_init__(self) -> None:
        if not isinstance(self.local_tail, bool):
            raise ConfigError(f"broker.local_tail must be true or false, got {self.local_tail!r}")
        if self.local_tail_when not in ("idle", "free"):
            raise ConfigError(f"broker.local_tail_when must be 'idle' or 'free', got {self.local_tail_when!r}")
        for name in ("port", "max_batch_size", "max_inflight_batches", "max_queue_depth", "local_tail_max_batch"):
            value = getattr(self, name)
            lo = 0 if name == "port" else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < lo:
                raise ConfigError(f"broker.{name} must be an int >= {lo}, got {value!r}")
        if self.port > 65535 or (self.metrics_port is not None and not 0 <= self.metrics_port <= 65535):
            raise ConfigError("broker.port and broker.metrics_port must be in 0..65535")
        for name in (
            "max_receive_message_bytes",
            "max_send_message_bytes",
            "default_deadline_ms",
            "backend_timeout_ms",
            "initial_batch_service_ms",
            "admission_probe_after_ms",
            "max_stream_windows_in_flight",
            "shutdown_grace_s",
        ):
            _positive(f"broker.{name}", getattr(self, name))
        if not self.max_batch_wait_ms >= 0:
            raise ConfigError(f"broker.max_batch_wait_ms must be >= 0, got {self.max_batch_wait_ms!r}")
        for name in ("max_connection_age_s", "max_connection_age_grace_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"broker.{name} must be a number of seconds, got {value!r}")
            if not (value == 0 and name == "max_connection_age_s") and not _MIN_AGE_S <= value <= _MAX_AGE_S:
                off = " (0: off)" if name == "max_connection_age_s" else ""
                raise ConfigError(
                    f"broker.{name} must be in {_MIN_AGE_S:g}..{_MAX_AGE_S:g} s{off} "
                    f"(gRPC takes whole milliseconds in an int32), got {value!r}"
                )
        if not 0 < self.service_ewma_alpha <= 1:
            raise ConfigError(f"broker.service_ewma_alpha must be in (0, 1], got {self.service_ewma_alpha!r}")
        if not isinstance(self.auth_secret, str) or len(self.auth_secret) < 16:
            raise ConfigError("broker.auth_secret must be a string of at least 16 characters")
        object.__setattr__(self, "allowed_device_ids", tuple(self.allowed_device_ids))
        if self.token_store not in TOKEN_STORES:
            raise ConfigError(f"broker.token_store must be one of {TOKEN_STORES}, got {self.token_store!r}")
        if self.token_store == "redis" and self.redis_url is None:
            raise ConfigError(
                "broker.token_store 'redis' needs broker.redis_url: the broker's Redis user, which reads "
                "token hashes and follows revocations (deploy/redis/redis.conf)"
            )
        _positive("broker.token_cache_ttl_s", self.token_cache_ttl_s)
        for name in ("tls_cert_file", "tls_key_file", "tls_client_ca_file"):
            object.__setattr__(self, name, _optional_path(f"broker.{name}", getattr(self, name)))
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ConfigError("broker.tls_cert_file and broker.tls_key_file go together: set both (TLS) or neither")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ConfigError(
                "broker.tls_client_ca_file (mutual TLS) needs the broker's own certificate: "
                "set broker.tls_cert_file and broker.tls_key_file"
            )
        if not isinstance(self.allow_plaintext, bool):
            raise ConfigError(f"broker.allow_plaintext must be true or false, got {self.allow_plaintext!r}")
        object.__setattr__(self, "static_plan_device_classes", tuple(self.static_plan_device_classes))
        object.__setattr__(self, "static_plan_cuts", dict(self.static_plan_cuts))
        for name, cut in [("static_plan_cut", self.static_plan_cut), *self.static_plan_cuts.items()]:
            if isinstance(cut, bool) or not isinstance(cut, int) or cut < 0:
                raise ConfigError(f"broker static plan cut of {name!r} must be an int >= 0, got {cut!r}")
        if self.static_plan_codec not in VALID_CODECS:
            raise ConfigError(f"broker.static_plan_codec must be one of {VALID_CODECS}, got {self.static_plan_codec!r}")

    @property
    def uses_dev_secret(self) -> bool:
        """Whether tokens are HMACs under the built-in development secret (stored tokens use none)."""
        return self.token_store == "hmac" and self.auth_secret == DEV_AUTH_SECRET

    @property
    def uses_tls(self) -> bool:
        return self.tls_cert_file is not None

    @property
    def uses_mtls(self) -> bool:
        return self.tls_client_ca_file is not None

    def exposure_problem(self) -> str | None:
        """Why serving this config on broker.host would expose it, as what to set; None: safe.

        A loopback host is always safe (tests, demo, simulate). Any other needs a real auth secret,
        and TLS unless allow_plaintext says the network is private."""
        if is_loopback_host(self.host):
            return None
        missing = []
        if self.uses_dev_secret:
            missing.append("broker.auth_secret (not the built-in development secret)")
        if not self.uses_tls and not self.allow_plaintext:
            missing.append("broker.tls_cert_file + broker.tls_key_file (or broker.allow_plaintext: true)")
        if not missing:
            return None
        return f"refusing to serve on non-loopback broker.host {self.host!r}: set {' and '.join(missing)}"


@dataclass(frozen=True)
class BreakerConfig:
    """The edge's circuit breaker (edge/breaker.py); back-off as in gRPC's connection-backoff spec."""

    # One missed deadline is noise (that window is finished locally anyway); three in a row at one
    # window per second is an outage, and going local then saves each later window its deadline.
    failure_threshold: int = 3
    backoff_base_s: float = 1.0  # first fully-local period; gRPC's INITIAL_BACKOFF
    backoff_factor: float = 1.6  # growth per failed probe; gRPC's MULTIPLIER
    # Cap: after the cloud returns, a device offloads again within 30 s x (1 + jitter) plus one
    # window. Shorter than gRPC's 120 s because a probe costs one window's fallback, not a reconnect storm.
    backoff_max_s: float = 30.0
    backoff_jitter: float = 0.2  # +-20% (gRPC's JITTER): devices cut off together do not probe together

    def __post_init__(self) -> None:
        n = self.failure_threshold
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigError(f"edge.breaker.failure_threshold must be an int >= 1, got {n!r}")
        _positive("edge.breaker.backoff_base_s", self.backoff_base_s)
        if not self.backoff_factor >= 1:
            raise ConfigError(f"edge.breaker.backoff_factor must be >= 1, got {self.backoff_factor!r}")
        if not self.backoff_max_s >= self.backoff_base_s:
            raise ConfigError("edge.breaker.backoff_max_s must be >= edge.breaker.backoff_base_s")
        if not 0 <= self.backoff_jitter < 1:
            raise ConfigError(f"edge.breaker.backoff_jitter must be in [0, 1), got {self.backoff_jitter!r}")


@dataclass(frozen=True)
class EstimatorConfig:
    """The edge's bandwidth/RTT estimator (edge/estimator.py)."""

    # Believed before any transfer (and after max_sample_age_s without one): a middling 3G/LTE
    # uplink, the centre of the planner's bucket edges, so a fresh device tries its plan's offload rows.
    prior_bandwidth_mbps: float = 2.0
    prior_rtt_ms: float = 50.0  # a typical LTE round trip to a regional cloud
    # How far the prior may be off (1-sigma, relative to the rate): 1.0 lets the first large
    # transfer move the estimate by a factor of several.
    prior_rel_std: float = 1.0
    # Counted as a bandwidth sample (LinkEstimate.bandwidth_samples) from two full TCP segments on:
    # below that a transfer's time is round trip and set-up (the filter still weighs it by its size).
    min_bandwidth_sample_bytes: int = 2920
    # After this long without a transfer the estimate is the prior again: a link 30 s ago says
    # little about now.
    max_sample_age_s: float = 30.0
    # How fast the link may change between samples (random-walk drift): the round trip by ~0.5 ms per
    # sqrt(s) (routes and queues change slowly), the rate by ~17% per sqrt(s): the std of the
    # per-second change of ln(rate) in the two trace families used for tuning (Norway HSDPA 0.22,
    # Oboe 0.12; FCC broadband, 0.24, was held out). The changes are heavy-tailed (medians ~0-5%):
    # a jump shows as a stall, then the next calls follow it (edge/estimator.py).
    rtt_drift_ms_per_sqrt_s: float = 0.5
    rate_drift_per_sqrt_s: float = 0.17
    # Noise of one call's time: timer and scheduling jitter (~1 ms) + 2% of it.
    jitter_ms: float = 1.0
    jitter_rel: float = 0.02
    # Model TCP slow start after idle (Linux's default tcp_slow_start_after_idle=1; pipelines/tcp.py).
    slow_start: bool = True

    def __post_init__(self) -> None:
        for name in ("prior_bandwidth_mbps", "prior_rtt_ms", "max_sample_age_s", "prior_rel_std"):
            _positive(f"edge.estimator.{name}", getattr(self, name))
        for name in ("rtt_drift_ms_per_sqrt_s", "rate_drift_per_sqrt_s", "jitter_ms", "jitter_rel"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ConfigError(f"edge.estimator.{name} must be a finite number >= 0, got {value!r}")
        if self.min_bandwidth_sample_bytes < 0:
            raise ConfigError("edge.estimator.min_bandwidth_sample_bytes must be >= 0")


_EDGE_CODECS = VALID_CODECS
_EDGE_RADIOS = tuple(r.value for r in Radio)
_EDGE_LB_POLICIES = ("pick_first", "round_robin")  # edge/transport.py LB_POLICIES


@dataclass(frozen=True)
class EdgeConfig:
    """One device (edge/runtime.py, `splitsense edge run`)."""

    broker_address: str = "127.0.0.1:50051"  # broker.host:broker.port
    device_id: str = "edge-0"
    device_class: str = "phone"  # a planner.classes name: selects the device's plan
    token: str = field(default="", repr=False)  # `splitsense cloud token DEVICE_ID`; never printed
    model: str = "fsdd_digit"
    deadline_ms: float = 300.0  # planner classes' deadline: after it the window is finished locally
    # Hedging (edge/route.py hedge_after_s): a window whose answer is late relative to the link
    # estimate starts its local tail after max(hedge_factor x expected, expected + hedge_margin_ms,
    # expected + 3 sigma), never later than the deadline; whichever answers first is the result.
    # Twice the expected time leaves room for a promotion the estimate missed and a loaded cloud;
    # 0 turns hedging off (the deadline alone).
    hedge_factor: float = 2.0
    hedge_margin_ms: float = 30.0
    # Used until a plan arrives. None: the cut with the smallest activation (least to send).
    default_cut: int | None = None
    default_codec: str = "fp32"  # exact: offloaded predictions equal local ones
    compression_energy_kept: float = 1.0  # front compression until a plan says otherwise; 1.0 = none
    use_stream: bool = True  # one OffloadStream per device; False: one unary call per window
    # gRPC's client-side load balancing over the addresses broker_address resolves to (several
    # brokers: "ipv4:10.0.0.1:50051,10.0.0.2:50051" or a DNS name with several A records).
    # "pick_first": one broker chosen at random per device (addresses shuffled), the next one when
    # it goes away; a device's one long-lived stream makes this the even spread. "round_robin"
    # spreads calls, not streams: a stream lands on the first broker whose connection is ready, so
    # devices starting together pile onto one (edge/transport.py says what was measured).
    lb_policy: str = "pick_first"
    max_message_bytes: int = 1 << 20  # broker.max_receive_message_bytes: the largest activation fits
    # 1.0 replays the recording at its real rate; 2.0 twice as fast; 0 as fast as possible (tests).
    replay_speed: float = 1.0
    audio_frame_ms: float = 80.0  # the microphone delivers 640-sample frames at 8 kHz
    telemetry_period_s: float = 10.0  # devices push telemetry (NAT: they cannot be scraped)
    # Each period is telemetry_period_s x uniform(1 - j, 1 + j), and a device's first report goes
    # within j x telemetry_period_s of its first window: a fleet that boots together does not
    # report together (1,000 reports in one second every 10 s starved the windows' answers).
    telemetry_jitter: float = 0.2
    # A device without local fallback forwards its stored windows, oldest first, this many at a
    # time while its breaker is closed (one radio wake, the answers awaited together); the probe
    # of an open breaker is one window. 1: one at a time, a round trip each.
    store_drain_burst: int = 8
    # The device's own power figures; the defaults are the "phone" class of pipelines/devices.py
    # (Pixel 3: ~2 W busy, LTE, 2915 mAh x 3.85 V); `splitsense edge run --device-class` fills them.
    active_mw: float = 2000.0
    radio: str = "lte"
    battery_mwh: float = 11222.75
    battery_initial_fraction: float = 1.0
    on_battery: bool = True
    breaker: BreakerConfig = field(default_factory=BreakerConfig)
    estimator: EstimatorConfig = field(default_factory=EstimatorConfig)
    # TLS to the broker, PEM files (deploy/tls/gen_certs.sh). tls_ca_file: the CA that signed the
    # broker's certificate; set, the device dials TLS. For mutual TLS the device also presents
    # tls_cert_file + tls_key_file, a certificate whose subject CN is device_id. None: plaintext.
    tls_ca_file: Path | None = None
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    # Dial a broker that is not on loopback without TLS: off, since the token would cross the
    # network in the clear. The twin of broker.allow_plaintext.
    allow_plaintext: bool = False
    # The engine the device runs its model on (edge/backend.py): "onnx" (ONNX Runtime on the graphs
    # `splitsense models export` wrote: what a device ships, no torch), "torch" (PyTorch on the
    # weights), or "auto": onnx when onnxruntime is installed and every model the device runs has
    # an export made from the current weights (its manifest's sha256), torch otherwise. The
    # simulator's devices follow it too.
    backend: str = "auto"
    # Threads inside one operator (ONNX Runtime's intra_op_num_threads; torch.set_num_threads for
    # `splitsense edge run` on torch): a device runs one window at a time, and a phone's or board's
    # big cores are few; 1 is also what the catalog's stage latencies are measured with.
    intra_op_threads: int = 1
    export_dir: Path | None = None  # the exports' root folder; None: <paths.weights_dir>/export

    def __post_init__(self) -> None:
        for name in ("broker_address", "device_id", "device_class", "model"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise ConfigError(f"edge.{name} must be a non-empty string, got {value!r}")
        for name in ("tls_ca_file", "tls_cert_file", "tls_key_file", "export_dir"):
            object.__setattr__(self, name, _optional_path(f"edge.{name}", getattr(self, name)))
        if self.backend not in EDGE_BACKENDS:
            raise ConfigError(f"edge.backend must be one of {', '.join(EDGE_BACKENDS)}, got {self.backend!r}")
        if isinstance(self.intra_op_threads, bool) or not isinstance(self.intra_op_threads, int):
            raise ConfigError(f"edge.intra_op_threads must be an integer, got {self.intra_op_threads!r}")
        _positive("edge.intra_op_threads", self.intra_op_threads)
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ConfigError("edge.tls_cert_file and edge.tls_key_file go together: set both (mutual TLS) or neither")
        if self.tls_cert_file is not None and self.tls_ca_file is None:
            raise ConfigError("edge.tls_cert_file (mutual TLS) needs edge.tls_ca_file: the CA of the broker's cert")
        if not isinstance(self.allow_plaintext, bool):
            raise ConfigError(f"edge.allow_plaintext must be true or false, got {self.allow_plaintext!r}")
        if not (self.hedge_factor >= 0 and self.hedge_margin_ms >= 0):
            raise ConfigError("edge.hedge_factor and edge.hedge_margin_ms must be >= 0")
        for name in ("deadline_ms", "audio_frame_ms", "telemetry_period_s", "max_message_bytes"):
            _positive(f"edge.{name}", getattr(self, name))
        burst = self.store_drain_burst
        if isinstance(burst, bool) or not isinstance(burst, int) or burst < 1:
            raise ConfigError(f"edge.store_drain_burst must be an int >= 1, got {burst!r}")
        if not 0 <= self.telemetry_jitter < 1:
            raise ConfigError(f"edge.telemetry_jitter must be in [0, 1), got {self.telemetry_jitter!r}")
        _positive("edge.battery_mwh", self.battery_mwh)
        cut = self.default_cut
        if cut is not None and (isinstance(cut, bool) or not isinstance(cut, int) or cut < 0):
            raise ConfigError(f"edge.default_cut must be null or an int >= 0, got {cut!r}")
        if self.default_codec not in _EDGE_CODECS:
            raise ConfigError(f"edge.default_codec must be one of {_EDGE_CODECS}, got {self.default_codec!r}")
        if self.lb_policy not in _EDGE_LB_POLICIES:
            raise ConfigError(f"edge.lb_policy must be one of {_EDGE_LB_POLICIES}, got {self.lb_policy!r}")
        if self.radio not in _EDGE_RADIOS:
            raise ConfigError(f"edge.radio must be one of {_EDGE_RADIOS}, got {self.radio!r}")
        if not 0 < self.compression_energy_kept <= 1:
            raise ConfigError("edge.compression_energy_kept must be in (0, 1] (1.0 = uncompressed)")
        if not self.replay_speed >= 0:
            raise ConfigError(f"edge.replay_speed must be >= 0 (0: fastest), got {self.replay_speed!r}")
        if not self.active_mw >= 0:
            raise ConfigError(f"edge.active_mw must be >= 0, got {self.active_mw!r}")
        if not 0 <= self.battery_initial_fraction <= 1:
            raise ConfigError("edge.battery_initial_fraction must be in [0, 1]")

    def exposure_problem(self) -> str | None:
        """Why dialing broker_address as configured would send the token in the clear, as what to
        set; None: TLS, a loopback broker, or allow_plaintext."""
        if self.tls_ca_file is not None or self.allow_plaintext:
            return None
        host = host_of_address(self.broker_address)
        if is_loopback_host(host):
            return None
        return (
            f"refusing to send the token in plaintext to non-loopback broker {self.broker_address!r}: "
            "set edge.tls_ca_file (--tls-ca) or edge.allow_plaintext: true"
        )


@dataclass(frozen=True)
class ControllerConfig:
    """The controller loop (cloud/controller): metrics in, plans out to Redis."""

    # Prometheus scrapes every 15 s by default (deploy/prometheus) and devices report every 10 s
    # (edge.telemetry_period_s): replanning faster only re-reads the same numbers.
    period_s: float = 15.0
    # None: read the brokers' exporters directly (exporter_urls), the embedded default.
    prometheus_url: str | None = None
    # The broker's exporter (broker.metrics_port); a bare host:port gets /metrics appended.
    exporter_urls: tuple[str, ...] = ("http://127.0.0.1:9464/metrics",)
    redis_url: str | None = None  # None: start an embedded redis-server for the process
    # The current and previous plan sets are always kept; a few more let an operator look back
    # over the last couple of minutes of replanning at the default period.
    history_versions: int = 10
    # Range of rate()/increase(): 4 scrape intervals (Prometheus's rule of thumb) and 6 telemetry
    # reports, so one late report moves a rate by less than 20%.
    query_window_s: float = 60.0
    # A class whose offloads fail (or fall back) more often than this goes local-only: past half,
    # most offloads cost a deadline wait and then a local run anyway.
    local_only_failure_rate: float = 0.5
    # ...and only once this many offloads in the window say so: 20 windows make a rate of 0.5 a
    # real signal (binomial std ~0.11), not one unlucky burst.
    local_only_min_windows: int = 20
    # Per request to Prometheus/Redis: a dependency slower than this is treated as down, so a
    # period never stalls (the devices keep their last plan).
    prometheus_timeout_s: float = 5.0
    redis_timeout_s: float = 2.0

    def __post_init__(self) -> None:
        for name in ("period_s", "query_window_s", "prometheus_timeout_s", "redis_timeout_s"):
            _positive(f"controller.{name}", getattr(self, name))
        object.__setattr__(self, "exporter_urls", tuple(self.exporter_urls))
        if self.prometheus_url is None and not self.exporter_urls:
            raise ConfigError("controller needs a prometheus_url or at least one of exporter_urls")
        for name in ("prometheus_url", "redis_url"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or "://" not in value):
                raise ConfigError(f"controller.{name} must be null or a URL such as 'http://host:port'")
        for name in ("history_versions", "local_only_min_windows"):
            value = getattr(self, name)
            lo = 2 if name == "history_versions" else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < lo:
                raise ConfigError(f"controller.{name} must be an int >= {lo}, got {value!r}")
        if not 0 < self.local_only_failure_rate <= 1:
            raise ConfigError("controller.local_only_failure_rate must be in (0, 1]")


# simulators/policies.py: adaptive (the product), the baselines all_local (k = N), all_cloud (k = 0,
# fp32), cloud_input (k = 0 with the best codec within the accuracy budget: SC2's "upload the
# input" baseline) and fixed_cut (Neurosurgeon), and the oracle. Same order as `Policy`.
_SIM_POLICIES = ("adaptive", "all_local", "all_cloud", "cloud_input", "fixed_cut", "oracle")


def _default_sim_models() -> dict[str, str]:
    # Each class runs the model of a sensor it has: activity recognition on a phone's IMU (UCI HAR
    # was recorded on a waist-worn smartphone), speaker identification on a smart-speaker-like
    # board, keyword spotting on a watch's microphone (a wake word). The watch is where the choice
    # moves with the link: its local audio model (~150 ms at 100x) is beaten by offloading above
    # about 1 Mbit/s of WiFi; the others' models are fast enough locally on these traces.
    # The sensor node (a TinyML board with a microphone) answers both audio tasks of each window
    # (who speaks, which keyword) through one shared encoder: it holds only that encoder, so its
    # windows go at the bottleneck or as the input, never fully local (pipelines/groups.py).
    return {
        "phone": "uci_har",
        "iot_board": "fsdd_speaker",
        "watch": "fsdd_digit",
        "sensor_node": "fsdd_speaker+fsdd_digit",
    }


def _default_sim_rtt_ms() -> dict[str, float]:
    # Round trip to the cloud per radio. LTE ~70 ms: the median Huang et al. (MobiSys 2012)
    # measured; 3G ~150 ms, WiFi ~20 ms (home WiFi to a regional cloud): estimates. BLE ~90 ms:
    # a BLE hop to a phone gateway, whose LTE uplink is the 70 ms, + the answer's wait for the next
    # connection event (half a 30 ms interval, 15 ms; the request's wait is the BLE radio model's
    # promotion) + ~5 ms of forwarding in the phone: estimate.
    return {"lte": 70.0, "3g": 150.0, "wifi": 20.0, "ble": 90.0}


@dataclass(frozen=True)
class SimulatorConfig:
    """`splitsense simulate` and `demo` (simulators/): a fleet of simulated devices on real traces."""

    devices: int = 12  # assigned round-robin to device_classes: 12 = 3 of each class
    # planner.classes names; the sensor node is the class that cannot hold a whole model
    device_classes: tuple[str, ...] = ("phone", "iot_board", "watch", "sensor_node")
    models: dict[str, str] = field(default_factory=_default_sim_models, hash=False)
    # Per policy: ~20 audio windows per device, long enough for a controller pass and a few
    # bandwidth changes of the traces, short enough that all six policies fit in a ~2.5-minute demo.
    duration_s: float = 20.0
    policies: tuple[str, ...] = _SIM_POLICIES  # run one after the other on the same inputs
    traces_dir: Path | None = None  # None: the project's traces (the data package's data/traces)
    trace_families: tuple[str, ...] = ()  # sub-folders of traces_dir to use; empty: all of them
    rtt_ms: dict[str, float] = field(default_factory=_default_sim_rtt_ms, hash=False)
    # The most a radio's first hop carries, Mbit/s: a device on BLE reaches the Internet through a
    # gateway (a phone or hub) whose uplink is the trace; BLE itself carries ~0.7 Mbit/s of
    # application data at best (1M PHY, 251-byte packets, a few per connection event; the nRF52840
    # figures of pipelines/power.py), so the device sees min(trace, cap).
    radio_cap_mbps: dict[str, float] = field(default_factory=lambda: {"ble": 0.7}, hash=False)
    loss: float = 0.0  # TCP segment loss probability on every link (0: the traces alone)
    # Scripted outages (start_s, end_s) from each policy's start, on every device's link: a run
    # with them shows the fallback path (zero lost windows) and the breaker's recovery.
    outages: tuple[tuple[float, float], ...] = ()
    # One seed for traces, trace offsets, recording offsets, loss draws and breaker jitter: two runs
    # with the same config get the same inputs, and so does every policy of one run.
    seed: int = 0
    # Torch threads of the fleet process: one, so that a device's compute time is the CPU time of
    # the one thread that ran it (the stretch to the device's speed is taken on it) and the
    # devices, broker and tails do not oversubscribe the 2 cores.
    torch_threads: int = 1
    # How a device's compute time is simulated. "reference": each stage's host time from the
    # model's catalog (measured on this host, uncontended: the basis the classes' speed factors are
    # defined on) x the speed factor, so that a fleet sharing 2 cores does not slow down its own
    # simulated hardware; "measured": the CPU time the window actually took here x the speed factor.
    # Either way the stages run for real and the device waits out the simulated time.
    compute_time: str = "reference"
    # A device's first Neurosurgeon probe (fixed_cut): mean bandwidth of the trace over this long
    # from the device's start, what a short probe transfer would measure.
    probe_s: float = 1.0
    device_id_prefix: str = "sim"
    # A sharded fleet (simulators/shards.py): the devices split over this many Ray actors (one
    # process each, on any node of the cluster), one clock origin, one cloud; 1 with reuse off: the
    # fleet runs in the CLI's own process, as before.
    shards: int = 1
    # Reuse each device's front results (predictions, activations, encodings) per (window, cut,
    # level, codec), computed once for real per shard (simulators/reuse.py): only with compute_time
    # "reference", where a window's device time does not depend on the host's.
    reuse: bool = False
    # How a device's bytes meet its link (simulators/link.py). "proxy": through a shaping TCP proxy
    # per device (LinkEmulator; the real gRPC bytes cross it). "inline": the device dials the
    # broker directly and its transport waits out the same link model in process (ShapedTransport:
    # bandwidth, delay, loss, slow start, outages), with no proxy's sockets and copies: far less CPU
    # per window, for large fleets; HTTP/2 control frames between calls and TCP itself are not shaped.
    link: str = "proxy"

    def __post_init__(self) -> None:
        if self.link not in ("proxy", "inline"):
            raise ConfigError(f"simulator.link must be 'proxy' or 'inline', got {self.link!r}")
        if isinstance(self.shards, bool) or not isinstance(self.shards, int) or self.shards < 1:
            raise ConfigError(f"simulator.shards must be an int >= 1, got {self.shards!r}")
        if not isinstance(self.reuse, bool):
            raise ConfigError(f"simulator.reuse must be true or false, got {self.reuse!r}")
        if self.reuse and self.compute_time != "reference":
            raise ConfigError("simulator.reuse needs compute_time 'reference' (reused fronts take no host time)")
        if isinstance(self.devices, bool) or not isinstance(self.devices, int) or self.devices < 1:
            raise ConfigError(f"simulator.devices must be an int >= 1, got {self.devices!r}")
        object.__setattr__(self, "device_classes", tuple(self.device_classes))
        object.__setattr__(self, "policies", tuple(self.policies))
        object.__setattr__(self, "trace_families", tuple(self.trace_families))
        # A scenario names only what it changes: other classes and radios keep their defaults.
        object.__setattr__(self, "models", {**_default_sim_models(), **dict(self.models)})
        caps = {str(k): float(v) for k, v in dict(self.radio_cap_mbps).items()}
        if any(not v > 0 for v in caps.values()):
            raise ConfigError(f"simulator.radio_cap_mbps must hold caps > 0 Mbit/s, got {caps}")
        object.__setattr__(self, "radio_cap_mbps", caps)
        merged_rtt = {**_default_sim_rtt_ms(), **dict(self.rtt_ms)}
        object.__setattr__(self, "rtt_ms", {str(k): float(v) for k, v in merged_rtt.items()})
        if self.traces_dir is not None:
            object.__setattr__(self, "traces_dir", Path(self.traces_dir))
        if not self.device_classes:
            raise ConfigError("simulator.device_classes must name at least one device class")
        missing = [c for c in self.device_classes if c not in self.models]
        if missing:
            raise ConfigError(f"simulator.models has no model for device classes {missing}")
        if not self.policies:
            raise ConfigError(f"simulator.policies must name at least one of {_SIM_POLICIES}")
        for policy in self.policies:
            if policy not in _SIM_POLICIES:
                raise ConfigError(f"unknown simulator policy {policy!r}; use one of {_SIM_POLICIES}")
        if len(set(self.policies)) != len(self.policies):
            raise ConfigError(f"simulator.policies names a policy twice: {self.policies}")
        for name in ("duration_s", "probe_s"):
            _positive(f"simulator.{name}", getattr(self, name))
        for radio, rtt in self.rtt_ms.items():
            if not 0 <= rtt < 10_000:
                raise ConfigError(f"simulator.rtt_ms[{radio!r}] must be in [0, 10000) ms, got {rtt!r}")
        if not 0 <= self.loss < 1:
            raise ConfigError(f"simulator.loss must be in [0, 1), got {self.loss!r}")
        outages = []
        for window in self.outages:
            if len(window) != 2 or not 0 <= float(window[0]) < float(window[1]):
                raise ConfigError(f"simulator.outages: {window!r} must be [start_s, end_s] with 0 <= start < end")
            outages.append((float(window[0]), float(window[1])))
        object.__setattr__(self, "outages", tuple(outages))
        if self.compute_time not in ("reference", "measured"):
            raise ConfigError(f"simulator.compute_time must be 'reference' or 'measured', got {self.compute_time!r}")
        if isinstance(self.torch_threads, bool) or not isinstance(self.torch_threads, int) or self.torch_threads < 1:
            raise ConfigError(f"simulator.torch_threads must be an int >= 1, got {self.torch_threads!r}")


@dataclass(frozen=True)
class Config:
    paths: PathsConfig = field(default_factory=PathsConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    compression: CompressionConfig = field(default_factory=CompressionConfig)
    planner: PlannerConfig = field(default_factory=PlannerConfig)
    serving: ServingConfig = field(default_factory=ServingConfig)
    broker: BrokerConfig = field(default_factory=BrokerConfig)
    edge: EdgeConfig = field(default_factory=EdgeConfig)
    controller: ControllerConfig = field(default_factory=ControllerConfig)
    simulator: SimulatorConfig = field(default_factory=SimulatorConfig)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Config:
        return _build(cls, data, "")

    @classmethod
    def from_file(cls, path: str | Path) -> Config:
        p = Path(path)
        try:
            data = json.loads(p.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {p} does not exist") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"config file {p} is not valid JSON: line {e.lineno}: {e.msg}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {p} must hold a JSON object")
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        return _jsonable(dataclasses.asdict(self))


def _build(cls: Any, data: dict[str, Any], prefix: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in fields:
            raise ConfigError(f"unknown config key {prefix}{key!r}; known: {', '.join(sorted(fields))}")
        default = getattr(cls(), key)
        if dataclasses.is_dataclass(default):
            if not isinstance(value, dict):
                raise ConfigError(f"config key {prefix}{key} must be an object")
            kwargs[key] = _build(type(default), value, f"{prefix}{key}.")
        elif isinstance(default, Path):
            kwargs[key] = Path(value)
        elif isinstance(default, tuple):
            kwargs[key] = tuple(value)
        else:
            kwargs[key] = value
    return cls(**kwargs)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj
