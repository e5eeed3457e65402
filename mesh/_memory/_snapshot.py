"""Retained values across the mesh: answering peers' queries, gathering theirs.

Every node answers the internal service ``_zeromesh.retained`` from its
`RetainedStore`, a page at a time. A query from a new subscription names the
subscriber's interest version, and is answered only once that subscription is
in force at our publisher (its readiness marker arrived): every message
published after the snapshot then reaches the subscriber live, and every one
before it is older than, or is, the value the snapshot holds. The subscriber
(`fill`) holds live messages back, asks every live peer that announces
retained values, keeps for each topic the newest value (by timestamp, then
publisher id), and releases: values first, then what it held minus what the
values cover.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from typing import Final

from patterns import TopicPattern

from .. import _names, _ttl, _wire
from .._membership._peers import PeerRecord, PeerState, PeerTable
from .._message import Message
from .._parts import Waiter
from .._pubsub._engine import PubSub
from .._pubsub._subscription import Subscription
from .._services._requests import Requests
from .._services._serving import Serving
from ..errors import DeliveryError, ProtocolError, RequestTimeout
from . import _queries
from ._retained import RetainedStore

_log = logging.getLogger("mesh.node")

ASK_TIMEOUT: Final[float] = 5.0
"""How long a new subscription waits for one peer's retained values before going live
without them (that peer is then logged, once)."""
READY_TIMEOUT: Final[float] = 2.0
"""How long a publisher waits for a subscriber's subscription to be in force before it
answers anyway."""
_CONCURRENCY: Final[int] = 16
DISCOVERY_GRACE: Final[float] = 0.5
"""A node that just started and knows no peer yet waits up to this long after its start
for discovery before it gathers retained values (so a fresh `zeromesh sub` asks the
publishers it is about to find)."""
SETTLE: Final[float] = 0.05
"""...and, once peers appear, until none has joined for this long (they come in a burst)."""

Covered = dict[tuple[str, str], int]


class Discovery:
    """When a node that just started has found the peers it is about to find."""

    def __init__(self, peers: PeerTable) -> None:
        self._peers = peers
        self._grace_end = 0.0

    def start(self) -> None:
        self._grace_end = asyncio.get_running_loop().time() + DISCOVERY_GRACE

    async def settled(self) -> None:
        """Within the discovery grace after start: wait for the first peers to be found,
        and for their burst to end (bounded by the grace; polled, it is short)."""
        loop = asyncio.get_running_loop()
        seen, since = -1, loop.time()
        while loop.time() < self._grace_end:
            alive = sum(1 for rec in self._peers.records() if rec.state is PeerState.ALIVE)
            if alive != seen:
                seen, since = alive, loop.time()
            elif alive and loop.time() - since >= SETTLE:
                return
            await asyncio.sleep(0.01)


_warned_unready: set[str] = set()


async def in_force(waiter: Waiter, pubsub: PubSub, request: Message, version: int) -> None:
    """Wait (bounded) until the asker's subscription of interest `version` is in force at
    our publisher, so nothing falls between an answer taken now and the live stream."""
    if version <= 0:
        return
    try:
        await waiter.wait(lambda: pubsub.confirmed_version(request.source_id) >= version,
                          READY_TIMEOUT, "waiting for the subscription to be in force")
    except RequestTimeout:
        level = logging.DEBUG if request.source_id in _warned_unready else logging.WARNING
        if len(_warned_unready) < 10_000:
            _warned_unready.add(request.source_id)
        _log.log(level, "answered %r before its subscription was in force here: a message "
                 "may fall between what it asked for and its live messages",
                 request.source[:64])


class RetainedValues:
    """This node's part in retained values: serving its own, gathering everyone's."""

    def __init__(self, store: RetainedStore, *, peers: PeerTable, pubsub: PubSub,
                 serving: Serving, requests: Requests, waiter: Waiter, discovery: Discovery,
                 max_message_size: int) -> None:
        self._discovery = discovery
        self.store = store
        self._peers = peers
        self._pubsub = pubsub
        self._serving = serving
        self._requests = requests
        self._waiter = waiter
        self._budget = max(1024, max_message_size // 2)
        self._node_id = ""
        self._name = ""
        self._filling: set[asyncio.Task[None]] = set()
        self._warned: set[tuple[str, str]] = set()

    def start(self, node_id: str, name: str) -> None:
        self._node_id, self._name = node_id, name
        self._serving.serve_internal(_queries.RETAINED_SERVICE, self._answer, _CONCURRENCY)

    async def aclose(self) -> None:
        tasks, self._filling = set(self._filling), set()
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)

    # -- answering -------------------------------------------------------------------

    async def _answer(self, request: Message) -> bytes:
        query = _queries.decode_retained_query(request.data)
        pattern = _names.pattern(query.pattern)
        if query.after == "":
            await in_force(self._waiter, self._pubsub, request, query.version)
        items, after = self.store.page(pattern, query.after, self._budget)
        return _queries.encode_retained(_queries.RetainedPage(self._name, items, after))

    # -- gathering -------------------------------------------------------------------

    def fill(self, sub: Subscription, version: int) -> None:
        """Give `sub` the mesh's retained values first, then its live messages."""
        sub._hold()
        task = asyncio.get_running_loop().create_task(self._fill(sub, version),
                                                      name="zeromesh-retained")
        self._filling.add(task)
        task.add_done_callback(self._filling.discard)

    async def _fill(self, sub: Subscription, version: int) -> None:
        retained: list[Message] = []
        covered: Covered = {}
        try:
            retained, covered = await self.gather(sub.pattern, version)
        finally:  # (cancelled at close: what was held is still delivered)
            sub._release(retained, covered)

    async def gather(self, pattern: TopicPattern, version: int = 0,
                     timeout: float = ASK_TIMEOUT) -> tuple[list[Message], Covered]:
        """The newest retained value of every matching topic across the mesh (this node
        included), in topic order; and what each publisher's values cover."""
        await self._discovery.settled()
        mine = [message_of(item, self._name, self._node_id)
                for item in self.store.matching(pattern)]
        asked = [rec for rec in self._peers.records()
                 if rec.retains and rec.rtr and rec.state is not PeerState.LOST]
        pages = await asyncio.gather(*(self._ask(rec, pattern, version, timeout)
                                       for rec in asked))
        return _merge([mine, *pages])

    async def _ask(self, rec: PeerRecord, pattern: TopicPattern, version: int,
                   timeout: float) -> list[Message]:
        """All of one peer's matching values, page by page (none if it cannot answer)."""
        out: list[Message] = []
        after = ""
        while True:
            query = _queries.RetainedQuery(pattern.pattern, version, after)
            try:
                reply = await self._requests.ask(rec, _queries.RETAINED_SERVICE,
                                                 _queries.encode_retained(query), timeout=timeout)
                page = _queries.decode_retained_page(reply.data)
            except (DeliveryError, ProtocolError) as exc:
                self._warn_once("unanswered", rec.id, "no retained values from %r: %s",
                                rec.name, exc)
                return out
            now = time.time()  # (a value whose ttl passed on its way is not one any more)
            out.extend(message_of(item, page.name[:64], rec.id) for item in page.items
                       if item.topic and pattern.matches(item.topic)
                       and not _ttl.has_expired(item, now))
            if not page.next or page.next <= after:
                return out
            after = page.next


    def _warn_once(self, what: str, who: str, text: str, *args: object) -> None:
        if (what, who) not in self._warned and len(self._warned) < 10_000:
            self._warned.add((what, who))
            _log.warning(text, *args)
        else:
            _log.debug(text, *args)


def message_of(item: _wire.Item, name: str, source_id: str) -> Message:
    return Message(item.topic, item.payload, name, source_id, item.seq, item.ts, item.headers,
                   item.reliable)


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
