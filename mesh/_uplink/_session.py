"""What an MQTT session is subscribed to, remembered in the agent's data dir.

A persistent session keeps its subscriptions at the broker across connections
and restarts, and MQTT has no way to ask which it holds. So the topic filters
the uplink subscribed are written down, one small file per session (broker url
and client id), and a connect UNSUBSCRIBEs those no import pattern asks for any
more: a pattern removed by a reload, or while the agent was down, no longer
has the broker send (and queue, while we are away) messages that would only be
dropped. The session is the agent's own (its client id), so no one else loses
a subscription. A session subscribed before this memory existed may hold
filters no file names; what they bring is acknowledged and dropped.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from .._support._files import replace_json

_log = logging.getLogger("mesh.uplink")


class SessionFilters:
    """The filters one MQTT session (url and client id) holds, as last written."""

    def __init__(self, directory: Path, url: str, client_id: str) -> None:
        digest = hashlib.blake2s(f"{url} {client_id}".encode(), digest_size=8).hexdigest()
        self.path = directory / f"{digest}.json"
        self._url = url
        self._client_id = client_id
        self._failed = False

    def load(self) -> set[str]:
        """The filters written last; none when there is no file (or an unreadable one)."""
        try:
            data = json.loads(self.path.read_text())
            return {str(f) for f in data["filters"]}
        except FileNotFoundError:
            return set()
        except (OSError, ValueError, KeyError, TypeError) as exc:
            _log.warning("mqtt uplink %s: %s unreadable, ignored: %s", self._client_id,
                         self.path, exc)
            return set()

    def save(self, filters: set[str]) -> None:
        """Write `filters` (a new file renamed over the old); a failure is logged once: the
        filters removed later are then not unsubscribed, and what they bring is dropped."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            replace_json(self.path, {"url": self._url, "client_id": self._client_id,
                                     "filters": sorted(filters)})
        except OSError as exc:
            if not self._failed:
                _log.warning("mqtt uplink %s: cannot write %s: %s", self._client_id,
                             self.path, exc)
            self._failed = True
