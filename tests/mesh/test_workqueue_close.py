"""Work queues: a worker node closing mid-stream hands back what it held, and takes none of it.

What waits in a closing worker's queue is delivered again to the other workers, so the
closing node's iterators and handlers must not start any of it: each message is
processed once, and the close settles nothing over sockets it has closed (the loop guard
in tests/conftest.py fails a test on any exception reaching the loop's handler).
"""

from __future__ import annotations

import asyncio
import collections
from pathlib import Path

import pytest

from mesh import AsyncNode, ClosedError, Message
from tests.helpers import aeventually

from .conftest import MakeNode

_TOTAL = 600
_CLOSE_AFTER = 50
"""The closing worker has taken this many when it closes: its queue still holds a window."""


async def _close_mid_stream(pusher: AsyncNode, closing: AsyncNode, took_enough: asyncio.Event,
                            close_began: asyncio.Event, *, reliable: bool) -> None:
    """Push `_TOTAL` messages to the two workers and close `closing` while they flow, once
    it has taken enough (`took_enough`); `close_began` is set just before its close."""
    await pusher.wait_for_workers("jobs", 2, timeout=5)

    async def produce() -> None:
        for i in range(_TOTAL):
            await pusher.push("jobs", b"%d" % i, reliable=reliable, timeout=10)

    producer = asyncio.create_task(produce())
    async with asyncio.timeout(10):
        await took_enough.wait()
    close_began.set()
    await closing.aclose()
    async with asyncio.timeout(10):
        await producer


@pytest.mark.timeout(30)
async def test_a_closing_worker_node_iterator_takes_nothing_more(make_node: MakeNode) -> None:
    """Iterator form, best effort: after a worker node closes mid-stream, its iterator ends
    and every message is processed exactly once, by one of the workers."""
    pusher = await make_node("pusher", mdns=False)
    ctl = pusher.endpoints["ctl"]
    stayer = await make_node("stayer", mdns=False, peers=ctl)
    closing = await make_node("closing", mdns=False, peers=ctl)
    seen: collections.Counter[bytes] = collections.Counter()
    await stayer.pull("jobs", handler=lambda m: seen.update([m.data]))
    pull = await closing.pull("jobs")
    took_enough, close_began = asyncio.Event(), asyncio.Event()
    after_close: list[bytes] = []
    taken = 0

    async def consume() -> None:
        nonlocal taken
        async for msg in pull:
            if close_began.is_set():
                after_close.append(msg.data)
            seen.update([msg.data])
            taken += 1
            if taken >= _CLOSE_AFTER:
                took_enough.set()
            await asyncio.sleep(0.002)  # a slow worker: its queue fills up to its window

    consumer = asyncio.create_task(consume())
    await _close_mid_stream(pusher, closing, took_enough, close_began, reliable=False)
    async with asyncio.timeout(5):
        await consumer  # the iterator ended with the node
    await aeventually(lambda: len(seen) >= _TOTAL, timeout=10,
                      message=f"all {_TOTAL} messages processed")
    assert after_close == []
    assert set(seen) == {b"%d" % i for i in range(_TOTAL)}
    assert [data for data, n in seen.items() if n > 1] == []
    assert pusher.stats["lost_in_flight"] == 0


@pytest.mark.timeout(30)
async def test_a_closing_worker_node_handler_starts_nothing_more(make_node: MakeNode,
                                                                 tmp_path: Path) -> None:
    """Handler form, reliable: the closing node's handler starts nothing once the close has
    begun, the message it was working on is finished and acknowledged once, and every
    message is processed exactly once."""
    pusher = await make_node("pusher", mdns=False, data_dir=str(tmp_path / "p"))
    ctl = pusher.endpoints["ctl"]
    stayer = await make_node("stayer", mdns=False, peers=ctl, data_dir=str(tmp_path / "s"))
    closing = await make_node("closing", mdns=False, peers=ctl, data_dir=str(tmp_path / "c"))
    done: collections.Counter[bytes] = collections.Counter()
    await stayer.pull("jobs", handler=lambda m: done.update([m.data]))
    took_enough, close_began = asyncio.Event(), asyncio.Event()
    started_after_close: list[bytes] = []
    starts = 0

    async def slow(msg: Message) -> None:
        nonlocal starts
        if close_began.is_set():
            started_after_close.append(msg.data)
        starts += 1
        if starts >= _CLOSE_AFTER:
            took_enough.set()
        await asyncio.sleep(0.002)  # the close comes while it works
        done.update([msg.data])

    await closing.pull("jobs", handler=slow)
    await _close_mid_stream(pusher, closing, took_enough, close_began, reliable=True)
    await aeventually(lambda: pusher.spool_pending == 0 and len(done) >= _TOTAL, timeout=10,
                      message=f"all {_TOTAL} reliable messages processed and acknowledged")
    assert started_after_close == []
    assert set(done) == {b"%d" % i for i in range(_TOTAL)}
    assert [data for data, n in done.items() if n > 1] == []


async def test_closing_a_pull_ends_a_next_waiting_on_it(make_node: MakeNode) -> None:
    """`next` raises ClosedError once its handle is closed, also when another task closes
    it while `next` waits: the waiter was not woken and waited out its whole timeout
    (forever without one), so an SSE durable stream held its agent's stop 4 s."""
    worker = await make_node("worker", mdns=False)
    pull = await worker.pull("jobs")
    waiting = asyncio.create_task(pull.next(timeout=30))
    await asyncio.sleep(0)  # (it waits for a message now)
    await pull.aclose()
    async with asyncio.timeout(1.0):
        with pytest.raises(ClosedError):
            await waiting
