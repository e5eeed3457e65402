"""Work queues: each pushed message goes to exactly one live worker, chosen by credit.

Pusher side (this module). Every worker announces, per queue, a credit
window: how many of one pusher's messages it will hold unprocessed. A pusher
keeps a `Target` per (worker, queue) and sends only while that target has
credit, so messages are never queued up behind a slow worker: a worker 10x
slower gets about 10x fewer. Among workers with credit the choice is round
robin, so equal workers share equally. With no worker at all, a best-effort
`push` waits up to its timeout and then raises `NoRespondersError`; it never
silently drops. Each target is one numbered stream (an *epoch*); credits name
the epoch, so a credit from a stream we gave up on can never settle another.

Worker side: see `_credit` (receiving, crediting) and `_pull` (the application's
handles); one worker as the pusher sees it: `_target`.

Departures. A worker that leaves gracefully first sends its final credits,
then its goodbye (or a hello without the queue) on the same ordered control
link; the pusher puts exactly the unconsumed messages back in front of the
queue. A worker that is lost (SIGKILL, cable cut) takes its in-flight
best-effort messages with it (counted in ``stats["lost_in_flight"]``).

Reliable pushes (``reliable=True``) go through the pusher's spool first and
return once on disk, worker or not. They stay in the spool until a worker
consumed them; a lost worker, a ``nack`` or an ack timeout sends them again
(with backoff) to a live worker, and after ``max_attempts`` they move to the
dead-letter spool. A message with a ttl is never handed out once expired
(`_backlog`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Final

from patterns import Context, Pusher, SocketClosed

from .. import _names, _ttl, _wire
from .._config import NodeConfig
from .._membership._listener import ControlRoutes, ControlSender
from .._membership._peers import PeerRecord, PeerState, PeerTable
from .._message import Decoding, Message, T, sent_headers
from .._parts import Announcer
from .._reliable._dedup import Dedup
from .._reliable._durables import PREFIX as _DURABLE_PREFIX
from .._reliable._outbox import Outbox, Tracked
from .._support._cache import BoundedDict
from .._support._quiet import QuietLog
from .._support._tally import Stats
from .._support._text import quoted
from ..errors import ClosedError, ConfigError, MessageTooLarge, NoRespondersError, RequestTimeout
from ._backlog import Backlogs
from ._credit import Workers
from ._pull import Handler, Pull
from ._target import Flight, Sent, Target

_DURABLE_QUEUES: Final[str] = _DURABLE_PREFIX + "."

_log = logging.getLogger("mesh.workqueue")
DEFAULT_PREFETCH: Final[int] = 8192
"""The most unprocessed messages a worker may hold from each pusher (and, best effort,
lose if it is killed). The window in use adapts below it (`_window`): about 20 ms of the
worker's own work, so a slow worker holds a few and a fast one enough to cover a credit's
trip back (a fixed window stalls the pusher for a round trip each time it is used up; see
benchmarks/README.md)."""
_PUSH_LINGER: Final[float] = 2.0
"""How long a closing node's pushers may still take to send what is queued."""
_TURN: Final[int] = 64
"""A worker's turn in the round robin: at most this many messages (see `_pick`)."""


_wall_clock: Final = time.time


_MAX_FIGURES: Final[int] = 1000


def _one_by_one(next_seq: Callable[[], int], n: int) -> int:
    """`n` consecutive sequence numbers from a counter that only counts up by one."""
    first = next_seq()
    for _ in range(n - 1):
        next_seq()
    return first


@dataclass(slots=True)
class QueueCounts:
    """One queue as this node sees it (see `WorkQueues.figures`)."""

    workers: int
    in_flight: int
    backlog: int
    sent: int
    """Messages this node handed to the queue's workers so far (a running total)."""


class WorkQueues:
    """Push/pull for one node: pusher-side dispatch plus the worker side (`Workers`)."""

    def __init__(self, ctx: Context, config: NodeConfig, quiet: QuietLog, stats: Stats,
                 *, peers: PeerTable, control: ControlSender, announcer: Announcer,
                 next_seq: Callable[[], int], outbox: Outbox | None = None,
                 dedup: Dedup | None = None,
                 take_seqs: Callable[[int], int] | None = None) -> None:
        self._next_seq = next_seq
        self._take_seqs = take_seqs or partial(_one_by_one, next_seq)
        """`n` consecutive sequence numbers, the first returned (one run's range)."""
        self._ctx = ctx
        self._config = config
        self._stats = stats
        self._sent = stats.queues["sent"]
        self._sent_to = stats.peers["sent"]
        self._closed = False
        self._peers = peers
        self._announcer = announcer
        self._outbox = outbox
        self.workers = Workers(ctx, quiet, stats, max_wire=_wire.max_frame(config.max_message_size),
                               control=control, dedup=dedup or Dedup(), peers=peers)
        self.node_id = ""
        self.name = ""
        self._epoch = time.time_ns()
        self._pushers: dict[str, Pusher] = {}
        self._targets: dict[tuple[str, str], Target] = {}
        self._rr: dict[str, int] = {}
        self._target_cache: dict[str, list[Target]] = {}
        self._current: dict[str, Target] = {}
        """Per queue, the target of the current round-robin turn (see `_pick`)."""
        self._queue_keys: BoundedDict[str, bytes] = BoundedDict()
        self._max_size = config.max_message_size
        self._frame_budget = _wire.frame_budget(config.max_message_size)
        self._backlog = Backlogs(outbox, stats)
        self._waiters: dict[str, list[asyncio.Future[None]]] = {}
        self._flush_handle: asyncio.Handle | None = None
        self._dirty: set[Target] = set()
        self._uncounted = 0

    # -- lifecycle ---------------------------------------------------------------

    @property
    def endpoints(self) -> list[str]:
        return self.workers.endpoints

    @property
    def queues(self) -> dict[str, int]:
        return self.workers.queues

    def bind(self, interfaces: Iterable[str]) -> list[str]:
        return self.workers.bind(interfaces)

    def hello_fields(self, version: int) -> Mapping[str, Any]:
        return {"pull": self.endpoints, "queues": self.queues, "runs": True}

    @property
    def control_routes(self) -> ControlRoutes:
        """The control messages this part handles."""
        return {_wire.Credit: self.on_credit, _wire.Nack: self.on_nack}

    def start(self, node_id: str, name: str) -> None:
        self.node_id, self.name = node_id, name
        if self._outbox is not None:
            for queue, sent in self._outbox.recovered():
                self._backlog.add(queue, sent)
        self.workers.start(node_id)

    async def stop_handles(self, grace: float) -> None:
        """Closing, while the heartbeats still go: see `Workers.stop_handles`."""
        await self.workers.stop_handles(grace)

    def prepare_leave(self) -> None:
        """Before the goodbye: flush pushes and report final credits, in that order."""
        self.workers.leave()
        self._flush()
        self.workers.send_credits()

    @property
    def owing(self) -> bool:
        """Credits wait for a pusher whose record we do not have yet (see `report_owed`)."""
        return self.workers.owing

    def reachable(self, peer_id: str) -> None:
        """A pusher we may owe credits to can be reached (see `Membership.listen`)."""
        self.workers.pusher_known(peer_id)

    async def report_owed(self, timeout: float) -> None:
        """Before the goodbye, after `prepare_leave`: a pusher that found us first may have
        sent work before its greeting was read; its credits go once it is (a short, bounded
        wait: else it would take the goodbye for the end and deliver that work again)."""
        if self.workers.owing:  # sent by `pusher_known` when the greeting is read
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.workers.paid.wait(), timeout)

    def close(self) -> None:
        self._closed = True
        self.workers.close()
        for waiters in self._waiters.values():
            for fut in waiters:
                if not fut.done():
                    fut.set_result(None)
        stranded = self._backlog.stranded()
        if stranded:
            _log.warning("closing with %d best-effort pushes no worker took", stranded)
            self._stats["lost_in_flight"] += stranded
        for pusher in self._pushers.values():
            pusher.close(linger=_PUSH_LINGER)

    def tick(self) -> None:
        self.workers.send_credits(force=True)
        if self._outbox is not None:
            self._check_ack_timeouts(self._outbox.ack_timeout)
        self._backlog.sweep_due()

    # -- pushing -----------------------------------------------------------------

    async def push(self, queue: str, data: bytes | str, headers: Mapping[str, str] | None,
                   timeout: float, closed: Callable[[], bool], reliable: bool = False,
                   ttl: float | None = None) -> None:
        # The common case first: plain bytes, and the current turn's worker still has
        # messages to take. (A turn never outlasts its credit, and a backlog only waits
        # while no worker has credit, so a live turn also means no backlog goes first.)
        target = self._current.get(queue)
        if (target is None or target.run <= 0 or reliable or headers or ttl is not None
                or not target.runs or type(data) is not bytes):
            taken = await self._push_other(queue, data, headers, timeout, closed, reliable, ttl)
            if taken is None:
                return
            target, data = taken
        size = len(data)
        if size > self._max_size:
            self._stats["oversized"] += 1
            raise MessageTooLarge(size, self._max_size)
        # A plain message: its payload joins the target's run (no struct per message; its
        # sequence number and timestamp are the run's, see `_wire.Batch`).
        target.run -= 1
        target.sent += 1
        payloads = target.payloads
        if not payloads or target.outgoing_bytes + size > self._frame_budget:
            self._start_run(target)
            payloads = target.payloads
        payloads.append(data)
        target.outgoing_bytes += size
        if len(payloads) >= target.batch_at:
            self._send(target)  # pipeline: the worker starts while we fill the rest

    async def _push_other(self, queue: str, data: bytes | str,
                          headers: Mapping[str, str] | None, timeout: float,
                          closed: Callable[[], bool], reliable: bool, ttl: float | None
                          ) -> tuple[Target, bytes] | None:
        """Every push but a plain one within a turn: checks, a turn (waiting for credit),
        reliable and item pushes. Returns the target and payload of a plain push for the
        caller to add to its run; None: done here."""
        checked = sent_headers(headers)
        if ttl is not None:
            ttl = _ttl.check(ttl)
        if type(data) is not bytes:
            data = data.encode() if isinstance(data, str) else bytes(data)
        size = len(data)
        if size > self._max_size:
            self._stats["oversized"] += 1
            raise MessageTooLarge(size, self._max_size)
        target = self._current.get(queue)
        if reliable or target is None or target.run <= 0:
            if queue not in self._queue_keys:
                self._check_queue(queue)
            if reliable:
                await self._push_reliable(queue, data, checked, ttl)
                return None
            if self._backlog.get(queue):
                self._pump(queue)
            target = self._pick(queue)
            if target is None:
                target = await self._wait_for_target(queue, timeout, closed)
        if checked or ttl is not None or not target.runs:
            self._push_item(target, data, checked, ttl)
            return None
        return target, data

    def _start_run(self, target: Target) -> None:
        """Before a run's first payload: what is pending leaves first (order kept, and every
        frame stays under the receiver's size limit); the run takes the time now."""
        if target.outgoing or target.payloads:
            self._send(target)
        target.run_ts = _wall_clock()
        self._dirty.add(target)
        if self._flush_handle is None:
            self._flush_handle = asyncio.get_running_loop().call_soon(self._flush)

    def _push_item(self, target: Target, data: bytes, headers: dict[str, str] | None,
                   ttl: float | None) -> None:
        """A message that needs its own `Item` (headers, a ttl, a worker on this node or one
        that predates runs)."""
        if target.payloads:
            self._send(target)  # the run pending takes its numbers first (they keep rising)
        item = _wire.Item(self._next_seq(), _wall_clock(), headers, data)
        if ttl is not None:
            item.expires = item.ts + ttl
        if target.local:
            self._stats["pushed"] += 1
        else:
            self._uncounted += 1  # into stats when its batch leaves (not a Counter += per push)
        self._assign(target, (item, None))

    async def _push_reliable(self, queue: str, data: bytes,
                             headers: dict[str, str] | None, ttl: float | None) -> None:
        if self._outbox is None:
            raise ConfigError("reliable", "needs a data dir (the spool lives there)")
        for target in self._targets_for(queue):
            if target.payloads:
                self._send(target)  # plain pushes before it take their (lower) numbers first
        ts = _wall_clock()
        item = _wire.Item(self._next_seq(), ts, headers, data, True,
                          expires=None if ttl is None else ts + ttl)
        tracked = await self._outbox.spool_push(queue, item)
        self.requeue(queue, (item, tracked))
        self._stats["pushed"] += 1

    def _check_queue(self, queue: str) -> None:
        key = _names.queue(queue)
        self._queue_keys.put(queue, key)

    def worker_count(self, queue: str) -> int:
        return len(self._targets_for(queue))

    def figures(self) -> tuple[dict[str, QueueCounts], dict[str, int]]:
        """Each queue this node pushes to, waits on or works for, and the messages sent
        to each peer (by id, a running total per live target) for the node's figures."""
        queues: dict[str, QueueCounts] = {}
        by_peer: dict[str, int] = {}
        names = {q for _, q in self._targets} | set(self._backlog.waiting()) | set(self.queues)
        for queue in sorted(names)[:_MAX_FIGURES]:
            backlog = len(self._backlog.get(queue) or ())
            queues[queue] = QueueCounts(self._workers_of(queue), 0, backlog, 0)
        for (peer_id, queue), target in self._targets.items():
            counts = queues.get(queue)
            if counts is not None:
                counts.in_flight += target.in_flight
                counts.sent += target.sent
            if not target.local:
                by_peer[peer_id] = by_peer.get(peer_id, 0) + target.sent
        return queues, by_peer

    def _workers_of(self, queue: str) -> int:
        """`worker_count` without making targets (no socket is opened to count)."""
        local = self.workers.local.get(queue)
        return (sum(1 for rec in self._peers.records() if rec.state is PeerState.ALIVE
                    and rec.pull and rec.queues.get(queue))
                + (1 if local is not None and local.handles else 0))

    def _targets_for(self, queue: str) -> list[Target]:
        targets = self._target_cache.get(queue)
        if targets is None:
            targets = []
            for rec in self._peers.records():
                if rec.state is not PeerState.ALIVE:
                    continue
                window = rec.queues.get(queue)
                if window and rec.pull:
                    runs = rec.hello is not None and rec.hello.runs
                    targets.append(self._target(rec.id, queue, window, rec.pull, runs))
            local = self.workers.local.get(queue)
            if local is not None and local.handles:
                targets.append(self._target(self.node_id, queue, local.window, None, False))
            self._target_cache[queue] = targets
        return targets

    def _target(self, peer_id: str, queue: str, window: int, endpoint: str | None,
                runs: bool) -> Target:
        target = self._targets.get((peer_id, queue))
        if target is not None and target.pusher is not None and target.pusher.endpoint != endpoint:
            self._drop_target(target, "worker restarted")  # its old pipe leads nowhere
            target = None
        if target is None:
            pusher = None
            if endpoint is not None:
                pusher = self._pushers.get(peer_id)
                if pusher is not None and pusher.endpoint != endpoint:
                    pusher.close(linger=0)
                    pusher = None
                if pusher is None:
                    pusher = self._pushers[peer_id] = Pusher(self._ctx, endpoint)
            self._epoch += 1
            target = Target(peer_id, queue, window, self._epoch, pusher, endpoint is None)
            target.runs = runs
            target.owner_ack = self._ack
            self._targets[(peer_id, queue)] = target
        if window != target.announced:  # else keep what its credits said since
            target.announced = window
            target.resize(window)
        return target

    def _pick(self, queue: str) -> Target | None:
        """The next worker with credit, round robin; it gets a turn of up to a batch.

        A turn never exceeds the target's credit, and every assignment counts
        against both, so `push` may skip choosing while the turn lasts. Every
        worker with credit gets the same turn: the smallest batch among them
        (at most `_TURN`). Turns sized by each one's own window would split by
        window, and while windows adapt they differ between equal workers (one
        measured later), so one would take several times its share; a slower
        worker gets fewer by running out of credit, not by shorter turns.
        """
        targets = self._targets_for(queue)
        n = len(targets)
        start = self._rr.get(queue, 0)
        for i in range(n):
            chosen = targets[(start + i) % n]
            credit = chosen.credit
            if credit > 0:
                break
        else:
            return None
        self._rr[queue] = (start + i + 1) % n
        turn = min(credit, chosen.batch_at, _TURN)
        for target in targets:  # (credit, a computed property, only for a smaller batch)
            if target.batch_at < turn and target.credit > 0:
                turn = target.batch_at
        chosen.run = turn
        self._current[queue] = chosen
        return chosen

    async def _wait_for_target(self, queue: str, timeout: float,
                               closed: Callable[[], bool]) -> Target:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                while True:
                    if closed():
                        raise ClosedError("node is not running")
                    fut = loop.create_future()
                    waiters = self._waiters.setdefault(queue, [])
                    waiters.append(fut)
                    try:
                        await fut
                    finally:
                        with contextlib.suppress(ValueError):
                            waiters.remove(fut)
                    target = self._pick(queue)
                    if target is not None:
                        return target
        except TimeoutError:
            if not self._targets_for(queue):
                raise NoRespondersError(queue) from None
            raise RequestTimeout(f"push to {quoted(queue)}: every worker is busy",
                                 timeout) from None

    def _assign(self, target: Target, sent: Sent) -> None:
        self._assign_many(target, (sent,))

    def _assign_many(self, target: Target, sents: Sequence[Sent]) -> None:
        """Give `target` these messages (at most its turn): in flight, then out in batches."""
        n = len(sents)
        target.run -= n
        target.sent += n
        items = [item for item, _ in sents]
        tracked = target.tracked
        for item, one in sents:
            if one is not None:
                tracked[item.seq] = one
        if target.local:
            if not target.flights:
                target.progress_at = time.monotonic()
            target.flights.append(Flight(items))
            local = self.workers.local.get(target.queue)
            if local is not None:
                queues = self._stats.queues
                queues["sent"].add(target.queue, n)
                queues["received"].add(target.queue, n)
                queue, name, node_id = target.queue, self.name, self.node_id
                local.put_many([Message(item.topic or queue, item.payload, name, node_id,
                                        item.seq, item.ts, item.headers, item.reliable)
                                for item in items], target)
            return
        if target.payloads:
            self._send(target)  # the run pending goes first (order kept)
        outgoing, size = target.outgoing, target.outgoing_bytes
        for item in items:
            if outgoing and size + len(item.payload) > self._frame_budget:
                target.outgoing_bytes = size
                self._send(target)  # keep every frame under the receiver's size limit
                outgoing, size = target.outgoing, 0
            outgoing.append(item)
            size += len(item.payload)
        target.outgoing_bytes = size
        if len(outgoing) >= target.batch_at:
            self._send(target)  # pipeline: the worker starts while we fill the rest
        elif outgoing:  # (a target with outgoing items is always dirty)
            self._dirty.add(target)
            if self._flush_handle is None:
                self._flush_handle = asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_handle = None
        dirty, self._dirty = self._dirty, set()
        for target in dirty:
            self._send(target)

    def _send(self, target: Target) -> None:
        """What is assigned to `target` leaves as one frame: a run of payloads or items."""
        if self._uncounted:
            self._stats["pushed"] += self._uncounted
            self._uncounted = 0
        payloads, items, nbytes = target.payloads, target.outgoing, target.outgoing_bytes
        if payloads:
            n = len(payloads)
            target.payloads, target.outgoing_bytes = [], 0
            self._stats["pushed"] += n
            seq = self._take_seqs(n)
            flight = Flight(None, payloads, seq, target.run_ts)
            batch = _wire.Batch(self.node_id, self.name, target.flushed, [], target.epoch,
                                target.credit <= 0, payloads, target.run_ts, seq)
            hint = nbytes + _wire.RUN_ITEM_OVERHEAD * n + 256
        elif items:
            n = len(items)
            target.outgoing, target.outgoing_bytes = [], 0
            flight = Flight(items)
            batch = _wire.Batch(self.node_id, self.name, target.flushed, items, target.epoch,
                                target.credit <= 0)
            hint = nbytes + _wire.ITEM_OVERHEAD * n + 256
        else:
            return
        if not target.flights:
            target.progress_at = time.monotonic()
        target.flights.append(flight)
        target.flushed += n
        if target.pusher is None:
            return
        frame = _wire.encode_data(target.key, batch, hint)
        self._sent.add(target.queue, n)
        self._sent_to.add(target.peer_id, n)
        with contextlib.suppress(SocketClosed):
            target.pusher.send(frame)

    def _wake(self, queue: str) -> None:
        if self._backlog.get(queue):
            self._pump(queue)
        for fut in self._waiters.get(queue, ()):
            if not fut.done():
                fut.set_result(None)
                break

    def _pump(self, queue: str) -> None:
        """Hand queued messages (reliable ones, and those of departed workers) out, in order."""
        backlog = self._backlog.ready(queue)
        while backlog:
            target = self._pick(queue)
            if target is None:
                return
            popleft = backlog.popleft
            self._assign_many(target, [popleft() for _ in range(min(target.run, len(backlog)))])

    def _pump_unless_closed(self, queue: str) -> None:
        if not self._closed:
            self._pump(queue)

    def requeue(self, queue: str, sent: Sent, *, front: bool = False) -> None:
        self._backlog.add(queue, sent, front=front)
        self._pump(queue)

    def requeue_many(self, queue: str, sents: Sequence[Sent]) -> None:
        """`requeue` several at the back, handed out in turns rather than one by one."""
        self._backlog.extend(queue, sents)
        self._pump(queue)

    def held(self, queue: str) -> int:
        """Reliable messages waiting for a worker of `queue` or in flight to one."""
        return (sum(1 for _, t in self._backlog.get(queue) or () if t is not None)
                + sum(len(t.tracked) for (_, q), t in self._targets.items() if q == queue))

    def take(self, queue: str) -> list[Tracked]:
        """Drop every message waiting for or in flight to `queue` (a forgotten durable's);
        returns the spool entries of the reliable ones, for the outbox to settle."""
        taken = [t for _, t in self._backlog.pop(queue) if t is not None]
        for key, target in list(self._targets.items()):
            if key[1] == queue:
                del self._targets[key]
                self._dirty.discard(target)
                taken.extend(target.tracked.values())
                target.clear()  # late credits for this stream settle nothing
        self._forget_targets(queue)
        return taken

    # -- acknowledgements ------------------------------------------------------------

    def on_credit(self, credit: _wire.Credit) -> None:
        target = self._targets.get((credit.id, credit.queue))
        if target is None or target.epoch != credit.epoch:
            return  # a stream we already gave up on
        n = min(credit.consumed, target.flushed) - target.acked
        if credit.window > 0 and credit.window != target.window:
            grew = credit.window > target.window
            target.resize(credit.window)
            if grew and n <= 0:
                self._wake(target.queue)
        self._ack(target, n)

    def on_nack(self, nack: _wire.Nack) -> None:
        target = self._targets.get((nack.id, nack.queue))
        if target is not None and target.epoch == nack.epoch:
            target.nacked.update(nack.seqs[:10_000])

    def _ack(self, target: Target, n: int) -> None:
        if n > 0:
            target.consume(n, self._outbox, self.requeue)
            self._wake(target.queue)

    def _check_ack_timeouts(self, ack_timeout: float) -> None:
        now = time.monotonic()
        for target in list(self._targets.values()):
            if target.tracked and now - target.progress_at > ack_timeout:
                _log.warning("worker %s took no message of %s for %.1f s: redelivering",
                             target.peer_id[:8], target.queue, ack_timeout)
                self._drop_target(target, "ack timeout")

    # -- peers (PeerListener) -----------------------------------------------------

    def partners(self) -> Iterable[str]:
        """Workers we push to and pushers pushing to us (PartnerSource)."""
        return {*self._pushers, *(peer_id for peer_id, _ in self._targets)}


    def peer_connected(self, new: PeerRecord, old: PeerRecord | None) -> None:
        self.workers.pusher_known(new.id)
        if old is not None and old.incarnation != new.incarnation:
            # Restarted: its old pipe is dead. Its new record is in the table only once
            # this returns, so the hand-out waits until then (not to its old endpoint).
            self._forget_peer(old.id, graceful=False, wake=False)
            self._target_cache.clear()
            self._current.clear()
            asyncio.get_running_loop().call_soon(self._peers_changed_unless_closed)

    def peer_lost(self, rec: PeerRecord) -> None:
        self._forget_peer(rec.id, graceful=False)

    def peer_gone(self, rec: PeerRecord) -> None:
        self._forget_peer(rec.id, graceful=True)

    def peers_changed(self) -> None:
        """Someone joined, left, was lost or changed interest: recompute targets."""
        self._target_cache.clear()
        self._current.clear()
        for queue in {*self._waiters, *self._backlog.waiting()}:
            self._wake(queue)

    def peer_updated(self, rec: PeerRecord) -> None:
        """A worker stopped pulling some queues: give their unconsumed messages to others."""
        for (peer_id, queue), target in list(self._targets.items()):
            if peer_id == rec.id and queue not in rec.queues:
                self._requeue_target(target)
        self.peers_changed()

    def _peers_changed_unless_closed(self) -> None:
        if not self._closed:
            self.peers_changed()

    def _forget_peer(self, peer_id: str, *, graceful: bool, wake: bool = True) -> None:
        self.workers.forget_pusher(peer_id)
        for (pid, _queue), target in list(self._targets.items()):
            if pid != peer_id:
                continue
            if graceful:
                self._requeue_target(target)
            else:
                self._drop_target(target, "worker lost")
        pusher = self._pushers.pop(peer_id, None)
        if pusher is not None:
            pusher.close(linger=0)
        if wake:
            self.peers_changed()

    def _forget_targets(self, queue: str) -> None:
        self._target_cache.pop(queue, None)
        self._current.pop(queue, None)

    def _drop_target(self, target: Target, reason: str) -> None:
        """Give up on a stream: reliable messages go again, best-effort ones are lost."""
        del self._targets[(target.peer_id, target.queue)]
        self._dirty.discard(target)
        self._forget_targets(target.queue)
        again: list[Sent] | None = [] if target.queue.startswith(_DURABLE_QUEUES) else None
        lost = target.give_up(reason, self._outbox, self.requeue, again=again)
        if again:  # (not pumped from here: this may run while a target list is being built)
            self._backlog.extend(target.queue, again, front=True)
            asyncio.get_running_loop().call_soon(self._pump_unless_closed, target.queue)
        if lost:
            self._stats["lost_in_flight"] += lost
            self._stats.queues["dropped"].add(target.queue, lost)
            self._stats.peers["dropped"].add(target.peer_id, lost)
            _log.warning("%s: %d best-effort messages of queue %s lost with worker %s",
                         reason, lost, target.queue, target.peer_id[:8])

    def _requeue_target(self, target: Target) -> None:
        del self._targets[(target.peer_id, target.queue)]
        self._dirty.discard(target)
        self._forget_targets(target.queue)
        sents = target.unconsumed()
        if sents:
            self._backlog.extend(target.queue, sents, front=True)
            self._stats["redelivered"] += len(sents)
            self._stats.queues["redelivered"].add(target.queue, len(sents))

    # -- worker side -------------------------------------------------------------

    def pull(self, queue: str, prefetch: int, handler: Handler[T] | None,
             type: type[T] | None = None) -> Pull[T]:
        _names.queue(queue)
        if prefetch < 1:
            raise ConfigError("prefetch", "must be >= 1")
        decoding = None if type is None else Decoding(type, f"pull {queue}", self._stats)
        pull, first = self.workers.open(queue, prefetch, handler, self._detach, decoding)
        self._forget_targets(queue)
        if first:
            self._announcer.interest_changed()
        self._wake(queue)  # a backlog or a push waiting for a worker: this is one
        return pull

    def _detach(self, pull: Pull[Any]) -> None:
        local = self.workers.detach(pull)
        if local is None:
            return
        self._forget_targets(local.name)
        own = {s for s in local.settles if isinstance(s, Target)}
        local.clear()
        for target in own:  # our own pushes to ourselves go back to the pusher side
            if self._targets.get((target.peer_id, target.queue)) is target:
                self._requeue_target(target)
        self.workers.send_credits()  # final totals travel before the new hello
        self._announcer.interest_changed()
