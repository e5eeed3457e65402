"""The wire codec: round trips, header checks, and garbage that must only ever raise ProtocolError."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh import ProtocolError
from mesh import _wire as wire

ids = st.text(alphabet="0123456789abcdef", min_size=32, max_size=32)
texts = st.text(max_size=40)
headers = st.none() | st.dictionaries(texts, texts, max_size=4)
items = st.builds(wire.Item, st.integers(0, 2**63 - 1),
                  st.floats(allow_nan=False, allow_infinity=False), headers, st.binary(max_size=300),
                  expires=st.none() | st.floats(allow_nan=False, allow_infinity=False))
batches = st.builds(wire.Batch, ids, texts, st.integers(0, 2**63 - 1), st.lists(items, max_size=20))
endpoints = st.lists(st.text(max_size=30), max_size=3)
controls = st.one_of(
    st.builds(wire.Hello, ids, texts, texts, st.integers(0, 2**63), endpoints, endpoints,
              st.lists(texts, max_size=5), st.integers(0, 2**31), st.booleans()),
    st.builds(wire.Heartbeat, ids, st.integers(0, 2**63), st.integers(0, 2**31), endpoints),
    st.builds(wire.Bye, ids),
)


@given(batches)
def test_batch_round_trips_with_payload_bytes_untouched(batch: wire.Batch) -> None:
    """A data batch decodes to exactly what was encoded, payloads byte for byte."""
    frame = bytes(wire.encode_data(b"a.b\x00", batch))
    key, offset = wire.split_data(frame)
    assert key == b"a.b\x00"
    decoded = wire.decode_data(frame, offset, max_size=10**7)
    assert decoded == batch
    assert [i.payload for i in decoded.items] == [i.payload for i in batch.items]


@given(controls)
def test_control_messages_round_trip(msg: wire.Control) -> None:
    """Every control message kind survives encode/decode."""
    assert wire.decode_control(bytes(wire.encode_control(msg))) == msg


def _decode_data(frame: bytes) -> wire.Batch:
    _, offset = wire.split_data(frame)
    return wire.decode_data(frame, offset, max_size=10**6)


@given(st.binary(max_size=300) | st.binary(max_size=40).map(lambda b: b"t\x00ZM\x01D" + b)
       | st.binary(max_size=40).map(lambda b: b"ZM\x01C" + b))
def test_garbage_frames_raise_only_protocol_error(frame: bytes) -> None:
    """Random frames never raise anything but ProtocolError (never crash a reader)."""
    for decode in (_decode_data, wire.decode_control):
        with contextlib.suppress(ProtocolError):
            decode(frame)


@given(st.binary(max_size=300))
def test_garbage_body_with_valid_header_raises_protocol_error(body: bytes) -> None:
    """A correct header does not make an undecodable body acceptable."""
    with pytest.raises(ProtocolError):
        wire.decode_control(wire.CONTROL_HEADER + body + b"\xc1")  # 0xc1 is never valid msgpack


def test_unknown_protocol_version_is_rejected_before_decoding() -> None:
    """A future version is refused by its header, whatever the body."""
    future = wire.MAGIC + bytes([wire.PROTOCOL_VERSION + 1]) + wire.KIND_CONTROL
    body = bytes(wire.encode_control(wire.Bye("ab" * 16)))[4:]
    with pytest.raises(ProtocolError, match="unsupported protocol version"):
        wire.decode_control(future + body)


def test_bad_magic_is_rejected() -> None:
    """Frames from something that is not zeromesh are refused by magic."""
    with pytest.raises(ProtocolError, match="bad magic"):
        _decode_data(b"t\x00XX\x01D")


def test_oversized_data_is_rejected_before_decoding() -> None:
    """The size limit is checked before msgspec sees the bytes."""
    frame = bytes(wire.encode_data(
        b"t\x00", wire.Batch("ab" * 16, "n", 0, [wire.Item(0, 0.0, None, b"x" * 500)])))
    with pytest.raises(ProtocolError, match="exceeds"):
        wire.decode_data(frame, 2, max_size=100)


def test_frame_without_topic_key_is_rejected() -> None:
    """No NUL within the topic limit means no topic: refused before decoding."""
    with pytest.raises(ProtocolError, match="topic key"):
        wire.split_data(b"x" * 400)


def test_unknown_control_tag_is_a_protocol_error() -> None:
    """A newer peer's new message kind is dropped by older peers, not crashed on."""
    body = msgspec.msgpack.encode([99, "x"])
    with pytest.raises(ProtocolError):
        wire.decode_control(wire.CONTROL_HEADER + body)


def test_invalid_utf8_in_a_string_field_is_a_protocol_error() -> None:
    """msgspec raises UnicodeDecodeError (not DecodeError) for bad UTF-8: still ProtocolError."""
    with pytest.raises(ProtocolError):
        _decode_data(b"\x01\x00ZM\x01D\x94\xa3\x00\x00\x80")
    with pytest.raises(ProtocolError):
        wire.decode_control(wire.CONTROL_HEADER + b"\x92\x03\xa2\xff\xfe")


# -- service frames, spool records, and structured garbage for every decoder ------------------

requests = st.builds(wire.Request, st.integers(0, 2**63), texts, ids, texts,
                     st.floats(allow_nan=False, allow_infinity=False), headers, st.binary(max_size=200))
replies = st.builds(wire.Reply, st.integers(0, 2**63), st.integers(0, 3),
                    st.floats(allow_nan=False, allow_infinity=False), st.binary(max_size=200), texts)


@given(st.lists(requests | replies, min_size=1, max_size=5))
def test_service_frames_round_trip(msgs: list[wire.ServiceFrame]) -> None:
    """Requests and replies, one or several to a frame, survive encode/decode in order."""
    assert wire.decode_service(bytes(wire.encode_service(msgs)), 10**6) == msgs


def test_an_empty_service_frame_is_refused() -> None:
    """A frame must carry at least one request or reply."""
    with pytest.raises(ProtocolError, match="empty"):
        wire.decode_service(bytes(wire.encode_service([])), 10**6)


#: any msgpack value: what a peer that speaks msgpack but not our schema could send
msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | texts
    | st.binary(max_size=40),
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(texts, inner, max_size=4),
    max_leaves=20)


def _decoders() -> list[tuple[bytes, Callable[[bytes], object]]]:
    return [(b"t\x00" + wire.DATA_HEADER, _decode_data),
            (wire.CONTROL_HEADER, wire.decode_control),
            (wire.SERVICE_HEADER, lambda f: wire.decode_service(f, 10**6)),
            (b"", wire.decode_spooled)]


@settings(max_examples=400)
@given(msgpack_values, st.lists(st.integers(0, 20), max_size=3))
def test_msgpack_of_the_wrong_shape_raises_only_protocol_error(
        value: object, tags: list[int]) -> None:
    """Valid msgpack that is not our schema (any shape, a known tag first or not) behind a
    correct header: a value of the declared type or ProtocolError, nothing else."""
    bodies = [msgspec.msgpack.encode(value), msgspec.msgpack.encode([*tags, value]),
              msgspec.msgpack.encode(tags)]
    for header, decode in _decoders():
        for body in bodies:
            with contextlib.suppress(ProtocolError):
                decoded = decode(header + body)
                if isinstance(decoded, list):  # service frames hold a list
                    assert decoded
                    assert all(isinstance(m, wire.Request | wire.Reply)
                                           for m in decoded)
                    continue
                # (every control message there is, `Pace` included: the union says which)
                assert isinstance(decoded, wire.Batch | wire.Control | wire.Request
                                  | wire.Reply | wire.Spooled)


@settings(max_examples=400)
@given(controls | requests | replies, st.data())
def test_mutated_valid_frames_raise_only_protocol_error(msg: object, data: st.DataObject) -> None:
    """A real frame with bytes flipped, cut, inserted or its length heads inflated: decoders
    return a value or raise ProtocolError, never anything else."""
    if isinstance(msg, wire.Request | wire.Reply):
        frame = bytearray(wire.encode_service([msg]))
    else:
        assert isinstance(msg, wire.Hello | wire.Heartbeat | wire.Bye)
        frame = bytearray(wire.encode_control(msg))
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(frame) - 1))
        action = data.draw(st.sampled_from(["flip", "cut", "insert", "inflate"]))
        if action == "flip":
            frame[at] ^= data.draw(st.integers(1, 255))
        elif action == "cut":
            del frame[at:]
            if not frame:
                break
        elif action == "insert":
            frame[at:at] = data.draw(st.binary(min_size=1, max_size=8))
        else:
            frame[at:at] = b"\xdb\xff\xff\xff\xff"  # a str32 head declaring ~4 GB
    for _header, decode in _decoders():
        with contextlib.suppress(ProtocolError):
            decode(bytes(frame))


@given(st.binary(max_size=400))
def test_garbage_service_frames_and_spool_records_raise_only_protocol_error(
        frame: bytes) -> None:
    """The service decoder and the spool record decoder are as total as the others."""
    for candidate in (frame, wire.SERVICE_HEADER + frame):
        with contextlib.suppress(ProtocolError):
            wire.decode_service(candidate, 10**6)
        with contextlib.suppress(ProtocolError):
            wire.decode_spooled(candidate)


def test_service_size_limit_is_checked_before_decoding() -> None:
    """An oversized service frame is refused by its length, whatever it holds."""
    with pytest.raises(ProtocolError, match="exceeds"):
        wire.decode_service(wire.SERVICE_HEADER + b"\xc1" * 200, 100)


class _ItemBeforeExpiry(msgspec.Struct, array_like=True, gc=False):
    """`wire.Item` as peers (and spools) before ``expires`` know it."""

    seq: int
    ts: float
    headers: dict[str, str] | None
    payload: bytes
    reliable: bool = False
    topic: str = ""


def test_expires_is_appended_so_older_and_newer_items_read_each_other() -> None:
    """Evolution: an older peer ignores ``expires``; an older item or spool record reads as
    one without expiry."""
    new = wire.Item(5, 1.5, {"k": "v"}, b"p", True, "t", 99.5)
    old = msgspec.msgpack.decode(msgspec.msgpack.encode(new), type=_ItemBeforeExpiry)
    assert (old.seq, old.payload, old.reliable, old.topic) == (5, b"p", True, "t")
    back = msgspec.msgpack.decode(msgspec.msgpack.encode(old), type=wire.Item)
    assert back.expires is None
    record = msgspec.msgpack.encode(["q", "jobs", old, [], 0, ""])
    assert wire.decode_spooled(record).item.expires is None
    assert wire.decode_spooled(wire.encode_spooled(wire.Spooled("q", "jobs", new))).item == new


def test_an_older_peer_reads_a_hello_with_ended_durables() -> None:
    """Evolution: ``ended`` is a trailing field, which an older peer's hello ignores."""
    fields = [(f.name, f.type) if f.required else (f.name, f.type, _default_of(f))
              for f in msgspec.structs.fields(wire.Hello) if f.name != "ended"]
    older = msgspec.defstruct("Hello", fields, frozen=True, array_like=True, tag=1)
    new = wire.Hello("n", "name", "mesh", 1, ["tcp://127.0.0.1:1"], [], ["a.>"], 3,
                     durables={"_durable.n.x": "a.>"}, ended=["_durable.n.y"])
    old = msgspec.msgpack.decode(wire.ENCODER.encode(new), type=older)
    seen = msgspec.structs.asdict(old)
    assert (seen["id"], seen["subs"], seen["durables"]) == ("n", ["a.>"], {"_durable.n.x": "a.>"})
    back = msgspec.msgpack.decode(msgspec.msgpack.encode(old), type=wire.Hello)
    assert back.ended == []


def _default_of(field: msgspec.structs.FieldInfo) -> Any:
    if field.default_factory is not msgspec.NODEFAULT:
        return msgspec.field(default_factory=field.default_factory)
    return field.default
