"""Per-second counts of the last minute, from running totals sampled once a second."""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from typing import Final

WINDOW: Final[int] = 60
"""Seconds of counts kept per name."""
MAX_NAMES: Final[int] = 2000
"""Names tracked at most (counters are bounded already; this bounds the sum of them)."""


class Rates:
    """For each name, the counts of its last `WINDOW` whole seconds, oldest first.

    `sample` takes the running totals once a second (a name's first total is all
    of its first second); a total that went down (a target gone) counts as zero.
    """

    def __init__(self) -> None:
        self._last: dict[str, int] = {}
        self._rings: dict[str, deque[int]] = {}

    def sample(self, totals: Mapping[str, int]) -> None:
        for name, ring in list(self._rings.items()):
            if name not in totals:
                ring.append(0)
                if not any(ring):
                    del self._rings[name]
                    self._last.pop(name, None)
        for name, total in totals.items():
            found = self._rings.get(name)
            if found is None:
                if len(self._rings) >= MAX_NAMES:
                    continue
                found = self._rings[name] = deque([0] * WINDOW, maxlen=WINDOW)
                previous = 0  # counters start at zero: all of it is this second's
            else:
                previous = self._last.get(name, total)
            found.append(max(0, total - previous))
            self._last[name] = total

    def per_s(self, name: str) -> int:
        """The count of the last whole second."""
        ring = self._rings.get(name)
        return ring[-1] if ring else 0

    def spark(self, name: str) -> list[int]:
        """The last `WINDOW` seconds' counts, oldest first."""
        ring = self._rings.get(name)
        return list(ring) if ring else [0] * WINDOW

    def names(self) -> list[str]:
        return list(self._rings)
