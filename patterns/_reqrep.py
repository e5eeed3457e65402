"""Router/dealer for services: one ROUTER bound per node, one DEALER per server a node calls.

Requests go DEALER -> ROUTER as single frames; the ROUTER prepends the
requester's routing id, and a reply goes back as ``[routing id, frame]``,
from which the ROUTER strips the id, so the DEALER again reads one frame.

Both sides are driven by a callback on the socket's file descriptor (see
`Socket.watch`): incoming frames are handed to the owner as soon as the loop
sees them, with no reader task in between. That keeps a request/reply round
trip within a small factor of raw pyzmq.

A `ServiceDealer` also watches its own connection (a ZeroMQ socket monitor):
when the TCP connection to the server drops — the server process died, or
ZMTP heartbeats timed out — `connection_events()` says so at once. Requests in
flight on that connection can never be answered (a reconnect gets a new
routing id), so the caller fails them over without waiting for their timeout.

The high-water mark (``hwm``) bounds the request direction only (DEALER send,
ROUTER receive), where a full queue makes the requester wait. Replies are
unbounded: a ROUTER drops what it cannot queue, which would turn a burst of
replies into timeouts and retries, and they are bounded anyway by the requests
the server accepted.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

import zmq

from ._socket import Context
from .errors import WouldBlock

DEFAULT_SERVICE_HWM: Final[int] = 10_000

Frames = Callable[[list[list[bytes]]], None]
"""Receives a batch of messages, each a list of frames."""


class ServiceRouter:
    """A node's ROUTER: receives requests from every requester, routes replies back.

    `on_requests` gets batches of ``[routing id, frame]`` messages. Create and
    close it on the event loop.
    """

    def __init__(self, ctx: Context, on_requests: Frames, *, hwm: int = DEFAULT_SERVICE_HWM,
                 max_message_size: int | None = None) -> None:
        kw = {} if max_message_size is None else {"max_message_size": max_message_size}
        self._sock = ctx.socket(zmq.ROUTER, sndhwm=0, rcvhwm=hwm, **kw)
        self._on_requests = on_requests  # handed over from `start`, not before
        self.endpoints: list[str] = []

    def bind(self, host: str, port: int = 0) -> str:
        endpoint = self._sock.bind(host, port)
        self.endpoints.append(endpoint)
        return endpoint

    def start(self) -> None:
        """Begin delivering requests (on the running loop)."""
        self._sock.deliver(self._on_requests)

    def reply(self, identity: bytes, frame: bytes | bytearray) -> None:
        """Queue a reply; dropped if the requester is gone (it retries or times out)."""
        self._sock.send_routed(identity, frame)

    def close(self) -> None:
        self._sock.close()


class ServiceDealer:
    """A DEALER connected to one server's ROUTER, with a monitor of its connection.

    `on_replies` gets batches of single-frame messages. Create and close it on
    the event loop.
    """

    def __init__(self, ctx: Context, endpoint: str, on_replies: Frames, *,
                 hwm: int = DEFAULT_SERVICE_HWM, max_message_size: int | None = None) -> None:
        kw = {} if max_message_size is None else {"max_message_size": max_message_size}
        self.endpoint = endpoint
        self._sock = ctx.socket(zmq.DEALER, sndhwm=hwm, rcvhwm=0, **kw)
        self._monitor = self._sock.monitor(zmq.EVENT_HANDSHAKE_SUCCEEDED
                                           | zmq.EVENT_DISCONNECTED)
        self._sock.connect(endpoint)
        self._sock.deliver(on_replies)

    def try_send(self, frame: bytes | bytearray) -> bool:
        """Queue one request frame; False when the server's queue is full."""
        try:
            self._sock.send(frame)
        except WouldBlock:
            return False
        return True

    async def send(self, frame: bytes | bytearray) -> None:
        """Send one request frame, waiting while the server's queue is full (never drops)."""
        while not self.try_send(frame):
            await self._sock.wait_writable()

    async def connection_events(self) -> list[bool]:
        """Wait for connection changes: True = connected (handshake done), False = dropped."""
        return [event == zmq.EVENT_HANDSHAKE_SUCCEEDED
                for event in await self._monitor.monitor_events()]

    def close(self) -> None:
        self._sock.stop_monitor()
        self._monitor.close()
        self._sock.close()
