"""Peer events for applications: one stream per listener, an async iterator with `aclose()`.

`EventStreams` is where membership's events go (an `EventSink`): each is
logged once and handed to every open stream.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Final

from .._support._mailbox import Mailbox
from ..errors import ClosedError
from ._peers import PeerEvent

_log = logging.getLogger("mesh.node")
MAX_PENDING: Final[int] = 10_000
"""Events a stream holds for a reader that does not take them (an SSE client that stopped
reading, a stream opened and forgotten); past it the oldest go, counted in `dropped`."""


class PeerEvents(Mailbox[PeerEvent]):
    """Peer events in order, from the moment the stream was opened (the newest
    `MAX_PENDING` of them for a reader that falls that far behind)."""

    def __init__(self, on_close: Callable[[PeerEvents], None]) -> None:
        super().__init__()
        self._on_close = on_close
        self._max_pending = MAX_PENDING
        self.dropped = 0
        """Events let go, the oldest first, because the reader was `MAX_PENDING` behind."""

    def _deliver(self, event: PeerEvent) -> None:
        queue = self._queue
        queue.append(event)
        if len(queue) > self._max_pending:
            queue.popleft()
            self.dropped += 1
            if self.dropped == 1:
                _log.warning("a peer event stream is %d events behind its reader: the "
                             "oldest are dropped (counted in its `dropped`)",
                             self._max_pending)
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


class EventStreams:
    """Every open `PeerEvents` stream of one node."""

    def __init__(self) -> None:
        self._streams: set[PeerEvents] = set()

    def open(self) -> PeerEvents:
        stream = PeerEvents(self._streams.discard)
        self._streams.add(stream)
        return stream

    def peer_event(self, event: PeerEvent) -> None:
        _log.info("peer %s (%s) %s", event.peer.name, event.peer.id[:8], event.kind.value)
        for stream in self._streams:
            stream._deliver(event)

    def close(self) -> None:
        """The node closed: every stream ends."""
        for stream in self._streams:
            stream._close()
