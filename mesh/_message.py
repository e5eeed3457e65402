"""Messages as applications see them: immutable values with id, source, time and headers.

One `Message` is built per received message on the hot path, so it is a
msgspec Struct without GC tracking: about a third of the cost of a plain
class, and it never holds references that could form cycles.

`Message[T]` is the message of a typed subscription or pull (``type=T``):
its `value` is the payload decoded as T. A bare `Message` is `Message[Any]`
(the type variable's default), so code written before typed payloads, and
the node's own internals, keep writing plain `Message`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Generic

import msgspec

from . import _codec

if TYPE_CHECKING:  # a default (PEP 696) for type checkers; Python 3.11's TypeVar has none
    from typing_extensions import TypeVar

    T = TypeVar("T", default=Any)
else:
    from typing import TypeVar

    T = TypeVar("T")
U = TypeVar("U")

Headers = Mapping[str, str]
"""Free per-message headers; zeromesh passes them through untouched (e.g. ``traceparent``)."""


Receipt = Callable[["Message", bool], None]
"""Settles a message handed out by a work queue or durable: ``(message, processed)``."""


class _Settleable:
    """Holds where `Message.ack` goes, and a typed message's decoded value, in slots
    rather than fields, so that they take no part in equality, encoding or type hints:
    a pulled message equals its copy, a typed message its undecoded original."""

    __slots__ = ("_receipt", "_value")


class Message(msgspec.Struct, _Settleable, Generic[T], frozen=True, gc=False):
    """A received message; `Message[T]` when it came through ``type=T`` (see `value`)."""

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
    def value(self) -> T:
        """The payload decoded as the ``type=`` of the subscription or pull it came
        through; without one, the payload bytes (`data`)."""
        try:
            value: T = self._value  # type: ignore[attr-defined]
        except AttributeError:
            return self.data  # type: ignore[return-value]  # (T is Any here: no type given)
        return value

    def decode(self, type: type[U]) -> U:
        """The payload decoded as `type` by its ``content-type`` header: JSON for
        ``application/json``, MessagePack otherwise (the default of typed sends).

        Raises:
            msgspec.ValidationError: the payload is not a `type`.
            msgspec.DecodeError: it is not valid JSON / MessagePack, or its content
                type is neither.
        """
        return _codec.decode(self.data, type, self.headers)

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
            "headers": dict(self.headers or {}),
        }


def attach_receipt(msg: Message, receipt: Receipt) -> None:
    """Make ``msg.ack()``/``msg.nack()`` call `receipt` (set in place: no copy per message)."""
    msgspec.structs.force_setattr(msg, "_receipt", receipt)


def with_value(msg: Message, value: U) -> Message[U]:
    """A copy of `msg` carrying its decoded `value` (a copy: one received message is
    shared by every subscription it matches, each may want another type)."""
    typed: Message[U] = Message(msg.topic, msg.data, msg.source, msg.source_id, msg.seq,
                                msg.timestamp, msg.headers, msg.reliable)
    msgspec.structs.force_setattr(typed, "_value", value)
    return typed


def receipt_of(msg: Message) -> Receipt | None:
    """Where ``msg.ack()``/``msg.nack()`` go, if anywhere."""
    receipt: Receipt | None = getattr(msg, "_receipt", None)
    return receipt
