"""What nodes ask each other to remember: retained values and history, page by page.

These travel as the payloads of requests to the internal services below,
which every node answers without announcing them (see the protocol table in
`mesh._wire`); each is a msgpack array.
"""

from __future__ import annotations

from typing import Final, TypeVar

import msgspec

from .. import _wire
from ..errors import ProtocolError

_encoder: Final = msgspec.msgpack.Encoder()


RETAINED_SERVICE: Final[str] = "_zeromesh.retained"
"""The internal service every node answers retained-value queries on."""


class RetainedQuery(msgspec.Struct, array_like=True, frozen=True):
    """Which retained values the asker wants, and from where on."""

    pattern: str
    version: int = 0
    """The asker's interest version: answer once its subscription of that version is in
    force at our publisher (0: do not wait), so nothing falls between snapshot and live."""
    after: str = ""
    """Only topics sorting after this one (paging)."""


class RetainedPage(msgspec.Struct, array_like=True, frozen=True):
    """Some of a publisher's retained values, in topic order."""

    name: str
    items: list[_wire.Item]
    """Each with its `topic` set."""
    next: str = ""
    """Ask again with ``after=next`` for more; "" when this was the last page."""




HISTORY_SERVICE: Final[str] = "_zeromesh.history"
"""The internal service every node answers history queries on."""


class HistoryQuery(msgspec.Struct, array_like=True, frozen=True):
    """Which of a publisher's history the asker wants."""

    pattern: str
    since: float = 0.0
    """Only messages published at or after this wall-clock time."""
    last: int = 0
    """Only the newest this many of each topic (0: no such limit)."""
    version: int = 0
    """As in `RetainedQuery`: answer once the asker's subscription is in force."""
    after: int = 0
    """Only messages with a sequence above this (paging)."""
    upto: int = 0
    """Only messages up to this sequence: the first page's `upto` (0 on the first)."""


class HistoryPage(msgspec.Struct, array_like=True, frozen=True):
    """Some of a publisher's history, in publishing order."""

    name: str
    items: list[_wire.Item]
    next: int = 0
    """Ask again with ``after=next`` (and this `upto`) for more; 0 when done."""
    upto: int = 0
    """The publisher's newest sequence when the first page was taken: history covers every
    kept message up to it, live messages cover what follows."""
    patterns: list[str] = []
    """The publisher's history patterns (what `upto` covers)."""


Query = RetainedQuery | RetainedPage | HistoryQuery | HistoryPage
_Q = TypeVar("_Q", RetainedQuery, RetainedPage, HistoryQuery, HistoryPage)


def encode(msg: Query) -> bytes:
    return _encoder.encode(msg)


def decode(data: bytes, kind: type[_Q]) -> _Q:
    """`data` as a `kind`.

    Raises:
        ProtocolError: it is not one.
    """
    try:
        return msgspec.msgpack.decode(data, type=kind)
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"undecodable {kind.__name__}: {exc}") from exc
