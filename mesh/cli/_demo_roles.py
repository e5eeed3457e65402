"""The nodes of `zeromesh demo`, one process each: ``python -m mesh.cli._demo_roles ROLE ...``.

Why a module of its own: every scene of the demo must happen between real,
separate node processes (so a SIGKILL really kills one), and the demo must
be able to tell what each of them received. A role speaks to the demo on
stdout, one flushed line per event: ``ready id=..`` once it is serving, then
``got ..`` / ``took ..`` / ``handling ..``. It leaves gracefully (peers see
``left``) on SIGTERM or SIGINT, and also when its stdin closes, so a role
never outlives a demo that died. Only the public ``mesh`` API is used; no
discovery but the demo's seed (no mDNS, nothing bound beyond the interface).

Roles: ``sub PATTERN``, ``worker QUEUE``, ``server SERVICE``,
``durable PATTERN NAME``; and ``agent ARGS...``, the sidecar: ``zeromesh agent
ARGS`` itself, which also stops (as on SIGTERM) when its stdin closes.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import threading
from collections.abc import Callable, Coroutine
from typing import Any, Final

from mesh import AsyncNode, MeshError, Message, NodeConfig, run

JOB_SECONDS: Final[float] = 0.15
"""How long a worker spends on one job: long enough that both workers get some."""
SLOW_SECONDS: Final[float] = 1.0
"""How long a server spends on a request other than ``ping``: time to kill it mid-request."""
PING: Final[str] = "ping"


def _say(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


async def _sub(node: AsyncNode, args: argparse.Namespace) -> None:
    sub = await node.subscribe(args.what)
    _say(f"ready id={node.id[:8]} subscribed to {args.what}")
    async for msg in sub:
        _say(f"got {msg.topic} {msg.text!r} from {msg.source}")


async def _worker(node: AsyncNode, args: argparse.Namespace) -> None:
    # prefetch 1: hold one job at a time, so the queue spreads work over both workers
    pull = await node.pull(args.what, prefetch=1)
    _say(f"ready id={node.id[:8]} working for queue {args.what}")
    async for msg in pull:
        _say(f"took {msg.text}")
        await asyncio.sleep(JOB_SECONDS)


async def _server(node: AsyncNode, args: argparse.Namespace) -> None:
    async def handle(msg: Message) -> str:
        if msg.text == PING:
            return f"pong from {node.name}"
        _say(f"handling {msg.text!r}")
        await asyncio.sleep(SLOW_SECONDS)
        return f"{msg.text}: done by {node.name}"

    await node.serve(args.what, handle)
    _say(f"ready id={node.id[:8]} serving {args.what}")
    await asyncio.Event().wait()  # serves until stopped


async def _durable(node: AsyncNode, args: argparse.Namespace) -> None:
    pull = await node.subscribe_durable(args.what, args.durable)
    _say(f"ready id={node.id[:8]} durable {args.durable!r} on {args.what}")
    async for msg in pull:
        _say(f"got {msg.topic} {msg.text!r} from {msg.source} (reliable)")
        msg.ack()


ROLES: Final[dict[str, Callable[[AsyncNode, argparse.Namespace], Coroutine[Any, Any, None]]]] = {
    "sub": _sub, "worker": _worker, "server": _server, "durable": _durable}


async def _stdin_closed() -> None:
    """Returns when the demo is gone (our stdin pipe closed)."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while await reader.read(4096):
        pass


async def _main(args: argparse.Namespace) -> int:
    config = NodeConfig(name=args.name, mesh=args.mesh, interfaces=[args.interface],
                        peers=[args.seed], data_dir=args.data_dir, mdns=False)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with AsyncNode(config) as node:
        tasks = [asyncio.create_task(ROLES[args.role](node, args)),
                 asyncio.create_task(_stdin_closed()), asyncio.create_task(stop.wait())]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        for task in done:
            task.result()  # a role that failed says why
    return 0


def _sidecar(argv: list[str]) -> int:
    """``zeromesh agent ARGV`` that a demo SIGKILLed does not leave running: the demo's
    end closes our stdin, and that stops the agent as SIGTERM does (portable, unlike
    Linux's parent-death signal; the agent itself never reads stdin)."""
    from ._main import main as zeromesh

    def on_stdin_closed() -> None:
        with open(sys.stdin.fileno(), "rb", buffering=0, closefd=False) as stdin:
            while stdin.read(4096):
                pass
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=on_stdin_closed, name="demo-gone", daemon=True).start()
    return zeromesh(["agent", *argv])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["agent"]:
        return _sidecar(argv[1:])
    p = argparse.ArgumentParser(prog="zeromesh-demo-role")
    p.add_argument("role", choices=sorted(ROLES))
    p.add_argument("what", help="pattern, queue or service")
    p.add_argument("durable", nargs="?", default="", help="durable name (role durable)")
    p.add_argument("--name", required=True)
    p.add_argument("--mesh", required=True)
    p.add_argument("--interface", required=True)
    p.add_argument("--seed", required=True, help="the demo node's control endpoint")
    p.add_argument("--data-dir", required=True)
    args = p.parse_args(argv)
    try:
        return run(_main(args))
    except MeshError as exc:
        print(f"{args.name}: {exc}", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
