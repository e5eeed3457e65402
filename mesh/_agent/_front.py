"""The agent's HTTP front: the hot routes answered on a lean protocol, the rest by aiohttp.

Why: aiohttp's server spent most of an agent's CPU on a one-message publish and
the largest part of the requesting agent's on a service request (request and
response objects, its parser's message queue, a writer, timers); a publish from an
app in another language is the sidecar's most common call. Here a connection
starts on `FrontProtocol`, which reads plain requests to the routes it is given
(``POST /v1/publish/{topic}`` ..., `_routes.LEAN`) itself and runs the *same*
guarded handler aiohttp would (same checks, errors, counts), with a
`LeanRequest` standing in for aiohttp's request.

Anything else — another route or method, HTTP/1.0, no ``Host``, a chunked body,
``Expect``, ``Upgrade``, an encoded path parameter, a body over the agent's limit, a head
that does not read as plain HTTP/1.1 — and the connection is handed to aiohttp's
protocol with every byte not yet answered, for good: aiohttp's answer (its
parser, its 4xx) is the reference, and nothing here has to equal it for what
is not plain.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable, Collection, Mapping
from email.utils import formatdate
from typing import Final
from urllib.parse import parse_qsl

from aiohttp import web, web_protocol
from aiohttp.web_request import BaseRequest
from multidict import CIMultiDict, CIMultiDictProxy, MultiDict, MultiDictProxy

from ._headers import is_token
from ._http import GUARDED, ViewHandler, error

_log = logging.getLogger("mesh.agent")

MAX_HEAD: Final[int] = 8190
"""Bytes of request line and headers read here; a longer head goes to aiohttp (its limit
for a line is the same)."""
IDLE_SECONDS: Final[float] = 75.0
"""A connection with no request in progress for this long is closed (aiohttp's
keep-alive timeout)."""
_END_OF_HEAD: Final = b"\r\n\r\n"
_HANDED_OFF_HEADERS: Final = frozenset({"transfer-encoding", "expect", "upgrade"})
_RESUME_BELOW: Final[int] = 64 * 1024
_CLOSE_GRACE: Final[float] = 2.0
"""Seconds a lean request in progress gets to finish when the agent stops (as aiohttp's)."""


class LeanRequest:
    """What the lean routes read of a request, as aiohttp's `web.Request` spells it."""

    __slots__ = ("_query", "body", "headers", "match_info", "path", "query_string")
    method: Final = "POST"

    def __init__(self, path: str, match_info: dict[str, str], query_string: str,
                 headers: CIMultiDictProxy[str]) -> None:
        self.path = path
        self.match_info = match_info
        self.query_string = query_string
        self.headers = headers
        self.body = b""
        """Set once it is all here."""
        self._query: MultiDictProxy[str] | None = None

    @property
    def query(self) -> MultiDictProxy[str]:
        if self._query is None:
            self._query = MultiDictProxy(MultiDict(
                parse_qsl(self.query_string, keep_blank_values=True)))
        return self._query

    async def read(self) -> bytes:
        return self.body


class Front:
    """The protocol factory of the agent's listening socket."""

    def __init__(self, fallback: Callable[[], asyncio.Protocol],
                 lean: Mapping[str, tuple[str, ViewHandler]], body_limit: int) -> None:
        """`lean`: path prefix (``/v1/publish/``) -> (parameter name, guarded handler)."""
        self.fallback = fallback
        """aiohttp's protocol factory, which takes the connections handed off."""
        self._lean = dict(lean)
        self.body_limit = body_limit
        self.connections: set[FrontProtocol] = set()
        self._sweeper: asyncio.TimerHandle | None = None

    @classmethod
    def of(cls, runner: web.AppRunner, app: web.Application, templates: Collection[str],
           body_limit: int) -> Front:
        """A front serving the POST routes `templates` (``/v1/publish/{topic}``: one
        parameter, last) with the handlers `_http.add_routes` added to `app`, and handing
        the rest to `runner`'s aiohttp server (set up already)."""
        server = runner.server
        assert server is not None

        def fallback() -> asyncio.Protocol:
            protocol = server()
            protocol.__class__ = _JsonErrors  # (same layout: aiohttp's Server makes its own)
            return protocol

        lean = {}
        for template in templates:
            prefix, _, name = template.rpartition("/")
            lean[prefix + "/"] = (name.strip("{}"), app[GUARDED]["POST", template])
        return cls(fallback, lean, body_limit)

    def __call__(self) -> FrontProtocol:
        if self._sweeper is None:
            self._sweep()
        return FrontProtocol(self)

    def route(self, path: str) -> tuple[str, ViewHandler, str] | None:
        """(parameter name, handler, parameter) for a lean route's path, else None."""
        slash = path.rfind("/") + 1
        found = self._lean.get(path[:slash])
        param = path[slash:]
        if found is None or not param or param in (".", "..") or "%" in param:
            return None  # (aiohttp decodes it)
        return found[0], found[1], param

    def _sweep(self) -> None:
        now = time.monotonic()
        for conn in list(self.connections):
            conn.close_if_idle(now)
        self._sweeper = asyncio.get_running_loop().call_later(IDLE_SECONDS / 5, self._sweep)

    async def close(self, grace: float) -> None:
        """Close every connection still read here: at once if idle, else after its request
        (at most `grace` seconds)."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        busy = [conn.task for conn in self.connections if conn.task is not None]
        for conn in list(self.connections):
            conn.close_when_done()
        if busy:
            await asyncio.wait(busy, timeout=grace)  # (each answer is written as it ends)
        for conn in list(self.connections):
            conn.close()


class FrontProtocol(asyncio.Protocol):
    """One connection: lean requests one at a time, in order, until a hand-off."""

    def __init__(self, front: Front) -> None:
        self._front = front
        self._transport: asyncio.Transport | None = None
        self._loop = asyncio.get_running_loop()
        self._buf = bytearray()
        self._head: tuple[ViewHandler, int, LeanRequest, int] | None = None
        """The request whose body is still coming: handler, body length, request, and
        where in `_buf` its body starts."""
        self.task: asyncio.Task[web.StreamResponse] | None = None
        self._keep = True
        self._eof = False
        self._closing = False
        self._read_paused = False
        self._write_paused = False
        self._last = time.monotonic()

    # -- asyncio.Protocol --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # (a stream transport)
        self._front.connections.add(self)

    def data_received(self, data: bytes) -> None:
        self._buf += data
        if self.task is not None or self._write_paused:
            if len(self._buf) > self._front.body_limit + MAX_HEAD and not self._read_paused:
                self._read_paused = True
                assert self._transport is not None
                self._transport.pause_reading()
            return
        self._next()

    def eof_received(self) -> bool:
        """A client that closed its side gets the answers to the requests it sent whole,
        then the end."""
        self._eof = True
        return self.task is not None

    def connection_lost(self, exc: Exception | None) -> None:
        self._front.connections.discard(self)
        self._transport = None
        if self.task is not None:
            self.task.cancel()  # as aiohttp cancels a handler whose client went away

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if self.task is None:
            self._next()

    # -- closing -----------------------------------------------------------------------

    def close_if_idle(self, now: float) -> None:
        if self.task is None and now - self._last > IDLE_SECONDS:
            self.close()

    def close_when_done(self) -> None:
        self._closing = True
        if self.task is None:
            self.close()

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    # -- requests ----------------------------------------------------------------------

    def _next(self) -> None:
        """Start the next request if its head and body are all here (a head is read once,
        however many reads its body takes)."""
        buf = self._buf
        if self._transport is None or self._closing or not buf:
            return
        if self._head is None:
            end = buf.find(_END_OF_HEAD, 0, MAX_HEAD + 4)
            if end < 0:
                if len(buf) > MAX_HEAD or not buf.startswith(b"POST /"[:len(buf)]):
                    self._hand_off()
                return
            try:
                parsed = self._parse(buf[:end].decode("ascii"))
            except UnicodeDecodeError:
                parsed = None
            if parsed is None:
                self._hand_off()
                return
            self._head = (*parsed, end + 4)
        handler, length, request, start = self._head
        if len(buf) < start + length:
            return  # the body is not all here yet
        self._head = None
        request.body = bytes(buf[start:start + length])
        del buf[:start + length]
        self.task = task = self._loop.create_task(handler(request))
        task.add_done_callback(self._answer)

    def _parse(self, head: str) -> tuple[ViewHandler, int, LeanRequest] | None:
        """The handler, body length and request (body to come) of a plain request to a
        lean route (None: not plain, or not a lean route)."""
        lines = head.split("\r\n")
        method, _, rest = lines[0].partition(" ")
        target, _, version = rest.partition(" ")
        if method != "POST" or version != "HTTP/1.1" or not target.startswith("/"):
            return None
        path, _, query_string = target.partition("?")
        found = self._front.route(path)
        if found is None:
            return None
        pairs: list[tuple[str, str]] = []
        length = -1
        keep = True
        host = False
        for line in lines[1:]:
            name, colon, value = line.partition(":")
            if not colon or not is_token(name) or "\x00" in value:
                return None
            value = value.strip(" \t")
            key = name.lower()
            if key == "content-length":
                if length >= 0 or not value.isdigit():
                    return None
                length = int(value)
            elif key in _HANDED_OFF_HEADERS:
                return None
            elif key == "connection":
                keep = "close" not in value.lower()
            elif key == "host":
                host = True
            pairs.append((name, value))
        if length < 0 or length > self._front.body_limit or not host:
            return None  # (aiohttp answers HTTP/1.1 without a Host with a 400)
        self._keep = keep
        name, handler, param = found
        return handler, length, LeanRequest(path, {name: param}, query_string,
                                            CIMultiDictProxy(CIMultiDict(pairs)))

    def _answer(self, task: asyncio.Task[web.StreamResponse]) -> None:
        self.task = None
        self._last = time.monotonic()
        transport = self._transport
        if task.cancelled() or transport is None:
            return
        exc = task.exception()
        if exc is not None:  # (the guarded handler answers every Exception itself)
            _log.error("lean HTTP handler failed: %r", exc)
            transport.close()
            return
        keep = self._keep and not self._closing and not transport.is_closing()
        transport.writelines(_encode(task.result(), keep))
        if not keep:
            transport.close()
            return
        if self._read_paused and len(self._buf) < _RESUME_BELOW:
            self._read_paused = False
            transport.resume_reading()
        if not self._write_paused:
            self._next()
        if self._eof and self.task is None:
            self.close()  # (a no-op once handed off: aiohttp's then)

    def _hand_off(self) -> None:
        """aiohttp's protocol takes this connection from here, with what is unread."""
        transport = self._transport
        assert transport is not None
        self._front.connections.discard(self)
        self._transport = None
        if self._read_paused:
            transport.resume_reading()
        protocol = self._front.fallback()
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        data, self._buf = bytes(self._buf), bytearray()
        protocol.data_received(data)
        if self._eof and not protocol.eof_received():  # (as the loop would have done)
            transport.close()


class _JsonErrors(web_protocol.RequestHandler):
    """aiohttp's protocol, answering a request it cannot parse (a head over its limits, no
    Host, a bad chunk...) as the agent answers all bad input: ``{"error": ...}`` in JSON,
    not aiohttp's plain text."""

    __slots__ = ()

    def handle_error(self, request: BaseRequest, status: int = 500,
                     exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        plain = super().handle_error(request, status, exc, message)  # (it logs, and checks)
        reason = message if message and status < 500 else plain.reason or "error"
        answer = error(plain.status, reason)
        answer.force_close()
        return answer


def _encode(response: web.StreamResponse, keep: bool) -> tuple[bytes, bytes]:
    """The answer's head and body (written together, the body not copied into the head);
    header values in UTF-8, as aiohttp writes them."""
    body = getattr(response, "body", None) or b""
    if not isinstance(body, bytes | bytearray):  # (a payload object: not what these answer)
        _log.error("lean HTTP handler answered a %s, not bytes", type(body).__name__)
        response, body = web.Response(status=500), b""
    lines = [f"HTTP/1.1 {response.status} {response.reason}\r\n"
             f"Content-Length: {len(body)}\r\nDate: {_date()}\r\n"]
    for name, value in response.headers.items():
        if name.lower() != "content-length":
            lines.append(f"{name}: {value}\r\n")
    if not keep:
        lines.append("Connection: close\r\n")
    lines.append("\r\n")
    return "".join(lines).encode(), bytes(body)


@functools.lru_cache(maxsize=1)
def _date_of(second: int) -> str:
    return formatdate(second, usegmt=True)


def _date() -> str:
    """The Date header's value, formatted once a second."""
    return _date_of(int(time.time()))


class FrontSite(web.BaseSite):
    """An aiohttp site on TCP whose connections start on `Front`; `runner.cleanup()` stops
    it as any site (listener first, then its lean connections, then aiohttp's)."""

    def __init__(self, runner: web.AppRunner, front: Front, host: str, port: int) -> None:
        super().__init__(runner)
        self._host, self._port = host, port
        self.front = front

    @property
    def name(self) -> str:
        return f"http://{self._host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        self._server = await asyncio.get_running_loop().create_server(
            self.front, self._host, self._port, reuse_address=True)

    async def stop(self) -> None:
        await super().stop()
        await self.front.close(_CLOSE_GRACE)
