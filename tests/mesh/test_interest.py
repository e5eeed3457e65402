"""Pub/sub connects by interest: a SUB connects to a PUB only where topics meet (issue 16)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
import zmq
import zmq.asyncio

from mesh import AsyncNode
from mesh import _wire as wire
from mesh._pubsub._interest import HOLD_TIME, generalise
from patterns import TopicPattern, patterns_overlap
from tests.helpers import aeventually

from .conftest import MakeNode


def hears(sub: AsyncNode, pub: AsyncNode) -> bool:
    """Is `sub`'s SUB connected to `pub`'s publisher?"""
    return pub.endpoints["pub"][0] in sub._live().pubsub.connected_publishers


def announced(sub: AsyncNode, pub: AsyncNode) -> list[str]:
    """What `sub` knows `pub` publishes on ([] while it does not know `pub`)."""
    rec = sub._live().membership.table.get(pub.id)
    return [] if rec is None else [p.pattern for p in rec.pubs]


def knows_subscription(pub: AsyncNode, sub: AsyncNode, pattern: str) -> bool:
    rec = pub._live().membership.table.get(sub.id)
    return rec is not None and TopicPattern(pattern) in rec.subs


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [("a.*", "a.b", True), ("a.>", "*.c", True), (">", "x.y.z", True), ("a.b", "a.c", False)],
)
def test_patterns_overlap(a: str, b: str, expected: bool) -> None:
    """Some topic matches both patterns (or none does), either way round."""
    assert patterns_overlap(TopicPattern(a), TopicPattern(b)) is expected
    assert patterns_overlap(TopicPattern(b), TopicPattern(a)) is expected


def test_generalise_replaces_the_biggest_group_then_everything() -> None:
    """Topics sharing a first segment become seg.> (a bare seg stays); no saving: '>'."""
    assert generalise({"a", "a.b", "a.c", "a.d", "b.x"}, 3) == {"a", "a.>", "b.x"}
    assert generalise({"a.b", "a.c", "b.x", "b.y", "b.z"}, 2) == {"a.>", "b.>"}
    assert generalise({"a", "b", "c"}, 2) == {">"}
    assert generalise({"a.>", "a", "b"}, 2) == {">"}
    assert generalise({"a", "b"}, 2) == {"a", "b"}


async def test_a_node_without_subscriptions_holds_no_sub_connection(
        make_node: MakeNode) -> None:
    """Knowing a publisher and what it publishes is not a reason to connect to it."""
    pub = await make_node("pub")
    idle = await make_node("idle")
    await pub.publish("t.x", b"1")
    await aeventually(lambda: announced(idle, pub) == ["t.x"], timeout=5)
    assert idle._live().pubsub.connected_publishers == frozenset()


async def test_a_subscriber_connects_only_to_publishers_of_matching_topics(
        make_node: MakeNode) -> None:
    """A publisher of other topics stays unconnected; one that starts publishing a
    matching topic is connected to."""
    sub = await make_node("sub")
    other = await make_node("other")
    later = await make_node("later")
    await sub.subscribe("a.>")
    await other.publish("b.x", b"1")
    await aeventually(lambda: announced(sub, other) == ["b.x"], timeout=5)
    await aeventually(lambda: later.id in {p.id for p in sub.peers()}, timeout=5)
    assert not hears(sub, other)
    assert not hears(sub, later)
    await later.publish("a.y", b"1")
    await aeventually(lambda: hears(sub, later), timeout=5)
    assert not hears(sub, other)


async def test_first_publish_on_a_new_topic_reaches_a_known_subscriber(
        make_node: MakeNode) -> None:
    """Messages on a topic published for the first time wait (in order) for a subscriber
    whose subscription the publisher knows, and which connects only now."""
    pub = await make_node("pub")
    sub_node = await make_node("sub")
    sub = await sub_node.subscribe("news.>", retained=False)
    await aeventually(lambda: knows_subscription(pub, sub_node, "news.>"), timeout=5)
    assert not hears(sub_node, pub)
    for i in range(100):
        await pub.publish("news.first", str(i))
    got = [(await sub.next(timeout=5)).data for _ in range(100)]
    assert got == [str(i).encode() for i in range(100)]
    assert hears(sub_node, pub)


async def test_a_reliable_first_publish_reaches_a_known_subscriber(
        make_node: MakeNode, tmp_path: Path) -> None:
    """The same for reliable messages that go out by pub/sub."""
    pub = await make_node("pub", data_dir=str(tmp_path))
    sub_node = await make_node("sub")
    sub = await sub_node.subscribe("orders.*", retained=False)
    await aeventually(lambda: knows_subscription(pub, sub_node, "orders.*"), timeout=5)
    await pub.publish("orders.new", b"o1", reliable=True)
    msg = await sub.next(timeout=5)
    assert (msg.topic, msg.data, msg.reliable) == ("orders.new", b"o1", True)


async def test_waiting_for_subscribers_announces_the_topic(make_node: MakeNode) -> None:
    """A publisher that never published on a topic can wait for its subscribers."""
    pub = await make_node("pub")
    sub_node = await make_node("sub")
    sub = await sub_node.subscribe("w.*", retained=False)
    async with asyncio.timeout(10):
        await pub.wait_for_subscribers("w.1", 1, timeout=5)
        assert await pub.wait_for_known_subscribers("w.2", timeout=5) == 1
    assert hears(sub_node, pub)
    await pub.publish("w.1", b"x")
    assert (await sub.next(timeout=5)).data == b"x"


async def test_many_topics_are_announced_generalised_and_still_connect(
        make_node: MakeNode) -> None:
    """Past 64 topics the announcement generalises (dev.>, then >) and subscribers of
    any of the topics still connect and receive."""
    pub = await make_node("pub")
    watcher = await make_node("watcher")
    for i in range(70):
        await pub.publish(f"dev.{i}", b"x")
    await aeventually(lambda: announced(watcher, pub) == ["dev.>"], timeout=5)
    sub_node = await make_node("sub")
    sub = await sub_node.subscribe("dev.69", retained=False)
    await pub.wait_for_subscribers("dev.69", 1, timeout=5)
    await pub.publish("dev.69", b"y")
    assert (await sub.next(timeout=5)).data == b"y"
    for i in range(70):
        await pub.publish(f"t{i}", b"x")
    await aeventually(lambda: announced(watcher, pub) == [">"], timeout=5)
    other = await sub_node.subscribe("anything.else", retained=False)
    await pub.wait_for_subscribers("anything.else", 1, timeout=5)
    await pub.publish("anything.else", b"z")
    assert (await other.next(timeout=5)).data == b"z"


async def test_unsubscribing_lets_go_of_the_publisher(make_node: MakeNode) -> None:
    """With no subscription left that meets its topics, the SUB disconnects (after the
    linger delay)."""
    pub = await make_node("pub")
    sub_node = await make_node("sub")
    await pub.publish("gone.soon", b"x")
    sub = await sub_node.subscribe("gone.>", retained=False)
    await aeventually(lambda: hears(sub_node, pub), timeout=5)
    await sub.aclose()
    await aeventually(lambda: not hears(sub_node, pub), timeout=10)


async def test_a_hold_for_a_subscriber_that_never_gets_ready_ends(
        make_node: MakeNode, mesh_name: str) -> None:
    """A known subscriber that never connects delays a new topic by HOLD_TIME at most, and
    a hold that outgrows its count bound goes at once."""
    pub = await make_node("pub", suspect_after=30.0, lost_after=60.0)
    ctx = zmq.asyncio.Context()
    try:
        dealer = ctx.socket(zmq.DEALER)
        dealer.linger = 0
        dealer.connect(pub.endpoints["ctl"][0])
        ghost = "g" * 32  # subscribes, but its SUB never connects
        await dealer.send(wire.encode_control(wire.Hello(
            ghost, "ghost", mesh_name, 1, ["tcp://127.0.0.1:1"], ["tcp://127.0.0.1:2"],
            ["h.>"], 1, pubs=[])))
        await aeventually(lambda: pub._live().membership.table.get(ghost) is not None,
                          timeout=5)
        holds = pub._live().pubsub._holds.topics
        before = pub.stats["published"]
        start = time.monotonic()
        await pub.publish("h.1", b"x")
        await asyncio.sleep(0)  # (its flush)
        assert "h.1" in holds
        assert pub.stats["published"] == before
        await aeventually(lambda: pub.stats["published"] == before + 1, timeout=5)
        assert time.monotonic() - start >= HOLD_TIME * 0.9
        assert "h.1" not in holds
        for _ in range(20_000):
            pub.publish_nowait("h.2", b"y")
        await asyncio.sleep(0)
        assert "h.2" not in holds
        await aeventually(lambda: pub.stats["published"] == before + 20_001, timeout=5)
    finally:
        ctx.destroy(linger=0)


async def test_a_retained_query_a_publisher_cannot_meet_is_answered_at_once(
        make_node: MakeNode, caplog: pytest.LogCaptureFixture) -> None:
    """A node that retains values, none of whose topics meets a new subscription, answers
    it without waiting for that subscriber to connect (it never will)."""
    keeper = await make_node("keeper")
    await keeper.publish("x.1", b"kept", retain=True)
    sub_node = await make_node("sub")
    await aeventually(lambda: announced(sub_node, keeper) == ["x.1"], timeout=5)
    sub = await sub_node.subscribe("y.>")
    await aeventually(lambda: sub._held is None, timeout=5)  # its retained values came
    assert not hears(sub_node, keeper)
    assert "before its subscription was in force" not in caplog.text
