"""`zeromesh demo`: a small mesh of separate processes on one machine, narrated live.

Three nodes start (two wildcard subscribers and an idle agent), find each
other by mDNS, receive what short-lived `zeromesh pub` processes publish
according to their patterns, then one leaves gracefully and one is killed
with SIGKILL and is declared lost by heartbeat. Everything binds only to the
chosen interface (127.0.0.1 by default) and keeps its files in a temp dir.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import sys
import tempfile
import time
from typing import Final

from .. import _loop
from .._membership._peers import PeerEvent, PeerEventKind
from .._node import AsyncNode

_STEP_TIMEOUT: Final[float] = 8.0


class _Demo:
    def __init__(self, interface: str, tmp: str) -> None:
        self.interface = interface
        self.tmp = tmp
        self.mesh = f"demo-{secrets.token_hex(4)}"
        self.t0 = time.monotonic()
        self.children: dict[str, asyncio.subprocess.Process] = {}
        self.pumps: list[asyncio.Task[None]] = []
        self.env = {**os.environ, "ZEROMESH_INTERFACES": interface,
                    "ZEROMESH_MESH": self.mesh, "PYTHONUNBUFFERED": "1"}
        self.env.pop("ZEROMESH_PEERS", None)

    def say(self, who: str, text: str) -> None:
        print(f"[{time.monotonic() - self.t0:6.2f}s] {who:<9}| {text}", flush=True)

    async def spawn(self, name: str, *argv: str) -> asyncio.subprocess.Process:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "mesh", *argv, "--name", name,
            "--data-dir", os.path.join(self.tmp, name), env=self.env,
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT)
        self.children[name] = proc
        self.pumps.append(asyncio.create_task(self._pump(name, proc)))
        return proc

    async def _pump(self, name: str, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        async for raw in proc.stdout:
            line = raw.decode(errors="replace").rstrip()
            if line:
                self.say(name, line)

    async def publish(self, topic: str, data: str, subscribers: int) -> None:
        argv = ["pub", topic, data, "--timeout", str(_STEP_TIMEOUT)]
        if subscribers:
            argv += ["--wait-subscribers", str(subscribers)]
        self.say("demo", f"zeromesh pub {topic} {data!r}  (expect {subscribers} receivers)")
        proc = await self.spawn(f"pub-{secrets.token_hex(2)}", *argv)
        await asyncio.wait_for(proc.wait(), _STEP_TIMEOUT + 2)

    async def expect(self, events: asyncio.Queue[PeerEvent], kind: PeerEventKind,
                     *names: str) -> float:
        """Wait until `kind` happened to every one of `names`, in any order."""
        start = time.monotonic()
        waiting = set(names)
        async with asyncio.timeout(_STEP_TIMEOUT):
            while waiting:
                event = await events.get()
                if event.kind is kind:
                    waiting.discard(event.peer.name)
        return time.monotonic() - start

    async def cleanup(self) -> None:
        for proc in self.children.values():
            if proc.returncode is None:
                proc.kill()
        for proc in self.children.values():
            await proc.wait()
        for pump in self.pumps:
            pump.cancel()


async def _run(demo: _Demo) -> int:
    demo.say("demo", f"mesh {demo.mesh} on {demo.interface}, files in {demo.tmp}")
    events: asyncio.Queue[PeerEvent] = asyncio.Queue()
    async with AsyncNode(name="observer", mesh=demo.mesh, interfaces=[demo.interface],
                         data_dir=os.path.join(demo.tmp, "observer")) as observer:
        stream = observer.events()

        async def watch() -> None:
            async for event in stream:
                if not event.peer.name.startswith("pub-"):
                    demo.say("observer", f"{event.peer.name} {event.kind.value}")
                    events.put_nowait(event)

        watcher = asyncio.create_task(watch())
        try:
            demo.say("demo", "starting alpha (sub 'sensors.*.temp'), beta (sub 'sensors.>'), "
                     "gamma (agent)")
            await demo.spawn("alpha", "sub", "sensors.*.temp")
            await demo.spawn("beta", "sub", "sensors.>")
            await demo.spawn("gamma", "agent")
            await demo.expect(events, PeerEventKind.JOINED, "alpha", "beta", "gamma")
            demo.say("demo", "all three found each other by mDNS; now publishing")
            await demo.publish("sensors.kitchen.temp", "21.5 C", 2)
            await demo.publish("sensors.garage.temp", "9.0 C", 2)
            await demo.publish("sensors.kitchen.humidity", "41 %", 1)
            demo.say("demo", "beta leaves gracefully (SIGTERM)")
            demo.children["beta"].send_signal(signal.SIGTERM)
            took = await demo.expect(events, PeerEventKind.LEFT, "beta")
            demo.say("demo", f"observer saw beta leave after {took * 1000:.0f} ms")
            demo.say("demo", "gamma is killed (SIGKILL): no goodbye, heartbeats stop")
            demo.children["gamma"].kill()
            took = await demo.expect(events, PeerEventKind.LOST, "gamma")
            demo.say("demo", f"observer declared gamma lost after {took:.2f} s")
            demo.children["alpha"].send_signal(signal.SIGTERM)
            await asyncio.wait_for(demo.children["alpha"].wait(), _STEP_TIMEOUT)
        finally:
            watcher.cancel()
            await demo.cleanup()
    demo.say("demo", "done")
    return 0


def run(interface: str) -> int:
    """Run the demo; 0 when every step happened, 1 when one timed out."""
    with tempfile.TemporaryDirectory(prefix="zeromesh-demo-") as tmp:
        demo = _Demo(interface, tmp)
        try:
            return _loop.run(_run(demo))
        except TimeoutError:
            print("zeromesh demo: a step timed out", file=sys.stderr)
            return 1
