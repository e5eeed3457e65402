"""A queue one loop-side producer fills and one consumer awaits, with an end.

Subscriptions and peer-event streams are both this: items appended on the
loop, read with ``await next(timeout)``, and closable so a waiting reader
wakes and gets `ClosedError` once the queue is drained.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Generic, Protocol, TypeVar

from ..errors import ClosedError

T = TypeVar("T")


class Mailbox(Generic[T]):
    """The queue, the waiting reader's future, and the closed flag."""

    def __init__(self) -> None:
        self._queue: deque[T] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._closed = False
        self._waited = 0
        """How often the reader found the queue empty and waited."""

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _close(self) -> None:
        self._closed = True
        self._wake()

    async def _take(self, timeout: float | None, what: str) -> T:
        """The next item; what is queued is still read after close.

        Raises:
            TimeoutError: nothing within `timeout` seconds.
            ClosedError: closed and drained.
        """
        while not self._queue:
            if self._closed:
                raise ClosedError(f"{what} is closed")
            self._waited += 1
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                async with asyncio.timeout(timeout):
                    await self._waiter
            finally:
                self._waiter = None
        return self._queue.popleft()


class _Sized(Protocol):
    @property
    def data(self) -> bytes: ...


S = TypeVar("S", bound=_Sized)


def take_bounded(queue: deque[S], limit: int, max_bytes: int | None) -> list[S]:
    """Up to `limit` of `queue`'s oldest; with `max_bytes`, no more once their payloads
    reach that many bytes (a writer batching large messages holds one write's worth)."""
    if max_bytes is None:
        return [queue.popleft() for _ in range(min(limit, len(queue)))]
    taken: list[S] = []
    size = 0
    while queue and len(taken) < limit and size < max_bytes:
        taken.append(queue.popleft())
        size += len(taken[-1].data)
    return taken
