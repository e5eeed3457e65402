"""The ``[[service]]`` app client speaks the HTTP/1.1 that apps answer with: real sockets,
a raw server on 127.0.0.1 that writes the answer under test byte for byte."""

from __future__ import annotations

import asyncio
import gzip
from collections.abc import AsyncIterator, Callable

import pytest

from mesh._agent._app_client import AppClient, BadResponse

pytestmark = pytest.mark.timeout(30)

Answer = Callable[[bytes], bytes | None]
"""The server's answer to one request (its raw bytes); None closes the connection."""


class RawServer:
    """Reads one request at a time (head + Content-Length body) and writes `answer`'s bytes;
    closes the connection after an HTTP/1.0 or ``Connection: close`` answer, as servers do."""

    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.requests: list[bytes] = []
        self.connections = 0
        self.server: asyncio.Server | None = None
        self.url = ""

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}/app?x=1"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length:"))
                request = head + await reader.readexactly(length)
                self.requests.append(request)
                out = self.answer(request)
                if out is None:
                    break
                writer.write(out)
                await writer.drain()
                if out.startswith(b"HTTP/1.0") or b"Connection: close" in out:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@pytest.fixture
async def raw() -> AsyncIterator[Callable[[Answer], RawServer]]:
    made: list[RawServer] = []

    def make(answer: Answer) -> RawServer:
        server = RawServer(answer)
        made.append(server)
        return server

    yield make
    for server in made:
        if server.server is not None:
            server.server.close()
            await server.server.wait_closed()


async def _started(raw: Callable[[Answer], RawServer], answer: Answer) -> RawServer:
    server = raw(answer)
    await server.start()
    return server


def _ok(body: bytes, *extra: str) -> bytes:
    head = "".join(f"{line}\r\n" for line in extra)
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), head.encode(),
                                                                   body)


async def test_keep_alive_reuses_one_connection_and_sends_headers_and_body(
        raw: Callable[[Answer], RawServer]) -> None:
    """Three POSTs, one connection; the request carries the path, Host, headers and body."""
    server = await _started(raw, lambda req: _ok(req.rpartition(b"\r\n\r\n")[2].upper(),
                                                 "X-App: yes"))
    client = AppClient(server.url)
    try:
        for i in range(3):
            answer = await client.post({"x-zeromesh-id": f"m{i}", "bad": "a\r\nb",
                                        "evil: x\r\nforged": "1", "": "empty"}, b"hi",
                                       5.0, 1000)
            assert (answer.status, answer.body) == (200, b"HI")
            assert ("X-App", "yes") in answer.headers
    finally:
        await client.aclose()
    assert server.connections == 1
    first = server.requests[0]
    assert first.startswith(b"POST /app?x=1 HTTP/1.1\r\nHost: 127.0.0.1:")
    assert b"x-zeromesh-id: m0\r\n" in first
    assert b"bad:" not in first  # a value with a line break cannot be sent
    assert b"forged" not in first  # nor a name that is no token
    assert b"evil" not in first
    assert b"empty" not in first
    assert first.endswith(b"Content-Length: 2\r\n\r\nhi")


@pytest.mark.parametrize(("raw_answer", "body"), [
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\nTrailer: t\r\n\r\n", b"abcde"),
    (b"HTTP/1.1 100 Continue\r\n\r\n" + _ok(b"after"), b"after"),
    (b"HTTP/1.1 204 No Content\r\n\r\n", b""),
    (b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n\r\n%s"
     % (len(gzip.compress(b"zipped")), gzip.compress(b"zipped")), b"zipped"),
])
async def test_bodies_by_chunks_interim_answers_no_body_and_gzip(
        raw: Callable[[Answer], RawServer], raw_answer: bytes, body: bytes) -> None:
    server = await _started(raw, lambda req: raw_answer)
    client = AppClient(server.url)
    try:
        for _ in range(2):  # and the connection is still good for the next
            answer = await client.post({}, b"x", 5.0, 1000)
            assert answer.body == body
    finally:
        await client.aclose()
    assert server.connections == 1


async def test_a_body_that_ends_with_the_connection_and_connection_close(
        raw: Callable[[Answer], RawServer]) -> None:
    """HTTP/1.0 without a length: the body is what comes until the close; ``Connection:
    close`` is honoured (the next request opens a new connection)."""
    answers = iter([b"HTTP/1.0 200 OK\r\n\r\nuntil the end",
                    _ok(b"closing", "Connection: close"), _ok(b"third")])
    server = await _started(raw, lambda req: next(answers))
    client = AppClient(server.url)
    try:
        assert (await client.post({}, b"1", 5.0, 1000)).body == b"until the end"
        assert (await client.post({}, b"2", 5.0, 1000)).body == b"closing"
        assert (await client.post({}, b"3", 5.0, 1000)).body == b"third"
    finally:
        await client.aclose()
    assert server.connections == 3


@pytest.mark.parametrize(("raw_answer", "error"), [
    (b"SSH-2.0-OpenSSH\r\n\r\n", "not an HTTP/1.x answer"),
    (b"HTTP/1.1 200 OK\r\n bad: fold\r\n\r\n", "bad header line"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n", "bad Content-Length"),
    (_ok(b"y" * 2000), "exceeds max_message_size 1000"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "bad chunk size"),
    # a chunk announced over the limit fails at once (it was buffered until it all came,
    # up to gigabytes; here half of it comes, then nothing: a timeout, not this error)
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n7fffffff\r\n" + b"y" * 600,
     "exceeds max_message_size 1000"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n300\r\n" + b"y" * 768
     + b"\r\n300\r\n", "exceeds max_message_size 1000"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 5\r\n\r\nokabc",
     "bad Content-Length"),  # (two lengths: which one ends the body is ambiguous)
    (b"HTTP/1.1 200 OK\r\nContent-Encoding: br\r\nContent-Length: 1\r\n\r\nx",
     "unknown Content-Encoding"),
    (b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n\r\n%s"
     % (len(gzip.compress(b"z" * 5000)), gzip.compress(b"z" * 5000)),
     "exceeds max_message_size 1000"),
])
async def test_bad_answers_are_clear_errors(raw: Callable[[Answer], RawServer],
                                            raw_answer: bytes, error: str) -> None:
    server = await _started(raw, lambda req: raw_answer)
    client = AppClient(server.url)
    try:
        with pytest.raises(BadResponse, match=error):
            await client.post({}, b"x", 5.0, 1000)
    finally:
        await client.aclose()


async def test_timeout_mid_answer_drops_the_connection(
        raw: Callable[[Answer], RawServer]) -> None:
    """Half an answer, then silence: TimeoutError at the timeout, and the next request gets
    a fresh connection (the rest of the old answer must not be read as the new one's)."""
    answers = iter([b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf", _ok(b"fresh")])
    server = await _started(raw, lambda req: next(answers))
    client = AppClient(server.url)
    loop = asyncio.get_running_loop()
    try:
        started = loop.time()
        with pytest.raises(TimeoutError):
            await client.post({}, b"x", 0.2, 1000)
        assert 0.15 < loop.time() - started < 2
        assert (await client.post({}, b"y", 5.0, 1000)).body == b"fresh"
    finally:
        await client.aclose()
    assert server.connections == 2


async def test_refused_and_closed_before_answering_are_os_errors(
        raw: Callable[[Answer], RawServer]) -> None:
    server = await _started(raw, lambda req: None)  # reads the request, closes
    client = AppClient(server.url)
    try:
        with pytest.raises(ConnectionResetError, match="before answering"):
            await client.post({}, b"x", 5.0, 1000)
    finally:
        await client.aclose()
    assert server.server is not None
    server.server.close()
    await server.server.wait_closed()
    client = AppClient(server.url)
    try:
        with pytest.raises(ConnectionRefusedError):
            await client.post({}, b"x", 5.0, 1000)
    finally:
        await client.aclose()



@pytest.mark.parametrize("connecting", [False, True])
async def test_a_request_still_connecting_fails_at_once_when_the_client_closes(
        raw: Callable[[Answer], RawServer], connecting: bool) -> None:
    """A reload that changes a ``[[service]]`` url closes the old client: a request whose
    connection was still opening had its connect cancelled and its future left pending, so
    the requester waited its whole timeout and the service's slot stayed taken for good
    (with concurrency 1, every later request timed out too)."""
    server = await _started(raw, lambda req: _ok(b"late"))
    client = AppClient(server.url)
    answer = client.post({}, b"x", 5.0, 1000)
    if connecting:
        await asyncio.sleep(0)  # (the connect under way)
    await client.aclose()
    async with asyncio.timeout(1):
        with pytest.raises(ConnectionResetError, match="closed while connecting"):
            await answer


def test_a_url_that_is_not_http_is_refused() -> None:
    with pytest.raises(ValueError, match="not an http"):
        AppClient("ftp://127.0.0.1/x")
