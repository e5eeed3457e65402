"""The blocking twins of the node's streams: subscriptions, pulls, replies and peer events.

Each has the public members of its async original (`Subscription`, `Pull`,
`Replies`, `PeerEvents`), with ``close``/``__iter__``/``__next__``/``__enter__`` for
``aclose``/``__aiter__``/``__anext__``/``__aenter__``. Items cross from the
loop thread to the reader's thread through `_Handoff`, the thread-side twin of
`Mailbox`. A subscription drops its oldest messages past `max_pending`,
exactly like the async one, so switching APIs never changes what is lost.
Acknowledgements (``msg.ack()``, ``take``'s settle) may be called from any
thread: they hop onto the loop, which owns every socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, Generic, Protocol, Self, TypeVar

from ._membership import _events
from ._membership._events import PeerEvents
from ._membership._peers import PeerEvent
from ._message import Message
from ._message import T as V
from ._node import AsyncNode
from ._pubsub._subscription import Subscription
from ._services._gather import Replies
from ._support._mailbox import take_bounded
from ._work._pull import Pull
from .errors import ClosedError

if TYPE_CHECKING:
    from patterns import TopicPattern

T = TypeVar("T")
_log = logging.getLogger("mesh.node")


class Node(Protocol):
    """What a blocking stream needs from the blocking `Node` that opened it (said as a
    protocol, so this module does not import `_sync`, which imports it)."""

    _node: AsyncNode
    _loop: asyncio.AbstractEventLoop | None

    @property
    def running(self) -> bool: ...

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T: ...

    def _read(self, value: Callable[[], T]) -> T: ...

    def _threadsafe(self, msg: Message[V]) -> Message[V]: ...

    def _forget(self, stream: SyncSubscription | SyncPeerEvents) -> None: ...


class _Handoff(Generic[T]):
    """A queue the loop thread fills and one blocking reader empties, with an end.

    What is queued stays readable after close, as with `Mailbox`.
    """

    def __init__(self) -> None:
        self._queue: deque[T] = deque()
        self._lock = threading.Lock()
        """Held to add (the loop thread) or to wait; a reader pops without it when there is
        something to pop (deque's append and popleft are atomic)."""
        self._ready = threading.Condition(self._lock)
        self._readers = 0
        self._closed = False

    def _put(self, item: T) -> None:
        with self._lock:
            if not self._closed:
                self._queue.append(item)
                if self._readers:  # (notify costs more than the append)
                    self._ready.notify()

    def _close(self) -> None:
        with self._ready:
            self._closed = True
            self._ready.notify_all()

    def _take(self, timeout: float | None, what: str) -> T:
        """The next item.

        Raises:
            TimeoutError: nothing within `timeout` seconds.
            ClosedError: closed and drained.
        """
        deadline = None
        while True:
            try:
                return self._queue.popleft()  # the common case under load: no lock, no wait
            except IndexError:
                pass
            if deadline is None and timeout is not None:
                deadline = time.monotonic() + timeout
            with self._ready:
                if self._queue:
                    continue  # added meanwhile
                if self._closed:
                    raise ClosedError(f"{what} is closed")
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError(f"nothing on the {what} within {timeout} s")
                self._readers += 1
                try:
                    self._ready.wait(left)
                finally:
                    self._readers -= 1


class SyncSubscription(_Handoff[Message[V]]):
    """The blocking twin of `Subscription`: iterate, or call `next(timeout)`.

    A reader more than `max_pending` messages behind loses the oldest ones,
    counted in `dropped` and reported once (0 = no bound). With a callback,
    a thread of its own calls it for each message in order, so it may block.
    """

    def __init__(self, node: Node, max_pending: int,
                 callback: Callable[[Message[V]], None] | None = None) -> None:
        super().__init__()
        self._node = node
        self._sub: Subscription[V] | None = None
        """The async subscription feeding this one (set by `Node.subscribe`)."""
        self.max_pending = max_pending
        self.dropped = 0
        """Messages lost because the reader fell more than `max_pending` behind."""
        self.received = 0
        """Messages that arrived, the dropped ones included."""
        self._reported_slow = False
        self._dispatcher: threading.Thread | None = None
        if callback is not None:
            self._dispatcher = threading.Thread(target=self._dispatch, args=(callback,),
                                                name="zeromesh-callback", daemon=True)

    def _start(self, sub: Subscription[V]) -> None:
        self._sub = sub
        if self._dispatcher is not None:
            self._dispatcher.start()

    def _put(self, item: Message[V]) -> None:
        """On the loop thread: queue it, dropping the oldest past `max_pending`."""
        queue, lock = self._queue, self._lock
        lock.acquire()  # (not `with`: about half the cost on 3.11, once per message)
        try:
            if self._closed:
                return
            queue.append(item)
            self.received += 1
            overflow = 0 < self.max_pending < len(queue)
            if overflow:
                with contextlib.suppress(IndexError):  # (readers emptied it meanwhile)
                    queue.popleft()
                    self.dropped += 1
            if self._readers:
                self._ready.notify()
        finally:
            lock.release()
        if overflow and not self._reported_slow:
            self._reported_slow = True
            _log.warning("slow consumer on %s: dropping oldest messages (max_pending=%d)",
                         self.subject, self.max_pending)

    def _join(self, timeout: float) -> None:
        """Wait (bounded) for the callback thread to finish what was queued before close."""
        thread = self._dispatcher
        if thread is not None and thread.is_alive() and thread is not threading.current_thread():
            thread.join(timeout)

    def _dispatch(self, callback: Callable[[Message[V]], None]) -> None:
        for msg in self:
            try:
                callback(msg)
            except Exception:
                _log.exception("subscription callback for %s failed", self.subject)

    @property
    def pattern(self) -> TopicPattern:
        assert self._sub is not None  # set before Node.subscribe returns
        return self._sub.pattern

    @property
    def subject(self) -> str:
        """The pattern this subscription matches, as given."""
        return self._sub.subject if self._sub is not None else ""

    @property
    def pending(self) -> int:
        return len(self._queue)

    @property
    def decode_errors(self) -> int:
        """Messages skipped because they did not decode as the subscription's type."""
        return self._sub.decode_errors if self._sub is not None else 0

    @property
    def closed(self) -> bool:
        return self._closed

    def next(self, timeout: float | None = None) -> Message[V]:
        """The next message.

        Raises:
            TimeoutError: none arrived within `timeout` seconds.
            ClosedError: the subscription (or its node) was closed.
        """
        try:
            return self._queue.popleft()  # (`_take`'s first step, inlined: the hot path)
        except IndexError:
            pass  # (waiting outside the handler: its errors do not chain an IndexError)
        return self._take(timeout, "subscription")

    def drain(self, limit: int, max_bytes: int | None = None) -> list[Message[V]]:
        """Up to `limit` queued messages, without waiting (for writers that batch); with
        `max_bytes`, no more once their payloads reach that many bytes."""
        with self._lock:
            return take_bounded(self._queue, limit, max_bytes)

    def __iter__(self) -> Self:
        return self

    def __next__(self) -> Message[V]:
        try:
            return self._queue.popleft()
        except IndexError:
            pass
        try:
            return self._take(None, "subscription")
        except ClosedError:
            raise StopIteration from None

    def close(self) -> None:
        """Stop receiving; queued messages remain readable until drained."""
        sub = self._sub
        if sub is not None and not sub.closed and self._node.running:
            self._node._call(sub.aclose())
        self._node._forget(self)
        self._close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SyncPull(Generic[V]):
    """The blocking twin of `Pull`: work messages of one queue, by `next()` or iteration.

    Each message is processed when you call ``msg.ack()`` (or ``msg.nack()``),
    or implicitly when you ask for the next one.
    """

    def __init__(self, node: Node, pull: Pull[V]) -> None:
        self._node = node
        self._pull = pull

    @property
    def queue(self) -> str:
        return self._pull.queue

    @property
    def decode_errors(self) -> int:
        """Messages nacked and skipped because they did not decode as the pull's type."""
        return self._pull.decode_errors

    @property
    def pending(self) -> int:
        """Messages waiting in this node's queue (shared with other handles on it)."""
        return self._node._read(lambda: self._pull.pending)

    @property
    def received(self) -> int:
        return self._pull.received

    def next(self, timeout: float | None = None) -> Message[V]:
        """The next work message (the previous one counts as processed).

        Raises:
            TimeoutError: none arrived within `timeout` seconds.
            ClosedError: the pull or its node was closed.
        """
        return self._node._threadsafe(self._node._call(self._pull.next(timeout)))

    def take(self, timeout: float | None = None) -> tuple[Message[V], Callable[[bool], None]]:
        """The next message and its settle function (``settle(True)`` = processed); asking
        for the next one does not settle this one. Either may be called from any thread.

        Raises:
            TimeoutError: none arrived within `timeout` seconds.
            ClosedError: the pull or its node was closed.
        """
        msg, settle = self._node._call(self._pull.take(timeout))
        loop = self._node._loop

        def settle_on_loop(ok: bool) -> None:
            if loop is not None:
                with contextlib.suppress(RuntimeError):  # the node closed meanwhile
                    loop.call_soon_threadsafe(settle, ok)

        return self._node._threadsafe(msg), settle_on_loop

    def __iter__(self) -> Self:
        return self

    def __next__(self) -> Message[V]:
        try:
            return self.next()
        except ClosedError:
            raise StopIteration from None

    def close(self) -> None:
        """Stop pulling; the message in hand counts as processed, the rest go to other workers."""
        if self._node.running:
            self._node._call(self._pull.aclose())

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SyncReplies:
    """The blocking twin of `Replies`: every live server's reply to one request, by
    iteration (the request goes out when it starts)."""

    def __init__(self, node: Node, replies: Replies) -> None:
        self._node = node
        self._replies = replies

    @property
    def service(self) -> str:
        return self._replies.service

    @property
    def received(self) -> int:
        return self._replies.received

    def __iter__(self) -> Self:
        return self

    def __next__(self) -> Message:
        try:
            return self._node._call(self._replies.__anext__())
        except StopAsyncIteration:
            raise StopIteration from None

    def close(self) -> None:
        """Stop gathering: replies still due are dropped when they come."""
        if self._node.running:
            self._node._call(self._replies.aclose())

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SyncPeerEvents(_Handoff[PeerEvent]):
    """The blocking twin of `PeerEvents`: peer events in order, from the moment it opened."""

    def __init__(self, node: Node) -> None:
        super().__init__()
        self._node = node
        self._stream: PeerEvents | None = None
        self._dropped = 0

    @property
    def dropped(self) -> int:
        """Events let go, the oldest first, because the reader was `MAX_PENDING` behind."""
        return self._dropped

    async def _pump(self, stream: PeerEvents) -> None:
        """On the loop: forward the async stream until it ends (holding the newest
        `MAX_PENDING` for a reader that does not take them, as the async stream does)."""
        try:
            async for event in stream:
                self._put(event)
                if len(self._queue) > _events.MAX_PENDING:
                    with contextlib.suppress(IndexError):  # (the reader took it meanwhile)
                        self._queue.popleft()
                        self._dropped += 1
        finally:
            self._close()

    def _open(self, loop: asyncio.AbstractEventLoop) -> asyncio.Task[None]:
        """On the loop: subscribe now (so no event is missed) and start forwarding."""
        stream = self._stream = self._node._node.events()
        return loop.create_task(self._pump(stream), name="zeromesh-sync-events")

    def next(self, timeout: float | None = None) -> PeerEvent:
        """The next event.

        Raises:
            TimeoutError: nothing happened within `timeout` seconds.
            ClosedError: the stream or its node was closed.
        """
        return self._take(timeout, "peer event stream")

    def __iter__(self) -> Self:
        return self

    def __next__(self) -> PeerEvent:
        try:
            return self.next()
        except ClosedError:
            raise StopIteration from None

    def close(self) -> None:
        stream = self._stream
        if stream is not None and self._node.running:
            self._node._call(stream.aclose())
        self._node._forget(self)
        self._close()
