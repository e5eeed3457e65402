"""The spool's on-disk record format: self-delimiting, checksummed, resynchronisable.

Why an append-only segmented log (and not SQLite or LMDB): every reliable send
is one sequential append, which group commit turns into one write and one
fsync for everything that arrived meanwhile (benchmarks/README.md has the
figures); reclaiming acknowledged data is
deleting whole files; and recovery is a linear scan that can step over damage.
SQLite in WAL mode pays a B-tree update and index per message, and LMDB's
copy-on-write pages fsync more than the data written.

Record layout (little endian)::

    magic  'ZS'      2 bytes   lets a reader find the next record after damage
    length           u32       bytes of payload
    crc              u32       CRC-32 of kind, id, length and payload
    kind             u8        RecordKind
    id               u64       record id (a message's spool id, or the id an ack refers to)
    payload          length bytes

A RUN record holds the messages ``id .. id + n - 1`` of one append (a group
commit's worth), its payload a msgpack array of their payloads: one header and
one CRC for the lot instead of one per message, which was most of the
spool's cost per message on the event loop. A torn or damaged RUN loses its
whole append; that is no loss, since no part of it was reported stored.

An ACK record settles `id` alone (empty payload) or, with a u64 `count` as
payload, the run ``id .. id + count - 1``: a group of acknowledgements costs
one record, not one per message. (A reader that knew only single acks would
settle just the first of a run and deliver the rest again: duplicates, which
receivers drop, never a loss.)

A record is intact only if its magic, length and CRC agree. A scan that meets
a bad record looks for the next magic whose record checks out, so one flipped
byte costs one record, never the rest of the file; bytes that end before a
whole record (a torn tail from a crash mid-write) are reported and cut off.
"""

from __future__ import annotations

import enum
import struct
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Final

import msgspec

from ..errors import MessageTooLarge

MAGIC: Final[bytes] = b"ZS"
_HEAD: Final = struct.Struct("<2sIIBQ")
HEADER_SIZE: Final[int] = _HEAD.size
_CRC_PART: Final = struct.Struct("<BQI")
MAX_RECORD: Final[int] = 64 * 1024 * 1024


class RecordKind(enum.IntEnum):
    """What a record means."""

    DATA = 1
    """A message to deliver; payload is the encoded message."""
    ACK = 2
    """Record `id` is done (delivered, or moved to the dead-letter spool)."""
    META = 3
    """Small state the spool's owner keeps with the data (payload is its own)."""
    RUN = 4
    """Messages `id`, `id` + 1... in one record; payload is a msgpack array of theirs."""


_COUNT: Final = struct.Struct("<Q")


def encode(kind: RecordKind, record_id: int, payload: bytes) -> bytes:
    crc = zlib.crc32(payload, zlib.crc32(_CRC_PART.pack(kind, record_id, len(payload))))
    return _HEAD.pack(MAGIC, len(payload), crc, kind, record_id) + payload


def encode_data(first_id: int, payloads: list[bytes]) -> list[bytes]:
    """DATA records for `payloads`, numbered from `first_id` (`encode`, without a call
    per record: this is the reliable send's hot path).

    Raises:
        MessageTooLarge: a payload is larger than a record may be (`MAX_RECORD`).
    """
    pack_head, pack_crc, crc32 = _HEAD.pack, _CRC_PART.pack, zlib.crc32
    kind = int(RecordKind.DATA)
    out = []
    record_id = first_id
    for payload in payloads:
        size = len(payload)
        if size > MAX_RECORD:  # (a scan would take it for damage: lost at recovery)
            raise MessageTooLarge(size, MAX_RECORD)
        crc = crc32(payload, crc32(pack_crc(kind, record_id, size)))
        out.append(pack_head(MAGIC, size, crc, kind, record_id) + payload)
        record_id += 1
    return out


_encode_list: Final = msgspec.msgpack.Encoder().encode
_decode_list: Final = msgspec.msgpack.Decoder(list[bytes]).decode


def encode_run(first_id: int, payloads: list[bytes]) -> bytes:
    """One RUN record for `payloads`, numbered from `first_id`."""
    return encode(RecordKind.RUN, first_id, _encode_list(payloads))


_RUN_ITEM: Final[int] = 5
"""What a RUN record's msgpack array adds to each payload, at most (a bin 32 header)."""
_RUN_HEAD: Final[int] = 5
"""What the array itself adds, at most (an array 32 header)."""


def encode_runs(first_id: int, payloads: list[bytes]) -> list[bytes]:
    """`payloads` numbered from `first_id` in as few records as fit `MAX_RECORD`: one
    RUN record (a DATA record for a lone payload) unless they are larger than that
    together. A record past it would be written, and taken for damage at recovery:
    every message in it lost.

    Raises:
        MessageTooLarge: a payload alone is larger than a record may be.
    """
    if len(payloads) == 1:
        return encode_data(first_id, payloads)
    sizes = list(map(len, payloads))
    if sum(sizes) + _RUN_ITEM * len(sizes) + _RUN_HEAD <= MAX_RECORD:  # (the usual case)
        return [encode_run(first_id, payloads)]
    out: list[bytes] = []
    start, used = 0, _RUN_HEAD
    for index, size in enumerate(sizes):
        if index > start and used + size + _RUN_ITEM > MAX_RECORD:
            out += encode_runs(first_id + start, payloads[start:index])
            start, used = index, _RUN_HEAD
        used += size + _RUN_ITEM
    return out + encode_runs(first_id + start, payloads[start:])


def messages(record: Record) -> list[tuple[int, bytes]]:
    """(id, payload) of each message in a DATA or RUN record.

    Raises:
        ValueError: a RUN record whose payload is not an array of payloads
            (its checksum held, so it was written that way: a bug, not damage).
    """
    if record.kind is RecordKind.DATA:
        return [(record.id, record.payload)]
    try:
        payloads = _decode_list(record.payload)
    except msgspec.DecodeError as exc:
        raise ValueError(f"unreadable run record {record.id}: {exc}") from None
    return list(zip(range(record.id, record.id + len(payloads)), payloads, strict=True))


def charge(payloads: Iterable[bytes]) -> int:
    """What messages count against a spool's quota: each as one DATA record (a RUN of
    them takes less on disk)."""
    sizes = list(map(len, payloads))
    return sum(sizes) + HEADER_SIZE * len(sizes)


def survivors(data: bytes, name: str, keep: Callable[[int], bool], *,
              meta: bool) -> tuple[bytes, int]:
    """A segment's bytes rewritten with only the messages `keep` names (one record per
    run of consecutive ids) and, with `meta`, its META records; and how many messages
    that is. Its acks go: the caller knows nothing needs them."""
    report = RecoveryReport()  # (damage was reported when the spool opened)
    out: list[bytes] = []
    kept = 0
    for rec in scan(data, report, name):
        if rec.kind is RecordKind.META:
            if meta:
                out.append(encode(RecordKind.META, rec.id, rec.payload))
            continue
        if rec.kind is RecordKind.ACK:
            continue
        try:
            found = [(i, p) for i, p in messages(rec) if keep(i)]
        except ValueError:
            continue  # (unreadable at recovery too: never pending)
        kept += len(found)
        start = 0
        for end in range(1, len(found) + 1):
            if end == len(found) or found[end][0] != found[end - 1][0] + 1:
                group = [p for _, p in found[start:end]]
                first = found[start][0]
                out += encode_data(first, group) if len(group) == 1 else [encode_run(first, group)]
                start = end
    return b"".join(out), kept


def encode_acks(ids: list[int]) -> list[bytes]:
    """ACK records for sorted `ids`: one per run of consecutive ids."""
    n = len(ids)
    if n and ids[-1] - ids[0] == n - 1:  # the usual case, one run: found without a loop
        return [encode(RecordKind.ACK, ids[0], _COUNT.pack(n) if n > 1 else b"")]
    out = []
    i = 0
    while i < n:
        first = ids[i]
        j = i + 1
        while j < n and ids[j] == first + (j - i):
            j += 1
        count = j - i
        out.append(encode(RecordKind.ACK, first, _COUNT.pack(count) if count > 1 else b""))
        i = j
    return out


def acked_ids(record: Record) -> range:
    """The ids an ACK record settles."""
    count = _COUNT.unpack(record.payload)[0] if len(record.payload) == _COUNT.size else 1
    return range(record.id, record.id + count)


@dataclass(slots=True)
class Record:
    kind: RecordKind
    id: int
    payload: bytes
    offset: int


@dataclass(slots=True)
class RecoveryReport:
    """What a scan found: how much was intact, what was damaged."""

    records: int = 0
    corrupt_records: int = 0
    """Damaged regions skipped inside files (each may hide one or more records)."""
    corrupt_bytes: int = 0
    torn_bytes: int = 0
    """Bytes cut from the end of the last segment (an interrupted write)."""
    problems: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not (self.corrupt_records or self.torn_bytes)


def _parse_at(buf: bytes | memoryview, pos: int) -> tuple[Record, int] | None:
    """The intact record starting at `pos` and the offset after it, or None."""
    if len(buf) - pos < HEADER_SIZE:
        return None
    magic, length, crc, kind, record_id = _HEAD.unpack_from(buf, pos)
    end = pos + HEADER_SIZE + length
    if magic != MAGIC or length > MAX_RECORD or end > len(buf):
        return None
    payload = bytes(buf[pos + HEADER_SIZE:end])
    if zlib.crc32(payload, zlib.crc32(_CRC_PART.pack(kind, record_id, length))) != crc:
        return None
    try:
        record_kind = RecordKind(kind)
    except ValueError:
        return None
    return Record(record_kind, record_id, payload, pos), end


def scan(buf: bytes, report: RecoveryReport, name: str) -> Iterator[Record]:
    """Yield every intact record; note damage in `report`. `report.torn_bytes` is set
    when the data ends inside a record (the caller decides whether that is a tail)."""
    pos = 0
    size = len(buf)
    while pos < size:
        parsed = _parse_at(buf, pos)
        if parsed is not None:
            record, pos = parsed
            report.records += 1
            yield record
            continue
        nxt = buf.find(MAGIC, pos + 1)
        while nxt != -1 and _parse_at(buf, nxt) is None:
            nxt = buf.find(MAGIC, nxt + 1)
        if nxt == -1:
            report.torn_bytes += size - pos
            report.problems.append(f"{name}: {size - pos} bytes at offset {pos} end "
                                   "inside a record (torn write)")
            return
        report.corrupt_records += 1
        report.corrupt_bytes += nxt - pos
        report.problems.append(f"{name}: {nxt - pos} damaged bytes at offset {pos} skipped")
        pos = nxt
