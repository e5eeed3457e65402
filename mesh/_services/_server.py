"""A served service: runs the handler for each request, bounded, and answers.

A sync handler runs inline on the loop (it must not block); an async one runs
in its own task, at most `concurrency` at a time, the rest waiting in a
bounded backlog (beyond it the server answers *busy* and the requester tries
another server). A handler that raises produces an error reply (`RemoteError`
at the requester); the server keeps serving. Receiving requests and sending
replies is `_serving`.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from typing import Any, Final, Protocol, Self

from .. import _wire
from .._message import Message, Reply
from ..errors import MessageTooLarge

_log = logging.getLogger("mesh.services")

ReplyBody = bytes | bytearray | memoryview | str | Reply | None
ServiceHandler = Callable[[Message], ReplyBody | Awaitable[ReplyBody]]
"""Takes the request, returns the reply body (None = empty) or a `Reply` with headers;
sync or async."""

DEFAULT_CONCURRENCY: Final[int] = 64
SYNC_SERVE_CONCURRENCY: Final[int] = 8
"""The blocking `Node` runs plain handlers in threads: fewer at once by default."""
BACKLOG_LIMIT: Final[int] = 10_000
_CLOSE_GRACE: Final[float] = 2.0
_MAX_ERROR_TEXT: Final[int] = 4096


class ServiceHost(Protocol):
    """What a served service needs from the node that serves it."""

    @property
    def max_message_size(self) -> int:
        """The largest reply body a handler may return."""

    def unserve(self, service: Service) -> None:
        """`service` closed: stop routing requests to it."""


class Service:
    """A service this node serves; stop serving with `aclose()`."""

    def __init__(self, name: str, handler: ServiceHandler, concurrency: int,
                 owner: ServiceHost) -> None:
        self._name = name
        self._handler = handler
        self._is_async = is_async_handler(handler)
        self._concurrency = concurrency
        self._owner = owner
        self._backlog: deque[tuple[Message, Callable[[_wire.Reply], None]]] = deque()
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        self.outstanding = 0
        self.last_used = 0
        self.handled = 0
        """Requests answered with a reply."""
        self.failed = 0
        """Requests whose handler raised (answered with an error)."""

    @property
    def name(self) -> str:
        return self._name

    @property
    def closed(self) -> bool:
        return self._closed

    def __repr__(self) -> str:
        return f"<Service {self._name!r} handled={self.handled} failed={self.failed}>"

    async def aclose(self) -> None:
        """Stop serving: new and queued requests are declined (requesters fail over at once);
        handlers already running get a short grace to finish."""
        if self._closed:
            return
        self._closed = True
        self._owner.unserve(self)
        while self._backlog:
            msg, reply = self._backlog.popleft()
            reply(_wire.Reply(msg.seq, _wire.REPLY_NOT_SERVED, time.time(), b""))
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=_CLOSE_GRACE)
        await self.cancel()

    async def cancel(self) -> None:
        """Stop at once: running handlers are cancelled (the node is closing)."""
        self._closed = True
        tasks = set(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- dispatch ---------------------------------------------------------------

    def submit(self, msg: Message, reply: Callable[[_wire.Reply], None]) -> None:
        """Handle one request; `reply` is called exactly once (unless the node closes)."""
        if self._closed:
            reply(_wire.Reply(msg.seq, _wire.REPLY_NOT_SERVED, time.time(), b""))
        elif not self._is_async:
            try:
                result = self._handler(msg)
            except Exception as exc:
                self._fail(msg, reply, exc)
                return
            if type(result) is bytes or not inspect.isawaitable(result):  # (an ABC check)
                self._ok(msg, reply, result)
            else:
                self._spawn(msg, reply, result)
        elif len(self._tasks) < self._concurrency:
            self._spawn(msg, reply, None)
        elif len(self._backlog) < BACKLOG_LIMIT:
            self._backlog.append((msg, reply))
        else:
            reply(_wire.Reply(msg.seq, _wire.REPLY_BUSY, time.time(), b""))

    def _spawn(self, msg: Message, reply: Callable[[_wire.Reply], None],
               pending: Awaitable[ReplyBody] | None) -> None:
        task = asyncio.get_running_loop().create_task(self._run(msg, reply, pending))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, msg: Message, reply: Callable[[_wire.Reply], None],
                   pending: Awaitable[ReplyBody] | None) -> None:
        """Run one request, then keep draining the backlog (one task per concurrency slot)."""
        while True:
            try:
                result = await (pending if pending is not None else awaited(self._handler, msg))
            except asyncio.CancelledError:
                reply(_wire.Reply(msg.seq, _wire.REPLY_NOT_SERVED, time.time(), b""))
                raise
            except Exception as exc:
                self._fail(msg, reply, exc)
            else:
                self._ok(msg, reply, result)
            if not self._backlog or self._closed:
                return
            msg, reply = self._backlog.popleft()
            pending = None

    def _ok(self, msg: Message, reply: Callable[[_wire.Reply], None], result: object) -> None:
        headers: dict[str, str] | None = None
        if isinstance(result, Reply):
            try:
                headers = _reply_headers(result.headers)
            except TypeError as exc:
                self._fail(msg, reply, exc)
                return
            result = result.data
        if isinstance(result, str):
            body = result.encode()
        elif isinstance(result, bytes):
            body = result
        elif isinstance(result, (bytearray, memoryview)):
            body = bytes(result)
        elif result is None:
            body = b""
        else:
            self._fail(msg, reply, TypeError(
                f"handler returned {type(result).__name__}, expected bytes, str or Reply"))
            return
        limit = self._owner.max_message_size
        size = len(body) if headers is None else _wire.service_payload_size(body, headers)
        if size > limit:
            self._fail(msg, reply, MessageTooLarge(size, limit))
            return
        self.handled += 1
        reply(_wire.Reply(msg.seq, _wire.REPLY_OK, time.time(), body, "", headers))

    def _fail(self, msg: Message, reply: Callable[[_wire.Reply], None], exc: Exception) -> None:
        self.failed += 1
        if self.failed == 1:
            _log.warning("handler of service %r raised (replied with the error; further ones "
                         "are logged at debug)", self._name, exc_info=exc)
        else:
            _log.debug("handler of service %r raised", self._name, exc_info=exc)
        text = (str(exc) or type(exc).__name__)[:_MAX_ERROR_TEXT]
        reply(_wire.Reply(msg.seq, _wire.REPLY_ERROR, time.time(), b"", text))


class SyncService:
    """The blocking twin of `Service`: ``close()`` stops serving."""

    def __init__(self, service: Service,
                 call: Callable[[Coroutine[Any, Any, None]], None]) -> None:
        self._service = service
        self._call = call

    @property
    def name(self) -> str:
        return self._service.name

    @property
    def handled(self) -> int:
        return self._service.handled

    @property
    def failed(self) -> int:
        return self._service.failed

    def close(self) -> None:
        self._call(self._service.aclose())

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _reply_headers(headers: object) -> dict[str, str] | None:
    """A `Reply`'s headers as they travel (None when empty).

    Raises:
        TypeError: not a mapping of str to str (caught here, not by the requester's decoder).
    """
    if not headers:
        return None
    if not isinstance(headers, Mapping):
        raise TypeError(f"Reply headers must be a mapping, not {type(headers).__name__}")
    out = dict(headers)
    for key, value in out.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f"Reply header {key!r} must map a str to a str")
    return out


def is_async_handler(handler: object) -> bool:
    if inspect.iscoroutinefunction(handler):
        return True
    call = getattr(handler, "__call__", None)  # noqa: B004 - a callable object's method
    return call is not None and inspect.iscoroutinefunction(call)


async def awaited(handler: ServiceHandler, msg: Message) -> ReplyBody:
    result = handler(msg)
    if inspect.isawaitable(result):
        return await result
    return result
