"""The background tasks of a node, owned in one place and ended together.

A node's `start` and `aclose` may run in different tasks (the blocking `Node`
calls each from its own), so an `asyncio.TaskGroup`, which must be entered
and left in one task, cannot hold them; this set can, and still leaves no
orphan: `cancel` ends and awaits every task it started.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections.abc import Coroutine
from typing import Any


class TaskSet:
    """Tasks started for one owner; `cancel` stops and awaits them all."""

    def __init__(self) -> None:
        self._tasks: list[asyncio.Task[None]] = []

    def spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        self._tasks.append(asyncio.get_running_loop().create_task(coro, name=name))

    async def cancel(self) -> None:
        """Cancel every task and wait for each to end (safe to call twice)."""
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task


def is_async_handler(handler: object) -> bool:
    """Is `handler` an async function (or an object whose ``__call__`` is one)?"""
    if inspect.iscoroutinefunction(handler):
        return True
    call = getattr(handler, "__call__", None)  # noqa: B004 - a callable object's method
    return call is not None and inspect.iscoroutinefunction(call)
