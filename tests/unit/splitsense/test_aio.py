"""splitsense.aio: the event loop our processes run on, picked by SPLITSENSE_EVENT_LOOP."""

from __future__ import annotations

import asyncio
import importlib.util

import pytest

from splitsense import aio
from splitsense.errors import ConfigError

HAS_UVLOOP = importlib.util.find_spec("uvloop") is not None


async def _loop_module() -> str:
    await asyncio.sleep(0)
    return type(asyncio.get_running_loop()).__module__


@pytest.mark.skipif(not HAS_UVLOOP, reason="uvloop is not installed")
@pytest.mark.parametrize("value", ["", "auto", "uvloop", " UVLOOP "])
def test_runs_on_uvloop_by_default_and_when_asked(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv(aio.EVENT_LOOP_ENV, value)
    assert aio.event_loop_name() == "uvloop"
    assert aio.run(_loop_module()).startswith("uvloop")


def test_asyncio_runs_the_standard_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(aio.EVENT_LOOP_ENV, "asyncio")
    assert aio.event_loop_factory() is None
    assert aio.event_loop_name() == "asyncio"
    assert aio.run(_loop_module()).startswith("asyncio")


def test_run_returns_the_result_and_raises_the_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(aio.EVENT_LOOP_ENV, raising=False)

    async def add(a: int, b: int) -> int:
        await asyncio.sleep(0.001)
        return a + b

    async def fail() -> None:
        await asyncio.sleep(0)
        raise ValueError("boom")

    assert aio.run(add(2, 3)) == 5
    with pytest.raises(ValueError, match="boom"):
        aio.run(fail())


def test_an_unknown_choice_is_a_config_error_naming_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(aio.EVENT_LOOP_ENV, "trio")
    coro = _loop_module()
    with pytest.raises(ConfigError, match="SPLITSENSE_EVENT_LOOP must be one of auto, uvloop, asyncio, got 'trio'"):
        aio.run(coro)
    assert coro.cr_frame is None  # closed, not left un-awaited


def test_uvloop_asked_for_but_missing_says_how_to_fix_it(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    real_import = builtins.__import__

    def no_uvloop(name: str, *args: object, **kwargs: object) -> object:
        if name == "uvloop":
            raise ImportError("No module named 'uvloop'")
        return real_import(name, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(builtins, "__import__", no_uvloop)
    monkeypatch.setenv(aio.EVENT_LOOP_ENV, "uvloop")
    with pytest.raises(ConfigError, match="pip install uvloop"):
        aio.event_loop_factory()
    monkeypatch.setenv(aio.EVENT_LOOP_ENV, "auto")
    assert aio.event_loop_factory() is None  # auto falls back to asyncio's loop
