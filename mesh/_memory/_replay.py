"""History across the mesh: answering peers' history queries, replaying theirs.

Every node answers the internal service ``_zeromesh.history`` from its
`History`, a page at a time, once the asking subscription is in force at its
publisher (as for retained values). A subscription with ``since=`` or
``last=`` (`fill`) holds live messages back, asks every live peer that keeps
history, merges what they answer in timestamp order (each publisher's own
messages staying in the order it published them), and releases: history
first, then what it held minus what history covered — each publisher's
messages on its history topics up to the sequence its answer went to.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import time
from collections.abc import Sequence
from typing import Final

from patterns import TopicPattern

from .. import _names, _ttl
from .._membership._peers import PeerRecord, PeerState, PeerTable
from .._message import Message
from .._parts import Waiter
from .._pubsub._engine import PubSub
from .._pubsub._subscription import Subscription
from .._services._requests import Requests
from .._services._serving import Serving
from ..errors import ConfigError, DeliveryError, ProtocolError
from . import _queries
from ._history import History
from ._snapshot import ASK_TIMEOUT, Discovery, in_force, message_of

_log = logging.getLogger("mesh.node")
_CONCURRENCY: Final[int] = 8

Replayed = dict[str, tuple[tuple[TopicPattern, ...], int]]


class HistoryReplay:
    """This node's part in history: serving its own, replaying everyone's."""

    def __init__(self, history: History, *, peers: PeerTable, pubsub: PubSub,
                 serving: Serving, requests: Requests, waiter: Waiter, discovery: Discovery,
                 max_message_size: int) -> None:
        self.history = history
        self._peers = peers
        self._pubsub = pubsub
        self._serving = serving
        self._requests = requests
        self._waiter = waiter
        self._discovery = discovery
        self._budget = max(1024, max_message_size // 2)
        self._node_id = ""
        self._name = ""
        self._filling: set[asyncio.Task[None]] = set()

    def start(self, node_id: str, name: str) -> None:
        self._node_id, self._name = node_id, name
        self._serving.serve_internal(_queries.HISTORY_SERVICE, self._answer, _CONCURRENCY)

    async def aclose(self) -> None:
        tasks, self._filling = set(self._filling), set()
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)

    async def _answer(self, request: Message) -> bytes:
        query = _queries.decode_history_query(request.data)
        pattern = _names.pattern(query.pattern)
        if query.after == 0:
            await in_force(self._waiter, self._pubsub, request, query.version)
        upto = query.upto or self.history.newest_seq
        items, after = self.history.page(pattern, since=query.since, last=query.last,
                                         after=query.after, upto=upto, budget=self._budget)
        return _queries.encode_history(_queries.HistoryPage(
            self._name, items, after, upto, [p.pattern for p in self.history.patterns]))

    def fill(self, sub: Subscription, version: int, *, since: float, last: int) -> None:
        """Give `sub` the mesh's matching history first, then its live messages."""
        sub._hold()
        task = asyncio.get_running_loop().create_task(self._fill(sub, version, since, last),
                                                      name="zeromesh-history")
        self._filling.add(task)
        task.add_done_callback(self._filling.discard)

    async def _fill(self, sub: Subscription, version: int, since: float, last: int) -> None:
        replay: list[Message] = []
        replayed: Replayed = {}
        try:
            replay, replayed = await self.gather(sub.pattern, version, since=since, last=last)
        finally:  # (cancelled at close: what was held is still delivered)
            sub._release(replay, {}, replayed)

    async def gather(self, pattern: TopicPattern, version: int, *, since: float,
                     last: int) -> tuple[list[Message], Replayed]:
        """The matching history of every live publisher (this node included), merged."""
        await self._discovery.settled()
        upto = self.history.newest_seq
        mine, _ = self.history.page(pattern, since=since, last=last, after=0, upto=upto,
                                    budget=1 << 62)
        replayed: Replayed = {}
        if self.history.patterns:
            replayed[self._node_id] = (self.history.patterns, upto)
        streams = [[message_of(item, self._name, self._node_id) for item in mine]]
        asked = [rec for rec in self._peers.records()
                 if rec.history and rec.rtr and rec.state is not PeerState.LOST]
        for rec, (msgs, cover) in zip(asked, await asyncio.gather(
                *(self._ask(rec, pattern, version, since, last) for rec in asked)),
                                      strict=True):
            streams.append(msgs)
            if cover is not None:
                replayed[rec.id] = cover
        merged = list(heapq.merge(*streams, key=lambda m: m.timestamp))
        return (_newest(merged, last) if last > 0 else merged), replayed

    async def _ask(self, rec: PeerRecord, pattern: TopicPattern, version: int, since: float,
                   last: int) -> tuple[list[Message], tuple[tuple[TopicPattern, ...], int] | None]:
        """All of one peer's matching history, and what it covers (None if it could not
        answer: then nothing of its live stream is dropped)."""
        msgs: list[Message] = []
        after, upto = 0, 0
        patterns: tuple[TopicPattern, ...] = ()
        while True:
            query = _queries.HistoryQuery(pattern.pattern, since, last, version, after, upto)
            try:
                reply = await self._requests.ask(rec, _queries.HISTORY_SERVICE,
                                                 _queries.encode_history(query),
                                                 timeout=ASK_TIMEOUT)
                page = _queries.decode_history_page(reply.data)
                if not patterns:
                    patterns = tuple(_names.pattern(p) for p in page.patterns[:1000])
            except (DeliveryError, ProtocolError, ConfigError) as exc:
                _log.warning("no history from %r: %s", rec.name, exc)
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
