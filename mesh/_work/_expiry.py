"""Expiry in a pusher's backlogs: what waits for a worker past its ttl is never handed out.

A queue's backlog (reliable pushes, messages for durables, what departed
workers gave back) may wait long for a worker. `BacklogExpiry` knows, per
queue, the earliest expiry among what went into the backlog, so a hand-out
costs one look-up and a clock read only for queues holding messages with a
ttl, and the backlog is walked only once something in it is due. A sweep
drops the expired messages: reliable ones leave the spool, counted as expired
(`Outbox.expired`); best-effort ones are counted as expired too. Heartbeat
ticks sweep the due backlogs, so an expired message leaves the spool even
while no worker ever comes.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Iterable, Mapping

from .. import _ttl
from .._reliable._outbox import Outbox, Tracked
from ._target import Sent


class BacklogExpiry:
    """The soonest expiry per queue's backlog, and sweeping a backlog when it is due."""

    __slots__ = ("_outbox", "_soonest", "_stats")

    def __init__(self, outbox: Outbox | None, stats: Counter[str]) -> None:
        self._outbox = outbox
        self._stats = stats
        self._soonest: dict[str, float] = {}
        """Queue -> no message in its backlog expires before this (wall clock). Only
        queues that ever held a message with a ttl are here."""

    def note(self, queue: str, sents: Iterable[Sent]) -> None:
        """These messages went into `queue`'s backlog."""
        soonest = min((item.expires for item, _ in sents if item.expires is not None),
                      default=None)
        if soonest is not None:
            known = self._soonest.get(queue)
            if known is None or soonest < known:
                self._soonest[queue] = soonest

    def note_one(self, queue: str, sent: Sent) -> None:
        expires = sent[0].expires
        if expires is not None:
            known = self._soonest.get(queue)
            if known is None or expires < known:
                self._soonest[queue] = expires

    def check(self, queue: str, backlog: deque[Sent]) -> None:
        """Before a hand-out: drop what has expired, if anything may have."""
        soonest = self._soonest.get(queue)
        if soonest is not None and soonest <= time.time():
            self.sweep(queue, backlog)

    def sweep_due(self, backlogs: Mapping[str, deque[Sent]]) -> None:
        """Sweep every backlog holding something that has expired (heartbeat ticks)."""
        if not self._soonest:
            return
        now = time.time()
        for queue, soonest in list(self._soonest.items()):
            if soonest <= now:
                self.sweep(queue, backlogs.get(queue) or deque())

    def sweep(self, queue: str, backlog: deque[Sent]) -> None:
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
        if expired and self._outbox is not None:
            self._outbox.expired(expired, queue)
