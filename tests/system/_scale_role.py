"""One node of the scale test: ``python _scale_role.py NAME MESH``.

Prints ``ready``, then one line per event, flushed at once: ``joined NAME``,
``lost NAME``, ``left NAME``, ``got DATA`` for each message on ``scale.>``. The
interface comes from ``ZEROMESH_INTERFACES`` (the host's namespace address).
"""

from __future__ import annotations

import asyncio
import sys

from mesh import AsyncNode


async def main(name: str, mesh: str) -> None:
    async with AsyncNode(name=name, mesh=mesh) as node:
        events = node.events()
        sub = await node.subscribe("scale.>")
        print("ready", flush=True)

        async def report_events() -> None:
            async for event in events:
                print(f"{event.kind.value} {event.peer.name}", flush=True)

        reporter = asyncio.create_task(report_events())
        async for msg in sub:
            print(f"got {msg.text}", flush=True)
        reporter.cancel()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
