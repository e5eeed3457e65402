"""What every two-process benchmark here shares: payloads, results, spawning, reports.

A benchmark runs one *pair* of processes per measurement: the first starts,
binds, and puts the address the second needs on ``link.ready``; the second is
then started with that address. Both report over ``link.out`` with
`Link.report` (``"result"`` from the receiver, ``"send_seconds"`` from the
sender, ``"error"`` from either); `run_pair` gathers those under a hard
deadline and kills whatever overruns, so a hung side ends the phase with an
error instead of hanging the benchmark.

Benchmarks are run as scripts (``python benchmarks/x.py``), so their own
directory is first on ``sys.path`` and they import this module as
``import _harness``; spawned children inherit that path.

Importing this module forces ``ZEROMESH_INTERFACES=127.0.0.1`` for this
process and every child: benchmarks never touch another interface.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing as mp
import os
import queue
import selectors
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import IO, Any, Final

LOOPBACK: Final[str] = "127.0.0.1"
SAMPLE_EVERY: Final[int] = 997
"""Receivers check the payload of every 997th message (and the last)."""
STALL_SECONDS: Final[float] = 10.0
"""A raw receiver that gets nothing for this long ends its run with an error."""

os.environ["ZEROMESH_INTERFACES"] = LOOPBACK  # inherited by the spawned processes


def ready_fields(proc: subprocess.Popen[str], timeout: float,
                 error: type[Exception] = RuntimeError,
                 stderr: IO[str] | None = None) -> dict[str, str]:
    """The ``key=value`` fields of a CLI process's ``ready`` line, read under a deadline.

    Raises:
        error: the process exited first, or was not ready within `timeout` (with the
            tail of `stderr`, the file its stderr goes to, if given).
    """
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while (left := deadline - time.monotonic()) > 0:
            if not sel.select(left):
                continue
            line = proc.stdout.readline()
            if not line:
                raise error(f"exited {proc.wait(5)} before it was ready{_tail(stderr)}")
            if line.startswith("ready "):
                return dict(f.split("=", 1) for f in line.split()[1:] if "=" in f)
    raise error(f"not ready within {timeout:.0f} s{_tail(stderr)}")


def _tail(stderr: IO[str] | None) -> str:
    if stderr is None:
        return ""
    stderr.seek(0)
    return f": {stderr.read()[-1000:].strip()}"


def stop(proc: subprocess.Popen[str]) -> None:
    """Stop a child this program started: SIGTERM, then SIGKILL if it lingers."""
    proc.terminate()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


def free_port() -> int:
    """A TCP port of 127.0.0.1 that is free now (for programs that must be told one)."""
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


def foreign_sockets(pid: int | str = "self") -> list[str]:
    """The internet sockets of process `pid` that are bound or connected to anything but
    127.0.0.1, as ``"proto local -> remote"`` lines (empty: loopback only).

    Read from ``/proc/<pid>/fd`` (the process's socket inodes) and ``/proc/<pid>/net``:
    an IPv4 socket passes when its local address is 127.0.0.1 and its remote one is
    127.0.0.1 or none (a listener); every IPv6 socket is reported. Linux only.
    """
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):  # (closed since the listing)
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[len("socket:["):-1])
    found = []
    for proto in ("tcp", "udp", "tcp6", "udp6"):
        with open(f"/proc/{pid}/net/{proto}") as table:
            rows = [line.split() for line in table.readlines()[1:]]
        for row in rows:
            local, remote, inode = row[1], row[2], row[9]
            if inode not in inodes:
                continue
            if (proto.endswith("6") or local.split(":")[0] != _LOOPBACK_HEX
                    or remote.split(":")[0] not in (_LOOPBACK_HEX, "00000000")):
                found.append(f"{proto} {local} -> {remote}")
    return found


_LOOPBACK_HEX: Final[str] = f"{int.from_bytes(socket.inet_aton(LOOPBACK), sys.byteorder):08X}"
"""127.0.0.1 as /proc/net/tcp writes it (hex of the address read in host byte order)."""


def make_payload(size: int) -> bytes:
    """A fixed, recognisable payload of `size` bytes."""
    pattern = b"zeromesh-bench-"
    return (pattern * (size // len(pattern) + 1))[:size]


@dataclass
class Result:
    """One receiver's and one sender's view of a run."""

    received: int = 0
    corrupt: int = 0
    recv_seconds: float = 0.0
    """From the first to the last message at the receiver."""
    send_seconds: float = 0.0
    """The sender's own send loop."""
    error: str = ""
    recv_cpu_seconds: float = 0.0
    """CPU time of the receiving process over `recv_seconds`, when it measures it: less
    swayed than wall time by other jobs on a shared machine."""
    send_cpu_seconds: float = 0.0
    """CPU time of the sending process over its send loop, when it reports it."""
    figures: dict[str, float] = field(default_factory=dict)
    """Whatever else the receiver measured (e.g. delay percentiles)."""

    @property
    def recv_rate(self) -> float:
        return (self.received - 1) / self.recv_seconds if self.recv_seconds > 0 else 0.0


@dataclass(frozen=True)
class Link:
    """The channels of one pair of processes (picklable into spawned children)."""

    out: mp.Queue[Any]
    """Reports: ``(kind, value)``; see `report`."""
    ready: mp.Queue[Any]
    """The first process's address for the second."""
    done: Any
    """An `Event` the receiver sets when it is finished (senders stay up until then)."""
    deadline: float
    """`time.monotonic()` by which everything must be over."""

    def report(self, kind: str, value: Any) -> None:
        """``"result"`` (a `Result`), ``"send_seconds"`` or ``"send_cpu_seconds"`` (float),
        or ``"error"`` (str)."""
        self.out.put((kind, value))

    def left(self, floor: float = 0.0) -> float:
        """Seconds until the deadline, at least `floor`."""
        return max(floor, self.deadline - time.monotonic())

    def left_ms(self) -> int:
        """`left()` in whole milliseconds, as zmq's ``poll`` takes it."""
        return int(self.left() * 1000)

    async def wait_done(self) -> bool:
        """Until the receiver has set `done` (True) or the deadline passed (False).

        `done` is a multiprocessing Event: it is waited for in a worker thread, so
        the loop (and the node's background sends) keeps running meanwhile.
        """
        return bool(await asyncio.to_thread(self.done.wait, self.left()))


@contextlib.contextmanager
def receiving(who: str, link: Link) -> Iterator[Result]:
    """The receiving side's `Result` for the block, reported on `link` and `link.done` set
    however the block ends; an exception in it becomes the result's error (``who: exc``),
    as does an error the block wrote itself."""
    res = Result()
    try:
        yield res
    except Exception as exc:
        res.error = f"{who}: {exc!r}"
    else:
        if res.error and not res.error.startswith(who):
            res.error = f"{who}: {res.error}"
    finally:
        link.report("result", res)
        link.done.set()


def collect(out: mp.Queue[Any], procs: Sequence[mp.process.BaseProcess],
            deadline: float) -> Result:
    """Gather reports from the processes until all exit or the deadline passes."""
    res: Result | None = None
    send_seconds = send_cpu_seconds = 0.0
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
        elif kind == "send_cpu_seconds":
            send_cpu_seconds = value
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
    res.send_cpu_seconds = send_cpu_seconds
    res.error = "; ".join(e for e in (res.error, *errors) if e)
    return res


def run_pair(first: Callable[..., None], first_args: tuple[Any, ...],
             second: Callable[..., None], second_args: tuple[Any, ...], *,
             timeout: float, names: tuple[str, str]) -> Result:
    """One measurement: ``first(*first_args, link)``, then ``second(*second_args, address, link)``.

    `first` must put the address `second` needs on ``link.ready``. Both are
    module-level functions (spawned, so picklable by name).
    """
    ctx = mp.get_context("spawn")
    link = Link(ctx.Queue(), ctx.Queue(), ctx.Event(), time.monotonic() + timeout)
    p1 = ctx.Process(target=first, args=(*first_args, link), name=names[0], daemon=True)
    p1.start()
    address: Any = None  # what the first process puts on `ready` (never None)
    while address is None:  # until it is ready, dies, or the deadline passes
        try:
            address = link.ready.get(timeout=0.1)
        except queue.Empty:
            if not p1.is_alive() or time.monotonic() > link.deadline:
                why = f"exited {p1.exitcode}" if not p1.is_alive() else "timed out"
                p1.kill()
                p1.join(timeout=5)
                return Result(error=f"{names[0]} did not start ({why})")
    p2 = ctx.Process(target=second, args=(*second_args, address, link), name=names[1],
                     daemon=True)
    p2.start()
    return collect(link.out, [p1, p2], link.deadline)


def failed(res: Result, count: int) -> bool:
    """The run lost, corrupted or errored."""
    return bool(res.error or res.corrupt or res.received != count)


def median_of(run: Callable[[], Result], repeat: int, count: int) -> Result:
    """Run `repeat` times; a failed run wins (so it is reported), else the median receive rate."""
    results = []
    for _ in range(repeat):
        res = run()
        if failed(res, count):
            return res
        results.append(res)
    results.sort(key=lambda r: r.recv_rate)
    return results[len(results) // 2]


def side(res: Result | None, count: int) -> dict[str, Any] | None:
    """One side of a report row, for JSON and tables."""
    if res is None:
        return None
    return {**asdict(res), "msgs_per_s": res.recv_rate,
            "send_msgs_per_s": count / res.send_seconds if res.send_seconds else 0.0,
            "lost": count - res.received}


def ratio(res: Result | None, base: Result | None) -> float | None:
    """`res`'s receive rate over `base`'s, when both ran."""
    return res.recv_rate / base.recv_rate if res and base and base.recv_rate else None


def fmt(side_: dict[str, Any] | None, key: str, spec: str) -> str:
    """``side_[key]`` formatted, or ``-`` when that side did not run."""
    return "-" if side_ is None else format(side_[key], spec)


def fmt_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def print_table(columns: Sequence[tuple[str, int]], rows: Sequence[Sequence[str]]) -> None:
    """A header, a rule, then each row's cells right-aligned to the column widths."""
    head = " ".join(title.rjust(width) for title, width in columns)
    print(head)
    print("-" * len(head))
    for row in rows:
        print(" ".join(cell.rjust(width) for cell, (_, width) in zip(row, columns, strict=True)))


def print_problems(label: str, side_: dict[str, Any] | None) -> None:
    """One line for a side that errored or saw corrupt payloads; nothing otherwise."""
    if side_ is not None and (side_["error"] or side_["corrupt"]):
        print(f"  {label}: corrupt={side_['corrupt']} error={side_['error'] or '-'}")


def ok(side_: dict[str, Any] | None) -> bool:
    """A side that did not run, or ran lossless, intact and without error."""
    return side_ is None or (side_["lost"] == 0 and not side_["error"] and not side_["corrupt"])


def add_loop_flag(parser: Any) -> None:
    """--loop: the event loop of the zeromesh processes (`mesh.run`'s choice by default)."""
    parser.add_argument("--loop", choices=("auto", "uvloop", "asyncio"), default="auto",
                        help="event loop of the zeromesh processes: auto = uvloop when "
                             "installed (what `mesh.run`, the CLI and Node use), asyncio = "
                             "the standard loop (what a plain asyncio.run application has)")


def apply_loop_flag(args: Any) -> str:
    """Hand --loop to the child processes (through ``ZEROMESH_LOOP``); the loop in use."""
    os.environ["ZEROMESH_LOOP"] = args.loop
    from mesh._loop import loop_factory

    return "uvloop" if loop_factory().__module__.startswith("uvloop") else "asyncio"


def mesh_run(main: Any) -> Any:
    """Run a zeromesh process's coroutine on the loop --loop chose."""
    from mesh import run

    return run(main)


def add_run_flags(parser: Any, *, quick: str = "a small run (smoke test)") -> None:
    """The flags every benchmark here takes: --quick, --timeout, --repeat, --json, --loop."""
    add_loop_flag(parser)
    parser.add_argument("--quick", action="store_true", help=quick)
    parser.add_argument("--timeout", type=float, default=120.0, help="hard limit per phase, s")
    parser.add_argument("--repeat", type=int, default=None,
                        help="runs per figure; the median is reported (default 3, 1 with --quick)")
    parser.add_argument("--json", action="store_true", help="print one JSON document")


def check_run_flags(parser: Any, args: Any) -> None:
    """Usage errors (exit 2) for a bad --count or --repeat."""
    if getattr(args, "count", None) is not None and args.count < 1:
        parser.error("--count must be at least 1")
    if args.repeat is not None and args.repeat < 1:
        parser.error("--repeat must be at least 1")

