"""Request/reply with failover: two servers of one service, one stops, requests keep succeeding.

Two nodes serve ``math.square``; a client node sends requests with
``await client.request(...)``, which picks a live server (least outstanding,
then round robin), four at a time. Halfway through, server "a" stops (it
leaves the mesh gracefully) while requests are in flight on it; they fail over
to "b" at once, and later ones go to "b" only. Every request gets its answer.
A server that crashes instead is noticed as soon as its connection drops, with
the same result (see tests/mesh/test_services.py).

Everything stays on 127.0.0.1 with static peering; the mesh name is random.

Run: ``python examples/service_failover.py``
"""

from __future__ import annotations

import asyncio
import collections
import uuid

from mesh import AsyncNode, Message

LOOPBACK = ["127.0.0.1"]
REQUESTS = 200
STREAMS = 4


def square(msg: Message) -> str:
    """A plain function runs inline on the loop: fine for quick, non-blocking work."""
    return str(int(msg.text) ** 2)


async def main() -> None:
    mesh = f"example-{uuid.uuid4().hex[:12]}"
    async with AsyncNode(name="client", mesh=mesh, interfaces=LOOPBACK, mdns=False) as client:
        servers = [AsyncNode(name=name, mesh=mesh, interfaces=LOOPBACK, mdns=False,
                             peers=client.endpoints["ctl"]) for name in ("a", "b")]
        for server in servers:
            await server.start()
            await server.serve("math.square", square)
        await client.wait_for_peers(2, timeout=5)
        await client.wait_for_service("math.square", timeout=5)

        answered_by: collections.Counter[str] = collections.Counter()
        half_done = asyncio.Event()

        async def stream(first: int) -> None:
            """Requests first, first + STREAMS, ...: STREAMS of them are in flight at once."""
            for i in range(first, REQUESTS, STREAMS):
                reply = await client.request("math.square", str(i), timeout=2.0, retries=2)
                assert int(reply.text) == i * i
                answered_by[reply.source] += 1
                if sum(answered_by.values()) == REQUESTS // 2:
                    half_done.set()
                if i % 50 == 0:
                    print(f"{i}^2 = {reply.text} (from {reply.source})")

        streams = [asyncio.create_task(stream(k)) for k in range(STREAMS)]
        await half_done.wait()
        before = ", ".join(f"{k}={v}" for k, v in sorted(answered_by.items()))
        await servers[0].aclose()  # requests are in flight on it right now
        print(f"server a stopped (answered so far: {before})")
        await asyncio.gather(*streams)
        await servers[1].aclose()
        print(f"{REQUESTS} requests, {sum(answered_by.values())} replies: "
              + ", ".join(f"{k}={v}" for k, v in sorted(answered_by.items())))


if __name__ == "__main__":
    asyncio.run(main())
