"""The MQTT 5 adapter: paho-mqtt driven by the asyncio loop, with manual acks.

paho is used directly (not aiomqtt) for ``manual_ack``: an imported message
is PUBACKed only when the core settles it, i.e. once it is in the mesh. The
loop integration follows paho's asyncio example (a reader and a writer on the
socket calling ``loop_read``/``loop_write``, a 1 s timer calling
``loop_misc``); only the blocking TCP/TLS connect runs in a worker thread, and
the socket is handed to the loop once that thread is done, so no paho call
ever runs on two threads at once.

Each `connect` uses a fresh paho client: what the old one still held
(unacknowledged publishes) is the core's to resend, not paho's. The session
itself (subscriptions, imports queued while away, unacked imports redelivered
with DUP) is the broker's, kept by ``clean_start=False`` and the session
expiry; the filters it was subscribed to are remembered in the data dir
(`_session`), so that those no import pattern wants any more are unsubscribed.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import os
import re
import secrets
import socket
import ssl
from collections import deque
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Concatenate, Final, Literal, NamedTuple, ParamSpec

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from ..errors import ConfigError
from ._backlog import MARKS
from ._hub import ID_HEADER, HubRefused, HubUnreachable, Incoming, Unsendable
from ._session import SessionFilters
from ._settings import UplinkSettings, tls_context
from ._subjects import Subjects

_log = logging.getLogger("mesh.uplink")

CONNECT_TIMEOUT: Final[float] = 5.0
"""Seconds for TCP, TLS, CONNACK and SUBACK together."""
KEEPALIVE: Final[int] = 10
"""Seconds: a broker gone silent is noticed within about twice this (paho's PINGREQ)."""
CLOSE_WAIT: Final[float] = 1.0
"""Seconds `close` waits for the DISCONNECT to leave before it just closes the socket."""
FAST_PUBLISH: Final[bool] = all(
    callable(getattr(paho.Client, name, None))
    for name in ("_mid_generate", "_packet_queue", "_handle_pubackcomp"))
"""Whether this paho has what `_Client.publish_qos1` uses (else paho's `publish` is)."""
_READ_AHEAD: Final[int] = 64 * 1024
"""Bytes a read takes from the socket at most (paho then reads from them)."""
INBOX_MAX: Final[int] = 4096
"""Imports read from the broker and not yet taken by the core. Past it the socket is not
read until half of them are taken, so TCP holds the broker back: the Receive Maximum we
send is not enough (mosquitto 2.0 sent 30,000 QoS 1 imports for 500 acknowledged, and
QoS 0 ones have no flow control at all), and a flood would fill memory."""
_NO_SUBSCRIPTION: Final[int] = 0x11
"""UNSUBACK: the session had no such subscription (expired meanwhile): unsubscribed too."""
_TRANSIENT: Final = frozenset({136, 137, 159})
"""CONNACK codes worth a quick retry: server unavailable, busy, connection rate exceeded."""

_P = ParamSpec("_P")


class _Token(NamedTuple):
    """What `settle` needs: the client (connection) that received the message, and its mid."""

    client: paho.Client
    mid: int
    qos: int


def client_id(prefix: str, node_name: str) -> str:
    """``zeromesh-<prefix>-<node>``, in characters every broker takes; hashed when long,
    as some brokers cap client ids (at 23, 64 or 128 characters)."""
    raw = f"zeromesh-{prefix}-{node_name}"
    clean = re.sub(r"[^0-9A-Za-z_-]", "-", raw)
    if len(clean) > 64:
        clean = clean[:55] + "-" + hashlib.blake2s(raw.encode(), digest_size=4).hexdigest()
    return clean


class _Client(paho.Client):
    """paho's client with its socket I/O buffered once the loop drives it.

    paho reads a packet with a `recv` per byte of its fixed header and one for the rest
    (three system calls per PUBACK) and writes each packet with a `send` of its own.
    Here a read takes what the socket has (up to `_READ_AHEAD`) and hands it to paho
    from memory, and the packets one `loop_write` produces leave in one `send`. What is
    left unsent counts as wanting to write, so paho keeps the writer registered for it;
    a close sends what it can first (the DISCONNECT). The CONNECT, written by the
    thread that connects before the loop takes over, goes straight out."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.buffering = False
        """Set when the loop takes the socket over."""
        self._rbuf = b""
        self._rpos = 0
        self._wbuf = bytearray()
        self.on_puback: Callable[[int, int], None] | None = None
        """Called with the mid and the reason code of each `publish_qos1`'s PUBACK."""
        self._ours: set[int] = set()
        """The mids of `publish_qos1`'s PUBLISHes not acknowledged yet."""

    def publish_qos1(self, topic: bytes, payload: bytes, properties: bytes) -> int:
        """Queue a QoS 1 PUBLISH built here; returns its mid (0: not connected).

        What paho's `publish` does for QoS 1, without what it keeps per message for
        its own retries and waiting (an MQTTMessage, an MQTTMessageInfo with a
        threading.Condition: a third of the adapter's CPU per export): the core
        keeps the window and resends after a reconnect, which is a new client. The
        PUBACK goes to `on_puback`. Uses paho's `_mid_generate` and `_packet_queue`
        (`FAST_PUBLISH` says whether this paho has them).

        Raises:
            ValueError: a topic paho would refuse (a wildcard, over 64 KiB), too large.
        """
        if self._sock is None:
            return 0
        if b"+" in topic or b"#" in topic:
            raise ValueError("Publish topic cannot contain wildcards.")
        if len(topic) > 0xFFFF:
            raise ValueError("Publish topic is too long.")
        remaining = 4 + len(topic) + len(properties) + len(payload)
        if remaining > 268_435_455:
            raise ValueError("Payload too large.")
        mid = self._mid_generate()
        packet = b"\x32%b%b%b%b%b%b" % (_varint(remaining), len(topic).to_bytes(2, "big"), topic,
                                        mid.to_bytes(2, "big"), properties, payload)
        self._ours.add(mid)
        self._packet_queue(paho.PUBLISH, packet, mid, 1)
        return mid

    def _handle_pubackcomp(self, cmd: Literal["PUBACK", "PUBCOMP"]) -> MQTTErrorCode:
        packet = self._in_packet["packet"]
        if cmd == "PUBACK" and len(packet) >= 2:
            mid = int.from_bytes(packet[:2], "big")
            if mid in self._ours and self.on_puback is not None:
                self._ours.discard(mid)
                self.on_puback(mid, packet[2] if len(packet) > 2 else 0)
                return MQTTErrorCode.MQTT_ERR_SUCCESS
        return super()._handle_pubackcomp(cmd)

    def buffered(self) -> int:
        """Bytes read from the socket that paho has not taken yet."""
        return len(self._rbuf) - self._rpos

    def want_write(self) -> bool:
        return bool(self._wbuf) or super().want_write()

    def _sock_recv(self, bufsize: int) -> bytes:
        buf, pos = self._rbuf, self._rpos
        if pos >= len(buf):
            if bufsize >= _READ_AHEAD:
                return super()._sock_recv(bufsize)
            buf, pos = super()._sock_recv(_READ_AHEAD), 0  # (raises when there is nothing)
            self._rbuf = buf
        end = min(pos + bufsize, len(buf))
        self._rpos = end
        return buf[pos:end]

    def _sock_send(self, buf: bytes | bytearray) -> int:
        if not self.buffering:
            return super()._sock_send(buf)
        self._wbuf += buf
        return len(buf)

    def _packet_write(self) -> MQTTErrorCode:
        rc = super()._packet_write()
        if self._wbuf and self._sock is not None:
            try:
                self._flush()
            except BlockingIOError:  # (paho has registered the writer for the rest)
                return MQTTErrorCode.MQTT_ERR_AGAIN
            except OSError as exc:
                self._easy_log(paho.MQTT_LOG_ERR, "failed to send on socket: %s", exc)
                return MQTTErrorCode.MQTT_ERR_CONN_LOST
        return rc

    def _flush(self) -> None:
        wbuf = self._wbuf
        while wbuf:
            sent = super()._sock_send(wbuf)
            del wbuf[:sent]

    def _sock_close(self) -> None:
        if self._wbuf and self._sock is not None:
            with contextlib.suppress(OSError):
                self._flush()
        self._wbuf.clear()
        self._rbuf, self._rpos = b"", 0
        super()._sock_close()


def _guarded(method: Callable[Concatenate[MqttHub, _P], None]
             ) -> Callable[Concatenate[MqttHub, _P], None]:
    """For paho callbacks: paho re-raises a callback's exception out of ``loop_read``,
    where only the loop's exception handler would see it. Here it ends the connection
    (resolves `lost` with it) instead."""
    @functools.wraps(method)
    def run(self: MqttHub, /, *args: _P.args, **kwargs: _P.kwargs) -> None:
        try:
            method(self, *args, **kwargs)
        except Exception as exc:
            _log.exception("mqtt uplink %s: %s failed", self.client_id, method.__name__)
            self._gone(exc)
    return run


class MqttHub:
    """One MQTT 5 broker connection at a time (the `Hub` protocol)."""

    kind = "mqtt"

    def __init__(self, settings: UplinkSettings, node_name: str,
                 sessions: Path | None = None) -> None:
        self.settings = settings
        self.subjects = Subjects("mqtt", settings.prefix)
        self.client_id = settings.client_id or client_id(settings.prefix, node_name)
        self._filters = (SessionFilters(sessions, settings.shown_url, self.client_id)
                         if sessions is not None else None)
        """Where the session's filters are remembered (`sessions`: a directory); None:
        nowhere, and none is ever unsubscribed."""
        self._client: _Client | None = None
        self._sock: paho.SocketLike | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._lost: asyncio.Future[BaseException] | None = None
        self._closed = asyncio.Event()
        self._connack: asyncio.Future[None] | None = None
        self._subacks: dict[int, asyncio.Future[list[ReasonCode]]] = {}
        self._sent: dict[int, tuple[asyncio.Future[bool], str]] = {}
        """mid -> the future `send` returned, and the topic (for a refusal's message)."""
        self._early: dict[int, ReasonCode] = {}
        self._inbox: deque[Incoming] = deque()
        self._arrived = asyncio.Event()
        self._paused = False
        """The socket is not read: the inbox is full (see INBOX_MAX)."""
        self._keys: dict[str, str] = {}
        """Import key base (mid and hash) -> the key last given for it (the latest MARKS)."""
        self._subjects_out: dict[str, bytes] = {}
        """Hub topics (encoded) by mesh topic, for `publish_qos1`; emptied at 4096."""
        self._nonce = secrets.token_hex(4)
        self._fresh = 0

    @property
    def lost(self) -> asyncio.Future[BaseException]:
        if self._lost is None:
            self._lost = asyncio.get_running_loop().create_future()
        return self._lost

    async def connect(self) -> None:
        await self.close()
        if self.lost.done():
            self._lost = None
        try:
            client = self._client = self._new_client()
        except ConfigError as exc:  # (a TLS file that went bad since the start)
            raise HubRefused(f"mqtt: {exc}") from None
        self._connack = asyncio.get_running_loop().create_future()
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                await self._open(client)
                await self._connack
                await self._subscriptions(client)
        except BaseException as exc:
            await self.close()
            where = self.settings.shown_url
            if isinstance(exc, TimeoutError):
                raise HubUnreachable(f"mqtt: {where}: no answer within {CONNECT_TIMEOUT} s"
                                     ) from None
            if isinstance(exc, OSError):
                raise HubUnreachable(f"mqtt: {where}: {exc}") from exc
            raise

    def _new_client(self) -> _Client:
        s = self.settings
        client = _Client(CallbackAPIVersion.VERSION2, client_id=self.client_id,
                             protocol=MQTTProtocolVersion.MQTTv5, reconnect_on_failure=False,
                             manual_ack=True)
        client.connect_timeout = CONNECT_TIMEOUT
        # No cap of paho's own: the core keeps to its window already, and with a cap paho
        # walks every message in flight after each PUBACK looking for one to send.
        client.max_inflight_messages_set(0)
        client.max_queued_messages_set(0)
        if s.username() is not None:
            client.username_pw_set(s.username(), s.secret())
        if s.tls:
            client.tls_set_context(tls_context(s))
        client.on_connect = self._on_connect
        client.on_subscribe = self._on_subscribe
        client.on_unsubscribe = self._on_subscribe  # (its UNSUBACK's codes, by mid too)
        client.on_publish = self._on_publish
        client.on_puback = self._on_puback
        client.on_message = self._on_message
        client.on_disconnect = self._on_disconnect
        return client

    async def _open(self, client: _Client) -> None:
        """TCP (and TLS) in a thread, CONNECT written there too (no loop callbacks are set
        yet, so paho writes it at once); then the loop takes the socket over."""
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = self.settings.session_expiry
        props.ReceiveMaximum = min(self.settings.window, 65535)  # unsettled imports at most
        opening = asyncio.ensure_future(asyncio.to_thread(
            client.connect, self.settings.host, self.settings.port, KEEPALIVE,
            clean_start=False, properties=props))
        try:
            rc = await asyncio.shield(opening)
        except asyncio.CancelledError:  # the thread ends within connect_timeout: close after
            opening.add_done_callback(functools.partial(_abandon, client))
            raise
        sock = client.socket()
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or sock is None:
            raise HubUnreachable(f"mqtt: {self.settings.shown_url}: {paho.error_string(rc)}")
        loop = asyncio.get_running_loop()
        self._sock = sock
        self._paused = False
        client.buffering = True
        self._closed.clear()
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_register_write
        client.on_socket_unregister_write = self._on_unregister_write
        loop.add_reader(sock, self._read)
        if client.want_write():
            loop.add_writer(sock, self._write)
        self._timer = loop.call_later(1.0, self._tick)

    async def _subscriptions(self, client: paho.Client) -> None:
        """Subscribe the import patterns, and unsubscribe the filters the session holds
        from an earlier config (see `_session`). The new filters are written down before
        the broker has them, the removed ones forgotten once it has let them go, so a
        crash in between leaves none subscribed and unknown."""
        wanted = list(dict.fromkeys(self.subjects.outbound(p) for p in self.settings.imports))
        memory = self._filters
        had = memory.load() if memory is not None else set()
        kept = had | set(wanted)
        if memory is not None and kept != had:
            memory.save(kept)
        if wanted:
            await self._subscribe(client, wanted)
        stale = sorted(had - set(wanted))  # (none without a memory: `had` is empty)
        if stale:
            gone = await self._unsubscribe(client, stale)
            if gone and memory is not None:  # (else what was saved above stands)
                memory.save(kept - gone)

    async def _unsubscribe(self, client: paho.Client, filters: list[str]) -> set[str]:
        """One UNSUBSCRIBE for `filters`; returns those the session no longer holds (one
        the broker refuses to let go is logged, and tried again at the next connect)."""
        rc, mid = client.unsubscribe(filters)
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
            raise HubUnreachable(f"mqtt: unsubscribe: {paho.error_string(rc)}")
        waiter = self._subacks[mid] = asyncio.get_running_loop().create_future()
        gone = set()
        for topic, code in zip(filters, await waiter, strict=False):
            if code.is_failure and code.value != _NO_SUBSCRIPTION:
                _log.warning("mqtt uplink %s: unsubscribe %s: %s", self.client_id, topic, code)
            else:
                gone.add(topic)
        if gone:
            _log.info("mqtt uplink %s: unsubscribed %s (no import pattern takes them now)",
                      self.client_id, ", ".join(sorted(gone)))
        return gone

    async def _subscribe(self, client: paho.Client, filters: list[str]) -> None:
        """One SUBSCRIBE for every import filter, QoS 1; no-local, so what we export
        never comes back; retained messages only when the subscription is new, not again
        at every reconnect."""
        options = SubscribeOptions(qos=1, noLocal=True,
                                   retainHandling=SubscribeOptions.RETAIN_SEND_IF_NEW_SUB)
        rc, mid = client.subscribe([(f, options) for f in filters])
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
            raise HubUnreachable(f"mqtt: subscribe: {paho.error_string(rc)}")
        waiter = self._subacks[mid] = asyncio.get_running_loop().create_future()
        for pattern, code in zip(filters, await waiter, strict=False):
            if code.is_failure:
                raise HubRefused(f"mqtt: subscribe {pattern}: {code}")

    def send(self, topic: str, data: bytes, headers: Mapping[str, str], msg_id: str
             ) -> asyncio.Future[bool]:
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        client = self._client
        if client is None or self.lost.done():
            future.set_exception(HubUnreachable("mqtt: not connected"))
            return future
        try:
            props = _user_properties(headers, msg_id)
            if FAST_PUBLISH:
                subject = self._subjects_out.get(topic)
                if subject is None:  # (str.translate costs per character: once per topic)
                    if len(self._subjects_out) >= 4096:
                        self._subjects_out.clear()
                    subject = self._subjects_out[topic] = self.subjects.subject(topic).encode()
                mid = client.publish_qos1(subject, data, props)
                if not mid:
                    future.set_exception(HubUnreachable("mqtt: publish: not connected"))
                else:
                    self._sent[mid] = (future, topic)
                return future
            info = client.publish(self.subjects.subject(topic), data, qos=1,
                                  properties=_UserProperties(props))
        except Unsendable as exc:
            future.set_exception(exc)
            return future
        except ValueError as exc:  # a payload over 256 MB, a topic paho will not take, a
            # header over 64 KiB: never sendable
            future.set_exception(Unsendable(f"mqtt: {topic}: {exc}"))
            return future
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            future.set_exception(HubUnreachable(f"mqtt: publish: {paho.error_string(info.rc)}"))
            return future
        early = self._early.pop(info.mid, None)
        if early is None:
            self._sent[info.mid] = (future, topic)
        else:
            _resolve(future, early, topic)
        return future

    async def receive(self, limit: int, timeout: float) -> list[Incoming]:
        if not self._inbox:
            self._raise_if_lost()
            self._arrived.clear()
            try:
                async with asyncio.timeout(timeout):
                    await self._arrived.wait()
            except TimeoutError:
                return []
            if not self._inbox:
                self._raise_if_lost()
        taken = [self._inbox.popleft() for _ in range(min(limit, len(self._inbox)))]
        if self._paused and len(self._inbox) <= INBOX_MAX // 2:
            self._paused = False
            if self._sock is not None:
                loop = asyncio.get_running_loop()
                loop.add_reader(self._sock, self._read)
                loop.call_soon(self._read)  # (what was read ahead wakes no reader)
        return taken

    def _raise_if_lost(self) -> None:
        if self.lost.done():
            raise HubUnreachable(_why(self.lost.result()))

    def settle(self, incoming: Incoming) -> None:
        token = incoming.token
        assert isinstance(token, _Token)
        if token.client is self._client and token.client.is_connected():
            token.client.ack(token.mid, token.qos)

    async def close(self) -> None:
        client = self._client
        if client is None:
            return
        if self._sock is not None and client.is_connected():
            # paho closes its socket as soon as the DISCONNECT is written. With the broker's
            # packets still unread in it, that close is a reset, and the broker throws away
            # what it had not read yet: the PUBACKs of the last imports (redelivered after
            # the next connect) and the DISCONNECT. So the connection is held open past
            # paho's close by a second descriptor, and ended by `_linger`.
            held = _hold(self._sock)
            client.disconnect(ReasonCode(PacketTypes.DISCONNECT, "Normal disconnection"))
            try:
                async with asyncio.timeout(CLOSE_WAIT):
                    await self._closed.wait()
            except TimeoutError:
                _log.warning("mqtt uplink %s: DISCONNECT not sent within %s s",
                             self.client_id, CLOSE_WAIT)
                if held is not None:
                    held.close()
            else:
                if held is not None:
                    await _linger(held)
        self._unwatch()
        client.on_socket_close = client.on_socket_register_write = None
        client.on_socket_unregister_write = None
        _abandon(client)  # when the DISCONNECT did not go (or was not sent): paho forgets it
        self._client = None
        self._gone(HubUnreachable("mqtt: closed"))

    def _unwatch(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._sock is not None:
            loop = asyncio.get_running_loop()
            loop.remove_reader(self._sock)
            loop.remove_writer(self._sock)
            self._sock = None
            self._closed.set()

    def _gone(self, reason: BaseException) -> None:
        """The connection is over: `lost` says why, every waiter fails, reading stops."""
        self._unwatch()
        if not self.lost.done():
            self.lost.set_result(reason)
        waiters: list[asyncio.Future[Any]] = [f for f, _ in self._sent.values()]
        waiters.extend(self._subacks.values())
        if self._connack is not None:
            waiters.append(self._connack)
        self._sent.clear()
        self._subacks.clear()
        self._early.clear()
        for waiter in waiters:
            if not waiter.done():
                waiter.set_exception(HubUnreachable(_why(reason)))
                waiter.exception()  # `lost` reports it: a caller may drop the future
        self._arrived.set()

    # paho's callbacks, all run by the loop (reader, writer, timer) ---------------------

    @_guarded
    def _read(self) -> None:
        """What the client has read ahead, and over TLS what the SSL object holds
        decrypted, wake no reader: read them too."""
        while (client := self._client) is not None and self._sock is not None \
                and not self._paused:
            client.loop_read()
            if not (client.buffered()
                    or (isinstance(self._sock, ssl.SSLSocket) and self._sock.pending())):
                break

    @_guarded
    def _write(self) -> None:
        if self._client is not None:
            self._client.loop_write()

    @_guarded
    def _tick(self) -> None:
        if self._client is not None and self._sock is not None:
            self._client.loop_misc()
            if self._sock is not None:
                self._timer = asyncio.get_running_loop().call_later(1.0, self._tick)

    @_guarded
    def _on_socket_close(self, *_: object) -> None:
        self._unwatch()

    @_guarded
    def _on_register_write(self, _c: paho.Client, _u: object, sock: paho.SocketLike) -> None:
        asyncio.get_running_loop().add_writer(sock, self._write)

    @_guarded
    def _on_unregister_write(self, _c: paho.Client, _u: object, sock: paho.SocketLike
                             ) -> None:
        asyncio.get_running_loop().remove_writer(sock)

    @_guarded
    def _on_connect(self, _c: paho.Client, _u: object, _f: paho.ConnectFlags,
                    reason: ReasonCode, _p: Properties | None) -> None:
        if self._connack is None or self._connack.done():
            return
        if not reason.is_failure:
            self._connack.set_result(None)
        elif reason.value in _TRANSIENT:
            self._connack.set_exception(HubUnreachable(f"mqtt: {reason}"))
        else:
            self._connack.set_exception(HubRefused(f"mqtt: {reason}"))

    @_guarded
    def _on_subscribe(self, _c: paho.Client, _u: object, mid: int, codes: list[ReasonCode],
                      _p: Properties | None) -> None:
        waiter = self._subacks.pop(mid, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(codes)

    @_guarded
    def _on_publish(self, _c: paho.Client, _u: object, mid: int, reason: ReasonCode,
                    _p: Properties) -> None:
        if self.lost.done():  # its future has failed already
            return
        sent = self._sent.pop(mid, None)
        if sent is None:  # PUBACK before `send` had the mid (paho's loop on another thread)
            self._early[mid] = reason
        else:
            _resolve(sent[0], reason, sent[1])

    @_guarded
    def _on_puback(self, mid: int, code: int) -> None:
        """The PUBACK of a `publish_qos1`: 0x80 and up is a refusal ("No matching
        subscribers", 16, is a success)."""
        if self.lost.done():  # its future has failed already
            return
        sent = self._sent.pop(mid, None)
        if sent is not None and not sent[0].done():
            if code >= 0x80:
                reason = ReasonCode(PacketTypes.PUBACK, identifier=code)
                sent[0].set_exception(HubRefused(f"mqtt: {sent[1]} refused: {reason}"))
            else:
                sent[0].set_result(False)  # (MQTT does not say whether it had it already)

    @_guarded
    def _on_message(self, client: paho.Client, _u: object, message: paho.MQTTMessage
                    ) -> None:
        if self.lost.done():  # not acknowledged: the broker sends it again
            return
        try:
            subject: str | None = message.topic
        except UnicodeDecodeError:
            subject = None
        topic = None if subject is None else self.subjects.inbound(subject)
        headers = dict(getattr(message.properties, "UserProperty", None) or ())
        own_id = headers.get(ID_HEADER)
        key = own_id or self._key(message, subject or "")
        self._inbox.append(Incoming(key, topic or "", bytes(message.payload), headers,
                                    _Token(client, message.mid, message.qos),
                                    maybe_seen=bool(own_id) or bool(message.dup),
                                    unusable="" if topic is not None else
                                    f"{(subject or '<not UTF-8>')[:200]!r}: no mesh spelling"))
        self._arrived.set()
        if len(self._inbox) >= INBOX_MAX and not self._paused and self._sock is not None:
            self._paused = True  # (until `receive` has taken half: TCP holds the broker back)
            asyncio.get_running_loop().remove_reader(self._sock)

    def _key(self, message: paho.MQTTMessage, subject: str) -> str:
        """``mqtt:<mid>:<hash of topic and payload>``: a DUP redelivery gets the key its
        first delivery got. A first delivery is never a redelivery, so when its key was
        given out already (the mid wrapped, same topic and payload; or QoS 0, mid 0) it
        gets a fresh one, ``...:<nonce>.<n>``, rather than being dropped as seen."""
        digest = hashlib.blake2s(subject.encode() + b"\0" + message.payload,
                                 digest_size=16).hexdigest()
        base = f"mqtt:{message.mid}:{digest}"
        if message.dup:
            return self._keys.get(base, base)
        key = base
        if self._keys.pop(base, None) is not None:
            self._fresh += 1
            key = f"{base}:{self._nonce}.{self._fresh}"
        self._keys[base] = key
        if len(self._keys) > MARKS:
            del self._keys[next(iter(self._keys))]
        return key

    @_guarded
    def _on_disconnect(self, _c: paho.Client, _u: object, flags: paho.DisconnectFlags,
                       reason: ReasonCode, _p: Properties | None) -> None:
        what = (f"the broker disconnected us ({reason})" if flags.is_disconnect_packet_from_server
                else "disconnected" if reason.value == 0 else "connection lost")
        self._gone(HubUnreachable(f"mqtt: {self.settings.shown_url}: {what}"))


def _user_properties(headers: Mapping[str, str], msg_id: str) -> bytes:
    """A PUBLISH's properties, encoded: the message's headers and its id as MQTT user
    properties (the bytes paho's `Properties.pack` makes, at a fourteenth of the cost:
    paho builds a table of every property name per instance and searches it per
    attribute).

    Raises:
        ValueError: a header name or value over 65,535 bytes.
    """
    parts: list[bytes] = []
    for key, value in (*headers.items(), (ID_HEADER, msg_id)):
        k, v = key.encode(), value.encode()
        if len(k) > 0xFFFF or len(v) > 0xFFFF:
            raise ValueError(f"header {key[:40]!r}: over 65,535 bytes")
        parts.append(b"\x26%b%b%b%b" % (len(k).to_bytes(2, "big"), k, len(v).to_bytes(2, "big"), v))
    body = b"".join(parts)
    return _varint(len(body)) + body


class _UserProperties(Properties):
    """Encoded PUBLISH properties for paho's `publish` (the fallback without
    `FAST_PUBLISH`), which calls only `pack` on them."""

    def __init__(self, packed: bytes) -> None:  # (no super: paho's tables are not used)
        object.__setattr__(self, "_packed", packed)

    def pack(self) -> bytes:
        packed: bytes = self.__dict__["_packed"]
        return packed

    def __str__(self) -> str:  # (paho's debug log line)
        return f"[user properties, {len(self.__dict__['_packed'])} bytes]"


def _varint(n: int) -> bytes:
    """An MQTT Variable Byte Integer."""
    out = bytearray()
    while True:
        n, byte = n >> 7, n & 0x7F
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _resolve(future: asyncio.Future[bool], reason: ReasonCode, topic: str) -> None:
    if future.done():
        return
    if reason.is_failure:  # "No matching subscribers" (16) is a success
        future.set_exception(HubRefused(f"mqtt: {topic} refused: {reason}"))
    else:
        future.set_result(False)  # (MQTT does not say whether it had it already)


def _abandon(client: paho.Client, opening: asyncio.Future[MQTTErrorCode] | None = None
             ) -> None:
    """Close the socket of a client we are done with (`opening`: once the connect thread,
    given up on, has finished)."""
    if opening is None or (not opening.cancelled() and opening.exception() is None):
        sock = client.socket()
        if sock is not None:
            sock.close()


def _hold(sock: paho.SocketLike) -> socket.socket | None:
    """A second descriptor of `sock`'s connection (an SSL socket's too: only its TCP is
    used), so that closing `sock` does not end the connection."""
    if not isinstance(sock, socket.socket):
        return None
    try:
        held = socket.socket(sock.family, sock.type, sock.proto, fileno=os.dup(sock.fileno()))
    except OSError:
        return None
    held.setblocking(False)
    return held


async def _linger(held: socket.socket) -> None:
    """End a connection whose DISCONNECT is written: our FIN after it, then what the broker
    still sends is read and dropped until it closes its side (it does on DISCONNECT), or
    for CLOSE_WAIT s; then the close is no reset, and the broker has read all we sent."""
    try:
        held.shutdown(socket.SHUT_WR)
        async with asyncio.timeout(CLOSE_WAIT):
            while await asyncio.get_running_loop().sock_recv(held, 65536):
                pass
    except (OSError, TimeoutError):
        pass
    finally:
        held.close()


def _why(reason: BaseException) -> str:
    return str(reason) if isinstance(reason, HubUnreachable | HubRefused) else f"mqtt: {reason!r}"
