"""How big a credit window a worker grants one pusher: about `HORIZON` of its own work.

A fixed window is wrong both ways. Too small, and a fast worker idles while
its credit travels back to the pusher (a millisecond or more between two busy
processes), so throughput is window / round trip. Too big, and a slow worker
hoards messages other workers could take, and loses more if it is killed.

So the worker sizes each pusher's window from what it measures, on every
credit report at least `ADAPT_EVERY` apart:

- it aims at `HORIZON` of its consumption rate (a worker doing 100 messages/s
  holds a couple; one doing 300,000/s holds thousands);
- when it ran dry *and* the pusher said the window was used up (it had more to
  send), the round trip, not the worker, is the limit: the window doubles;
- otherwise it shrinks at most by half per step (one quiet moment must not
  collapse it), never below `floor` nor above the user's ``prefetch``.

A pusher that trickles never uses up the window, so an idle worker does not
grow one it could not justify under load.
"""

from __future__ import annotations

from typing import Final

HORIZON: Final[float] = 0.02
"""Seconds of the worker's own work a window aims to cover."""
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


def next_window(window: int, rate: float, starved: bool, prefetch: int,
                may_grow: bool = True) -> int:
    """The window after one measurement: `rate` messages/s, `starved` = dry while credit-bound."""
    want = int(rate * HORIZON)
    want = max(want, 2 * window) if starved else max(want, window // 2)
    if not may_grow:
        want = min(want, window)
    return max(floor(prefetch), min(prefetch, want))
