"""Errors raised by the `patterns` package.

Everything this package raises on purpose derives from `PatternError`, so a
caller (the `mesh` package, at its boundary) can map the whole tree at once::

    PatternError (Exception)
    ├── InvalidName (also ValueError)   .kind, .name, .reason
    │                                   a bad topic, pattern, queue or service name
    ├── WouldBlock                      a non-blocking send hit the high-water mark
    └── SocketClosed                    .detail; the socket is gone

Each error builds its message in `__init__` from typed attributes.
"""

from __future__ import annotations

from typing import Final

_MAX_NAME_IN_MESSAGE: Final[int] = 80


class PatternError(Exception):
    """Root of every error the `patterns` package raises."""


class InvalidName(PatternError, ValueError):
    """A topic, pattern, queue or service name failed validation.

    Attributes:
        kind: What was being validated, e.g. ``"topic"`` or ``"pattern"``.
        name: The rejected name, exactly as given.
        reason: Why it was rejected, e.g. ``"empty segment"``.
    """

    kind: str
    name: str
    reason: str

    def __init__(self, kind: str, name: str, reason: str) -> None:
        self.kind = kind
        self.name = name
        self.reason = reason
        shown = name if len(name) <= _MAX_NAME_IN_MESSAGE else name[:_MAX_NAME_IN_MESSAGE] + "…"
        super().__init__(f"invalid {kind} {shown!r}: {reason}")

    def __reduce__(self) -> tuple[type[InvalidName], tuple[str, str, str]]:
        return (type(self), (self.kind, self.name, self.reason))


class WouldBlock(PatternError):
    """A non-blocking send found the peer's queue full (high-water mark)."""

    def __init__(self) -> None:
        super().__init__("send queue full (high-water mark reached)")


class SocketClosed(PatternError):
    """The socket was closed, usually because the node is shutting down."""

    def __init__(self, detail: str) -> None:
        self.detail = detail
        super().__init__(f"socket closed: {detail}")
