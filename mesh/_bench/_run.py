"""`zeromesh bench`: run one end here and the other in a child process, or one end alone.

A local run (no ``--role``) starts the measuring end in this process in a
fresh mesh of its own, then its partner as ``python -m mesh bench <pattern>
--role <other>`` pointed at it by static peer (no mDNS), and always kills
that child (its PID only) when done. With ``--role`` this process is one end
and meets the other by mesh name, like any other command. ``--timeout``
bounds the whole run.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import json
import os
import secrets
import sys
import tempfile
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, Final

from patterns import load_secret

from .. import _loop
from .._node import AsyncNode
from .._spool import FsyncPolicy
from ..cli._commands import node_for, stop_on_signals
from ..errors import ConfigError, RequestTimeout
from . import _report
from ._roles import HEADER, RECEIVERS, ROLES, Plan
from ._stats import Meter, Summary, summarize

_CHILD_GRACE: Final[float] = 2.0
"""How long a child gets to leave on SIGTERM before SIGKILL."""
DEFAULT_COUNTS: Final[dict[str, int]] = {"pubsub": 200_000, "pushpull": 100_000,
                                         "reqrep": 10_000, "spool": 100_000}
"""A few seconds each on a small machine: long enough to be steady, short enough to rerun."""
_FORWARD: Final[tuple[str, ...]] = ("fsync", "secret_key", "allow")
MAX_IN_FLIGHT: Final[int] = 10_000
"""Requesters at most: each is a task, and a mistyped count must not exhaust memory."""


class BenchFailed(Exception):
    """The run could not complete (the other end failed); the one-line reason."""


def run(args: argparse.Namespace) -> int:
    """Exit status per DESIGN: 0 done, 1 timeout or nothing received (2 is a ConfigError)."""
    plan = _plan(args)
    try:
        return _loop.run(_main(args, plan))
    except BenchFailed as exc:
        print(f"zeromesh bench: {exc}", file=sys.stderr)
        return 1


def _plan(args: argparse.Namespace) -> Plan:
    roles = ROLES[args.pattern]
    if args.role is not None and args.role not in roles:
        raise ConfigError("--role", f"{args.pattern} has the roles {' and '.join(roles)}, "
                                    f"not {args.role}")
    if args.size < HEADER:
        raise ConfigError("--size", f"at least {HEADER} bytes (the send timestamp)")
    if args.in_flight is not None and args.pattern != "reqrep":
        raise ConfigError("--in-flight", "only for reqrep")
    if args.in_flight is not None and args.in_flight > MAX_IN_FLIGHT:
        raise ConfigError("--in-flight", f"at most {MAX_IN_FLIGHT:,}")
    return Plan(args.pattern, args.count or DEFAULT_COUNTS[args.pattern], args.size,
                args.in_flight or 1)


async def _main(args: argparse.Namespace, plan: Plan) -> int:
    loop = asyncio.get_running_loop()
    deadline: float = loop.time() + args.timeout

    def left() -> float:
        return max(deadline - loop.time(), 0.001)

    role = args.role or next(iter(ROLES[plan.pattern]))
    meter = Meter()
    stop = asyncio.Event()
    with stop_on_signals(stop), _data_dirs(args, plan) as dirs:
        node = node_for(_settings(args, dirs[0]))
        if plan.size > node.config.max_message_size:  # a usage error, not a failed run
            raise ConfigError("--size", f"at most {node.config.max_message_size} bytes "
                                        "(the node's max_message_size)")
        async with node:
            child = None if args.role else await _spawn(args, plan, node, dirs[1], left())
            try:
                with _report.Progress(f"bench {plan.pattern} {role}", lambda: _progress(meter),
                                      plan.count):
                    outcome = await _race(ROLES[plan.pattern][role](node, plan, meter, left),
                                          child, stop, left())
            except RequestTimeout:  # raised only while waiting for the other end
                outcome = f"timed out after {args.timeout:g} s waiting for the other end"
            finally:
                said = child.tail[-1] if child is not None and child.tail else ""
                if child is not None:
                    await child.stop()
    outcome = {"timeout": f"timed out after {args.timeout:g} s",
               "stopped": "stopped by a signal"}.get(outcome, outcome)
    if outcome != "done" and said:
        outcome += f" (the other end said: {said})"
    return _finish(args, plan, role, node.mesh, meter, outcome)


def _progress(meter: Meter) -> int:
    return meter.received or meter.sent or 0


def _settings(args: argparse.Namespace, data_dir: str | None) -> argparse.Namespace:
    """This end's node settings: a local run gets its own mesh and static peering."""
    settings = argparse.Namespace(**vars(args))
    settings.data_dir = data_dir
    if not args.role:
        settings.mesh = args.mesh or f"bench-{secrets.token_hex(4)}"
        settings.name = args.name or "bench"
        settings.peers, settings.mdns = [], False
    return settings


@contextlib.contextmanager
def _data_dirs(args: argparse.Namespace, plan: Plan) -> Iterator[tuple[str | None, str | None]]:
    """Data dirs (spool only): ours and the child's, fresh unless --data-dir with --role."""
    if plan.pattern != "spool" or (args.role and args.data_dir):
        yield args.data_dir, None
    else:
        with tempfile.TemporaryDirectory(prefix="zeromesh-bench-") as tmp:
            yield str(Path(tmp, "here")), str(Path(tmp, "other"))


class _Child:
    """The partner end in a child process; the last lines of its stderr tell why it failed."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.tail: collections.deque[str] = collections.deque(maxlen=5)
        self.reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        assert self.proc.stderr is not None
        async for raw in self.proc.stderr:
            line = raw.decode(errors="replace").strip()
            if line:
                self.tail.append(line)

    def reason(self) -> str:
        last = self.tail[-1] if self.tail else "no output"
        return f"the other end exited with status {self.proc.returncode}: {last}"

    async def stop(self) -> None:
        """SIGTERM, then SIGKILL after a grace; this child's PID only."""
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), _CHILD_GRACE)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                await self.proc.wait()
        await self.reader


async def _spawn(args: argparse.Namespace, plan: Plan, node: AsyncNode, data_dir: str | None,
                 left: float) -> _Child:
    """Start the partner end, pointed at this node; it outlives us by no more than a grace."""
    other = list(ROLES[plan.pattern])[1]
    peer = node.endpoints["ctl"][0]
    secret = args.secret_key or os.environ.get("ZEROMESH_SECRET_KEY")
    if secret:  # a secure mesh: the child must know our key to reach us without mDNS
        peer += "#" + load_secret(secret)[0].decode()
    argv = [sys.executable, "-m", "mesh", "bench", plan.pattern, "--role", other,
            "--count", str(plan.count), "--size", str(plan.size),
            "--timeout", f"{left + _CHILD_GRACE:.3f}", "--mesh", node.mesh,
            "--name", f"bench-{other}", "--peer", peer, "--no-mdns"]
    for iface in args.interfaces or ():
        argv += ["--interface", iface]
    for key in _FORWARD:
        if getattr(args, key, None):
            argv += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    if data_dir is not None:
        argv += ["--data-dir", data_dir]
    env = {k: v for k, v in os.environ.items()
           if k not in ("ZEROMESH_PEERS", "ZEROMESH_DATA_DIR", "ZEROMESH_MESH")}
    proc = await asyncio.create_subprocess_exec(
        *argv, env=env, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE)
    return _Child(proc)


async def _race(work: Coroutine[Any, Any, None], child: _Child | None,
                stop: asyncio.Event, left: float) -> str:
    """Run this end: "done", or "timeout"/"stopped" (deadline, signal); a failed child raises."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + left
    task = asyncio.create_task(work)
    stopped = asyncio.create_task(stop.wait())
    watch: set[asyncio.Task[Any]] = {task, stopped}
    if child is not None:
        watch.add(asyncio.create_task(child.proc.wait()))
    try:
        while True:  # until the deadline: each pass ends one watched task
            done, _ = await asyncio.wait(watch, timeout=deadline - loop.time(),
                                         return_when=asyncio.FIRST_COMPLETED)
            if task in done:
                task.result()
                return "done"
            if child is not None and child.proc.returncode not in (None, 0):
                raise BenchFailed(child.reason())
            if stopped in done:
                return "stopped"
            if not done:
                return "timeout"
            watch -= done  # the child finished sending and left: wait for the rest
    finally:
        for t in watch:
            t.cancel()
        await asyncio.gather(*watch, return_exceptions=True)


def _finish(args: argparse.Namespace, plan: Plan, role: str, mesh: str, meter: Meter,
            outcome: str) -> int:
    """Print what was measured; the exit status says whether the run completed."""
    if role == "rep":  # serves until stopped: it measures nothing but what it served
        _out(json.dumps({"pattern": plan.pattern, "role": role, "served": meter.received})
             if args.json else f"served {meter.received:,} requests")
        if not meter.received:
            print(f"zeromesh bench: no requests within {args.timeout:g} s", file=sys.stderr)
        return 0 if meter.received else 1
    receiver = role in RECEIVERS
    summary = summarize(meter, plan.size, receiver=receiver,
                        expected=None if plan.pattern == "reqrep" else plan.count)
    if outcome != "done" and receiver and meter.sent is None and plan.pattern != "reqrep":
        # Cut short before the sender said how many it sent: what it never sent is no drop.
        summary = dataclasses.replace(summary, drops=None)
    if meter.received if receiver else meter.sent:
        if args.json:
            info = {"pattern": plan.pattern, "role": role, "mesh": mesh, "count": plan.count,
                    "size": plan.size,
                    "in_flight": plan.in_flight if plan.pattern == "reqrep" else None,
                    "fsync": (args.fsync or FsyncPolicy.BATCH.value)
                    if plan.pattern == "spool" else None}
            _out(_report.to_json(info, summary))
        else:
            note = _NOTES[plan.pattern == "reqrep"] if receiver else ""
            _out(_report.table(_title(args, plan, mesh), _rows(plan, role, summary), note))
    if outcome != "done":
        got = f"{meter.received:,} of {plan.count:,} received" if receiver else \
            f"{meter.sent or 0:,} of {plan.count:,} sent"
        print(f"zeromesh bench: {outcome}; {got}", file=sys.stderr)
        return 1
    return 0 if meter.received or not receiver else 1


_NOTES: Final[dict[bool, str]] = {
    False: "latency: one way, from the send time stamped in each message (across hosts it "
           "depends on their clock sync)",
    True: "latency: round trip, measured by the requester"}


def _title(args: argparse.Namespace, plan: Plan, mesh: str) -> str:
    extra = ""
    if plan.pattern == "reqrep":
        extra = f", {plan.in_flight} in flight"
    elif plan.pattern == "spool":
        extra = f", fsync {args.fsync or FsyncPolicy.BATCH.value}"
    return f"zeromesh bench {plan.pattern}: {plan.count:,} msgs x {plan.size} B{extra}, mesh {mesh}"


def _rows(plan: Plan, role: str, summary: Summary) -> list[tuple[str, Summary]]:
    """The sender's own rate (when known) above the receiver's figures."""
    rows = []
    sender = next(r for r in ROLES[plan.pattern] if r != role) if role in RECEIVERS else role
    if summary.send_msgs_per_s and plan.pattern != "reqrep":
        rate = summary.send_msgs_per_s
        rows.append((sender, Summary(None, None, rate, rate * plan.size / 1e6, None, None,
                                     summary.sent, rate)))
    if role in RECEIVERS:
        rows.append((role, summary))
    return rows


def _out(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()
