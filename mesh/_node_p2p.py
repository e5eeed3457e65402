"""AsyncNode's point-to-point half: work queues and services.

`AsyncNode` (`_node`) is this plus pub/sub, what the mesh remembers and
durables; the split is by concern only — every method here is a thin,
validated entry into the `_work` or `_services` part of the running node.
"""

from __future__ import annotations

import contextlib
from collections.abc import Coroutine, Mapping
from typing import Any

from . import _codec, _names, _trace
from ._codec import Payload
from ._core import NodeCore
from ._message import Message, T
from ._services._gather import Replies
from ._services._requests import check_timeout
from ._services._server import DEFAULT_CONCURRENCY, Service, ServiceHandler
from ._work._pull import Handler, Pull
from ._work._queues import DEFAULT_PREFETCH


class WorkAndServices(NodeCore):
    """Work queues and services of a node (see `AsyncNode`)."""

    # -- work queues -------------------------------------------------------------

    def push(self, queue: str, data: Payload, *,
             headers: Mapping[str, str] | None = None, timeout: float = 10.0,
             reliable: bool = False, ttl: float | None = None) -> Coroutine[Any, Any, None]:
        """Hand a message to exactly one live worker of `queue`, anywhere in the mesh.

        Best effort: returns once a worker with free credit was chosen; waits
        (up to `timeout`) while every worker is busy, so it never drops.
        ``reliable=True``: returns once the message is in this node's spool
        (needs a data dir); it is delivered at least once, whenever a worker
        is there, also after restarts. ``ttl=S``: unless a worker gets it
        within S seconds of its timestamp, it is never delivered (and leaves
        the spool), counted in ``stats["expired"]``. A `data` that is not
        bytes/str is encoded and labelled as in `publish`.

        Raises:
            ConfigError: `queue` is invalid, or `ttl` is not a number > 0.
            MessageTooLarge: `data` exceeds ``max_message_size``.
            NoRespondersError: no worker of `queue` appeared within `timeout`.
            RequestTimeout: workers exist but none had credit within `timeout`.
            SpoolFullError: (reliable) the spool quota or the disk is full.
            ClosedError: the node is not running.
        """
        # A plain function returning the queue's own coroutine: one coroutine per
        # message, not two (the pusher's CPU is what limits push/pull throughput).
        run = self._run
        if run is None or self._closing:
            return self._not_running()
        if type(data) is not bytes and type(data) is not str:
            data, headers = _codec.prepared(data, headers)
        if _trace.ON:
            return self._push_traced(queue, data, headers, timeout, reliable, ttl)
        return run.work.push(queue, data, headers, timeout, self._stopped, reliable, ttl)

    async def _push_traced(self, queue: str, data: bytes | str,
                           headers: Mapping[str, str] | None, timeout: float, reliable: bool,
                           ttl: float | None) -> None:
        with _trace.producing("push", queue, headers) as headers:
            await self._live().work.push(queue, data, headers, timeout, self._stopped,
                                         reliable, ttl)

    async def _not_running(self) -> None:
        self._check_running()

    async def pull(self, queue: str, *, type: type[T] | None = None,
                   prefetch: int = DEFAULT_PREFETCH,
                   handler: Handler[T] | None = None) -> Pull[T]:
        """Become a worker of `queue`: iterate the result, or pass `handler`.

        With ``type=T`` each message is a `Message[T]` whose ``value`` is the
        payload decoded as T (as in `subscribe`); one that is not a T is
        nacked — a reliable one ends in the dead-letter spool after
        ``max_attempts`` — counted in ``decode_errors``, and skipped.

        `prefetch` is the most of each pusher's messages this node holds
        unprocessed. The window in use adapts below it to about 20 ms of this
        worker's work (never below 16, or `prefetch` if smaller), so a slow
        worker holds few and a fast one is not held back by credit round trips.

        Raises:
            ConfigError: `queue` or `prefetch` is invalid.
            ClosedError: the node is not running.
        """
        if handler is not None and _trace.ON:
            handler = _trace.traced(handler, "pull", destination=queue)
        return self._live().work.pull(queue, prefetch, handler, type)

    async def wait_for_workers(self, queue: str, count: int = 1, *,
                               timeout: float = 10.0) -> None:
        """Wait until `count` workers of `queue` (this node included) are alive.

        Raises:
            ConfigError: `queue` is invalid.
            RequestTimeout: fewer were there when the timeout came.
        """
        _names.queue(queue)
        await self._wait(lambda: self.worker_count(queue) >= count, timeout,
                         f"waiting for {count} workers of {queue!r}")

    def check_queue(self, queue: str) -> None:
        """Validate a queue name.

        Raises:
            ConfigError: it is not a valid queue name.
        """
        _names.queue(queue)

    def worker_count(self, queue: str) -> int:
        """Live workers of `queue` known to this node (itself included)."""
        return self._run.work.worker_count(queue) if self._run is not None else 0

    # -- services ----------------------------------------------------------------

    async def serve(self, service: str, handler: ServiceHandler, *,
                    concurrency: int = DEFAULT_CONCURRENCY) -> Service:
        """Answer requests to `service`: `handler` gets each request and returns the reply.

        The handler takes a `Message` (``data``, ``headers``, ``source``...) and
        returns the reply body (bytes or str; None = empty), or a `Reply` to send
        headers back too (they become the reply message's ``headers``). A plain function
        runs inline on the event loop, so it must not block (the blocking
        `Node` runs it in a worker thread instead); a coroutine function (or
        a plain one returning an awaitable) runs up to `concurrency` requests
        at once. If it raises, the requester gets `RemoteError` with the
        exception's text and this node keeps serving.
        Stop with ``await service.aclose()`` (or ``async with``).

        Raises:
            ConfigError: `service` is invalid, already served here, or
                `concurrency` < 1.
            ClosedError: the node is not running.
        """
        if _trace.ON:
            handler = _trace.traced(handler, "serve", destination=service)
        return self._live().serving.serve(service, handler, concurrency)

    async def request(self, service: str, data: Payload, *, timeout: float = 5.0,
                      retries: int = 2, headers: Mapping[str, str] | None = None) -> Message:
        """Send a request to one live server of `service` and return its reply.

        Servers are load balanced (least outstanding, then round robin); this
        node serves its own services without the network. A timed-out attempt
        is retried on another server when there is one, up to `retries` times
        with a short jittered backoff; a server that dies or leaves fails its
        requests over at once. `timeout` covers finding a server and every
        attempt; an attempt gets an equal share of the time left with the
        servers not yet tried (a lone server: all of it, and it is asked once).
        A request can run twice if its server dies after handling it.
        A `data` that is not bytes/str is encoded and labelled as in `publish`
        (the server reads it with ``msg.decode(T)``).

        Returns:
            The reply: ``data`` is the body, ``headers`` the handler's `Reply` headers
            (None without), ``source`` the server's name.

        Raises:
            ConfigError: `service`, `timeout` or `retries` is invalid.
            MessageTooLarge: `data` exceeds ``max_message_size`` (nothing sent).
            NoRespondersError: no live server (after a short discovery grace
                right after start), or every server went away.
            RequestTimeout: no reply within `timeout`.
            RemoteError: the server's handler raised.
            TypeError: msgspec cannot encode `data`.
            ClosedError: the node is not running or closed meanwhile.
        """
        if type(data) is not bytes and type(data) is not str:
            data, headers = _codec.prepared(data, headers)
        if _trace.ON:
            with _trace.producing("request", service, headers) as headers:
                return await self._live().requests.request(service, data, timeout=timeout,
                                                           retries=retries, headers=headers)
        return await self._live().requests.request(service, data, timeout=timeout,
                                                   retries=retries, headers=headers)

    def request_all_stream(self, service: str, data: Payload, *, timeout: float = 5.0,
                           max_replies: int | None = None,
                           headers: Mapping[str, str] | None = None) -> Replies:
        """Scatter-gather: send the request to every live server of `service` (this
        node's own included) and yield their replies as they arrive.

        ``async for reply in node.request_all_stream(...)``: the request goes out
        when iteration starts; it ends once every server asked has answered, at
        `max_replies` replies, or after `timeout` — whichever comes first. Each
        reply is a `Message` with ``source`` (the server's name), ``source_id``,
        ``data`` and ``headers``. A server whose handler raised yields a reply with
        ``error`` set (its text) and empty ``data``; a server that is too slow,
        busy or goes away yields nothing. No server known: nothing (after the
        short discovery grace right after start), not NoRespondersError. No
        retries: a retry would ask servers twice. Stop early with ``aclose()``
        (or ``async with``).

        Raises:
            ConfigError: `service`, `timeout` or `max_replies` is invalid.
            MessageTooLarge: `data` exceeds ``max_message_size`` (nothing sent).
            ClosedError: the node is not running.
        """
        if type(data) is not bytes and type(data) is not str:  # (typed: as `request`)
            data, headers = _codec.prepared(data, headers)
        if _trace.ON:  # the span lasts until the gathering ends, as a request's until its reply
            with contextlib.ExitStack() as span:
                headers = span.enter_context(_trace.producing("request", service, headers))
                replies = self._live().requests.scatter(service, data, timeout=timeout,
                                                        max_replies=max_replies, headers=headers)
                replies.on_closed(span.pop_all().close)
                return replies
        return self._live().requests.scatter(service, data, timeout=timeout,
                                             max_replies=max_replies, headers=headers)

    async def request_all(self, service: str, data: Payload, *, timeout: float = 5.0,
                          max_replies: int | None = None,
                          headers: Mapping[str, str] | None = None) -> list[Message]:
        """Scatter-gather: the replies of every live server of `service`, in the order
        they arrived (an empty list when there is none). See `request_all_stream`.

        Raises:
            ConfigError: `service`, `timeout` or `max_replies` is invalid.
            MessageTooLarge: `data` exceeds ``max_message_size`` (nothing sent).
            ClosedError: the node is not running.
        """
        async with self.request_all_stream(service, data, timeout=timeout,
                                           max_replies=max_replies, headers=headers) as replies:
            return [reply async for reply in replies]

    async def wait_for_service(self, service: str, count: int = 1, *,
                               timeout: float = 10.0) -> None:
        """Wait until `count` live servers of `service` (this node included) are known.

        Raises:
            ConfigError: `service` or `timeout` is invalid.
            RequestTimeout: fewer were there when the timeout came.
        """
        requests = self._live().requests
        _names.service(service)
        check_timeout(timeout)
        await self._wait(lambda: len(requests.servers(service)) >= count, timeout,
                         f"waiting for {count} server(s) of {service!r}")

    def check_service(self, service: str) -> None:
        """Validate a service name (the rules of topic names).

        Raises:
            ConfigError: it is not a valid service name.
        """
        _names.service(service)
