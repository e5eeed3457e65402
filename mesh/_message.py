"""Messages as applications see them: immutable values with id, source, time and headers."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

Headers = Mapping[str, str]
"""Free per-message headers; zeromesh passes them through untouched (e.g. ``traceparent``)."""

_NO_HEADERS: Headers = {}


class Message:
    """A received message. Cheap to build: one is made per message on the hot path."""

    __slots__ = ("data", "headers", "seq", "source", "source_id", "timestamp", "topic")

    topic: str
    """The concrete topic it was published on."""
    data: bytes
    """The payload, byte for byte as published."""
    source: str
    """Name of the publishing node."""
    source_id: str
    """Id of the publishing node."""
    seq: int
    """Sequence number at the source; (source_id, seq) is unique."""
    timestamp: float
    """Publisher wall clock, seconds since the epoch."""
    headers: Headers

    def __init__(self, topic: str, data: bytes, source: str, source_id: str, seq: int,
                 timestamp: float, headers: Headers | None) -> None:
        self.topic = topic
        self.data = data
        self.source = source
        self.source_id = source_id
        self.seq = seq
        self.timestamp = timestamp
        self.headers = _NO_HEADERS if headers is None else headers

    @property
    def id(self) -> str:
        """Globally unique message id: ``<source id>-<seq>``."""
        return f"{self.source_id}-{self.seq}"

    @property
    def text(self) -> str:
        """The payload decoded as UTF-8 (invalid bytes replaced)."""
        return self.data.decode("utf-8", "replace")

    def to_dict(self) -> dict[str, Any]:
        """The JSON shape used by the CLI and the agent."""
        return {
            "topic": self.topic,
            "data": self.text,
            "source": self.source,
            "source_id": self.source_id,
            "id": self.id,
            "timestamp": self.timestamp,
            "headers": dict(self.headers),
        }

    def __repr__(self) -> str:
        return f"Message(topic={self.topic!r}, id={self.id!r}, data={self.data[:32]!r})"
