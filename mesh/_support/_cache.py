"""A memo for names seen on hot paths, bounded against endless or hostile names.

It forgets everything at once when full instead of evicting one entry at a
time: a hit stays a plain dict lookup, with no bookkeeping as an LRU needs.
"""

from __future__ import annotations

from typing import Final, TypeVar

K = TypeVar("K")
V = TypeVar("V")

CACHE_LIMIT: Final[int] = 10_000
"""Entries a memo holds before it starts over."""


class BoundedDict(dict[K, V]):
    """A dict that empties itself when `put` finds it full."""

    __slots__ = ("limit",)

    def __init__(self, limit: int = CACHE_LIMIT) -> None:
        super().__init__()
        self.limit = limit

    def put(self, key: K, value: V) -> V:
        """Store `value` (after emptying a full memo) and return it."""
        if len(self) >= self.limit:
            self.clear()
        self[key] = value
        return value
