"""Pacing: a publisher waits while a subscriber that is behind catches up.

ZeroMQ's PUB drops what a slow subscriber cannot take; here the messages
queue instead (in the kernel's socket buffers, ZeroMQ's pipes and the
subscription, up to its ``max_pending``), and under a burst each message then
waits behind every one queued before it: throughput bought with latency.

So a subscriber that finds itself more than `LAG` behind a publisher asks it
to pause for as long as it needs to come back to half of that (`_wire.Pace`,
at most `MAX_PAUSE`, one at a time per publisher); the publisher's
``publish`` waits that long at its next full batch. Behind is measured two
ways, each blind to what the other sees:

- in transit: a batch's one-way delay above the lowest seen from its
  publisher lately (clock offsets between hosts cancel out; `Transit`);
- in a subscription: its queue divided by its consumer's measured rate
  (`Consumption`). A consumer that has stopped has no rate and asks for
  nothing: it is left behind and loses the oldest beyond ``max_pending``,
  holding neither the publisher nor its other subscribers back.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Final

from .. import _wire
from .._membership._listener import ControlSender
from .._support._cache import BoundedDict

LAG: Final[float] = 0.002
"""Seconds of its consumer's work a subscription may queue before it asks for a pause."""
MIN_QUEUED: Final[int] = 256
"""Fewer queued messages than this never ask for a pause (one batch's worth)."""
MAX_PAUSE: Final[float] = 0.05
"""The longest one pause lasts: a consumer that stops meanwhile holds nobody for long."""
RATE_EVERY: Final[float] = 0.002
"""Shortest interval a consumer's rate is measured over."""
_FLOOR_PERIOD: Final[float] = 5.0
"""How long the least one-way delay seen from a publisher counts (for two such periods)."""


def pause_for(behind: float) -> float:
    """The pause that brings a subscriber `behind` seconds back to half of `LAG` (0.0: it
    is not behind by more than `LAG`), at most `MAX_PAUSE`."""
    return min(MAX_PAUSE, behind - LAG / 2) if behind > LAG else 0.0


class Transit:
    """How long each publisher's batches spent on the way, above the least seen lately."""

    def __init__(self) -> None:
        self._floors: BoundedDict[str, list[float]] = BoundedDict()
        """Publisher id -> [least delay this period, least the period before, period start]."""

    def queueing(self, publisher: str, delay: float, now: float) -> float:
        """Seconds a batch that took `delay` (our clock minus the publisher's stamp) queued."""
        floor = self._floors.get(publisher)
        if floor is None:
            self._floors.put(publisher, [delay, delay, now])
            return 0.0
        if now - floor[2] > _FLOOR_PERIOD:  # the least seen ages out (clocks drift)
            floor[1], floor[0], floor[2] = floor[0], delay, now
        elif delay < floor[0]:
            floor[0] = delay
        return delay - min(floor[0], floor[1])


class Consumption:
    """How fast one subscription's consumer takes messages, measured at deliveries."""

    __slots__ = ("at", "busy", "dry", "mark", "rate")

    def __init__(self) -> None:
        self.at = 0.0
        self.mark = 0
        self.dry = 0
        self.busy = False
        """Many were queued at the last look: the consumer had work ever since."""
        self.rate = 0.0
        """Messages/s taken since the last look (0: unknown, or stopped)."""

    def pause_wanted(self, queued: int, consumed: int, dry: int) -> float:
        """Seconds the publishers should pause (0: none), `queued` waiting, `consumed`
        taken so far, and the consumer found the queue empty `dry` times so far. Looked
        at when a batch arrives: during a pause, none does."""
        now = time.monotonic()
        elapsed = now - self.at
        if elapsed >= RATE_EVERY:
            # a consumer that had work all along took what it could: its rate; one that
            # ran dry meanwhile, or after an idle spell, is not known to be slow
            self.rate = ((consumed - self.mark) / elapsed if self.busy and dry == self.dry
                         else 0.0)
            self.at, self.mark, self.dry = now, consumed, dry
            self.busy = queued >= MIN_QUEUED
        if self.rate <= 0.0:
            return 0.0
        return pause_for(queued / self.rate)


class Pacing:
    """Both ends of pacing for one node: the pauses it asks of publishers, and the pause
    its own publishing is in."""

    def __init__(self, control: ControlSender, stats: Counter[str]) -> None:
        self._control = control
        self._stats = stats
        self.node_id = ""
        self._asked: BoundedDict[str, float] = BoundedDict()
        """Publisher id -> until when the pause we last asked of it lasts."""
        self._transit = Transit()
        self.paused_until = 0.0

    def behind(self, publisher: str, stamp: float) -> float:
        """The pause to ask of `publisher` for its batch stamped `stamp` (its wall clock)
        that arrives now (0.0: none)."""
        now = time.time()
        return pause_for(self._transit.queueing(publisher, now - stamp, now))

    def ask(self, publisher: str, pause: float) -> None:
        """A subscription is behind on `publisher`'s messages: ask for a pause, unless the
        one asked before still lasts."""
        now = time.monotonic()
        if self._asked.get(publisher, 0.0) > now:
            return
        self._asked[publisher] = now + pause
        if self._control.send_to(publisher, _wire.Pace(self.node_id, pause)):
            self._stats["pauses_asked"] += 1

    def on_pace(self, pace: _wire.Pace) -> None:
        until = time.monotonic() + min(max(pace.pause, 0.0), MAX_PAUSE)
        if until > self.paused_until:
            self.paused_until = until

    async def paced(self) -> None:
        """After a full batch left: let readers and timers run, and wait out a pause."""
        until = self.paused_until
        if until:
            delay = until - time.monotonic()
            if delay > 0.0:
                self._stats["paused"] += 1
                await asyncio.sleep(delay)
                return
            self.paused_until = 0.0
        await asyncio.sleep(0)
