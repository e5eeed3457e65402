"""The zeromesh wire protocol: frame layout, msgspec envelopes, version and size checks.

Every message is a ZeroMQ multipart message. The first frame a receiver
inspects is a 4-byte header, checked before anything is decoded:

======  ========  =====================================================
bytes   value     meaning
======  ========  =====================================================
0-1     ``ZM``    magic
2       1         protocol version (``PROTOCOL_VERSION``)
3       ``D|C``   kind: data batch or control message
======  ========  =====================================================

Data (PUB -> SUB), frames ``[topic key, header, Batch]``:

- *topic key* is the UTF-8 topic plus a NUL, so libzmq's prefix filter
  selects exact topics exactly and wildcard patterns by their literal prefix;
- ``Batch`` (msgpack array) = ``[source id, source name, topic seq, items]``
  where each item is ``[seq, timestamp, headers | nil, payload]``. All items
  share one topic; ``topic seq`` numbers the first item, the rest follow
  contiguously, so a receiver sees publisher-side drops as gaps.

Control (DEALER -> ROUTER), frames ``[header, Control]``, ``Control`` a
tagged msgpack array (tag first):

===  =========  ==========================================================
tag  message    fields
===  =========  ==========================================================
1    Hello      id, name, mesh, incarnation, ctl, pub, subs, subs_version, reply
2    Heartbeat  id, incarnation, subs_version, ctl
3    Bye        id
===  =========  ==========================================================

Evolution: fields are only appended, with defaults; new message kinds get new
tags, which older peers drop and count as malformed.
"""

from __future__ import annotations

from typing import Final

import msgspec

from .errors import ProtocolError

MAGIC: Final[bytes] = b"ZM"
PROTOCOL_VERSION: Final[int] = 1
KIND_DATA: Final[bytes] = b"D"
KIND_CONTROL: Final[bytes] = b"C"
DATA_HEADER: Final[bytes] = MAGIC + bytes([PROTOCOL_VERSION]) + KIND_DATA
CONTROL_HEADER: Final[bytes] = MAGIC + bytes([PROTOCOL_VERSION]) + KIND_CONTROL
MAX_CONTROL_SIZE: Final[int] = 64 * 1024


class Item(msgspec.Struct, array_like=True, gc=False):
    """One published message inside a batch."""

    seq: int
    """Per-source sequence; with the source id it is the message id."""
    ts: float
    """Publisher wall clock, seconds since the epoch."""
    headers: dict[str, str] | None
    """Free application headers (e.g. ``traceparent``), passed through untouched."""
    payload: bytes
    """The user's bytes."""


class Batch(msgspec.Struct, array_like=True, gc=False):
    """Messages of one topic from one source, in publish order."""

    source: str
    name: str
    topic_seq: int
    items: list[Item]


class Hello(msgspec.Struct, frozen=True, array_like=True, tag=1):
    """Who I am, where to reach me, and what I subscribe to."""

    id: str
    name: str
    mesh: str
    incarnation: int
    ctl: list[str]
    pub: list[str]
    subs: list[str]
    subs_version: int
    reply: bool = False


class Heartbeat(msgspec.Struct, frozen=True, array_like=True, tag=2):
    """I am alive; `subs_version` tells a peer whether its view of my subs is stale."""

    id: str
    incarnation: int
    subs_version: int
    ctl: list[str]


class Bye(msgspec.Struct, frozen=True, array_like=True, tag=3):
    """I am leaving on purpose: drop me now, do not wait to call me lost."""

    id: str


Control = Hello | Heartbeat | Bye

_encoder: Final = msgspec.msgpack.Encoder()
_batch_decoder: Final = msgspec.msgpack.Decoder(Batch)
_control_decoder: Final = msgspec.msgpack.Decoder(Control)


def encode_batch(batch: Batch) -> bytes:
    return _encoder.encode(batch)


def encode_control(msg: Control) -> list[bytes]:
    return [CONTROL_HEADER, _encoder.encode(msg)]


def _check_header(header: bytes, expected: bytes) -> None:
    if header == expected:
        return
    if header[:2] != MAGIC or len(header) != 4:
        raise ProtocolError("bad magic")
    if header[2] != PROTOCOL_VERSION:
        raise ProtocolError(f"unsupported protocol version {header[2]}")
    raise ProtocolError("unexpected message kind")


def decode_batch(frames: list[bytes], max_size: int) -> Batch:
    """Decode a data message, checking header and size first.

    Raises:
        ProtocolError: anything malformed; the caller drops and counts it.
    """
    if len(frames) != 3:
        raise ProtocolError(f"data message with {len(frames)} frames")
    _check_header(frames[1], DATA_HEADER)
    body = frames[2]
    if len(body) > max_size:
        raise ProtocolError(f"data message of {len(body)} bytes exceeds {max_size}")
    try:
        return _batch_decoder.decode(body)
    except msgspec.DecodeError as exc:
        raise ProtocolError(f"undecodable data: {exc}") from exc


def decode_control(frames: list[bytes]) -> Control:
    """Decode a control message, checking header and size first.

    Raises:
        ProtocolError: anything malformed; the caller drops and counts it.
    """
    if len(frames) != 2:
        raise ProtocolError(f"control message with {len(frames)} frames")
    _check_header(frames[0], CONTROL_HEADER)
    if len(frames[1]) > MAX_CONTROL_SIZE:
        raise ProtocolError("control message too large")
    try:
        msg: Control = _control_decoder.decode(frames[1])
    except msgspec.DecodeError as exc:
        raise ProtocolError(f"undecodable control: {exc}") from exc
    return msg
