"""Hostile bytes against running nodes on 127.0.0.1: a stranger that can reach a node's ports
must not be able to crash it, end one of its reader tasks, or stop it from delivering."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
import zmq

from mesh import AsyncNode

pytestmark = pytest.mark.timeout(60)


async def _until(check: Callable[[], bool], timeout: float, what: str) -> None:
    async with asyncio.timeout(timeout):
        while not check():
            await asyncio.sleep(0.01)
    assert check(), what


async def test_huge_readiness_marker_is_dropped_and_markers_keep_working(
        make_node: Callable[..., Any]) -> None:
    """Regression: a SUB subscribing ``\\xff<id>:<5000 digits>`` made ``int()`` raise in the
    XPUB marker reader; the task ended (no more readiness, so publishers with
    ``--wait-subscribers`` waited forever) and the node's close re-raised the ValueError."""
    pub: AsyncNode = await make_node("pub", mdns=False)
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    try:
        sub.setsockopt(zmq.LINGER, 0)
        sub.connect(pub.endpoints["pub"][0])
        for marker in (b"\xff" + b"a" * 32 + b":" + b"1" * 5000, b"\xff" + b"x" * 70000 + b":1",
                       b"\xff:", b"\xffid:\xff\xfe", b"\xff" + "ab:²".encode()):
            sub.setsockopt(zmq.SUBSCRIBE, marker)
        await _until(lambda: pub.dropped_input.get("marker", 0) >= 5, 5, "markers not dropped")
        # an honest subscriber's readiness still reaches the publisher
        other: AsyncNode = await make_node("sub", peers=pub.endpoints["ctl"], mdns=False)
        got: list[bytes] = []
        await other.subscribe("fz.>", callback=lambda m: got.append(m.data))
        await pub.wait_for_subscribers("fz.ok", 1, timeout=10)
        await pub.publish("fz.ok", b"still delivering")
        await _until(lambda: got == [b"still delivering"], 10, "no delivery after bad markers")
    finally:
        sub.close()
        ctx.term()
    await pub.aclose()  # used to re-raise the marker reader's ValueError
