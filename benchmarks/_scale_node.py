"""Nodes for the scale benchmark and test: ``python _scale_node.py --mesh M [--seed URL]...
[--port P] NAME [NAME ...]``.

Runs one `AsyncNode` per NAME in this one process, all on the address in
``ZEROMESH_INTERFACES`` (each on ports of its own), mDNS off, each given the ``--seed``
URLs as its static peers (issue 16: seeds, not a list of members); ``--mdns`` turns
mDNS on. With ``--port``, the
first NAME binds its control port there (so others can name it as a seed) and leaves its
own URL out of its seeds. Lines on stdout, flushed at
once, each starting with the node it is about::

    NAME ready
    NAME joined|left|lost OTHER
    figures {"pid": .., "nodes": {NAME: {"members": .., "links": .., ...}}}

``ready`` comes once every node of the process has started; a ``figures`` line answers
each ``figures`` line on stdin (see `figures`). End of stdin closes the nodes gracefully.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
from typing import Any

from mesh import AsyncNode, PeerEventKind, PeerState, run


def figures(node: AsyncNode) -> dict[str, Any]:
    """The node's membership figures (``members``, ``links``, ``watched``,
    ``control_sent``, ``control_received``: ``traffic().membership``, or
    ``membership_figures()``); ``members`` alone where the library has neither."""
    own = getattr(node, "membership_figures", None)
    if own is not None:
        return dict(own())
    membership = getattr(node.traffic(), "membership", None)
    if membership:
        return dict(membership)
    return {"members": sum(1 for p in node.peers() if p.state is PeerState.ALIVE)}


async def report(node: AsyncNode) -> None:
    async for event in node.events():
        print(f"{node.name} {event.kind.value} {event.peer.name} {time.monotonic():.6f}",
              flush=True)


async def commands(nodes: list[AsyncNode]) -> None:
    """Answers ``figures`` lines on stdin until end of input."""
    loop = asyncio.get_running_loop()
    lines: asyncio.Queue[str] = asyncio.Queue()
    fd = sys.stdin.fileno()

    def readable() -> None:
        chunk = os.read(fd, 4096).decode()
        lines.put_nowait(chunk)

    os.set_blocking(fd, False)
    loop.add_reader(fd, readable)
    buffered = ""
    try:
        while True:
            chunk = await lines.get()
            if not chunk:
                return
            buffered += chunk
            *whole, buffered = buffered.split("\n")
            for line in whole:
                if line.strip() == "figures":
                    out = {"pid": os.getpid(), "nodes": {n.name: figures(n) for n in nodes}}
                    print("figures " + json.dumps(out), flush=True)
    finally:
        loop.remove_reader(fd)


def _not_a_join(record: logging.LogRecord) -> bool:
    """Joins are on stdout already; logged too, 100 nodes write ~10,000 lines to the test's
    pipes in the join's busiest second, and that work starves the heartbeats it is there
    to explain."""
    return not (isinstance(record.args, tuple) and record.args
                and record.args[-1] == PeerEventKind.JOINED.value)


async def main(args: argparse.Namespace) -> None:
    if os.environ.get("ZEROMESH_SCALE_DEBUG"):  # scale.py --dump: why was a member lost
        logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                            format="%(monotonic).6f %(name)s %(message)s")
        logger = logging.getLogger("mesh.node")
        logger.setLevel(logging.DEBUG)
        logger.addFilter(_not_a_join)
        old_factory = logging.getLogRecordFactory()

        def stamped(*a: Any, **kw: Any) -> logging.LogRecord:
            record = old_factory(*a, **kw)
            record.monotonic = time.monotonic()
            return record

        logging.setLogRecordFactory(stamped)
    interface = os.environ.get("ZEROMESH_INTERFACES", "127.0.0.1").split(",")[0]
    own = f"tcp://{interface}:{args.port}"
    nodes = [AsyncNode(name=name, mesh=args.mesh, mdns=args.mdns,
                       peers=[s for s in args.seed if not (i == 0 and args.port and s == own)],
                       port=args.port if i == 0 and args.port else 0,
                       lost_after=args.lost_after, suspect_after=args.lost_after * 2 / 3)
             for i, name in enumerate(args.names)]
    reporters = []
    try:
        for node in nodes:
            await node.start()
            reporters.append(asyncio.create_task(report(node)))
        for node in nodes:
            print(f"{node.name} ready {time.monotonic():.6f}", flush=True)
        await commands(nodes)
    finally:
        for task in reporters:
            task.cancel()
        for node in nodes:
            await node.aclose()


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mesh", required=True)
    parser.add_argument("--seed", action="append", default=[],
                        help="a static peer, tcp://host:port; repeatable")
    parser.add_argument("--port", type=int, default=0, help="control port of the first node")
    parser.add_argument("--lost-after", type=float, default=1.5)
    parser.add_argument("--mdns", action="store_true", help="find the others by mDNS too")
    parser.add_argument("names", nargs="+")
    return parser.parse_args(argv)


if __name__ == "__main__":
    run(main(parse(sys.argv[1:])))
