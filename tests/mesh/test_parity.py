"""The blocking `Node` is `AsyncNode`'s twin: same public members, parameters, semantics.

The surface test compares the two classes (and their streams) member by
member, so an `AsyncNode` method added without a blocking twin fails it. The
behaviour tests drive the blocking-only code paths on real nodes over
127.0.0.1, and check that both subscriptions drop the same (oldest) messages.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
from pathlib import Path
from typing import Any

import pytest

from mesh import AsyncNode, ClosedError, ConfigError, Node, PeerEventKind
from tests.helpers import aeventually, eventually

from .conftest import FAST

RENAMED = {"aclose": "close", "__aenter__": "__enter__", "__aexit__": "__exit__",
           "__aiter__": "__iter__", "__anext__": "__next__"}
"""The only names that differ: the async protocol's and their blocking counterparts."""
PROTOCOL = {"__init__", *RENAMED, *RENAMED.values()}

WIRING = {"best_effort_only", "on_closed", "bound_bytes", "max_pending_bytes"}
"""Public-named hooks the node and the agent wire up internally (durables' live feeds, the
byte bound of the agent's SSE streams and webhooks); no app uses them."""

DEFAULTS_DIFFER = {("serve", "concurrency")}
"""A blocking handler holds a worker thread per request in flight: fewer by default."""


def _kind(obj: object, name: str) -> str:
    static = inspect.getattr_static(type(obj), name, None)
    if static is None:
        return "attribute"  # set in __init__
    if isinstance(static, property):
        return "property"
    if inspect.isfunction(static) or isinstance(static, (staticmethod, classmethod)):
        return "method"
    return "attribute"


def _surface(obj: object) -> dict[str, str]:
    names = {n for n in dir(obj) if not n.startswith("_")} | {
        n for n in PROTOCOL if n in dir(type(obj)) and n != "__init__"}
    return {n: _kind(obj, n) for n in names - WIRING}


def _params(obj: object, name: str) -> list[tuple[str, Any, Any]]:
    sig = inspect.signature(getattr(obj, name))
    return [(p.name, p.kind, p.default) for p in sig.parameters.values()]


def surface_differences(async_obj: object, sync_obj: object) -> list[str]:
    """Every way `sync_obj`'s public surface differs from its async twin's."""
    a, s = _surface(async_obj), _surface(sync_obj)
    problems = []
    for name, kind in sorted(a.items()):
        twin = RENAMED.get(name, name)
        if twin not in s:
            problems.append(f"{twin}: missing (twin of {name})")
            continue
        # A value the loop owns may be a read-only property on the blocking side.
        if s[twin] != kind and not (kind == "attribute" and s[twin] == "property"):
            problems.append(f"{twin}: {s[twin]} on the blocking side, {kind} on the async")
        if kind == "method" and not name.startswith("__"):
            want, got = _params(async_obj, name), _params(sync_obj, twin)
            if (name, "concurrency") in DEFAULTS_DIFFER:
                want = [p for p in want if p[0] != "concurrency"]
                got = [p for p in got if p[0] != "concurrency"]
            if want != got:
                problems.append(f"{twin}: parameters {got} differ from {want}")
    twins = {RENAMED.get(n, n) for n in a}
    problems += [f"{n}: only on the blocking side" for n in sorted(set(s) - twins)]
    if (type(async_obj), type(sync_obj)) == (AsyncNode, Node):
        a_init, s_init = (inspect.signature(type(o).__init__) for o in (async_obj, sync_obj))
        if list(a_init.parameters.items()) != list(s_init.parameters.items()):
            problems.append(f"__init__: {s_init} differs from {a_init}")
    return problems


def _common(mesh_name: str) -> dict[str, Any]:
    return {"mesh": mesh_name, "interfaces": ["127.0.0.1"], **FAST}


def test_node_has_every_public_member_of_async_node(mesh_name: str) -> None:
    """Names, kinds (a property stays a property) and keyword parameters match one for one."""
    settings = _common(mesh_name)
    assert surface_differences(AsyncNode(name="a", **settings), Node(name="s", **settings)) == []


def test_blocking_streams_have_every_public_member_of_their_async_twins(mesh_name: str) -> None:
    """Subscription, Pull, Replies and PeerEvents each have a blocking twin with the same
    surface."""
    with Node(name="n", **_common(mesh_name)) as node:
        sub, pull, events = node.subscribe("s"), node.pull("q"), node.events()
        replies = node.request_all_stream("svc", b"")
        for sync_obj, async_obj in ((sub, sub._sub), (pull, pull._pull), (events, events._stream),
                                    (replies, replies._replies)):
            assert surface_differences(async_obj, sync_obj) == [], type(sync_obj).__name__
        replies.close()


def test_a_missing_or_different_twin_fails_the_surface_check(mesh_name: str) -> None:
    """The check is not vacuous: a new async method, or one with another default, is caught."""

    class Grown(AsyncNode):
        async def shiny(self, *, timeout: float = 1.0) -> None: ...

        async def wait_for_spool(self, *, timeout: float = 99.0) -> None: ...

    settings = _common(mesh_name)
    problems = surface_differences(Grown(name="a", **settings), Node(name="s", **settings))
    assert [p.split(":")[0] for p in problems] == ["shiny", "wait_for_spool"]


def test_sync_subscription_drops_the_oldest_like_the_async_one(mesh_name: str) -> None:
    """Past max_pending both keep the newest, count every loss, and report the same figures."""

    def figures(sub: Any) -> tuple[int, int, int, list[str]]:
        return sub.received, sub.dropped, sub.pending, [m.text for m in sub.drain(100)]

    with Node(name="sync", **_common(mesh_name)) as node:
        sub = node.subscribe("o", max_pending=3)
        node.publish_many("o", [str(i) for i in range(10)])
        eventually(lambda: sub.received == 10, timeout=5)
        sync_figures = figures(sub)

    async def async_run() -> tuple[int, int, int, list[str]]:
        async with AsyncNode(name="async", **_common(mesh_name + "a")) as node:
            sub = await node.subscribe("o", max_pending=3)
            await node.publish_many("o", [str(i) for i in range(10)])
            await aeventually(lambda: sub.received == 10, timeout=5)
            return figures(sub)

    assert sync_figures == asyncio.run(async_run()) == (10, 7, 3, ["7", "8", "9"])


def test_sync_pubsub_members_on_two_nodes(mesh_name: str) -> None:
    """publish_many/publish_nowait deliver in order; counts and figures read from the loop."""
    with Node(name="a", **_common(mesh_name)) as a, Node(name="b", **_common(mesh_name)) as b:
        assert (a.running, a.config.name) == (True, "a")
        sub = b.subscribe("m.*")
        a.wait_for_subscribers("m.x", 1, timeout=5)
        assert a.subscriber_count("m.x") == 1
        assert a.subscriber_count("other") == 0
        assert a.wait_for_known_subscribers("m.x", timeout=5) == 1
        a.publish_many("m.x", [b"1", "2", b"3"])
        assert [sub.next(timeout=5).text for _ in range(3)] == ["1", "2", "3"]
        assert a.publish_nowait("m.x", "4") is True  # the loop was idle: a new batch
        assert sub.next(timeout=5).text == "4"
        assert eventually(lambda: a.traffic().published_by_topic.get("m.x") == 4, timeout=5)
        assert b.traffic().totals["received"] >= 4
        assert a.dropped_by_peer == {}
        assert all(isinstance(n, int) for n in b.dropped_input.values())  # (other meshes' mDNS)
        assert a.spool_pending == 0
        b.pull("jobs")
        a.wait_for_workers("jobs", 1, timeout=5)
        assert a.worker_count("jobs") == 1
        assert a.worker_count("none") == 0
        for check, bad in ((a.check_topic, "a b"), (a.check_queue, ""), (a.check_service, "x y")):
            with pytest.raises(ConfigError):
                check(bad)
        a.check_topic("m.x")
    assert not a.running  # closed: the same answers as a closed AsyncNode gives
    assert (a.peers(), a.subscriber_count("m.x"), a.worker_count("jobs")) == ([], 0, 0)
    with pytest.raises(ClosedError):
        a.publish_many("m.x", ["late"])


def test_sync_reliable_spool_acks_and_dead_letters(mesh_name: str, tmp_path: Path) -> None:
    """Reliable publish_many, acks from this thread, wait_for_spool, dead_letter and replay."""
    common = _common(mesh_name)
    with Node(name="s", data_dir=str(tmp_path / "s"), **common) as s, \
            Node(name="p", data_dir=str(tmp_path / "p"), **common) as p:
        durable = s.subscribe_durable("orders.>", "audit")
        p.wait_for_durables("orders.x", 1, timeout=5)
        p.publish_many("orders.new", ["a", "b", "c"], reliable=True)
        first = durable.next(timeout=5)
        first.ack()  # from this thread: it hops onto the loop
        second, settle = durable.take(timeout=5)
        settle(True)
        third = durable.next(timeout=5)
        third.ack()
        assert [m.text for m in (first, second, third)] == ["a", "b", "c"]
        assert durable.received == 3
        p.wait_for_spool(timeout=5)
        assert p.spool_pending == 0

        p.dead_letter("jobs", first, reason="gave up", attempts=3)
        assert p.traffic().dead_letters == 1
        work = s.pull("jobs")
        p.wait_for_workers("jobs", 1, timeout=5)
        assert p.replay_dead_letters() == 1
        replayed = work.next(timeout=5)
        assert (replayed.text, replayed.reliable) == ("a", True)
        replayed.ack()
        p.wait_for_spool(timeout=5)
        assert p.traffic().dead_letters == 0


def test_sync_dead_letters_need_a_data_dir(mesh_name: str) -> None:
    """Without a data dir both dead-letter calls are a ConfigError, as on AsyncNode."""
    with Node(name="n", **_common(mesh_name)) as node:
        with pytest.raises(ConfigError):
            node.replay_dead_letters()
        sub = node.subscribe("t")
        node.publish("t", "x")
        with pytest.raises(ConfigError):
            node.dead_letter("jobs", sub.next(timeout=5), reason="r", attempts=1)


def test_sync_subscribe_callback_runs_in_order_in_its_own_thread(mesh_name: str) -> None:
    """A callback may block; it sees every message in order; one that raises is logged."""
    got: list[tuple[str, str]] = []

    def callback(msg: Any) -> None:
        if msg.text == "boom":
            raise RuntimeError("the app failed")
        got.append((msg.text, threading.current_thread().name))

    with Node(name="n", **_common(mesh_name)) as node:
        sub = node.subscribe("cb", callback=callback)
        node.publish_many("cb", ["1", "boom", "2", "3"])
        eventually(lambda: len(got) == 3, timeout=5)
        assert [text for text, _ in got] == ["1", "2", "3"]
        assert {thread for _, thread in got} == {"zeromesh-callback"}
        assert sub.received == 4
    assert sub.closed


def test_sync_streams_close_like_their_async_twins(mesh_name: str) -> None:
    """close(): queued messages stay readable, then the stream ends; events end too."""
    with Node(name="a", **_common(mesh_name)) as a:
        events = a.events()
        sub = a.subscribe("c")
        a.publish("c", "kept")
        eventually(lambda: sub.pending == 1, timeout=5)
        sub.close()
        assert sub.closed
        assert [m.text for m in sub] == ["kept"]
        with pytest.raises(ClosedError):
            sub.next(timeout=5)
        with Node(name="b", **_common(mesh_name)):
            assert events.next(timeout=5).kind is PeerEventKind.JOINED
        assert events.next(timeout=5).kind is PeerEventKind.LEFT
        events.close()
        assert list(events) == []
        with pytest.raises(ClosedError):
            events.next(timeout=5)
        work = a.pull("q")
        a.push("q", "one")
        eventually(lambda: work.pending == 1, timeout=5)
        assert work.next(timeout=5).text == "one"
        assert work.received == 1
        later = a.events()
    with pytest.raises(ClosedError):
        later.next(timeout=5)
