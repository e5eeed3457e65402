"""One node of the IPv6 LAN tests, run inside a host namespace; JSON lines on stdout.

python -m tests.system._ipv6_role hub  MESH NAME IFACES PEERS   # subscribes, pulls, serves
python -m tests.system._ipv6_role edge MESH NAME IFACES PEERS   # publishes, pushes, requests

IFACES is comma-separated (IPv4 and/or IPv6); PEERS is how many peers to wait for.
Both print ``ready`` with their endpoints, then what they did or got; both stay in
the mesh until stdin ends (so nothing they sent races their goodbye), then print
their peers and exit 0.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

from mesh import AsyncNode, Message

_WAIT: float = 30.0
JOBS: int = 5


def out(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


def peers(node: AsyncNode) -> list[dict[str, Any]]:
    return [{"name": p.name, "endpoints": list(p.endpoints)} for p in node.peers()]


async def hub(node: AsyncNode, want: int) -> None:
    sub = await node.subscribe("six.>")

    async def job(msg: Message) -> None:
        out(event="job", data=msg.data.decode(), source=msg.source)

    await node.pull("jobs", handler=job)
    await node.serve("svc.up", lambda m: m.data.upper())
    out(event="ready", endpoints=node.endpoints)
    await node.wait_for_peers(want, timeout=_WAIT)
    out(event="peers", peers=peers(node))

    async def messages() -> None:
        async for msg in sub:
            out(event="msg", topic=msg.topic, data=msg.data.decode())

    async with asyncio.TaskGroup() as tasks:
        reader = tasks.create_task(messages())
        await asyncio.to_thread(sys.stdin.read)
        reader.cancel()


async def edge(node: AsyncNode, want: int) -> None:
    out(event="ready", endpoints=node.endpoints)
    await node.wait_for_peers(want, timeout=_WAIT)
    out(event="peers", peers=peers(node))
    topic = f"six.{node.name}"
    await node.wait_for_subscribers(topic, 1, timeout=_WAIT)
    await node.publish(topic, b"hello over IPv6")
    await node.wait_for_workers("jobs", 1, timeout=_WAIT)
    for i in range(JOBS):
        await node.push("jobs", f"{node.name}-{i}", timeout=_WAIT)
    await node.wait_for_service("svc.up", timeout=_WAIT)
    reply = await node.request("svc.up", node.name.encode(), timeout=_WAIT)
    out(event="reply", data=reply.data.decode())
    await asyncio.to_thread(sys.stdin.read)


async def main(role: str, mesh: str, name: str, interfaces: str, want: int) -> None:
    node = AsyncNode(name=name, mesh=mesh, interfaces=interfaces.split(","))
    async with node:
        await (hub if role == "hub" else edge)(node, want)
        out(event="end", peers=peers(node))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])))
