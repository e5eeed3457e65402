"""Reliable work queues: on disk before return, delivered when workers come, retried, dead-lettered."""

from __future__ import annotations

import asyncio
import functools
from pathlib import Path

import pytest
import zmq
import zmq.asyncio

from mesh import AsyncNode, Message, Pull, SpoolFullError
from mesh import _wire as wire
from mesh._spool import SpoolStore
from tests.helpers import aeventually, file_bytes

from ._proc import Cli
from .conftest import FAST_ENV, MakeNode


async def test_reliable_push_waits_for_no_worker_and_is_delivered_later(make_node: MakeNode, tmp_path: Path) -> None:
    """Guarantee 2: the worker is not there yet; it gets the message when it comes."""
    pusher = await make_node("pusher", data_dir=str(tmp_path / "p"))
    for i in range(20):
        await pusher.push("jobs", f"m{i}", reliable=True)
    worker = await make_node("worker")
    work = await worker.pull("jobs")
    got = [await work.next(timeout=10) for _ in range(20)]
    assert [m.text for m in got] == [f"m{i}" for i in range(20)]
    assert all(m.reliable for m in got)
    await aeventually(lambda: pusher.stats["acked"] == 19, timeout=5)  # the last is in hand
    got[-1].ack()
    await aeventually(lambda: pusher.stats["acked"] == 20, timeout=5)


async def test_a_node_that_starts_pulling_gets_its_own_spooled_and_waiting_pushes(
        make_node: MakeNode, tmp_path: Path) -> None:
    """Its own pull is a worker like any other: a backlog spooled before it opened (an
    agent's queue webhook after a restart) and a push waiting for a worker both go to it
    at once (they used to wait for some other worker, forever)."""
    node = await make_node("solo", data_dir=str(tmp_path / "p"))
    for i in range(3):
        await node.push("jobs", f"m{i}", reliable=True)
    waiting = asyncio.ensure_future(node.push("jobs", "late", timeout=5))
    await aeventually(lambda: node._live().work._waiters.get("jobs"),
                      message="the push is waiting for a worker")
    work = await node.pull("jobs")
    async with asyncio.timeout(3):
        got = [(await work.next()).text for _ in range(4)]
        await waiting
    assert sorted(got) == ["late", "m0", "m1", "m2"]


async def test_spooled_pushes_survive_a_pusher_restart(make_node: MakeNode, tmp_path: Path) -> None:
    """Guarantee 2, sender side: pushed, pusher restarted, then the worker appears."""
    first = await make_node("pusher", data_dir=str(tmp_path / "p"))
    for i in range(50):
        await first.push("jobs", f"m{i}", reliable=True)
    await first.aclose()
    await make_node("pusher", data_dir=str(tmp_path / "p"))  # same id, same spool
    worker = await make_node("worker")
    got: list[str] = []
    await worker.pull("jobs", handler=lambda m: got.append(m.text))
    await aeventually(lambda: len(got) >= 50, timeout=10)
    assert sorted(got) == sorted(f"m{i}" for i in range(50))


async def test_a_full_dead_letter_spool_keeps_the_message_and_takes_it_once_there_is_room(
        make_node: MakeNode, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """With the dead-letter spool full, a message that failed its last attempt stayed in
    the outbox for good (never tried again, not even once dead letters were purged, so
    waiting for the spool never ended) and each such message logged a traceback. It
    moves there once there is room now, and the episode is one log line."""
    pusher = await make_node("pusher", data_dir=str(tmp_path / "p"), max_attempts=1,
                             retry_backoff=0.01, spool_quota=3000)  # (5 dead letters)
    worker = await make_node("worker")

    def fail(msg: Message) -> None:
        raise RuntimeError("cannot process")

    await worker.pull("jobs", handler=fail)
    for done in range(1, 8):  # (one at a time: the outbox has the same quota)
        await pusher.push("jobs", b"x" * 500, reliable=True)
        await aeventually(functools.partial(lambda n: pusher.stats["redelivered"] == n, done),
                          timeout=5)
    await aeventually(lambda: pusher.stats["dead_lettered"] == 5, timeout=5)
    assert pusher.spool_pending == 2
    assert pusher.purge_dead_letters() == 5
    await pusher.wait_for_spool(timeout=2)
    assert len(pusher.dead_letters()) == 2
    failing = [r for r in caplog.records if "cannot move message" in r.getMessage()]
    assert len(failing) == 1, failing
    assert failing[0].exc_info is None  # (no traceback: a full spool is no bug)


async def test_nacked_messages_come_back_then_go_to_the_dead_letter_spool(make_node: MakeNode, tmp_path: Path) -> None:
    """Guarantee 5: a message that keeps failing is dead-lettered after max_attempts."""
    pusher = await make_node("pusher", data_dir=str(tmp_path / "p"), max_attempts=3,
                             retry_backoff=0.01)
    worker = await make_node("worker")
    attempts: list[str] = []

    def fail(msg: Message) -> None:
        attempts.append(msg.text)
        raise RuntimeError("cannot process")

    await worker.pull("jobs", handler=fail)
    await pusher.push("jobs", "poison", reliable=True)
    await aeventually(lambda: pusher.stats["dead_lettered"] == 1, timeout=10)
    assert attempts == ["poison"] * 3
    await pusher.aclose()
    dead = SpoolStore(tmp_path / "p" / "spool" / "dead")
    await dead.start()
    try:
        (record,) = [wire.decode_spooled(p) for _, p in dead.pending()]
        assert (record.name, record.item.payload, record.attempts) == ("jobs", b"poison", 3)
        assert "nack" in record.reason
    finally:
        await dead.aclose()


async def test_explicit_nack_redelivers_and_ack_settles(make_node: MakeNode, tmp_path: Path) -> None:
    """msg.nack() brings a reliable message back; msg.ack() settles it in the spool."""
    pusher = await make_node("pusher", data_dir=str(tmp_path / "p"), retry_backoff=0.01)
    worker = await make_node("worker")
    work = await worker.pull("jobs")
    await pusher.push("jobs", "again", reliable=True)
    first = await work.next(timeout=5)
    assert first.reliable
    first.nack()
    second = await work.next(timeout=5)
    assert (second.text, second.seq) == ("again", first.seq)
    second.ack()
    await aeventually(lambda: pusher.stats["acked"] == 1, timeout=5)


async def test_worker_sigkilled_before_ack_gets_its_messages_redelivered(make_node: MakeNode, mesh_name: str,
                                                                         tmp_path: Path) -> None:
    """Guarantee 3: what a killed worker had not acknowledged goes to another worker."""
    pusher = await make_node("pusher", data_dir=str(tmp_path / "p"))
    victim = Cli(["pull", "jobs", "--prefetch", "50", "--name", "victim"], mesh=mesh_name,
                 env=FAST_ENV)
    try:
        await pusher.wait_for_workers("jobs", 1, timeout=10)
        for i in range(100):
            await pusher.push("jobs", f"m{i}", reliable=True)
        await asyncio.to_thread(victim.line, "", 10)
        victim.proc.kill()
        await asyncio.to_thread(victim.wait, 10)
    finally:
        victim.close()
    printed = set(victim.all_lines())
    survivor = await make_node("survivor")
    got: list[str] = []
    await survivor.pull("jobs", handler=lambda m: got.append(m.text))
    everything = {f"m{i}" for i in range(100)}
    await aeventually(lambda: printed | set(got) == everything, timeout=15)
    assert pusher.stats["lost_in_flight"] == 0


def _has_duplicates(node: AsyncNode, count: int) -> bool:
    return node.stats["duplicates"] >= count


async def test_duplicates_are_dropped_by_sender_and_sequence_across_restarts(
        make_node: MakeNode, mesh_name: str, tmp_path: Path) -> None:
    """Guarantee 4: the same (sender, seq) twice reaches the application once, even after a restart."""
    ctx = zmq.asyncio.Context()
    try:
        for round_ in range(2):
            worker = await make_node("worker", data_dir=str(tmp_path / "w"))
            work = await worker.pull("jobs")
            push = ctx.socket(zmq.PUSH)
            push.linger = 0
            push.connect(worker._live().work.endpoints[0])
            item = wire.Item(7, 1.0, None, b"once", True)
            for epoch in (1, 2):  # two streams: as if redelivered after a lost ack
                batch = wire.Batch("f" * 32, "fake", 0, [item], epoch)
                await push.send(wire.encode_data(b"jobs\x00", batch))
            if round_ == 0:
                assert (await work.next(timeout=5)).data == b"once"
            with pytest.raises(TimeoutError):
                await work.next(timeout=0.3)
            expected = 1 if round_ == 0 else 2
            await aeventually(functools.partial(_has_duplicates, worker, expected), timeout=5)
            push.close()
            await worker.aclose()
    finally:
        ctx.destroy(linger=0)


_QUOTA = 256 * 1024
_BOUND = _QUOTA + _QUOTA // 4 + 16 * 1024
"""The outbox files of a node with spool_quota `_QUOTA`: the quota, two segments (an
eighth of it each) and what one commit writes."""


async def _outbox_bytes(data_dir: Path) -> int:
    return await file_bytes(data_dir / "spool" / "out", "*.seg")


@pytest.mark.timeout(60)
async def test_a_small_spool_quota_carries_many_times_its_size_when_workers_keep_up(
        make_node: MakeNode, tmp_path: Path) -> None:
    """The quota counts undelivered messages: reliable pushes totalling ten times it,
    delivered as they go, never meet SpoolFullError; the outbox files stay near the
    quota, and the figures say so, also after a restart."""
    data = tmp_path / "p"
    pusher = await make_node("pusher", data_dir=str(data), spool_quota=_QUOTA)
    worker = await make_node("worker")
    got: list[bytes] = []
    await worker.pull("jobs", handler=lambda m: got.append(m.data))
    await pusher.wait_for_workers("jobs", timeout=5)
    biggest = 0
    for i in range(1300):  # 1300 x 2 KB: ten quotas
        await pusher.push("jobs", b"%06d" % i * 333, reliable=True)
        if i % 50 == 49:
            await pusher.wait_for_spool(timeout=10)
            biggest = max(biggest, await _outbox_bytes(data))
    await aeventually(lambda: len(got) == 1300, timeout=10)
    assert got == [b"%06d" % i * 333 for i in range(1300)]
    assert biggest <= _BOUND
    figures = pusher.spool_figures()
    assert (figures["messages"], figures["bytes"], figures["quota_pct"]) == (0, 0, 0.0)
    assert figures["quota_bytes"] == _QUOTA
    assert 0 < figures["disk_bytes"] <= _BOUND
    await pusher.aclose()
    again = await make_node("pusher", data_dir=str(data), spool_quota=_QUOTA)
    figures = again.spool_figures()
    assert (figures["messages"], figures["bytes"], figures["quota_pct"]) == (0, 0, 0.0)
    assert figures["disk_bytes"] == await _outbox_bytes(data) <= _BOUND
    await again.push("jobs", b"after", reliable=True)
    await aeventually(lambda: got[-1] == b"after", timeout=10)


async def test_spool_quota_is_a_clear_error_to_the_sender(make_node: MakeNode, tmp_path: Path) -> None:
    """Guarantee 7: past the quota, SpoolFullError; what was accepted is still delivered."""
    pusher = await make_node("pusher", data_dir=str(tmp_path / "p"), spool_quota=20_000)
    accepted = 0

    async def push_until_refused() -> None:
        nonlocal accepted
        for i in range(10_000):
            await pusher.push("jobs", f"{i:06d}" * 20, reliable=True)
            accepted += 1

    with pytest.raises(SpoolFullError):
        await push_until_refused()
    worker = await make_node("worker")
    got: list[bytes] = []
    await worker.pull("jobs", handler=lambda m: got.append(m.data))
    await aeventually(lambda: len(got) == accepted, timeout=10)
    assert got == [f"{i:06d}".encode() * 20 for i in range(accepted)]


async def _copies_behind(make_node: MakeNode, tmp_path: Path
                         ) -> tuple[AsyncNode, AsyncNode, Pull[bytes]]:
    """A pusher (ack timeout 0.3 s) and its only worker, which took m0 of m0-m2 and holds
    it past the ack timeout: the copies sent again came back to it as duplicates."""
    pusher = await make_node("pusher", data_dir=str(tmp_path / "p"), ack_timeout=0.3,
                             retry_backoff=0.01)
    stuck = await make_node("stuck")
    work = await stuck.pull("jobs", prefetch=4)
    for i in range(3):
        await pusher.push("jobs", f"m{i}", reliable=True)
    return pusher, stuck, work


async def test_copies_sent_after_an_ack_timeout_wait_for_the_originals_in_hand(
        make_node: MakeNode, tmp_path: Path) -> None:
    """Guarantee 3 after an ack timeout: the copies that come back to the same worker (its
    only one) must not settle the messages it holds unprocessed. When it leaves, those go
    to another worker."""
    pusher, stuck, work = await _copies_behind(make_node, tmp_path)
    assert (await work.next(timeout=5)).text == "m0"  # in hand; m1, m2 wait behind it
    await aeventually(functools.partial(_has_duplicates, stuck, 3), timeout=5)
    assert pusher.spool_pending == 3  # nothing was processed yet
    survivor = await make_node("survivor")
    got: list[str] = []
    await survivor.pull("jobs", handler=lambda m: got.append(m.text))
    await stuck.aclose()  # m0 counts as processed; m1 and m2 go back
    await aeventually(lambda: {"m1", "m2"} <= set(got) and pusher.spool_pending == 0,
                      timeout=5)


async def test_the_dead_letter_log_line_names_the_id_replay_takes(
        make_node: MakeNode, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The warning names the dead letter's id (what replay and purge take), not the
    outbox's: here the outbox's 2nd message is the 1st dead letter."""
    pusher = await make_node("pusher", data_dir=str(tmp_path / "p"), max_attempts=1)
    worker = await make_node("worker")
    work = await worker.pull("jobs")
    await pusher.push("jobs", "fine", reliable=True)
    (await work.next(timeout=5)).ack()
    await pusher.push("jobs", "poison", reliable=True)
    with caplog.at_level("WARNING", logger="mesh.spool"):
        (await work.next(timeout=5)).nack()
        await aeventually(lambda: pusher.stats["dead_lettered"] == 1, timeout=5)
    (dead,) = pusher.dead_letters()
    (line,) = [r.getMessage() for r in caplog.records if "dead-lettered" in r.getMessage()]
    assert line.endswith(f"(dead letter {dead['id']})"), line
    assert dead["id"] != 2


async def test_a_copy_on_hold_stops_the_credit_before_later_messages(
        make_node: MakeNode, tmp_path: Path) -> None:
    """After an ack timeout, the copy of a message still in hand holds its stream's credit:
    a later message consumed meanwhile must not settle it (credits settle oldest first)."""
    pusher, stuck, work = await _copies_behind(make_node, tmp_path)
    first, _ = await work.take(timeout=5)  # m0 stays in hand, unsettled
    assert first.text == "m0"
    await aeventually(functools.partial(_has_duplicates, stuck, 3), timeout=5)
    await pusher.push("jobs", "m3", reliable=True)  # behind the copies, on the same stream
    texts = [(await work.next(timeout=5)).text for _ in range(3)]
    assert texts == ["m1", "m2", "m3"]
    with pytest.raises(TimeoutError):  # (settles m3)
        await work.next(timeout=0.2)
    survivor = await make_node("survivor")
    got: list[str] = []
    await survivor.pull("jobs", handler=lambda m: got.append(m.text))
    await stuck.aclose()  # m0 was never processed: it must come back
    await aeventually(lambda: "m0" in got and pusher.spool_pending == 0, timeout=5)
