"""NodeCore: what every node is before any pattern: identity, lifecycle, peers, wiring.

`start` builds the node's parts — membership, pub/sub, work queues, services,
the spool — each with the typed collaborators it needs (`_parts`,
`_membership._listener`), inside one `AsyncExitStack`: every step that
acquires something (the data-dir lock, the spool, the ZeroMQ context, each
socket, each task, each discovery backend) registers its undo at once, so a
failure at any step unwinds exactly what was started and re-raises a clear
error. `aclose` says goodbye, then unwinds the same stack. The running parts
live in one `_Running` value that exists only between the two: nothing is
half-built or `None` while the node runs.

The public pattern methods live on `AsyncNode` (`_node`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import ipaddress
import itertools
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final, Self

from discovery import (
    DiscoveryBackend,
    DiscoveryError,
    MdnsDiscovery,
    PeerInfo,
    StaticDiscovery,
)
from patterns import Context, Curve, KeyFileError, load_allowlist, load_secret

from . import _names, _trace, _wire
from ._config import NodeConfig
from ._figures._mesh import MeshFigures
from ._figures._own import OwnFigures
from ._figures._report import Report
from ._membership._control import Membership
from ._membership._events import EventStreams, PeerEvents
from ._membership._hello import Announcement, Identity
from ._membership._identity import load_or_create_id
from ._membership._peers import Peer, PeerRecord, PeerState
from ._memory._history import History
from ._memory._recall import Recall
from ._memory._replay import HistoryReplay
from ._memory._retained import RetainedStore
from ._memory._snapshot import RetainedValues
from ._pubsub._engine import PubSub
from ._reliable._durables import (
    KnownDurables,
    durable_queue,
    log_ended,
    log_expired,
    log_forgotten,
)
from ._reliable._outbox import Outbox, open_spools
from ._services._requests import Requests
from ._services._serving import Serving
from ._spool._lock import DataDirLock
from ._support._quiet import QuietLog
from ._support._tally import Stats, Traffic
from ._support._tasks import TaskSet
from ._support._text import quoted
from ._support._watch import Watchers
from ._work._queues import WorkQueues
from .errors import ClosedError, ConfigError

_log = logging.getLogger("mesh.node")
_OWED_CREDITS_WAIT: Final[float] = 0.5
"""At most this long, at close, for the greeting of a pusher that sent us work first."""
_HANDLER_GRACE: Final[float] = 2.0
"""At most this long, at close, for a work handler to finish its message (as a service
handler gets): its ack or nack then goes with the final credits."""


def _take_seqs(seqs: itertools.count[int], n: int) -> int:
    """`n` consecutive numbers of the node's one sequence, the first returned: a work
    run numbers its messages contiguously from it (no call per message)."""
    first = next(seqs)
    if n > 1:
        collections.deque(itertools.islice(seqs, n - 1), maxlen=0)  # skipped in C
    return first


@dataclass(frozen=True, slots=True)
class _Running:
    """The parts of a running node; exists from a successful `start` to `aclose`."""

    identity: Identity
    curve: Curve | None
    ctx: Context
    membership: Membership
    pubsub: PubSub
    work: WorkQueues
    serving: Serving
    requests: Requests
    retained: RetainedValues
    history: HistoryReplay
    outbox: Outbox | None
    """The spool's sending side; None when the node has no data dir."""
    figures: MeshFigures
    discovery: tuple[DiscoveryBackend, ...]
    tasks: TaskSet
    stack: contextlib.AsyncExitStack
    """Undoes everything `start` did, in reverse."""


class NodeCore:
    """Lifecycle, identity and the peer view of one node (see `AsyncNode`)."""

    def __init__(self, config: NodeConfig | None = None, **settings: Any) -> None:
        if config is None:
            config = NodeConfig.from_env(**settings)
        elif settings:
            config = NodeConfig.from_env({}, **{**_struct_items(config), **settings})
        self._config = config.validated()
        self._id = ""
        self._next_seq: Callable[[], int] = lambda: 0
        self._durables = KnownDurables(self._config.data_dir)
        self._quiet = QuietLog()
        self._watchers = Watchers()
        self._events = EventStreams()
        self._run: _Running | None = None
        self._closing = False
        self._stopped: Callable[[], bool] = lambda: not self.running
        """For a push waiting for credit: is the node no longer running (made once, not a
        bound method per push)."""
        self.stats = Stats(self._config.metrics_names)
        """Message counts: published, received, dropped (gaps seen from publishers),
        expired (copies dropped here because their ttl passed before delivery)...; the
        same per topic, queue, service and peer (`Stats`)."""

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
        return self._run is not None and not self._closing

    @property
    def config(self) -> NodeConfig:
        return self._config

    @property
    def endpoints(self) -> dict[str, list[str]]:
        """Bound endpoints by role: ``ctl`` (control, for ``--peer``), ``pub``, ``rtr``."""
        run = self._run
        if run is None:
            return {"ctl": [], "pub": [], "rtr": []}
        return {"ctl": list(run.membership.endpoints), "pub": list(run.pubsub.endpoints),
                "rtr": list(run.serving.endpoints)}

    @property
    def dropped_by_peer(self) -> Mapping[str, int]:
        """Pub/sub messages publishers dropped for us at their high-water mark, by peer id."""
        return dict(self._run.pubsub.dropped_by_peer) if self._run is not None else {}

    @property
    def dropped_input(self) -> Mapping[str, int]:
        """Malformed or foreign input dropped, by reason (mDNS reasons prefixed ``mdns_``)."""
        return self._dropped_input()

    # -- lifecycle ---------------------------------------------------------------

    async def start(self) -> None:
        """Bind, announce and start talking to peers.

        On failure nothing is left running: every socket, task, lock and
        discovery backend started so far is closed again before the error is
        raised.

        Raises:
            ConfigError: the data dir, a key file, an interface or discovery cannot be
                used.
        """
        if self._run is not None:
            return
        _trace.refresh()  # is an OpenTelemetry SDK configured (now)?
        stack = contextlib.AsyncExitStack()
        try:
            run = await self._build(stack)
        except BaseException:
            await stack.aclose()
            raise
        self._run = run
        self._closing = False
        self._watchers.open()
        cfg = self._config
        _log.info("node %s (%s) up in mesh %s: ctl %s", cfg.name, self._id[:8], cfg.mesh,
                  ",".join(run.membership.endpoints))

    async def _build(self, stack: contextlib.AsyncExitStack) -> _Running:
        """Every step of `start`, each registering its undo on `stack` as it succeeds."""
        cfg = self._config
        curve = _load_curve(cfg)
        if cfg.data_dir is not None:
            # locked before the id is read: two processes starting on a new data dir
            # would each create an id, and the one left running might not hold the kept one
            lock = DataDirLock(cfg.data_dir)
            lock.acquire()
            stack.callback(lock.release)
        self._id = load_or_create_id(cfg.data_dir)
        identity = Identity(self._id, cfg.name, cfg.mesh, time.time_ns(),
                            curve.public.decode() if curve else "")
        outbox, dedup = None, None
        if cfg.data_dir is not None:
            self._durables.load()
            stack.callback(self._durables.save)  # last_seen as of the close
            outbox, dedup = await open_spools(cfg.data_dir, cfg, self.stats, self._watchers,
                                              self._durables.forgotten)
            stack.push_async_callback(outbox.aclose)
        ctx = Context(curve)
        stack.push_async_callback(asyncio.to_thread, ctx.close)  # the last batches leave
        # One sequence for everything this node sends; starting at the clock in
        # microseconds keeps (node id, seq) unique across restarts, which the
        # receivers' deduplication relies on.
        seqs = itertools.count(time.time_ns() // 1000)
        next_seq = self._next_seq = seqs.__next__
        announcement = Announcement(identity)
        membership = Membership(ctx, cfg, self._quiet, announcement)
        stack.callback(membership.close)
        peers = membership.table
        take_seqs = functools.partial(_take_seqs, seqs)
        pubsub = PubSub(ctx, cfg, self._quiet, self.stats, peers=peers,
                        announcer=membership, waiter=self._watchers, next_seq=next_seq,
                        take_seqs=take_seqs, control=membership)
        stack.callback(pubsub.close)
        work = WorkQueues(ctx, cfg, self._quiet, self.stats, peers=peers, control=membership,
                          announcer=membership, next_seq=next_seq, outbox=outbox, dedup=dedup,
                          take_seqs=take_seqs)
        stack.callback(work.close)
        self._durables.on_ended = functools.partial(self._owner_ended, outbox, work)
        serving = Serving(ctx, cfg, self._quiet, self.stats, membership)
        stack.push_async_callback(serving.aclose)
        requests = Requests(ctx, cfg, self._quiet, self.stats, peers=peers, local=serving,
                            waiter=self._watchers)
        stack.push_async_callback(requests.aclose)
        recall = Recall(peers=peers, pubsub=pubsub, serving=serving, requests=requests,
                        waiter=self._watchers, max_message_size=cfg.max_message_size,
                        quiet=self._quiet)
        stack.push_async_callback(recall.aclose)
        store = RetainedStore(cfg.data_dir, membership)
        store.load()
        stack.callback(store.close)
        retained = RetainedValues(store, recall)
        stack.callback(retained.close)
        kept = History([_names.pattern(p) for p in cfg.history], max_age=cfg.history_max_age,
                       max_bytes=cfg.history_max_bytes, data_dir=cfg.data_dir)
        kept.load()
        stack.callback(kept.close)
        history = HistoryReplay(kept, recall)
        own = OwnFigures(peers=peers, pubsub=pubsub, work=work, serving=serving,
                         requests=requests, heartbeat_interval=cfg.heartbeat_interval)
        figures = MeshFigures(own, peers, requests)
        pubsub.history = kept if kept.patterns else None
        announcement.parts = (pubsub, work, serving, self._durables, store, kept)
        membership.attach(listeners=(self._durables, pubsub, work, requests, retained,
                                     _WakeOnPeers(self._watchers)),
                          events=(self._events,),
                          routes={**work.control_routes, **pubsub.control_routes},
                          tickers=(work, _Every(self._expire_durables)),
                          partners=(work, requests))
        stack.callback(self._events.close)
        stack.callback(self._watchers.close)
        try:
            membership.bind(cfg.interfaces, cfg.port)
            pubsub.bind(cfg.interfaces)
            serving.bind(cfg.interfaces)
            work.bind(cfg.interfaces)
        except ConfigError:
            raise
        except Exception as exc:
            raise ConfigError("interfaces", f"cannot bind: {exc}") from exc
        tasks = TaskSet()
        stack.push_async_callback(tasks.cancel)
        tasks.spawn(membership.run(), "zeromesh-control")
        pubsub.start(self._id)
        tasks.spawn(pubsub.read_markers(), "zeromesh-markers")
        serving.start()
        requests.start(self._id)
        recall.start(self._id, cfg.name)
        retained.start()
        history.start()
        work.start(self._id, cfg.name)
        own.start(self._id, cfg.name)
        tasks.spawn(own.run(), "zeromesh-figures")
        if outbox is not None:
            self._durables.keep_forgotten(outbox.forgotten)
        self._durables.start_clock()
        discovery = await self._start_discovery(stack, membership, identity)
        return _Running(identity, curve, ctx, membership, pubsub, work, serving, requests, retained,
                        history, outbox, figures, discovery, tasks, stack)

    async def _start_discovery(self, stack: contextlib.AsyncExitStack,
                               membership: Membership, identity: Identity
                               ) -> tuple[DiscoveryBackend, ...]:
        cfg = self._config
        backends: list[DiscoveryBackend] = []
        if cfg.peers:
            backends.append(StaticDiscovery(cfg.peers, mesh=cfg.mesh))
        if cfg.mdns:
            # (IPv6 loopback has no multicast: zeroconf there only logs "Network is
            # unreachable" at every send; such nodes find each other through seeds)
            multicast = [ip for ip in cfg.interfaces if not _is_ipv6_loopback(ip)]
            if multicast:
                backends.append(MdnsDiscovery(multicast, mesh=cfg.mesh))
            elif not cfg.peers:
                _log.warning("no mDNS on ::1 (loopback has no IPv6 multicast): this node "
                             "finds peers only through seeds (--peer)")
        me = PeerInfo(id=identity.id, name=identity.name, mesh=identity.mesh,
                      version=_wire.PROTOCOL_VERSION, endpoints=tuple(membership.endpoints),
                      key=identity.key)
        for backend in backends:
            key = "peers" if isinstance(backend, StaticDiscovery) else "mdns"
            try:
                await backend.start(me, membership.on_discovery)
            except (OSError, DiscoveryError) as exc:
                # a backend that raised may hold threads or sockets: it closes too
                await _close_backend(backend)
                raise ConfigError(key, f"discovery cannot start: {exc}") from exc
            stack.push_async_callback(_close_backend, backend)
        return tuple(backends)

    async def aclose(self) -> None:
        """Say goodbye to peers and mDNS, then release every socket."""
        run = self._run
        if run is None or self._closing:
            return
        self._closing = True
        run.pubsub.flush(self.name)
        await run.work.stop_handles(_HANDLER_GRACE)  # (heartbeats go on while a handler ends)
        await run.tasks.cancel()  # no heartbeat may follow the goodbye
        run.work.prepare_leave()  # final credits travel before the goodbye
        if run.work.owing:  # to a pusher whose greeting is unread yet: it must get in
            run.membership.listen(run.work.reachable)
            try:
                await run.work.report_owed(_OWED_CREDITS_WAIT)
            finally:
                run.membership.stop_listening()
        run.membership.say_goodbye()
        try:
            await run.stack.aclose()
        finally:
            self._run = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.aclose()

    def _live(self) -> _Running:
        """The running parts.

        Raises:
            ClosedError: the node is not running.
        """
        run = self._run
        if run is None or self._closing:
            raise ClosedError("node is not running (use `async with` or `await start()`)")
        return run

    # -- peers -------------------------------------------------------------------

    def peers(self) -> list[Peer]:
        """Known peers (never this node, nor one that left), with their liveness state."""
        run = self._run
        return run.membership.table.snapshot() if run is not None else []

    def reload_allowlist(self) -> int:
        """Read the CURVE allowlist (``allow``) again: keys added there are admitted
        from their next connection (a peer refused before is admitted when it connects
        again: ZeroMQ does not retry a connection the allowlist refused). Keys removed are
        cut off now: their members are dropped (LEFT), our connections to them closed,
        theirs to us cut, and nothing more they send is taken. Returns how many keys it
        holds.

        Raises:
            ConfigError: the node is not secure, or the allowlist cannot be read.
        """
        run = self._live()
        if run.curve is None or self._config.allow is None:
            raise ConfigError("allow", "this node has no CURVE allowlist")
        try:
            allowed = load_allowlist(self._config.allow)
        except KeyFileError as exc:
            raise ConfigError("allow", str(exc)) from None
        if run.curve.replace_allowlist(allowed):
            run.ctx.revoke()
            for rec in run.membership.revoke():
                run.pubsub.peer_revoked(rec)
                run.serving.revoke(rec.id)
        return len(allowed)

    def traffic(self) -> Traffic:
        """Counters for monitoring: node-wide totals plus per-topic and per-peer tallies
        (peers by id; at most `NodeConfig.metrics_names` names each, the rest under
        ``other``), and the sampled delivery latency, by kind and by topic and queue (at
        most `LATENCY_NAMES` names each)."""
        run = self._run
        pubsub = run.pubsub if run is not None else None
        outbox = run.outbox if run is not None else None
        curve = run.curve if run is not None else None
        return Traffic(
            totals=collections.Counter(self.stats),  # (README: totals["decode_errors"])
            published_by_topic=dict(pubsub.published_by_topic) if pubsub else {},
            delivered_by_topic=dict(pubsub.delivered_by_topic) if pubsub else {},
            received_by_peer=dict(pubsub.received_by_peer) if pubsub else {},
            dropped_by_peer=dict(pubsub.dropped_by_peer) if pubsub else {},
            spool_messages=len(outbox.store) if outbox else 0,
            spool_bytes=outbox.store.used_bytes if outbox else 0,
            spool_disk_bytes=outbox.store.disk_bytes if outbox else 0,
            dead_letters=len(outbox.dead) if outbox else 0,
            input_dropped=self._dropped_input(),
            curve_refused=sum(curve.denied.values()) if curve else 0,
            by_name={kind: tallies.snapshot() for kind, tallies in (
                ("topic", self.stats.topics), ("queue", self.stats.queues),
                ("service", self.stats.services), ("peer", self.stats.peers))},
            latency={kind: each.snapshot() for kind, each in self.stats.latency.items()},
            latency_by_name={kind: each.snapshot()
                             for kind, each in self.stats.latency_by.items()},
            membership=run.membership.figures() if run is not None else {},
        )

    def figures(self) -> Report:
        """This node's own figures: its links, topics, queues and services, with the
        rates of the last second (see `mesh._figures`).

        Raises:
            ClosedError: the node is not running.
        """
        return self._live().figures.own_report()

    async def gather_figures(self) -> list[Report]:
        """Every reachable node's figures, this node's first; peers that are suspect or
        lost keep their last report (their state: `peers`).

        Raises:
            ClosedError: the node is not running.
        """
        return await self._live().figures.gather()

    def _dropped_input(self) -> dict[str, int]:
        """Everything dropped unharmed, by reason; discovery's reasons prefixed ``mdns_``."""
        dropped = dict(self._quiet.dropped)
        backends = self._run.discovery if self._run is not None else ()
        for backend in backends:
            for reason, n in getattr(backend, "dropped", {}).items():
                dropped[f"mdns_{reason}"] = dropped.get(f"mdns_{reason}", 0) + n
        return dropped

    def events(self) -> PeerEvents:
        """A stream of peer events (joined, left, lost) from now on (open it before `start`
        to see the first joins); it ends when the node closes.

        Raises:
            ClosedError: the node has closed (a stream opened now would never end).
        """
        if self._closing:
            raise ClosedError("node is closed")
        return self._events.open()

    async def wait_for_peers(self, count: int, *, timeout: float = 10.0) -> list[Peer]:
        """Wait until at least `count` peers are alive.

        Raises:
            RequestTimeout: fewer were alive when the timeout came.
            ClosedError: the node is not running.
        """
        await self._wait(lambda: len(self._alive()) >= count, timeout,
                         f"waiting for {count} peers")
        return [r.snapshot() for r in self._alive()]

    def _alive(self) -> list[PeerRecord]:
        run = self._run
        if run is None:
            return []
        return [r for r in run.membership.table.records() if r.state is PeerState.ALIVE]

    async def _wait(self, ready: Callable[[], bool], timeout: float, what: str) -> None:
        await self._watchers.wait(ready, timeout, what)

    def _check_running(self) -> None:
        self._live()

    # -- durables' end -------------------------------------------------------------

    def _expire_durables(self) -> None:
        """Every heartbeat: the durables peers announce are heard now; those none
        announced for ``durable_expiry`` seconds are forgotten, each logged once."""
        run, durables = self._run, self._durables
        if run is None or run.outbox is None:
            return  # nothing is spooled without a data dir
        present = set(durables.mine)
        for rec in run.membership.table.records():
            if rec.durables and rec.state is not PeerState.LOST:
                present.update(rec.durables)
        durables.heard(present)
        for queue, silent in durables.stale(self._config.durable_expiry):
            log_expired(queue, silent, self._drop_durable(run.outbox, run.work, queue))
        if durables.drop_ended(self._config.durable_expiry):
            run.membership.interest_changed()  # every publisher forgot them by now

    async def _forget_durable(self, name: str) -> int:
        """`AsyncNode.forget_durable`: forget it, then learn it again at once if its owner
        still announces it (or it is this node's own), so a live subscriber keeps getting
        reliable messages."""
        run = self._live()
        if run.outbox is None:
            raise ConfigError("data_dir", "durables are spooled for in a data dir; none is set")
        queue = self._durables.resolve(name)
        await asyncio.sleep(0)  # messages spooled just now reach its queue first (_hand_out)
        run = self._live()
        if not self._durables.knows(queue):
            return 0  # forgotten meanwhile
        pattern = self._durables.pattern_of(queue)
        freed = self._drop_durable(run.outbox, run.work, queue)
        announced = {q: p for rec in self._alive() for q, p in rec.durables.items()}
        again = queue in self._durables.mine or queue in announced
        log_forgotten(queue, freed, again=again)
        if again:
            self._durables.learn({queue: self._durables.mine.get(queue)
                                  or announced.get(queue, pattern)})
        return freed

    async def _end_durable(self, name: str) -> int:
        """`AsyncNode.end_durable`: forget it here as `forget_durable` does, stop announcing
        it, and announce it ended (its publishers forget it when they hear that)."""
        run = self._live()
        if run.outbox is None:
            raise ConfigError("durable", "needs a data dir (its state lives there)")
        queue = durable_queue(self._id, _names.durable(name))
        await asyncio.sleep(0)  # messages spooled just now reach its queue first (_hand_out)
        run = self._live()
        if queue in run.work.workers.local:
            raise ConfigError("durable", f"{quoted(name)} is open: close its subscription first")
        freed = self._drop_durable(run.outbox, run.work, queue)
        self._durables.end(queue)
        run.membership.interest_changed()
        log_ended(queue, freed, by_owner=False)
        return freed

    def _owner_ended(self, outbox: Outbox | None, work: WorkQueues, queue: str) -> None:
        """A peer announces that it ended its durable `queue`: forget it, free its backlog."""
        log_ended(queue, self._drop_durable(outbox, work, queue), by_owner=True)

    def _drop_durable(self, outbox: Outbox | None, work: WorkQueues, queue: str) -> int:
        """Forget durable `queue` and free its backlog; how many messages waited for it."""
        if self._durables.forget(queue):
            self.stats["durables_forgotten"] += 1
        if outbox is None:
            return 0
        return outbox.abandon(queue, work.take(queue))

    def _durable_backlog(self, queue: str) -> int:
        run = self._run
        if run is None or run.outbox is None:
            return 0
        return run.work.held(queue) + run.outbox.retrying(queue)


class _Every:
    """A `Ticker` that calls a function once per heartbeat."""

    def __init__(self, fn: Callable[[], None]) -> None:
        self._fn = fn

    def tick(self) -> None:
        self._fn()


class _WakeOnPeers:
    """Wakes the node's waits whenever peers or their interest change."""

    def __init__(self, watchers: Watchers) -> None:
        self._watchers = watchers

    def peer_connected(self, new: PeerRecord, old: PeerRecord | None) -> None:
        pass  # `peers_changed` follows

    def peer_updated(self, rec: PeerRecord) -> None:
        pass

    def peer_lost(self, rec: PeerRecord) -> None:
        pass

    def peer_gone(self, rec: PeerRecord) -> None:
        pass

    def peers_changed(self) -> None:
        self._watchers.wake()


def _is_ipv6_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip.partition("%")[0])
    return address.version == 6 and address.is_loopback


async def _close_backend(backend: DiscoveryBackend) -> None:
    """Close a discovery backend; its failure is logged, never raised (the rest of the
    node still has to close)."""
    try:
        await backend.aclose()
    except Exception:
        _log.exception("discovery backend failed to close")


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
