"""How big a credit window a worker grants one pusher: enough to cover the credit
round trip, and no more than a couple of milliseconds of the worker's own work.

A fixed window is wrong both ways. Too small, and a fast worker idles while
its credit travels back to the pusher (a millisecond or more between two busy
processes), so throughput is window / round trip. Too big, and a slow worker
hoards messages other workers could take, loses more if it is killed, and
every message waits behind the window in the worker's queue: under a burst,
throughput bought with latency.

So the worker sizes each pusher's window from what it measures, on every
credit report at least `ADAPT_EVERY` apart, aiming at the `horizon`: the
larger of `LATENCY` and `RTT_MULTIPLE` round trips to that pusher (the
heartbeats measure it), of its consumption rate:

- it aims at the horizon of its rate (a worker doing 100 messages/s holds a
  couple; one doing 1,000,000/s a few thousand);
- when it ran dry *and* the pusher said the window was used up (it had more to
  send), the round trip, not the worker, is the limit: the window doubles, up
  to the horizon's aim, and does not shrink (a round trip longer than measured
  must not collapse it: throughput = window / round trip would lower the
  measured rate, and with it the aim);
- otherwise it shrinks at most by half per step (one quiet moment must not
  collapse it), never below `floor` nor above the user's ``prefetch``.

A pusher that trickles never uses up the window, so an idle worker does not
grow one it could not justify under load.
"""

from __future__ import annotations

from typing import Final

LATENCY: Final[float] = 0.003
"""Seconds of the worker's own work a window aims to cover at least: how long a message
may queue at the worker behind its window."""
RTT_MULTIPLE: Final[float] = 4.0
"""A window covers this many round trips to its pusher (credits go back every half window)."""
ADAPT_EVERY: Final[float] = 0.01
"""Shortest interval a rate is measured over."""
INITIAL_WINDOW: Final[int] = 256
"""What a worker announces before it has measured anything (the old fixed default, so a
new worker starts as it always did)."""
MIN_WINDOW: Final[int] = 16
"""The window never shrinks below this (or ``prefetch``, if smaller): a ``prefetch`` up to
this is an exact, fixed window."""


def floor(prefetch: int) -> int:
    return min(prefetch, MIN_WINDOW)


def initial(prefetch: int) -> int:
    return min(prefetch, INITIAL_WINDOW)


GROW_AFTER: Final[int] = 4 * INITIAL_WINDOW
"""A stream grows its window only after this many messages: equal workers sharing a short
burst keep equal windows (the first to measure would otherwise take more than its share),
while a slow worker's window still shrinks at once."""


def horizon(rtt: float | None) -> float:
    """Seconds of work a window aims at, with `rtt` the round trip to the pusher (if known)."""
    return LATENCY if rtt is None else max(LATENCY, RTT_MULTIPLE * rtt)


def next_window(window: int, rate: float, starved: bool, prefetch: int,
                may_grow: bool = True, rtt: float | None = None) -> int:
    """The window after one measurement: `rate` messages/s, `starved` = dry while credit-bound."""
    aim = int(rate * horizon(rtt))
    want = max(window, min(2 * window, aim)) if starved else max(aim, window // 2)
    if not may_grow:
        want = min(want, window)
    return max(floor(prefetch), min(prefetch, want))
