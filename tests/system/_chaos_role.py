"""One process of the chaos test: a reliable publisher, a durable subscriber or a worker.

Run as ``python _chaos_role.py ROLE NAME MESH DATA_DIR OUT_FILE [COUNT]``. Publishers
resume from their progress file after a restart; receivers append every message
they get to OUT_FILE before acknowledging it, so a kill can only cause duplicates.
"""

from __future__ import annotations

import asyncio
import os
import sys
from typing import Any, TextIO

from mesh import AsyncNode

SETTINGS: dict[str, Any] = {"interfaces": ["127.0.0.1"], "max_attempts": 10_000,
                            "retry_backoff": 0.05, "ack_timeout": 5.0}


def next_to_publish(progress: str) -> int:
    """The first index not yet recorded in the progress file of an earlier run."""
    if not os.path.exists(progress):
        return 0
    with open(progress) as fh:
        done = fh.read().split()
    return int(done[-1]) + 1 if done else 0


async def publisher(name: str, mesh: str, data_dir: str, progress: TextIO, start: int,
                    count: int) -> None:
    async with AsyncNode(name=name, mesh=mesh, data_dir=data_dir, **SETTINGS) as node:
        await node.wait_for_durables(f"chaos.{name}", 1, timeout=10)
        print("ready", flush=True)
        for i in range(start, count):
            await node.publish(f"chaos.{name}", f"{name}-{i}", reliable=True)
            await node.push("chaos.jobs", f"{name}-{i}", reliable=True)
            progress.write(f"{i}\n")
            progress.flush()
        print("published", flush=True)
        await asyncio.Event().wait()  # keep delivering until the driver stops us


async def receiver(role: str, name: str, mesh: str, data_dir: str, out: TextIO) -> None:
    async with AsyncNode(name=name, mesh=mesh, data_dir=data_dir, **SETTINGS) as node:
        if role == "durable":
            messages = await node.subscribe_durable("chaos.>", "chaos", prefetch=64)
        else:
            messages = await node.pull("chaos.jobs", prefetch=64)
        print("ready", flush=True)
        async for msg in messages:
            if not msg.reliable:
                continue
            out.write(msg.text + "\n")
            out.flush()
            msg.ack()


def main() -> None:
    """Run one role; its file is read and opened before the event loop starts."""
    role, name, mesh, data_dir, out_file = sys.argv[1:6]
    if role == "publisher":
        start = next_to_publish(out_file)
        with open(out_file, "a") as progress:
            asyncio.run(publisher(name, mesh, data_dir, progress, start, int(sys.argv[6])))
    else:
        with open(out_file, "a") as out:
            asyncio.run(receiver(role, name, mesh, data_dir, out))


if __name__ == "__main__":
    main()
