"""Reply headers and scatter-gather (``request_all``) on real nodes over 127.0.0.1.

A handler returning `Reply(data, headers)` sends headers back to the
requester; `request_all` asks every live server and gathers what arrives
within its timeout, stopping early at `max_replies` or once all answered.
Slow servers wait on an event the test sets at its end: no sleeps.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from mesh import (
    ClosedError,
    ConfigError,
    Message,
    Node,
    RemoteError,
    Replies,
    Reply,
)
from mesh._services._requests import DISCOVERY_GRACE
from tests.helpers import aeventually

from .conftest import FAST, MakeNode
from .test_services import _servers

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def _slow(release: asyncio.Event) -> Callable[[Message], Awaitable[bytes]]:
    async def handler(msg: Message) -> bytes:
        await release.wait()
        return b"late"

    return handler


def _named(name: str) -> Callable[[Message], Reply]:
    def handler(msg: Message) -> Reply:
        return Reply(name.encode() + b":" + msg.data, {"server": name})

    return handler


# -- reply headers ----------------------------------------------------------------


async def test_reply_headers_reach_the_requester(make_node: MakeNode) -> None:
    """Reply(data, headers) from a sync and an async handler: body and headers arrive,
    a traceparent among them untouched; a plain bytes reply still has no headers."""
    client = await make_node("client")

    def sync_handler(msg: Message) -> Reply:
        return Reply("ok:" + msg.text, {"traceparent": TRACEPARENT, "x-cache": "hit"})

    async def async_handler(msg: Message) -> Reply:
        return Reply(b"async", headers={"x-took": "1ms"})

    await _servers(make_node, client, "h.sync", [sync_handler])
    await _servers(make_node, client, "h.async", [async_handler])
    await _servers(make_node, client, "h.plain", [lambda msg: b"plain"])
    async with asyncio.timeout(10):
        reply = await client.request("h.sync", "ping")
        assert (reply.data, reply.source) == (b"ok:ping", "s0")
        assert reply.headers == {"traceparent": TRACEPARENT, "x-cache": "hit"}
        assert (await client.request("h.async", b"")).headers == {"x-took": "1ms"}
        plain = await client.request("h.plain", b"")
        assert (plain.data, plain.headers) == (b"plain", None)


async def test_reply_headers_from_a_local_server(make_node: MakeNode) -> None:
    """A service served by the requesting node itself answers with its headers too."""
    node = await make_node("self")
    await node.serve("h.local", lambda msg: Reply(None, {"k": "v"}))
    async with asyncio.timeout(10):
        reply = await node.request("h.local", b"x")
    assert (reply.data, reply.headers, reply.source) == (b"", {"k": "v"}, "self")


async def test_bad_reply_headers_are_a_remote_error(make_node: MakeNode) -> None:
    """Headers that are not str -> str fail at the server, as any handler error does."""
    client = await make_node("client")
    await _servers(make_node, client, "h.bad", [lambda msg: Reply(b"x", {"n": 1})])  # type: ignore[dict-item]
    with pytest.raises(RemoteError, match="must map a str to a str"):
        async with asyncio.timeout(10):
            await client.request("h.bad", b"x")


def test_blocking_node_reply_headers(mesh_name: str) -> None:
    """The blocking twin: a plain handler (run in a thread) returns Reply with headers."""
    settings: dict[str, Any] = {"mesh": mesh_name, "interfaces": ["127.0.0.1"], **FAST}
    with Node(name="server", **settings) as server, Node(name="client", **settings) as client:
        server.serve("h.blocking", lambda msg: Reply(msg.data, {"traceparent": TRACEPARENT}))
        client.wait_for_service("h.blocking", timeout=10)
        reply = client.request("h.blocking", b"hi", timeout=10)
        assert (reply.data, reply.headers) == (b"hi", {"traceparent": TRACEPARENT})


# -- scatter-gather -----------------------------------------------------------------


async def test_request_all_gathers_the_replies_within_the_timeout(
        make_node: MakeNode, release: asyncio.Event) -> None:
    """Three servers, one slower than the timeout: two replies, each with its source and
    headers, once the timeout has passed (not before: the slow one might still answer)."""
    client = await make_node("client")
    await _servers(make_node, client, "all.svc", [_named("a"), _slow(release), _named("c")])
    started = time.monotonic()
    async with asyncio.timeout(10):
        replies = await client.request_all("all.svc", b"q", timeout=1.0)
    took = time.monotonic() - started
    assert 0.9 <= took < 5, took
    assert sorted((r.source, r.data, dict(r.headers or {})["server"]) for r in replies) == [
        ("s0", b"a:q", "a"), ("s2", b"c:q", "c")]
    assert all(r.error is None and r.topic == "all.svc" for r in replies)


async def test_request_all_ends_once_every_server_answered(make_node: MakeNode) -> None:
    """No slow server: the gathering ends with the last reply, long before the timeout; the
    requester's own server is asked too."""
    client = await make_node("client")
    await client.serve("all.fast", _named("me"))
    await _servers(make_node, client, "all.fast", [_named("a"), _named("b")])
    await client.wait_for_service("all.fast", 3, timeout=10)  # its own and both peers
    started = time.monotonic()
    async with asyncio.timeout(10):
        replies = await client.request_all("all.fast", b"q", timeout=30)
    assert time.monotonic() - started < 5
    assert sorted(r.source for r in replies) == ["client", "s0", "s1"]


async def test_max_replies_returns_after_the_first(make_node: MakeNode,
                                                   release: asyncio.Event) -> None:
    """max_replies=1 with one fast and two slow servers: the fast reply, long before the
    timeout; the slow servers' late replies are dropped."""
    client = await make_node("client")
    await _servers(make_node, client, "all.max", [_slow(release), _named("fast"),
                                                   _slow(release)])
    started = time.monotonic()
    async with asyncio.timeout(10):
        replies = await client.request_all("all.max", b"q", timeout=30, max_replies=1)
    assert time.monotonic() - started < 5
    assert [r.source for r in replies] == ["s1"]
    release.set()  # the slow ones answer now: nobody waits, nothing breaks
    async with asyncio.timeout(10):
        assert len(await client.request_all("all.max", b"again", timeout=30)) == 3


async def test_a_failing_server_contributes_an_error_reply(make_node: MakeNode) -> None:
    """A handler that raises yields a reply with `error` set and no data; the rest are ok."""
    client = await make_node("client")

    def broken(msg: Message) -> bytes:
        raise ValueError("disk on fire")

    await _servers(make_node, client, "all.err", [_named("ok"), broken])
    async with asyncio.timeout(10):
        replies = sorted(await client.request_all("all.err", b"q"), key=lambda r: r.source)
    assert [(r.source, r.data, r.error) for r in replies] == [
        ("s0", b"ok:q", None), ("s1", b"", "disk on fire")]
    assert replies[1].to_dict()["error"] == "disk on fire"
    assert "error" not in replies[0].to_dict()


async def test_no_server_is_an_empty_list_at_once(make_node: MakeNode) -> None:
    """Nobody serves it: an empty list after the short discovery grace, not the timeout."""
    client = await make_node("client")
    started = time.monotonic()
    async with asyncio.timeout(10):
        assert await client.request_all("all.nobody", b"q", timeout=30) == []
    assert time.monotonic() - started < 5


async def test_the_stream_yields_replies_as_they_arrive(make_node: MakeNode,
                                                        release: asyncio.Event) -> None:
    """`request_all_stream`: the fast reply comes at once; leaving early drops the rest."""
    client = await make_node("client")
    await _servers(make_node, client, "all.stream", [_named("fast"), _slow(release)])
    async with asyncio.timeout(10):
        async with client.request_all_stream("all.stream", b"q", timeout=30) as replies:
            assert isinstance(replies, Replies)
            first = await anext(replies)
            assert (first.source, first.data) == ("s0", b"fast:q")
        assert replies.received == 1
        assert [r async for r in replies] == []  # closed: nothing more


async def test_breaking_out_of_the_stream_leaves_nothing_pending(make_node: MakeNode) -> None:
    """``async for r in request_all_stream(...): break`` never calls ``aclose()``: the slow
    server's request stayed pending for good, counted as its outstanding load, so `request`
    stopped choosing it. Each request ends with its reply (or deadline) instead."""
    client = await make_node("client")

    async def slower(msg: Message) -> bytes:
        await asyncio.sleep(0.02)
        return b"slow"

    await _servers(make_node, client, "all.break", [_named("fast"), slower])
    for _ in range(3):
        async for _reply in client.request_all_stream("all.break", b"q", timeout=5):
            break  # the first answer is enough
    await aeventually(lambda: not client._live().requests._pending,
                      message="the slow server's replies settle their requests")
    sources = [(await client.request("all.break", b"q")).source for _ in range(4)]
    assert sorted(sources) == ["s0", "s0", "s1", "s1"]


async def test_the_stream_timeout_runs_from_the_first_iteration(make_node: MakeNode) -> None:
    """The request goes out when iteration starts, and so does its timeout: a stream made
    earlier than its timeout before iterating still gathers the replies."""
    client = await make_node("client")
    await _servers(make_node, client, "all.later", [_named("one")])
    replies = client.request_all_stream("all.later", b"q", timeout=0.5)
    await asyncio.sleep(0.7)  # (longer than the timeout: the point of the test, not a wait)
    async with asyncio.timeout(10):
        assert [(r.source, r.data) async for r in replies] == [("s0", b"one:q")]


async def test_closing_the_node_ends_a_gathering_with_closed_error(
        make_node: MakeNode, release: asyncio.Event) -> None:
    """A node closing while it gathers: ClosedError, as `request` raises, not a short list."""
    client = await make_node("client")
    await _servers(make_node, client, "all.closing", [_named("a"), _slow(release)])
    async with asyncio.timeout(10):
        replies = client.request_all_stream("all.closing", b"q", timeout=30)
        assert (await anext(replies)).source == "s0"
        waiting = asyncio.ensure_future(anext(replies))
        await client.aclose()
        with pytest.raises(ClosedError):
            await waiting


async def test_a_stream_first_iterated_after_its_node_closed_raises_closed_error(
        make_node: MakeNode) -> None:
    """Made while the node ran, iterated after it closed: ClosedError, not an empty
    gathering that reads as "nobody serves it" (its own server was cancelled)."""
    node = await make_node("n")
    await node.serve("all.own", _named("me"))
    await asyncio.sleep(DISCOVERY_GRACE)  # (then no server known is an answer at once)
    replies = node.request_all_stream("all.own", b"q", timeout=1)
    await node.aclose()
    with pytest.raises(ClosedError):
        await anext(replies)


async def test_request_all_rejects_bad_arguments(make_node: MakeNode) -> None:
    node = await make_node("n")
    with pytest.raises(ConfigError, match="max_replies"):
        node.request_all_stream("svc", b"", max_replies=0)
    with pytest.raises(ConfigError, match="timeout"):
        node.request_all_stream("svc", b"", timeout=0)
    with pytest.raises(ConfigError):
        await node.request_all("bad..name", b"")


def test_blocking_request_all_and_its_stream(mesh_name: str) -> None:
    """The blocking twins: a list, and an iterator of the same replies."""
    settings: dict[str, Any] = {"mesh": mesh_name, "interfaces": ["127.0.0.1"], **FAST}
    with Node(name="a", **settings) as a, Node(name="b", **settings) as b, \
            Node(name="client", **settings) as client:
        a.serve("all.sync", _named("a"))
        b.serve("all.sync", _named("b"))
        client.wait_for_service("all.sync", 2, timeout=10)
        replies = client.request_all("all.sync", b"q", timeout=10)
        assert sorted((r.source, r.data) for r in replies) == [("a", b"a:q"), ("b", b"b:q")]
        with client.request_all_stream("all.sync", b"s", timeout=10, max_replies=1) as stream:
            assert [r.data[1:] for r in stream] == [b":s"]
            assert (stream.received, stream.service) == (1, "all.sync")
