"""Small state files written whole: never seen half-written after a crash."""

from __future__ import annotations

import json
import os
from pathlib import Path


def replace_json(path: Path, value: object) -> None:
    """Write `value` as JSON to a file beside `path`, then rename it over `path` (a reader,
    or the next start after a crash, finds the old file or the new one, never a mix).

    Raises:
        OSError: it could not be written; `path` is left as it was.
    """
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(value))
    os.replace(temporary, path)
