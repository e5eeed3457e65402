"""One process per data dir: two nodes sharing a spool would corrupt it."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import IO

from ..errors import ConfigError


class DataDirLock:
    """An exclusive advisory lock on ``<data dir>/.lock``, held while the node runs."""

    def __init__(self, data_dir: str) -> None:
        self._path = Path(data_dir) / ".lock"
        self._fh: IO[str] | None = None

    def acquire(self) -> None:
        """Raises ConfigError if another process holds it."""
        try:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            fh = open(self._path, "a+")  # noqa: SIM115 - held until release()
        except OSError as exc:
            raise ConfigError("data_dir", f"{self._path.parent}: {exc.strerror or exc}"
                              ) from None
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            fh.close()
            raise ConfigError("data_dir", f"{self._path.parent} is in use by pid {holder}"
                              ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(str(os.getpid()))
        fh.flush()
        self._fh = fh

    def release(self) -> None:
        if self._fh is not None:
            fcntl.flock(self._fh, fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None
