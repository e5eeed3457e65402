"""`zeromesh agent`: the sidecar process, its config and its status lines.

Lines on stdout, one per event, flushed at once (scripts and tests read them):
``ready name=.. id=.. mesh=.. ctl=.. pub=.. http=..``, then ``joined``/``left``/
``lost name=.. id=..`` per peer event, and ``stopped`` at exit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Mapping

import msgspec

from .._agent._config import load
from .._agent._server import Agent
from ..errors import ConfigError
from ._commands import event_line, out, stop_on_signals

_log = logging.getLogger("mesh.agent")
_SECRETS = ("password", "token")
"""Uplink settings --print-config shows as ``***`` (a url's own password is not kept
apart: put it in `password`)."""

FLAGS = ("mesh", "name", "interfaces", "peers", "data_dir", "port", "mdns", "fsync", "http",
         "durable_expiry", "secret_key", "allow", "history")


async def run(args: argparse.Namespace) -> int:
    path = args.config or os.environ.get("ZEROMESH_CONFIG") or None
    config = load(path, os.environ, {k: getattr(args, k, None) for k in FLAGS})
    if args.print_config:
        shown = msgspec.to_builtins(config)
        for link in shown.get("uplink", []):  # secrets are not for terminals and CI logs
            for key in _SECRETS:
                if link.get(key):
                    link[key] = "***"
        sys.stdout.write(msgspec.json.format(msgspec.json.encode(shown)).decode() + "\n")
        return 0
    stop = asyncio.Event()
    with stop_on_signals(stop):  # before `ready`: a signal right after it must be graceful
        agent = Agent(config)
        events = agent.node.events()  # opened before start: peers may greet us while it runs
        flags = {k: getattr(args, k, None) for k in FLAGS}
        async with agent, reload_on_hangup(agent, path, flags):  # SIGHUP too, before `ready`
            node = agent.node
            ep = node.endpoints
            out(f"ready name={node.name} id={node.id} mesh={node.mesh} "
                f"ctl={','.join(ep['ctl'])} pub={','.join(ep['pub'])} http={agent.http_url}")

            async def report() -> None:
                async for event in events:
                    out(event_line(event))

            reporter = asyncio.create_task(report())
            await stop.wait()
            reporter.cancel()
    out("stopped")
    return 0


@contextlib.asynccontextmanager
async def reload_on_hangup(agent: Agent, path: str | None, flags: Mapping[str, object]
                     ) -> AsyncIterator[None]:
    """SIGHUP re-reads the config file and applies its uplinks; a bad file is logged
    (one line with the key and reason) and the running config is kept."""
    loop = asyncio.get_running_loop()
    pending: set[asyncio.Task[None]] = set()

    async def reload() -> None:
        try:
            config = load(path, os.environ, flags)
            await agent.reload(config)
        except ConfigError as exc:
            _log.error("config not reloaded: %s", exc)
        else:
            out("reloaded")

    def hangup() -> None:
        task = loop.create_task(reload())
        pending.add(task)
        task.add_done_callback(pending.discard)

    loop.add_signal_handler(signal.SIGHUP, hangup)
    try:
        yield
    finally:
        loop.remove_signal_handler(signal.SIGHUP)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
