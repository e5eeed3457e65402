"""Reply headers and scatter-gather through the CLI (`req --json`, `req --all`) and the
agent (`POST /v1/request/{service}`, `?all=true`): real processes, in-process servers.

The servers run on the test's loop, so the CLI children are waited for in a
thread (`_finish`): the loop stays free to answer them.
"""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest

from mesh import AsyncNode, Message, Reply

from ._agent import start_agent, wait_status
from ._proc import Cli
from .conftest import FAST_ENV, MakeNode
from .test_services import _servers

pytestmark = pytest.mark.timeout(60)

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def _with_headers(msg: Message) -> Reply:
    return Reply(b"re:" + msg.data, {"traceparent": TRACEPARENT, "x-cache": "hit",
                                     "server": "s", "content-type": "text/plain"})


async def _three(make_node: MakeNode, release: asyncio.Event) -> AsyncNode:
    """Three servers of ``all.svc``: two answer at once (with a header), one never in time."""

    async def slow(msg: Message) -> bytes:
        await release.wait()
        return b"late"

    def fast(msg: Message) -> Reply:
        return Reply(b"re:" + msg.data, {"x-n": "1"})

    client = await make_node("watcher")
    await _servers(make_node, client, "all.svc", [fast, slow, fast])
    return client


async def _finish(procs: list[Cli], mesh: str, *args: str) -> tuple[int, list[str], str]:
    """Run ``zeromesh ARGS`` to its end: (exit status, stdout lines, stderr)."""
    cli = Cli(list(args), mesh=mesh, env=FAST_ENV)
    procs.append(cli)
    code = await asyncio.to_thread(cli.wait, 30)
    lines = await asyncio.to_thread(cli.all_lines)
    return code, lines, await asyncio.to_thread(cli.stderr)


async def test_req_json_shows_the_reply_headers(procs: list[Cli], mesh_name: str,
                                                make_node: MakeNode) -> None:
    client = await make_node("watcher")
    await _servers(make_node, client, "h.svc", [_with_headers])
    code, lines, err = await _finish(procs, mesh_name, "req", "h.svc", "ping", "--json")
    assert code == 0, err
    [reply] = [json.loads(line) for line in lines]
    assert (reply["service"], reply["data"], reply["source"]) == ("h.svc", "re:ping", "s0")
    assert reply["headers"]["traceparent"] == TRACEPARENT


async def test_req_all_prints_one_line_per_reply(procs: list[Cli], mesh_name: str,
                                                 make_node: MakeNode,
                                                 release: asyncio.Event) -> None:
    """Two of three servers answer within --timeout: two lines (plain, then JSON), exit 0."""
    await _three(make_node, release)
    code, lines, err = await _finish(procs, mesh_name, "req", "all.svc", "q", "--all",
                                     "--timeout", "3")
    assert code == 0, err
    assert sorted(lines) == ["s0 re:q", "s2 re:q"]
    code, lines, err = await _finish(procs, mesh_name, "req", "all.svc", "j", "--all", "--json",
                                     "--timeout", "3")
    assert code == 0, err
    replies = sorted((json.loads(line) for line in lines), key=lambda r: r["source"])
    assert [(r["source"], r["data"], r["headers"]) for r in replies] == [
        ("s0", "re:j", {"x-n": "1"}), ("s2", "re:j", {"x-n": "1"})]


async def test_req_all_when_every_server_fails_says_so(procs: list[Cli], mesh_name: str,
                                                       make_node: MakeNode) -> None:
    """Every server answered with an error: exit 1, each error shown, and the reason says
    they answered (not "no reply within S s")."""

    def boom(msg: Message) -> bytes:
        raise RuntimeError("on fire")

    client = await make_node("watcher")
    await _servers(make_node, client, "all.boom", [boom, boom])
    code, lines, err = await _finish(procs, mesh_name, "req", "all.boom", "q", "--all",
                                     "--timeout", "4")
    assert code == 1
    assert sorted(lines) == ["s0 error: on fire", "s1 error: on fire"]
    assert err == "zeromesh req: all 2 servers of 'all.boom' answered with an error\n"


async def test_req_all_without_servers_or_with_retries(procs: list[Cli], mesh_name: str) -> None:
    """No server: exit 1 with a reason; --retries with --all: bad usage, exit 2."""
    code, lines, err = await _finish(procs, mesh_name, "req", "all.nobody", "q", "--all",
                                     "--timeout", "1")
    assert (code, lines) == (1, [])
    assert "all.nobody" in err
    code, _, err = await _finish(procs, mesh_name, "req", "all.svc", "q", "--all",
                                 "--retries", "1")
    assert code == 2
    assert "--retries" in err.strip()


async def test_agent_sends_reply_headers_back_as_http_headers(
        procs: list[Cli], mesh_name: str, make_node: MakeNode) -> None:
    """Names an app could send in (trace context, X-, content type) come back as they are;
    the rest under X-Zeromesh-Header-, so they never clash with HTTP's own."""
    client = await make_node("watcher")
    await _servers(make_node, client, "h.svc", [_with_headers])
    agent = start_agent(procs, mesh=mesh_name, name="side")
    async with aiohttp.ClientSession() as http:
        response = await wait_status(http, "POST", f"{agent.url}/v1/request/h.svc", 200,
                                     data=b"x")
        assert await response.read() == b"re:x"
    assert response.headers["traceparent"] == TRACEPARENT
    assert response.headers["X-Cache"] == "hit"
    assert response.headers["Content-Type"] == "text/plain"
    assert response.headers["X-Zeromesh-Header-Server"] == "s"
    assert response.headers["X-Zeromesh-Source"] == "s0"
    assert response.headers.get("Server") != "s"


async def test_agent_request_all_returns_the_json_list(
        procs: list[Cli], mesh_name: str, make_node: MakeNode, release: asyncio.Event) -> None:
    """?all=true: 200 and every timely reply with source, data and headers; max_replies
    stops early; retries make no sense with all (400)."""
    await _three(make_node, release)
    agent = start_agent(procs, mesh=mesh_name, name="side")
    url = f"{agent.url}/v1/request/all.svc"
    async with aiohttp.ClientSession() as http:
        await wait_status(http, "POST", url, 200, data=b"warm")  # the agent found a server
        async with http.post(url + "?all=true&timeout=2", data=b"q") as r:
            assert r.status == 200, await r.text()
            replies = sorted(await r.json(), key=lambda e: e["source"])
        assert [(e["source"], e["data"], e["headers"]) for e in replies] == [
            ("s0", "re:q", {"x-n": "1"}), ("s2", "re:q", {"x-n": "1"})]
        assert {e["service"] for e in replies} == {"all.svc"}
        async with asyncio.timeout(1.5):  # well before the 20 s timeout
            async with http.post(url + "?all=true&max_replies=1&timeout=20",
                                 data=b"\xff") as r:
                [one] = await r.json()
        assert (one["data"], one["encoding"]) == ("cmU6/w==", "base64")  # b"re:\xff"
        async with http.post(url + "?all=true&retries=1", data=b"q") as r:
            assert r.status == 400
            assert "retries" in (await r.json())["error"]
        async with http.post(url + "?max_replies=1", data=b"q") as r:
            assert r.status == 400
        async with http.post(f"{agent.url}/v1/request/all.nobody?all=true&timeout=5",
                             data=b"q") as r:
            assert (r.status, await r.json()) == (200, [])
