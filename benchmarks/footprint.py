"""Footprint of a node process: idle memory, idle CPU with 10 peers, cold start.

* **RSS**: a child process (multiprocessing, spawn) starts an `AsyncNode` on
  127.0.0.1 with mDNS off and the parent's node as its static peer. When both
  see each other the parent lets heartbeats run for ``--settle`` seconds, then
  samples the child's RSS from ``/proc/<pid>/status`` and prints it, next to
  two baselines measured the same way: a bare spawned interpreter, and one
  that has only imported ``mesh``. Target: <= 40 MB.
* **Idle CPU with 10 peers**: the child is peered with 10 nodes in the parent
  (default heartbeat timings); its user+system CPU time (all its threads, the
  ZeroMQ I/O thread included; the peers' is the parent's) over ``--cpu-window``
  seconds from ``/proc/<pid>/stat``, as a percentage of one core. That clock
  counts in 10 ms ticks, so the window is 30 s by default: 0.03 % resolution
  (10 s gave 0.1 %, a fifth of the target). Target: <= 0.5 %.
* **Cold start**: from launching ``python -c <publish one message>`` to the
  parent's subscriber receiving it (interpreter start, import, node start,
  discovery, subscription handshake, delivery), with static peering and with
  mDNS; median of ``--repeat``. Target: <= 0.5 s.
* **Idle agent with viewers** (`viewers`, benchmarks/viewers.py): an idle
  ``zeromesh agent`` with two idle peers, its CPU with nobody watching (the
  baseline), with 3 SSE clients on ``/v1/events`` and with 3 headless chromium
  tabs on its mesh page (skipped, with the reason, without chromium). Target:
  3 tabs <= 2 % of a core.

Linux only (reads /proc). Run::

    python benchmarks/footprint.py [--settle 3] [--cpu-window 30] [--repeat 5]
                                   [--viewers-window 20] [--no-tabs] [--quick] [--json]
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
        # Polled: waiting for the multiprocessing Event in a thread would add that thread
        # to the footprint this process is measured for.
        while not stop.is_set() and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)


async def stop_child(proc: Any, stop: Any) -> None:
    """Ask the child to end; kill it (our own child only) if it does not within 10 s."""
    stop.set()
    await asyncio.to_thread(proc.join, 10)
    if proc.is_alive():
        proc.kill()
        proc.join(5)


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
            await stop_child(proc, stop)
    return {"rss_mb": statistics.median(v[0] for v in values),
            "peak_mb": max(v[1] for v in values), "peers_seen_by_parent": peers}


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of `pid` so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def idle_child(mesh_name: str, peers: list[str], ready: Any, stop: Any) -> None:
    asyncio.run(_idle_node(mesh_name, peers, ready, stop))


async def _idle_node(mesh_name: str, peers: list[str], ready: Any, stop: Any) -> None:
    from mesh import AsyncNode

    async with AsyncNode(name="idle", mesh=mesh_name, interfaces=[LOOPBACK], mdns=False,
                         peers=peers) as node:
        await node.wait_for_peers(len(peers), timeout=START_TIMEOUT)
        ready.set()
        await asyncio.to_thread(stop.wait, START_TIMEOUT + 120)


async def idle_cpu(window: float, n_peers: int = 10) -> dict[str, float]:
    """CPU % of one core used by an idle node with `n_peers` live peers."""
    from mesh import AsyncNode

    mesh_name = uuid.uuid4().hex[:12]
    ctx = mp.get_context("spawn")
    ready, stop = ctx.Event(), ctx.Event()
    peers = [AsyncNode(name=f"peer{i}", mesh=mesh_name, interfaces=[LOOPBACK], mdns=False)
             for i in range(n_peers)]
    for peer in peers:
        await peer.start()
    proc = ctx.Process(target=idle_child, daemon=True, name="footprint-idle",
                       args=(mesh_name, [p.endpoints["ctl"][0] for p in peers], ready, stop))
    proc.start()
    try:
        if not await asyncio.to_thread(ready.wait, START_TIMEOUT):
            raise TimeoutError("idle child did not see its peers")
        await asyncio.sleep(1.0)  # past the joins
        before, started = cpu_seconds(proc.pid or 0), time.monotonic()
        await asyncio.sleep(window)
        used, elapsed = cpu_seconds(proc.pid or 0) - before, time.monotonic() - started
        seen = min(len(p.peers()) for p in peers)
    finally:
        await stop_child(proc, stop)
        for peer in peers:
            await peer.aclose()
    return {"cpu_percent": 100 * used / elapsed, "peers": n_peers, "window_s": elapsed,
            "every_peer_saw_it": float(seen >= 1)}


_COLD_PUBLISHER: Final[str] = """
import asyncio, sys
from mesh import AsyncNode
async def main():
    static = sys.argv[2] != "mdns"
    async with AsyncNode(name="cold", mesh=sys.argv[1], interfaces=["127.0.0.1"],
                         mdns=not static, peers=[sys.argv[2]] if static else []) as node:
        await node.wait_for_subscribers("cold.start", 1, timeout=20)
        await node.publish("cold.start", b"first")
asyncio.run(main())
"""


async def cold_start(discovery: str, repeat: int) -> dict[str, float]:
    """Seconds from launching a publisher process to its first message being delivered."""
    from mesh import AsyncNode

    times = []
    for _ in range(repeat):
        mesh_name = uuid.uuid4().hex[:12]
        async with AsyncNode(name="cold-sub", mesh=mesh_name, interfaces=[LOOPBACK],
                             mdns=discovery == "mdns") as here:
            sub = await here.subscribe("cold.start")
            target = "mdns" if discovery == "mdns" else here.endpoints["ctl"][0]
            started = time.monotonic()
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-c", _COLD_PUBLISHER, mesh_name, target,
                env={**os.environ, "ZEROMESH_INTERFACES": LOOPBACK})
            try:
                await sub.next(timeout=START_TIMEOUT)
                times.append(time.monotonic() - started)
            finally:
                async with asyncio.timeout(20):
                    await proc.wait()
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times)}


async def amain(settle: float, window: float, repeat: int, viewers_window: float,
                viewers_settle: float, tabs: bool) -> dict[str, Any]:
    out: dict[str, Any] = {mode: await measure(mode, settle)
                           for mode in ("bare", "import", "node")}
    out["idle_cpu"] = await idle_cpu(window)
    out["cold_start_static"] = await cold_start("static", repeat)
    out["cold_start_mdns"] = await cold_start("mdns", repeat)
    import viewers  # here, not at the top: the spawned children import this module

    out["viewers"] = await viewers.amain(viewers_window, viewers_settle, tabs)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settle", type=float, default=3.0,
                        help="seconds of steady state before and while sampling")
    parser.add_argument("--cpu-window", type=float, default=30.0,
                        help="seconds over which idle CPU is measured")
    parser.add_argument("--repeat", type=int, default=5, help="cold starts per discovery mode")
    parser.add_argument("--viewers-window", type=float, default=20.0,
                        help="seconds of agent CPU per viewers phase (>= 10)")
    parser.add_argument("--no-tabs", action="store_true", help="skip the chromium tabs")
    parser.add_argument("--quick", action="store_true",
                        help="a short run: 1 s settle, 10 s windows, 2 cold starts")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if not os.path.exists("/proc/self/status"):
        print("footprint: needs Linux /proc", file=sys.stderr)
        return 2
    if args.quick:
        args.settle, args.cpu_window, args.repeat, args.viewers_window = 1.0, 10.0, 2, 10.0
    result = asyncio.run(amain(args.settle, args.cpu_window, args.repeat, args.viewers_window,
                               2.0 if args.quick else 4.0, not args.no_tabs))
    if args.json:
        print(json.dumps({"benchmark": "footprint", **result}, indent=2))
        return 0
    labels = {"bare": "spawned interpreter (baseline)", "import": "after `import mesh`",
              "node": "idle AsyncNode, 1 peer, steady"}
    for mode, label in labels.items():
        r = result[mode]
        print(f"{label:<34} RSS {r['rss_mb']:6.1f} MB   peak {r['peak_mb']:6.1f} MB")
    node, base = result["node"]["rss_mb"], result["import"]["rss_mb"]
    print(f"{'node over import':<34}     {node - base:6.1f} MB   (target RSS <= 40 MB)")
    cpu = result["idle_cpu"]
    print(f"{'idle CPU, 10 peers':<34} {cpu['cpu_percent']:6.2f} % of a core over "
          f"{cpu['window_s']:.0f} s   (target <= 0.5 %)")
    for mode in ("static", "mdns"):
        cold = result[f"cold_start_{mode}"]
        print(f"{'cold start -> first delivery, ' + mode:<34} {cold['median_s']:6.3f} s median "
              f"({cold['min_s']:.3f}-{cold['max_s']:.3f})   (target <= 0.5 s)")
    import viewers

    print("\n".join(viewers.report(result["viewers"])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
