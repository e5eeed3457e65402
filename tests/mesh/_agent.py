"""Agents as real processes for the HTTP tests, and a small SSE reader.

Agents get the in-process nodes' fast heartbeat timings (through the
``ZEROMESH_*`` variables), so a fast node never takes a default-timed agent
for dead.
"""

from __future__ import annotations

import asyncio
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

import aiohttp

from ._proc import Cli
from .conftest import FAST_ENV

WAIT: Final = 10.0
"""Seconds any one wait here may take (a caller wanting less wraps it in asyncio.timeout)."""


@dataclass
class AgentProc:
    cli: Cli
    url: str
    id: str

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) of its HTTP API."""
        url = urlsplit(self.url)
        assert url.hostname is not None, self.url
        assert url.port is not None, self.url
        return url.hostname, url.port


def start_agent(procs: list[Cli], *args: str, mesh: str, name: str = "agent",
                config: str | None = None, tmp: Path | None = None,
                env: dict[str, str] | None = None) -> AgentProc:
    """``zeromesh agent`` on 127.0.0.1 with its HTTP API on a free port; waits for `ready`."""
    argv = ["agent", "--name", name, *args]
    if config is not None:
        assert tmp is not None
        path = tmp / f"{name}.toml"
        path.write_text(config)
        argv += ["--config", str(path)]
    cli = Cli(argv, mesh=mesh, env={**FAST_ENV, **(env or {})})
    procs.append(cli)
    ready = cli.line("ready", timeout=15)
    found = re.search(r" id=(\w+) .* http=(\S+)$", ready)
    assert found, ready
    return AgentProc(cli, found.group(2), found.group(1))


class SseStream:
    """Events of one ``GET /v1/subscribe/...`` response, parsed as they arrive."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self.response = response

    async def subscribed(self) -> None:
        """Wait for the agent's ``: subscribed`` comment (the subscription is in place)."""
        async with asyncio.timeout(WAIT):
            while True:
                line = await self.response.content.readline()
                assert line, "stream ended before ': subscribed'"
                if line.startswith(b": subscribed"):
                    return

    async def events(self, count: int) -> list[dict[str, Any]]:
        """The next `count` events: each ``{"event_id": ..., **data}``, and ``"event":
        name`` for one with an ``event:`` line (``gap``)."""
        out: list[dict[str, Any]] = []
        event_id, data, kind = "", "", {}
        async with asyncio.timeout(WAIT):
            while len(out) < count:
                raw = await self.response.content.readline()
                assert raw, f"stream ended after {len(out)} events"
                line = raw.decode().rstrip("\n")
                if line.startswith("id: "):
                    event_id = line[4:]
                elif line.startswith("event: "):
                    kind = {"event": line[7:]}
                elif line.startswith("data: "):
                    data = line[6:]
                elif not line and data:
                    out.append({"event_id": event_id, **kind, **json.loads(data)})
                    event_id, data, kind = "", "", {}
        return out


async def wait_status(session: aiohttp.ClientSession, method: str, url: str, want: int,
                      **kwargs: Any) -> aiohttp.ClientResponse:
    """Repeat a request until it answers `want` (e.g. until discovery found a server)."""
    async with asyncio.timeout(WAIT):
        while True:
            response = await session.request(method, url, **kwargs)
            await response.read()
            if response.status == want:
                return response
            await asyncio.sleep(0.05)
