"""Per-name message counts with a bounded number of names.

Topics come from senders, so a counter keyed by topic must not grow without
limit: past `limit` distinct names, new names are counted under ``OTHER``.
Counting happens once per batch on the hot path, so this is a plain dict.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

OTHER: Final[str] = "_other"
DEFAULT_LIMIT: Final[int] = 1000


class Tally(dict[str, int]):
    """Counts by name (topic, queue, service, peer), at most `limit` names."""

    def __init__(self, limit: int = DEFAULT_LIMIT) -> None:
        super().__init__()
        self.limit = limit

    def add(self, name: str, n: int = 1) -> None:
        if name in self:
            self[name] += n
        elif len(self) < self.limit:
            self[name] = n
        else:
            self[OTHER] = self.get(OTHER, 0) + n


@dataclass(frozen=True, slots=True)
class Traffic:
    """A snapshot of a node's counters, for metrics and monitoring."""

    totals: dict[str, int]
    """Node-wide counts: published, received, dropped, pushed, pulled, spooled,
    redelivered, dead_lettered, requests, ..."""
    published_by_topic: dict[str, int]
    delivered_by_topic: dict[str, int]
    """Messages handed to this node's subscriptions, once per message."""
    received_by_peer: dict[str, int]
    dropped_by_peer: dict[str, int]
    """Messages a publisher dropped for us at its high-water mark."""
    spool_messages: int
    spool_bytes: int
    dead_letters: int
    input_dropped: dict[str, int]
    """Undecodable or refused input, by reason (bad frames, wrong mesh, unknown key...)."""
    curve_refused: int
    """Connections the CURVE allowlist turned away."""
