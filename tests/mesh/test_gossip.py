"""Gossip membership on loopback: seeds, news that spreads, refutation, stale news,
hostile news, and the bounded set of links each node keeps."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import zmq

from mesh import AsyncNode, PeerEventKind, PeerState
from mesh import _wire as wire
from mesh._membership import _control as control
from patterns import generate_keypair
from tests.helpers import aeventually

from ._proc import Cli
from .conftest import FAST_ENV, MakeNode

pytestmark = pytest.mark.timeout(60)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.contextmanager
def _dealer(endpoint: str) -> Iterator[zmq.Socket[bytes]]:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 1000)
    sock.connect(endpoint)
    try:
        yield sock
    finally:
        sock.close()


def _names(node: AsyncNode, state: PeerState = PeerState.ALIVE) -> set[str]:
    return {p.name for p in node.peers() if p.state is state}


async def test_members_that_each_name_one_seed_learn_each_other(make_node: MakeNode) -> None:
    """The case that failed before gossip: b and c each know only the seed."""
    seed = await make_node("seed", mdns=False)
    b = await make_node("b", mdns=False, peers=seed.endpoints["ctl"])
    c = await make_node("c", mdns=False, peers=seed.endpoints["ctl"])
    await aeventually(lambda: _names(b) == {"seed", "c"} and _names(c) == {"seed", "b"},
                      timeout=5)
    sub = await c.subscribe("g.>")
    await b.wait_for_subscribers("g.x", 1, timeout=5)
    await b.publish("g.x", b"from b")
    assert (await sub.next(timeout=5)).data == b"from b"
    await c.serve("echo", lambda m: m.data)
    await b.wait_for_service("echo", timeout=5)
    assert (await b.request("echo", b"to c")).data == b"to c"


async def test_the_mesh_outlives_its_seed(make_node: MakeNode, procs: list[Cli],
                                          mesh_name: str) -> None:
    """The seed is SIGKILLed: the others see it lost, still see each other and still
    talk; a newcomer seeded by a survivor joins them all."""
    port = _free_port()
    seed = Cli(["serve", "svc", "--echo", "--port", str(port)], mesh=mesh_name,
               env={**FAST_ENV, "ZEROMESH_MDNS": "false"})
    procs.append(seed)
    seed.line("ready", timeout=20)
    seed_url = [f"tcp://127.0.0.1:{port}"]
    b = await make_node("b", mdns=False, peers=seed_url)
    c = await make_node("c", mdns=False, peers=seed_url)
    await aeventually(lambda: _names(b) >= {"c"} and _names(c) >= {"b"}
                      and len(b.peers()) == 2, timeout=5)
    events = b.events()
    seed.proc.send_signal(signal.SIGKILL)
    lost = await events.next(timeout=5)
    assert lost.kind is PeerEventKind.LOST
    assert _names(b) == {"c"}
    assert _names(c) == {"b"}
    d = await make_node("d", mdns=False, peers=c.endpoints["ctl"])
    await aeventually(lambda: _names(d) == {"b", "c"} and "d" in _names(b), timeout=5)
    sub = await d.subscribe("after.>")
    await b.wait_for_subscribers("after.seed", 1, timeout=5)
    await b.publish("after.seed", b"still here")
    assert (await sub.next(timeout=5)).data == b"still here"


async def test_a_node_whose_seed_is_down_joins_when_it_comes_up(make_node: MakeNode) -> None:
    port = _free_port()
    b = await make_node("b", mdns=False, peers=[f"tcp://127.0.0.1:{port}"])
    c = await make_node("c", mdns=False, peers=[f"tcp://127.0.0.1:{port}"])
    assert b.peers() == []
    assert c.peers() == []
    await make_node("seed", mdns=False, port=port)
    await aeventually(lambda: _names(b) == {"seed", "c"} and _names(c) == {"seed", "b"},
                      timeout=5)


async def test_a_seed_that_left_and_came_back_rejoins_the_members_that_stayed(
        make_node: MakeNode) -> None:
    """b and c are joined to each other when their seed leaves; a new seed on its address
    knows none of them. They greet it again, so a newcomer seeded there joins them all
    (before, seed and newcomer formed a second mesh of their own)."""
    port = _free_port()
    seed = await make_node("seed", mdns=False, port=port)
    b = await make_node("b", mdns=False, peers=[f"tcp://127.0.0.1:{port}"])
    c = await make_node("c", mdns=False, peers=[f"tcp://127.0.0.1:{port}"])
    await aeventually(lambda: _names(b) == {"seed", "c"} and _names(c) == {"seed", "b"},
                      timeout=5)
    await seed.aclose()
    await aeventually(lambda: _names(b) == {"c"} and _names(c) == {"b"}, timeout=5)
    await make_node("seed2", mdns=False, port=port)
    d = await make_node("d", mdns=False, peers=[f"tcp://127.0.0.1:{port}"])
    await aeventually(lambda: _names(d) == {"seed2", "b", "c"}
                      and _names(b) == {"seed2", "c", "d"}, timeout=5)


async def _greeted_after_joining(make_node: MakeNode, monkeypatch: pytest.MonkeyPatch,
                                 seed_url: str, port: int, seed: dict[str, Any],
                                 b: dict[str, Any]) -> list[str]:
    """Endpoints b greets over two rounds of seed greetings, once joined to the seed
    (`seed_url` names it, on `port`; `seed` and `b`: more node settings)."""
    greeted: list[str] = []
    rounds = 0
    greet, look = control.Membership._greet, control.Membership._greet_absent_seeds

    def spy(self: control.Membership, endpoint: str, *, reply: bool = True) -> None:
        greeted.append(endpoint)
        greet(self, endpoint, reply=reply)

    def count(self: control.Membership) -> set[str]:
        nonlocal rounds
        rounds += 1
        return look(self)

    await make_node("seed", mdns=False, port=port, **seed)
    joining = await make_node("b", mdns=False, peers=[seed_url], **b)
    await aeventually(lambda: _names(joining) == {"seed"}, timeout=5)
    monkeypatch.setattr(control.Membership, "_greet", spy)
    monkeypatch.setattr(control.Membership, "_greet_absent_seeds", count)
    await aeventually(lambda: rounds >= 2, timeout=5)  # two rounds of seed greetings
    return greeted


async def test_a_seed_that_is_a_member_on_another_interface_is_not_greeted_again(
        make_node: MakeNode, monkeypatch: pytest.MonkeyPatch) -> None:
    """b dials the seed on ::1 (its first interface) though it names it by 127.0.0.1: the
    seed is a live member all the same, so b does not greet it every 10 beats."""
    port = _free_port()
    seed_url = f"tcp://127.0.0.1:{port}"
    greeted = await _greeted_after_joining(make_node, monkeypatch, seed_url, port,
                                           seed={"interfaces": ["::1", "127.0.0.1"]},
                                           b={"interfaces": ["127.0.0.1", "::1"]})
    assert seed_url not in greeted


async def test_a_seed_named_by_host_is_not_greeted_again_once_a_member(
        make_node: MakeNode, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--peer tcp://localhost:PORT``: the seed's hellos spell it by address, so by its
    name it never looked like a member, and every node greeted it anew every 10 beats."""
    port = _free_port()
    seed_url = f"tcp://localhost:{port}"
    greeted = await _greeted_after_joining(make_node, monkeypatch, seed_url, port, {}, {})
    assert seed_url not in greeted


async def test_a_seed_that_comes_up_late_and_greets_first_is_answered_at_once(
        make_node: MakeNode) -> None:
    """The link to a seed that was down backs off its reconnects (up to a second); the
    seed's own greeting proves it up, and the answer must not wait for the next retry."""
    port = _free_port()
    b = await make_node("b", mdns=False, peers=[f"tcp://127.0.0.1:{port}"])
    await asyncio.sleep(1.6)  # b's link has been refused at 0, 0.1, 0.3, 0.7, 1.5 s: next 2.5
    loop = asyncio.get_running_loop()
    started = loop.time()
    seed = await make_node("seed", mdns=False, port=port, peers=b.endpoints["ctl"])
    await aeventually(lambda: _names(seed) == {"b"} and _names(b) == {"seed"}, timeout=5)
    assert loop.time() - started < 0.4


async def test_news_that_a_member_left_beats_stale_news_that_it_lives(make_node: MakeNode
                                                                      ) -> None:
    a = await make_node("a", mdns=False)
    b = await make_node("b", mdns=False, peers=a.endpoints["ctl"])
    await a.wait_for_peers(1, timeout=5)
    rec = a._live().membership.table.get(b.id)
    assert rec is not None
    assert rec.hello is not None
    stale = rec.hello
    await b.aclose()
    await aeventually(lambda: a.peers() == [], timeout=5)
    received = a._live().membership.received
    with _dealer(a.endpoints["ctl"][0]) as dealer:
        dealer.send(wire.encode_control(wire.Gossip("someone", [stale])))
        await aeventually(lambda: a._live().membership.received > received, timeout=5)
    assert a.peers() == []


async def test_a_member_wrongly_said_lost_refutes_it(make_node: MakeNode) -> None:
    """News that b was lost reaches a, which hears b itself: a keeps b alive and tells b,
    which raises its alive counter, so the refutation beats the news everywhere."""
    a = await make_node("a", mdns=False)
    b = await make_node("b", mdns=False, peers=a.endpoints["ctl"])
    await a.wait_for_peers(1, timeout=5)
    events = a.events()
    rec = a._live().membership.table.get(b.id)
    assert rec is not None
    down = wire.Down(b.id, rec.incarnation, rec.seq)
    with _dealer(a.endpoints["ctl"][0]) as dealer:
        dealer.send(wire.encode_control(wire.Gossip("someone", [down])))
        await aeventually(lambda: b._live().membership._announcement.seq > down.seq,
                          timeout=5)
    await aeventually(lambda: rec.seq > down.seq, timeout=5)
    assert _names(a) == {"b"}
    with pytest.raises(TimeoutError):
        await events.next(timeout=0.3)  # no lost, no joined: b never left a's view


async def test_news_of_a_loss_at_the_largest_alive_counter_is_dropped(make_node: MakeNode
                                                                      ) -> None:
    """Regression (fuzzer): one Gossip saying a was lost at alive counter 2**64 - 1 made a
    refute it with 2**64, which msgpack cannot encode: a's control task died at its next
    heartbeat (its peers took it for lost, its durables got nothing) and its close raised
    OverflowError. It is dropped and counted; a beats on with its counter unchanged."""
    a = await make_node("a", mdns=False)
    b = await make_node("b", mdns=False, peers=a.endpoints["ctl"])
    await b.wait_for_peers(1, timeout=5)
    me = a._live().membership._announcement
    seq = me.seq
    down = wire.Down(a.id, me.identity.incarnation, 2**64 - 1)
    with _dealer(a.endpoints["ctl"][0]) as dealer:
        dealer.send(wire.encode_control(wire.Gossip("someone", [down])))
        await aeventually(lambda: a.traffic().input_dropped.get("control", 0) == 1, timeout=5)
    assert me.seq == seq
    rec = b._live().membership.table.get(a.id)
    assert rec is not None
    heard = rec.last_heard
    await aeventually(lambda: rec.last_heard > heard + a.config.lost_after, timeout=5)
    assert rec.state is PeerState.ALIVE
    await a.aclose()  # raised the heartbeat task's OverflowError


async def test_a_lost_and_forgotten_member_comes_back_as_new(make_node: MakeNode,
                                                             procs: list[Cli],
                                                             mesh_name: str) -> None:
    a = await make_node("a", mdns=False, forget_after=0.5)
    b = Cli(["serve", "svc", "--echo", "--peer", a.endpoints["ctl"][0]], mesh=mesh_name,
            env={**FAST_ENV, "ZEROMESH_MDNS": "false"})
    procs.append(b)
    b.line("ready", timeout=20)
    await a.wait_for_peers(1, timeout=10)
    events = a.events()
    b.proc.send_signal(signal.SIGSTOP)
    try:
        assert (await events.next(timeout=5)).kind is PeerEventKind.LOST
        await aeventually(lambda: a.peers() == [], timeout=5)  # forgotten
    finally:
        b.proc.send_signal(signal.SIGCONT)
    back = await events.next(timeout=5)
    assert back.kind is PeerEventKind.JOINED
    assert _names(a) == {back.peer.name}


async def test_hostile_news_is_dropped_counted_and_opens_nothing(make_node: MakeNode) -> None:
    a = await make_node("a", mdns=False)
    await make_node("b", mdns=False, peers=a.endpoints["ctl"])
    await a.wait_for_peers(1, timeout=5)
    membership = a._live().membership
    links_before = membership.links()
    ctl = a.endpoints["ctl"][0]
    template = wire.Hello(id="x", name="x", mesh=a.config.mesh, incarnation=1,
                          ctl=["tcp://127.0.0.1:1"], pub=["tcp://127.0.0.1:2"], subs=[],
                          subs_version=0)
    bad_endpoints: list[wire.News] = [msgspec.structs.replace(template, id=f"bad{i}", ctl=[e])
                     for i, e in enumerate(["tcp://example.com:1", "ipc:///x", "tcp://1.2.3:4",
                                            "tcp://127.0.0.1:0", "garbage"])]
    # (a later run than ours: an earlier one is what a quick restart leaves in the news)
    impostor = msgspec.structs.replace(template, id=a.id, incarnation=time.time_ns() + 10**9)
    stale = msgspec.structs.replace(template, id=a.id, incarnation=12345)  # (no impostor)
    too_many: list[wire.News] = [wire.Down("m", 0, 0)] * 5000
    with _dealer(ctl) as dealer:
        dealer.send(wire.encode_control(wire.Gossip("evil", bad_endpoints)))
        dealer.send(wire.encode_control(wire.Gossip("evil", [stale, impostor])))
        dealer.send(wire.encode_control(wire.Gossip("evil", too_many)))

        def counted() -> bool:
            dropped = a.traffic().input_dropped
            return (dropped.get("bad_member", 0) >= 5 and dropped.get("self_claim", 0) >= 1
                    and dropped.get("control", 0) >= 1)

        await aeventually(counted, timeout=5)
    assert a.traffic().input_dropped["self_claim"] == 1  # the impostor's, not the stale news
    assert _names(a) == {"b"}
    assert membership.links() == links_before


async def test_gossip_is_no_way_around_the_allowlist(make_node: MakeNode, tmp_path: Path
                                                     ) -> None:
    """a allows b and c; b allows only a: b hears of c from a but never connects to it."""
    for name in ("a", "b", "c"):
        generate_keypair(tmp_path, name)
    allow_a, allow_b, allow_c = (tmp_path / f"allow-{n}" for n in "abc")
    for folder, names in ((allow_a, "bc"), (allow_b, "a"), (allow_c, "ab")):
        folder.mkdir()
        for name in names:
            shutil.copy(tmp_path / f"{name}.key", folder)

    def keys(name: str, allow: Path) -> dict[str, str]:
        return {"secret_key": str(tmp_path / f"{name}.key_secret"), "allow": str(allow)}

    a = await make_node("a", mdns=False, **keys("a", allow_a))
    public = (tmp_path / "a.key").read_text().split('public-key = "')[1].split('"')[0]
    a_url = [f"{a.endpoints['ctl'][0]}#{public}"]
    b = await make_node("b", mdns=False, peers=a_url, **keys("b", allow_b))
    c = await make_node("c", mdns=False, peers=a_url, **keys("c", allow_c))
    await aeventually(lambda: _names(a) == {"b", "c"}, timeout=5)
    await aeventually(lambda: b.traffic().input_dropped.get("unknown_key", 0) >= 1, timeout=5)
    assert _names(b) == {"a"}
    c_ctl = c.endpoints["ctl"][0]
    assert c_ctl not in b._live().membership.links()


async def test_each_node_keeps_a_bounded_set_of_links(make_node: MakeNode) -> None:
    """24 nodes seeded by one: all see all, and each watches and links to a handful
    (its ring neighbours, a chord, and whoever chose it), not to 23."""
    timing = {"heartbeat_interval": 0.2, "suspect_after": 0.6, "lost_after": 1.0}
    seed = await make_node("n00", mdns=False, **timing)
    nodes = [seed] + [await make_node(f"n{i:02d}", mdns=False, peers=seed.endpoints["ctl"],
                                      **timing)
                      for i in range(1, 24)]
    await aeventually(lambda: all(len(_names(n)) == 23 for n in nodes), timeout=10)

    def settled() -> bool:
        """Each node watches at most 12 and links to at most 14 (a link it no longer
        needs is closed at its next beat, so the two are read together)."""
        figures = [n.traffic().membership for n in nodes]
        return (max(f["watched"] for f in figures) <= 12
                and max(f["links"] for f in figures) <= 14)

    # the neighbours of the join storm linger 5 s before they are let go
    await aeventually(settled, timeout=20)
    assert {n.traffic().membership["members"] for n in nodes} == {23}


async def test_heartbeats_from_many_strangers_open_a_bounded_number_of_links(
        make_node: MakeNode, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each unknown sender of a heartbeat is greeted back, but only so many at once."""
    monkeypatch.setattr(control, "_MAX_PENDING", 4)
    a = await make_node("a", mdns=False)
    membership = a._live().membership
    with _dealer(a.endpoints["ctl"][0]) as dealer:
        for i in range(20):
            dealer.send(wire.encode_control(wire.Heartbeat(
                f"stranger{i}", 1, 0, [f"tcp://127.0.0.1:{_free_port()}"])))
        await aeventually(
            lambda: a.traffic().input_dropped.get("too_many_strangers", 0) >= 16, timeout=5)
    assert len(membership.links()) == 4
    assert a.peers() == []


async def test_every_seed_named_is_greeted_however_many(
        make_node: MakeNode, monkeypatch: pytest.MonkeyPatch) -> None:
    """The bound on strangers greeted at once is not for the seeds the user named: 300
    ``--peer`` entries logged "dropped too_many_strangers input" for the 44 past 256."""
    monkeypatch.setattr(control, "_MAX_PENDING", 4)
    seeds = [f"tcp://127.0.0.1:{_free_port()}" for _ in range(6)]
    a = await make_node("a", mdns=False, peers=seeds)
    membership = a._live().membership
    await aeventually(lambda: len(membership.links()) == 6, timeout=5)
    assert "too_many_strangers" not in a.traffic().input_dropped
