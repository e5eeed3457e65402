"""The control channel: outboxes to a ROUTER inbox that hands batches to a callback."""

from __future__ import annotations

import asyncio

from patterns import Context, ControlDealer, ControlRouter
from tests.helpers import aeventually


async def test_inbox_hands_every_message_to_its_callback_until_stopped() -> None:
    """Messages from several outboxes arrive in order per sender, without the routing id;
    after `stop` the callback gets nothing more."""
    ctx = Context()
    inbox = ControlRouter(ctx)
    outboxes: list[ControlDealer] = []
    try:
        endpoint = inbox.bind("127.0.0.1")
        got: list[bytes] = []

        def on_messages(batch: list[list[bytes]]) -> None:
            for frames in batch:
                assert len(frames) == 1, frames
                got.append(frames[0])

        inbox.start(on_messages)
        outboxes = [ControlDealer(ctx, endpoint) for _ in range(3)]
        for i in range(50):  # under the outbox high-water mark, connected or not
            for n, outbox in enumerate(outboxes):
                assert outbox.send(f"{n}:{i}".encode())
        await aeventually(lambda: len(got) == 150)
        for n in range(3):
            assert [m for m in got if m.startswith(f"{n}:".encode())] == [
                f"{n}:{i}".encode() for i in range(50)]

        inbox.stop()
        outboxes[0].send(b"after stop")
        await asyncio.sleep(0.2)  # the window in which a delivery would have happened
        assert len(got) == 150
    finally:
        for outbox in outboxes:
            outbox.close()
        inbox.close()
        await asyncio.to_thread(ctx.close)
