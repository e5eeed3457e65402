"""Typed payloads: Python values in and out of message bytes, labelled by content type.

`publish`, `push` and `request` send ``bytes``/``str`` byte for byte, as
always; any other value (a msgspec Struct, a dataclass, a dict, a list...) is
encoded with msgspec and labelled with a ``content-type`` header: MessagePack
by default, JSON when the caller's headers already say ``application/json``.
The receiving side decodes by that header (MessagePack when there is none).

Encoders and decoders are built once and kept (a decoder per type and codec):
building one costs far more than using it, and this runs per message.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Final, Protocol, TypeAlias, TypeVar

import msgspec

from ._support._cache import BoundedDict

CONTENT_TYPE: Final[str] = "content-type"
MSGPACK: Final[str] = "application/msgpack"
JSON: Final[str] = "application/json"
_MSGPACK_ALIASES: Final = frozenset({MSGPACK, "application/x-msgpack",
                                     "application/vnd.msgpack"})
_DECODERS: Final[int] = 256
"""Decoders kept, one per type and content type in use (a program has a handful; more,
e.g. senders inventing labels, only empties the memo now and then)."""

_BYTES_LIKE: Final = (bytes, str, bytearray, memoryview)
"""Payloads sent byte for byte (str as UTF-8), with no content type added."""
U = TypeVar("U")


class DataclassInstance(Protocol):
    """Any dataclass instance (what typeshed calls it; msgspec encodes them natively)."""

    __dataclass_fields__: ClassVar[dict[str, Any]]


Payload: TypeAlias = (bytes | str | msgspec.Struct | DataclassInstance | Mapping[str, Any]
                      | list[Any] | tuple[Any, ...])
"""What a send takes: bytes/str as they are, anything else encoded by msgspec."""

_msgpack_encode: Final = msgspec.msgpack.Encoder().encode
_json_encode: Final = msgspec.json.Encoder().encode
_msgpack_any: Final = msgspec.msgpack.Decoder().decode


class _Label(dict[str, str]):
    """A dict that refuses changes: `LABEL` is shared by every message it labels."""

    def _refuse(self, *args: object, **kwargs: object) -> None:
        raise TypeError("message headers are read-only")

    __setitem__ = __delitem__ = update = pop = popitem = clear = setdefault = _refuse  # type: ignore[assignment]


LABEL: Final[dict[str, str]] = _Label({CONTENT_TYPE: MSGPACK})
"""The headers of a typed value sent without any: one read-only dict for all of them, so
the pub/sub engine keeps it as it is rather than copying it per message."""
_labels: BoundedDict[str, dict[str, str]] = BoundedDict(_DECODERS)
ENCODED_TYPES: Final[BoundedDict[type, bool]] = BoundedDict(_DECODERS)
"""Per type seen: is a value of it encoded by msgspec (True) or sent as it is (bytes-like)?
A hot path that finds a type True here, with no headers, may encode it with
`msgpack_encode` and label it `LABEL` itself, as `prepared` would."""
msgpack_encode: Final = _msgpack_encode
_decoders: BoundedDict[tuple[object, str | None], Callable[[bytes], Any]] = BoundedDict(_DECODERS)


def label(content_type: str) -> dict[str, str]:
    """The read-only headers ``{content-type: ...}``, one dict per content type: the
    messages of a received run share it (`LABEL` for MessagePack)."""
    found = _labels.get(content_type)
    if found is None:
        found = _labels.put(content_type, LABEL if content_type == MSGPACK
                            else _Label({CONTENT_TYPE: content_type}))
    return found


def is_json(content_type: str | None) -> bool:
    """Is this a JSON content type (``application/json``, ``...+json``, parameters aside)?"""
    if content_type is None:
        return False
    base = content_type.partition(";")[0].strip().lower()
    return base == JSON or base.endswith("+json")


def is_msgpack(content_type: str | None) -> bool:
    """Is this a MessagePack content type (parameters aside)?"""
    return (content_type is not None
            and content_type.partition(";")[0].strip().lower() in _MSGPACK_ALIASES)


def prepared(data: object, headers: Mapping[str, str] | None
             ) -> tuple[bytes | str, Mapping[str, str] | None]:
    """A payload ready to send, with its headers: bytes-like ones as they are, any
    other value encoded and labelled (`encode`).

    Raises:
        TypeError: as `encode`.
    """
    cls = type(data)  # (by type, memoized: isinstance is slow on Structs, ~50 ns a class)
    encoded = ENCODED_TYPES.get(cls)
    if encoded is None:
        encoded = ENCODED_TYPES.put(cls, not issubclass(cls, _BYTES_LIKE))
    if encoded:
        if headers is None:  # (`encode`'s common case, inlined: this is per message)
            return _msgpack_encode(data), LABEL
        return encode(data, headers)
    if isinstance(data, bytes | str):
        return data, headers
    return bytes(data), headers  # type: ignore[call-overload]  # (bytearray, memoryview)


def encode(value: object, headers: Mapping[str, str] | None
           ) -> tuple[bytes, Mapping[str, str]]:
    """`value` (not bytes/str) as message bytes and the headers that label it.

    A ``content-type`` the caller set chooses the codec (JSON or MessagePack);
    otherwise it is MessagePack, and the header says so.

    Raises:
        TypeError: msgspec cannot encode `value`, or the content type asks for
            neither JSON nor MessagePack.
    """
    content_type = headers.get(CONTENT_TYPE) if headers else None
    if content_type is None:
        return _msgpack_encode(value), {**(headers or {}), CONTENT_TYPE: MSGPACK}
    if is_json(content_type):
        return _json_encode(value), headers or {}
    if is_msgpack(content_type):
        return _msgpack_encode(value), headers or {}
    raise TypeError(f"cannot encode a {type(value).__name__} as {content_type!r}: "
                    f"use {MSGPACK} or {JSON}, or send bytes")


def decoder(of: type[U], content_type: str | None) -> Callable[[bytes], U]:
    """The (cached) decoder of `of` for payloads labelled `content_type`: JSON,
    MessagePack (also when None: the default of typed sends), or, for any other
    label, one that refuses (msgspec.DecodeError) — bytes of unknown encoding."""
    key = (of, content_type)
    found = _decoders.get(key)
    if found is None:
        made: Callable[[bytes], U]
        if is_json(content_type):
            made = msgspec.json.Decoder(of).decode
        elif content_type is None or is_msgpack(content_type):
            made = msgspec.msgpack.Decoder(of).decode
        else:
            made = _Refuse(of, content_type)
        found = _decoders.put(key, made)
    return found


def decode(data: bytes, of: type[U], headers: Mapping[str, str] | None) -> U:
    """`data` decoded as `of` by its ``content-type`` (MessagePack when it has none).

    Raises:
        msgspec.DecodeError: the bytes are not that codec, or (ValidationError)
            not of that type, or the content type is neither JSON nor MessagePack.
    """
    return decoder(of, headers.get(CONTENT_TYPE) if headers else None)(data)


class _Refuse:
    """The decoder for a content type that is neither JSON nor MessagePack."""

    def __init__(self, of: object, content_type: str) -> None:
        self._reason = (f"cannot decode content type {content_type[:64]!r} "
                        f"as {getattr(of, '__name__', of)}")

    def __call__(self, data: bytes) -> Any:
        raise msgspec.DecodeError(self._reason)


def as_json(data: bytes, headers: Mapping[str, str] | None) -> bytes | None:
    """A MessagePack payload as JSON bytes, for HTTP apps that asked for JSON; None when
    the payload is not MessagePack or does not convert (e.g. an extension type)."""
    if not is_msgpack(headers.get(CONTENT_TYPE) if headers else None):
        return None
    try:
        return _json_encode(_msgpack_any(data))
    except (msgspec.DecodeError, TypeError, ValueError):
        return None
