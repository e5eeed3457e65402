"""The peer table: who is in the mesh, and whether they are alive.

Liveness is ours, by heartbeat: mDNS records outlive crashed peers by up to
75 minutes. Any control message from a peer counts as a sign of life. A peer
silent for `suspect_after` seconds is *suspect* (no event); silent for
`lost_after` it is *lost* (event). A lost peer stays in the table and its
connections stay open, so when its heartbeats resume it *joins* again by
itself. A peer that says goodbye is *left* and removed at once.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from patterns import TopicPattern


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
    pull: str = ""
    queues: dict[str, int] = field(default_factory=dict)
    """Queue name -> credit window this peer grants each pusher."""
    rtr: str = ""
    durables: dict[str, str] = field(default_factory=dict)
    feeds: frozenset[str] = frozenset()
    """Patterns of `subs` that want best-effort messages only (durables' live views)."""
    services: frozenset[str] = frozenset()

    def snapshot(self) -> Peer:
        last_seen = time.time() - (time.monotonic() - self.last_heard)
        return Peer(self.id, self.name, self.state, (self.ctl, self.pub), last_seen,
                    tuple(p.pattern for p in self.subs))


class PeerTable:
    """Peers by id, with the liveness state machine; emits events through `on_event`."""

    def __init__(self, *, suspect_after: float, lost_after: float,
                 on_event: Callable[[PeerEvent], None]) -> None:
        self.suspect_after = suspect_after
        self.lost_after = lost_after
        self._on_event = on_event
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
        if old is None or old.state is PeerState.LOST or old.incarnation != rec.incarnation:
            self._emit(PeerEventKind.JOINED, rec)

    def heard(self, rec: PeerRecord) -> None:
        """Any message from the peer: it is alive."""
        rec.last_heard = time.monotonic()
        if rec.state is not PeerState.ALIVE:
            was = rec.state
            rec.state = PeerState.ALIVE
            if was is PeerState.LOST:
                self._emit(PeerEventKind.JOINED, rec)

    def remove(self, peer_id: str) -> PeerRecord | None:
        """The peer said goodbye."""
        rec = self._peers.pop(peer_id, None)
        if rec is not None:
            self._emit(PeerEventKind.LEFT, rec)
        return rec

    def tick(self) -> bool:
        """Apply silence timeouts; True if any state changed."""
        now = time.monotonic()
        changed = False
        for rec in self._peers.values():
            silent = now - rec.last_heard
            if rec.state is PeerState.ALIVE and silent >= self.suspect_after:
                rec.state = PeerState.SUSPECT
                changed = True
            if rec.state is PeerState.SUSPECT and silent >= self.lost_after:
                rec.state = PeerState.LOST
                changed = True
                self._emit(PeerEventKind.LOST, rec)
        return changed

    def next_deadline(self) -> float | None:
        """Monotonic time of the next possible state change, if any peer can change."""
        deadlines = [rec.last_heard + (self.suspect_after if rec.state is PeerState.ALIVE
                                       else self.lost_after)
                     for rec in self._peers.values() if rec.state is not PeerState.LOST]
        return min(deadlines, default=None)

    def _emit(self, kind: PeerEventKind, rec: PeerRecord) -> None:
        self._on_event(PeerEvent(kind, rec.snapshot()))
