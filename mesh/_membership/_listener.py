"""What membership tells the rest of the node, as protocols the parts implement.

Membership knows nothing of pub/sub, work queues or services: it calls every
`PeerListener` it was given with what it learned, hands peer events to an
`EventSink`, asks every `HelloPart` for its fields of our hello, and routes
the control messages it does not handle itself to their owner by type.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

from .. import _wire
from ._peers import PeerEvent, PeerRecord


class PeerListener(Protocol):
    """A part that acts on what membership learns about peers."""

    def peer_connected(self, new: PeerRecord, old: PeerRecord | None) -> None:
        """A peer greeted us for the first time, or came back as a new incarnation or at
        new endpoints (`old` is what we knew before: its connections are stale)."""

    def peer_updated(self, rec: PeerRecord) -> None:
        """A known peer announced new interest (subscriptions, queues, services, durables)."""

    def peer_lost(self, rec: PeerRecord) -> None:
        """A peer went silent: it may come back, so its connections stay open."""

    def peer_gone(self, rec: PeerRecord) -> None:
        """A peer said goodbye, or stayed lost past ``forget_after``: close what leads
        to it."""

    def peers_changed(self) -> None:
        """Some peer's state or interest changed: recompute whatever depends on them."""


class EventSink(Protocol):
    """Where peer events (joined, left, lost) go."""

    def peer_event(self, event: PeerEvent) -> None: ...


class HelloPart(Protocol):
    """A part that announces something in this node's hello."""

    def hello_fields(self, version: int) -> Mapping[str, Any]:
        """Its fields of `_wire.Hello`, by name, announcing what it offers as of the
        interest `version` (pub/sub marks its subscriptions' readiness with it)."""


class PartnerSource(Protocol):
    """A part that exchanges data with some peers: membership watches their silence
    itself (and they ours), so a partner's death is noticed within `lost_after`."""

    def partners(self) -> Iterable[str]:
        """Ids of the peers it holds data connections to now."""


class Ticker(Protocol):
    """A part with something to do once per heartbeat interval."""

    def tick(self) -> None: ...


class ControlSender(Protocol):
    """Sends control messages to known peers (membership does, on its links)."""

    def send_to(self, peer_id: str, msg: _wire.Control) -> bool:
        """False if the peer is unknown or its queue is full."""


ControlRoutes = Mapping[type[_wire.Control], Callable[[Any], None]]
"""Who handles each kind of control message that is not membership's own."""
