"""History: what this node published on its `history` topics, kept for late subscribers.

A node keeps every message it publishes on a topic matching one of its
``history`` patterns, oldest first, bounded by age (``history_max_age``) and
size (``history_max_bytes``); with a data dir the log is ``history.log``,
appended once per loop iteration and compacted when it has grown to twice
what is kept, so it survives a restart. A subscription that asks
(``since=``, ``last=``) gets the matching part, a page at a time, in the
order it was published; the answer says up to which sequence it covers, so
the subscriber can drop the live copies of what history already gave it. A
message published with a ttl is not replayed once its ttl has passed (nor
counted among a topic's newest ``last``); it leaves with the age bound.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from bisect import bisect_right
from collections import deque
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, Final

import msgspec

from patterns import TopicPattern

from .. import _ttl, _wire
from .._support._cache import BoundedDict
from .._support._text import quoted
from ..errors import ConfigError
from ._log import RecordLog

_FILE: Final[str] = "history.log"
_decoder: Final = msgspec.msgpack.Decoder(_wire.Item)
_encoder: Final = msgspec.msgpack.Encoder()


class History:
    """This node's history; a `HelloPart` (peers learn which topics it keeps)."""

    def __init__(self, patterns: Sequence[TopicPattern], *, max_age: float, max_bytes: int,
                 data_dir: str | None) -> None:
        self.patterns = tuple(patterns)
        self._max_age = max_age
        self._max_bytes = max_bytes
        self._items: deque[_wire.Item] = deque()
        """Oldest first, each with its topic set; seqs increase (one sequence per node)."""
        self._bytes = 0
        self._kept: BoundedDict[str, bool] = BoundedDict()
        self._file = RecordLog(Path(data_dir) / _FILE) if data_dir is not None else None
        self._unwritten: list[_wire.Item] = []
        self._flush: asyncio.Handle | None = None

    def hello_fields(self, version: int) -> Mapping[str, Any]:
        return {"history": [p.pattern for p in self.patterns]}

    def keeps(self, topic: str) -> bool:
        """Does history keep what is published on `topic`?"""
        kept = self._kept.get(topic)
        if kept is None:
            kept = self._kept.put(topic, any(p.matches(topic) for p in self.patterns))
        return kept

    # -- lifecycle -------------------------------------------------------------------

    def load(self) -> None:
        if self._file is None:
            return
        for body in self._file.read():
            try:
                self._append(_decoder.decode(body))
            except (msgspec.DecodeError, UnicodeDecodeError):
                break
        self._trim()
        self._file.rewrite(_encoder.encode(item) for item in self._items)

    def close(self) -> None:
        self.flush()
        if self._file is not None:
            self._file.close()

    # -- recording -------------------------------------------------------------------

    def add(self, topic: str, items: Sequence[_wire.Item]) -> None:
        """Keep `items`, just published on `topic` (which `keeps`)."""
        for item in items:
            kept = _wire.Item(item.seq, item.ts, item.headers, item.payload, item.reliable,
                              topic, item.expires)
            self._append(kept)
            if self._file is not None:
                self._unwritten.append(kept)
        self._trim()
        if self._unwritten and self._flush is None:
            self._flush = asyncio.get_running_loop().call_soon(self.flush)

    def _append(self, item: _wire.Item) -> None:
        self._items.append(item)
        self._bytes += _wire.kept_size(item, item.topic)

    def _trim(self) -> None:
        horizon = time.time() - self._max_age
        items = self._items
        while items and (self._bytes > self._max_bytes or items[0].ts < horizon):
            old = items.popleft()
            self._bytes -= _wire.kept_size(old, old.topic)

    def flush(self) -> None:
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        if self._file is None or not self._unwritten:
            return
        items, self._unwritten = self._unwritten, []
        self._file.append(_encoder.encode(item) for item in items)
        if self._file.size > 2 * self._bytes + (1 << 20):
            self._file.rewrite(_encoder.encode(item) for item in self._items)

    # -- answering -------------------------------------------------------------------

    @property
    def newest_seq(self) -> int:
        return self._items[-1].seq if self._items else 0

    def page(self, pattern: TopicPattern, *, since: float, last: int, after: int,
             upto: int, budget: int) -> tuple[list[_wire.Item], int]:
        """Kept items on topics matching `pattern` with seq in (`after`, `upto`], published
        at or after `since`, and (when `last` > 0) among the newest `last` of their topic;
        up to about `budget` bytes; and where to go on from (0 when done)."""
        self._trim()
        start = bisect_right(self._items, after, key=_seq)  # (seqs increase)
        allowed = self._newest(pattern, last, upto) if last > 0 else None
        out: list[_wire.Item] = []
        size, now = 0, time.time()
        for item in itertools.islice(self._items, start, None):
            if item.seq > upto:
                break
            if item.ts < since or not pattern.matches(item.topic) or _ttl.has_expired(item, now):
                continue
            if allowed is not None and item.seq not in allowed:
                continue
            more = _wire.kept_size(item, item.topic)
            if out and size + more > budget:
                return out, out[-1].seq
            out.append(item)
            size += more
        return out, 0

    def _newest(self, pattern: TopicPattern, last: int, upto: int) -> set[int]:
        """The seqs of the newest `last` kept items of each matching topic, up to `upto`."""
        counts: dict[str, int] = {}
        seqs: set[int] = set()
        now = time.time()
        for item in reversed(self._items):
            if item.seq > upto or not pattern.matches(item.topic) or _ttl.has_expired(item, now):
                continue
            n = counts.get(item.topic, 0)
            if n < last:
                counts[item.topic] = n + 1
                seqs.add(item.seq)
        return seqs


def _seq(item: _wire.Item) -> int:
    return item.seq


def start_of(since: float | datetime | None) -> float | None:
    """`since` as a wall-clock timestamp.

    Raises:
        ConfigError: it is in the future (or not a positive number of seconds ago).
    """
    if since is None:
        return None
    now = time.time()
    if isinstance(since, datetime):
        try:
            start = since.timestamp()  # (a naive one is local time, as Python takes it)
        except (ValueError, OverflowError, OSError):  # (year 1 in a zone east of UTC...)
            raise ConfigError("since", f"{since.isoformat()} is out of range") from None
        if start > now:
            raise ConfigError("since", f"{since.isoformat()} is in the future")
        return start
    seconds: object = since  # (as callers may pass it: a str, a bool, a nan)
    if (isinstance(seconds, bool) or not isinstance(seconds, int | float)
            or not 0 < seconds < math.inf):
        raise ConfigError("since", "must be a positive number of seconds ago, or a datetime")
    return now - seconds


_UNITS: Final = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_since(text: str) -> float | datetime:
    """A `since` as people write it (the CLI's ``--since``, the agent's ``?since=``):
    seconds ago (``90``, ``30s``, ``10m``, ``2h``, ``1d``) or an ISO 8601 time.

    Raises:
        ConfigError: it is neither, not positive, or in the future.
    """
    unit = _UNITS.get(text[-1:].lower())
    try:
        value = float(text[:-1] if unit else text) * (unit or 1.0)
    except ValueError:
        try:
            when = datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            raise ConfigError("since", f"not a duration (90, 30s, 10m, 2h, 1d) or an ISO "
                                       f"8601 time: {quoted(text)}") from None
        start_of(when)
        return when
    if not 0 < value < math.inf:
        raise ConfigError("since", f"must be a positive duration: {quoted(text)}")
    return value


MAX_LAST: Final[int] = 1_000_000_000
"""The largest `last`: far above what any history holds of a topic, and well inside what
a query carries (msgpack ints stop at 2**64; a larger one failed in the background and
the subscription silently got no history)."""


def check_last(last: int | None) -> None:
    """Raises:
        ConfigError: `last` is not None and not a whole number from 1 to `MAX_LAST`.
    """
    value: object = last  # (as callers may pass it: a float, a bool)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                              or not 1 <= value <= MAX_LAST):
        raise ConfigError("last", f"must be a whole number from 1 to {MAX_LAST:,}")
