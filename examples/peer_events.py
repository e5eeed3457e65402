"""Watch peers come and go with `node.events()`.

A "watcher" node opens an event stream, then a "visitor" node joins it and
later leaves gracefully (its goodbye makes the watcher report *left* at once,
without waiting for heartbeats to time out; a peer that goes silent instead
is reported *lost* after ``lost_after`` seconds). Between the two events the
watcher lists its peers.

Loopback only, static peering, a random mesh name per run.

Run: ``python examples/peer_events.py``
"""

from __future__ import annotations

import asyncio
import uuid

from mesh import AsyncNode

LOOPBACK = ["127.0.0.1"]


async def main() -> None:
    mesh = f"example-{uuid.uuid4().hex[:12]}"
    async with AsyncNode(name="watcher", mesh=mesh, interfaces=LOOPBACK, mdns=False) as watcher:
        events = watcher.events()

        visitor = AsyncNode(name="visitor", mesh=mesh, interfaces=LOOPBACK, mdns=False,
                            peers=watcher.endpoints["ctl"])
        await visitor.start()
        event = await events.next(timeout=5)
        print(f"{event.kind.value}: {event.peer.name} ({event.peer.id[:8]})")
        print("peers now:", ", ".join(f"{p.name} [{p.state.value}]" for p in watcher.peers()))

        await visitor.aclose()
        event = await events.next(timeout=5)
        print(f"{event.kind.value}: {event.peer.name} ({event.peer.id[:8]})")
        print("peers now:", ", ".join(p.name for p in watcher.peers()) or "none")
        await events.aclose()


if __name__ == "__main__":
    asyncio.run(main())
