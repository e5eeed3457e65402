"""Membership: the control channel, the hello handshake and heartbeats.

Each node binds one ROUTER and opens one DEALER link per peer control
endpoint it learns of (from mDNS, a static `--peer`, or a peer's hello or
heartbeat). A link whose peer has not greeted us yet sends `Hello(reply=True)`
every tick until it does; a known peer gets a `Heartbeat` every tick. Any
message from a peer counts as a sign of life (see `_peers`). The hello carries
what the peer offers (see `_hello`); a heartbeat carries the version of that,
so a lost update is noticed and re-requested.

What it learns goes to the node's parts through `_listener`'s protocols:
every `PeerListener` hears of peers connecting, changing, being lost and
going; the `EventSink` gets joined/left/lost events; control messages that
are not membership's own go to their owner by type (`ControlRoutes`).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import math
import re
import time
from collections.abc import Sequence
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
from ._hello import Announcement
from ._listener import ControlRoutes, EventSink, PeerListener, Ticker
from ._peers import PeerEvent, PeerEventKind, PeerRecord, PeerTable

_log = logging.getLogger("mesh.node")
_PENDING_LINK_TTL: Final[float] = 30.0
_MAX_SUBS: Final[int] = 10_000
_ENDPOINT_RE: Final = re.compile(r"tcp://([0-9.]{7,15}):([0-9]{1,5})")
_MAX_WINDOW: Final[int] = 1_000_000


class Membership:
    """Owns the control ROUTER, the per-peer links and the peer table of one node.

    It is also the node's `Announcer` (parts report changes of what they offer
    here) and its `ControlSender`.
    """

    def __init__(self, ctx: Context, config: NodeConfig, quiet: QuietLog,
                 announcement: Announcement) -> None:
        self._ctx = ctx
        self._announcement = announcement
        self._id = announcement.identity.id
        self._mesh = config.mesh
        self._interval = config.heartbeat_interval
        self._quiet = quiet
        self._listeners: tuple[PeerListener, ...] = ()
        self._events: tuple[EventSink, ...] = ()
        self._routes: ControlRoutes = {}
        self._tickers: tuple[Ticker, ...] = ()
        self.table = PeerTable(suspect_after=config.suspect_after,
                               lost_after=config.lost_after,
                               forget_after=config.forget_after, observer=self)
        self.router = ControlRouter(ctx)
        self._links: dict[str, ControlDealer] = {}
        self._link_born: dict[str, float] = {}
        self._static: set[str] = set()
        self._departed: BoundedDict[str, int] = BoundedDict(_MAX_SUBS)
        """id -> incarnation of peers that said goodbye: their stragglers are ignored."""
        self._heartbeat: _wire.Heartbeat | None = None
        """Our heartbeat, the same for every peer until our interest changes (but for
        the round-trip stamps)."""

    def attach(self, *, listeners: Sequence[PeerListener], events: Sequence[EventSink],
               routes: ControlRoutes, tickers: Sequence[Ticker]) -> None:
        """Who hears what membership learns (the parts exist only once membership does:
        some of them send through it)."""
        self._listeners = tuple(listeners)
        self._events = tuple(events)
        self._routes = routes
        self._tickers = tuple(tickers)

    # -- lifecycle -------------------------------------------------------------

    @property
    def endpoints(self) -> list[str]:
        """Our control endpoints (once bound)."""
        return self._announcement.ctl

    def links(self) -> list[str]:
        """The control endpoints this node holds a link to (known peers and pending ones)."""
        return sorted(self._links)

    @property
    def interest_version(self) -> int:
        """The version of what this node offers, as its hellos and heartbeats carry it."""
        return self._announcement.version

    def bind(self, interfaces: list[str], port: int) -> list[str]:
        ctl = self._announcement.ctl = [self.router.bind(host, port) for host in interfaces]
        return ctl

    async def run(self) -> None:
        """Handle control messages and tick heartbeats until cancelled."""
        self.router.start(self._on_messages)
        try:
            await self._tick_forever()
        finally:
            self.router.stop()
            self.table.stop()

    def say_goodbye(self) -> None:
        frames = _wire.encode_control(_wire.Bye(self._id))
        for link in self._links.values():
            link.send(frames)

    def close(self) -> None:
        for link in self._links.values():
            link.close(linger=0.5)
        self._links.clear()
        self.router.close()

    # -- discovery ---------------------------------------------------------------

    def on_discovery(self, event: DiscoveryEvent) -> None:
        """Connect to a peer a discovery backend found; its hello does the rest."""
        if not isinstance(event, PeerFound):
            return  # a goodbye in mDNS proves nothing: liveness is by heartbeat
        info: PeerInfo = event.info
        rec = self.table.get(info.id) if info.id else None
        if rec is not None and rec.ctl in info.endpoints:
            return
        if not info.endpoints:
            return
        if not self._admit(info.id, info.name, info.key, info.endpoints[:1]):
            return
        if info.source == "static":
            self._static.add(info.endpoints[0])
        self._greet(info.endpoints[0])

    def _admit(self, peer_id: str, name: str, key: str, endpoints: Sequence[str]) -> bool:
        """Fail closed: a secure node talks only to allowlisted keys, a plain node only to
        plain peers; never a silent downgrade. Admitted endpoints are pinned to the key."""
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
            link = self._links[endpoint] = ControlDealer(self._ctx, endpoint)
            self._link_born[endpoint] = time.monotonic()
        return link

    def _greet(self, endpoint: str, *, reply: bool = True) -> None:
        self._link(endpoint).send(_wire.encode_control(self._announcement.hello(reply)))

    def _drop_link(self, endpoint: str) -> None:
        if endpoint in self._static:
            return
        link = self._links.pop(endpoint, None)
        self._link_born.pop(endpoint, None)
        if link is not None:
            link.close(linger=0)

    def send_to(self, peer_id: str, msg: _wire.Control) -> bool:
        """Send a control message to a known peer; False if unknown or its queue is full."""
        rec = self.table.get(peer_id)
        if rec is None:
            return False
        return self._link(rec.ctl).send(_wire.encode_control(msg))

    def interest_changed(self) -> None:
        """What a part offers changed: a new interest version, announced to every known
        peer now (and carried by our heartbeats from now on)."""
        self._announcement.version += 1
        self._heartbeat = None
        frames = _wire.encode_control(self._announcement.hello(False))
        for rec in self.table.records():
            self._link(rec.ctl).send(frames)

    async def _tick_forever(self) -> None:
        """Beat every interval, on the wall clock's multiples of it.

        Nodes whose clocks agree (one host, or NTP) then beat together, and a
        node wakes about once per interval for all its peers' heartbeats rather
        than once for each of them and once more for its own. The wall clock is
        the only clock nodes share; the wait itself is on the loop's monotonic
        clock and always between half and one and a half intervals, so a jump of
        the wall clock moves one beat by at most half an interval. Liveness has
        its own timers (see `PeerTable`).
        """
        interval = self._interval
        while True:
            await asyncio.sleep(_until_next_beat(time.time(), interval))
            self.beat()
            for ticker in self._tickers:
                ticker.tick()

    def beat(self) -> None:
        """One heartbeat to every known peer, one hello to every link still unanswered.

        Each peer's heartbeat echoes the stamp of its last one to us, and how long we
        held it, so it measures its round trip to us (`PeerRecord.rtt`) for free."""
        me = self._announcement
        base = self._heartbeat
        if base is None:
            base = self._heartbeat = _wire.Heartbeat(self._id, me.identity.incarnation,
                                                     me.version, me.ctl)
        links = self._links
        known = set()
        now = time.monotonic()
        for rec in self.table.records():
            known.add(rec.ctl)
            held = now - rec.their_beat_at if rec.their_beat else 0.0
            beat = msgspec.structs.replace(base, sent=now, echo=rec.their_beat, held=held)
            self._link(rec.ctl).send(_wire.encode_control(beat))
        if len(known) == len(links):
            return
        hello = _wire.encode_control(self._announcement.hello(True))
        for endpoint in [e for e in links if e not in known]:
            if endpoint not in self._static and now - self._link_born[endpoint] > _PENDING_LINK_TTL:
                self._drop_link(endpoint)
            else:
                links[endpoint].send(hello)

    # -- receiving ---------------------------------------------------------------

    def _on_messages(self, batch: list[list[bytes]]) -> None:
        for frames in batch:
            try:
                msg = _wire.decode_control_message(frames)
                self._handle(msg)
            except ProtocolError as exc:
                self._quiet.drop("control", exc.reason)

    def _handle(self, msg: _wire.Control) -> None:
        if isinstance(msg, _wire.Heartbeat):
            self._on_heartbeat(msg)
        elif isinstance(msg, _wire.Hello):
            self._on_hello(msg)
        elif isinstance(msg, _wire.Bye):
            self._on_bye(msg)
        else:
            route = self._routes.get(type(msg))
            if route is None:
                raise ProtocolError(f"no part handles {type(msg).__name__}")
            route(msg)  # pattern traffic (credits, ...) for the part that owns it

    def _on_hello(self, hello: _wire.Hello) -> None:
        if hello.id == self._id:
            return  # a static peer entry pointing at ourselves
        if hello.mesh != self._mesh:
            self._quiet.drop("other_mesh", f"hello from mesh {hello.mesh[:64]!r}")
            return
        ctl, pub = _first_endpoint(hello.ctl), _first_endpoint(hello.pub)
        if ctl is None or pub is None:
            raise ProtocolError("hello without usable endpoints")
        if self._departed.get(hello.id) == hello.incarnation:
            return
        if not self._admit(hello.id, hello.name, hello.key,
                           [*hello.ctl, *hello.pub, *hello.pull, *hello.rtr]):
            return
        rec = self.table.get(hello.id)
        if (rec is None or rec.incarnation != hello.incarnation
                or rec.ctl != ctl or rec.pub != pub):
            new = PeerRecord(hello.id, hello.name[:64], hello.incarnation, ctl, pub,
                             pull=_first_endpoint(hello.pull) or "",
                             rtr=_first_endpoint(hello.rtr) or "")
            self._set_subs(new, hello)
            if rec is not None and rec.ctl != ctl:
                self._drop_link(rec.ctl)
            self._link(ctl)
            for listener in self._listeners:
                listener.peer_connected(new, rec)
            self.table.add(new)
        else:
            if self._set_subs(rec, hello):
                for listener in self._listeners:
                    listener.peer_updated(rec)
            self.table.heard(rec)
        if hello.reply:
            self._greet(ctl, reply=False)
        self._peers_changed()

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
        rec.retains = hello.retains
        rec.history = tuple(hello.history[:_MAX_SUBS])
        rec.subs_version = hello.subs_version
        return True

    def _on_heartbeat(self, beat: _wire.Heartbeat) -> None:
        rec = self.table.get(beat.id)
        if rec is None or rec.incarnation != beat.incarnation:
            if self._departed.get(beat.id) == beat.incarnation:
                return
            ctl = _first_endpoint(beat.ctl)
            if ctl is not None:
                self._greet(ctl)
            return
        was = rec.state
        self.table.heard(rec)
        now = rec.last_heard
        rec.their_beat, rec.their_beat_at = beat.sent, now
        if beat.echo and 0.0 <= beat.held < 3600.0:
            rtt = now - beat.echo - beat.held
            if 0.0 <= rtt < 3600.0:
                rec.rtt = rtt
        if beat.subs_version != rec.subs_version:
            self._greet(rec.ctl)
        if was is not rec.state:
            self._peers_changed()

    def _on_bye(self, bye: _wire.Bye) -> None:
        rec = self.table.remove(bye.id)
        if rec is not None:
            self._departed.put(rec.id, rec.incarnation)
            for listener in self._listeners:
                listener.peer_gone(rec)
            self._drop_link(rec.ctl)
            self._peers_changed()

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
        self._peers_changed()

    def peer_forgotten(self, rec: PeerRecord) -> None:
        _log.info("peer %s (%s) forgotten: lost for %.0f s", rec.name, rec.id[:8],
                  self.table.forget_after)
        for listener in self._listeners:
            listener.peer_gone(rec)
        self._drop_link(rec.ctl)
        self._peers_changed()

    def _peers_changed(self) -> None:
        for listener in self._listeners:
            listener.peers_changed()


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


def _first_endpoint(endpoints: list[str]) -> str | None:
    """The first ``tcp://<IPv4>:<port>`` (what nodes bind): anything else would make libzmq's
    connect raise (``tcp://x``), ending the reader, or resolve a host name by DNS."""
    for endpoint in endpoints:
        found = _ENDPOINT_RE.fullmatch(endpoint)
        if found is None or not 0 < int(found[2]) < 65536:
            continue
        try:
            ipaddress.IPv4Address(found[1])
        except ValueError:
            continue
        return endpoint
    return None
