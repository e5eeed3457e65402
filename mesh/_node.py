"""AsyncNode: one mesh node, composing discovery, membership, pub/sub and the wire.

All sockets belong to the node's event loop. Publishing never awaits the
network: messages are appended to a per-topic batch that is flushed at the end
of the current loop iteration (or sooner, when it grows large), so a lone
message goes out at once and a burst costs one encode and one ZeroMQ send per
topic per flush, not one per message.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any, Final, Self

from discovery import DiscoveryBackend, MdnsDiscovery, PeerInfo, StaticDiscovery
from patterns import (
    Context,
    InvalidName,
    Publisher,
    SocketClosed,
    Subscriber,
    TopicPattern,
    topic_from_key,
    topic_key,
    validate_topic,
)

from . import _wire
from ._config import NodeConfig
from ._events import PeerEvents
from ._identity import load_or_create_id
from ._membership import Membership
from ._message import Message
from ._peers import Peer, PeerEvent, PeerRecord, PeerState
from ._quiet import QuietLog
from ._subscription import DEFAULT_MAX_PENDING, Callback, Subscription
from .errors import ClosedError, ConfigError, MessageTooLarge, ProtocolError, RequestTimeout

_log = logging.getLogger("mesh.node")
_FLUSH_COUNT: Final[int] = 512
_FLUSH_BYTES: Final[int] = 256 * 1024
_CACHE_LIMIT: Final[int] = 10_000
_WIRE_OVERHEAD: Final[int] = 64 * 1024
_PUB_LINGER: Final[float] = 2.0


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
        self._ctx: Context | None = None
        self._membership: Membership | None = None
        self._publisher: Publisher | None = None
        self._subscriber: Subscriber | None = None
        self._discovery: list[DiscoveryBackend] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._ctl_endpoints: list[str] = []
        self._pub_endpoints: list[str] = []
        self._running = False
        self._quiet = QuietLog()
        # publishing
        self._seq = 0
        self._topic_seq: dict[str, int] = {}
        self._outgoing: dict[str, list[_wire.Item]] = {}
        self._outgoing_count = 0
        self._outgoing_bytes = 0
        self._flush_handle: asyncio.Handle | None = None
        # subscribing
        self._subs: list[Subscription] = []
        self._subs_version = 0
        self._match_cache: dict[str, tuple[Subscription, ...]] = {}
        self._key_topics: dict[bytes, str] = {}
        self._expected_seq: dict[tuple[str, str], int] = {}
        self._confirmed: dict[str, int] = {}
        # waiting and events
        self._watchers: set[asyncio.Future[None]] = set()
        self._event_streams: set[PeerEvents] = set()
        self.stats: dict[str, int] = {"published": 0, "received": 0, "dropped": 0}

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
        return {"ctl": list(self._ctl_endpoints), "pub": list(self._pub_endpoints)}

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
        ctx = self._ctx = Context()
        try:
            self._membership = Membership(
                ctx, me=self._hello, mesh=cfg.mesh,
                heartbeat_interval=cfg.heartbeat_interval, suspect_after=cfg.suspect_after,
                lost_after=cfg.lost_after, on_event=self._on_peer_event,
                on_connect=self._on_peer_connect, on_disconnect=self._on_peer_disconnect,
                on_change=self._changed, quiet=self._quiet)
            max_wire = cfg.max_message_size + _WIRE_OVERHEAD
            self._publisher = Publisher(ctx, hwm=cfg.pub_hwm)
            self._subscriber = Subscriber(ctx, hwm=cfg.sub_hwm, max_message_size=max_wire)
            self._ctl_endpoints = self._membership.bind(cfg.interfaces, cfg.port)
            self._pub_endpoints = [self._publisher.bind(h) for h in cfg.interfaces]
        except Exception as exc:
            await self._teardown()
            if isinstance(exc, ConfigError):
                raise
            raise ConfigError("interfaces", f"cannot bind: {exc}") from exc
        self._subscriber.set_marker(self._marker())
        self._running = True
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._membership.run(), name="zeromesh-control"),
                       loop.create_task(self._read_data(), name="zeromesh-data"),
                       loop.create_task(self._read_markers(), name="zeromesh-markers")]
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
        self._flush()
        await self._cancel_tasks()  # no heartbeat may follow the goodbye
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
        for sub in self._subs:
            sub._close()
        for stream in self._event_streams:
            stream._close()
        self._changed()
        if self._membership is not None:
            self._membership.close()
        if self._publisher is not None:
            self._publisher.close(linger=_PUB_LINGER)  # let the last batches leave
        if self._subscriber is not None:
            self._subscriber.close()
        if self._ctx is not None:
            await asyncio.to_thread(self._ctx.close)
            self._ctx = None

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

    async def wait_for_subscribers(self, topic: str, count: int = 1, *,
                                   timeout: float = 10.0) -> None:
        """Wait until `count` peers subscribed to `topic` are connected and ready.

        Once this returns, a message published on `topic` reaches those peers
        (no slow-joiner loss).

        Raises:
            ConfigError: `topic` is not a valid topic.
            RequestTimeout: fewer were ready when the timeout came.
        """
        self._key(topic)
        await self._wait(lambda: self.subscriber_count(topic) >= count, timeout,
                         f"waiting for {count} subscribers of {topic!r}")

    async def wait_for_known_subscribers(self, topic: str, *, timeout: float = 10.0) -> int:
        """Wait until every alive peer known to subscribe to `topic` is ready; return how many.

        Raises:
            RequestTimeout: some were still not ready when the timeout came.
        """
        self._key(topic)
        await self._wait(lambda: self.subscriber_count(topic) >= self._known_count(topic),
                         timeout, f"waiting for the subscribers of {topic!r}")
        return self.subscriber_count(topic)

    def _known_count(self, topic: str) -> int:
        return sum(1 for rec in self._alive() if any(p.matches(topic) for p in rec.subs))

    def check_topic(self, topic: str) -> None:
        """Validate a topic name.

        Raises:
            ConfigError: it is not a valid topic.
        """
        self._key(topic)

    def subscriber_count(self, topic: str) -> int:
        """Peers whose subscriptions matching `topic` are in force at our publisher."""
        n = 0
        for rec in self._alive():
            if self._confirmed.get(rec.id, -1) >= rec.subs_version and any(
                    p.matches(topic) for p in rec.subs):
                n += 1
        return n

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
        for fut in self._watchers:
            if not fut.done():
                fut.set_result(None)

    def _on_peer_event(self, event: PeerEvent) -> None:
        _log.info("peer %s (%s) %s", event.peer.name, event.peer.id[:8], event.kind.value)
        for stream in self._event_streams:
            stream._deliver(event)

    def _on_peer_connect(self, new: PeerRecord, old: PeerRecord | None) -> None:
        assert self._subscriber is not None
        if old is not None and old.pub != new.pub:
            self._subscriber.disconnect(old.pub)
        self._subscriber.connect(new.pub)

    def _on_peer_disconnect(self, rec: PeerRecord) -> None:
        if self._subscriber is not None:
            self._subscriber.disconnect(rec.pub)
        self._confirmed.pop(rec.id, None)

    def _hello(self, reply: bool) -> _wire.Hello:
        return _wire.Hello(self._id, self.name, self.mesh, self._incarnation,
                           self._ctl_endpoints, self._pub_endpoints,
                           sorted({s.subject for s in self._subs}), self._subs_version, reply)

    def _peer_info(self) -> PeerInfo:
        return PeerInfo(id=self._id, name=self.name, mesh=self.mesh,
                        version=_wire.PROTOCOL_VERSION, endpoints=tuple(self._ctl_endpoints))

    # -- publishing --------------------------------------------------------------

    async def publish(self, topic: str, data: bytes | str, *,
                      headers: Mapping[str, str] | None = None) -> None:
        """Publish best-effort to every matching subscriber in the mesh (and on this node).

        Returns as soon as the message is queued; it leaves at the end of this
        loop iteration.

        Raises:
            ConfigError: `topic` is invalid.
            MessageTooLarge: `data` exceeds ``max_message_size``.
            ClosedError: the node is not running.
        """
        if self.publish_nowait(topic, data, headers=headers):
            await asyncio.sleep(0)  # a large batch just left: let readers and timers run

    def publish_nowait(self, topic: str, data: bytes | str, *,
                       headers: Mapping[str, str] | None = None) -> bool:
        """`publish` without the await; True when it flushed a full batch."""
        if not self._running:
            self._check_running()
        pending = self._outgoing.get(topic)
        if pending is None:
            self._key(topic)
            pending = self._outgoing[topic] = []
        if type(data) is not bytes:
            data = data.encode() if isinstance(data, str) else bytes(data)
        size = len(data)
        if size > self._config.max_message_size:
            raise MessageTooLarge(size, self._config.max_message_size)
        hdrs = dict(headers) if headers else None
        seq = self._seq
        self._seq = seq + 1
        item = _wire.Item(seq, time.time(), hdrs, data)
        pending.append(item)
        self._outgoing_count += 1
        self._outgoing_bytes += size
        if self._subs:
            local = self._matching(topic)
            if local:
                msg = Message(topic, data, self.name, self._id, seq, item.ts, hdrs)
                for sub in local:
                    sub._deliver((msg,))
        if self._outgoing_count >= _FLUSH_COUNT or self._outgoing_bytes >= _FLUSH_BYTES:
            self._flush()
            return True
        if self._flush_handle is None:
            self._flush_handle = asyncio.get_running_loop().call_soon(self._flush)
        return False

    def _key(self, topic: str) -> bytes:
        return checked_topic_key(topic)

    def _flush(self) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        if not self._outgoing or self._publisher is None:
            return
        send = self._publisher.send
        self.stats["published"] += self._outgoing_count
        for topic, items in self._outgoing.items():
            first = self._topic_seq.get(topic, 0)
            self._topic_seq[topic] = first + len(items)
            key = checked_topic_key(topic)
            frame = _wire.encode_data(key, _wire.Batch(self._id, self.name, first, items))
            try:
                send(frame)
            except SocketClosed:
                return
        self._outgoing = {}
        self._outgoing_count = 0
        self._outgoing_bytes = 0

    # -- subscribing -------------------------------------------------------------

    async def subscribe(self, pattern: str, *, callback: Callback | None = None,
                        max_pending: int = DEFAULT_MAX_PENDING) -> Subscription:
        """Receive messages on topics matching `pattern` (``*`` one segment, ``>`` the rest).

        With `callback`, each message is passed to it on the loop instead of
        being queued for iteration.

        Raises:
            ConfigError: `pattern` is invalid.
            ClosedError: the node is not running.
        """
        self._check_running()
        try:
            parsed = TopicPattern(pattern)
        except InvalidName as exc:
            raise ConfigError("pattern", exc.reason + f" in {pattern!r}") from None
        sub = Subscription(parsed, max_pending=max_pending, callback=callback,
                           on_close=self._unsubscribe)
        self._subs.append(sub)
        self._match_cache.clear()
        assert self._subscriber is not None
        self._subscriber.add_prefix(parsed.prefix)
        self._subs_changed()
        return sub

    def _unsubscribe(self, sub: Subscription) -> None:
        if sub in self._subs:
            self._subs.remove(sub)
            self._match_cache.clear()
            if self._subscriber is not None and self._running:
                self._subscriber.remove_prefix(sub.pattern.prefix)
                self._subs_changed()

    def _subs_changed(self) -> None:
        self._subs_version += 1
        assert self._subscriber is not None and self._membership is not None
        self._subscriber.set_marker(self._marker())
        self._membership.broadcast_hello()

    def _marker(self) -> bytes:
        return f"{self._id}:{self._subs_version}".encode()

    def _matching(self, topic: str) -> tuple[Subscription, ...]:
        subs = self._match_cache.get(topic)
        if subs is None:
            if len(self._match_cache) >= _CACHE_LIMIT:
                self._match_cache.clear()
            subs = self._match_cache[topic] = tuple(
                s for s in self._subs if s.pattern.matches(topic))
        return subs

    async def _read_data(self) -> None:
        assert self._subscriber is not None
        recv = self._subscriber.recv_many
        while True:
            try:
                batches = await recv()
            except SocketClosed:
                return
            for frames in batches:
                self._on_data(frames)

    def _on_data(self, frames: list[bytes]) -> None:
        try:
            if len(frames) != 1:
                raise ProtocolError(f"data message of {len(frames)} frames")
            frame = frames[0]
            key, offset = _wire.split_data(frame)
            batch = _wire.decode_data(frame, offset, self._config.max_message_size + _WIRE_OVERHEAD)
            topic = self._key_topics.get(key)
            if topic is None:
                topic = self._topic_of(key)
        except ProtocolError as exc:
            self._quiet.drop("data", exc.reason)
            return
        items = batch.items
        stream = (batch.source, topic)
        expected = self._expected_seq.get(stream)
        if expected is not None and batch.topic_seq > expected:
            self.stats["dropped"] += batch.topic_seq - expected
        self._expected_seq[stream] = batch.topic_seq + len(items)
        self.stats["received"] += len(items)
        subs = self._matching(topic)
        if not subs:
            return
        name, source = batch.name, batch.source
        msgs = [Message(topic, it.payload, name, source, it.seq, it.ts, it.headers)
                for it in items]
        for sub in subs:
            sub._deliver(msgs)

    def _topic_of(self, key: bytes) -> str:
        try:
            topic = topic_from_key(key)
            validate_topic(topic)
        except (InvalidName, UnicodeDecodeError, ValueError) as exc:
            raise ProtocolError(f"bad topic key: {exc}") from None
        if len(self._key_topics) >= _CACHE_LIMIT:
            self._key_topics.clear()
        self._key_topics[key] = topic
        return topic

    async def _read_markers(self) -> None:
        assert self._publisher is not None
        while True:
            try:
                markers = await self._publisher.markers()
            except SocketClosed:
                return
            for subscribed, marker in markers:
                peer_id, _, version = marker.decode("ascii", "replace").partition(":")
                if not version.isdigit():
                    self._quiet.drop("marker", "malformed readiness marker")
                    continue
                if subscribed:
                    self._confirmed[peer_id] = int(version)
                elif self._confirmed.get(peer_id) == int(version):
                    del self._confirmed[peer_id]
            self._changed()

    def _check_running(self) -> None:
        if not self._running:
            raise ClosedError("node is not running (use `async with` or `await start()`)")


@functools.lru_cache(maxsize=_CACHE_LIMIT)
def checked_topic_key(topic: str) -> bytes:
    """The wire key of a valid topic (cached, thread-safe).

    Raises:
        ConfigError: the topic is invalid.
    """
    try:
        validate_topic(topic)
    except InvalidName as exc:
        raise ConfigError("topic", exc.reason + f" in {topic!r}") from None
    return topic_key(topic)


def _struct_items(config: NodeConfig) -> dict[str, Any]:
    return {f: getattr(config, f) for f in config.__struct_fields__}

