"""AsyncNode: one mesh node, composing discovery, membership and the messaging patterns.

All sockets belong to the node's event loop. The node owns the lifecycle
(bind, announce, goodbye, release), the peer view and waiting on it; each
pattern lives in its own component (`_pubsub`, ...), which the node wires to
membership: peers' announcements reach the components, and the components'
interest (subscriptions, queues, services) goes into our hello.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections import Counter
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any, Self

from discovery import DiscoveryBackend, MdnsDiscovery, PeerInfo, StaticDiscovery
from patterns import Context

from . import _wire
from ._config import NodeConfig
from ._durable import KnownDurables, durable_queue
from ._events import PeerEvents
from ._identity import load_or_create_id
from ._locking import DataDirLock
from ._membership import Membership
from ._message import Message
from ._peers import Peer, PeerEvent, PeerEventKind, PeerRecord, PeerState
from ._pubsub import PubSub, checked_topic_key, parse_pattern
from ._quiet import QuietLog
from ._reliable import Outbox, open_spools
from ._services import DEFAULT_CONCURRENCY, Service, ServiceHandler, Services
from ._subscription import DEFAULT_MAX_PENDING, Callback, Subscription
from ._worker import Handler, Pull
from ._workqueue import DEFAULT_PREFETCH, WorkQueues, checked_queue_key
from .errors import ClosedError, ConfigError, RequestTimeout

_log = logging.getLogger("mesh.node")


class AsyncNode:
    """A zeromesh node on asyncio. Use ``async with AsyncNode(...) as node:``.

    Args:
        config: Complete settings; when omitted they come from ``ZEROMESH_*``
            environment variables and the keyword arguments.
        **settings: Any `NodeConfig` field (``name``, ``mesh``, ``interfaces``,
            ``peers``, ``data_dir``, ``heartbeat_interval``, ``lost_after``...).

    Raises:
        ConfigError: a setting is invalid.
    """

    def __init__(self, config: NodeConfig | None = None, **settings: Any) -> None:
        if config is None:
            config = NodeConfig.from_env(**settings)
        elif settings:
            config = NodeConfig.from_env({}, **{**_struct_items(config), **settings})
        self._config = config.validated()
        self._id = ""
        self._incarnation = 0
        self._interest_version = 0
        self._ctx: Context | None = None
        self._membership: Membership | None = None
        self._pubsub: PubSub | None = None
        self._services: Services | None = None
        self._work: WorkQueues | None = None
        self._outbox: Outbox | None = None
        self._durables = KnownDurables(self._config.data_dir)
        self._lock: DataDirLock | None = None
        self._my_durables: dict[str, str] = {}
        self._discovery: list[DiscoveryBackend] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._ctl_endpoints: list[str] = []
        self._running = False
        self._quiet = QuietLog()
        self._watchers: set[asyncio.Future[None]] = set()
        self._event_streams: set[PeerEvents] = set()
        self.stats: Counter[str] = Counter(published=0, received=0, dropped=0)
        """Message counts: published, received, dropped (gaps seen from publishers)."""

    # -- identity ----------------------------------------------------------------

    @property
    def id(self) -> str:
        """Stable node id (32 hex chars); kept in the data dir across restarts."""
        return self._id

    @property
    def name(self) -> str:
        return self._config.name

    @property
    def mesh(self) -> str:
        return self._config.mesh

    @property
    def config(self) -> NodeConfig:
        return self._config

    @property
    def endpoints(self) -> dict[str, list[str]]:
        """Bound endpoints by role: ``ctl`` (control, for ``--peer``) and ``pub``."""
        pub = self._pubsub.endpoints if self._pubsub is not None else []
        rtr = self._services.endpoints if self._services is not None else []
        return {"ctl": list(self._ctl_endpoints), "pub": list(pub), "rtr": list(rtr)}

    @property
    def dropped_by_peer(self) -> Mapping[str, int]:
        """Pub/sub messages publishers dropped for us at their high-water mark, by peer id."""
        return dict(self._pubsub.dropped_by_peer) if self._pubsub is not None else {}

    @property
    def dropped_input(self) -> Mapping[str, int]:
        """Malformed or foreign input dropped, by reason."""
        return dict(self._quiet.dropped)

    # -- lifecycle ---------------------------------------------------------------

    async def start(self) -> None:
        """Bind, announce and start talking to peers.

        Raises:
            ConfigError: the data dir or an interface cannot be used.
        """
        if self._running:
            return
        cfg = self._config
        self._id = load_or_create_id(cfg.data_dir)
        self._incarnation = time.time_ns()
        dedup = None
        if cfg.data_dir is not None:
            self._lock = DataDirLock(cfg.data_dir)
            self._lock.acquire()
            try:
                self._outbox, dedup = await open_spools(cfg.data_dir, cfg, self.stats)
            except BaseException:
                self._lock.release()
                raise
            self._outbox.on_change = self._changed
            self._durables.load()
        ctx = self._ctx = Context()
        try:
            self._membership = Membership(
                ctx, me=self._hello, mesh=cfg.mesh,
                heartbeat_interval=cfg.heartbeat_interval, suspect_after=cfg.suspect_after,
                lost_after=cfg.lost_after, on_event=self._on_peer_event,
                on_connect=self._on_peer_connect, on_disconnect=self._on_peer_disconnect,
                on_change=self._changed, quiet=self._quiet,
                on_update=self._on_peer_update, on_message=self._on_control,
                on_beat=self._on_beat)
            # One sequence for everything this node sends; starting at the clock in
            # microseconds keeps (node id, seq) unique across restarts, which the
            # receivers' deduplication relies on.
            next_seq = itertools.count(time.time_ns() // 1000).__next__
            self._pubsub = PubSub(ctx, cfg, self._quiet, self.stats,
                                  on_subs_changed=self._interest_changed,
                                  on_ready_changed=self._changed, next_seq=next_seq)
            self._work = WorkQueues(ctx, cfg, self._quiet, self.stats,
                                    alive_peers=self._alive,
                                    send_control=self._membership.send_to,
                                    on_interest_changed=self._interest_changed,
                                    next_seq=next_seq, outbox=self._outbox, dedup=dedup)
            self._ctl_endpoints = self._membership.bind(cfg.interfaces, cfg.port)
            self._pubsub.bind(cfg.interfaces)
            self._services = Services(ctx, cfg, self._quiet, self.stats,
                                      peers=self._membership.table.records, wait=self._wait,
                                      on_services_changed=self._interest_changed)
            self._services.bind(cfg.interfaces)
            self._work.bind(cfg.interfaces)
        except Exception as exc:
            await self._teardown()
            if isinstance(exc, ConfigError):
                raise
            raise ConfigError("interfaces", f"cannot bind: {exc}") from exc
        self._running = True
        self._tasks = [asyncio.get_running_loop().create_task(self._membership.run(),
                                                              name="zeromesh-control"),
                       *self._pubsub.start(self._id),
                       *self._services.start(self._id),
                       *self._work.start(self._id, cfg.name)]
        if cfg.peers:
            self._discovery.append(StaticDiscovery(cfg.peers, mesh=cfg.mesh))
        if cfg.mdns:
            self._discovery.append(MdnsDiscovery(cfg.interfaces, mesh=cfg.mesh))
        for backend in self._discovery:
            await backend.start(self._peer_info(), self._membership.on_discovery)
        _log.info("node %s (%s) up in mesh %s: ctl %s", cfg.name, self._id[:8], cfg.mesh,
                  ",".join(self._ctl_endpoints))

    async def aclose(self) -> None:
        """Say goodbye to peers and mDNS, then release every socket."""
        if not self._running:
            return
        self._running = False
        if self._pubsub is not None:
            self._pubsub.flush(self.name)
        await self._cancel_tasks()  # no heartbeat may follow the goodbye
        if self._work is not None:
            self._work.prepare_leave()  # final credits travel before the goodbye
        if self._membership is not None:
            self._membership.say_goodbye(self._id)
        for backend in self._discovery:
            try:
                await backend.aclose()
            except Exception:
                _log.exception("discovery backend failed to close")
        self._discovery.clear()
        await self._teardown()

    async def _cancel_tasks(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()

    async def _teardown(self) -> None:
        await self._cancel_tasks()
        if self._services is not None:
            await self._services.aclose()
        for stream in self._event_streams:
            stream._close()
        self._changed()
        if self._membership is not None:
            self._membership.close()
        if self._pubsub is not None:
            self._pubsub.close()
        if self._work is not None:
            self._work.close()
        if self._ctx is not None:
            await asyncio.to_thread(self._ctx.close)  # blocks while the last batches leave
            self._ctx = None
        if self._outbox is not None:
            await self._outbox.aclose()
            self._outbox = None
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.aclose()

    # -- peers -------------------------------------------------------------------

    def peers(self) -> list[Peer]:
        """Known peers (never this node), with their liveness state."""
        if self._membership is None:
            return []
        return self._membership.table.snapshot()

    def events(self) -> PeerEvents:
        """A stream of peer events (joined, left, lost) from now on."""
        stream = PeerEvents(self._event_streams.discard)
        self._event_streams.add(stream)
        return stream

    async def wait_for_peers(self, count: int, *, timeout: float = 10.0) -> list[Peer]:
        """Wait until at least `count` peers are alive.

        Raises:
            RequestTimeout: fewer were alive when the timeout came.
        """
        await self._wait(lambda: len(self._alive()) >= count, timeout,
                         f"waiting for {count} peers")
        return [r.snapshot() for r in self._alive()]

    def _alive(self) -> list[PeerRecord]:
        if self._membership is None:
            return []
        return [r for r in self._membership.table.records() if r.state is PeerState.ALIVE]

    async def _wait(self, ready: Callable[[], bool], timeout: float, what: str) -> None:
        self._check_running()
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                while not ready():
                    self._check_running()
                    fut = loop.create_future()
                    self._watchers.add(fut)
                    try:
                        await fut
                    finally:
                        self._watchers.discard(fut)
        except TimeoutError as exc:
            raise RequestTimeout(what, timeout) from exc

    def _changed(self) -> None:
        if self._work is not None:
            self._work.peers_changed()
        for fut in self._watchers:
            if not fut.done():
                fut.set_result(None)

    def _on_peer_event(self, event: PeerEvent) -> None:
        _log.info("peer %s (%s) %s", event.peer.name, event.peer.id[:8], event.kind.value)
        for stream in self._event_streams:
            stream._deliver(event)
        if event.kind is PeerEventKind.LOST and self._services is not None:
            self._services.peer_lost(event.peer.id)  # fail its requests over now
        if event.kind is PeerEventKind.LOST and self._work is not None:
            self._work.peer_gone(event.peer.id, graceful=False)

    def _on_peer_connect(self, new: PeerRecord, old: PeerRecord | None) -> None:
        if self._pubsub is not None:
            self._pubsub.peer_connected(new, old)
        self._learn_durables(new)
        if old is not None and old.incarnation != new.incarnation and self._work is not None:
            self._work.peer_gone(old.id, graceful=False)  # restarted: its old pipe is dead
        if self._services is not None:
            self._services.peer_connected(new, old)

    def _on_peer_disconnect(self, rec: PeerRecord) -> None:
        if self._pubsub is not None:
            self._pubsub.peer_gone(rec)
        if self._services is not None:
            self._services.peer_gone(rec)
        if self._work is not None:
            self._work.peer_gone(rec.id, graceful=True)

    def _on_beat(self) -> None:
        if self._work is not None:
            self._work.tick()

    def _learn_durables(self, rec: PeerRecord) -> None:
        if rec.durables and self._durables.learn(rec.durables):
            self._changed()

    def _on_peer_update(self, rec: PeerRecord) -> None:
        self._learn_durables(rec)
        if self._work is not None:
            self._work.peer_updated(rec)

    def _on_control(self, msg: _wire.Control) -> None:
        if self._work is None:
            return
        if isinstance(msg, _wire.Credit):
            self._work.on_credit(msg)
        elif isinstance(msg, _wire.Nack):
            self._work.on_nack(msg)

    def _interest_changed(self) -> None:
        """Our subscriptions (or queues, services) changed: tell everyone."""
        self._interest_version += 1
        if self._pubsub is not None:
            self._pubsub.interest_changed(self._interest_version)
        if self._membership is not None:
            self._membership.broadcast_hello()

    def _hello(self, reply: bool) -> _wire.Hello:
        pubsub, work = self._pubsub, self._work
        return _wire.Hello(self._id, self.name, self.mesh, self._incarnation,
                           self._ctl_endpoints, pubsub.endpoints if pubsub else [],
                           pubsub.patterns if pubsub else [], self._interest_version, reply,
                           pull=work.endpoints if work else [],
                           queues=work.queues if work else {},
                           rtr=self._services.endpoints if self._services else [],
                           services=self._services.names if self._services else [],
                           durables=self._my_durables)

    def _peer_info(self) -> PeerInfo:
        return PeerInfo(id=self._id, name=self.name, mesh=self.mesh,
                        version=_wire.PROTOCOL_VERSION, endpoints=tuple(self._ctl_endpoints))

    def _check_running(self) -> None:
        if not self._running:
            raise ClosedError("node is not running (use `async with` or `await start()`)")

    # -- pub/sub -----------------------------------------------------------------

    async def publish(self, topic: str, data: bytes | str, *,
                      headers: Mapping[str, str] | None = None, reliable: bool = False) -> None:
        """Publish to every matching subscriber in the mesh (and on this node).

        Best effort: returns as soon as the message is queued; it leaves at the
        end of this loop iteration. ``reliable=True`` (needs a data dir): also
        returns only once the message is in this node's spool for every
        durable subscription it matches, each of which gets it at least once,
        online or not, across restarts of either side.

        Raises:
            ConfigError: `topic` is invalid.
            MessageTooLarge: `data` exceeds ``max_message_size``.
            SpoolFullError: (reliable) the spool quota or the disk is full.
            ClosedError: the node is not running.
        """
        if not reliable:
            if self.publish_nowait(topic, data, headers=headers):
                await asyncio.sleep(0)  # a large batch just left: let readers and timers run
            return
        if self._outbox is None:
            raise ConfigError("reliable", "needs a data dir (the spool lives there)")
        if not self._running or self._pubsub is None or self._work is None:
            raise ClosedError("node is not running (use `async with` or `await start()`)")
        item = self._pubsub.publish(topic, data, headers, self._config.name, reliable=True)
        assert item is not None
        dests = self._durables.matching(topic)
        if dests:
            tracked = await self._outbox.spool_publish(topic, item, dests)
            for dest in dests:
                self._work.requeue(dest, (item, tracked))

    def publish_nowait(self, topic: str, data: bytes | str, *,
                       headers: Mapping[str, str] | None = None) -> bool:
        """Best-effort `publish` without the await, for use on the loop; True when it
        flushed a batch (a good moment to yield)."""
        if not self._running or self._pubsub is None:
            raise ClosedError("node is not running (use `async with` or `await start()`)")
        return self._pubsub.publish(topic, data, headers, self._config.name) is not None

    async def subscribe(self, pattern: str, *, callback: Callback | None = None,
                        max_pending: int = DEFAULT_MAX_PENDING) -> Subscription:
        """Receive messages on topics matching `pattern` (``*`` one segment, ``>`` the rest).

        With `callback`, each message is passed to it on the loop instead of
        being queued for iteration. `max_pending` bounds the queue (0 = no bound).

        Raises:
            ConfigError: `pattern` is invalid.
            ClosedError: the node is not running.
        """
        self._check_running()
        assert self._pubsub is not None
        return self._pubsub.subscribe(pattern, callback, max_pending)

    async def replay_dead_letters(self, ids: set[int] | None = None) -> int:
        """Give dead letters (all, or those spool `ids`) a new round of delivery attempts.

        Returns:
            How many went back into the outbox.

        Raises:
            ConfigError: the node has no data dir.
        """
        self._check_running()
        if self._outbox is None or self._work is None:
            raise ConfigError("data_dir", "dead letters live in a data dir; none is set")
        return await self._outbox.replay(ids, self._work.requeue)

    @property
    def spool_pending(self) -> int:
        """Reliable messages in this node's spool not yet delivered everywhere."""
        return len(self._outbox.store) if self._outbox is not None else 0

    async def wait_for_spool(self, *, timeout: float = 10.0) -> None:
        """Wait until every spooled message has been delivered (and acknowledged).

        Raises:
            RequestTimeout: some were still pending when the timeout came.
        """
        await self._wait(lambda: self.spool_pending == 0, timeout, "waiting for the spool")

    async def wait_for_durables(self, topic: str, count: int = 1, *,
                                timeout: float = 10.0) -> None:
        """Wait until this node knows `count` durable subscriptions matching `topic`
        (from then on its reliable publishes are spooled for them, online or not).

        Raises:
            RequestTimeout: fewer were known when the timeout came.
        """
        checked_topic_key(topic)
        await self._wait(lambda: len(self._durables.matching(topic)) >= count, timeout,
                         f"waiting for {count} durable subscriptions of {topic!r}")

    async def subscribe_durable(self, pattern: str, name: str, *,
                                prefetch: int = DEFAULT_PREFETCH) -> Pull:
        """A durable subscription: kept in this node's data dir under `name`.

        Publishers that have seen it spool every reliable message matching
        `pattern` for it, online or not; restarting with the same data dir and
        name resumes it. Best-effort messages arrive too while it runs.
        Acknowledge with ``msg.ack()`` (or implicitly by asking for the next).

        Raises:
            ConfigError: `pattern` or `name` is invalid, or there is no data dir.
            ClosedError: the node is not running.
        """
        self._check_running()
        assert self._pubsub is not None and self._work is not None
        if self._outbox is None:
            raise ConfigError("durable", "needs a data dir (its state lives there)")
        if not name or "." in name:
            raise ConfigError("durable", f"{name!r}: use a single name segment")
        queue = durable_queue(self._id, name)
        checked_queue_key(queue)
        parse_pattern(pattern)
        self._my_durables[queue] = pattern
        self._durables.learn({queue: pattern})
        pull = self._work.pull(queue, prefetch, None)
        local = self._work.workers.local[queue]

        def live(msg: Message) -> None:
            if not msg.reliable:  # reliable ones come through the durable queue instead
                local.put(((msg, _UNTRACKED),))

        sub = self._pubsub.subscribe(pattern, live, 0)
        pull.on_closed(sub.aclose)
        return pull

    async def wait_for_subscribers(self, topic: str, count: int = 1, *,
                                   timeout: float = 10.0) -> None:
        """Wait until `count` peers subscribed to `topic` are connected and ready.

        Once this returns, a message published on `topic` reaches those peers
        (no slow-joiner loss).

        Raises:
            ConfigError: `topic` is not a valid topic.
            RequestTimeout: fewer were ready when the timeout came.
        """
        checked_topic_key(topic)
        await self._wait(lambda: self.subscriber_count(topic) >= count, timeout,
                         f"waiting for {count} subscribers of {topic!r}")

    async def wait_for_known_subscribers(self, topic: str, *, timeout: float = 10.0) -> int:
        """Wait until every alive peer known to subscribe to `topic` is ready; return how many.

        Raises:
            RequestTimeout: some were still not ready when the timeout came.
        """
        checked_topic_key(topic)
        await self._wait(lambda: self.subscriber_count(topic) >= self._known_count(topic),
                         timeout, f"waiting for the subscribers of {topic!r}")
        return self.subscriber_count(topic)

    def _known_count(self, topic: str) -> int:
        return sum(1 for rec in self._alive() if any(p.matches(topic) for p in rec.subs))

    def subscriber_count(self, topic: str) -> int:
        """Peers whose subscriptions matching `topic` are in force at our publisher."""
        pubsub = self._pubsub
        if pubsub is None:
            return 0
        return sum(1 for rec in self._alive()
                   if pubsub.is_ready(rec) and any(p.matches(topic) for p in rec.subs))

    def check_topic(self, topic: str) -> None:
        """Validate a topic name.

        Raises:
            ConfigError: it is not a valid topic.
        """
        checked_topic_key(topic)


    # -- work queues -------------------------------------------------------------

    async def push(self, queue: str, data: bytes | str, *,
                   headers: Mapping[str, str] | None = None, timeout: float = 10.0,
                   reliable: bool = False) -> None:
        """Hand a message to exactly one live worker of `queue`, anywhere in the mesh.

        Best effort: returns once a worker with free credit was chosen; waits
        (up to `timeout`) while every worker is busy, so it never drops.
        ``reliable=True``: returns once the message is in this node's spool
        (needs a data dir); it is delivered at least once, whenever a worker
        is there, also after restarts.

        Raises:
            ConfigError: `queue` is invalid.
            MessageTooLarge: `data` exceeds ``max_message_size``.
            NoRespondersError: no worker of `queue` appeared within `timeout`.
            RequestTimeout: workers exist but none had credit within `timeout`.
            SpoolFullError: (reliable) the spool quota or the disk is full.
            ClosedError: the node is not running.
        """
        self._check_running()
        assert self._work is not None
        await self._work.push(queue, data, headers, timeout, lambda: not self._running,
                              reliable)

    async def pull(self, queue: str, *, prefetch: int = DEFAULT_PREFETCH,
                   handler: Handler | None = None) -> Pull:
        """Become a worker of `queue`: iterate the result, or pass `handler`.

        `prefetch` is how many of each pusher's messages this node holds
        unprocessed; small values follow speed differences more closely.

        Raises:
            ConfigError: `queue` or `prefetch` is invalid.
            ClosedError: the node is not running.
        """
        self._check_running()
        assert self._work is not None
        return self._work.pull(queue, prefetch, handler)

    async def wait_for_workers(self, queue: str, count: int = 1, *,
                               timeout: float = 10.0) -> None:
        """Wait until `count` workers of `queue` (this node included) are alive.

        Raises:
            ConfigError: `queue` is invalid.
            RequestTimeout: fewer were there when the timeout came.
        """
        checked_queue_key(queue)
        await self._wait(lambda: self.worker_count(queue) >= count, timeout,
                         f"waiting for {count} workers of {queue!r}")

    def check_queue(self, queue: str) -> None:
        """Validate a queue name.

        Raises:
            ConfigError: it is not a valid queue name.
        """
        checked_queue_key(queue)

    def worker_count(self, queue: str) -> int:
        """Live workers of `queue` known to this node (itself included)."""
        return self._work.worker_count(queue) if self._work is not None else 0

    # -- services ----------------------------------------------------------------

    async def serve(self, service: str, handler: ServiceHandler, *,
                    concurrency: int = DEFAULT_CONCURRENCY) -> Service:
        """Answer requests to `service`: `handler` gets each request and returns the reply.

        The handler takes a `Message` (``data``, ``headers``, ``source``...) and
        returns the reply body (bytes or str; None = empty). A plain function
        runs inline on the event loop, so it must not block (the blocking
        `Node` runs it in a worker thread instead); a coroutine function runs
        up to `concurrency` requests at once. If it raises, the requester gets
        `RemoteError` with the exception's text and this node keeps serving.
        Stop with ``await service.aclose()`` (or ``async with``).

        Raises:
            ConfigError: `service` is invalid, already served here, or
                `concurrency` < 1.
            ClosedError: the node is not running.
        """
        self._check_running()
        assert self._services is not None
        return self._services.serve(service, handler, concurrency)

    async def request(self, service: str, data: bytes | str, *, timeout: float = 5.0,
                      retries: int = 2, headers: Mapping[str, str] | None = None) -> Message:
        """Send a request to one live server of `service` and return its reply.

        Servers are load balanced (least outstanding, then round robin); this
        node serves its own services without the network. A timed-out attempt
        is retried on another server when there is one, up to `retries` times
        with a short jittered backoff; a server that dies or leaves fails its
        requests over at once. `timeout` covers finding a server and every
        attempt. A request can run twice if its server dies after handling it.

        Returns:
            The reply: ``data`` is the body, ``source`` the server's name.

        Raises:
            ConfigError: `service`, `timeout` or `retries` is invalid.
            MessageTooLarge: `data` exceeds ``max_message_size`` (nothing sent).
            NoRespondersError: no live server (after a short discovery grace
                right after start), or every server went away.
            RequestTimeout: no reply within `timeout`.
            RemoteError: the server's handler raised.
            ClosedError: the node is not running or closed meanwhile.
        """
        self._check_running()
        assert self._services is not None
        return await self._services.request(service, data, timeout=timeout, retries=retries,
                                            headers=headers)

    async def wait_for_service(self, service: str, *, timeout: float = 10.0) -> None:
        """Wait until a live server of `service` (this node included) is known.

        Raises:
            ConfigError: `service` is invalid.
            RequestTimeout: none appeared within the timeout.
        """
        self._check_running()
        services = self._services
        assert services is not None
        services.check_name(service)
        await self._wait(lambda: services.has_server(service), timeout,
                         f"waiting for a server of {service!r}")

    def check_service(self, service: str) -> None:
        """Validate a service name (the rules of topic names).

        Raises:
            ConfigError: it is not a valid service name.
        """
        Services.check_name(service)


class _Untracked:
    """Settles nothing: a best-effort message in a durable subscription."""

    def settle(self, msg: Message, ok: bool) -> None:
        pass


_UNTRACKED = _Untracked()


def _struct_items(config: NodeConfig) -> dict[str, Any]:
    return {f: getattr(config, f) for f in config.__struct_fields__}
