"""A subscription: a bounded queue of messages, consumed as an async iterator.

The node's reader task hands over whole batches (`_deliver`), so a burst costs
one wake-up, not one per message. A consumer that falls more than
`max_pending` messages behind loses the oldest ones; they are counted in
`dropped` and reported once in the log; `bound_bytes` also bounds the
payload bytes queued (a stalled reader of large messages would otherwise hold
`max_pending` of them: gigabytes).

A subscription that starts with retained values or history (the ZeroMQ
guide's Clone pattern) holds live messages back while those are gathered,
then takes them, then what it held, then live messages; a live message they
already cover is dropped — for a retained value, the same publisher's older
messages on its topic; for history, the publisher's messages on its history
topics up to the sequence its answer covered — so there is neither a gap nor
a duplicate between the two.

A typed subscription (``type=T``) decodes each message as it arrives, by its
content type, into a `Message[T]` whose `value` is the decoded payload. A
message that is not a T is skipped and counted (`decode_errors`, and the
node's ``decode_errors`` total), reported once in the log: one bad publisher
must not stop the good messages behind it.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Final

from .. import _trace
from .._message import Decoding, Message, T
from .._support._mailbox import Mailbox, take_bounded
from .._support._tasks import is_async_handler
from ..errors import ClosedError
from . import _pace

if TYPE_CHECKING:
    from patterns import TopicPattern

_log = logging.getLogger("mesh.node")
DEFAULT_MAX_PENDING: Final[int] = 100_000

Callback = Callable[[Message[T]], None]


def check_callback(callback: object) -> None:
    """Raises:
        TypeError: `callback` is an async function: a callback is called, never awaited,
            so it would run nothing.
    """
    if callback is not None and is_async_handler(callback):
        raise TypeError("an async function cannot be a subscription callback (it would "
                        "never be awaited): iterate the subscription instead")


def _live_first(retained: list[Message], held: list[Message],
                covered: dict[tuple[str, str], int]) -> list[Message]:
    """The retained values to deliver before the held live messages; `covered` adjusted.

    A retained value its publisher sent after this subscription was in force there also
    comes live: held already, or on its way (a publisher's messages arrive in order, so a
    value at or after its first held message of the topic is one of those). Such a value
    is left out, and only what came before that first held message counts as covered:
    otherwise its held live messages before the value, published while the values were
    gathered, would be dropped as covered by it. That goes for every publisher's value,
    the ones another publisher's newer value outranked too (they are not delivered, but
    they cover).
    """
    first: dict[tuple[str, str], int] = {}
    for msg in held:
        first.setdefault((msg.source_id, msg.topic), msg.seq)
    for key, seq in first.items():
        if covered.get(key, 0) >= seq:
            covered[key] = seq - 1
    return [value for value in retained
            if value.seq < first.get((value.source_id, value.topic), value.seq + 1)]


class Subscription(Mailbox[Message[T]]):
    """Messages matching one pattern, in arrival order; `Message[T]` with ``type=T``.

    `max_pending` bounds the queue (0 = unbounded, like a ZeroMQ HWM of 0).
    """

    def __init__(self, pattern: TopicPattern, *, max_pending: int = DEFAULT_MAX_PENDING,
                 callback: Callback[T] | None = None,
                 on_close: Callable[[Subscription[Any]], None] | None = None,
                 type: type[T] | None = None, stats: Counter[str] | None = None) -> None:
        super().__init__()
        self.pattern = pattern
        self.max_pending = max_pending
        self.max_pending_bytes = 0
        """Payload bytes queued before the oldest are dropped (0 = no bound; `bound_bytes`)."""
        self._queued_bytes = 0
        self.dropped = 0
        self.received = 0
        self._decoding = (None if type is None else
                          Decoding(type, f"subscription {pattern.pattern}", stats))
        self._callback = callback
        self._on_close = on_close
        self._reported_slow = False
        self._consumption = _pace.Consumption()
        self.best_effort_only = False
        """Reliable messages reach it another way (a durable's live feed): skip them."""
        self._held: list[Message] | None = None
        """Live messages held back while retained values are gathered (None: live)."""
        self._covered: dict[tuple[str, str], int] = {}
        """(publisher id, topic) -> the sequence of the value it gave us: its live
        messages up to that one are already covered."""
        self._replayed: dict[str, tuple[tuple[TopicPattern, ...], int]] = {}
        """Publisher id -> (its history patterns, the sequence its history went up to)."""
        self._seen: dict[str, float] | None = None
        """While late retained values may still come (`_watch`): per topic, the newest
        timestamp delivered (None: not watching, nothing noted)."""
        self._seen_from: set[tuple[str, str]] = set()
        """...and the (publisher id, topic) pairs something was delivered from."""

    @property
    def subject(self) -> str:
        """The pattern this subscription matches, as given."""
        return self.pattern.pattern

    @property
    def pending(self) -> int:
        return len(self._queue)

    def bound_bytes(self, limit: int) -> None:
        """Drop the oldest also when the queued payloads exceed `limit` bytes (the newest
        message is always kept, whatever its size)."""
        self.max_pending_bytes = limit
        self._queued_bytes = sum(len(m.data) for m in self._queue)

    @property
    def decode_errors(self) -> int:
        """Messages skipped because they did not decode as the subscription's type."""
        return self._decoding.errors if self._decoding is not None else 0

    @property
    def closed(self) -> bool:
        return self._closed

    def _hold(self) -> None:
        """Hold live messages back until `_release` (retained values are on their way)."""
        self._held = []

    def _release(self, retained: list[Message], covered: dict[tuple[str, str], int],
                 replayed: dict[str, tuple[tuple[TopicPattern, ...], int]] | None = None
                 ) -> None:
        """Deliver the retained values (or history), then what was held, then go live."""
        held, self._held = self._held or [], None
        if self._seen is not None:  # late values: after what was delivered already
            retained, covered = self._unseen(retained, covered)
        if held and covered:
            retained = _live_first(retained, held, covered)
        self._covered.update(covered)
        if replayed:
            self._replayed = replayed
        self._deliver([*retained, *held], retained=len(retained), mixed=True)

    def _watch(self, on: bool) -> None:
        """Note what is delivered (on), so that retained values a peer gives late are
        checked against it; or stop noting (off)."""
        self._seen = {} if on else None
        self._seen_from = set()

    def _unseen(self, retained: list[Message], covered: dict[tuple[str, str], int]
                ) -> tuple[list[Message], dict[tuple[str, str], int]]:
        """The late values still worth delivering, and what they may cover: none from a
        publisher already heard on its topic (its newer messages come live, in order),
        none older than what the topic already delivered."""
        seen, heard = self._seen or {}, self._seen_from
        fresh = [value for value in retained if (value.source_id, value.topic) not in heard
                 and value.timestamp >= seen.get(value.topic, 0.0)]
        return fresh, {key: seq for key, seq in covered.items() if key not in heard}

    def _note(self, messages: Iterable[Message], mixed: bool, seen: dict[str, float]
              ) -> list[Message]:
        """Remember the topics and publishers of `messages` (in `seen`, `_seen_from`: see
        `_watch`). Unless `mixed`, they are one publisher's on one topic, in its order (the
        engine's batches): the last one says it all, with no Python step per message."""
        if not isinstance(messages, list):  # (the engine's batches are: no copy of them)
            messages = list(messages)
        heard = self._seen_from
        for msg in (messages if mixed else messages[-1:]):
            heard.add((msg.source_id, msg.topic))
            if msg.timestamp > seen.get(msg.topic, 0.0):
                seen[msg.topic] = msg.timestamp
        return messages

    def _deliver(self, messages: Iterable[Message], retained: int = 0, *,
                 shared: bool = True, one_label: bool = False, mixed: bool = False) -> float:
        """Take a batch; ``shared=False``: no one else holds these messages; ``one_label``:
        they share one headers dict (a run); ``mixed``: they come from several publishers
        or topics (else from one, on one topic). Returns the pause its publisher should take
        (see `_pace`), 0.0 for none."""
        if self._closed:
            return 0.0
        if self._held is not None:
            self._held.extend(messages)
            return 0.0
        if self._covered or self._replayed:
            messages = self._uncovered(messages, retained)
        if self._seen is not None:
            messages = self._note(messages, mixed, self._seen)
        if self._decoding is not None:
            messages = self._decoding.many(messages, shared, one_label)
        if self._callback is not None:
            for msg in messages:
                self.received += 1
                try:
                    self._callback(msg)
                except Exception:
                    _log.exception("subscription callback for %s failed", self.subject)
            return 0.0
        if _trace.ON:
            messages = list(messages)
            _trace.received(messages, "deliver", subscription=self.subject)
        before = len(self._queue)
        if self.max_pending_bytes:
            if not isinstance(messages, list):  # (counted, then queued: iterated twice)
                messages = list(messages)
            self._queued_bytes += sum(len(m.data) for m in messages)
        self._queue.extend(messages)
        self.received += len(self._queue) - before
        dropped = 0
        overflow = len(self._queue) - self.max_pending
        if overflow > 0 and self.max_pending:
            queue = self._queue
            if self.max_pending_bytes:
                self._queued_bytes -= sum(len(queue.popleft().data) for _ in range(overflow))
            else:  # (a slow consumer's path, per message: no call for a bound not set)
                for _ in range(overflow):
                    queue.popleft()
            dropped = overflow
        if self._queued_bytes > self.max_pending_bytes > 0:
            dropped += self._drop_bytes()
        if dropped:
            self.dropped += dropped
            if not self._reported_slow:
                self._reported_slow = True
                _log.warning("slow consumer on %s: dropping oldest messages (max_pending=%d, "
                             "max_pending_bytes=%d)", self.subject, self.max_pending,
                             self.max_pending_bytes)
        self._wake()
        queued = len(self._queue)
        if queued < _pace.MIN_QUEUED:
            return 0.0
        return self._consumption.pause_wanted(queued, self.received - queued - self.dropped,
                                              self._waited)

    def _taken(self, msg: Message) -> Message:
        """`msg` left the queue (read or dropped)."""
        if self.max_pending_bytes:
            self._queued_bytes -= len(msg.data)
        return msg

    def _drop_bytes(self) -> int:
        """Drop the oldest until the queued bytes are within bound; how many were dropped."""
        queue, dropped = self._queue, 0
        while self._queued_bytes > self.max_pending_bytes and len(queue) > 1:
            self._queued_bytes -= len(queue.popleft().data)
            dropped += 1
        return dropped

    def _uncovered(self, messages: Iterable[Message], retained: int) -> list[Message]:
        """Drop live messages a retained value or history already covered (the first
        `retained` are those values themselves)."""
        covered, replayed = self._covered, self._replayed
        out = []
        for i, msg in enumerate(messages):
            if i >= retained:
                seq = covered.get((msg.source_id, msg.topic))
                if seq is not None:
                    if msg.seq <= seq:
                        continue
                    del covered[(msg.source_id, msg.topic)]  # past it: nothing more to drop
                # (kept for good: a publisher's messages are in order per topic only, as
                # it sends a batch per topic, so one past its history says nothing of its
                # other topics, whose messages history covered may still be on the way)
                cover = replayed.get(msg.source_id)
                if (cover is not None and msg.seq <= cover[1]
                        and any(p.matches(msg.topic) for p in cover[0])):
                    continue
            out.append(msg)
        return out

    def __aiter__(self) -> Subscription[T]:
        return self

    async def __anext__(self) -> Message[T]:
        if self._queue:  # the common case under load: no waiter, no inner coroutine
            msg = self._queue.popleft()
            if self.max_pending_bytes:  # (`_taken`, inlined: this is per message)
                self._queued_bytes -= len(msg.data)
            return msg
        try:
            return await self.next()
        except ClosedError:
            raise StopAsyncIteration from None

    async def next(self, timeout: float | None = None) -> Message[T]:
        """The next message.

        Raises:
            TimeoutError: none arrived within `timeout` seconds.
            ClosedError: the subscription (or its node) was closed.
        """
        return self._taken(await self._take(timeout, "subscription"))

    def drain(self, limit: int, max_bytes: int | None = None) -> list[Message[T]]:
        """Up to `limit` queued messages, without waiting (for writers that batch); with
        `max_bytes`, no more once their payloads reach that many bytes."""
        taken = take_bounded(self._queue, limit, max_bytes)
        if self.max_pending_bytes:
            self._queued_bytes -= sum(len(m.data) for m in taken)
        return taken

    async def aclose(self) -> None:
        """Stop receiving; queued messages remain readable until drained."""
        if not self._closed:
            self._close()
            if self._on_close is not None:
                self._on_close(self)

    async def __aenter__(self) -> Subscription[T]:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
