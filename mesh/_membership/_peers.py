"""The peer table: who is in the mesh, and whether they are alive.

Liveness is ours, by heartbeat: mDNS records outlive crashed peers by up to
75 minutes. Any control message from a peer counts as a sign of life. A peer
silent for `suspect_after` seconds is *suspect* (no event); silent for
`lost_after` it is *lost* (event). A lost peer stays in the table and its
connections stay open, so when its heartbeats resume it *joins* again by
itself, until it has been lost for `forget_after`: then it is forgotten
(removed, its connections closed) and, should it return, joins as new. A
peer that says goodbye is *left* and removed at once.

Each peer has one timer on the loop, set for the moment its silence runs out
and moved on when it is heard: the loop wakes for a peer only if it really
went quiet, never to find that everyone is still talking. (A single timer at
the earliest deadline woke up to twice per heartbeat interval for nothing,
since by then that peer had been heard again.)
"""

from __future__ import annotations

import asyncio
import enum
import time
from dataclasses import dataclass, field
from typing import Final, Protocol

from patterns import TopicPattern

_REARM_SLACK: Final[float] = 0.1
"""Fraction of `suspect_after` a peer's timer may run early rather than be moved at
each of a burst of messages (it then finds the peer heard and moves on)."""


class PeerState(enum.Enum):
    """How recently a peer was heard from."""

    ALIVE = "alive"
    SUSPECT = "suspect"
    LOST = "lost"


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

    def snapshot(self) -> Peer:
        last_seen = time.time() - (time.monotonic() - self.last_heard)
        return Peer(self.id, self.name, self.state, (self.ctl, self.pub), last_seen,
                    tuple(p.pattern for p in self.subs), self.rtt)


class TableObserver(Protocol):
    """Who hears what the peer table's state machine decides."""

    def peer_event(self, event: PeerEvent) -> None:
        """A peer joined, left or was lost."""

    def peer_state_changed(self, rec: PeerRecord) -> None:
        """A silence timeout changed a peer's state (suspect or lost)."""

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

    def __len__(self) -> int:
        return len(self._peers)

    def get(self, peer_id: str) -> PeerRecord | None:
        return self._peers.get(peer_id)

    def records(self) -> list[PeerRecord]:
        return list(self._peers.values())

    def snapshot(self) -> list[Peer]:
        return [rec.snapshot() for rec in self._peers.values()]

    def add(self, rec: PeerRecord) -> None:
        """A peer greeted us (new, or a new incarnation replacing the old)."""
        old = self._peers.get(rec.id)
        self._peers[rec.id] = rec
        rec.last_heard = time.monotonic()
        if old is not None and old is not rec:
            _disarm(old)
        self._arm(rec)
        if old is None or old.state is PeerState.LOST or old.incarnation != rec.incarnation:
            self._emit(PeerEventKind.JOINED, rec)

    def heard(self, rec: PeerRecord) -> None:
        """Any message from the peer: it is alive."""
        now = rec.last_heard = time.monotonic()
        if rec.state is not PeerState.ALIVE:
            was = rec.state
            rec.state = PeerState.ALIVE
            self._arm(rec)
            if was is PeerState.LOST:
                self._emit(PeerEventKind.JOINED, rec)
        elif rec.timer is None or now - rec.armed_at >= self._slack:
            self._arm(rec)

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

    def _arm(self, rec: PeerRecord) -> None:
        """Set the peer's timer for when its silence runs out next."""
        _disarm(rec)
        after = (self.suspect_after if rec.state is PeerState.ALIVE else
                 self.lost_after if rec.state is PeerState.SUSPECT else
                 self.lost_after + self.forget_after)
        delay = rec.last_heard + after - time.monotonic()
        rec.armed_at = rec.last_heard
        rec.timer = asyncio.get_running_loop().call_later(max(0.0, delay), self._expire, rec)

    def _expire(self, rec: PeerRecord) -> None:
        """The peer's timer ran out: apply the silence timeouts, set the next one."""
        rec.timer = None
        if self._peers.get(rec.id) is not rec:
            return
        silent = time.monotonic() - rec.last_heard
        changed = False
        if rec.state is PeerState.ALIVE and silent >= self.suspect_after:
            rec.state = PeerState.SUSPECT
            changed = True
        if rec.state is PeerState.SUSPECT and silent >= self.lost_after:
            rec.state = PeerState.LOST
            changed = True
            self._emit(PeerEventKind.LOST, rec)
        if rec.state is PeerState.LOST and silent >= self.lost_after + self.forget_after:
            del self._peers[rec.id]
            self._observer.peer_forgotten(rec)
            return
        self._arm(rec)
        if changed:
            self._observer.peer_state_changed(rec)

    def _emit(self, kind: PeerEventKind, rec: PeerRecord) -> None:
        self._observer.peer_event(PeerEvent(kind, rec.snapshot()))


def _disarm(rec: PeerRecord) -> None:
    if rec.timer is not None:
        rec.timer.cancel()
        rec.timer = None
