"""Push/pull over ZeroMQ: one PULL socket bound per worker node, one PUSH socket per worker.

A pusher keeps a separate PUSH socket (one pipe) per worker instead of one
socket connected to all of them: libzmq's own round robin cannot see how busy
a worker is, so the mesh decides which worker gets each message (by credit)
and sends it down that worker's pipe. The send queue is unbounded because the
mesh's credit window, not the high-water mark, bounds what is in flight.
"""

from __future__ import annotations

from collections.abc import Callable

import zmq

from ._socket import Context


class Puller:
    """The worker node's PULL socket; every pusher's pipe ends here. Close it on the loop."""

    def __init__(self, ctx: Context, *, max_message_size: int) -> None:
        self._sock = ctx.socket(zmq.PULL, rcvhwm=0, max_message_size=max_message_size)
        self.endpoints: list[str] = []

    def bind(self, host: str, port: int = 0) -> str:
        endpoint = self._sock.bind(host, port)
        self.endpoints.append(endpoint)
        return endpoint

    def start(self, on_frames: Callable[[list[list[memoryview]]], None]) -> None:
        """Hand every batch of received messages to `on_frames`, on the running loop.

        A callback on the socket's FD (`Socket.watch`), not a task awaiting
        pyzmq's asyncio poll: that path cost the worker about a fifth of its CPU.
        """
        self._sock.deliver_views(on_frames)

    def stop(self) -> None:
        """Receive nothing more (what is queued stays with the pusher's credit accounting)."""
        self._sock.unwatch()

    def close(self) -> None:
        self._sock.close()


class Pusher:
    """A PUSH socket connected to exactly one worker."""

    def __init__(self, ctx: Context, endpoint: str) -> None:
        self.endpoint = endpoint
        self._sock = ctx.socket(zmq.PUSH, sndhwm=0)
        self._sock.connect(endpoint)

    def send(self, frame: bytes | bytearray) -> None:
        self._sock.send(frame)

    def close(self, linger: float = 0.0) -> None:
        self._sock.close(linger)
