"""SpoolStore: a crash-safe, group-committed, quota-bounded log of pending messages.

One writer thread owns the files. Appends from the event loop are queued to
it; it writes everything queued as one synchronous `write` (policy ``batch``,
the default: group commit with no fixed delay, so a lone message waits one
disk flush and a burst shares it), one synchronous `write` per record
(``always``) or leaves flushing to the OS (``off``). Synchronous means the
file is opened ``O_DSYNC``: each write returns once its data (and the file
size) are on stable storage, as a write followed by ``fdatasync`` would,
but in one system call, so the writer thread gives up and retakes the GIL
once per commit instead of three times; each retake can wait for the busy
event loop thread to yield it, and that wait was most of a commit's latency.
A new segment file is made durable by syncing its directory. An append's future resolves only after
its bytes are written (and synced, per policy): a reliable send that returns
is on disk.

Pending (unacknowledged) messages are also kept in memory, bounded by the
quota, so delivery never reads the disk; the files are for surviving
crashes. Acknowledgements are records too, written lazily with the next
append's commit or within 50 ms (losing one to a crash only means a
redelivery, which receivers deduplicate).

An `append_many` of several messages is one RUN record (policies ``batch``
and ``off``): one header and one CRC for the group instead of one per message.

The quota counts what the spool must keep: the pending messages (each as one
record's bytes) and those on their way to disk, not acknowledged data, so a
small quota does not fill up with messages long delivered. The files are kept
near the quota by reclaiming instead:
- segments roll at `segment_bytes`, at most a fraction of the quota, so the
  settled ones can go while the spool is in use;
- a segment goes once every message in it is acknowledged and no earlier
  segment still holds an acknowledged message (an ack lives in the same or a
  later segment than the message it settles, and must outlive its record);
- when the files outgrow the quota by more than a segment (a message long
  pending pins the settled ones around it), closed segments are rewritten,
  oldest first, with only their pending messages and live META records, until
  they fit: into a new file, synced, renamed over the old, so a crash leaves
  one or the other whole. Oldest first makes dropping their acks safe: no
  earlier segment holds a settled message by then.
The files thus hold about the quota plus two segments at most. `reclaim` lets
the segment being written go as well when nothing in it is pending. Ids are
never reused, even once every segment that held them is gone (recovery starts
above every id a file names), since a surviving ack would settle a new message
of the same id. META records (the inbox's dedup marks) also keep their
segment, until the owner writes its state again, compacted, with
`rewrite_meta` (into a new segment, synced before the older ones go).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import queue
import threading
from bisect import bisect_left, bisect_right
from collections.abc import Iterable
from itertools import islice
from pathlib import Path
from typing import Final

from ..errors import ClosedError, SpoolFullError
from ._files import FsyncPolicy, Segment, Write, sync_dir, write_all, write_error, write_file
from ._segment import (
    HEADER_SIZE,
    Record,
    RecordKind,
    RecoveryReport,
    acked_ids,
    charge,
    encode,
    encode_acks,
    encode_data,
    encode_runs,
    messages,
    scan,
    survivors,
)

_log = logging.getLogger("mesh.spool")
_SUFFIX: Final[str] = ".seg"
DEFAULT_QUOTA: Final[int] = 256 * 1024 * 1024
DEFAULT_SEGMENT: Final[int] = 16 * 1024 * 1024
_SEGMENTS_PER_QUOTA: Final[int] = 8
"""A segment holds at most the quota over this, so settled ones go long before it fills."""
_MIN_SEGMENT: Final[int] = 4096
_TMP: Final[str] = ".tmp"
"""Suffix of a segment's rewrite until it is renamed over the segment."""
_LAZY_ACKS: Final[float] = 0.05
"""Longest an ack record waits for an append to share its commit."""


_STOP: Final = object()
"""Queued after the last write: the writer finishes what is queued, then ends."""


class SpoolStore:
    """The pending messages of one spool directory."""

    def __init__(self, path: str | os.PathLike[str], *,
                 fsync: FsyncPolicy = FsyncPolicy.BATCH, quota_bytes: int = DEFAULT_QUOTA,
                 segment_bytes: int = DEFAULT_SEGMENT) -> None:
        self.path = Path(path)
        self.fsync = fsync
        self.quota_bytes = quota_bytes
        self.segment_bytes = min(segment_bytes,
                                 max(_MIN_SEGMENT, quota_bytes // _SEGMENTS_PER_QUOTA))
        self._segments: list[Segment] = []
        self._pending: dict[int, bytes] = {}
        self._next_id = 1
        self._charged = 0
        """What the quota counts: `charge` of the pending messages and of those queued."""
        self._resolved = 0
        """Highest id whose write the loop has seen finish, set after `_pending` has it:
        a rewrite keeps every id above it, whether `_pending` has it yet or not."""
        self._queued_bytes = 0
        self._lazy: list[bytes] = []
        """Ack (and lazy META) records not yet handed to the writer: they ride along with
        the next commit."""
        self._lazy_meta = 0
        """META records among `_lazy`."""
        self._lazy_timer: asyncio.TimerHandle | None = None
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()
        self._closed = False
        self.report = RecoveryReport()
        self._meta: list[bytes] = []
        self._failed_writes = 0
        """Writes failed since the last that worked (the writer logs the first only)."""
        self._refused = 0
        """Messages those failed writes refused."""

    # -- opening -----------------------------------------------------------------

    @staticmethod
    def peek(path: str | os.PathLike[str]) -> tuple[list[tuple[int, bytes]], int]:
        """Pending records and bytes on disk, read-only (safe while a node runs)."""
        pending: dict[int, bytes] = {}
        acked: set[int] = set()
        size = 0
        report = RecoveryReport()
        for file in sorted(Path(path).glob(f"*{_SUFFIX}")):
            try:
                data = file.read_bytes()
            except OSError:
                continue
            size += len(data)
            for rec in scan(data, report, file.name):
                if rec.kind is RecordKind.ACK:
                    acked.update(acked_ids(rec))
                elif rec.kind is not RecordKind.META:
                    pending.update(_messages(rec, report, file.name))
        return sorted((i, p) for i, p in pending.items() if i not in acked), size

    def open(self) -> RecoveryReport:
        """Recover from the files (blocking: call it off the loop). Never raises on damage."""
        self.path.mkdir(parents=True, exist_ok=True)
        for tmp in self.path.glob(f"*{_SUFFIX}{_TMP}"):
            tmp.unlink()  # a rewrite cut short: the segment it would replace is intact
        report = self.report = RecoveryReport()
        acked: set[int] = set()
        files = sorted(self.path.glob(f"*{_SUFFIX}"))
        for index, file in enumerate(files):
            try:
                first = int(file.stem)
            except ValueError:
                report.problems.append(f"{file.name}: not a segment name, ignored")
                continue
            data = file.read_bytes()
            seg = Segment(file, first, len(data))
            # Ids are never given out twice, not even those of deleted segments: an ack
            # outlives its message's segment, and would settle a new message of its id.
            self._next_id = max(self._next_id, first)
            good_end = 0
            for rec in scan(data, report, file.name):
                good_end = rec.offset + HEADER_SIZE + len(rec.payload)
                self._next_id = max(self._next_id, rec.id + 1)
                if rec.kind is RecordKind.ACK:
                    seg.acks += 1
                    settles = acked_ids(rec)
                    acked.update(settles)
                    if settles:
                        self._next_id = max(self._next_id, settles[-1] + 1)
                elif rec.kind is RecordKind.META:
                    self._meta.append(rec.payload)
                    seg.meta += 1
                else:
                    found = _messages(rec, report, file.name)
                    self._pending.update(found)
                    if found:
                        seg.add_ids(found[0][0], found[-1][0])
                        self._next_id = max(self._next_id, found[-1][0] + 1)
            if good_end < len(data) and index == len(files) - 1 and report.torn_bytes:
                with open(file, "r+b") as fh:  # cut the torn tail so appends continue cleanly
                    fh.truncate(good_end)
                    fh.flush()
                    os.fsync(fh.fileno())
                seg.size = good_end
            self._segments.append(seg)
        self._settle_many(acked)
        self._charged = charge(self._pending.values())
        self._resolved = self._next_id - 1
        self._drop_settled()
        if not report.clean:
            _log.warning("spool %s recovered with damage: %s", self.path,
                         "; ".join(report.problems[:5]))
        return report

    async def start(self) -> RecoveryReport:
        """Recover, then start the writer thread."""
        report = await asyncio.to_thread(self.open)
        self._loop = asyncio.get_running_loop()
        if not self._segments:
            self._segments.append(Segment(self.path / f"{self._next_id:020d}{_SUFFIX}",
                                           self._next_id))
        self._thread = threading.Thread(target=self._write_forever, name="zeromesh-spool",
                                        daemon=True)
        self._thread.start()
        return report

    # -- the API the loop uses -----------------------------------------------------

    @property
    def used_bytes(self) -> int:
        """Bytes counted against the quota: the messages still to deliver (and those
        being written), not the settled data the files may still hold."""
        return self._charged

    @property
    def disk_bytes(self) -> int:
        """Bytes in the files, and queued for them: kept near the quota by reclaiming."""
        with self._lock:
            return sum(s.size for s in self._segments) + self._queued_bytes

    def __len__(self) -> int:
        return len(self._pending)

    def pending(self) -> list[tuple[int, bytes]]:
        """Unacknowledged messages, oldest first."""
        return sorted(self._pending.items())

    def get(self, record_id: int) -> bytes | None:
        return self._pending.get(record_id)

    def first(self) -> bytes | None:
        """The oldest unacknowledged message still kept (in the order they were stored)."""
        return next(iter(self._pending.values()), None)

    async def append(self, payload: bytes) -> int:
        """Store one message; returns its id once it is on disk (per the fsync policy).

        Raises:
            SpoolFullError: the quota (or the disk) is full; nothing is stored.
            MeshError: the spool cannot be written (its directory was removed, an I/O
                error); nothing is stored, and later appends try again.
            ClosedError: the store is closed.
        """
        return (await self.append_many((payload,)))[0]

    async def append_many(self, payloads: Iterable[bytes]) -> list[int]:
        """Store several messages with one wait (one group commit)."""
        ids, fut = self.submit(payloads)
        await fut
        return ids

    def submit(self, payloads: Iterable[bytes]) -> tuple[list[int], asyncio.Future[None]]:
        """`append_many` without the wait: their ids, and a future that resolves once
        they are on disk (per the fsync policy). Handed to the writer at once.

        Raises:
            SpoolFullError: the quota is full; nothing is stored.
            MessageTooLarge: one is larger than a record may be (64 MiB); nothing is stored.
            ClosedError: the store is closed.
        """
        if self._closed or self._loop is None:
            raise ClosedError("spool is closed")
        payload_list = list(payloads)
        first = self._next_id
        if len(payload_list) > 1 and self.fsync is not FsyncPolicy.ALWAYS:
            records = encode_runs(first, payload_list)  # one header, one CRC (per 64 MiB)
        else:
            records = encode_data(first, payload_list)
        ids = list(range(first, first + len(payload_list)))
        size = sum(map(len, records))
        cost = charge(payload_list)
        if self._charged + cost > self.quota_bytes:
            raise SpoolFullError(self.quota_bytes, self._charged)
        self._next_id += len(ids)
        self._charged += cost
        self._queued_bytes += size
        fut: asyncio.Future[None] = self._loop.create_future()
        self._hand_over_lazy()  # same group commit, no write of its own
        self._queue.put(Write(records, ids, payload_list, fut, size))
        return ids, fut

    def meta(self) -> list[bytes]:
        """META records found at recovery, oldest first (handed over once)."""
        meta, self._meta = self._meta, []
        return meta

    def note(self, kind: RecordKind, payload: bytes, *, lazy: bool = False) -> None:
        """Queue a record without waiting for it (written with the next commit).

        `lazy`: like an ack, it waits up to `_LAZY_ACKS` for a commit to ride
        along with instead of waking the writer thread for itself (each wake-up
        costs the event loop a GIL hand-off).
        """
        if self._closed:
            return
        record = encode(kind, 0, payload)
        self._queued_bytes += len(record)
        meta = int(kind is RecordKind.META)
        if lazy:
            self._lazy.append(record)
            self._lazy_meta += meta
            self._start_lazy_timer()
            return
        self._queue.put(Write([record], [], [], None, len(record), meta=meta))

    def rewrite_meta(self, payloads: list[bytes]) -> None:
        """Replace every META record so far by these (the owner's state, compacted).

        They go to a new segment, synced before the older META records are
        released, so a crash at any point leaves either set complete; segments
        left with nothing pending are then deleted. Call it before noting
        anything new (what is queued earlier is released with the old).
        """
        if self._closed:
            return
        records = [encode(RecordKind.META, 0, payload) for payload in payloads]
        size = sum(map(len, records))
        self._queued_bytes += size
        self._queue.put(Write(records, [], [], None, size, meta=len(records), compact=True))

    def ack(self, record_ids: Iterable[int]) -> None:
        """Mark messages done; space is reclaimed by segment.

        The ack records (one per run of consecutive ids) are written with the
        next append's commit, or after `_LAZY_ACKS` when none comes: an ack
        never costs a disk flush of its own. Losing them to a crash means only
        a redelivery, which receivers deduplicate.
        """
        records = encode_acks(self._settle_many(record_ids))
        if records and not self._closed:
            self._queued_bytes += sum(map(len, records))
            self._lazy += records
            self._start_lazy_timer()
            self._drop_settled()

    def reclaim(self) -> None:
        """Let the segment being written go too, if it holds nothing pending.

        The writer starts a new segment if the current one has no pending
        message (and no META record), so the settled one is deleted at once
        instead of when it fills up: after a mass settle (a purge, a forgotten
        durable's backlog) the disk space comes back now. Ack records not yet
        written go first. Without effect while anything in it is pending.
        """
        if self._closed or self._thread is None:
            return
        self._hand_over_lazy()
        self._queue.put(Write([], [], [], None, 0, roll=True))

    def _start_lazy_timer(self) -> None:
        if self._lazy_timer is None and self._loop is not None:
            self._lazy_timer = self._loop.call_later(_LAZY_ACKS, self._hand_over_lazy)

    def _hand_over_lazy(self) -> None:
        if self._lazy_timer is not None:
            self._lazy_timer.cancel()
            self._lazy_timer = None
        if self._lazy:
            records, self._lazy = self._lazy, []
            meta, self._lazy_meta = self._lazy_meta, 0
            self._queue.put(Write(records, [], [], None, sum(map(len, records)), meta=meta))

    async def aclose(self) -> None:
        """Finish queued writes and stop the writer."""
        if self._closed:
            return
        self._closed = True
        self._hand_over_lazy()
        if self._thread is not None:
            self._queue.put(_STOP)
            await asyncio.to_thread(self._thread.join, 10)

    # -- bookkeeping ---------------------------------------------------------------

    def _settle_many(self, record_ids: Iterable[int]) -> list[int]:
        """Forget those of these ids that are pending; count them off their segments (one
        lock for all). Returns them, sorted."""
        settled = sorted(self._pending.keys() & set(record_ids))  # (loops in C)
        if not settled:
            return settled
        self._charged -= charge(list(map(self._pending.pop, settled)))
        first, last = settled[0], settled[-1]
        with self._lock:
            for seg in self._segments:
                if seg.hi < first or seg.hi < seg.lo:
                    continue
                if seg.lo > last:
                    break
                seg.live -= bisect_right(settled, seg.hi) - bisect_left(settled, seg.lo)
        return settled

    def _drop_settled(self) -> None:
        """Delete the segments nothing needs any more (never the one being written).

        One with nothing pending and no META record goes unless an earlier one still
        holds a settled message: its acks may be what keeps that message settled
        across a restart.
        """
        with self._lock:
            doomed: list[Segment] = []
            for seg in islice(self._segments, max(0, len(self._segments) - 1)):  # (no copy)
                if seg.live <= 0 and not seg.meta:
                    doomed.append(seg)
                elif seg.count > seg.live:
                    break  # (it holds a settled message: no later one may go)
            if not doomed:
                return  # (the usual case, found at the first segment)
            gone = set(doomed)
            self._segments[:] = [seg for seg in self._segments if seg not in gone]
            for seg in doomed:
                try:
                    seg.path.unlink(missing_ok=True)
                except OSError as exc:
                    _log.warning("cannot delete spool segment %s: %s", seg.path, exc)

    # -- the writer thread -----------------------------------------------------------

    def _open_segment(self, seg: Segment) -> int:
        """The segment's file for appending (synchronous writes unless the policy is off)."""
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC
        if self.fsync is not FsyncPolicy.OFF:
            flags |= os.O_DSYNC
        fd = os.open(seg.path, flags, 0o600)
        if seg.size == 0:
            sync_dir(self.path, self.fsync)  # the new file's name survives a power cut too
        return fd

    def _write_forever(self) -> None:
        seg = self._segments[-1]
        fd: int | None = None
        """Owned by this thread until it ends; opened by the first write, and again by
        the write after one that found its file gone (`_write_batch`)."""
        try:
            while True:
                batch = [self._queue.get()]
                while True:  # group commit: take everything queued meanwhile
                    try:
                        batch.append(self._queue.get_nowait())
                    except queue.Empty:
                        break
                writes = [b for b in batch if isinstance(b, Write)]
                if writes:
                    fd, seg = self._write_batch(writes, fd, seg)
                if any(b is _STOP for b in batch):
                    return
        finally:
            if fd is not None:
                os.close(fd)

    def _write_batch(self, writes: list[Write], fd: int | None,
                     seg: Segment) -> tuple[int | None, Segment]:
        """Write a batch and resolve its futures; a failure fails all of them, and a file
        found gone (its directory removed) is let go: the next batch opens a new one."""
        placed: list[tuple[Write, Segment]] = []
        error: BaseException | None = None
        start_size = seg.size
        chunks: list[bytes] = []
        try:
            if fd is None:
                fd, seg = self._reopen(seg, writes)
                start_size = seg.size
            for write in writes:
                if seg.size > 0 and (write.compact
                                     or seg.size + write.size > self.segment_bytes
                                     or (write.roll and seg.live <= 0 and not seg.meta)):
                    self._flush(fd, chunks)
                    fd, seg = self._roll(write.ids[0] if write.ids else self._next_id, fd)
                    chunks, start_size = [], 0
                chunks.extend(write.records)
                with self._lock:
                    seg.size += write.size
                    seg.meta += write.meta
                    if write.ids:
                        seg.add_ids(write.ids[0], write.ids[-1])
                    else:  # (acks and META records: see `_hand_over_lazy`)
                        seg.acks += len(write.records) - write.meta
                placed.append((write, seg))
                if write.compact:
                    self._flush(fd, chunks)
                    chunks = []
                    os.fsync(fd)  # the new state is durable before the old is released
                    self._release_meta(seg)
            self._flush(fd, chunks)
            if os.fstat(fd).st_nlink == 0:  # (written, but to a file no name leads to)
                raise FileNotFoundError(errno.ENOENT, "the spool's file or directory was "
                                        "removed", str(seg.path))
        except OSError as exc:
            error = write_error(exc, self.path, self.quota_bytes, self.used_bytes)
            self._note_failure(exc, writes)
            if fd is not None:
                self._undo(fd, seg, start_size, placed)
                if _gone(fd):
                    os.close(fd)
                    fd = None
        else:
            self._note_success()
        loop = self._loop
        assert loop is not None
        loop.call_soon_threadsafe(self._resolve, writes, error)  # (all fail with one)
        self._tidy()
        return fd, seg

    def _note_failure(self, exc: OSError, writes: list[Write]) -> None:
        """Log the first failed write of an episode (a full disk fails every write until
        it has room again: one line, not one per send); count the rest."""
        self._failed_writes += 1
        self._refused += sum(len(write.ids) for write in writes)
        if self._failed_writes == 1:
            _log.error("spool %s: write failed: %s (logged once until writes work again)",
                       self.path, exc)

    def _note_success(self) -> None:
        if self._failed_writes:
            _log.warning("spool %s: writes work again, after %d failed (%d message(s) "
                         "refused)", self.path, self._failed_writes, self._refused)
            self._failed_writes = self._refused = 0

    def _tidy(self) -> None:
        """Give back the space of settled messages; past the quota by more than a
        segment, rewrite closed segments (oldest first, each only while earlier ones
        hold no settled message) until the files fit it again."""
        self._drop_settled()
        if self.disk_bytes <= self.quota_bytes + self.segment_bytes:
            return
        for seg in self._segments[:-1]:  # (a copy: an ack on the loop may drop some)
            if self.disk_bytes <= self.quota_bytes:
                break
            if (seg.count > seg.live or seg.acks) and not self._compact(seg):
                break  # a later one's acks may still be needed
        self._drop_settled()

    def _compact(self, seg: Segment) -> bool:
        """Rewrite a closed segment with its pending messages (and live META records)
        only; False if it could not be (later ones must wait, as their acks may be
        needed). Its own acks go too: no earlier segment holds what they settle."""
        tmp = seg.path.with_name(seg.path.name + _TMP)
        resolved = self._resolved
        pending = self._pending  # (a settled id is gone from it; one not yet resolved not in)
        try:
            body, kept = survivors(seg.path.read_bytes(), seg.path.name,
                                   lambda i: i in pending or i > resolved, meta=seg.meta > 0)
            write_file(tmp, body, sync=self.fsync is not FsyncPolicy.OFF)
            with self._lock:  # (an ack on the loop may have deleted it meanwhile)
                if seg not in self._segments:
                    tmp.unlink()
                    return True
                os.replace(tmp, seg.path)
                # (durable before a later segment holding the acks it dropped may go)
                sync_dir(self.path, self.fsync)
                seg.size = len(body)
                seg.count = kept
                seg.acks = 0
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            with self._lock:
                gone = seg not in self._segments
            if gone:
                return True  # deleted by an ack while it was read
            _log.warning("cannot rewrite spool segment %s: %s", seg.path, exc)
            return False
        return True

    def _undo(self, fd: int, seg: Segment, size: int,
              placed: list[tuple[Write, Segment]]) -> None:
        """A failed write stores nothing: cut the file back and forget the batch."""
        with self._lock:
            for write, where in placed:
                where.live -= len(write.ids)
                if where is seg:  # (cut off; earlier segments keep theirs, as settled)
                    where.count -= len(write.ids)
            seg.size = size
        try:
            os.ftruncate(fd, size)
        except OSError as exc:
            _log.error("cannot cut back spool segment %s: %s", seg.path, exc)

    def _resolve(self, writes: list[Write], error: BaseException | None) -> None:
        for write in writes:
            self._queued_bytes -= write.size
            if error is None and write.ids:
                self._pending.update(zip(write.ids, write.payloads, strict=True))
            elif write.ids:
                self._charged -= charge(write.payloads)
            if write.ids:
                self._resolved = max(self._resolved, write.ids[-1])
            fut = write.future
            if fut is not None and not fut.done():
                if error is None:
                    fut.set_result(None)
                else:
                    fut.set_exception(error)

    def _flush(self, fd: int, chunks: list[bytes]) -> None:
        if not chunks:
            return
        if self.fsync is FsyncPolicy.ALWAYS:
            for chunk in chunks:
                write_all(fd, chunk)
            return
        write_all(fd, b"".join(chunks))

    def _release_meta(self, keep: Segment) -> None:
        """META records before `keep` are superseded: their segments may go."""
        with self._lock:
            for seg in self._segments:
                if seg is keep:
                    break
                seg.meta = 0
        self._drop_settled()

    def _reopen(self, seg: Segment, writes: list[Write]) -> tuple[int, Segment]:
        """A file to write `writes` to when none is open: `seg`'s if it is still empty,
        else a new segment's (`seg`'s file was found gone; what it holds is cut back to
        what its name had, so appending to a new file of that name would misplace it).
        The spool's directory is not made again: removed, it may be a volume not
        mounted, and the files would go to the disk beneath."""
        if seg.size == 0:
            return self._open_segment(seg), seg
        first = next((write.ids[0] for write in writes if write.ids), self._next_id)
        return self._roll(first, None)

    def _roll(self, first_id: int, fd: int | None) -> tuple[int, Segment]:
        """The new segment being written, and its fd; `fd` (the old one's) is closed once
        the new one is open: a file that cannot be made (a full disk) changes nothing."""
        # Named after its first message; a segment that starts with other records
        # (META) still needs a name of its own that sorts after the last one.
        first_id = max(first_id, self._segments[-1].first_id + 1)
        seg = Segment(self.path / f"{first_id:020d}{_SUFFIX}", first_id)
        new_fd = self._open_segment(seg)
        with self._lock:
            self._segments.append(seg)
        if fd is not None:
            os.close(fd)
        return new_fd, seg


def _gone(fd: int) -> bool:
    """Whether `fd`'s file has no name left (removed, or its directory was)."""
    try:
        return os.fstat(fd).st_nlink == 0
    except OSError:
        return True


def _messages(record: Record, report: RecoveryReport, name: str) -> list[tuple[int, bytes]]:
    try:
        return messages(record)
    except ValueError as exc:
        report.corrupt_records += 1
        report.problems.append(f"{name}: {exc}")
        return []
