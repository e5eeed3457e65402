"""The control channel: each node binds one ROUTER (`ControlRouter`) and keeps a DEALER
(`ControlDealer`) per peer.

Control traffic (hello, heartbeats, goodbye) is small and idempotent, so
outboxes never block: when a peer is unreachable its queue fills to a small
high-water mark and further messages are dropped; the next heartbeat says the
same thing anyway.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

import zmq

from ._socket import Context, Socket
from .errors import WouldBlock

_OUTBOX_HWM: Final[int] = 64
_INBOX_HWM: Final[int] = 10_000


class ControlRouter:
    """The node's ROUTER: receives control messages from every peer's `ControlDealer`."""

    def __init__(self, ctx: Context) -> None:
        self._sock: Socket = ctx.socket(zmq.ROUTER, rcvhwm=_INBOX_HWM,
                                        max_message_size=64 * 1024)
        self.endpoints: list[str] = []

    def bind(self, host: str, port: int = 0) -> str:
        endpoint = self._sock.bind(host, port)
        self.endpoints.append(endpoint)
        return endpoint

    def start(self, on_messages: Callable[[list[list[bytes]]], None]) -> None:
        """Hand every batch of queued messages (without the ROUTER's routing-id frame)
        to `on_messages`, on the running loop, as soon as they arrive.

        A callback on the socket's FD (`Socket.watch`), not a task awaiting pyzmq's
        asyncio poller: an idle node wakes for each batch of heartbeats, and the
        poller's futures and callbacks were most of what such a wake cost.
        """
        self._sock.deliver(lambda batch: on_messages([frames[1:] for frames in batch]))

    def stop(self) -> None:
        """Stop handing over messages (on the loop); the socket stays open."""
        self._sock.unwatch()

    def close(self, linger: float = 0.0) -> None:
        """Close; with `linger` > 0, queued messages (a goodbye) get that long to leave."""
        self._sock.close(linger)


class ControlDealer:
    """A DEALER connected to one peer's `ControlRouter` (our control link to it)."""

    def __init__(self, ctx: Context, endpoint: str) -> None:
        self.endpoint = endpoint
        self._sock = ctx.socket(zmq.DEALER, sndhwm=_OUTBOX_HWM)
        self._sock.connect(endpoint)

    def send(self, frame: bytes | bytearray) -> bool:
        """Queue a message; False if the peer's queue is full (dropped)."""
        try:
            self._sock.send(frame)
        except WouldBlock:
            return False
        return True

    def close(self, linger: float = 0.0) -> None:
        """Close; with `linger` > 0, queued messages (a goodbye) get that long to leave."""
        self._sock.close(linger)
