"""History across the mesh: answering peers' history queries, replaying theirs.

Every node answers the internal service ``_zeromesh.history`` from its
`History`, a page at a time, once the asking subscription is in force at its
publisher (see `_recall`). A subscription with ``since=`` or ``last=`` asks
every live peer that keeps history and merges the answers in timestamp order
(each publisher's own messages staying in the order it published them), then
goes live; what history covered — each publisher's messages on its history
topics up to the sequence its answer went to — is not delivered twice.
"""

from __future__ import annotations

import asyncio
import heapq
import time
from collections.abc import Sequence
from typing import Final

from patterns import TopicPattern

from .. import _names, _ttl
from .._membership._peers import PeerRecord
from .._message import Message
from .._pubsub._subscription import Subscription
from ..errors import ConfigError, ProtocolError
from . import _queries
from ._history import History
from ._recall import Gathered, Recall, Replayed, message_of

_CONCURRENCY: Final[int] = 8

Cover = tuple[tuple[TopicPattern, ...], int]


class HistoryReplay:
    """This node's part in history: serving its own, replaying everyone's."""

    def __init__(self, history: History, recall: Recall) -> None:
        self.history = history
        self._recall = recall

    def start(self) -> None:
        self._recall.serve(_queries.HISTORY_SERVICE, self._answer, _CONCURRENCY)

    async def _answer(self, request: Message) -> bytes:
        query = _queries.decode(request.data, _queries.HistoryQuery)
        pattern = _names.pattern(query.pattern)
        if query.after == 0:
            await self._recall.in_force(request, query.version, pattern)
        upto = query.upto or self.history.newest_seq
        items, after = self.history.page(pattern, since=query.since, last=query.last,
                                         after=query.after, upto=upto,
                                         budget=self._recall.budget)
        return _queries.encode(_queries.HistoryPage(
            self._recall.name, items, after, upto, [p.pattern for p in self.history.patterns]))

    def fill(self, sub: Subscription, version: int, *, since: float, last: int) -> None:
        """Give `sub` the mesh's matching history first, then its live messages."""
        self._recall.fill(sub, self._gathered(sub.pattern, version, since, last))

    async def _gathered(self, pattern: TopicPattern, version: int, since: float,
                        last: int) -> Gathered:
        replay, replayed = await self.gather(pattern, version, since=since, last=last)
        return replay, {}, replayed

    async def gather(self, pattern: TopicPattern, version: int, *, since: float,
                     last: int) -> tuple[list[Message], Replayed]:
        """The matching history of every live publisher (this node included), merged."""
        asked = await self._recall.peers_to_ask(lambda rec: bool(rec.history))
        recall = self._recall
        upto = self.history.newest_seq
        mine, _ = self.history.page(pattern, since=since, last=last, after=0, upto=upto,
                                    budget=1 << 62)
        replayed: Replayed = {}
        if self.history.patterns:
            replayed[recall.node_id] = (self.history.patterns, upto)
        streams = [[message_of(item, recall.name, recall.node_id) for item in mine]]
        answers = await asyncio.gather(*(self._ask(rec, pattern, version, since, last)
                                         for rec in asked))
        for rec, (msgs, cover) in zip(asked, answers, strict=True):
            streams.append(msgs)
            if cover is not None:
                replayed[rec.id] = cover
        merged = list(heapq.merge(*streams, key=lambda m: m.timestamp))
        return (_newest(merged, last) if last > 0 else merged), replayed

    async def _ask(self, rec: PeerRecord, pattern: TopicPattern, version: int, since: float,
                   last: int) -> tuple[list[Message], Cover | None]:
        """All of one peer's matching history, and what it covers (None if it could not
        answer: then nothing of its live stream is dropped)."""
        msgs: list[Message] = []
        after, upto = 0, 0
        patterns: tuple[TopicPattern, ...] = ()
        while True:
            query = _queries.HistoryQuery(pattern.pattern, since, last, version, after, upto)
            data = await self._recall.ask(rec, _queries.HISTORY_SERVICE,
                                          _queries.encode(query))
            if data is None:
                return msgs, None
            try:
                page = _queries.decode(data, _queries.HistoryPage)
                patterns = patterns or tuple(_names.pattern(p) for p in page.patterns[:1000])
            except (ProtocolError, ConfigError) as exc:
                self._recall.bad_answer("history", rec, exc)
                return msgs, None
            upto = page.upto
            now = time.time()  # (what expired on its way is not replayed)
            msgs.extend(message_of(item, page.name[:64], rec.id) for item in page.items
                        if item.topic and pattern.matches(item.topic)
                        and not _ttl.has_expired(item, now))
            if not page.next or page.next <= after:
                return msgs, (patterns, upto)
            after = page.next


def _newest(merged: Sequence[Message], last: int) -> list[Message]:
    """Of each topic only the newest `last`, keeping the merged order."""
    counts: dict[str, int] = {}
    keep: list[Message] = []
    for msg in reversed(merged):
        n = counts.get(msg.topic, 0)
        if n < last:
            counts[msg.topic] = n + 1
            keep.append(msg)
    keep.reverse()
    return keep
