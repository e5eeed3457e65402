"""The export backlog and the import marks of one uplink, in one spool directory.

The backlog is a `SpoolStore` of its own (under ``<data_dir>/uplinks/``): an
exported message is written there before the mesh side is acknowledged and
leaves only when the hub has acknowledged it, so a hub outage, a cut link or
a SIGKILL of the agent delay it and nothing more. Its quota is separate from
the node's outbox, so a long outage cannot starve the mesh's own reliable
traffic.

The import marks are the hub keys of messages already brought into the
mesh (the most recent `MARKS`), kept as META records in the same store: a
redelivery (an ack lost with a crash or a cut) is recognised and not
published twice.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable
from pathlib import Path
from typing import Final

import msgspec

from .._spool import FsyncPolicy, RecordKind, SpoolStore, charge

MARKS: Final[int] = 100_000
"""Import keys remembered; a hub redelivers within its ack wait, long before this many."""


class Exported(msgspec.Struct, array_like=True, gc=False, frozen=True):
    """One message waiting for the hub's acknowledgement."""

    id: str
    topic: str
    data: bytes
    headers: dict[str, str]
    timestamp: float


_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(Exported).decode
_decode_keys = msgspec.msgpack.Decoder(list[str]).decode


class Backlog:
    """Messages to export, in the order they came, and the import marks."""

    def __init__(self, path: Path, *, fsync: FsyncPolicy, quota: int) -> None:
        self.store = SpoolStore(path, fsync=fsync, quota_bytes=quota)
        self._pending: dict[int, Exported] = {}
        self._unsent: deque[int] = deque()
        self._marks: dict[str, None] = {}
        self._noted = 0
        """Marks written since the last compaction."""

    async def open(self) -> None:
        """Recover what a previous run left, and compact the marks."""
        await self.store.start()
        for record_id, payload in self.store.pending():
            self._pending[record_id] = _decode(payload)
        self._unsent.extend(self._pending)
        for payload in self.store.meta():
            self._remember(_decode_keys(payload))
        self.store.rewrite_meta([_encode(list(self._marks))] if self._marks else [])

    async def aclose(self) -> None:
        await self.store.aclose()

    # -- export -------------------------------------------------------------------------

    async def add(self, messages: list[Exported]) -> None:
        """Store messages for export; returns once they are on disk (per fsync policy).

        Raises:
            SpoolFullError: the backlog's quota is full; none of them is stored.
        """
        ids = await self.store.append_many(_encode(m) for m in messages)
        for record_id, message in zip(ids, messages, strict=True):
            self._pending[record_id] = message
        self._unsent.extend(ids)

    def never_fits(self, message: Exported) -> bool:
        """Whether `message` alone is over the quota: an empty backlog would refuse it too."""
        return charge([_encode(message)]) > self.store.quota_bytes

    def take_unsent(self) -> tuple[int, Exported] | None:
        """The oldest message not sent on this connection yet."""
        while self._unsent:
            record_id = self._unsent.popleft()
            message = self._pending.get(record_id)
            if message is not None:
                return record_id, message
        return None

    def again(self, record_id: int) -> None:
        """Send this one next (the hub refused it; the others in flight stay as they are)."""
        if record_id in self._pending:
            self._unsent.appendleft(record_id)

    def has_unsent(self) -> bool:
        return bool(self._unsent)

    def rewind(self) -> None:
        """Everything not acknowledged is to be sent again (a new connection)."""
        self._unsent = deque(self._pending)

    def done(self, record_ids: Iterable[int]) -> None:
        """The hub has these: they leave the backlog."""
        ids = [i for i in record_ids if self._pending.pop(i, None) is not None]
        self.store.ack(ids)

    def waiting(self) -> list[tuple[int, Exported]]:
        """Every message the hub has not acknowledged, oldest first, with its record id."""
        return list(self._pending.items())

    def __len__(self) -> int:
        return len(self._pending)

    def oldest_age(self) -> float:
        """Seconds since the oldest pending message was published; 0 when none is."""
        for message in self._pending.values():
            return max(0.0, time.time() - message.timestamp)
        return 0.0

    @property
    def used_bytes(self) -> int:
        return self.store.used_bytes

    # -- import marks ---------------------------------------------------------------------

    def seen(self, key: str) -> bool:
        return key in self._marks

    def mark(self, keys: list[str]) -> None:
        """Remember imported keys; written with the next commit."""
        if not keys:
            return
        self._remember(keys)
        self._noted += len(keys)
        if self._noted > MARKS:  # the META records would keep their segments forever
            self._noted = 0
            self.store.rewrite_meta([_encode(list(self._marks))])
        else:
            self.store.note(RecordKind.META, _encode(keys))

    def _remember(self, keys: Iterable[str]) -> None:
        marks = self._marks
        for key in keys:
            marks[key] = None
        while len(marks) > MARKS:
            del marks[next(iter(marks))]
