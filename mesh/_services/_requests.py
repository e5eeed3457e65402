"""Requests to named services: choosing a server, retrying, failing over.

One DEALER per server peer, opened on first use. Each request gets a
correlation id and a future in the pending map; a reply whose id is no longer
pending (its request timed out) is discarded and counted. A server is chosen
among the live peers announcing the service (and this node itself, served
without the network): not yet tried by this request first, then least
outstanding requests, then least recently used (round robin). Requests to
one server made in the same loop iteration travel as one frame (`_coalesce`):
the first at once, the rest when the iteration ends.

Retries are one layer: tenacity wraps the whole attempt (bounded attempts,
exponential backoff with jitter), each attempt picking another server when
there is one. An attempt gets an equal share of the time left, so `timeout`
covers finding a server and all retries. When a server's connection drops (a
socket monitor sees it at once), or its peer is lost or leaves, its requests
in flight fail over immediately instead of waiting out their timeout. A
request may therefore run twice when a server dies after handling it: make
handlers idempotent, or use `retries=0`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import Final, NoReturn

from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential_jitter,
)

from patterns import (
    Context,
    ServiceDealer,
    SocketClosed,
)

from .. import _names, _wire
from .._config import NodeConfig
from .._membership._peers import PeerRecord, PeerState, PeerTable
from .._message import Message, sent_headers
from .._parts import Waiter
from .._support._quiet import QuietLog
from .._support._tally import Stats, Tally
from .._support._text import printable, quoted
from ..errors import (
    ClosedError,
    ConfigError,
    DeliveryError,
    MessageTooLarge,
    NoRespondersError,
    RemoteError,
    RequestTimeout,
)
from ._coalesce import Coalescer
from ._deadlines import Deadlines
from ._gather import Asked, Replies
from ._server import Service
from ._serving import Serving

_log = logging.getLogger("mesh.services")

DISCOVERY_GRACE: Final[float] = 0.5
"""After start, a request waits this long at most for a server to be discovered."""
_RETRY_INITIAL: Final[float] = 0.01
_RETRY_MAX: Final[float] = 0.25
_RETRY_JITTER: Final[float] = 0.02


def check_timeout(timeout: float) -> None:
    """A timeout must be a number > 0. NaN is not, though it passes ``<= 0``: no deadline of
    NaN is ever due, and once in the shared timer (`Deadlines`) none after it would be."""
    if not timeout > 0:
        raise ConfigError("timeout", f"must be > 0, not {timeout!r}")


class _ServerGone(DeliveryError):
    """Internal: the chosen server went away or declined; another one may answer."""


class _Link:
    """Our DEALER to one server peer."""

    __slots__ = ("_make_dealer", "blocked", "dealer", "last_used", "outstanding", "peer", "tasks",
                 "up")

    def __init__(self, peer: PeerRecord, make_dealer: Callable[[_Link], ServiceDealer]) -> None:
        self.peer = peer
        self.outstanding: set[int] = set()
        self.up = True
        self.last_used = 0
        self.tasks: list[asyncio.Task[None]] = []
        self.blocked: deque[bytearray] = deque()
        """Request frames waiting for room in the server's queue (sent in order)."""
        self._make_dealer = make_dealer
        self.dealer = make_dealer(self)

    def renew(self) -> None:
        """Replace the DEALER (its requests have failed over): libzmq does not reconnect a
        connection it dropped for a protocol error, such as a reply over our
        ``max_message_size`` from a server of a larger one, so it would stay down for good."""
        for task in self.tasks:
            if task is not asyncio.current_task():
                task.cancel()  # a sender of blocked frames: their requests failed over
        self.blocked.clear()
        old, self.dealer = self.dealer, self._make_dealer(self)
        old.close()

    def send(self, frame: bytearray) -> None:
        if self.blocked or not self.dealer.try_send(frame):
            self.blocked.append(frame)
            if len(self.blocked) == 1:
                task = asyncio.get_running_loop().create_task(self._send_blocked(),
                                                              name="zeromesh-service-send")
                self.tasks.append(task)
                task.add_done_callback(self.tasks.remove)  # a link may block many times

    async def _send_blocked(self) -> None:
        """The server's queue is full: wait for room rather than drop (requests time out)."""
        with contextlib.suppress(SocketClosed):
            while self.blocked:
                await self.dealer.send(self.blocked[0])
                self.blocked.popleft()


class Requests:
    """The requesting side of a node: a DEALER per server peer, requests in flight."""

    def __init__(self, ctx: Context, config: NodeConfig, quiet: QuietLog,
                 stats: Stats, *, peers: PeerTable, local: Serving,
                 waiter: Waiter) -> None:
        self._ctx = ctx
        self._quiet = quiet
        self._stats = stats
        self._peers = peers
        self._local = local
        self._waiter = waiter
        self._name = config.name
        self._max_message_size = config.max_message_size
        self._max_wire = _wire.max_frame(config.max_message_size)
        self._frame_budget = _wire.frame_budget(config.max_message_size)
        self._hwm = config.service_hwm
        self._node_id = ""
        self._links: dict[str, _Link] = {}
        self._pending: dict[int, tuple[asyncio.Future[_wire.Reply], _Link | None]] = {}
        self._ids = itertools.count(1)
        self._uses = itertools.count(1)
        self._grace_end = 0.0
        self._deadlines = Deadlines()
        self._requests: Coalescer[_Link, _wire.Request] = Coalescer(self._send_requests)
        self._closing: set[asyncio.Task[None]] = set()
        self._closed = False
        self.timeouts_by_service = self._stats.services["timed_out"]
        """Requests that timed out (after every retry), by service (the metrics' tally)."""
        self.sent_by_peer = Tally()
        """Requests sent to each peer (by id), for the node's figures."""

    def start(self, node_id: str) -> None:
        self._node_id = node_id
        self._grace_end = asyncio.get_running_loop().time() + DISCOVERY_GRACE

    async def aclose(self) -> None:
        """Fail pending requests with ClosedError, close every DEALER."""
        self._closed = True  # a request between attempts (backing off) ends, not reconnects
        for fut, _ in self._pending.values():
            if not fut.done():
                fut.set_exception(ClosedError("node closed while the request was in flight"))
        for link in list(self._links.values()):
            await self._drop_link(link, "node closed")
        if self._closing:
            await asyncio.wait(set(self._closing))
        self._deadlines.close()

    async def ask(self, rec: PeerRecord, service: str, payload: bytes, *,
                  timeout: float) -> Message:
        """One request to this very peer: no choice of server, no retry. For the node's
        internal services, which every node answers without announcing them.

        Raises:
            RequestTimeout: no reply within `timeout`.
            NoRespondersError: the peer does not answer `service`, or went away.
            RemoteError: its handler raised.
        """
        link = self._links.get(rec.id)
        if link is None:
            link = self._open_link(rec)
        cid, fut = self._send(link, service, payload, None, timeout)
        try:
            return self._result(service, await fut, rec.name, rec.id)
        except TimeoutError:
            raise RequestTimeout(f"{quoted(service)} at {printable(rec.name)}", timeout) from None
        except _ServerGone as exc:
            raise NoRespondersError(service) from exc
        finally:
            self._settled(cid, link)

    def _send(self, link: _Link, service: str, payload: bytes,
              headers: dict[str, str] | None, timeout: float
              ) -> tuple[int, asyncio.Future[_wire.Reply]]:
        """Queue one request on `link`; its future gets the reply, or TimeoutError after
        `timeout`, or `_ServerGone` on failover. The caller ends with `_settled`."""
        loop = asyncio.get_running_loop()
        cid = next(self._ids)
        fut: asyncio.Future[_wire.Reply] = loop.create_future()
        self._pending[cid] = (fut, link)
        link.outstanding.add(cid)
        self._deadlines.add(cid, fut, loop.time() + timeout)  # not asyncio.timeout(): hot path
        self._requests.add(link, _wire.Request(cid, service, self._node_id, self._name,
                                               time.time(), headers, payload))
        return cid, fut

    def _settled(self, cid: int, link: _Link) -> None:
        """Request `cid` on `link` is over: forget it everywhere."""
        self._deadlines.discard(cid)
        self._pending.pop(cid, None)
        link.outstanding.discard(cid)

    def links(self) -> list[str]:
        """Ids of the servers this node holds a connection to."""
        return sorted(self._links)

    def has_server(self, service: str) -> bool:
        return self._choose(service, ()) is not None

    def servers(self, service: str) -> list[Service | PeerRecord]:
        """Every live server of `service` known here (this node's own first)."""
        local = self._local.get(service)
        found: list[Service | PeerRecord] = [local] if local is not None else []
        found += [rec for rec in self._peers.records() if rec.state is not PeerState.LOST
                  and rec.rtr and service in rec.services]
        return found

    # -- peers (PeerListener) ----------------------------------------------------

    def partners(self) -> Iterable[str]:
        """The servers we hold connections to (PartnerSource)."""
        return self._links.keys()


    def peer_connected(self, new: PeerRecord, old: PeerRecord | None) -> None:
        if old is not None:  # a new incarnation or new endpoints: the old connection is stale
            link = self._links.get(old.id)
            if link is not None:
                self._close_soon(link, "server restarted")

    def peer_updated(self, rec: PeerRecord) -> None:
        pass  # the services it serves are read from its record at each choice

    def peer_lost(self, rec: PeerRecord) -> None:
        link = self._links.get(rec.id)
        if link is not None:
            self._fail_over(link, "server lost")  # now, not at each request's timeout

    def peer_gone(self, rec: PeerRecord) -> None:
        link = self._links.get(rec.id)
        if link is not None:
            self._close_soon(link, "server left")

    def peers_changed(self) -> None:
        pass

    def _close_soon(self, link: _Link, why: str) -> None:
        self._fail_over(link, why)
        if self._links.get(link.peer.id) is link:
            del self._links[link.peer.id]
        task = asyncio.get_running_loop().create_task(self._drop_link(link, why))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _drop_link(self, link: _Link, why: str) -> None:
        self._fail_over(link, why)
        if self._links.get(link.peer.id) is link:
            del self._links[link.peer.id]
        for task in link.tasks:
            task.cancel()
        if link.tasks:
            await asyncio.wait(link.tasks)
        link.dealer.close()

    def _fail_over(self, link: _Link, why: str) -> None:
        for cid in list(link.outstanding):
            entry = self._pending.get(cid)
            if entry is not None and not entry[0].done():
                entry[0].set_exception(_ServerGone(why))

    def _send_requests(self, link: _Link, requests: list[_wire.Request]) -> None:
        try:
            for frame in _wire.service_frames(requests, self._frame_budget):
                link.send(frame)
        except SocketClosed:  # the link was dropped meanwhile: its requests go elsewhere
            self._fail_over(link, "connection to the server closed")

    # -- requesting -------------------------------------------------------------

    def _checked(self, service: str, data: bytes | str, timeout: float) -> bytes:
        """The payload of a request, once the request is known to be valid."""
        _names.service(service)
        check_timeout(timeout)
        payload = data.encode() if isinstance(data, str) else bytes(data)
        if len(payload) > self._max_message_size:
            self._stats["oversized"] += 1
            raise MessageTooLarge(len(payload), self._max_message_size)
        return payload

    async def request(self, service: str, data: bytes | str, *, timeout: float, retries: int,
                      headers: Mapping[str, str] | None) -> Message:
        if retries < 0:
            raise ConfigError("retries", "must be >= 0")
        payload = self._checked(service, data, timeout)
        hdrs = sent_headers(headers)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        attempts = retries + 1
        tried: list[str] = []
        # The first attempt runs before tenacity is set up (that costs more than a
        # loopback round trip); if it fails retryably, tenacity takes over with that
        # failure as its attempt 1, so one policy still governs every attempt.
        try:
            return await self._attempt(service, payload, hdrs, deadline, attempts, tried)
        except (RequestTimeout, _ServerGone) as exc:
            if retries == 0 or loop.time() >= deadline:
                self._raise_final(service, timeout, exc)
            first: BaseException | None = exc
        try:
            async with asyncio.timeout_at(deadline):
                async for attempt in AsyncRetrying(
                        stop=stop_after_attempt(attempts),
                        retry=retry_if_exception_type((RequestTimeout, _ServerGone)),
                        wait=wait_exponential_jitter(multiplier=_RETRY_INITIAL, max=_RETRY_MAX,
                                                     jitter=_RETRY_JITTER),
                        reraise=True):
                    with attempt:
                        if first is not None:
                            failed, first = first, None
                            raise failed
                        left = attempts - attempt.retry_state.attempt_number + 1
                        return await self._attempt(service, payload, hdrs, deadline, left,
                                                   tried)
        except (RequestTimeout, _ServerGone) as exc:
            self._raise_final(service, timeout, exc)
        except TimeoutError as exc:
            self._raise_final(service, timeout, exc)
        raise AssertionError("unreachable: tenacity either returns or raises")

    def _raise_final(self, service: str, timeout: float, exc: BaseException) -> NoReturn:
        if isinstance(exc, _ServerGone):
            raise NoRespondersError(service) from exc
        self._stats["request_timeouts"] += 1
        self.timeouts_by_service.add(service)
        raise RequestTimeout(f"request to {quoted(service)}", timeout) from exc

    async def _attempt(self, service: str, payload: bytes, headers: dict[str, str] | None,
                       deadline: float, attempts_left: int, tried: list[str]) -> Message:
        self._check_open()
        loop = asyncio.get_running_loop()
        target, untried = self._best(service, tried)
        if target is None:
            grace_left = min(self._grace_end, deadline) - loop.time()
            if grace_left <= 0:
                raise NoRespondersError(service)
            try:  # just started: give discovery a moment
                await self._waiter.wait(lambda: self._choose(service, tried) is not None,
                                        grace_left, f"waiting for a server of {quoted(service)}")
            except RequestTimeout:
                raise NoRespondersError(service) from None
            target, untried = self._best(service, tried)
            if target is None:
                raise NoRespondersError(service)
        share = (deadline - loop.time()) / max(1, min(attempts_left, untried))
        use = next(self._uses)
        self._stats["requests"] += 1
        services = self._stats.services
        services["sent"].add(service)
        if tried:  # another server, after a timeout or a server that went away
            services["redelivered"].add(service)
        if isinstance(target, Service):
            tried.append("")
            return await self._call_local(target, service, payload, headers, share, use)
        link = self._links.get(target.id)
        if link is None:
            link = self._open_link(target)
        tried.append(target.id)
        self._stats.peers["sent"].add(target.id)
        self.sent_by_peer.add(target.id)
        if headers:
            self._check_wire_size(service, payload, headers)
        link.last_used = use
        cid, fut = self._send(link, service, payload, headers, share)
        try:
            reply = await fut
        except TimeoutError:
            raise RequestTimeout(f"request to {quoted(service)} at {printable(link.peer.name)}",
                                 share) from None
        finally:
            self._settled(cid, link)
        return self._result(service, reply, link.peer.name, link.peer.id)

    def _check_wire_size(self, service: str, payload: bytes, headers: dict[str, str]) -> None:
        size = (_wire.service_payload_size(payload, headers) + len(service)
                + _wire.SERVICE_ITEM_OVERHEAD)
        if size > self._max_wire:
            self._stats["oversized"] += 1
            raise MessageTooLarge(size, self._max_wire)

    # -- scatter-gather ------------------------------------------------------------

    def scatter(self, service: str, data: bytes | str, *, timeout: float,
                max_replies: int | None, headers: Mapping[str, str] | None) -> Replies:
        """The replies of every live server of `service` (see `_gather`); the request
        goes out when they are first awaited."""
        payload = self._checked(service, data, timeout)
        if max_replies is not None and max_replies < 1:
            raise ConfigError("max_replies", "must be >= 1 (or None: every server)")
        hdrs = sent_headers(headers)
        if hdrs:
            self._check_wire_size(service, payload, hdrs)

        async def start() -> list[Asked]:  # (the timeout runs from here: see `Replies`)
            deadline = asyncio.get_running_loop().time() + timeout
            return await self._ask_all(service, payload, hdrs, deadline)

        return Replies(service, start, functools.partial(self._gathered, service),
                       max_replies)

    async def _ask_all(self, service: str, payload: bytes, headers: dict[str, str] | None,
                       deadline: float) -> list[Asked]:
        self._check_open()  # (not an empty list, as if nobody served it)
        loop = asyncio.get_running_loop()
        servers = self.servers(service)
        grace_left = min(self._grace_end, deadline) - loop.time()
        if not servers and grace_left > 0:  # just started: give discovery a moment
            with contextlib.suppress(RequestTimeout):
                await self._waiter.wait(lambda: bool(self.servers(service)), grace_left,
                                        f"waiting for a server of {quoted(service)}")
            servers = self.servers(service)
        asked = []
        for target in servers:
            self._stats["requests"] += 1
            self._stats.services["sent"].add(service)
            if isinstance(target, Service):
                asked.append(self._ask_local(target, service, payload, headers, deadline))
                continue
            link = self._links.get(target.id)
            if link is None:
                link = self._open_link(target)
            self._stats.peers["sent"].add(target.id)
            self.sent_by_peer.add(target.id)
            link.last_used = next(self._uses)
            cid, fut = self._send(link, service, payload, headers, deadline - loop.time())
            asked.append(Asked(fut, target.name, target.id,
                               functools.partial(self._settled, cid, link)))
        return asked

    def _ask_local(self, svc: Service, service: str, payload: bytes,
                   headers: dict[str, str] | None, deadline: float) -> Asked:
        cid = next(self._ids)
        fut: asyncio.Future[_wire.Reply] = asyncio.get_running_loop().create_future()

        def reply(rep: _wire.Reply) -> None:
            if not fut.done():
                fut.set_result(rep)

        def settle() -> None:
            if self._pending.pop(cid, None) is not None:
                self._deadlines.discard(cid)
                svc.outstanding -= 1

        self._pending[cid] = (fut, None)
        self._deadlines.add(cid, fut, deadline)
        svc.outstanding += 1
        svc.last_used = next(self._uses)
        self._stats.services["received"].add(service)  # (served here: no frame to count it)
        svc.submit(Message(service, payload, self._name, self._node_id, cid, time.time(),
                           headers), reply)
        return Asked(fut, self._name, self._node_id, settle)

    def _gathered(self, service: str, reply: _wire.Reply, asked: Asked) -> Message | None:
        """A gathered reply as the app sees it; None for a server that declined."""
        try:
            return self._result(service, reply, asked.name, asked.id)
        except RemoteError as exc:
            return Message(service, b"", asked.name, asked.id, reply.id, reply.ts,
                           error=exc.message)
        except _ServerGone:
            return None

    async def _call_local(self, svc: Service, service: str, payload: bytes,
                          headers: dict[str, str] | None, share: float, use: int) -> Message:
        cid = next(self._ids)
        fut: asyncio.Future[_wire.Reply] = asyncio.get_running_loop().create_future()
        def reply(rep: _wire.Reply) -> None:
            if not fut.done():
                fut.set_result(rep)

        self._pending[cid] = (fut, None)
        svc.outstanding += 1
        svc.last_used = use
        self._stats.services["received"].add(service)  # (served here: no frame to count it)
        try:
            svc.submit(Message(service, payload, self._name, self._node_id, cid, time.time(),
                               headers), reply)
            async with asyncio.timeout(share):
                rep = await fut
        except TimeoutError:
            raise RequestTimeout(f"request to {quoted(service)} on this node", share) from None
        finally:
            self._pending.pop(cid, None)
            svc.outstanding -= 1
        return self._result(service, rep, self._name, self._node_id)

    def _result(self, service: str, reply: _wire.Reply, name: str, source: str) -> Message:
        if reply.status == _wire.REPLY_OK:
            return Message(service, reply.payload, name, source, reply.id, reply.ts,
                           reply.headers)
        if reply.status == _wire.REPLY_ERROR:
            self._stats["remote_errors"] += 1
            self._stats.services["remote_errors"].add(service)
            raise RemoteError(service, reply.error)
        if reply.status in (_wire.REPLY_NOT_SERVED, _wire.REPLY_BUSY):
            raise _ServerGone(f"{name} declined ({reply.status})")
        raise RemoteError(service, f"unknown reply status {reply.status}")

    def _choose(self, service: str, tried: Iterable[str]) -> Service | PeerRecord | None:
        """The best server: untried, alive, connected, least outstanding, least recently used."""
        return self._best(service, tried)[0]

    def _best(self, service: str, tried: Iterable[str]
              ) -> tuple[Service | PeerRecord | None, int]:
        """`_choose`'s server, and how many servers of `service` none of `tried` went to:
        an attempt shares the time left only with those (a slow server is not asked again
        just because the request has attempts to spare)."""
        best: Service | PeerRecord | None = None
        best_key: tuple[bool, bool, bool, int, int] | None = None
        untried = 0
        local = self._local.get(service)
        if local is not None:
            again = "" in tried
            untried += not again
            best, best_key = local, (again, False, False, local.outstanding, local.last_used)
        for rec in self._peers.records():
            if rec.state is PeerState.LOST or not rec.rtr or service not in rec.services:
                continue
            link = self._links.get(rec.id)
            again = rec.id in tried
            untried += not again
            key = (again, rec.state is not PeerState.ALIVE,
                   link is not None and not link.up,
                   len(link.outstanding) if link is not None else 0,
                   link.last_used if link is not None else 0)
            if best_key is None or key < best_key:
                best, best_key = rec, key
        return best, untried

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError("node closed while the request was in flight")

    def _open_link(self, rec: PeerRecord) -> _Link:
        self._check_open()  # (no socket of a closed node's context, nor one left open)
        def make_dealer(link: _Link) -> ServiceDealer:
            return ServiceDealer(self._ctx, rec.rtr,
                                 functools.partial(self._on_replies, link),
                                 hwm=self._hwm, max_message_size=self._max_wire)

        link = self._links[rec.id] = _Link(rec, make_dealer)
        link.tasks = [asyncio.get_running_loop().create_task(self._watch(link),
                                                             name="zeromesh-service-link")]
        return link

    def _on_replies(self, link: _Link, batch: list[list[bytes]]) -> None:
        pending = self._pending
        for _, reply in _wire.service_messages(batch, 1, _wire.Reply, self._max_wire,
                                               self._drop):
            entry = pending.get(reply.id)
            if entry is None or entry[1] is not link or entry[0].done():
                self._stats["late_replies"] += 1  # its request timed out or failed over
                continue
            entry[0].set_result(reply)

    def _drop(self, reason: str) -> None:
        self._quiet.drop("service", reason)

    async def _watch(self, link: _Link) -> None:
        connected = False  # the current DEALER completed a handshake
        while True:
            try:
                events = await link.dealer.connection_events()
            except SocketClosed:
                return
            for up in events:
                link.up = up
                connected = connected or up
                if not up:
                    _log.debug("service connection to %s dropped", link.peer.name)
                    self._fail_over(link, "connection to the server dropped")
            if not link.up and connected:  # (one that never connected is not renewed: no churn)
                connected = False
                link.renew()
