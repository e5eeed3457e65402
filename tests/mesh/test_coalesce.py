"""Coalescing sends per destination (`mesh._services._coalesce`), on a real event loop."""

from __future__ import annotations

import asyncio

import pytest

from mesh._services._coalesce import Coalescer

pytestmark = pytest.mark.timeout(10)


async def test_the_first_item_leaves_at_once_the_rest_of_the_iteration_together() -> None:
    """Per destination: one send for the first item, one for the others, at iteration end."""
    sent: list[tuple[str, list[int]]] = []
    coalescer: Coalescer[str, int] = Coalescer(lambda key, items: sent.append((key, items)))
    coalescer.add("a", 1)
    assert sent == [("a", [1])]  # no waiting for a lone message
    for i in range(2, 6):
        coalescer.add("a", i)
    coalescer.add("b", 10)
    coalescer.add("b", 11)
    assert sent == [("a", [1]), ("b", [10])]
    await asyncio.sleep(0)  # the end of the iteration
    assert sent == [("a", [1]), ("b", [10]), ("a", [2, 3, 4, 5]), ("b", [11])]
    coalescer.add("a", 6)  # a new iteration: first at once again
    assert sent[-1] == ("a", [6])


async def test_a_held_burst_leaves_as_one_send_per_destination_on_flush() -> None:
    """`hold` keeps even the first item; `flush` sends each destination's items once, in
    order, and ends the hold."""
    sent: list[tuple[str, list[int]]] = []
    coalescer: Coalescer[str, int] = Coalescer(lambda key, items: sent.append((key, items)))
    coalescer.hold()
    for i in range(3):
        coalescer.add("x", i)
        coalescer.add("y", -i)
    assert sent == []
    coalescer.flush()
    assert sent == [("x", [0, 1, 2]), ("y", [0, -1, -2])]
    coalescer.add("x", 9)
    assert sent[-1] == ("x", [9])
