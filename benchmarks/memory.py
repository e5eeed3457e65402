"""What the mesh remembers: the cost to a publisher, and how fast a joiner gets it.

Four figures, each with its baseline from the same run:

1. Publish rate with ``retain=True`` against a plain best-effort publish, one
   node, no subscriber, 64 B, one topic per 100 messages (the retained value
   is a per-topic overwrite, so this is what a sensor fleet looks like). The
   ratio is plain/retained: the target is <= 1.2.
2. A node that joins a mesh whose publisher holds N retained topics (default
   10,000, 64 B each): seconds from ``subscribe`` to the last value, against
   the same number of live messages published to an already joined
   subscriber. Target: all values within 0.5 s on loopback.
3. Publish rate on a history topic against a plain publish (target <= 1.5).
4. A ``since=`` replay of N history messages (default 100,000) to a new
   subscriber, in msgs/s, against the same number of live messages to a
   joined one. Target: >= 200 k msgs/s.

Both nodes run in this process on 127.0.0.1 (static peering, no mDNS).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid
from typing import Any

import _harness

from mesh import AsyncNode

PAYLOAD = _harness.make_payload(64)


def _node(name: str, mesh: str, **extra: Any) -> AsyncNode:
    return AsyncNode(name=name, mesh=mesh, interfaces=[_harness.LOOPBACK], mdns=False,
                     pub_hwm=0, sub_hwm=0, **extra)


async def publish_rate(count: int, retain: bool, history: bool = False) -> float:
    async with _node("pub", f"bench-{uuid.uuid4().hex[:8]}",
                     history=["bench.>"] if history else []) as node:
        topics = [f"bench.t{i}" for i in range(max(1, count // 100))]
        started = time.perf_counter()
        for i in range(count):
            await node.publish(topics[i % len(topics)], PAYLOAD, retain=retain)
        return count / (time.perf_counter() - started)


async def replay_rate(count: int) -> float:
    """Messages/s of a `since=` replay of `count` kept messages to a new subscriber."""
    mesh = f"bench-{uuid.uuid4().hex[:8]}"
    async with _node("pub", mesh, history=["bench.>"]) as pub:
        for i in range(count):
            await pub.publish(f"bench.t{i % 100}", PAYLOAD)
        async with _node("sub", mesh, peers=pub.endpoints["ctl"]) as sub_node:
            await sub_node.wait_for_peers(1, timeout=10)
            await asyncio.sleep(0.6)  # past the joiner's discovery grace: time the transfer
            started = time.perf_counter()
            sub = await sub_node.subscribe("bench.>", max_pending=0, since=3600)
            for _ in range(count):
                await sub.next(timeout=30)
            return count / (time.perf_counter() - started)


async def join_seconds(topics: int, retained: bool) -> float:
    """Seconds from subscribe to the last of `topics` messages at a new subscriber."""
    mesh = f"bench-{uuid.uuid4().hex[:8]}"
    async with _node("pub", mesh) as pub:
        if retained:
            for i in range(topics):
                await pub.publish(f"bench.t{i}", PAYLOAD, retain=True)
        async with _node("sub", mesh, peers=pub.endpoints["ctl"]) as sub_node:
            await sub_node.wait_for_peers(1, timeout=10)
            await asyncio.sleep(0.6)  # past the joiner's discovery grace: time the transfer
            started = time.perf_counter()
            sub = await sub_node.subscribe("bench.>", max_pending=0, retained=retained)
            if not retained:
                await pub.wait_for_subscribers("bench.t0", 1, timeout=10)
                started = time.perf_counter()
                for i in range(topics):
                    await pub.publish(f"bench.t{i}", PAYLOAD)
            for _ in range(topics):
                await sub.next(timeout=30)
            return time.perf_counter() - started


async def main(args: argparse.Namespace) -> dict[str, Any]:
    plain = await publish_rate(args.count, retain=False)
    retained = await publish_rate(args.count, retain=True)
    kept = await publish_rate(args.count, retain=False, history=True)
    live = await join_seconds(args.topics, retained=False)
    join = await join_seconds(args.topics, retained=True)
    replay = await replay_rate(args.replay)
    return {"publish_plain_per_s": plain, "publish_retained_per_s": retained,
            "publish_cost_ratio": plain / retained, "publish_history_per_s": kept,
            "history_cost_ratio": plain / kept, "topics": args.topics,
            "join_retained_s": join, "same_as_live_s": live, "replayed": args.replay,
            "replay_per_s": replay, "live_per_s": args.topics / live}


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=200_000, help="publishes per rate run")
    parser.add_argument("--topics", type=int, default=10_000, help="retained topics to join")
    parser.add_argument("--replay", type=int, default=100_000, help="history messages")
    parser.add_argument("--quick", action="store_true", help="a small run (smoke test)")
    parser.add_argument("--json", action="store_true")
    _harness.add_loop_flag(parser)
    args = parser.parse_args()
    if args.quick:
        args.count, args.topics, args.replay = 5_000, 500, 2_000
    loop = _harness.apply_loop_flag(args)
    res = _harness.mesh_run(main(args))
    if args.json:
        print(json.dumps(res))
        return
    print(f"zeromesh event loop: {loop}")
    print(f"publish 64 B, plain     {res['publish_plain_per_s']:>12,.0f} msgs/s  (baseline)")
    print(f"publish 64 B, retained  {res['publish_retained_per_s']:>12,.0f} msgs/s  "
          f"cost {res['publish_cost_ratio']:.2f}x  (target <= 1.2)")
    print(f"{res['topics']:,} topics to a new subscriber: retained "
          f"{res['join_retained_s']:.3f} s  (target <= 0.5), live baseline "
          f"{res['same_as_live_s']:.3f} s")
    print(f"publish 64 B, history   {res['publish_history_per_s']:>12,.0f} msgs/s  "
          f"cost {res['history_cost_ratio']:.2f}x  (target <= 1.5)")
    print(f"replay {res['replayed']:,} history messages: {res['replay_per_s']:,.0f} msgs/s  "
          f"(target >= 200,000); live baseline {res['live_per_s']:,.0f} msgs/s")


if __name__ == "__main__":
    cli()
