"""Scatter-gather: one request to every live server of a service, their replies as they come.

`Requests.scatter` sends the request (to this node's own server without the
network) and hands each server's future to `Replies`, which yields the
replies in the order they arrive. It ends when every server asked has
answered or gone, when `max_replies` came, or at the deadline — whichever is
first; servers that answer later are not waited for (their replies are
counted as late). A server whose handler raised yields a reply with
``error`` set; a server that declines (no longer serving, busy) or goes
away yields nothing.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Self

from .. import _wire
from .._message import Message
from ..errors import ClosedError


@dataclass(frozen=True, slots=True)
class Asked:
    """One server asked: its reply's future (failed with TimeoutError at the deadline)."""

    fut: asyncio.Future[_wire.Reply]
    name: str
    id: str
    settle: Callable[[], None]
    """Forget the request (the reply arrived, or is no longer awaited)."""


def _ended(asked: Asked, fut: asyncio.Future[_wire.Reply]) -> None:
    """A server's reply came, or its deadline: forget the request now, iterated or not. A
    consumer that breaks out of ``async for`` never calls ``aclose()``: its requests stayed
    pending for good, counted as their servers' outstanding load (so `request` shunned
    them)."""
    asked.settle()
    if not fut.cancelled():
        fut.exception()  # (retrieved: an abandoned gather's timeout is no "never retrieved")


Start = Callable[[], Awaitable[list[Asked]]]
Convert = Callable[[_wire.Reply, Asked], Message | None]


class Replies:
    """Every live server's reply to one request: ``async for reply in replies``.

    The request goes out when iteration starts. Stop early with ``aclose()``
    (or ``async with``): replies still due are then ignored. Raises ClosedError
    when the node closes meanwhile.
    """

    def __init__(self, service: str, start: Start, convert: Convert,
                 max_replies: int | None) -> None:
        self._service = service
        self._start: Start | None = start
        self._convert = convert
        self._max = max_replies
        self._asked: dict[asyncio.Future[_wire.Reply], Asked] = {}
        self._ready: list[asyncio.Future[_wire.Reply]] = []
        self._closed = False
        self._on_close: Callable[[], object] | None = None
        self.received = 0
        """Replies yielded so far (error replies included)."""

    @property
    def service(self) -> str:
        return self._service

    def __repr__(self) -> str:
        return f"<Replies {self._service!r} received={self.received}>"

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Message:
        if self._start is not None:
            start, self._start = self._start, None
            if not self._closed:
                self._asked = {asked.fut: asked for asked in await start()}
                for each, one in self._asked.items():
                    each.add_done_callback(functools.partial(_ended, one))
        while self._asked and not self._closed and (self._max is None
                                                    or self.received < self._max):
            if not self._ready:
                done, _ = await asyncio.wait(self._asked, return_when=asyncio.FIRST_COMPLETED)
                self._ready.extend(done)
            fut = self._ready.pop()
            asked = self._asked.pop(fut, None)
            if asked is None:
                continue
            asked.settle()
            if fut.cancelled():
                continue
            exc = fut.exception()
            if isinstance(exc, ClosedError):  # the node closed: no more replies will come
                await self.aclose()
                raise exc
            if exc is not None:  # timed out, or the server went away
                continue
            msg = self._convert(fut.result(), asked)
            if msg is not None:
                self.received += 1
                return msg
        await self.aclose()
        raise StopAsyncIteration

    def on_closed(self, callback: Callable[[], object]) -> None:
        """Call `callback` once when the gathering ends (a traced request's span ends then)."""
        self._on_close = callback

    async def aclose(self) -> None:
        """Stop gathering: replies still due are dropped when they come."""
        self._closed = True
        self._settle_all()
        callback, self._on_close = self._on_close, None
        if callback is not None:
            callback()

    def _settle_all(self) -> None:
        for fut, asked in self._asked.items():
            asked.settle()
            if fut.done() and not fut.cancelled():
                fut.exception()  # a timeout nobody waits for is no "never retrieved" warning
        self._asked.clear()
        self._ready.clear()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
