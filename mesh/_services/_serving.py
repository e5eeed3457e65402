"""Serving named services: this node's ROUTER and the `Service`s behind it.

A request names its service; the `Service` serving it runs the handler and
answers (see `_server`). A request for a service not served here is declined
at once, so the requester fails over to another server. The replies to one
requester made while handling one received frame of requests travel back as
one frame (`_coalesce`).
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections import deque
from collections.abc import Iterable, Mapping
from typing import Any, Final

from patterns import Context, ServiceRouter, SocketClosed

from .. import _names, _wire
from .._config import NodeConfig
from .._message import Message
from .._parts import Announcer
from .._support._cache import BoundedDict
from .._support._quiet import QuietLog
from .._support._tally import Stats
from ..errors import ConfigError
from ._coalesce import Coalescer
from ._server import Service, ServiceHandler

_TIMINGS: Final[int] = 1024
"""Answer times kept per served service (for its p50 and p99)."""


class Serving:
    """The ROUTER side of a node: the services it serves, and their replies."""

    def __init__(self, ctx: Context, config: NodeConfig, quiet: QuietLog,
                 stats: Stats, announcer: Announcer) -> None:
        self._quiet = quiet
        self._stats = stats
        self._announcer = announcer
        self.max_message_size = config.max_message_size
        self._max_wire = _wire.max_frame(config.max_message_size)
        self._frame_budget = _wire.frame_budget(config.max_message_size)
        self._router = ServiceRouter(ctx, self._on_requests, hwm=config.service_hwm,
                                     max_message_size=self._max_wire)
        self._served: dict[str, Service] = {}
        self._internal: dict[str, Service] = {}
        """The node's own services (retained values...): served by every node, announced
        by none, listed nowhere."""
        self._replies: Coalescer[bytes, _wire.Reply] = Coalescer(self._send_replies)
        self._closed = False
        self._revoked: BoundedDict[str, bool] = BoundedDict()
        """Members whose CURVE key was revoked: their requests still running get no reply
        (until one sends a request again: its key was allowed again, its id kept)."""
        self.timings: dict[str, deque[float]] = {}
        """Seconds the latest requests of each served service took to answer (its figures)."""
        self.endpoints: list[str] = []

    def bind(self, interfaces: Iterable[str]) -> list[str]:
        self.endpoints = [self._router.bind(host) for host in interfaces]
        return self.endpoints

    def start(self) -> None:
        self._router.start()

    async def aclose(self) -> None:
        """Stop every service (their running handlers are cancelled), close the ROUTER."""
        self._closed = True
        for svc in [*self._served.values(), *self._internal.values()]:
            await svc.cancel()
        self._served.clear()
        self._internal.clear()
        self._router.close()

    @property
    def names(self) -> list[str]:
        """The services this node serves."""
        return sorted(self._served)

    def hello_fields(self, version: int) -> Mapping[str, Any]:
        return {"rtr": self.endpoints, "services": self.names}

    def get(self, service: str) -> Service | None:
        """The open local server of `service`, if this node serves it."""
        svc = self._served.get(service)
        return svc if svc is not None and not svc.closed else None

    def serve(self, service: str, handler: ServiceHandler, concurrency: int) -> Service:
        _names.service(service)
        if not concurrency >= 1:  # (NaN too: no request would ever run)
            raise ConfigError("concurrency", f"must be >= 1, not {concurrency!r}")
        if service in self._served:
            raise ConfigError("service", f"{service!r} is already served by this node")
        svc = self._served[service] = Service(service, handler, concurrency, self)
        self._announcer.interest_changed()
        return svc

    def serve_internal(self, service: str, handler: ServiceHandler, concurrency: int) -> None:
        """Answer `service` on this node without announcing it (every node does). Its
        answers may pass ``max_message_size`` by half the frame envelope: one carries a
        whole message (a retained value, history) with its topic and headers, which must
        reach a peer of the same setting even when its payload is at that limit."""
        self._internal[service] = Service(service, handler, concurrency, self,
                                          self.max_message_size + _wire.WIRE_OVERHEAD // 2)

    def unserve(self, svc: Service) -> None:
        """`svc` closed: forget it and tell peers (unless the node is closing anyway)."""
        if self._served.get(svc.name) is svc:
            del self._served[svc.name]
            self.timings.pop(svc.name, None)
            if not self._closed:
                self._announcer.interest_changed()

    def _on_requests(self, batch: list[list[bytes]]) -> None:
        self._replies.hold()
        try:
            for frames, req in _wire.service_messages(batch, 2, _wire.Request,
                                                      self._max_wire, self._drop):
                self._on_request(frames[0], req)
        finally:
            self._replies.flush()  # sync handlers answered: one frame per requester now

    def _drop(self, reason: str) -> None:
        self._quiet.drop("service", reason)

    def _on_request(self, identity: bytes, req: _wire.Request) -> None:
        if self._revoked:  # (past the screen of revoked keys: its key is allowed again)
            self._revoked.pop(req.source, None)
        self._stats["requests_served"] += 1
        stats = self._stats
        stats.services["received"].add(req.service)
        stats.peers["received"].add(req.source)
        svc = self._served.get(req.service) or self._internal.get(req.service)
        if svc is None:  # not (or no longer) served here: the requester tries another
            stats.services["dropped"].add(req.service)
            self._send_reply(identity, _wire.Reply(req.id, _wire.REPLY_NOT_SERVED,
                                                   time.time(), b""))
            return
        msg = Message(req.service, req.payload, req.name, req.source, req.id, req.ts,
                      req.headers)
        if svc is self._served.get(req.service):
            svc.submit(msg, functools.partial(self._timed_reply, identity, req.source,
                                              req.service, time.perf_counter()))
        else:
            svc.submit(msg, functools.partial(self._answer, identity, req.source))

    def revoke(self, peer_id: str) -> None:
        """`peer_id`'s key left the allowlist: answer none of its requests still running."""
        self._revoked.put(peer_id, True)

    def _timed_reply(self, identity: bytes, source: str, service: str, started: float,
                     reply: _wire.Reply) -> None:
        timings = self.timings.get(service)
        if timings is None:
            if service not in self._served:
                self._answer(identity, source, reply)
                return
            timings = self.timings[service] = deque(maxlen=_TIMINGS)
        timings.append(time.perf_counter() - started)
        self._answer(identity, source, reply)

    def _answer(self, identity: bytes, source: str, reply: _wire.Reply) -> None:
        if self._revoked and source in self._revoked:
            return
        self._replies.add(identity, reply)

    def _send_reply(self, identity: bytes, reply: _wire.Reply) -> None:
        self._replies.add(identity, reply)

    def _send_replies(self, identity: bytes, replies: list[_wire.Reply]) -> None:
        # the node is closing when SocketClosed: the requester fails over on our goodbye
        with contextlib.suppress(SocketClosed):
            for frame in _wire.service_frames(replies, self._frame_budget):
                self._router.reply(identity, frame)
