"""The peer table: who is in the mesh, and whether they are alive.

Liveness is ours, by heartbeat: mDNS records outlive crashed peers by up to
75 minutes. A node watches only some members' silence — its neighbours and
the peers it exchanges data with (see `_control`); what it knows of the
others comes from gossip news (see `_gossip`). For a watched peer, any
control message from it counts as a sign of life: silent for `suspect_after`
seconds it is *suspect* (no event); silent for `lost_after` it is *lost*
(event). An unwatched member is lost when news says so. A lost peer stays in
the table and its connections stay open, so when it is heard again it *joins*
again by itself, until it has been lost for `forget_after`: then it is
forgotten (removed, its connections closed) and, should it return, joins as
new. A peer that says goodbye is *left* and removed at once.

Each watched peer has one timer on the loop, set for the moment its silence
runs out and moved on when it is heard: the loop wakes for a peer only if it
really went quiet, never to find that everyone is still talking. (A single
timer at the earliest deadline woke up to twice per heartbeat interval for
nothing, since by then that peer had been heard again.) A timer that fires
much later than it was set for means our own loop was stalled (CPU
starvation, SIGSTOP): the silence it measured is ours as much as the peer's,
so the peer gets a grace period to be heard before anything is decided (the
local health awareness of Lifeguard).

Lifeguard's other half is the table's `health`: each sign that this node's host
is overloaded (a loop stalled longer than `suspect_after`, news that we were
lost while we were not, a member we took for lost heard again) stretches every
silence timeout by one more `lost_after`, up to `_MAX_HEALTH` times; a quiet
spell shrinks it again.
Where every node is starved, false losses would otherwise feed themselves: each
is flooded and refuted by every member, and that work starves them further.
A healthy node keeps its timeouts exact.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

from patterns import TopicPattern

_log = logging.getLogger("mesh.node")
_STALL: Final[float] = 0.25
"""A timer this many seconds late means our loop, not the peer, was stalled."""
_MAX_HEALTH: Final[int] = 4
"""At worst, silence timeouts are stretched to this many times plus one."""
_RECOVER_AFTER: Final[float] = 2.0
"""Multiples of `lost_after` without a sign of overload before `health` goes down one."""
_FIRST_CONTACT: Final[float] = 2.0
"""Timeouts for a watched member that has not beaten us since we began to watch it, as a
multiple."""
_REARM_SLACK: Final[float] = 0.1
"""Fraction of `suspect_after` a peer's timer may run early rather than be moved at
each of a burst of messages (it then finds the peer heard and moves on)."""


class PeerState(enum.Enum):
    """How recently a peer was heard from; `LEFT` only in a `PeerEventKind.LEFT` event's
    snapshot (a peer that said goodbye is removed: `peers()` never lists it)."""

    ALIVE = "alive"
    SUSPECT = "suspect"
    LOST = "lost"
    LEFT = "left"


class PeerEventKind(enum.Enum):
    """What happened to a peer."""

    JOINED = "joined"
    LEFT = "left"
    LOST = "lost"


@dataclass(frozen=True, slots=True)
class Peer:
    """A snapshot of one peer, as users see it."""

    id: str
    """Stable node id."""
    name: str
    """Human name."""
    state: PeerState
    endpoints: tuple[str, ...]
    """Control and publish endpoints."""
    last_seen: float
    """Wall-clock time (epoch seconds) of the last message from it."""
    subscriptions: tuple[str, ...] = ()
    """The patterns it subscribes to."""
    rtt: float | None = None
    """Seconds of the last heartbeat round trip to it (None until measured)."""

    def to_dict(self) -> dict[str, object]:
        return {"id": self.id, "name": self.name, "state": self.state.value,
                "endpoints": list(self.endpoints), "last_seen": self.last_seen,
                "subscriptions": list(self.subscriptions)}


@dataclass(frozen=True, slots=True)
class PeerEvent:
    """A peer joined (or came back), left gracefully, or went silent."""

    kind: PeerEventKind
    peer: Peer


@dataclass(slots=True, eq=False)
class PeerRecord:
    """Mutable per-peer state owned by the node's loop."""

    id: str
    name: str
    incarnation: int
    ctl: str
    pub: str
    state: PeerState = PeerState.ALIVE
    last_heard: float = field(default_factory=time.monotonic)
    subs: tuple[TopicPattern, ...] = ()
    subs_version: int = -1
    pubs: tuple[TopicPattern, ...] = ()
    """What it publishes on (topics, or patterns covering them): our SUB connects to
    its PUB only where these meet our subscriptions."""
    pull: str = ""
    queues: dict[str, int] = field(default_factory=dict)
    """Queue name -> credit window this peer grants each pusher."""
    rtr: str = ""
    durables: dict[str, str] = field(default_factory=dict)
    ended: tuple[str, ...] = ()
    """Queues of durables it ended: its publishers forget them."""
    retains: bool = False
    """It holds retained values (see `_memory`)."""
    history: tuple[str, ...] = ()
    """Its history patterns (see `_memory`)."""
    feeds: frozenset[str] = frozenset()
    """Patterns of `subs` that want best-effort messages only (durables' live views)."""
    services: frozenset[str] = frozenset()
    timer: asyncio.TimerHandle | None = None
    """When its silence runs out next (see `PeerTable`)."""
    armed_at: float = 0.0
    """`last_heard` when `timer` was set."""
    rtt: float | None = None
    """Seconds of the last heartbeat round trip (None until one was measured)."""
    their_beat: float = 0.0
    """The `sent` stamp of its last heartbeat, echoed back in ours."""
    their_beat_at: float = 0.0
    """Our monotonic clock when that heartbeat arrived."""
    seq: int = 0
    """Its alive counter as we last learned it (it raises it to refute news it was lost)."""
    key: str = ""
    """Its CURVE public key (empty for a plain mesh)."""
    hello: Any = None
    """Its latest record as announced (a `_wire.Hello`): what gossip passes on."""
    heard_directly: float = 0.0
    """Our monotonic clock when a message from the member itself last came."""
    watched: bool = False
    """We watch its silence ourselves (a neighbour or a partner); else news decides."""
    answered: bool = False
    """A heartbeat of it came since we began to watch it, or it watches us: it beats us
    without waiting to read ours (until then, see `PeerTable._stretch_for`)."""
    lost_at: float = 0.0
    """When it was taken for lost (it is forgotten `forget_after` later)."""
    digest_key: tuple[int, int, int, int] = (-1, -1, -1, -1)
    """What `digest_part` was hashed from: (incarnation, seq, status, interest version)."""
    digest_part: int = 0
    """Its share of our membership digest (see `_gossip.digest_part`)."""

    def snapshot(self, state: PeerState | None = None) -> Peer:
        """The peer as users see it, in its own state or `state`."""
        last_seen = time.time() - (time.monotonic() - self.last_heard)
        return Peer(self.id, self.name, state or self.state, (self.ctl, self.pub), last_seen,
                    tuple(p.pattern for p in self.subs), self.rtt)


class TableObserver(Protocol):
    """Who hears what the peer table's state machine decides."""

    def peer_event(self, event: PeerEvent) -> None:
        """A peer joined, left or was lost."""

    def peer_state_changed(self, rec: PeerRecord) -> None:
        """A silence timeout changed a watched peer's state (suspect or lost): news
        saying it was lost goes through `PeerTable.declare_lost` and is not told here."""

    def peer_forgotten(self, rec: PeerRecord) -> None:
        """A peer lost for ``forget_after`` seconds was removed from the table."""


class PeerTable:
    """Peers by id, with the liveness state machine; tells its `TableObserver` what
    changed. Use it on the loop."""

    def __init__(self, *, suspect_after: float, lost_after: float, forget_after: float,
                 observer: TableObserver) -> None:
        self.suspect_after = suspect_after
        self.lost_after = lost_after
        self.forget_after = forget_after
        self._observer = observer
        self._slack = suspect_after * _REARM_SLACK
        self._peers: dict[str, PeerRecord] = {}
        self.health = 0
        """Signs of overload lately (0: timeouts as configured; see the module doc)."""
        self._strained_at = 0.0

    def strained(self, why: str) -> None:
        """A sign that this node's host is overloaded: stretch timeouts one step (signs
        that come together, such as many timers late after one stall, are one sign)."""
        now = time.monotonic()
        together = now - self._strained_at < self.suspect_after
        self._strained_at = now
        if self.health < _MAX_HEALTH and not together:
            self.health += 1
            if self.health == 1:
                _log.info("silence timeouts stretched: %s", why)

    def recover(self) -> None:
        """Called now and then: a quiet spell takes one step of stretch away."""
        now = time.monotonic()
        if self.health and now - self._strained_at >= _RECOVER_AFTER * self.lost_after:
            self._strained_at = now
            self.health -= 1
            if self.health == 0:
                _log.info("silence timeouts back to normal")

    @property
    def stretch(self) -> float:
        return 1.0 + self.health

    def _stretch_for(self, rec: PeerRecord) -> float:
        """A member we began to watch gets longer until it first beats us: unless it
        watches us too, it beats us only once our first beat reached it and it read that
        (a member we know only from gossip, over a new connection: a burst of joins opens
        many at once; a seed greeting 100 joiners reads them a second or more late).
        Timed from a hello of its, it would be lost for the time our first beat waits."""
        if not rec.answered:
            return self.stretch * _FIRST_CONTACT
        return self.stretch

    def __len__(self) -> int:
        return len(self._peers)

    def get(self, peer_id: str) -> PeerRecord | None:
        return self._peers.get(peer_id)

    def records(self) -> list[PeerRecord]:
        return list(self._peers.values())

    def snapshot(self) -> list[Peer]:
        return [rec.snapshot() for rec in self._peers.values()]

    def add(self, rec: PeerRecord) -> None:
        """A peer greeted us, or news of a new member came (new, or a new incarnation
        replacing the old)."""
        old = self._peers.get(rec.id)
        self._peers[rec.id] = rec
        rec.last_heard = time.monotonic()
        if old is not None and old is not rec:
            _disarm(old)
            rec.watched = old.watched
        if rec.watched:
            self._arm(rec)
        if old is None or old.state is PeerState.LOST or old.incarnation != rec.incarnation:
            self._emit(PeerEventKind.JOINED, rec)

    def heard(self, rec: PeerRecord) -> None:
        """Any message from the peer, or news that it refuted being lost: it is alive."""
        now = rec.last_heard = time.monotonic()
        if rec.state is not PeerState.ALIVE:
            was = rec.state
            rec.state = PeerState.ALIVE
            self._arm_or_disarm(rec)
            if was is PeerState.LOST:
                self._emit(PeerEventKind.JOINED, rec)
        elif rec.watched and (rec.timer is None or now - rec.armed_at >= self._slack):
            self._arm(rec)

    def watch(self, rec: PeerRecord, *, beats_us: bool = False) -> None:
        """Time its silence ourselves from now on: from when it was last heard itself if
        that was recent (it may have died since), else from now (it had no reason to beat
        us before). `beats_us`: it watches us, so it beats us without reading ours first."""
        if not rec.watched:
            rec.watched, rec.answered = True, beats_us
            now = time.monotonic()
            if rec.state is not PeerState.LOST:
                fresh = now - rec.heard_directly < self.suspect_after
                rec.last_heard = rec.heard_directly if fresh else now
            self._arm(rec)

    def unwatch(self, rec: PeerRecord) -> None:
        """News decides its state from now on (a lost one is still forgotten in time)."""
        if rec.watched:
            rec.watched = False
            if rec.state is PeerState.SUSPECT:
                rec.state = PeerState.ALIVE
            self._arm_or_disarm(rec)

    def declare_lost(self, rec: PeerRecord) -> bool:
        """News says it was lost; False if it already was."""
        if rec.state is PeerState.LOST:
            return False
        rec.state = PeerState.LOST
        rec.lost_at = time.monotonic()
        rec.last_heard = min(rec.last_heard, rec.lost_at - self.lost_after)
        self._arm(rec)
        self._emit(PeerEventKind.LOST, rec)
        return True

    def remove(self, peer_id: str) -> PeerRecord | None:
        """The peer said goodbye."""
        rec = self._peers.pop(peer_id, None)
        if rec is not None:
            _disarm(rec)
            self._emit(PeerEventKind.LEFT, rec)
        return rec

    def stop(self) -> None:
        """No more silence timeouts (the node is closing)."""
        for rec in self._peers.values():
            _disarm(rec)

    def _arm_or_disarm(self, rec: PeerRecord) -> None:
        if rec.watched or rec.state is PeerState.LOST:
            self._arm(rec)
        else:
            _disarm(rec)

    def _arm(self, rec: PeerRecord) -> None:
        """Set the peer's timer for when its silence runs out next."""
        _disarm(rec)
        stretch = self._stretch_for(rec)
        if rec.state is PeerState.LOST:
            delay = max(0.0, rec.lost_at + self.forget_after - time.monotonic())
        else:
            after = (self.suspect_after if rec.state is PeerState.ALIVE
                     else self.lost_after) * stretch
            delay = max(0.0, rec.last_heard + after - time.monotonic())
        rec.armed_at = rec.last_heard
        loop = asyncio.get_running_loop()
        rec.timer = loop.call_later(delay, self._expire, rec, loop.time() + delay)

    def _expire(self, rec: PeerRecord, due: float) -> None:
        """The peer's timer ran out: apply the silence timeouts, set the next one."""
        rec.timer = None
        if self._peers.get(rec.id) is not rec:
            return
        now = time.monotonic()
        late = asyncio.get_running_loop().time() - due
        if late > _STALL and rec.state is not PeerState.LOST:
            # our loop was stalled: the silence it measured is ours as much as the peer's
            # (the stall itself counts as overload where the heartbeat tick notices it)
            rec.last_heard = min(now, rec.last_heard + late)
            self._arm(rec)
            return
        silent = now - rec.last_heard
        changed = False
        if not rec.watched and rec.state is not PeerState.LOST:
            return  # news decides its state
        stretch = self._stretch_for(rec)
        if rec.state is PeerState.ALIVE and silent >= self.suspect_after * stretch:
            rec.state = PeerState.SUSPECT
            changed = True
        if rec.state is PeerState.SUSPECT and silent >= self.lost_after * stretch:
            rec.state = PeerState.LOST
            rec.lost_at = now
            changed = True
            _log.debug("peer %s (%s) lost: silent for %.2f s (timeouts x%.0f)", rec.name,
                       rec.id[:8], silent, stretch)
            self._emit(PeerEventKind.LOST, rec)
        if rec.state is PeerState.LOST and now - rec.lost_at >= self.forget_after:
            del self._peers[rec.id]
            self._observer.peer_forgotten(rec)
            return
        self._arm(rec)
        if changed:
            self._observer.peer_state_changed(rec)

    def _emit(self, kind: PeerEventKind, rec: PeerRecord) -> None:
        """(A peer that left is snapshotted as LEFT, not as it was: its record, which a
        part may still hold, keeps its state, since parts treat any state but LOST as live.)"""
        state = PeerState.LEFT if kind is PeerEventKind.LEFT else None
        self._observer.peer_event(PeerEvent(kind, rec.snapshot(state)))


def _disarm(rec: PeerRecord) -> None:
    if rec.timer is not None:
        rec.timer.cancel()
        rec.timer = None
