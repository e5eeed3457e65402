"""Members this node cannot dial: known, passed on, never connected.

In a mixed IPv4/IPv6 mesh an IPv4-only node hears, through a dual-stack member,
of IPv6-only ones. It cannot reach them, but it keeps their records all the
same: its view (and so its digest) then matches its neighbours', which
otherwise would differ forever and set off an exchange of whole views every few
seconds; and news of them still passes through it to members that can reach
them. Only what the digest covers is kept (the record, alive or lost, its
interest version); a lost one is forgotten `forget_after` later, as in the peer
table.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from patterns import InvalidName, TopicPattern

from .. import _wire
from . import _gossip


@dataclass
class _Entry:
    hello: _wire.Hello
    seq: int
    lost_at: float | None = None
    part: int = 0
    """Its share of the digest, hashed when it changes (the digest is taken per heartbeat)."""

    def rehash(self) -> None:
        status = _gossip.ALIVE if self.lost_at is None else _gossip.LOST
        self.part = _gossip.digest_part(self.hello.id, self.hello.incarnation, self.seq,
                                        status, self.hello.subs_version)


class ForeignMembers:
    """The records of members with no address family in common with this node."""

    def __init__(self, limit: int, forget_after: float) -> None:
        self._limit = limit
        self._forget_after = forget_after
        self._entries: dict[str, _Entry] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, member_id: object) -> bool:
        return member_id in self._entries

    def learn(self, hello: _wire.Hello) -> bool:
        """Keep a record passed on to us; True if it told us something new."""
        old = self._entries.get(hello.id)
        if old is None:
            if len(self._entries) >= self._limit:
                return False
        elif hello.incarnation == old.hello.incarnation:
            if old.lost_at is not None:
                if hello.seq <= old.seq:  # only its own refutation brings it back
                    return False
            elif (hello.seq, hello.subs_version) <= (old.seq, old.hello.subs_version):
                return False
        elif hello.incarnation < old.hello.incarnation:
            return False
        entry = self._entries[hello.id] = _Entry(hello, hello.seq)
        entry.rehash()
        return True

    def forget(self, member_id: str) -> None:
        """It can be dialled now (it announced an address we can reach)."""
        self._entries.pop(member_id, None)

    def down(self, news: _wire.Down) -> bool:
        """News that it was lost or left; True if it told us something new."""
        entry = self._entries.get(news.id)
        if entry is None or news.incarnation != entry.hello.incarnation:
            return False
        if news.left:
            del self._entries[news.id]
            return True
        if entry.lost_at is not None or news.seq < entry.seq:
            return False
        entry.seq, entry.lost_at = news.seq, time.monotonic()
        entry.rehash()
        return True

    def change(self, news: _wire.Change) -> bool:
        """A change of its interest that follows the version we hold; True if applied."""
        entry = self._entries.get(news.id)
        if (entry is None or news.incarnation != entry.hello.incarnation
                or news.base != entry.hello.subs_version):
            return False
        entry.hello = _gossip.apply_change(entry.hello, news)
        entry.rehash()
        return True

    def expire(self) -> None:
        """Forget the ones lost `forget_after` ago."""
        gone = time.monotonic() - self._forget_after
        for member_id in [m for m, e in self._entries.items()
                          if e.lost_at is not None and e.lost_at < gone]:
            del self._entries[member_id]

    def digest(self) -> int:
        """Their share of our view's digest (as if they were in the peer table)."""
        out = 0
        for entry in self._entries.values():
            out ^= entry.part
        return out

    def view(self) -> list[_wire.News]:
        """Their records as news, and the lost ones' ends."""
        news: list[_wire.News] = []
        for entry in self._entries.values():
            news.append(entry.hello)
            if entry.lost_at is not None:
                news.append(_wire.Down(entry.hello.id, entry.hello.incarnation, entry.seq))
        return news

    def subscribers(self, topic: str) -> int:
        """How many of them, alive, subscribe to `topic` (to say why a wait for subscribers
        falls short: they cannot be reached from here)."""
        return sum(1 for e in self._entries.values() if e.lost_at is None
                   and any(_matches(p, topic) for p in e.hello.subs))


def _matches(pattern: str, topic: str) -> bool:
    """Does a member's announced `pattern` match `topic` (an invalid one, as passed on
    unchecked by gossip, matches nothing)? Parsed per call: this runs only when a wait
    for subscribers falls short."""
    try:
        return TopicPattern(pattern).matches(topic)
    except InvalidName:
        return False
