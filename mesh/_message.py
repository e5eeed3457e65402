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

import base64
import logging
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping
from itertools import repeat
from operator import attrgetter
from typing import TYPE_CHECKING, Any, Final, Generic

import msgspec

from . import _codec
from ._support._text import quoted
from .errors import ConfigError

if TYPE_CHECKING:  # a default (PEP 696) for type checkers; Python 3.11's TypeVar has none
    from typing_extensions import TypeVar

    T = TypeVar("T", default=Any)
else:
    from typing import TypeVar

    T = TypeVar("T")
U = TypeVar("U")

_log = logging.getLogger("mesh.node")
_CONTENT_TYPES: Final[int] = 16
"""Decoders a `Decoding` keeps at hand, by content type."""
_NONE: Final = object()
"""No content type seen yet (None is one: no header)."""
_data: Final = attrgetter("data")
_set_slot: Final = msgspec.structs.force_setattr

Headers = Mapping[str, str]
"""Free per-message headers; zeromesh passes them through untouched (e.g. ``traceparent``)."""


def sent_headers(headers: object, what: str = "headers") -> dict[str, str] | None:
    """A copy of the headers of a message to send (None when there are none), checked as it
    is sent: found only when its batch is encoded, a bad header would take the whole batch,
    other messages too, with it.

    Raises:
        TypeError: `headers` is not a mapping of str to str.
        ConfigError: a name or value is not valid Unicode (a lone surrogate, as from
            bytes decoded with ``surrogateescape``).
    """
    if not headers:
        return None
    if not isinstance(headers, Mapping):
        raise TypeError(f"{what} must be a mapping, not {type(headers).__name__}")
    out: dict[str, str] = {}
    for key, value in headers.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f"{what}: {key!r} must map a str to a str")
        if not (key.isascii() and value.isascii()):
            try:
                key.encode()
                value.encode()
            except UnicodeEncodeError:
                raise ConfigError(what, f"{quoted(key)} is not valid Unicode text") from None
        out[key] = value
    return out


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
    """Publisher wall clock, seconds since the epoch: when it was published, or, for a
    plain message that left in a run (see `_wire.Batch`), when its run's first was."""
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
        """The JSON shape used by the CLI and the agent: ``data`` as text, or in base64
        with ``"encoding": "base64"`` when it is not UTF-8 (no byte lost)."""
        try:
            data = self.data.decode("utf-8")
            encoding = None
        except UnicodeDecodeError:
            data, encoding = base64.b64encode(self.data).decode("ascii"), "base64"
        out: dict[str, Any] = {
            "topic": self.topic,
            "data": data,
            "source": self.source,
            "source_id": self.source_id,
            "id": self.id,
            "timestamp": self.timestamp,
            "headers": dict(self.headers or {}),
        }
        if encoding is not None:
            out["encoding"] = encoding
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


class Decoding(Generic[U]):
    """Makes the `Message[U]`s of one typed subscription or pull, and counts the misses.

    Each carries its decoded value: a copy when the received message is shared
    (by every subscription it matches, each may want another type), the message
    itself when no one else holds it. A message
    that is not a U is left out, counted (`errors`, the node's
    ``decode_errors``) and reported once in the log.
    """

    def __init__(self, of: type[U], where: str, stats: Counter[str] | None) -> None:
        """Raises:
            ConfigError: msgspec cannot decode into `of` (found here, not at the first
                message, where it would stop the delivery of every subscription).
        """
        self.of = of
        self.errors = 0
        self._where = where
        self._stats = stats
        self._decoders: dict[str | None, Callable[[bytes], U]] = {}
        """By content type: the decoders in use (`_codec.decoder`'s, at hand)."""
        self._reported = False
        try:
            self._decoder(None)
            self._decoder(_codec.JSON)
        except TypeError as exc:
            raise ConfigError("type", f"cannot decode messages as {of!r}: {exc}") from None

    def many(self, messages: Iterable[Message], shared: bool = True,
             one_label: bool = False) -> list[Message[U]]:
        """The `Message[U]`s of `messages`; with ``shared=False`` (no one else holds
        them) each gets its value in place rather than in a copy. ``one_label``: they
        share one headers dict (a run's), so one decoder serves them all."""
        if one_label and not shared and isinstance(messages, list) and messages:
            typed = self._in_place(messages)
            if typed is not None:
                return typed
        out: list[Message[U]] = []
        keep, set_value = out.append, _set_slot
        label: object = _NONE
        last: object = _NONE
        decode = self._decoder(None)
        for msg in messages:  # (`one`, inlined: a received batch is hundreds)
            headers = msg.headers
            if headers is not last:  # (a run's messages share one dict: no lookup then)
                last = headers
                content_type = headers.get(_codec.CONTENT_TYPE) if headers else None
                if content_type != label:
                    label = content_type
                    decode = self._decoders.get(content_type) or self._decoder(content_type)
            try:
                value = decode(msg.data)
            except msgspec.DecodeError as exc:  # (ValidationError is one)
                self._miss(msg, exc)
                continue
            if shared:
                msg = Message(msg.topic, msg.data, msg.source, msg.source_id, msg.seq,
                              msg.timestamp, headers, msg.reliable)
            set_value(msg, "_value", value)
            keep(msg)
        return out

    def _in_place(self, messages: list[Message]) -> list[Message[U]] | None:
        """A run decoded without a Python step per message (the loop below costs more than
        msgspec's decode); None when one of them is not a U (`many` then skips it)."""
        headers = messages[0].headers
        content_type = headers.get(_codec.CONTENT_TYPE) if headers else None
        decode = self._decoder(content_type)
        try:
            values = list(map(decode, map(_data, messages)))
        except msgspec.DecodeError:
            return None
        deque(map(_set_slot, messages, repeat("_value"), values), maxlen=0)
        return messages

    def one(self, msg: Message) -> Message[U] | None:
        """`msg` as a `Message[U]`, or None (counted) when it is not a U."""
        typed = self.many((msg,))
        return typed[0] if typed else None

    def _decoder(self, content_type: str | None) -> Callable[[bytes], U]:
        found = self._decoders.get(content_type)
        if found is not None:
            return found
        if len(self._decoders) >= _CONTENT_TYPES:  # (senders inventing labels)
            self._decoders.clear()
        found = self._decoders[content_type] = _codec.decoder(self.of, content_type)
        return found

    def _miss(self, msg: Message, exc: msgspec.DecodeError) -> None:
        self.errors += 1
        if self._stats is not None:
            self._stats["decode_errors"] += 1
        if not self._reported:
            self._reported = True
            _log.warning("%s: skipped message %s from %s on %s, not a %s (%s); such "
                         "messages are counted in decode_errors", self._where, msg.id,
                         msg.source, msg.topic, getattr(self.of, "__name__", self.of), exc)


def receipt_of(msg: Message) -> Receipt | None:
    """Where ``msg.ack()``/``msg.nack()`` go, if anywhere."""
    receipt: Receipt | None = getattr(msg, "_receipt", None)
    return receipt
