"""A small append-only file of length-prefixed records, for what a node remembers.

Records are appended in batches (one write per loop iteration, not per
message) and the file is rewritten whole, aside then renamed, to compact it.
A torn tail (a crash mid-write) ends the read at the last whole record and is
reported once; nothing before it is lost. Appends are flushed, not fsynced: a
process crash loses nothing, a power cut may lose the last batch.
"""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO, Final

_log = logging.getLogger("mesh.node")
_LEN: Final = struct.Struct("<I")


class RecordLog:
    """One such file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: BinaryIO | None = None
        self.size = 0
        """Bytes in the file (as far as this process wrote or read it)."""

    def read(self) -> list[bytes]:
        """Every whole record in the file (none if there is no file)."""
        if not self.path.exists():
            return []
        data = self.path.read_bytes()
        records, pos = [], 0
        while pos + _LEN.size <= len(data):
            (size,) = _LEN.unpack_from(data, pos)
            end = pos + _LEN.size + size
            if end > len(data):
                break
            records.append(data[pos + _LEN.size:end])
            pos = end
        if pos < len(data):
            _log.warning("%s: %d bytes at the end were torn and are dropped", self.path,
                         len(data) - pos)
        self.size = pos
        return records

    def append(self, records: Iterable[bytes]) -> bool:
        """Append in one write; False (logged) if the disk refused."""
        data = b"".join(_LEN.pack(len(r)) + r for r in records)
        try:
            if self._file is None:
                self._file = self.path.open("ab")
            self._file.write(data)
            self._file.flush()
        except OSError as exc:
            _log.warning("cannot write %s: %s", self.path, exc)
            return False
        self.size += len(data)
        return True

    def rewrite(self, records: Iterable[bytes]) -> None:
        """Make the file hold exactly `records` (written aside, fsynced, renamed)."""
        self.close()
        data = b"".join(_LEN.pack(len(r)) + r for r in records)
        tmp = self.path.with_suffix(".tmp")
        try:
            with tmp.open("wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except OSError as exc:
            _log.warning("cannot rewrite %s: %s", self.path, exc)
            return
        self.size = len(data)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
