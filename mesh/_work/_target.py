"""A worker of a queue as its pusher sees it: credit window, positions, messages in flight.

Each `Target` is one numbered stream (an *epoch*) from one pusher to one
worker on one queue. The pusher sends only while it has credit; the worker's
running count of consumed messages (`Credit`) settles the oldest in flight,
in order. What is in flight is kept per frame (`Flight`): a run of plain
payloads (no struct per message: the common case of best-effort pushes) or a
list of items (reliable, with headers or a ttl, or for a worker on this node),
so settling a credit pops whole frames rather than messages. Settling is
where reliable messages leave the pusher's spool: a consumed one is
delivered, a nacked one, or one in flight when the stream is given up on
(worker lost, ack timeout), fails and is sent again later.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Protocol

from patterns import Pusher

from .. import _names, _wire
from .._message import Message
from .._reliable._outbox import Outbox, Tracked


class Requeue(Protocol):
    """Puts a message back in its queue's backlog (for another attempt)."""

    def __call__(self, queue: str, sent: Sent, *, front: bool = False) -> None: ...


Sent = tuple[_wire.Item, Tracked | None]


class Flight:
    """The messages of one frame (or, for a worker on this node, one hand-over) not yet
    all consumed: `done` of them are.

    A run (`items` None) is plain payloads numbered `seq`, `seq` + 1, ... sharing `ts`;
    its `Item`s are made only if it has to go elsewhere (`sents`)."""

    __slots__ = ("done", "items", "payloads", "seq", "ts")

    def __init__(self, items: list[_wire.Item] | None, payloads: list[bytes] | None = None,
                 seq: int = 0, ts: float = 0.0) -> None:
        self.items = items
        self.payloads = payloads
        self.seq = seq
        self.ts = ts
        self.done = 0

    def __len__(self) -> int:
        return len(self.items if self.items is not None else self.payloads or ())

    def rest(self) -> Iterator[_wire.Item]:
        """The messages not yet consumed, oldest first."""
        if self.items is not None:
            yield from self.items[self.done:]
        else:
            seq, ts = self.seq, self.ts
            for i, payload in enumerate(self.payloads or (), 0):
                if i >= self.done:
                    yield _wire.Item(seq + i, ts, None, payload)


class Target:
    """One worker of one queue as its pusher sees it: window, positions, in-flight copies."""

    __slots__ = ("acked", "announced", "batch_at", "epoch", "flights", "flushed", "key",
                 "local", "nacked", "outgoing", "outgoing_bytes", "owner_ack", "payloads",
                 "peer_id", "progress_at", "pusher", "queue", "run", "run_ts", "runs", "sent",
                 "tracked", "window")

    def __init__(self, peer_id: str, queue: str, window: int, epoch: int,
                 pusher: Pusher | None, local: bool) -> None:
        self.peer_id = peer_id
        self.queue = queue
        self.key = _names.queue(queue)
        self.epoch = epoch
        self.pusher = pusher
        self.local = local
        self.runs = False
        """Plain messages may go to it as runs (a remote worker that announced it takes them)."""
        self.sent = 0
        """Messages assigned to it so far (`sent` - `acked` are in flight or about to be)."""
        self.flushed = 0
        self.acked = 0
        self.flights: deque[Flight] = deque()
        """Sent and not yet all consumed, oldest first."""
        self.tracked: dict[int, Tracked] = {}
        """The spool entries of the reliable ones in flight, by sequence number."""
        self.outgoing: list[_wire.Item] = []
        """Assigned, to leave in the next frame (not at the same time as `payloads`)."""
        self.payloads: list[bytes] = []
        """Plain messages assigned, to leave in the next frame as a run (see `_wire.Batch`)."""
        self.run_ts = 0.0
        """When the first of `payloads` was pushed (the run's timestamp)."""
        self.outgoing_bytes = 0
        self.run = 0
        """Messages push() may still give it without choosing again (never above its credit)."""
        self.announced = window
        self.resize(window)
        self.nacked: set[int] = set()
        self.progress_at = time.monotonic()
        self.owner_ack: Callable[[Target, int], None] = lambda target, n: None

    @property
    def credit(self) -> int:
        return self.window - (self.sent - self.acked)

    @property
    def in_flight(self) -> int:
        """Messages assigned to it and not consumed (sent or about to be)."""
        return self.sent - self.acked

    def resize(self, window: int) -> None:
        self.window = window
        self.batch_at = max(1, window // 4)
        if self.run > self.credit:  # a turn never outlasts the credit (push relies on it)
            self.run = max(0, self.credit)

    def settle(self, msg: Message, ok: bool) -> None:
        """A local worker consumed one of our own pushes (no network in between)."""
        if not ok:
            self.nacked.add(msg.seq)
        self.owner_ack(self, 1)

    def settle_many(self, n: int) -> None:
        """A local worker consumed `n` more of our own best-effort pushes."""
        self.owner_ack(self, n)

    def consume(self, n: int, outbox: Outbox | None, requeue: Requeue) -> None:
        """The worker consumed `n` more: settle the oldest in flight, in order, a frame at a
        time (a run of plain messages has nothing to settle one by one)."""
        self.acked += n
        self.progress_at = time.monotonic()
        flights = self.flights
        settle = bool(self.nacked or self.tracked)
        while n > 0 and flights:
            flight = flights[0]
            size = len(flight)
            take = min(n, size - flight.done)
            if settle and flight.items is not None:
                self._settle(flight.items[flight.done:flight.done + take], outbox, requeue)
            flight.done += take
            n -= take
            if flight.done >= size:
                flights.popleft()

    def _settle(self, items: list[_wire.Item], outbox: Outbox | None,
                requeue: Requeue) -> None:
        """These items were consumed: their reliable ones leave the spool (or, nacked, fail)."""
        tracked, nacked = self.tracked, self.nacked
        if not nacked:
            settled = [one for one in (tracked.pop(item.seq, None) for item in items)
                       if one is not None]
            if settled and outbox is not None:
                outbox.delivered(settled, self.queue)
            return
        for item in items:
            one = tracked.pop(item.seq, None)
            failed = item.seq in nacked
            if failed:
                nacked.discard(item.seq)
            if one is not None and outbox is not None:
                if failed:
                    outbox.failed(one, "nacked by the worker", requeue, self.queue)
                else:
                    outbox.delivered((one,), self.queue)

    def pending(self) -> Iterator[_wire.Item]:
        """Every message assigned and not consumed, oldest first (in flight, then unsent)."""
        for flight in self.flights:
            yield from flight.rest()
        yield from self.outgoing
        if self.payloads:
            yield from Flight(None, self.payloads, 0, self.run_ts).rest()

    def give_up(self, reason: str, outbox: Outbox | None, requeue: Requeue, *,
                again: list[Sent] | None = None) -> int:
        """The stream ends unsettled: its reliable messages fail (to be sent again);
        returns how many best-effort ones are lost with it.

        With `again` (a durable's queue: one consumer, which expects each publisher's
        order) those to be sent again are put there, oldest last, for the caller to put
        back in front of the queue at once, instead of each going after its own backoff
        behind newer messages. No backoff is lost: nothing is sent until the consumer
        has a stream again.
        """
        lost = 0
        for item in self.pending():
            tracked = self.tracked.get(item.seq)
            if tracked is None or outbox is None:
                lost += 1
            elif again is None:
                outbox.failed(tracked, reason, requeue, self.queue)
            elif outbox.attempt_failed(tracked, reason, self.queue):
                again.append((item, tracked))
        if again:
            again.reverse()
        return lost

    def unconsumed(self) -> list[Sent]:
        """What is in flight or unsent, oldest last (for ``extendleft`` onto a backlog's front)."""
        sents = [(item, self.tracked.get(item.seq)) for item in self.pending()]
        sents.reverse()
        return sents

    def clear(self) -> None:
        """Forget everything in flight (the stream is dropped without settling)."""
        self.flights.clear()
        self.outgoing.clear()
        self.payloads.clear()
        self.tracked.clear()
