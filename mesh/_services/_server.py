"""A served service: runs the handler for each request, bounded, and answers.

A sync handler runs inline on the loop (it must not block); an async one runs
in its own task, at most `concurrency` at a time, the rest waiting in a
bounded backlog (beyond it the server answers *busy* and the requester tries
another server). A `FutureHandler` (the agent's HTTP apps) is bounded the same
way but needs no task: it returns a future, and its outcome is the reply. A
handler that raises produces an error reply (`RemoteError` at the requester);
the server keeps serving. Receiving requests and sending
replies is `_serving`.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import functools
import inspect
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Final, Protocol, Self, cast

from .. import _wire
from .._message import Message, Reply, sent_headers
from .._support._tasks import is_async_handler
from ..errors import ClosedError, ConfigError, MessageTooLarge

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


class FutureHandler(abc.ABC):
    """A handler that starts its work and returns an `asyncio.Future` of the reply body:
    `Service` bounds it by `concurrency` like an async handler, with a done callback
    instead of a task per request (a task costs more than a small request's handling)."""

    @abc.abstractmethod
    def __call__(self, msg: Message) -> asyncio.Future[ReplyBody]:
        """Start answering `msg` (raise `Declined` to decline at once)."""


class Declined(Exception):
    """Raised by a handler that cannot take this request now (the app behind it is down):
    the requester tries another server, as for a busy one, instead of getting an error."""


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
                 owner: ServiceHost, max_reply: int | None = None) -> None:
        self._name = name
        self._max_reply = max_reply
        """The largest reply body (None: the owner's ``max_message_size``)."""
        self._handler = handler
        self._is_async = is_async_handler(handler) or isinstance(handler, FutureHandler)
        self._start = self._call if isinstance(handler, FutureHandler) else self._spawn_one
        self._concurrency = concurrency
        self._owner = owner
        self._backlog: deque[tuple[Message, Callable[[_wire.Reply], None]]] = deque()
        self._tasks: set[asyncio.Task[None]] = set()
        self._futures: set[asyncio.Future[ReplyBody]] = set()
        self._closed = False
        self.outstanding = 0
        self.last_used = 0
        self.handled = 0
        """Requests answered with a reply."""
        self.failed = 0
        """Requests whose handler raised (answered with an error)."""
        self.declined = 0
        """Requests the handler declined (`Declined`: the requester tried elsewhere)."""

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
        if self._tasks or self._futures:
            running: set[asyncio.Future[Any]] = {*self._tasks, *self._futures}
            await asyncio.wait(running, timeout=_CLOSE_GRACE)
        await self.cancel()

    async def cancel(self) -> None:
        """Stop at once: running handlers are cancelled (the node is closing)."""
        self._closed = True
        tasks = set(self._tasks)
        for task in tasks:
            task.cancel()
        for fut in list(self._futures):
            fut.cancel()  # (its done callback answers *not served*)
        if tasks:
            await asyncio.wait(tasks)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def resize(self, concurrency: int) -> None:
        """Run at most `concurrency` requests at once from now on, in place (serving anew
        would leave the name unserved meanwhile): waiting requests start if it grew; running
        ones beyond a smaller bound finish.

        Raises:
            ConfigError: `concurrency` is below 1.
        """
        if concurrency < 1:
            raise ConfigError("concurrency", "must be >= 1")
        self._concurrency = concurrency
        while (self._is_async and self._backlog and not self._closed
               and len(self._tasks) + len(self._futures) < concurrency):
            self._start(*self._backlog.popleft())

    # -- dispatch ---------------------------------------------------------------

    def submit(self, msg: Message, reply: Callable[[_wire.Reply], None]) -> None:
        """Handle one request; `reply` is called exactly once (unless the node closes)."""
        if self._closed:
            reply(_wire.Reply(msg.seq, _wire.REPLY_NOT_SERVED, time.time(), b""))
        elif not self._is_async:
            called, result = self._call_now(msg, reply)
            if not called:
                return
            if type(result) is bytes or not inspect.isawaitable(result):  # (an ABC check)
                self._ok(msg, reply, result)
            else:  # a plain function around a coroutine (a lambda): `concurrency` binds it too
                self._is_async, self._start = True, self._spawn_one
                self._spawn(msg, reply, result)
        elif len(self._tasks) + len(self._futures) < self._concurrency:
            self._start(msg, reply)
        elif len(self._backlog) < BACKLOG_LIMIT:
            self._backlog.append((msg, reply))
        else:
            reply(_wire.Reply(msg.seq, _wire.REPLY_BUSY, time.time(), b""))

    def _spawn_one(self, msg: Message, reply: Callable[[_wire.Reply], None]) -> None:
        self._spawn(msg, reply, None)

    def _call_now(self, msg: Message, reply: Callable[[_wire.Reply], None]
                  ) -> tuple[bool, object]:
        """Call the handler: (True, what it returned), or (False, None) when it raised (and
        the reply says so)."""
        try:
            return True, self._handler(msg)
        except Declined:
            self._decline(msg, reply)
        except Exception as exc:
            self._fail(msg, reply, exc)
        return False, None

    def _decline(self, msg: Message, reply: Callable[[_wire.Reply], None]) -> None:
        self.declined += 1
        reply(_wire.Reply(msg.seq, _wire.REPLY_BUSY, time.time(), b""))

    def _call(self, msg: Message, reply: Callable[[_wire.Reply], None]) -> None:
        """Start a `FutureHandler` on `msg`; `_called` answers when its future ends."""
        called, result = self._call_now(msg, reply)
        if not called:
            return
        fut = cast("asyncio.Future[ReplyBody]", result)
        self._futures.add(fut)
        fut.add_done_callback(functools.partial(self._called, msg, reply))

    def _called(self, msg: Message, reply: Callable[[_wire.Reply], None],
                fut: asyncio.Future[ReplyBody]) -> None:
        self._futures.discard(fut)
        if fut.cancelled():
            reply(_wire.Reply(msg.seq, _wire.REPLY_NOT_SERVED, time.time(), b""))
            return
        exc = fut.exception()
        if exc is None:
            self._ok(msg, reply, fut.result())
        elif isinstance(exc, Declined):
            self._decline(msg, reply)
        else:
            self._fail(msg, reply, exc if isinstance(exc, Exception) else RuntimeError(exc))
        # this slot takes the next waiting (each call may end at once: then the one after)
        while self._backlog and not self._closed and len(self._futures) < self._concurrency:
            self._call(*self._backlog.popleft())

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
            except Declined:
                self._decline(msg, reply)
            except Exception as exc:
                self._fail(msg, reply, exc)
            else:
                self._ok(msg, reply, result)
            if not self._backlog or self._closed or len(self._tasks) > self._concurrency:
                return  # (more tasks than slots: `resize` made it smaller)
            msg, reply = self._backlog.popleft()
            pending = None

    def _ok(self, msg: Message, reply: Callable[[_wire.Reply], None], result: object) -> None:
        headers: dict[str, str] | None = None
        if isinstance(result, Reply):
            try:
                headers = sent_headers(result.headers, "Reply headers")
            except (TypeError, ConfigError) as exc:
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
        limit = self._max_reply or self._owner.max_message_size
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
        """Stop serving; nothing to do once the node closed (as `Service.aclose`)."""
        with contextlib.suppress(ClosedError):
            self._call(self._service.aclose())

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


async def awaited(handler: ServiceHandler, msg: Message) -> ReplyBody:
    result = handler(msg)
    if inspect.isawaitable(result):
        return await result
    return result
