"""Work runs: plain pushes travel as payloads with one timestamp and a contiguous sequence range.

What is in flight is kept per frame (`Flight`), so these check that credits settle
runs and item frames in order, that what is given back comes out oldest first
with its numbers, and that plain and other pushes keep their order end to end.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from mesh import _wire
from mesh._work._target import Flight, Target
from tests.helpers import aeventually

from .conftest import MakeNode


def _target() -> Target:
    """A stream to a remote worker (no socket: nothing here is sent)."""
    return Target("w" * 32, "jobs", 64, 1, None, False)


def _never(*args: object, **kwargs: object) -> None:
    raise AssertionError("nothing is requeued here")


def test_a_credit_settles_runs_and_items_in_order() -> None:
    """Consumed counts cross frame boundaries; what is left comes out oldest first."""
    target = _target()
    target.flights.append(Flight(None, [b"a", b"b", b"c"], 100, 1.0))
    target.flights.append(Flight([_wire.Item(7, 2.0, {"k": "v"}, b"d")]))
    target.flights.append(Flight(None, [b"e", b"f"], 200, 3.0))
    target.sent = target.flushed = 6
    target.consume(2, None, _never)
    assert [(i.seq, i.payload) for i in target.pending()] == [
        (102, b"c"), (7, b"d"), (200, b"e"), (201, b"f")]
    target.consume(2, None, _never)
    assert len(target.flights) == 1
    assert target.flights[0].done == 0
    assert [i.payload for i, _ in target.unconsumed()] == [b"f", b"e"]  # oldest last
    assert target.in_flight == 2


def test_unsent_payloads_count_as_in_flight_when_a_worker_is_lost() -> None:
    """A run still being filled is lost (counted) like one on the wire."""
    target = _target()
    target.flights.append(Flight(None, [b"a"], 5, 1.0))
    target.payloads.extend([b"b", b"c"])
    target.sent, target.flushed = 3, 1
    assert target.give_up("worker lost", None, _never) == 3


async def test_plain_and_other_pushes_keep_their_order(make_node: MakeNode) -> None:
    """Runs and item frames interleave without reordering; numbers are unique and rising."""
    pusher = await make_node("pusher")
    worker = await make_node("worker")
    got: list[tuple[bytes, dict[str, str] | None, int]] = []
    await worker.pull("jobs", handler=lambda m: got.append(
        (m.data, dict(m.headers) if m.headers else None, m.seq)))
    await pusher.wait_for_workers("jobs", 1, timeout=5)
    for i in range(2000):
        await pusher.push("jobs", str(i), headers={"n": str(i)} if i % 7 == 0 else None)
    await aeventually(lambda: len(got) == 2000, timeout=10, message="2000 processed")
    assert [d for d, _, _ in got] == [str(i).encode() for i in range(2000)]
    assert all((h == {"n": d.decode()}) == (int(d) % 7 == 0) for d, h, _ in got)
    seqs = [s for _, _, s in got]
    assert seqs == sorted(seqs)
    assert len(set(seqs)) == len(seqs)
    assert pusher.stats["pushed"] == 2000


async def test_a_reliable_push_after_plain_ones_is_numbered_after_them(
        make_node: MakeNode, tmp_path: Path) -> None:
    """A reliable push does not overtake the run still being filled, in order or number."""
    pusher = await make_node("pusher", data_dir=str(tmp_path / "p"))
    worker = await make_node("worker")
    got: list[tuple[bytes, int]] = []
    await worker.pull("jobs", handler=lambda m: got.append((m.data, m.seq)))
    await pusher.wait_for_workers("jobs", 1, timeout=5)
    for i in range(30):
        await pusher.push("jobs", str(i), reliable=i % 10 == 9)
    await aeventually(lambda: len(got) == 30, timeout=10, message="30 processed")
    assert [d for d, _ in got] == [str(i).encode() for i in range(30)]
    assert [s for _, s in got] == sorted(s for _, s in got)


async def test_a_worker_that_predates_runs_gets_items(make_node: MakeNode,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker whose hello does not say `runs` is sent every message as an item."""
    worker = await make_node("old-worker")
    work = worker._run.work if worker._run is not None else None
    assert work is not None
    fields = work.hello_fields
    monkeypatch.setattr(work, "hello_fields", lambda version: {
        k: v for k, v in fields(version).items() if k != "runs"})
    got: list[bytes] = []
    await worker.pull("jobs", handler=lambda m: got.append(m.data))
    pusher = await make_node("pusher")
    await pusher.wait_for_workers("jobs", 1, timeout=5)
    sent = pusher._run.work if pusher._run is not None else None
    assert sent is not None
    for i in range(100):
        await pusher.push("jobs", str(i))
    await aeventually(lambda: len(got) == 100, timeout=10, message="100 processed")
    assert got == [str(i).encode() for i in range(100)]
    assert all(not t.runs for t in sent._targets.values())


@pytest.mark.parametrize("headers", [None, {"k": "v"}], ids=["runs", "items"])
async def test_work_frames_stay_within_what_the_worker_accepts(
        make_node: MakeNode, headers: dict[str, str] | None) -> None:
    """With `max_message_size` 64 KiB on both sides, 800 KB pushed in one go leaves in
    frames the worker accepts (not 256 KiB ones it would drop), runs and items alike."""
    pusher = await make_node("pusher", max_message_size=64 * 1024)
    worker = await make_node("worker", max_message_size=64 * 1024)
    got: list[bytes] = []
    await worker.pull("jobs", handler=lambda m: got.append(m.data))
    await pusher.wait_for_workers("jobs", 1, timeout=5)
    big = b"x" * 20_000
    for i in range(40):
        await pusher.push("jobs", big + str(i).encode(), headers=headers)
    await aeventually(lambda: len(got) == 40, timeout=10, message="40 processed")
    assert got == [big + str(i).encode() for i in range(40)]
