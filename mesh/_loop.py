"""The event loop zeromesh's own entry points run on: uvloop when installed, else asyncio's.

uvloop runs the loop machinery in C. Measured here (benchmarks/reqrep.py, same
runs): a request/reply round trip ~15 % faster (p50 256-261 us against
281-307 us) and 64 requests in flight 35-50 % more per second; pub/sub and
push/pull, whose cost is per-message Python rather than loop turns, change
little. The library never installs it behind your back: an `AsyncNode` runs
on whatever loop the application started. The CLI, the agent, the blocking
`Node` and `mesh.run` choose it; ``ZEROMESH_LOOP=asyncio`` opts out,
``ZEROMESH_LOOP=uvloop`` insists.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, TypeVar

from ._support._text import quoted
from .errors import ConfigError

T = TypeVar("T")
LoopFactory = Callable[[], asyncio.AbstractEventLoop]
_CHOICES = ("auto", "uvloop", "asyncio")


def loop_factory(env: Mapping[str, str] = os.environ) -> LoopFactory:
    """The loop to run on, from ``ZEROMESH_LOOP`` (auto: uvloop if it can be imported).

    Raises:
        ConfigError: an unknown choice, or uvloop asked for and not installed.
    """
    choice = env.get("ZEROMESH_LOOP", "").strip().lower() or "auto"
    if choice not in _CHOICES:
        raise ConfigError("ZEROMESH_LOOP", f"expected one of {', '.join(_CHOICES)}, "
                                           f"got {quoted(choice)}")
    if choice != "asyncio":
        try:
            import uvloop
        except ImportError:
            if choice == "uvloop":
                raise ConfigError("ZEROMESH_LOOP", "uvloop is not installed") from None
        else:
            factory: LoopFactory = uvloop.new_event_loop
            return factory
    return asyncio.new_event_loop


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run `main` to completion on a new loop of the chosen kind (see the module doc);
    like `asyncio.run`, which it otherwise is."""
    try:
        factory = loop_factory()
    except ConfigError:
        main.close()  # never started: no "never awaited" warning on top of the error
        raise
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)


def new_event_loop() -> asyncio.AbstractEventLoop:
    """A new loop of the chosen kind, for a thread that runs its own."""
    return loop_factory()()
