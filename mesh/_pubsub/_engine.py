"""Pub/sub for one node: batching publishes, dispatching received batches, readiness.

Publishing never awaits the network: messages are appended to a per-topic
batch that is flushed at the end of the current loop iteration (or sooner,
when it grows large), so a lone message goes out at once and a burst costs one
encode and one ZeroMQ send per topic per flush, not one per message. Plain
messages (no headers, no ttl) go as a *run* — payloads with one timestamp and
a sequence range, no struct per message on either side — unless something
needs each one as an item at once (history, a subscription on this node) or a
peer subscribed to the topic predates runs.

Connections follow interest (see `_interest`): the node announces the topics
it publishes on, and its one SUB socket connects to a peer's publisher only
where that peer's topics meet its subscriptions. A topic announced for the
first time while a peer that subscribes to it is not yet ready here (it
connects now that it learns of the topic) is held back, in order, until those
peers are ready or a bound passes (`_interest.Holds`): a publish after a subscription is in
force still reaches it.

Receiving: a batch is decoded once, matched once per topic (cached), and handed to each matching
subscription as a list. Per-(source, topic) sequence numbers reveal messages
the publisher dropped at its high-water mark; they are counted per peer and
reported once.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Final, Protocol

from patterns import (
    Context,
    InvalidName,
    Publisher,
    SocketClosed,
    Subscriber,
    TopicPattern,
    topic_from_key,
)

from .. import _codec, _names, _ttl, _wire
from .._config import NodeConfig
from .._membership._listener import ControlRoutes, ControlSender
from .._membership._peers import PeerRecord, PeerState, PeerTable
from .._message import Message, T, sent_headers
from .._parts import Announcer, Waiter
from .._support._cache import BoundedDict
from .._support._quiet import QuietLog
from .._support._tally import Stats, Tally
from ..errors import MessageTooLarge, ProtocolError
from ._interest import Holds, Links, Offers
from ._pace import Pacing
from ._subscription import Callback, Subscription

_log = logging.getLogger("mesh.pubsub")
_FLUSH_COUNT: Final[int] = 512
MAX_SUBSCRIPTION: Final[int] = 4096
"""Largest subscription message a publisher accepts (a topic key is at most 257 bytes)."""
_MARKER_RE: Final = re.compile(rb"[0-9A-Za-z]{1,64}:[0-9]{1,19}")
"""A readiness marker: ``<node id>:<interest version>``."""
_PUB_LINGER: Final[float] = 2.0
_GAP_WARNINGS: Final[int] = 100
"""Publishers whose drops for us are warned of (each once); the rest at debug. A batch's
source id is the sender's word, so a stranger could name a new one per batch."""


class Recorder(Protocol):
    """Keeps what this node publishes on some topics (the node's history)."""

    def keeps(self, topic: str) -> bool: ...

    def add(self, topic: str, items: Sequence[_wire.Item]) -> None: ...


class _Run(list[bytes]):
    """A topic's pending run: its payloads, the one label they share (the typed values'
    content type, or None) and its timestamp."""

    __slots__ = ("label", "ts")

    def __init__(self, label: dict[str, str] | None, ts: float) -> None:
        super().__init__()
        self.label = label
        self.ts = ts


class PubSub:
    """The pub/sub side of a node; owns its PUB and SUB sockets."""

    def __init__(self, ctx: Context, config: NodeConfig, quiet: QuietLog,
                 stats: Stats, *, peers: PeerTable, announcer: Announcer,
                 waiter: Waiter, next_seq: Callable[[], int],
                 take_seqs: Callable[[int], int], control: ControlSender) -> None:
        self._next_seq = next_seq
        self._take_seqs = take_seqs
        self._config = config
        self._quiet = quiet
        self._stats = stats
        self._peers = peers
        self._announcer = announcer
        self._waiter = waiter
        self._history: Recorder | None = None
        self.pacing = Pacing(control, stats)
        self._reliable_copies: BoundedDict[str, bool] = BoundedDict()
        """Per topic: does any peer want reliable messages by pub/sub (see
        `_reliable_wanted`)? Cleared whenever peers or their interest change."""
        self._max_wire = _wire.max_frame(config.max_message_size)
        # inbound on the XPUB is only subscriptions (a topic key or a readiness marker): a
        # small limit keeps a stranger from parking megabytes in its subscription trie
        self._publisher = Publisher(ctx, hwm=config.pub_hwm, max_message_size=MAX_SUBSCRIPTION)
        self._subscriber = Subscriber(ctx, hwm=config.sub_hwm, max_message_size=self._max_wire)
        self.endpoints: list[str] = []
        self.node_id = ""
        self.version = 0
        # publishing
        self._topic_seq: BoundedDict[str, int] = BoundedDict()
        """Per topic, the sequence of its next batch (for receivers' gap counts). Bounded:
        topics can be ever new names; one forgotten restarts at 0, which a receiver takes
        for a restart, not a gap."""
        self._outgoing: dict[str, list[_wire.Item]] = {}
        self._runs: dict[str, _Run] = {}
        """Per topic, plain messages pending as a run (a topic has a run or items, never
        both: whichever came first goes first)."""
        self._run_topics: BoundedDict[str, bool] = BoundedDict()
        """Per topic: may plain messages go as runs (see `_runs_welcome`)?"""
        self._max_size = config.max_message_size
        self._frame_budget = _wire.frame_budget(config.max_message_size)
        self._outgoing_count = 0
        self._outgoing_bytes = 0
        self._flush_handle: asyncio.Handle | None = None
        # subscribing
        self._subs: list[Subscription] = []
        self._match_cache: BoundedDict[str, tuple[Subscription, ...]] = BoundedDict()
        self._key_topics: BoundedDict[bytes, str] = BoundedDict()
        self._expected_seq: BoundedDict[tuple[str, str], int] = BoundedDict()
        """Per (publisher, topic), the next batch sequence (a higher one: a gap). Bounded:
        a forgotten stream counts no gap on its next batch, then is followed again."""
        self.dropped_by_peer = Tally()
        """Messages publishers dropped for us, by publisher (bounded: source ids come from
        senders)."""
        self._gap_warnings = 0
        self.received_by_peer = Tally()
        """Messages received from each publisher (by node id)."""
        self.published_by_topic = stats.topics["sent"]
        self.published_bytes_by_topic = stats.topics["bytes_sent"]
        """Payload bytes this node published, per topic (counted per flushed batch)."""
        self.delivered_by_topic = stats.topics["received"]
        """Messages handed to this node's subscriptions, once per message."""
        self._from_peer = stats.peers["received"]
        """Messages of every kind received from each peer (pub/sub's share counted here)."""
        self._expired_by_topic = stats.topics[_ttl.EXPIRED]
        self._latency = stats.latency["pubsub"]
        self._latency_by_topic = stats.latency_by["topic"]
        self._confirmed: BoundedDict[str, int] = BoundedDict()
        self._links = Links(self._subscriber, peers, _PUB_LINGER + 1.0)
        # what we publish on (announced), and new topics held for their subscribers
        self._offers = Offers()
        self._holds = Holds(self._unready, self._send_held)
        self._announce_handle: asyncio.Handle | None = None

    @property
    def history(self) -> Recorder | None:
        """Where what we publish on history topics is kept (None: no history)."""
        return self._history

    @history.setter
    def history(self, recorder: Recorder | None) -> None:
        self._history = recorder
        self._run_topics.clear()  # a topic it keeps takes no runs

    def bind(self, interfaces: Iterable[str]) -> list[str]:
        self.endpoints = [self._publisher.bind(host) for host in interfaces]
        return self.endpoints

    @property
    def control_routes(self) -> ControlRoutes:
        """The control messages this part handles."""
        return {_wire.Pace: self.pacing.on_pace}

    def start(self, node_id: str) -> None:
        """Start receiving; the caller runs `read_markers` as a task."""
        self.node_id = self.pacing.node_id = node_id
        self._subscriber.set_marker(self._marker())
        self._subscriber.start(self._on_batches)

    def close(self) -> None:
        if self._announce_handle is not None:
            self._announce_handle.cancel()
        self._holds.release_all()  # (older than what is still to flush)
        self.flush()
        self._links.close()
        for sub in self._subs:
            sub._close()
        self._publisher.close(linger=_PUB_LINGER)  # let the last batches leave
        self._subscriber.close()

    @property
    def patterns(self) -> list[str]:
        return sorted({s.subject for s in self._subs})

    def hello_fields(self, version: int) -> Mapping[str, Any]:
        if version != self.version:  # what we announce now is marked with its version
            self.version = version
            self._subscriber.set_marker(self._marker())
        return {"pub": self.endpoints, "subs": self.patterns, "feeds": self.feeds,
                "pubs": self._offers.announced, "sub_runs": True}

    @property
    def feeds(self) -> list[str]:
        """Patterns whose every subscription takes best-effort messages only."""
        plain = {s.subject for s in self._subs if not s.best_effort_only}
        return sorted({s.subject for s in self._subs} - plain)

    # -- peers (PeerListener) -----------------------------------------------------

    def peer_connected(self, new: PeerRecord, old: PeerRecord | None) -> None:
        self._links.peer_connected(new, old)

    def peer_updated(self, rec: PeerRecord) -> None:
        self._links.update(rec)  # (its subscriptions are read from its record)

    def peer_lost(self, rec: PeerRecord) -> None:
        pass  # stay connected: it joins again by itself when it comes back

    def peers_changed(self) -> None:
        self._reliable_copies.clear()
        self._run_topics.clear()
        if self._holds.topics:
            self._holds.check()

    def peer_gone(self, rec: PeerRecord) -> None:
        """A peer said goodbye (or was forgotten). Its last batches may still be in
        flight on the data connection (the goodbye travels on another one, and can
        overtake them), and libzmq discards what is queued from a disconnected
        endpoint: so disconnect only after the peer's publisher linger has passed."""
        self._confirmed.pop(rec.id, None)
        self._links.gone(rec)

    def peer_revoked(self, rec: PeerRecord) -> None:
        """Its key was revoked (after `peer_gone`): read nothing more from it."""
        self._links.cut(rec)

    @property
    def connected_publishers(self) -> frozenset[str]:
        """The peers' publisher endpoints our SUB is connected to."""
        return self._links.connected

    def confirmed_version(self, peer_id: str) -> int:
        """The newest interest version of `peer_id` whose subscriptions are in force at our
        publisher (-1: none yet)."""
        return self._confirmed.get(peer_id, -1)

    def is_ready(self, rec: PeerRecord) -> bool:
        """Its subscriptions as announced are in force at our publisher (its own marker
        said so: a record's version alone, e.g. a negative one, never does)."""
        confirmed = self._confirmed.get(rec.id)
        return confirmed is not None and confirmed >= rec.subs_version

    # -- publishing -------------------------------------------------------------

    def publish(self, topic: str, data: bytes | str, headers: Mapping[str, str] | None,
                name: str, ttl: float | None = None) -> bool:
        """Queue one best-effort message (`ttl` checked by the caller); True when a full
        batch was flushed (the caller may yield)."""
        run = self._runs.get(topic)
        if run is None or headers is not run.label or ttl is not None or type(data) is not bytes:
            return self._publish_other(topic, data, headers, name, ttl)
        # The common case: a plain message joins its topic's run (no struct, clock read or
        # sequence number per message: the run's are taken once, see `_wire.Batch`).
        size = len(data)
        if size > self._max_size:
            self._stats["oversized"] += 1
            raise MessageTooLarge(size, self._max_size)
        if self._outgoing_bytes + size > self._frame_budget:
            self.flush(name)  # keep every frame under the receivers' size limit
            run = self._start_run(topic, run.label)
        run.append(data)
        self._outgoing_count += 1
        self._outgoing_bytes += size
        if self._outgoing_count >= _FLUSH_COUNT or self._outgoing_bytes >= self._frame_budget:
            self.flush(name)
            return True
        return False

    def _publish_other(self, topic: str, data: bytes | str,
                       headers: Mapping[str, str] | None, name: str, ttl: float | None
                       ) -> bool:
        """Every best-effort publish but one joining a run: checks, a new run, or an item
        of its own. True when it flushed a full batch."""
        data = self._checked(topic, data)
        size = len(data)
        label = headers or None
        run = self._runs.get(topic)
        if run is not None and run.label is not label:
            self._itemize(topic)  # (the other kind of run goes first, as items)
        if ((label is None or label is _codec.LABEL) and ttl is None
                and topic not in self._outgoing and self._runs_welcome(topic)):
            if topic not in self._runs:
                self._start_run(topic, None if label is None else _codec.LABEL)
            return self.publish(topic, data, label, name)  # (it joins the run now)
        return self._publish_item(topic, data, headers, name, ttl, size)[1]

    def _publish_item(self, topic: str, data: bytes, headers: Mapping[str, str] | None,
                      name: str, ttl: float | None, size: int) -> tuple[_wire.Item, bool]:
        """A message with an item of its own (headers, a ttl, history, a subscriber here,
        or a peer that predates runs); and whether it flushed a full batch."""
        if topic in self._runs:
            self._itemize(topic)  # the run pending goes first, in order
        pending = self._outgoing.get(topic)
        if pending and self._outgoing_bytes + size > self._frame_budget:
            self.flush(name)  # keep every frame under the receivers' size limit
            pending = None
        if pending is None:
            pending = self._outgoing[topic] = []
        hdrs = headers if headers is _codec.LABEL else sent_headers(headers)
        seq = self._next_seq()
        if ttl is None:
            item = _wire.Item(seq, time.time(), hdrs, data)
        else:
            ts = time.time()
            item = _wire.Item(seq, ts, hdrs, data, expires=ts + ttl)
        pending.append(item)
        history = self.history
        if history is not None and history.keeps(topic):
            history.add(topic, (item,))
        self._outgoing_count += 1
        self._outgoing_bytes += size
        if self._subs:
            local = self._matching(topic)
            if local:
                msg = Message(topic, data, name, self.node_id, seq, item.ts, hdrs)
                for sub in local:
                    sub._deliver((msg,))
                self.delivered_by_topic.add(topic, 1)
        if self._outgoing_count >= _FLUSH_COUNT or self._outgoing_bytes >= self._frame_budget:
            self.flush(name)
            return item, True
        if self._flush_handle is None:
            self._flush_handle = asyncio.get_running_loop().call_soon(self.flush, name)
        return item, False

    def publish_retained(self, topic: str, data: bytes | str,
                         headers: Mapping[str, str] | None, name: str,
                         ttl: float | None = None) -> _wire.Item:
        """`publish`, returning the message's item (to be retained) whether or not its
        batch left at once.

        Raises:
            ConfigError: `topic` is invalid.
            MessageTooLarge: `data` is too large.
        """
        data = self._checked(topic, data)
        return self._publish_item(topic, data, headers, name, ttl, len(data))[0]

    def _checked(self, topic: str, data: bytes | str) -> bytes:
        """`data` as bytes, within the size limit; a topic new here is checked and offered."""
        if topic not in self._offers.known:
            _names.topic(topic)
            self.offer(topic)
        if type(data) is not bytes:
            data = data.encode() if isinstance(data, str) else bytes(data)
        if len(data) > self._max_size:
            self._stats["oversized"] += 1
            raise MessageTooLarge(len(data), self._max_size)
        return data

    # -- runs: plain messages without a struct each -----------------------------------

    def _runs_welcome(self, topic: str) -> bool:
        """May plain messages on `topic` go as runs? Not when each needs its own item here
        (history keeps them, a subscription on this node gets them at once) or when a
        peer that subscribes to it predates runs. Cached; cleared when any of that may
        have changed."""
        welcome = self._run_topics.get(topic)
        if welcome is None:
            history = self.history
            welcome = self._run_topics.put(topic, not (
                (history is not None and history.keeps(topic))
                or (self._subs and self._matching(topic))
                or any(not (rec.hello is not None and rec.hello.sub_runs)
                       and any(p.matches(topic) for p in rec.subs)
                       for rec in self._peers.records())))
        return welcome

    def _start_run(self, topic: str, label: dict[str, str] | None = None) -> _Run:
        run = self._runs[topic] = _Run(label, time.time())
        if self._flush_handle is None:
            self._flush_handle = asyncio.get_running_loop().call_soon(self.flush,
                                                                      self._config.name)
        return run

    def _itemize(self, topic: str) -> None:
        """Turn `topic`'s pending run into items (numbered now), ahead of what follows it:
        for a hold, or a message that needs an item on a topic with a run pending."""
        run = self._runs.pop(topic)
        first = self._take_seqs(len(run))
        make, ts, label = _wire.Item, run.ts, run.label
        items = [make(first + i, ts, label, data) for i, data in enumerate(run)]
        pending = self._outgoing.get(topic)
        self._outgoing[topic] = items if pending is None else [*items, *pending]

    def publish_reliable(self, topic: str, payloads: Iterable[bytes | str],
                         headers: Mapping[str, str] | None, name: str,
                         ttl: float | None = None) -> list[_wire.Item]:
        """Make reliable messages on one topic, all at once, for the caller to spool.

        They are delivered to this node's subscriptions, and go out by pub/sub
        only when a peer wants them that way (`reliable_wanted`): a durable's
        live view does not, its queue carries them.

        Raises:
            ConfigError: `topic` is invalid.
            MessageTooLarge: one of them is too large (none is made).
        """
        _names.topic(topic)
        if topic not in self._offers.known:
            self.offer(topic)
        datas = [d if type(d) is bytes else d.encode() if isinstance(d, str) else bytes(d)
                 for d in payloads]
        limit = self._config.max_message_size
        largest = max(map(len, datas), default=0)
        if largest > limit:
            self._stats["oversized"] += 1
            raise MessageTooLarge(largest, limit)
        ts, make = time.time(), _wire.Item
        expires = None if ttl is None else ts + ttl
        hdrs = sent_headers(headers)
        items = [make(seq, ts, hdrs, data, True, topic, expires)
                 for seq, data in enumerate(datas, self._take_seqs(len(datas)))]
        if self.history is not None and self.history.keeps(topic):
            self.history.add(topic, items)
        if self._reliable_wanted(topic):
            self._enqueue(topic, items, name)
        else:
            self._stats["published"] += len(items)
            self.published_by_topic.add(topic, len(items))
        local = self._matching(topic) if self._subs else ()
        if local:
            node_id = self.node_id
            msgs = [Message(topic, it.payload, name, node_id, it.seq, ts, it.headers,
                            reliable=True) for it in items]
            for sub in local:
                sub._deliver(msgs)
            self.delivered_by_topic.add(topic, len(msgs))
        return items

    def _enqueue(self, topic: str, items: list[_wire.Item], name: str) -> None:
        """Queue items for the next flush, flushing whenever a batch is full."""
        if topic in self._runs:
            self._itemize(topic)  # the run pending goes first, in order
        for item in items:
            size = len(item.payload)
            if self._outgoing_count and self._outgoing_bytes + size > self._frame_budget:
                self.flush(name)  # keep every frame under the receivers' size limit
            self._outgoing.setdefault(topic, []).append(item)
            self._outgoing_count += 1
            self._outgoing_bytes += size
            if self._outgoing_count >= _FLUSH_COUNT:
                self.flush(name)
        if self._outgoing and self._flush_handle is None:
            self._flush_handle = asyncio.get_running_loop().call_soon(self.flush, name)

    def flush(self, name: str = "") -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        if self._holds.topics:
            for topic in [t for t in self._runs if t in self._holds.topics]:
                self._itemize(topic)  # a hold keeps items
            if self._outgoing:
                count, size = self._holds.take(self._outgoing)
                self._outgoing_count -= count
                self._outgoing_bytes -= size
        if not self._outgoing and not self._runs:
            return
        self._stats["published"] += self._outgoing_count
        outgoing, self._outgoing = self._outgoing, {}
        runs, self._runs = self._runs, {}
        # one topic (the common case): its size is known, so its buffer is allocated once
        single = len(outgoing) + len(runs) == 1
        payload_bytes = self._outgoing_bytes
        count = self._outgoing_count
        self._outgoing_count = self._outgoing_bytes = 0
        for topic, run in runs.items():
            n = len(run)
            size = payload_bytes if single else sum(map(len, run))
            first = self._take_seqs(n)
            label = "" if run.label is None else run.label.get(_codec.CONTENT_TYPE, "")
            batch = _wire.Batch(self.node_id, name, self._topic_seq.get(topic, 0), [],
                                payloads=run, ts=run.ts, seq=first, label=label)
            if not self._send(topic, batch, n, size + _wire.RUN_ITEM_OVERHEAD * n + 256, size):
                return
        for topic, items in outgoing.items():
            size = payload_bytes if single else sum(len(i.payload) for i in items)
            hint = size + _wire.ITEM_OVERHEAD * count + 256 if single else 0
            batch = _wire.Batch(self.node_id, name, self._topic_seq.get(topic, 0), items)
            if not self._send(topic, batch, len(items), hint, size):
                return

    def _send(self, topic: str, batch: _wire.Batch, n: int, hint: int, size: int) -> bool:
        """One batch of `n` messages on one topic (`size` payload bytes); False if the
        socket is closed."""
        self._topic_seq.put(topic, batch.topic_seq + n)
        self.published_by_topic.add(topic, n)
        self.published_bytes_by_topic.add(topic, size)
        frame = _wire.encode_data(_names.topic(topic), batch, hint)
        try:
            self._publisher.send(frame)
        except SocketClosed:
            return False
        return True

    # -- announcing what we publish, holding new topics for their subscribers ---------

    def offer(self, topic: str) -> None:
        """Announce that we publish on `topic` (valid), unless what we announce covers it:
        its subscribers connect to us. At a topic's first publish, and when a wait for its
        subscribers starts. Peers that subscribe to it and are not ready here get its
        messages held for them (see the module doc)."""
        if not self._offers.add(topic):
            return
        if self._announce_handle is None:  # one announcement for a burst of new topics
            self._announce_handle = asyncio.get_running_loop().call_soon(self._announce)
        self._holds.hold(topic)

    def announces(self, pattern: TopicPattern) -> bool:
        """Does what we announce meet `pattern` (can a subscription to it hear us)?"""
        return self._offers.meets(pattern)

    def _announce(self) -> None:
        self._announce_handle = None
        self._announcer.interest_changed()

    def _unready(self, topic: str) -> bool:
        """Is some live peer that subscribes to `topic` not ready at our publisher?"""
        return any(rec.state is PeerState.ALIVE and not self.is_ready(rec)
                   and any(p.matches(topic) for p in rec.subs)
                   for rec in self._peers.records())

    def _send_held(self, topic: str, items: list[_wire.Item]) -> None:
        """Send what a hold kept, in batches of the usual bounds."""
        self._stats["published"] += len(items)
        chunk: list[_wire.Item] = []
        size = 0
        for item in items:
            if chunk and (size + len(item.payload) > self._frame_budget
                          or len(chunk) >= _FLUSH_COUNT):
                if not self._send_items(topic, chunk, size):
                    return
                chunk, size = [], 0
            chunk.append(item)
            size += len(item.payload)
        if chunk:
            self._send_items(topic, chunk, size)

    def _send_items(self, topic: str, items: list[_wire.Item], size: int) -> bool:
        batch = _wire.Batch(self.node_id, self._config.name, self._topic_seq.get(topic, 0),
                            items)
        return self._send(topic, batch, len(items), 0, size)

    # -- subscribing ------------------------------------------------------------

    def subscribe(self, pattern: str, callback: Callback[T] | None, max_pending: int, *,
                  best_effort_only: bool = False, type: type[T] | None = None
                  ) -> Subscription[T]:
        parsed = _names.pattern(pattern)
        sub = Subscription(parsed, max_pending=max_pending, callback=callback,
                           on_close=self._unsubscribe, type=type, stats=self._stats)
        sub.best_effort_only = best_effort_only  # (before the hello announces it)
        new = parsed not in self._links.mine
        self._subs.append(sub)
        self._match_cache.clear()
        self._run_topics.clear()
        self._subscriber.add_prefix(parsed.prefix)
        self._announcer.interest_changed()  # (our readiness marker moves on: set it first)
        if new:
            self._links.mine = (*self._links.mine, parsed)
            self._links.added(parsed)
        return sub

    def _unsubscribe(self, sub: Subscription[Any]) -> None:
        if sub in self._subs:
            self._subs.remove(sub)
            self._match_cache.clear()
            self._run_topics.clear()
            if not self._subscriber.closed:
                self._subscriber.remove_prefix(sub.pattern.prefix)
                self._announcer.interest_changed()
                if all(s.pattern != sub.pattern for s in self._subs):
                    self._links.mine = tuple(p for p in self._links.mine if p != sub.pattern)
                    self._links.removed(sub.pattern)

    def _reliable_wanted(self, topic: str) -> bool:
        """Does a peer subscribe to `topic` other than for a durable's live view (which
        takes best-effort messages only)? If not, reliable messages on it need not go
        out by pub/sub at all: the durables' queues carry them."""
        wanted = self._reliable_copies.get(topic)
        if wanted is None:
            wanted = self._reliable_copies.put(topic, any(
                p.pattern not in rec.feeds and p.matches(topic)
                for rec in self._peers.records() for p in rec.subs))
        return wanted

    def _marker(self) -> bytes:
        return f"{self.node_id}:{self.version}".encode()

    def _matching(self, topic: str) -> tuple[Subscription, ...]:
        subs = self._match_cache.get(topic)
        if subs is None:
            subs = self._match_cache.put(topic, tuple(
                s for s in self._subs if s.pattern.matches(topic)))
        return subs

    def _on_batches(self, batches: list[list[memoryview]]) -> None:
        for frames in batches:
            self._on_data(frames)

    def _on_data(self, frames: Sequence[bytes | memoryview]) -> None:
        try:
            key, batch = _wire.decode_data_message(frames, self._max_wire)
            topic = self._key_topics.get(key)
            if topic is None:
                topic = self._topic_of(key)
        except ProtocolError as exc:
            self._quiet.drop("data", exc.reason)
            return
        items = batch.items
        run = None if items else batch.payloads  # (a run: payloads alone, see `_wire.Batch`)
        n = len(items) if run is None else len(run)
        stream = (batch.source, topic)
        expected = self._expected_seq.get(stream)
        if expected is not None and batch.topic_seq > expected:
            self._count_gap(batch, topic, batch.topic_seq - expected)
        self._expected_seq.put(stream, batch.topic_seq + n)
        self._stats["received"] += n
        self.received_by_peer.add(batch.source, n)
        self._from_peer.add(batch.source, n)
        latency = self._latency
        latency.left -= 1
        if latency.left <= 0 and n:  # sampled: the oldest of the batch, never flattering
            age = time.time() - (items[0].ts if run is None else batch.ts)
            latency.sample(age)
            self._latency_by_topic.sample(topic, age)
        subs = self._matching(topic)
        if not subs:
            return
        # (a run is fresh; a reliable item may be a resend, stamped when first published)
        behind = (self.pacing.behind(batch.source, batch.ts) if run is not None else
                  self.pacing.behind(batch.source, items[0].ts)
                  if n and not items[0].reliable else 0.0)
        msgs = (self._item_messages(batch, topic, subs) if run is None
                else self._run_messages(batch, topic, run))
        if not msgs:
            return
        if len(subs) == 1:  # its own messages: a typed one may decode into them in place
            pause = subs[0]._deliver(msgs, shared=False, one_label=run is not None)
        else:
            pause = max([sub._deliver(msgs) for sub in subs])
        if pause or behind:
            self.pacing.ask(batch.source, max(pause, behind))

    def _item_messages(self, batch: _wire.Batch, topic: str,
                       subs: tuple[Subscription, ...]) -> list[Message]:
        """The messages of a batch of items that are still to be delivered, counted."""
        items = batch.items
        delivered = len(items)
        if all(sub.best_effort_only for sub in subs):  # no Message for what none of them wants
            items = [it for it in items if not it.reliable]
        name, source, now = batch.name, batch.source, time.time()
        msgs = [Message(topic, it.payload, name, source, it.seq, it.ts, it.headers, it.reliable)
                for it in items if it.expires is None or it.expires > now]
        if len(msgs) != len(items):  # their ttl passed on the way (or in our socket's queue)
            self._stats[_ttl.EXPIRED] += len(items) - len(msgs)
            self._expired_by_topic.add(topic, len(items) - len(msgs))
            delivered -= len(items) - len(msgs)
        self.delivered_by_topic.add(topic, delivered)
        return msgs

    def _run_messages(self, batch: _wire.Batch, topic: str, run: list[bytes]) -> list[Message]:
        """The messages of a run: numbered from `batch.seq`, one timestamp, one label."""
        self.delivered_by_topic.add(topic, len(run))
        name, source, ts = batch.name, batch.source, batch.ts
        headers = _codec.label(batch.label) if batch.label else None
        return [Message(topic, data, name, source, seq, ts, headers)
                for seq, data in enumerate(run, batch.seq)]

    def _count_gap(self, batch: _wire.Batch, topic: str, lost: int) -> None:
        self._stats["dropped"] += lost
        self._stats.topics["dropped"].add(topic, lost)
        self._stats.peers["dropped"].add(batch.source, lost)
        first = batch.source not in self.dropped_by_peer
        self.dropped_by_peer.add(batch.source, lost)
        if first and self._gap_warnings < _GAP_WARNINGS:
            self._gap_warnings += 1
            _log.warning("publisher %s (%s) dropped messages for us at its high-water mark; "
                         "this subscriber is too slow (counted in stats, reported once)",
                         batch.name, batch.source[:8])

    def _topic_of(self, key: bytes) -> str:
        try:
            topic = topic_from_key(key)
        except InvalidName as exc:
            raise ProtocolError(f"bad topic key: {exc}") from None
        self._key_topics.put(key, topic)
        return topic

    async def read_markers(self) -> None:
        """Follow which peers' subscriptions are in force here, until the socket closes."""
        while True:
            try:
                markers = await self._publisher.markers()
            except SocketClosed:
                return
            for subscribed, marker in markers:
                # Any SUB can send any subscription: check before int() (which raises on
                # more than 4300 digits) and before keeping the id.
                if not _MARKER_RE.fullmatch(marker):
                    self._quiet.drop("marker", "malformed readiness marker")
                    continue
                peer_id, _, version = marker.decode("ascii").partition(":")
                if subscribed:
                    self._confirmed.put(peer_id, int(version))  # bounded: marker floods
                elif self._confirmed.get(peer_id) == int(version):
                    del self._confirmed[peer_id]
            if self._holds.topics:
                self._holds.check()
            self._waiter.wake()
