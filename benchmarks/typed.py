"""Typed pub/sub: a small msgspec Struct against the same bytes untyped, two processes.

The payload is a small Struct (``Reading(sensor, celsius, seq)``, 43 bytes of
MessagePack). Each measurement sends N messages from one process to another:

* **untyped**: the publisher sends the Struct's MessagePack bytes
  (``publish(topic, payload)``); the subscriber (``subscribe("bench.>")``)
  reads ``msg.data``.
* **typed**: the publisher sends the Struct itself (``publish(topic,
  reading)``: encoded per message, labelled ``content-type:
  application/msgpack``); the subscriber (``subscribe("bench.>",
  type=Reading)``) reads ``msg.value``, decoded per message.

Otherwise as `pubsub.py`: static peering, no mDNS, ``pub_hwm=0, sub_hwm=0``,
lossless; receivers time first to last message, check that all arrived and
sample payloads. The two kinds alternate run by run (untyped, typed,
untyped, ...), so load on a shared machine falls on both alike, and the
median of each is reported with their ratio (typed / untyped). Each process
also measures its CPU time per message; on a loaded machine wall-clock rates
swing with the other jobs, CPU time much less, so the ratio it implies (the
sum of both sides' CPU per message sets the pace on 2 cores) is printed too.

Run::

    python benchmarks/typed.py                  # 300,000 messages, 5 runs of each
    python benchmarks/typed.py --quick --json   # a small run, machine-readable

Everything binds 127.0.0.1 only (``ZEROMESH_INTERFACES`` is forced to it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import uuid
from typing import Any, Final

import _harness as h
import msgspec
from _harness import LOOPBACK, SAMPLE_EVERY, Link, Result

DEFAULT_COUNT: Final[int] = 300_000
QUICK_COUNT: Final[int] = 5_000
TOPIC: Final[str] = "bench.typed"


class Reading(msgspec.Struct):
    sensor: str
    celsius: float
    seq: int


READING: Final = Reading("greenhouse-7", 21.5, 42)
PAYLOAD: Final = msgspec.msgpack.encode(READING)


def _node_settings(name: str, mesh_name: str, **more: Any) -> dict[str, Any]:
    return {"name": name, "mesh": mesh_name, "interfaces": [LOOPBACK], "mdns": False,
            "pub_hwm": 0, "sub_hwm": 0, **more}


def subscriber(typed: bool, count: int, mesh_name: str, link: Link) -> None:
    h.mesh_run(_subscriber(typed, count, mesh_name, link))


async def _subscriber(typed: bool, count: int, mesh_name: str, link: Link) -> None:
    from mesh import AsyncNode

    res = Result()
    try:
        async with AsyncNode(**_node_settings("bench-sub", mesh_name)) as node:
            # Live messages only: a gather of retained values would hold the first ones
            # back, and (`features.py`'s retain variant) could answer with the publisher's
            # newest value in place of the messages before it.
            sub = await node.subscribe("bench.>", type=Reading if typed else None,
                                       max_pending=count + 1, retained=False)
            link.ready.put(node.endpoints["ctl"][0])
            # What each message is read as: the decoded Struct, or the bytes.
            want: object = READING if typed else PAYLOAD
            async with asyncio.timeout(link.left()):
                first = await sub.next()
                t0, cpu0 = time.perf_counter(), time.process_time()
                received = 1
                corrupt = int((first.value if typed else first.data) != want)
                if received < count:
                    async for msg in sub:
                        got = msg.value if typed else msg.data
                        received += 1
                        if received % SAMPLE_EVERY == 0 or received == count:
                            corrupt += got != want
                        if received == count:
                            break
                res.recv_seconds = time.perf_counter() - t0
                res.recv_cpu_seconds = time.process_time() - cpu0
            res.received, res.corrupt = received, corrupt
            if node.stats["dropped"] or sub.decode_errors:
                res.error = (f"subscriber: {node.stats['dropped']} dropped, "
                             f"{sub.decode_errors} undecodable")
    except TimeoutError:
        res.error = f"subscriber: timed out after {res.received} of {count}"
    except Exception as exc:
        res.error = f"subscriber: {exc!r}"
    finally:
        link.report("result", res)
        link.done.set()


def publisher(typed: bool, count: int, mesh_name: str, peer: str, link: Link, *,
              kwargs: dict[str, Any] | None = None,
              settings: dict[str, Any] | None = None) -> None:
    """`kwargs`: more `publish` arguments (headers, ttl, retain...); `settings`: more
    `AsyncNode` settings (`features.py`'s variants)."""
    h.mesh_run(_publisher(typed, count, mesh_name, peer, link, kwargs or {}, settings or {}))


async def _publisher(typed: bool, count: int, mesh_name: str, peer: str, link: Link,
                     kwargs: dict[str, Any], settings: dict[str, Any]) -> None:
    from mesh import AsyncNode

    data: Reading | bytes = READING if typed else PAYLOAD
    try:
        async with AsyncNode(**_node_settings("bench-pub", mesh_name, peers=[peer],
                                              **settings)) as node:
            await node.wait_for_subscribers(TOPIC, 1, timeout=link.left(0.1))
            publish = node.publish
            t0, cpu0 = time.perf_counter(), time.process_time()
            for _ in range(count):
                await publish(TOPIC, data, **kwargs)
            await asyncio.sleep(0)  # the last partial batch leaves here
            link.report("send_seconds", time.perf_counter() - t0)
            link.report("send_cpu_seconds", time.process_time() - cpu0)
            await link.wait_done()  # sockets close with linger 0: stay up until then
    except Exception as exc:
        link.report("error", f"publisher: {exc!r}")


def run(typed: bool, count: int, timeout: float) -> Result:
    mesh_name = uuid.uuid4().hex[:12]
    return h.run_pair(subscriber, (typed, count, mesh_name), publisher,
                      (typed, count, mesh_name), timeout=timeout,
                      names=("typed-sub" if typed else "bytes-sub",
                             "typed-pub" if typed else "bytes-pub"))


def measure(count: int, repeat: int, timeout: float) -> dict[bool, list[Result]]:
    """`repeat` untyped and typed runs, alternating (stops at a failed run: it is reported)."""
    runs: dict[bool, list[Result]] = {False: [], True: []}
    for _ in range(repeat):
        for typed in (False, True):
            res = run(typed, count, timeout)
            runs[typed].append(res)
            if h.failed(res, count):
                return runs
    return runs


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2] if values else 0.0


def summary(results: list[Result], count: int) -> dict[str, Any]:
    """The median run (by receive rate), and the median CPU microseconds per message of
    each process over all runs."""
    failed = [r for r in results if h.failed(r, count)]
    median = failed[0] if failed else sorted(results, key=lambda r: r.recv_rate)[
        len(results) // 2]
    side = h.side(median, count) or {}
    return {**side,
            "sub_cpu_us": _median([r.recv_cpu_seconds / max(1, r.received - 1) * 1e6
                                   for r in results]),
            "pub_cpu_us": _median([r.send_cpu_seconds / count * 1e6 for r in results])}


def _cpu_ratio(untyped: dict[str, Any], typed: dict[str, Any]) -> float | None:
    """Throughput typed / untyped as CPU time predicts it: on 2 cores the two loops and
    their ZeroMQ I/O threads share the CPU, so the rate follows the sum of both sides'
    CPU per message (README, "What stands in the way")."""
    spent = typed["sub_cpu_us"] + typed["pub_cpu_us"]
    return (untyped["sub_cpu_us"] + untyped["pub_cpu_us"]) / spent if spent else None


COLUMNS: Final = (("payload", 12), ("count", 8), ("msg/s", 10), ("send/s", 10),
                  ("sub CPU us/msg", 15), ("pub CPU us/msg", 15))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, help=f"messages per run (default {DEFAULT_COUNT})")
    h.add_run_flags(parser, quick=f"{QUICK_COUNT} messages, one run of each")
    args = parser.parse_args(argv)
    h.check_run_flags(parser, args)
    loop = h.apply_loop_flag(args)
    count = args.count or (QUICK_COUNT if args.quick else DEFAULT_COUNT)
    repeat = args.repeat or (1 if args.quick else 5)
    runs = measure(count, repeat, args.timeout)
    sides = {"bytes": summary(runs[False], count), "typed": summary(runs[True], count)}
    ok = all(runs.values()) and all(h.ok(s) for s in sides.values())
    ratio = h.ratio(*(sorted(rs, key=lambda r: r.recv_rate)[len(rs) // 2]
                      for rs in (runs[True], runs[False]))) if ok else None
    cpu_ratio = _cpu_ratio(sides["bytes"], sides["typed"]) if ok else None
    if args.json:
        print(json.dumps({"benchmark": "typed", "transport": f"tcp://{LOOPBACK}", "loop": loop,
                          "payload": f"Reading struct, {len(PAYLOAD)} B msgpack",
                          "count": count, "repeat": repeat, "statistic": "median",
                          "python": sys.version.split()[0], **sides, "ratio": ratio,
                          "cpu_ratio": cpu_ratio}, indent=2))
    else:
        print(f"zeromesh event loop: {loop}")
        fmt = h.fmt
        h.print_table(COLUMNS, [[
            f"{name} {len(PAYLOAD)}B", str(count), fmt(side, "msgs_per_s", ",.0f"),
            fmt(side, "send_msgs_per_s", ",.0f"), fmt(side, "sub_cpu_us", ".2f"),
            fmt(side, "pub_cpu_us", ".2f")] for name, side in sides.items()])
        print(f"typed / bytes: {h.fmt_ratio(ratio)} measured, {h.fmt_ratio(cpu_ratio)} by CPU "
              "time (sum of both processes' per message)")
        for name, side in sides.items():
            h.print_problems(name, side)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
