"""Membership: the control channel, hellos, heartbeats and gossip.

Each node binds one ROUTER and opens DEALER links to a bounded set of members:
its neighbours (see `_neighbours`), the peers it exchanges data with (parts
say who, see `PartnerSource`; whoever we send control messages to counts too),
whoever watches us (a watched node beats back), and endpoints still to be
greeted (a seed, an mDNS find, an unknown heartbeat's sender). A link whose
peer has not greeted us yet sends `Hello(reply=True)` every tick until it
does; a watched member gets a `Heartbeat` every tick and is lost when silent
for `lost_after` (see `_peers`).

Everything else a node knows of the mesh comes by gossip (see `_gossip`): a
member learns every other member (its record: endpoints, key, what it offers)
from the seed or mDNS find that greeted it, and news — a member joined,
refuted, was lost, left, changed its interest — is passed on once by each
member that learns something from it, along the links above, so it reaches
all in O(log N) hops. Heartbeats carry a digest of the sender's view; views
that stay different are exchanged whole, so nothing missed is missed for long.

What it learns goes to the node's parts through `_listener`'s protocols:
every `PeerListener` hears of peers connecting, changing, being lost and
going; the `EventSink` gets joined/left/lost events; control messages that
are not membership's own go to their owner by type (`ControlRoutes`).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import math
import re
import socket
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import Final

import msgspec

from discovery import DiscoveryEvent, PeerFound, PeerInfo
from patterns import (
    Context,
    ControlDealer,
    ControlRouter,
    InvalidName,
    TopicPattern,
    validate_topic,
)

from .. import _wire
from .._config import NodeConfig
from .._support._cache import BoundedDict
from .._support._quiet import QuietLog
from ..errors import ProtocolError
from . import _gossip, _neighbours
from ._foreign import ForeignMembers
from ._hello import Announcement
from ._listener import ControlRoutes, EventSink, PartnerSource, PeerListener, Ticker
from ._peers import PeerEvent, PeerEventKind, PeerRecord, PeerState, PeerTable

_log = logging.getLogger("mesh.node")
_PENDING_LINK_TTL: Final[float] = 30.0
_MAX_SUBS: Final[int] = 10_000
_ENDPOINT_RE: Final = re.compile(
    r"tcp://(?:([0-9.]{7,15})|\[([0-9A-Fa-f:.]{2,45})(?:%([A-Za-z0-9_.-]{1,15}))?\]):([0-9]{1,5})")
_BOTH: Final = frozenset({4, 6})
_NOWHERE: Final[Mapping[str, str]] = MappingProxyType({})
_MAX_WINDOW: Final[int] = 1_000_000
_MAX_MEMBERS: Final[int] = 10_000
"""Members one node keeps; news of more is dropped (a hostile or broken sender)."""
_MAX_PENDING: Final[int] = 256
"""Endpoints greeted at once that have not answered yet."""
_LEAVING_SENDS: Final = frozenset({_wire.Credit, _wire.Nack})
"""What a closing node still sends while it waits to report work (see `Membership.listen`)."""
_REDIAL_AFTER: Final[float] = 0.1
"""A link greeting a member this long without an answer may be waiting out ZeroMQ's
reconnect back-off (it was opened before the member was up): redialled when the member
greets us."""
_MAX_NEWS: Final[int] = 4096
_MAX_ALIVE: Final[int] = 2**63 - 1
"""An alive counter news may claim we were lost at: past it ours could not be raised and
still encoded (msgpack ints end at 2**64 - 1), so every hello and heartbeat would fail. A
real counter rises by one per refutation."""
"""News in one gossip message (a whole view is sent in chunks well under this)."""
_NEWS_BUDGET: Final[int] = 48 * 1024
"""Encoded bytes of news per gossip message (a control message is at most 64 KiB)."""
_NEIGHBOUR_LINGER: Final[float] = 5.0
"""A member that stops being a neighbour is watched this much longer (a join storm
reshuffles neighbours many times a second: links are not opened and closed at that pace)."""
_CONFIRM: Final[float] = 0.5
"""Seconds news of a loss leaves the member suspect before it is taken (time to refute)."""
_RING_GRACE: Final[float] = 10.0
"""Seconds a lost member keeps its place on the ring (its neighbours watch it on)."""
_PARTNER_LINGER: Final[float] = 10.0
"""A partner is watched this long after the last sign of data exchanged with it."""
_SYNC_AFTER: Final[int] = 2
"""Heartbeats in a row with a different digest before views are exchanged whole."""
_SYNC_EVERY: Final[float] = 2.0
"""Seconds between two whole exchanges with one member."""
_KEYS_KEPT: Final[int] = 1024
"""Endpoints with a pinned CURVE key kept before those no member uses are unpinned (a
node outliving many members kept them all; while few, a forgotten member that beats us
again is still greeted back on its old pin)."""
_SEED_BEATS: Final[int] = 10
"""Heartbeat intervals between two greetings of a seed that is no live member, once
joined, and between two looks at the pinned keys (`_KEYS_KEPT`)."""


class Membership:
    """Owns the control ROUTER, the links, the peer table and the gossip of one node.

    It is also the node's `Announcer` (parts report changes of what they offer
    here) and its `ControlSender`.
    """

    def __init__(self, ctx: Context, config: NodeConfig, quiet: QuietLog,
                 announcement: Announcement) -> None:
        self._ctx = ctx
        self._announcement = announcement
        self._id = announcement.identity.id
        self._incarnation = announcement.identity.incarnation
        self._mesh = config.mesh
        self._interval = config.heartbeat_interval
        self._reach = frozenset(6 if ":" in iface else 4 for iface in config.interfaces
                                if "%" not in iface)
        """The IP versions of our interfaces but link-local ones: a member is dialled on
        one of those, or on a link-local address if we have one (`_zones`)."""
        self._zones = _link_zones(config.interfaces)
        """Our link-local interfaces' zones (names): a member's link-local endpoint
        is dialled on one of those, not on the zone it announced (its own interface)."""
        self._heard_on: BoundedDict[str, str] = BoundedDict()
        """Link-local address -> our zone it was found on (by mDNS, or as a seed named
        it): with several zones of ours, the only way to tell a member's."""
        self._quiet = quiet
        self._listeners: tuple[PeerListener, ...] = ()
        self._events: tuple[EventSink, ...] = ()
        self._routes: ControlRoutes = {}
        self._tickers: tuple[Ticker, ...] = ()
        self._partner_sources: tuple[PartnerSource, ...] = ()
        self.table = PeerTable(suspect_after=config.suspect_after,
                               lost_after=config.lost_after,
                               forget_after=config.forget_after, observer=self)
        self.router = ControlRouter(ctx)
        self._links: dict[str, ControlDealer] = {}
        self._pending: dict[str, float] = {}
        """Endpoints we greet until they answer: when we started."""
        self._static: set[str] = set()
        self._seed_aliases: dict[str, frozenset[str]] = {}
        """A seed named by host -> its endpoints by address, as its members' hellos spell
        them (see `_greet_absent_seeds`)."""
        self._seeds_due = 0.0
        """When seeds that are no live member are greeted next (see `_greet_absent_seeds`)."""
        self._watching: dict[str, float] = {}
        """Ids we beat by choice (neighbours, partners) -> until when (monotonic)."""
        self._watchers: dict[str, float] = {}
        """Ids that beat us -> when they last did: we beat them back (so they can watch us),
        but only those we watch ourselves can be declared lost by us (a watcher that stops
        beating us may just have let us go, and its notice may not have come)."""
        self._neighbours: frozenset[str] = frozenset()
        self._view_changed = True
        self._departed: BoundedDict[str, int] = BoundedDict(_MAX_SUBS)
        """id -> incarnation of members that said goodbye: news of them is stale."""
        self._forgotten: BoundedDict[str, tuple[int, int]] = BoundedDict(_MAX_SUBS)
        """id -> (incarnation, seq) of members forgotten after being lost: only news
        they refuted brings them back."""
        self._foreign = ForeignMembers(_MAX_MEMBERS, config.forget_after)
        self._outgoing: list[tuple[_wire.News, str]] = []
        """News to pass on at the end of this loop turn, with whom it came from."""
        self._flush: asyncio.Handle | None = None
        self._leaving = False
        """Closing: only credits and nacks go out until the goodbye (see `listen`)."""
        self._strangers: dict[str, str] = {}
        """Closing: members we have no record of -> where they said they are (`listen`)."""
        self._on_stranger: Callable[[str], None] = lambda peer_id: None
        self._mismatch: dict[str, int] = {}
        self._synced_at: dict[str, float] = {}
        self._confirming: dict[str, asyncio.TimerHandle] = {}
        """Members news said were lost, still suspect: when the news is taken as true."""
        self._announced: dict[str, object] = {}
        """Our interest as last announced (changes are sent as deltas against it)."""
        self.sent = 0
        """Control messages sent (for figures)."""
        self.received = 0

    def attach(self, *, listeners: Sequence[PeerListener], events: Sequence[EventSink],
               routes: ControlRoutes, tickers: Sequence[Ticker],
               partners: Sequence[PartnerSource] = ()) -> None:
        """Who hears what membership learns (the parts exist only once membership does:
        some of them send through it)."""
        self._listeners = tuple(listeners)
        self._events = tuple(events)
        self._routes = routes
        self._tickers = tuple(tickers)
        self._partner_sources = tuple(partners)

    # -- lifecycle -------------------------------------------------------------

    @property
    def endpoints(self) -> list[str]:
        """Our control endpoints (once bound)."""
        return self._announcement.ctl

    def links(self) -> list[str]:
        """The control endpoints this node holds a link to (known peers and pending ones)."""
        return sorted(self._links)

    def figures(self) -> dict[str, int]:
        """How big this node's share of membership is (for benchmarks and metrics)."""
        return {"members": sum(1 for r in self.table.records() if r.state is not PeerState.LOST),
                "links": len(self._links), "watched": len(self._targets()),
                "control_sent": self.sent, "control_received": self.received,
                "health": self.table.health, "foreign": len(self._foreign)}

    def unreachable_subscribers(self, topic: str) -> int:
        """Members subscribed to `topic` with no address family in common with this node."""
        return self._foreign.subscribers(topic)

    @property
    def interest_version(self) -> int:
        """The version of what this node offers, as its hellos and heartbeats carry it."""
        return self._announcement.version

    def bind(self, interfaces: list[str], port: int) -> list[str]:
        ctl = self._announcement.ctl = [self.router.bind(host, port) for host in interfaces]
        return ctl

    async def run(self) -> None:
        """Handle control messages and tick heartbeats until cancelled."""
        self._announced = _gossip.interest(self._announcement.hello(False))
        self.router.start(self._on_messages)
        try:
            await self._tick_forever()
        finally:
            self.stop_listening()

    def listen(self, on_stranger: Callable[[str], None]) -> None:
        """Read control messages again, after `run` ended (a closing node waiting for the
        greeting of a pusher it owes credits: the greeting must get in). No heartbeats,
        and nothing sent but credits and nacks until the goodbye: a hello or news would
        no longer name the queues we pulled from, and a pusher reading that before our
        credits would take back work we already did. So a member we have no record of
        is not greeted to learn one: `send_to` reaches it where its heartbeat or hello
        came from, and ``on_stranger(id)`` is told it can be reached now."""
        self._leaving = True
        self._on_stranger = on_stranger
        self.router.start(self._on_messages)

    def stop_listening(self) -> None:
        """No more control messages read, silence timers or news (the node is closing)."""
        self.router.stop()
        self.table.stop()
        for handle in self._confirming.values():
            handle.cancel()
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None

    def say_goodbye(self) -> None:
        """Tell every member we hold a link to (they pass it on) that we leave."""
        frames = _wire.encode_control(_wire.Bye(self._id))
        _log.debug("saying goodbye to %d members", len(self._links))
        endpoints = set(self._links)  # pending ones too: they may know us already
        for peer_id in self._targets():
            rec = self.table.get(peer_id)
            if rec is not None:
                endpoints.add(rec.ctl)
        for endpoint in endpoints:
            self._link(endpoint).send(frames)

    def close(self) -> None:
        for link in self._links.values():
            link.close(linger=0.5)
        self._links.clear()
        self.router.close()

    # -- discovery ---------------------------------------------------------------

    def on_discovery(self, event: DiscoveryEvent) -> None:
        """Greet a peer a discovery backend found, unless gossip already told us of it."""
        if not isinstance(event, PeerFound):
            return  # a goodbye in mDNS proves nothing: liveness is by heartbeat
        info: PeerInfo = event.info
        rec = self.table.get(info.id) if info.id else None
        if rec is not None and rec.ctl in info.endpoints:
            return
        if not info.endpoints:
            return
        for endpoint in info.endpoints:
            found = _ENDPOINT_RE.fullmatch(endpoint)
            if found is not None and found[3] in self._zones:
                self._heard_on.put(found[2], found[3])
        if not self._admit(info.id, info.name, info.key, info.endpoints[:1]):
            return
        if info.source == "static":
            self._static.add(info.endpoints[0])
            if len(info.endpoints) > 1:  # (a seed named by host: its addresses)
                self._seed_aliases[info.endpoints[0]] = frozenset(info.endpoints)
        self._greet_new(info.endpoints[0])

    def _admit(self, peer_id: str, name: str, key: str, endpoints: Sequence[str]) -> bool:
        """Fail closed: a secure node talks only to allowlisted keys, a plain node only to
        plain peers; never a silent downgrade. Admitted endpoints are pinned to the key.
        Members learned by gossip pass here too: gossip is no way around the allowlist."""
        curve = self._ctx.curve
        who = f"{name[:64]!r} ({peer_id[:8]})" if peer_id else f"at {endpoints[0]}"
        if curve is None:
            if key:
                self._quiet.refuse("secure_peer", peer_id, f"ignoring peer {who}: it requires "
                                   "CURVE and this node has no key (--secret-key, --allow)")
                return False
            return True
        if not key:
            self._quiet.refuse("plain_peer", peer_id or endpoints[0],
                               f"ignoring peer {who}: it has no CURVE key and this node "
                               "accepts only CURVE peers (a static peer's key goes after "
                               "'#' in its URL)")
            return False
        if not curve.allows(key):
            self._quiet.refuse("unknown_key", peer_id, f"ignoring peer {who}: its CURVE key "
                               f"{key[:40]} is not in the allowlist")
            return False
        for endpoint in endpoints:
            curve.trust(endpoint, key)
        return True

    # -- sending -----------------------------------------------------------------

    def _link(self, endpoint: str) -> ControlDealer:
        link = self._links.get(endpoint)
        if link is None:
            told = self._seed_failed(endpoint) if endpoint in self._static else None
            link = self._links[endpoint] = ControlDealer(self._ctx, endpoint, told)
        return link

    def _seed_failed(self, endpoint: str) -> Callable[[bool], None]:
        """What to log when the handshake with a seed fails: a wrong key after '#', or
        CURVE on one side only, leaves its link silent, and the user with no clue why."""
        def told(refused: bool) -> None:
            if refused and self._ctx.curve is not None:
                detail = (f"seed {endpoint} refused this node's CURVE key: add it "
                          f"({self._ctx.curve.public.decode()}) to the seed's allowlist")
            elif self._ctx.curve is None:
                detail = (f"seed {endpoint} failed the handshake: it requires CURVE "
                          "(--secret-key, --allow), or it is no zeromesh node")
            else:
                detail = (f"seed {endpoint} failed the CURVE handshake: the key after '#' "
                          "is not its public key, or it runs without CURVE")
            self._quiet.refuse("seed_handshake", endpoint, detail)
        return told

    def _send(self, endpoint: str, msg: _wire.Control) -> bool:
        if self._leaving and type(msg) not in _LEAVING_SENDS:
            return False  # (a hello now would no longer name our queues: see `listen`)
        self.sent += 1
        return self._link(endpoint).send(_wire.encode_control(msg))

    def _greet(self, endpoint: str, *, reply: bool = True) -> None:
        self._send(endpoint, self._announcement.hello(reply, self._digest()))

    def _greet_new(self, endpoint: str) -> None:
        """Greet an endpoint not known as a member's yet, until it answers (a bounded
        number at once: a flood of strangers opens no flood of connections; the seeds the
        user named are no strangers, and as many as named are greeted)."""
        if endpoint not in self._pending and endpoint not in self._static and \
                len(self._pending) >= _MAX_PENDING:
            self._quiet.drop("too_many_strangers", f"{_MAX_PENDING} endpoints greeted and "
                             "not answering yet")
            return
        self._pending.setdefault(endpoint, time.monotonic())
        self._greet(endpoint)

    def _drop_link(self, endpoint: str, linger: float = 0.0) -> None:
        self._pending.pop(endpoint, None)
        if endpoint in self._static and not self._joined():
            return
        link = self._links.pop(endpoint, None)
        if link is not None:
            link.close(linger=linger)

    def send_to(self, peer_id: str, msg: _wire.Control) -> bool:
        """Send a control message to a known peer; False if unknown or its queue is full.
        The peer is a partner from now on (its silence is watched)."""
        rec = self.table.get(peer_id)
        if rec is None:
            stranger = self._strangers.get(peer_id)  # (closing: see `listen`)
            return stranger is not None and self._send(stranger, msg)
        if peer_id not in self._watching:
            self.table.watch(rec, beats_us=self._beats_us(peer_id))
        self._watching[peer_id] = max(self._watching.get(peer_id, 0.0),
                                      time.monotonic() + _PARTNER_LINGER)
        return self._send(rec.ctl, msg)

    def interest_changed(self) -> None:
        """What a part offers changed: a new interest version, announced as a delta to the
        members we talk to, who pass it on (and carried by our heartbeats from now on)."""
        me = self._announcement
        me.version += 1
        after = _gossip.interest(me.hello(False))
        set_, added, removed = _gossip.delta(self._announced, after)
        self._announced = after
        self._spread(_wire.Change(self._id, self._incarnation, me.version - 1, me.version,
                                  set_, added, removed), "")

    async def _tick_forever(self) -> None:
        """Beat every interval, on the wall clock's multiples of it.

        Nodes whose clocks agree (one host, or NTP) then beat together, and a
        node wakes about once per interval for all its peers' heartbeats rather
        than once for each of them and once more for its own. The wall clock is
        the only clock nodes share; the wait itself is on the loop's monotonic
        clock and always between half and one and a half intervals, so a jump of
        the wall clock moves one beat by at most half an interval. Liveness has
        its own timers (see `PeerTable`); a beat that comes late by more than
        `suspect_after` tells the table its loop was stalled.
        """
        interval = self._interval
        loop = asyncio.get_running_loop()
        while True:
            wait = _until_next_beat(time.time(), interval)
            due = loop.time() + wait
            await asyncio.sleep(wait)
            late = loop.time() - due
            if late > self.table.suspect_after:
                # a sign the peers' timers may miss: a message read first moves them on
                self.table.strained(f"this node's loop was stalled for {late:.2f} s")
            self.beat()
            for ticker in self._tickers:
                ticker.tick()

    def beat(self) -> None:
        """One heartbeat to every member we watch or that watches us, one hello to every
        endpoint still unanswered; links nobody needs any more are closed.

        Each peer's heartbeat echoes the stamp of its last one to us, and how long we
        held it, so it measures its round trip to us (`PeerRecord.rtt`) for free."""
        now = time.monotonic()
        self.table.recover()
        self._foreign.expire()
        stopped = self._refresh_watching(now)
        gone = now - self.table.lost_after
        for peer_id in [w for w, at in self._watchers.items() if at < gone]:
            del self._watchers[peer_id]
        base = self._heartbeat()
        needed: set[str] = set()
        for peer_id in self._targets():
            rec = self.table.get(peer_id)
            if rec is None:
                continue
            needed.add(rec.ctl)
            self._beat_to(rec, base, now)
        me = self._announcement
        for rec in stopped:
            self._send(rec.ctl, msgspec.structs.replace(base, watching=False))
        joined = self._joined()
        if not joined:
            for endpoint in self._static:
                self._pending.setdefault(endpoint, now)
        if now >= self._seeds_due:
            self._seeds_due = now + _SEED_BEATS * self._interval
            if joined:
                needed.update(self._greet_absent_seeds())
            self._forget_keys()
        hello: _wire.Hello | None = None
        for endpoint, born in list(self._pending.items()):
            answered = endpoint in needed
            given_up = (joined if endpoint in self._static
                        else now - born > _PENDING_LINK_TTL)
            if answered or given_up:
                del self._pending[endpoint]
            else:
                needed.add(endpoint)
                hello = hello or me.hello(True, base.digest)
                self._send(endpoint, hello)
        for endpoint in [e for e in self._links if e not in needed]:
            self._drop_link(endpoint, linger=0.5)

    def _greet_absent_seeds(self) -> set[str]:
        """Greet once each seed that is no live member; return those greeted. A seed that
        left or was forgotten may be back knowing none of us (its restart does not tell us):
        unless someone greets it, members joining through it form a mesh of their own."""
        members = {endpoint for rec in self.table.records() if rec.state is not PeerState.LOST
                   for endpoint in (rec.hello.ctl if rec.hello is not None else [rec.ctl])}
        aliases = self._seed_aliases
        absent = {seed for seed in self._static  # (several interfaces or addresses: any)
                  if seed not in members and members.isdisjoint(aliases.get(seed, ()))}
        for endpoint in absent:
            self._greet(endpoint)
        return absent

    def _forget_keys(self) -> None:
        """Past `_KEYS_KEPT` pinned endpoints, unpin those no member, seed or link uses."""
        curve = self._ctx.curve
        if curve is None or curve.trusted <= _KEYS_KEPT:
            return
        used = {*self._static, *self._pending, *self._links}
        for rec in self.table.records():
            hello: _wire.Hello | None = rec.hello
            if hello is not None:
                used.update(hello.ctl, hello.pub, hello.pull, hello.rtr)
        curve.retain(used)

    def _heartbeat(self) -> _wire.Heartbeat:
        me = self._announcement
        return _wire.Heartbeat(self._id, self._incarnation, me.version, me.ctl, seq=me.seq,
                               digest=self._digest())

    def _beat_to(self, rec: PeerRecord, base: _wire.Heartbeat, now: float) -> None:
        """`watching` says whether we chose to watch it (then it beats us back); a beat
        back to a watcher says False, or two members would keep each other forever."""
        held = now - rec.their_beat_at if rec.their_beat else 0.0
        self._send(rec.ctl, msgspec.structs.replace(base, sent=now, echo=rec.their_beat,
                                                    held=held,
                                                    watching=rec.id in self._watching))

    def _joined(self) -> bool:
        return any(rec.state is not PeerState.LOST for rec in self.table.records())

    def _targets(self) -> set[str]:
        """Whom we beat: those we watch and those watching us."""
        return {*self._watching, *self._watchers}

    def _refresh_watching(self, now: float) -> list[PeerRecord]:
        """Renew neighbours and partners; return the members we stop beating."""
        if self._view_changed or any(r.state is PeerState.LOST for r in self.table.records()):
            # a member lost only a short while stays on the ring: a stalled member that
            # refutes its loss (CPU starvation does that to many at once) costs no new links
            self._view_changed = False
            settled = now - self.table.lost_after - _RING_GRACE
            self._neighbours = _neighbours.choose(
                self._id, [r.id for r in self.table.records()
                           if r.state is not PeerState.LOST or r.last_heard > settled])
        for peer_id in self._neighbours:
            self._watching[peer_id] = max(self._watching.get(peer_id, 0.0),
                                          now + _NEIGHBOUR_LINGER)
        for source in self._partner_sources:
            for peer_id in source.partners():
                self._watching[peer_id] = max(self._watching.get(peer_id, 0.0),
                                              now + _PARTNER_LINGER)
        stopped: list[PeerRecord] = []
        for peer_id, until in list(self._watching.items()):
            rec = self.table.get(peer_id)
            if rec is None:
                del self._watching[peer_id]
            elif until < now and rec.state is not PeerState.LOST:
                del self._watching[peer_id]  # a lost one is beaten until forgotten
                self.table.unwatch(rec)
                if peer_id not in self._watchers:
                    stopped.append(rec)
            elif not rec.watched:
                self.table.watch(rec, beats_us=self._beats_us(peer_id))
        return stopped

    def _beats_us(self, peer_id: str) -> bool:
        """Whether a member we begin to watch beats us without reading our beat first: it
        watches us already (its last heartbeat said so), or it will as its neighbour (we
        are one of its own by our view; a seed is the neighbour of few of its joiners)."""
        if peer_id in self._watchers:
            return True
        members = [r.id for r in self.table.records() if r.state is not PeerState.LOST]
        return self._id in _neighbours.choose(peer_id, [*members, self._id])

    # -- gossip out --------------------------------------------------------------

    def _digest(self) -> int:
        """Our view's digest, from each member's state as it is now (a share is hashed
        again only when what it covers changed)."""
        me = self._announcement
        digest = _gossip.digest_part(self._id, self._incarnation, me.seq, _gossip.ALIVE,
                                     me.version)
        for rec in self.table.records():
            status = _gossip.LOST if rec.state is PeerState.LOST else _gossip.ALIVE
            key = (rec.incarnation, rec.seq, status, rec.subs_version)
            if key != rec.digest_key:
                rec.digest_key = key
                rec.digest_part = _gossip.digest_part(rec.id, *key)
            digest ^= rec.digest_part
        return digest ^ self._foreign.digest()

    def _spread(self, news: _wire.News, came_from: str) -> None:
        """Pass `news` on to every member we beat but the one it came from, at the end of
        this loop turn (news learned together travels together)."""
        self._outgoing.append((news, came_from))
        if self._flush is None:
            self._flush = asyncio.get_running_loop().call_soon(self._send_news)

    def _send_news(self) -> None:
        self._flush = None
        outgoing, self._outgoing = self._outgoing, []
        sources = {came_from for _, came_from in outgoing}
        encoded: dict[str, list[bytearray]] = {}
        """The frames for the targets that get all but what came from one source ("":
        all of it): most targets share one, so news is encoded once, not per target."""
        for peer_id in self._targets():
            rec = self.table.get(peer_id)
            if rec is None or rec.state is PeerState.LOST:
                continue
            key = peer_id if peer_id in sources else ""
            frames = encoded.get(key)
            if frames is None:
                news = [item for item, came_from in outgoing if not key or came_from != key]
                frames = encoded[key] = self._gossip_frames(news, sync=False)
            for message in frames:
                self.sent += 1
                self._link(rec.ctl).send(message)

    def _view(self) -> list[_wire.News]:
        """Everything we know, as news: ours and every member's record, and the lost ones'
        ends."""
        news: list[_wire.News] = [self._announcement.hello(False)]
        for rec in self.table.records():
            if rec.hello is None:
                continue
            news.append(rec.hello)
            if rec.state is PeerState.LOST:
                news.append(_wire.Down(rec.id, rec.incarnation, rec.seq))
        news.extend(self._foreign.view())
        return news

    def _send_view(self, endpoint: str, news: list[_wire.News], *, sync: bool) -> None:
        for message in self._gossip_frames(news, sync=sync):
            self.sent += 1
            self._link(endpoint).send(message)

    def _gossip_frames(self, news: list[_wire.News], *, sync: bool) -> list[bytearray]:
        """`news` as gossip messages: one when it fits (the usual case, encoded once),
        else in chunks under the control size limit."""
        if not news:
            return []
        whole = _wire.encode_control(_wire.Gossip(self._id, news, sync))
        if len(whole) <= _NEWS_BUDGET:
            return [whole]
        return [_wire.encode_control(_wire.Gossip(self._id, chunk, sync))
                for chunk in _gossip.chunks(news, _NEWS_BUDGET)]

    def _refute(self, seq: int) -> None:
        """News says we were lost at `seq`: we are not, and say so with a higher one."""
        me = self._announcement
        if seq < me.seq:
            return
        if seq >= _MAX_ALIVE:
            self._quiet.drop("control", f"news that this node was lost at alive counter {seq}")
            return
        me.seq = seq + 1
        self.table.strained("news said this node was lost")
        _log.info("refuting news that this node was lost (alive counter now %d)", me.seq)
        self._spread(me.hello(False), "")

    def _dialable(self, endpoints: list[str]) -> str | None:
        """The endpoint of a member's we dial (`_first_endpoint` for our families, zones)."""
        return _first_endpoint(endpoints, self._reach, self._zones, self._heard_on)

    # -- receiving ---------------------------------------------------------------

    def _on_messages(self, batch: list[list[bytes]]) -> None:
        self.received += len(batch)
        for frames in batch:
            try:
                msg = _wire.decode_control_message(frames)
                self._handle(msg)
            except ProtocolError as exc:
                self._quiet.drop("control", exc.reason)

    def _handle(self, msg: _wire.Control) -> None:
        if (self._leaving and isinstance(msg, _wire.Heartbeat | _wire.Hello)
                and self.table.get(msg.id) is None):
            endpoint = self._dialable(msg.ctl)
            if endpoint is not None:
                self._strangers[msg.id] = endpoint
                self._on_stranger(msg.id)
        if isinstance(msg, _wire.Heartbeat):
            self._on_heartbeat(msg)
        elif isinstance(msg, _wire.Gossip):
            self._on_gossip(msg)
        elif isinstance(msg, _wire.Hello):
            self._on_hello(msg)
        elif isinstance(msg, _wire.Bye):
            self._on_bye(msg)
        elif isinstance(msg, _wire.Want):
            self._on_want(msg)
        else:
            route = self._routes.get(type(msg))
            if route is None:
                raise ProtocolError(f"no part handles {type(msg).__name__}")
            route(msg)  # pattern traffic (credits, ...) for the part that owns it

    def _on_hello(self, hello: _wire.Hello) -> None:
        """A member greeted us itself: whatever news said, it is alive."""
        if hello.id == self._id:
            return  # a static peer entry pointing at ourselves
        if hello.reply:
            self._redial_if_stalled(self._dialable(hello.ctl))
        if not self._learn(hello, "", direct=True):
            return
        rec = self.table.get(hello.id)
        if rec is None:
            return
        self._heard_directly(rec)
        if not hello.reply:
            return
        self._greet(rec.ctl, reply=False)
        now = time.monotonic()
        # a greeter may be new to the mesh: it gets our whole view (once in a while: a
        # member greeting us again, e.g. to learn a changed record, must not set off an
        # exchange of whole views each time — digests differ all along while news spreads)
        if (hello.digest != self._digest()
                and now - self._synced_at.get(rec.id, -_SYNC_EVERY) >= _SYNC_EVERY):
            self._synced_at[rec.id] = now
            self._send_view(rec.ctl, self._view(), sync=True)

    def _redial_if_stalled(self, endpoint: str | None) -> None:
        """A member greets us as a stranger while our own hellos to it have gone
        unanswered for a while: our link is likely waiting out ZeroMQ's reconnect back-off
        (up to a second; it was opened before the member was up), and our answer and
        anything else we send it would wait too. A fresh link connects at once."""
        if endpoint is None:
            return
        born = self._pending.get(endpoint)
        if born is None or time.monotonic() - born < _REDIAL_AFTER:
            return
        link = self._links.pop(endpoint, None)
        if link is not None:
            link.close()  # (what it holds is hellos: the answer below supersedes them)

    def _heard_directly(self, rec: PeerRecord) -> None:
        """A message from the member itself. If we had it lost, others may still: tell it,
        so it refutes the news for everyone."""
        was_lost = rec.state is PeerState.LOST
        silent = time.monotonic() - rec.last_heard
        self._unsuspect(rec)
        self.table.heard(rec)
        rec.heard_directly = rec.last_heard
        if was_lost:
            if rec.watched and silent < 2 * self.table.lost_after:
                # lost by a hair, and back: more likely our host is overloaded than it
                self.table.strained(f"{rec.name[:64]!r}, taken for lost, was heard again")
            self._send(rec.ctl, _wire.Gossip(self._id, [_wire.Down(rec.id, rec.incarnation,
                                                                   rec.seq)]))
            self._view_changed = True
            self._peers_changed()

    def _learn(self, hello: _wire.Hello, came_from: str, *, direct: bool = False) -> bool:
        """Take a member's record (from itself, or passed on); True if it told us
        something new (then it is passed on)."""
        if hello.id == self._id:
            # (older: news of an earlier run of ours, still passed on after a quick restart;
            # newer: another node with our id, a copied data dir say)
            if hello.incarnation > self._incarnation:
                self._quiet.drop("self_claim", "news of a member with this node's id")
            return False
        if hello.mesh != self._mesh:
            self._quiet.drop("other_mesh", f"hello from mesh {hello.mesh[:64]!r}")
            return False
        if self._departed.get(hello.id) == hello.incarnation:
            return False
        tomb = self._forgotten.get(hello.id)
        if not direct and tomb is not None and (hello.incarnation, hello.seq) <= tomb:
            return False
        rec = self.table.get(hello.id)
        news = rec is None or _is_newer(hello, rec)
        if not news and not direct:
            return False
        ctl, pub = self._dialable(hello.ctl), self._dialable(hello.pub)
        if ctl is None or pub is None:
            if rec is None and _first_endpoint(hello.ctl) and _first_endpoint(hello.pub):
                # reachable by others, not by us (IPv4 and IPv6): known, never dialled
                record = msgspec.structs.replace(hello, reply=False, digest=0)
                if self._foreign.learn(record):
                    self._spread(record, came_from)
                    return True
                return False
            self._quiet.drop("bad_member", f"member {hello.id[:8]} without usable endpoints")
            return False
        self._foreign.forget(hello.id)
        if rec is None and len(self.table) >= _MAX_MEMBERS:
            self._quiet.drop("too_many_members", f"more than {_MAX_MEMBERS} members")
            return False
        pull, rtr = self._dialable(hello.pull) or "", self._dialable(hello.rtr) or ""
        if not self._admit(hello.id, hello.name, hello.key,  # (and as we dial them)
                           [*hello.ctl, *hello.pub, *hello.pull, *hello.rtr,
                            *{ctl, pub, pull, rtr}.difference(("",))]):
            return False
        record = msgspec.structs.replace(hello, reply=False, digest=0)
        if (rec is None or rec.incarnation != hello.incarnation
                or rec.ctl != ctl or rec.pub != pub):
            new = PeerRecord(hello.id, hello.name[:64], hello.incarnation, ctl, pub,
                             pull=pull, rtr=rtr)
            new.seq, new.key, new.hello = hello.seq, hello.key, record
            self._set_subs(new, hello)
            if rec is not None and (rec.ctl != ctl or rec.key != hello.key):
                # (a link keeps the server key it was opened with: a member back on the
                # same port with a new key would never hear us on the old one)
                self._drop_link(rec.ctl)
            for listener in self._listeners:
                listener.peer_connected(new, rec)
            self.table.add(new)
            self._view_changed = True
        else:
            was_lost = rec.state is PeerState.LOST
            refuted = hello.seq > rec.seq
            rec.seq, rec.hello = max(rec.seq, hello.seq), record
            if self._set_subs(rec, hello):
                for listener in self._listeners:
                    listener.peer_updated(rec)
            if refuted and rec.state is not PeerState.ALIVE and not direct:
                self._unsuspect(rec)
                self.table.heard(rec)  # it refuted the news: it is back
                self._view_changed = was_lost or self._view_changed
        self._pending.pop(ctl, None)
        if news:
            self._spread(record, came_from)
            self._peers_changed()
        return True

    def _set_subs(self, rec: PeerRecord, hello: _wire.Hello) -> bool:
        """Take the peer's announced interest; True if it changed."""
        if hello.subs_version == rec.subs_version:
            return False
        subs = []
        for pattern in hello.subs[:_MAX_SUBS]:
            try:
                subs.append(TopicPattern(pattern))
            except InvalidName as exc:
                self._quiet.drop("bad_subscription", str(exc))
        rec.subs = tuple(subs)
        rec.pubs = _pubs(hello.pubs, self._quiet)
        rec.feeds = frozenset(hello.feeds[:_MAX_SUBS]).intersection(p.pattern for p in subs)
        rec.queues = {q: max(1, min(w, _MAX_WINDOW)) for q, w in hello.queues.items()
                      if q in set(_names(list(hello.queues), "queue", self._quiet))}
        rec.services = frozenset(_names(hello.services, "service", self._quiet))
        rec.durables = dict(list(hello.durables.items())[:_MAX_SUBS])
        rec.ended = tuple(hello.ended[:_MAX_SUBS])
        rec.retains = hello.retains
        rec.history = tuple(hello.history[:_MAX_SUBS])
        rec.subs_version = hello.subs_version
        return True

    def _on_heartbeat(self, beat: _wire.Heartbeat) -> None:
        rec = self.table.get(beat.id)
        if rec is None or rec.incarnation != beat.incarnation:
            if self._departed.get(beat.id) == beat.incarnation:
                return
            ctl = self._dialable(beat.ctl)
            if ctl is not None:
                self._greet_new(ctl)
            return
        was = rec.state
        rec.answered = True  # (it beats us: first-contact grace over, see `PeerTable.watch`)
        self._heard_directly(rec)
        now = rec.last_heard
        if not beat.watching:
            self._watchers.pop(rec.id, None)
        else:
            if rec.id not in self._watchers:  # a new watcher: let it hear us at once
                self._beat_to(rec, self._heartbeat(), now)
            self._watchers[rec.id] = now
        rec.their_beat, rec.their_beat_at = beat.sent, now
        if beat.echo and 0.0 <= beat.held < 3600.0:
            rtt = now - beat.echo - beat.held
            if 0.0 <= rtt < 3600.0:
                rec.rtt = rtt
        if beat.subs_version != rec.subs_version or beat.seq > rec.seq:
            self._greet(rec.ctl)
        elif beat.digest != self._digest():
            self._compare_views(rec)
        else:
            self._mismatch.pop(rec.id, None)
        if was is not rec.state:
            self._peers_changed()

    def _compare_views(self, rec: PeerRecord) -> None:
        """Its view differs from ours: if it stays so (news in flight settle within a beat
        or two), the lower id of the two sends its whole view, and hears back what it lacks."""
        count = self._mismatch[rec.id] = self._mismatch.get(rec.id, 0) + 1
        now = time.monotonic()
        if (count >= _SYNC_AFTER and self._id < rec.id
                and now - self._synced_at.get(rec.id, 0.0) >= _SYNC_EVERY):
            self._synced_at[rec.id] = now
            self._mismatch.pop(rec.id, None)
            self._send_view(rec.ctl, self._view(), sync=True)

    def _on_gossip(self, gossip: _wire.Gossip) -> None:
        if len(gossip.news) > _MAX_NEWS:
            raise ProtocolError(f"gossip with {len(gossip.news)} pieces of news")
        sender = self.table.get(gossip.id)
        for item in gossip.news:
            if isinstance(item, _wire.Hello):
                self._learn(item, gossip.id)
            elif isinstance(item, _wire.Down):
                self._on_down(item, gossip.id)
            else:
                self._on_change(item, gossip.id)
        if gossip.sync and sender is not None:
            theirs = _held(gossip.news)
            newer = [item for item in self._view() if _key(item) > theirs.get(item.id, _NONE)]
            if newer:
                self._send_view(sender.ctl, newer, sync=False)

    def _on_down(self, down: _wire.Down, came_from: str) -> None:
        if down.id == self._id:
            if down.incarnation == self._incarnation and not down.left:
                self._refute(down.seq)
            return
        if down.id in self._foreign:
            if self._foreign.down(down):
                if down.left:
                    self._departed.put(down.id, down.incarnation)
                self._spread(down, came_from)
            return
        rec = self.table.get(down.id)
        if down.left:
            if rec is not None and rec.incarnation == down.incarnation:
                _log.debug("member %s (%s) left, says news from %s", rec.name, rec.id[:8],
                           came_from[:8])
                self._end(rec)
                self._spread(down, came_from)
            elif rec is None and self._departed.get(down.id) != down.incarnation:
                self._departed.put(down.id, down.incarnation)
                self._spread(down, came_from)
            return
        if (rec is None or rec.state is PeerState.LOST
                or (down.incarnation, down.seq) < (rec.incarnation, rec.seq)):
            return
        if time.monotonic() - rec.heard_directly < self.table.suspect_after:
            # we hear it ourselves: it is not lost; let it refute the news for everyone
            self._send(rec.ctl, _wire.Gossip(self._id, [down]))
            return
        if rec.id in self._confirming:
            return
        # Suspect until the news is confirmed: a member that was only stalled refutes
        # within this window, and one false suspicion does not become a loss everywhere.
        rec.seq = down.seq
        if rec.state is PeerState.ALIVE:
            rec.state = PeerState.SUSPECT
        self._confirming[rec.id] = asyncio.get_running_loop().call_later(
            _CONFIRM * self.table.stretch, self._confirm_lost, rec, down)
        self._spread(down, came_from)
        self._peers_changed()

    def _confirm_lost(self, rec: PeerRecord, down: _wire.Down) -> None:
        """Only a refutation or the member itself heard clears the news (our watch of it
        may have lapsed meanwhile: that sets it alive in the table, and proves nothing)."""
        self._confirming.pop(rec.id, None)
        if (self.table.get(rec.id) is not rec or rec.state is PeerState.LOST
                or rec.seq > down.seq
                or time.monotonic() - rec.heard_directly < self.table.suspect_after):
            return  # refuted, heard, lost or gone meanwhile
        _log.debug("peer %s (%s) lost: news of it (alive counter %d) not refuted", rec.name,
                   rec.id[:8], down.seq)
        self.table.declare_lost(rec)
        self._view_changed = True
        self._peers_changed()

    def _unsuspect(self, rec: PeerRecord) -> None:
        handle = self._confirming.pop(rec.id, None)
        if handle is not None:
            handle.cancel()

    def _on_change(self, change: _wire.Change, came_from: str) -> None:
        if change.id in self._foreign:
            if self._foreign.change(change):
                self._spread(change, came_from)
            return
        rec = self.table.get(change.id)
        if (rec is None or rec.hello is None or rec.incarnation != change.incarnation
                or change.version <= rec.subs_version):
            return
        if change.base != rec.subs_version:
            sender = self.table.get(came_from)
            if sender is not None:  # a change went missing: ask for the whole record
                self._send(sender.ctl, _wire.Want(self._id, [change.id]))
            return
        hello = _gossip.apply_change(rec.hello, change)
        rec.hello = hello
        if self._set_subs(rec, hello):
            for listener in self._listeners:
                listener.peer_updated(rec)
        self._spread(change, came_from)
        self._peers_changed()

    def _on_want(self, want: _wire.Want) -> None:
        sender = self.table.get(want.id)
        if sender is None:
            return
        records: list[_wire.News] = []
        for peer_id in want.ids[:_MAX_NEWS]:
            rec = self.table.get(peer_id)
            if rec is not None and rec.hello is not None:
                records.append(rec.hello)
            elif peer_id == self._id:
                records.append(self._announcement.hello(False))
        self._send_view(sender.ctl, records, sync=False)

    def _on_bye(self, bye: _wire.Bye) -> None:
        rec = self.table.get(bye.id)
        if rec is not None:
            _log.debug("member %s (%s) said goodbye", rec.name, rec.id[:8])
            self._end(rec)
            self._spread(_wire.Down(rec.id, rec.incarnation, rec.seq, left=True), rec.id)

    def _end(self, rec: PeerRecord, *, departed: bool = True) -> None:
        """The member left: drop it now and, if it `departed` (not merely revoked), keep
        its news from bringing it back."""
        self.table.remove(rec.id)
        if departed:
            self._departed.put(rec.id, rec.incarnation)
        for listener in self._listeners:
            listener.peer_gone(rec)
        self._unlink(rec)
        self._peers_changed()

    def revoke(self) -> list[PeerRecord]:
        """Drop the members whose CURVE key left the allowlist (a reload): they are gone
        for this node (a LEFT event), and news of them is refused (`_admit`). Not passed
        on: other nodes may still allow them. Returns them."""
        curve = self._ctx.curve
        if curve is None:
            return []
        gone = [rec for rec in self.table.records() if not curve.allows(rec.key)]
        for rec in gone:
            _log.info("member %s (%s) dropped: its CURVE key was revoked", rec.name,
                      rec.id[:8])
            self._end(rec, departed=False)  # (allowed again, it may come back as it is)
        return gone

    def _unlink(self, rec: PeerRecord) -> None:
        self._watching.pop(rec.id, None)
        self._watchers.pop(rec.id, None)
        self._mismatch.pop(rec.id, None)
        self._synced_at.pop(rec.id, None)
        self._view_changed = True
        self._drop_link(rec.ctl)

    # -- the peer table's decisions (TableObserver) --------------------------------

    def peer_event(self, event: PeerEvent) -> None:
        for sink in self._events:
            sink.peer_event(event)
        if event.kind is PeerEventKind.LOST:
            rec = self.table.get(event.peer.id)
            if rec is not None:
                for listener in self._listeners:
                    listener.peer_lost(rec)  # fail its requests and work over now

    def peer_state_changed(self, rec: PeerRecord) -> None:
        if rec.state is PeerState.LOST:  # we watched it go silent: tell everyone
            self._view_changed = True
            self._spread(_wire.Down(rec.id, rec.incarnation, rec.seq), "")
        self._peers_changed()

    def peer_forgotten(self, rec: PeerRecord) -> None:
        _log.info("peer %s (%s) forgotten: lost for %.0f s", rec.name, rec.id[:8],
                  self.table.forget_after)
        self._forgotten.put(rec.id, (rec.incarnation, rec.seq))
        for listener in self._listeners:
            listener.peer_gone(rec)
        self._unlink(rec)
        self._peers_changed()

    def _peers_changed(self) -> None:
        for listener in self._listeners:
            listener.peers_changed()


_NONE: Final[tuple[int, int, int, int]] = (-1, -1, -1, -1)


def _key(item: _wire.News) -> tuple[int, int, int, int]:
    """How new a piece of news is: (incarnation, seq, status, interest version)."""
    if isinstance(item, _wire.Hello):
        return (item.incarnation, item.seq, _gossip.ALIVE, item.subs_version)
    if isinstance(item, _wire.Down):
        return (item.incarnation, item.seq, _gossip.LEFT if item.left else _gossip.LOST, 0)
    return (item.incarnation, -1, _gossip.ALIVE, item.version)


def _held(news: Iterable[_wire.News]) -> dict[str, tuple[int, int, int, int]]:
    """The newest of each member's news in a view."""
    held: dict[str, tuple[int, int, int, int]] = {}
    for item in news:
        key = _key(item)
        if key > held.get(item.id, _NONE):
            held[item.id] = key
    return held


def _is_newer(hello: _wire.Hello, rec: PeerRecord) -> bool:
    """Whether a record passed on tells more than what we hold of that member."""
    if hello.incarnation != rec.incarnation:
        return hello.incarnation > rec.incarnation
    if rec.state is PeerState.LOST:
        return hello.seq > rec.seq  # only the member's own refutation brings it back
    return (hello.seq, hello.subs_version) > (rec.seq, rec.subs_version)


def _until_next_beat(now: float, interval: float) -> float:
    """Seconds from `now` to the first multiple of `interval` at least half an interval
    away: about one interval between beats, and never two beats for one multiple (the
    loop's monotonic timer may wake us a hair before the wall clock gets there)."""
    return (math.floor(now / interval + 0.5) + 1) * interval - now


def _names(names: list[str], kind: str, quiet: QuietLog) -> list[str]:
    valid = []
    for name in names[:_MAX_SUBS]:
        try:
            validate_topic(name)
        except InvalidName as exc:
            quiet.drop(f"bad_{kind}", str(exc))
        else:
            valid.append(name)
    return valid


def _pubs(pubs: list[str] | None, quiet: QuietLog) -> tuple[TopicPattern, ...]:
    """A peer's announced topics (invalid ones dropped and counted); none announced (an
    older node) or more than a node announces is taken as ``>`` (all), which can only
    cost a connection."""
    if pubs is None or len(pubs) > _wire.MAX_PUBS:
        return (TopicPattern(">"),)
    valid = []
    for pattern in pubs:
        try:
            valid.append(TopicPattern(pattern))
        except InvalidName as exc:
            quiet.drop("bad_pubs", str(exc))
    return tuple(valid)


def _link_zones(interfaces: Iterable[str]) -> tuple[str, ...]:
    """The zones of our link-local interfaces, by name (``%2`` -> ``eth0``)."""
    zones: dict[str, None] = {}
    for iface in interfaces:
        _, zoned, zone = iface.partition("%")
        if zoned:
            with contextlib.suppress(OSError, ValueError, OverflowError):
                zone = socket.if_indextoname(int(zone)) if zone.isdigit() else zone
            zones[zone] = None
    return tuple(zones)


def _first_endpoint(endpoints: list[str], reach: frozenset[int] = _BOTH,
                    zones: tuple[str, ...] | None = None,
                    heard_on: Mapping[str, str] = _NOWHERE) -> str | None:
    """The first ``tcp://<IPv4>:<port>`` or ``tcp://[<IPv6>]:<port>`` (what nodes bind) of an
    IP version in `reach` (those of our interfaces: an IPv4-only node cannot dial IPv6).
    Anything else would make libzmq's connect raise (``tcp://x``), ending the reader, or
    resolve a host name by DNS; a link-local IPv6 address must name its zone. That zone
    is the announcer's interface, which means nothing here (libzmq silently never
    connects to ``%eth0`` on a host whose link is ``enp3s0``): with `zones` (ours), a
    link-local endpoint is given our zone if we have one, kept if it names one of ours,
    else given the one discovery found it on (`heard_on`), else skipped; and with no
    zone of ours (no link-local interface) it is no address of ours to dial, as a global
    one is not for a node on link-local only (there is no route to it): such members
    are known, not dialled. A loopback endpoint comes last: a member bound to
    127.0.0.1 or ::1 and a LAN address is reached on the LAN one from any host (its
    loopback one, from another host, is that host's own)."""
    loopback: str | None = None
    for endpoint in endpoints:
        found = _ENDPOINT_RE.fullmatch(endpoint)
        if found is None or not 0 < int(found[4]) < 65536:
            continue
        try:
            ip: ipaddress.IPv4Address | ipaddress.IPv6Address
            if found[1] is not None:
                ip = ipaddress.IPv4Address(found[1])
                usable = 4 in reach
            else:
                ip = ipaddress.IPv6Address(found[2])
                usable = (not (ip.is_unspecified or ip.is_multicast) and ip.ipv4_mapped is None
                          and ip.is_link_local == bool(found[3]))
                if not usable or zones is None or not ip.is_link_local:
                    usable = usable and 6 in reach
                elif found[3] not in zones:
                    zone = zones[0] if len(zones) == 1 else heard_on.get(found[2])
                    usable = zone is not None
                    endpoint = f"tcp://[{found[2]}%{zone}]:{found[4]}"
        except ValueError:
            continue
        if usable and ip.is_loopback:
            loopback = loopback or endpoint
        elif usable:
            return endpoint
    return loopback
