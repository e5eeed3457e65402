"""The shape every discovery backend has, so the mesh can use any of them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from ._events import DiscoveryEvent, PeerInfo

EventSink = Callable[[DiscoveryEvent], None]
"""Called on the event loop for each event; must not block."""


class DiscoveryBackend(Protocol):
    """Announces this node and reports others through an `EventSink`."""

    async def start(self, me: PeerInfo, sink: EventSink) -> None:
        """Begin announcing `me` and reporting peers; returns once announced."""
        ...

    async def aclose(self) -> None:
        """Withdraw the announcement (goodbye) and stop reporting."""
        ...
