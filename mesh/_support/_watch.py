"""Waiting, with a deadline, for the mesh to reach a state: peers, workers, subscribers.

Waits are woken when something they may depend on changed (peers, their
interest, readiness, the spool) and re-check their condition; nothing polls.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from ..errors import ClosedError, RequestTimeout


class Watchers:
    """Every wait in progress on one node; implements the `Waiter` protocol."""

    def __init__(self) -> None:
        self._waiting: set[asyncio.Future[None]] = set()
        self._open = False

    def open(self) -> None:
        self._open = True

    def close(self) -> None:
        """The node closed: every wait ends with ClosedError."""
        self._open = False
        self.wake()

    async def wait(self, ready: Callable[[], bool], timeout: float, what: str) -> None:
        """Return once `ready()` holds.

        Raises:
            RequestTimeout: it did not within `timeout` seconds (`what` names the wait).
            ClosedError: the node is not running, or closed meanwhile.
        """
        self._check_open()
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                while not ready():
                    self._check_open()
                    fut = loop.create_future()
                    self._waiting.add(fut)
                    try:
                        await fut
                    finally:
                        self._waiting.discard(fut)
        except TimeoutError as exc:
            raise RequestTimeout(what, timeout) from exc

    def wake(self) -> None:
        """Something a wait may be waiting on changed (cheap: each re-checks its own)."""
        for fut in self._waiting:
            if not fut.done():
                fut.set_result(None)

    def _check_open(self) -> None:
        if not self._open:
            raise ClosedError("node is not running (use `async with` or `await start()`)")
