"""Pub/sub over ZeroMQ: one publisher bound per node, one subscriber connected to the peers'
publishers it needs (the node decides which).

The publisher is an XPUB so it can see subscriptions arrive. A subscriber
follows its real prefixes with a *readiness marker*, a subscription to
``0xFF + marker`` (topic keys are UTF-8 and never start with 0xFF). libzmq
replays a socket's subscriptions to a new connection in ascending byte order,
and later changes in the order they are made, so when the publisher sees the
marker, every prefix subscribed before it is already in force on that
connection: a message sent from then on cannot be lost to the slow-joiner
race. That is what ``wait for N subscribers`` waits on.

Delivery is ZeroMQ PUB semantics: a subscriber that falls behind by more than
the high-water mark loses messages rather than slowing everyone; receivers
count the gaps.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Final

import zmq

from ._socket import Context

MARKER_PREFIX: Final[bytes] = b"\xff"
DEFAULT_PUB_HWM: Final[int] = 10_000
DEFAULT_SUB_HWM: Final[int] = 10_000
_DRAIN_FRAMES: Final[int] = 4
"""Data frames a subscriber reads before its consumers get a turn."""


class Publisher:
    """The node's single PUB side, bound once on each interface."""

    def __init__(self, ctx: Context, *, hwm: int = DEFAULT_PUB_HWM,
                 max_message_size: int | None = None) -> None:
        kw = {} if max_message_size is None else {"max_message_size": max_message_size}
        self._sock = ctx.socket(zmq.XPUB, sndhwm=hwm, **kw)
        if ctx.curve is not None:
            # every subscription reaches us, each with its sender's key and connection: a
            # subscriber whose key is revoked is cut off though it never sends again
            self._sock.set_option(zmq.XPUB_VERBOSE, 1)
            self._sock.track_peers()
        self.endpoints: list[str] = []

    def bind(self, host: str, port: int = 0) -> str:
        endpoint = self._sock.bind(host, port)
        self.endpoints.append(endpoint)
        return endpoint

    def send(self, frame: bytes | bytearray) -> None:
        """Fan a message out to matching subscribers; never blocks (PUB drops)."""
        self._sock.send(frame)

    async def markers(self) -> list[tuple[bool, bytes]]:
        """Wait for subscription traffic; return (subscribed?, marker) for readiness markers."""
        out: list[tuple[bool, bytes]] = []
        for frames in await self._sock.recv_many():
            frame = frames[0]
            if len(frame) > 1 and frame[1:2] == MARKER_PREFIX:
                out.append((frame[0] == 1, frame[2:]))
        return out

    def close(self, linger: float = 0.0) -> None:
        """Close; with `linger` > 0 queued messages get that long to reach subscribers."""
        self._sock.close(linger)


class Subscriber:
    """One SUB socket connected to the publishers its node chooses; prefixes are refcounted."""

    def __init__(self, ctx: Context, *, hwm: int = DEFAULT_SUB_HWM,
                 max_message_size: int | None = None) -> None:
        kw = {} if max_message_size is None else {"max_message_size": max_message_size}
        self._sock = ctx.socket(zmq.SUB, rcvhwm=hwm, **kw)
        self._prefixes: Counter[bytes] = Counter()
        self._marker: bytes | None = None
        self._connected: set[str] = set()

    @property
    def closed(self) -> bool:
        return self._sock.closed

    @property
    def connected(self) -> frozenset[str]:
        """The publisher endpoints this socket is connected to."""
        return frozenset(self._connected)

    def connect(self, endpoint: str) -> None:
        if endpoint not in self._connected:
            self._connected.add(endpoint)
            self._sock.connect(endpoint)

    def disconnect(self, endpoint: str) -> None:
        if endpoint in self._connected:
            self._connected.discard(endpoint)
            self._sock.disconnect(endpoint)

    def add_prefix(self, prefix: bytes) -> None:
        self._prefixes[prefix] += 1
        if self._prefixes[prefix] == 1:
            self._sock.set_option(zmq.SUBSCRIBE, prefix)

    def remove_prefix(self, prefix: bytes) -> None:
        if self._prefixes[prefix] <= 0:
            return
        self._prefixes[prefix] -= 1
        if self._prefixes[prefix] == 0:
            del self._prefixes[prefix]
            self._sock.set_option(zmq.UNSUBSCRIBE, prefix)

    def set_marker(self, marker: bytes) -> None:
        """Announce 'every prefix so far is in force' to each publisher (see module doc)."""
        old, self._marker = self._marker, marker
        self._sock.set_option(zmq.SUBSCRIBE, MARKER_PREFIX + marker)
        if old is not None and old != marker:
            self._sock.set_option(zmq.UNSUBSCRIBE, MARKER_PREFIX + old)

    def start(self, on_frames: Callable[[list[list[memoryview]]], None]) -> None:
        """Hand every batch of received messages to `on_frames`, on the running loop.

        A callback on the socket's FD with views of ZeroMQ's buffers (no task, no
        copy of the frame): with 256 KiB batches the copy cost the subscriber as
        much as decoding.

        A few frames at a time: each is a batch of up to hundreds of messages, which
        the subscriptions' consumers should see before the next ones are read (a
        drain of hundreds of batches kept the first message from its consumer for
        tens of milliseconds under a burst).
        """
        self._sock.deliver_views(on_frames, limit=_DRAIN_FRAMES, rounds=1)

    def close(self) -> None:
        self._sock.close()
