"""AsyncNode in one process: discovery, pub/sub semantics, peers, identity, errors."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import pytest
import zmq
import zmq.asyncio

from mesh import (
    AsyncNode,
    ClosedError,
    ConfigError,
    MessageTooLarge,
    Node,
    NodeConfig,
    PeerEventKind,
    PeerState,
    RequestTimeout,
    Subscription,
)
from mesh import _wire as wire
from mesh._membership import _events
from mesh._spool._lock import DataDirLock
from mesh._support._cache import CACHE_LIMIT
from tests.helpers import aeventually, eventually

from .conftest import FAST, MakeNode


async def test_nodes_discover_each_other_by_mdns(make_node: MakeNode) -> None:
    """Two nodes on loopback see each other alive, never themselves."""
    a = await make_node("a")
    b = await make_node("b")
    async with asyncio.timeout(5):
        await a.wait_for_peers(1)
        await b.wait_for_peers(1)
    assert [p.name for p in a.peers()] == ["b"]
    assert [p.id for p in b.peers()] == [a.id]
    assert a.peers()[0].state is PeerState.ALIVE


async def test_wildcard_subscriptions_receive_exactly_their_topics(make_node: MakeNode) -> None:
    """'*' matches one segment, '>' the rest; other topics are filtered out."""
    pub = await make_node("pub")
    sub_node = await make_node("sub")
    one = await sub_node.subscribe("sensors.*.temp")
    rest = await sub_node.subscribe("sensors.>")
    exact = await sub_node.subscribe("sensors.kitchen")
    await pub.wait_for_subscribers("sensors.x.temp", 1, timeout=5)
    await pub.wait_for_subscribers("sensors.kitchen", 1, timeout=5)
    for topic in ["sensors.kitchen.temp", "sensors.kitchen.hum", "sensors.kitchenette",
                  "sensors.kitchen", "sensors.a.b.temp", "other.kitchen.temp", "sensors"]:
        await pub.publish(topic, topic.encode())
    await asyncio.sleep(0)  # the batch above leaves now; the end markers go in a later one
    await pub.publish("sensors.end.temp", b"end")  # matches `*.temp` and `>`
    await pub.publish("sensors.kitchen", b"end")

    async def until_end(sub: Subscription) -> list[str]:
        topics = []
        while (msg := await sub.next(timeout=5)).data != b"end":
            topics.append(msg.topic)
        return topics

    # Batches from one publisher arrive in order, so anything wrongly delivered
    # would show up before the end marker.
    assert await until_end(one) == ["sensors.kitchen.temp"]
    assert await until_end(rest) == ["sensors.kitchen.temp", "sensors.kitchen.hum",
                                     "sensors.kitchenette", "sensors.kitchen",
                                     "sensors.a.b.temp"]
    assert await until_end(exact) == ["sensors.kitchen"]


async def test_message_carries_id_source_timestamp_and_headers(make_node: MakeNode) -> None:
    """Payload bytes and headers (e.g. traceparent) pass through untouched."""
    pub = await make_node("pub")
    sub_node = await make_node("sub")
    sub = await sub_node.subscribe("t")
    await pub.wait_for_subscribers("t", 1, timeout=5)
    payload = bytes(range(256))
    tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    before = time.time()
    await pub.publish("t", payload, headers={"traceparent": tp})
    msg = await sub.next(timeout=5)
    assert msg.data == payload
    assert msg.headers == {"traceparent": tp}
    assert msg.source == "pub"
    assert msg.source_id == pub.id
    assert msg.id == f"{pub.id}-{msg.seq}"
    assert before <= msg.timestamp <= time.time()


async def test_no_slow_joiner_loss_after_wait_for_subscribers(make_node: MakeNode) -> None:
    """A message published right after wait_for_subscribers reaches a brand-new subscriber, every time."""
    pub = await make_node("pub")
    for i in range(15):
        sub_node = await make_node(f"sub{i}")
        sub = await sub_node.subscribe(f"round.{i}")
        await pub.wait_for_subscribers(f"round.{i}", 1, timeout=5)
        await pub.publish(f"round.{i}", b"first")
        assert (await sub.next(timeout=5)).data == b"first"
        await sub_node.aclose()


async def test_wait_for_subscribers_times_out_without_subscribers(make_node: MakeNode) -> None:
    """No matching subscriber: RequestTimeout (a TimeoutError), nothing hangs."""
    pub = await make_node("pub")
    other = await make_node("other")
    await other.subscribe("not.this")
    with pytest.raises(RequestTimeout) as info:
        await pub.wait_for_subscribers("this.topic", 1, timeout=0.3)
    assert isinstance(info.value, TimeoutError)


async def test_ever_new_topic_names_keep_bounded_sequence_tables(make_node: MakeNode) -> None:
    """A publisher on ever new topics (ids in names) keeps a bounded per-topic sequence
    table, and so does its subscriber per (publisher, topic); forgetting one counts no
    gap. Unbounded, both held one entry per name ever published, for the node's life."""
    pub = await make_node("pub", mdns=False)
    sub_node = await make_node("sub", mdns=False, peers=pub.endpoints["ctl"])
    sub = await sub_node.subscribe("ids.>")
    await pub.wait_for_subscribers("ids.x", 1, timeout=5)
    n, got = CACHE_LIMIT + 2_000, 0
    for start in range(0, n, 2_000):
        for i in range(start, min(n, start + 2_000)):
            pub.publish_nowait(f"ids.{i}", b"")
        while got < min(n, start + 2_000):
            await sub.next(timeout=5)
            got += 1 + len(sub.drain(10_000))
    assert len(pub._live().pubsub._topic_seq) <= CACHE_LIMIT
    assert len(sub_node._live().pubsub._expected_seq) <= CACHE_LIMIT
    assert sub_node.stats["dropped"] == 0


async def test_connected_subscriber_that_keeps_up_loses_nothing(make_node: MakeNode) -> None:
    """20,000 messages at default HWMs all arrive, in order, with no drops counted."""
    pub = await make_node("pub")
    sub_node = await make_node("sub")
    sub = await sub_node.subscribe("bulk.>")
    await pub.wait_for_subscribers("bulk.a", 1, timeout=5)
    n = 20_000
    for i in range(n):
        await pub.publish("bulk.a" if i % 2 else "bulk.b", str(i))
    seen = [int((await sub.next(timeout=5)).data) for _ in range(n)]
    assert sorted(seen) == list(range(n))
    assert [s for s in seen if s % 2] == list(range(1, n, 2))  # per-topic order kept
    assert sub_node.stats["dropped"] == 0


def test_drops_at_the_high_water_mark_are_counted() -> None:
    """A subscriber whose loop stalls loses messages past the HWM, and counts every one."""
    import uuid
    mesh = "t" + uuid.uuid4().hex[:12]
    common: dict[str, Any] = {"mesh": mesh, "interfaces": ["127.0.0.1"], **FAST}
    with Node(name="sub", sub_hwm=1, **common) as sub_node, \
            Node(name="pub", pub_hwm=1, **common) as pub:
        sub = sub_node.subscribe("flood")
        pub.wait_for_subscribers("flood", 1, timeout=5)
        stall = sub_node._loop
        assert stall is not None
        release = threading.Event()
        stall.call_soon_threadsafe(release.wait, 20)  # the receiving node stops reading...
        # 100 MB: more than the loopback socket buffers hold (tcp_rmem's 32 MB and
        # tcp_wmem's 4 MB at most), however the publisher batches its messages into frames
        n, padding = 5_000, b"." * 20_000
        try:
            for i in range(n):
                pub.publish("flood", b"%d%s" % (i, padding))
        finally:
            release.set()  # ...until everything was published, however slow the machine
        first = sub.next(timeout=10)  # the stalled loop is reading again
        assert not first.data.startswith(b"end")
        # A later message on the topic reveals any tail gap. With a HWM of 1 it may be
        # dropped itself while the queues drain: send numbered ones until one arrives.
        got, ends, seen = 1, 0, None
        deadline = time.monotonic() + 20
        while seen is None:
            assert time.monotonic() < deadline, "no end marker arrived"
            pub.publish("flood", f"end{ends}")
            ends += 1
            with contextlib.suppress(TimeoutError):
                while True:
                    data = sub.next(timeout=0.5).data
                    if data.startswith(b"end"):
                        seen = int(data[3:])
                        break
                    got += 1
        assert sub_node.stats["dropped"] > 0
        assert sub_node._node.dropped_by_peer == {pub.id: sub_node.stats["dropped"]}
        assert got + sub_node.stats["dropped"] == n + seen  # the ends before it were dropped


async def test_own_publishes_reach_own_subscribers(make_node: MakeNode) -> None:
    """Two apps sharing one node (sidecar) see each other's messages, once."""
    node = await make_node("solo")
    sub = await node.subscribe("local.*")
    await node.publish("local.x", b"hi")
    msg = await sub.next(timeout=1)
    assert (msg.topic, msg.data, msg.source_id) == ("local.x", b"hi", node.id)
    with pytest.raises(TimeoutError):
        await sub.next(timeout=0.1)


async def test_nodes_of_other_meshes_are_invisible(make_node: MakeNode, mesh_name: str) -> None:
    """Same LAN, different mesh: never listed, never delivered to."""
    a = await make_node("a")
    stranger = await make_node("stranger", mesh=mesh_name + "x")
    b = await make_node("b")
    strange_sub = await stranger.subscribe(">")
    await a.wait_for_peers(1, timeout=5)
    await b.subscribe(">")
    await a.wait_for_subscribers("x", 1, timeout=5)
    await a.publish("x", b"for my mesh only")
    assert {p.name for p in a.peers()} == {"b"}
    assert {p.name for p in stranger.peers()} == set()
    with pytest.raises(TimeoutError):
        await strange_sub.next(timeout=0.2)


async def test_graceful_leave_is_an_event_and_removes_the_peer(make_node: MakeNode) -> None:
    """aclose() says goodbye: peers see 'left' at once, not 'lost' later; the event's peer
    is in state LEFT (it was snapshotted as it had been, alive), and is listed no more."""
    a = await make_node("a")
    events = a.events()
    b = await make_node("b")
    joined = await events.next(timeout=5)
    assert (joined.kind, joined.peer.name) == (PeerEventKind.JOINED, "b")
    started = time.monotonic()
    closing = asyncio.create_task(b.aclose())  # its mDNS goodbye alone takes ~0.25 s
    left = await events.next(timeout=5)
    took = time.monotonic() - started
    await closing
    assert (left.kind, left.peer.id, left.peer.state) == (PeerEventKind.LEFT, b.id,
                                                          PeerState.LEFT)
    assert left.peer.to_dict()["state"] == "left"
    assert took < FAST["lost_after"]
    assert a.peers() == []


async def test_an_events_stream_nobody_reads_keeps_only_the_newest(
        make_node: MakeNode, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """A stream opened and not read (an SSE client that stopped reading) held every event
    for the node's life; now the newest `MAX_PENDING`, the rest counted and warned of."""
    monkeypatch.setattr(_events, "MAX_PENDING", 2)
    a = await make_node("a", mdns=False)
    idle = a.events()
    for joined, name in enumerate(("b", "c", "d", "e"), 1):
        await make_node(name, mdns=False, peers=a.endpoints["ctl"])
        await a.wait_for_peers(joined, timeout=5)  # (one at a time: the events in order)
    assert idle.dropped == 2
    kept = [await idle.next(timeout=1), await idle.next(timeout=1)]
    assert [e.peer.name for e in kept] == ["d", "e"]
    assert sum("events behind its reader" in r.getMessage() for r in caplog.records) == 1


async def test_static_peers_without_mdns(make_node: MakeNode) -> None:
    """--peer works where multicast does not: one side knowing the other is enough."""
    a = await make_node("a", mdns=False)
    b = await make_node("b", mdns=False, peers=a.endpoints["ctl"])
    await a.wait_for_peers(1, timeout=5)
    await b.wait_for_peers(1, timeout=5)
    sub = await a.subscribe("s")
    await b.wait_for_subscribers("s", 1, timeout=5)
    await b.publish("s", b"static")
    assert (await sub.next(timeout=5)).data == b"static"


async def test_node_id_is_stable_across_restarts_with_a_data_dir(make_node: MakeNode, tmp_path: Path) -> None:
    """The id lives in the data dir: a restarted node is the same node."""
    first = await make_node("n", data_dir=str(tmp_path))
    node_id = first.id
    await first.aclose()
    second = await make_node("n", data_dir=str(tmp_path))
    assert second.id == node_id
    other = await make_node("n2")
    assert other.id != node_id


async def test_a_start_refused_by_the_data_dir_lock_leaves_the_id_alone(
        make_node: MakeNode, tmp_path: Path) -> None:
    """Two processes starting at once on a new data dir: the one that loses the lock
    must not write an id (before: each wrote its own, and in 12 of 20 such races the
    node left running had an id that its next start would not read back)."""
    other_start = DataDirLock(str(tmp_path))  # the other process, between lock and id
    other_start.acquire()
    try:
        with pytest.raises(ConfigError, match="in use"):
            await make_node("n", data_dir=str(tmp_path))
        assert not (tmp_path / "node_id").exists()
    finally:
        other_start.release()
    node = await make_node("n", data_dir=str(tmp_path))
    assert (tmp_path / "node_id").read_text().strip() == node.id


async def test_garbage_on_the_control_port_is_dropped_and_counted(make_node: MakeNode) -> None:
    """Random bytes, wrong versions and unknown tags never crash the node."""
    a = await make_node("a")
    ctx = zmq.asyncio.Context()
    try:
        dealer = ctx.socket(zmq.DEALER)
        dealer.linger = 0
        dealer.connect(a.endpoints["ctl"][0])
        for frames in ([b"garbage"], [b"ZM\x09C\x93\x01"], [wire.CONTROL_HEADER + b"\xc1"],
                       [wire.CONTROL_HEADER + b"\x92\x63\x01"], [b"a", b"b", b"c"]):
            await dealer.send_multipart(frames)
        await aeventually(lambda: a.dropped_input.get("control", 0) >= 5, timeout=5)
        b = await make_node("b")
        sub = await b.subscribe("still.works")
        await a.wait_for_subscribers("still.works", 1, timeout=5)
        await a.publish("still.works", b"yes")
        assert (await sub.next(timeout=5)).data == b"yes"
    finally:
        ctx.destroy(linger=0)


async def test_garbage_from_a_publishing_peer_is_dropped_and_counted(make_node: MakeNode, mesh_name: str) -> None:
    """A peer whose data frames are malformed is counted; good frames still flow."""
    node = await make_node("victim", mdns=False)
    sub = await node.subscribe(">")
    ctx = zmq.asyncio.Context()
    try:
        pub = ctx.socket(zmq.XPUB)
        pub.linger = 0
        port = pub.bind_to_random_port("tcp://127.0.0.1")
        dealer = ctx.socket(zmq.DEALER)
        dealer.linger = 0
        dealer.connect(node.endpoints["ctl"][0])
        fake_id = "f" * 32
        hello = wire.Hello(fake_id, "fake", mesh_name, 1, ["tcp://127.0.0.1:1"],
                           [f"tcp://127.0.0.1:{port}"], [], 0)
        await dealer.send(wire.encode_control(hello))
        await asyncio.wait_for(pub.recv(), 5)  # the victim's SUB has subscribed to us
        await pub.send(b"x\x00ZM\x01D\xc1")
        await pub.send(b"\xff\xfe\x00" + wire.DATA_HEADER + b"\x90")
        await pub.send_multipart([b"x\x00", b"two frames"])
        await pub.send(b"no key at all" * 30)
        good = wire.encode_data(b"x\x00", wire.Batch(fake_id, "fake", 0,
                                                      [wire.Item(0, 1.0, None, b"ok")]))
        await pub.send(good)
        msg = await sub.next(timeout=5)
        assert (msg.topic, msg.data, msg.source) == ("x", b"ok", "fake")
        assert node.dropped_input["data"] == 4
    finally:
        ctx.destroy(linger=0)


async def test_bad_names_and_sizes_are_clear_errors(make_node: MakeNode) -> None:
    """Invalid topics/patterns raise ConfigError; oversized payloads MessageTooLarge."""
    node = await make_node("n", max_message_size=1000)
    for topic in ["", "a..b", "a.*", "a b", "a.>"]:
        with pytest.raises(ConfigError, match="topic"):
            await node.publish(topic, b"x")
    for pattern in ["", "a.>.b", "a*"]:
        with pytest.raises(ConfigError, match="pattern"):
            await node.subscribe(pattern)
    with pytest.raises(MessageTooLarge, match="1001 bytes"):
        await node.publish("ok", b"x" * 1001)
    with pytest.raises(MessageTooLarge, match="1001 bytes"):
        await node.push("q", b"x" * 1001, timeout=0.1)
    assert node.traffic().totals["oversized"] == 2  # refused before sending, and counted


async def test_bad_headers_are_clear_errors_and_take_nothing_else_with_them(
        make_node: MakeNode) -> None:
    """Headers that no message can carry (not str to str, or a lone surrogate, as from
    bytes decoded with ``surrogateescape``) are refused by the call that sends them; they
    used to be found only as their batch was encoded, and the batch, other topics' messages
    too, was lost."""
    pub = await make_node("pub")
    sub_node = await make_node("sub")
    sub = await sub_node.subscribe("h.>")
    await pub.wait_for_subscribers("h.ok", 1, timeout=5)
    await pub.publish("h.ok", b"before", headers={"x-k": "v"})
    bad_headers: list[tuple[Any, type[Exception], str]] = [
        ({"x-k": "caf\udce9"}, ConfigError, "not valid Unicode"),
        ({"x-\udce9": "v"}, ConfigError, "not valid Unicode"),
        ({"x-k": 1}, TypeError, "str to a str"),
        ({1: "v"}, TypeError, "str to a str"),
        ([("x-k", "v")], TypeError, "must be a mapping"),
    ]
    for headers, error, reason in bad_headers:
        with pytest.raises(error, match=reason):
            await pub.publish("h.bad", b"x", headers=headers)
        with pytest.raises(error, match=reason):
            await pub.publish("h.bad", b"x", headers=headers, retain=True)
        with pytest.raises(error, match=reason):
            await pub.push("h.q", b"x", headers=headers, timeout=0.1)
        with pytest.raises(error, match=reason):
            await pub.request("h.svc", b"x", headers=headers, timeout=0.1)
    await pub.publish("h.ok", b"after", headers={"x-k": "v"})
    got = [await sub.next(timeout=5) for _ in range(2)]
    assert [(m.topic, m.data) for m in got] == [("h.ok", b"before"), ("h.ok", b"after")]
    assert await pub.last("h.>", timeout=0.5) == []  # no retained value of a refused publish


async def test_bad_settings_fail_at_construction() -> None:
    """Interfaces, mesh names and timings are validated before anything binds."""
    cases: list[tuple[dict[str, Any], str]] = [({"interfaces": ["0.0.0.0"]}, "interfaces"),
                                               ({"interfaces": ["not-an-ip"]}, "interfaces"),
                                               ({"mesh": "bad mesh"}, "mesh"),
                                               ({"lost_after": 0.1}, "lost_after"),
                                               ({"peers": ["http://x"]}, "peers"),
                                               ({"max_attempts": 0}, "max_attempts"),
                                               ({"ack_timeout": float("nan")}, "ack_timeout"),
                                               ({"retry_backoff": float("nan")},
                                                "retry_backoff")]
    for settings, key in cases:
        with pytest.raises(ConfigError, match=key):
            AsyncNode(**settings)


@pytest.mark.parametrize("key", ["forget_after", "history_max_age", "ack_timeout",
                                 "retry_backoff", "heartbeat_interval"])
def test_a_nan_duration_is_a_config_error(key: str) -> None:
    """NaN passed every `<= 0` check: with ``forget_after=nan`` a node whose peer was lost
    spun its loop at 100 % of a core (the forget timer re-armed at once, forever)."""
    settings: dict[str, Any] = {key: float("nan")}
    with pytest.raises(ConfigError, match=f"^{key}: must be a number, not NaN"):
        AsyncNode(**settings)
    with pytest.raises(ConfigError, match="not NaN"):
        NodeConfig.from_env({f"ZEROMESH_{key.upper()}": "nan"}).validated()


async def test_calls_on_a_closed_node_raise_closed_error(make_node: MakeNode) -> None:
    """Using a node after aclose() is a ClosedError, not a zmq error."""
    node = await make_node("n")
    await node.aclose()
    with pytest.raises(ClosedError):
        await node.publish("t", b"x")
    with pytest.raises(ClosedError):
        await node.subscribe("t")
    with pytest.raises(ClosedError):  # (a stream opened now would never end)
        node.events()


async def test_misuses_of_subscribe_are_clear_errors(make_node: MakeNode) -> None:
    """An async callback would never be awaited (nothing would run); `since` and `last`
    take only what they mean."""
    node = await make_node("n")

    async def handler(msg: Any) -> None:
        pass

    with pytest.raises(TypeError, match="async function"):
        await node.subscribe("t", callback=handler)  # type: ignore[arg-type]
    bad: list[tuple[dict[str, Any], str]] = [
        ({"since": "10m"}, "since"), ({"since": float("nan")}, "since"),
        ({"since": float("inf")}, "since"), ({"since": True}, "since"),
        ({"last": 1.5}, "last"), ({"last": True}, "last"), ({"last": 0}, "last")]
    for kwargs, key in bad:
        with pytest.raises(ConfigError, match=key):
            await node.subscribe("t", **kwargs)


def test_blocking_calls_on_the_nodes_own_loop_are_errors_not_hangs(mesh_name: str) -> None:
    """An async handler runs on the node's loop: a blocking call from it would wait for
    that loop forever. It is a RuntimeError; reading a figure there works."""
    outcome: list[str] = []
    with Node(name="a", mesh=mesh_name, interfaces=["127.0.0.1"], mdns=False) as node:

        async def handler(msg: Any) -> bytes:
            try:
                node.publish("x.y", b"1", retain=True)
            except RuntimeError as exc:
                outcome.append(str(exc))
            outcome.append(f"peers {len(node.peers())}")
            return b"ok"

        node.serve("svc", handler)
        assert node.request("svc", b"x", timeout=5, retries=0).data == b"ok"
        with pytest.raises(TypeError, match="async function"):
            node.subscribe("t", callback=handler)  # type: ignore[arg-type]
        with pytest.raises(ConfigError, match="not valid Unicode"):
            node.publish("t", b"x", headers={"x-k": "caf\udce9"})
    assert len(outcome) == 2, outcome
    assert "own loop" in outcome[0]
    assert outcome[1] == "peers 0"


def test_a_closed_blocking_node_raises_without_a_never_awaited_warning(
        mesh_name: str) -> None:
    node = Node(name="a", mesh=mesh_name, interfaces=["127.0.0.1"], mdns=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cases: list[dict[str, Any]] = [{"reliable": True}, {"retain": True}]
        for kwargs in cases:
            with pytest.raises(ClosedError):
                node.publish("t", b"x", **kwargs)
            with pytest.raises(ClosedError):
                node.publish_many("t", [b"x"], **kwargs)
        gc.collect()  # (an unawaited coroutine warns when it is collected)


def test_closed_event_streams_of_a_blocking_node_leave_nothing_behind(
        mesh_name: str) -> None:
    """Each stream has a task on the loop forwarding its events; a closed stream's task
    ends and is let go (they used to pile up until the node closed)."""
    with Node(name="a", mesh=mesh_name, interfaces=["127.0.0.1"], mdns=False) as node:
        for _ in range(20):
            node.events().close()
        kept = node.events()
        eventually(lambda: len(node._pumps) == 1, timeout=5)
        kept.close()
        eventually(lambda: not node._pumps, timeout=5)


def test_sync_node_round_trip_and_events() -> None:
    """The blocking Node has the same API and sees the same events."""
    import uuid
    mesh = "t" + uuid.uuid4().hex[:12]
    common: dict[str, Any] = {"mesh": mesh, "interfaces": ["127.0.0.1"], **FAST}
    with Node(name="a", **common) as a:
        events = a.events()
        with Node(name="b", **common) as b:
            sub = b.subscribe("greet.*")
            a.wait_for_subscribers("greet.you", 1, timeout=5)
            a.publish("greet.you", "hello")
            msg = sub.next(timeout=5)
            assert (msg.topic, msg.text, msg.source) == ("greet.you", "hello", "a")
            assert [p.name for p in a.peers()] == ["b"]
        kinds = [events.next(timeout=5).kind, events.next(timeout=5).kind]
        assert kinds == [PeerEventKind.JOINED, PeerEventKind.LEFT]
