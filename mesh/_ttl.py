"""Message expiry: checking a ``ttl`` and deciding whether an item has expired.

A message sent with ``ttl=S`` carries ``expires = timestamp + S`` (`_wire.Item`),
in its sender's wall clock: a message not delivered within S seconds of its
timestamp is never delivered. Where it is enforced: a receiver drops expired
items before any application sees them (`_pubsub._engine`, `_work._credit`);
a pusher never hands one out and settles reliable ones out of its spool
(`_work._backlog`, `_reliable._outbox`). Each copy dropped counts once in
``stats["expired"]``.

Comparing two hosts' wall clocks is inherent to "S seconds of its
timestamp": skew between sender and receiver shifts expiry by that much.
"""

from __future__ import annotations

import math
import time
from typing import Final

from . import _wire
from .errors import ConfigError

EXPIRED: Final[str] = "expired"
"""The stats key counting messages dropped because their ttl passed."""


def check(ttl: float | None) -> float | None:
    """A valid ttl (None: no expiry).

    Raises:
        ConfigError: `ttl` is not a finite number of seconds above 0.
    """
    if ttl is None:
        return None
    if isinstance(ttl, bool) or not isinstance(ttl, (int, float)):
        raise ConfigError("ttl", f"must be a number of seconds, not {ttl!r}")
    if not ttl > 0 or not math.isfinite(ttl):
        raise ConfigError("ttl", f"must be a finite number of seconds > 0, not {ttl!r}")
    return float(ttl)


def has_expired(item: _wire.Item, now: float | None = None) -> bool:
    """Has `item`'s ttl passed (at `now`, wall clock; default: this moment)?"""
    expires = item.expires
    return expires is not None and expires <= (time.time() if now is None else now)
