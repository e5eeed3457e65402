"""``GET /v1/subscribe/{pattern}``: messages as Server-Sent Events.

Plain streams are best effort: they exist while the client is connected.
With ``?durable=NAME`` the stream is the node's durable subscription NAME:
while no client is connected, publishers keep reliable messages for it in
their spools. A durable event counts as delivered once written to the
connection; the agent remembers the last `RECENT` events of each durable (at most
`RECENT_BYTES` of them), so
a client that reconnects with ``Last-Event-ID`` also gets those it may have
lost in flight (for the `RECENT_NAMES` durables streamed last: the names are
the clients' choice). Events queued for a client but not yet written go back to
the publishers when it disconnects.

A client reconnecting with a ``Last-Event-ID`` the agent does not remember (older
than what it keeps, from before it started, or on a plain stream, which keeps
nothing) first gets ``event: gap`` (`gap`): what came between that id and what
follows may be lost, and how many is not known.

A client that sends ``Accept: application/json`` gets MessagePack payloads
(typed sends from Python) as JSON text in ``data``, as if they had been
published as JSON (see `_headers.as_json`).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from datetime import datetime
from typing import Final

import msgspec
from aiohttp import web

from .. import _trace
from .._memory._history import parse_since
from .._message import Message
from .._node import AsyncNode
from .._pubsub._subscription import Subscription
from .._support._text import quoted
from .._work._pull import Pull
from ..errors import ClosedError
from . import _http
from ._headers import as_json, wants_json
from ._metrics import AgentMetrics

KEEPALIVE: Final[float] = 15.0
"""Seconds between comment lines on an idle stream (proxies and clients time out)."""
BATCH: Final[int] = 512
"""Events written at once; many small messages cost one write."""
BATCH_BYTES: Final[int] = 1024 * 1024
"""Payload bytes taken for one write (a stalled client holds at most one write's worth)."""
RECENT: Final[int] = 1024
RECENT_BYTES: Final[int] = 8 * 1024 * 1024
"""Bytes of events remembered per durable (1024 events of 1 MiB messages were 1.4 GB,
kept for as long as the agent runs)."""
RECENT_NAMES: Final[int] = 256
"""Durables whose recent events are kept once their stream has ended: beyond them the
least recently streamed are forgotten, or each name ever streamed would keep its
events for the agent's life, its durable forgotten or not."""
MAX_PENDING: Final[int] = 100_000
"""Queued messages for one slow plain stream before the oldest are dropped."""
MAX_PENDING_BYTES: Final[int] = 64 * 1024 * 1024
"""Queued payload bytes for one slow plain stream before the oldest are dropped (else a
stalled client of large messages holds `MAX_PENDING` of them: up to 100 GiB)."""
_HEADERS: Final = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                   "X-Accel-Buffering": "no"}
_encode = msgspec.json.Encoder().encode

Settle = Callable[[bool], None]


def gap(last_id: str, resent: int) -> bytes:
    """``event: gap``: nothing after `last_id` can be sent again but the `resent` events
    that follow (no ``id:``, so a client's last event id stays the one it had)."""
    return b"event: gap\ndata: %s\n\n" % _encode({"last_event_id": last_id, "resent": resent})


def event(msg: Message, json: bool = False) -> bytes:
    """One SSE event: ``id:`` is the message id, ``data:`` its JSON (base64 if binary);
    with `json`, a MessagePack payload is converted to JSON first."""
    if json:
        msg = as_json(msg)
    return b"id: %s\ndata: %s\n\n" % (msg.id.encode(), _encode(_http.message_json(msg)))


class Streams:
    """Every SSE stream of one agent."""

    def __init__(self, node: AsyncNode, metrics: AgentMetrics) -> None:
        self._node = node
        self._metrics = metrics
        self._attached: set[str] = set()
        self._recent: dict[str, _Recent] = {}
        self._open: set[Subscription | Pull] = set()

    def add_to(self, app: web.Application) -> None:
        _http.add_routes(app, [web.get("/v1/subscribe/{pattern}", self.subscribe)])
        app.on_shutdown.append(self._shutdown)

    async def _shutdown(self, app: web.Application) -> None:
        """End every stream cleanly (its handler returns, the response ends) at stop."""
        for source in list(self._open):
            await source.aclose()

    async def subscribe(self, request: web.Request) -> web.StreamResponse:
        params = _http.query(request, ("durable", "retained", "since", "last"))
        pattern = request.match_info["pattern"]
        durable = params.get("durable")
        retained = _http.flag(params, "retained", default=True)
        since = parse_since(params["since"]) if "since" in params else None
        last = _http.count(params, "last", 0, 1_000_000) or None
        if "last" in params and last is None:
            return _http.error(400, "last must be >= 1")
        json = wants_json(request.headers.get("Accept"))
        if durable is None:
            return await self._plain(request, pattern, retained, since, last, json)
        if durable in self._attached:
            return _http.error(409, f"durable {quoted(durable)} already has a stream on this agent")
        self._attached.add(durable)
        try:
            return await self._durable(request, pattern, durable, since, last, json)
        finally:
            self._attached.discard(durable)

    async def _plain(self, request: web.Request, pattern: str, retained: bool,
                     since: float | datetime | None, last: int | None, json: bool
                     ) -> web.StreamResponse:
        sub = await self._node.subscribe(pattern, max_pending=MAX_PENDING, retained=retained,
                                         since=since, last=last)
        sub.bound_bytes(MAX_PENDING_BYTES)
        self._open.add(sub)
        label = self._metrics.pattern_label(pattern)
        counter = self._metrics.sse.labels(label)
        dropped, reported = self._metrics.sse_dropped.labels(label), 0
        response = web.StreamResponse(headers=_HEADERS)
        try:
            await _open(request, response)
            last_id = _last_event_id(request)
            if last_id:  # (a plain stream keeps nothing to resume with)
                await response.write(gap(last_id, 0))
            while True:
                try:
                    first = await sub.next(timeout=KEEPALIVE)
                except TimeoutError:
                    await response.write(b": keepalive\n\n")
                    continue
                except ClosedError:
                    return response
                msgs = [first, *sub.drain(BATCH - 1, BATCH_BYTES - len(first.data))]
                await response.write(b"".join(event(m, json) for m in msgs))
                if _trace.ON:
                    _trace.received(msgs, "sse", subscription=pattern, operation="process")
                counter.inc(len(msgs))
                if sub.dropped != reported:  # a client slower than the stream loses the oldest
                    dropped.inc(sub.dropped - reported)
                    reported = sub.dropped
        except ConnectionResetError:  # the client left: a stream's usual end, not an error
            return response
        finally:
            self._open.discard(sub)
            await sub.aclose()

    async def _durable(self, request: web.Request, pattern: str, name: str,
                       since: float | datetime | None, last: int | None, json: bool
                       ) -> web.StreamResponse:
        pull = await self._node.subscribe_durable(pattern, name, since=since, last=last)
        self._open.add(pull)
        recent = self._recent_of(name)
        response = web.StreamResponse(headers=_HEADERS)
        try:
            await _open(request, response)
            missed = recent.after(_last_event_id(request))
            if missed:
                await response.write(missed)
            counter = self._metrics.sse.labels(self._metrics.pattern_label(pattern))
            await self._pump(response, pull, recent, counter.inc, json)
            return response
        except ConnectionResetError:  # the client left (what it did not get goes back)
            return response
        finally:
            self._open.discard(pull)
            await pull.aclose()

    def _recent_of(self, name: str) -> _Recent:
        """The recent events of durable `name`, now the last streamed; the least recently
        streamed past `RECENT_NAMES` are dropped (never one with a stream open)."""
        recent = self._recent.pop(name, None)
        if recent is None:
            recent = _Recent()
        self._recent[name] = recent  # (a dict keeps insertion order: oldest first)
        excess = len(self._recent) - RECENT_NAMES
        if excess > 0:
            idle = [n for n in self._recent if n not in self._attached]
            for old in idle[:excess]:
                del self._recent[old]
        return recent

    @staticmethod
    async def _pump(response: web.StreamResponse, pull: Pull,
                    recent: _Recent, count: Callable[[int], None],
                    json: bool) -> None:
        while True:
            try:
                taken = [await pull.take(timeout=KEEPALIVE)]
            except TimeoutError:
                await response.write(b": keepalive\n\n")
                continue
            except ClosedError:
                return
            size = len(taken[0][0].data)
            while pull.pending and len(taken) < BATCH and size < BATCH_BYTES:
                taken.append(await pull.take())
                size += len(taken[-1][0].data)
            events = [(msg.id, event(msg, json)) for msg, _ in taken]
            try:
                await response.write(b"".join(e for _, e in events))
            except BaseException:
                for _, settle in taken:
                    settle(False)
                raise
            for _, settle in taken:
                settle(True)
            if _trace.ON:
                _trace.received((m for m, _ in taken), "sse", operation="process")
            recent.extend(events)
            count(len(events))


def _last_event_id(request: web.Request) -> str:
    return request.headers.get("Last-Event-ID", "").strip()


async def _open(request: web.Request, response: web.StreamResponse) -> None:
    await response.prepare(request)
    await response.write(b": subscribed\n\n")  # the subscription is in place from here on


class _Recent:
    """The last events written for one durable: at most `RECENT`, at most `RECENT_BYTES`
    (always the newest one)."""

    def __init__(self) -> None:
        self._events: deque[tuple[str, bytes]] = deque(maxlen=RECENT)
        self._bytes = 0

    def extend(self, events: list[tuple[str, bytes]]) -> None:
        events_ = self._events
        for item in events:
            if len(events_) == RECENT:
                self._bytes -= len(events_[0][1])
            events_.append(item)
            self._bytes += len(item[1])
        while self._bytes > RECENT_BYTES and len(events_) > 1:
            self._bytes -= len(events_.popleft()[1])

    def after(self, last_id: str) -> bytes:
        """The remembered events after `last_id`; for an id not remembered (older than
        the oldest kept: every one kept came after it), a `gap`, then all of them."""
        if not last_id:
            return b""
        ids = [event_id for event_id, _ in self._events]
        try:
            start = ids.index(last_id) + 1
        except ValueError:
            return gap(last_id, len(ids)) + b"".join(data for _, data in self._events)
        return b"".join(data for _, data in list(self._events)[start:])
