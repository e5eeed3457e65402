"""Pub/sub throughput: raw pyzmq PUB/SUB against zeromesh, two processes on 127.0.0.1.

For each payload size (64 B and 1 KiB) the same N messages go from one
process to another twice:

* **raw**: pyzmq's blocking API, a PUB bound on ``tcp://127.0.0.1:<random>``
  and a SUB connected to it, subscribed to everything. One single-frame
  message per ``send(payload)`` (no topic frame). SNDHWM/RCVHWM are 0
  (unlimited), so nothing is dropped. Before the timed run the publisher sends
  probe messages until the subscriber acknowledges one over a PUSH/PULL pair,
  so the subscription is known to be in force (no slow-joiner loss).
* **zeromesh**: a subscriber process (`AsyncNode`, ``subscribe("bench.>")``,
  consumed with ``async for``) and a publisher process (`AsyncNode`,
  ``wait_for_subscribers`` then ``await node.publish(...)`` N times). Static
  peering, no mDNS, ``pub_hwm=0, sub_hwm=0`` and a subscription
  ``max_pending`` larger than N, so delivery is lossless end to end.

Receivers time the run from the first to the last of the N messages, check
that every message arrived and that sampled payloads are intact; publishers
time their own send loop. Each phase has a hard timeout and its processes are
killed if they overrun.

Run::

    python benchmarks/pubsub.py                 # 1,000,000 x 64 B and 300,000 x 1 KiB
    python benchmarks/pubsub.py --count 200000  # the same N for every size
    python benchmarks/pubsub.py --quick --json  # a small run, machine-readable

Everything binds 127.0.0.1 only (``ZEROMESH_INTERFACES`` is forced to it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import uuid
from functools import partial
from typing import Any, Final

import _harness as h
from _harness import LOOPBACK, SAMPLE_EVERY, STALL_SECONDS, Link, Result, make_payload

SIZES: Final[tuple[int, ...]] = (64, 1024)
DEFAULT_COUNTS: Final[dict[int, int]] = {64: 1_000_000, 1024: 300_000}
QUICK_COUNT: Final[int] = 5_000
TOPIC: Final[str] = "bench.data"
PROBE: Final[bytes] = b"\x00probe"


# -- raw pyzmq -----------------------------------------------------------------


def raw_publisher(size: int, count: int, link: Link) -> None:
    import zmq

    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.SNDHWM, 0)
    pub.setsockopt(zmq.LINGER, 0)
    port = pub.bind_to_random_port(f"tcp://{LOOPBACK}")
    ack = ctx.socket(zmq.PULL)
    ack.setsockopt(zmq.LINGER, 0)
    ack_port = ack.bind_to_random_port(f"tcp://{LOOPBACK}")
    link.ready.put((port, ack_port))
    try:
        # Probe until the subscriber has seen one: its subscription is in force.
        while not ack.poll(10):
            if time.monotonic() > link.deadline:
                raise TimeoutError("subscriber never acknowledged a probe")
            pub.send(PROBE)
        ack.recv()
        payload = make_payload(size)
        send = pub.send
        t0 = time.perf_counter()
        for _ in range(count):
            send(payload)
        link.report("send_seconds", time.perf_counter() - t0)
        # Linger is 0: stay up until the subscriber says it is done.
        ack.poll(link.left_ms())
    except Exception as exc:
        link.report("error", f"raw publisher: {exc!r}")
    finally:
        ctx.destroy(linger=0)


def raw_subscriber(size: int, count: int, ports: tuple[int, int], link: Link) -> None:
    import zmq

    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.RCVHWM, 0)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(f"tcp://{LOOPBACK}:{ports[0]}")
    ack = ctx.socket(zmq.PUSH)
    ack.setsockopt(zmq.LINGER, 1000)
    ack.connect(f"tcp://{LOOPBACK}:{ports[1]}")
    payload = make_payload(size)
    res = Result()
    try:
        if not sub.poll(link.left_ms()):
            raise TimeoutError("no probe arrived")
        sub.recv()
        ack.send(b"ready")
        # A blocking recv with RCVTIMEO: no per-message poll, yet a stall ends the run.
        sub.setsockopt(zmq.RCVTIMEO, int(STALL_SECONDS * 1000))
        recv = sub.recv
        first = recv()
        while first == PROBE:  # probes sent before the ack arrived
            first = recv()
        t0 = time.perf_counter()
        received, corrupt = 1, int(first != payload)
        try:
            while received < count:
                msg = recv()
                received += 1
                if received % SAMPLE_EVERY == 0 or received == count:
                    corrupt += msg != payload
        except zmq.Again:
            raise TimeoutError(f"stalled after {received} of {count} messages") from None
        res.recv_seconds = time.perf_counter() - t0
        res.received, res.corrupt = received, corrupt
    except Exception as exc:
        res.error = f"raw subscriber: {exc!r}"
    finally:
        link.report("result", res)
        ack.send(b"done")
        ctx.destroy(linger=1000)


# -- zeromesh ------------------------------------------------------------------


def mesh_subscriber(size: int, count: int, mesh_name: str, link: Link,
                    opts: dict[str, Any] | None = None) -> None:
    """`opts`: extra `AsyncNode` settings, overriding the ones below."""
    h.mesh_run(_mesh_subscriber(size, count, mesh_name, link, opts or {}))


async def _mesh_subscriber(size: int, count: int, mesh_name: str, link: Link,
                           opts: dict[str, Any]) -> None:
    from mesh import AsyncNode

    payload = make_payload(size)
    res = Result()
    try:
        async with AsyncNode(**{"name": "bench-sub", "mesh": mesh_name, "interfaces": [LOOPBACK],
                                "mdns": False, "pub_hwm": 0, "sub_hwm": 0, **opts}) as node:
            sub = await node.subscribe("bench.>", max_pending=count + 1)
            link.ready.put(node.endpoints["ctl"][0])
            async with asyncio.timeout(link.left()):
                first = await sub.next()
                t0 = time.perf_counter()
                received, corrupt = 1, int(first.data != payload)
                if received < count:
                    async for msg in sub:
                        received += 1
                        if received % SAMPLE_EVERY == 0:
                            corrupt += msg.data != payload
                        if received == count:
                            corrupt += msg.data != payload
                            break
                res.recv_seconds = time.perf_counter() - t0
            res.received, res.corrupt = received, corrupt
            if node.stats["dropped"]:
                res.error = f"zeromesh subscriber: node counted {node.stats['dropped']} dropped"
    except TimeoutError:
        res.error = f"zeromesh subscriber: timed out after {res.received} of {count}"
    except Exception as exc:
        res.error = f"zeromesh subscriber: {exc!r}"
    finally:
        link.report("result", res)
        link.done.set()


def mesh_publisher(size: int, count: int, mesh_name: str, peer: str, link: Link,
                   opts: dict[str, Any] | None = None) -> None:
    """`opts`: extra `AsyncNode` settings, overriding the ones below."""
    h.mesh_run(_mesh_publisher(size, count, mesh_name, peer, link, opts or {}))


async def _mesh_publisher(size: int, count: int, mesh_name: str, peer: str,
                          link: Link, opts: dict[str, Any]) -> None:
    from mesh import AsyncNode

    payload = make_payload(size)
    try:
        async with AsyncNode(**{"name": "bench-pub", "mesh": mesh_name, "interfaces": [LOOPBACK],
                                "mdns": False, "peers": [peer], "pub_hwm": 0, "sub_hwm": 0,
                                **opts}) as node:
            await node.wait_for_subscribers(TOPIC, 1, timeout=link.left(0.1))
            publish = node.publish
            t0 = time.perf_counter()
            for _ in range(count):
                await publish(TOPIC, payload)
            await asyncio.sleep(0)  # the last partial batch leaves here
            link.report("send_seconds", time.perf_counter() - t0)
            # Sockets close with linger 0: stay up until the subscriber is done.
            await link.wait_done()
    except Exception as exc:
        link.report("error", f"zeromesh publisher: {exc!r}")


# -- orchestration ---------------------------------------------------------------


def run_raw(size: int, count: int, timeout: float) -> Result:
    return h.run_pair(raw_publisher, (size, count), raw_subscriber, (size, count),
                      timeout=timeout, names=("raw-pub", "raw-sub"))


def run_mesh(size: int, count: int, timeout: float, sub_opts: dict[str, Any] | None = None,
             pub_opts: dict[str, Any] | None = None) -> Result:
    """`sub_opts`, `pub_opts`: extra `AsyncNode` settings for each side (e.g. CURVE keys)."""
    mesh_name = uuid.uuid4().hex[:12]
    return h.run_pair(partial(mesh_subscriber, opts=sub_opts), (size, count, mesh_name),
                      partial(mesh_publisher, opts=pub_opts), (size, count, mesh_name),
                      timeout=timeout, names=("mesh-sub", "mesh-pub"))


def _row(size: int, count: int, raw: Result | None, zm: Result | None) -> dict[str, Any]:
    return {"size": size, "count": count, "raw": h.side(raw, count),
            "zeromesh": h.side(zm, count), "ratio": h.ratio(zm, raw)}


COLUMNS: Final = (("size", 6), ("count", 9), ("raw msg/s", 12), ("zeromesh msg/s", 15),
                  ("ratio", 6), ("raw lost", 9), ("zm lost", 8), ("raw send/s", 12),
                  ("zm send/s", 12))


def _print_table(rows: list[dict[str, Any]]) -> None:
    fmt = h.fmt
    h.print_table(COLUMNS, [
        [f"{r['size']}B", str(r["count"]), fmt(r["raw"], "msgs_per_s", ",.0f"),
         fmt(r["zeromesh"], "msgs_per_s", ",.0f"), h.fmt_ratio(r["ratio"]),
         fmt(r["raw"], "lost", "d"), fmt(r["zeromesh"], "lost", "d"),
         fmt(r["raw"], "send_msgs_per_s", ",.0f"), fmt(r["zeromesh"], "send_msgs_per_s", ",.0f")]
        for r in rows])
    for r in rows:
        for side in ("raw", "zeromesh"):
            h.print_problems(f"{r['size']} B {side}", r[side])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int,
                        help="messages per size (default 1M at 64 B, 300k at 1 KiB)")
    parser.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")],
                        default=list(SIZES), help="comma-separated payload sizes in bytes")
    parser.add_argument("--only", choices=["raw", "zeromesh"], help="run one side only")
    h.add_run_flags(parser, quick=f"{QUICK_COUNT} messages per size")
    args = parser.parse_args(argv)
    h.check_run_flags(parser, args)
    loop = h.apply_loop_flag(args)

    rows = []
    for size in args.sizes:
        count = args.count or (QUICK_COUNT if args.quick else DEFAULT_COUNTS.get(size, 300_000))
        repeat = args.repeat or (1 if args.quick else 3)
        raw = zm = None
        if args.only != "zeromesh":
            raw = h.median_of(partial(run_raw, size, count, args.timeout), repeat, count)
        if args.only != "raw":
            zm = h.median_of(partial(run_mesh, size, count, args.timeout), repeat, count)
        rows.append(_row(size, count, raw, zm))
    if args.json:
        print(json.dumps({"benchmark": "pubsub", "transport": f"tcp://{LOOPBACK}", "loop": loop,
                          "raw_framing": "single frame send(payload)",
                          "repeat": args.repeat or (1 if args.quick else 3), "statistic": "median",
                          "python": sys.version.split()[0], "results": rows}, indent=2))
    else:
        print(f"zeromesh event loop: {loop}")
        _print_table(rows)
    return 0 if all(h.ok(r[s]) for r in rows for s in ("raw", "zeromesh")) else 1


if __name__ == "__main__":
    sys.exit(main())
