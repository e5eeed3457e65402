"""What one bench run measured: counts, first/last times and latencies, and their summary.

`Meter.record` runs once per message on the receiving end, so it does the
least it can: two stores, one increment, one append to a flat int array.
Percentiles are computed once at the end (nearest rank on the sorted array).
"""

from __future__ import annotations

import math
from array import array
from dataclasses import dataclass


class Meter:
    """The live figures of a run, shared by the roles, the progress line and the report."""

    __slots__ = ("failures", "first_ns", "from_first", "last_ns", "latencies", "received",
                 "send_ns", "sent")

    def __init__(self) -> None:
        self.received = 0
        self.first_ns = 0
        self.last_ns = 0
        self.from_first = True
        """The rate runs from the first message (n - 1 intervals), not from `begin`."""
        self.latencies = array("q")
        self.sent: int | None = None
        """Messages the sending end sent, once known (its own count, or its end marker)."""
        self.send_ns: int | None = None
        """How long the sending end took to send them."""
        self.failures = 0

    def begin(self, now_ns: int) -> None:
        """Count the rate from `now_ns` (a requester's start) instead of the first message."""
        self.first_ns, self.from_first = now_ns, False

    def record(self, now_ns: int, latency_ns: int) -> None:
        if not self.received and self.from_first:
            self.first_ns = now_ns
        self.last_ns = now_ns
        self.received += 1
        self.latencies.append(latency_ns)


@dataclass(frozen=True)
class Latency:
    """Latency percentiles in microseconds."""

    p50: float
    p90: float
    p99: float
    max: float


@dataclass(frozen=True)
class Summary:
    """The figures a report shows; None where this end cannot know them."""

    received: int | None
    seconds: float | None
    msgs_per_s: float | None
    mb_per_s: float | None
    latency: Latency | None
    drops: int | None
    sent: int | None
    send_msgs_per_s: float | None


def percentile(ordered: list[int], q: float) -> int:
    """Nearest-rank percentile of an ascending, non-empty list."""
    rank = max(math.ceil(q / 100 * len(ordered)), 1)
    return ordered[rank - 1]


def latency(samples: array[int]) -> Latency | None:
    """p50/p90/p99/max in µs, or None with no samples."""
    if not samples:
        return None
    ordered = sorted(samples)
    return Latency(*(percentile(ordered, q) / 1000 for q in (50, 90, 99, 100)))


def summarize(meter: Meter, size: int, *, expected: int | None, receiver: bool) -> Summary:
    """The report figures; `expected` is what should have arrived when the sender did not say."""
    send_rate = None
    if meter.sent and meter.send_ns:
        send_rate = meter.sent / (meter.send_ns / 1e9)
    if not receiver:
        return Summary(None, None, None, None, None, None, meter.sent, send_rate)
    n = meter.received
    seconds = (meter.last_ns - meter.first_ns) / 1e9
    intervals = n - 1 if meter.from_first else n
    if meter.send_ns and meter.from_first and meter.send_ns / 1e9 > seconds:
        # They came in a burst after a backlog built up (the first one late): messages
        # cannot get through faster than they were sent, so the sending took the time.
        seconds, intervals = meter.send_ns / 1e9, n
    rate = intervals / seconds if seconds > 0 and intervals > 0 else 0.0
    target = meter.sent if meter.sent is not None else expected
    drops = meter.failures + (max(target - n, 0) if target is not None else 0)
    return Summary(n, seconds, rate, rate * size / 1e6, latency(meter.latencies), drops,
                   meter.sent, send_rate)
