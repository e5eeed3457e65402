"""The agent's request/response routes: publish, push, request, peers, health, metrics.

Bodies are the payload byte for byte (MessagePack replies and retained values as
JSON for a client that accepts JSON); headers travel as described in `_headers`.
Path parameters arrive URL-decoded (``acc.%3E`` is ``acc.>``).
"""

from __future__ import annotations

import time
from typing import Final

import msgspec
from aiohttp import web

from .. import _trace
from .._node import AsyncNode
from .._uplink._links import Uplinks
from ..errors import NoRespondersError, RemoteError, RequestTimeout
from . import _bulk, _http
from ._headers import OURS, as_json, from_http, reply_to_http, wants_json
from ._metrics import CONTENT_TYPE, AgentMetrics

DEFAULT_REQUEST_TIMEOUT: Final[float] = 5.0
DEFAULT_PUSH_TIMEOUT: Final[float] = 10.0
MAX_RETRIES: Final[int] = 10
MAX_REPLIES: Final[int] = 10_000
LEAN: Final = ("/v1/publish/{topic}", "/v1/push/{queue}", "/v1/request/{service}")
"""The routes the agent's lean HTTP front serves itself (see `_front`): the hot ones."""


class _Accepted(msgspec.Struct):
    """What a publish answers (encoded by msgspec: this is the hot path)."""

    topic: str
    reliable: bool
    retain: bool


def _accepted(body: object) -> web.Response:
    return web.Response(body=msgspec.json.encode(body), status=202,
                        content_type="application/json")


class Routes:
    """Handlers bound to one node."""

    def __init__(self, node: AsyncNode, metrics: AgentMetrics, uplinks: Uplinks) -> None:
        self._node = node
        self._metrics = metrics
        self._uplinks = uplinks

    def add_to(self, app: web.Application) -> None:
        _http.add_routes(app, [
            web.post("/v1/publish", self.publish_bulk),
            web.post("/v1/publish/{topic}", self.publish),
            web.post("/v1/push/{queue}", self.push),
            web.post("/v1/request/{service}", self.request),
            web.get("/v1/last/{pattern}", self.last),
            web.get("/v1/peers", self.peers),
            web.get("/v1/uplinks", self.uplinks),
            web.post("/v1/dead-letters/replay", self.replay),
            web.get("/healthz", self.healthz),
            web.get("/metrics", self.metrics),
        ])

    async def publish(self, request: _http.RequestView) -> web.Response:
        topic = request.match_info["topic"]
        self._node.check_topic(topic)
        reliable = retain = False
        ttl = None
        if request.query_string:  # (most publishes have none: no parsing then)
            params = _http.query(request, ("reliable", "retain", "ttl"))
            reliable = _http.flag(params, "reliable")
            retain = _http.flag(params, "retain")
            ttl = _http.ttl(params)
        headers = from_http(request.headers.items())
        body = await request.read()
        await self._node.publish(topic, body, headers=headers or None, reliable=reliable,
                                 retain=retain, ttl=ttl)
        return _accepted(_Accepted(topic, reliable, retain))

    async def publish_bulk(self, request: web.Request) -> web.Response:
        """Many messages, one NDJSON line each; all are checked before any is published."""
        _http.query(request, ())
        body = await request.read()
        node = self._node
        try:
            items = _bulk.parse(body, node.config.max_message_size,
                                node.config.data_dir is not None)
        except _bulk.BadLine as exc:
            return web.json_response({"error": str(exc), "line": exc.number}, status=400)
        if _trace.ON:  # the request's traceparent: the parent of lines without their own
            with _trace.continuing(request.headers):
                await _bulk.publish(node, items)
        else:
            await _bulk.publish(node, items)
        return _accepted({"published": len(items)})

    async def last(self, request: web.Request) -> web.Response:
        """The retained values matching the pattern, gathered from the mesh."""
        params = _http.query(request, ("timeout",))
        timeout = _http.seconds(params, "timeout", DEFAULT_REQUEST_TIMEOUT)
        values = await self._node.last(request.match_info["pattern"], timeout=timeout)
        if wants_json(request.headers.get("Accept")):
            values = [as_json(m) for m in values]
        return web.json_response([m.to_dict() for m in values])

    async def push(self, request: _http.RequestView) -> web.Response:
        params = _http.query(request, ("reliable", "timeout", "ttl"))
        queue = request.match_info["queue"]
        self._node.check_queue(queue)
        reliable = _http.flag(params, "reliable")
        timeout = _http.seconds(params, "timeout", DEFAULT_PUSH_TIMEOUT)
        ttl = _http.ttl(params)
        headers = from_http(request.headers.items())
        body = await request.read()
        await self._node.push(queue, body, headers=headers or None, timeout=timeout,
                              reliable=reliable, ttl=ttl)
        self._metrics.pushed.labels(self._metrics.queue_label(queue)).inc()
        return web.json_response({"queue": queue, "reliable": reliable}, status=202)

    async def request(self, request: _http.RequestView) -> web.Response:
        """One server's reply (its headers as HTTP headers, see `_headers`); with
        ``?all=true`` every live server's, as a JSON list."""
        params = (_http.query(request, ("timeout", "retries", "all", "max_replies"))
                  if request.query_string else {})  # (most requests have none: no parsing)
        service = request.match_info["service"]
        self._node.check_service(service)
        timeout = _http.seconds(params, "timeout", DEFAULT_REQUEST_TIMEOUT)
        headers = from_http(request.headers.items())
        if _http.flag(params, "all"):
            if "retries" in params:
                return _http.error(400, "retries make no sense with all=true "
                                        "(every server is asked once)")
            max_replies = None
            if "max_replies" in params:
                max_replies = _http.count(params, "max_replies", 1, MAX_REPLIES)
                if max_replies < 1:
                    return _http.error(400, "max_replies must be >= 1")
            return await self._request_all(service, await request.read(), timeout, headers,
                                           max_replies,
                                           wants_json(request.headers.get("Accept")))
        if "max_replies" in params:
            return _http.error(400, "max_replies needs all=true")
        retries = _http.count(params, "retries", 2, MAX_RETRIES)
        body = await request.read()
        started = time.perf_counter()
        outcome = "error"
        try:
            reply = await self._node.request(service, body, timeout=timeout, retries=retries,
                                             headers=headers or None)
            outcome = "ok"
        except RequestTimeout:
            outcome = "timeout"
            raise
        except NoRespondersError:
            outcome = "no_responders"
            raise
        except RemoteError:
            outcome = "remote_error"
            raise
        finally:
            self._metrics.requested(service, outcome, time.perf_counter() - started)
        if wants_json(request.headers.get("Accept")):
            reply = as_json(reply)
        out = reply_to_http(reply.headers)
        out[OURS + "source"] = reply.source
        return web.Response(body=reply.data, headers=out)

    async def _request_all(self, service: str, body: bytes, timeout: float,
                           headers: dict[str, str], max_replies: int | None,
                           json: bool) -> web.Response:
        """Scatter-gather: 200 with the JSON list of replies (empty when no server is there:
        a list is the answer, not an error); a failed server's entry has ``error``. With
        `json` (the client accepts JSON), MessagePack replies are shown as JSON."""
        started = time.perf_counter()
        replies = await self._node.request_all(service, body, timeout=timeout,
                                               max_replies=max_replies,
                                               headers=headers or None)
        self._metrics.requested(service, "ok" if replies else "no_responders",
                                time.perf_counter() - started)
        if json:
            replies = [as_json(reply) for reply in replies]
        return web.json_response([_http.message_json(reply, "service") for reply in replies])

    async def replay(self, request: web.Request) -> web.Response:
        """Dead letters (all, or ``?id=N``) get a new round of delivery attempts: the way to
        retry a webhook's failures once the app is fixed, while the agent runs."""
        params = _http.query(request, ("id",))
        ids = {_http.count(params, "id", 0, 2**63 - 1)} if "id" in params else None
        moved = await self._node.replay_dead_letters(ids)
        return web.json_response({"replayed": moved}, status=202)

    async def peers(self, request: web.Request) -> web.Response:
        _http.query(request, ())
        return web.json_response([p.to_dict() for p in self._node.peers()])

    async def uplinks(self, request: web.Request) -> web.Response:
        """Each uplink's state, backlog and counters."""
        _http.query(request, ())
        return web.json_response(self._uplinks.statuses())

    async def healthz(self, request: web.Request) -> web.Response:
        _http.query(request, ())
        node = self._node
        if not node.running:
            return _http.error(503, "node is not running")
        return web.json_response({"status": "ok", "id": node.id, "name": node.name,
                                  "mesh": node.mesh, "peers": len(node.peers())})

    async def metrics(self, request: web.Request) -> web.Response:
        _http.query(request, ())
        return web.Response(body=self._metrics.render(),
                            headers={"Content-Type": CONTENT_TYPE})
