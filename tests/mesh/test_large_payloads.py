"""Large payloads (up to 2 MB) between small ones of the same batch: order and bytes must
come through unchanged, on pub/sub and on a work queue."""

from __future__ import annotations

import asyncio
import hashlib

import pytest

from .conftest import MakeNode

pytestmark = pytest.mark.timeout(60)

SIZES = [10, 70_000, 5, 1_000_000, 65_536, 65_535, 300_000, 1, 2_000_000, 64]


def _payload(i: int, size: int) -> bytes:
    seed = hashlib.sha256(b"%d" % i).digest()
    return (seed * (size // len(seed) + 1))[:size]


async def test_pubsub_mixes_large_and_small_payloads_in_order(make_node: MakeNode) -> None:
    """Ten rounds of small and large (up to 2 MB) messages published back to back in one
    loop iteration: the subscriber gets all 100, in order, byte for byte, headers kept."""
    sub_node = await make_node("sub", max_message_size=4_000_000)
    pub = await make_node("pub", max_message_size=4_000_000)
    sub = await sub_node.subscribe("blobs.>", max_pending=0)
    await pub.wait_for_subscribers("blobs.x", 1, timeout=5)
    sent = [(f"{r}-{i}", _payload(r * 100 + i, size))
            for r in range(10) for i, size in enumerate(SIZES)]
    for tag, data in sent:
        pub.publish_nowait("blobs.x", data, headers={"tag": tag})
    await asyncio.sleep(0)
    got: list[tuple[str | None, bytes]] = []
    async with asyncio.timeout(30):
        while len(got) < len(sent):
            msg = await sub.next()
            got.append(((msg.headers or {}).get("tag"), msg.data))
    assert [t for t, _ in got] == [t for t, _ in sent]
    assert got == sent
    assert "data" not in sub_node.dropped_input, sub_node.dropped_input


async def test_push_pull_mixes_large_and_small_payloads_in_order(make_node: MakeNode) -> None:
    """The same through a work queue to one worker: all arrive once, in push order."""
    worker = await make_node("worker", max_message_size=4_000_000)
    pusher = await make_node("pusher", max_message_size=4_000_000)
    work = await worker.pull("blobs")
    await pusher.wait_for_workers("blobs", 1, timeout=5)
    sent = [_payload(r * 100 + i, size) for r in range(5) for i, size in enumerate(SIZES)]
    for data in sent:
        await pusher.push("blobs", data)
    got: list[bytes] = []
    async with asyncio.timeout(30):
        while len(got) < len(sent):
            got.append((await work.next()).data)
    assert got == sent
    assert "work" not in worker.dropped_input, worker.dropped_input
    assert pusher.stats["lost_in_flight"] == 0
