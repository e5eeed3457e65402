"""`zeromesh demo`: a small mesh of separate processes on one machine, narrated live.

The demo process is itself a node (``demo``, the seed every other node names)
and starts eight more, each its own process (`_demo_roles`, plus one
``zeromesh agent`` sidecar), then plays five scenes between them:

1. pub/sub with wildcards: ``sensors.*.temp`` and ``sensors.>`` subscribers;
2. a work queue shared by two workers;
3. request/reply with failover: a server is SIGKILLed while it handles a request;
4. a reliable message published while its durable receiver is down, received
   once it restarts with the same data dir;
5. presence: a graceful exit is seen as ``left``, a SIGKILL as ``lost``.

Each scene checks its evidence (who received what) and the demo exits 0 only
if all five happened; otherwise 1 with a one-line reason. Every wait is
bounded, the whole run too. Nothing listens beyond the chosen interface
(127.0.0.1 by default): no mDNS, the agent's HTTP API on a free port. Every
child is stopped, on success, failure, Ctrl-C or SIGTERM, and the temp dir
holding all the nodes' files is removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from typing import Final

from .. import AsyncNode, ConfigError, MeshError, NodeConfig, PeerEvent, PeerEventKind
from .. import run as run_loop

_DEADLINE: Final[float] = 28.0
"""The whole demo, start to last child stopped (the promise is 30 s)."""
_START_TIMEOUT: Final[float] = 12.0
"""Eight Python processes starting at once on a loaded machine."""
_STEP_TIMEOUT: Final[float] = 8.0
_STOP_GRACE: Final[float] = 3.0
_ROLES_MODULE: Final[str] = "mesh.cli._demo_roles"
_PEER_KINDS: Final[tuple[str, ...]] = ("joined ", "left ", "lost ")


class SceneFailed(Exception):
    """A scene's evidence did not appear: the demo's one-line reason."""


class _Child:
    """One node process of the demo and every line it printed."""

    def __init__(self, name: str, proc: asyncio.subprocess.Process) -> None:
        self.name = name
        self.proc = proc
        self.lines: list[str] = []
        self.pump: asyncio.Task[None] | None = None
        self.expected_exit = False
        """The demo stopped or killed it: its exit is part of a scene, not a failure."""


class _Demo:
    """The narrator: starts, watches, stops and kills the demo's processes."""

    def __init__(self, interface: str, tmp: str) -> None:
        self.interface = interface
        self.tmp = tmp
        self.mesh = f"demo-{secrets.token_hex(4)}"
        self.t0 = time.monotonic()
        self.seed = ""
        self.children: dict[str, _Child] = {}
        """The latest process of each node name."""
        self.started: list[_Child] = []
        """Every process ever started, restarted ones included: all are cleaned up."""
        self.current = "start"
        self.crash = ""
        """Why a child exited when no scene asked it to: every wait fails with it."""
        self.closing = False
        self.output_closed = False
        self.main: asyncio.Task[None] | None = None
        self.events: list[PeerEvent] = []
        self.narrate_events = True
        self._news = asyncio.Event()
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("ZEROMESH_")}
        self.env["PYTHONUNBUFFERED"] = "1"

    # -- narration and waiting ---------------------------------------------------

    def say(self, who: str, text: str) -> None:
        self._print(f"[{time.monotonic() - self.t0:5.2f}s] {who:<10} | {text}")

    def scene(self, number: int, title: str) -> None:
        self.current = f"scene {number} ({title})"
        self._print(f"\n== {number}. {title} ==")

    def blank(self) -> None:
        self._print("")

    def _print(self, line: str) -> None:
        """A line out at once; if nobody reads any more (`| head`), the demo ends quietly."""
        if self.output_closed:
            return
        try:
            print(line, flush=True)
        except BrokenPipeError:
            self.output_closed = True
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit
            if self.main is not None:
                self.main.cancel()

    def _notify(self) -> None:
        self._news.set()
        self._news = asyncio.Event()

    async def until(self, ready: Callable[[], bool], what: str,
                    timeout: float = _STEP_TIMEOUT) -> None:
        """Wait until `ready()`, re-checked on every child line and peer event."""
        try:
            async with asyncio.timeout(timeout):
                while not ready():
                    if self.crash:
                        raise SceneFailed(self.crash)
                    await self._news.wait()
        except TimeoutError:
            raise SceneFailed(f"no {what} within {timeout:g} s") from None

    def lines(self, name: str, prefix: str) -> list[str]:
        """What child `name` printed starting with `prefix` (without it)."""
        return [line[len(prefix):] for line in self.children[name].lines
                if line.startswith(prefix)]

    def saw(self, kind: PeerEventKind, name: str) -> bool:
        return any(e.kind is kind and e.peer.name == name for e in self.events)

    async def event(self, kind: PeerEventKind, name: str) -> None:
        await self.until(lambda: self.saw(kind, name), f"'{kind.value}' event for {name}")

    def on_event(self, event: PeerEvent) -> None:
        self.events.append(event)
        if self.narrate_events:
            self.say("demo", f"peer {event.peer.name} {event.kind.value}")
        self._notify()

    # -- processes ---------------------------------------------------------------

    def _address(self, port: int) -> str:
        host = f"[{self.interface}]" if ":" in self.interface else self.interface
        return f"{host}:{port}"

    async def spawn_role(self, name: str, role: str, *what: str) -> _Child:
        return await self._spawn(name, "-m", _ROLES_MODULE, role, *what, "--name", name,
                                 "--mesh", self.mesh, "--interface", self.interface,
                                 "--seed", self.seed, "--data-dir", self.data_dir(name))

    async def spawn_agent(self, name: str) -> _Child:
        # HTTP on a free port of the demo's interface: never the default 7474, which
        # may be taken (by a real sidecar on this machine, say). Started through the
        # roles module, it ends when the demo does, even SIGKILLed (as the roles do).
        return await self._spawn(name, "-m", _ROLES_MODULE, "agent", "--name", name,
                                 "--mesh", self.mesh, "--interface", self.interface,
                                 "--peer", self.seed, "--no-mdns",
                                 "--data-dir", self.data_dir(name),
                                 "--http", self._address(0))

    def data_dir(self, name: str) -> str:
        return os.path.join(self.tmp, name)

    async def _spawn(self, name: str, *argv: str) -> _Child:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, *argv, env=self.env, stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            start_new_session=True)  # Ctrl-C reaches the demo only; it stops its children
        child = _Child(name, proc)
        self.children[name] = child
        self.started.append(child)
        child.pump = asyncio.create_task(self._pump(child))
        return child

    async def _pump(self, child: _Child) -> None:
        assert child.proc.stdout is not None
        async for raw in child.proc.stdout:
            line = raw.decode(errors="replace").rstrip()
            if not line:
                continue
            child.lines.append(line)
            if not line.startswith(_PEER_KINDS):  # the agent's view of peers: the demo's is shown
                self.say(child.name, line)
            self._notify()
        status = await child.proc.wait()
        if not (child.expected_exit or self.closing or self.crash):
            self.crash = f"{child.name} exited unexpectedly (status {status})"
            self._notify()

    async def ready(self, *names: str) -> None:
        await self.until(lambda: all(self.lines(n, "ready ") for n in names),
                         f"ready line from {', '.join(names)}", _START_TIMEOUT)
        await self.until(lambda: all(self.saw(PeerEventKind.JOINED, n) for n in names),
                         f"join of {', '.join(names)}", _START_TIMEOUT)

    async def stop(self, name: str) -> None:
        """Graceful: SIGTERM, the node says goodbye; SIGKILL if it has not exited in time."""
        child = self.children[name]
        child.expected_exit = True
        proc = child.proc
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), _STOP_GRACE)
        except TimeoutError:
            proc.kill()
            raise SceneFailed(f"{name} did not exit within {_STOP_GRACE:g} s of SIGTERM") from None

    async def kill(self, name: str) -> None:
        child = self.children[name]
        child.expected_exit = True
        proc = child.proc
        proc.kill()
        try:
            await asyncio.wait_for(proc.wait(), _STOP_GRACE)
        except TimeoutError:
            raise SceneFailed(f"{name} still ran {_STOP_GRACE:g} s after SIGKILL") from None

    async def cleanup(self) -> None:
        """Every child gone and its output drained, whatever happened before."""
        self.closing = True
        for child in self.started:
            if child.proc.returncode is None:
                child.proc.kill()
        for child in self.started:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(child.proc.wait(), _STOP_GRACE)
            if child.pump is not None:
                await asyncio.wait([child.pump], timeout=1.0)  # its last lines, then EOF
                child.pump.cancel()


@contextlib.contextmanager
def _failing_as(what: str = "") -> Iterator[None]:
    """A mesh error or a timeout inside a scene becomes its one-line reason."""
    try:
        yield
    except MeshError as exc:
        raise SceneFailed(f"{what}: {exc}" if what else str(exc)) from None
    except TimeoutError:
        raise SceneFailed(f"{what}: timed out after {_STEP_TIMEOUT:g} s") from None


async def _start(demo: _Demo) -> None:
    demo.say("demo", "starting 8 nodes, each its own process: temps, everything, worker-1, "
             "worker-2, clock-1, clock-2, orders, sidecar")
    await asyncio.gather(
        demo.spawn_role("temps", "sub", "sensors.*.temp"),
        demo.spawn_role("everything", "sub", "sensors.>"),
        demo.spawn_role("worker-1", "worker", "jobs"),
        demo.spawn_role("worker-2", "worker", "jobs"),
        demo.spawn_role("clock-1", "server", "clock"),
        demo.spawn_role("clock-2", "server", "clock"),
        demo.spawn_role("orders", "durable", "orders.>", "orders"),
        demo.spawn_agent("sidecar"))
    await demo.ready(*demo.children)
    demo.say("demo", f"all {len(demo.children)} nodes joined the mesh")


async def _pubsub(demo: _Demo, node: AsyncNode) -> None:
    demo.scene(1, "pub/sub with wildcards")
    sent = [("sensors.kitchen.temp", "21.5 C"), ("sensors.garage.temp", "9.0 C"),
            ("sensors.kitchen.humidity", "41 %")]
    with _failing_as():
        await node.wait_for_subscribers("sensors.kitchen.temp", 2, timeout=_STEP_TIMEOUT)
        await node.wait_for_subscribers("sensors.kitchen.humidity", 1, timeout=_STEP_TIMEOUT)
    for topic, data in sent:
        demo.say("demo", f"publish {topic} {data!r}")
        await node.publish(topic, data)
    temps = {t for t, _ in sent if t.endswith(".temp")}
    await demo.until(lambda: temps <= {line.split()[0] for line in demo.lines("temps", "got ")},
                     "2 temperatures at temps")
    await demo.until(lambda: len(demo.lines("everything", "got ")) >= len(sent),
                     "3 messages at everything")
    if any("humidity" in line for line in demo.lines("temps", "got ")):
        raise SceneFailed("temps got the humidity, which sensors.*.temp does not match")
    demo.say("demo", "ok: temps (sensors.*.temp) got both temperatures, not the humidity; "
             "everything (sensors.>) got all 3")


async def _work_queue(demo: _Demo, node: AsyncNode) -> None:
    demo.scene(2, "a work queue shared by two workers")
    jobs = [f"job-{i}" for i in range(1, 7)]
    with _failing_as("push"):
        await node.wait_for_workers("jobs", 2, timeout=_STEP_TIMEOUT)
        demo.say("demo", f"push {len(jobs)} jobs to queue 'jobs'")
        for job in jobs:
            await node.push("jobs", job, timeout=_STEP_TIMEOUT)

    def taken() -> list[str]:
        return demo.lines("worker-1", "took ") + demo.lines("worker-2", "took ")

    await demo.until(lambda: len(taken()) >= len(jobs), "all 6 jobs taken")
    one, two = demo.lines("worker-1", "took "), demo.lines("worker-2", "took ")
    if sorted(taken()) != sorted(jobs) or not one or not two:
        raise SceneFailed(f"jobs not shared once each: worker-1 {one}, worker-2 {two}")
    demo.say("demo", f"ok: each job done exactly once; worker-1 took {len(one)}, "
             f"worker-2 took {len(two)}")


async def _failover(demo: _Demo, node: AsyncNode) -> None:
    demo.scene(3, "request/reply with failover")
    answered: set[str] = set()
    with _failing_as("a 'ping' answered by clock-1 and by clock-2"):
        await node.wait_for_service("clock", timeout=_STEP_TIMEOUT)
        async with asyncio.timeout(_STEP_TIMEOUT):
            while answered != {"clock-1", "clock-2"}:  # both servers known to us
                reply = await node.request("clock", "ping", timeout=_STEP_TIMEOUT)
                if reply.source in answered:
                    await asyncio.sleep(0.05)  # the other server is not announced to us yet
                    continue
                demo.say("demo", f"request 'ping' -> {reply.text!r}")
                answered.add(reply.source)
    requests = ["what time is it? #1", "what time is it? #2"]
    demo.say("demo", "two slow requests at once (1 s of work each), one per server")
    started = time.monotonic()
    calls = [asyncio.create_task(node.request("clock", r, timeout=_STEP_TIMEOUT))
             for r in requests]
    try:
        await demo.until(lambda: bool(demo.lines("clock-1", "handling ")),
                         "request handled by clock-1")
        victim = demo.lines("clock-1", "handling ")[0]
        demo.say("demo", f"kill clock-1 (SIGKILL) while it handles {victim}")
        await demo.kill("clock-1")
        with _failing_as("the requests during failover"):
            async with asyncio.timeout(_STEP_TIMEOUT):
                replies = await asyncio.gather(*calls)
    finally:
        for call in calls:
            call.cancel()
    took = time.monotonic() - started
    for reply in replies:
        demo.say("demo", f"reply from {reply.source}: {reply.text!r}")
    if any(r.source != "clock-2" for r in replies):
        raise SceneFailed("a request was answered by a dead server")
    demo.say("demo", f"ok: both answered by clock-2, the one killed on clock-1 included, "
             f"within {took:.2f} s")


async def _reliable(demo: _Demo, node: AsyncNode) -> None:
    demo.scene(4, "a reliable message survives a receiver restart")
    with _failing_as():
        await node.wait_for_durables("orders.new", 1, timeout=_STEP_TIMEOUT)
    first_id = demo.lines("orders", "ready ")[0].split()[0]
    demo.say("demo", "stop orders (SIGTERM); it keeps its id and durable in its data dir")
    await demo.stop("orders")
    await demo.event(PeerEventKind.LEFT, "orders")
    with _failing_as("reliable publish"):
        demo.say("demo", "publish orders.new 'order #42' reliable=True while orders is down")
        await node.publish("orders.new", "order #42", reliable=True)
    demo.say("demo", f"order #42 is on disk in demo's spool ({node.spool_pending} pending)")
    if node.spool_pending < 1:
        raise SceneFailed("the reliable message was not spooled for the stopped receiver")
    demo.say("demo", "restart orders with the same data dir")
    await demo.spawn_role("orders", "durable", "orders.>", "orders")
    await demo.until(lambda: any("'order #42'" in line for line in demo.lines("orders", "got ")),
                     "order #42 at the restarted orders")
    with _failing_as():
        await node.wait_for_spool(timeout=_STEP_TIMEOUT)
    again_id = demo.lines("orders", "ready ")[-1].split()[0]
    same = "same" if again_id == first_id else "a NEW"
    demo.say("demo", f"ok: order #42 received after the restart ({same} node {again_id}), "
             "acknowledged, demo's spool empty")


async def _presence(demo: _Demo) -> None:
    demo.scene(5, "presence: left and lost")
    url = next((w[5:] for w in demo.lines("sidecar", "ready ")[0].split()
                if w.startswith("http=")), "")
    if url:
        try:
            body = await asyncio.wait_for(asyncio.to_thread(_get, f"{url}/v1/peers"), 3.0)
            names = sorted(str(p.get("name")) for p in json.loads(body))
            demo.say("demo", f"sidecar's HTTP API is on a free port: GET {url}/v1/peers "
                     f"-> {', '.join(names)}")
        except (OSError, TimeoutError, ValueError) as exc:
            demo.say("demo", f"GET {url}/v1/peers failed: {exc}")
    demo.say("demo", "sidecar exits gracefully (SIGTERM)")
    await demo.stop("sidecar")
    await demo.event(PeerEventKind.LEFT, "sidecar")
    demo.say("demo", "everything is killed (SIGKILL): no goodbye, its heartbeats stop")
    killed = time.monotonic()
    await demo.kill("everything")
    await demo.event(PeerEventKind.LOST, "everything")
    demo.say("demo", f"ok: sidecar left; everything declared lost after "
             f"{time.monotonic() - killed:.2f} s")


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=3.0) as resp:
        body: bytes = resp.read()
        return body


async def _finish(demo: _Demo) -> None:
    demo.narrate_events = False
    alive = [name for name, child in demo.children.items() if child.proc.returncode is None]
    demo.say("demo", f"stopping {', '.join(alive)}")
    await asyncio.gather(*(demo.stop(name) for name in alive))


async def _play(demo: _Demo) -> None:
    config = NodeConfig(name="demo", mesh=demo.mesh, interfaces=[demo.interface],
                        data_dir=demo.data_dir("demo"), mdns=False)
    node = AsyncNode(config)
    try:
        await node.start()
    except ConfigError:
        raise  # (a bad --interface is bad usage, exit 2, as for every command)
    except MeshError as exc:
        raise SceneFailed(str(exc)) from None
    try:
        demo.seed = node.endpoints["ctl"][0]
        demo.say("demo", f"mesh {demo.mesh} on {demo.interface}, seed {demo.seed}, "
                 f"files in {demo.tmp}")
        events = node.events()

        async def watch() -> None:
            async for event in events:
                demo.on_event(event)

        watcher = asyncio.create_task(watch())
        try:
            await _start(demo)
            await _pubsub(demo, node)
            await _work_queue(demo, node)
            await _failover(demo, node)
            await _reliable(demo, node)
            await _presence(demo)
            demo.blank()
            await _finish(demo)
        finally:
            watcher.cancel()
    finally:
        await demo.cleanup()
        await node.aclose()
    demo.say("demo", f"done: all 5 scenes happened in {time.monotonic() - demo.t0:.1f} s")


async def _run(demo: _Demo) -> None:
    """The demo under its deadline; SIGTERM stops it as Ctrl-C does."""
    task = asyncio.current_task()
    assert task is not None
    demo.main = task
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, task.cancel)
    try:
        async with asyncio.timeout(_DEADLINE):
            await _play(demo)
    except TimeoutError:
        raise SceneFailed(_reason(demo, f"the demo took longer than {_DEADLINE:g} s")) from None
    except SceneFailed as exc:
        raise SceneFailed(_reason(demo, str(exc))) from None
    finally:
        loop.remove_signal_handler(signal.SIGTERM)


def _reason(demo: _Demo, why: str) -> str:
    """One line: the scene, what did not happen, and a child's crash if that is why."""
    crash = f" ({demo.crash})" if demo.crash and demo.crash not in why else ""
    return f"{demo.current}: {why}{crash}"


def run(interface: str) -> int:
    """Run the demo; 0 when every scene happened, 1 (with the reason) when one did not."""
    with tempfile.TemporaryDirectory(prefix="zeromesh-demo-") as tmp:
        demo = _Demo(interface, tmp)
        try:
            run_loop(_run(demo))
        except SceneFailed as exc:
            print(f"zeromesh demo: {exc}", file=sys.stderr, flush=True)
            return 1
        except asyncio.CancelledError:
            if demo.output_closed:
                return 0  # as every command does when its reader goes away
            print("zeromesh demo: stopped", file=sys.stderr, flush=True)
            return 143
        except BrokenPipeError:
            raise  # the reader went away (`| head`): the CLI's own quiet exit
        except OSError as exc:  # e.g. a child process could not be started
            print(f"zeromesh demo: {exc}", file=sys.stderr, flush=True)
            return 1
    return 0
