"""What the spool store's files hold and how they are written: segments, writes, fsync.

`SpoolStore` (`_store`) owns the policy and the bookkeeping; these are the
pieces its writer thread handles — a segment file and the range of ids in it,
one queued write, writing every byte, and what a failed write means to the
sender.
"""

from __future__ import annotations

import asyncio
import enum
import errno
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError, MeshError, SpoolFullError


class FsyncPolicy(enum.Enum):
    """When appended bytes are forced to disk."""

    ALWAYS = "always"
    """fsync after every record: slowest, each send pays a full fsync."""
    BATCH = "batch"
    """group commit: one fsync covers everything queued meanwhile (default)."""
    OFF = "off"
    """no fsync: survives a process crash, not a power cut."""


@dataclass(slots=True, eq=False)  # identity: a segment is a file, and a dict key
class Segment:
    path: Path
    first_id: int
    size: int = 0
    live: int = 0
    """Messages in it not yet acknowledged."""
    count: int = 0
    """Messages its file holds, settled or not: past `live`, settled ones that a
    rewrite (`SpoolStore._compact`) can drop."""
    lo: int = 0
    hi: int = -1
    """Ids of its first and last message (none while ``hi < lo``). Ids are given out
    in the order writes are queued, and the writer places them in that order, so
    each segment holds one range of ids and later segments higher ones: settling
    counts ids per segment by bisection, with no map from each id to its segment."""
    meta: int = 0
    """META records in it: they keep it until the owner rewrote its state (`rewrite_meta`)."""
    acks: int = 0
    """ACK records in it: dead weight once what they settle is gone, which a rewrite
    drops (a slow consumer's acks, one record each, can outweigh its pending messages)."""


    def add_ids(self, lo: int, hi: int) -> None:
        """Messages `lo` .. `hi` (consecutive, above any before) are now in it."""
        if self.hi < self.lo:
            self.lo = lo
        self.hi = hi
        self.live += hi - lo + 1
        self.count += hi - lo + 1


@dataclass(slots=True)
class Write:
    records: list[bytes]
    ids: list[int]
    payloads: list[bytes]
    future: asyncio.Future[None] | None
    size: int
    meta: int = 0
    """META records among `records`."""
    compact: bool = False
    """`rewrite_meta`: starts a new segment and releases the META records before it."""
    roll: bool = False
    """`reclaim`: starts a new segment if the current one holds nothing pending."""


def write_all(fd: int, data: bytes) -> None:
    """`os.write` until every byte is written (a short write is legal, if rare)."""
    done = os.write(fd, data)
    if done < len(data):
        view = memoryview(data)
        while done < len(data):
            done += os.write(fd, view[done:])


def write_file(path: Path, body: bytes, *, sync: bool) -> None:
    """Create (or empty) the file at `path` with `body`, on stable storage if `sync`."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        write_all(fd, body)
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)


def sync_dir(path: Path, policy: FsyncPolicy) -> None:
    """Make a new or renamed file's name in `path` durable (unless the policy is off)."""
    if policy is FsyncPolicy.OFF:
        return
    dir_fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_error(exc: OSError, path: Path, quota: int, used: int) -> MeshError:
    """What a sender whose message could not be written is told: a full disk is a full
    spool; anything else (its directory removed, an I/O error) names the spool."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return SpoolFullError(quota, used)
    return MeshError(f"spool write failed: {path}: {exc.strerror or exc}")


def unusable(exc: OSError) -> ConfigError:
    """What a spool that cannot be opened is (its recovery failed): a setting to fix,
    naming the file when there is one."""
    where = f"{exc.filename}: " if exc.filename else ""
    return ConfigError("data_dir", f"spool unusable: {where}{exc.strerror or exc}")
