"""A stand-in agent for the page's rendering tests: the real page routes, canned figures.

The figures (`FakeMesh.stats`, `.topology`, `.dead_letters`) are plain data a
test sets, so it can show the page what real agents seldom produce at will: a
suspect peer, an uplink with an error, a full spool, a name with markup in it.
``/v1/events`` sends ``stats`` every `EVERY` s and any peer event queued with
`FakeMesh.peer_event`; POSTs to the dead-letter routes are recorded.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any, Final

from aiohttp import web

from mesh._agent._page import Page

EVERY: Final[float] = 0.25

ME: Final = "a1" * 16
PEERS: Final = [("b2" * 16, "orders-1"), ("c3" * 16, "billing-<b>2</b>"), ("d4" * 16, "edge-7")]


def _spark(peak: int) -> list[int]:
    return [(i * 7) % (peak + 1) for i in range(60)]


def default_stats() -> dict[str, Any]:
    """One snapshot with every section filled, each state present once."""
    return {
        "time": time.time(),
        "node": {"id": ME, "name": "gateway", "mesh": "plant-3", "version": "0.1.0",
                 "uptime_s": 3725, "health": "ok"},
        "peers": [
            {"id": PEERS[0][0], "name": PEERS[0][1], "state": "alive", "last_seen_s": 0.4,
             "rtt_ms": 0.82, "in_per_s": 1234.5, "out_per_s": 12.0, "dropped": 0},
            {"id": PEERS[1][0], "name": PEERS[1][1], "state": "suspect", "last_seen_s": 2.6,
             "rtt_ms": None, "in_per_s": 0, "out_per_s": 3.5, "dropped": 17},
            {"id": PEERS[2][0], "name": PEERS[2][1], "state": "lost", "last_seen_s": 48,
             "rtt_ms": None, "in_per_s": 0, "out_per_s": 0, "dropped": 2048},
        ],
        "topics": [
            {"topic": "orders.created", "msgs_per_s": 1234.5, "bytes_per_s": 2_500_000,
             "subscribers": 2, "dropped": 0, "spark": _spark(40)},
            {"topic": "sensors.<script>alert(1)</script>", "msgs_per_s": 3.2,
             "bytes_per_s": 410, "subscribers": 0, "dropped": 12, "spark": _spark(5)},
        ],
        "queues": [{"queue": "jobs", "workers": 3, "in_flight": 2, "backlog": 15_200,
                    "msgs_per_s": 88.0}],
        "services": [{"service": "tax", "servers": 2, "p50_ms": 1.24, "p99_ms": 38.0,
                      "timeouts": 1, "per_s": 42.0}],
        "spool": {"messages": 15_321, "bytes": 48_000_000, "quota_bytes": 64 * 2**20,
                  "quota_pct": 71.5, "oldest_age_s": 95, "fsync": "batch", "dead_letters": 1},
        "uplinks": [{"url": "nats://127.0.0.1:4222", "kind": "nats", "prefix": "plant3",
                     "state": "connecting", "backlog": 120, "oldest_pending_age": 12.0,
                     "exported": 5000, "imported": 12, "failed": 1,
                     "last_error": "connection refused"}],
    }


def default_topology() -> dict[str, Any]:
    nodes = [{"id": ME, "name": "gateway", "state": "alive", "self": True}]
    nodes += [{"id": i, "name": n, "state": "alive", "self": False} for i, n in PEERS]
    links = [{"source": ME, "target": i, "kind": "pub", "msgs_per_s": r}
             for (i, _), r in zip(PEERS, (1234.5, 3.5, 0), strict=True)]
    links.append({"source": PEERS[0][0], "target": PEERS[1][0], "kind": "ctl", "msgs_per_s": 1})
    return {"nodes": nodes, "links": links}


@dataclass
class FakeMesh:
    stats: dict[str, Any] = field(default_factory=default_stats)
    topology: dict[str, Any] = field(default_factory=default_topology)
    dead_letters: list[dict[str, Any]] = field(default_factory=lambda: [
        {"id": 7, "queue": "jobs", "topic": "jobs", "reason": "webhook answered 503",
         "attempts": 5, "time": time.time() - 30, "size": 42, "data_preview": '{"job": 1}'}])
    posts: list[tuple[str, str, bytes]] = field(default_factory=list)
    _events: asyncio.Queue[tuple[str, dict[str, Any]]] | None = None

    def app(self) -> web.Application:
        app = web.Application()
        Page().add_to(app)
        app.router.add_get("/v1/events", self._stream)
        app.router.add_get("/v1/topology", self._topology)
        app.router.add_get("/v1/dead-letters", self._dead)
        app.router.add_post("/v1/dead-letters/{action}", self._act)
        return app

    def peer_event(self, kind: str, peer_id: str, name: str, state: str) -> None:
        """Queues one ``event: <kind>`` (call on the app's loop)."""
        if self._events is None:
            self._events = asyncio.Queue()
        self._events.put_nowait((kind, {"id": peer_id, "name": name, "state": state}))

    async def _stream(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                               "Cache-Control": "no-cache"})
        await response.prepare(request)
        if self._events is None:
            self._events = asyncio.Queue()
        while True:
            try:
                kind, data = await asyncio.wait_for(self._events.get(), EVERY)
            except TimeoutError:
                kind, data = "stats", self.stats
            await response.write(f"event: {kind}\ndata: {json.dumps(data)}\n\n".encode())

    async def _topology(self, request: web.Request) -> web.Response:
        return web.json_response(self.topology)

    async def _dead(self, request: web.Request) -> web.Response:
        return web.json_response(self.dead_letters)

    async def _act(self, request: web.Request) -> web.Response:
        action = request.match_info["action"]
        self.posts.append((action, request.query_string, await request.read()))
        if action == "replay":
            self.dead_letters = []
            return web.json_response({"replayed": 1}, status=202)
        self.dead_letters = []
        return web.json_response({"purged": 1})
