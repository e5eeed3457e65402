"""Receiver dedup: runs of sequences behave like a set, persist, and stay bounded."""

from __future__ import annotations

import contextlib
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from mesh._reliable._dedup import Dedup, runs_of
from mesh._spool import RecordKind, SpoolStore, _store
from tests.helpers import aeventually, files


def test_runs_answer_like_a_set_for_any_arrival_order() -> None:
    """Marks in random order (with repeats) are seen exactly when a plain set says so."""
    rng = random.Random(7)
    dedup = Dedup()
    marked: set[int] = set()
    for _ in range(3_000):
        seqs = [rng.randrange(2_000) for _ in range(rng.randrange(1, 5))]
        dedup.mark_many("a", seqs)
        marked.update(seqs)
        probe = rng.randrange(2_100)
        assert dedup.seen("a", probe) == (probe in marked)
    assert all(dedup.seen("a", s) == (s in marked) for s in range(2_100))
    assert not dedup.seen("b", next(iter(marked)))


def test_in_order_marks_are_one_run_and_the_window_drops_the_lowest_runs() -> None:
    """A stream in order costs one run; beyond the window, the oldest runs are forgotten."""
    dedup = Dedup(window=3)
    dedup.mark_many("a", range(1, 10_001))
    assert dedup.seen("a", 1)
    assert dedup.seen("a", 10_000)
    assert not dedup.seen("a", 10_001)
    for seq in (20_000, 30_000, 40_000):  # three more runs: the first is dropped
        dedup.mark("a", seq)
    assert not dedup.seen("a", 5)
    assert all(dedup.seen("a", s) for s in (20_000, 30_000, 40_000))


def test_runs_of_merges_neighbours_and_repeats() -> None:
    assert runs_of([5, 1, 2, 3, 3, 9, 6]) == [1, 4, 5, 7, 9, 10]


async def test_marks_survive_a_restart_also_in_the_older_single_sequence_form(tmp_path: Path) -> None:
    """Saved runs and records written by older versions (sender, [seq...]) both load."""
    store = SpoolStore(tmp_path)
    await store.start()
    store.note(RecordKind.META, msgspec.msgpack.encode(("old", [3, 4, 8])))
    dedup = Dedup(store)
    dedup.mark_many("new", [*range(100, 200), 500])
    dedup.save()
    await store.aclose()
    again = SpoolStore(tmp_path)
    await again.start()
    try:
        loaded = Dedup(again)
        loaded.load()
        assert [s for s in range(10) if loaded.seen("old", s)] == [3, 4, 8]
        assert all(loaded.seen("new", s) for s in (100, 199, 500))
        assert not any(loaded.seen("new", s) for s in (99, 200, 499, 501))
    finally:
        await again.aclose()


async def test_marks_made_in_any_order_between_two_saves_survive_a_restart(
        tmp_path: Path) -> None:
    """Several marks before one save (out of order, overlapping, repeated) are saved as
    the runs each made, and load back exactly."""
    store = SpoolStore(tmp_path)
    await store.start()
    dedup = Dedup(store)
    for seqs in ([5, 6, 7], [1, 2], [7, 8], [2], [20, 12, 13]):
        dedup.mark_many("s", seqs)
    dedup.save()
    await store.aclose()
    async with _loaded(tmp_path) as (_, loaded):
        assert [n for n in range(25) if loaded.seen("s", n)] == [1, 2, 5, 6, 7, 8, 12, 13, 20]


@contextlib.asynccontextmanager
async def _loaded(path: Path, **kw: Any) -> AsyncIterator[tuple[SpoolStore, Dedup]]:
    """A started store and the dedup loaded from it; the store is closed on the way out."""
    store = SpoolStore(path, **kw)
    await store.start()
    try:
        dedup = Dedup(store)
        dedup.load()
        yield store, dedup
    finally:
        await store.aclose()


async def test_marks_survive_two_restarts_and_the_inbox_is_compacted(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Marks written over many segments are all still known after a second and a third
    start, and each start leaves them compacted in one new segment (the older go)."""
    monkeypatch.setattr(_store, "_LAZY_ACKS", 0.0)  # each save is written at once
    expected: set[int] = set()
    for start in range(3):
        async with _loaded(tmp_path, segment_bytes=512) as (store, dedup):
            assert all(dedup.seen("a", s) for s in expected), f"start {start}: marks lost"
            assert not dedup.seen("a", 10_000 * start + 9_999)
            for first in range(10_000 * start, 10_000 * start + 2_000, 100):
                seqs = range(first, first + 100, 7)  # runs of one
                dedup.mark_many("a", seqs)
                dedup.save()
                expected.update(seqs)
                await aeventually(lambda: not store._lazy)
        assert len(await files(tmp_path, "*.seg")) > 3  # the marks rolled over segments
    async with _loaded(tmp_path, segment_bytes=512) as (_, dedup):
        assert all(dedup.seen("a", s) for s in expected)
    assert len(await files(tmp_path, "*.seg")) == 1
    async with _loaded(tmp_path) as (_, dedup):
        assert all(dedup.seen("a", s) for s in expected)


async def test_a_running_nodes_marks_are_compacted_as_it_goes(tmp_path: Path) -> None:
    """A worker saves marks on every credit round, one record per pusher; while it runs
    they are compacted again whenever they outweigh the compacted marks by far, so the
    inbox stays small however long it runs (it grew ~74 B per message until a restart),
    and every mark is still known after one."""
    biggest = 0
    async with _loaded(tmp_path, quota_bytes=64 * 1024) as (store, dedup):
        for seq in range(6_000):  # one message per credit round: a slow worker
            dedup.mark("pusher", seq)
            dedup.save()
            if seq % 100 == 99:
                await aeventually(lambda: store._queued_bytes == 0, 5)
                biggest = max(biggest, store.disk_bytes)
    assert biggest < 100 * 1024  # (compacted each 64 KiB of records, as the marks are one run)
    async with _loaded(tmp_path) as (_, dedup):
        assert all(dedup.seen("pusher", s) for s in range(6_000))
        assert not dedup.seen("pusher", 6_000)

