"""``POST /v1/publish`` (NDJSON, many messages): all arrive in order at a subscriber in
another process; a bad line is a 400 naming it and publishes nothing; too big is 413."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp
import pytest

from mesh import AsyncNode, Message
from mesh._pubsub._subscription import Subscription

from ._agent import AgentProc, start_agent
from ._proc import Cli
from .conftest import MakeNode

pytestmark = pytest.mark.timeout(60)

COUNT = 10_000


def ndjson(lines: list[dict[str, object]]) -> bytes:
    return b"".join(json.dumps(line).encode() + b"\n" for line in lines)


async def _next(sub: Subscription) -> Message:
    async with asyncio.timeout(10):
        return await anext(aiter(sub))


async def _connected(http: aiohttp.ClientSession, agent: AgentProc, sub: Subscription) -> None:
    """Publish probes through the agent until the subscriber sees one (bounded)."""
    async with asyncio.timeout(10):
        while True:
            async with http.post(f"{agent.url}/v1/publish/bulk.probe", data=b"?") as r:
                assert r.status == 202
            try:
                async with asyncio.timeout(0.2):
                    await anext(aiter(sub))
                    break
            except TimeoutError:
                continue
    async with http.post(f"{agent.url}/v1/publish/bulk.fence", data=b"") as r:
        assert r.status == 202
    while (await _next(sub)).topic != "bulk.fence":  # late probes
        pass


async def _subscriber(make_node: MakeNode) -> tuple[AsyncNode, Subscription]:
    node = await make_node("sub")
    return node, await node.subscribe("bulk.>", max_pending=4 * COUNT)


async def test_ten_thousand_lines_arrive_in_order(procs: list[Cli], mesh_name: str,
                                                  make_node: MakeNode) -> None:
    _, sub = await _subscriber(make_node)
    agent = start_agent(procs, mesh=mesh_name, name="side")
    lines: list[dict[str, object]] = [{"topic": "bulk.n", "data": str(i)} for i in range(COUNT)]
    lines[1] = {"topic": "bulk.b", "data_b64": "AAEC", "headers": {"X-K": "v"}, "ttl": 60}
    async with aiohttp.ClientSession() as http:
        await _connected(http, agent, sub)
        async with http.post(f"{agent.url}/v1/publish", data=ndjson(lines),
                             headers={"Content-Type": "application/x-ndjson"}) as r:
            assert (r.status, await r.json()) == (202, {"published": COUNT})
    got = [await _next(sub) for _ in range(COUNT)]
    [other] = [m for m in got if m.topic == "bulk.b"]  # (order is kept per topic)
    assert [m.data for m in got if m.topic == "bulk.n"] == [
        str(i).encode() for i in range(COUNT) if i != 1]
    assert (other.data, other.headers) == (b"\0\1\2", {"x-k": "v"})  # (lower-cased, as HTTP's)


BAD_LINES: list[tuple[object, str]] = [
    ({"topic": "bulk..x", "data": "x"}, "empty segment"),
    ({"topic": "bulk.x", "data": "x", "data_b64": "eA=="}, "not both"),
    ({"topic": "bulk.x"}, "give data or data_b64"),
    ({"topic": "bulk.x", "data": "x", "color": "red"}, "unknown field"),
    ({"topic": "bulk.x", "data": "x", "reliable": True}, "needs a data dir"),
    ({"topic": "bulk.x", "data": "x", "ttl": -1}, "ttl"),
    ({"topic": "bulk.x", "data_b64": "!!"}, "not base64"),
    ("{not json", "malformed"),
    ({"topic": "bulk.x", "data": "x", "headers": {"bad name": "v"}}, "not an HTTP header name"),
    ({"topic": "bulk.x", "data": "x", "headers": {"x-k": "a\r\nhost: evil"}}, "line break"),
]


async def test_a_bad_line_is_named_and_nothing_is_published(
        procs: list[Cli], mesh_name: str, make_node: MakeNode) -> None:
    _, sub = await _subscriber(make_node)
    agent = start_agent(procs, mesh=mesh_name, name="side")
    lines = [json.dumps({"topic": "bulk.n", "data": str(i)}).encode() for i in range(COUNT)]
    async with aiohttp.ClientSession() as http:
        await _connected(http, agent, sub)
        for bad, reason in BAD_LINES:
            lines[4999] = bad.encode() if isinstance(bad, str) else json.dumps(bad).encode()
            async with http.post(f"{agent.url}/v1/publish", data=b"\n".join(lines)) as r:
                assert r.status == 400
                body = await r.json()
            assert body["line"] == 5000
            assert body["error"].startswith("line 5000: ")
            assert reason.lower() in body["error"].lower(), body
        async with http.post(f"{agent.url}/v1/publish/bulk.after", data=b"a") as r:
            assert r.status == 202
    first = await _next(sub)
    assert (first.topic, first.data) == ("bulk.after", b"a")  # nothing of the bad bodies came


async def test_a_body_over_the_limit_is_413_and_blank_lines_are_skipped(
        procs: list[Cli], mesh_name: str, make_node: MakeNode) -> None:
    """And a leading UTF-8 BOM, as Windows tools write."""
    _, sub = await _subscriber(make_node)
    agent = start_agent(procs, mesh=mesh_name, name="side", env={"ZEROMESH_MAX_BODY": "65536"})
    line = json.dumps({"topic": "bulk.big", "data": "x" * 100}).encode() + b"\n"
    async with aiohttp.ClientSession() as http:
        await _connected(http, agent, sub)
        async with http.post(f"{agent.url}/v1/publish", data=line * 1000) as r:
            assert r.status == 413
            assert "error" in await r.json()
        body = b"\n" + line + b"\r\n\n" + line.replace(b"big", b"two")
        async with http.post(f"{agent.url}/v1/publish", data=body) as r:
            assert (r.status, await r.json()) == (202, {"published": 2})
        async with http.post(f"{agent.url}/v1/publish", data=b"") as r:
            assert (r.status, await r.json()) == (202, {"published": 0})
        bom = b"\xef\xbb\xbf" + line.replace(b"big", b"bom")  # (was a 400: line 1 malformed)
        async with http.post(f"{agent.url}/v1/publish", data=bom) as r:
            assert (r.status, await r.json()) == (202, {"published": 1})
    assert [(await _next(sub)).topic for _ in range(3)] == ["bulk.big", "bulk.two", "bulk.bom"]


async def test_reliable_and_retained_lines_go_through_the_spool_in_order(
        procs: list[Cli], mesh_name: str, make_node: MakeNode, tmp_path: Path) -> None:
    """Reliable lines (grouped per topic, one spool commit) mixed with best-effort ones:
    each topic's messages arrive in order; the last retained line is its topic's value."""
    _, sub = await _subscriber(make_node)
    agent = start_agent(procs, "--data-dir", str(tmp_path / "side"), mesh=mesh_name,
                        name="side")
    lines: list[dict[str, object]] = []
    for i in range(300):
        topic = ("bulk.a", "bulk.b", "bulk.c")[i // 10 % 3]
        lines.append({"topic": topic, "data": str(i), "reliable": topic != "bulk.c",
                      "retain": topic == "bulk.b"})
    async with aiohttp.ClientSession() as http:
        await _connected(http, agent, sub)
        async with http.post(f"{agent.url}/v1/publish", data=ndjson(lines)) as r:
            assert (r.status, await r.json()) == (202, {"published": 300})
        got = [await _next(sub) for _ in range(300)]
        for topic in ("bulk.a", "bulk.b", "bulk.c"):
            assert [m.data for m in got if m.topic == topic] == [
                str(line["data"]).encode() for line in lines if line["topic"] == topic]
        async with http.get(f"{agent.url}/v1/last/bulk.b") as r:
            [last] = await r.json()
    assert last["data"] == str(max(i for i, line in enumerate(lines)
                                   if line["topic"] == "bulk.b"))
