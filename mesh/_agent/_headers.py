"""Message headers <-> HTTP headers.

What an app sets on its HTTP request travels with the message: the content
type, W3C trace context (``traceparent``, ``tracestate``, ``baggage``) and
every ``X-`` header; transport headers (Host, Content-Length, ...) do not.
Names are lower-cased, as HTTP/2 and most tracing libraries expect. On the way
out (webhooks, replies) the same headers come back, plus ours: ``X-Zeromesh-Id``,
``-Topic``/``-Queue`` and ``-Source``.

A service's reply headers (`reply_to_http`) come back under their own name when
an app could have sent that name in (content type, trace context, ``X-``), so
they round-trip; any other name, which could clash with HTTP's own
(Content-Length, Date, Server, Set-Cookie...), comes back as
``X-Zeromesh-Header-<name>``.

An app that asks with ``Accept: application/json`` (SSE streams, request
replies, gathered replies, ``/v1/last``), or a webhook configured with
``accept = "application/json"``, gets MessagePack payloads — what typed sends
from Python make — as JSON, labelled ``content-type: application/json``: HTTP
apps in any language read JSON, few read MessagePack. Untyped bytes stay as
they are.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from typing import Final

import msgspec

from .. import _codec
from .._message import Message
from .._support._cache import BoundedDict

CONTENT_TYPE: Final[str] = "content-type"
DEFAULT_CONTENT_TYPE: Final[str] = "application/octet-stream"
OURS: Final[str] = "x-zeromesh-"
REPLY_HEADER: Final[str] = OURS + "header-"
"""The prefix of a reply header that cannot travel under its own name."""
_PASSED: Final = frozenset({CONTENT_TYPE, "traceparent", "tracestate", "baggage"})
_NOT_PASSED_PREFIXES: Final = ("x-forwarded-", "x-real-ip", OURS)
_TOKEN: Final = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]{1,128}")
"""An HTTP header name we send or read (an RFC 9110 token, 128 characters at most)."""
MAX_HEADERS: Final[int] = 64
MAX_VALUE: Final[int] = 4096


class BadHeader(ValueError):
    """A header the agent will not carry (too many, too long)."""


def from_http(items: Iterable[tuple[str, str]]) -> dict[str, str]:
    """The message headers an HTTP request carries.

    Raises:
        BadHeader: more than MAX_HEADERS of them, or a value over MAX_VALUE bytes.
    """
    return _OWN_NAMES.collect(items)


class _Names:
    """Maps HTTP header names to message header names ("" = left out), remembering each
    name as sent: a request's headers cost one dict lookup each, not string tests."""

    def __init__(self, name_of: Callable[[str], str]) -> None:
        self._name_of = name_of
        self._known: BoundedDict[str, str] = BoundedDict(_KNOWN_NAMES)

    def collect(self, items: Iterable[tuple[str, str]]) -> dict[str, str]:
        """Raises:
            BadHeader: more than MAX_HEADERS of them, or a value over MAX_VALUE bytes or
                not UTF-8.
        """
        known = self._known
        out: dict[str, str] = {}
        for name, value in items:
            key = known.get(name)
            if key is None:
                key = known.put(name, self._name_of(name.lower()))
            if not key:
                continue
            if len(value) > MAX_VALUE:
                raise BadHeader(f"header {name} is longer than {MAX_VALUE} bytes")
            if not value.isascii() and not _is_utf8(value):
                raise BadHeader(f"header {name} is not UTF-8 text")
            out[key] = value
            if len(out) > MAX_HEADERS:
                raise BadHeader(f"more than {MAX_HEADERS} message headers")
        return out


def _is_utf8(value: str) -> bool:
    """Was this header value UTF-8 on the wire? (aiohttp keeps other bytes as lone
    surrogates, which no message can carry.)"""
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


def _own_name(key: str) -> str:
    return key if _passed(key) else ""


def _app_name(key: str) -> str:
    if key.startswith(REPLY_HEADER):
        return key[len(REPLY_HEADER):]
    return key if _passed(key) else ""


_KNOWN_NAMES: Final[int] = 4096
_OWN_NAMES: Final = _Names(_own_name)
_APP_NAMES: Final = _Names(_app_name)


def _passed(key: str) -> bool:
    """An HTTP header (lower-cased) that travels as a message header of the same name."""
    return key in _PASSED or (key.startswith("x-") and not key.startswith(_NOT_PASSED_PREFIXES))


def is_token(name: str) -> bool:
    """Is `name` a header name we send or read? Names repeat: each is checked once."""
    found = _tokens.get(name)
    if found is None:
        found = _tokens.put(name, _TOKEN.fullmatch(name) is not None)
    return found


_tokens: BoundedDict[str, bool] = BoundedDict(_KNOWN_NAMES)


def sendable(name: str, value: str) -> bool:
    """Can this header go out as it is? (Else it cannot be sent, and sent as it is it
    would forge other headers.)"""
    return is_token(name) and "\r" not in value and "\n" not in value


def reply_to_http(headers: Mapping[str, str] | None) -> dict[str, str]:
    """HTTP headers for a service reply's headers: those `from_http` takes in under their
    own (lower-cased) name, the rest as ``x-zeromesh-header-<name>``; names that are not
    HTTP tokens, and values with line breaks, are left out."""
    out = {CONTENT_TYPE: DEFAULT_CONTENT_TYPE}
    for key, value in (headers or {}).items():
        name = key.lower()
        if not _passed(name):
            name = REPLY_HEADER + name
        if sendable(name, value):
            out[name] = value
    return out


def for_app(msg: Message) -> dict[str, str]:
    """What a ``[[service]]`` POST carries (see `for_delivery`)."""
    return for_delivery(msg, "service")


def from_app(items: Iterable[tuple[str, str]]) -> dict[str, str]:
    """A ``[[service]]`` app's response headers as reply headers: the inverse of
    `reply_to_http` (``X-Zeromesh-Header-<name>`` is ``<name>``; other ``X-Zeromesh-``
    and transport headers stay behind).

    Raises:
        BadHeader: more than MAX_HEADERS of them, or a value over MAX_VALUE bytes.
    """
    return _APP_NAMES.collect(items)


def for_delivery(msg: Message, kind: str) -> dict[str, str]:
    """What a webhook or ``[[service]]`` POST carries: the message's headers by the scheme
    of `reply_to_http` (so an app reads the names a requester's agent would show, and no
    message header poses as HTTP's own, such as Content-Length or Host), plus
    ``X-Zeromesh-Id``, ``-Topic``/``-Queue``/``-Service`` (`kind`) and ``-Source``."""
    out = reply_to_http(msg.headers)
    out[OURS + "id"] = msg.id
    out[OURS + kind] = msg.topic
    out[OURS + "source"] = msg.source
    return out


def wants_json(accept: str | None) -> bool:
    """Does an ``Accept`` header ask for JSON?"""
    return accept is not None and _codec.JSON in accept.lower()


def as_json(msg: Message) -> Message:
    """`msg` with a MessagePack payload turned into JSON (and labelled so); any other
    message, or one that does not convert, as it is."""
    converted = _codec.as_json(msg.data, msg.headers)
    if converted is None:
        return msg
    return msgspec.structs.replace(msg, data=converted,
                                   headers={**(msg.headers or {}), CONTENT_TYPE: _codec.JSON})
