"""What retained values and history share: asking every publisher, page by page, and
handing a subscription what came back before its live messages.

Both are an internal service every node answers without announcing it. An
answer to a new subscription is given only once that subscription is in force
at the answering node's publisher (its readiness marker arrived), so every
message published after the answer reaches the subscriber live. The
subscription holds its live messages back meanwhile (`fill`), then takes what
was gathered, then what it held minus what the answers cover.

A node that just started and knows no peer yet first waits, up to a short
grace, for discovery to find peers and for their burst to settle, so a fresh
`zeromesh sub` asks the publishers it is about to find.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable, Coroutine
from typing import Any, Final

from patterns import TopicPattern

from .. import _wire
from .._membership._peers import PeerRecord, PeerState, PeerTable
from .._message import Message
from .._parts import Waiter
from .._pubsub._engine import PubSub
from .._pubsub._subscription import Subscription
from .._services._requests import Requests
from .._services._server import ServiceHandler
from .._services._serving import Serving
from .._support._quiet import QuietLog
from ..errors import DeliveryError, RequestTimeout

_log = logging.getLogger("mesh.node")

ASK_TIMEOUT: Final[float] = 5.0
"""How long a subscription waits for one peer's answer before going on without it (that
peer is then logged, once)."""
READY_TIMEOUT: Final[float] = 2.0
"""How long a node waits for an asking subscription to be in force before it answers
anyway (logged: a message may then fall between the answer and live messages)."""
STRANGER_WAITS: Final[int] = 2
"""Askers not in the peer table that are waited for at a time (a new peer's hello is
usually moments behind its first query); more are answered at once, so that askers
with forged ids cannot hold every slot of the service for `READY_TIMEOUT` each."""
DISCOVERY_GRACE: Final[float] = 0.5
"""A node that just started waits up to this long after its start for discovery."""
SETTLE: Final[float] = 0.05
"""...and, once peers appear, until none has joined for this long (they come in a burst)."""

Covered = dict[tuple[str, str], int]
"""(publisher id, topic) -> the sequence of the retained value it gave."""
Replayed = dict[str, tuple[tuple[TopicPattern, ...], int]]
"""Publisher id -> (its history patterns, the sequence its history went up to)."""
Gathered = tuple[list[Message], Covered, Replayed]


class Recall:
    """One node's means of asking the mesh what it remembers, and of answering."""

    def __init__(self, *, peers: PeerTable, pubsub: PubSub, serving: Serving,
                 requests: Requests, waiter: Waiter, max_message_size: int,
                 quiet: QuietLog) -> None:
        self._peers = peers
        self._quiet = quiet
        self._pubsub = pubsub
        self._serving = serving
        self._requests = requests
        self._waiter = waiter
        self.budget = max(1024, max_message_size // 2)
        """Bytes of items one answer holds at most (a page)."""
        self.node_id = ""
        self.name = ""
        self._grace_end = 0.0
        self._filling: set[asyncio.Task[None]] = set()
        self._warned: set[tuple[str, str]] = set()
        self._strangers_waited = 0

    def start(self, node_id: str, name: str) -> None:
        self.node_id, self.name = node_id, name
        self._grace_end = asyncio.get_running_loop().time() + DISCOVERY_GRACE

    def serve(self, service: str, answer: ServiceHandler, concurrency: int) -> None:
        self._serving.serve_internal(service, answer, concurrency)

    async def aclose(self) -> None:
        tasks, self._filling = set(self._filling), set()
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)

    # -- answering -------------------------------------------------------------------

    async def in_force(self, request: Message, version: int, pattern: TopicPattern) -> None:
        """Wait (bounded) until the asker's subscription of interest `version` is in force
        at our publisher (nothing to wait for when `version` is 0, nor when we announce no
        topic `pattern` meets: the asker does not connect to us for it, and a topic we
        publish on later is held for it until it has)."""
        if version <= 0 or not self._pubsub.announces(pattern):
            return
        stranger = self._peers.get(request.source_id) is None
        if stranger and self._strangers_waited >= STRANGER_WAITS:
            self.warn_once("strangers", "", "more than %d askers not in the peer table at "
                           "once: the rest answered without waiting for their subscriptions",
                           STRANGER_WAITS)
            return
        self._strangers_waited += stranger
        try:
            await self._waiter.wait(
                lambda: self._pubsub.confirmed_version(request.source_id) >= version,
                READY_TIMEOUT, "waiting for the subscription to be in force")
        except RequestTimeout:
            self._unready(request)
        finally:
            self._strangers_waited -= stranger

    def _unready(self, request: Message) -> None:
        self.warn_once("unready", request.source_id,
                       "answered %r before its subscription was in force here: a message "
                       "may fall between what it asked for and its live messages",
                       request.source[:64])

    # -- asking ----------------------------------------------------------------------

    def fill(self, sub: Subscription, gather: Coroutine[Any, Any, Gathered],
             then: Callable[[], None] | None = None) -> None:
        """Hold `sub`'s live messages back until `gather` is done; then it takes what was
        gathered, then what it held, minus what the answers cover; then `then` runs."""
        sub._hold()
        task = asyncio.get_running_loop().create_task(self._fill(sub, gather, then),
                                                      name="zeromesh-recall")
        self._filling.add(task)
        task.add_done_callback(self._filling.discard)

    @staticmethod
    def watch(sub: Subscription, on: bool) -> None:
        """Have `sub` note what it delivers (on) or stop (off): values a peer gives it
        late are checked against that (see `Subscription._watch`)."""
        sub._watch(on)

    @staticmethod
    async def _fill(sub: Subscription, gather: Coroutine[Any, Any, Gathered],
                    then: Callable[[], None] | None) -> None:
        gathered: Gathered = ([], {}, {})
        try:
            gathered = await gather
        finally:  # (cancelled at close: what was held is still delivered)
            sub._release(*gathered)
            if then is not None:
                then()

    async def peers_to_ask(self, keeps: Callable[[PeerRecord], bool]) -> list[PeerRecord]:
        """The live peers `keeps` says hold something (after the start-up grace)."""
        await self._settled()
        return self.live_peers(keeps)

    def live_peers(self, keeps: Callable[[PeerRecord], bool]) -> list[PeerRecord]:
        """The live peers `keeps` says hold something, now."""
        return [rec for rec in self._peers.records()
                if keeps(rec) and rec.rtr and rec.state is not PeerState.LOST]

    async def ask(self, rec: PeerRecord, service: str, query: bytes, *,
                  timeout: float = ASK_TIMEOUT) -> bytes | None:
        """`rec`'s answer to `query`, or None (logged once per peer) if there is none."""
        try:
            reply = await self._requests.ask(rec, service, query, timeout=timeout)
        except DeliveryError as exc:
            self.warn_once(service, rec.id, "no answer from %r to %s: %s", rec.name, service,
                           exc)
            return None
        return reply.data

    async def _settled(self) -> None:
        """Within the grace after start: wait for the first peers to be found, and for no
        more to join for `SETTLE` (woken by every change of peers; nothing polls)."""
        loop = asyncio.get_running_loop()
        while (left := self._grace_end - loop.time()) > 0:
            alive = self._alive()
            try:
                await self._waiter.wait(functools.partial(self._changed, alive),
                                        min(left, SETTLE), "waiting for discovery")
            except RequestTimeout:
                if alive:
                    return  # no one joined for SETTLE: the burst is over

    def _changed(self, alive: int) -> bool:
        return self._alive() != alive

    def _alive(self) -> int:
        return sum(1 for rec in self._peers.records() if rec.state is PeerState.ALIVE)

    def bad_answer(self, what: str, rec: PeerRecord, exc: Exception) -> None:
        """A peer's page of `what` (retained values, history) was malformed: dropped,
        counted as dropped input under `what`, and warned of once per peer."""
        self._quiet.refuse(what, rec.id, f"bad {what} page from {rec.name[:64]!r}: {exc}")

    def warn_once(self, what: str, who: str, text: str, *args: object) -> None:
        if (what, who) not in self._warned and len(self._warned) < 10_000:
            self._warned.add((what, who))
            _log.warning(text, *args)
        else:
            _log.debug(text, *args)


def message_of(item: _wire.Item, name: str, source_id: str) -> Message:
    return Message(item.topic, item.payload, name, source_id, item.seq, item.ts, item.headers,
                   item.reliable)
