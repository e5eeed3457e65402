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
import multiprocessing as mp
import os
import queue
import sys
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any, Final

LOOPBACK: Final[str] = "127.0.0.1"
SIZES: Final[tuple[int, ...]] = (64, 1024)
DEFAULT_COUNTS: Final[dict[int, int]] = {64: 1_000_000, 1024: 300_000}
QUICK_COUNT: Final[int] = 5_000
TOPIC: Final[str] = "bench.data"
SAMPLE_EVERY: Final[int] = 997  # check the payload of every 997th message (and the last)
PROBE: Final[bytes] = b"\x00probe"
STALL_SECONDS: Final[float] = 10.0

os.environ["ZEROMESH_INTERFACES"] = LOOPBACK  # inherited by the spawned processes


def make_payload(size: int) -> bytes:
    """A fixed, recognisable payload of `size` bytes."""
    pattern = b"zeromesh-bench-"
    return (pattern * (size // len(pattern) + 1))[:size]


@dataclass
class Result:
    """One receiver's and one publisher's view of a run."""

    received: int = 0
    corrupt: int = 0
    recv_seconds: float = 0.0
    send_seconds: float = 0.0
    error: str = ""

    @property
    def recv_rate(self) -> float:
        return (self.received - 1) / self.recv_seconds if self.recv_seconds > 0 else 0.0


# -- raw pyzmq -----------------------------------------------------------------


def raw_publisher(size: int, count: int, out: mp.Queue[Any], ready_port: mp.Queue[Any],
                  deadline: float) -> None:
    import zmq

    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.SNDHWM, 0)
    pub.setsockopt(zmq.LINGER, 0)
    port = pub.bind_to_random_port(f"tcp://{LOOPBACK}")
    ack = ctx.socket(zmq.PULL)
    ack.setsockopt(zmq.LINGER, 0)
    ack_port = ack.bind_to_random_port(f"tcp://{LOOPBACK}")
    ready_port.put((port, ack_port))
    try:
        # Probe until the subscriber has seen one: its subscription is in force.
        while not ack.poll(10):
            if time.monotonic() > deadline:
                raise TimeoutError("subscriber never acknowledged a probe")
            pub.send(PROBE)
        ack.recv()
        payload = make_payload(size)
        send = pub.send
        t0 = time.perf_counter()
        for _ in range(count):
            send(payload)
        out.put(("send_seconds", time.perf_counter() - t0))
        # Linger is 0: stay up until the subscriber says it is done.
        ack.poll(max(0.0, deadline - time.monotonic()) * 1000)
    except Exception as exc:
        out.put(("error", f"raw publisher: {exc!r}"))
    finally:
        ctx.destroy(linger=0)


def raw_subscriber(size: int, count: int, out: mp.Queue[Any], ports: tuple[int, int],
                   deadline: float) -> None:
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
        if not sub.poll(max(0.0, deadline - time.monotonic()) * 1000):
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
        out.put(("result", res))
        ack.send(b"done")
        ctx.destroy(linger=1000)


# -- zeromesh ------------------------------------------------------------------


def mesh_subscriber(size: int, count: int, mesh_name: str, out: mp.Queue[Any],
                    ctl: mp.Queue[Any], done: Any, deadline: float) -> None:
    asyncio.run(_mesh_subscriber(size, count, mesh_name, out, ctl, done, deadline))


async def _mesh_subscriber(size: int, count: int, mesh_name: str, out: mp.Queue[Any],
                           ctl: mp.Queue[Any], done: Any, deadline: float) -> None:
    from mesh import AsyncNode

    payload = make_payload(size)
    res = Result()
    try:
        async with AsyncNode(name="bench-sub", mesh=mesh_name, interfaces=[LOOPBACK],
                             mdns=False, pub_hwm=0, sub_hwm=0) as node:
            sub = await node.subscribe("bench.>", max_pending=count + 1)
            ctl.put(node.endpoints["ctl"][0])
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
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
        out.put(("result", res))
        done.set()


def mesh_publisher(size: int, count: int, mesh_name: str, peer: str, out: mp.Queue[Any],
                   done: Any, deadline: float) -> None:
    asyncio.run(_mesh_publisher(size, count, mesh_name, peer, out, done, deadline))


async def _mesh_publisher(size: int, count: int, mesh_name: str, peer: str,
                          out: mp.Queue[Any], done: Any, deadline: float) -> None:
    from mesh import AsyncNode

    payload = make_payload(size)
    try:
        async with AsyncNode(name="bench-pub", mesh=mesh_name, interfaces=[LOOPBACK],
                             mdns=False, peers=[peer], pub_hwm=0, sub_hwm=0) as node:
            await node.wait_for_subscribers(TOPIC, 1, timeout=max(0.1, deadline - time.monotonic()))
            publish = node.publish
            t0 = time.perf_counter()
            for _ in range(count):
                await publish(TOPIC, payload)
            await asyncio.sleep(0)  # the last partial batch leaves here
            out.put(("send_seconds", time.perf_counter() - t0))
            # Sockets close with linger 0: stay up until the subscriber is done.
            while not done.is_set() and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
    except Exception as exc:
        out.put(("error", f"zeromesh publisher: {exc!r}"))


# -- orchestration ---------------------------------------------------------------


def _collect(out: mp.Queue[Any], procs: list[mp.process.BaseProcess],
             deadline: float) -> Result:
    """Gather reports from the processes until all exit or the deadline passes."""
    res: Result | None = None
    send_seconds = 0.0
    errors: list[str] = []
    while True:
        try:
            kind, value = out.get(timeout=0.1)
        except queue.Empty:
            if all(not p.is_alive() for p in procs) or time.monotonic() > deadline:
                break
            continue
        if kind == "result":
            res = value
        elif kind == "send_seconds":
            send_seconds = value
        else:
            errors.append(value)
    for p in procs:
        p.join(timeout=max(0.0, deadline - time.monotonic()) + 1)
        if p.is_alive():
            p.kill()
            p.join(timeout=5)
            errors.append(f"{p.name} killed at the deadline")
    if res is None:
        res = Result()
        errors.append("no result from the receiver")
    res.send_seconds = send_seconds
    res.error = "; ".join(e for e in (res.error, *errors) if e)
    return res


def run_raw(size: int, count: int, timeout: float) -> Result:
    ctx = mp.get_context("spawn")
    out: mp.Queue[Any] = ctx.Queue()
    ports: mp.Queue[Any] = ctx.Queue()
    deadline = time.monotonic() + timeout
    pub = ctx.Process(target=raw_publisher, args=(size, count, out, ports, deadline),
                      name="raw-pub", daemon=True)
    pub.start()
    try:
        port_pair = ports.get(timeout=timeout)
    except queue.Empty:
        pub.kill()
        return Result(error="raw publisher did not start")
    sub = ctx.Process(target=raw_subscriber, args=(size, count, out, port_pair, deadline),
                      name="raw-sub", daemon=True)
    sub.start()
    return _collect(out, [sub, pub], deadline)


def run_mesh(size: int, count: int, timeout: float) -> Result:
    ctx = mp.get_context("spawn")
    out: mp.Queue[Any] = ctx.Queue()
    ctl: mp.Queue[Any] = ctx.Queue()
    done = ctx.Event()
    mesh_name = uuid.uuid4().hex[:12]
    deadline = time.monotonic() + timeout
    sub = ctx.Process(target=mesh_subscriber,
                      args=(size, count, mesh_name, out, ctl, done, deadline),
                      name="mesh-sub", daemon=True)
    sub.start()
    try:
        endpoint = ctl.get(timeout=timeout)
    except queue.Empty:
        sub.kill()
        return Result(error="zeromesh subscriber did not start")
    pub = ctx.Process(target=mesh_publisher,
                      args=(size, count, mesh_name, endpoint, out, done, deadline),
                      name="mesh-pub", daemon=True)
    pub.start()
    return _collect(out, [sub, pub], deadline)


def _side(res: Result | None, count: int) -> dict[str, Any] | None:
    if res is None:
        return None
    return {**asdict(res), "msgs_per_s": res.recv_rate,
            "send_msgs_per_s": count / res.send_seconds if res.send_seconds else 0.0,
            "lost": count - res.received}


def _row(size: int, count: int, raw: Result | None, zm: Result | None) -> dict[str, Any]:
    ratio = zm.recv_rate / raw.recv_rate if raw and zm and raw.recv_rate else None
    return {"size": size, "count": count, "raw": _side(raw, count),
            "zeromesh": _side(zm, count), "ratio": ratio}


def _fmt(side: dict[str, Any] | None, key: str, spec: str) -> str:
    return "-" if side is None else format(side[key], spec)


def _print_table(rows: list[dict[str, Any]]) -> None:
    head = (f"{'size':>6} {'count':>9} {'raw msg/s':>12} {'zeromesh msg/s':>15} {'ratio':>6} "
            f"{'raw lost':>9} {'zm lost':>8} {'raw send/s':>12} {'zm send/s':>12}")
    print(head)
    print("-" * len(head))
    for r in rows:
        raw, zm = r["raw"], r["zeromesh"]
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}"
        print(f"{r['size']:>5}B {r['count']:>9} {_fmt(raw, 'msgs_per_s', ',.0f'):>12} "
              f"{_fmt(zm, 'msgs_per_s', ',.0f'):>15} {ratio:>6} {_fmt(raw, 'lost', 'd'):>9} "
              f"{_fmt(zm, 'lost', 'd'):>8} {_fmt(raw, 'send_msgs_per_s', ',.0f'):>12} "
              f"{_fmt(zm, 'send_msgs_per_s', ',.0f'):>12}")
    for r in rows:
        for side in ("raw", "zeromesh"):
            if r[side] is not None and (r[side]["error"] or r[side]["corrupt"]):
                print(f"  {r['size']} B {side}: corrupt={r[side]['corrupt']} "
                      f"error={r[side]['error'] or '-'}")


def _median(run: Any, size: int, count: int, args: argparse.Namespace) -> Result:
    """Run `repeat` times; a failed run wins (so it is reported), else the median rate."""
    repeat = args.repeat or (1 if args.quick else 3)
    results = []
    for _ in range(repeat):
        res = run(size, count, args.timeout)
        if res.error or res.corrupt or res.received != count:
            return res
        results.append(res)
    results.sort(key=lambda r: r.recv_rate)
    return results[len(results) // 2]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int,
                        help="messages per size (default 1M at 64 B, 300k at 1 KiB)")
    parser.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")],
                        default=list(SIZES), help="comma-separated payload sizes in bytes")
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_COUNT} messages per size")
    parser.add_argument("--timeout", type=float, default=120.0, help="hard limit per phase, s")
    parser.add_argument("--only", choices=["raw", "zeromesh"], help="run one side only")
    parser.add_argument("--repeat", type=int, default=None,
                        help="runs per side and size; the median by receive rate is reported "
                             "(default 3, 1 with --quick)")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    args = parser.parse_args(argv)
    if args.count is not None and args.count < 1:
        parser.error("--count must be at least 1")
    if args.repeat is not None and args.repeat < 1:
        parser.error("--repeat must be at least 1")

    rows = []
    for size in args.sizes:
        count = args.count or (QUICK_COUNT if args.quick else DEFAULT_COUNTS.get(size, 300_000))
        raw = _median(run_raw, size, count, args) if args.only != "zeromesh" else None
        zm = _median(run_mesh, size, count, args) if args.only != "raw" else None
        rows.append(_row(size, count, raw, zm))
    if args.json:
        print(json.dumps({"benchmark": "pubsub", "transport": f"tcp://{LOOPBACK}",
                          "raw_framing": "single frame send(payload)",
                          "repeat": args.repeat or (1 if args.quick else 3), "statistic": "median",
                          "python": sys.version.split()[0], "results": rows}, indent=2))
    else:
        _print_table(rows)
    ok = all(r[s]["lost"] == 0 and not r[s]["error"] and not r[s]["corrupt"]
             for r in rows for s in ("raw", "zeromesh") if r[s] is not None)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
