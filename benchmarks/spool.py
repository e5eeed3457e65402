"""Reliable pub/sub throughput through the disk spool, per fsync policy, with the raw fsync floor.

For each fsync policy (``batch``, ``always``, ``off``) N reliable messages of
128 B go from a publisher process to a durable subscriber process on
127.0.0.1:

* the **subscriber** (`AsyncNode` with its own data dir, ``fsync=<policy>``)
  opens ``subscribe_durable("bench.>", "bench")``, consumes it with
  ``async for`` (each message acknowledged when the next is asked for) and
  counts distinct messages by the index in their first 8 bytes, so loss and
  duplicates are both seen; sampled payloads are checked intact;
* the **publisher** (`AsyncNode` with its own data dir, same policy) waits
  until it has seen the durable (``wait_for_workers`` on its queue), then
  publishes N times with ``reliable=True`` in windows of ``--window``
  concurrent publishes (``asyncio.gather``), so everything spooled in one
  loop iteration shares one append and one fsync (group commit). It then
  waits until its spool is empty (every message acknowledged by the durable).

Reported per policy: ``publish/s`` (N over the publisher's publish loop: every
message on disk in its spool), ``e2e/s`` (N over the time from the first
publish to the last message at the subscriber), ``drained/s`` (N over the time
until the publisher's spool was empty), CPU µs per message on each side
(``time.process_time``, every thread of the process: the publisher from its
first publish until drained, the subscriber while it received; on a shared
machine this is steadier than wall clock), loss and duplicates.

In the same run, the **raw floor** on the same file system, 128 B records in a
plain file, no framing, no checksum:

* ``fsync/record``: ``write`` + ``fsync`` per record, single thread;
* ``group 1 ms``: records are added to a buffer as fast as one thread can
  for 1 ms, then what accumulated is one ``write`` and one ``fsync``, and
  again. Records/s counts only records covered by a completed fsync. The
  buffering is nearly free, so this is the disk's bandwidth ceiling for
  128 B records; the table shows records per fsync and ms per fsync;
* ``group 1 ms @100k``: the same, paced at the target's 100,000 records/s
  offered (100 records per commit, a commit every 1 ms while the disk keeps
  up): whether the disk alone could carry the target with 1 ms group commit.

Run::

    python benchmarks/spool.py                   # 200,000 msgs (20,000 for always)
    python benchmarks/spool.py --policies batch --count 500000
    python benchmarks/spool.py --quick --json    # a small run, machine-readable

Everything binds 127.0.0.1 only (``ZEROMESH_INTERFACES`` is forced to it);
files live in a temporary directory under /tmp, removed at the end. The
issue's target is ``batch`` >= 100,000 msgs/s end to end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import struct
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import _harness as h
from _harness import LOOPBACK, SAMPLE_EVERY, STALL_SECONDS, Link, Result, make_payload

SIZE: Final[int] = 128
POLICIES: Final[tuple[str, ...]] = ("batch", "always", "off")
DEFAULT_COUNTS: Final[dict[str, int]] = {"batch": 200_000, "always": 20_000, "off": 200_000}
QUICK_COUNTS: Final[dict[str, int]] = {"batch": 5_000, "always": 1_000, "off": 5_000}
DEFAULT_WINDOW: Final[int] = 1_000
TOPIC: Final[str] = "bench.data"
DURABLE: Final[str] = "bench"
TARGET: Final[float] = 100_000.0
"""The issue's target for ``batch``, end to end, msgs/s."""
_INDEX: Final = struct.Struct("<Q")


def indexed_payload(base: bytes, index: int) -> bytes:
    """`base` with its first 8 bytes replaced by `index`."""
    return _INDEX.pack(index) + base[_INDEX.size:]


@dataclass
class SpoolResult(Result):
    """The subscriber's view, plus the publisher-side timings it was handed."""

    duplicates: int = 0
    e2e_seconds: float = 0.0
    """From the publisher's first publish to the last new message here."""
    drain_seconds: float = 0.0
    """From the publisher's first publish until its spool was empty."""
    sub_cpu_seconds: float = 0.0
    """CPU time (all threads) of the subscriber process while it received."""
    pub_cpu_seconds: float = 0.0
    """CPU time (all threads) of the publisher from its first publish until drained."""


# -- zeromesh --------------------------------------------------------------------


def durable_subscriber(policy: str, count: int, mesh_name: str, data_dir: str,
                       link: Link) -> None:
    h.mesh_run(_durable_subscriber(policy, count, mesh_name, data_dir, link))


async def _durable_subscriber(policy: str, count: int, mesh_name: str, data_dir: str,
                              link: Link) -> None:
    from mesh import AsyncNode, Message

    base = make_payload(SIZE)
    tail = base[_INDEX.size:]
    res = SpoolResult()
    seen = bytearray(count)
    msg: Message | None = None
    try:
        async with AsyncNode(name="bench-durable", mesh=mesh_name, interfaces=[LOOPBACK],
                             mdns=False, data_dir=data_dir, fsync=policy) as node:
            durable = await node.subscribe_durable("bench.>", DURABLE)
            link.ready.put((node.endpoints["ctl"][0], node.id))
            received = corrupt = duplicates = 0
            t_first = t_last = 0.0
            cpu0 = time.process_time()
            async with asyncio.timeout(link.left()):
                while received < count:
                    msg = await durable.next(timeout=STALL_SECONDS)
                    if not msg.reliable:
                        continue
                    data = msg.data
                    index = _INDEX.unpack_from(data)[0] if len(data) >= _INDEX.size else count
                    if index >= count:
                        corrupt += 1
                        continue
                    if seen[index]:
                        duplicates += 1
                        continue
                    seen[index] = 1
                    received += 1
                    res.received = received
                    if received == 1:
                        t_first = time.monotonic()
                    if received % SAMPLE_EVERY == 0 or received == count:
                        corrupt += data[_INDEX.size:] != tail
                t_last = time.monotonic()
                if msg is not None:  # the last one; asking for the next acknowledged the others
                    msg.ack()
                res.sub_cpu_seconds = time.process_time() - cpu0
            res.received, res.corrupt, res.duplicates = received, corrupt, duplicates
            res.recv_seconds = t_last - t_first
            # The publisher hands over when it started and when its spool was empty.
            t0, drained, res.pub_cpu_seconds = await asyncio.to_thread(
                link.ready.get, True, link.left(0.1))
            res.e2e_seconds = t_last - t0
            res.drain_seconds = drained - t0 if drained else 0.0
    except TimeoutError:
        res.error = f"durable subscriber: timed out after {res.received} of {count}"
    except Exception as exc:
        res.error = f"durable subscriber: {exc!r}"
    finally:
        link.report("result", res)
        link.done.set()


def reliable_publisher(policy: str, count: int, window: int, mesh_name: str, data_dir: str,
                       peer: tuple[str, str], link: Link) -> None:
    h.mesh_run(_reliable_publisher(policy, count, window, mesh_name, data_dir, peer, link))


async def _reliable_publisher(policy: str, count: int, window: int, mesh_name: str,
                              data_dir: str, peer: tuple[str, str], link: Link) -> None:
    from mesh import AsyncNode

    endpoint, durable_node = peer
    base = make_payload(SIZE)
    payloads = [indexed_payload(base, i) for i in range(count)]
    t0, drained, cpu = time.monotonic(), 0.0, 0.0
    try:
        async with AsyncNode(name="bench-pub", mesh=mesh_name, interfaces=[LOOPBACK],
                             mdns=False, peers=[endpoint], data_dir=data_dir,
                             fsync=policy) as node:
            await node.wait_for_workers(f"_durable.{durable_node}.{DURABLE}", 1,
                                        timeout=link.left(0.1))
            publish_many = node.publish_many
            t0, cpu0 = time.monotonic(), time.process_time()
            for start in range(0, count, window):  # each window: on disk before the next
                await publish_many(TOPIC, payloads[start:start + window], reliable=True)
            link.report("send_seconds", time.monotonic() - t0)
            try:
                await node.wait_for_spool(timeout=link.left(0.1))
                drained = time.monotonic()
                cpu = time.process_time() - cpu0
            finally:
                link.ready.put((t0, drained, cpu))
                # Stay up until the subscriber is done (its last ack must land).
                await link.wait_done()
    except Exception as exc:
        link.report("error", f"reliable publisher: {exc!r}")


def run_mesh(policy: str, count: int, window: int, timeout: float) -> SpoolResult:
    mesh_name = f"bench-spool-{uuid.uuid4().hex[:12]}"
    root = Path(tempfile.mkdtemp(prefix="zeromesh-bench-spool-", dir="/tmp"))
    try:
        res = h.run_pair(durable_subscriber, (policy, count, mesh_name, str(root / "sub")),
                         reliable_publisher,
                         (policy, count, window, mesh_name, str(root / "pub")),
                         timeout=timeout, names=("durable-sub", "reliable-pub"))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if not isinstance(res, SpoolResult):  # the subscriber never reported
        res = SpoolResult(received=res.received, send_seconds=res.send_seconds,
                          error=res.error)
    return res


# -- the raw floor -----------------------------------------------------------------


def floor_fsync_per_record(path: Path, seconds: float) -> dict[str, Any]:
    """write + fsync per 128 B record for about `seconds`."""
    record = make_payload(SIZE)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        n = 0
        t0 = time.perf_counter()
        end = t0 + seconds
        while True:
            os.write(fd, record)
            os.fsync(fd)
            n += 1
            if n % 64 == 0 and time.perf_counter() > end:
                break
        elapsed = time.perf_counter() - t0
    finally:
        os.close(fd)
    return {"records": n, "seconds": elapsed, "records_per_s": n / elapsed,
            "fsyncs_per_s": n / elapsed, "records_per_commit": 1.0,
            "commit_every_s": elapsed / n}


def floor_group_commit(path: Path, seconds: float, interval: float = 0.001,
                       offered: float | None = None) -> dict[str, Any]:
    """One write + one fsync every `interval` of what accumulated meanwhile.

    With `offered` (records/s), each tick commits ``offered * interval``
    records and then sleeps to the next tick, so the commits really are
    `interval` apart while the disk keeps up. Without it, records are buffered
    flat out for `interval` and then committed: buffering is nearly free, so a
    commit carries far more than 1 ms of any real sender's output and takes
    longer; that is the disk's bandwidth ceiling for 128 B records. Only
    records covered by a completed fsync count.
    """
    record = make_payload(SIZE)
    chunk = 64
    block = record * chunk
    per_tick = max(1, round(offered * interval)) if offered else 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    committed = commits = 0
    try:
        clock = time.perf_counter
        t0 = clock()
        end = t0 + seconds
        tick = t0
        while clock() < end:
            if per_tick:
                data = b"".join([record] * per_tick)
                n = per_tick
            else:
                stop_at = clock() + interval
                buffer = []
                while clock() < stop_at:
                    buffer.append(block)
                data, n = b"".join(buffer), len(buffer) * chunk
            os.write(fd, data)
            os.fsync(fd)
            committed += n
            commits += 1
            if per_tick:
                tick = max(tick + interval, clock() - interval)  # no catch-up burst
                delay = tick - clock()
                if delay > 0:
                    time.sleep(delay)
        elapsed = clock() - t0
    finally:
        os.close(fd)
    return {"records": committed, "seconds": elapsed, "records_per_s": committed / elapsed,
            "fsyncs_per_s": commits / elapsed, "interval_s": interval, "offered": offered,
            "records_per_commit": committed / max(commits, 1),
            "commit_every_s": elapsed / max(commits, 1)}


def run_floor(seconds: float) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="zeromesh-bench-floor-", dir="/tmp"))
    try:
        return {"fsync_per_record": floor_fsync_per_record(root / "per-record", seconds),
                "group_commit_1ms": floor_group_commit(root / "group", seconds),
                "group_commit_1ms_at_target": floor_group_commit(root / "paced", seconds,
                                                                 offered=TARGET)}
    finally:
        shutil.rmtree(root, ignore_errors=True)


# -- orchestration -------------------------------------------------------------------


def _row(policy: str, count: int, window: int, res: SpoolResult) -> dict[str, Any]:
    def rate(seconds: float) -> float:
        return count / seconds if seconds > 0 else 0.0

    return {"policy": policy, "count": count, "window": window, "size": SIZE,
            "received": res.received, "lost": count - res.received,
            "duplicates": res.duplicates, "corrupt": res.corrupt, "error": res.error,
            "publish_msgs_per_s": rate(res.send_seconds),
            "e2e_msgs_per_s": rate(res.e2e_seconds),
            "drained_msgs_per_s": rate(res.drain_seconds),
            "pub_cpu_us_per_msg": res.pub_cpu_seconds * 1e6 / count,
            "sub_cpu_us_per_msg": res.sub_cpu_seconds * 1e6 / count,
            "recv_msgs_per_s": res.recv_rate,
            "send_seconds": res.send_seconds, "e2e_seconds": res.e2e_seconds,
            "drain_seconds": res.drain_seconds, "recv_seconds": res.recv_seconds}


def _ok(row: dict[str, Any]) -> bool:
    return row["lost"] == 0 and not row["corrupt"] and not row["error"]


COLUMNS: Final = (("fsync", 7), ("count", 8), ("publish/s", 11), ("e2e/s", 10),
                  ("drained/s", 10), ("pub µs/msg", 10), ("sub µs/msg", 10), ("lost", 5),
                  ("dups", 5))
FLOOR_COLUMNS: Final = (("raw floor (128 B)", 18), ("records/s", 11), ("fsyncs/s", 10),
                        ("records/fsync", 14), ("ms/fsync", 9))


def _print_report(rows: list[dict[str, Any]], floor: dict[str, Any] | None) -> None:
    h.print_table(COLUMNS, [
        [r["policy"], str(r["count"]), f"{r['publish_msgs_per_s']:,.0f}",
         f"{r['e2e_msgs_per_s']:,.0f}", f"{r['drained_msgs_per_s']:,.0f}",
         f"{r['pub_cpu_us_per_msg']:.1f}", f"{r['sub_cpu_us_per_msg']:.1f}", str(r["lost"]),
         str(r["duplicates"])] for r in rows])
    for r in rows:
        if r["error"] or r["corrupt"]:
            print(f"  {r['policy']}: corrupt={r['corrupt']} error={r['error'] or '-'}")
    if floor is not None:
        print()
        h.print_table(FLOOR_COLUMNS, [
            [label, f"{floor[key]['records_per_s']:,.0f}", f"{floor[key]['fsyncs_per_s']:,.0f}",
             f"{floor[key]['records_per_commit']:,.0f}",
             f"{floor[key]['commit_every_s'] * 1000:.2f}"]
            for label, key in (("fsync/record", "fsync_per_record"),
                               ("group 1 ms", "group_commit_1ms"),
                               ("group 1 ms @100k", "group_commit_1ms_at_target"))])
    batch = next((r for r in rows if r["policy"] == "batch"), None)
    if batch is not None:
        verdict = "met" if batch["e2e_msgs_per_s"] >= TARGET else "NOT met"
        print(f"\ntarget: batch >= {TARGET:,.0f} msgs/s end to end: {verdict} "
              f"({batch['e2e_msgs_per_s']:,.0f})")


def _policies(text: str) -> list[str]:
    names = [p for p in text.split(",") if p]
    bad = [p for p in names if p not in POLICIES]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"policies are {','.join(POLICIES)}")
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int,
                        help="messages per policy (default 200k; 20k for always)")
    h.add_loop_flag(parser)
    parser.add_argument("--policies", type=_policies, default=list(POLICIES),
                        help="comma-separated fsync policies (default batch,always,off)")
    parser.add_argument("--window", type=int, default=DEFAULT_WINDOW,
                        help="concurrent publishes per gather (default %(default)s)")
    parser.add_argument("--floor-seconds", type=float, default=None,
                        help="seconds per raw floor measurement (default 2, 0.5 with --quick; "
                             "0 skips it)")
    parser.add_argument("--quick", action="store_true",
                        help="5,000 messages (1,000 for always), short floor")
    parser.add_argument("--timeout", type=float, default=180.0, help="hard limit per policy, s")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    args = parser.parse_args(argv)
    loop = h.apply_loop_flag(args)
    if args.count is not None and args.count < 1:
        parser.error("--count must be at least 1")
    if args.window < 1:
        parser.error("--window must be at least 1")
    floor_seconds = args.floor_seconds if args.floor_seconds is not None else (
        0.5 if args.quick else 2.0)

    floor = run_floor(floor_seconds) if floor_seconds > 0 else None
    rows = []
    for policy in args.policies:
        count = args.count or (QUICK_COUNTS if args.quick else DEFAULT_COUNTS)[policy]
        rows.append(_row(policy, count, args.window,
                         run_mesh(policy, count, args.window, args.timeout)))
    if args.json:
        print(json.dumps({"benchmark": "spool", "transport": f"tcp://{LOOPBACK}", "loop": loop,
                          "size": SIZE, "target_batch_e2e_msgs_per_s": TARGET,
                          "python": sys.version.split()[0], "cpus": os.cpu_count(),
                          "results": rows, "floor": floor}, indent=2))
    else:
        print(f"zeromesh event loop: {loop}")
        _print_report(rows, floor)
    return 0 if all(_ok(r) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
