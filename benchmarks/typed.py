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
median of each is reported with their ratio (typed / untyped).

Run::

    python benchmarks/typed.py                  # 300,000 messages, 3 runs of each
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

import msgspec

import _harness as h
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
            sub = await node.subscribe("bench.>", type=Reading if typed else None,
                                       max_pending=count + 1)
            link.ready.put(node.endpoints["ctl"][0])
            # What each message is read as: the decoded Struct, or the bytes.
            want: object = READING if typed else PAYLOAD
            async with asyncio.timeout(link.left()):
                first = await sub.next()
                t0 = time.perf_counter()
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


def publisher(typed: bool, count: int, mesh_name: str, peer: str, link: Link) -> None:
    h.mesh_run(_publisher(typed, count, mesh_name, peer, link))


async def _publisher(typed: bool, count: int, mesh_name: str, peer: str, link: Link) -> None:
    from mesh import AsyncNode

    data: Reading | bytes = READING if typed else PAYLOAD
    try:
        async with AsyncNode(**_node_settings("bench-pub", mesh_name, peers=[peer])) as node:
            await node.wait_for_subscribers(TOPIC, 1, timeout=link.left(0.1))
            publish = node.publish
            t0 = time.perf_counter()
            for _ in range(count):
                await publish(TOPIC, data)
            await asyncio.sleep(0)  # the last partial batch leaves here
            link.report("send_seconds", time.perf_counter() - t0)
            await link.wait_done()  # sockets close with linger 0: stay up until then
    except Exception as exc:
        link.report("error", f"publisher: {exc!r}")


def run(typed: bool, count: int, timeout: float) -> Result:
    mesh_name = uuid.uuid4().hex[:12]
    return h.run_pair(subscriber, (typed, count, mesh_name), publisher,
                      (typed, count, mesh_name), timeout=timeout,
                      names=("typed-sub" if typed else "bytes-sub",
                             "typed-pub" if typed else "bytes-pub"))


def measure(count: int, repeat: int, timeout: float) -> tuple[Result, Result]:
    """The median untyped and typed runs, alternating (a failed run is returned at once)."""
    runs: dict[bool, list[Result]] = {False: [], True: []}
    for _ in range(repeat):
        for typed in (False, True):
            res = run(typed, count, timeout)
            if h.failed(res, count):
                other = runs[not typed][-1] if runs[not typed] else Result()
                return (other, res) if typed else (res, other)
            runs[typed].append(res)
    medians = [sorted(rs, key=lambda r: r.recv_rate)[len(rs) // 2] for rs in runs.values()]
    return medians[0], medians[1]


COLUMNS: Final = (("payload", 8), ("count", 9), ("bytes msg/s", 12), ("typed msg/s", 12),
                  ("ratio", 6), ("bytes send/s", 13), ("typed send/s", 13))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, help=f"messages per run (default {DEFAULT_COUNT})")
    h.add_run_flags(parser, quick=f"{QUICK_COUNT} messages, one run of each")
    args = parser.parse_args(argv)
    h.check_run_flags(parser, args)
    loop = h.apply_loop_flag(args)
    count = args.count or (QUICK_COUNT if args.quick else DEFAULT_COUNT)
    repeat = args.repeat or (1 if args.quick else 3)
    untyped, typed = measure(count, repeat, args.timeout)
    sides = {"bytes": h.side(untyped, count), "typed": h.side(typed, count)}
    ratio = h.ratio(typed, untyped)
    if args.json:
        print(json.dumps({"benchmark": "typed", "transport": f"tcp://{LOOPBACK}", "loop": loop,
                          "payload": f"Reading struct, {len(PAYLOAD)} B msgpack",
                          "count": count, "repeat": repeat, "statistic": "median",
                          "python": sys.version.split()[0], **sides, "ratio": ratio},
                         indent=2))
    else:
        print(f"zeromesh event loop: {loop}")
        fmt = h.fmt
        h.print_table(COLUMNS, [[
            f"{len(PAYLOAD)}B", str(count), fmt(sides["bytes"], "msgs_per_s", ",.0f"),
            fmt(sides["typed"], "msgs_per_s", ",.0f"), h.fmt_ratio(ratio),
            fmt(sides["bytes"], "send_msgs_per_s", ",.0f"),
            fmt(sides["typed"], "send_msgs_per_s", ",.0f")]])
        for name, side in sides.items():
            h.print_problems(name, side)
    return 0 if all(h.ok(s) for s in sides.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
