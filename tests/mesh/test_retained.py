"""Retained values: a late subscriber gets each topic's newest value, then live messages.

On 127.0.0.1 with real nodes: the values come first, newest across publishers;
`retained=False` skips them; an empty retained publish clears a topic; `last`
gathers them; and between the values and the live stream nothing is lost or
repeated while the topic is published to at full speed.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from collections.abc import Awaitable
from pathlib import Path

import aiohttp
import pytest

from mesh import ConfigError, Message, Subscription
from tests.helpers import aeventually

from ._flood import ROUND, join_during_flood
from ._proc import Cli, child_env, run
from .conftest import FAST, FAST_ENV, MakeNode


async def _values(sub: Subscription, n: int) -> list[Message]:
    return [await sub.next(timeout=5) for _ in range(n)]


async def test_a_late_subscriber_gets_the_newest_values_then_live(make_node: MakeNode) -> None:
    """Values first (in topic order), then what is published after, once each."""
    pub = await make_node("pub", mdns=False)
    await pub.publish("room.a.temp", b"19", retain=True)
    await pub.publish("room.a.temp", b"20", retain=True)
    await pub.publish("room.b.temp", b"18", retain=True)
    await pub.publish("room.b.hum", b"40", retain=True)  # not matched below
    sub_node = await make_node("sub", mdns=False, peers=pub.endpoints["ctl"])
    await sub_node.wait_for_peers(1, timeout=5)
    sub = await sub_node.subscribe("room.*.temp")
    first = await _values(sub, 2)
    assert [(m.topic, m.data, m.source) for m in first] == [
        ("room.a.temp", b"20", "pub"), ("room.b.temp", b"18", "pub")]
    await pub.wait_for_subscribers("room.a.temp", 1, timeout=5)
    await pub.publish("room.a.temp", b"21")
    live = await sub.next(timeout=5)
    assert (live.topic, live.data) == ("room.a.temp", b"21")
    with pytest.raises(TimeoutError):
        await sub.next(timeout=0.2)


async def test_values_published_while_they_are_gathered_all_arrive_live(
        make_node: MakeNode) -> None:
    """The publisher retains values, and publishes a hundred more as soon as the new
    subscription is in force, while the subscriber still gathers: its answer holds the
    newest of them, which used to count as covering the live ones before it, so 99 of
    them were dropped. All hundred arrive, in order, once each."""
    pub = await make_node("pub", mdns=False)
    await pub.publish("t.x", b"before", retain=True)
    sub_node = await make_node("sub", mdns=False, peers=pub.endpoints["ctl"])
    sub = await sub_node.subscribe("t.>")
    await pub.wait_for_subscribers("t.x", 1, timeout=5)
    for i in range(100):
        await pub.publish("t.x", b"%d" % i, retain=True)
    got = [(await sub.next(timeout=5)).data for _ in range(100)]
    assert got == [b"%d" % i for i in range(100)]
    with pytest.raises(TimeoutError):
        await sub.next(timeout=0.3)


async def test_a_publisher_outranked_by_a_newer_value_loses_nothing_live(
        make_node: MakeNode) -> None:
    """Two publishers of a topic publish while a new subscription gathers: b's value is
    the newest, so a's was not delivered, but still counted as covering a's messages up
    to it, and the 20 a published live after the subscription was in force were dropped
    (the subscriber got only b1). Each of them arrives once, in order."""
    a = await make_node("a", mdns=False)
    b = await make_node("b", mdns=False, peers=a.endpoints["ctl"])
    await a.publish("t.x", b"a0", retain=True)
    await b.publish("t.x", b"b0", retain=True)
    s = await make_node("s", mdns=False, peers=a.endpoints["ctl"] + b.endpoints["ctl"])
    sub = await s.subscribe("t.>")
    await a.wait_for_subscribers("t.x", 1, timeout=5)
    await b.wait_for_subscribers("t.x", 1, timeout=5)
    for i in range(1, 21):
        await a.publish("t.x", b"a%d" % i, retain=True)
    await asyncio.sleep(0.01)  # b's value is the newest
    await b.publish("t.x", b"b1", retain=True)
    got: list[bytes] = []
    while b"b1" not in got or b"a20" not in got:
        got.append((await sub.next(timeout=5)).data)
    with pytest.raises(TimeoutError):
        got.append((await sub.next(timeout=0.3)).data)
    assert [g for g in got if g.startswith(b"a") and g != b"a0"] == [
        b"a%d" % i for i in range(1, 21)]
    assert got.count(b"b1") == 1


async def test_retained_false_skips_the_values(make_node: MakeNode) -> None:
    pub = await make_node("pub", mdns=False)
    await pub.publish("cfg.mode", b"eco", retain=True)
    sub_node = await make_node("sub", mdns=False, peers=pub.endpoints["ctl"])
    await sub_node.wait_for_peers(1, timeout=5)
    sub = await sub_node.subscribe("cfg.>", retained=False)
    await pub.wait_for_subscribers("cfg.mode", 1, timeout=5)
    await pub.publish("cfg.mode", b"boost")
    assert (await sub.next(timeout=5)).data == b"boost"


async def test_newest_wins_across_publishers_and_an_empty_value_clears(
        make_node: MakeNode) -> None:
    """Two publishers retain the same topic: the later timestamp wins; clearing one
    leaves the other's; `last` shows the same as a subscription."""
    a = await make_node("a", mdns=False)
    b = await make_node("b", mdns=False, peers=a.endpoints["ctl"])
    await a.publish("door", b"open", retain=True)
    await asyncio.sleep(0.01)  # distinct timestamps: the rule is newest first
    await b.publish("door", b"closed", retain=True)
    await b.publish("light", b"on", retain=True)
    c = await make_node("c", mdns=False, peers=a.endpoints["ctl"] + b.endpoints["ctl"])
    await c.wait_for_peers(2, timeout=5)
    values = await c.last(">")
    assert [(m.topic, m.data, m.source) for m in values] == [
        ("door", b"closed", "b"), ("light", b"on", "b")]
    await b.publish("door", b"", retain=True)  # clears b's value: a's is what remains
    assert [(m.data, m.source) for m in await c.last("door")] == [(b"open", "a")]
    await a.publish("door", b"", retain=True)
    assert await c.last("door") == []


async def test_values_with_large_headers_are_paged_within_the_message_limit(
        make_node: MakeNode) -> None:
    """A page counted payloads and topics but not headers: 50 values with 2 KiB of headers
    each made one 100 KiB answer against a 64 KiB limit, refused whole, so a late joiner
    got none of the publisher's values. All 50 arrive, headers intact."""
    limit = {"max_message_size": 64 * 1024, "mdns": False}
    pub = await make_node("pub", **limit)
    meta = {"meta": "m" * 2048}
    for i in range(50):
        await pub.publish(f"big.{i:02d}", b"%d" % i, headers=meta, retain=True)
    sub_node = await make_node("sub", peers=pub.endpoints["ctl"], **limit)
    await sub_node.wait_for_peers(1, timeout=5)
    values = await sub_node.last("big.*")
    assert [(m.topic, m.headers) for m in values] == [(f"big.{i:02d}", meta) for i in range(50)]


async def test_a_value_at_the_message_limit_reaches_a_late_joiner(make_node: MakeNode) -> None:
    """A payload of exactly ``max_message_size`` is a valid publish, but its answer (the
    item, topic and page around it) passed that limit and was refused: `last`, a new
    subscription and a history replay got nothing of it, nor of the topics after it."""
    limit = {"max_message_size": 64 * 1024, "mdns": False}
    pub = await make_node("pub", history=["big.>"], **limit)
    await pub.publish("big.a", b"a" * (64 * 1024), retain=True)
    await pub.publish("big.b", b"b", retain=True)
    sub_node = await make_node("sub", peers=pub.endpoints["ctl"], **limit)
    await sub_node.wait_for_peers(1, timeout=5)
    assert [len(m.data) for m in await sub_node.last("big.*")] == [64 * 1024, 1]
    for since in (None, 600):
        sub = await sub_node.subscribe("big.*", since=since)
        assert [len(m.data) for m in await _values(sub, 2)] == [64 * 1024, 1]
        await sub.aclose()


async def test_a_publisher_sees_its_own_values(make_node: MakeNode) -> None:
    """An agent's own retained publishes reach its own later subscribers too."""
    node = await make_node("solo", mdns=False)
    await node.publish("x.y", b"1", retain=True)
    sub = await node.subscribe("x.*")
    msg = await sub.next(timeout=5)
    assert (msg.topic, msg.data, msg.source_id) == ("x.y", b"1", node.id)
    assert [m.data for m in await node.last("x.y")] == [b"1"]


async def test_no_gap_and_no_duplicate_while_the_topic_is_published_at_full_speed(
        make_node: MakeNode) -> None:
    """The Clone pattern's promise: joining mid-stream, the subscriber's sequence from
    the publisher is consecutive from its first (retained) value on."""
    joined, got = await join_during_flood(make_node, retain=True, publisher={}, subscribe={})
    # the value retained when it joined, or later; or one of the round the publisher had
    # not sent yet, live (not a gap: the retained value then is left out)
    assert got[0] >= joined - ROUND, "the first is older than anything queued at the join"
    assert got == list(range(got[0], got[0] + len(got)))


def test_values_survive_a_sigkill_and_a_cleared_topic_stays_cleared(tmp_path: Path,
                                                                    mesh_name: str) -> None:
    """With a data dir, retained values are on disk: a SIGKILLed publisher restarted on
    it still answers with them."""
    data = tmp_path / "pub"
    env = {**child_env(mesh_name), **FAST_ENV, "ZEROMESH_MDNS": "false"}

    def serve_values(mode: str) -> subprocess.Popen[str]:
        code = ("import asyncio, sys\n"
                "from mesh import AsyncNode\n"
                "async def main():\n"
                f"    async with AsyncNode(name='pub', data_dir={str(data)!r}, port=0) as n:\n"
                "        if sys.argv[1] == 'write':\n"
                "            await n.publish('keep.a', 'A', retain=True)\n"
                "            await n.publish('keep.b', 'B', retain=True)\n"
                "            await n.publish('keep.b', '', retain=True)\n"
                "            await n.publish('keep.c', 'C', retain=True)\n"
                "            await asyncio.sleep(0)\n"
                "        print('ready', n.endpoints['ctl'][0], flush=True)\n"
                "        await asyncio.Event().wait()\n"
                "asyncio.run(main())\n")
        return subprocess.Popen([sys.executable, "-c", code, mode], env=env, text=True,
                                stdout=subprocess.PIPE)

    for mode in ("write", "read"):
        proc = serve_values(mode)
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline().split()
            assert line[0] == "ready", line
            got = run(["last", "keep.>", "--json", "--peer", line[1], "--no-mdns"],
                      mesh=mesh_name)
            assert got.returncode == 0, got.stderr
            values = json.loads(got.stdout)
            assert [(v["topic"], v["data"]) for v in values] == [("keep.a", "A"),
                                                                 ("keep.c", "C")]
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            if proc.stdout is not None:
                proc.stdout.close()


async def test_a_value_whose_publish_returned_survives_a_sigkill_at_once(
        make_node: MakeNode, tmp_path: Path, mesh_name: str) -> None:
    """Killed right after `publish(retain=True)` returned, before its loop turned again: the
    restarted node holds that value, not the one before (the last whose publish returned)."""
    data = tmp_path / "pub"
    code = ("import asyncio, os, signal\n"
            "from mesh import AsyncNode\n"
            "async def main():\n"
            f"    n = AsyncNode(name='pub', data_dir={str(data)!r}, port=0, mdns=False)\n"
            "    await n.start()\n"
            "    await n.publish('keep.a', 'old', retain=True)\n"
            "    await asyncio.sleep(0.05)\n"
            "    await n.publish('keep.a', 'new', retain=True)\n"
            "    os.kill(os.getpid(), signal.SIGKILL)\n"
            "asyncio.run(main())\n")
    child = await asyncio.to_thread(subprocess.run, [sys.executable, "-c", code],
                                    env=child_env(mesh_name), timeout=20, check=False)
    assert child.returncode == -signal.SIGKILL
    node = await make_node("pub", mdns=False, data_dir=str(data))
    assert [(m.topic, m.text) for m in await node.last("keep.>")] == [("keep.a", "new")]


async def test_cli_pub_retain_then_sub_and_last(make_node: MakeNode, procs: list[Cli],
                                                mesh_name: str) -> None:
    """A long-lived `pub --retain` holds the value (it lives with its publisher); `last`
    and `sub` find it there, `sub --no-retained` does not."""
    seed = await make_node("seed", mdns=False)
    publisher = Cli(["pub", "sensors.t", "--retain", "--peer", seed.endpoints["ctl"][0],
                     "--no-mdns"], mesh=mesh_name, env={**FAST_ENV, "ZEROMESH_MDNS": "false"},
                    stdin=True)
    procs.append(publisher)
    assert publisher.proc.stdin is not None
    publisher.proc.stdin.write("22.0\n")
    publisher.proc.stdin.flush()
    await aeventually(lambda: _data(seed.last("sensors.>")), timeout=20)
    [peer] = seed.peers()
    ctl = peer.endpoints[0]

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return run([*args, "--peer", ctl, "--no-mdns"], mesh=mesh_name)

    last = await asyncio.to_thread(cli, "last", "sensors.>", "--json")
    assert last.returncode == 0, last.stderr
    assert [(v["topic"], v["data"]) for v in json.loads(last.stdout)] == [("sensors.t", "22.0")]
    sub = await asyncio.to_thread(cli, "sub", "sensors.*", "--count", "1", "--timeout", "10")
    assert (sub.returncode, sub.stdout) == (0, "sensors.t 22.0\n")
    skip = await asyncio.to_thread(cli, "sub", "sensors.*", "--no-retained", "--count", "1",
                                   "--timeout", "2")
    assert skip.returncode == 1
    publisher.proc.stdin.close()  # `pub` ends at the end of its input
    assert await asyncio.to_thread(publisher.wait, 15) == 0


async def _data(values: Awaitable[list[Message]]) -> bool:
    return [m.data for m in await values] == [b"22.0"]


def test_retain_reliable_without_a_data_dir_is_a_usage_error(mesh_name: str) -> None:
    """`--retain` alone needs no data dir; with `--reliable` (the spool) it does."""
    assert run(["pub", "t", "x", "--retain", "--no-mdns"], mesh=mesh_name).returncode == 0
    got = run(["pub", "t", "x", "--retain", "--reliable", "--no-mdns"], mesh=mesh_name)
    assert got.returncode == 2
    assert got.stderr.count("\n") == 1
    assert "data dir" in got.stderr


async def test_last_rejects_bad_input(make_node: MakeNode) -> None:
    node = await make_node("n", mdns=False)
    with pytest.raises(ConfigError):
        await node.last("a..b")
    with pytest.raises(ConfigError):
        await node.last("a", timeout=0)


async def test_the_blocking_node_retains_and_reads_back(mesh_name: str) -> None:
    from mesh import Node

    def work() -> list[bytes]:
        with Node(name="b", mesh=mesh_name, interfaces=["127.0.0.1"], mdns=False,
                  **FAST) as node:
            node.publish("sync.t", b"1", retain=True)
            node.publish_many("sync.t", [b"2", b"3"], retain=True)
            sub = node.subscribe("sync.*")
            first = sub.next(timeout=5).data
            return [first, *(m.data for m in node.last("sync.>"))]

    assert await asyncio.to_thread(work) == [b"3", b"3"]


async def test_agent_http_retain_last_and_sse_retained_false(make_node: MakeNode,
                                                             mesh_name: str) -> None:
    """`?retain=true`, `GET /v1/last/{pattern}` and `?retained=false` over real HTTP."""
    from mesh._agent import Agent, load
    config = load(None, env={}, flags={"name": "agent", "mesh": mesh_name,
                                        "interfaces": ["127.0.0.1"], "mdns": False,
                                        "http": "127.0.0.1:0", **FAST})
    async with Agent(config) as agent, aiohttp.ClientSession() as http:
        url = agent.http_url
        async with http.post(f"{url}/v1/publish/home.temp?retain=true", data=b"20") as r:
            assert r.status == 202
        async with http.get(f"{url}/v1/last/home.%3E") as r:
            assert r.status == 200
            values = await r.json()
        assert [(v["topic"], v["data"], v["source"]) for v in values] == [
            ("home.temp", "20", "agent")]
        async with http.get(f"{url}/v1/last/home..x") as r:
            assert r.status == 400
        async with http.get(f"{url}/v1/subscribe/home.*") as stream:
            line = await _sse_data(stream)
            assert json.loads(line)["data"] == "20"
        async with http.get(f"{url}/v1/subscribe/home.*?retained=false") as stream:
            await agent.node.publish("home.temp", b"21")
            line = await _sse_data(stream)
            assert json.loads(line)["data"] == "21"
        async with http.get(f"{url}/v1/subscribe/home.*?retained=maybe") as r:
            assert r.status == 400


async def _sse_data(stream: aiohttp.ClientResponse) -> str:
    """The data of the next SSE event (bounded)."""
    async with asyncio.timeout(10):
        async for raw in stream.content:
            line = raw.decode().rstrip("\n")
            if line.startswith("data: "):
                return line[len("data: "):]
    raise AssertionError("stream ended")


async def test_a_reliable_retained_publish_is_retained_as_a_plain_value(
        make_node: MakeNode, tmp_path: Path) -> None:
    """`reliable=True, retain=True` spools it and retains it; the value reads best effort."""
    node = await make_node("n", mdns=False, data_dir=str(tmp_path / "n"))
    await node.publish("r.t", b"v", reliable=True, retain=True)
    [value] = await node.last("r.t")
    assert (value.topic, value.data, value.reliable) == ("r.t", b"v", False)


async def test_an_answer_waits_until_the_askers_subscription_is_in_force(
        make_node: MakeNode) -> None:
    """The publisher answers a query naming interest version V only once the asker's
    subscriptions of version V reached its publisher: before that, a message published
    after the answer could miss the subscriber."""
    from mesh._memory import _queries

    pub = await make_node("pub", mdns=False)
    await pub.publish("w.x", b"v", retain=True)
    sub_node = await make_node("sub", mdns=False, peers=pub.endpoints["ctl"])
    await sub_node.wait_for_peers(1, timeout=5)
    run = sub_node._live()
    [rec] = run.membership.table.records()
    version = run.membership.interest_version + 1  # what its next subscription announces
    query = _queries.encode(_queries.RetainedQuery("w.>", version))
    asking = asyncio.create_task(run.requests.ask(rec, _queries.RETAINED_SERVICE, query,
                                                  timeout=5))
    done, _ = await asyncio.wait({asking}, timeout=0.5)
    assert not done, "answered before the subscription existed"
    await sub_node.subscribe("w.>", retained=False)
    async with asyncio.timeout(5):
        reply = await asking
    page = _queries.decode(reply.data, _queries.RetainedPage)
    assert [(i.topic, i.payload) for i in page.items] == [("w.x", b"v")]


async def test_askers_not_in_the_peer_table_cannot_hold_every_slot(make_node: MakeNode) -> None:
    """Queries naming a subscription version from ids no peer has (forged ones, or a new
    peer whose hello is late) wait for it at most `STRANGER_WAITS` at a time; the rest
    are answered at once, and a member's query is not stuck behind them. Before, 40 such
    queries held all 16 slots of the service for 2 s each."""
    import time
    import uuid

    import zmq
    import zmq.asyncio

    from mesh import _wire
    from mesh._memory import _queries
    from mesh._memory._recall import STRANGER_WAITS

    pub = await make_node("pub", mdns=False)
    await pub.publish("w.x", b"v", retain=True)
    asked = 40
    query = _queries.encode(_queries.RetainedQuery("w.>", 7))
    ctx = zmq.asyncio.Context()
    stranger = ctx.socket(zmq.DEALER)
    stranger.setsockopt(zmq.LINGER, 0)
    try:
        stranger.connect(pub.endpoints["rtr"][0])
        for i in range(asked):
            request = _wire.Request(i, _queries.RETAINED_SERVICE, uuid.uuid4().hex, "stranger",
                                    time.time(), None, query)
            await stranger.send(bytes(_wire.encode_service([request])))
        answered = 0
        async with asyncio.timeout(1.0):
            while answered < asked - STRANGER_WAITS:
                answered += len(_wire.decode_service(await stranger.recv(), 1 << 20))
        member = await make_node("member", mdns=False, peers=pub.endpoints["ctl"])
        await member.wait_for_peers(1, timeout=5)
        [value] = await member.last("w.>", timeout=1.0)
        assert value.data == b"v"
    finally:
        stranger.close()
        ctx.term()


async def test_a_value_retained_a_moment_before_a_subscription_still_arrives_once(
        make_node: MakeNode) -> None:
    """A peer's first retained publish, and at once a subscription elsewhere: its
    `retains` flag had not reached the subscriber, which did not ask it, and the value,
    published before the subscription reached it, did not come live either: it was
    missed for good. The subscription asks a peer found retaining late: one value."""
    a = await make_node("a", mdns=False)
    b = await make_node("b", mdns=False, peers=a.endpoints["ctl"])
    await b.wait_for_peers(1, timeout=5)
    await a.wait_for_peers(1, timeout=5)
    recall = b._live().retained._recall
    loop = asyncio.get_running_loop()
    await aeventually(lambda: recall._grace_end <= loop.time(), timeout=2,
                      message="b's start-up grace (when it waits for discovery) is over")
    await a.publish("cfg.x", b"v1", retain=True)
    sub = await b.subscribe("cfg.>")
    got = await sub.next(timeout=3)
    assert (got.topic, got.data, got.source) == ("cfg.x", b"v1", "a")
    with pytest.raises(TimeoutError):
        await sub.next(timeout=0.3)


async def test_a_first_retained_value_that_came_live_is_not_repeated_late(
        make_node: MakeNode) -> None:
    """The subscription is in force at the peer before its first retained publish: the
    value comes live, and asking the peer once its flag arrives gives it no second time."""
    a = await make_node("a", mdns=False)
    b = await make_node("b", mdns=False, peers=a.endpoints["ctl"])
    await b.wait_for_peers(1, timeout=5)
    sub = await b.subscribe("cfg.>")
    await a.wait_for_subscribers("cfg.x", 1, timeout=5)
    await a.publish("cfg.x", b"v1", retain=True)
    assert (await sub.next(timeout=3)).data == b"v1"
    table = b._live().membership.table

    def knows_a_retains() -> bool:
        rec = table.get(a.id)
        return rec is not None and rec.retains

    await aeventually(knows_a_retains, timeout=3)
    with pytest.raises(TimeoutError):
        await sub.next(timeout=0.3)


def test_late_values_give_way_to_what_the_topic_delivered_already() -> None:
    """Values a peer gives late (found retaining after the subscription's values came) are
    dropped when the topic delivered something newer, or their publisher was heard on it
    already (its newer messages come live). Deterministic: the live-test above sees this
    only when the flag reaches the subscriber after the live message."""
    from mesh._names import pattern

    def msg(source_id: str, topic: str, seq: int, ts: float) -> Message:
        return Message(topic, b"%s%d" % (source_id.encode(), seq), "pub", source_id, seq, ts)

    sub: Subscription[bytes] = Subscription(pattern(">"))
    sub._watch(True)
    sub._deliver([msg("P", "t.a", 5, 100.0)])  # live, from P on t.a
    sub._deliver([msg("P", "t.b", 1, 50.0), msg("P", "t.b", 2, 60.0)])  # a batch: its last
    sub._hold()
    sub._release([msg("P", "t.a", 5, 100.0),  # P heard on t.a: not again
                  msg("Q", "t.a", 3, 90.0),  # older than what t.a delivered
                  msg("Q", "t.b", 7, 70.0),  # newer than t.b's: still worth it
                  msg("Q", "t.c", 1, 10.0)],  # a topic not heard: delivered
                 {("P", "t.a"): 5, ("Q", "t.a"): 3, ("Q", "t.b"): 7, ("Q", "t.c"): 1})
    assert [m.data for m in sub.drain(10)] == [b"P5", b"P1", b"P2", b"Q7", b"Q1"]
