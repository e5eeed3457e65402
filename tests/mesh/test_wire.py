"""The wire codec: round trips, header checks, and garbage that must only ever raise ProtocolError."""

from __future__ import annotations

import contextlib

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mesh import ProtocolError
from mesh import _wire as wire

ids = st.text(alphabet="0123456789abcdef", min_size=32, max_size=32)
texts = st.text(max_size=40)
headers = st.none() | st.dictionaries(texts, texts, max_size=4)
items = st.builds(wire.Item, st.integers(0, 2**63 - 1),
                  st.floats(allow_nan=False, allow_infinity=False), headers, st.binary(max_size=300))
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
    frames = [b"t\x00", wire.DATA_HEADER, wire.encode_batch(batch)]
    decoded = wire.decode_batch(frames, max_size=10**7)
    assert decoded == batch
    assert [i.payload for i in decoded.items] == [i.payload for i in batch.items]


@given(controls)
def test_control_messages_round_trip(msg: wire.Control) -> None:
    """Every control message kind survives encode/decode."""
    assert wire.decode_control(wire.encode_control(msg)) == msg


@given(st.lists(st.binary(max_size=200), min_size=0, max_size=4))
def test_garbage_frames_raise_only_protocol_error(frames: list[bytes]) -> None:
    """Random frames never raise anything but ProtocolError (never crash a reader)."""
    for decode in (lambda f: wire.decode_batch(f, max_size=10**6), wire.decode_control):
        with contextlib.suppress(ProtocolError):
            decode(frames)


@given(st.binary(max_size=300))
def test_garbage_body_with_valid_header_raises_protocol_error(body: bytes) -> None:
    """A correct header does not make an undecodable body acceptable."""
    with pytest.raises(ProtocolError):
        wire.decode_control([wire.CONTROL_HEADER, body + b"\xc1"])  # 0xc1 is never valid msgpack


def test_unknown_protocol_version_is_rejected_before_decoding() -> None:
    """A future version is refused by its header, whatever the body."""
    future = wire.MAGIC + bytes([wire.PROTOCOL_VERSION + 1]) + wire.KIND_CONTROL
    body = wire.encode_control(wire.Bye("ab" * 16))[1]
    with pytest.raises(ProtocolError, match="unsupported protocol version"):
        wire.decode_control([future, body])


def test_bad_magic_is_rejected() -> None:
    """Frames from something that is not zeromesh are refused by magic."""
    with pytest.raises(ProtocolError, match="bad magic"):
        wire.decode_batch([b"t\x00", b"XX\x01D", b""], max_size=100)


def test_oversized_data_is_rejected_before_decoding() -> None:
    """The size limit is checked before msgspec sees the bytes."""
    body = wire.encode_batch(wire.Batch("ab" * 16, "n", 0, [wire.Item(0, 0.0, None, b"x" * 500)]))
    with pytest.raises(ProtocolError, match="exceeds"):
        wire.decode_batch([b"t\x00", wire.DATA_HEADER, body], max_size=100)


def test_unknown_control_tag_is_a_protocol_error() -> None:
    """A newer peer's new message kind is dropped by older peers, not crashed on."""
    body = msgspec.msgpack.encode([99, "x"])
    with pytest.raises(ProtocolError):
        wire.decode_control([wire.CONTROL_HEADER, body])
