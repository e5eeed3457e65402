"""`zeromesh agent`: the sidecar process, its config and its status lines.

Lines on stdout, one per event, flushed at once (scripts and tests read them):
``ready name=.. id=.. mesh=.. ctl=.. pub=.. http=..``, then ``joined``/``left``/
``lost name=.. id=..`` per peer event, and ``stopped`` at exit.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Mapping
from typing import Self

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
        async with Hangups(agent, path, flags) as hangups, agent:
            hangups.start()  # (one during the start reloads now, before `ready`)
            node = agent.node
            ep = node.endpoints
            out(f"ready name={node.name} id={node.id} mesh={node.mesh} "
                f"ctl={','.join(ep['ctl'])} pub={','.join(ep['pub'])} http={agent.http_url}")

            async def report() -> None:
                async for event in events:
                    out(event_line(event))

            reporter = asyncio.create_task(report())
            await stop.wait()
            await hangups.stop()
            reporter.cancel()
    out("stopped")
    return 0


class Hangups:
    """SIGHUP for the agent's whole life. While it runs (`start` to `stop`), each re-reads
    the config file and applies it; a bad file is logged (one line with the key and
    reason) and the running config is kept. One during the start reloads at `start`; from
    `stop` until the process exits SIGHUP is ignored (its default action killed the agent
    mid-stop: the requests in flight lost, its peers told nothing)."""

    def __init__(self, agent: Agent, path: str | None, flags: Mapping[str, object]) -> None:
        self._agent, self._path, self._flags = agent, path, flags
        self._pending: set[asyncio.Task[None]] = set()
        self._state = "starting"
        self._missed = False

    async def __aenter__(self) -> Self:
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self._hangup)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
        asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # the process is ending

    def start(self) -> None:
        self._state = "running"
        if self._missed:
            self._hangup()

    async def stop(self) -> None:
        """No more reloads; one under way is cancelled (the agent is about to close)."""
        self._state = "stopping"
        for task in self._pending:
            task.cancel()
        await asyncio.gather(*self._pending, return_exceptions=True)

    def _hangup(self) -> None:
        if self._state != "running":
            self._missed = self._state == "starting"
            return
        task = asyncio.get_running_loop().create_task(self._reload())
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _reload(self) -> None:
        try:
            config = load(self._path, os.environ, self._flags)
            await self._agent.reload(config)
        except ConfigError as exc:
            _log.error("config not reloaded: %s", exc)
        else:
            out("reloaded")
