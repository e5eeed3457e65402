"""Retained values across the mesh: answering peers' queries, gathering theirs.

Every node answers the internal service ``_zeromesh.retained`` from its
`RetainedStore`, a page at a time, once the asking subscription is in force at
its publisher (see `_recall`). The subscriber asks every live peer that
announces retained values, keeps for each topic the newest value (by
timestamp, then publisher id), and gets them before its live messages; each
value covers its publisher's older messages on its topic, so none of those
is delivered twice.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from typing import Final

from patterns import TopicPattern

from .. import _names, _ttl
from .._membership._peers import PeerRecord
from .._message import Message
from .._pubsub._subscription import Subscription
from ..errors import ProtocolError
from . import _queries
from ._recall import ASK_TIMEOUT, Covered, Gathered, Recall, message_of
from ._retained import RetainedStore

_CONCURRENCY: Final[int] = 16


class RetainedValues:
    """This node's part in retained values: serving its own, gathering everyone's."""

    def __init__(self, store: RetainedStore, recall: Recall) -> None:
        self.store = store
        self._recall = recall

    def start(self) -> None:
        self._recall.serve(_queries.RETAINED_SERVICE, self._answer, _CONCURRENCY)

    async def _answer(self, request: Message) -> bytes:
        query = _queries.decode(request.data, _queries.RetainedQuery)
        pattern = _names.pattern(query.pattern)
        if query.after == "":
            await self._recall.in_force(request, query.version, pattern)
        items, after = self.store.page(pattern, query.after, self._recall.budget)
        return _queries.encode(_queries.RetainedPage(self._recall.name, items, after))

    def fill(self, sub: Subscription, version: int) -> None:
        """Give `sub` the mesh's retained values first, then its live messages."""
        self._recall.fill(sub, self._gathered(sub.pattern, version))

    async def _gathered(self, pattern: TopicPattern, version: int) -> Gathered:
        values, covered = await self.gather(pattern, version)
        return values, covered, {}

    async def gather(self, pattern: TopicPattern, version: int = 0,
                     timeout: float = ASK_TIMEOUT) -> tuple[list[Message], Covered]:
        """The newest retained value of every matching topic across the mesh (this node
        included), in topic order; and what each publisher's values cover."""
        asked = await self._recall.peers_to_ask(lambda rec: rec.retains)
        recall = self._recall
        mine = [message_of(item, recall.name, recall.node_id)
                for item in self.store.matching(pattern)]
        answers = await asyncio.gather(*(self._ask(rec, pattern, version, timeout)
                                         for rec in asked))
        return _merge([mine, *answers])

    async def _ask(self, rec: PeerRecord, pattern: TopicPattern, version: int,
                   timeout: float) -> list[Message]:
        """All of one peer's matching values, page by page (none if it cannot answer)."""
        out: list[Message] = []
        after = ""
        while True:
            query = _queries.encode(_queries.RetainedQuery(pattern.pattern, version, after))
            data = await self._recall.ask(rec, _queries.RETAINED_SERVICE, query,
                                          timeout=timeout)
            try:
                page = None if data is None else _queries.decode(data, _queries.RetainedPage)
            except ProtocolError as exc:
                self._recall.warn_once("retained", rec.id, "bad retained values from %r: %s",
                                       rec.name, exc)
                page = None
            if page is None:
                return out
            now = time.time()  # (a value whose ttl passed on its way is not one any more)
            out.extend(message_of(item, page.name[:64], rec.id) for item in page.items
                       if item.topic and pattern.matches(item.topic)
                       and not _ttl.has_expired(item, now))
            if not page.next or page.next <= after:
                return out
            after = page.next


def _merge(groups: Iterable[list[Message]]) -> tuple[list[Message], Covered]:
    """Per topic the newest value (timestamp, then publisher id); every value covers its
    publisher's older messages on its topic."""
    newest: dict[str, Message] = {}
    covered: Covered = {}
    for msgs in groups:
        for msg in msgs:
            covered[(msg.source_id, msg.topic)] = msg.seq
            best = newest.get(msg.topic)
            if best is None or (msg.timestamp, msg.source_id) > (best.timestamp, best.source_id):
                newest[msg.topic] = msg
    return [newest[topic] for topic in sorted(newest)], covered
