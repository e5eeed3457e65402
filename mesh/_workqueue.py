"""Work queues: each pushed message goes to exactly one live worker, chosen by credit.

Pusher side. Every worker announces, per queue, a credit window: how many of
one pusher's messages it is willing to hold unprocessed. A pusher keeps a
`_Target` per (worker, queue) and sends only while that target has credit, so
messages are never queued up behind a slow worker: a worker 10x slower gets
about 10x fewer. Among workers with credit the choice is round robin, which
makes equal workers share equally. With no worker at all, `push` waits up to
its timeout and then raises `NoRespondersError`; it never silently drops.

Worker side. One PULL socket receives every pusher's batches; each queue this
node pulls from is one FIFO (`_LocalQueue`) shared by all its `Pull` handles.
A message counts as consumed when its handle asks for the next one (or its
handler returns); consumption goes back to the pusher as a running total
(`Credit`), coalesced per loop iteration and repeated on heartbeat ticks so a
lost credit is superseded by the next.

Departures. A worker that leaves gracefully first sends its final credits,
then its goodbye (or a hello without the queue) on the same ordered control
link; the pusher puts exactly the unconsumed messages back in front of the
queue for other workers. A worker that is lost (SIGKILL, cable cut) takes its
in-flight best-effort messages with it: the pusher counts them in
``stats["lost_in_flight"]`` (the spool's reliable mode closes that gap).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Final

from patterns import Context, Puller, Pusher, SocketClosed

from . import _wire
from ._config import NodeConfig
from ._message import Message
from ._peers import PeerRecord
from ._pubsub import WIRE_OVERHEAD, checked_topic_key
from ._quiet import QuietLog
from .errors import (
    ClosedError,
    ConfigError,
    MessageTooLarge,
    NoRespondersError,
    ProtocolError,
    RequestTimeout,
)

_log = logging.getLogger("mesh.workqueue")
DEFAULT_PREFETCH: Final[int] = 256
_CREDIT_RESEND_FOR: Final[float] = 3.0
_PUSH_LINGER: Final[float] = 2.0

Handler = Callable[[Message], Awaitable[object] | object]


def checked_queue_key(queue: str) -> bytes:
    """Queue names follow topic rules (no wildcards).

    Raises:
        ConfigError: the name is invalid.
    """
    try:
        return checked_topic_key(queue)
    except ConfigError as exc:
        raise ConfigError("queue", exc.reason.replace("topic", "queue")) from None


class _Target:
    """One worker of one queue as its pusher sees it: window, positions, in-flight copies."""

    __slots__ = ("acked", "flushed", "inflight", "local", "outgoing", "peer_id", "pusher",
                 "queue", "sent", "window")

    def __init__(self, peer_id: str, queue: str, window: int, pusher: Pusher | None,
                 local: _LocalQueue | None) -> None:
        self.peer_id = peer_id
        self.queue = queue
        self.window = window
        self.pusher = pusher
        self.local = local
        self.sent = 0
        self.flushed = 0
        self.acked = 0
        self.inflight: deque[_wire.Item] = deque()
        self.outgoing: list[_wire.Item] = []

    @property
    def credit(self) -> int:
        return self.window - (self.sent - self.acked)


class _InStream:
    """A worker's view of one pusher's stream on one queue: how much it consumed."""

    __slots__ = (
        "changed_at",
        "consumed",
        "pusher_id",
        "queue",
        "received",
        "reported",
        "retired",
    )

    def __init__(self, pusher_id: str, queue: str, position: int) -> None:
        self.pusher_id = pusher_id
        self.queue = queue
        self.received = position
        self.consumed = position
        self.reported = position
        self.changed_at = time.monotonic()
        self.retired = False


class _LocalQueue:
    """This node's worker side of one queue: one FIFO shared by every `Pull` on it."""

    def __init__(self, name: str, window: int) -> None:
        self.name = name
        self.window = window
        self.items: deque[tuple[Message, _InStream | _Target]] = deque()
        self.waiters: deque[asyncio.Future[None]] = deque()
        self.handles = 0
        self.closed = False

    def put(self, entries: Iterable[tuple[Message, _InStream | _Target]]) -> None:
        self.items.extend(entries)
        self.wake()

    def wake(self) -> None:
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                break


class Pull:
    """Work messages of one queue; async iterator. Each is credited once you ask for the next."""

    def __init__(self, owner: WorkQueues, local: _LocalQueue) -> None:
        self._owner = owner
        self._local = local
        self._current: tuple[Message, _InStream | _Target] | None = None
        self._closed = False
        self._task: asyncio.Task[None] | None = None
        self.received = 0

    @property
    def queue(self) -> str:
        return self._local.name

    def _done(self) -> None:
        if self._current is not None:
            self._owner._consumed(self._current[1])
            self._current = None

    async def next(self, timeout: float | None = None) -> Message:
        """The next work message (the previous one counts as processed).

        Raises:
            TimeoutError: none arrived within `timeout` seconds.
            ClosedError: this handle or its node was closed.
        """
        self._done()
        local = self._local
        while not local.items:
            if self._closed or local.closed:
                raise ClosedError(f"pull on {local.name!r} is closed")
            waiter = asyncio.get_running_loop().create_future()
            local.waiters.append(waiter)
            try:
                async with asyncio.timeout(timeout):
                    await waiter
            finally:
                if not waiter.done():
                    waiter.cancel()
        self._current = local.items.popleft()
        self.received += 1
        if local.items:
            local.wake()  # another handle may be waiting too
        return self._current[0]

    def __aiter__(self) -> Pull:
        return self

    async def __anext__(self) -> Message:
        try:
            return await self.next()
        except ClosedError:
            raise StopAsyncIteration from None

    async def aclose(self) -> None:
        """Stop pulling; the message in hand counts as processed, the rest go to other workers."""
        if self._closed:
            return
        self._closed = True
        self._done()
        if self._task is not None and self._task is not asyncio.current_task():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._owner._detach(self, self._local)

    async def __aenter__(self) -> Pull:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _run(self, handler: Handler) -> None:
        """The handler form: process one message at a time, credit when it returns."""
        async for msg in self:
            try:
                result = handler(msg)
                if inspect.isawaitable(result):
                    await result
            except Exception:
                _log.exception("handler for queue %s failed", self.queue)


class WorkQueues:
    """Push/pull for one node: pusher-side dispatch and worker-side queues."""

    def __init__(self, ctx: Context, config: NodeConfig, quiet: QuietLog, stats: Counter[str],
                 *, alive_peers: Callable[[], list[PeerRecord]],
                 send_control: Callable[[str, _wire.Control], bool],
                 on_interest_changed: Callable[[], None]) -> None:
        self._ctx = ctx
        self._config = config
        self._quiet = quiet
        self._stats = stats
        self._alive_peers = alive_peers
        self._send_control = send_control
        self._on_interest_changed = on_interest_changed
        self._max_wire = config.max_message_size + WIRE_OVERHEAD
        self._puller = Puller(ctx, max_message_size=self._max_wire)
        self.endpoints: list[str] = []
        self.node_id = ""
        self.name = ""
        # pusher side
        self._seq = 0
        self._pushers: dict[str, Pusher] = {}
        self._targets: dict[tuple[str, str], _Target] = {}
        self._rr: dict[str, int] = {}
        self._target_cache: dict[str, list[_Target]] = {}
        self._backlog: dict[str, deque[_wire.Item]] = {}
        self._waiters: dict[str, list[asyncio.Future[None]]] = {}
        self._flush_handle: asyncio.Handle | None = None
        self._dirty: set[_Target] = set()
        # worker side
        self._local: dict[str, _LocalQueue] = {}
        self._streams: dict[tuple[str, str], _InStream] = {}
        self._credit_handle: asyncio.Handle | None = None
        self._credit_dirty: set[_InStream] = set()
        self._handles: set[Pull] = set()

    # -- lifecycle ---------------------------------------------------------------

    def bind(self, interfaces: Iterable[str]) -> list[str]:
        self.endpoints = [self._puller.bind(host) for host in interfaces]
        return self.endpoints

    def start(self, node_id: str, name: str) -> list[asyncio.Task[None]]:
        self.node_id, self.name = node_id, name
        return [asyncio.get_running_loop().create_task(self._read(), name="zeromesh-pull")]

    @property
    def queues(self) -> dict[str, int]:
        """What we announce: queue name -> credit window per pusher."""
        return {name: q.window for name, q in self._local.items() if q.handles}

    def prepare_leave(self) -> None:
        """Before the goodbye: flush pushes and report final credits, in that order."""
        for handle in list(self._handles):
            handle._done()  # the message in the application's hands counts as processed
        self._flush()
        self._send_credits(force=False)

    def close(self) -> None:
        for local in self._local.values():
            local.closed = True
            for waiter in local.waiters:
                if not waiter.done():
                    waiter.set_result(None)
        for waiters in self._waiters.values():
            for fut in waiters:
                if not fut.done():
                    fut.set_result(None)
        stranded = sum(len(b) for b in self._backlog.values())
        if stranded:
            _log.warning("closing with %d pushed messages no worker took", stranded)
            self._stats["lost_in_flight"] += stranded
        for pusher in self._pushers.values():
            pusher.close(linger=_PUSH_LINGER)
        self._puller.close()

    # -- pusher side -------------------------------------------------------------

    async def push(self, queue: str, data: bytes | str, headers: Mapping[str, str] | None,
                   timeout: float, closed: Callable[[], bool]) -> None:
        checked_queue_key(queue)
        if type(data) is not bytes:
            data = data.encode() if isinstance(data, str) else bytes(data)
        if len(data) > self._config.max_message_size:
            raise MessageTooLarge(len(data), self._config.max_message_size)
        seq = self._seq
        self._seq = seq + 1
        item = _wire.Item(seq, time.time(), dict(headers) if headers else None, data)
        if self._backlog.get(queue):
            self._pump(queue)
        target = self._pick(queue)
        if target is None:
            target = await self._wait_for_target(queue, timeout, closed)
        self._assign(target, item)
        self._stats["pushed"] += 1

    def worker_count(self, queue: str) -> int:
        return len(self._targets_for(queue))

    def _targets_for(self, queue: str) -> list[_Target]:
        targets = self._target_cache.get(queue)
        if targets is None:
            targets = []
            for rec in self._alive_peers():
                window = rec.queues.get(queue)
                if window and rec.pull:
                    targets.append(self._target(rec.id, queue, window, rec.pull))
            local = self._local.get(queue)
            if local is not None and local.handles:
                targets.append(self._target(self.node_id, queue, local.window, None))
            self._target_cache[queue] = targets
        return targets

    def _target(self, peer_id: str, queue: str, window: int, endpoint: str | None) -> _Target:
        target = self._targets.get((peer_id, queue))
        if target is None:
            pusher = None
            if endpoint is not None:
                pusher = self._pushers.get(peer_id)
                if pusher is None:
                    pusher = self._pushers[peer_id] = Pusher(self._ctx, endpoint)
            local = self._local.get(queue) if endpoint is None else None
            target = self._targets[(peer_id, queue)] = _Target(peer_id, queue, window,
                                                               pusher, local)
        target.window = window
        return target

    def _pick(self, queue: str) -> _Target | None:
        targets = self._targets_for(queue)
        n = len(targets)
        start = self._rr.get(queue, 0)
        for i in range(n):
            target = targets[(start + i) % n]
            if target.credit > 0:
                self._rr[queue] = (start + i + 1) % n
                return target
        return None

    async def _wait_for_target(self, queue: str, timeout: float,
                               closed: Callable[[], bool]) -> _Target:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                while True:
                    if closed():
                        raise ClosedError("node is not running")
                    fut = loop.create_future()
                    waiters = self._waiters.setdefault(queue, [])
                    waiters.append(fut)
                    try:
                        await fut
                    finally:
                        with contextlib.suppress(ValueError):
                            waiters.remove(fut)
                    target = self._pick(queue)
                    if target is not None:
                        return target
        except TimeoutError:
            if not self._targets_for(queue):
                raise NoRespondersError(queue) from None
            raise RequestTimeout(f"push to {queue!r}: every worker is busy", timeout) from None

    def _assign(self, target: _Target, item: _wire.Item) -> None:
        target.sent += 1
        target.inflight.append(item)
        local = target.local
        if local is not None:
            msg = Message(target.queue, item.payload, self.name, self.node_id, item.seq,
                          item.ts, item.headers)
            local.put(((msg, target),))
            return
        target.outgoing.append(item)
        self._dirty.add(target)
        if self._flush_handle is None:
            self._flush_handle = asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_handle = None
        dirty, self._dirty = self._dirty, set()
        for target in dirty:
            items, target.outgoing = target.outgoing, []
            if not items or target.pusher is None:
                continue
            frame = _wire.encode_data(checked_topic_key(target.queue),
                                      _wire.Batch(self.node_id, self.name, target.flushed, items))
            target.flushed += len(items)
            with contextlib.suppress(SocketClosed):
                target.pusher.send(frame)

    def _wake(self, queue: str) -> None:
        if self._backlog.get(queue):
            self._pump(queue)
        for fut in self._waiters.get(queue, ()):
            if not fut.done():
                fut.set_result(None)
                break

    def _pump(self, queue: str) -> None:
        """Hand re-queued messages (from departed workers) out first, in order."""
        backlog = self._backlog[queue]
        while backlog:
            target = self._pick(queue)
            if target is None:
                return
            self._assign(target, backlog.popleft())
            self._stats["redelivered"] += 1

    def on_credit(self, credit: _wire.Credit) -> None:
        target = self._targets.get((credit.id, credit.queue))
        if target is None:
            return
        self._ack(target, min(credit.consumed, target.flushed) - target.acked)

    def _ack(self, target: _Target, n: int) -> None:
        if n <= 0:
            return
        target.acked += n
        for _ in range(min(n, len(target.inflight))):
            target.inflight.popleft()
        self._wake(target.queue)

    def peers_changed(self) -> None:
        """Someone joined, left, was lost or changed interest: recompute targets."""
        self._target_cache.clear()
        for queue in {*self._waiters, *(q for q, b in self._backlog.items() if b)}:
            self._wake(queue)

    def peer_updated(self, rec: PeerRecord) -> None:
        """A worker stopped pulling some queues: give their unconsumed messages to others."""
        for (peer_id, queue), target in list(self._targets.items()):
            if peer_id == rec.id and queue not in rec.queues:
                self._requeue(target)
        self.peers_changed()

    def peer_gone(self, peer_id: str, *, graceful: bool) -> None:
        for (pid, _queue), target in list(self._targets.items()):
            if pid != peer_id:
                continue
            if graceful:
                self._requeue(target)
            else:
                del self._targets[(pid, target.queue)]
                lost = len(target.inflight)
                if lost:
                    self._stats["lost_in_flight"] += lost
                    _log.warning("worker %s lost with %d unprocessed messages of queue %s",
                                 peer_id[:8], lost, target.queue)
        pusher = self._pushers.pop(peer_id, None)
        if pusher is not None:
            pusher.close(linger=0)
        self.peers_changed()

    def _requeue(self, target: _Target) -> None:
        del self._targets[(target.peer_id, target.queue)]
        self._dirty.discard(target)
        if target.inflight:
            self._backlog.setdefault(target.queue, deque()).extendleft(reversed(target.inflight))
        self._target_cache.pop(target.queue, None)

    # -- worker side -------------------------------------------------------------

    def pull(self, queue: str, prefetch: int, handler: Handler | None) -> Pull:
        checked_queue_key(queue)
        if prefetch < 1:
            raise ConfigError("prefetch", "must be >= 1")
        local = self._local.get(queue)
        if local is None or local.closed:
            local = self._local[queue] = _LocalQueue(queue, prefetch)
        local.window = max(local.window, prefetch)
        local.handles += 1
        pull = Pull(self, local)
        self._handles.add(pull)
        if handler is not None:
            pull._task = asyncio.get_running_loop().create_task(pull._run(handler))
        self._target_cache.pop(queue, None)
        if local.handles == 1:
            self._on_interest_changed()
        return pull

    def _detach(self, pull: Pull, local: _LocalQueue) -> None:
        self._handles.discard(pull)
        local.handles -= 1
        if local.handles > 0:
            return
        local.closed = True
        self._local.pop(local.name, None)
        self._target_cache.pop(local.name, None)
        own = {s for _, s in local.items if isinstance(s, _Target)}
        local.items.clear()
        for target in own:  # our own pushes to ourselves go back to the pusher side
            if self._targets.get((target.peer_id, target.queue)) is target:
                self._requeue(target)
        self._send_credits(force=False)  # final totals travel before the new hello
        self._on_interest_changed()

    def _consumed(self, stream: _InStream | _Target) -> None:
        if isinstance(stream, _Target):
            self._ack(stream, 1)
            return
        if stream.retired:
            return
        stream.consumed += 1
        stream.changed_at = time.monotonic()
        self._credit_dirty.add(stream)
        if self._credit_handle is None:
            self._credit_handle = asyncio.get_running_loop().call_soon(self._send_credits)

    def _send_credits(self, force: bool = False) -> None:
        """Report consumption to pushers; `force` repeats recent totals (lost-credit cover)."""
        self._credit_handle = None
        dirty, self._credit_dirty = self._credit_dirty, set()
        if force:
            now = time.monotonic()
            dirty.update(s for s in self._streams.values()
                         if now - s.changed_at < _CREDIT_RESEND_FOR)
        for stream in dirty:
            if stream.retired or (stream.consumed == stream.reported and not force):
                continue
            stream.reported = stream.consumed
            self._send_control(stream.pusher_id,
                               _wire.Credit(self.node_id, stream.queue, stream.consumed))

    def tick(self) -> None:
        self._send_credits(force=True)

    async def _read(self) -> None:
        while True:
            try:
                batches = await self._puller.recv_many()
            except SocketClosed:
                return
            for frames in batches:
                self._on_work(frames)

    def _on_work(self, frames: list[bytes]) -> None:
        try:
            if len(frames) != 1:
                raise ProtocolError(f"work message of {len(frames)} frames")
            frame = frames[0]
            key, offset = _wire.split_data(frame)
            batch = _wire.decode_data(frame, offset, self._max_wire)
            queue = key[:-1].decode()
        except (ProtocolError, UnicodeDecodeError) as exc:
            self._quiet.drop("work", str(exc))
            return
        local = self._local.get(queue)
        if local is None:
            return  # we stopped pulling it; the pusher re-queues what we did not consume
        stream_key = (batch.source, queue)
        stream = self._streams.get(stream_key)
        if stream is None or batch.topic_seq < stream.received:
            if stream is not None:
                stream.retired = True  # the pusher restarted: a new numbering begins
            stream = self._streams[stream_key] = _InStream(batch.source, queue, batch.topic_seq)
        stream.received = batch.topic_seq + len(batch.items)
        name, source = batch.name, batch.source
        self._stats["pulled"] += len(batch.items)
        local.put((Message(queue, it.payload, name, source, it.seq, it.ts, it.headers), stream)
                  for it in batch.items)

