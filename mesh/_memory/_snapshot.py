"""Retained values across the mesh: answering peers' queries, gathering theirs.

Every node answers the internal service ``_zeromesh.retained`` from its
`RetainedStore`, a page at a time, once the asking subscription is in force at
its publisher (see `_recall`). The subscriber asks every live peer that
announces retained values, keeps for each topic the newest value (by
timestamp, then publisher id), and gets them before its live messages; each
value covers its publisher's older messages on its topic, so none of those
is delivered twice.

A peer's ``retains`` flag travels with its announcements, so a subscription
made a moment after a peer's first retained publish (or before a peer is
found) does not know to ask it, and that value, published before the
subscription reached the peer, never comes live either. So for `WATCH`
seconds after its values came, a subscription still asks, once, a peer found
retaining only then, its live messages held meanwhile; and what that peer
gives is checked against what was delivered already (none from a publisher
already heard on the topic, none older than the topic's newest). `last` is a
one-shot query: a value published that moment before it may be missing.
"""

from __future__ import annotations

import asyncio
import functools
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
WATCH: Final[float] = 5.0
"""How long after its values came a subscription asks a peer found retaining only then
(an announcement spreads in milliseconds on a LAN; gossip over a few hops in about a
heartbeat)."""


class _Watch:
    """A subscription still asking peers found retaining after its values came."""

    __slots__ = ("asked", "busy", "pending", "sub", "timer", "version")

    def __init__(self, sub: Subscription, version: int, asked: set[str]) -> None:
        self.sub, self.version, self.asked = sub, version, asked
        self.pending: list[PeerRecord] = []
        self.busy = False
        self.timer: asyncio.TimerHandle | None = None


class RetainedValues:
    """This node's part in retained values: serving its own, gathering everyone's (a
    `PeerListener`: a peer found retaining late is asked by the subscriptions watching)."""

    def __init__(self, store: RetainedStore, recall: Recall) -> None:
        self.store = store
        self._recall = recall
        self._watches: dict[Subscription, _Watch] = {}

    def close(self) -> None:
        for watch in self._watches.values():
            if watch.timer is not None:
                watch.timer.cancel()
        self._watches.clear()

    # -- peers (PeerListener) ---------------------------------------------------------

    def peer_connected(self, new: PeerRecord, old: PeerRecord | None) -> None:
        self._found(new)

    def peer_updated(self, rec: PeerRecord) -> None:
        self._found(rec)

    def peer_lost(self, rec: PeerRecord) -> None:
        pass

    def peer_gone(self, rec: PeerRecord) -> None:
        pass

    def peers_changed(self) -> None:
        pass

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
        watch = _Watch(sub, version, set())
        self._recall.fill(sub, self._gathered(watch), functools.partial(self._caught_up, watch))

    async def _gathered(self, watch: _Watch) -> Gathered:
        values, covered, watch.asked = await self._gather(watch.sub.pattern, watch.version,
                                                          ASK_TIMEOUT)
        if not watch.sub.closed:  # (before its release: the values it gets are noted)
            self._watch(watch)
        return values, covered, {}

    def _caught_up(self, watch: _Watch) -> None:
        """Its values are in: it asks the peers found retaining while they were gathered."""
        if watch.sub in self._watches:
            for rec in self._recall.live_peers(lambda rec: rec.retains):
                self._found_by(watch, rec)

    async def gather(self, pattern: TopicPattern, version: int = 0,
                     timeout: float = ASK_TIMEOUT) -> tuple[list[Message], Covered]:
        """The newest retained value of every matching topic across the mesh (this node
        included), in topic order; and what each publisher's values cover."""
        values, covered, _ = await self._gather(pattern, version, timeout)
        return values, covered

    async def _gather(self, pattern: TopicPattern, version: int, timeout: float
                      ) -> tuple[list[Message], Covered, set[str]]:
        """`gather`, and the ids of the peers asked."""
        asked = await self._recall.peers_to_ask(lambda rec: rec.retains)
        recall = self._recall
        mine = [message_of(item, recall.name, recall.node_id)
                for item in self.store.matching(pattern)]
        answers = await asyncio.gather(*(self._ask(rec, pattern, version, timeout)
                                         for rec in asked))
        return (*_merge([mine, *answers]), {rec.id for rec in asked})

    # -- peers found retaining late ---------------------------------------------------

    def _watch(self, watch: _Watch) -> None:
        self._recall.watch(watch.sub, True)
        watch.timer = asyncio.get_running_loop().call_later(WATCH, self._unwatch, watch)
        self._watches[watch.sub] = watch

    def _unwatch(self, watch: _Watch) -> None:
        self._watches.pop(watch.sub, None)
        if not watch.busy:  # (else once its late values are in)
            self._recall.watch(watch.sub, False)

    def _found(self, rec: PeerRecord) -> None:
        """`rec` retains (now): every watching subscription that did not ask it does."""
        if not rec.retains or not rec.rtr or not self._watches:
            return
        for watch in list(self._watches.values()):
            self._found_by(watch, rec)

    def _found_by(self, watch: _Watch, rec: PeerRecord) -> None:
        if watch.sub.closed:
            self._unwatch(watch)
        elif rec.id not in watch.asked:
            watch.asked.add(rec.id)
            watch.pending.append(rec)
            if not watch.busy:
                watch.busy = True
                self._recall.fill(watch.sub, self._late(watch),
                                  functools.partial(self._late_done, watch))

    async def _late(self, watch: _Watch) -> Gathered:
        """The values of the peers found since (more may be found while asking)."""
        answers: list[list[Message]] = []
        while watch.pending:
            recs, watch.pending = watch.pending, []
            answers += await asyncio.gather(*(
                self._ask(rec, watch.sub.pattern, watch.version, ASK_TIMEOUT)
                for rec in recs))
        values, covered = _merge(answers)
        return values, covered, {}

    def _late_done(self, watch: _Watch) -> None:
        watch.busy = False
        watch.pending.clear()  # (cancelled at close)
        if watch.sub not in self._watches:
            self._recall.watch(watch.sub, False)

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
                self._recall.bad_answer("retained", rec, exc)
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
