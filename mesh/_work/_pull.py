"""The application's side of a work queue: `Pull` handles over one FIFO per queue.

Each queue this node pulls from is one FIFO (`LocalQueue`) shared by all its
`Pull` handles, so consumption is in arrival order. A message counts as
consumed when `ack()`/`nack()` is called on it, when its handle asks for the
next one, or when its handler returns (a handler that raises nacks it); its
`Settle` then takes the acknowledgement (for messages from a pusher, the
credit stream in `_credit`).

A typed handle (``type=T``) hands out `Message[T]`s; a message that is not
a T is nacked (a reliable one is redelivered, and after ``max_attempts``
dead-lettered, where it can be seen; a best-effort one is gone), counted in
`decode_errors`, and the next one is handed out instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Final, Generic, Protocol

from msgspec.structs import force_setattr

from .. import _trace
from .._message import Decoding, Message, T, attach_receipt
from .._support._text import quoted
from ..errors import ClosedError
from . import _window

_log = logging.getLogger("mesh.workqueue")
_CREDIT_RESEND_FOR: Final[float] = 3.0
_OWE_AT: Final[int] = 256
"""A handle settles the best-effort messages it consumes in ranges of up to this many
(fewer when it would wait, changes stream, or something else is settled)."""

Handler = Callable[[Message[T]], Awaitable[object] | object]


class Settle(Protocol):
    """Where a consumed message's acknowledgement goes."""

    def settle(self, msg: Message, ok: bool) -> None: ...

    def settle_many(self, n: int) -> None:
        """`n` more best-effort messages were processed (a range, in order)."""



class LocalQueue:
    """This node's worker side of one queue: one FIFO shared by every `Pull` on it.

    A handle taking a message attaches its own receipt to it, so ``msg.ack()``
    reaches the handle that holds it.
    """

    def __init__(self, name: str, prefetch: int) -> None:
        self.name = name
        self.prefetch = prefetch
        """The most each pusher's window may grow to."""
        self.dry = 0
        """How often a handle found the queue empty and had to wait."""
        self.items: deque[Message] = deque()
        self.settles: deque[Settle] = deque()
        """Where each of `items` is acknowledged (in step with it; no tuple per message)."""
        self.waiters: deque[asyncio.Future[None]] = deque()
        self.handles = 0
        self.pulls: list[Pull[Any]] = []
        self.closed = False

    @property
    def window(self) -> int:
        """The window announced (and granted to a new pusher) before any measurement."""
        return _window.initial(self.prefetch)

    def put(self, entries: Iterable[tuple[Message, Settle]]) -> None:
        for msg, settle in entries:
            self.items.append(msg)
            self.settles.append(settle)
        self.wake()

    def put_many(self, msgs: list[Message], settle: Settle) -> None:
        """Messages that all settle the same way (one batch of one stream)."""
        self.items.extend(msgs)
        self.settles.extend(itertools.repeat(settle, len(msgs)))
        self.wake()

    def clear(self) -> None:
        self.items.clear()
        self.settles.clear()

    def wake(self) -> None:
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                break

    def wake_all(self) -> None:
        """Every waiting handle looks again (it finds its handle or the queue closed)."""
        for waiter in self.waiters:
            if not waiter.done():
                waiter.set_result(None)



class Pull(Generic[T]):
    """Work messages of one queue (`Message[T]` with ``type=T``); async iterator.

    Each message is processed when you call ``msg.ack()`` (or ``msg.nack()``
    to have a reliable one redelivered later), or implicitly when you ask for
    the next one.
    """

    def __init__(self, local: LocalQueue, on_close: Callable[[Pull[Any]], None],
                 decoding: Decoding[T] | None = None) -> None:
        self._local = local
        self._on_close = on_close
        self._decoding = decoding
        self._current: Message[T] | None = None
        """The message in hand; `_current_settle` takes its acknowledgement."""
        self._current_settle: Settle = NO_SETTLE
        self._closed = False
        self._task: asyncio.Task[None] | None = None
        self._also_close: list[Callable[[], Awaitable[None]]] = []
        self.received = 0
        self._owed = 0
        """Best-effort messages consumed and not yet settled with `_owed_to` (a range)."""
        self._owed_to: Settle = NO_SETTLE
        self._receipt_of_mine = self._receipt
        """`_receipt`, bound once (not a bound method made per message)."""

    def on_closed(self, aclose: Callable[[], Awaitable[None]]) -> None:
        """Close something else (a live subscription feeding this) together with it."""
        self._also_close.append(aclose)

    @property
    def queue(self) -> str:
        return self._local.name

    @property
    def decode_errors(self) -> int:
        """Messages nacked and skipped because they did not decode as the pull's type."""
        return self._decoding.errors if self._decoding is not None else 0

    def _receipt(self, msg: Message, ok: bool) -> None:
        """``msg.ack()``/``msg.nack()``: settles `msg` if it is still the one in hand."""
        if self._current is msg:
            self._settle_current(ok)

    def _pay(self) -> None:
        """Settle the range owed (before anything consumed after it)."""
        owed = self._owed
        if owed:
            self._owed = 0
            self._owed_to.settle_many(owed)

    def _settle_current(self, ok: bool = True) -> None:
        """Settle what is owed, then the message in hand."""
        self._pay()
        current = self._current
        if current is not None:
            self._current = None
            self._current_settle.settle(current, ok)

    def _take(self) -> Message[T] | None:
        """Hand out the head of the (non-empty) queue (None: it was not a T, and is nacked)."""
        local = self._local
        msg = local.items.popleft()
        settle = local.settles.popleft()
        if self._decoding is not None:
            typed = self._decoding.one(msg)
            if typed is None:
                settle.settle(msg, False)
                return None
            msg = typed
        attach_receipt(msg, self._receipt_of_mine)
        self._current = msg
        self._current_settle = settle
        self.received += 1
        if local.waiters and local.items:
            local.wake()  # another handle may be waiting too
        if _trace.ON:
            _trace.received((msg,), "pull", destination=local.name)
        return msg

    async def next(self, timeout: float | None = None) -> Message[T]:
        """The next work message (the previous one counts as processed).

        Raises:
            TimeoutError: none arrived within `timeout` seconds.
            ClosedError: this handle or its node was closed.
        """
        self._settle_current()
        local = self._local
        while True:
            while self._closed or not local.items:  # a closed handle hands out nothing
                if self._closed or local.closed:
                    raise ClosedError(f"pull on {quoted(local.name)} is closed")
                local.dry += 1
                waiter = asyncio.get_running_loop().create_future()
                local.waiters.append(waiter)
                try:
                    async with asyncio.timeout(timeout):
                        await waiter
                finally:
                    if not waiter.done():
                        waiter.cancel()
            msg = self._take()
            if msg is not None:
                return msg

    def __aiter__(self) -> Pull[T]:
        return self

    async def __anext__(self) -> Message[T]:
        local = self._local
        items = local.items
        if items and not self._closed:  # the common case under load: no inner coroutine
            current = self._current
            if current is not None:  # processed: owed as part of a range where it can be
                self._current = None
                settle = self._current_settle
                if settle is self._owed_to and not current.reliable and self._owed < _OWE_AT:
                    self._owed += 1
                else:
                    self._pay()
                    self._owed_to = settle
                    settle.settle(current, True)  # (it never empties the queue)
            if self._decoding is None and not _trace.ON:  # _take(), inlined (no call per message)
                msg = items.popleft()
                self._current_settle = local.settles.popleft()
                force_setattr(msg, "_receipt", self._receipt_of_mine)
                self._current = msg
                self.received += 1
                if local.waiters and items:
                    local.wake()  # another handle may be waiting too
                return msg
            taken = self._take()
            if taken is not None:
                return taken
        try:
            return await self.next()
        except ClosedError:
            raise StopAsyncIteration from None

    async def aclose(self) -> None:
        """Stop pulling; the message in hand counts as processed, the rest go to other workers."""
        if self._closed:
            return
        self._closed = True
        self._settle_current()
        self._local.wake_all()  # a task waiting in `next` on this handle ends now (ClosedError)
        for aclose in self._also_close:
            await aclose()
        if self._task is not None and self._task is not asyncio.current_task():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._on_close(self)

    async def take(self, timeout: float | None = None
                   ) -> tuple[Message[T], Callable[[bool], None]]:
        """The next message and its settle function (``settle(True)`` = processed).

        For consumers that work on several messages at once: asking for the
        next one does not settle this one; only calling `settle` does.

        Raises:
            TimeoutError: none arrived within `timeout` seconds.
            ClosedError: this handle or its node was closed.
        """
        msg = await self.next(timeout)
        settle = self._current_settle
        self._current, self._current_settle = None, NO_SETTLE
        return msg, lambda ok: settle.settle(msg, ok)

    @property
    def pending(self) -> int:
        """Messages waiting in this node's queue (shared with other handles on it)."""
        return len(self._local.items)

    async def __aenter__(self) -> Pull[T]:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _run(self, handler: Handler[T]) -> None:
        """The handler form: one message at a time; return = ack, raise = nack."""
        async for msg in self:
            try:
                result = handler(msg)
                if inspect.isawaitable(result):
                    await result
            except Exception:
                _log.exception("handler for queue %s failed", self.queue)
                self._settle_current(ok=False)
            else:
                self._settle_current(ok=True)



class _NoSettle:
    """Settles nothing: a message no one waits to hear about (best effort)."""

    def settle(self, msg: Message, ok: bool) -> None:
        pass

    def settle_many(self, n: int) -> None:
        pass


NO_SETTLE: Final = _NoSettle()
