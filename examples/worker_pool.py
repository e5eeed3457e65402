"""A work queue with `AsyncNode`: one pusher, three workers, one of them slow.

A "boss" node pushes 300 jobs to the queue ``jobs``. Three worker nodes pull
from it with a handler: ``fast-1`` and ``fast-2`` take 2 ms per job,
``slow`` takes 20 ms. Each job goes to exactly one worker, and because a
worker only gets new jobs as it finishes old ones (``prefetch=4``: at most 4
of the boss's jobs wait at any worker), the slow one ends up with far fewer
jobs instead of holding up the queue. The boss prints the split per worker.

`push` returns as soon as a worker with free credit has the job; it waits
while every worker is busy and never drops a job. `wait_for_workers` makes
sure all three are there before the first push, so the split is fair from
the start.

All nodes stay on 127.0.0.1 and find each other by static peering (each
worker is given the boss's control endpoint); on a LAN you would leave mDNS
on and give no peers. The mesh name is random, so runs never see each other.

Run: ``python examples/worker_pool.py``
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable

from mesh import AsyncNode, Message

LOOPBACK = ["127.0.0.1"]
JOBS = 300
WORKERS = {"fast-1": 0.002, "fast-2": 0.002, "slow": 0.020}
"""Worker name -> seconds per job."""


async def main() -> None:
    mesh = f"example-{uuid.uuid4().hex[:12]}"
    done_by: dict[str, str] = {}  # job -> the worker that did it
    split: Counter[str] = Counter()
    all_done = asyncio.Event()

    twice: list[str] = []

    def worker(name: str, seconds: float) -> Callable[[Message], Awaitable[None]]:
        async def handle(job: Message) -> None:
            await asyncio.sleep(seconds)  # the "work"
            if job.text in done_by:
                twice.append(job.text)
            done_by[job.text] = name
            split[name] += 1
            if len(done_by) == JOBS:
                all_done.set()
        return handle

    async with contextlib.AsyncExitStack() as stack:
        boss = await stack.enter_async_context(
            AsyncNode(name="boss", mesh=mesh, interfaces=LOOPBACK, mdns=False))
        for name, seconds in WORKERS.items():
            node = await stack.enter_async_context(
                AsyncNode(name=name, mesh=mesh, interfaces=LOOPBACK, mdns=False,
                          peers=boss.endpoints["ctl"]))
            await node.pull("jobs", prefetch=4, handler=worker(name, seconds))

        await boss.wait_for_workers("jobs", len(WORKERS), timeout=5)
        print(f"pushing {JOBS} jobs to {len(WORKERS)} workers")
        for i in range(JOBS):
            await boss.push("jobs", f"job-{i:03d}", timeout=5)
        await asyncio.wait_for(all_done.wait(), timeout=5)

    for name, seconds in WORKERS.items():
        print(f"  {name:<7} {seconds * 1000:4.0f} ms/job: {split[name]:4d} jobs "
              f"({split[name] / JOBS:.0%})")
    if len(done_by) == JOBS and not twice:
        print(f"all {JOBS} jobs done, each exactly once")
    else:
        print(f"{len(done_by)} of {JOBS} jobs done; done twice: {twice}")
        raise SystemExit(1)


if __name__ == "__main__":
    asyncio.run(main())
