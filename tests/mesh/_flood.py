"""A subscriber joining while a topic is published at full speed (retained values and
history both promise no gap and no duplicate across that join)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tests.helpers import aeventually

from .conftest import MakeNode

LOSSLESS: dict[str, Any] = {"mdns": False, "pub_hwm": 0, "sub_hwm": 0}
LIVE: int = 2000
"""Messages the subscriber must get from after its join while the flood goes on."""
ROUND: int = 50
"""Messages the flood publishes between two yields to the loop: when the subscriber joins,
up to one round may still be in the publisher's batch, to leave once it knows of the
subscription (so the subscriber may get them live)."""


async def join_during_flood(make_node: MakeNode, *, retain: bool, publisher: dict[str, Any],
                            subscribe: dict[str, Any]) -> tuple[int, list[int]]:
    """A publisher sends ``flood.x`` 1, 2, 3... as fast as it can; after 2,000 a node joins
    and subscribes with `subscribe`; the flood goes on until the subscriber has had at
    least `LIVE` messages, `LIVE` past the join. Returns what was sent when it joined and
    every counter it received, through the last one sent and nothing after it."""
    pub = await make_node("pub", **LOSSLESS, **publisher)
    stop = asyncio.Event()
    sent = 0

    async def flood() -> None:
        nonlocal sent
        while not stop.is_set():
            for _ in range(ROUND):
                sent += 1
                await pub.publish("flood.x", str(sent), retain=retain)
            await asyncio.sleep(0)  # let the node's own readers and timers run

    flooding = asyncio.create_task(flood())
    try:
        await aeventually(lambda: sent > 2000, timeout=10)
        sub_node = await make_node("sub", **LOSSLESS, peers=pub.endpoints["ctl"])
        await sub_node.wait_for_peers(1, timeout=5)
        joined = sent
        sub = await sub_node.subscribe("flood.*", max_pending=0, **subscribe)
        got = [int((await sub.next(timeout=10)).data)]
        while len(got) < LIVE or got[-1] < joined + LIVE:  # the flood goes on meanwhile
            got.append(int((await sub.next(timeout=10)).data))
    finally:
        stop.set()
        await flooding
    while got[-1] < sent:
        got.append(int((await sub.next(timeout=10)).data))
    with pytest.raises(TimeoutError):  # nothing after the last one sent: no late duplicate
        await sub.next(timeout=0.3)
    return joined, got
