"""The agent's lean HTTP front (`mesh/_agent/_front.py`) against a real agent process, over
raw sockets: plain requests to the hot routes are answered by the front, exactly as aiohttp
answers them; anything else is handed to aiohttp, on the same connection, mid-stream.

Who answered is visible: aiohttp's answers carry a ``Server`` header, the front's do not.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any

import pytest
from aiohttp import web

from mesh import AsyncNode, Reply
from mesh._agent import _front

from ..helpers import aeventually
from ._agent import AgentProc, start_agent
from ._proc import Cli
from .conftest import MakeNode

pytestmark = pytest.mark.timeout(60)

WAIT = 10.0


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def by_aiohttp(self) -> bool:
        return "server" in self.headers

    def json(self) -> Any:
        return json.loads(self.body)


class Conn:
    """One keep-alive HTTP/1.1 connection, bytes written as given."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def to(cls, agent: AgentProc) -> Conn:
        return cls(*await asyncio.open_connection(*agent.address))

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def answer(self) -> Answer:
        async with asyncio.timeout(WAIT):
            head = await self.reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            status = int(lines[0].split(" ")[1])
            headers = {}
            for line in lines[1:]:
                if line:
                    name, _, value = line.partition(":")
                    headers[name.lower()] = value.strip()
            if headers.get("transfer-encoding") == "chunked":
                body = b""
                while size := int((await self.reader.readline()).strip(), 16):
                    body += await self.reader.readexactly(size + 2)
                    body = body[:-2]
                await self.reader.readline()
            else:
                body = await self.reader.readexactly(int(headers.get("content-length", "0")))
            return Answer(status, headers, body)

    async def closed(self) -> bool:
        """Did the agent close the connection (EOF within the wait)?"""
        async with asyncio.timeout(WAIT):
            return await self.reader.read(1) == b""

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()


def post(path: str, body: bytes = b"x", headers: str = "", chunked: bool = False) -> bytes:
    """A POST as a client writes it; `chunked` sends the body in one chunk instead of with
    a Content-Length (which the front hands to aiohttp)."""
    if chunked:
        framing = "Transfer-Encoding: chunked\r\n"
        payload = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body) if body else b"0\r\n\r\n"
    else:
        framing, payload = f"Content-Length: {len(body)}\r\n", body
    return (f"POST {path} HTTP/1.1\r\nHost: agent\r\n{headers}{framing}\r\n").encode() + payload


def get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: agent\r\n\r\n".encode()


CASES = [
    ("/v1/publish/front.a", "", 202),
    ("/v1/publish/front.a?retain=true&ttl=30", "X-Tenant: acme\r\n", 202),
    ("/v1/publish/a..b", "", 400),
    ("/v1/publish/a?colour=red", "", 400),
    ("/v1/publish/a?reliable=maybe", "", 400),
    ("/v1/publish/a?reliable=true", "", 400),  # no data dir
    ("/v1/push/a.>", "", 400),
    ("/v1/push/front.q?timeout=0.2", "", 503),  # no worker
    ("/v1/request/nobody?timeout=0.3&retries=0", "", 503),
    ("/v1/request/svc?all=true&retries=1", "", 400),
    ("/v1/request/svc?timeout=-1", "", 400),
    ("/v1/request/echo", "traceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
                         "\r\nAccept: application/json\r\n", 200),
]


async def _echo(make_node: MakeNode) -> AsyncNode:
    node = await make_node("echo-server")

    async def echo(msg: Any) -> bytes:
        return bytes(msg.data)

    await node.serve("echo", echo)
    return node


async def test_plain_requests_get_the_front_and_the_same_answer_as_from_aiohttp(
        procs: list[Cli], mesh_name: str, make_node: MakeNode) -> None:
    """Each case twice: with a Content-Length (the front) and chunked, on a connection
    that aiohttp took over at its first chunked request: same status, same headers but
    Date and Server, same body."""
    await _echo(make_node)
    agent = start_agent(procs, mesh=mesh_name, name="front")
    conn, aiohttp_conn = await Conn.to(agent), await Conn.to(agent)
    await _known(conn, "echo")
    for path, headers, status in CASES:
        lean = await _ask(conn, post(path, b'{"n": 1}', headers))
        full = await _ask(aiohttp_conn, post(path, b'{"n": 1}', headers, chunked=True))
        assert (lean.by_aiohttp, full.by_aiohttp) == (False, True), path
        assert lean.status == full.status == status, (path, lean, full)
        strip = {"date", "server"}
        assert {k: v for k, v in lean.headers.items() if k not in strip} == \
               {k: v for k, v in full.headers.items() if k not in strip}, path
        if status == 200:
            assert lean.body == full.body == b'{"n": 1}'
        else:
            assert lean.json() == full.json(), path
    await conn.close()
    await aiohttp_conn.close()


async def _known(conn: Conn, service: str) -> None:
    """Wait until the agent knows a server of `service` (it answers 503 before)."""
    async def answered() -> bool:
        answer = await _ask(conn, post(f"/v1/request/{service}?timeout=0.2&retries=0"))
        return answer.status != 503

    await aeventually(answered, WAIT, 0.05, message=f"the agent knows a server of {service}")


async def _ask(conn: Conn, request: bytes) -> Answer:
    """The final answer to `request` (interim 1xx answers skipped)."""
    await conn.send(request)
    while (answer := await conn.answer()).status < 200:
        pass
    return answer


async def test_a_reply_header_that_would_break_the_answer_is_left_out(
        procs: list[Cli], mesh_name: str, make_node: MakeNode) -> None:
    """The front writes a service's reply headers itself: a name that is no HTTP token
    (one ending in a line break would start a header of its own) is not written; a value
    outside Latin-1 goes out in UTF-8, as aiohttp writes it."""
    node = await make_node("forger")

    async def forge(msg: Any) -> Reply:
        return Reply(b"ok", {"x-evil\n": "Injected: 1", "x-fine": "1", "x-word": "café €"})

    await node.serve("forge", forge)
    agent = start_agent(procs, mesh=mesh_name, name="front")
    conn = await Conn.to(agent)
    await _known(conn, "forge")
    answer = await _ask(conn, post("/v1/request/forge"))
    assert (answer.status, answer.body, answer.by_aiohttp) == (200, b"ok", False)
    assert answer.headers["x-fine"] == "1"
    assert answer.headers["x-word"] == "café €".encode().decode("latin-1")  # UTF-8, as aiohttp
    assert "injected" not in answer.headers
    assert not any("evil" in name for name in answer.headers), answer.headers
    await conn.close()


async def test_a_header_that_is_not_utf8_is_a_400_and_the_agent_goes_on(
        procs: list[Cli], mesh_name: str, make_node: MakeNode) -> None:
    """A header value with a byte that is not UTF-8 could travel in no message (it used to
    be answered 202 and then take the agent's whole next batch, other clients' messages too,
    with it): every route answers 400, by the front and by aiohttp alike, and the agent
    publishes, retains and serves as before."""
    await _echo(make_node)
    sub_node = await make_node("sub")
    sub = await sub_node.subscribe("utf.>")
    agent = start_agent(procs, mesh=mesh_name, name="front")
    conn = await Conn.to(agent)
    await _known(conn, "echo")

    async def heard() -> bool:
        await _ask(conn, post("/v1/publish/utf.ping", b"ping"))
        try:
            return (await sub.next(timeout=0.1)).topic == "utf.ping"
        except TimeoutError:
            return False

    await aeventually(heard, WAIT, 0, message="the subscriber hears the agent")
    for path in ("/v1/publish/utf.bad", "/v1/publish/utf.bad?retain=true",
                 "/v1/push/utf.q", "/v1/request/echo"):
        for chunked in (False, True):
            request = post(path, b"x", "X-Note: cafXX\r\n", chunked).replace(b"XX", b"\xe9")
            answer = await _ask(conn, request)
            assert answer.status == 400, (path, chunked, answer)
            assert "not UTF-8" in answer.json()["error"]
    assert (await _ask(conn, post("/v1/publish/utf.good?retain=true", b"kept"))).status == 202
    while (msg := await sub.next(timeout=WAIT)).topic == "utf.ping":
        pass
    assert (msg.topic, msg.data) == ("utf.good", b"kept")  # (nothing of the bad ones came)
    last = await _ask(conn, get("/v1/last/utf.%3E"))
    assert [m["topic"] for m in last.json()] == ["utf.good"]
    echoed = await _ask(conn, post("/v1/request/echo", b"still"))
    assert (echoed.status, echoed.body) == (200, b"still")
    await conn.close()


async def test_pipelined_split_and_mixed_requests_are_answered_in_order(
        procs: list[Cli], mesh_name: str) -> None:
    """Requests written together are answered in order; one written a byte at a time is
    answered once whole; a GET after lean POSTs on the same connection goes to aiohttp
    (the hand-off keeps the bytes already read), which then answers the rest."""
    agent = start_agent(procs, mesh=mesh_name, name="front")
    conn = await Conn.to(agent)
    await conn.send(post("/v1/publish/p.one") + post("/v1/publish/p.two?retain=1"))
    first, second = await conn.answer(), await conn.answer()
    assert (first.status, first.json()["topic"], first.by_aiohttp) == (202, "p.one", False)
    assert (second.json()["topic"], second.json()["retain"]) == ("p.two", True)
    for byte in post("/v1/publish/p.three", b"abc"):
        await conn.send(bytes([byte]))
    third = await conn.answer()
    assert (third.status, third.json()["topic"], third.by_aiohttp) == (202, "p.three", False)
    await conn.send(post("/v1/publish/p.four") + get("/healthz") + post("/v1/publish/p.five"))
    four, health, five = await conn.answer(), await conn.answer(), await conn.answer()
    assert (four.json()["topic"], four.by_aiohttp) == ("p.four", False)
    assert (health.status, health.json()["status"], health.by_aiohttp) == (200, "ok", True)
    assert (five.status, five.json()["topic"], five.by_aiohttp) == (202, "p.five", True)
    await conn.close()


@pytest.mark.parametrize(("request_bytes", "status"), [
    (post("/v1/publish/big", b"x" * 70_000), 413),  # over ZEROMESH_MAX_BODY
    (b"POST /v1/publish/a HTTP/1.0\r\nContent-Length: 1\r\n\r\nx", 202),
    (post("/v1/publish/a", headers="Expect: 100-continue\r\n"), 202),
    (post("/v1/publish/a%2Eb"), 202),  # an encoded parameter: aiohttp decodes it
    (post("/v1/publish/a", headers="Content-Length: 1\r\n"), 400),  # two lengths
    (post("/v1/publish/a", headers="Bad Header: x\r\n"), 400),
    (b"POST /v1/publish/a HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n", 400),
    (b"PUT /v1/publish/a HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\n\r\nx", 405),
    (b"POST /v1/publish/a HTTP/1.1\r\nContent-Length: 1\r\n\r\nx", 400),  # no Host
])
async def test_what_is_not_plain_goes_to_aiohttp(procs: list[Cli], mesh_name: str,
                                                 request_bytes: bytes, status: int) -> None:
    """aiohttp's answer, not the front's, for what the front does not read itself; the
    agent goes on answering."""
    agent = start_agent(procs, mesh=mesh_name, name="front",
                        env={"ZEROMESH_MAX_BODY": "65536"})
    conn = await Conn.to(agent)
    answer = await _ask(conn, request_bytes)
    assert (answer.status, answer.by_aiohttp) == (status, True), answer
    await conn.close()
    conn = await Conn.to(agent)
    answer = await _ask(conn, post("/v1/publish/after"))
    assert (answer.status, answer.by_aiohttp) == (202, False)
    await conn.close()


async def test_a_request_aiohttp_cannot_parse_is_one_warning_line(
        procs: list[Cli], mesh_name: str) -> None:
    """The client's mistake gets its 400; the agent's log gets one line, not a traceback."""
    agent = start_agent(procs, mesh=mesh_name, name="front")
    log = agent.cli.log
    conn = await Conn.to(agent)
    answer = await _ask(conn, b"POST /v1/publish/a HTTP/1.1\r\nHost: a\r\n"
                              b"Transfer-Encoding: gzip\r\n\r\n")
    assert answer.status == 400
    assert "error" in answer.json()  # (JSON, as every bad input is answered)
    await conn.close()
    line = await asyncio.to_thread(log.wait_for, "Error handling request", WAIT)
    assert " WARNING aiohttp.server: " in line
    assert "400" in line
    conn = await Conn.to(agent)
    assert (await _ask(conn, post("/v1/publish/after"))).status == 202
    await conn.close()
    assert not any("Traceback" in seen for seen in log.lines), log.lines


@pytest.mark.parametrize("request_bytes", [
    b"POST /v1/publish/a HTTP/1.1\r\nContent-Length: 1\r\n\r\nx",  # no Host
    b"POST /v1/publish/" + b"a" * 9000 + b" HTTP/1.1\r\nHost: a\r\n\r\n",  # head too long
    b"POST /v1/publish/a HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n",
    b"POST /v1/publish/a HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"POST /v1/publish/a HTTP/9.9\r\nHost: a\r\nContent-Length: 1\r\n\r\nx",
], ids=["no-host", "long-head", "negative-length", "bad-chunk", "http-9.9"])
async def test_what_aiohttp_cannot_parse_is_a_json_400_too(
        procs: list[Cli], mesh_name: str, request_bytes: bytes) -> None:
    """aiohttp's parser answers these; its answer is JSON as every other bad input's."""
    agent = start_agent(procs, mesh=mesh_name, name="front")
    conn = await Conn.to(agent)
    answer = await _ask(conn, request_bytes)
    assert answer.status == 400, answer
    assert answer.headers["content-type"].startswith("application/json")
    assert answer.json()["error"]
    await conn.close()


async def test_connection_close_and_a_half_closed_client_end_the_connection(
        procs: list[Cli], mesh_name: str) -> None:
    """``Connection: close`` is answered, then the connection ends; a client that closed
    its side after two requests gets both answers, then the end."""
    agent = start_agent(procs, mesh=mesh_name, name="front")
    conn = await Conn.to(agent)
    answer = await _ask(conn, post("/v1/publish/c.a", headers="Connection: close\r\n"))
    assert (answer.status, answer.headers.get("connection")) == (202, "close")
    assert await conn.closed()
    await conn.close()
    conn = await Conn.to(agent)
    await conn.send(post("/v1/publish/c.b") + post("/v1/publish/c.c"))
    conn.writer.write_eof()
    answers = [await conn.answer(), await conn.answer()]
    assert [(a.status, a.json()["topic"], a.by_aiohttp) for a in answers] == [
        (202, "c.b", False), (202, "c.c", False)]
    assert await conn.closed()
    await conn.close()


async def test_a_client_gone_mid_request_cancels_the_request(
        procs: list[Cli], mesh_name: str, make_node: MakeNode) -> None:
    """As aiohttp cancels a handler whose client left: the mesh request ends at once (the
    metrics count it as an error), not at its 30 s timeout."""
    node = await make_node("slow-server")
    release, arrived = asyncio.Event(), asyncio.Event()

    async def slow(msg: Any) -> bytes:
        if msg.data == b"the one":
            arrived.set()
        await release.wait()
        return b"late"

    await node.serve("slow", slow)
    agent = start_agent(procs, mesh=mesh_name, name="front")
    conn = await Conn.to(agent)
    await _known(conn, "slow")
    before = await _request_errors(agent)
    await conn.send(post("/v1/request/slow?timeout=30&retries=0", b"the one"))
    async with asyncio.timeout(WAIT):
        await arrived.wait()  # the request is in progress at the server
    sock = conn.writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    conn.writer.close()  # (a reset: the agent sees the client gone at once)
    await aeventually(lambda: _more(_request_errors(agent), before), WAIT, 0.05,
                      message="the cancelled request counted as an error")
    release.set()


async def _more(count: Awaitable[float], than: float) -> bool:
    return await count > than


async def _request_errors(agent: AgentProc) -> float:
    conn = await Conn.to(agent)
    metrics = (await _ask(conn, get("/metrics"))).body.decode()
    await conn.close()
    total = 0.0
    for line in metrics.splitlines():
        if line.startswith("zeromesh_requests_total{") and 'outcome="error"' in line \
                and 'service="slow"' in line:
            total += float(line.rpartition(" ")[2])
    return total


async def test_the_agent_stops_promptly_with_idle_and_busy_lean_connections(
        procs: list[Cli], mesh_name: str, make_node: MakeNode) -> None:
    """SIGTERM: an idle keep-alive connection is closed, one with a request in progress
    is closed within the grace, and the agent exits."""
    node = await make_node("stuck-server")
    arrived = asyncio.Event()

    async def stuck(msg: Any) -> bytes:
        if msg.data == b"the one":
            arrived.set()
        await asyncio.Event().wait()
        return b""

    await node.serve("stuck", stuck)
    agent = start_agent(procs, mesh=mesh_name, name="front")
    idle = await Conn.to(agent)
    assert (await _ask(idle, post("/v1/publish/s.a"))).status == 202
    busy = await Conn.to(agent)
    await _known(busy, "stuck")
    await busy.send(post("/v1/request/stuck?timeout=60&retries=0", b"the one"))
    async with asyncio.timeout(WAIT):
        await arrived.wait()  # the busy connection's request is in progress
    stopped = time.monotonic()
    agent.cli.term()
    assert await idle.closed()
    assert await busy.closed()
    assert await asyncio.to_thread(agent.cli.wait, 15) == 0
    assert time.monotonic() - stopped < 2 * _front._CLOSE_GRACE + 3  # its grace, aiohttp's
    await idle.close()
    await busy.close()


async def test_an_idle_connection_is_closed_after_idle_seconds_and_a_busy_one_is_not() -> None:
    """The front's keep-alive timeout (aiohttp's is 75 s too), checked in process against a
    clock moved forward rather than waited out: the sweeper calls `close_if_idle` with the
    time every IDLE_SECONDS / 5."""
    release = asyncio.Event()

    async def held(request: Any) -> web.StreamResponse:
        await release.wait()
        return web.Response(status=202)

    front = _front.Front(asyncio.Protocol, {"/v1/publish/": ("topic", held)}, 1024)
    server = await asyncio.get_running_loop().create_server(front, "127.0.0.1", 0)
    address = server.sockets[0].getsockname()[:2]
    try:
        idle = Conn(*await asyncio.open_connection(*address))
        busy = Conn(*await asyncio.open_connection(*address))
        await busy.send(post("/v1/publish/t"))
        await aeventually(lambda: len(front.connections) == 2
                          and any(c.task is not None for c in front.connections), WAIT)
        assert front._sweeper is not None  # (the first connection started it)
        for conn in list(front.connections):
            conn.close_if_idle(time.monotonic())  # not idle for long yet: both stay
        assert not any(c._transport is None or c._transport.is_closing()
                       for c in front.connections)
        later = time.monotonic() + _front.IDLE_SECONDS + 1
        for conn in list(front.connections):
            conn.close_if_idle(later)
        assert await idle.closed()
        assert len(front.connections) == 1  # the busy one stays...
        release.set()
        assert (await busy.answer()).status == 202  # ...and answers
        for conn in list(front.connections):
            conn.close_if_idle(time.monotonic() + _front.IDLE_SECONDS + 1)
        assert await busy.closed()
        await idle.close()
        await busy.close()
    finally:
        await front.close(1.0)
        server.close()
        await server.wait_closed()
