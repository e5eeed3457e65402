"""The sidecar's cost over a bare HTTP server, bulk publish, and services over HTTP.

Three questions, each against its baseline in the same run, processes on 127.0.0.1:

* **publish**: ``POST /v1/publish/bench.data`` (64 bytes) to a ``zeromesh agent``
  against the same POST to a bare aiohttp server that reads the body and
  answers 202 with a small JSON (the least an HTTP publish endpoint can do),
  with the same client (one aiohttp session, 1 or 16 requests in flight),
  alternating bare/agent per round. Figures: requests/s and the server's CPU
  per request (user+system of its process, all threads, from
  ``/proc/<pid>/stat``). No subscriber: this is the per-request cost of the
  HTTP side (benchmarks/agent.py has delivery to a subscriber).
* **bulk**: ``POST /v1/publish`` with NDJSON bodies of 10,000 lines (64-byte
  data), two bodies in flight, to a library subscriber in another process:
  messages/s from the first POST to the subscriber's last receipt, every
  message counted.
* **service**: ``POST /v1/request/upper`` to agent B, served by agent A's
  ``[[service]]`` whose app is an aiohttp server in a third process: the round
  trip's median (p50) and p90, one request at a time, against the same POST
  made directly to the app. A third row takes the same path through two
  relays that only relay (`_relays.py`: raw pyzmq and asyncio, no checks,
  headers or metrics): the floor of a Python HTTP -> ZeroMQ -> HTTP path on
  this machine, so the agents' ratio can be read against what the path
  itself costs. The three paths take turns, 100 round trips each at a time.

Run::

    python benchmarks/sidecar.py            # 20,000 publishes per row, 200,000 bulk, 2,000 requests
    python benchmarks/sidecar.py --quick    # a small run (smoke test)
    python benchmarks/sidecar.py --only service --hosts   # one CPU per side (two hosts)

Everything binds 127.0.0.1 only; every process started here is stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import selectors
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import _harness as h
from _harness import LOOPBACK, make_payload

SIZE: Final[int] = 64
BULK_LINES: Final[int] = 10_000
START_SECONDS: Final[float] = 20.0
HERE: Final = Path(__file__).resolve()
RELAYS: Final = HERE.parent / "_relays.py"
TURN: Final[int] = 100
"""Round trips on one service path before the next path takes its turn."""
TICK: Final[float] = 1.0 / os.sysconf("SC_CLK_TCK")


# -- processes ---------------------------------------------------------------------


@dataclass(frozen=True)
class Proc:
    popen: subprocess.Popen[str]
    fields: dict[str, str]

    @property
    def pid(self) -> int:
        return self.popen.pid

    def line(self, timeout: float) -> str:
        """Its next stdout line (empty at its end or after `timeout`)."""
        assert self.popen.stdout is not None
        with selectors.DefaultSelector() as sel:
            sel.register(self.popen.stdout, selectors.EVENT_READ)
            if not sel.select(timeout):
                return ""
        return self.popen.stdout.readline().strip()


def _env() -> dict[str, str]:
    env = {**os.environ, "ZEROMESH_PUB_HWM": "0", "ZEROMESH_SUB_HWM": "0",
           "ZEROMESH_INTERFACES": LOOPBACK}
    for var in ("ZEROMESH_PEERS", "ZEROMESH_CONFIG", "ZEROMESH_DATA_DIR", "ZEROMESH_HTTP"):
        env.pop(var, None)
    return env


@contextlib.contextmanager
def started(cmd: list[str], cpu: int | None = None) -> Iterator[Proc]:
    """A child that prints a ``ready k=v ...`` line, for the ``with`` block; always stopped.
    With `cpu`, it and every thread it starts run on that CPU only."""
    def pin() -> None:
        assert cpu is not None
        os.sched_setaffinity(0, {cpu})

    with tempfile.TemporaryFile("w+") as stderr:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=stderr, text=True,
                                env=_env(), preexec_fn=None if cpu is None else pin)
        try:
            yield Proc(proc, h.ready_fields(proc, START_SECONDS, stderr=stderr))
        finally:
            h.stop(proc)


def agent_cmd(mesh: str, name: str, config: Path | None = None, *peers: str) -> list[str]:
    return [sys.executable, "-m", "mesh", "agent", "--http", f"{LOOPBACK}:0", "--mesh", mesh,
            "--name", name, "--interface", LOOPBACK, "--no-mdns",
            *(["--config", str(config)] if config else []), *(f"--peer={p}" for p in peers)]


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process so far (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) * TICK


# -- children: bare server, app, subscriber ------------------------------------------------


def bare_server() -> None:
    """Answers every POST with 202 and a small JSON after reading the body."""
    from aiohttp import web

    async def publish(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({"topic": request.match_info["topic"]}, status=202)

    async def upper(request: web.Request) -> web.Response:
        return web.Response(body=(await request.read()).upper(), content_type="text/plain")

    async def main() -> None:
        app = web.Application()
        app.router.add_post("/v1/publish/{topic}", publish)
        app.router.add_post("/upper", upper)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, LOOPBACK, 0).start()
        port = runner.addresses[0][1]
        print(f"ready http=http://{LOOPBACK}:{port}", flush=True)
        await asyncio.Event().wait()

    h.mesh_run(main())


def subscriber(mesh: str, ctl: str, count: int) -> None:
    """Counts ``bench.data`` messages; prints ``ready`` once subscribed, ``armed`` at the
    first probe, then a JSON line with the count and the wall time of the last one."""
    from mesh import AsyncNode

    async def main() -> None:
        async with AsyncNode(name="bench-sub", mesh=mesh, interfaces=[LOOPBACK], mdns=False,
                             peers=[ctl], pub_hwm=0, sub_hwm=0) as node:
            sub = await node.subscribe("bench.>", max_pending=count + 100_000)
            print("ready subscribed=1", flush=True)
            got = 0
            last = 0.0
            probes = 0
            with contextlib.suppress(TimeoutError):
                while got < count:
                    msg = await sub.next(timeout=10)
                    if msg.topic == "bench.probe":
                        probes += 1
                        if probes == 1:
                            print("armed", flush=True)
                        continue
                    got += 1
                    last = time.time()
            print(json.dumps({"received": got, "last": last}), flush=True)

    h.mesh_run(main())


# -- the client ------------------------------------------------------------------


async def post_many(url: str, body: bytes, count: int, in_flight: int, want: int) -> float:
    """Seconds for `count` POSTs of `body`, `in_flight` at once."""
    import aiohttp

    left = count

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal left
        while left > 0:
            left -= 1
            async with session.post(url, data=body) as response:
                await response.read()
                if response.status != want:
                    raise RuntimeError(f"{url} answered {response.status}")

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=in_flight)) as s:
        for _ in range(min(200, count)):  # warm up: connections, caches
            async with s.post(url, data=body) as response:
                await response.read()
        started_at = time.perf_counter()
        await asyncio.gather(*(worker(s) for _ in range(in_flight)))
        return time.perf_counter() - started_at


def publish_rows(count: int, rounds: int, in_flights: list[int]) -> list[dict[str, Any]]:
    payload = make_payload(SIZE)
    mesh = "b" + uuid.uuid4().hex[:12]
    figures: dict[tuple[str, int], list[tuple[float, float]]] = {}
    with started([sys.executable, str(HERE), "--bare-server"]) as bare, \
            started(agent_cmd(mesh, "bench-agent")) as agent:
        for n in in_flights:
            for _ in range(rounds):
                for label, proc in (("bare aiohttp", bare), ("agent", agent)):
                    url = f"{proc.fields['http']}/v1/publish/bench.data"
                    cpu0 = cpu_seconds(proc.pid)
                    seconds = h.mesh_run(post_many(url, payload, count, n, 202))
                    cpu = cpu_seconds(proc.pid) - cpu0
                    figures.setdefault((label, n), []).append((count / seconds, cpu / count))
    rows = []
    for n in in_flights:
        bare_rate = statistics.median(r for r, _ in figures[("bare aiohttp", n)])
        bare_cpu = statistics.median(c for _, c in figures[("bare aiohttp", n)])
        for label in ("bare aiohttp", "agent"):
            rate = statistics.median(r for r, _ in figures[(label, n)])
            cpu = statistics.median(c for _, c in figures[(label, n)])
            rows.append({"what": f"publish: {label}", "in_flight": n, "count": count,
                         "rate": rate, "cpu_us": cpu * 1e6, "rate_ratio": rate / bare_rate,
                         "cpu_ratio": cpu / bare_cpu if bare_cpu else None})
    return rows


def bulk_row(total: int) -> dict[str, Any]:
    """Messages/s from the first NDJSON POST to the subscriber's last receipt."""
    lines = min(BULK_LINES, total)
    line = json.dumps({"topic": "bench.data", "data": make_payload(SIZE).decode()}).encode()
    body = (line + b"\n") * lines
    bodies = max(1, total // lines)
    mesh = "b" + uuid.uuid4().hex[:12]
    with started(agent_cmd(mesh, "bench-agent")) as agent, \
            started([sys.executable, str(HERE), "--subscriber", mesh,
                     agent.fields["ctl"].split(",")[0], str(bodies * lines)]) as sub:
        seconds, cpu = h.mesh_run(_bulk_run(agent, sub, body, bodies))
        done = json.loads(sub.line(60) or "{}")
    received = int(done.get("received", 0))
    elapsed = float(done.get("last", 0.0)) - seconds
    return {"what": "bulk publish: NDJSON, 10,000 lines a POST", "in_flight": 2,
            "count": bodies * lines, "rate": received / elapsed if elapsed > 0 else 0.0,
            "cpu_us": cpu / max(received, 1) * 1e6, "lost": bodies * lines - received}


async def _bulk_run(agent: Proc, sub: Proc, body: bytes, bodies: int) -> tuple[float, float]:
    """(wall time of the first POST, agent CPU seconds for all of them), once the
    subscriber saw a probe (its subscription is in force)."""
    import aiohttp

    url = agent.fields["http"]
    async with aiohttp.ClientSession() as session:
        for _ in range(500):  # 10 s at most
            async with session.post(f"{url}/v1/publish/bench.probe", data=b"") as r:
                await r.read()
            if await asyncio.to_thread(sub.line, 0.02) == "armed":
                break
        else:
            raise RuntimeError("the subscriber never saw a probe")
        left = bodies

        async def worker() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                async with session.post(f"{url}/v1/publish", data=body) as response:
                    await response.read()
                    if response.status != 202:
                        raise RuntimeError(f"bulk POST answered {response.status}")

        cpu0 = cpu_seconds(agent.pid)
        first = time.time()
        await asyncio.gather(worker(), worker())
        return first, cpu_seconds(agent.pid) - cpu0


def service_rows(count: int, hosts: bool = False) -> list[dict[str, Any]]:
    """Round trips through two agents and the app, and through the two floor relays,
    against the app called directly: all three up at once and taken in turns, a block
    of each at a time, so that the host's changing speed falls on all three alike.

    With `hosts`, each side is one CPU, as if on a host of its own: the client and
    the asking agent (or relay) on CPU 0, the serving one and the app on CPU 1.
    Otherwise the kernel places every thread of the processes on any CPU.
    """
    asking_cpu, serving_cpu = (0, 1) if hosts else (None, None)
    mesh = "b" + uuid.uuid4().hex[:12]
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        stack.enter_context(_on_cpu(asking_cpu))

        def start(cmd: list[str], cpu: int | None) -> Proc:
            return stack.enter_context(started(cmd, cpu))

        app = start([sys.executable, str(HERE), "--bare-server"], serving_cpu)
        app_url = f"{app.fields['http']}/upper"
        config = tmp / "a.toml"
        config.write_text(f'[[service]]\nname = "upper"\nurl = "{app_url}"\n')
        serving = start(agent_cmd(mesh, "serving", config), serving_cpu)
        asking = start(agent_cmd(mesh, "asking", None, serving.fields["ctl"].split(",")[0]),
                       asking_cpu)
        serving_relay = start([sys.executable, str(RELAYS), "serving", app_url], serving_cpu)
        asking_relay = start([sys.executable, str(RELAYS), "asking",
                              serving_relay.fields["zmq"]], asking_cpu)
        paths = [
            _Path("service: app called directly", app_url, {"app": app.pid}),
            _Path("service: agent -> agent -> app",
                  f"{asking.fields['http']}/v1/request/upper",
                  {"asking agent": asking.pid, "serving agent": serving.pid, "app": app.pid}),
            _Path("service: relay -> relay -> app (floor)", f"{asking_relay.fields['http']}/upper",
                  {"asking relay": asking_relay.pid, "serving relay": serving_relay.pid,
                   "app": app.pid}),
        ]
        h.mesh_run(_take_turns(paths, count))
    rows: list[dict[str, Any]] = []
    where = ", one CPU a side" if hosts else ""
    for path in paths:
        times = sorted(path.times)
        rows.append({"what": path.label + where, "in_flight": 1, "count": len(times),
                     "p50_us": times[len(times) // 2] * 1e6,
                     "p90_us": times[len(times) * 9 // 10] * 1e6,
                     "cpu_us": sum(path.cpu.values()) / len(times) * 1e6,
                     "cpu_us_by_process": {k: v / len(times) * 1e6
                                           for k, v in path.cpu.items()}})
    for row in rows[1:]:
        row["p50_ratio"] = row["p50_us"] / rows[0]["p50_us"]
        row["cpu_ratio"] = row["cpu_us"] / rows[0]["cpu_us"]
    return rows


@dataclass
class _Path:
    """One way to the app: its URL, the processes on it, and what its round trips took."""

    label: str
    url: str
    pids: dict[str, int]
    times: list[float] = field(default_factory=list)
    cpu: dict[str, float] = field(default_factory=dict)
    """CPU seconds by process (and ``client``, this one) over its round trips."""


@contextlib.contextmanager
def _on_cpu(cpu: int | None) -> Iterator[None]:
    """This process (the client) on `cpu` only, for the ``with`` block."""
    if cpu is None:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


async def _take_turns(paths: list[_Path], count: int) -> None:
    """`count` timed round trips on each path, one request at a time, in blocks of
    `TURN` taking turns (after 100 untimed ones each: connections made, caches warm)."""
    import aiohttp

    payload = make_payload(SIZE)
    want = payload.upper()
    async with contextlib.AsyncExitStack() as stack:
        sessions = [await stack.enter_async_context(aiohttp.ClientSession()) for _ in paths]

        async def trip(session: aiohttp.ClientSession, url: str) -> int:
            async with session.post(url, data=payload) as r:
                if await r.read() != want and r.status == 200:
                    raise RuntimeError(f"{url} answered a wrong body")
                return r.status

        for session, path in zip(sessions, paths, strict=True):
            for _ in range(500):  # until the asking agent knows the server
                if await trip(session, path.url) == 200:
                    break
                await asyncio.sleep(0.02)
            else:
                raise RuntimeError(f"{path.url} never answered 200")
            for _ in range(100):
                await trip(session, path.url)
        for block in range(0, count, TURN):
            for session, path in zip(sessions, paths, strict=True):
                before = {name: cpu_seconds(pid) for name, pid in path.pids.items()}
                client0 = time.process_time()
                for _ in range(min(TURN, count - block)):
                    t0 = time.perf_counter()
                    status = await trip(session, path.url)
                    path.times.append(time.perf_counter() - t0)
                    if status != 200:
                        raise RuntimeError(f"{path.url} answered {status}")
                for name, pid in path.pids.items():
                    path.cpu[name] = path.cpu.get(name, 0.0) + cpu_seconds(pid) - before[name]
                path.cpu["client"] = (path.cpu.get("client", 0.0)
                                      + time.process_time() - client0)


def _print(rows: list[dict[str, Any]]) -> None:
    columns = (("what", 54), ("in flight", 9), ("count", 8), ("rate/s", 10), ("ratio", 6),
               ("CPU µs", 7), ("ratio", 6), ("p50 µs", 8), ("ratio", 6), ("p90 µs", 8))

    def num(row: dict[str, Any], key: str, spec: str) -> str:
        value = row.get(key)
        return "-" if value is None else format(value, spec)

    h.print_table(columns, [
        [r["what"], str(r["in_flight"]), str(r["count"]), num(r, "rate", ",.0f"),
         num(r, "rate_ratio", ".2f"), num(r, "cpu_us", ".1f"), num(r, "cpu_ratio", ".2f"),
         num(r, "p50_us", ",.0f"), num(r, "p50_ratio", ".2f"), num(r, "p90_us", ",.0f")]
        for r in rows])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small run (smoke test)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--only", choices=("publish", "bulk", "service"),
                        help="run one of the three parts")
    parser.add_argument("--requests", type=int, help="round trips of the service part")
    parser.add_argument("--hosts", action="store_true",
                        help="service part: one CPU per side, as two hosts would be "
                             "(needs CPUs 0 and 1)")
    parser.add_argument("--bare-server", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--subscriber", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.bare_server:
        bare_server()
        return 0
    if args.subscriber:
        subscriber(args.subscriber[0], args.subscriber[1], int(args.subscriber[2]))
        return 0
    count, rounds, bulk, requests = ((1_000, 1, 20_000, 200) if args.quick
                                     else (20_000, 3, 200_000, 2_000))
    rows = []
    if args.only in (None, "publish"):
        rows += publish_rows(count, rounds, [1, 16])
    if args.only in (None, "bulk"):
        rows.append(bulk_row(bulk))
    if args.only in (None, "service"):
        if args.hosts and not {0, 1} <= os.sched_getaffinity(0):
            parser.error("--hosts needs CPUs 0 and 1")
        rows += service_rows(args.requests or requests, args.hosts)
    if args.json:
        print(json.dumps({"benchmark": "sidecar", "size": SIZE, "rows": rows}, indent=2))
    else:
        _print(rows)
        for row in rows:
            if "cpu_us_by_process" in row:
                print(f"{row['what']}: CPU µs per round trip "
                      + ", ".join(f"{k} {v:.0f}" for k, v in row["cpu_us_by_process"].items()))
    return 0 if all(not r.get("lost") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
