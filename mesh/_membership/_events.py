"""A stream of peer events for one listener: an async iterator with `aclose()`."""

from __future__ import annotations

from collections.abc import Callable

from .._support._mailbox import Mailbox
from ..errors import ClosedError
from ._peers import PeerEvent


class PeerEvents(Mailbox[PeerEvent]):
    """Peer events in order, from the moment the stream was opened."""

    def __init__(self, on_close: Callable[[PeerEvents], None]) -> None:
        super().__init__()
        self._on_close = on_close

    def _deliver(self, event: PeerEvent) -> None:
        self._queue.append(event)
        self._wake()

    async def next(self, timeout: float | None = None) -> PeerEvent:
        """The next event.

        Raises:
            TimeoutError: nothing happened within `timeout` seconds.
            ClosedError: the stream or its node was closed.
        """
        return await self._take(timeout, "peer event stream")

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
