"""Per-name message counts with a bounded number of names, and sampled latency.

Topics come from senders, so a counter keyed by topic must not grow without
limit: past `limit` distinct names, new names are counted under ``OTHER``.
So that the first names seen do not keep their places for ever, the names
counted under ``OTHER`` are reviewed every `limit` such counts: one that was
clearly busier meanwhile than a kept name takes its place (the kept name's
count folds into ``OTHER``, so the sum over all names stays the total).

Counting happens once per batch on the hot path, so a tally is a plain dict
and a name already kept costs one dict increment; only the misses pay more.
Latency histograms per name (`Latencies`) are kept the same way, with a much
smaller limit: each is a score of series.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter
from dataclasses import dataclass, field
from typing import Final, Generic, TypeVar

OTHER: Final[str] = "other"
"""The name everything past the limit is counted under (``_`` keeps it apart from the
usual user names)."""
DEFAULT_LIMIT: Final[int] = 1000
_MIN_REVIEW: Final[int] = 64
"""Misses between reviews at least, so a tiny limit does not review on every miss."""
LATENCY_BUCKETS: Final[tuple[float, ...]] = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
"""Upper bounds in seconds: from loopback batches up to minutes in a spool."""
LATENCY_NAMES: Final[int] = 20
"""Names with a latency histogram of their own, per kind (topic, queue); the rest under
``OTHER``. Far fewer than `DEFAULT_LIMIT`: a histogram is 21 series (19 buckets, count
and sum), so 21 names make 441 series a kind."""
SAMPLE_EVERY: Final[int] = 16
"""One received batch in this many has its oldest message's age measured: a batch
holds up to hundreds of messages, so the cost per message is a decrement."""

_V = TypeVar("_V")


class _Bounded(dict[str, _V], Generic[_V]):
    """At most `limit` names (+ ``OTHER``), what `Tally` and `Latencies` share: the names
    met past the limit are followed, and every `limit` such misses one clearly busier than
    a kept name takes its place (the kept name's `_swap` into ``OTHER`` says how)."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit
        self._rising: dict[str, int] = {}
        """Names counted under OTHER since the last review, and how much (bounded too)."""
        self._marks: dict[str, int] = {}
        """The kept names' counts at the last review (what they did since is the difference)."""
        self._misses = 0

    def _missed(self, name: str, n: int) -> None:
        """`name`, not kept, was just counted `n` under OTHER."""
        rising = self._rising
        if name in rising:
            rising[name] += n
        elif len(rising) < self.limit:
            rising[name] = n
        self._misses += 1
        if self._misses >= max(self.limit, _MIN_REVIEW):
            self.review()

    def review(self) -> None:
        """Let the busiest names lately counted under OTHER replace the least busy kept
        ones, when at least twice as busy since the last review (no churn between equals).
        A promoted name counts from 0: what it had stays in OTHER (counters only grow)."""
        marks, busy = self._marks, self._busy
        kept = sorted((busy(v) - marks.get(k, 0), k) for k, v in self.items() if k != OTHER)
        rising = sorted(((n, k) for k, n in self._rising.items()), reverse=True)
        for (busier, newcomer), (quiet, name) in zip(rising, kept, strict=False):
            if busier <= 2 * quiet + 1:
                break
            self._swap(newcomer, name)
        self._rising.clear()
        self._marks = {k: busy(v) for k, v in self.items()}
        self._misses = 0

    @staticmethod
    def _busy(value: _V) -> int:
        """How much a name counted, to compare names by."""
        raise NotImplementedError

    def _swap(self, newcomer: str, name: str) -> None:
        """Fold kept `name` into OTHER and keep `newcomer` instead, from 0."""
        raise NotImplementedError


class Tally(_Bounded[int]):
    """Counts by name (topic, queue, service, peer), at most `limit` names (+ ``OTHER``)."""

    def __init__(self, limit: int = DEFAULT_LIMIT) -> None:
        super().__init__(limit)

    def add(self, name: str, n: int = 1) -> None:
        if name in self:
            self[name] += n
        elif len(self) < self.limit:
            self[name] = n
        else:
            self[OTHER] = self.get(OTHER, 0) + n
            self._missed(name, n)

    @staticmethod
    def _busy(value: int) -> int:
        return value

    def _swap(self, newcomer: str, name: str) -> None:
        self[OTHER] = self.get(OTHER, 0) + self.pop(name)
        self[newcomer] = 0


class Tallies(dict[str, Tally]):
    """The tallies of one kind of name (topics, queues...), one per event (sent, ...)."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    def __missing__(self, event: str) -> Tally:
        tally = self[event] = Tally(self.limit)
        return tally

    def snapshot(self) -> dict[str, dict[str, int]]:
        return {event: dict(tally) for event, tally in self.items() if tally}


class Latency:
    """A histogram of sampled delivery latencies (seconds), read at scrape time."""

    __slots__ = ("counts", "left", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BUCKETS) + 1)
        """Per bucket (not cumulative), the last one past the largest bound."""
        self.total = 0.0
        self.left = SAMPLE_EVERY
        """Batches until the next sample: the receiver decrements it, samples at 0."""

    def sample(self, seconds: float) -> None:
        """Count one latency and start the next wait (a negative age, from clocks that
        disagree across hosts, counts as 0)."""
        self.left = SAMPLE_EVERY
        seconds = max(seconds, 0.0)
        self.counts[bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.total += seconds

    def snapshot(self) -> LatencySnapshot:
        return LatencySnapshot(LATENCY_BUCKETS, tuple(self.counts), self.total)

    def fold(self, other: Latency) -> None:
        """Add `other`'s samples to these."""
        self.counts = [a + b for a, b in zip(self.counts, other.counts, strict=True)]
        self.total += other.total


class Latencies(_Bounded[Latency]):
    """Sampled delivery latency by name (topic, queue), at most `limit` names (+ ``OTHER``).

    Fed where the kind's `Latency` samples, so it costs one lookup a sample, none a
    message. The names kept are the busiest as `Tally` keeps them, by their samples (one
    batch in `SAMPLE_EVERY`, so batches); a name let go folds its buckets into ``OTHER``,
    so every bucket summed over the names stays the kind's, and none goes down."""

    def __init__(self, limit: int = LATENCY_NAMES) -> None:
        super().__init__(limit)

    def sample(self, name: str, seconds: float) -> None:
        latency = self.get(name)
        if latency is None:
            latency = self._place(name)
        latency.sample(seconds)

    def _place(self, name: str) -> Latency:
        if len(self) < self.limit:
            latency = self[name] = Latency()
            return latency
        other = self.get(OTHER)
        if other is None:
            other = self[OTHER] = Latency()
        self._missed(name, 1)
        return other

    @staticmethod
    def _busy(value: Latency) -> int:
        return sum(value.counts)

    def _swap(self, newcomer: str, name: str) -> None:
        self[OTHER].fold(self.pop(name))
        self[newcomer] = Latency()

    def snapshot(self) -> dict[str, LatencySnapshot]:
        return {name: latency.snapshot() for name, latency in self.items()}


@dataclass(frozen=True, slots=True)
class LatencySnapshot:
    bounds: tuple[float, ...]
    counts: tuple[int, ...]
    """Per bucket, not cumulative; one more than `bounds` (the +Inf bucket)."""
    total: float
    """Sum of the sampled latencies."""


class Stats(Counter[str]):
    """A node's message counts: node-wide totals (the Counter itself, as before), the same
    events per name (`topics`, `queues`, `services`, `peers`: event -> Tally) and the
    sampled delivery latency per kind (``pubsub``, ``work``) and per name (`latency_by`:
    ``topic``, ``queue``).

    One object handed to every part, so each counts where the event happens."""

    def __init__(self, limit: int = DEFAULT_LIMIT) -> None:
        super().__init__(published=0, received=0, dropped=0, expired=0)
        self.topics = Tallies(limit)
        self.queues = Tallies(limit)
        self.services = Tallies(limit)
        self.peers = Tallies(limit)
        """By peer id."""
        self.latency = {"pubsub": Latency(), "work": Latency()}
        self.latency_by = {"topic": Latencies(), "queue": Latencies()}
        """The same samples by topic and by queue, `LATENCY_NAMES` names each."""


@dataclass(frozen=True, slots=True)
class Traffic:
    """A snapshot of a node's counters, for metrics and monitoring."""

    totals: Counter[str]
    """Node-wide counts: published, received, dropped, pushed, pulled, spooled,
    redelivered, dead_lettered, requests, ... (one that never happened reads 0)."""
    published_by_topic: dict[str, int]
    delivered_by_topic: dict[str, int]
    """Messages handed to this node's subscriptions, once per message."""
    received_by_peer: dict[str, int]
    dropped_by_peer: dict[str, int]
    """Messages a publisher dropped for us at its high-water mark."""
    spool_messages: int
    spool_bytes: int
    """Of the messages still to deliver: what the spool quota counts."""
    spool_disk_bytes: int
    """Of the outbox's files, delivered messages included until reclaimed."""
    dead_letters: int
    input_dropped: dict[str, int]
    """Undecodable or refused input, by reason (bad frames, wrong mesh, unknown key...)."""
    curve_refused: int
    """Connections the CURVE allowlist turned away."""
    by_name: dict[str, dict[str, dict[str, int]]]
    """Kind (``topic``, ``queue``, ``service``, ``peer``) -> event -> name -> count; each
    name set bounded (`Tally`), the rest under ``OTHER``."""
    latency: dict[str, LatencySnapshot]
    """Sampled delivery latency by kind (``pubsub``, ``work``)."""
    latency_by_name: dict[str, dict[str, LatencySnapshot]]
    """The same samples by name: kind (``topic``, ``queue``) -> name -> histogram, at
    most `LATENCY_NAMES` names each, the rest under ``OTHER``."""
    membership: dict[str, int] = field(default_factory=dict)
    """This node's share of membership: ``members`` it knows alive, ``links`` (control
    links held), ``watched`` (members it beats), ``control_sent``/``control_received``."""
