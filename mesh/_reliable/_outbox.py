"""The sender's side of at-least-once: spooling, settling, retrying, dead-lettering.

A reliable message is appended to the node's outbox spool before the send
returns (guarantee 1), and stays there until every destination consumed it:
the worker that processed a pushed message, or each durable subscription a
published one was meant for. A failed delivery (nack, lost worker, ack
timeout) counts an attempt and goes again after an exponential backoff; after
``max_attempts`` the message moves to the dead-letter spool with the reason,
where ``zeromesh spool`` shows and replays it.

After a restart, everything still in the spool is delivered again; receivers
drop the duplicates by (sender id, sequence).

A forgotten durable (`_durables`) is no destination any more: `abandon`
takes it off every message waiting for it, and those that waited for nothing
else leave the spool at once, their segments' disk space with them.

Expiry (``ttl``): a message whose ttl passed before it was delivered
somewhere leaves the spool as a delivered one does, but is counted in
``stats["expired"]`` (once per destination it missed) instead of acked; it
is never retried or dead-lettered. That happens when the pusher side finds
it in a queue's backlog (`_work._backlog`), when a failed delivery would
retry it, and on recovery at start.

The fast path (``publish_many(..., reliable=True)``): the messages are made
at once, spooled as one RUN record (one header, one CRC; see `_spool`) handed
to the spool's writer thread at once rather than at the end of the loop
iteration, and handed to the durables' queues one loop iteration after their
commit, so a caller's next batch goes to disk while this one is sent. No
pub/sub copy is made of a reliable message for a peer whose only matching
subscription is a durable's live view (`Hello.feeds`): its queue carries it.
Smaller spooling calls in one iteration still share one commit.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterable
from itertools import repeat
from pathlib import Path
from typing import Final

import msgspec

from .. import _ttl, _wire
from .._config import NodeConfig
from .._parts import Waiter
from .._spool import FsyncPolicy, SpoolStore, unusable
from .._support._tally import Stats, Tallies
from ..errors import ClosedError, MeshError, ProtocolError
from ._dedup import Dedup

_log = logging.getLogger("mesh.spool")
_BACKOFF_CAP: Final[float] = 30.0
_COMMIT_NOW: Final[int] = 64
"""A spooling call of this many messages commits at once, with whatever the same loop
iteration gathered before it, instead of waiting for the end of the iteration: it
needs no company to fill a commit, and the rest of the iteration (acks, sends) can
take milliseconds, which it would otherwise wait on top of the disk."""


class _Batch:
    __slots__ = ("done", "records")

    def __init__(self, done: asyncio.Future[list[int]]) -> None:
        self.done = done
        self.records: list[bytes] = []


class Tracked(msgspec.Struct, gc=False):
    """A spooled message on its way: its spool id and what it still has to reach.

    One is made per reliable message, so nothing in it is a new GC-tracked
    container: it is a Struct without GC tracking (it holds no cycles), and
    `pending` is a tuple, shared by every message of a group until one of
    them is delivered somewhere. (With a set per message, the garbage
    collector's passes over hundreds of thousands of live sets showed in the
    publisher's profile.)
    """

    spool_id: int
    spooled: _wire.Spooled
    pending: tuple[str, ...]


def track(spool_id: int, spooled: _wire.Spooled) -> Tracked:
    """A recovered or replayed message, pending for all its destinations."""
    return Tracked(spool_id, spooled,
                   tuple(spooled.dests) if spooled.kind == "t" else (spooled.name,))


Requeue = Callable[..., None]

DEAD: Final[str] = "dead-lettered"
"""How a followed replayed message ended when it failed every attempt again."""


class Replayed:
    """The dead letters one `Outbox.replay` took, and how each ended.

    Only the messages it replayed count: the outbox may hold others (a
    durable that is offline), which a count of the whole outbox would wait
    for. Followed (``follow=True``), a message that leaves the outbox is
    delivered unless the outbox noted otherwise (`ended`): its ttl passed
    first, or it failed every attempt again.
    """

    def __init__(self, outbox: Outbox) -> None:
        self._outbox = outbox
        self.moved: list[int] = []
        """Their outbox spool ids."""
        self.expired = 0
        """Those whose ttl had passed already: not put back, they left the dead letters."""
        self.ended: dict[int, str] = {}
        """Outbox spool id -> how a moved one ended if not delivered (`_ttl.EXPIRED` for
        any destination, or `DEAD`)."""

    def __len__(self) -> int:
        return len(self.moved) + self.expired

    def outcomes(self) -> Counter[str]:
        """How many are ``delivered``, ``waiting`` (still in the outbox), `_ttl.EXPIRED`
        or `DEAD`."""
        store = self._outbox.store
        out: Counter[str] = Counter({"delivered": 0, "waiting": 0, _ttl.EXPIRED: self.expired,
                                     DEAD: 0})
        for spool_id in self.moved:
            if store.get(spool_id) is not None:
                out["waiting"] += 1
            else:
                out[self.ended.get(spool_id, "delivered")] += 1
        return out

    def close(self) -> None:
        """Stop following them."""
        followed = self._outbox.followed
        for spool_id in self.moved:
            if followed.get(spool_id) is self:
                del followed[spool_id]


class Outbox:
    """The outbox spool of one node and the bookkeeping of its reliable messages."""

    def __init__(self, store: SpoolStore, dead: SpoolStore, stats: Stats,
                 waiter: Waiter, *, max_attempts: int, ack_timeout: float,
                 retry_backoff: float, forgotten: Collection[str] = ()) -> None:
        self.store = store
        self.dead = dead
        self._stats = stats
        self.max_attempts = max_attempts
        self.ack_timeout = ack_timeout
        self.retry_backoff = retry_backoff
        self._tasks: set[asyncio.Task[None]] = set()
        self._retrying: dict[asyncio.TimerHandle, tuple[str, Tracked]] = {}
        """Failed deliveries waiting for their next attempt: (destination, message)."""
        self.forgotten = frozenset(forgotten)
        """Durables forgotten: recovered messages do not wait for them (after `recovered`:
        those of them some spooled message still names)."""
        self._batch: _Batch | None = None
        self._acks: list[int] = []
        self._waiter = waiter
        """Woken when a message left the spool (delivered or dead-lettered)."""
        self.inbox: SpoolStore | None = None
        """The receiving side's dedup marks live here (closed with the rest)."""
        self._burying: dict[int, asyncio.TimerHandle] = {}
        """Messages (by spool id) to move to a dead-letter spool that was full: when."""
        self._unburied = 0
        """Failed attempts to move one there since the last that worked (logged once)."""
        self._closing = False
        self.followed: dict[int, Replayed] = {}
        """Replayed messages whose end someone waits to hear (`Replayed`), by spool id."""

    async def spool_push(self, queue: str, item: _wire.Item) -> Tracked:
        """Put a reliable push on disk; returns once it is there."""
        return (await self._spool_many([_wire.Spooled("q", queue, item)], (queue,)))[0]

    async def spool_publish_many(self, topic: str, items: list[_wire.Item],
                                 dests: list[str]) -> list[Tracked]:
        """Several reliable publishes on disk with one wait."""
        return await self._spool_many([_wire.Spooled("t", topic, item, dests)
                                       for item in items], tuple(dests))

    async def _spool_many(self, spooleds: list[_wire.Spooled],
                          dests: tuple[str, ...]) -> list[Tracked]:
        """Everything spooled in one loop iteration goes to disk as one append (one commit),
        handed to the spool at the end of the iteration or, for a big group, at once."""
        batch = self._batch
        if batch is None:
            batch = self._batch = _Batch(asyncio.get_running_loop().create_future())
            asyncio.get_running_loop().call_soon(self._commit, batch)
        first = len(batch.records)
        encode = _wire.encode_spooled
        batch.records.extend(map(encode, spooleds))
        if len(spooleds) >= _COMMIT_NOW:
            self._commit(batch)
        ids = await asyncio.shield(batch.done)
        self._stats["spooled"] += len(spooleds)
        if spooleds:  # (one topic or one queue per call)
            self._by_name(spooleds[0])["spooled"].add(spooleds[0].name, len(spooleds))
        return list(map(Tracked, ids[first:first + len(spooleds)], spooleds, repeat(dests)))

    def _commit(self, batch: _Batch) -> None:
        if self._batch is not batch:
            return  # committed already (a big group came)
        self._batch = None
        try:
            ids, written = self.store.submit(batch.records)
        except Exception as exc:
            batch.done.set_exception(exc)
            return

        def settle(written: asyncio.Future[None]) -> None:
            if batch.done.done():
                return
            exc = None if written.cancelled() else written.exception()
            if written.cancelled() or exc is not None:
                batch.done.set_exception(exc or ClosedError("spool is closed"))
            else:
                batch.done.set_result(ids)

        written.add_done_callback(settle)

    def recovered(self) -> list[tuple[str, tuple[_wire.Item, Tracked]]]:
        """(destination queue, message) for everything still in the spool, oldest first;
        forgotten durables are no destination (a message only for them leaves the spool),
        and the expired ones leave the spool instead."""
        out = []
        named: set[str] = set()
        unwanted: list[int] = []
        expired: list[Tracked] = []
        now = time.time()
        for spool_id, payload in self.store.pending():
            try:
                spooled = _wire.decode_spooled(payload)
            except ProtocolError as exc:
                _log.warning("skipping unreadable spool record %d: %s", spool_id, exc)
                continue
            tracked = track(spool_id, spooled)
            if self.forgotten and spooled.kind == "t":
                named.update(self.forgotten.intersection(tracked.pending))
                tracked.pending = tuple(d for d in tracked.pending if d not in self.forgotten)
                if not tracked.pending:
                    unwanted.append(spool_id)
            if tracked.pending and _ttl.has_expired(spooled.item, now):
                expired.append(tracked)
                continue
            for dest in tracked.pending:
                out.append((dest, (spooled.item, tracked)))
        self.forgotten = frozenset(named)
        if unwanted:
            self.store.ack(unwanted)
        if expired:
            self._drop_expired(expired)
            _log.info("dropped %d spooled messages whose ttl passed while this node was down",
                      len(expired))
        if out:
            _log.info("resuming %d spooled pushes", len(out))
        return out

    def expired(self, tracked: Iterable[Tracked], dest: str) -> None:
        """These messages' ttl passed before they reached `dest` (a queue): they will not,
        and those with no destination left leave the spool (not as acked)."""
        done = []
        for one in tracked:
            pending = one.pending
            if dest in pending:
                one.pending = pending = tuple(d for d in pending if d != dest)
                self._stats[_ttl.EXPIRED] += 1
                self._by_name(one.spooled)[_ttl.EXPIRED].add(one.spooled.name)
                if self.followed:
                    self._ended(one.spool_id, _ttl.EXPIRED)
                if not pending:
                    done.append(one.spool_id)
        if done:
            self.store.ack(done)
            self._waiter.wake()

    def _drop_expired(self, tracked: list[Tracked], *, ack: bool = True) -> None:
        """Expired for every destination left (recovery; a dead letter replayed too late,
        not in the outbox: `ack` False)."""
        self._stats[_ttl.EXPIRED] += sum(len(one.pending) for one in tracked)
        for one in tracked:
            self._by_name(one.spooled)[_ttl.EXPIRED].add(one.spooled.name, len(one.pending))
            one.pending = ()
        if ack:
            self.store.ack([one.spool_id for one in tracked])
        self._waiter.wake()

    def delivered(self, tracked: Iterable[Tracked], dest: str) -> None:
        """These messages reached `dest`; those that reached every destination are acked
        in the spool at the end of this loop iteration (one batch of ack records)."""
        acks = self._acks
        had = len(acks)
        for one in tracked:
            pending = one.pending
            if dest in pending:
                one.pending = pending = (() if len(pending) == 1 else
                                         tuple(d for d in pending if d != dest))
            if not pending:
                acks.append(one.spool_id)
        if not had and acks:
            asyncio.get_running_loop().call_soon(self._flush_acks)

    def _flush_acks(self) -> None:
        """One ack record batch per loop iteration, however many messages settled."""
        acks, self._acks = self._acks, []
        self.store.ack(acks)
        self._stats["acked"] += len(acks)
        self._waiter.wake()

    def failed(self, tracked: Tracked, reason: str, requeue: Requeue, dest: str) -> None:
        """One delivery attempt to `dest` (a queue) failed: retry after a backoff, or
        dead-letter it."""
        if not self.attempt_failed(tracked, reason, dest):
            return
        delay = self._backoff(tracked.spooled.attempts)
        handle = asyncio.get_running_loop().call_later(
            delay, self._retry, requeue, dest, (tracked.spooled.item, tracked))
        self._retrying[handle] = (dest, tracked)

    def _backoff(self, attempts: int) -> float:
        """Seconds to wait before trying again after `attempts` failed ones (doubling)."""
        factor: int = 2 ** (attempts - 1)
        return min(_BACKOFF_CAP, self.retry_backoff * factor)

    def attempt_failed(self, tracked: Tracked, reason: str, dest: str) -> bool:
        """Count one failed attempt to `dest`; False when the message is done with (its
        ttl passed, or it goes to the dead-letter spool now), True when it is to go again."""
        spooled = tracked.spooled
        if _ttl.has_expired(spooled.item):  # no retry, no dead letter: it is over
            self.expired((tracked,), dest)
            return False
        spooled.attempts += 1
        self._stats["redelivered"] += 1
        self._by_name(spooled)["redelivered"].add(spooled.name)
        if spooled.attempts >= self.max_attempts:
            spooled.reason = reason
            self._start_bury(tracked)
            return False
        return True

    def _by_name(self, spooled: _wire.Spooled) -> Tallies:
        """Where a spooled message's events are counted by name: its topic or its queue
        (a durable's deliveries count on the topic, which is the name people know)."""
        return self._stats.topics if spooled.kind == "t" else self._stats.queues

    def _retry(self, requeue: Requeue, dest: str, sent: tuple[_wire.Item, Tracked]) -> None:
        now = asyncio.get_running_loop().time()
        self._retrying = {h: r for h, r in self._retrying.items() if h.when() > now}
        requeue(dest, sent)

    def retrying(self, dest: str) -> int:
        """Messages for `dest` waiting for their next attempt."""
        return sum(1 for d, _ in self._retrying.values() if d == dest)

    def abandon(self, dest: str, held: Iterable[Tracked]) -> int:
        """Stop delivering to `dest` (a forgotten durable's queue).

        These messages (its backlog, taken from the work queues) and those
        waiting to be retried there no longer wait for it; each that waited
        for nothing else leaves the spool now, and the disk space of segments
        left with nothing pending comes back (`SpoolStore.reclaim`).

        Returns:
            How many messages were waiting for `dest`.
        """
        taken = list(held)
        for handle, (where, one) in list(self._retrying.items()):
            if where == dest:
                handle.cancel()
                del self._retrying[handle]
                taken.append(one)
        waited, acks = 0, []
        for one in taken:
            if dest not in one.pending:
                continue  # delivered there already, or counted once
            waited += 1
            one.pending = tuple(d for d in one.pending if d != dest)
            if not one.pending:
                acks.append(one.spool_id)
        if acks:
            self.store.ack(acks)
            self._stats["abandoned"] += len(acks)
            self._waiter.wake()
        self.store.reclaim()
        return waited

    def _start_bury(self, tracked: Tracked) -> None:
        task = asyncio.get_running_loop().create_task(self._bury(tracked))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _bury(self, tracked: Tracked) -> None:
        spooled = tracked.spooled
        try:
            dead_id = await self.dead.append(_wire.encode_spooled(spooled))
        except MeshError as exc:  # (full, or not writable: nothing is lost, it waits)
            self._bury_later(tracked, exc)
            return
        except Exception:  # (a bug: say so; it stays in the outbox)
            _log.exception("cannot move message %d to the dead-letter spool", tracked.spool_id)
            return
        if self._unburied:
            _log.warning("the dead-letter spool takes messages again (%d attempt(s) to move "
                         "one there failed meanwhile)", self._unburied)
            self._unburied = 0
        if self.followed:
            self._ended(tracked.spool_id, DEAD)
        self.store.ack((tracked.spool_id,))
        self._stats["dead_lettered"] += 1
        self._by_name(spooled)["dead_lettered"].add(spooled.name)
        self._waiter.wake()
        # (the dead letter's id, the one replay and purge take, not the outbox's)
        _log.warning("message on %s dead-lettered after %d attempts: %s (dead letter %d)",
                     spooled.name, spooled.attempts, spooled.reason, dead_id)

    def _bury_later(self, tracked: Tracked, exc: MeshError) -> None:
        """The dead-letter spool is full (or cannot be written): the message stays in the
        outbox, and goes there when it can, tried again after the retry backoff. Logged
        once until one goes (every failed message would be a line)."""
        if self._closing:
            return  # (it stays in the outbox: delivered again after a restart)
        self._unburied += 1
        delay = self._backoff(tracked.spooled.attempts)
        if self._unburied == 1:
            _log.error("cannot move message %d to the dead-letter spool: %s; it stays in "
                       "the outbox, tried again every %g s (logged once until one goes)",
                       tracked.spool_id, exc, delay)
        self._burying[tracked.spool_id] = asyncio.get_running_loop().call_later(
            delay, self._bury_again, tracked)

    def _bury_again(self, tracked: Tracked) -> None:
        del self._burying[tracked.spool_id]
        if self.store.get(tracked.spool_id) is not None:  # (not purged meanwhile)
            self._start_bury(tracked)

    def _ended(self, spool_id: int, how: str) -> None:
        replayed = self.followed.get(spool_id)
        if replayed is not None:
            replayed.ended[spool_id] = how

    async def replay(self, ids: set[int] | None, requeue: Requeue, *,
                     follow: bool = False) -> Replayed:
        """Move dead letters (all, or those `ids`) back into the outbox, and say which.

        One whose ttl has passed is not: it leaves the dead letters, counted as
        expired, as it would leave any spool. `follow`: note how each moved one
        ends (see `Replayed`; close it when done).
        """
        replayed = Replayed(self)
        for record_id, payload in self.dead.pending():
            if ids is not None and record_id not in ids:
                continue
            try:
                spooled = _wire.decode_spooled(payload)
            except ProtocolError:
                continue
            spooled.attempts, spooled.reason = 0, ""
            if _ttl.has_expired(spooled.item):
                self.dead.ack((record_id,))
                self._drop_expired([track(0, spooled)], ack=False)
                replayed.expired += 1
                continue
            spool_id = await self.store.append(_wire.encode_spooled(spooled))
            tracked = track(spool_id, spooled)
            self.dead.ack((record_id,))
            if follow:
                self.followed[spool_id] = replayed
            replayed.moved.append(spool_id)
            for dest in tracked.pending:
                requeue(dest, (spooled.item, tracked))
        return replayed

    async def aclose(self) -> None:
        self._closing = True
        if self._acks:
            self._flush_acks()
        for handle in [*self._retrying, *self._burying.values()]:
            handle.cancel()
        for task in list(self._tasks):
            await task
        await self.store.aclose()
        await self.dead.aclose()
        if self.inbox is not None:
            await self.inbox.aclose()


async def open_spools(data_dir: str, config: NodeConfig, stats: Stats,
                      waiter: Waiter, forgotten: Collection[str] = ()) -> tuple[Outbox, Dedup]:
    """The outbox, dead-letter and inbox (dedup) spools under `data_dir`/spool; messages
    in it no longer wait for the `forgotten` durables.

    Raises:
        ConfigError: the directory cannot be used.
    """
    root = Path(data_dir) / "spool"
    policy = config.fsync
    out = SpoolStore(root / "out", fsync=policy, quota_bytes=config.spool_quota)
    dead = SpoolStore(root / "dead", fsync=policy, quota_bytes=config.spool_quota)
    inbox = SpoolStore(root / "in", fsync=FsyncPolicy.OFF, quota_bytes=config.spool_quota)
    try:
        for store in (out, dead, inbox):
            report = await store.start()
            if not report.clean:
                stats["spool_damage"] += report.corrupt_records + (1 if report.torn_bytes else 0)
    except OSError as exc:
        for store in (out, dead, inbox):
            await store.aclose()
        raise unusable(exc) from None
    dedup = Dedup(inbox)
    dedup.load()
    outbox = Outbox(out, dead, stats, waiter, max_attempts=config.max_attempts,
                    ack_timeout=config.ack_timeout, retry_backoff=config.retry_backoff,
                    forgotten=forgotten)
    outbox.inbox = inbox
    return outbox, dedup
