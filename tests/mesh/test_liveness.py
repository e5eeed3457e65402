"""Heartbeats and silence timeouts: when a node beats, when it wakes, when a peer is lost."""

from __future__ import annotations

import asyncio
import time

import msgspec
import pytest
import zmq

from mesh import PeerEventKind, PeerState
from mesh import _wire as wire
from mesh._membership import _control as membership
from mesh._membership import _neighbours as neighbours
from mesh._membership import _peers as peers
from mesh._membership._peers import PeerRecord, PeerTable
from tests.helpers import aeventually

from ._proc import Cli
from .conftest import FAST_ENV, MakeNode


@pytest.mark.parametrize("interval", [0.05, 0.25, 0.5, 1.0])
@pytest.mark.parametrize("now", [1_700_000_000.0, 1_700_000_000.001, 1_699_999_999.999,
                                 1_700_000_000.2, 1_700_000_000.37, 12.5])
def test_beats_fall_on_multiples_of_the_interval(now: float, interval: float) -> None:
    """The next beat is on a multiple of the interval, half to one and a half intervals away."""
    delay = membership._until_next_beat(now, interval)
    assert interval / 2 - 1e-6 <= delay < 1.5 * interval + 1e-6
    at = now + delay
    assert abs(at - round(at / interval) * interval) < 1e-5  # (float spacing near 1.7e9 s)


def test_a_beat_that_wakes_a_hair_early_is_not_repeated() -> None:
    """Woken just before the multiple (monotonic vs wall clock), the next beat is the one after."""
    assert membership._until_next_beat(99.9999, 0.5) == pytest.approx(0.5001)
    assert membership._until_next_beat(100.0001, 0.5) == pytest.approx(0.4999)


async def test_talking_peers_never_wake_the_silence_timer(make_node: MakeNode, monkeypatch: pytest.MonkeyPatch) -> None:
    """Peers that keep beating move their silence timer on: it never runs out while they talk."""
    expired: list[str] = []
    original = PeerTable._expire

    def spy(self: PeerTable, rec: PeerRecord, due: float) -> None:
        expired.append(rec.name)
        original(self, rec, due)

    monkeypatch.setattr(PeerTable, "_expire", spy)
    timing = {"heartbeat_interval": 0.05, "suspect_after": 1.0, "lost_after": 2.0, "mdns": False}
    a = await make_node("a", **timing)
    b = await make_node("b", peers=a.endpoints["ctl"], **timing)
    c = await make_node("c", peers=a.endpoints["ctl"], **timing)
    await a.wait_for_peers(2, timeout=5)
    await b.wait_for_peers(1, timeout=5)
    await c.wait_for_peers(1, timeout=5)
    # the observation window: 2.5 x suspect_after (50 heartbeats from each peer), so a timer
    # that were not moved on when a peer is heard would have run out, maybe twice
    await asyncio.sleep(2.5)
    assert expired == []
    assert {p.state for p in a.peers()} == {PeerState.ALIVE}


async def test_a_peer_that_goes_silent_is_suspect_then_lost_on_time(make_node: MakeNode) -> None:
    """A peer whose heartbeats stop (no goodbye) is lost `lost_after` after it was last heard."""
    timing = {"heartbeat_interval": 0.05, "suspect_after": 0.2, "lost_after": 0.4, "mdns": False}
    a = await make_node("a", **timing)
    b = await make_node("b", peers=a.endpoints["ctl"], **timing)
    events = a.events()
    await a.wait_for_peers(1, timeout=5)
    assert (await events.next(timeout=5)).kind is PeerEventKind.JOINED
    await b._live().tasks.cancel()  # b's heartbeats stop, as in a crash: no goodbye
    silent_from = time.monotonic()
    await aeventually(lambda: a.peers()[0].state is PeerState.SUSPECT, timeout=5)
    lost = await events.next(timeout=5)
    took = time.monotonic() - silent_from
    assert (lost.kind, lost.peer.name) == (PeerEventKind.LOST, "b")
    assert a.peers()[0].state is PeerState.LOST
    # heard at most one interval (plus scheduling) before the cut; lost 0.4 s after that
    assert 0.4 - 0.05 - 0.05 <= took <= 0.4 + 0.2, took


async def test_a_member_we_begin_to_watch_has_time_to_read_our_first_beat(
        make_node: MakeNode, monkeypatch: pytest.MonkeyPatch) -> None:
    """A member that does not watch us (we are none of its neighbours) beats us only once
    it has read our first beat (a seed greeting 100 joiners read them 1.2 s late). Timed
    from its hello with the usual timeouts, it was taken for lost meanwhile (the 100-node
    test's false loss of its seed); it gets `_FIRST_CONTACT` times longer, and once it
    beats us, the usual again."""
    monkeypatch.setattr(peers, "_MAX_HEALTH", 0)  # (timeouts as configured on a busy host)
    timing = {"heartbeat_interval": 0.05, "suspect_after": 0.2, "lost_after": 0.4, "mdns": False}
    a = await make_node("a", **timing)
    # more members, so that a watches b and b (by a's view) does not watch a
    others = next(ids for k in range(1000) for ids in [[f"b-id{k:03d}{j}" for j in range(5)]]
                  if "b-id" in neighbours.choose(a.id, ["b-id", *ids])
                  and a.id not in neighbours.choose("b-id", [a.id, *ids]))
    events = a.events()
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    router, dealer = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)  # b, by hand
    try:
        b_ctl = f"tcp://127.0.0.1:{router.bind_to_random_port('tcp://127.0.0.1')}"
        dealer.connect(a.endpoints["ctl"][0])
        hello = wire.Hello(id="b-id", name="b", mesh=a.config.mesh, incarnation=1,
                           ctl=[b_ctl], pub=["tcp://127.0.0.1:9"], subs=[], subs_version=0)
        dealer.send(wire.encode_control(wire.Gossip("b-id", [
            msgspec.structs.replace(hello, id=m, name=m, ctl=["tcp://127.0.0.1:9"])
            for m in others])))
        dealer.send(wire.encode_control(hello))
        greeted = time.monotonic()
        await aeventually(lambda: router.poll(0), timeout=5, message="a's first beat to b")
        # b reads it late, as a seed busy with a join does, and only then beats back
        await asyncio.sleep(greeted + 1.5 * 0.4 - time.monotonic())
        dealer.send(wire.encode_control(wire.Heartbeat("b-id", 1, 0, [b_ctl], watching=False)))
        answered = time.monotonic()
        lost = await events.next(timeout=5)
        for _ in range(20):  # (the other members join and are lost too)
            if (lost.kind, lost.peer.name) == (PeerEventKind.LOST, "b"):
                break
            lost = await events.next(timeout=5)
        took = time.monotonic() - answered  # b says no more: lost 0.4 s after its beat
    finally:
        router.close(linger=0)
        dealer.close(linger=0)
    assert (lost.kind, lost.peer.name) == (PeerEventKind.LOST, "b")
    assert took >= 0.4 - 0.1, f"b was lost before it could answer (the event came {took:.3f} s " \
        "after its beat)"
    assert took <= 0.4 + 0.3, took


async def test_news_of_a_loss_is_taken_even_if_our_watch_lapses_while_we_wait(
        make_node: MakeNode) -> None:
    """News that a member was lost leaves it suspect for a while (time to refute). If our
    own watch of it ends meanwhile (it stopped being a neighbour), the news still stands:
    only a refutation, or hearing the member itself, clears it."""
    timing = {"heartbeat_interval": 0.05, "suspect_after": 5.0, "lost_after": 10.0,
              "mdns": False}
    a = await make_node("a", **timing)
    b = await make_node("b", peers=a.endpoints["ctl"], **timing)
    await a.wait_for_peers(1, timeout=5)
    control = a._live().membership
    await aeventually(lambda: (r := control.table.get(b.id)) is not None and r.watched)
    events = a.events()
    await b._live().tasks.cancel()  # b goes silent, as in a crash
    rec = control.table.get(b.id)
    assert rec is not None
    # A beat b sent just before would refute the news when it arrives (failed 3 runs in
    # 25 beside two CPU burners): wait until b has been silent for 10 of its beats.
    await aeventually(lambda: time.monotonic() - rec.last_heard > 0.5, timeout=5,
                      message="b silent for 0.5 s")
    rec.heard_directly = time.monotonic() - 60.0  # (not heard itself lately)
    control._on_down(wire.Down(b.id, rec.incarnation, rec.seq), "")
    assert rec.state is PeerState.SUSPECT
    control.table.unwatch(rec)  # the watch lapses while the news waits to be confirmed
    lost = await events.next(timeout=5)
    assert (lost.kind, lost.peer.name) == (PeerEventKind.LOST, "b")
    assert [p.state for p in a.peers()] == [PeerState.LOST]


async def test_a_stalled_node_stretches_its_timeouts_until_a_quiet_spell(
        make_node: MakeNode, monkeypatch: pytest.MonkeyPatch) -> None:
    """Lifeguard's local health: after its own loop stalled, a node waits longer before it
    takes a silent peer for lost (its host, not the peer, may be starved); a quiet spell
    brings the configured timeouts back."""
    monkeypatch.setattr(peers, "_RECOVER_AFTER", 1000.0)  # no recovery while b is timed
    timing = {"heartbeat_interval": 0.05, "suspect_after": 0.2, "lost_after": 0.4, "mdns": False}
    a = await make_node("a", **timing)
    b = await make_node("b", peers=a.endpoints["ctl"], **timing)
    await a.wait_for_peers(1, timeout=5)
    table = a._live().membership.table
    await aeventually(lambda: all(r.watched for r in table.records()), timeout=5)
    assert a.traffic().membership["health"] == 0
    time.sleep(0.6)  # noqa: ASYNC251  (on purpose: a stalls, its timers fire 0.4 s late)
    await aeventually(lambda: a.traffic().membership["health"] >= 1, timeout=2)
    health = a.traffic().membership["health"]
    events = a.events()
    await b._live().tasks.cancel()  # b goes silent, as in a crash
    silent_from = time.monotonic()
    lost = await events.next(timeout=5)
    took = time.monotonic() - silent_from
    assert (lost.kind, lost.peer.name) == (PeerEventKind.LOST, "b")
    stretched = (1 + health) * 0.4
    assert stretched - 0.1 <= took <= stretched + 0.3, (took, health)
    monkeypatch.setattr(peers, "_RECOVER_AFTER", 2.0)  # 0.8 s quiet: one step back
    await aeventually(lambda: a.traffic().membership["health"] == 0, timeout=2 + health)


async def test_an_interest_change_reaches_a_peer_as_a_change(make_node: MakeNode,
                                                               monkeypatch: pytest.MonkeyPatch
                                                               ) -> None:
    """A subscription is announced as a delta against the version before (not a whole
    hello): the peer applies that change and its record of us follows, version and all."""
    changes: list[wire.Change] = []
    original = membership.Membership._on_change

    def spy(self: membership.Membership, change: wire.Change, came_from: str) -> None:
        changes.append(change)
        original(self, change, came_from)

    monkeypatch.setattr(membership.Membership, "_on_change", spy)
    a = await make_node("a", mdns=False)
    b = await make_node("b", mdns=False, peers=a.endpoints["ctl"])
    await a.wait_for_peers(1, timeout=5)
    await b.wait_for_peers(1, timeout=5)
    # news goes to the members a beats (a neighbour is chosen at a's next tick); before
    # that, b would learn the change from a's heartbeat's version and a whole hello
    await aeventually(lambda: b.id in a._live().membership._targets())
    await a.subscribe("liveness.x")
    version = a._live().membership.interest_version

    def b_knows() -> bool:
        rec = b._live().membership.table.get(a.id)
        return rec is not None and rec.subs_version == version

    await aeventually(b_knows)
    rec = b._live().membership.table.get(a.id)
    assert rec is not None
    assert [p.pattern for p in rec.subs] == ["liveness.x"]
    assert rec.hello is not None
    assert rec.hello.subs == ["liveness.x"]
    assert [(c.id, c.base, c.version, c.added.get("subs")) for c in changes
            if c.version == version] == [(a.id, version - 1, version, ["liveness.x"])]


async def test_a_killed_peer_is_forgotten_after_forget_after(make_node: MakeNode,
                                                              procs: list[Cli],
                                                              mesh_name: str) -> None:
    """SIGKILLed: lost after `lost_after`, then gone from peers() with its connections
    closed once it has been lost for `forget_after` seconds."""
    a = await make_node("a", mdns=False, forget_after=0.5)
    server = Cli(["serve", "svc", "--echo", "--peer", a.endpoints["ctl"][0]], mesh=mesh_name,
                 env={**FAST_ENV, "ZEROMESH_MDNS": "false"})
    procs.append(server)
    server.line("ready", timeout=20)
    await a.wait_for_service("svc", timeout=10)
    assert (await a.request("svc", b"hi", timeout=5)).data == b"hi"
    [peer] = a.peers()
    run = a._live()
    assert run.requests.links() == [peer.id]  # the connection a request opened
    events = a.events()
    server.proc.kill()
    lost = await events.next(timeout=5)
    lost_at = time.monotonic()
    assert (lost.kind, lost.peer.id) == (PeerEventKind.LOST, peer.id)
    await aeventually(lambda: a.peers() == [], timeout=5)
    assert time.monotonic() - lost_at >= 0.5 - 0.1  # not before forget_after
    assert run.requests.links() == []
    assert peer.endpoints[0] not in run.membership.links()


async def test_a_forgotten_peer_that_returns_joins_as_new(make_node: MakeNode) -> None:
    """Forgotten is not banned: when its heartbeats resume it joins again."""
    timing = {"mdns": False, "forget_after": 0.2}
    a = await make_node("a", **timing)
    b = await make_node("b", peers=a.endpoints["ctl"], **timing)
    await a.wait_for_peers(1, timeout=5)
    events = a.events()
    await b._live().tasks.cancel()  # b's heartbeats stop, as in a crash: no goodbye
    assert (await events.next(timeout=5)).kind is PeerEventKind.LOST
    await aeventually(lambda: a.peers() == [], timeout=5)
    b._live().tasks.spawn(b._live().membership.run(), "zeromesh-control")  # b wakes up
    joined = await events.next(timeout=5)
    assert (joined.kind, joined.peer.name) == (PeerEventKind.JOINED, "b")
    await aeventually(lambda: [p.state for p in a.peers()] == [PeerState.ALIVE], timeout=5)
