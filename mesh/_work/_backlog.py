"""A pusher's backlogs: per queue, the messages waiting for a worker, and their expiry.

A queue's backlog holds reliable pushes, messages for durables, and what
departed workers gave back, in hand-out order, for as long as no worker has
credit (`_queues`). A message with a ttl is never handed out once expired:
`Backlogs` knows, per queue, the soonest expiry among what it holds, so a
hand-out costs one look-up (and a clock read only for queues that hold
messages with a ttl), and a backlog is walked only once something in it is
due. Walking drops the expired ones: reliable ones leave the spool counted as
expired (`Outbox.expired`), best-effort ones are counted as expired. Heartbeat
ticks sweep the due backlogs, so an expired message leaves the spool even
while no worker ever comes.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator, Sequence

from .. import _ttl
from .._reliable._outbox import Outbox, Tracked
from .._support._tally import Stats
from ._target import Sent


class Backlogs:
    """Every queue's backlog on the pushing side, and when each next has something to expire."""

    __slots__ = ("_outbox", "_queues", "_soonest", "_stats")

    def __init__(self, outbox: Outbox | None, stats: Stats) -> None:
        self._outbox = outbox
        self._stats = stats
        self._queues: dict[str, deque[Sent]] = {}
        self._soonest: dict[str, float] = {}
        """Queue -> nothing in its backlog expires before this (wall clock). Only queues
        that took a message with a ttl since their last sweep are here."""

    def get(self, queue: str) -> deque[Sent] | None:
        """`queue`'s backlog as it is (expired messages possibly still in it)."""
        return self._queues.get(queue)

    def ready(self, queue: str) -> deque[Sent] | None:
        """`queue`'s backlog for a hand-out: nothing expired in it."""
        backlog = self._queues.get(queue)
        soonest = self._soonest.get(queue)
        if backlog and soonest is not None and soonest <= time.time():
            self._sweep(queue, backlog)
        return backlog

    def pop(self, queue: str) -> deque[Sent]:
        """Take `queue`'s whole backlog away (a forgotten durable's)."""
        self._soonest.pop(queue, None)
        return self._queues.pop(queue, None) or deque()

    def waiting(self) -> Iterator[str]:
        """The queues with messages waiting."""
        return (queue for queue, backlog in self._queues.items() if backlog)

    def stranded(self) -> int:
        """Best-effort messages waiting (lost if the node closes now)."""
        return sum(1 for b in self._queues.values() for _, tracked in b if tracked is None)

    def add(self, queue: str, sent: Sent, *, front: bool = False) -> None:
        expires = sent[0].expires
        if expires is not None:
            self._note(queue, expires)
        backlog = self._queues.setdefault(queue, deque())
        if front:
            backlog.appendleft(sent)
        else:
            backlog.append(sent)

    def extend(self, queue: str, sents: Sequence[Sent], *, front: bool = False) -> None:
        """Several at the back, in order; or at the front, `sents` given oldest last."""
        soonest = min((item.expires for item, _ in sents if item.expires is not None),
                      default=None)
        if soonest is not None:
            self._note(queue, soonest)
        backlog = self._queues.setdefault(queue, deque())
        if front:
            backlog.extendleft(sents)
        else:
            backlog.extend(sents)

    def sweep_due(self) -> None:
        """Drop what has expired from every backlog where something may have (ticks)."""
        if not self._soonest:
            return
        now = time.time()
        for queue, soonest in list(self._soonest.items()):
            if soonest <= now:
                self._sweep(queue, self._queues.get(queue) or deque())

    def _note(self, queue: str, expires: float) -> None:
        known = self._soonest.get(queue)
        if known is None or expires < known:
            self._soonest[queue] = expires

    def _sweep(self, queue: str, backlog: deque[Sent]) -> None:
        """Drop the expired messages from `backlog` (in place, order kept)."""
        now = time.time()
        keep: list[Sent] = []
        expired: list[Tracked] = []
        best_effort = 0
        soonest: float | None = None
        for sent in backlog:
            expires = sent[0].expires
            if expires is None:
                keep.append(sent)
            elif expires <= now:
                if sent[1] is not None:
                    expired.append(sent[1])
                else:
                    best_effort += 1
            else:
                keep.append(sent)
                soonest = expires if soonest is None else min(soonest, expires)
        if soonest is None:
            self._soonest.pop(queue, None)
        else:
            self._soonest[queue] = soonest
        if not expired and not best_effort:
            return
        backlog.clear()
        backlog.extend(keep)
        if best_effort:
            self._stats[_ttl.EXPIRED] += best_effort
            self._stats.queues[_ttl.EXPIRED].add(queue, best_effort)
        if expired and self._outbox is not None:
            self._outbox.expired(expired, queue)
