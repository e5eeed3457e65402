"""A stream of peer events for one listener: an async iterator with `aclose()`."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable

from ._peers import PeerEvent
from .errors import ClosedError


class PeerEvents:
    """Peer events in order, from the moment the stream was opened."""

    def __init__(self, on_close: Callable[[PeerEvents], None]) -> None:
        self._queue: deque[PeerEvent] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._closed = False
        self._on_close = on_close

    def _deliver(self, event: PeerEvent) -> None:
        self._queue.append(event)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _close(self) -> None:
        self._closed = True
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def next(self, timeout: float | None = None) -> PeerEvent:
        """The next event.

        Raises:
            TimeoutError: nothing happened within `timeout` seconds.
            ClosedError: the stream or its node was closed.
        """
        while not self._queue:
            if self._closed:
                raise ClosedError("peer event stream is closed")
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                async with asyncio.timeout(timeout):
                    await self._waiter
            finally:
                self._waiter = None
        return self._queue.popleft()

    def __aiter__(self) -> PeerEvents:
        return self

    async def __anext__(self) -> PeerEvent:
        try:
            return await self.next()
        except ClosedError:
            raise StopAsyncIteration from None

    async def aclose(self) -> None:
        self._close()
        self._on_close(self)
