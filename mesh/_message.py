"""Messages as applications see them: immutable values with id, source, time and headers.

One `Message` is built per received message on the hot path, so it is a
msgspec Struct without GC tracking: about a third of the cost of a plain
class, and it never holds references that could form cycles.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import msgspec

Headers = Mapping[str, str]
"""Free per-message headers; zeromesh passes them through untouched (e.g. ``traceparent``)."""


Receipt = Callable[["Message", bool], None]
"""Settles a message handed out by a work queue or durable: ``(message, processed)``."""


class _Settleable:
    """Holds where `Message.ack` goes in a slot rather than a field, so that it takes no
    part in equality, encoding or type hints: a pulled message equals its copy."""

    __slots__ = ("_receipt",)


class Message(msgspec.Struct, _Settleable, frozen=True, gc=False):
    """A received message."""

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
    headers: Headers | None = None
    """Application headers, or None when the publisher sent none."""
    reliable: bool = False
    """It came through the sender's spool: at-least-once, deduplicated, acknowledged."""
    error: str | None = None
    """Only on a reply gathered by ``request_all``: the server's handler raised this (its
    text; ``data`` is empty). ``request`` raises `RemoteError` instead."""

    def ack(self) -> None:
        """Mark a work or durable message processed now (it otherwise is when you ask for the
        next one, or when your handler returns)."""
        receipt = receipt_of(self)
        if receipt is not None:
            receipt(self, True)

    def nack(self) -> None:
        """Processing failed: a reliable message is redelivered later (after N attempts it
        goes to the dead-letter spool); a best-effort one is just dropped."""
        receipt = receipt_of(self)
        if receipt is not None:
            receipt(self, False)

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
        out: dict[str, Any] = {
            "topic": self.topic,
            "data": self.text,
            "source": self.source,
            "source_id": self.source_id,
            "id": self.id,
            "timestamp": self.timestamp,
            "headers": dict(self.headers or {}),
        }
        if self.error is not None:
            out["error"] = self.error
        return out


class Reply(msgspec.Struct, frozen=True):
    """What a service handler may return to answer with headers as well as a body.

    Returning plain bytes or str stays the short form of ``Reply(data)``. The
    headers reach the requester as the reply `Message`'s ``headers`` (a
    ``traceparent`` set here joins the requester's trace to the server's).
    """

    data: bytes | bytearray | memoryview | str | None = b""
    """The reply body (str is sent as UTF-8; None = empty)."""
    headers: Headers | None = None
    """Reply headers: str names to str values."""


def attach_receipt(msg: Message, receipt: Receipt) -> None:
    """Make ``msg.ack()``/``msg.nack()`` call `receipt` (set in place: no copy per message)."""
    msgspec.structs.force_setattr(msg, "_receipt", receipt)


def receipt_of(msg: Message) -> Receipt | None:
    """Where ``msg.ack()``/``msg.nack()`` go, if anywhere."""
    receipt: Receipt | None = getattr(msg, "_receipt", None)
    return receipt
