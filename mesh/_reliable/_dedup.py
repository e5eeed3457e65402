"""Receiver-side deduplication of reliable messages by (sender id, sequence).

Each sender's processed sequence numbers are kept as sorted, disjoint runs
``[start, end)``: a sender's messages mostly arrive in order, so a whole
stream is one run that grows by one per message (no entry per message), and a
membership test is a comparison or a bisection. At most `WINDOW` runs are
kept per sender, dropping the lowest first (redeliveries come from a sender's
spool, which its quota bounds).

Marks are persisted as records in the node's inbox spool, also as runs,
written with the next group commit or within 50 ms (they never wake the
spool's writer thread by themselves), so a restarted receiver still recognises
what it already processed; the last marks before a crash may be lost, which
costs a duplicate, never a loss (at-least-once). On start, once replayed, the
marks are written again as one record per sender (`SpoolStore.rewrite_meta`)
and the older records are released, and so again while the node runs, whenever
the records written since outweigh a few times the compacted marks: the inbox
stays about the size of what is remembered, however long the node runs and
however often it restarts.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Callable, Iterable
from typing import Final

import msgspec

from .._spool import RecordKind, SpoolStore, charge

WINDOW: Final[int] = 200_000
"""Runs of sequences remembered per sender."""
_REWRITE_FACTOR: Final[int] = 4
_REWRITE_SLACK: Final[int] = 64 * 1024
"""Mark records written beyond `_REWRITE_FACTOR` times the compacted marks plus this many
bytes are compacted again while the node runs."""


class _Marks(msgspec.Struct, array_like=True, gc=False):
    """One inbox record: a sender's newly processed sequences."""

    sender: str
    seqs: list[int]
    """Single sequences (how older versions wrote every mark)."""
    runs: list[int] = []
    """Runs, flattened: ``start, end, start, end...`` (end exclusive)."""


_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(_Marks).decode


def runs_of(seqs: Iterable[int]) -> list[int]:
    """Sequences as flattened ``[start, end)`` runs, in ascending order."""
    ordered = sorted(set(seqs))
    if ordered and ordered[-1] - ordered[0] == len(ordered) - 1:
        return [ordered[0], ordered[-1] + 1]  # the usual case: one run, found in C
    flat: list[int] = []
    for seq in ordered:
        if flat and flat[-1] == seq:
            flat[-1] = seq + 1
        else:
            flat += (seq, seq + 1)
    return flat


class _Runs:
    """One sender's sequences as sorted, disjoint ``[start, end)`` runs."""

    __slots__ = ("ends", "starts")

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.ends: list[int] = []

    def __contains__(self, seq: int) -> bool:
        ends = self.ends
        if not ends or seq >= ends[-1]:
            return False  # the common case: newer than anything seen
        i = bisect_right(self.starts, seq) - 1
        return i >= 0 and seq < ends[i]

    def add_run(self, start: int, end: int) -> None:
        starts, ends = self.starts, self.ends
        if not ends or start > ends[-1]:
            starts.append(start)
            ends.append(end)
            return
        if start >= starts[-1]:  # overlaps or touches the last run (in-order arrival)
            if end > ends[-1]:
                ends[-1] = end
            return
        lo = bisect_right(ends, start - 1)  # first run that ends at or after `start`
        hi = bisect_right(starts, end)  # runs from `lo` to `hi` touch [start, end)
        if lo < hi:
            start, end = min(start, starts[lo]), max(end, ends[hi - 1])
        starts[lo:hi] = [start]
        ends[lo:hi] = [end]

    def add_flat(self, flat: list[int]) -> None:
        """Add flattened runs (``start, end, start, end...``; an odd last one is ignored)."""
        for i in range(0, len(flat) - 1, 2):
            self.add_run(flat[i], flat[i + 1])

    def trim(self, window: int) -> None:
        if len(self.starts) > window:
            del self.starts[:-window], self.ends[:-window]


class Dedup:
    """Which reliable messages this node has already processed."""

    def __init__(self, store: SpoolStore | None = None, window: int = WINDOW) -> None:
        self._store = store
        self._window = window
        self._seen: dict[str, _Runs] = {}
        self._unsaved: dict[str, list[int]] = {}
        """Per sender: the runs (flattened) marked since the last `save`."""
        self._compacted = 0
        """Bytes of the marks as last written compacted (`_rewrite`)."""
        self._written = 0
        """Bytes of mark records written since: past a few times the compacted size, the
        marks are compacted again."""

    def load(self) -> None:
        """Replay persisted marks, then compact them (call after the store started,
        before any new mark)."""
        if self._store is None:
            return
        payloads = self._store.meta()
        for payload in payloads:
            try:
                marks = _decode(payload)
            except (msgspec.DecodeError, UnicodeDecodeError):
                continue
            runs = self._runs(marks.sender)
            for seq in marks.seqs:
                runs.add_run(seq, seq + 1)
            runs.add_flat(marks.runs)
            runs.trim(self._window)
        if payloads:
            self._rewrite()

    def _rewrite(self) -> None:
        """Write the marks again as one record per sender, releasing the older records."""
        assert self._store is not None
        records = [_encode(_Marks(sender, [], [n for run in zip(runs.starts, runs.ends,
                                                                 strict=True) for n in run]))
                   for sender, runs in self._seen.items()]
        self._store.rewrite_meta(records)
        self._compacted = charge(records)  # (their bytes on disk)
        self._written = 0

    def seen(self, sender: str, seq: int) -> bool:
        runs = self._seen.get(sender)
        return runs is not None and seq in runs

    def checker(self, sender: str) -> Callable[[int], bool]:
        """`seen` for one sender, for testing a batch of its sequences."""
        return self._runs(sender).__contains__

    def mark(self, sender: str, seq: int) -> None:
        self.mark_many(sender, (seq,))

    def mark_many(self, sender: str, seqs: Iterable[int]) -> None:
        """These sequences of `sender` were processed (persisted with the next `save`)."""
        runs = self._runs(sender)
        flat = runs_of(seqs)
        runs.add_flat(flat)
        runs.trim(self._window)
        if self._store is not None:  # (as runs: `save` writes them as they are)
            self._unsaved.setdefault(sender, []).extend(flat)

    def save(self) -> None:
        """Queue the new marks for the next commit, or for within 50 ms (no wait: losing
        them to a crash costs a duplicate)."""
        if self._store is None or not self._unsaved:
            return
        unsaved, self._unsaved = self._unsaved, {}
        for sender, flat in unsaved.items():
            record = _encode(_Marks(sender, [], flat))
            self._store.note(RecordKind.META, record, lazy=True)
            self._written += charge((record,))
        if self._written > _REWRITE_FACTOR * self._compacted + _REWRITE_SLACK:
            self._rewrite()  # (a running node's marks, compacted: the inbox stays small)

    def _runs(self, sender: str) -> _Runs:
        runs = self._seen.get(sender)
        if runs is None:
            runs = self._seen[sender] = _Runs()
        return runs
