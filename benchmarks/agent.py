"""The sidecar's HTTP API against the library API it wraps, processes on 127.0.0.1.

Two questions, each with its library baseline measured in the same run:

* **publish**: how many ``POST /v1/publish/bench.data`` requests per second an
  app gets through a ``zeromesh agent``, with one aiohttp ``ClientSession``
  (keep-alive connection pool) and 1 or 16 requests in flight; against
  ``await AsyncNode.publish(...)`` in a loop (messages per second). Every
  message must reach a library subscriber in a third process (counted as
  ``lost`` otherwise). Before the timed run the client publishes probes
  through the agent until the subscriber has seen one, so the subscription is
  known to be in force.
* **deliver**: how many messages per second the agent streams to an app over
  ``GET /v1/subscribe/bench.%3E`` (Server-Sent Events), while a publisher
  node (`AsyncNode`, static peering, ``wait_for_subscribers`` first) publishes
  N messages as fast as it can; against a library subscriber
  (``async for msg in sub``) receiving from the same kind of publisher. The
  SSE client counts events until it has N, under a deadline.

The library baseline is one `pubsub` run (benchmarks/pubsub.py): its
publisher's send rate is the publish baseline, its subscriber's receive rate
the delivery baseline. Agents run with ``pub_hwm=0, sub_hwm=0`` like the
library nodes, so nothing is dropped for lack of buffer.

Each agent is started by this program (``python -m mesh agent --http
127.0.0.1:0``, its address read from its ``ready`` line) and stopped at the end
of its phase, also when the phase fails; the other processes of a phase are
killed if they overrun its hard timeout.

Run::

    python benchmarks/agent.py                # 20,000 HTTP publishes per row, 50,000 SSE events
    python benchmarks/agent.py --quick        # a small run (smoke test)
    python benchmarks/agent.py --quick --json # machine-readable

Everything binds 127.0.0.1 only (``ZEROMESH_INTERFACES`` is forced to it).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import queue
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any, Final

import _harness as h
import pubsub
from _harness import LOOPBACK, SAMPLE_EVERY, STALL_SECONDS, Link, Result, make_payload

SIZE: Final[int] = 64
IN_FLIGHT: Final[tuple[int, ...]] = (1, 16)
DEFAULT_COUNTS: Final[dict[str, int]] = {"http": 20_000, "sse": 50_000, "library": 200_000}
QUICK_COUNTS: Final[dict[str, int]] = {"http": 1_000, "sse": 3_000, "library": 5_000}
TOPIC: Final[str] = pubsub.TOPIC
PROBE_TOPIC: Final[str] = "bench.probe"
PROBE_EVERY: Final[float] = 0.02
ARMED: Final[str] = "armed"
AGENT_START_SECONDS: Final[float] = 20.0


# -- the agent process -----------------------------------------------------------


class AgentFailed(Exception):
    """The agent did not print its ``ready`` line in time."""


@dataclass(frozen=True)
class AgentAddress:
    url: str
    """``http://127.0.0.1:PORT``."""
    ctl: str
    """The agent node's control endpoint, for static peering."""


def _agent_env() -> dict[str, str]:
    """This environment without settings that would change the agent under test."""
    env = {**os.environ, "ZEROMESH_PUB_HWM": "0", "ZEROMESH_SUB_HWM": "0"}
    for var in ("ZEROMESH_PEERS", "ZEROMESH_CONFIG", "ZEROMESH_DATA_DIR", "ZEROMESH_HTTP"):
        env.pop(var, None)
    return env


@contextlib.contextmanager
def running_agent(mesh: str, *peers: str) -> Iterator[AgentAddress]:
    """A ``zeromesh agent`` on 127.0.0.1 (any free port) for the ``with`` block; always stopped."""
    cmd = [sys.executable, "-m", "mesh", "agent", "--http", f"{LOOPBACK}:0", "--mesh", mesh,
           "--name", "bench-agent", "--interface", LOOPBACK, "--no-mdns",
           *(f"--peer={p}" for p in peers)]
    with tempfile.TemporaryFile("w+") as stderr:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=stderr, text=True,
                                env=_agent_env())
        try:
            fields = h.ready_fields(proc, AGENT_START_SECONDS, AgentFailed, stderr)
            yield AgentAddress(fields["http"], fields["ctl"].split(",")[0])
        finally:
            h.stop(proc)


# -- receivers ----------------------------------------------------------------------


class Tally:
    """A receiver's count and clock (from the first message to the last)."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.res = Result()
        self._t0 = 0.0

    def take(self) -> bool:
        """Counts one message; True if its payload is to be checked (a sample)."""
        n = self.res.received = self.res.received + 1
        if n == 1:
            self._t0 = time.perf_counter()
        return n % SAMPLE_EVERY == 0 or n in (1, self.count)

    def stop(self) -> None:
        self.res.recv_seconds = time.perf_counter() - self._t0


@contextlib.contextmanager
def reporting(label: str, count: int, link: Link) -> Iterator[Tally]:
    """The receiver's `Tally`, reported on `link` however the block ends."""
    tally = Tally(count)
    try:
        yield tally
        tally.stop()
        if tally.res.received < count:
            tally.res.error = f"{label}: ended after {tally.res.received} of {count}"
    except TimeoutError:
        tally.res.error = f"{label}: stalled after {tally.res.received} of {count}"
    except Exception as exc:
        tally.res.error = f"{label}: {exc!r}"
    finally:
        link.report("result", tally.res)
        link.done.set()


# -- publish: HTTP client and library subscriber ------------------------------------


def probe_subscriber(size: int, count: int, mesh_name: str, agent_ctl: str,
                     link: Link) -> None:
    asyncio.run(_probe_subscriber(size, count, mesh_name, agent_ctl, link))


async def _probe_subscriber(size: int, count: int, mesh_name: str, agent_ctl: str,
                            link: Link) -> None:
    """Counts ``bench.data`` messages; says `ARMED` on ``link.ready`` at the first probe."""
    from mesh import AsyncNode

    payload = make_payload(size)
    armed = False
    with reporting("subscriber", count, link) as tally:
        async with AsyncNode(name="bench-sub", mesh=mesh_name, interfaces=[LOOPBACK],
                             mdns=False, peers=[agent_ctl], pub_hwm=0, sub_hwm=0) as node:
            sub = await node.subscribe("bench.>", max_pending=2 * count + 10_000)
            link.ready.put("subscribed")
            async with asyncio.timeout(link.left()):
                while tally.res.received < count:
                    msg = await sub.next(timeout=STALL_SECONDS if armed else link.left())
                    if msg.topic == PROBE_TOPIC:
                        if not armed:
                            armed = True
                            link.ready.put(ARMED)  # the address was taken: the channel is free
                    elif tally.take():
                        tally.res.corrupt += msg.data != payload


def http_publisher(size: int, count: int, in_flight: int, url: str, _subscribed: str,
                   link: Link) -> None:
    asyncio.run(_http_publisher(size, count, in_flight, url, link))


async def _http_publisher(size: int, count: int, in_flight: int, url: str,
                          link: Link) -> None:
    """Probes until the subscriber is armed, then `count` POSTs with `in_flight` at once."""
    import aiohttp

    payload = make_payload(size)
    target = f"{url}/v1/publish/{TOPIC}"
    sent = 0

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal sent
        while sent < count:
            sent += 1
            async with session.post(target, data=payload) as response:
                await response.read()
                if response.status != 202:
                    raise RuntimeError(f"POST answered {response.status}")

    try:
        connector = aiohttp.TCPConnector(limit=in_flight)
        async with aiohttp.ClientSession(connector=connector) as session, \
                asyncio.timeout(link.left()):
            while True:
                async with session.post(f"{url}/v1/publish/{PROBE_TOPIC}", data=b"") as r:
                    await r.read()
                with contextlib.suppress(queue.Empty):
                    if link.ready.get(timeout=PROBE_EVERY) == ARMED:
                        break
            t0 = time.perf_counter()
            await asyncio.gather(*(worker(session) for _ in range(in_flight)))
            link.report("send_seconds", time.perf_counter() - t0)
            if not await link.wait_done():  # the agent and its subscriber finish first
                raise TimeoutError
    except TimeoutError:
        link.report("error", f"HTTP publisher: timed out after {sent} of {count} requests")
    except Exception as exc:
        link.report("error", f"HTTP publisher: {exc!r}")


# -- deliver: SSE client ------------------------------------------------------------


def sse_reader(size: int, count: int, url: str, agent_ctl: str, link: Link) -> None:
    asyncio.run(_sse_reader(size, count, url, agent_ctl, link))


def _intact(event: bytes, payload: str) -> bool:
    """A sampled event's topic and data are what was published."""
    body: dict[str, Any] = json.loads(event.partition(b"\ndata: ")[2])
    return bool(body.get("topic") == TOPIC and body.get("data") == payload)


async def _sse_reader(size: int, count: int, url: str, agent_ctl: str, link: Link) -> None:
    """Reads the stream until `count` events, after telling the publisher where to dial."""
    import aiohttp

    payload = make_payload(size).decode()
    timeout = aiohttp.ClientTimeout(total=None, sock_read=STALL_SECONDS)
    with reporting("SSE reader", count, link) as tally:
        async with aiohttp.ClientSession(timeout=timeout) as session, \
                asyncio.timeout(link.left()), \
                session.get(f"{url}/v1/subscribe/bench.%3E") as response:
            if response.status != 200:
                raise RuntimeError(f"subscribe answered {response.status}")
            while (line := await response.content.readline()) != b": subscribed\n":
                if not line:
                    raise RuntimeError("stream ended before ': subscribed'")
            await response.content.readline()  # the blank line that ends the comment
            link.ready.put(agent_ctl)
            rest = b""
            async for chunk in response.content.iter_any():
                *events, rest = (rest + chunk).split(b"\n\n")
                for event in events:
                    # comments (keepalives) are not events
                    if event.startswith(b"id: ") and tally.take():
                        tally.res.corrupt += not _intact(event, payload)
                if tally.res.received >= count:
                    break


# -- orchestration ---------------------------------------------------------------


def _with_agent(run: Callable[[str, AgentAddress, float], Result], timeout: float,
                *peers: str) -> Result:
    """`run(mesh_name, agent, seconds_left)` with an agent of a fresh mesh around it."""
    mesh_name = "b" + uuid.uuid4().hex[:12]
    deadline = time.monotonic() + timeout
    try:
        with running_agent(mesh_name, *peers) as agent:
            return run(mesh_name, agent, max(1.0, deadline - time.monotonic()))
    except AgentFailed as exc:
        return Result(error=str(exc))


def run_http_publish(size: int, count: int, in_flight: int, timeout: float) -> Result:
    def run(mesh_name: str, agent: AgentAddress, left: float) -> Result:
        return h.run_pair(probe_subscriber, (size, count, mesh_name, agent.ctl),
                          http_publisher, (size, count, in_flight, agent.url),
                          timeout=left, names=("lib-sub", "http-pub"))
    return _with_agent(run, timeout)


def run_sse(size: int, count: int, timeout: float) -> Result:
    def run(mesh_name: str, agent: AgentAddress, left: float) -> Result:
        return h.run_pair(sse_reader, (size, count, agent.url, agent.ctl),
                          pubsub.mesh_publisher, (size, count, mesh_name),
                          timeout=left, names=("sse-reader", "lib-pub"))
    return _with_agent(run, timeout)


@dataclass(frozen=True)
class Row:
    """One line of the table: a figure and the library figure it is compared with."""

    what: str
    in_flight: str
    count: int
    figure: str
    """``"send_msgs_per_s"`` (publish rows) or ``"msgs_per_s"`` (delivery rows)."""
    result: Result
    baseline: Row | None = None

    @property
    def rate(self) -> float:
        side = h.side(self.result, self.count)
        assert side is not None
        return float(side[self.figure])

    def as_dict(self) -> dict[str, Any]:
        base = self.baseline.rate if self.baseline else None
        return {"what": self.what, "in_flight": self.in_flight, "count": self.count,
                "msgs_per_s": self.rate, "baseline_msgs_per_s": base,
                "ratio": self.rate / base if base else None,
                "lost": self.count - self.result.received, "corrupt": self.result.corrupt,
                "error": self.result.error}


COLUMNS: Final = (("what", 28), ("in flight", 9), ("count", 8), ("msg/s", 10),
                  ("library msg/s", 14), ("ratio", 6), ("lost", 6))


def _print_table(rows: list[dict[str, Any]]) -> None:
    def num(value: float | None) -> str:
        return "-" if value is None else f"{value:,.0f}"

    def ratio(value: float | None) -> str:
        return "-" if value is None else f"{value:.3g}"

    h.print_table(COLUMNS, [
        [r["what"], r["in_flight"], str(r["count"]), num(r["msgs_per_s"]),
         num(r["baseline_msgs_per_s"]), ratio(r["ratio"]), str(r["lost"])]
        for r in rows])
    for r in rows:
        if r["error"] or r["corrupt"]:
            print(f"  {r['what']} ({r['in_flight']}): corrupt={r['corrupt']} "
                  f"error={r['error'] or '-'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=SIZE, help="payload bytes (default 64)")
    parser.add_argument("--count", type=int,
                        help="messages per row (default 20k HTTP, 50k SSE, 200k library)")
    parser.add_argument("--in-flight", type=lambda s: [int(x) for x in s.split(",")],
                        default=list(IN_FLIGHT), help="comma-separated (default 1,16)")
    h.add_run_flags(parser, quick="a small run (smoke test)")
    args = parser.parse_args(argv)
    h.check_run_flags(parser, args)
    if not args.in_flight or min(args.in_flight) < 1:
        parser.error("--in-flight must be positive")
    counts = {k: args.count or v
              for k, v in (QUICK_COUNTS if args.quick else DEFAULT_COUNTS).items()}
    repeat = args.repeat or (1 if args.quick else 3)
    size = args.size

    lib = h.median_of(partial(pubsub.run_mesh, size, counts["library"], args.timeout),
                      repeat, counts["library"])
    lib_publish = Row("publish: AsyncNode.publish", "-", counts["library"],
                      "send_msgs_per_s", lib)
    rows = [lib_publish]
    for n in args.in_flight:
        res = h.median_of(partial(run_http_publish, size, counts["http"], n, args.timeout),
                          repeat, counts["http"])
        rows.append(Row("publish: HTTP POST", str(n), counts["http"], "send_msgs_per_s",
                        res, lib_publish))
    lib_deliver = Row("deliver: library subscriber", "-", counts["library"], "msgs_per_s", lib)
    sse = h.median_of(partial(run_sse, size, counts["sse"], args.timeout), repeat,
                      counts["sse"])
    rows += [lib_deliver,
             Row("deliver: SSE stream", "-", counts["sse"], "msgs_per_s", sse, lib_deliver)]

    report = [r.as_dict() for r in rows]
    if args.json:
        print(json.dumps({"benchmark": "agent", "transport": f"http://{LOOPBACK}",
                          "size": size, "repeat": repeat, "statistic": "median",
                          "python": sys.version.split()[0], "results": report}, indent=2))
    else:
        _print_table(report)
    ok = all(r["lost"] == 0 and not r["error"] and not r["corrupt"] for r in report)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
