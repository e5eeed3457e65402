"""The node's stable id, kept in its data dir so a restarted node is the same node."""

from __future__ import annotations

import os
import re
import secrets
from pathlib import Path
from typing import Final

from ..errors import ConfigError

_ID_FILE: Final[str] = "node_id"
_ID_RE: Final = re.compile(r"^[0-9a-f]{32}$")


def new_id() -> str:
    return secrets.token_hex(16)


def load_or_create_id(data_dir: str | None) -> str:
    """Read the id from `data_dir`, creating it atomically on first use; random if no dir."""
    if data_dir is None:
        return new_id()
    path = Path(data_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
        id_file = path / _ID_FILE
        if id_file.exists():
            text = id_file.read_text().strip()
            if not _ID_RE.match(text):
                raise ConfigError("data_dir", f"{id_file} does not hold a node id")
            return text
        node_id = new_id()
        tmp = path / f".{_ID_FILE}.{os.getpid()}"
        with open(tmp, "w") as fh:
            fh.write(node_id + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, id_file)
        return node_id
    except OSError as exc:
        raise ConfigError("data_dir", f"{data_dir}: {exc.strerror or exc}") from None
