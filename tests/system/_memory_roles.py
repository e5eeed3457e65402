"""Roles for the retained-values flood test, each run inside one namespace host.

python -m tests.system._memory_roles flood IFACE MESH RATE
    Publishes ``flood.x`` with ``retain=True`` and an increasing counter, about RATE
    messages/s, until stdin closes; prints ``ready ctl=..`` first and ``sent N`` at the end.

python -m tests.system._memory_roles join IFACE MESH COUNT
    Joins (mDNS), subscribes to ``flood.*`` (retained values first), reads until it has
    COUNT messages from the publisher and prints one JSON line: the counters in order.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

from mesh import AsyncNode


async def flood(iface: str, mesh: str, rate: int) -> None:
    async with AsyncNode(name="flood", mesh=mesh, interfaces=[iface], pub_hwm=0,
                         sub_hwm=0) as node:
        print(f"ready ctl={node.endpoints['ctl'][0]}", flush=True)
        stdin_closed = asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
        sent, started = 0, time.monotonic()
        while not stdin_closed.done():
            due = int((time.monotonic() - started) * rate)
            while sent < due:
                sent += 1
                await node.publish("flood.x", str(sent), retain=True)
            await asyncio.sleep(0.001)
        print(f"sent {sent}", flush=True)


async def join(iface: str, mesh: str, count: int) -> None:
    async with AsyncNode(name="join", mesh=mesh, interfaces=[iface], pub_hwm=0,
                         sub_hwm=0) as node:
        await node.wait_for_peers(1, timeout=20)
        sub = await node.subscribe("flood.*", max_pending=0)
        got = [int((await sub.next(timeout=20)).data) for _ in range(count)]
        print(json.dumps(got), flush=True)


def main() -> None:
    role, iface, mesh, number = sys.argv[1:5]
    if role == "flood":
        asyncio.run(flood(iface, mesh, int(number)))
    else:
        asyncio.run(join(iface, mesh, int(number)))


if __name__ == "__main__":
    main()
