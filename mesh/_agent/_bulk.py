"""``POST /v1/publish``: many messages in one NDJSON body, all or nothing.

Every line is parsed and checked before the first is published, so a bad line
(named by its number) leaves nothing of its body in the mesh. Parsing is one
msgspec decode of the whole body as a JSON array (the lines joined by commas)
when that is unambiguous, else line by line, which also finds the bad line.
Publishing has no per-message await: best-effort messages go straight to the
node's batching publisher, and consecutive reliable ones on one topic are one
`publish_many` (one spool write); the groups are started in order and reach
the disk together in one group commit.
"""

from __future__ import annotations

import asyncio
import binascii
import codecs
from base64 import b64decode
from typing import Final

import msgspec

from .. import _names, _ttl
from .._node import AsyncNode
from .._support._text import quoted
from ..errors import ConfigError
from ._headers import MAX_HEADERS, MAX_VALUE, is_token


class Line(msgspec.Struct, forbid_unknown_fields=True):
    """One message of the body."""

    topic: str
    data: str | None = None
    """The payload as text (sent as UTF-8)."""
    data_b64: str | None = None
    """The payload in base64, for bytes that are not text."""
    headers: dict[str, str] | None = None
    retain: bool = False
    ttl: float | None = None
    reliable: bool = False


class BadLine(ValueError):
    """A line that cannot be published; nothing of its body is."""

    def __init__(self, number: int, reason: str) -> None:
        self.number = number
        self.reason = reason
        super().__init__(f"line {number}: {reason}")


class Item(msgspec.Struct, array_like=True, gc=False):
    """A checked line, ready to publish."""

    topic: str
    payload: bytes
    headers: dict[str, str] | None
    retain: bool
    ttl: float | None
    reliable: bool


_ALL: Final = msgspec.json.Decoder(list[Line])
_ONE: Final = msgspec.json.Decoder(Line)


def parse(body: bytes, max_size: int, can_spool: bool) -> list[Item]:
    """Every message of an NDJSON body (blank lines and a leading UTF-8 BOM skipped),
    checked. (Windows tools, PowerShell's among them, start UTF-8 files with a BOM.)

    Raises:
        BadLine: the first line that is not a valid message, with its number.
    """
    text = body.removeprefix(codecs.BOM_UTF8).rstrip()
    if not text:
        return []
    lines: list[Line] | None = None
    try:  # the whole body at once; the count check rejects a line holding two objects
        lines = _ALL.decode(b"[" + text.replace(b"\n", b",") + b"]")
        if len(lines) != text.count(b"\n") + 1:
            lines = None
    except msgspec.DecodeError:
        pass
    if lines is None:
        return _parse_lines(text, max_size, can_spool)
    check = _Checker(max_size, can_spool)
    return [check(number, line) for number, line in enumerate(lines, 1)]


def _parse_lines(text: bytes, max_size: int, can_spool: bool) -> list[Item]:
    check = _Checker(max_size, can_spool)
    out = []
    for number, raw in enumerate(text.split(b"\n"), 1):
        if not raw.strip():
            continue
        try:
            line = _ONE.decode(raw)
        except msgspec.DecodeError as exc:
            raise BadLine(number, str(exc)) from None
        out.append(check(number, line))
    return out


class _Checker:
    """Checks lines one by one; topics seen once are known good."""

    def __init__(self, max_size: int, can_spool: bool) -> None:
        self._max_size = max_size
        self._can_spool = can_spool
        self._topics: set[str] = set()

    def __call__(self, number: int, line: Line) -> Item:
        try:
            return self._checked(line)
        except ConfigError as exc:
            raise BadLine(number, str(exc)) from None

    def _checked(self, line: Line) -> Item:
        if line.topic not in self._topics:
            _names.topic(line.topic)
            self._topics.add(line.topic)
        if line.data is not None:
            if line.data_b64 is not None:
                raise ConfigError("data", "give data or data_b64, not both")
            payload = line.data.encode()
        elif line.data_b64 is not None:
            try:
                payload = b64decode(line.data_b64, validate=True)
            except binascii.Error as exc:
                raise ConfigError("data_b64", f"not base64: {exc}") from None
        else:
            raise ConfigError("data", "give data or data_b64")
        if len(payload) > self._max_size:
            raise ConfigError("data", f"{len(payload)} bytes exceed max_message_size "
                                      f"{self._max_size}")
        headers = _message_headers(line.headers) if line.headers else None
        ttl = _ttl.check(line.ttl) if line.ttl is not None else None
        if line.reliable and not self._can_spool:
            raise ConfigError("reliable", "needs a data dir (the spool lives there)")
        return Item(line.topic, payload, headers, line.retain, ttl, line.reliable)


def _message_headers(given: dict[str, str]) -> dict[str, str]:
    """A line's headers as the single-message routes take them from HTTP: names lower-cased
    HTTP tokens, values one line each (so each can go out again to a webhook or an SSE app).

    Raises:
        ConfigError: more than MAX_HEADERS of them, or one that HTTP cannot carry.
    """
    if len(given) > MAX_HEADERS:
        raise ConfigError("headers", f"more than {MAX_HEADERS}")
    out = {}
    for name, value in given.items():
        if not is_token(name):
            raise ConfigError("headers", f"{quoted(name)} is not an HTTP header name")
        if len(value) > MAX_VALUE or "\r" in value or "\n" in value:
            raise ConfigError("headers", f"{name}: value longer than {MAX_VALUE} or with a "
                                         "line break")
        out[name.lower()] = value
    return out


async def publish(node: AsyncNode, items: list[Item]) -> None:
    """Publish checked items in their order.

    Raises:
        SpoolFullError: (reliable) the spool is full; what came before it is published.
    """
    tasks: list[asyncio.Task[None]] = []
    unstarted = False
    start = 0
    count = len(items)
    loop = asyncio.get_running_loop()
    while start < count:
        item = items[start]
        if not (item.reliable or item.retain):
            if unstarted:
                await asyncio.sleep(0)  # the groups before it publish first
                unstarted = False
            if node.publish_nowait(item.topic, item.payload, headers=item.headers,
                                   ttl=item.ttl):
                await asyncio.sleep(0)  # a batch just left: let readers and timers run
            start += 1
            continue
        end = start + 1
        while end < count and _same_group(item, items[end]):
            end += 1
        tasks.append(loop.create_task(node.publish_many(
            item.topic, [i.payload for i in items[start:end]], headers=item.headers,
            reliable=item.reliable, retain=item.retain, ttl=item.ttl)))
        unstarted = True
        start = end
    if tasks:
        await asyncio.gather(*tasks)


def _same_group(first: Item, item: Item) -> bool:
    return (item.topic == first.topic and item.reliable == first.reliable
            and item.retain == first.retain and item.ttl == first.ttl
            and item.headers == first.headers)
