"""Node: the blocking twin of `AsyncNode`, for programs without an event loop.

The async node runs on a private loop thread that owns every socket; calls
cross over with `run_coroutine_threadsafe` and get typed results and
exceptions back. `publish` does not wait for the loop: messages are handed
over in bulk with one wake-up per batch, and the caller is held back only
when the loop falls far behind.
"""

from __future__ import annotations

import asyncio
import inspect
import queue
import threading
from collections.abc import Callable, Coroutine, Iterator, Mapping
from types import TracebackType
from typing import Any, Final, Self, TypeVar

from . import _loop, _names
from ._config import NodeConfig
from ._membership._peers import Peer, PeerEvent
from ._message import Message
from ._node import AsyncNode
from ._pubsub._subscription import Subscription
from ._services._server import (
    SYNC_SERVE_CONCURRENCY,
    ReplyBody,
    ServiceHandler,
    SyncService,
    is_async_handler,
)
from ._work._pull import Pull
from ._work._queues import DEFAULT_PREFETCH
from .errors import ClosedError, MessageTooLarge

T = TypeVar("T")
_HANDOFF_LIMIT: Final[int] = 50_000
_CLOSED: Final = object()


class Node:
    """A zeromesh node with a blocking API. Use ``with Node(...) as node:``.

    Takes the same arguments as `AsyncNode`.
    """

    def __init__(self, config: NodeConfig | None = None, **settings: Any) -> None:
        self._node = AsyncNode(config, **settings)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Condition()
        self._handoff: list[tuple[str, bytes | str, Mapping[str, str] | None]] = []
        self._wake_pending = False
        self._sync_subs: list[SyncSubscription] = []

    @property
    def id(self) -> str:
        return self._node.id

    @property
    def name(self) -> str:
        return self._node.name

    @property
    def mesh(self) -> str:
        return self._node.mesh

    @property
    def endpoints(self) -> dict[str, list[str]]:
        return self._node.endpoints

    @property
    def stats(self) -> dict[str, int]:
        return self._node.stats

    def start(self) -> None:
        """Start the loop thread and the node.

        Raises:
            ConfigError: a setting cannot be used.
        """
        if self._thread is not None:
            return
        loop = self._loop = _loop.new_event_loop()
        self._thread = threading.Thread(target=loop.run_forever, name="zeromesh-loop",
                                        daemon=True)
        self._thread.start()
        try:
            self._call(self._node.start())
        except BaseException:
            self._stop_loop()
            raise

    def close(self) -> None:
        """Leave the mesh gracefully and stop the loop thread."""
        if self._loop is None:
            return
        try:
            self._call(self._drain_then_close())
        finally:
            self._stop_loop()
            for sub in self._sync_subs:
                sub._inbox.put(_CLOSED)
            self._sync_subs.clear()

    async def _drain_then_close(self) -> None:
        self._drain()
        await self._node.aclose()

    def _stop_loop(self) -> None:
        loop, thread = self._loop, self._thread
        self._loop = self._thread = None
        if loop is None or thread is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=5)
        loop.close()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        if self._loop is None:
            coro.close()
            raise ClosedError("node is not running (use `with Node(...)` or `start()`)")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    # -- API ---------------------------------------------------------------------

    def publish(self, topic: str, data: bytes | str, *,
                headers: Mapping[str, str] | None = None, reliable: bool = False) -> None:
        """See `AsyncNode.publish`. Best effort does not wait for the loop; reliable
        blocks until the message is in the spool.

        Raises:
            ConfigError: `topic` is invalid.
            MessageTooLarge: `data` exceeds ``max_message_size``.
            SpoolFullError: (reliable) the spool is full.
            ClosedError: the node is not running.
        """
        if reliable:
            self._call(self._drained_then(self._node.publish(topic, data, headers=headers,
                                                             reliable=True)))
            return
        loop = self._loop
        if loop is None:
            raise ClosedError("node is not running")
        _names.topic(topic)
        size = len(data.encode()) if isinstance(data, str) else len(data)
        if size > self._node.config.max_message_size:
            raise MessageTooLarge(size, self._node.config.max_message_size)
        with self._lock:
            while len(self._handoff) >= _HANDOFF_LIMIT and self._loop is not None:
                self._lock.wait(1.0)
            self._handoff.append((topic, data, headers))
            wake = not self._wake_pending
            self._wake_pending = True
        if wake:
            loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        with self._lock:
            batch, self._handoff = self._handoff, []
            self._wake_pending = False
            self._lock.notify_all()
        publish = self._node.publish_nowait
        for topic, data, headers in batch:
            publish(topic, data, headers=headers)

    def subscribe(self, pattern: str, *, max_pending: int = 100_000) -> SyncSubscription:
        """Receive messages on topics matching `pattern`; iterate the result.

        Raises:
            ConfigError: `pattern` is invalid.
        """
        inbox: queue.SimpleQueue[Message | object] = queue.SimpleQueue()
        sync_sub = SyncSubscription(self, inbox, max_pending)
        sync_sub._sub = self._call(self._node.subscribe(pattern, callback=sync_sub._put))
        self._sync_subs.append(sync_sub)
        return sync_sub

    def peers(self) -> list[Peer]:
        return self._call(_value(self._node.peers))

    def wait_for_peers(self, count: int, *, timeout: float = 10.0) -> list[Peer]:
        """See `AsyncNode.wait_for_peers`."""
        return self._call(self._node.wait_for_peers(count, timeout=timeout))

    def push(self, queue: str, data: bytes | str, *,
             headers: Mapping[str, str] | None = None, timeout: float = 10.0,
             reliable: bool = False) -> None:
        """See `AsyncNode.push`; blocks until a worker with credit takes the message
        (reliable: until it is in the spool)."""
        self._call(self._node.push(queue, data, headers=headers, timeout=timeout,
                                   reliable=reliable))

    def subscribe_durable(self, pattern: str, name: str, *,
                          prefetch: int = DEFAULT_PREFETCH) -> SyncPull:
        """See `AsyncNode.subscribe_durable`."""
        return SyncPull(self, self._call(self._node.subscribe_durable(pattern, name,
                                                                      prefetch=prefetch)))

    def wait_for_durables(self, topic: str, count: int = 1, *, timeout: float = 10.0) -> None:
        """See `AsyncNode.wait_for_durables`."""
        self._call(self._node.wait_for_durables(topic, count, timeout=timeout))

    async def _drained_then(self, coro: Coroutine[Any, Any, T]) -> T:
        """Best-effort publishes handed over earlier go first: keep the caller's order."""
        self._drain()
        return await coro

    def pull(self, queue: str, *, prefetch: int = DEFAULT_PREFETCH,
             handler: Callable[[Message], object] | None = None) -> SyncPull:
        """See `AsyncNode.pull`. A `handler` runs in a worker thread, so it may block."""
        async_handler = None
        if handler is not None:
            blocking = handler

            async def async_handler(msg: Message) -> None:
                await asyncio.to_thread(blocking, msg)

        return SyncPull(self, self._call(self._node.pull(queue, prefetch=prefetch,
                                                         handler=async_handler)))

    def wait_for_workers(self, queue: str, count: int = 1, *, timeout: float = 10.0) -> None:
        """See `AsyncNode.wait_for_workers`."""
        self._call(self._node.wait_for_workers(queue, count, timeout=timeout))

    def wait_for_subscribers(self, topic: str, count: int = 1, *,
                             timeout: float = 10.0) -> None:
        """See `AsyncNode.wait_for_subscribers`."""
        self._call(self._node.wait_for_subscribers(topic, count, timeout=timeout))

    # -- services ----------------------------------------------------------------

    def serve(self, service: str, handler: ServiceHandler, *,
              concurrency: int = SYNC_SERVE_CONCURRENCY) -> SyncService:
        """See `AsyncNode.serve`. A plain-function handler runs in a worker thread, so it
        may block; up to `concurrency` requests are handled at once. Stop with ``close()``.

        Raises:
            ConfigError: `service` is invalid or already served here.
            ClosedError: the node is not running.
        """
        run = handler
        if not is_async_handler(handler):
            async def run(msg: Message) -> ReplyBody:
                result = await asyncio.to_thread(handler, msg)
                return await result if inspect.isawaitable(result) else result

        service_handle = self._call(self._node.serve(service, run, concurrency=concurrency))
        return SyncService(service_handle, self._call)

    def request(self, service: str, data: bytes | str, *, timeout: float = 5.0,
                retries: int = 2, headers: Mapping[str, str] | None = None) -> Message:
        """See `AsyncNode.request`; blocks until the reply (or the error) arrives."""
        return self._call(self._node.request(service, data, timeout=timeout, retries=retries,
                                             headers=headers))

    def wait_for_service(self, service: str, *, timeout: float = 10.0) -> None:
        """See `AsyncNode.wait_for_service`."""
        self._call(self._node.wait_for_service(service, timeout=timeout))

    def events(self) -> SyncPeerEvents:
        """Peer events from now on; iterate, or call `next(timeout)`. Ends when the node closes."""
        loop = self._loop
        if loop is None:
            raise ClosedError("node is not running")
        inbox: queue.SimpleQueue[PeerEvent | object] = queue.SimpleQueue()

        async def pump() -> None:
            stream = self._node.events()
            ready.set()
            async for event in stream:
                inbox.put(event)
            inbox.put(_CLOSED)

        ready = threading.Event()
        asyncio.run_coroutine_threadsafe(pump(), loop)
        ready.wait(5.0)  # subscribed before we return: no event is missed
        return SyncPeerEvents(inbox)


class SyncPeerEvents:
    """Blocking iterator over peer events."""

    def __init__(self, inbox: queue.SimpleQueue[PeerEvent | object]) -> None:
        self._inbox = inbox

    def next(self, timeout: float | None = None) -> PeerEvent:
        """The next event.

        Raises:
            TimeoutError: nothing happened within `timeout` seconds.
            ClosedError: the node was closed.
        """
        item = _take(self._inbox, timeout, "peer event")
        assert isinstance(item, PeerEvent)
        return item

    def __iter__(self) -> Iterator[PeerEvent]:
        return self

    def __next__(self) -> PeerEvent:
        try:
            return self.next()
        except ClosedError:
            raise StopIteration from None


class SyncPull:
    """Work messages of one queue, read with blocking `next()` or iteration."""

    def __init__(self, node: Node, pull: Pull) -> None:
        self._node = node
        self._pull = pull

    @property
    def queue(self) -> str:
        return self._pull.queue

    def next(self, timeout: float | None = None) -> Message:
        """The next work message (the previous one counts as processed).

        Raises:
            TimeoutError: none arrived within `timeout` seconds.
            ClosedError: the pull or its node was closed.
        """
        return self._node._call(self._pull.next(timeout))

    def __iter__(self) -> Iterator[Message]:
        while True:
            try:
                yield self.next()
            except ClosedError:
                return

    def close(self) -> None:
        if self._node._loop is not None:
            self._node._call(self._pull.aclose())

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SyncSubscription:
    """Messages for one pattern, read with blocking `next()` or iteration."""

    def __init__(self, node: Node, inbox: queue.SimpleQueue[Message | object],
                 max_pending: int) -> None:
        self._node = node
        self._sub: Subscription | None = None
        self._inbox = inbox
        self.max_pending = max_pending
        self.dropped = 0
        """Messages lost because the reader fell more than `max_pending` behind."""

    def _put(self, msg: Message) -> None:
        if self.max_pending and self._inbox.qsize() >= self.max_pending:
            self.dropped += 1  # newest lost: the queue cannot drop its oldest
        else:
            self._inbox.put(msg)

    @property
    def subject(self) -> str:
        return self._sub.subject if self._sub is not None else ""

    @property
    def pending(self) -> int:
        return self._inbox.qsize()

    def next(self, timeout: float | None = None) -> Message:
        """The next message.

        Raises:
            TimeoutError: none arrived within `timeout` seconds.
            ClosedError: the subscription was closed.
        """
        item = _take(self._inbox, timeout, f"message on {self.subject!r}")
        assert isinstance(item, Message)
        return item

    def __iter__(self) -> Iterator[Message]:
        while True:
            try:
                yield self.next()
            except ClosedError:
                return

    def close(self) -> None:
        if self._node._loop is not None and self._sub is not None:
            self._node._call(self._sub.aclose())
        self._inbox.put(_CLOSED)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


async def _value(fn: Any) -> Any:
    return fn()


def _take(inbox: queue.SimpleQueue[Any], timeout: float | None, what: str) -> object:
    """The next item handed over by the loop thread; the end marker stays for the next reader.

    Raises:
        TimeoutError: nothing within `timeout` seconds.
        ClosedError: the stream ended (its node or subscription closed).
    """
    try:
        item = inbox.get(timeout=timeout)
    except queue.Empty:
        raise TimeoutError(f"no {what} within {timeout} s") from None
    if item is _CLOSED:
        inbox.put(_CLOSED)
        raise ClosedError(f"no more {what}: closed")
    return item
