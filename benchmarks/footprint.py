"""Idle footprint of a node process: resident memory once it has one peer and is steady.

A child process (multiprocessing, spawn) starts an `AsyncNode` on 127.0.0.1
with mDNS off and the parent's node as its static peer. When both see each
other the parent lets heartbeats run for ``--settle`` seconds, then samples
the child's RSS from ``/proc/<pid>/status`` several times and prints it, next
to two baselines measured the same way: a bare spawned interpreter, and one
that has only imported ``mesh``. Linux only (reads /proc).

Run::

    python benchmarks/footprint.py [--settle 3] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
import uuid
from typing import Any, Final

LOOPBACK: Final[str] = "127.0.0.1"
START_TIMEOUT: Final[float] = 30.0

os.environ["ZEROMESH_INTERFACES"] = LOOPBACK  # inherited by the spawned process


def rss_mb(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of `pid` in MiB."""
    fields: dict[str, float] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) / 1024
    return fields["VmRSS"], fields["VmHWM"]


def child(mode: str, mesh_name: str, peer: str, ready: Any, stop: Any) -> None:
    if mode == "bare":
        ready.set()
        stop.wait(START_TIMEOUT)
        return
    import mesh  # noqa: F401 - the import is what is measured

    if mode == "import":
        ready.set()
        stop.wait(START_TIMEOUT)
        return
    asyncio.run(_node(mesh_name, peer, ready, stop))


async def _node(mesh_name: str, peer: str, ready: Any, stop: Any) -> None:
    from mesh import AsyncNode

    async with AsyncNode(name="footprint", mesh=mesh_name, interfaces=[LOOPBACK],
                         mdns=False, peers=[peer]) as node:
        await node.wait_for_peers(1, timeout=START_TIMEOUT)
        ready.set()
        deadline = time.monotonic() + START_TIMEOUT
        while not stop.is_set() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)


async def measure(mode: str, settle: float, samples: int = 5) -> dict[str, float]:
    from mesh import AsyncNode

    ctx = mp.get_context("spawn")
    ready, stop = ctx.Event(), ctx.Event()
    mesh_name = uuid.uuid4().hex[:12]
    async with AsyncNode(name="footprint-peer", mesh=mesh_name, interfaces=[LOOPBACK],
                         mdns=False) as here:
        proc = ctx.Process(target=child, name=f"footprint-{mode}", daemon=True,
                           args=(mode, mesh_name, here.endpoints["ctl"][0], ready, stop))
        proc.start()
        try:
            if not await asyncio.to_thread(ready.wait, START_TIMEOUT):
                raise TimeoutError(f"{mode} child did not get ready")
            if mode == "node":
                await here.wait_for_peers(1, timeout=START_TIMEOUT)
            await asyncio.sleep(settle)
            values = []
            for _ in range(samples):
                values.append(rss_mb(proc.pid or 0))
                await asyncio.sleep(settle / samples)
            peers = len(here.peers())
        finally:
            stop.set()
            await asyncio.to_thread(proc.join, 10)
            if proc.is_alive():
                proc.kill()
                proc.join(5)
    return {"rss_mb": statistics.median(v[0] for v in values),
            "peak_mb": max(v[1] for v in values), "peers_seen_by_parent": peers}


async def amain(settle: float) -> dict[str, Any]:
    return {mode: await measure(mode, settle) for mode in ("bare", "import", "node")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settle", type=float, default=3.0,
                        help="seconds of steady state before and while sampling")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if not os.path.exists("/proc/self/status"):
        print("footprint: needs Linux /proc", file=sys.stderr)
        return 2
    result = asyncio.run(amain(args.settle))
    if args.json:
        print(json.dumps({"benchmark": "footprint", **result}, indent=2))
        return 0
    labels = {"bare": "spawned interpreter (baseline)", "import": "after `import mesh`",
              "node": "idle AsyncNode, 1 peer, steady"}
    for mode, label in labels.items():
        r = result[mode]
        print(f"{label:<34} RSS {r['rss_mb']:6.1f} MB   peak {r['peak_mb']:6.1f} MB")
    node, base = result["node"]["rss_mb"], result["import"]["rss_mb"]
    print(f"{'node over import':<34}     {node - base:6.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
