"""One timer for many waiting futures: each fails with TimeoutError at its own deadline.

A request in flight needs a timeout, but a timer per request (``call_at`` and
its ``cancel``) cost a tenth of the requester's CPU at 64 in flight. Here one
timer waits for the earliest deadline; when it fires it fails what is due and
re-arms for the next one, so with requests answered well within their
timeout it fires about once per timeout period, whatever the rate.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any, Final

_EARLY: Final[float] = 0.001
"""A deadline this close counts as due (the loop may wake a hair before it)."""


class Deadlines:
    """Futures keyed by id, each with a loop-time deadline."""

    __slots__ = ("_armed_at", "_due", "_timer")

    def __init__(self) -> None:
        self._due: dict[int, tuple[asyncio.Future[Any], float]] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._armed_at = math.inf

    def add(self, key: int, fut: asyncio.Future[Any], deadline: float) -> None:
        self._due[key] = (fut, deadline)
        if deadline < self._armed_at:
            self._arm(deadline)

    def discard(self, key: int) -> None:
        self._due.pop(key, None)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._due.clear()

    def _arm(self, deadline: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._armed_at = deadline
        self._timer = asyncio.get_running_loop().call_at(deadline, self._fire)

    def _fire(self) -> None:
        self._timer, self._armed_at = None, math.inf
        now = asyncio.get_running_loop().time() + _EARLY
        due = [key for key, (_, deadline) in self._due.items() if deadline <= now]
        for key in due:
            fut, _ = self._due.pop(key)
            if not fut.done():
                fut.set_exception(TimeoutError())
        if self._due:
            self._arm(min(deadline for _, deadline in self._due.values()))
