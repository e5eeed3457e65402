"""Durable subscriptions as their publishers know them: remembered across restarts.

A durable subscription is a named, per-node work queue
(``_durable.<node id>.<name>``) that only its own node pulls from. A publisher
that has ever seen one announced (in a hello) writes it to
``<data dir>/durables.json`` and, from then on, spools every reliable message
whose topic matches for it, online or not, until that node consumes it.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

from patterns import InvalidName, TopicPattern

from .._membership._peers import PeerRecord
from .._support._cache import BoundedDict

_log = logging.getLogger("mesh.spool")
PREFIX: Final[str] = "_durable"
_FILE: Final[str] = "durables.json"


def durable_queue(node_id: str, name: str) -> str:
    """The queue that carries durable `name` of node `node_id`."""
    return f"{PREFIX}.{node_id}.{name}"


class KnownDurables:
    """Queue name -> pattern of every durable seen, persisted in the data dir; and this
    node's own durables, which its hello announces.

    It learns from peers' hellos as a `PeerListener`.
    """

    def __init__(self, data_dir: str | None) -> None:
        self._path = Path(data_dir) / _FILE if data_dir is not None else None
        self._patterns: dict[str, TopicPattern] = {}
        self._cache: BoundedDict[str, list[str]] = BoundedDict()
        self.mine: dict[str, str] = {}
        """This node's own durable subscriptions: queue -> pattern."""

    def hello_fields(self, version: int) -> Mapping[str, Any]:
        return {"durables": self.mine}

    def peer_connected(self, new: PeerRecord, old: PeerRecord | None) -> None:
        if new.durables:
            self.learn(new.durables)

    def peer_updated(self, rec: PeerRecord) -> None:
        if rec.durables:
            self.learn(rec.durables)

    def peer_lost(self, rec: PeerRecord) -> None:
        pass  # a publisher spools for a durable whether its node is there or not

    def peer_gone(self, rec: PeerRecord) -> None:
        pass

    def peers_changed(self) -> None:
        pass

    def load(self) -> None:
        if self._path is None or not self._path.exists():
            return
        try:
            stored = json.loads(self._path.read_text())
            self.learn(stored, save=False)
        except (OSError, ValueError, AttributeError) as exc:
            _log.warning("cannot read %s (%s): durables are learned again from peers",
                         self._path, exc)

    def learn(self, durables: Mapping[str, str], *, save: bool = True) -> bool:
        """Remember newly announced durables; True if any was new."""
        changed = False
        for queue, pattern in durables.items():
            known = self._patterns.get(queue)
            if known is not None and known.pattern == pattern:
                continue
            if not queue.startswith(PREFIX + "."):
                continue
            try:
                self._patterns[queue] = TopicPattern(pattern)
            except InvalidName:
                continue
            changed = True
        if changed:
            self._cache.clear()
            if save:
                self._save()
        return changed

    def matching(self, topic: str) -> list[str]:
        """The durable queues a reliable message on `topic` must reach."""
        queues = self._cache.get(topic)
        if queues is None:
            queues = self._cache.put(topic, [q for q, p in self._patterns.items()
                                             if p.matches(topic)])
        return queues

    def _save(self) -> None:
        if self._path is None:
            return
        tmp = self._path.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps({q: p.pattern for q, p in self._patterns.items()}))
            os.replace(tmp, self._path)
        except OSError as exc:
            _log.warning("cannot save %s: %s", self._path, exc)
