"""Request/reply: raw pyzmq DEALER/ROUTER against zeromesh, two processes on 127.0.0.1.

Both sides run the same two phases against an echo server in another process,
with a 64-byte payload:

* **latency**: one request in flight; p50 and p99 of the round trip, over N
  requests after a warm-up;
* **throughput**: 64 requests in flight; replies per second over M requests.

The sides:

* **raw**: pyzmq's blocking API. The server is a ROUTER bound on
  ``tcp://127.0.0.1:<random>`` answering ``[id, body]`` with ``[id, body]``;
  the client a DEALER sending single frames. Throughput keeps 64 sends
  outstanding (a reply frees a slot).
* **zeromesh**: a server process (`AsyncNode`, ``serve("bench.echo", handler)``
  with a plain-function handler returning the body) and a client process
  (`AsyncNode`, ``await node.request(...)``; for throughput 64 coroutines each
  with one request in flight). Static peering, no mDNS.

Every reply is checked against its request. Each phase has a hard timeout and
its processes are killed if they overrun.

Run::

    python benchmarks/reqrep.py                # 10,000 latency samples, 100,000 for throughput
    python benchmarks/reqrep.py --quick --json # a small run, machine-readable

Everything binds 127.0.0.1 only (``ZEROMESH_INTERFACES`` is forced to it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import queue
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any, Final

import _harness as h

LOOPBACK: Final[str] = "127.0.0.1"
SIZE: Final[int] = 64
IN_FLIGHT: Final[int] = 64
WARMUP: Final[int] = 500
DEFAULT_LATENCY_COUNT: Final[int] = 10_000
DEFAULT_THROUGHPUT_COUNT: Final[int] = 100_000
QUICK_LATENCY_COUNT: Final[int] = 1_000
QUICK_THROUGHPUT_COUNT: Final[int] = 5_000
SERVICE: Final[str] = "bench.echo"

os.environ["ZEROMESH_INTERFACES"] = LOOPBACK  # inherited by the spawned processes


def payload(i: int) -> bytes:
    """A 64-byte body that names its request, so a mixed-up reply is caught."""
    return f"{i:012d}".encode().ljust(SIZE, b".")


@dataclass
class Result:
    """What one client measured."""

    p50_us: float = 0.0
    p99_us: float = 0.0
    mean_us: float = 0.0
    requests_per_s: float = 0.0
    latency_count: int = 0
    throughput_count: int = 0
    wrong: int = 0
    error: str = ""
    samples: list[float] = field(default_factory=list, repr=False)


def summarize(res: Result, rtts: list[float]) -> None:
    """Fill in `res`'s latency figures from the round trips `rtts` (seconds; sorted here)."""
    rtts.sort()
    res.latency_count = len(rtts)
    res.p50_us = rtts[len(rtts) // 2] * 1e6
    res.p99_us = rtts[min(len(rtts) - 1, int(len(rtts) * 0.99))] * 1e6
    res.mean_us = statistics.fmean(rtts) * 1e6


def time_requests(round_trip: Callable[[bytes], bytes], n_lat: int, res: Result) -> None:
    """`WARMUP` requests, then `n_lat` timed one at a time; `res` gets the latency figures
    and a count of wrong replies. `round_trip(body)` sends one request and returns its
    reply's body."""
    clock = time.perf_counter
    for i in range(WARMUP):
        res.wrong += round_trip(payload(i)) != payload(i)
    rtts = []
    for i in range(n_lat):
        body = payload(i)
        t0 = clock()
        reply = round_trip(body)
        rtts.append(clock() - t0)
        res.wrong += reply != body
    summarize(res, rtts)


async def time_requests_async(round_trip: Callable[[bytes], Awaitable[bytes]], n_lat: int,
                              res: Result) -> None:
    """`time_requests` for a client whose `round_trip` is a coroutine function."""
    clock = time.perf_counter
    for i in range(WARMUP):
        res.wrong += await round_trip(payload(i)) != payload(i)
    rtts = []
    for i in range(n_lat):
        body = payload(i)
        t0 = clock()
        reply = await round_trip(body)
        rtts.append(clock() - t0)
        res.wrong += reply != body
    summarize(res, rtts)


# -- raw pyzmq -----------------------------------------------------------------


def raw_server(ports: mp.Queue[Any], done: Any, deadline: float) -> None:
    import zmq

    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    ports.put(router.bind_to_random_port(f"tcp://{LOOPBACK}"))
    try:
        while not done.is_set() and time.monotonic() < deadline:
            if router.poll(100):
                while True:
                    try:
                        frames = router.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    router.send_multipart(frames)
    finally:
        ctx.destroy(linger=0)


def raw_client(port: int, n_lat: int, n_tput: int, out: mp.Queue[Any], done: Any,
               deadline: float) -> None:
    import zmq

    ctx = zmq.Context()
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.setsockopt(zmq.RCVTIMEO, int(max(0.1, deadline - time.monotonic()) * 1000))
    dealer.connect(f"tcp://{LOOPBACK}:{port}")
    res = Result()
    try:
        send, recv, clock = dealer.send, dealer.recv, time.perf_counter

        def round_trip(body: bytes) -> bytes:
            send(body)
            reply: bytes = recv()
            return reply

        time_requests(round_trip, n_lat, res)
        if n_tput:  # (0: the latency phase only)
            sent = received = 0
            t0 = clock()
            while sent < min(IN_FLIGHT, n_tput):
                send(payload(sent))
                sent += 1
            expected = set(range(sent))
            while received < n_tput:
                reply = recv()
                received += 1
                idx = int(reply[:12])
                if idx not in expected:
                    res.wrong += 1
                expected.discard(idx)
                if sent < n_tput:
                    send(payload(sent))
                    expected.add(sent)
                    sent += 1
            res.requests_per_s = n_tput / (clock() - t0)
            res.throughput_count = received
    except Exception as exc:
        res.error = f"raw client: {exc!r}"
    finally:
        out.put(res)
        done.set()
        ctx.destroy(linger=0)


# -- zeromesh ------------------------------------------------------------------


def mesh_server(mesh_name: str, ports: mp.Queue[Any], done: Any, deadline: float,
                opts: dict[str, Any] | None = None) -> None:
    """`opts`: extra `AsyncNode` settings, overriding the ones below."""
    h.mesh_run(_mesh_server(mesh_name, ports, done, deadline, opts or {}))


async def _mesh_server(mesh_name: str, ports: mp.Queue[Any], done: Any,
                       deadline: float, opts: dict[str, Any]) -> None:
    from mesh import AsyncNode, Message

    def echo(msg: Message) -> bytes:
        return msg.data

    async with AsyncNode(**{"name": "bench-server", "mesh": mesh_name,
                            "interfaces": [LOOPBACK], "mdns": False, **opts}) as node:
        await node.serve(SERVICE, echo)
        ports.put(node.endpoints["ctl"][0])
        # (`done` is a multiprocessing Event: waited for in a thread, the loop serves on)
        await asyncio.to_thread(done.wait, max(0.0, deadline - time.monotonic()))


def mesh_client(mesh_name: str, peer: str, n_lat: int, n_tput: int, out: mp.Queue[Any],
                done: Any, deadline: float, opts: dict[str, Any] | None = None) -> None:
    """`opts`: extra `AsyncNode` settings, overriding the ones below."""
    res = Result()
    try:
        h.mesh_run(_mesh_client(mesh_name, peer, n_lat, n_tput, res, deadline, opts or {}))
    except Exception as exc:
        res.error = f"zeromesh client: {exc!r}"
    finally:
        out.put(res)
        done.set()


async def _mesh_client(mesh_name: str, peer: str, n_lat: int, n_tput: int, res: Result,
                       deadline: float, opts: dict[str, Any]) -> None:
    from mesh import AsyncNode

    async with AsyncNode(**{"name": "bench-client", "mesh": mesh_name,
                            "interfaces": [LOOPBACK], "mdns": False, "peers": [peer],
                            **opts}) as node:
        async with asyncio.timeout(max(0.1, deadline - time.monotonic())):
            await node.wait_for_service(SERVICE, timeout=10)
            request, clock = node.request, time.perf_counter

            async def round_trip(body: bytes) -> bytes:
                return (await request(SERVICE, body)).data

            await time_requests_async(round_trip, n_lat, res)
            if not n_tput:  # (0: the latency phase only)
                return

            async def worker(w: int) -> int:
                wrong = 0
                for i in range(w, n_tput, IN_FLIGHT):  # n_tput in all, 64 in flight
                    body = payload(i)
                    wrong += (await request(SERVICE, body)).data != body
                return wrong

            t0 = clock()
            wrongs = await asyncio.gather(*(worker(w) for w in range(IN_FLIGHT)))
            elapsed = clock() - t0
            res.wrong += sum(wrongs)
            res.throughput_count = n_tput
            res.requests_per_s = res.throughput_count / elapsed


# -- orchestration ---------------------------------------------------------------


def run_side(side: str, n_lat: int, n_tput: int, timeout: float,
             server_opts: dict[str, Any] | None = None,
             client_opts: dict[str, Any] | None = None) -> Result:
    """Both phases against one side, ``"raw"`` or ``"zeromesh"``.

    `server_opts`, `client_opts`: extra `AsyncNode` settings (zeromesh side only).
    """
    if side == "raw":
        return run_server_client(side, raw_server, (), raw_client,
                                 lambda port: (port, n_lat, n_tput), timeout)
    mesh_name = "bench-" + uuid.uuid4().hex[:12]
    return run_server_client(side, partial(mesh_server, opts=server_opts), (mesh_name,),
                             partial(mesh_client, opts=client_opts),
                             lambda peer: (mesh_name, peer, n_lat, n_tput), timeout)


def run_server_client(side: str, server: Callable[..., None], server_args: tuple[Any, ...],
                      client: Callable[..., None],
                      client_args: Callable[[Any], tuple[Any, ...]], timeout: float) -> Result:
    """One measurement in two spawned processes, under a hard deadline.

    ``server(*server_args, ports, done, deadline)`` puts the address clients need on
    `ports` and serves until `done` is set; then ``client(*client_args(address), out, done,
    deadline)`` puts its `Result` on `out` and sets `done`. Both are module-level functions
    (or partials of them: spawned, so picklable by name); whatever outlives the deadline is
    killed.
    """
    ctx = mp.get_context("spawn")
    out: mp.Queue[Any] = ctx.Queue()
    ports: mp.Queue[Any] = ctx.Queue()
    done = ctx.Event()
    deadline = time.monotonic() + timeout
    proc = ctx.Process(target=server, args=(*server_args, ports, done, deadline), daemon=True)
    proc.start()
    procs = [proc]
    try:
        try:
            address = ports.get(timeout=timeout)
        except queue.Empty:
            return Result(error=f"{side} server did not start")
        proc = ctx.Process(target=client, args=(*client_args(address), out, done, deadline),
                           daemon=True)
        proc.start()
        procs.append(proc)
        try:
            res: Result = out.get(timeout=max(0.1, deadline - time.monotonic()) + 1)
        except queue.Empty:
            return Result(error=f"{side} client gave no result within {timeout:g} s")
        return res
    finally:
        done.set()
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency-count", type=int, help="requests timed one at a time")
    parser.add_argument("--throughput-count", type=int, help="requests with 64 in flight")
    parser.add_argument("--quick", action="store_true", help="a small run (a smoke test)")
    parser.add_argument("--timeout", type=float, default=120.0, help="hard limit per side, s")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    h.add_loop_flag(parser)
    args = parser.parse_args(argv)
    loop = h.apply_loop_flag(args)
    n_lat = args.latency_count or (QUICK_LATENCY_COUNT if args.quick else DEFAULT_LATENCY_COUNT)
    n_tput = args.throughput_count or (QUICK_THROUGHPUT_COUNT if args.quick
                                       else DEFAULT_THROUGHPUT_COUNT)
    if n_lat < 1 or n_tput < IN_FLIGHT:
        parser.error(f"need --latency-count >= 1 and --throughput-count >= {IN_FLIGHT}")

    raw = run_side("raw", n_lat, n_tput, args.timeout)
    zm = run_side("zeromesh", n_lat, n_tput, args.timeout)
    ratios = {"p50": _ratio(zm.p50_us, raw.p50_us), "p99": _ratio(zm.p99_us, raw.p99_us),
              "requests_per_s": _ratio(zm.requests_per_s, raw.requests_per_s)}
    ok = all(not r.error and not r.wrong for r in (raw, zm))
    if args.json:
        print(json.dumps({"benchmark": "reqrep", "transport": f"tcp://{LOOPBACK}", "loop": loop,
                          "payload": SIZE, "in_flight": IN_FLIGHT,
                          "python": sys.version.split()[0],
                          "raw": asdict(raw), "zeromesh": asdict(zm), "ratios": ratios},
                         indent=2))
    else:
        def fmt(v: float | None) -> str:
            return "-" if v is None else f"{v:.2f}"

        head = f"{'':<22}{'raw pyzmq':>14}{'zeromesh':>14}{'zm/raw':>9}"
        print(f"zeromesh event loop: {loop}")
        print(head)
        print("-" * len(head))
        print(f"{'p50 latency (us)':<22}{raw.p50_us:>14.1f}{zm.p50_us:>14.1f}"
              f"{fmt(ratios['p50']):>9}")
        print(f"{'p99 latency (us)':<22}{raw.p99_us:>14.1f}{zm.p99_us:>14.1f}"
              f"{fmt(ratios['p99']):>9}")
        print(f"{'requests/s (64 in fl.)':<22}{raw.requests_per_s:>14,.0f}"
              f"{zm.requests_per_s:>14,.0f}{fmt(ratios['requests_per_s']):>9}")
        for name, r in (("raw", raw), ("zeromesh", zm)):
            if r.error or r.wrong:
                print(f"  {name}: wrong replies={r.wrong} error={r.error or '-'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
