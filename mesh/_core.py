"""NodeCore: what every node is before any pattern: identity, lifecycle, peers, wiring.

It binds and announces, says goodbye, keeps the peer view and lets callers
wait on it; it builds each pattern component (`_pubsub`, `_workqueue`,
`_services`, the spool in `_reliable`) and wires them to membership: peers'
announcements reach the components, and the components' interest
(subscriptions, queues, services, durables) goes into our hello. The public
pattern methods live on `AsyncNode` (`_node`).
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
from patterns import Context, Curve, KeyFileError, load_allowlist, load_secret

from . import _wire
from ._config import NodeConfig
from ._membership._control import Membership
from ._membership._events import PeerEvents
from ._membership._identity import load_or_create_id
from ._membership._peers import Peer, PeerEvent, PeerEventKind, PeerRecord, PeerState
from ._pubsub._engine import CACHE_LIMIT, PubSub
from ._reliable._durables import KnownDurables
from ._reliable._outbox import Outbox, open_spools
from ._services._services import Services
from ._spool._lock import DataDirLock
from ._support._quiet import QuietLog
from ._support._tally import Traffic
from ._work._queues import WorkQueues
from .errors import ClosedError, ConfigError, RequestTimeout

_log = logging.getLogger("mesh.node")


class NodeCore:
    """Lifecycle, identity and the peer view of one node (see `AsyncNode`)."""


    def __init__(self, config: NodeConfig | None = None, **settings: Any) -> None:
        if config is None:
            config = NodeConfig.from_env(**settings)
        elif settings:
            config = NodeConfig.from_env({}, **{**_struct_items(config), **settings})
        self._config = config.validated()
        self._id = ""
        self._incarnation = 0
        self._interest_version = 0
        self._next_seq: Callable[[], int] = lambda: 0
        self._curve: Curve | None = None
        self._ctx: Context | None = None
        self._membership: Membership | None = None
        self._pubsub: PubSub | None = None
        self._services: Services | None = None
        self._work: WorkQueues | None = None
        self._outbox: Outbox | None = None
        self._durables = KnownDurables(self._config.data_dir)
        self._lock: DataDirLock | None = None
        self._my_durables: dict[str, str] = {}
        self._reliable_copies: dict[str, bool] = {}
        """Per topic: does any peer want reliable messages by pub/sub (see
        `_wants_reliable_copies`)? Cleared whenever peers or their interest change."""
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
    def running(self) -> bool:
        """Started and not yet closed."""
        return self._running

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
        """Malformed or foreign input dropped, by reason (mDNS reasons prefixed ``mdns_``)."""
        return self._dropped_input()

    # -- lifecycle ---------------------------------------------------------------

    async def start(self) -> None:
        """Bind, announce and start talking to peers.

        Raises:
            ConfigError: the data dir or an interface cannot be used.
        """
        if self._running:
            return
        cfg = self._config
        self._curve = _load_curve(cfg)
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
            self._outbox.on_change = self._wake_watchers
            self._durables.load()
        ctx = self._ctx = Context(self._curve)
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
            next_seq = self._next_seq = itertools.count(time.time_ns() // 1000).__next__
            self._pubsub = PubSub(ctx, cfg, self._quiet, self.stats,
                                  on_subs_changed=self._interest_changed,
                                  on_ready_changed=self._changed, next_seq=next_seq,
                                  reliable_wanted=self._wants_reliable_copies)
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

    def traffic(self) -> Traffic:
        """Counters for monitoring: node-wide totals plus per-topic and per-peer tallies
        (peers by id; at most 1000 names each, the rest under ``_other``)."""
        pubsub, outbox = self._pubsub, self._outbox
        return Traffic(
            totals=dict(self.stats),
            published_by_topic=dict(pubsub.published_by_topic) if pubsub else {},
            delivered_by_topic=dict(pubsub.delivered_by_topic) if pubsub else {},
            received_by_peer=dict(pubsub.received_by_peer) if pubsub else {},
            dropped_by_peer=dict(pubsub.dropped_by_peer) if pubsub else {},
            spool_messages=len(outbox.store) if outbox else 0,
            spool_bytes=outbox.store.used_bytes if outbox else 0,
            dead_letters=len(outbox.dead) if outbox else 0,
            input_dropped=self._dropped_input(),
            curve_refused=sum(self._curve.denied.values()) if self._curve else 0,
        )

    def _dropped_input(self) -> dict[str, int]:
        """Everything dropped unharmed, by reason; discovery's reasons prefixed ``mdns_``."""
        dropped = dict(self._quiet.dropped)
        for backend in self._discovery:
            for reason, n in getattr(backend, "dropped", {}).items():
                dropped[f"mdns_{reason}"] = dropped.get(f"mdns_{reason}", 0) + n
        return dropped

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
        """Peers or their interest changed: recompute routes, wake whoever waits."""
        self._reliable_copies.clear()
        if self._work is not None:
            self._work.peers_changed()
        self._wake_watchers()

    def _wants_reliable_copies(self, topic: str) -> bool:
        """Does a peer subscribe to `topic` other than for a durable's live view (which
        takes best-effort messages only)? If not, reliable messages on it need not go
        out by pub/sub at all: the durables' queues carry them."""
        wanted = self._reliable_copies.get(topic)
        if wanted is None:
            if len(self._reliable_copies) >= CACHE_LIMIT:
                self._reliable_copies.clear()
            records = self._membership.table.records() if self._membership else []
            wanted = self._reliable_copies[topic] = any(
                p.pattern not in rec.feeds and p.matches(topic)
                for rec in records for p in rec.subs)
        return wanted

    def _wake_watchers(self) -> None:
        """Something a `_wait` may be waiting on changed (cheap: no routing work)."""
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
                           durables=self._my_durables,
                           key=self._curve.public.decode() if self._curve else "",
                           feeds=pubsub.feeds if pubsub else [])

    def _peer_info(self) -> PeerInfo:
        return PeerInfo(id=self._id, name=self.name, mesh=self.mesh,
                        version=_wire.PROTOCOL_VERSION, endpoints=tuple(self._ctl_endpoints),
                        key=self._curve.public.decode() if self._curve else "")

    def _check_running(self) -> None:
        if not self._running:
            raise ClosedError("node is not running (use `async with` or `await start()`)")


def _struct_items(config: NodeConfig) -> dict[str, Any]:
    return {f: getattr(config, f) for f in config.__struct_fields__}


def _load_curve(cfg: NodeConfig) -> Curve | None:
    """The node's CURVE identity and allowlist, if it is configured secure.

    Raises:
        ConfigError: a key file or the allowlist cannot be used.
    """
    if cfg.secret_key is None or cfg.allow is None:
        return None
    try:
        public, secret = load_secret(cfg.secret_key)
    except KeyFileError as exc:
        raise ConfigError("secret_key", str(exc)) from None
    try:
        allowed = load_allowlist(cfg.allow)
    except KeyFileError as exc:
        raise ConfigError("allow", str(exc)) from None
    return Curve(public, secret, allowed)
