"""Expiry (``ttl``): a message not delivered within its ttl is never delivered, leaves every
spool and is counted as expired — on real nodes over 127.0.0.1, real spools on disk.

Messages are made late for real: either they wait (no worker, a durable that is down, a
pusher that is down), or the one event loop all in-process nodes share is frozen on
purpose after the send, so the receiver reads the message only once its ttl has passed.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from mesh import AsyncNode, ConfigError, Node
from mesh import _wire as wire
from mesh._support._tally import Stats
from mesh._work._backlog import Backlogs
from tests.helpers import aeventually

from ._agent import start_agent
from ._proc import Cli, run
from .conftest import FAST, MakeNode

PATIENT = {"suspect_after": 5.0, "lost_after": 10.0}
"""For tests that freeze the loop: peers on the same loop must not call each other lost."""


def _freeze_loop(seconds: float) -> None:
    """Block the event loop every in-process node runs on, so what was just sent is read
    only after `seconds` (its ttl passes on the way): the one way to be late for real
    without a second clock."""
    time.sleep(seconds)


async def _until(wall_clock: float) -> None:
    """Wait (bounded) until the wall clock passes `wall_clock`: a ttl has run out."""
    await aeventually(lambda: time.time() > wall_clock, timeout=10, interval=0.02,
                      message="the wall clock to pass a ttl")


async def _expired(node: AsyncNode, count: int) -> None:
    await aeventually(lambda: node.stats["expired"] == count, timeout=10,
                      message=f"{node.name} to count {count} expired")


@pytest.mark.parametrize("ttl", [0, -1.0, float("nan"), float("inf"), "5", True])
async def test_a_ttl_must_be_a_finite_number_of_seconds_above_zero(make_node: MakeNode, tmp_path: Path,
                                                                   ttl: object) -> None:
    """Every send refuses a bad ttl with ConfigError('ttl', ...) before doing anything."""
    node = await make_node("n", data_dir=str(tmp_path / "n"))
    sends = [node.publish("t", "x", ttl=ttl),  # type: ignore[arg-type]
             node.publish("t", "x", ttl=ttl, reliable=True),  # type: ignore[arg-type]
             node.publish("t", "x", ttl=ttl, retain=True),  # type: ignore[arg-type]
             node.publish_many("t", ["x"], ttl=ttl),  # type: ignore[arg-type]
             node.push("q", "x", ttl=ttl, timeout=0.1),  # type: ignore[arg-type]
             node.push("q", "x", ttl=ttl, reliable=True)]  # type: ignore[arg-type]
    for send in sends:
        with pytest.raises(ConfigError, match="ttl") as info:
            await send
        assert info.value.key == "ttl"
    with pytest.raises(ConfigError, match="ttl"):
        node.publish_nowait("t", "x", ttl=ttl)  # type: ignore[arg-type]
    assert node.spool_pending == 0
    assert node.stats["published"] == 0


async def test_reliable_push_expires_in_the_backlog_and_leaves_the_outbox(make_node: MakeNode,
                                                                         tmp_path: Path) -> None:
    """No worker: the message with a short ttl leaves the spool, counted; the worker that
    comes later gets only the others, and the outbox ends empty."""
    pusher = await make_node("pusher", data_dir=str(tmp_path / "p"))
    await pusher.push("jobs", "before", reliable=True)
    await pusher.push("jobs", "short", reliable=True, ttl=0.3)
    await pusher.push("jobs", "long", reliable=True, ttl=60)
    await pusher.push("jobs", "after", reliable=True)
    assert pusher.stats["spooled"] == 4
    await _expired(pusher, 1)  # swept from the backlog with no worker in sight
    assert pusher.spool_pending == 3
    worker = await make_node("worker")
    work = await worker.pull("jobs")
    got = [await work.next(timeout=10) for _ in range(3)]
    assert [m.text for m in got] == ["before", "long", "after"]
    with pytest.raises(TimeoutError):
        await work.next(timeout=0.3)  # (also settles "after")
    await aeventually(lambda: pusher.spool_pending == 0, timeout=10)
    assert (pusher.stats["expired"], pusher.stats["acked"]) == (1, 3)
    assert pusher.stats["dead_lettered"] == pusher.stats["redelivered"] == 0
    assert worker.stats["expired"] == 0


async def test_expired_work_is_credited_not_delivered_and_leaves_the_spool(make_node: MakeNode,
                                                                          tmp_path: Path) -> None:
    """A work message whose ttl passes on its way is dropped by the worker before the
    application sees it, and credited: the pusher settles it (its spool empties, its
    window is not held) instead of redelivering it forever."""
    pusher = await make_node("pusher", data_dir=str(tmp_path / "p"), **PATIENT)
    worker = await make_node("worker", **PATIENT)
    work = await worker.pull("jobs", prefetch=2)
    await pusher.wait_for_workers("jobs", timeout=10)
    await pusher.push("jobs", "reliable late", reliable=True, ttl=0.5)
    await pusher.push("jobs", "best effort late", ttl=0.5)
    await asyncio.sleep(0)  # their batch leaves (it is flushed at the end of an iteration)
    _freeze_loop(0.8)
    await _expired(worker, 2)
    await aeventually(lambda: pusher.spool_pending == 0, timeout=10)
    for i in range(2):  # the window of 2 is free again (else these would wait): credited
        await pusher.push("jobs", f"on time {i}", ttl=30, timeout=5)
    got = [(await work.next(timeout=10)).text for _ in range(2)]
    assert got == ["on time 0", "on time 1"]
    assert pusher.stats["redelivered"] == pusher.stats["dead_lettered"] == 0
    assert pusher.stats["lost_in_flight"] == 0


async def test_best_effort_publish_arriving_after_its_ttl_is_dropped_and_counted(
        make_node: MakeNode) -> None:
    """The subscriber reads the batch only after the ttl of one of its messages passed:
    that one is dropped (counted), the others arrive in order."""
    pub = await make_node("pub", **PATIENT)
    sub_node = await make_node("sub", **PATIENT)
    sub = await sub_node.subscribe("news.>")
    await pub.wait_for_subscribers("news.x", timeout=10)
    await pub.publish("news.x", "plain")
    await pub.publish("news.x", "late", ttl=0.2)
    await pub.publish("news.x", "roomy", ttl=30)
    await asyncio.sleep(0)  # the batch leaves now, stamped now
    _freeze_loop(0.4)
    got = [(await sub.next(timeout=10)).text for _ in range(2)]
    assert got == ["plain", "roomy"]
    with pytest.raises(TimeoutError):
        await sub.next(timeout=0.3)
    assert sub_node.stats["expired"] == 1
    assert sub_node.stats["received"] == 3  # it did arrive: dropped, not lost
    assert pub.stats["expired"] == 0


async def test_local_subscribers_get_a_message_with_a_ttl_at_once(make_node: MakeNode) -> None:
    """On the publishing node itself a message is delivered as it is published."""
    node = await make_node("solo")
    sub = await node.subscribe("t")
    await node.publish("t", "here", ttl=0.001)
    assert (await sub.next(timeout=5)).text == "here"


async def test_durable_down_gets_only_unexpired_messages_after_both_sides_restart(
        make_node: MakeNode, tmp_path: Path) -> None:
    """Durable down, publisher restarted after some ttls passed: those are dropped at
    its start (counted, out of the spool); the rest reach the durable when it returns."""
    first = pub = await make_node("pub", data_dir=str(tmp_path / "p"))
    sub_node = await make_node("sub", data_dir=str(tmp_path / "s"))
    await sub_node.subscribe_durable("orders.>", "audit")
    await pub.wait_for_durables("orders.x", 1, timeout=10)
    await sub_node.aclose()
    await pub.publish_many("orders.new", ["s0", "s1", "s2"], reliable=True, ttl=0.5)
    await pub.publish("orders.new", "kept", reliable=True)
    await pub.publish("orders.new", "long", reliable=True, ttl=60)
    deadline = time.time() + 0.5
    assert pub.stats["spooled"] == 5
    await pub.aclose()
    await _until(deadline)

    pub = await make_node("pub", data_dir=str(tmp_path / "p"))
    assert pub.spool_pending == 2  # dropped as the spool was recovered
    assert first.stats["expired"] + pub.stats["expired"] == 3  # (the first, if it was slow)
    back = await make_node("sub", data_dir=str(tmp_path / "s"))
    durable = await back.subscribe_durable("orders.>", "audit")
    got = [(await durable.next(timeout=10)).text for _ in range(2)]
    assert got == ["kept", "long"]
    with pytest.raises(TimeoutError):
        await durable.next(timeout=0.3)
    await aeventually(lambda: pub.spool_pending == 0, timeout=10)


async def test_durable_backlog_expires_while_the_durable_is_down(make_node: MakeNode,
                                                                 tmp_path: Path) -> None:
    """The publisher keeps running: what expires in a durable's backlog leaves its spool."""
    pub, sub_node = (await make_node("pub", data_dir=str(tmp_path / "p")),
                     await make_node("sub", data_dir=str(tmp_path / "s")))
    await sub_node.subscribe_durable("orders.>", "audit")
    await pub.wait_for_durables("orders.x", 1, timeout=10)
    await sub_node.aclose()
    for i in range(4):
        await pub.publish("orders.new", f"short {i}", reliable=True, ttl=0.3)
    await pub.publish("orders.new", "kept", reliable=True)
    await _expired(pub, 4)
    assert pub.spool_pending == 1
    back = await make_node("sub", data_dir=str(tmp_path / "s"))
    durable = await back.subscribe_durable("orders.>", "audit")
    assert (await durable.next(timeout=10)).text == "kept"
    with pytest.raises(TimeoutError):
        await durable.next(timeout=0.3)


async def test_an_expired_message_is_never_dead_lettered(make_node: MakeNode, tmp_path: Path) -> None:
    """A reliable message failing past its ttl is dropped as expired, not retried or buried."""
    pusher = await make_node("pusher", data_dir=str(tmp_path / "p"), max_attempts=100,
                             retry_backoff=0.05)
    worker = await make_node("worker")
    nacked: list[str] = []

    def fail(msg: object) -> None:
        nacked.append("x")
        raise RuntimeError("cannot process")

    await worker.pull("jobs", handler=fail)
    await pusher.push("jobs", "doomed", reliable=True, ttl=0.5)
    await _expired(pusher, 1)
    assert pusher.spool_pending == 0
    assert pusher.stats["dead_lettered"] == 0
    assert nacked  # it was tried, and failed, until its ttl ran out


async def test_a_retained_value_with_a_ttl_stops_being_the_value_once_it_expires(
        make_node: MakeNode, tmp_path: Path) -> None:
    """Until its ttl passes a retained value is served like any other; after, no new
    subscription or `last` gets it, and a restart does not bring it back."""
    pub = await make_node("pub", mdns=False, data_dir=str(tmp_path / "p"))
    await pub.publish("room.a", b"brief", retain=True, ttl=1.5)
    await pub.publish("room.b", b"lasting", retain=True)
    deadline = time.time() + 1.5
    sub_node = await make_node("sub", mdns=False, peers=pub.endpoints["ctl"])
    await sub_node.wait_for_peers(1, timeout=5)
    assert [m.data for m in await sub_node.last("room.>")] == [b"brief", b"lasting"]
    await _until(deadline)
    assert [m.data for m in await sub_node.last("room.>")] == [b"lasting"]
    sub = await sub_node.subscribe("room.>")
    assert (await sub.next(timeout=5)).data == b"lasting"
    with pytest.raises(TimeoutError):
        await sub.next(timeout=0.3)
    await pub.publish("room.c", b"soon gone", retain=True, ttl=0.3)
    deadline = time.time() + 0.3
    await pub.aclose()
    await _until(deadline)
    again = await make_node("pub", mdns=False, data_dir=str(tmp_path / "p"))
    assert [m.data for m in await again.last("room.>")] == [b"lasting"]


async def test_history_does_not_replay_a_message_whose_ttl_passed(make_node: MakeNode) -> None:
    """A late subscriber's replay (``since=``, ``last=``) leaves expired messages out, as
    if they had not been kept; the others come in order, then live."""
    pub = await make_node("pub", mdns=False, history=["s.>"])
    await pub.publish("s.a", "old")
    await pub.publish("s.a", "brief", ttl=0.3)
    await pub.publish("s.b", "kept")
    deadline = time.time() + 0.3
    await _until(deadline)
    sub_node = await make_node("sub", mdns=False, peers=pub.endpoints["ctl"])
    await sub_node.wait_for_peers(1, timeout=5)
    since = await sub_node.subscribe("s.>", since=60)
    assert [m.text for m in [await since.next(timeout=10) for _ in range(2)]] == ["old", "kept"]
    newest = await sub_node.subscribe("s.>", last=1, retained=False)
    assert [m.text for m in [await newest.next(timeout=10) for _ in range(2)]] == ["old", "kept"]
    with pytest.raises(TimeoutError):
        await since.next(timeout=0.3)


def test_the_blocking_node_takes_a_ttl_too(mesh_name: str) -> None:
    """`Node.publish`/`push` take ``ttl`` like their async twins and check it the same way."""
    with Node(name="a", mesh=mesh_name, interfaces=["127.0.0.1"], **FAST) as a, \
            Node(name="b", mesh=mesh_name, interfaces=["127.0.0.1"], **FAST) as b:
        sub = b.subscribe("t")
        a.wait_for_subscribers("t", timeout=10)
        a.publish("t", "fresh", ttl=30)
        assert sub.next(timeout=10).text == "fresh"
        with pytest.raises(ConfigError, match="ttl"):
            a.publish("t", "x", ttl=0)
        with pytest.raises(ConfigError, match="ttl"):
            a.push("q", "x", ttl=-2)


def _item(seq: int, expires: float | None) -> wire.Item:
    return wire.Item(seq, 0.0, None, b"", expires=expires)


def test_a_backlog_drops_only_what_expired_keeps_order_and_knows_the_next_expiry() -> None:
    """Expired messages leave (best effort counted here), the rest keep their order, and a
    backlog is not walked again before its soonest expiry."""
    stats = Stats()
    backlogs = Backlogs(None, stats)
    now = time.time()
    backlogs.extend("q", [(_item(i, e), None) for i, e in
                          enumerate([None, now - 1, now + 60, now - 2, now + 30])])
    backlogs.add("q", (_item(5, None), None))
    backlogs.add("q", (_item(6, now - 3), None), front=True)
    assert [item.seq for item, _ in backlogs.ready("q") or ()] == [0, 2, 4, 5]
    assert stats["expired"] == 3
    before = list(backlogs.get("q") or ())
    backlogs.extend("q", [(_item(8, now - 4), None), (_item(7, None), None)], front=True)
    assert [item.seq for item, _ in backlogs.get("q") or ()] == [7, 8, 0, 2, 4, 5]
    backlogs.sweep_due()  # (a tick)
    assert list(backlogs.get("q") or ()) == [(_item(7, None), None), *before]
    assert stats["expired"] == 4
    assert stats.queues["expired"] == {"q": 4}
    assert backlogs.stranded() == 5
    assert list(backlogs.waiting()) == ["q"]
    plain = Backlogs(None, stats)
    plain.extend("r", [(_item(1, None), None)])
    plain.sweep_due()  # no message with a ttl: nothing to walk
    assert plain.ready("r") is plain.get("r")


async def test_agent_ttl_parameter_expires_a_spooled_push_and_exports_the_count(
        procs: list[Cli], mesh_name: str, tmp_path: Path) -> None:
    """``?ttl=`` reaches the node: a reliable push nobody takes leaves the agent's spool,
    and /metrics shows it in zeromesh_messages_expired_total."""
    agent = start_agent(procs, "--data-dir", str(tmp_path / "a"), mesh=mesh_name, name="side")
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{agent.url}/v1/push/jobs?reliable=true&ttl=0.3",
                             data=b"late") as r:
            assert r.status == 202, await r.text()
        async with http.post(f"{agent.url}/v1/publish/news?ttl=5", data=b"x") as r:
            assert r.status == 202, await r.text()

        async def expired_counted() -> dict[str, float] | None:
            async with http.get(f"{agent.url}/metrics") as r:
                text = await r.text()
            samples = {s.name: s.value for f in text_string_to_metric_families(text)
                       for s in f.samples if not s.labels}
            return samples if samples.get("zeromesh_messages_expired_total") == 1 else None

        samples = await aeventually(expired_counted, timeout=10,
                                    message="zeromesh_messages_expired_total to reach 1")
    assert samples is not None
    assert samples["zeromesh_spool_messages"] == 0


def test_cli_push_ttl_lets_an_unclaimed_message_leave_the_spool(mesh_name: str,
                                                                 tmp_path: Path) -> None:
    """``push --reliable --ttl`` with no worker: the message expires and leaves the spool,
    so the command need not wait out its timeout to keep it."""
    data = str(tmp_path / "d")
    result = run(["push", "jobs", "gone", "--reliable", "--ttl", "0.3", "--timeout", "10",
                  "--data-dir", data], mesh=mesh_name)
    assert result.returncode == 0, result.stderr
    assert "kept in the spool" not in result.stderr
    listing = run(["spool", "ls", "--json", "--data-dir", data], mesh=mesh_name)
    assert '"out": {"messages": 0' in listing.stdout, listing.stdout
