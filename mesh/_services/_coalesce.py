"""Coalescing sends per destination: the first at once, the rest of the loop iteration together.

A lone request or reply leaves immediately (no added latency); when many are
made in the same loop iteration, as with 64 requests in flight or a batch of
requests answered by a sync handler, the ones after the first wait only until
the iteration ends and then travel as one frame per destination. A ZeroMQ
send costs about as much as the Python around it, so this is what lets
request/reply throughput scale with the requests in flight.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")


class Coalescer(Generic[K, T]):
    """Calls ``send(key, items)`` once for the first item of an iteration, once for the rest."""

    __slots__ = ("_held", "_open", "_send")

    def __init__(self, send: Callable[[K, list[T]], None]) -> None:
        self._send = send
        self._open: dict[K, list[T]] | None = None
        """Per destination, what waits for the end of this iteration (None: nothing sent yet)."""
        self._held = False

    def hold(self) -> None:
        """Keep even the first items until `flush`: the caller knows when its burst ends
        (a server answering one batch of requests), so no end-of-iteration callback."""
        if self._open is None:
            self._open = {}
        self._held = True

    def add(self, key: K, item: T) -> None:
        pending = self._open
        if pending is None:
            pending = self._open = {}
            asyncio.get_running_loop().call_soon(self.flush)
        waiting = pending.get(key)
        if waiting is not None:
            waiting.append(item)
        elif self._held:
            pending[key] = [item]
        else:
            pending[key] = []
            self._send(key, [item])

    def flush(self) -> None:
        """Send what waits now (also at the end of the iteration, by itself)."""
        pending, self._open, self._held = self._open, None, False
        if pending:
            for key, items in pending.items():
                if items:
                    self._send(key, items)
