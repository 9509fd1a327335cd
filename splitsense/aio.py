"""The event loop every splitsense process runs on: uvloop when it is installed, else asyncio's own.

grpc.aio, the broker, the device's transport and the fleet simulator spend much of their CPU in the
event loop's own machinery (ready-queue callbacks, timers, the socket grpc.aio's poller wakes the
loop through). uvloop (libuv, in C) does that for less: `bench serve` measured it side by side
(README, "Serving"). Ray already runs its actors and Serve replicas on uvloop (RAY_USE_UVLOOP);
this is the same choice for our own processes: the broker (`cloud up`, the simulator's cloud), the
controller, a device's runtime (`run`, `demo`) and the benchmarks' clients and servers.

SPLITSENSE_EVENT_LOOP picks it: "auto" (the default: uvloop when importable), "uvloop" (an error
when it is not installed) or "asyncio" (the standard loop, e.g. to compare, or to debug with
asyncio's debug mode). uvloop is a dependency of the edge and cloud extras on Linux and macOS; on
a platform without it, "auto" falls back to asyncio's loop.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from splitsense.errors import ConfigError

__all__ = [
    "EVENT_LOOP_ENV",
    "EVENT_LOOPS",
    "event_loop_factory",
    "event_loop_name",
    "loop_factory",
    "run",
    "running_loop_name",
]

EVENT_LOOP_ENV = "SPLITSENSE_EVENT_LOOP"
EVENT_LOOPS = ("auto", "uvloop", "asyncio")

_T = TypeVar("_T")


def loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The loop factory of `choice` (one of EVENT_LOOPS); None: asyncio's default loop. "uvloop"
    without uvloop installed is a ConfigError; "auto" then falls back to asyncio's loop."""
    if choice not in EVENT_LOOPS:
        raise ConfigError(f"{EVENT_LOOP_ENV} must be one of {', '.join(EVENT_LOOPS)}, got {choice!r}")
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise ConfigError(
                f"{EVENT_LOOP_ENV}=uvloop but uvloop is not installed: `pip install uvloop`, "
                f"or set {EVENT_LOOP_ENV}=asyncio"
            ) from None
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def event_loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The loop factory SPLITSENSE_EVENT_LOOP asks for; None: asyncio's default loop."""
    return loop_factory(os.environ.get(EVENT_LOOP_ENV, "auto").strip().lower() or "auto")


def event_loop_name() -> str:
    """ "uvloop" or "asyncio": the loop `run` starts in this process (for reports)."""
    return "asyncio" if event_loop_factory() is None else "uvloop"


def running_loop_name() -> str:
    """ "uvloop" or "asyncio": the loop running now (a Ray actor's is Ray's choice, RAY_USE_UVLOOP)."""
    return "uvloop" if type(asyncio.get_running_loop()).__module__.startswith("uvloop") else "asyncio"


def run(main: Coroutine[Any, Any, _T]) -> _T:
    """`asyncio.run(main)` on the event loop SPLITSENSE_EVENT_LOOP picks (uvloop by default)."""
    try:
        factory = event_loop_factory()
    except ConfigError:
        main.close()  # never awaited: no "coroutine was never awaited" warning on top of the error
        raise
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)
