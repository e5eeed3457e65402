"""The one module that touches pyzmq: typed wrappers over asyncio sockets.

Everything else in zeromesh sees `bytes` frames and our own errors. Sends are
non-blocking on a sync shadow of the asyncio socket (no future per message);
receives wait once for readability and then drain what is queued, so a burst
costs one await, not one per message.
"""

from __future__ import annotations

import contextlib
from typing import Final

import zmq
import zmq.asyncio

from .errors import SocketClosed, WouldBlock

DEFAULT_MAX_MESSAGE_SIZE: Final[int] = 16 * 1024 * 1024
_HEARTBEAT_IVL_MS: Final[int] = 1000
_HEARTBEAT_TIMEOUT_MS: Final[int] = 3000
_RECONNECT_IVL_MS: Final[int] = 100
_RECONNECT_IVL_MAX_MS: Final[int] = 1000


class Context:
    """Owns the ZeroMQ context of one node; close it last."""

    def __init__(self) -> None:
        self._ctx = zmq.asyncio.Context()
        self._sockets: set[Socket] = set()

    def socket(self, kind: int, *, max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
               sndhwm: int | None = None, rcvhwm: int | None = None) -> Socket:
        raw = self._ctx.socket(kind)
        raw.setsockopt(zmq.LINGER, 0)
        raw.setsockopt(zmq.MAXMSGSIZE, max_message_size)
        raw.setsockopt(zmq.HEARTBEAT_IVL, _HEARTBEAT_IVL_MS)
        raw.setsockopt(zmq.HEARTBEAT_TIMEOUT, _HEARTBEAT_TIMEOUT_MS)
        raw.setsockopt(zmq.RECONNECT_IVL, _RECONNECT_IVL_MS)
        raw.setsockopt(zmq.RECONNECT_IVL_MAX, _RECONNECT_IVL_MAX_MS)
        if sndhwm is not None:
            raw.setsockopt(zmq.SNDHWM, sndhwm)
        if rcvhwm is not None:
            raw.setsockopt(zmq.RCVHWM, rcvhwm)
        sock = Socket(raw, self._sockets)
        self._sockets.add(sock)
        return sock

    def close(self) -> None:
        """Close what is still open and end the context.

        Blocks while lingering sockets flush (bounded by their linger): call it
        off the event loop.
        """
        for sock in list(self._sockets):
            sock.close()
        self._ctx.term()


class Socket:
    """A zmq socket seen as frames of bytes, with non-blocking sends."""

    def __init__(self, raw: zmq.asyncio.Socket, registry: set[Socket]) -> None:
        self._async = raw
        self._registry = registry
        self._sync: zmq.Socket[bytes] = zmq.Socket.shadow(raw.underlying)
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    def set_option(self, option: int, value: int | bytes) -> None:
        self._sync.setsockopt(option, value)

    def bind(self, host: str, port: int = 0) -> str:
        """Bind `tcp://host:port` (0 = OS-assigned) and return the real endpoint."""
        self._sync.bind(f"tcp://{host}:{port}")
        endpoint = self._sync.getsockopt(zmq.LAST_ENDPOINT)
        assert isinstance(endpoint, bytes)  # getsockopt of a string option
        return endpoint.decode()

    def connect(self, endpoint: str) -> None:
        self._sync.connect(endpoint)

    def disconnect(self, endpoint: str) -> None:
        with contextlib.suppress(zmq.ZMQError):  # not connected: nothing to undo
            self._sync.disconnect(endpoint)

    def send(self, frame: bytes | bytearray) -> None:
        """Queue a single-frame message without blocking.

        Raises:
            WouldBlock: the peer's queue is at its high-water mark.
            SocketClosed: the socket was closed.
        """
        try:
            self._sync.send(frame, zmq.NOBLOCK, copy=True)
        except zmq.Again as exc:
            raise WouldBlock() from exc
        except zmq.ZMQError as exc:
            raise SocketClosed(str(exc)) from exc

    async def recv_many(self, limit: int = 256) -> list[list[bytes]]:
        """Wait until a message is readable, then return up to `limit` queued ones."""
        try:
            await self._async.poll(None, zmq.POLLIN)  # type: ignore[call-arg]
        except zmq.ZMQError as exc:
            raise SocketClosed(str(exc)) from exc
        out: list[list[bytes]] = []
        recv = self._sync.recv_multipart
        try:
            while len(out) < limit:
                out.append(recv(zmq.NOBLOCK))
        except zmq.Again:
            pass  # drained
        except zmq.ZMQError as exc:
            if not out:
                raise SocketClosed(str(exc)) from exc
        return out

    def close(self, linger: float = 0.0) -> None:
        if not self._closed:
            self._closed = True
            self._registry.discard(self)
            self._async.close(linger=int(linger * 1000))
