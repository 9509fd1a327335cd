"""The one typed config object of splitsense.

Every tunable lives here, with its unit in its name and the reason for its default beside it.
`Config()` gives the embedded defaults that `splitsense demo` and the tests run on; a scenario
file (JSON) overrides any subset: `Config.from_file(path)`. Values are checked when built, so a
wrong one fails at start-up with a message naming the field, never deep inside a run.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from splitsense.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parent.parent


def _positive(name: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(f"{name} must be > 0, got {value!r}")


@dataclass(frozen=True)
class PathsConfig:
    # Data and weights ship inside the repository (see pipelines/data/README.md).
    data_dir: Path = REPO_ROOT / "pipelines" / "data"
    weights_dir: Path = REPO_ROOT / "pipelines" / "weights"
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


@dataclass(frozen=True)
class Config:
    paths: PathsConfig = field(default_factory=PathsConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    compression: CompressionConfig = field(default_factory=CompressionConfig)

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
