"""Push/pull throughput: raw pyzmq PUSH/PULL against zeromesh work queues, on 127.0.0.1.

The same N messages of 64 B go from one process to another, once per variant:

* **raw**: pyzmq's blocking API, a PULL bound on ``tcp://127.0.0.1:<random>``
  and a PUSH connected to it, SNDHWM/RCVHWM 0 (unlimited), one single-frame
  message per ``send(payload)``. Before the timed run the pusher sends a probe
  and waits until the puller acknowledges it over a second PUSH/PULL pair, so
  the connection is up (handshake done) before anything is timed.
* **zeromesh**: a worker process (`AsyncNode`, ``pull("bench.jobs")``,
  consumed with ``async for``, so each message is credited when the next is
  asked for) and a pusher process (`AsyncNode`, ``wait_for_workers`` then
  ``await node.push(...)`` N times). Static peering, no mDNS. One row per
  prefetch value (the most the worker's adaptive credit window may grow
  to): the library default and ``--prefetch`` extras (default 1024 and
  4096), so the choice can be made from numbers.

Receivers time the run from the first to the last of the N messages (that
rate, ``msgs/s``, is what ``ratio`` compares with raw), check that every
message arrived and that sampled payloads are intact; pushers time their own
send loop (``send/s``). Repetitions interleave (raw, then each zeromesh row,
then raw again...) and ``ratio`` is the median of the ratios within each
repetition, with their range: raw pyzmq's rate alone swings by 2x between
minutes on this host. The zeromesh pusher also checks its node counted no
``lost_in_flight``. Each run has a hard timeout and its processes are killed
if they overrun.

Run::

    python benchmarks/pushpull.py                  # 500,000 x 64 B, 3 interleaved repetitions
    python benchmarks/pushpull.py --prefetch 64,1024 --repeat 1
    python benchmarks/pushpull.py --quick --json   # a small run, machine-readable

Everything binds 127.0.0.1 only (``ZEROMESH_INTERFACES`` is forced to it).
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import sys
import time
import uuid
from functools import partial
from typing import Any, Final

import _harness as h
from _harness import LOOPBACK, SAMPLE_EVERY, STALL_SECONDS, Link, Result, make_payload

SIZE: Final[int] = 64
DEFAULT_COUNT: Final[int] = 500_000
QUICK_COUNT: Final[int] = 5_000
QUEUE: Final[str] = "bench.jobs"
PROBE: Final[bytes] = b"\x00probe"


# -- raw pyzmq -----------------------------------------------------------------


def raw_puller(size: int, count: int, link: Link) -> None:
    import zmq

    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.setsockopt(zmq.RCVHWM, 0)
    pull.setsockopt(zmq.LINGER, 0)
    port = pull.bind_to_random_port(f"tcp://{LOOPBACK}")
    ack = ctx.socket(zmq.PUSH)
    ack.setsockopt(zmq.LINGER, 1000)
    ack_port = ack.bind_to_random_port(f"tcp://{LOOPBACK}")
    link.ready.put((port, ack_port))
    payload = make_payload(size)
    res = Result()
    try:
        if not pull.poll(link.left_ms()):
            raise TimeoutError("no probe arrived")
        if pull.recv() != PROBE:
            raise RuntimeError("the first message was not the probe")
        ack.send(b"ready")
        # A blocking recv with RCVTIMEO: no per-message poll, yet a stall ends the run.
        pull.setsockopt(zmq.RCVTIMEO, int(STALL_SECONDS * 1000))
        recv = pull.recv
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
        res.error = f"raw puller: {exc!r}"
    finally:
        link.report("result", res)
        ack.send(b"done")
        ctx.destroy(linger=1000)


def raw_pusher(size: int, count: int, ports: tuple[int, int], link: Link) -> None:
    import zmq

    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.SNDHWM, 0)
    push.setsockopt(zmq.LINGER, 0)
    push.connect(f"tcp://{LOOPBACK}:{ports[0]}")
    ack = ctx.socket(zmq.PULL)
    ack.setsockopt(zmq.LINGER, 0)
    ack.connect(f"tcp://{LOOPBACK}:{ports[1]}")
    try:
        push.send(PROBE)
        if not ack.poll(link.left_ms()):
            raise TimeoutError("puller never acknowledged the probe")
        ack.recv()
        payload = make_payload(size)
        send = push.send
        t0 = time.perf_counter()
        for _ in range(count):
            send(payload)
        link.report("send_seconds", time.perf_counter() - t0)
        # Linger is 0: stay up until the puller says it is done.
        ack.poll(link.left_ms())
    except Exception as exc:
        link.report("error", f"raw pusher: {exc!r}")
    finally:
        ctx.destroy(linger=0)


# -- zeromesh ------------------------------------------------------------------


def mesh_worker(size: int, count: int, mesh_name: str, prefetch: int | None,
                link: Link) -> None:
    h.mesh_run(_mesh_worker(size, count, mesh_name, prefetch, link))


async def _mesh_worker(size: int, count: int, mesh_name: str, prefetch: int | None,
                       link: Link) -> None:
    from mesh import AsyncNode

    payload = make_payload(size)
    res = Result()
    try:
        async with AsyncNode(name="bench-worker", mesh=mesh_name, interfaces=[LOOPBACK],
                             mdns=False) as node:
            work = await (node.pull(QUEUE) if prefetch is None
                          else node.pull(QUEUE, prefetch=prefetch))
            link.ready.put(node.endpoints["ctl"][0])
            async with asyncio.timeout(link.left()):
                first = await work.next()
                t0 = time.perf_counter()
                received, corrupt = 1, int(first.data != payload)
                if received < count:
                    async for msg in work:
                        received += 1
                        if received % SAMPLE_EVERY == 0:
                            corrupt += msg.data != payload
                        if received == count:
                            corrupt += msg.data != payload
                            break
                res.recv_seconds = time.perf_counter() - t0
            res.received, res.corrupt = received, corrupt
    except TimeoutError:
        res.error = f"zeromesh worker: timed out after {res.received} of {count}"
    except Exception as exc:
        res.error = f"zeromesh worker: {exc!r}"
    finally:
        link.report("result", res)
        link.done.set()


def mesh_pusher(size: int, count: int, mesh_name: str, peer: str, link: Link) -> None:
    h.mesh_run(_mesh_pusher(size, count, mesh_name, peer, link))


async def _mesh_pusher(size: int, count: int, mesh_name: str, peer: str, link: Link) -> None:
    from mesh import AsyncNode

    payload = make_payload(size)
    try:
        async with AsyncNode(name="bench-pusher", mesh=mesh_name, interfaces=[LOOPBACK],
                             mdns=False, peers=[peer]) as node:
            await node.wait_for_workers(QUEUE, 1, timeout=link.left(0.1))
            push = node.push
            t0 = time.perf_counter()
            for _ in range(count):
                await push(QUEUE, payload)
            await asyncio.sleep(0)  # the last partial batch leaves here
            link.report("send_seconds", time.perf_counter() - t0)
            # Stay up until the worker is done: its credits come back to us.
            await link.wait_done()
            if node.stats["lost_in_flight"]:
                link.report("error", f"zeromesh pusher: node counted "
                                     f"{node.stats['lost_in_flight']} lost in flight")
    except Exception as exc:
        link.report("error", f"zeromesh pusher: {exc!r}")


# -- orchestration ---------------------------------------------------------------


def run_raw(size: int, count: int, timeout: float) -> Result:
    return h.run_pair(raw_puller, (size, count), raw_pusher, (size, count),
                      timeout=timeout, names=("raw-pull", "raw-push"))


def run_mesh(size: int, count: int, prefetch: int | None, timeout: float) -> Result:
    mesh_name = uuid.uuid4().hex[:12]
    return h.run_pair(mesh_worker, (size, count, mesh_name, prefetch),
                      mesh_pusher, (size, count, mesh_name),
                      timeout=timeout, names=("mesh-worker", "mesh-pusher"))


def default_prefetch() -> int:
    """`AsyncNode.pull`'s default credit window."""
    from mesh import AsyncNode

    value = inspect.signature(AsyncNode.pull).parameters["prefetch"].default
    assert isinstance(value, int)
    return value


def _row(side: str, prefetch: int | None, count: int, res: Result,
         ratios: list[float]) -> dict[str, Any]:
    report = h.side(res, count)
    assert report is not None
    if side != "raw" and prefetch is None:
        prefetch = default_prefetch()
    ordered = sorted(ratios)
    return {"side": side, "count": count, "prefetch": prefetch,
            "default_prefetch": side != "raw" and prefetch == default_prefetch(), **report,
            "ratio": ordered[len(ordered) // 2] if ordered else None,
            "ratio_range": [ordered[0], ordered[-1]] if ordered else None,
            "ratios": ratios}


def _interleaved(variants: list[tuple[str, int | None, Any]], repeat: int,
                 count: int) -> list[list[Result]]:
    """Every variant once per repetition, in turn, so a ratio compares runs made side by
    side (raw pyzmq swings by 2x over minutes on a shared host); a failed run ends it."""
    results: list[list[Result]] = [[] for _ in variants]
    for _ in range(repeat):
        for runs, (_, _, run) in zip(results, variants, strict=True):
            res = run()
            runs.append(res)
            if h.failed(res, count):
                return results
    return results


COLUMNS: Final = (("side", 9), ("prefetch", 9), ("count", 9), ("msgs/s", 12),
                  ("ratio", 6), ("range", 11), ("lost", 6), ("send/s", 12))


def _print_table(rows: list[dict[str, Any]]) -> None:
    h.print_table(COLUMNS, [
        [r["side"], "-" if r["prefetch"] is None
         else f"{r['prefetch']}{'*' if r['default_prefetch'] else ''}",
         str(r["count"]), h.fmt(r, "msgs_per_s", ",.0f"), h.fmt_ratio(r["ratio"]),
         "-" if r["ratio_range"] is None else "{:.2f}-{:.2f}".format(*r["ratio_range"]),
         h.fmt(r, "lost", "d"), h.fmt(r, "send_msgs_per_s", ",.0f")]
        for r in rows])
    if any(r["default_prefetch"] for r in rows):
        print("  * the library default")
    print("  msgs/s: the median run; ratio: zeromesh / raw within each repetition, median "
          "(range)")
    for r in rows:
        if r["ratios"]:
            print(f"  prefetch {r['prefetch']}: ratios per repetition "
                  + " ".join(f"{x:.2f}" for x in r["ratios"]))
    for r in rows:
        h.print_problems(f"{r['side']} prefetch={r['prefetch']}", r)


def _prefetches(text: str) -> list[int]:
    values = [int(x) for x in text.split(",") if x.strip()]
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError("prefetch values must be at least 1")
    return values


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, help=f"messages per run (default {DEFAULT_COUNT})")
    parser.add_argument("--size", type=int, default=SIZE, help="payload bytes (default 64)")
    parser.add_argument("--prefetch", type=_prefetches, default=[1024, 4096],
                        help="comma-separated extra prefetch values for zeromesh rows, after "
                             "the library default (default 1024,4096; '' for the default only)")
    parser.add_argument("--only", choices=["raw", "zeromesh"], help="run one side only")
    h.add_run_flags(parser, quick=f"{QUICK_COUNT} messages")
    args = parser.parse_args(argv)
    h.check_run_flags(parser, args)
    loop = h.apply_loop_flag(args)
    if args.size < 1:
        parser.error("--size must be at least 1")

    count = args.count or (QUICK_COUNT if args.quick else DEFAULT_COUNT)
    repeat = args.repeat or (1 if args.quick else 3)
    variants: list[tuple[str, int | None, Any]] = []
    if args.only != "zeromesh":
        variants.append(("raw", None, partial(run_raw, args.size, count, args.timeout)))
    if args.only != "raw":
        variants += [("zeromesh", prefetch,
                      partial(run_mesh, args.size, count, prefetch, args.timeout))
                     for prefetch in [None, *args.prefetch]]
    results = _interleaved(variants, repeat, count)
    raw_runs = results[0] if args.only != "zeromesh" else []
    rows = []
    for (side, prefetch, _), runs in zip(variants, results, strict=True):
        if not runs:  # (an earlier failure ended the repetitions)
            continue
        failed = [r for r in runs if h.failed(r, count)]
        chosen = failed[0] if failed else sorted(runs, key=lambda r: r.recv_rate)[len(runs) // 2]
        ratios = [] if side == "raw" else [
            x for x in (h.ratio(res, base) for res, base in zip(runs, raw_runs, strict=False))
            if x is not None]
        rows.append(_row(side, prefetch, count, chosen, ratios))
    if args.json:
        print(json.dumps({"benchmark": "pushpull", "transport": f"tcp://{LOOPBACK}", "loop": loop,
                          "size": args.size, "count": count,
                          "raw_framing": "single frame send(payload)",
                          "repeat": repeat, "statistic": "median",
                          "ratio": "median of same-repetition ratios",
                          "python": sys.version.split()[0], "results": rows}, indent=2))
    else:
        _print_table(rows)
    return 0 if all(h.ok(r) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
