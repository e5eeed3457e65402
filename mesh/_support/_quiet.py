"""Drop, count and log once: how the node treats input it cannot use.

Hostile or broken input must never crash a reader or flood the log. Each
reason is counted forever and logged at WARNING the first time, then at DEBUG.
Memory is bounded by the number of distinct reasons, which is small and fixed
by our code, not by the sender.
"""

from __future__ import annotations

import logging
from collections import Counter

_log = logging.getLogger("mesh.node")
_MAX_WARNED = 1000


class QuietLog:
    """Counts dropped input by reason; warns once per reason."""

    def __init__(self) -> None:
        self.dropped: Counter[str] = Counter()
        self._warned: set[tuple[str, str]] = set()

    def refuse(self, reason: str, who: str, detail: str) -> None:
        """Like `drop`, but warned once per (reason, sender): each refused peer is named once."""
        self.dropped[reason] += 1
        if (reason, who) in self._warned or len(self._warned) >= _MAX_WARNED:
            _log.debug("refused %s: %s", reason, detail)
            return
        self._warned.add((reason, who))
        _log.warning("%s", detail)

    def drop(self, reason: str, detail: str) -> None:
        self.dropped[reason] += 1
        if self.dropped[reason] == 1:
            _log.warning("dropped %s input: %s (further ones are logged at debug)", reason,
                         detail)
        else:
            _log.debug("dropped %s input: %s", reason, detail)
