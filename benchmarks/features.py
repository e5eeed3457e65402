"""What each feature costs per message, and reliable delivery against JetStream, in one run.

Speed work must not make the features dearer (issue 18, part 4), so their cost is
measured beside the plain path, in the same run, two processes on 127.0.0.1:

* **pub/sub features**: the same small message (43 B, `typed.py`'s payload) from a
  publisher to a subscriber (``subscribe("bench.>")``, reading ``msg.data``: `typed.py`'s
  untyped subscriber), published once per variant — ``plain``; ``headers`` (a
  ``traceparent``); ``ttl`` (60 s); ``retain`` (every message is the topic's retained
  value); ``history`` (the publisher keeps the topic's history, in memory). Per variant:
  msgs/s at the subscriber, and each process's CPU microseconds per message; ``ratio`` is
  the variant's rate over ``plain``'s within each repetition (median and range).
* **reliable, acknowledged**: `spool.py`'s reliable publisher (``publish_many(...,
  reliable=True)``, fsync ``batch``) to a durable subscriber that acknowledges every
  message, end to end, against nats-py publishing to JetStream with 64 acks in flight
  (`uplink_baseline.py`'s ``publish_async`` run, a file store, a nats-server this script
  starts on 127.0.0.1 and stops). Ratio within each repetition; the issue asks ≥ 10.
  Without ``nats-server`` or nats-py (``pip install 'zeromesh[bench]'``) this part is
  skipped with the reason.

Repetitions interleave every variant (and both reliable sides), so a shared host's load
falls on all alike. The footprint (idle RSS, idle CPU, cold start) is `footprint.py`'s.

Run::

    python benchmarks/features.py                 # 200,000 messages, 3 repetitions
    python benchmarks/features.py --quick --json  # a small run, machine-readable

Everything binds 127.0.0.1 only (``ZEROMESH_INTERFACES`` is forced to it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import uuid
from collections.abc import Callable
from functools import partial
from typing import Any, Final

import _harness as h
import spool
import typed
import uplink_baseline
from _harness import LOOPBACK, Result

DEFAULT_COUNT: Final[int] = 200_000
QUICK_COUNT: Final[int] = 5_000
RELIABLE_WINDOW: Final[int] = 1_000
TRACEPARENT: Final[str] = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
VARIANTS: Final[dict[str, tuple[dict[str, Any], dict[str, Any]]]] = {
    # name: (publish keyword arguments, publisher node settings)
    "plain": ({}, {}),
    "headers": ({"headers": {"traceparent": TRACEPARENT}}, {}),
    "ttl": ({"ttl": 60.0}, {}),
    "retain": ({"retain": True}, {}),
    "history": ({}, {"history": ["bench.>"]}),
}


def run_variant(variant: str, count: int, timeout: float) -> Result:
    """`typed.py`'s untyped sides, the publisher with the variant's arguments and settings."""
    mesh_name = uuid.uuid4().hex[:12]
    kwargs, settings = VARIANTS[variant]
    return h.run_pair(typed.subscriber, (False, count, mesh_name),
                      partial(typed.publisher, kwargs=kwargs, settings=settings),
                      (False, count, mesh_name), timeout=timeout,
                      names=(f"{variant}-sub", f"{variant}-pub"))


def _reliable_missing() -> str:
    """Why the reliable comparison cannot run here ("" when it can)."""
    try:
        uplink_baseline.find_program("nats-server")
    except SystemExit:
        return "nats-server is not installed (apt-get install nats-server)"
    try:
        import nats  # noqa: F401
    except ImportError:
        return "nats-py is not installed (pip install 'zeromesh[bench]')"
    return ""


def run_jetstream(count: int, timeout: float) -> uplink_baseline.Run:
    """JetStream acknowledged publishes, 64 in flight, for about as long as a run here."""
    async def one() -> uplink_baseline.Run:
        with uplink_baseline.nats_server() as port:
            async with asyncio.timeout(timeout):
                return await uplink_baseline.jetstream_run(
                    f"nats://{LOOPBACK}:{port}", "publish_async", seconds=2.0,
                    max_count=count)
    return h.mesh_run(one())  # type: ignore[no-any-return]


def _ratios(runs: list[float], bases: list[float]) -> dict[str, Any]:
    ratios = [r / b for r, b in zip(runs, bases, strict=False) if b]
    ordered = sorted(ratios)
    return {"ratio": ordered[len(ordered) // 2] if ordered else None,
            "ratio_range": [ordered[0], ordered[-1]] if ordered else None, "ratios": ratios}


def measure(count: int, repeat: int, timeout: float, reliable: bool,
            progress: Callable[[str], None]) -> dict[str, Any]:
    """Every variant (and both reliable sides) once per repetition, in turn."""
    runs: dict[str, list[Result]] = {v: [] for v in VARIANTS}
    mesh_reliable: list[spool.SpoolResult] = []
    jetstream: list[uplink_baseline.Run] = []
    for n in range(1, repeat + 1):
        for variant in VARIANTS:
            res = run_variant(variant, count, timeout)
            runs[variant].append(res)
            progress(f"rep {n} {variant:8} {res.recv_rate:12,.0f} msgs/s {res.error}")
            if h.failed(res, count):
                return {"runs": runs, "mesh_reliable": mesh_reliable, "jetstream": jetstream}
        if reliable:
            mres = spool.run_mesh("batch", count, RELIABLE_WINDOW, timeout)
            mesh_reliable.append(mres)
            rate = mres.received / mres.e2e_seconds if mres.e2e_seconds else 0.0
            progress(f"rep {n} reliable {rate:12,.0f} msgs/s {mres.error}")
            js = run_jetstream(count, timeout)
            jetstream.append(js)
            progress(f"rep {n} jetstream {js.rate:11,.0f} msgs/s {js.error}")
    return {"runs": runs, "mesh_reliable": mesh_reliable, "jetstream": jetstream}


def report(measured: dict[str, Any], count: int) -> dict[str, Any]:
    runs: dict[str, list[Result]] = measured["runs"]
    plain = [r.recv_rate for r in runs["plain"]]
    variants = {v: {**typed.summary(rs, count), **_ratios([r.recv_rate for r in rs], plain)}
                for v, rs in runs.items() if rs}
    out: dict[str, Any] = {"variants": variants}
    mres: list[spool.SpoolResult] = measured["mesh_reliable"]
    js: list[uplink_baseline.Run] = measured["jetstream"]
    if mres and js:
        mesh_rates = [r.received / r.e2e_seconds if r.e2e_seconds else 0.0 for r in mres]
        js_rates = [r.rate for r in js]
        out["reliable"] = {
            "zeromesh_msgs_per_s": sorted(mesh_rates)[len(mesh_rates) // 2],
            "jetstream_msgs_per_s": sorted(js_rates)[len(js_rates) // 2],
            "errors": [r.error for r in mres if r.error] + [r.error for r in js if r.error],
            **_ratios(mesh_rates, js_rates)}
    return out


COLUMNS: Final = (("variant", 9), ("msgs/s", 11), ("ratio", 6), ("range", 11),
                  ("sub CPU us/msg", 15), ("pub CPU us/msg", 15))


def _print(out: dict[str, Any], reliable_skip: str) -> None:
    h.print_table(COLUMNS, [[
        name, h.fmt(side, "msgs_per_s", ",.0f"), h.fmt_ratio(side["ratio"]),
        "-" if side["ratio_range"] is None else "{:.2f}-{:.2f}".format(*side["ratio_range"]),
        h.fmt(side, "sub_cpu_us", ".2f"), h.fmt(side, "pub_cpu_us", ".2f")]
        for name, side in out["variants"].items()])
    print("  ratio: the variant's rate over plain's within each repetition, median (range)")
    rel = out.get("reliable")
    if rel is not None:
        print(f"reliable, acked: zeromesh {rel['zeromesh_msgs_per_s']:,.0f} msgs/s, JetStream "
              f"{rel['jetstream_msgs_per_s']:,.0f} msgs/s; ratio {h.fmt_ratio(rel['ratio'])} "
              f"({' '.join(f'{x:.1f}' for x in rel['ratios'])})")
        for error in rel["errors"]:
            print(f"  ! {error}")
    elif reliable_skip:
        print(f"reliable, acked: skipped, {reliable_skip}")
    for name, side in out["variants"].items():
        h.print_problems(name, side)


def _progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, help=f"messages per run (default {DEFAULT_COUNT})")
    parser.add_argument("--no-reliable", action="store_true",
                        help="skip the reliable / JetStream comparison")
    h.add_run_flags(parser, quick=f"{QUICK_COUNT} messages, one repetition")
    args = parser.parse_args(argv)
    h.check_run_flags(parser, args)
    loop = h.apply_loop_flag(args)
    count = args.count or (QUICK_COUNT if args.quick else DEFAULT_COUNT)
    repeat = args.repeat or (1 if args.quick else 3)
    skip = "--no-reliable" if args.no_reliable else _reliable_missing()
    measured = measure(count, repeat, args.timeout, not skip, _progress)
    out = report(measured, count)
    ok = (all(len(rs) == repeat for rs in measured["runs"].values())
          and all(h.ok(side) for side in out["variants"].values())
          and not (out.get("reliable") or {}).get("errors"))
    if args.json:
        print(json.dumps({"benchmark": "features", "transport": f"tcp://{LOOPBACK}",
                          "loop": loop, "count": count, "repeat": repeat,
                          "python": sys.version.split()[0], "reliable_skipped": skip,
                          **out}, indent=2))
    else:
        print(f"zeromesh event loop: {loop}")
        _print(out, skip)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
