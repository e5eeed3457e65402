"""Connections by interest: what this node publishes on, which publishers to hear, and
new topics held for their subscribers.

A node announces the topics it publishes on in its hello (`pubs`); a
subscriber connects its SUB to a publisher's PUB only where those meet its
subscriptions (`wants`), so a node's connections follow what it needs rather
than the size of the mesh.

The announcement is bounded (`_wire.MAX_PUBS` entries): past that, the
topics sharing a first segment are replaced by ``seg.>``, and as a last
resort everything by ``>`` (`generalise`). A topic an entry already covers
announces nothing new; the publish path only asks `Offers.known`, a set.

A subscriber connects to a publisher only once it learns that the publisher
publishes a topic it wants, so the first messages on a new topic would be
lost to it. `Holds` keeps them, in order, while a live peer that subscribes
to the topic is not ready at our publisher (its readiness marker has not
arrived), for at most `HOLD_TIME` and `_HOLD_COUNT` messages / `_HOLD_BYTES`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Final

from patterns import Subscriber, TopicPattern

from .._membership._peers import PeerRecord, PeerTable
from .._wire import MAX_PUBS, Item

_KNOWN_MAX: Final[int] = 10_000
"""Topics remembered as covered (a cache: past this it starts over)."""
ALL: Final[str] = ">"
HOLD_TIME: Final[float] = 1.0
"""Longest a new topic's messages wait for its subscribers to be ready."""
_HOLD_COUNT: Final[int] = 10_000
_HOLD_BYTES: Final[int] = 16 * 1024 * 1024
"""...and most messages (payload bytes) one topic holds meanwhile: past either, they go."""


class Offers:
    """The topics this node publishes on, as its hello announces them."""

    def __init__(self) -> None:
        self.known: set[str] = set()
        """Topics known to be covered: publishing on one of them announces nothing."""
        self._entries: set[str] = set()
        self.announced: list[str] = []
        """What the hello carries (sorted)."""
        self.patterns: tuple[TopicPattern, ...] = ()
        """`announced`, parsed."""

    def add(self, topic: str) -> bool:
        """Cover `topic` (valid); True if that changed the announcement."""
        known = self.known
        if len(known) >= _KNOWN_MAX:
            known.clear()
        known.add(topic)
        if any(p.matches(topic) for p in self.patterns):
            return False
        entries = self._entries
        entries.add(topic)
        if len(entries) > MAX_PUBS:
            entries = self._entries = generalise(entries, MAX_PUBS)
        self.announced = sorted(entries)
        self.patterns = tuple(TopicPattern(e) for e in self.announced)
        return True

    def meets(self, pattern: TopicPattern) -> bool:
        """Does anything we announce meet `pattern` (a subscription)?"""
        return any(pattern.overlaps(p) for p in self.patterns)


def generalise(entries: Iterable[str], bound: int) -> set[str]:
    """At most `bound` topics or patterns covering every one of `entries`.

    Repeatedly replaces the entries sharing a first segment by ``seg.>`` (the
    group that saves most first), keeping a bare ``seg`` (which ``seg.>`` does
    not match); when no group saves anything, ``>``.
    """
    out = set(entries)
    while len(out) > bound:
        if ALL in out:
            return {ALL}
        groups: dict[str, list[str]] = {}
        for entry in out:
            groups.setdefault(entry.split(".", 1)[0], []).append(entry)
        saved, seg = max(((len(group) - 1 - (first in group), first)
                          for first, group in groups.items() if first != "*"),
                         default=(0, ""))
        if saved <= 0:
            return {ALL}
        bare = seg in out
        out.difference_update(groups[seg])
        out.add(f"{seg}.>")
        if bare:
            out.add(seg)
    return out


def wants(mine: Iterable[TopicPattern], theirs: Sequence[TopicPattern]) -> bool:
    """Does some subscription of ours meet something a publisher announces?"""
    return any(a.overlaps(b) for a in mine for b in theirs)


class Links:
    """Which publishers our SUB is connected to: those whose announced topics meet our
    subscriptions (`mine`). A link no longer wanted, or to a peer that is gone, is
    closed only after `delay`: libzmq discards what is queued from a disconnected
    endpoint, and a peer's last batches may still be on their way."""

    def __init__(self, subscriber: Subscriber, peers: PeerTable, delay: float) -> None:
        self._subscriber = subscriber
        self._peers = peers
        self._delay = delay
        self._disconnects: dict[str, asyncio.TimerHandle] = {}
        self.mine: tuple[TopicPattern, ...] = ()
        """Our subscriptions' distinct patterns."""

    @property
    def connected(self) -> frozenset[str]:
        """The publisher endpoints our SUB is connected to (closing ones included)."""
        return self._subscriber.connected

    def close(self) -> None:
        for handle in self._disconnects.values():
            handle.cancel()
        self._disconnects.clear()

    def peer_connected(self, new: PeerRecord, old: PeerRecord | None) -> None:
        if old is not None and old.pub != new.pub:
            self._cancel(old.pub)
            self._subscriber.disconnect(old.pub)
        self.update(new)

    def update(self, rec: PeerRecord) -> None:
        """Connect to `rec`'s publisher if we want it, or let go of it if we no longer do."""
        if self._subscriber.closed:
            return
        if wants(self.mine, rec.pubs):
            self._cancel(rec.pub)
            self._subscriber.connect(rec.pub)
        elif rec.pub in self._subscriber.connected:
            self._later(rec.pub)

    def added(self, pattern: TopicPattern) -> None:
        """We subscribed to `pattern`: connect to the publishers it meets."""
        connected = self._subscriber.connected
        for rec in self._peers.records():
            if ((rec.pub in self._disconnects or rec.pub not in connected)
                    and any(pattern.overlaps(p) for p in rec.pubs)):
                self.update(rec)

    def removed(self, pattern: TopicPattern) -> None:
        """We unsubscribed from `pattern`: let go of the publishers only it wanted."""
        connected = self._subscriber.connected
        for rec in self._peers.records():
            if rec.pub in connected and any(pattern.overlaps(p) for p in rec.pubs):
                self.update(rec)

    def gone(self, rec: PeerRecord) -> None:
        """The peer left or was forgotten."""
        if rec.pub in self._subscriber.connected:
            self._later(rec.pub)

    def cut(self, rec: PeerRecord) -> None:
        """The peer's key was revoked: disconnect now (what it still sent is discarded)."""
        self._cancel(rec.pub)
        self._subscriber.disconnect(rec.pub)

    def _later(self, endpoint: str) -> None:
        if endpoint not in self._disconnects:
            self._disconnects[endpoint] = asyncio.get_running_loop().call_later(
                self._delay, self._disconnect, endpoint)

    def _cancel(self, endpoint: str) -> None:
        pending = self._disconnects.pop(endpoint, None)
        if pending is not None:
            pending.cancel()

    def _disconnect(self, endpoint: str) -> None:
        self._disconnects.pop(endpoint, None)
        if not self._subscriber.closed:
            self._subscriber.disconnect(endpoint)


@dataclass(slots=True)
class _Held:
    timer: asyncio.TimerHandle
    items: list[Item] = field(default_factory=list)
    size: int = 0


class Holds:
    """New topics' messages, held while their subscribers are not ready (module doc).

    `unready(topic)`: is a live peer that subscribes to it not ready yet?
    `send(topic, items)`: send what a hold kept.
    """

    def __init__(self, unready: Callable[[str], bool],
                 send: Callable[[str, list[Item]], None]) -> None:
        self._unready = unready
        self._send = send
        self.topics: dict[str, _Held] = {}
        """The topics held now."""

    def hold(self, topic: str) -> None:
        """`topic` was just announced: hold it if a subscriber of it is not ready."""
        if topic not in self.topics and self._unready(topic):
            timer = asyncio.get_running_loop().call_later(HOLD_TIME, self.release, topic)
            self.topics[topic] = _Held(timer)

    def take(self, outgoing: dict[str, list[Item]]) -> tuple[int, int]:
        """Take the held topics' messages out of `outgoing` (a flush); returns how many
        messages and payload bytes it took. A hold past its bounds goes at once."""
        count = size = 0
        full = []
        for topic, held in self.topics.items():
            items = outgoing.pop(topic, None)
            if items:
                n = sum(len(i.payload) for i in items)
                held.items += items
                held.size += n
                count += len(items)
                size += n
                if len(held.items) >= _HOLD_COUNT or held.size >= _HOLD_BYTES:
                    full.append(topic)
        for topic in full:
            self.release(topic)
        return count, size

    def check(self) -> None:
        """Peers or readiness changed: release the topics no one waits for any more."""
        for topic in [t for t in self.topics if not self._unready(t)]:
            self.release(topic)

    def release_all(self) -> None:
        for topic in list(self.topics):
            self.release(topic)

    def release(self, topic: str) -> None:
        held = self.topics.pop(topic, None)
        if held is not None:
            held.timer.cancel()
            if held.items:
                self._send(topic, held.items)
