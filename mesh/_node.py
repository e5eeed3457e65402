"""AsyncNode: the public asyncio API of a node — pub/sub, durables, work queues, services.

Every method here is a thin, validated entry into one pattern component; the
node's lifecycle and peer view are in `_core`.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from datetime import datetime
from typing import Any

from . import _codec, _names, _trace, _ttl, _wire
from ._codec import Payload
from ._memory._history import check_last, start_of
from ._message import Message, T
from ._node_p2p import WorkAndServices
from ._pubsub._subscription import DEFAULT_MAX_PENDING, Callback, Subscription, check_callback
from ._reliable import _dead
from ._reliable._durables import DurableInfo, durable_queue
from ._reliable._outbox import Replayed
from ._support._text import quoted
from ._work._pull import NO_SETTLE, Pull
from ._work._queues import DEFAULT_PREFETCH
from ._work._target import Sent
from .errors import ClosedError, ConfigError, RequestTimeout


def _labelled(payloads: Iterable[Payload], headers: Mapping[str, str] | None
              ) -> Iterator[tuple[bytes | str, Mapping[str, str] | None]]:
    """Each payload ready to send with its headers: typed ones encoded and labelled."""
    for data in payloads:
        yield _codec.prepared(data, headers)


def _headers_of(labelled: tuple[bytes | str, Mapping[str, str] | None]
                ) -> Mapping[str, str] | None:
    return labelled[1]


class AsyncNode(WorkAndServices):
    """A zeromesh node on asyncio. Use ``async with AsyncNode(...) as node:``.

    Args:
        config: Complete settings; when omitted they come from ``ZEROMESH_*``
            environment variables and the keyword arguments.
        **settings: Any `NodeConfig` field (``name``, ``mesh``, ``interfaces``,
            ``peers``, ``data_dir``, ``heartbeat_interval``, ``lost_after``...).

    Raises:
        ConfigError: a setting is invalid.
    """

    # -- pub/sub -----------------------------------------------------------------

    async def publish(self, topic: str, data: Payload, *,
                      headers: Mapping[str, str] | None = None, reliable: bool = False,
                      retain: bool = False, ttl: float | None = None) -> None:
        """Publish to every matching subscriber in the mesh (and on this node).

        `data` is sent byte for byte when it is bytes or str; any other value
        (a msgspec Struct, a dataclass, a dict, a list...) is encoded with
        msgspec and labelled with a ``content-type`` header: MessagePack, or
        JSON when `headers` already say ``content-type: application/json``
        (subscribe with ``type=`` to receive it decoded).

        Best effort: returns as soon as the message is queued; it leaves at the
        end of this loop iteration. ``reliable=True`` (needs a data dir): also
        returns only once the message is in this node's spool for every
        durable subscription it matches, each of which gets it at least once,
        online or not, across restarts of either side. ``retain=True``: it
        also becomes its topic's retained value here (kept in the data dir
        when there is one), which every later subscription receives first;
        an empty retained message clears the topic.

        ``ttl=S``: a copy not delivered within S seconds of the message's
        timestamp is never delivered (and leaves every spool), counted in
        ``stats["expired"]`` where it was dropped.

        Raises:
            ConfigError: `topic` is invalid, or `ttl` is not a number > 0.
            MessageTooLarge: `data` exceeds ``max_message_size``.
            SpoolFullError: (reliable) the spool quota or the disk is full.
            TypeError: msgspec cannot encode `data`.
            ClosedError: the node is not running.
        """
        if type(data) is not bytes and type(data) is not str:  # (bytes: one check)
            if headers is None and _codec.ENCODED_TYPES.get(type(data)):  # (typed: no call)
                data, headers = _codec.msgpack_encode(data), _codec.LABEL
            else:
                data, headers = _codec.prepared(data, headers)
        if retain:
            if reliable:
                await self.publish_many(topic, (data,), headers=headers, reliable=True,
                                        retain=True, ttl=ttl)
                return
            live = self._live()
            if ttl is not None:
                ttl = _ttl.check(ttl)
            if _trace.ON:
                with _trace.producing("publish", topic, headers) as headers:
                    item = live.pubsub.publish_retained(topic, data, headers,
                                                        self._config.name, ttl)
            else:
                item = live.pubsub.publish_retained(topic, data, headers, self._config.name,
                                                    ttl)
            live.retained.store.put(topic, item)
            return
        if not reliable:  # `publish_nowait`, inlined: this is the hot path
            run = self._run
            if run is None or self._closing:
                raise ClosedError("node is not running (use `async with` or `await start()`)")
            if ttl is not None:
                ttl = _ttl.check(ttl)
            if _trace.ON:
                with _trace.producing("publish", topic, headers) as headers:
                    flushed = run.pubsub.publish(topic, data, headers, self._config.name, ttl)
                if flushed:
                    await run.pubsub.pacing.paced()
            elif run.pubsub.publish(topic, data, headers, self._config.name, ttl):
                await run.pubsub.pacing.paced()  # a batch left: readers, timers, a pause
            return
        await self.publish_many(topic, (data,), headers=headers, reliable=True, ttl=ttl)

    async def publish_many(self, topic: str, payloads: Iterable[Payload], *,
                           headers: Mapping[str, str] | None = None,
                           reliable: bool = False, retain: bool = False,
                           ttl: float | None = None) -> None:
        """Publish several messages on one topic; with ``reliable=True`` they reach disk
        with a single wait (one group commit), which is how to go fast reliably.
        With ``retain=True`` the last one is the topic's retained value.

        Raises:
            Same as `publish`.
        """
        ttl = _ttl.check(ttl)
        if _trace.ON and (reliable or retain):  # one span for the batch (see `_trace`)
            payloads = list(payloads)
            with _trace.producing("publish", topic, headers, len(payloads)) as headers:
                await self._publish_many(topic, payloads, headers, reliable, retain, ttl)
            return
        await self._publish_many(topic, payloads, headers, reliable, retain, ttl)

    async def _publish_many(self, topic: str, payloads: Iterable[Payload],
                            headers: Mapping[str, str] | None, reliable: bool, retain: bool,
                            ttl: float | None) -> None:
        if retain and not reliable:
            run = self._live()
            item = None
            for payload, hdrs in _labelled(payloads, headers):
                item = run.pubsub.publish_retained(topic, payload, hdrs, self._config.name,
                                                   ttl)
            if item is not None:
                run.retained.store.put(topic, item)
            return
        if not reliable:
            for data in payloads:
                await self.publish(topic, data, headers=headers, ttl=ttl)
            return
        if self._config.data_dir is None:
            raise ConfigError("reliable", "needs a data dir (the spool lives there)")
        run = self._live()
        assert run.outbox is not None  # (a data dir has an outbox)
        items = []
        for hdrs, run_of in itertools.groupby(_labelled(payloads, headers), _headers_of):
            items += run.pubsub.publish_reliable(topic, (d for d, _ in run_of), hdrs,
                                                 self._config.name, ttl)
        if retain and items:
            run.retained.store.put(topic, items[-1])
        dests = self._durables.matching(topic)
        if not dests:
            return
        tracked = await run.outbox.spool_publish_many(topic, items, dests)
        # Handed to the durables' queues at the next loop iteration rather than here: a
        # caller publishing batch after batch has its next one on the way to disk
        # meanwhile, so that commit overlaps these sends instead of following them.
        asyncio.get_running_loop().call_soon(self._hand_out, dests,
                                             list(zip(items, tracked, strict=True)))

    def _hand_out(self, dests: list[str], sents: Sequence[Sent]) -> None:
        """Spooled messages go to their durables' queues (in spooling order: call_soon is
        FIFO). A node closed meanwhile has them in its spool for its next start; a durable
        forgotten meanwhile does not get them."""
        if self.running:
            run = self._live()
            for dest in dests:
                if self._durables.knows(dest):
                    run.work.requeue_many(dest, sents)
                elif run.outbox is not None:
                    run.outbox.abandon(dest, [t for _, t in sents if t is not None])

    def publish_nowait(self, topic: str, data: Payload, *,
                       headers: Mapping[str, str] | None = None,
                       ttl: float | None = None) -> bool:
        """Best-effort `publish` without the await, for use on the loop; True when it
        flushed a batch (a good moment to yield)."""
        if type(data) is not bytes and type(data) is not str:
            data, headers = _codec.prepared(data, headers)
        if ttl is not None:
            ttl = _ttl.check(ttl)
        if _trace.ON:
            with _trace.producing("publish", topic, headers) as headers:
                return self._live().pubsub.publish(topic, data, headers, self._config.name,
                                                   ttl)
        return self._live().pubsub.publish(topic, data, headers, self._config.name, ttl)

    async def subscribe(self, pattern: str, *, type: type[T] | None = None,
                        callback: Callback[T] | None = None,
                        max_pending: int = DEFAULT_MAX_PENDING,
                        retained: bool = True, since: float | datetime | None = None,
                        last: int | None = None) -> Subscription[T]:
        """Receive messages on topics matching `pattern` (``*`` one segment, ``>`` the rest).

        With ``type=T`` (a msgspec Struct, a dataclass, ``dict[str, float]``...)
        each message is decoded by its content type (MessagePack when it has
        none) and arrives as a `Message[T]` whose ``value`` is the T; one that
        is not a T is skipped and counted in the subscription's
        ``decode_errors`` (and the node's ``decode_errors`` total).

        First comes the retained value of every matching topic in the mesh (for
        each topic the newest across its publishers), then live messages, with
        no gap and no duplicate between the two; ``retained=False`` starts with
        live messages only. With `since` (seconds ago, or a `datetime`) and/or
        `last` (the newest N of each topic), it starts instead with the history
        every live publisher kept of matching topics (see ``history`` in
        `NodeConfig`), merged in timestamp order and in order per publisher,
        then goes live, again with no gap and no duplicate. With `callback`,
        each message is passed to it on the loop instead of being queued for
        iteration. `max_pending` bounds the queue (0 = no bound).

        Raises:
            ConfigError: `pattern`, `since` or `last` is invalid, or msgspec cannot decode
                into `type`.
            TypeError: `callback` is an async function (iterate the subscription instead).
            ClosedError: the node is not running.
        """
        start = start_of(since)
        check_last(last)
        check_callback(callback)
        run = self._live()
        if callback is not None and _trace.ON:
            callback = _trace.traced(callback, "deliver", subscription=pattern)
        sub = run.pubsub.subscribe(pattern, callback, max_pending, type=type)
        if start is not None or last is not None:
            run.history.fill(sub, run.membership.interest_version, since=start or 0.0,
                             last=last or 0)
        elif retained:
            run.retained.fill(sub, run.membership.interest_version)
        return sub

    async def last(self, pattern: str, *, timeout: float = 5.0) -> list[Message]:
        """The retained value of every topic matching `pattern` in the mesh (for each topic
        the newest across its publishers, this node included), in topic order.

        A publisher that does not answer within `timeout` is left out, and so is one
        whose first retained value is so fresh that the news it retains has not reached
        us yet (milliseconds on a LAN; a subscription asks it once it has).

        Raises:
            ConfigError: `pattern` is invalid or `timeout` is not positive.
            ClosedError: the node is not running.
        """
        if timeout <= 0:
            raise ConfigError("timeout", "must be > 0")
        parsed = _names.pattern(pattern)
        values, _ = await self._live().retained.gather(parsed, timeout=timeout)
        return values

    async def replay_dead_letters(self, ids: set[int] | None = None) -> int:
        """Give dead letters (all, or those spool `ids`) a new round of delivery attempts.

        Returns:
            How many went back into the outbox (not those whose ttl had passed: they
            leave the dead letters, counted as expired).

        Raises:
            ConfigError: the node has no data dir.
        """
        return len((await self._replay(ids)).moved)

    async def _replay(self, ids: set[int] | None, *, follow: bool = False) -> Replayed:
        """`replay_dead_letters`, saying which went back and (`follow`) how each ends:
        ``zeromesh spool replay`` waits for those alone."""
        run = self._live()
        if run.outbox is None:
            raise ConfigError("data_dir", "dead letters live in a data dir; none is set")
        return await run.outbox.replay(ids, run.work.requeue, follow=follow)

    def dead_letters(self) -> list[dict[str, Any]]:
        """The dead letters in this node's spool, oldest first (see `_reliable._dead`;
        empty without a data dir)."""
        outbox = self._live().outbox
        return _dead.dead_letters(outbox) if outbox is not None else []

    def purge_dead_letters(self, ids: Collection[int] | None = None) -> int:
        """Delete dead letters (all, or those spool `ids`); how many went."""
        outbox = self._live().outbox
        return _dead.purge(outbox, ids) if outbox is not None else 0

    def spool_figures(self) -> dict[str, Any]:
        """The spool's depth, bytes, quota, oldest age, fsync policy and dead letters."""
        cfg = self.config
        return _dead.spool_figures(self._live().outbox, cfg.spool_quota, cfg.fsync.value)

    async def dead_letter(self, queue: str, msg: Message, *, reason: str,
                          attempts: int) -> None:
        """Keep a message this node's application gave up on in the dead-letter spool.

        Replaying it (`replay_dead_letters`, ``zeromesh spool replay``) pushes
        it to `queue` again as a reliable message from this node, with a new
        sequence number so the receiver's dedup lets it through.

        Raises:
            ConfigError: no data dir, or `queue` is invalid.
            SpoolFullError: the dead-letter spool is full.
        """
        outbox = self._live().outbox
        if outbox is None:
            raise ConfigError("dead_letter", "needs a data dir (the spool lives there)")
        _names.queue(queue)
        item = _wire.Item(self._next_seq(), msg.timestamp, dict(msg.headers or {}) or None,
                          msg.data, True, msg.topic)
        record = _wire.Spooled("q", queue, item, attempts=attempts, reason=reason)
        await outbox.dead.append(_wire.encode_spooled(record))
        self.stats["dead_lettered"] += 1
        self.stats.queues["dead_lettered"].add(queue)

    @property
    def spool_pending(self) -> int:
        """Reliable messages in this node's spool not yet delivered everywhere."""
        outbox = self._run.outbox if self._run is not None else None
        return len(outbox.store) if outbox is not None else 0

    async def wait_for_spool(self, *, timeout: float = 10.0) -> None:
        """Wait until every spooled message has been delivered (and acknowledged).

        Raises:
            RequestTimeout: some were still pending when the timeout came.
        """
        await self._wait(lambda: self.spool_pending == 0, timeout, "waiting for the spool")

    async def wait_for_durables(self, topic: str, count: int = 1, *,
                                timeout: float = 10.0) -> None:
        """Wait until this node knows `count` durable subscriptions matching `topic`
        (from then on its reliable publishes are spooled for them, online or not).

        Raises:
            RequestTimeout: fewer were known when the timeout came.
        """
        _names.topic(topic)
        await self._wait(lambda: len(self._durables.matching(topic)) >= count, timeout,
                         f"waiting for {count} durable subscriptions of {quoted(topic)}")

    def durables(self) -> list[DurableInfo]:
        """The durable subscriptions this node spools reliable messages for (learned from
        peers' hellos, kept in its data dir), by queue name, with their backlogs (messages
        spooled in this loop iteration count from the next one, when they reach the
        durables' queues)."""
        return self._durables.infos(self._durable_backlog)

    async def forget_durable(self, name: str) -> int:
        """Stop spooling for a durable subscription and free its backlog at once.

        For a durable its subscriber abandoned: every publisher spools for a
        known durable until it comes back (or until ``durable_expiry``, 7
        days by default, without any peer announcing it). Its spooled
        messages leave the spool unless other durables still wait for them,
        and the disk space of the spool segments emptied comes back. If the
        durable is announced again — now, because its owner is online, or
        later — it is learned again as new: messages published while it was
        forgotten are not spooled for it and are lost to it.

        Args:
            name: Its queue name (``_durable.<owner id>.<name>``, as `durables`
                lists it), or just its name when only one owner has one of that name.

        Returns:
            How many spooled messages were waiting for it.

        Raises:
            ConfigError: no known durable has that name, or several do (the
                message lists them), or the node has no data dir.
            ClosedError: the node is not running.
        """
        return await self._forget_durable(name)

    async def end_durable(self, name: str) -> int:
        """End this node's own durable subscription `name` for good: publishers stop
        spooling for it and free what they spooled for it.

        Closing its `Pull` does not end it (its subscriber may come back); this
        does. The node stops announcing it and announces it ended instead
        (for ``durable_expiry``, across restarts: the data dir keeps that); each
        publisher forgets it on hearing so, as with `forget_durable`, a
        publisher offline meanwhile when it next hears this node. Subscribing
        to `name` again later makes a new durable: what was published
        meanwhile is lost to it.

        Returns:
            How many messages this node's own spool held for it (now freed).

        Raises:
            ConfigError: `name` is invalid, a subscription to it is open here (close it
                first), or the node has no data dir.
            ClosedError: the node is not running.
        """
        return await self._end_durable(name)

    async def subscribe_durable(self, pattern: str, name: str, *,
                                prefetch: int = DEFAULT_PREFETCH,
                                since: float | datetime | None = None,
                                last: int | None = None) -> Pull:
        """A durable subscription: kept in this node's data dir under `name`.

        Publishers that have seen it spool every reliable message matching
        `pattern` for it, online or not; restarting with the same data dir and
        name resumes it. Best-effort messages arrive too while it runs; with
        `since` / `last` (as in `subscribe`) it first gets the best-effort
        messages the publishers kept in their history (reliable ones come
        through its spooled queue, as always, once each).
        Acknowledge with ``msg.ack()`` (or implicitly by asking for the next).

        Raises:
            ConfigError: `pattern`, `name`, `since` or `last` is invalid, or there is no
                data dir.
            ClosedError: the node is not running.
        """
        start = start_of(since)
        check_last(last)
        run = self._live()
        if run.outbox is None:
            raise ConfigError("durable", "needs a data dir (its state lives there)")
        queue = durable_queue(self._id, _names.durable(name))
        _names.queue(queue)
        _names.pattern(pattern)
        open_on = self._durables.mine.get(queue)
        if open_on not in (None, pattern) and queue in run.work.workers.local:
            raise ConfigError("durable", f"{quoted(name)} is open already, on {quoted(open_on)}")
        self._durables.own(queue, pattern)
        pull = run.work.pull(queue, prefetch, None)
        local = run.work.workers.local[queue]

        def live(msg: Message) -> None:
            if not msg.reliable:  # reliable ones come through the durable queue instead
                local.put(((msg, NO_SETTLE),))

        sub = run.pubsub.subscribe(pattern, live, 0, best_effort_only=True)
        if start is not None or last is not None:
            run.history.fill(sub, run.membership.interest_version, since=start or 0.0,
                             last=last or 0)
        pull.on_closed(sub.aclose)
        return pull

    async def wait_for_subscribers(self, topic: str, count: int = 1, *,
                                   timeout: float = 10.0) -> None:
        """Wait until `count` peers subscribed to `topic` are connected and ready.

        Once this returns, a message published on `topic` reaches those peers
        (no slow-joiner loss). Subscribers connect to a publisher only for what
        it publishes on: this node announces `topic` as such from now on.

        Raises:
            ConfigError: `topic` is not a valid topic.
            RequestTimeout: fewer were ready when the timeout came.
        """
        _names.topic(topic)
        self._offer(topic)
        what = f"waiting for {count} subscribers of {quoted(topic)}"
        try:
            await self._wait(lambda: self.subscriber_count(topic) >= count, timeout, what)
        except RequestTimeout:
            run = self._run
            unreachable = 0 if run is None else run.membership.unreachable_subscribers(topic)
            if not unreachable:
                raise
            raise RequestTimeout(f"{what} ({unreachable} more on an address family this node "
                                 "has no interface of: IPv4 or IPv6)", timeout) from None

    async def wait_for_known_subscribers(self, topic: str, *, timeout: float = 10.0) -> int:
        """Wait until every alive peer known to subscribe to `topic` is ready; return how many.

        Raises:
            RequestTimeout: some were still not ready when the timeout came.
        """
        _names.topic(topic)
        self._offer(topic)
        await self._wait(lambda: self.subscriber_count(topic) >= self._known_count(topic),
                         timeout, f"waiting for the subscribers of {quoted(topic)}")
        return self.subscriber_count(topic)

    def _offer(self, topic: str) -> None:
        """Announce `topic` as one we publish on, so its subscribers connect to us."""
        if self._run is not None and not self._closing:
            self._run.pubsub.offer(topic)

    def _known_count(self, topic: str) -> int:
        return sum(1 for rec in self._alive() if any(p.matches(topic) for p in rec.subs))

    def subscriber_count(self, topic: str) -> int:
        """Peers whose subscriptions matching `topic` are in force at our publisher."""
        if self._run is None:
            return 0
        pubsub = self._run.pubsub
        return sum(1 for rec in self._alive()
                   if pubsub.is_ready(rec) and any(p.matches(topic) for p in rec.subs))

    def check_topic(self, topic: str) -> None:
        """Validate a topic name.

        Raises:
            ConfigError: it is not a valid topic.
        """
        _names.topic(topic)
