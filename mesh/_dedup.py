"""Receiver-side deduplication of reliable messages by (sender id, sequence).

Each sender's recent sequence numbers are remembered, up to a bounded window
per sender (redeliveries come from a sender's spool, which its quota bounds).
Marks are persisted as records in the node's inbox spool, written with the
next group commit, so a restarted receiver still recognises what it already
processed; the last marks before a crash may be lost, which costs a duplicate,
never a loss (at-least-once).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Final

import msgspec

from ._spool import RecordKind, SpoolStore

WINDOW: Final[int] = 200_000
"""Sequences remembered per sender."""

_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(tuple[str, list[int]]).decode


class Dedup:
    """Which reliable messages this node has already processed."""

    def __init__(self, store: SpoolStore | None = None, window: int = WINDOW) -> None:
        self._store = store
        self._window = window
        self._seen: dict[str, OrderedDict[int, None]] = {}
        self._unsaved: dict[str, list[int]] = {}

    def load(self) -> None:
        """Replay persisted marks (call after the store recovered)."""
        if self._store is None:
            return
        for payload in self._store.meta():
            try:
                sender, seqs = _decode(payload)
            except (msgspec.DecodeError, UnicodeDecodeError):
                continue
            for seq in seqs:
                self._remember(sender, seq)

    def seen(self, sender: str, seq: int) -> bool:
        seqs = self._seen.get(sender)
        return seqs is not None and seq in seqs

    def mark(self, sender: str, seq: int) -> None:
        self._remember(sender, seq)
        if self._store is not None:
            self._unsaved.setdefault(sender, []).append(seq)

    def save(self) -> None:
        """Queue the new marks for the next commit (no wait: losing them costs a duplicate)."""
        if self._store is None or not self._unsaved:
            return
        unsaved, self._unsaved = self._unsaved, {}
        for sender, seqs in unsaved.items():
            self._store.note(RecordKind.META, _encode((sender, seqs)))

    def _remember(self, sender: str, seq: int) -> None:
        seqs = self._seen.get(sender)
        if seqs is None:
            seqs = self._seen[sender] = OrderedDict()
        seqs[seq] = None
        if len(seqs) > self._window:
            seqs.popitem(last=False)
