"""Issue 18's peers: raw pyzmq, zeromesh, zenoh-python and NATS, side by side in one run.

Three measurements, each taken for every system in turn within a repetition (the
order rotates from one repetition to the next), over ``--repeat`` repetitions:

* **pub/sub 64 B and 1 KiB**, msgs/s at the subscriber (first to last message), lossless:
  every message must arrive intact (payloads sampled), publisher and subscriber in two
  processes. A run that lost or corrupted anything is reported as failed, not as a rate.
* **request/reply, 1 in flight**, p50 and p99 of the round trip (64 B echo, after
  `reqrep.WARMUP` requests), client and server in two processes.

The systems, each through its own ordinary API:

* **raw**: pyzmq's blocking API, PUB/SUB (HWM 0) and DEALER/ROUTER: `pubsub.run_raw`
  and `reqrep.run_side("raw", ...)`, the same code as ``pubsub.py`` and ``reqrep.py``.
* **zeromesh**: `AsyncNode` publish/subscribe and request/serve, static peering:
  `pubsub.run_mesh` and `reqrep.run_side("zeromesh", ...)`.
* **zenoh**: zenoh-python (``eclipse-zenoh``), blocking API. Pub/sub: a publisher
  declared with ``CongestionControl.BLOCK`` (lossless; the default drops) and a subscriber
  read with ``recv()`` from its default FIFO handler. Request/reply: ``session.get`` with
  a payload, answered by a queryable's callback with ``query.reply``. Both peers run in
  ``peer`` mode with explicit ``listen`` endpoints on ``tcp/127.0.0.1`` only (the server
  side on a free port, the other on port 0) and multicast and gossip scouting off; the
  second peer connects to the first by ``connect`` endpoint. Each zenoh process checks
  its own sockets before it closes (`_harness.foreign_sockets`): one on anything but
  127.0.0.1 fails the run.
* **nats**: nats-py on core NATS (no JetStream) against a nats-server this script starts
  on 127.0.0.1 and a free port (Debian's ``/usr/sbin/nats-server``; ``max_pending`` raised
  so a subscriber that falls behind is buffered, not cut off as a slow consumer).
  Pub/sub: ``await nc.publish`` per message, a subscription with a callback (nats-py's
  own delivery loop; iterating ``sub.messages`` costs a task per message). The nats-py
  sides run on the same event loop as zeromesh's (``--loop``).
  Request/reply: ``await nc.request``, answered by a subscription's ``msg.respond``.

Each measurement is at least ``--min-seconds`` (default 2) of traffic, so a short window
does not decide: the message or request count of each (measurement, system) starts from a
default and is scaled after every run towards `TARGET_SECONDS`; a run that came in under
the minimum is done again with the scaled count (and only that one is kept).

Ratios are taken within each repetition — zeromesh / raw, zeromesh / zenoh, zeromesh /
nats; for rates higher is better for zeromesh, for latencies lower is — and printed per
repetition with their median and range, beside each system's median figures.

Run::

    python benchmarks/peers.py                  # 3 repetitions
    python benchmarks/peers.py --repeat 5 --systems zeromesh,zenoh
    python benchmarks/peers.py --quick --json   # small counts, 1 repetition, machine-readable

Needs the extra: ``pip install 'zeromesh[bench]'`` (eclipse-zenoh, nats-py) and, for NATS,
``apt-get install nats-server``. Everything binds 127.0.0.1 only (``ZEROMESH_INTERFACES`` is
forced to it); every phase has a hard deadline (``--timeout``), and the nats-server is
stopped (by PID, SIGTERM then SIGKILL) however the script ends — on SIGKILL of this
process too, through its parent-death signal.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import importlib.util
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Final

import _harness as h
import pubsub
import reqrep
import uplink_baseline as base
from _harness import LOOPBACK, SAMPLE_EVERY, Link, make_payload

if TYPE_CHECKING:
    import multiprocessing as mp

    import zenoh

SYSTEMS: Final[tuple[str, ...]] = ("raw", "zeromesh", "zenoh", "nats")
LABELS: Final[dict[str, str]] = {"raw": "raw pyzmq", "zeromesh": "zeromesh",
                                 "zenoh": "zenoh-python", "nats": "NATS"}
MEASUREMENTS: Final[tuple[str, ...]] = ("pubsub_64", "pubsub_1024", "reqrep")
FIGURES: Final[dict[str, tuple[str, str]]] = {
    # figure: (label, unit); a reqrep measurement gives both latency figures
    "pubsub_64": ("pub/sub 64 B", "msgs/s"),
    "pubsub_1024": ("pub/sub 1 KiB", "msgs/s"),
    "reqrep_p50": ("req/rep p50, 1 in flight", "µs"),
    "reqrep_p99": ("req/rep p99, 1 in flight", "µs"),
}
MEASUREMENT_LABELS: Final[dict[str, str]] = {
    "pubsub_64": "pub/sub 64 B", "pubsub_1024": "pub/sub 1 KiB", "reqrep": "req/rep 1 in flight"}
MIN_SECONDS: Final[float] = 2.0
TARGET_SECONDS: Final[float] = 3.0
ATTEMPTS: Final[int] = 3
"""Runs of one measurement at the most, while it comes in under the minimum."""
START_COUNTS: Final[dict[str, dict[str, int]]] = {
    "pubsub_64": {"raw": 3_000_000, "zeromesh": 2_000_000, "zenoh": 2_500_000,
                  "nats": 300_000},
    "pubsub_1024": {"raw": 700_000, "zeromesh": 700_000, "zenoh": 1_000_000,
                    "nats": 150_000},
    "reqrep": {"raw": 25_000, "zeromesh": 12_000, "zenoh": 10_000, "nats": 9_000},
}
"""First counts (messages, requests), about `TARGET_SECONDS` on a quiet host; each is
scaled after every run to the rate just seen."""
QUICK_COUNTS: Final[dict[str, int]] = {"pubsub_64": 5_000, "pubsub_1024": 5_000,
                                       "reqrep": 500}
MAX_COUNTS: Final[dict[str, int]] = {"pubsub_64": 20_000_000, "pubsub_1024": 5_000_000,
                                     "reqrep": 500_000}
KEY: Final[str] = "bench/data"
SERVICE_KEY: Final[str] = "bench/echo"
SUBJECT: Final[str] = pubsub.TOPIC
SERVICE_SUBJECT: Final[str] = reqrep.SERVICE
NATS_CONFIG: Final[str] = 'max_pending: 1GB\nwrite_deadline: "60s"\n'
"""Core NATS, no JetStream; a subscriber behind the publisher is buffered (up to 1 GB),
not disconnected as a slow consumer after 64 MB."""
REQUEST_TIMEOUT: Final[float] = 10.0
EXTRA_HINT: Final[str] = "pip install 'zeromesh[bench]'"


# -- checks ------------------------------------------------------------------------------


def loopback_problem(who: str, pid: int | str = "self") -> str:
    """An error line if process `pid` has a socket on anything but 127.0.0.1, else ''."""
    found = h.foreign_sockets(pid)
    return f"{who}: sockets off 127.0.0.1: {', '.join(found)}" if found else ""


def missing_extra(systems: tuple[str, ...]) -> str:
    """The one-line reason the chosen systems cannot run here, or ''."""
    modules = {"zenoh": ("zenoh", "eclipse-zenoh"), "nats": ("nats", "nats-py")}
    missing = [package for system, (module, package) in modules.items()
               if system in systems and importlib.util.find_spec(module) is None]
    if missing:
        return (f"peers.py: {' and '.join(missing)} not installed; "
                f"{EXTRA_HINT} (or --systems without {'/'.join(missing)})")
    return ""


# -- zenoh -------------------------------------------------------------------------------


def zenoh_config(listen_port: int, connect_port: int | None = None) -> zenoh.Config:
    """A peer on 127.0.0.1 only: one explicit listen endpoint, no multicast or gossip
    scouting; `connect_port`: the peer it connects to."""
    import zenoh

    config = zenoh.Config()
    config.insert_json5("mode", '"peer"')
    config.insert_json5("listen/endpoints", json.dumps([f"tcp/{LOOPBACK}:{listen_port}"]))
    connect = [] if connect_port is None else [f"tcp/{LOOPBACK}:{connect_port}"]
    config.insert_json5("connect/endpoints", json.dumps(connect))
    config.insert_json5("scouting/multicast/enabled", "false")
    config.insert_json5("scouting/gossip/enabled", "false")
    return config


def zenoh_subscriber(size: int, count: int, link: Link) -> None:
    import zenoh

    payload = make_payload(size)
    with h.receiving("zenoh subscriber", link) as res:
        port = h.free_port()
        with zenoh.open(zenoh_config(port)) as session:
            sub = session.declare_subscriber(KEY)
            link.ready.put(port)
            # Blocking recv: a stalled run ends at the deadline (run_pair kills it).
            recv = sub.recv
            first = recv()
            t0 = time.perf_counter()
            received, corrupt = 1, int(first.payload.to_bytes() != payload)
            while received < count:
                sample = recv()
                received += 1
                if received % SAMPLE_EVERY == 0 or received == count:
                    corrupt += sample.payload.to_bytes() != payload
            res.recv_seconds = time.perf_counter() - t0
            res.received, res.corrupt = received, corrupt
            res.error = loopback_problem("zenoh subscriber")


def zenoh_publisher(size: int, count: int, port: int, link: Link) -> None:
    import zenoh

    payload = make_payload(size)
    try:
        with zenoh.open(zenoh_config(0, port)) as session:
            pub = session.declare_publisher(KEY,
                                            congestion_control=zenoh.CongestionControl.BLOCK)
            while not pub.matching_status:  # until the subscriber's declaration is here
                if time.monotonic() > link.deadline:
                    raise TimeoutError("no subscriber matched")
                time.sleep(0.005)
            put = pub.put
            t0 = time.perf_counter()
            for _ in range(count):
                put(payload)
            link.report("send_seconds", time.perf_counter() - t0)
            if problem := loopback_problem("zenoh publisher"):
                link.report("error", problem)
            link.done.wait(link.left())  # the session's queue drains while it is open
    except Exception as exc:
        link.report("error", f"zenoh publisher: {exc!r}")


def zenoh_server(ports: mp.Queue[Any], done: Any, deadline: float) -> None:
    import zenoh

    def echo(query: zenoh.Query) -> None:
        body = query.payload
        query.reply(SERVICE_KEY, b"" if body is None else body)

    port = h.free_port()
    with zenoh.open(zenoh_config(port)) as session, \
            session.declare_queryable(SERVICE_KEY, echo):
        ports.put(port)
        done.wait(max(0.0, deadline - time.monotonic()))


def zenoh_client(port: int, n_lat: int, out: mp.Queue[Any], done: Any,
                 deadline: float) -> None:
    def client(res: reqrep.Result) -> None:
        import zenoh

        with zenoh.open(zenoh_config(0, port)) as session:
            querier = session.declare_querier(SERVICE_KEY)
            while not querier.matching_status:  # until the queryable's declaration is here
                if time.monotonic() > deadline:
                    raise TimeoutError("no queryable matched")
                time.sleep(0.005)
            get = session.get

            def round_trip(body: bytes) -> bytes:
                reply = get(SERVICE_KEY, payload=body, timeout=REQUEST_TIMEOUT).recv()
                if reply.ok is None:
                    raise RuntimeError(f"error reply: {reply.err}")
                return reply.ok.payload.to_bytes()

            reqrep.time_requests(round_trip, n_lat, res)
            res.error = loopback_problem("zenoh client")

    _client("zenoh", client, out, done)


# -- NATS --------------------------------------------------------------------------------


def nats_subscriber(size: int, count: int, url: str, link: Link) -> None:
    h.mesh_run(_nats_subscriber(size, count, url, link))


async def _nats_subscriber(size: int, count: int, url: str, link: Link) -> None:
    import nats
    from nats.aio.msg import Msg

    payload = make_payload(size)
    problems: list[str] = []
    all_in = asyncio.Event()
    received = corrupt = 0
    t0 = 0.0

    async def on_error(exc: Exception) -> None:
        problems.append(repr(exc))

    # A callback, nats-py's own delivery loop: iterating `sub.messages` costs a task and an
    # asyncio.wait per message (nats-py 2.16), about half the rate.
    async def on_message(msg: Msg) -> None:
        nonlocal received, corrupt, t0
        received += 1
        if received == 1:
            t0 = time.perf_counter()
        if received % SAMPLE_EVERY == 0 or received in (1, count):
            corrupt += msg.data != payload
        if received == count:
            res.recv_seconds = time.perf_counter() - t0
            all_in.set()

    with h.receiving("nats subscriber", link) as res:
        nc = await nats.connect(url, allow_reconnect=False, error_cb=on_error)
        try:
            await nc.subscribe(SUBJECT, cb=on_message, pending_msgs_limit=count + 1,
                               pending_bytes_limit=0)  # (0: no byte limit)
            await nc.flush()  # the server has the subscription
            link.ready.put(url)
            async with asyncio.timeout(link.left()):
                await all_in.wait()
        except TimeoutError:
            res.error = (f"timed out after {received} of {count}; "
                         f"{'; '.join(problems) or 'no client error'}")
        finally:
            res.received, res.corrupt = received, corrupt
            await nc.close()


def nats_publisher(size: int, count: int, url: str, link: Link) -> None:
    h.mesh_run(_nats_publisher(size, count, url, link))


async def _nats_publisher(size: int, count: int, url: str, link: Link) -> None:
    import nats

    payload = make_payload(size)
    try:
        nc = await nats.connect(url, allow_reconnect=False)
        try:
            publish = nc.publish
            t0 = time.perf_counter()
            for _ in range(count):
                await publish(SUBJECT, payload)
            await nc.flush()
            link.report("send_seconds", time.perf_counter() - t0)
            await link.wait_done()
        finally:
            await nc.close()
    except Exception as exc:
        link.report("error", f"nats publisher: {exc!r}")


def nats_replier(url: str, ports: mp.Queue[Any], done: Any, deadline: float) -> None:
    h.mesh_run(_nats_replier(url, ports, done, deadline))


async def _nats_replier(url: str, ports: mp.Queue[Any], done: Any, deadline: float) -> None:
    import nats
    from nats.aio.msg import Msg

    async def echo(msg: Msg) -> None:
        await msg.respond(msg.data)

    nc = await nats.connect(url, allow_reconnect=False)
    try:
        await nc.subscribe(SERVICE_SUBJECT, cb=echo)
        await nc.flush()  # the server has the subscription
        ports.put(url)
        await asyncio.to_thread(done.wait, max(0.0, deadline - time.monotonic()))
    finally:
        await nc.close()


def nats_requester(url: str, n_lat: int, out: mp.Queue[Any], done: Any,
                   deadline: float) -> None:
    def client(res: reqrep.Result) -> None:
        h.mesh_run(_nats_requests(url, n_lat, res, deadline))

    _client("nats", client, out, done)


async def _nats_requests(url: str, n_lat: int, res: reqrep.Result, deadline: float) -> None:
    import nats

    nc = await nats.connect(url, allow_reconnect=False)
    try:
        request = nc.request

        async def round_trip(body: bytes) -> bytes:
            return (await request(SERVICE_SUBJECT, body, timeout=REQUEST_TIMEOUT)).data

        async with asyncio.timeout(max(0.1, deadline - time.monotonic())):
            await reqrep.time_requests_async(round_trip, n_lat, res)
    finally:
        await nc.close()


def _client(system: str, client: Callable[[reqrep.Result], None], out: mp.Queue[Any],
            done: Any) -> None:
    """Run `client` on a fresh `reqrep.Result`; put it on `out` whatever happens."""
    res = reqrep.Result()
    try:
        client(res)
    except Exception as exc:
        res.error = f"{system} client: {exc!r}"
    finally:
        out.put(res)
        done.set()


# -- one measurement ---------------------------------------------------------------------


@dataclass
class Measurement:
    """One system's run of one measurement."""

    system: str
    count: int
    """Messages, or timed requests."""
    seconds: float
    """Traffic time: first to last message, or the sum of the timed round trips."""
    value: float
    """msgs/s (pub/sub) or p50 µs (request/reply)."""
    p99_us: float = 0.0
    error: str = ""
    attempts: int = 1
    """Runs it took to reach the minimum traffic time (the last is the one kept)."""


def run_pubsub(system: str, size: int, timeout: float, url: str, count: int) -> Measurement:
    if system == "raw":
        res = pubsub.run_raw(size, count, timeout)
    elif system == "zeromesh":
        res = pubsub.run_mesh(size, count, timeout)
    elif system == "zenoh":
        res = h.run_pair(zenoh_subscriber, (size, count), zenoh_publisher, (size, count),
                         timeout=timeout, names=("zenoh-sub", "zenoh-pub"))
    else:
        res = h.run_pair(nats_subscriber, (size, count, url), nats_publisher, (size, count),
                         timeout=timeout, names=("nats-sub", "nats-pub"))
    error = res.error
    if not error and h.failed(res, count):
        error = f"{count - res.received} of {count} lost, {res.corrupt} corrupt"
    return Measurement(system, count, res.recv_seconds, res.recv_rate, error=error)


def run_reqrep(system: str, timeout: float, url: str, n_lat: int) -> Measurement:
    if system in ("raw", "zeromesh"):
        res = reqrep.run_side(system, n_lat, 0, timeout)
    elif system == "zenoh":
        res = reqrep.run_server_client(system, zenoh_server, (), zenoh_client,
                                       lambda port: (port, n_lat), timeout)
    else:
        res = reqrep.run_server_client(system, nats_replier, (url,), nats_requester,
                                       lambda address: (address, n_lat), timeout)
    error = res.error or (f"{res.wrong} wrong replies" if res.wrong else "")
    if not error and res.latency_count != n_lat:
        error = f"{res.latency_count} of {n_lat} requests timed"
    return Measurement(system, n_lat, res.mean_us * res.latency_count / 1e6, res.p50_us,
                       res.p99_us, error)


def measure(run: Callable[[int], Measurement], count: int, min_seconds: float,
            max_count: int) -> tuple[Measurement, int]:
    """`run(count)` until it gives at least `min_seconds` of traffic (at most `ATTEMPTS`
    runs); the measurement kept and the count for the next repetition (about
    `TARGET_SECONDS` at the rate just seen)."""
    attempt = 0
    while True:
        attempt += 1
        m = run(count)
        m.attempts = attempt
        if m.error or m.seconds <= 0:
            return m, count
        scaled = max(1, min(max_count, int(count * max(TARGET_SECONDS, min_seconds)
                                           / m.seconds)))
        if m.seconds >= min_seconds or count >= max_count or attempt == ATTEMPTS:
            return m, scaled
        count = max(scaled, count + 1)


# -- the run -----------------------------------------------------------------------------


@dataclass
class Settings:
    systems: tuple[str, ...]
    repeat: int
    min_seconds: float
    timeout: float
    quick: bool
    """Start from `QUICK_COUNTS` (else `START_COUNTS`)."""


Repetition = dict[str, dict[str, Measurement]]
"""measurement -> system -> its run in one repetition."""


def run_all(settings: Settings, url: str,
            report: Callable[[int, str, Measurement], None] | None) -> list[Repetition]:
    """Every measurement of every system, `settings.repeat` times, interleaved: within a
    repetition each measurement runs each system in turn, starting one system later in
    each repetition."""
    counts = {(name, system): QUICK_COUNTS[name] if settings.quick
              else START_COUNTS[name][system]
              for name in MEASUREMENTS for system in settings.systems}
    reps: list[Repetition] = []
    for n in range(settings.repeat):
        order = settings.systems[n % len(settings.systems):] + \
            settings.systems[:n % len(settings.systems)]
        rep: Repetition = {}
        for name in MEASUREMENTS:
            rep[name] = {}
            for system in order:
                run = (partial(run_reqrep, system, settings.timeout, url) if name == "reqrep"
                       else partial(run_pubsub, system, int(name.split("_")[1]),
                                    settings.timeout, url))
                m, counts[name, system] = measure(run, counts[name, system],
                                                  settings.min_seconds, MAX_COUNTS[name])
                rep[name][system] = m
                if report is not None:
                    report(n + 1, name, m)
        reps.append(rep)
    return reps


def figure_values(rep: Repetition, figure: str) -> dict[str, float | None]:
    """One figure of one repetition by system (None: that run failed)."""
    name = "reqrep" if figure.startswith("reqrep") else figure
    out: dict[str, float | None] = {}
    for system, m in rep[name].items():
        value = m.p99_us if figure == "reqrep_p99" else m.value
        out[system] = None if m.error or value <= 0 else value
    return out


def _over(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a / b


def spread(values: list[float]) -> dict[str, float] | None:
    return {"median": statistics.median(values), "min": min(values),
            "max": max(values)} if values else None


def summary(reps: list[Repetition], systems: tuple[str, ...]) -> dict[str, Any]:
    """Per figure: each system's values and median, and zeromesh / each other system per
    repetition with median and range."""
    others = [s for s in systems if s != "zeromesh"] if "zeromesh" in systems else []
    out: dict[str, Any] = {}
    for figure, (label, unit) in FIGURES.items():
        values = [figure_values(rep, figure) for rep in reps]
        by_system = {s: [v[s] for v in values] for s in systems}
        ratios: dict[str, Any] = {}
        for other in others:
            per_rep = [_over(v["zeromesh"], v[other]) for v in values]
            ratios[f"zeromesh/{other}"] = {
                "per_repetition": per_rep, **(spread([r for r in per_rep if r is not None])
                                              or {"median": None, "min": None, "max": None})}
        out[figure] = {"label": label, "unit": unit, "values": by_system,
                       "median": {s: (statistics.median([x for x in xs if x is not None])
                                      if any(x is not None for x in xs) else None)
                                  for s, xs in by_system.items()},
                       "ratios": ratios}
    return out


# -- printing ----------------------------------------------------------------------------


def _value(unit: str, value: float | None) -> str:
    if value is None:
        return "failed"
    return f"{value:,.0f}" if unit == "msgs/s" else f"{value:,.1f}"


def _print_measurement(n: int, name: str, m: Measurement) -> None:
    if name == "reqrep":
        figure = f"p50 {m.value:,.1f} µs, p99 {m.p99_us:,.1f} µs"
        amount = f"{m.count:,} requests, {m.seconds:.2f} s"
    else:
        figure = f"{m.value:,.0f} msgs/s"
        amount = f"{m.count:,} msgs in {m.seconds:.2f} s"
    again = f", {m.attempts} runs" if m.attempts > 1 else ""
    problem = f"  FAILED: {m.error}" if m.error else ""
    print(f"rep {n} {MEASUREMENT_LABELS[name]:<20} {m.system:<9} "
          f"{figure:<34} ({amount}{again}){problem}", flush=True)


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def print_summary(result: dict[str, Any], systems: tuple[str, ...]) -> None:
    figures = result["figures"]
    ratio_keys = [k for k in next(iter(figures.values()))["ratios"]]
    print()
    print(f"medians of {result['repeat']} repetition(s); ratio = zeromesh / other, median "
          "(range) of the per-repetition ratios")
    columns = [("figure", 30), *((LABELS[s], 13) for s in systems),
               *((k.replace("zeromesh", "zm"), 18) for k in ratio_keys)]
    rows = []
    for fig in figures.values():
        cells = [f"{fig['label']} {fig['unit']}",
                 *(_value(fig["unit"], fig["median"][s]) for s in systems)]
        for key in ratio_keys:
            r = fig["ratios"][key]
            cells.append("-" if r["median"] is None else
                         f"{r['median']:.2f} ({r['min']:.2f}-{r['max']:.2f})")
        rows.append(cells)
    h.print_table(columns, rows)
    if ratio_keys and result["repeat"] > 1:
        print()
        reps = range(1, result["repeat"] + 1)
        h.print_table([("ratio per repetition", 42), *((f"rep {n}", 7) for n in reps)], [
            [f"{fig['label']} {key.replace('zeromesh', 'zm')}",
             *(_ratio(r) for r in fig["ratios"][key]["per_repetition"])]
            for fig in figures.values() for key in ratio_keys])


# -- the script --------------------------------------------------------------------------


def versions(systems: tuple[str, ...], nats_program: str | None) -> dict[str, str]:
    """What was measured: library versions (and the nats-server's)."""
    import zmq

    out = {"python": sys.version.split()[0], "pyzmq": zmq.pyzmq_version(),
           "libzmq": zmq.zmq_version()}
    for system, package in (("zenoh", "eclipse-zenoh"), ("nats", "nats-py")):
        if system in systems:
            out[package] = importlib.metadata.version(package)
    if nats_program is not None:
        done = subprocess.run([nats_program, "--version"], capture_output=True, text=True,
                              timeout=10, check=False)
        out["nats-server"] = done.stdout.strip().removeprefix("nats-server: ")
    return out


@contextmanager
def nats_url(systems: tuple[str, ...]) -> Iterator[str]:
    """A core nats-server on 127.0.0.1 for the block (when NATS is measured); its URL."""
    if "nats" not in systems:
        yield ""
        return
    with base.nats_server(jetstream=False, extra=NATS_CONFIG) as port:
        yield f"nats://{LOOPBACK}:{port}"


def _stop_on_signal(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)  # the nats-server is stopped on the way out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    h.add_run_flags(parser, quick="small counts, 1 repetition, no minimum traffic time "
                                  "(smoke test)")
    parser.add_argument("--systems", default=",".join(SYSTEMS),
                        help=f"comma-separated, of {', '.join(SYSTEMS)} (default all)")
    parser.add_argument("--min-seconds", type=float, default=None,
                        help=f"traffic time per measurement at least (default {MIN_SECONDS:g}"
                             ", 0 with --quick)")
    args = parser.parse_args(argv)
    h.check_run_flags(parser, args)
    systems = tuple(s for s in SYSTEMS if s in args.systems.split(","))
    if not systems or set(args.systems.split(",")) - set(SYSTEMS):
        parser.error(f"--systems takes some of {', '.join(SYSTEMS)}")
    if problem := missing_extra(systems):
        print(problem, file=sys.stderr)
        return 2
    nats_program = base.find_program("nats-server") if "nats" in systems else None
    settings = Settings(systems, args.repeat or (1 if args.quick else 3),
                        args.min_seconds if args.min_seconds is not None
                        else 0.0 if args.quick else MIN_SECONDS,
                        args.timeout, args.quick)
    loop = h.apply_loop_flag(args)
    signal.signal(signal.SIGTERM, _stop_on_signal)
    signal.signal(signal.SIGHUP, _stop_on_signal)
    result: dict[str, Any] = {
        "benchmark": "peers", "transport": f"tcp://{LOOPBACK}", "loop": loop,
        "repeat": settings.repeat, "min_seconds": settings.min_seconds,
        "target_seconds": TARGET_SECONDS,
        "systems": list(systems), "versions": versions(systems, nats_program),
        "load_before": list(os.getloadavg())}
    if not args.json:
        print(f"{', '.join(LABELS[s] for s in systems)}; {settings.repeat} repetition(s), "
              f">= {settings.min_seconds:g} s of traffic each; event loop {loop}; "
              f"load {' '.join(f'{x:.2f}' for x in result['load_before'])}", flush=True)
    with nats_url(systems) as url:
        reps = run_all(settings, url, None if args.json else _print_measurement)
        if url:
            result["nats_server_problem"] = loopback_problem("nats-server", base.STARTED[-1][1])
    result["load_after"] = list(os.getloadavg())
    result["runs"] = [{name: {s: asdict(m) for s, m in by.items()} for name, by in rep.items()}
                      for rep in reps]
    result["figures"] = summary(reps, systems)
    result["processes"] = [{"program": program, "pid": pid} for program, pid in base.STARTED]
    result["ok"] = not result.get("nats_server_problem") and all(
        not m.error for rep in reps for by in rep.values() for m in by.values())
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_summary(result, systems)
        print(f"load average at the end: "
              f"{' '.join(f'{x:.2f}' for x in result['load_after'])}")
        if not result["ok"]:
            print(f"some runs failed (see above) {result.get('nats_server_problem', '')}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
