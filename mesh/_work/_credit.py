"""The worker's side of the credit protocol: receiving work, crediting pushers, dedup.

One PULL socket receives every pusher's batches into the queues' FIFOs
(`_pull`). Consumption there goes back to the pusher as a running total per
stream (`Credit`), so a running count is an exact acknowledgement; credits
are coalesced per loop iteration and repeated on heartbeat ticks so a lost
credit is superseded by the next; a `Nack` for failed reliable messages
always travels before the credit that covers them.

Each credit also carries the window the worker now grants that pusher,
sized from its measured rate (`_window`), so a fast worker is not held back
by the credit round trip and a slow one holds little.

Reliable messages are deduplicated by (sender id, sequence) before the
application sees them (`_dedup`); a duplicate is never delivered. A credit is a
running count, which the pusher settles oldest first, so a duplicate (or an
expired message) is skipped, not credited, until every earlier message of its
stream is consumed; a duplicate of a message still in hand (sent again after an
ack timeout) holds its stream's credit until that one is settled: acked, it
counts as consumed; nacked, it is nacked too. Else the pusher would drop from
its spool a message not yet processed, lost if the worker then dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from itertools import repeat
from typing import Any, Final

from patterns import Context, Puller

from .. import _ttl, _wire
from .._membership._listener import ControlSender
from .._membership._peers import PeerTable
from .._message import Decoding, Message, T
from .._reliable._dedup import Dedup
from .._support._quiet import QuietLog
from .._support._tally import Stats
from ..errors import ProtocolError
from . import _window
from ._pull import Handler, LocalQueue, Pull

_log = logging.getLogger("mesh.workqueue")
_CREDIT_RESEND_FOR: Final[float] = 3.0


class _InStream:
    """A worker's view of one pusher stream on one queue: how much it consumed.

    It is also the `Settle` of every message that came on it.
    """

    __slots__ = ("adapted_at", "born", "changed_at", "consumed", "consumed_mark", "credit_at",
                 "credit_out", "done", "dry_mark", "epoch", "hold", "local", "nacks",
                 "pending", "pusher_id", "queue", "reported", "skips", "window", "workers")

    def __init__(self, workers: Workers, local: LocalQueue, pusher_id: str, epoch: int,
                 position: int) -> None:
        self.workers = workers
        self.local = local
        self.window = local.window
        self.credit_at = max(1, self.window // 2)
        self.pusher_id = pusher_id
        self.queue = local.name
        self.epoch = epoch
        self.consumed = position
        self.born = position
        self.reported = position
        self.nacks: list[int] = []
        self.done: list[int] = []
        """Reliable messages processed, to be marked in dedup before the next credit."""
        self.changed_at = self.adapted_at = time.monotonic()
        self.consumed_mark = position
        self.dry_mark = local.dry
        self.credit_out = False
        """The pusher said a batch used up its credit (it had more to send)."""
        self.pending = False
        """A credit report including this stream is scheduled (see `Workers.credit`)."""
        self.skips: deque[tuple[int, Message | None]] = deque()
        """Messages to consume without delivering, by stream position, in order: duplicates
        (the message) and expired ones (None); see `Workers.advance`."""
        self.hold: int | None = None
        """The position of a duplicate waiting for its original in hand: credits stop
        there (the pusher settles oldest first) until it is settled."""

    @property
    def credited(self) -> int:
        """What a credit may report: the consumed, but never past a duplicate on hold."""
        hold = self.hold
        return self.consumed if hold is None or hold > self.consumed else hold

    def adapt(self, now: float) -> None:
        """Resize the window from the rate consumed since the last time (see `_window`)."""
        local = self.local
        rate = (self.consumed - self.consumed_mark) / (now - self.adapted_at)
        starved = self.credit_out and local.dry != self.dry_mark
        may_grow = self.consumed - self.born >= _window.GROW_AFTER
        pusher = self.workers.peers.get(self.pusher_id)
        self.window = _window.next_window(self.window, rate, starved, local.prefetch, may_grow,
                                          None if pusher is None else pusher.rtt)
        self.credit_at = max(1, self.window // 2)
        self.adapted_at, self.consumed_mark, self.dry_mark = now, self.consumed, local.dry
        self.credit_out = False

    def settle(self, msg: Message, ok: bool) -> None:
        """One of our messages was consumed (processed, failed, or handed back at leave)."""
        if msg.reliable:
            if ok:
                self.done.append(msg.seq)
            else:
                self.workers.nacked(self, msg)
        self.consumed += 1
        if self.skips:
            self.workers.advance(self)
        if not self.pending or self.consumed - self.reported >= self.credit_at:
            self.workers.credit(self)  # (else a report is already on its way this iteration)

    def settle_many(self, n: int) -> None:
        """A range of `n` best-effort messages was processed (a handle settles in ranges)."""
        self.consumed += n
        if self.skips:
            self.workers.advance(self)
        if not self.pending or self.consumed - self.reported >= self.credit_at:
            self.workers.credit(self)



class Workers:
    """The PULL socket and every queue this node works on."""

    def __init__(self, ctx: Context, quiet: QuietLog, stats: Stats, *, max_wire: int,
                 control: ControlSender, dedup: Dedup, peers: PeerTable) -> None:
        self._quiet = quiet
        self.peers = peers
        """Where each pusher's round trip is read (it bounds its window from below)."""
        self._stats = stats
        self._received = stats.queues["received"]
        self._from_peer = stats.peers["received"]
        self._latency = stats.latency["work"]
        self._latency_by_queue = stats.latency_by["queue"]
        self._max_wire = max_wire
        self._control = control
        self._dedup = dedup
        self._puller = Puller(ctx, max_message_size=max_wire)
        self.endpoints: list[str] = []
        self.node_id = ""
        self.local: dict[str, LocalQueue] = {}
        self.handles: set[Pull[Any]] = set()
        self._streams: dict[tuple[str, str, int], _InStream] = {}
        self._credit_handle: asyncio.Handle | None = None
        self._credit_dirty: set[_InStream] = set()
        self._owed: set[_InStream] = set()
        """Streams whose last credit found no pusher to go to: a pusher that found us first
        can send us work before its greeting is in our table; it is sent once it is."""
        self.paid = asyncio.Event()
        """Set whenever nothing is owed (see `WorkQueues.report_owed`)."""
        self._in_hand: dict[str, set[int]] = {}
        """Per sender, reliable messages delivered and not yet marked in dedup: a copy
        arriving now is a duplicate."""
        self._followers: dict[tuple[str, int], list[_InStream]] = {}
        """(sender, sequence) in hand -> the streams whose copy of it waits for it to be
        settled (see `advance`)."""
        self._closed = False
        """Closed with the node: a settle now reaches no pusher (`send_credits` sends nothing)."""

    def bind(self, interfaces: Iterable[str]) -> list[str]:
        self.endpoints = [self._puller.bind(host) for host in interfaces]
        return self.endpoints

    def start(self, node_id: str) -> None:
        self.node_id = node_id
        self._puller.start(self._on_batches)

    async def stop_handles(self, grace: float) -> None:
        """Closing: no handle hands out another message (all of them go back to their
        pushers); a handler at work gets `grace` to finish, so its ack or nack travels with
        the final credits, and is then cancelled (what it holds counts as processed)."""
        me = asyncio.current_task()
        running = []
        for handle in self.handles:
            handle._closed = True
            task = handle._task
            if task is not None and task is not me and not task.done():
                running.append(task)
        for local in self.local.values():
            local.wake_all()  # idle handles and handlers end now
        if running:
            _, late = await asyncio.wait(running, timeout=grace)
            for task in late:
                task.cancel()
            if late:
                await asyncio.wait(late)

    def leave(self) -> None:
        """Before the goodbye: take no more work; what the application holds counts as
        processed, and what waits in the queues is handed back (uncredited, the pushers
        deliver it to other workers), so no handle may take it any more."""
        self._puller.stop()
        for handle in list(self.handles):
            handle._settle_current()
        for local in self.local.values():
            local.closed = True
            local.clear()
            local.wake_all()

    def close(self) -> None:
        """After the goodbye: nothing is credited any more (the sockets are gone)."""
        self._closed = True
        for local in self.local.values():
            local.closed = True
            local.wake_all()
        self._puller.close()

    @property
    def queues(self) -> dict[str, int]:
        """What we announce: queue name -> initial credit window per pusher."""
        return {name: q.window for name, q in self.local.items() if q.handles}

    def open(self, queue: str, prefetch: int, handler: Handler[T] | None,
             on_close: Callable[[Pull[Any]], None], decoding: Decoding[T] | None = None
             ) -> tuple[Pull[T], bool]:
        """A new handle on `queue`; True if this node just started pulling it."""
        local = self.local.get(queue)
        if local is None or local.closed:
            local = self.local[queue] = LocalQueue(queue, prefetch)
        local.prefetch = max(local.prefetch, prefetch)
        local.handles += 1
        pull = Pull(local, on_close, decoding)
        local.pulls.append(pull)
        self.handles.add(pull)
        if handler is not None:
            pull._task = asyncio.get_running_loop().create_task(pull._run(handler))
        return pull, local.handles == 1

    def detach(self, pull: Pull[Any]) -> LocalQueue | None:
        """Forget a handle; returns its queue if nobody on this node pulls it any more."""
        self.handles.discard(pull)
        local = pull._local
        with contextlib.suppress(ValueError):
            local.pulls.remove(pull)
        local.handles -= 1
        if local.handles > 0:
            return None
        local.closed = True
        self.local.pop(local.name, None)
        for msg in local.items:  # handed back unprocessed: a redelivery is not a duplicate
            self._in_hand.get(msg.source_id, set()).discard(msg.seq)
            self._followers.pop((msg.source_id, msg.seq), None)  # (their streams end too)
        return local

    # -- crediting ---------------------------------------------------------------

    def nacked(self, stream: _InStream, msg: Message) -> None:
        self._in_hand.get(msg.source_id, set()).discard(msg.seq)
        stream.nacks.append(msg.seq)
        if self._followers:
            self._wake_followers(msg.source_id, (msg.seq,))

    def _mark_done(self, streams: Iterable[_InStream]) -> None:
        """Processed reliable messages go from in hand to dedup, a stream's worth at a time."""
        for stream in list(streams):
            if stream.done:
                done, stream.done = stream.done, []
                self._dedup.mark_many(stream.pusher_id, done)
                self._in_hand.get(stream.pusher_id, set()).difference_update(done)
                if self._followers:
                    self._wake_followers(stream.pusher_id, done)

    def _wake_followers(self, sender: str, seqs: Iterable[int]) -> None:
        """These messages in hand were settled: their copies on hold on other streams go on
        (counted as consumed, or nacked if it was)."""
        for seq in seqs:
            for stream in self._followers.pop((sender, seq), ()):
                self.advance(stream)
                stream.pending = True
                self._credit_dirty.add(stream)
                if self._credit_handle is None:
                    self._credit_handle = asyncio.get_running_loop().call_soon(
                        self.send_credits)

    def skip(self, stream: _InStream, position: int, msg: Message | None) -> None:
        """The message at `position` of `stream` is a duplicate (`msg`) or expired (None):
        consumed without delivery once its turn comes (see `advance`)."""
        stream.skips.append((position, msg))
        self.advance(stream)
        self.credit(stream)

    def advance(self, stream: _InStream) -> None:
        """Consume the skipped messages whose turn has come: every earlier message of the
        stream is consumed (a credit settles the pusher's oldest). A duplicate of one still
        in hand is put on hold until that one is settled; one whose original was nacked
        (or handed back) meanwhile is nacked too, so its pusher sends it again."""
        skips = stream.skips
        while skips and skips[0][0] <= stream.consumed:
            position, msg = skips[0]
            if msg is not None:
                sender, seq = msg.source_id, msg.seq
                if seq in self._in_hand.get(sender, ()):
                    stream.hold = position
                    followers = self._followers.setdefault((sender, seq), [])
                    if stream not in followers:
                        followers.append(stream)
                    return
                if not self._dedup.seen(sender, seq):
                    stream.nacks.append(seq)  # (a Nack travels before the credit)
            skips.popleft()
            stream.hold = None
            stream.consumed += 1

    def credit(self, stream: _InStream) -> None:
        """`stream` consumed more: report it at the end of this loop iteration, or now if
        half its window is done."""
        stream.pending = True
        self._credit_dirty.add(stream)
        if stream.consumed - stream.reported >= stream.credit_at:
            self.send_credits()  # half a window done: let the pusher refill while we work
        elif self._credit_handle is None:
            self._credit_handle = asyncio.get_running_loop().call_soon(self.send_credits)

    def send_credits(self, force: bool = False) -> None:
        """Report consumption to pushers; `force` repeats recent totals (lost-credit cover)."""
        if self._credit_handle is not None:
            self._credit_handle.cancel()
            self._credit_handle = None
        if self._closed:
            return  # a late settle (a message from `Pull.take`): its pusher redelivers it
        self._mark_done(self._credit_dirty)  # (first: it may let copies waiting on it go)
        dirty, self._credit_dirty = self._credit_dirty | self._owed, set()
        self._owed = set()
        self._dedup.save()
        now = time.monotonic()
        for stream in dirty:
            stream.changed_at = now
            stream.pending = False
            if now - stream.adapted_at >= _window.ADAPT_EVERY:
                stream.adapt(now)
        if force:
            dirty.update(s for s in self._streams.values()
                         if now - s.changed_at < _CREDIT_RESEND_FOR)
        for stream in dirty:
            if stream.nacks:
                nacks, stream.nacks = stream.nacks, []
                self._control.send_to(stream.pusher_id, _wire.Nack(
                    self.node_id, stream.queue, nacks, stream.epoch))
            credited = stream.credited
            if credited == stream.reported and not force:
                continue
            if self._control.send_to(stream.pusher_id, _wire.Credit(
                    self.node_id, stream.queue, credited, stream.epoch, stream.window)):
                stream.reported = credited
            else:
                self._owed.add(stream)
        if self._owed:
            self.paid.clear()
        else:
            self.paid.set()

    @property
    def owing(self) -> bool:
        """Some consumption could not be reported yet (see `_owed`)."""
        return bool(self._owed)

    def forget_pusher(self, peer_id: str) -> None:
        """It left or was lost: it redelivers what it did not hear of."""
        self._owed = {s for s in self._owed if s.pusher_id != peer_id}
        if not self._owed:
            self.paid.set()

    def pusher_known(self, peer_id: str) -> None:
        """A member's record arrived (or, closing, where it is: `Membership.listen`):
        credits it is owed go now."""
        if any(s.pusher_id == peer_id for s in self._owed) and self._credit_handle is None:
            self._credit_handle = asyncio.get_running_loop().call_soon(self.send_credits)

    # -- receiving ---------------------------------------------------------------

    def _on_batches(self, batches: list[list[memoryview]]) -> None:
        for frames in batches:
            self._on_work(frames)

    def _on_work(self, frames: list[memoryview]) -> None:
        try:
            key, batch = _wire.decode_data_message(frames, self._max_wire)
            queue = key[:-1].decode()
        except (ProtocolError, UnicodeDecodeError) as exc:
            self._quiet.drop("work", str(exc))
            return
        local = self.local.get(queue)
        if local is None:
            return  # we stopped pulling it; the pusher re-queues what we did not consume
        stream_key = (batch.source, queue, batch.epoch)
        stream = self._streams.get(stream_key)
        if stream is None:
            if len(self._streams) > 10_000:
                self._forget_idle_streams()
            stream = self._streams[stream_key] = _InStream(
                self, local, batch.source, batch.epoch, batch.topic_seq)
        if batch.credit_out:
            stream.credit_out = True
        if batch.payloads:
            self._on_run(batch, queue, local, stream)
            return
        name, source, items, now = batch.name, batch.source, batch.items, time.time()
        self._stats["pulled"] += len(items)
        self._received.add(queue, len(items))
        self._from_peer.add(source, len(items))
        latency = self._latency
        latency.left -= 1
        if latency.left <= 0 and items:  # sampled: the oldest of the batch, never flattering
            age = now - items[0].ts
            latency.sample(age)
            self._latency_by_queue.sample(queue, age)
        msgs = [Message(it.topic or queue, it.payload, name, source, it.seq, it.ts, it.headers,
                        it.reliable) for it in items]
        for it in items:
            if it.reliable or it.expires is not None:
                msgs = self._fresh(msgs, items, stream, batch.topic_seq, now)
                break
        local.put_many(msgs, stream)

    def _on_run(self, batch: _wire.Batch, queue: str, local: LocalQueue,
                stream: _InStream) -> None:
        """A run of plain messages: one `Message` each, made in C from the payloads (no
        item struct, no expiry or dedup to check)."""
        payloads, source, n = batch.payloads, batch.source, len(batch.payloads)
        self._stats["pulled"] += n
        self._received.add(queue, n)
        self._from_peer.add(source, n)
        latency = self._latency
        latency.left -= 1
        if latency.left <= 0:  # sampled: the run's first message, never flattering
            age = time.time() - batch.ts
            latency.sample(age)
            self._latency_by_queue.sample(queue, age)
        local.put_many(list(map(Message, repeat(queue, n), payloads, repeat(batch.name, n),
                                repeat(source, n), range(batch.seq, batch.seq + n),
                                repeat(batch.ts, n))), stream)

    def _fresh(self, msgs: list[Message], items: list[_wire.Item], stream: _InStream,
               first: int, now: float) -> list[Message]:
        """Those of `msgs` to deliver: the others, expired or duplicate reliable ones, are
        consumed at their turn, never delivered (`skip`). `first` is the position of the
        batch's first message in its stream.

        An expired one still counts as consumed, so its pusher settles it (a reliable one
        leaves its spool); a duplicate was processed or is being processed here."""
        fresh = []
        in_hand = self._in_hand.setdefault(stream.pusher_id, set())  # (one sender per batch)
        seen = self._dedup.checker(stream.pusher_id)
        expired = 0
        for position, (msg, item) in enumerate(zip(msgs, items, strict=True), first):
            if item.expires is not None and item.expires <= now:
                expired += 1
                self.skip(stream, position, None)
                continue
            if msg.reliable:
                seq = msg.seq
                if seq in in_hand or seen(seq):
                    self._stats["duplicates"] += 1
                    self.skip(stream, position, msg)
                    continue
                in_hand.add(seq)
            fresh.append(msg)
        if expired:
            self._stats[_ttl.EXPIRED] += expired
            self._stats.queues[_ttl.EXPIRED].add(stream.queue, expired)
        return fresh

    def _forget_idle_streams(self) -> None:
        now = time.monotonic()
        for key, stream in list(self._streams.items()):
            if now - stream.changed_at > 60 and stream.consumed == stream.reported:
                del self._streams[key]
