"""One timer for many request deadlines (`mesh._services._deadlines`), on a real event loop."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import pytest

from mesh._services._deadlines import Deadlines

pytestmark = pytest.mark.timeout(10)


async def test_each_future_fails_at_its_own_deadline_and_discarded_ones_never() -> None:
    """Deadlines added out of order fire in order; a discarded one is left alone."""
    loop = asyncio.get_running_loop()
    deadlines = Deadlines()
    start = loop.time()
    futs: dict[int, asyncio.Future[None]] = {key: loop.create_future() for key in range(4)}
    failed_at: dict[int, float] = {}

    def note_failure(key: int) -> Callable[[asyncio.Future[None]], None]:
        def note(_: asyncio.Future[None]) -> None:
            failed_at.setdefault(key, loop.time() - start)
        return note

    for key, fut in futs.items():
        fut.add_done_callback(note_failure(key))
    deadlines.add(0, futs[0], start + 0.30)
    deadlines.add(1, futs[1], start + 0.10)  # earlier than the armed one: re-arms
    deadlines.add(2, futs[2], start + 0.20)
    deadlines.add(3, futs[3], start + 0.15)
    deadlines.discard(3)
    async with asyncio.timeout(5):
        await asyncio.wait([futs[0], futs[1], futs[2]])
    assert sorted(failed_at, key=failed_at.__getitem__) == [1, 2, 0]
    for key, due in ((1, 0.10), (2, 0.20), (0, 0.30)):
        assert isinstance(futs[key].exception(), TimeoutError)
        assert due - 0.002 <= failed_at[key] < due + 0.5, (key, failed_at[key])
    assert not futs[3].done()
    deadlines.close()


async def test_an_answered_future_is_not_touched_and_close_stops_the_timer() -> None:
    """A future already resolved keeps its result when its deadline passes; after close,
    a later deadline passes without failing its future."""
    loop = asyncio.get_running_loop()
    deadlines = Deadlines()
    done, later, probe = loop.create_future(), loop.create_future(), loop.create_future()
    start = loop.time()
    deadlines.add(1, done, start + 0.05)
    deadlines.add(2, probe, start + 0.06)  # fails just after 1's deadline has been handled
    done.set_result("reply")
    async with asyncio.timeout(5):
        with contextlib.suppress(TimeoutError):
            await probe
    assert isinstance(probe.exception(), TimeoutError)
    assert done.result() == "reply"
    due = loop.time() + 0.05
    deadlines.add(3, later, due)
    deadlines.close()
    passed = loop.create_future()
    loop.call_at(due + 0.05, passed.set_result, None)  # the loop's own timer, past 3's deadline
    async with asyncio.timeout(5):
        await passed
    assert not later.done()
