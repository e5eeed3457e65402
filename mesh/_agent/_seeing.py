"""Seeing the mesh: ``GET /v1/events`` (peer events and live figures as Server-Sent
Events), ``GET /v1/topology``, and the dead letters (``GET /v1/dead-letters``,
``POST /v1/dead-letters/purge``).

``/v1/events`` sends ``event: joined|left|lost`` with ``data: {"id", "name",
"state"}`` (``alive``, ``left``, ``lost``) as they happen, and ``event: stats``
once a second with one snapshot (`_stats`). The mesh's figures are gathered at
most once per second however many streams are open (`mesh._figures._mesh`).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, Final

import msgspec
from aiohttp import web

from .._membership._peers import PeerEvent
from .._node import AsyncNode
from .._uplink._links import Uplinks
from . import _http
from ._stats import Stats

STATS_EVERY: Final[float] = 1.0
_HEADERS: Final = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                   "X-Accel-Buffering": "no"}
_encode = msgspec.json.Encoder().encode


def sse(kind: str, data: object) -> bytes:
    return b"event: %s\ndata: %s\n\n" % (kind.encode(), _encode(data))


def peer_event(event: PeerEvent) -> bytes:
    peer = event.peer
    return sse(event.kind.value, {"id": peer.id, "name": peer.name, "state": peer.state.value})


class Seeing:
    """The agent's routes for watching the mesh."""

    def __init__(self, node: AsyncNode, uplinks: Uplinks) -> None:
        self._node = node
        self.stats = Stats(node, uplinks)
        self._streams: set[asyncio.Task[Any]] = set()

    def add_to(self, app: web.Application) -> None:
        _http.add_routes(app, [
            web.get("/v1/events", self.events),
            web.get("/v1/topology", self.topology),
            web.get("/v1/dead-letters", self.dead_letters),
            web.post("/v1/dead-letters/purge", self.purge),
        ])
        app.on_shutdown.append(self._shutdown)

    async def _shutdown(self, app: web.Application) -> None:
        for task in list(self._streams):
            task.cancel()

    async def topology(self, request: web.Request) -> web.Response:
        _http.query(request, ())
        return web.json_response(await self.stats.topology())

    async def dead_letters(self, request: web.Request) -> web.Response:
        _http.query(request, ())
        return web.json_response(self._node.dead_letters())

    async def purge(self, request: web.Request) -> web.Response:
        """Delete dead letters: all, or those of a JSON body ``{"ids": [...]}``."""
        _http.query(request, ())
        body = await request.read()
        ids: set[int] | None = None
        if body.strip():
            try:
                parsed = msgspec.json.decode(body, type=dict[str, list[int]])
            except msgspec.DecodeError:
                return _http.error(400, 'body must be {"ids": [<dead letter id>, ...]}')
            if set(parsed) != {"ids"}:
                return _http.error(400, 'body must be {"ids": [<dead letter id>, ...]}')
            ids = set(parsed["ids"])
        return web.json_response({"purged": self._node.purge_dead_letters(ids)})

    async def events(self, request: web.Request) -> web.StreamResponse:
        _http.query(request, ())
        peer_events = self._node.events()
        response = web.StreamResponse(headers=_HEADERS)
        task = asyncio.current_task()
        if task is not None:
            self._streams.add(task)
        try:
            await response.prepare(request)
            await response.write(b": events\n\n")
            loop = asyncio.get_running_loop()
            ticker = loop.create_task(self._tick(response))
            try:
                while True:
                    coming = loop.create_task(peer_events.next())
                    await asyncio.wait({coming, ticker}, return_when=asyncio.FIRST_COMPLETED)
                    if not coming.done():
                        coming.cancel()
                        break  # the ticker ended: the client went away
                    if coming.exception() is not None:
                        break  # ClosedError: the node is closing
                    await response.write(peer_event(coming.result()))
            finally:
                ticker.cancel()
                with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                    await ticker
            return response
        finally:
            if task is not None:
                self._streams.discard(task)
            await peer_events.aclose()

    async def _tick(self, response: web.StreamResponse) -> None:
        """A stats snapshot every `STATS_EVERY` seconds (the first at once)."""
        loop = asyncio.get_running_loop()
        due = loop.time()
        while True:
            snapshot = await self.stats.snapshot()
            await response.write(sse("stats", snapshot))
            due = max(due + STATS_EVERY, loop.time())
            await asyncio.sleep(due - loop.time())
