"""A lean HTTP/1.1 client for ``[[service]]`` apps: keep-alive POSTs, no task per request.

Why not aiohttp's client here: a service request is one small POST to one known
URL, and aiohttp's ``ClientSession`` spent ~150 µs of CPU on each (URL objects,
timers, tracing hooks, cookie jar, a task): more than the app's own aiohttp
server (benchmarks/README.md, services over HTTP). Here a request is one write
on a pooled connection and a future that the connection's protocol completes
from `data_received`; the caller gets that future, so the serving node needs no
task either.

What it speaks: HTTP/1.1 with keep-alive (``Connection: close`` and HTTP/1.0
are honoured), bodies by ``Content-Length``, chunked or until the connection
closes, interim 1xx answers skipped, ``gzip``/``deflate`` bodies inflated (none
are asked for), http and https. Failures are exceptions on the future:
`OSError` (connection refused, reset, closed before the answer was complete),
`TimeoutError` (the whole request took longer than its timeout; the connection
is dropped), `BadResponse` (not HTTP, or larger than the caller's limit).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import ssl
import zlib
from typing import Final, NamedTuple, cast
from urllib.parse import unquote, urlsplit

from .._support._text import quoted
from ._headers import sendable

MAX_HEAD: Final[int] = 64 * 1024
"""Bytes of status line and headers an answer may have."""
_END_OF_HEAD: Final = b"\r\n\r\n"
_NO_BODY: Final = frozenset({204, 304})


class BadResponse(Exception):
    """The app's answer is not HTTP this client reads, or is over the caller's size limit."""


class ClientClosed(ConnectionResetError):
    """The client closed before the request could be sent (a reload changed the url)."""


class Response(NamedTuple):
    status: int
    headers: list[tuple[str, str]]
    body: bytes


class AppClient:
    """POSTs to one URL over a pool of keep-alive connections (one request per connection at
    a time; the caller bounds how many run at once)."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{url!r} is not an http(s) URL")
        self.url = url
        self._host = parts.hostname
        self._port = parts.port or (443 if parts.scheme == "https" else 80)
        self._ssl = ssl.create_default_context() if parts.scheme == "https" else None
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        authority = parts.netloc.rpartition("@")[2]
        start = f"POST {target} HTTP/1.1\r\nHost: {authority}\r\n"
        if parts.username is not None:
            user = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
            start += f"Authorization: Basic {base64.b64encode(user.encode()).decode()}\r\n"
        self._start = start
        self._idle: list[_Connection] = []
        self._opening: set[asyncio.Task[None]] = set()
        self._closed = False

    def post(self, headers: dict[str, str], body: bytes, timeout: float,
             limit: int) -> asyncio.Future[Response]:
        """Send one POST; the future gets the answer (or the failure, see the module).

        A header whose name is not an HTTP token, or whose value has a line break, is left
        out (it cannot be sent, and sent as it is it would forge other headers)."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Response] = loop.create_future()
        lines = [self._start]
        for name, value in headers.items():
            if sendable(name, value):
                lines.append(f"{name}: {value}\r\n")
        lines.append(f"Content-Length: {len(body)}\r\n\r\n")
        data = "".join(lines).encode() + body
        if self._closed:
            fut.set_exception(ConnectionResetError("the client is closed"))
            return fut
        deadline = loop.time() + timeout
        idle = self._idle
        while idle:
            conn = idle.pop()
            if conn.usable:
                conn.send(fut, deadline, data, limit)
                return fut
        task = loop.create_task(self._open_and_send(fut, deadline, data, limit),
                                name="zeromesh-app-connect")
        self._opening.add(task)
        task.add_done_callback(self._opening.discard)
        task.add_done_callback(functools.partial(_unanswered, fut))
        return fut

    async def _open_and_send(self, fut: asyncio.Future[Response], deadline: float,
                             data: bytes, limit: int) -> None:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout_at(deadline):
                _, conn = await loop.create_connection(
                    lambda: _Connection(self), self._host, self._port, ssl=self._ssl,
                    server_hostname=self._host if self._ssl is not None else None)
        except (OSError, TimeoutError) as exc:  # (TimeoutError is an OSError)
            if not fut.done():
                fut.set_exception(exc)
            return
        if fut.done():  # cancelled while connecting: keep the connection for the next
            self.release(conn)
        else:
            conn.send(fut, deadline, data, limit)

    def release(self, conn: _Connection) -> None:
        """`conn` answered and may carry another request."""
        if self._closed or not conn.usable:
            conn.abort()
        else:
            self._idle.append(conn)

    def forget(self, conn: _Connection) -> None:
        with contextlib.suppress(ValueError):
            self._idle.remove(conn)

    async def aclose(self) -> None:
        """Close idle connections and stop connecting; requests in flight finish (their
        connections close after them)."""
        self._closed = True
        for task in list(self._opening):
            task.cancel()
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.abort()


def _unanswered(fut: asyncio.Future[Response], task: asyncio.Task[None]) -> None:
    """A connect cancelled by `AppClient.aclose` (a reload changed the url) ends its request
    too: left pending, it held the service's slot for good."""
    if task.cancelled() and not fut.done():
        fut.set_exception(ClientClosed("the app client closed while connecting"))


class _Connection(asyncio.Protocol):
    """One keep-alive connection: writes a request, parses its answer."""

    def __init__(self, client: AppClient) -> None:
        self._client = client
        self._transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._fut: asyncio.Future[Response] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._limit = 0
        self._head: tuple[int, list[tuple[str, str]]] | None = None
        self._length = -1
        """Body bytes to come: -1 until the head is read, -2 chunked, -3 until closed."""
        self._chunks: list[bytes] = []
        self._size = 0
        self._encoding = ""
        self._keep = True
        self.usable = False

    # -- asyncio.Protocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # (uvloop's is not a subclass)
        self.usable = True

    def connection_lost(self, exc: Exception | None) -> None:
        self.usable = False
        self._client.forget(self)
        if self._fut is None:
            return
        if self._length == -3:  # a body that ends with the connection
            try:
                self._complete()
            except BadResponse as exc:
                self._fail(exc)
        else:
            self._fail(ConnectionResetError("the app closed the connection before answering"
                                            if self._head is None else
                                            "the app closed the connection mid-answer"))

    def data_received(self, data: bytes) -> None:
        if self._fut is None:  # nothing asked: an app talking out of turn
            self.abort()
            return
        self._buf += data
        try:
            self._parse()
        except BadResponse as exc:
            self._fail(exc)

    # -- requests ------------------------------------------------------------------------

    def send(self, fut: asyncio.Future[Response], deadline: float, data: bytes,
             limit: int) -> None:
        self._fut, self._limit = fut, limit
        self._head, self._length, self._size, self._encoding = None, -1, 0, ""
        self._chunks = []
        assert self._transport is not None
        self._timer = asyncio.get_running_loop().call_at(deadline, self._expire)
        self._transport.write(data)

    def _expire(self) -> None:
        """Too late: the caller gets TimeoutError; the connection, which may still carry
        the rest of that answer, is dropped. (A cancelled caller's answer, by contrast, is
        read to its end and the connection kept.)"""
        self._timer = None
        self._fail(TimeoutError())

    def abort(self) -> None:
        self.usable = False
        if self._transport is not None:
            self._transport.abort()

    def _fail(self, exc: Exception) -> None:
        fut, self._fut = self._fut, None
        self.abort()
        if self._timer is not None:
            self._timer.cancel()
        if fut is not None and not fut.done():
            fut.set_exception(exc)

    def _complete(self) -> None:
        assert self._head is not None
        status, headers = self._head
        body = b"".join(self._chunks)
        if self._encoding:
            body = self._inflate(body)
        fut, self._fut = self._fut, None
        if self._timer is not None:
            self._timer.cancel()
        if self._keep and self._length != -3:
            self._client.release(self)
        else:
            self.abort()
        if fut is not None and not fut.done():
            fut.set_result(Response(status, headers, body))

    # -- parsing -------------------------------------------------------------------------

    def _parse(self) -> None:
        while self._fut is not None:
            if self._head is None:
                if not self._parse_head():
                    return
                continue
            if self._length >= 0:
                if len(self._buf) < self._length:
                    return
                self._body(bytes(self._buf[:self._length]))
                del self._buf[:self._length]
                self._complete()
            elif self._length == -2:
                if not self._parse_chunk():
                    return
            else:  # until the connection closes
                self._body(bytes(self._buf))
                self._buf.clear()
                return

    def _parse_head(self) -> bool:
        """Read the status line and headers when they are all here (False: not yet)."""
        end = self._buf.find(_END_OF_HEAD)
        if end < 0:
            if len(self._buf) > MAX_HEAD:
                raise BadResponse(f"app answer's headers exceed {MAX_HEAD} bytes")
            return False
        # UTF-8, as the headers of requests are read (their value is the text of a message
        # header); other bytes become lone surrogates, which `from_app` refuses by name
        lines = self._buf[:end].decode("utf-8", "surrogateescape").split("\r\n")
        del self._buf[:end + 4]
        version, _, rest = lines[0].partition(" ")
        code = rest[:3]
        if not version.startswith("HTTP/1.") or not code.isdigit() or rest[3:4] not in ("", " "):
            raise BadResponse(f"not an HTTP/1.x answer: {lines[0][:64]!r}")
        status = int(code)
        headers: list[tuple[str, str]] = []
        length: int | None = None
        chunked = False
        keep = version != "HTTP/1.0"
        for line in lines[1:]:
            name, colon, value = line.partition(":")
            if not colon or not name or name[-1] in " \t" or name[0] in " \t":
                raise BadResponse(f"bad header line in the app's answer: {line[:64]!r}")
            value = value.strip()
            headers.append((name, value))
            key = name.lower()
            if key == "content-length":
                if not value.isdigit() or (length is not None and int(value) != length):
                    raise BadResponse(f"bad Content-Length {value[:32]!r}")
                length = int(value)
            elif key == "transfer-encoding":
                chunked = value.lower().rsplit(",", 1)[-1].strip() == "chunked"
            elif key == "connection":
                tokens = {t.strip() for t in value.lower().split(",")}
                keep = "close" not in tokens and (keep or "keep-alive" in tokens)
            elif key == "content-encoding":
                self._encoding = value.lower()
        if 100 <= status < 200:  # interim (100 Continue...): the answer follows
            self._encoding = ""
            return True
        self._head = (status, headers)
        self._keep = keep
        if status in _NO_BODY:
            self._length = 0
        elif chunked:
            self._length = -2
        elif length is not None:
            if length > self._limit:
                raise BadResponse(f"app reply of {length} bytes exceeds max_message_size "
                                  f"{self._limit}")
            self._length = length
        else:
            self._length = -3
        return True

    def _parse_chunk(self) -> bool:
        """Take one chunk (or the last one and its trailers) when it is all here."""
        buf = self._buf
        line_end = buf.find(b"\r\n")
        if line_end < 0:
            if len(buf) > MAX_HEAD:
                raise BadResponse("bad chunk in the app's answer")
            return False
        size_text = bytes(buf[:line_end]).split(b";", 1)[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError:
            raise BadResponse(f"bad chunk size {size_text[:32]!r}") from None
        if size == 0:  # the last chunk; then trailers (ignored) up to an empty line
            if buf[line_end:line_end + 4] == _END_OF_HEAD[:4] and len(buf) >= line_end + 4:
                del buf[:line_end + 4]
            else:
                end = buf.find(_END_OF_HEAD, line_end)
                if end < 0:
                    return False
                del buf[:end + 4]
            self._complete()
            return True
        if self._size + size > self._limit:  # (before it is all here: it may never end)
            raise BadResponse(f"app reply exceeds max_message_size {self._limit}")
        if len(buf) < line_end + 2 + size + 2:
            return False
        self._body(bytes(buf[line_end + 2:line_end + 2 + size]))
        del buf[:line_end + 2 + size + 2]
        return True

    def _body(self, data: bytes) -> None:
        self._size += len(data)
        if self._size > self._limit:
            raise BadResponse(f"app reply exceeds max_message_size {self._limit}")
        self._chunks.append(data)

    def _inflate(self, body: bytes) -> bytes:
        if self._encoding not in ("gzip", "x-gzip", "deflate"):
            raise BadResponse(f"app reply in an unknown Content-Encoding {quoted(self._encoding)}")
        try:
            inflater = zlib.decompressobj(47)  # a gzip or a zlib header
            out = inflater.decompress(body, self._limit + 1)
        except zlib.error as exc:
            raise BadResponse(f"app reply does not inflate: {exc}") from None
        if len(out) > self._limit:
            raise BadResponse(f"app reply exceeds max_message_size {self._limit}")
        return out
