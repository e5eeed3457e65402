"""The control channel: each node binds one ROUTER (`ControlRouter`) and keeps a DEALER
(`ControlDealer`) per peer.

Control traffic (hello, heartbeats, goodbye) is small and idempotent, so
outboxes never block: when a peer is unreachable its queue fills to a small
high-water mark and further messages are dropped; the next heartbeat says the
same thing anyway.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Final

import zmq

from ._socket import Context, Socket
from .errors import WouldBlock

_OUTBOX_HWM: Final[int] = 64
_INBOX_HWM: Final[int] = 10_000
_REFUSED: Final[int] = zmq.EVENT_HANDSHAKE_FAILED_AUTH
_FAILED: Final[int] = (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
                       | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL)


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
    """A DEALER connected to one peer's `ControlRouter` (our control link to it).

    With `on_handshake_failed` (create it on the loop then), each failed handshake calls
    it: True if the peer refused our CURVE key, False if the handshake itself failed
    (a wrong server key, one side without CURVE, or no ZeroMQ peer there). Nothing else
    tells: the link just stays silent.
    """

    def __init__(self, ctx: Context, endpoint: str,
                 on_handshake_failed: Callable[[bool], None] | None = None) -> None:
        self.endpoint = endpoint
        self._sock = ctx.socket(zmq.DEALER, sndhwm=_OUTBOX_HWM)
        self._monitor: Socket | None = None
        if on_handshake_failed is not None:
            self._monitor = self._sock.monitor(_REFUSED | _FAILED)
            self._monitor.deliver(lambda batch: _tell_failures(batch, on_handshake_failed))
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
        if self._monitor is not None:
            self._sock.stop_monitor()
            self._monitor.close()
        self._sock.close(linger)


def _tell_failures(batch: list[list[bytes]], tell: Callable[[bool], None]) -> None:
    """Monitor messages (the event id is the first 2 bytes of a 6-byte frame) -> `tell`."""
    for frames in batch:
        if len(frames[0]) == 6:
            event = int.from_bytes(frames[0][:2], sys.byteorder)
            if event & (_REFUSED | _FAILED):
                tell(event == _REFUSED)
