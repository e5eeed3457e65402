"""Issue 14's uplink benchmark: the agent exporting mesh messages to NATS JetStream and to
MQTT 5, against a plain client publishing straight to the same broker, in the same run.

For each broker (a nats-server with JetStream on a file store, a mosquitto with persistence
on; both started here on 127.0.0.1 by `uplink_baseline`'s starters) this runs

* a ``zeromesh agent`` (``python -m mesh agent --config X``: a data dir, ``http =
  "127.0.0.1:0"``, the spool's ``fsync`` as ``--fsync`` says (default ``batch``, the
  agent's default), one ``[[uplink]]`` to the broker exporting ``bench.>`` with the default
  window of 256, ``pub_hwm = sub_hwm = 0``), its address read from its ``ready`` line;
* a publisher process: an `AsyncNode` on 127.0.0.1 in the same mesh (static peering with
  the agent, a data dir of its own) publishing 64 B messages on ``bench.x``;

and then, per repetition, interleaved: the baseline (`uplink_baseline`: nats-py with 64
acks in flight, both of its ways, the better one counting; paho QoS 1 with 64 in flight),
then zeromesh's two ways in:

* **best effort** (the headline): ``publish_nowait`` into the agent's durable subscription
  (its live view takes best-effort messages, which the agent writes to its uplink backlog);
  the fast path, at-least-once from the agent's backlog on.
* **reliable**: ``publish_many(..., reliable=True)`` 500 at a time, each spooled by the
  publisher for the agent's durable and delivered to it over its durable queue: the
  at-least-once path end to end.

A zeromesh run is end to end: from the first publish until the hub has acknowledged every
message (the uplink's ``exported`` in ``GET /v1/uplinks``, polled every 50 ms, and every
2 ms once publishing is over), msgs/s = messages / that time. The publisher publishes for
``--seconds`` (or ``--max-count`` messages) and keeps at most `OUTSTANDING` messages
published and not yet exported, so nothing piles up without bound (best effort over
ZeroMQ with HWM 0 cannot drop; the cap keeps memory bounded and the drain short). After
each run the uplink must have exported exactly the messages sent, failed and dropped none,
its backlog must be empty, and (NATS) the stream must hold exactly that many more messages.

Ratio = zeromesh / baseline of the same repetition; the median and range of the ratios
are reported, with the spool's fsync mode and the loop beside the figures.

Run::

    python benchmarks/uplink.py                    # both brokers, 3 repetitions of 2 s
    python benchmarks/uplink.py --only nats --repeat 5
    python benchmarks/uplink.py --fsync off        # the agent's spool without fsync
    python benchmarks/uplink.py --quick --json     # a small run, machine-readable

Every process binds 127.0.0.1 only (``ZEROMESH_INTERFACES`` is forced to it). The agent,
the publisher and the brokers are stopped by PID however the script ends, and each run
has a hard deadline (``--timeout``).

``ZM_UPLINK_PROFILE=<file>`` runs the agent under cProfile and writes its stats there when
it stops (for finding where the export path spends its time; the figures are then slower).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import queue
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

import _harness
import uplink_baseline as base
from _harness import LOOPBACK

SIZE: Final[int] = base.SIZE
TOPIC: Final[str] = "bench.x"
PREFIX: Final[str] = "bench"
STREAM: Final[str] = "ZEROMESH"
"""The stream the agent creates (the uplink's default)."""
OUTSTANDING: Final[int] = 20_000
"""Messages the publisher may have published and not yet seen exported."""
CHUNK: Final[int] = 500
"""Messages published between two looks at the clock and the cap."""
POLL: Final[float] = 0.05
"""Seconds between two looks at the agent's counters while publishing."""
END_POLL: Final[float] = 0.002
"""... and once publishing is over (the end of the run is the first look that sees all)."""
START_TIMEOUT: Final[float] = 30.0
PATHS: Final[tuple[str, ...]] = ("best_effort", "reliable")
PROFILE_ENV: Final[str] = "ZM_UPLINK_PROFILE"
PAYLOAD: Final[bytes] = base.PAYLOAD
QUICK_SECONDS: Final[float] = 0.3
QUICK_COUNT: Final[int] = 5_000
WINDOW: Final[int] = 256
"""The uplink's default window (messages in flight to the hub)."""


@dataclass
class Export:
    """One zeromesh run: messages sent, and from the first publish to the last hub ack."""

    sent: int = 0
    exported: int = 0
    seconds: float = 0.0
    on_hub: int | None = None
    """Messages the stream gained (NATS); None where the broker does not count."""
    error: str = ""
    cpu_us: dict[str, float] = field(default_factory=dict)
    """CPU time per message exported, µs, by process (agent, publisher, broker)."""

    @property
    def rate(self) -> float:
        return self.exported / self.seconds if self.seconds > 0 else 0.0


# --- CPU time ---------------------------------------------------------------------------------


def cpu_seconds(pid: int | None = None) -> float:
    """CPU time (user + system, all threads) of process `pid` so far, or of this process;
    0.0 where /proc cannot tell (not Linux, or the process is gone)."""
    if pid is None:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """CPU µs per message of named processes over one run."""

    def __init__(self, pids: dict[str, int | None]) -> None:
        self._pids = pids
        self._start = {name: cpu_seconds(pid) for name, pid in pids.items()}

    def per_message(self, count: int) -> dict[str, float]:
        if count <= 0:
            return {}
        return {name: round(1e6 * (cpu_seconds(pid) - self._start[name]) / count, 1)
                for name, pid in self._pids.items()}


# --- the agent ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Agent:
    http: str
    ctl: str
    pid: int


def _agent_env() -> dict[str, str]:
    env = {**os.environ}
    for var in ("ZEROMESH_PEERS", "ZEROMESH_CONFIG", "ZEROMESH_DATA_DIR", "ZEROMESH_HTTP",
                "ZEROMESH_FSYNC", "ZEROMESH_PUB_HWM", "ZEROMESH_SUB_HWM"):
        env.pop(var, None)
    return env


@contextlib.contextmanager
def running_agent(workdir: Path, mesh: str, hub_url: str, fsync: str, window: int
                  ) -> Iterator[Agent]:
    """A ``zeromesh agent`` exporting ``bench.>`` to `hub_url`, for the block; always stopped
    (SIGTERM, then SIGKILL, by PID)."""
    config = workdir / "agent.toml"
    config.write_text(
        f'name = "bench-agent"\nmesh = "{mesh}"\ninterfaces = ["{LOOPBACK}"]\nmdns = false\n'
        f'data_dir = "{workdir / "agent"}"\nhttp = "{LOOPBACK}:0"\nfsync = "{fsync}"\n'
        f"pub_hwm = 0\nsub_hwm = 0\n\n"
        f'[[uplink]]\nurl = "{hub_url}"\nprefix = "{PREFIX}"\nexport = ["{PREFIX}.>"]\n'
        f"window = {window}\n")
    argv = ["-m", "mesh", "agent", "--config", str(config)]
    profile = os.environ.get(PROFILE_ENV)
    if profile:
        argv = ["-m", "cProfile", "-o", profile, "-m", "mesh", "agent", "--config", str(config)]
    with (workdir / "agent.log").open("w+") as stderr:
        proc = subprocess.Popen([sys.executable, *argv], stdout=subprocess.PIPE, stderr=stderr,
                                stdin=subprocess.DEVNULL, text=True, env=_agent_env())
        base.STARTED.append(("zeromesh agent", proc.pid))
        try:
            fields = _harness.ready_fields(proc, START_TIMEOUT, stderr=stderr)
            yield Agent(fields["http"], fields["ctl"].split(",")[0], proc.pid)
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=15 if profile else 5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=5)


# --- the publisher process ------------------------------------------------------------------


def publisher(mesh: str, agent: Agent, data_dir: str, commands: mp.Queue[Any],
              results: mp.Queue[Any]) -> None:
    """Runs in its own process: an AsyncNode that publishes when told (`commands`:
    ``(path, seconds, max_count, deadline)`` or None to stop; `results`: an `Export`, or
    ``("ready", "")`` / ``("error", text)``)."""
    try:
        _harness.mesh_run(_publisher(mesh, agent, data_dir, commands, results))
    except BaseException as exc:
        results.put(("error", f"publisher: {exc!r}"))
        raise


async def _publisher(mesh: str, agent: Agent, data_dir: str, commands: mp.Queue[Any],
                     results: mp.Queue[Any]) -> None:
    import aiohttp

    from mesh import AsyncNode

    async with AsyncNode(name="bench-pub", mesh=mesh, interfaces=[LOOPBACK], mdns=False,
                         peers=[agent.ctl], data_dir=data_dir, pub_hwm=0, sub_hwm=0) as node, \
            aiohttp.ClientSession() as http:
        await node.wait_for_durables(TOPIC, 1, timeout=START_TIMEOUT)
        await node.wait_for_subscribers(TOPIC, 1, timeout=START_TIMEOUT)
        uplinks = f"{agent.http}/v1/uplinks"

        async def exported() -> int:
            async with http.get(uplinks) as response:
                status = (await response.json())[0]
            if status["failed"] or status["dropped"]:
                raise RuntimeError(f"the uplink failed {status['failed']} and dropped "
                                   f"{status['dropped']} messages")
            count: int = status["exported"]
            return count

        results.put(("ready", ""))
        while (command := await asyncio.to_thread(commands.get)) is not None:
            path, seconds, max_count, deadline = command
            run = Export()
            try:
                async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                    await _publish_run(node, exported, run, path == "reliable", seconds,
                                       max_count)
                async with http.get(uplinks) as response:
                    backlog = (await response.json())[0]["backlog"]
                if backlog:
                    run.error = f"{backlog} messages still in the uplink's backlog"
            except TimeoutError:
                run.error = (f"timed out: {run.sent:,} sent, {run.exported:,} exported")
            except Exception as exc:
                run.error = repr(exc)
            results.put(run)


async def _publish_run(node: Any, exported: Callable[[], Any], run: Export, reliable: bool,
                       seconds: float, max_count: int) -> None:
    """Publish for `seconds` (or `max_count` messages) with at most `OUTSTANDING` not yet
    exported, then wait until every one is; fills in `run`."""
    before: int = await exported()
    seen = 0  # exported in this run, as of the last look
    changed = asyncio.Event()
    publishing = True

    async def watch() -> None:
        nonlocal seen
        while True:
            now = await exported() - before
            if now != seen:
                seen = now
                changed.set()
            await asyncio.sleep(POLL if publishing else END_POLL)

    watcher = asyncio.ensure_future(watch())
    payloads = [PAYLOAD] * CHUNK
    try:
        started = time.perf_counter()
        stop = started + seconds
        while run.sent < max_count and time.perf_counter() < stop:
            room = min(CHUNK, max_count - run.sent, OUTSTANDING - (run.sent - seen))
            if room <= 0:
                changed.clear()
                await changed.wait()
                continue
            if reliable:
                await node.publish_many(TOPIC, payloads[:room], reliable=True)
            else:
                for _ in range(room):
                    node.publish_nowait(TOPIC, PAYLOAD)
                await asyncio.sleep(0)  # (the batch leaves at the end of the iteration)
            run.sent += room
        publishing = False
        while seen < run.sent:
            changed.clear()
            await changed.wait()
        run.seconds = time.perf_counter() - started
        run.exported = seen
        if seen != run.sent:
            run.error = f"{seen:,} exported, {run.sent:,} sent"
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
        run.exported = seen


@dataclass
class Publisher:
    """The publisher process, as the controller sees it."""

    pid: int
    run: Callable[[str, float, int, float], Export]
    """``run(path, seconds, max_count, timeout)``: one run, its `Export` back."""


@contextlib.contextmanager
def running_publisher(mesh: str, agent: Agent, data_dir: Path) -> Iterator[Publisher]:
    """The publisher process for the block, once it knows the agent's durable subscription;
    stopped at the end (asked, then killed by PID)."""
    ctx = mp.get_context("spawn")
    commands: mp.Queue[Any] = ctx.Queue()
    results: mp.Queue[Any] = ctx.Queue()
    proc = ctx.Process(target=publisher, args=(mesh, agent, str(data_dir), commands, results),
                       name="bench-publisher", daemon=True)
    proc.start()
    assert proc.pid is not None
    base.STARTED.append(("zeromesh publisher", proc.pid))

    def answer(timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            try:
                return results.get(timeout=0.2)
            except queue.Empty:
                if not proc.is_alive():
                    raise RuntimeError(f"the publisher exited {proc.exitcode}") from None
                if time.monotonic() > deadline:
                    raise RuntimeError("the publisher did not answer in time") from None

    def run(path: str, seconds: float, max_count: int, timeout: float) -> Export:
        commands.put((path, seconds, max_count, time.monotonic() + timeout))
        result = answer(timeout + 10)
        if isinstance(result, tuple):
            raise RuntimeError(result[1])
        assert isinstance(result, Export)
        return result

    try:
        kind, text = answer(START_TIMEOUT + 10)
        if kind != "ready":
            raise RuntimeError(text)
        yield Publisher(proc.pid, run)
    finally:
        commands.put(None)
        proc.join(timeout=10)
        if proc.is_alive():
            proc.kill()
            proc.join(timeout=5)


# --- the hub side ---------------------------------------------------------------------------


async def _stream_count(url: str) -> int:
    import nats
    import nats.js.errors

    nc = await nats.connect(url, allow_reconnect=False)
    try:
        try:
            info = await nc.jetstream().stream_info(STREAM)
        except nats.js.errors.NotFoundError:
            return 0
        count: int = info.state.messages
        return count
    finally:
        await nc.close()


def stream_count(url: str) -> int:
    """Messages in the agent's stream on the nats-server at `url`."""
    count: int = _harness.mesh_run(_stream_count(url))
    return count


# --- one broker -----------------------------------------------------------------------------


@dataclass
class Repetition:
    baseline: dict[str, base.Run]
    """By way (JetStream: publish_async, concurrent_publish; MQTT: mqtt_qos1)."""
    zeromesh: dict[str, Export]
    """By path: best_effort, reliable."""
    baseline_cpu_us: dict[str, dict[str, float]] = field(default_factory=dict)
    """By way: CPU µs per message of the client (this process) and the broker."""

    @property
    def baseline_rate(self) -> float:
        return max(run.rate for run in self.baseline.values())

    def ratio(self, path: str) -> float:
        rate = self.baseline_rate
        return self.zeromesh[path].rate / rate if rate else 0.0

    def problems(self) -> list[str]:
        out = [f"baseline {way}: {run.error or f'{run.failed} refused'}"
               for way, run in self.baseline.items() if run.error or run.failed]
        out += [f"zeromesh {path}: {run.error}" for path, run in self.zeromesh.items()
                if run.error]
        return out


def measure(kind: str, repeat: int, seconds: float, max_count: int, fsync: str,
            window: int, timeout: float, report: Callable[[str, int, Repetition], None] | None,
            paths: tuple[str, ...] = PATHS) -> list[Repetition]:
    """`repeat` repetitions on one broker: its baseline, then zeromesh's paths."""
    workdir = Path(tempfile.mkdtemp(prefix="zm-uplink-bench-"))
    mesh = f"upbench-{uuid.uuid4().hex[:8]}"
    reps: list[Repetition] = []
    try:
        with (base.nats_server() if kind == "nats" else base.mosquitto()) as port:
            broker = base.STARTED[-1][1]
            url = f"{'nats' if kind == 'nats' else 'mqtt'}://{LOOPBACK}:{port}"
            with running_agent(workdir, mesh, url, fsync, window) as agent, \
                    running_publisher(mesh, agent, workdir / "publisher") as pub:
                for n in range(1, repeat + 1):
                    rep = Repetition({}, {})
                    for way in (base.NATS_MODES if kind == "nats" else ("mqtt_qos1",)):
                        meter = CpuMeter({"client": None, "broker": broker})
                        if kind == "nats":
                            run = _harness.mesh_run(_bounded(timeout, base.jetstream_run(
                                url, way, seconds=seconds, max_count=max_count)))
                        else:
                            run = base.mqtt_run(port, seconds=seconds, max_count=max_count,
                                                timeout=timeout)
                        rep.baseline[way] = run
                        rep.baseline_cpu_us[way] = meter.per_message(run.acked)
                    for path in paths:
                        before = stream_count(url) if kind == "nats" else 0
                        meter = CpuMeter({"agent": agent.pid, "publisher": pub.pid,
                                          "broker": broker})
                        export = rep.zeromesh[path] = pub.run(path, seconds, max_count, timeout)
                        export.cpu_us = meter.per_message(export.exported)
                        if kind == "nats":
                            export.on_hub = stream_count(url) - before
                            if export.on_hub != export.sent and not export.error:
                                export.error = (f"the stream gained {export.on_hub:,} "
                                                f"messages, {export.sent:,} were sent")
                    reps.append(rep)
                    if report is not None:
                        report(kind, n, rep)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return reps


async def _bounded(timeout: float, run: Any) -> base.Run:
    async with asyncio.timeout(timeout):
        result: base.Run = await run
        return result


# --- the report -----------------------------------------------------------------------------


def _spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summary(reps: list[Repetition]) -> dict[str, Any]:
    """The JSON of one broker's repetitions, with medians and ratios."""
    paths = tuple(reps[0].zeromesh)
    out: dict[str, Any] = {
        "runs": [{"baseline": {way: {**asdict(r), "msgs_per_s": r.rate,
                                     "cpu_us": rep.baseline_cpu_us.get(way, {})}
                               for way, r in rep.baseline.items()},
                  "baseline_msgs_per_s": rep.baseline_rate,
                  **{path: {**asdict(r), "msgs_per_s": r.rate}
                     for path, r in rep.zeromesh.items()},
                  "ratio": {path: rep.ratio(path) for path in paths}}
                 for rep in reps],
        "baseline_msgs_per_s": statistics.median(rep.baseline_rate for rep in reps),
    }
    for path in paths:
        out[path] = {"median_msgs_per_s": statistics.median(rep.zeromesh[path].rate
                                                            for rep in reps),
                     "ratio": _spread([rep.ratio(path) for rep in reps])}
    out["ok"] = not any(rep.problems() for rep in reps)
    return out


def _cpu(cpu_us: dict[str, float]) -> str:
    return " ".join(f"{name} {us:.0f}" for name, us in cpu_us.items())


def _print_rep(kind: str, n: int, rep: Repetition) -> None:
    for way, run in rep.baseline.items():
        print(f"  {kind} rep {n}: baseline {way:<18} {run.rate:>8,.0f} msgs/s  "
              f"[CPU µs/msg: {_cpu(rep.baseline_cpu_us.get(way, {}))}]", flush=True)
    for path, export in rep.zeromesh.items():
        hub = "" if export.on_hub is None else f", stream +{export.on_hub:,}"
        print(f"  {kind} rep {n}: zeromesh {path:<18} {export.rate:>8,.0f} msgs/s "
              f"({export.exported:,} of {export.sent:,} exported in {export.seconds:.2f} s"
              f"{hub})  ratio {rep.ratio(path):.2f}  [CPU µs/msg: {_cpu(export.cpu_us)}]",
              flush=True)
    for problem in rep.problems():
        print(f"  {kind} rep {n}: PROBLEM {problem}", flush=True)


def _print_summary(kind: str, reps: list[Repetition], fsync: str, loop: str) -> None:
    label = "JetStream (nats-py, 64 acks in flight)" if kind == "nats" else \
        "mosquitto (paho QoS 1, 64 in flight)"
    print(f"{kind}: baseline = {label}; zeromesh fsync={fsync}, loop={loop}")
    paths = tuple(reps[0].zeromesh)
    cols = [(f"rep {i}", 9) for i in range(1, len(reps) + 1)]
    _harness.print_table([("", 22), *cols, ("median", 9)], [
        ["baseline msgs/s", *(f"{r.baseline_rate:,.0f}" for r in reps),
         f"{statistics.median(r.baseline_rate for r in reps):,.0f}"],
        *([f"zeromesh {path}", *(f"{r.zeromesh[path].rate:,.0f}" for r in reps),
           f"{statistics.median(r.zeromesh[path].rate for r in reps):,.0f}"]
          for path in paths),
        *([f"ratio {path}", *(f"{r.ratio(path):.2f}" for r in reps),
           f"{statistics.median(r.ratio(path) for r in reps):.2f}"] for path in paths),
    ])
    for path in paths:
        ratios = [r.ratio(path) for r in reps]
        print(f"  {path}: ratio median {statistics.median(ratios):.2f}, range "
              f"{min(ratios):.2f}-{max(ratios):.2f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    _harness.add_run_flags(parser, quick=f"a small run: {QUICK_SECONDS:g} s or {QUICK_COUNT:,} "
                                         "messages per run, 1 repetition (smoke test)")
    parser.add_argument("--seconds", type=float, default=None,
                        help=f"publishing time per run (default {base.SECONDS})")
    parser.add_argument("--max-count", type=int, default=None,
                        help=f"messages per run at the most (default {base.MAX_COUNT:,})")
    parser.add_argument("--only", choices=("nats", "mqtt"), default=None)
    parser.add_argument("--path", choices=PATHS, default=None,
                        help="measure zeromesh's one path only (default both)")
    parser.add_argument("--fsync", choices=("batch", "off", "always"), default="batch",
                        help="the agent's spool fsync policy (default batch, the agent's)")
    parser.add_argument("--window", type=int, default=WINDOW,
                        help=f"the uplink's window (default {WINDOW}, the uplink's)")
    args = parser.parse_args()
    _harness.check_run_flags(parser, args)
    if args.max_count is None:
        args.max_count = QUICK_COUNT if args.quick else base.MAX_COUNT
    if args.max_count < 1 or args.window < 1:
        parser.error("--max-count and --window must be at least 1")
    seconds = (args.seconds if args.seconds is not None else QUICK_SECONDS if args.quick
               else base.SECONDS)
    repeat = args.repeat or (1 if args.quick else 3)
    loop = _harness.apply_loop_flag(args)
    report = None if args.json else _print_rep
    paths = PATHS if args.path is None else (args.path,)
    if not args.json:
        print(f"{SIZE} B messages, {seconds:g} s per run, {repeat} repetition(s); zeromesh: "
              f"agent fsync={args.fsync}, uplink window {args.window}, loop {loop}; "
              f"baselines {base.WINDOW} in flight", flush=True)
    result: dict[str, Any] = {"benchmark": "uplink", "size": SIZE, "seconds": seconds,
                              "repeat": repeat, "loop": loop, "fsync": args.fsync,
                              "window": args.window, "baseline_window": base.WINDOW,
                              "outstanding": OUTSTANDING}
    for kind in ("nats", "mqtt"):
        if args.only not in (None, kind):
            continue
        reps = measure(kind, repeat, seconds, args.max_count, args.fsync, args.window,
                       args.timeout, report, paths)
        result[kind] = summary(reps)
        if not args.json:
            _print_summary(kind, reps, args.fsync, loop)
    result["ok"] = all(result[k]["ok"] for k in ("nats", "mqtt") if k in result)
    result["processes"] = [{"program": program, "pid": pid} for program, pid in base.STARTED]
    if args.json:
        print(json.dumps(result))
    elif not result["ok"]:
        print("some runs failed or lost messages (see above)")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
