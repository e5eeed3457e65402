"""A worker of a queue as its pusher sees it: credit window, positions, messages in flight.

Each `Target` is one numbered stream (an *epoch*) from one pusher to one
worker on one queue. The pusher sends only while it has credit; the worker's
running count of consumed messages (`Credit`) settles the oldest in flight,
in order. Settling is where reliable messages leave the pusher's spool: a
consumed one is delivered, a nacked one, or one in flight when the stream is
given up on (worker lost, ack timeout), fails and is sent again later.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Callable
from typing import Protocol

from patterns import Pusher

from .. import _names, _wire
from .._message import Message
from .._reliable._outbox import Outbox, Tracked


class Requeue(Protocol):
    """Puts a message back in its queue's backlog (for another attempt)."""

    def __call__(self, queue: str, sent: Sent, *, front: bool = False) -> None: ...


Sent = tuple[_wire.Item, Tracked | None]


class Target:
    """One worker of one queue as its pusher sees it: window, positions, in-flight copies."""

    __slots__ = ("acked", "announced", "batch_at", "epoch", "flushed", "inflight", "key",
                 "local", "nacked", "outgoing", "outgoing_bytes", "owner_ack", "peer_id",
                 "progress_at", "pusher", "queue", "run", "sent", "tracked", "window")

    def __init__(self, peer_id: str, queue: str, window: int, epoch: int,
                 pusher: Pusher | None, local: bool) -> None:
        self.peer_id = peer_id
        self.queue = queue
        self.key = _names.queue(queue)
        self.epoch = epoch
        self.pusher = pusher
        self.local = local
        self.sent = 0
        self.flushed = 0
        self.acked = 0
        self.inflight: deque[_wire.Item] = deque()
        """Sent and not yet consumed, in order (bare items: no tuple per message to collect)."""
        self.tracked: dict[int, Tracked] = {}
        """The spool entries of the reliable ones among them, by sequence number."""
        self.outgoing: list[_wire.Item] = []
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

    def consume(self, n: int, outbox: Outbox | None, requeue: Requeue) -> None:
        """The worker consumed `n` more: settle the oldest in flight, in order."""
        self.acked += n
        self.progress_at = time.monotonic()
        inflight = self.inflight
        done = min(n, len(inflight))
        if not self.nacked and not self.tracked:  # nothing to settle: just forget them
            if done == len(inflight):
                inflight.clear()
            elif done > len(inflight) // 2:  # copy the rest in C rather than pop in Python
                self.inflight = deque(itertools.islice(inflight, done, None))
            else:
                for _ in range(done):
                    inflight.popleft()
        elif self.nacked:
            self._settle_one_by_one(done, outbox, requeue)
        else:
            popleft, pop_tracked = inflight.popleft, self.tracked.pop
            settled = [one for one in (pop_tracked(popleft().seq, None) for _ in range(done))
                       if one is not None]
            if settled and outbox is not None:
                outbox.delivered(settled, self.queue)

    def _settle_one_by_one(self, done: int, outbox: Outbox | None, requeue: Requeue) -> None:
        """The `done` oldest in-flight messages were consumed, some of them nacked."""
        for _ in range(done):
            item = self.inflight.popleft()
            tracked = self.tracked.pop(item.seq, None)
            failed = item.seq in self.nacked
            if failed:
                self.nacked.discard(item.seq)
            if tracked is not None and outbox is not None:
                if failed:
                    outbox.failed(tracked, "nacked by the worker", requeue, self.queue)
                else:
                    outbox.delivered((tracked,), self.queue)

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
        for item in self.inflight:
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
        """What is in flight, oldest last (for ``extendleft`` onto a backlog's front)."""
        return [(item, self.tracked.get(item.seq)) for item in reversed(self.inflight)]
