"""Node: the blocking twin of `AsyncNode`, for programs without an event loop.

It has every public member of `AsyncNode` under the same name, with the same
parameters and meaning (``close`` for ``aclose``; tests/mesh/test_parity.py
holds them to it): coroutines become blocking calls, streams become the
blocking iterators of `_sync_streams`. The async node runs on a private
loop thread that owns every socket; calls cross over with
`run_coroutine_threadsafe` and get typed results and exceptions back, and
values the loop keeps changing are read on it. Best-effort publishes do not
wait for the loop: they are handed over in bulk with one wake-up per batch,
and the caller is held back only when the loop falls far behind.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import functools
import inspect
import threading
from collections.abc import Callable, Collection, Coroutine, Iterable, Mapping
from datetime import datetime
from types import TracebackType
from typing import Any, Final, Self, TypeVar

from . import _codec, _loop, _names, _trace, _ttl
from ._codec import Payload
from ._config import NodeConfig
from ._figures._report import Report
from ._membership._peers import Peer
from ._message import Message, attach_receipt, receipt_of, sent_headers
from ._message import T as V
from ._node import AsyncNode
from ._pubsub._subscription import DEFAULT_MAX_PENDING, check_callback
from ._reliable._durables import DurableInfo
from ._services._server import (
    SYNC_SERVE_CONCURRENCY,
    ReplyBody,
    ServiceHandler,
    SyncService,
)
from ._support._tally import Traffic
from ._support._tasks import is_async_handler
from ._support._threads import HandlerThreads
from ._sync_streams import SyncPeerEvents, SyncPull, SyncReplies, SyncSubscription
from ._work._queues import DEFAULT_PREFETCH
from .errors import ClosedError, MessageTooLarge

__all__ = ["Node", "SyncPeerEvents", "SyncPull", "SyncReplies", "SyncSubscription"]

T = TypeVar("T")
_HANDOFF_LIMIT: Final[int] = 50_000
_JOIN_CALLBACKS_FOR: Final[float] = 5.0


class Node:
    """A zeromesh node with a blocking API. Use ``with Node(...) as node:``.

    Takes the same arguments as `AsyncNode`.
    """

    def __init__(self, config: NodeConfig | None = None, **settings: Any) -> None:
        self._node = AsyncNode(config, **settings)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Condition()
        self._handoff: list[tuple[str, bytes | str, Mapping[str, str] | None,
                                  float | None, contextvars.Context | None]] = []
        """Best-effort publishes for the loop; traced, each with its caller's context (the
        loop's drain would otherwise run them all in the context of the call that woke it)."""
        self._wake_pending = False
        self._accepting = False
        """Best-effort publishes are taken (under `_lock`): from start until close begins,
        so close's drain is the last and nothing handed over after it is silently lost."""
        self._calls = threading.Lock()
        """Held to hand a call to the loop or to end the loop: no call lands on a stopped one."""
        self._in_flight: set[concurrent.futures.Future[Any]] = set()
        self._streams: list[SyncSubscription | SyncPeerEvents] = []
        """Open streams, ended when the node closes."""
        self._pumps: set[asyncio.Task[None]] = set()
        self._handlers = HandlerThreads("zeromesh-handler")
        """Where blocking handlers run: daemon threads, so one that never returns is
        abandoned at close instead of holding up the interpreter's exit."""

    # -- identity and figures ------------------------------------------------------

    @property
    def id(self) -> str:
        """Stable node id (32 hex chars); kept in the data dir across restarts."""
        return self._node.id

    @property
    def name(self) -> str:
        return self._node.name

    @property
    def mesh(self) -> str:
        return self._node.mesh

    @property
    def running(self) -> bool:
        """Started and not yet closed."""
        return self._node.running

    @property
    def config(self) -> NodeConfig:
        return self._node.config

    @property
    def endpoints(self) -> dict[str, list[str]]:
        """Bound endpoints by role: ``ctl`` (control, for ``--peer``), ``pub``, ``rtr``."""
        return self._read(lambda: self._node.endpoints)

    @property
    def stats(self) -> dict[str, int]:
        """Message counts: published, received, dropped (gaps seen from publishers)."""
        return self._node.stats

    @property
    def dropped_by_peer(self) -> Mapping[str, int]:
        """Pub/sub messages publishers dropped for us at their high-water mark, by peer id."""
        return self._read(lambda: self._node.dropped_by_peer)

    @property
    def dropped_input(self) -> Mapping[str, int]:
        """Malformed or foreign input dropped, by reason (mDNS reasons prefixed ``mdns_``)."""
        return self._read(lambda: self._node.dropped_input)

    @property
    def spool_pending(self) -> int:
        """Reliable messages in this node's spool not yet delivered everywhere."""
        return self._read(lambda: self._node.spool_pending)

    def traffic(self) -> Traffic:
        """See `AsyncNode.traffic`."""
        return self._read(self._node.traffic)

    def reload_allowlist(self) -> int:
        """See `AsyncNode.reload_allowlist`."""
        return self._read(self._node.reload_allowlist)

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        """Start the loop thread and the node.

        Raises:
            ConfigError: a setting cannot be used.
        """
        if self._thread is not None:
            return
        self._handlers = HandlerThreads("zeromesh-handler")  # (a closed node's pool is shut)
        loop = self._loop = _loop.new_event_loop()
        self._thread = threading.Thread(target=loop.run_forever, name="zeromesh-loop",
                                        daemon=True)
        self._thread.start()
        with self._lock:
            self._accepting = True
        try:
            self._call(self._node.start())
        except BaseException:
            self._stop_loop()
            raise

    def close(self) -> None:
        """Leave the mesh gracefully and stop the loop thread. Blocking handlers still
        running are abandoned (their threads do not hold up the interpreter's exit); a
        pull handler's message is then not processed (a reliable one comes again)."""
        loop = self._loop
        if loop is None:
            return
        with self._lock:
            self._accepting = False
            self._lock.notify_all()
        job = self._handlers.current()
        if job is not None:  # a handler closing its node: the close must not wait for it
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(job.release)
        try:
            self._call(self._drain_then_close())
        finally:
            self._stop_loop()
            self._handlers.shutdown()
            streams, self._streams = self._streams, []
            for stream in streams:
                stream._close()
            for stream in streams:  # callbacks run what was queued, then their threads end
                if isinstance(stream, SyncSubscription):
                    stream._join(_JOIN_CALLBACKS_FOR)

    async def _drain_then_close(self) -> None:
        self._drain()
        await self._node.aclose()
        for pump in list(self._pumps):  # (they end with the node's event streams)
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pump
        self._pumps.clear()

    def _stop_loop(self) -> None:
        """Stop the loop; calls other threads made meanwhile end with ClosedError."""
        with self._calls:
            loop, thread = self._loop, self._thread
            self._loop = self._thread = None
        if loop is None or thread is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=5)
        if not thread.is_alive():  # calls queued behind the stop start here, and end
            loop.run_until_complete(_end_the_rest())
        loop.close()
        for future in list(self._in_flight):
            with contextlib.suppress(concurrent.futures.InvalidStateError):
                future.set_exception(ClosedError("node closed while the call was in flight"))

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        with self._calls:
            loop = self._loop
            if loop is None:
                coro.close()
                raise ClosedError("node is not running (use `with Node(...)` or `start()`)")
            if threading.current_thread() is self._thread:  # it would wait for itself forever
                coro.close()
                raise RuntimeError("a blocking Node call on the node's own loop (from an "
                                   "async handler): use the blocking call from a plain "
                                   "function, or an AsyncNode")
            future = asyncio.run_coroutine_threadsafe(coro, loop)
            self._in_flight.add(future)
        try:
            return future.result(timeout)
        except concurrent.futures.CancelledError:
            if self._loop is None:  # cancelled as the loop ended
                raise ClosedError("node closed while the call was in flight") from None
            raise
        except BaseException:  # Ctrl-C while waiting: nobody will see what the call gets
            future.cancel()  # (say a message a pull takes, then counted as processed)
            raise
        finally:
            self._in_flight.discard(future)

    def _read(self, value: Callable[[], T]) -> T:
        """A value the loop keeps changing, read on the loop (never mid-change); read
        directly when the node is not running, so it means what it means on `AsyncNode`,
        and on the loop itself."""
        if self._loop is None or threading.current_thread() is self._thread:
            return value()
        return self._call(_value(value))

    def _threadsafe(self, msg: Message[V]) -> Message[V]:
        """`msg` with ``ack``/``nack`` that hop onto the loop: safe from any thread."""
        receipt, loop = receipt_of(msg), self._loop
        if receipt is None or loop is None:
            return msg

        def hop(_: Message, ok: bool) -> None:
            with contextlib.suppress(RuntimeError):  # the node closed meanwhile: nothing to do
                loop.call_soon_threadsafe(receipt, msg, ok)

        attach_receipt(msg, hop)  # in place: the handle holding it knows it by identity
        return msg

    def _forget(self, stream: SyncSubscription | SyncPeerEvents) -> None:
        with contextlib.suppress(ValueError):
            self._streams.remove(stream)

    # -- pub/sub -----------------------------------------------------------------------

    def publish(self, topic: str, data: Payload, *,
                headers: Mapping[str, str] | None = None, reliable: bool = False,
                retain: bool = False, ttl: float | None = None) -> None:
        """See `AsyncNode.publish`. Best effort does not wait for the loop; reliable
        blocks until the message is in the spool, retained until it is the topic's value.

        Raises:
            ConfigError: `topic` is invalid, or `ttl` is not a number > 0.
            MessageTooLarge: `data` exceeds ``max_message_size``.
            SpoolFullError: (reliable) the spool is full.
            ClosedError: the node is not running.
        """
        if reliable or retain:
            self._call(self._drained_then(lambda: self._node.publish(
                topic, data, headers=headers, reliable=reliable, retain=retain, ttl=ttl)))
            return
        self.publish_nowait(topic, data, headers=headers, ttl=ttl)

    def publish_many(self, topic: str, payloads: Iterable[Payload], *,
                     headers: Mapping[str, str] | None = None,
                     reliable: bool = False, retain: bool = False,
                     ttl: float | None = None) -> None:
        """See `AsyncNode.publish_many`: with ``reliable=True`` the messages reach disk with
        one wait (one group commit); it returns once they are there.

        Raises:
            Same as `publish`.
        """
        if not reliable and not retain:
            for data in payloads:
                self.publish_nowait(topic, data, headers=headers, ttl=ttl)
            return
        batch = list(payloads)  # consumed here, not on the loop thread
        self._call(self._drained_then(lambda: self._node.publish_many(
            topic, batch, headers=headers, reliable=reliable, retain=retain, ttl=ttl)))

    def publish_nowait(self, topic: str, data: Payload, *,
                       headers: Mapping[str, str] | None = None,
                       ttl: float | None = None) -> bool:
        """Best-effort `publish`: hands the message to the loop without waiting for it to
        leave (held back only while the loop is far behind). True when this call handed
        a new batch over (woke the loop), the twin of `AsyncNode.publish_nowait` flushing one.

        Raises:
            Same as `publish` (best effort).
        """
        loop = self._loop
        if loop is None:
            raise ClosedError("node is not running")
        _names.topic(topic)
        if ttl is not None:
            ttl = _ttl.check(ttl)
        if type(data) is not bytes and type(data) is not str:  # encoded here, off the loop
            data, headers = _codec.prepared(data, headers)
        if headers and headers is not _codec.LABEL:  # (on the loop it would fail a handoff)
            headers = sent_headers(headers)
        size = len(data.encode()) if isinstance(data, str) else len(data)
        if size > self._node.config.max_message_size:
            raise MessageTooLarge(size, self._node.config.max_message_size)
        with self._lock:
            while len(self._handoff) >= _HANDOFF_LIMIT and self._accepting:
                self._lock.wait(1.0)
            if not self._accepting:
                raise ClosedError("node is closing")
            self._handoff.append((topic, data, headers, ttl,
                                  contextvars.copy_context() if _trace.ON else None))
            wake = not self._wake_pending
            self._wake_pending = True
        if wake:
            with contextlib.suppress(RuntimeError):  # closed meanwhile: its drain took this
                loop.call_soon_threadsafe(self._drain)
        return wake

    def _drain(self) -> None:
        with self._lock:
            batch, self._handoff = self._handoff, []
            self._wake_pending = False
            self._lock.notify_all()
        publish = self._node.publish_nowait
        for topic, data, headers, ttl, context in batch:
            if context is None:
                publish(topic, data, headers=headers, ttl=ttl)
            else:  # traced: the PRODUCER span's parent is the caller's current span
                context.run(functools.partial(publish, topic, data, headers=headers, ttl=ttl))

    def subscribe(self, pattern: str, *, type: type[V] | None = None,
                  callback: Callable[[Message[V]], None] | None = None,
                  max_pending: int = DEFAULT_MAX_PENDING,
                  retained: bool = True, since: float | datetime | None = None,
                  last: int | None = None) -> SyncSubscription[V]:
        """See `AsyncNode.subscribe`; iterate the result. A `callback` runs in a thread of
        the subscription's own, one message at a time in order, so it may block; past
        `max_pending` messages behind, the oldest are dropped (and counted) as when iterating.

        Raises:
            ConfigError: as `AsyncNode.subscribe`.
            TypeError: `callback` is an async function.
            ClosedError: the node is not running.
        """
        check_callback(callback)
        sync_sub: SyncSubscription[V] = SyncSubscription(self, max_pending, callback)
        sync_sub._start(self._call(self._node.subscribe(pattern, type=type,
                                                        callback=sync_sub._put,
                                                        max_pending=max_pending,
                                                        retained=retained, since=since,
                                                        last=last)))
        self._streams.append(sync_sub)
        return sync_sub

    def last(self, pattern: str, *, timeout: float = 5.0) -> list[Message]:
        """See `AsyncNode.last`: the mesh's retained values matching `pattern`.

        Raises:
            ConfigError: `pattern` is invalid or `timeout` is not positive.
            ClosedError: the node is not running.
        """
        return self._call(self._node.last(pattern, timeout=timeout))

    def replay_dead_letters(self, ids: set[int] | None = None) -> int:
        """See `AsyncNode.replay_dead_letters`; returns how many went back into the outbox.

        Raises:
            ConfigError: the node has no data dir.
            ClosedError: the node is not running.
        """
        return self._call(self._node.replay_dead_letters(ids))

    def dead_letter(self, queue: str, msg: Message, *, reason: str, attempts: int) -> None:
        """See `AsyncNode.dead_letter`; returns once the message is in the dead-letter spool.

        Raises:
            ConfigError: no data dir, or `queue` is invalid.
            SpoolFullError: the dead-letter spool is full.
            ClosedError: the node is not running.
        """
        self._call(self._node.dead_letter(queue, msg, reason=reason, attempts=attempts))

    def wait_for_spool(self, *, timeout: float = 10.0) -> None:
        """See `AsyncNode.wait_for_spool`.

        Raises:
            RequestTimeout: some were still pending when the timeout came.
        """
        self._call(self._node.wait_for_spool(timeout=timeout))

    def push(self, queue: str, data: Payload, *,
             headers: Mapping[str, str] | None = None, timeout: float = 10.0,
             reliable: bool = False, ttl: float | None = None) -> None:
        """See `AsyncNode.push`; blocks until a worker with credit takes the message
        (reliable: until it is in the spool)."""
        self._call(self._node.push(queue, data, headers=headers, timeout=timeout,
                                   reliable=reliable, ttl=ttl))

    def subscribe_durable(self, pattern: str, name: str, *,
                          prefetch: int = DEFAULT_PREFETCH,
                          since: float | datetime | None = None,
                          last: int | None = None) -> SyncPull:
        """See `AsyncNode.subscribe_durable`."""
        return SyncPull(self, self._call(self._node.subscribe_durable(
            pattern, name, prefetch=prefetch, since=since, last=last)))

    def wait_for_durables(self, topic: str, count: int = 1, *, timeout: float = 10.0) -> None:
        """See `AsyncNode.wait_for_durables`."""
        self._call(self._node.wait_for_durables(topic, count, timeout=timeout))

    def dead_letters(self) -> list[dict[str, Any]]:
        """See `AsyncNode.dead_letters`."""
        return self._read(self._node.dead_letters)

    def purge_dead_letters(self, ids: Collection[int] | None = None) -> int:
        """See `AsyncNode.purge_dead_letters`."""
        return self._read(functools.partial(self._node.purge_dead_letters, ids))

    def spool_figures(self) -> dict[str, Any]:
        """See `AsyncNode.spool_figures`."""
        return self._read(self._node.spool_figures)

    def figures(self) -> Report:
        """See `AsyncNode.figures`."""
        return self._read(self._node.figures)

    def gather_figures(self) -> list[Report]:
        """See `AsyncNode.gather_figures`."""
        return self._call(self._node.gather_figures())

    def durables(self) -> list[DurableInfo]:
        """See `AsyncNode.durables`."""
        return self._read(self._node.durables)

    def forget_durable(self, name: str) -> int:
        """See `AsyncNode.forget_durable`; returns how many spooled messages waited for it.

        Raises:
            ConfigError: no known durable has that name, or several do, or no data dir.
            ClosedError: the node is not running.
        """
        return self._call(self._node.forget_durable(name))

    def end_durable(self, name: str) -> int:
        """See `AsyncNode.end_durable`; returns how many messages this node's own spool
        held for it.

        Raises:
            ConfigError: `name` is invalid, a subscription to it is open, or no data dir.
            ClosedError: the node is not running.
        """
        return self._call(self._node.end_durable(name))

    def wait_for_known_subscribers(self, topic: str, *, timeout: float = 10.0) -> int:
        """See `AsyncNode.wait_for_known_subscribers`."""
        return self._call(self._node.wait_for_known_subscribers(topic, timeout=timeout))

    def subscriber_count(self, topic: str) -> int:
        """Peers whose subscriptions matching `topic` are in force at our publisher."""
        return self._read(lambda: self._node.subscriber_count(topic))

    def check_topic(self, topic: str) -> None:
        """See `AsyncNode.check_topic`."""
        self._node.check_topic(topic)

    async def _drained_then(self, call: Callable[[], Coroutine[Any, Any, T]]) -> T:
        """Best-effort publishes handed over earlier go first: keep the caller's order. (A
        call, not its coroutine: a closed node's `_call` never makes it.)"""
        self._drain()
        return await call()

    def pull(self, queue: str, *, type: type[V] | None = None,
             prefetch: int = DEFAULT_PREFETCH,
             handler: Callable[[Message[V]], object] | None = None) -> SyncPull[V]:
        """See `AsyncNode.pull`. A `handler` runs in a worker thread, so it may block."""
        async_handler = None
        if handler is not None:
            blocking = handler
            what = f"pull handler {_name_of(handler)} of queue {queue!r}"

            async def async_handler(msg: Message[V]) -> None:
                receipt = receipt_of(msg)

                def abandoned() -> None:  # not processed: a reliable one comes again
                    if receipt is not None:
                        receipt(msg, False)

                await self._handlers.run(what, blocking, self._threadsafe(msg),
                                         abandoned=abandoned)

        return SyncPull(self, self._call(self._node.pull(queue, type=type, prefetch=prefetch,
                                                         handler=async_handler)))

    def wait_for_workers(self, queue: str, count: int = 1, *, timeout: float = 10.0) -> None:
        """See `AsyncNode.wait_for_workers`."""
        self._call(self._node.wait_for_workers(queue, count, timeout=timeout))

    def worker_count(self, queue: str) -> int:
        """Live workers of `queue` known to this node (itself included)."""
        return self._read(lambda: self._node.worker_count(queue))

    def check_queue(self, queue: str) -> None:
        """See `AsyncNode.check_queue`."""
        self._node.check_queue(queue)

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
            what = f"serve handler {_name_of(handler)} of service {service!r}"

            async def run(msg: Message) -> ReplyBody:
                result = await self._handlers.run(what, handler, msg)
                return await result if inspect.isawaitable(result) else result

        service_handle = self._call(self._node.serve(service, run, concurrency=concurrency))
        return SyncService(service_handle, self._call)

    def request(self, service: str, data: Payload, *, timeout: float = 5.0,
                retries: int = 2, headers: Mapping[str, str] | None = None) -> Message:
        """See `AsyncNode.request`; blocks until the reply (or the error) arrives."""
        return self._call(self._node.request(service, data, timeout=timeout, retries=retries,
                                             headers=headers))

    def request_all_stream(self, service: str, data: Payload, *, timeout: float = 5.0,
                           max_replies: int | None = None,
                           headers: Mapping[str, str] | None = None) -> SyncReplies:
        """See `AsyncNode.request_all_stream`: ``for reply in node.request_all_stream(...)``."""
        replies = self._read(lambda: self._node.request_all_stream(
            service, data, timeout=timeout, max_replies=max_replies, headers=headers))
        return SyncReplies(self, replies)

    def request_all(self, service: str, data: Payload, *, timeout: float = 5.0,
                    max_replies: int | None = None,
                    headers: Mapping[str, str] | None = None) -> list[Message]:
        """See `AsyncNode.request_all`; blocks until the gathering ends."""
        return self._call(self._node.request_all(service, data, timeout=timeout,
                                                 max_replies=max_replies, headers=headers))

    def wait_for_service(self, service: str, count: int = 1, *,
                         timeout: float = 10.0) -> None:
        """See `AsyncNode.wait_for_service`."""
        self._call(self._node.wait_for_service(service, count, timeout=timeout))

    def check_service(self, service: str) -> None:
        """See `AsyncNode.check_service`."""
        self._node.check_service(service)

    # -- peers ---------------------------------------------------------------------

    def peers(self) -> list[Peer]:
        """Known peers (never this node, nor one that left), with their liveness state."""
        return self._read(self._node.peers)

    def wait_for_peers(self, count: int, *, timeout: float = 10.0) -> list[Peer]:
        """See `AsyncNode.wait_for_peers`."""
        return self._call(self._node.wait_for_peers(count, timeout=timeout))

    def events(self) -> SyncPeerEvents:
        """Peer events from now on; iterate, or call `next(timeout)`. Ends when the node closes.

        Raises:
            ClosedError: the node is not running.
        """
        loop = self._loop
        if loop is None:
            raise ClosedError("node is not running (use `with Node(...)` or `start()`)")
        events = SyncPeerEvents(self)

        def opened() -> None:  # (on the loop: subscribed now; a pump that ends is let go)
            pump = events._open(loop)
            self._pumps.add(pump)
            pump.add_done_callback(self._pumps.discard)

        self._call(_value(opened))
        self._streams.append(events)
        return events


def _name_of(handler: object) -> str:
    """How a warning names a handler: its qualified name, else its repr."""
    return getattr(handler, "__qualname__", None) or repr(handler)


async def _value(fn: Callable[[], T]) -> T:
    return fn()


async def _end_the_rest() -> None:
    """On a stopped loop, once more: let what was queued start, then cancel every task
    still there (bounded), so no caller waits for a loop that will never run again."""
    await asyncio.sleep(0)
    rest = asyncio.all_tasks() - {asyncio.current_task()}
    for task in rest:
        task.cancel()
    if rest:
        await asyncio.wait(rest, timeout=1.0)
