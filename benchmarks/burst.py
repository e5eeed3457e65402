"""One-way latency under a saturating burst: how long messages queue when the sender
outruns the receiver (issue 18, part 3), raw pyzmq against zeromesh.

Throughput benchmarks reward queueing: a sender that buffers everything it is
given looks fast, while each message waits behind all the others. Here the
sender sends ``count`` messages back to back, each stamped with the sender's
``time.perf_counter_ns()`` (CLOCK_MONOTONIC, one clock for both processes) in
its first 8 bytes; the receiver takes ``now - stamp`` for every message it gets
and reports p50, p99 and the maximum, with the throughput and how many were lost.

* **pub/sub**: raw PUB/SUB with pyzmq's defaults (SNDHWM = RCVHWM = 1,000: a
  burst beyond them is dropped, as ZeroMQ does), against two `AsyncNode`s with
  their defaults (``publish`` / ``subscribe``, with ``retained=False``: the
  gathering of retained values at start is not queueing);
* **push/pull**: raw PUSH/PULL with the default HWMs (the sender blocks when
  they are full), against ``push`` / ``pull`` with their defaults.

Both sides of each run use the same sizes and counts; each figure is the median
of ``--repeat`` runs by p50. Everything binds 127.0.0.1 only.

Run::

    python benchmarks/burst.py             # 200,000 x 64 B and 100,000 x 1 KiB
    python benchmarks/burst.py --quick     # 5,000 messages (smoke test)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import uuid
from array import array
from collections.abc import Callable
from functools import partial
from typing import Any, Final

import _harness as h
from _harness import LOOPBACK, Link, Result

CASES: Final[tuple[tuple[str, int], ...]] = (("pubsub", 64), ("pubsub", 1024), ("pushpull", 64))
DEFAULT_COUNTS: Final[dict[int, int]] = {64: 200_000, 1024: 100_000}
QUICK_COUNT: Final[int] = 5_000
TOPIC: Final[str] = "bench.burst"
QUEUE: Final[str] = "bench-burst"
PROBE: Final[bytes] = b"\x00probe"
QUIET_SECONDS: Final[float] = 1.0
"""A raw PUB/SUB receiver that got nothing for this long takes the rest for lost (dropped)."""
STALL_SECONDS: Final[float] = 5.0
"""The same for a lossless pattern, where a pause means a stall (e.g. a loaded machine)."""


def stamped(size: int) -> Callable[[], bytes]:
    """A maker of payloads of `size` bytes that start with the time they were made."""
    pad = h.make_payload(size)[8:]

    def make() -> bytes:
        return time.perf_counter_ns().to_bytes(8, "little") + pad

    return make


def delays(received: array[int]) -> dict[str, float]:
    """p50 / p99 / max of the one-way delays, in milliseconds."""
    if not received:
        return {}
    ordered = sorted(received)

    def pick(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1e6

    return {"p50_ms": pick(0.5), "p99_ms": pick(0.99), "max_ms": ordered[-1] / 1e6}


# -- raw pyzmq -----------------------------------------------------------------


def raw_receiver(pattern: str, size: int, count: int, link: Link) -> None:
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.SUB if pattern == "pubsub" else zmq.PULL)
    if pattern == "pubsub":
        sock.setsockopt(zmq.SUBSCRIBE, b"")
    sock.setsockopt(zmq.LINGER, 0)
    port = sock.bind_to_random_port(f"tcp://{LOOPBACK}")
    ack = ctx.socket(zmq.PUSH)
    ack.setsockopt(zmq.LINGER, 1000)
    ack_port = ack.bind_to_random_port(f"tcp://{LOOPBACK}")
    link.ready.put((port, ack_port))
    taken: array[int] = array("q")
    with h.receiving("raw receiver", link) as res:
        try:
            if not sock.poll(link.left_ms()):
                raise TimeoutError("no probe arrived")
            while sock.recv() != PROBE:
                pass
            ack.send(b"ready")
            quiet = QUIET_SECONDS if pattern == "pubsub" else STALL_SECONDS
            sock.setsockopt(zmq.RCVTIMEO, int(quiet * 1000))
            recv, clock, add = sock.recv, time.perf_counter_ns, taken.append
            msg = recv()
            while msg == PROBE:
                msg = recv()
            first = now = clock()
            try:
                while True:
                    now = clock()
                    add(now - int.from_bytes(msg[:8], "little"))
                    if len(taken) == count:
                        break
                    msg = recv()
            except zmq.Again:
                pass  # the rest was dropped
            res.recv_seconds = (now - first) / 1e9
            res.received = len(taken)
            res.figures = delays(taken)
        finally:
            ack.send(b"done")
            ctx.destroy(linger=1000)


def raw_sender(pattern: str, size: int, count: int, ports: tuple[int, int], link: Link) -> None:
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUB if pattern == "pubsub" else zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(f"tcp://{LOOPBACK}:{ports[0]}")
    ack = ctx.socket(zmq.PULL)
    ack.setsockopt(zmq.LINGER, 0)
    ack.connect(f"tcp://{LOOPBACK}:{ports[1]}")
    try:
        while not ack.poll(10):  # probe until the subscription / connection is in force
            if time.monotonic() > link.deadline:
                raise TimeoutError("the receiver never acknowledged a probe")
            sock.send(PROBE)
        ack.recv()
        make, send = stamped(size), sock.send
        t0 = time.perf_counter()
        for _ in range(count):
            send(make())
        link.report("send_seconds", time.perf_counter() - t0)
        ack.poll(link.left_ms())  # linger 0: stay up until the receiver is done
    except Exception as exc:
        link.report("error", f"raw sender: {exc!r}")
    finally:
        ctx.destroy(linger=0)


# -- zeromesh ------------------------------------------------------------------


def mesh_receiver(pattern: str, size: int, count: int, mesh_name: str, link: Link) -> None:
    h.mesh_run(_mesh_receiver(pattern, size, count, mesh_name, link))


async def _mesh_receiver(pattern: str, size: int, count: int, mesh_name: str,
                         link: Link) -> None:
    from mesh import AsyncNode

    taken: array[int] = array("q")
    with h.receiving("zeromesh receiver", link) as res:
        async with AsyncNode(name="burst-recv", mesh=mesh_name, interfaces=[LOOPBACK],
                             mdns=False) as node:
            # retained=False: a subscription made just after start holds live messages
            # until discovery settles (to gather retained values first); that start-up
            # wait is not the queueing measured here
            stream = await (node.subscribe("bench.>", retained=False) if pattern == "pubsub"
                            else node.pull(QUEUE))
            link.ready.put(node.endpoints["ctl"][0])
            first = await asyncio.wait_for(stream.next(), link.left())
            clock, add = time.perf_counter_ns, taken.append
            began = last = clock()
            add(began - int.from_bytes(first.data[:8], "little"))

            async def consume() -> None:
                nonlocal last
                async for msg in stream:
                    last = clock()
                    add(last - int.from_bytes(msg.data[:8], "little"))
                    if len(taken) >= count:
                        return

            task = asyncio.create_task(consume())
            seen = -1
            while not task.done() and len(taken) != seen:  # until done or quiet
                seen = len(taken)
                await asyncio.wait({task}, timeout=STALL_SECONDS)
            task.cancel()
            res.recv_seconds = (last - began) / 1e9
            res.received = len(taken)
            res.figures = delays(taken)


def mesh_sender(pattern: str, size: int, count: int, mesh_name: str, peer: str,
                link: Link) -> None:
    h.mesh_run(_mesh_sender(pattern, size, count, mesh_name, peer, link))


async def _mesh_sender(pattern: str, size: int, count: int, mesh_name: str, peer: str,
                       link: Link) -> None:
    from mesh import AsyncNode

    try:
        async with AsyncNode(name="burst-send", mesh=mesh_name, interfaces=[LOOPBACK],
                             mdns=False, peers=[peer]) as node:
            make = stamped(size)
            t0 = time.perf_counter()
            if pattern == "pubsub":
                await node.wait_for_subscribers(TOPIC, 1, timeout=link.left(0.1))
                publish = node.publish
                t0 = time.perf_counter()
                for _ in range(count):
                    await publish(TOPIC, make())
            else:
                await node.wait_for_workers(QUEUE, 1, timeout=link.left(0.1))
                push = node.push
                t0 = time.perf_counter()
                for _ in range(count):
                    await push(QUEUE, make())
            await asyncio.sleep(0)  # the last partial batch leaves here
            link.report("send_seconds", time.perf_counter() - t0)
            await link.wait_done()
    except Exception as exc:
        link.report("error", f"zeromesh sender: {exc!r}")


# -- orchestration ---------------------------------------------------------------


def run_raw(pattern: str, size: int, count: int, timeout: float) -> Result:
    return h.run_pair(raw_receiver, (pattern, size, count), raw_sender, (pattern, size, count),
                      timeout=timeout, names=("raw-recv", "raw-send"))


def run_mesh(pattern: str, size: int, count: int, timeout: float) -> Result:
    mesh_name = uuid.uuid4().hex[:12]
    return h.run_pair(mesh_receiver, (pattern, size, count, mesh_name),
                      mesh_sender, (pattern, size, count, mesh_name),
                      timeout=timeout, names=("mesh-recv", "mesh-send"))


def median_by_p50(run: Callable[[], Result], repeat: int) -> Result:
    """The run with the median p50 (an errored run is returned at once)."""
    results = []
    for _ in range(repeat):
        res = run()
        if res.error or not res.figures:
            return res
        results.append(res)
    results.sort(key=lambda r: r.figures["p50_ms"])
    return results[len(results) // 2]


def side(res: Result, count: int) -> dict[str, Any]:
    return {**res.figures, "msgs_per_s": res.recv_rate, "lost": count - res.received,
            "error": res.error}


COLUMNS: Final = (("pattern", 8), ("size", 6), ("count", 8), ("side", 8), ("p50 ms", 8),
                  ("p99 ms", 8), ("max ms", 8), ("msgs/s", 11), ("lost", 8))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, help="messages per burst (default 200k at 64 B, "
                                                  "100k at 1 KiB)")
    h.add_run_flags(parser, quick=f"{QUICK_COUNT} messages per burst")
    args = parser.parse_args(argv)
    h.check_run_flags(parser, args)
    loop = h.apply_loop_flag(args)
    repeat = args.repeat or (1 if args.quick else 3)
    rows = []
    for pattern, size in CASES:
        count = args.count or (QUICK_COUNT if args.quick else DEFAULT_COUNTS[size])
        for name, run in (("raw", run_raw), ("zeromesh", run_mesh)):
            res = median_by_p50(partial(run, pattern, size, count, args.timeout), repeat)
            rows.append({"pattern": pattern, "size": size, "count": count, "side": name,
                         **side(res, count)})
    if args.json:
        print(json.dumps({"benchmark": "burst", "loop": loop, "repeat": repeat,
                          "statistic": "median by p50", "results": rows}, indent=2))
    else:
        print(f"zeromesh event loop: {loop}; median of {repeat} by p50")
        h.print_table(COLUMNS, [[
            r["pattern"], f"{r['size']}B", str(r["count"]), r["side"],
            *(f"{r[k]:.2f}" if k in r else "-" for k in ("p50_ms", "p99_ms", "max_ms")),
            f"{r['msgs_per_s']:,.0f}", str(r["lost"])] for r in rows])
        for r in rows:
            if r["error"]:
                print(f"  {r['pattern']} {r['size']} B {r['side']}: {r['error']}")
    return 0 if not any(r["error"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
