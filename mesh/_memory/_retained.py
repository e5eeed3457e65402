"""Retained values: the newest retained publish of each topic, kept by its publisher.

A retained publish overwrites its topic's value (an empty one clears it): a
dict entry in memory. With a data dir the values survive a restart, a SIGKILL
included: each change is appended to ``retained.log`` before its publish
returns (a write to the page cache, no fsync; `publish_many` writes only its
last value), so the value a crash leaves is the last one whose publish
returned, and the log is rewritten compactly at start and whenever it has
grown to several times its size after the last rewrite (see `_log` for what a
crash can cost).

A value published with a ttl stops being the topic's value once its ttl has
passed: it is never handed out again and is cleared (in the log too) when a
query or the next start comes across it.
"""

from __future__ import annotations

import logging
import time
from bisect import bisect_right
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

import msgspec

from patterns import TopicPattern

from .. import _ttl, _wire
from .._parts import Announcer
from ._log import RecordLog

_log = logging.getLogger("mesh.node")
_FILE: Final[str] = "retained.log"
_REWRITE_FACTOR: Final[int] = 4
_REWRITE_SLACK: Final[int] = 1 << 20


class _Record(msgspec.Struct, array_like=True, frozen=True):
    topic: str
    item: _wire.Item | None
    """None: the topic was cleared."""


_encoder: Final = msgspec.msgpack.Encoder()
_CLEARED: Final = _wire.Item(0, 0.0, None, b"")
"""An empty value: putting it clears a topic."""
_decoder: Final = msgspec.msgpack.Decoder(_Record)


class RetainedStore:
    """This node's retained values, by topic; a `HelloPart` (peers learn whether to ask)."""

    def __init__(self, data_dir: str | None, announcer: Announcer) -> None:
        self._file = RecordLog(Path(data_dir) / _FILE) if data_dir is not None else None
        self._announcer = announcer
        self._values: dict[str, _wire.Item] = {}
        self._compacted = 0
        """The log's size right after it was last rewritten: what the values took then."""
        self._topics: list[str] | None = None
        """The topics, sorted (for paging); None when a change made it stale."""

    def __len__(self) -> int:
        return len(self._values)

    def hello_fields(self, version: int) -> Mapping[str, Any]:
        return {"retains": bool(self._values)}

    # -- lifecycle -------------------------------------------------------------------

    def load(self) -> None:
        """Read what an earlier run retained and rewrite the log compactly."""
        if self._file is None:
            return
        now = time.time()
        self._values = {topic: item for topic, item in _read(self._file).items()
                        if not _ttl.has_expired(item, now)}
        self._rewrite()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()

    # -- values ----------------------------------------------------------------------

    def put(self, topic: str, item: _wire.Item) -> None:
        """`item` is `topic`'s value now; an empty payload clears it. (On every retained
        publish: a dict entry and, with a data dir, one record written at once: were it
        left for the end of the loop iteration, a crash after the publish returned (an
        agent's 202 already sent) would bring back the value before.)"""
        values = self._values
        had = bool(values)
        if item.payload:
            if topic not in values:
                self._topics = None
            values[topic] = item
        elif values.pop(topic, None) is not None:
            self._topics = None
        if self._file is not None:
            self._write(topic, item if item.payload else None)
        if had != bool(values):
            self._announcer.interest_changed()  # our hello's `retains` flag flips

    def matching(self, pattern: TopicPattern) -> list[_wire.Item]:
        """Every value whose topic matches, in topic order, each with its `topic` set."""
        items, expired, now = [], [], time.time()
        for topic in self._sorted():
            if pattern.matches(topic):
                item = self._values[topic]
                if _ttl.has_expired(item, now):
                    expired.append(topic)
                else:
                    items.append(_with_topic(topic, item))
        self._clear_expired(expired)
        return items

    def page(self, pattern: TopicPattern, after: str, budget: int) -> tuple[list[_wire.Item], str]:
        """Values matching `pattern` with topics after `after`, up to about `budget` bytes;
        and the topic to continue after ("" when none is left)."""
        topics = self._sorted()
        items: list[_wire.Item] = []
        expired: list[str] = []
        size, now, rest = 0, time.time(), ""
        for topic in topics[bisect_right(topics, after) if after else 0:]:
            if not pattern.matches(topic):
                continue
            item = self._values[topic]
            if _ttl.has_expired(item, now):
                expired.append(topic)
                continue
            more = _wire.kept_size(item, topic)
            if items and size + more > budget:
                rest = items[-1].topic
                break
            items.append(_with_topic(topic, item))
            size += more
        self._clear_expired(expired)
        return items, rest

    def _clear_expired(self, topics: list[str]) -> None:
        """These values' ttl passed: their topics are cleared, as by an empty publish."""
        if not topics:
            return
        for topic in topics:
            self.put(topic, _CLEARED)

    def _sorted(self) -> list[str]:
        if self._topics is None:
            self._topics = sorted(self._values)
        return self._topics

    # -- disk ------------------------------------------------------------------------

    def _write(self, topic: str, item: _wire.Item | None) -> None:
        """Append the topic's new value (None: cleared) to the log."""
        assert self._file is not None
        self._file.append((_encoder.encode(_Record(topic, None if item is None else
                                                  _with_topic(topic, item))),))
        if self._file.size > _REWRITE_FACTOR * self._compacted + _REWRITE_SLACK:
            self._rewrite()

    def _rewrite(self) -> None:
        """The log holds exactly the current values."""
        assert self._file is not None
        self._file.rewrite(_encoder.encode(_Record(topic, _with_topic(topic, item)))
                          for topic, item in self._values.items())
        self._compacted = self._file.size


def _with_topic(topic: str, item: _wire.Item) -> _wire.Item:
    """The item as it travels alone (in a query's answer, on disk): with its topic, and
    best effort (a retained value is a view, whatever way the message first went)."""
    if item.topic == topic and not item.reliable:
        return item
    return _wire.Item(item.seq, item.ts, item.headers, item.payload, False, topic, item.expires)


def _read(records: RecordLog) -> dict[str, _wire.Item]:
    """The values a log holds; an undecodable record ends the read (reported once)."""
    values: dict[str, _wire.Item] = {}
    for body in records.read():
        try:
            record = _decoder.decode(body)
        except (msgspec.DecodeError, UnicodeDecodeError):
            _log.warning("%s: an undecodable record ends what is read", records.path)
            break
        if record.item is None:
            values.pop(record.topic, None)
        else:
            values[record.topic] = record.item
    return values
