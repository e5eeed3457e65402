"""The one module that touches pyzmq: typed wrappers over asyncio sockets.

Everything else in zeromesh sees `bytes` frames and our own errors. Sends are
non-blocking on a sync shadow of the asyncio socket (no future per message);
receives wait once for readability and then drain what is queued, so a burst
costs one await, not one per message.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import sys
from collections.abc import Callable, Iterator
from typing import Final, TypeVar

import zmq
import zmq.asyncio

from ._security import ZAP_DOMAIN, Curve, ZapHandler
from .errors import SocketClosed, WouldBlock

_log = logging.getLogger("patterns.socket")

DEFAULT_MAX_MESSAGE_SIZE: Final[int] = 16 * 1024 * 1024
_HANDSHAKE_MS: Final[int] = 5000
"""A peer that has not finished the ZMTP handshake by then is dropped (libzmq: 30 s)."""
_HEARTBEAT_IVL_MS: Final[int] = 10_000
"""ZMTP PING on every connection this often: a backstop that drops half-open TCP
connections (a peer host gone without a FIN). Who is alive is the mesh's own
heartbeats' business; at 1 s, PING/PONG on the 4 connections per peer were most
of what the ZeroMQ I/O thread of an idle node did."""
_HEARTBEAT_TIMEOUT_MS: Final[int] = 3000
"""No traffic this long after a PING: the connection is dropped (and reconnects)."""
_RECONNECT_IVL_MS: Final[int] = 100
_RECONNECT_IVL_MAX_MS: Final[int] = 1000
_CONNECT_TIMEOUT_MS: Final[int] = 1500
"""A TCP connect still pending this long is abandoned and tried afresh. A lost SYN is
otherwise retransmitted by the kernel after 1, 3, 7, 15, 31 s: on a LAN that drops a
burst of packets (a busy Wi-Fi, a saturated host's backlog) a peer that would answer at
once was then reached only half a minute later."""
_DISPATCH_ROUNDS: Final[int] = 8
_DRAIN_LIMIT: Final[int] = 256
"""Messages taken per readiness callback before other work on the loop gets a turn."""
# Plain ints: pyzmq's enum flags cost microseconds per operation on the hot path.
_EVENTS: Final[int] = int(zmq.EVENTS)
_POLLIN: Final[int] = int(zmq.POLLIN)
_POLLOUT: Final[int] = int(zmq.POLLOUT)
_NOBLOCK: Final[int] = int(zmq.NOBLOCK)
_NOBLOCK_SNDMORE: Final[int] = int(zmq.NOBLOCK) | int(zmq.SNDMORE)
_M = TypeVar("_M", list[bytes], list[memoryview])
"""One received message: its frames, copied or viewed."""
_MAX_TRACKED: Final[int] = 4096
"""Tracked connections (`Socket.track_peers`) past which closed ones are pruned."""


class Context:
    """Owns the ZeroMQ context of one node; close it last.

    With `curve`, every socket is encrypted and authenticated (see `_security`).
    """

    def __init__(self, curve: Curve | None = None) -> None:
        self._ctx = zmq.asyncio.Context()
        self._sockets: set[Socket] = set()
        self.curve = curve
        self._zap = ZapHandler(self._ctx, curve) if curve is not None else None

    def socket(self, kind: int, *, max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
               sndhwm: int | None = None, rcvhwm: int | None = None) -> Socket:
        raw = self._ctx.socket(kind)
        raw.setsockopt(zmq.LINGER, 0)
        raw.setsockopt(zmq.MAXMSGSIZE, max_message_size)
        raw.setsockopt(zmq.HANDSHAKE_IVL, _HANDSHAKE_MS)  # a stalled greeting frees its slot
        raw.setsockopt(zmq.HEARTBEAT_IVL, _HEARTBEAT_IVL_MS)
        raw.setsockopt(zmq.HEARTBEAT_TIMEOUT, _HEARTBEAT_TIMEOUT_MS)
        raw.setsockopt(zmq.RECONNECT_IVL, _RECONNECT_IVL_MS)
        raw.setsockopt(zmq.RECONNECT_IVL_MAX, _RECONNECT_IVL_MAX_MS)
        raw.setsockopt(zmq.CONNECT_TIMEOUT, _CONNECT_TIMEOUT_MS)
        if sndhwm is not None:
            raw.setsockopt(zmq.SNDHWM, sndhwm)
        if rcvhwm is not None:
            raw.setsockopt(zmq.RCVHWM, rcvhwm)
        sock = Socket(raw, self._sockets, self.curve)
        self._sockets.add(sock)
        return sock

    def close(self) -> None:
        """Close what is still open and end the context.

        Blocks while lingering sockets flush (bounded by their linger): call it
        off the event loop.
        """
        for sock in list(self._sockets):
            sock.close()
        if self._zap is not None:
            self._zap.stop()
        self._ctx.term()

    def revoke(self) -> None:
        """Keys left the allowlist (`Curve.replace_allowlist`): cut their live connections.

        ZAP checks a connection only at its handshake. From now on every message a bound
        socket receives is checked against the allowlist; one from a revoked key is
        dropped and its TCP connection cut (the reconnect is refused by ZAP). Connections
        that only receive (a subscriber on our XPUB) are tracked and cut at once. Call it
        on the loop.
        """
        for sock in list(self._sockets):
            sock.revoke()


class Socket:
    """A zmq socket seen as frames of bytes, with non-blocking sends."""

    def __init__(self, raw: zmq.asyncio.Socket, registry: set[Socket],
                 curve: Curve | None = None) -> None:
        self._async = raw
        self._registry = registry
        self._curve = curve
        self._sync: zmq.Socket[bytes] = zmq.Socket.shadow(raw.underlying)
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._fd = -1
        self._want_read: list[asyncio.Future[None]] = []
        self._want_write: list[asyncio.Future[None]] = []
        """Tasks waiting for readiness: every one of them (many requests may wait to send)."""
        self._on_readable: Callable[[], None] | None = None
        self._dispatching = False
        self._drained = False
        self._ipv6 = False
        self._rounds = _DISPATCH_ROUNDS
        """Drains per readiness check before other work on the loop gets a turn."""
        self._server = False
        """A CURVE server: each message it receives carries its sender's key (ZAP User-Id)."""
        self._screen = False
        """Check each received message's key (after a revocation; costs ~1 µs a message)."""
        self._peers: dict[int, tuple[bytes, tuple[object, object]]] | None = None
        """`track_peers`: fd -> (key, (peer, local address)) of the connections seen."""
        self._seen_revoked: set[int] = set()
        """Fds that messages of revoked keys came from since the last `revoke`: checked
        (and cut) at the first; later ones are only dropped. A revoked key gets no new
        connection, so theirs are the same connection, by then closed and its fd maybe
        another peer's."""

    @property
    def closed(self) -> bool:
        return self._closed

    def watch(self, on_readable: Callable[[], None] | None = None) -> None:
        """Wait for readiness with our own reader on the ZeroMQ FD (call on the loop).

        For sockets that other tasks send on while a reader waits: the ZeroMQ
        FD is edge-triggered, and a send can consume the edge of an incoming
        message, leaving a plain poll asleep forever. A watched socket checks
        ``EVENTS`` again after each of our sends. With `on_readable`, that
        callback is called on the loop whenever messages are waiting and must
        drain them with `recv_nowait` (no task, no future: the lowest latency);
        otherwise `recv_many` waits as usual. Close a watched socket on the loop.
        """
        loop = self._loop = asyncio.get_running_loop()
        fd = self._sync.getsockopt(zmq.FD)
        assert isinstance(fd, int)
        self._fd = fd
        self._on_readable = on_readable
        loop.add_reader(fd, self._check_events)
        if on_readable is not None:
            loop.call_soon(self._check_events)

    def deliver(self, on_messages: Callable[[list[list[bytes]]], None],
                limit: int = _DRAIN_LIMIT) -> None:
        """Hand every batch of waiting messages (up to `limit` at a time) to
        `on_messages`, on the running loop, as soon as they arrive (`watch`)."""
        self._deliver(self.recv_nowait, on_messages, limit)

    def deliver_views(self, on_messages: Callable[[list[list[memoryview]]], None],
                      limit: int = _DRAIN_LIMIT, rounds: int = _DISPATCH_ROUNDS) -> None:
        """`deliver` with views of ZeroMQ's buffers (`recv_views_nowait`); at most `rounds`
        drains of `limit` messages before other work on the loop gets a turn."""
        self._deliver(self.recv_views_nowait, on_messages, limit, rounds)

    def _deliver(self, take: Callable[[int], list[_M]], on_messages: Callable[[list[_M]], None],
                 limit: int, rounds: int = _DISPATCH_ROUNDS) -> None:
        def drain() -> None:
            try:
                batch = take(limit)
            except SocketClosed:  # closed by another callback of this loop iteration
                return
            on_messages(batch)

        self._rounds = rounds
        self.watch(drain)

    def unwatch(self) -> None:
        """Stop calling the `watch` callback (on the loop); the socket stays open."""
        if self._loop is not None and self._on_readable is not None and not self._closed:
            self._loop.remove_reader(self._fd)
            self._on_readable = None

    def _check_events(self) -> None:
        if self._closed or self._dispatching:
            return
        get = self._sync.getsockopt
        for _ in range(self._rounds):
            events = get(_EVENTS)
            assert isinstance(events, int)
            if events & _POLLOUT and self._want_write:
                _wake_all(self._want_write)
            if not events & _POLLIN:
                return
            if self._on_readable is None:
                _wake_all(self._want_read)
                return
            self._dispatching = True
            self._drained = False
            try:
                self._on_readable()
            except BaseException:
                # The drain took the FD's signal: without a look later, what is still
                # queued (and all that follows on this pipe) would never be delivered.
                self._loop.call_soon(self._check_events)  # type: ignore[union-attr]
                raise
            finally:
                self._dispatching = False
            if self.closed:  # the callback closed us (a property: mypy must not narrow)
                return
            if self._drained and not self._want_write:
                return  # the drain saw no more input, and nothing was sent since
        assert self._loop is not None
        self._loop.call_soon(self._check_events)  # a flood: let other work run first

    def _after_send(self) -> None:
        """A send may have eaten the FD edge of incoming messages: look once more, soon."""
        self._drained = False
        if self._dispatching:
            return  # the dispatch loop looks again itself
        events = self._sync.getsockopt(_EVENTS)
        assert isinstance(events, int)
        if ((events & _POLLIN and (self._on_readable or self._want_read))
                or (events & _POLLOUT and self._want_write)):
            assert self._loop is not None
            self._loop.call_soon(self._check_events)

    def recv_nowait(self, limit: int = 256) -> list[list[bytes]]:
        """Up to `limit` queued messages, without waiting (maybe none).

        Meant for the `watch` callback, which has just seen input waiting; after
        the first message it checks ``EVENTS`` before each receive rather than
        ending on ``EAGAIN`` (a raised ``zmq.Again`` costs more than the check).

        Raises:
            SocketClosed: the socket was closed.
        """
        if self._screen or self._peers is not None:
            return self._take(self._screened(_copies), limit)
        return self._take(self._sync.recv_multipart, limit)

    def recv_views_nowait(self, limit: int = 256) -> list[list[memoryview]]:
        """`recv_nowait` without copying: each frame a view of ZeroMQ's own buffer.

        For data sockets whose frames are batches of up to 256 KiB, decoded once
        and dropped: a copy of each would cost more than decoding it.
        """
        def recv(flags: int) -> list[memoryview]:
            return [frame.buffer for frame in self._sync.recv_multipart(flags, copy=False)]

        screened = self._screen or self._peers is not None
        return self._take(self._screened(_views) if screened else recv, limit)

    def _screened(self, convert: Callable[[list[zmq.Frame]], _M]) -> Callable[[int], _M]:
        """A receive that drops (and cuts off) messages from keys no longer allowed
        (`revoke`) and notes the key of each connection (`track_peers`)."""
        def recv(flags: int) -> _M:
            while True:  # ends with a message, or zmq.Again when only dropped ones were left
                frames = self._sync.recv_multipart(flags, copy=False)
                if self._screen and not self._admits(frames[0]):
                    continue
                if self._peers is not None:
                    self._track(frames[0])
                return convert(frames)

        return recv

    def _admits(self, frame: zmq.Frame) -> bool:
        """Is the sender of `frame` still allowed? If not, cut its connection."""
        curve = self._curve
        key = _key(frame)
        if curve is None or key is None or key in curve.allowed:
            return True  # (no key: made by libzmq itself, an XPUB's unsubscription)
        try:
            fd, peer = frame.get(zmq.SRCFD), frame.get("Peer-Address")
        except zmq.ZMQError:
            fd, peer = -1, ""
        if fd in self._seen_revoked:  # (its connection is cut or gone: the fd may be reused)
            return False
        self._seen_revoked.add(fd)
        with _dup(fd) as conn:  # (the message may have outlived its connection: check)
            where = _where(conn) if conn is not None else None
            if conn is not None and where is not None and _ip(where[0]) == _ip(peer):
                _cut(conn)
                curve.note_cut(key)
        return False

    def track_peers(self) -> None:
        """Remember which key each connection that sends us something belongs to, so that
        `revoke` can cut one that never sends again (a subscriber on our XPUB)."""
        if self._curve is not None:
            self._peers = {}

    def _track(self, frame: zmq.Frame) -> None:
        peers = self._peers
        assert peers is not None
        key = _key(frame)
        if key is None:
            return
        fd = frame.get(zmq.SRCFD)
        with _dup(fd) as conn:
            where = _where(conn) if conn is not None else None
        if where is not None:  # (each time: the fd may now be another connection of `key`)
            if len(peers) >= _MAX_TRACKED:
                self._prune()
            peers[fd] = (key, where)

    def _prune(self) -> None:
        """Forget tracked connections that are closed (their fd gone or reused)."""
        peers = self._peers or {}
        for fd, (_, where) in list(peers.items()):
            with _dup(fd) as conn:
                if conn is None or _where(conn) != where:
                    del peers[fd]

    def revoke(self) -> None:
        """See `Context.revoke`."""
        curve = self._curve
        if not self._server or curve is None:
            return
        self._screen = True
        self._seen_revoked.clear()
        peers = self._peers or {}
        for fd, (key, where) in list(peers.items()):
            if key in curve.allowed:
                continue
            del peers[fd]
            with _dup(fd) as conn:
                if conn is not None and _where(conn) == where:
                    _cut(conn)
                    curve.note_cut(key)

    def _take(self, recv: Callable[[int], _M], limit: int) -> list[_M]:
        if self._closed:  # its libzmq handle is gone and may be reused by another socket
            raise SocketClosed("socket closed")
        get = self._sync.getsockopt
        out: list[_M] = []
        try:
            out.append(recv(_NOBLOCK))
            while len(out) < limit:
                events = get(_EVENTS)
                assert isinstance(events, int)
                if not events & _POLLIN:
                    self._drained = True
                    break
                out.append(recv(_NOBLOCK))
        except zmq.ZMQError as exc:  # Again after all (a race), or closed
            if not out and not isinstance(exc, zmq.Again):
                raise SocketClosed(str(exc)) from exc
        return out

    async def _ready(self, flag: int) -> None:
        assert self._loop is not None
        while True:
            if self._closed:
                raise SocketClosed("socket closed")
            events = self._sync.getsockopt(zmq.EVENTS)
            assert isinstance(events, int)
            if events & flag:
                return
            fut = self._loop.create_future()
            waiting = self._want_read if flag == zmq.POLLIN else self._want_write
            waiting.append(fut)
            try:
                await fut
            finally:
                if fut in waiting:  # cancelled before it was woken: forget it
                    waiting.remove(fut)

    def set_option(self, option: int, value: int | bytes) -> None:
        self._sync.setsockopt(option, value)

    def bind(self, host: str, port: int = 0) -> str:
        """Bind `tcp://host:port` (0 = OS-assigned) and return the real endpoint
        (an IPv6 `host` goes in brackets: ``tcp://[fd00::1]:5000``)."""
        self._family(ipv6=":" in host)
        if ":" in host:
            host = f"[{host}]"
        curve = self._curve
        if curve is not None:  # a CURVE server: only allowlisted clients get through ZAP
            self._server = True
            sync = self._sync
            sync.setsockopt(zmq.CURVE_SERVER, 1)
            sync.setsockopt(zmq.CURVE_SECRETKEY, curve.secret)
            sync.setsockopt(zmq.ZAP_DOMAIN, ZAP_DOMAIN)
        self._sync.bind(f"tcp://{host}:{port}")
        endpoint = self._sync.getsockopt(zmq.LAST_ENDPOINT)
        assert isinstance(endpoint, bytes)  # getsockopt of a string option
        return endpoint.decode()

    def connect(self, endpoint: str) -> None:
        """Connect; on a secure context only as a CURVE client of the key trusted for
        `endpoint` — with none known, not at all (fail closed, logged once)."""
        curve = self._curve
        if curve is not None:
            server_key = curve.server_key(endpoint)
            if server_key is None:
                _log.warning("not connecting to %s: no trusted CURVE key for it", endpoint)
                return
            if server_key not in curve.allowed:  # revoked since it was trusted
                _log.debug("not connecting to %s: its CURVE key was revoked", endpoint)
                return
            sync = self._sync
            sync.setsockopt(zmq.CURVE_SERVER, 0)
            sync.setsockopt(zmq.CURVE_SERVERKEY, server_key)
            sync.setsockopt(zmq.CURVE_PUBLICKEY, curve.public)
            sync.setsockopt(zmq.CURVE_SECRETKEY, curve.secret)
        self._family(ipv6=endpoint.startswith("tcp://["))
        self._sync.connect(endpoint)

    def _family(self, *, ipv6: bool) -> None:
        """libzmq refuses IPv6 endpoints (ENODEV) unless the socket allows them, and an
        IPv6-enabled socket binds an IPv4 address as ``tcp://[::ffff:a.b.c.d]:port``; each
        bind or connect takes the option as it is then, so set it per endpoint (only when
        it changes: an IPv4-only node never touches it)."""
        if ipv6 != self._ipv6:
            self._ipv6 = ipv6
            self._sync.setsockopt(zmq.IPV6, int(ipv6))

    def disconnect(self, endpoint: str) -> None:
        with contextlib.suppress(zmq.ZMQError):  # not connected: nothing to undo
            self._sync.disconnect(endpoint)

    def send(self, frame: bytes | bytearray) -> None:
        """Queue a single-frame message without blocking.

        Raises:
            WouldBlock: the peer's queue is at its high-water mark.
            SocketClosed: the socket was closed.
        """
        if self._closed:  # its libzmq handle is gone and may be reused by another socket
            raise SocketClosed("socket closed")
        try:
            self._sync.send(frame, _NOBLOCK, copy=False)
        except zmq.Again as exc:
            raise WouldBlock() from exc
        except zmq.ZMQError as exc:
            raise SocketClosed(str(exc)) from exc
        if self._loop is not None:
            self._after_send()

    def send_routed(self, identity: bytes, frame: bytes | bytearray) -> None:
        """ROUTER only: queue `frame` for the peer `identity` (ROUTER strips the id frame).

        A peer that is gone or full drops it silently (ROUTER semantics).

        Raises:
            SocketClosed: the socket was closed.
        """
        if self._closed:  # its libzmq handle is gone and may be reused by another socket
            raise SocketClosed("socket closed")
        try:
            # two sends, not pyzmq's send_multipart: it checks each part in Python and
            # builds its flags with enum arithmetic, several times dearer than this
            send = self._sync.send
            send(identity, _NOBLOCK_SNDMORE, copy=True)
            send(frame, _NOBLOCK, copy=True)
        except zmq.Again:
            pass  # only with ROUTER_MANDATORY, which we do not set
        except zmq.ZMQError as exc:
            raise SocketClosed(str(exc)) from exc
        if self._loop is not None:
            self._after_send()

    async def wait_writable(self) -> None:
        """Wait until a send would not block.

        Raises:
            SocketClosed: the socket was closed.
        """
        if self._loop is not None:
            await self._ready(zmq.POLLOUT)
            return
        await self._poll(zmq.POLLOUT)

    async def _poll(self, event: int) -> None:
        """pyzmq's poll on an unwatched socket; closing the socket cancels its future,
        which is our SocketClosed unless the waiting task itself is being cancelled."""
        try:
            await self._async.poll(None, event)  # type: ignore[call-arg]
        except zmq.ZMQError as exc:
            raise SocketClosed(str(exc)) from exc
        except asyncio.CancelledError as exc:
            task = asyncio.current_task()
            if self._closed and (task is None or not task.cancelling()):
                raise SocketClosed("socket closed") from exc
            raise

    def monitor(self, events: int) -> Socket:
        """A PAIR socket receiving this socket's `events` (see `monitor_events`)."""
        pair = self._async.get_monitor_socket(events)
        sock = Socket(pair, self._registry)
        self._registry.add(sock)
        return sock

    def stop_monitor(self) -> None:
        if not self._closed:
            with contextlib.suppress(zmq.ZMQError):
                self._async.disable_monitor()

    async def monitor_events(self) -> list[int]:
        """On a monitor socket: wait for events, return their ids (e.g. ``EVENT_DISCONNECTED``).

        Raises:
            SocketClosed: the monitor was closed.
        """
        return [int.from_bytes(frames[0][:2], sys.byteorder)
                for frames in await self.recv_many() if len(frames[0]) == 6]

    async def recv_many(self, limit: int = 256) -> list[list[bytes]]:
        """Wait until a message is readable, then return up to `limit` queued ones."""
        if self._loop is not None:
            await self._ready(zmq.POLLIN)
        else:
            await self._poll(zmq.POLLIN)
        out: list[list[bytes]] = []
        recv: Callable[[int], list[bytes]] = self._sync.recv_multipart
        if self._screen or self._peers is not None:
            recv = self._screened(_copies)
        try:
            while len(out) < limit:
                out.append(recv(zmq.NOBLOCK))
        except zmq.Again:
            pass  # drained
        except zmq.ZMQError as exc:
            if not out:
                raise SocketClosed(str(exc)) from exc
        return out

    def close(self, linger: float = 0.0) -> None:
        if not self._closed:
            self._closed = True
            self._registry.discard(self)
            if self._loop is not None:
                self._loop.remove_reader(self._fd)
                for fut in (*self._want_read, *self._want_write):
                    if not fut.done():
                        fut.set_exception(SocketClosed("socket closed"))
                self._want_read.clear()
                self._want_write.clear()
            self._async.close(linger=int(linger * 1000))


def _wake_all(waiting: list[asyncio.Future[None]]) -> None:
    for fut in waiting:
        if not fut.done():
            fut.set_result(None)
    waiting.clear()


def _key(frame: zmq.Frame) -> bytes | None:
    """The sender's CURVE key: the User-Id our ZAP handler gave its connection."""
    try:
        user = frame.get("User-Id")
    except zmq.ZMQError:
        return None
    return user.encode("ascii", "replace") if isinstance(user, str) else bytes(user)


def _copies(frames: list[zmq.Frame]) -> list[bytes]:
    return [frame.bytes for frame in frames]


def _views(frames: list[zmq.Frame]) -> list[memoryview]:
    return [frame.buffer for frame in frames]


@contextlib.contextmanager
def _dup(fd: int) -> Iterator[socket.socket | None]:
    """A private handle on the TCP socket behind libzmq's `fd` (None if it is none):
    libzmq keeps its own, and closes it itself."""
    try:
        copy = os.dup(fd)
    except OSError:
        yield None
        return
    try:
        conn = socket.socket(fileno=copy)
    except OSError:
        os.close(copy)
        yield None
        return
    with conn:
        yield conn


def _where(conn: socket.socket) -> tuple[object, object] | None:
    """Both ends of a connection (None if it is not connected)."""
    try:
        return conn.getpeername(), conn.getsockname()
    except OSError:
        return None


def _ip(address: object) -> str:
    """The IP of a socket address or of libzmq's Peer-Address, without a zone."""
    host = address[0] if isinstance(address, tuple) else str(address)
    return str(host).partition("%")[0]


def _cut(conn: socket.socket) -> None:
    """End the connection under libzmq's feet: it sees the peer gone, and drops the pipe."""
    with contextlib.suppress(OSError):
        conn.shutdown(socket.SHUT_RDWR)
