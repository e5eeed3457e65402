"""The spool store on a real disk: recovery, reclaiming, damage, quota, SIGKILL."""

from __future__ import annotations

import asyncio
import random
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from mesh import MeshError, MessageTooLarge, SpoolFullError
from mesh._spool import FsyncPolicy, SpoolStore, charge
from mesh._spool._segment import MAX_RECORD
from tests.helpers import aeventually, cut_tail, file_bytes, files


async def _open(path: Path, **kw: Any) -> SpoolStore:
    store = SpoolStore(path, **kw)
    await store.start()
    return store


async def test_pending_messages_survive_reopen_and_ids_keep_growing(tmp_path: Path) -> None:
    """What was appended and not acked is pending again after a restart, in order."""
    store = await _open(tmp_path)
    ids = [await store.append(f"m{i}".encode()) for i in range(5)]
    store.ack(ids[:2])
    await store.aclose()
    again = await _open(tmp_path)
    try:
        assert again.pending() == [(i, f"m{n}".encode()) for n, i in enumerate(ids) if n >= 2]
        assert await again.append(b"next") > ids[-1]
        assert again.report.clean
    finally:
        await again.aclose()


async def test_acks_in_runs_and_singles_survive_reopen(tmp_path: Path) -> None:
    """Acks of consecutive ids (one record per run) and scattered ones settle exactly those."""
    store = await _open(tmp_path)
    ids = await store.append_many([f"m{i}".encode() for i in range(20)])
    acked = {*ids[2:9], ids[11], *ids[13:15], ids[19]}
    store.ack(sorted(acked, reverse=True))  # any order; repeats and unknown ids are ignored
    store.ack([ids[3], 10_000])
    assert [i for i, _ in store.pending()] == [i for i in ids if i not in acked]
    await store.aclose()
    again = await _open(tmp_path)
    try:
        assert [i for i, _ in again.pending()] == [i for i in ids if i not in acked]
        assert again.report.clean
    finally:
        await again.aclose()


async def test_acks_reach_the_files_without_a_later_append(tmp_path: Path) -> None:
    """Acks wait for the next commit to ride along, but not forever when none comes."""
    store = await _open(tmp_path)
    try:
        ids = await store.append_many([b"a", b"b", b"c"])
        store.ack(ids[:2])
        await aeventually(lambda: [i for i, _ in SpoolStore.peek(tmp_path)[0]] == ids[2:],
                          message="acks written to the segment")
    finally:
        await store.aclose()


@pytest.mark.parametrize("policy", list(FsyncPolicy))
async def test_concurrent_appends_share_commits_under_every_policy(tmp_path: Path,
                                                                   policy: FsyncPolicy) -> None:
    """Many appends in flight at once all complete and all come back after reopen."""
    store = await _open(tmp_path, fsync=policy)
    ids = await asyncio.gather(*(store.append(b"x" * 100) for _ in range(500)))
    await store.aclose()
    again = await _open(tmp_path, fsync=policy)
    try:
        assert [i for i, _ in again.pending()] == sorted(ids)
    finally:
        await again.aclose()


async def test_acknowledged_segments_are_deleted(tmp_path: Path) -> None:
    """Once everything in the oldest segments is acked, their files go away."""
    store = await _open(tmp_path, segment_bytes=4096)
    ids = [await store.append(b"y" * 500) for _ in range(40)]
    segments_before = len(await files(tmp_path, "*.seg"))
    assert segments_before >= 4
    store.ack(ids)
    await store.append(b"keeps the writer busy")
    await store.aclose()
    assert len(await files(tmp_path, "*.seg")) <= 2
    again = await _open(tmp_path, segment_bytes=4096)
    try:
        assert [p for _, p in again.pending()] == [b"keeps the writer busy"]
    finally:
        await again.aclose()


async def test_a_segment_goes_exactly_when_its_last_message_is_acked(tmp_path: Path) -> None:
    """Groups and singles over many segments, acked in random order (with repeats and
    unknown ids): a segment is deleted once all of its messages are acked, never
    before, also after a restart."""
    rng = random.Random(5)
    store = await _open(tmp_path, segment_bytes=512)
    ids = []
    for n in range(30):
        if n % 3:
            ids += await store.append_many([f"{n}-{i}".encode() * 30 for i in range(3)])
        else:
            ids.append(await store.append(f"{n}".encode() * 90))
    assert len(await files(tmp_path, "*.seg")) >= 10
    order = ids[:]
    rng.shuffle(order)
    for cut in range(0, len(order), 7):
        store.ack([*order[cut:cut + 7], order[0], 99_999])
        acked = set(order[:cut + 7])
        first_pending = min(set(ids) - acked, default=None)
        segments = await files(tmp_path, "*.seg")
        if first_pending is not None:  # the oldest file left holds the oldest pending one
            assert int(segments[0].stem) <= first_pending
            assert len(segments) == 1 or int(segments[1].stem) > first_pending
    assert store.pending() == []
    await store.aclose()
    again = await _open(tmp_path, segment_bytes=512)
    try:
        assert again.pending() == []
        assert len(await files(tmp_path, "*.seg")) == 1
    finally:
        await again.aclose()


async def _disk_bytes(path: Path) -> int:
    return await file_bytes(path, "*.seg")


async def test_reclaim_deletes_the_settled_segment_being_written(tmp_path: Path) -> None:
    """After everything is acked, `reclaim` gives the last segment's bytes back at once;
    with a message still pending in it, it keeps the segment (and the message)."""
    store = await _open(tmp_path)
    ids = await store.append_many([b"z" * 1000 for _ in range(50)])
    keep = await store.append(b"still pending")
    before = await _disk_bytes(tmp_path)
    store.ack(ids)
    store.reclaim()
    await store.aclose()
    assert await _disk_bytes(tmp_path) >= before  # `keep` holds the segment
    store = await _open(tmp_path)
    try:
        assert store.pending() == [(keep, b"still pending")]
        store.ack([keep])
        store.reclaim()
        assert store.used_bytes == 0
        await aeventually(lambda: store.disk_bytes == 0)
    finally:
        await store.aclose()
    assert await _disk_bytes(tmp_path) == 0
    again = await _open(tmp_path)
    try:
        assert again.pending() == []
        assert await again.append(b"after") > keep  # ids go on from where they were
    finally:
        await again.aclose()


async def test_ids_are_not_reused_when_only_an_ack_run_survives(tmp_path: Path) -> None:
    """A segment left holding only the ack of a run (its data's segment deleted) still
    makes new ids start above that run: a reused id would be settled by the old ack at the
    next restart, losing a message that was reported stored."""
    store = await _open(tmp_path, segment_bytes=3200)
    ids = await store.append_many([b"x" * 100 for _ in range(31)])  # one RUN, near full
    store.ack(ids)  # the ack rolls to a new segment
    await store.aclose()
    store = await _open(tmp_path, segment_bytes=3200)  # drops the settled data segment
    await store.aclose()
    assert len(await files(tmp_path, "*.seg")) == 1  # the ack's alone
    store = await _open(tmp_path, segment_bytes=3200)
    new = await store.append(b"must survive")
    await store.aclose()
    assert new > ids[-1]
    again = await _open(tmp_path, segment_bytes=3200)
    try:
        assert again.pending() == [(new, b"must survive")]
    finally:
        await again.aclose()


async def test_torn_tail_is_reported_cut_and_every_intact_record_kept(tmp_path: Path) -> None:
    """A crash mid-write leaves half a record: reported, cut off, the rest kept."""
    store = await _open(tmp_path)
    for i in range(10):
        await store.append(f"record-{i}".encode() * 10)
    await store.aclose()
    (seg,) = await files(tmp_path, "*.seg")
    await cut_tail(seg, 7)
    again = await _open(tmp_path)
    try:
        assert again.report.torn_bytes > 0
        assert not again.report.clean
        assert [p for _, p in again.pending()] == [f"record-{i}".encode() * 10 for i in range(9)]
        await again.append(b"after repair")
    finally:
        await again.aclose()
    third = await _open(tmp_path)
    try:
        assert third.report.clean
        assert [p for _, p in third.pending()][-1] == b"after repair"
    finally:
        await third.aclose()


async def test_a_group_is_one_record_and_a_torn_one_loses_only_its_own_append(tmp_path: Path) -> None:
    """append_many writes one RUN record; ids, acks, peek and recovery see each message,
    and a torn last group costs that group alone (its append never returned)."""
    store = await _open(tmp_path)
    first = await store.append_many([f"a{i}".encode() for i in range(5)])
    single = await store.append(b"single")
    store.ack(first[1:3])  # (its record rides along with the next append's commit)
    last = await store.append_many([f"b{i}".encode() * 20 for i in range(4)])
    await store.aclose()
    assert first == list(range(first[0], first[0] + 5))
    assert last[0] == single + 1
    expected = [(first[0], b"a0"), *((i, f"a{n}".encode()) for n, i in enumerate(first) if n > 2),
                (single, b"single"), *((i, f"b{n}".encode() * 20) for n, i in enumerate(last))]
    assert SpoolStore.peek(tmp_path)[0] == expected
    (seg,) = await files(tmp_path, "*.seg")
    await cut_tail(seg, 3)
    again = await _open(tmp_path)
    try:
        assert again.report.torn_bytes > 0
        assert again.pending() == expected[:-4]
        assert (await again.append_many([b"x", b"y"]))[0] > single
    finally:
        await again.aclose()


async def test_flipped_bytes_cost_one_record_not_the_rest(tmp_path: Path) -> None:
    """Corruption inside the file is skipped by resynchronising on the next record."""
    store = await _open(tmp_path)
    for i in range(10):
        await store.append(f"payload-{i:02d}".encode() * 5)
    await store.aclose()
    (seg,) = await files(tmp_path, "*.seg")
    data = bytearray(await asyncio.to_thread(seg.read_bytes))
    where = data.index(b"payload-04")
    data[where + 3] ^= 0xFF
    await asyncio.to_thread(seg.write_bytes, bytes(data))
    again = await _open(tmp_path)
    try:
        kept = [p for _, p in again.pending()]
        assert kept == [f"payload-{i:02d}".encode() * 5 for i in range(10) if i != 4]
        assert again.report.corrupt_records == 1
    finally:
        await again.aclose()


async def test_quota_is_a_clear_error_and_earlier_data_survives(tmp_path: Path) -> None:
    """Past the quota: SpoolFullError to the sender; everything accepted before is intact."""
    store = await _open(tmp_path, quota_bytes=10_000)
    accepted: list[int] = []

    async def append_until_refused() -> None:
        for i in range(1000):
            accepted.append(await store.append(f"{i:04d}".encode() * 25))

    with pytest.raises(SpoolFullError, match="spool full"):
        await append_until_refused()
    assert 50 < len(accepted) < 1000
    await store.aclose()
    again = await _open(tmp_path, quota_bytes=10_000)
    try:
        assert [i for i, _ in again.pending()] == accepted
    finally:
        await again.aclose()


_QUOTA = 256 * 1024
_BOUND = _QUOTA + _QUOTA // 4 + 8 * 1024
"""The files of a `_QUOTA` spool: the quota, two segments (an eighth of it each) and
a record being written."""


@pytest.mark.timeout(60)
async def test_a_small_quota_carries_many_times_its_size_when_messages_are_acked(
        tmp_path: Path) -> None:
    """The quota counts pending messages, not delivered ones the files still hold: a
    spool whose messages are acked as it goes takes twenty times its quota without
    SpoolFullError, its files stay near the quota, and a restart finds it empty."""
    store = await _open(tmp_path, quota_bytes=_QUOTA)
    biggest = 0
    try:
        for _ in range(100):  # 100 x 50 x 1 KiB: twenty quotas
            ids = await store.append_many([b"d" * 1000 for _ in range(50)])
            store.ack(ids)
            biggest = max(biggest, await _disk_bytes(tmp_path))
        assert store.used_bytes == 0
        assert len(store) == 0
    finally:
        await store.aclose()
    assert biggest <= _BOUND
    again = await _open(tmp_path, quota_bytes=_QUOTA)
    try:
        assert (len(again), again.used_bytes) == (0, 0)
        assert again.disk_bytes <= _BOUND
    finally:
        await again.aclose()


@pytest.mark.timeout(60)
async def test_a_message_pending_for_long_does_not_pin_the_settled_files(tmp_path: Path) -> None:
    """A few messages never acked (an offline durable's) sit among many acked ones: the
    segments they share are rewritten around them, so the files stay near the quota,
    and those messages, and only those, are pending again after a restart."""
    store = await _open(tmp_path, quota_bytes=_QUOTA)
    kept: list[tuple[int, bytes]] = []
    biggest = 0
    try:
        for n in range(500):  # 500 x 10 x 1 KiB: twenty quotas, in groups that share segments
            if n % 10 == 0:
                payload = f"keep-{n}".encode() * 10
                kept.append((await store.append(payload), payload))
            ids = await store.append_many([b"d" * 1000 for _ in range(10)])
            store.ack(ids)
            biggest = max(biggest, await _disk_bytes(tmp_path))
        assert store.pending() == kept
        assert store.used_bytes == charge(p for _, p in kept)
    finally:
        await store.aclose()
    assert biggest <= _BOUND
    again = await _open(tmp_path, quota_bytes=_QUOTA)
    try:
        assert again.pending() == kept
        assert again.used_bytes == charge(p for _, p in kept)
        assert again.report.clean
        assert not await files(tmp_path, "*.tmp")
    finally:
        await again.aclose()


@pytest.mark.timeout(60)
async def test_a_slow_consumers_acks_do_not_pin_the_files(tmp_path: Path) -> None:
    """A consumer that acks one message at a time writes an ack record per message; with
    a message left pending in each segment, the acks are most of its bytes, and such
    segments are rewritten too (they used to grow the files without bound)."""
    quota = 64 * 1024
    store = await _open(tmp_path, quota_bytes=quota, fsync=FsyncPolicy.OFF)
    kept: list[tuple[int, bytes]] = []
    biggest = 0
    try:
        for n in range(60):
            ids = await store.append_many([b"x" * 40] * 400)
            payload = f"pending-{n}".encode()
            kept.append((await store.append(payload), payload))
            for i in ids:
                store.ack([i])  # (one record each)
                await asyncio.sleep(0)
            # The acks are written by themselves (no append to ride along with), into the
            # segment of the message left pending.
            await aeventually(lambda: store._queued_bytes == 0, 5)
            biggest = max(biggest, await _disk_bytes(tmp_path))
        assert store.pending() == kept
    finally:
        await store.aclose()
    assert biggest <= quota + quota // 4 + 8 * 1024
    again = await _open(tmp_path, quota_bytes=quota)
    try:
        assert again.pending() == kept
    finally:
        await again.aclose()


@pytest.mark.timeout(30)
async def test_a_segment_that_cannot_be_made_fails_its_sends_and_the_spool_goes_on(
        tmp_path: Path) -> None:
    """A full disk (here: a directory in the way of the next segment's file) at a roll
    fails the send that needed it, with an error, and gives its quota back; the sends
    used to wait for ever, their bytes counted against the quota."""
    store = await _open(tmp_path, quota_bytes=64 * 1024)  # (segments of 8 KiB)
    try:
        first = await store.append(b"a" * 5000)
        blocker = tmp_path / f"{first + 1:020d}.seg"
        blocker.mkdir()
        with pytest.raises(MeshError, match="spool write failed"):
            await asyncio.wait_for(store.append(b"b" * 5000), 5)
        assert store.used_bytes == charge([b"a" * 5000])
        blocker.rmdir()
        later = await asyncio.wait_for(store.append(b"c" * 5000), 5)
        assert [i for i, _ in store.pending()] == [first, later]
        assert store.used_bytes == charge([b"a" * 5000, b"c" * 5000])
    finally:
        await store.aclose()
    again = await _open(tmp_path, quota_bytes=64 * 1024)
    try:
        assert [p for _, p in again.pending()] == [b"a" * 5000, b"c" * 5000]
    finally:
        await again.aclose()


@pytest.mark.timeout(30)
async def test_a_spool_whose_directory_went_before_the_first_write_fails_sends_until_it_is_back(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The directory removed between recovery and the writer's first file: the writer
    thread died of it and every later send waited for ever. Now each send fails with an
    error naming the spool (logged once for the episode), and they work again once the
    directory is back."""
    path = tmp_path / "out"
    store = SpoolStore(path)
    recover = store.open

    def recover_then_remove() -> Any:
        report = recover()
        shutil.rmtree(path)
        return report

    store.open = recover_then_remove  # type: ignore[method-assign]
    await store.start()
    try:
        for _ in range(3):
            with pytest.raises(MeshError, match=re.escape(f"spool write failed: {path}: No such file")):
                await asyncio.wait_for(store.append(b"lost"), 5)
        assert store.used_bytes == 0
        path.mkdir()
        kept = await asyncio.wait_for(store.append(b"kept"), 5)
    finally:
        await store.aclose()
    failing = [r.getMessage() for r in caplog.records if "write failed" in r.getMessage()]
    assert len(failing) == 1, failing
    assert any("writes work again, after 3 failed (3 message(s) refused)" in r.getMessage()
               for r in caplog.records)
    again = await _open(path)
    try:
        assert again.pending() == [(kept, b"kept")]
    finally:
        await again.aclose()


@pytest.mark.timeout(30)
async def test_a_send_into_a_removed_spool_directory_is_an_error_not_a_lost_message(
        tmp_path: Path) -> None:
    """With its directory removed while it runs, the spool wrote on into its open file,
    which no name led to any more: each send returned as stored, and a restart had none
    of them. Now such a send fails; once the directory is back, a new segment holds
    what is sent."""
    path = tmp_path / "out"
    store = await _open(path)
    try:
        await store.append(b"before")
        shutil.rmtree(path)
        with pytest.raises(MeshError, match=r"spool write failed: .*removed"):
            await asyncio.wait_for(store.append(b"lost"), 5)
        with pytest.raises(MeshError, match="No such file"):
            await asyncio.wait_for(store.append(b"lost too"), 5)
        path.mkdir()
        kept = await asyncio.wait_for(store.append(b"kept"), 5)
    finally:
        await store.aclose()
    again = await _open(path)
    try:
        assert again.pending() == [(kept, b"kept")]
    finally:
        await again.aclose()


_BIG = [b"a" * (33 << 20), b"b" * (33 << 20), b"tail"]
"""Together past the 64 MiB a record may hold (`MAX_RECORD`)."""


async def test_a_group_larger_than_a_record_may_be_survives_a_restart(tmp_path: Path) -> None:
    """Messages spooled with one commit were one RUN record whatever their size: past
    64 MiB (70 concurrent 1 MiB reliable pushes) it was written and acknowledged, then
    taken for a torn write at the next start, and every message in it lost. Now they go
    in as many records as fit."""
    store = await _open(tmp_path, quota_bytes=1 << 30, fsync=FsyncPolicy.OFF)
    try:
        ids = await store.append_many(_BIG)
    finally:
        await store.aclose()
    again = await _open(tmp_path, quota_bytes=1 << 30, fsync=FsyncPolicy.OFF)
    try:
        assert again.report.clean, again.report.problems
        assert again.pending() == list(zip(ids, _BIG, strict=True))
    finally:
        await again.aclose()


async def test_a_message_larger_than_a_record_may_be_is_refused(tmp_path: Path) -> None:
    """One message past 64 MiB (a max_message_size set higher) would be unreadable at
    recovery: it is refused at once, and the spool goes on."""
    store = await _open(tmp_path, quota_bytes=1 << 30, fsync=FsyncPolicy.OFF)
    try:
        with pytest.raises(MessageTooLarge):
            await store.append(b"x" * (MAX_RECORD + 1))
        assert (len(store), store.used_bytes) == (0, 0)
        assert await store.append(b"fine") == 1
    finally:
        await store.aclose()


@pytest.mark.timeout(60)
async def test_a_full_quota_refuses_until_acks_make_room_and_loses_nothing(tmp_path: Path) -> None:
    """Full of undelivered messages, the spool refuses; acking some makes room for as
    many bytes again, never more; what was accepted and not acked survives a restart."""
    store = await _open(tmp_path, quota_bytes=_QUOTA)
    accepted: list[int] = []
    acked: set[int] = set()
    freed: list[int] = []

    async def append_until_refused() -> None:
        for _ in range(10_000):
            accepted.append(await store.append(b"u" * 1000))

    try:
        for round_ in range(3):
            before = len(accepted)
            with pytest.raises(SpoolFullError, match="spool full"):
                await append_until_refused()
            assert _QUOTA - charge([b"u" * 1000]) < store.used_bytes <= _QUOTA
            if round_:
                assert len(accepted) - before == len(freed)
            freed = [i for i in accepted if i not in acked][: len(store) // 2]
            store.ack(freed)
            acked.update(freed)
        assert await _disk_bytes(tmp_path) <= _BOUND
    finally:
        await store.aclose()
    again = await _open(tmp_path, quota_bytes=_QUOTA)
    try:
        assert [i for i, _ in again.pending()] == [i for i in accepted if i not in acked]
        assert again.used_bytes == charge(p for _, p in again.pending())
        with pytest.raises(SpoolFullError):
            await again.append(b"u" * (_QUOTA - again.used_bytes))
    finally:
        await again.aclose()


_WRITER = textwrap.dedent("""
    import asyncio, sys
    from mesh._spool import FsyncPolicy, SpoolStore
    async def main():
        store = SpoolStore(sys.argv[1], fsync=FsyncPolicy(sys.argv[2]))
        await store.start()
        n = 0
        while n < 1_000_000:
            ids = await asyncio.gather(*(store.append(b"m%d" % (n + k)) for k in range(50)))
            n += 50
            sys.stdout.write(" ".join(map(str, ids)) + "\\n")
            sys.stdout.flush()
    asyncio.run(main())
""")


def _confirmed_then_killed(script: str, path: Path, policy: str, count: int) -> list[int]:
    """Run a writer `script` until it has printed `count` ids (those whose append
    returned), then SIGKILL it; the ids."""
    proc = subprocess.Popen([sys.executable, "-c", script, str(path), policy],
                            stdout=subprocess.PIPE, text=True)
    confirmed: list[int] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            confirmed.extend(int(x) for x in line.split())
            if len(confirmed) >= count:
                break
        proc.kill()
    finally:
        proc.kill()
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()
    assert len(confirmed) >= count
    return confirmed


@pytest.mark.parametrize("policy", ["batch", "always"])
def test_every_append_that_returned_survives_sigkill(tmp_path: Path, policy: str) -> None:
    """Guarantee 1: an append that returned is on disk, even if the process is SIGKILLed."""
    confirmed = _confirmed_then_killed(_WRITER, tmp_path, policy, 2000)

    async def check() -> None:
        store = await _open(tmp_path)
        try:
            survived = {i for i, _ in store.pending()}
            assert set(confirmed) <= survived
        finally:
            await store.aclose()

    asyncio.run(check())


_RECLAIMER = textwrap.dedent("""
    import asyncio, sys
    from mesh._spool import FsyncPolicy, SpoolStore
    async def main():
        store = SpoolStore(sys.argv[1], fsync=FsyncPolicy(sys.argv[2]), quota_bytes=64 * 1024)
        await store.start()
        for n in range(1_000_000):
            keep = await store.append(b"k%d" % n * 20)
            sys.stdout.write(f"{keep}\\n")
            sys.stdout.flush()
            for _ in range(3):
                store.ack(await store.append_many([b"d" * 500] * 4))
    asyncio.run(main())
""")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("policy", ["batch", "always"])
def test_rewriting_segments_around_pending_messages_survives_sigkill(tmp_path: Path,
                                                                      policy: str) -> None:
    """A small quota, one message kept in every few acked ones, SIGKILLed while its
    segments are being rewritten: every kept message whose append returned is there."""
    confirmed = _confirmed_then_killed(_RECLAIMER, tmp_path, policy, 150)  # 150 x 6 KiB

    async def check() -> None:
        store = await _open(tmp_path, quota_bytes=64 * 1024)
        try:
            assert set(confirmed) <= {i for i, _ in store.pending()}
            assert store.disk_bytes <= 64 * 1024 * 3 // 2
        finally:
            await store.aclose()

    asyncio.run(check())
