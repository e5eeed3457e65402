"""The NATS JetStream adapter (nats-py, NATS's own asyncio client).

Export publishes with the client's plain `publish`, each with a reply subject
of its own under one inbox subscription of ours where the stream's PubAcks
come back (what `publish_async` does, without its per-message semaphore,
NUID, random token, chained futures and JSON decoding of every ack; the core
keeps the window, and an ack is decoded as JSON only when it is an error),
with ``Nats-Msg-Id`` = the mesh message id, so the stream drops a message
sent twice within its duplicate window. Import is one durable pull consumer
per import pattern (nats-server 2.9 has one filter subject per consumer),
created if missing, delivering from the start of the stream, acknowledged
explicitly.

The client's own reconnection is off: the uplink core reconnects (forever,
with backoff), so a lost connection fails the PubAcks in flight at once and
the core resends from its backlog, instead of waiting on futures that a
reconnected client would never resolve.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import json
import logging
import re
from collections import deque
from collections.abc import Mapping
from typing import Any, Final

import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api

from ..errors import ConfigError
from ._hub import HubRefused, HubUnreachable, Incoming, Unsendable
from ._settings import UplinkSettings, tls_context
from ._subjects import Subjects

_log = logging.getLogger("mesh.uplink.nats")
CLOSE_WAIT: Final[float] = 2.0
"""Seconds `close` gives nats-py to flush and close the connection before dropping it."""
CONNECT_TIMEOUT: Final[float] = 5.0
API_TIMEOUT: Final[float] = 5.0
ACK_WAIT: Final[float] = 30.0
"""Seconds JetStream waits for our ack before delivering an import again."""
PING_INTERVAL: Final[int] = 5
"""A silent link (cut cable) is noticed within about three of these."""
_NO_RESPONDERS: Final[str] = "503"
_BAD_SUBJECT: Final = re.compile(r"[ \t\r\n]")
_HEADER_NAME: Final = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_NEWLINES: Final = str.maketrans({"\r": " ", "\n": " "})
_HEADS: dict[tuple[tuple[str, str], ...], bytes] = {}
"""Header blocks (without the id) by headers: the same few come again and again (the
origin header alone, mostly); emptied when it holds 256."""
_Outgoing = tuple[str, bytes, Mapping[str, str], str, "asyncio.Future[bool]"]
"""Hub subject, payload, headers, message id, and the future `send` returned."""
_REFUSALS: Final = ("authorization", "authentication", "permissions", "user credentials")
_DENIED_PUBLISH: Final = re.compile(r'permissions violation for publish to "(.*)"', re.IGNORECASE)
"""The server's answer to one publish the user may not make: the connection stays up
(unlike one refused at connect, or a subscription it will not allow)."""


class NatsHub:
    """One connection to a NATS server with JetStream."""

    kind = "nats"

    def __init__(self, settings: UplinkSettings, node_name: str) -> None:
        self._settings = settings
        self._node_name = node_name
        self._subjects = Subjects("nats", settings.prefix)
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._subs: list[JetStreamContext.PullSubscription] = []
        self._lost: asyncio.Future[BaseException] | None = None
        self._outgoing: deque[_Outgoing] = deque()
        self._reply_prefix = ""
        """``_INBOX.<nuid>.``: a publish's reply subject is this and its token."""
        self._waiting: dict[str, tuple[asyncio.Future[bool], str]] = {}
        """Published and not acknowledged yet, by reply token, with the hub subject (a
        refused publish is named by its subject only); in the order published."""
        self._tokens = itertools.count()
        self._denied_logged = False
        self._wake = asyncio.Event()
        self._acks: list[Msg] = []
        self._writer: asyncio.Task[None] | None = None
        self._fetched: deque[Msg] = deque()
        self._turn = 0

    @property
    def lost(self) -> asyncio.Future[BaseException]:
        assert self._lost is not None, "connect() first"
        return self._lost

    async def connect(self) -> None:
        loop = asyncio.get_running_loop()
        self._lost = loop.create_future()
        s = self._settings
        nc = self._nc = Client()
        try:
            options = self._options()
        except ConfigError as exc:  # (a TLS file that went bad since the start)
            raise HubRefused(f"nats: {exc}") from None
        try:
            await nc.connect(**options)
        except nats.errors.NoServersError as exc:  # (the one server refused or timed out)
            raise HubUnreachable(f"nats: cannot connect to {s.shown_url}") from exc
        except (OSError, TimeoutError, nats.errors.Error) as exc:
            raise _classify(exc) from exc
        self._js = nc.jetstream(timeout=API_TIMEOUT)
        try:
            await self._ensure_stream()
            self._reply_prefix = f"{nc.new_inbox()}."
            await nc.subscribe(f"{self._reply_prefix}*", cb=self._on_puback)
            for pattern in s.imports:
                self._subs.append(await self._js.pull_subscribe(
                    self._subjects.outbound(pattern), durable=consumer_name(s, pattern),
                    stream=s.stream, config=api.ConsumerConfig(
                        ack_policy=api.AckPolicy.EXPLICIT,
                        deliver_policy=api.DeliverPolicy.ALL, ack_wait=ACK_WAIT,
                        max_ack_pending=4096)))
        except (OSError, TimeoutError, nats.errors.Error) as exc:
            raise _classify(exc) from exc
        self._writer = loop.create_task(self._write(), name="zeromesh-uplink-nats-writer")

    def _options(self) -> dict[str, Any]:
        s = self._settings
        scheme = "tls" if s.tls else "nats"
        host = f"[{s.host}]" if ":" in s.host else s.host
        options: dict[str, Any] = {
            "servers": [f"{scheme}://{host}:{s.port}"], "allow_reconnect": False,
            # One attempt per connect() (the default tries 60 times, 2 s apart): the
            # uplink core owns the retrying, with its backoff and its states.
            "max_reconnect_attempts": 1, "reconnect_time_wait": 0.1,
            "connect_timeout": CONNECT_TIMEOUT, "name": f"zeromesh-{s.prefix}-{self._node_name}",
            "disconnected_cb": self._disconnected, "closed_cb": self._disconnected,
            "error_cb": self._error, "pending_size": 64 * 1024 * 1024,
            "ping_interval": PING_INTERVAL, "max_outstanding_pings": 2,
            "user": s.username(), "password": s.secret(), "token": s.token}
        if s.creds:
            options["user_credentials"] = s.creds
        if s.nkey:
            options["nkeys_seed"] = s.nkey
        if s.tls:
            options["tls"] = tls_context(s)
        return {k: v for k, v in options.items() if v is not None}

    async def _ensure_stream(self) -> None:
        """The stream exists and holds ``<prefix>.>`` (added to its subjects if not)."""
        assert self._js is not None
        s = self._settings
        wanted = self._subjects.outbound(">")
        try:
            info = await self._js.stream_info(s.stream)
        except nats.js.errors.NotFoundError:
            await self._js.add_stream(name=s.stream, subjects=[wanted],
                                      storage=api.StorageType.FILE)
            _log.info("created JetStream stream %s for %s", s.stream, wanted)
            return
        subjects = list(info.config.subjects or [])
        if wanted not in subjects and ">" not in subjects:
            info.config.subjects = [*subjects, wanted]
            await self._js.update_stream(info.config)
            _log.info("added %s to JetStream stream %s", wanted, s.stream)

    async def _disconnected(self) -> None:
        self._lose(HubUnreachable(f"nats: connection to {self._settings.shown_url} lost"))

    async def _error(self, error: Exception) -> None:
        denied = _DENIED_PUBLISH.search(str(error))
        if denied is not None:
            self._deny(denied.group(1), str(error))
        elif isinstance(error, nats.errors.AuthorizationError) or _is_refusal(error):
            self._lose(HubRefused(f"nats: {str(error) or type(error).__name__}"))

    def _deny(self, subject: str, why: str) -> None:
        """One publish to `subject` was refused (the server drops it, no PubAck comes, the
        connection lives on): the oldest one waiting on that subject, since the server
        answers a connection's publishes in order, one error each. One that is none of
        ours (an import's ack the user may not send) is only logged."""
        for token, (fut, sent_to) in self._waiting.items():
            if sent_to == subject:
                del self._waiting[token]
                if not fut.done():
                    fut.set_exception(HubRefused(why))
                return
        level = logging.DEBUG if self._denied_logged else logging.WARNING
        self._denied_logged = True
        _log.log(level, "nats uplink %s: %s", self._settings.shown_url, why)

    def _lose(self, reason: BaseException) -> None:
        if self._lost is not None and not self._lost.done():
            self._lost.set_result(reason)
        waiting = [entry[4] for entry in self._outgoing]
        waiting.extend(fut for fut, _ in self._waiting.values())
        self._outgoing.clear()
        self._waiting.clear()
        for fut in waiting:
            if not fut.done():
                fut.set_exception(HubUnreachable(str(reason)))
        self._wake.set()

    # -- export --------------------------------------------------------------------------

    def send(self, topic: str, data: bytes, headers: Mapping[str, str], msg_id: str
             ) -> asyncio.Future[bool]:
        fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        if self._lost is None or self._lost.done():
            fut.set_exception(HubUnreachable("nats: not connected"))
            return fut
        try:
            subject = self._subjects.subject(topic)
        except Unsendable as exc:
            fut.set_exception(exc)
            return fut
        self._outgoing.append((subject, data, headers, msg_id, fut))
        self._wake.set()
        return fut

    async def _write(self) -> None:
        """Hands queued publishes and import acks to the client, in order."""
        nc = self._nc
        assert nc is not None
        direct = _can_frame(nc)
        publish, prefix = nc.publish, self._reply_prefix
        waiting, tokens = self._waiting, self._tokens
        while True:
            await self._wake.wait()
            self._wake.clear()
            acks, self._acks = self._acks, []
            try:
                for msg in acks:
                    await msg.ack()
                if direct:
                    if self._frame(nc):
                        await nc._flush_pending()  # noqa: SLF001  (see _frame)
                    continue
                while self._outgoing:
                    subject, data, headers, msg_id, fut = self._outgoing.popleft()
                    if fut.done():
                        continue
                    token = str(next(tokens))
                    waiting[token] = (fut, subject)
                    try:
                        await publish(subject, data, reply=prefix + token,
                                      headers={**headers, "Nats-Msg-Id": msg_id})
                    except (nats.errors.MaxPayloadError, nats.errors.BadSubjectError,
                            nats.errors.BadHeaderError) as exc:
                        del waiting[token]
                        fut.set_exception(Unsendable(f"nats: {type(exc).__name__} {exc}"))
            except (OSError, nats.errors.Error) as exc:
                self._lose(HubUnreachable(f"nats: {type(exc).__name__} {exc}"))
                return

    def _frame(self, nc: Client) -> int:
        """Every queued publish as an HPUB frame in the client's outgoing buffer, at once;
        returns how many.

        What `nc.publish` does per message (check the subject and the headers, build the
        frame, append it), without its three coroutines and its flush check per message:
        half the client's CPU per export. The frames go where `publish` puts them
        (``_pending``, counted in ``_pending_data_size``), and the caller kicks the
        client's flusher once (``_flush_pending``), as `publish` does. `_can_frame`
        checks at connect that this nats-py has them; without, `publish` is used.

        Raises:
            nats.errors.ConnectionClosedError: the connection is gone.
        """
        if nc.is_closed or not nc.is_connected:
            raise nats.errors.ConnectionClosedError
        outgoing, waiting, tokens = self._outgoing, self._waiting, self._tokens
        prefix = self._reply_prefix.encode()
        max_payload = nc.max_payload
        frames: list[bytes] = []
        size = 0
        while outgoing:
            subject, data, headers, msg_id, fut = outgoing.popleft()
            if fut.done():
                continue
            try:
                head = _header_block(headers, msg_id)
                if not subject or _BAD_SUBJECT.search(subject):
                    raise nats.errors.BadSubjectError
                if len(head) + len(data) > max_payload:
                    raise nats.errors.MaxPayloadError
            except (nats.errors.MaxPayloadError, nats.errors.BadSubjectError,
                    nats.errors.BadHeaderError) as exc:
                fut.set_exception(Unsendable(f"nats: {type(exc).__name__} {exc}"))
                continue
            token = str(next(tokens))
            waiting[token] = (fut, subject)
            frame = b"HPUB %b %b%b %d %d\r\n%b%b\r\n" % (
                subject.encode(), prefix, token.encode(), len(head), len(head) + len(data),
                head, data)
            frames.append(frame)
            size += len(frame)
        if frames:  # one buffer: the transport's writelines costs per buffer it is given
            nc._pending.append(b"".join(frames))  # noqa: SLF001
            nc._pending_data_size += size  # noqa: SLF001
            nc.stats["out_msgs"] += len(frames)
        return len(frames)

    async def _on_puback(self, msg: Msg) -> None:
        """The stream's answer to one publish: ``{"stream":..,"seq":..}`` (with
        ``"duplicate": true`` when it had that message id already), one with an
        ``"error"`` (the stream will not take it: refused), or a 503 status (no stream
        for the subject: it went away, and the next connection creates it again)."""
        waited = self._waiting.pop(msg.subject[len(self._reply_prefix):], None)
        if waited is None or waited[0].done():
            return
        fut = waited[0]
        data = msg.data
        if msg.headers and msg.headers.get(api.Header.STATUS) == _NO_RESPONDERS:
            fut.set_exception(HubUnreachable("nats: no stream took the message (503)"))
        elif b'"error"' in data or b'"duplicate"' in data:  # (rare: decoded only then)
            try:
                answer = json.loads(data)
            except ValueError:
                answer = {"error": {"description": data.decode(errors="replace")}}
            error = answer.get("error")
            if isinstance(error, dict):
                fut.set_exception(HubRefused(
                    f"nats: JetStream: {error.get('description')} (code {error.get('code')}, "
                    f"err_code {error.get('err_code')})"))
            else:
                fut.set_result(answer.get("duplicate") is True)
        else:
            fut.set_result(False)

    # -- import --------------------------------------------------------------------------

    async def receive(self, limit: int, timeout: float) -> list[Incoming]:
        if self._lost is not None and self._lost.done():
            raise HubUnreachable("nats: not connected")
        if not self._subs:
            await asyncio.sleep(timeout)
            return []
        self._turn = (self._turn + 1) % len(self._subs)
        sub = self._subs[self._turn]
        try:
            msgs = await sub.fetch(limit, timeout=max(timeout, 0.05))
        except nats.errors.TimeoutError:
            return []
        except (OSError, nats.errors.Error) as exc:
            raise HubUnreachable(f"nats: {type(exc).__name__} {exc}") from exc
        out: list[Incoming] = []
        for msg in msgs:
            topic = self._subjects.inbound(msg.subject)
            out.append(Incoming(key=_key(msg), topic=topic or "", data=msg.data,
                                headers=dict(msg.headers or {}), token=msg,
                                maybe_seen=msg.metadata.num_delivered > 1,
                                unusable="" if topic is not None else
                                f"{msg.subject[:200]!r}: no mesh spelling"))
        return out

    def settle(self, incoming: Incoming) -> None:
        if self._lost is None or self._lost.done():
            return  # not acknowledged: the consumer delivers it again
        assert isinstance(incoming.token, Msg)
        self._acks.append(incoming.token)
        self._wake.set()

    async def close(self) -> None:
        self._lose(HubUnreachable("nats: closed"))
        if self._writer is not None:
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer
            self._writer = None
        nc, self._nc = self._nc, None
        if nc is not None and not nc.is_closed:  # (a refused connect leaves a socket too)
            try:
                async with asyncio.timeout(CLOSE_WAIT):
                    await nc.close()
            except TimeoutError:
                # nats-py's close waits, unbounded, for its last writes to drain and for
                # the socket to close: a server that stopped reading would hold the agent's
                # exit. What was not acknowledged is delivered again after a restart.
                _log.warning("nats uplink: the connection did not close within %s s; "
                             "dropped", CLOSE_WAIT)
                _drop(nc)
            except Exception as exc:  # (closing is best effort: the link is over anyway)
                _log.debug("nats uplink: close failed: %r", exc)
        self._subs = []


def _drop(nc: Client) -> None:
    """Abort the connection's socket (best effort: nats-py keeps it in private fields)."""
    writer = getattr(getattr(nc, "_transport", None), "_io_writer", None)
    transport = getattr(writer, "transport", None)
    if isinstance(transport, asyncio.Transport):
        transport.abort()


def _can_frame(nc: Client) -> bool:
    """Whether this nats-py keeps its outgoing frames as `_frame` expects."""
    return (isinstance(getattr(nc, "_pending", None), list)
            and isinstance(getattr(nc, "_pending_data_size", None), int)
            and callable(getattr(nc, "_flush_pending", None)))


def _header_block(headers: Mapping[str, str], msg_id: str) -> bytes:
    """``NATS/1.0`` headers as nats-py writes them, with ``Nats-Msg-Id`` last.

    Raises:
        nats.errors.BadHeaderError: a name NATS cannot carry (not an RFC 7230 token).
    """
    items = tuple(headers.items())
    head = _HEADS.get(items)
    if head is None:
        lines = [b"NATS/1.0\r\n"]
        for key, value in items:
            name = key.strip()
            if not name or key == "Nats-Msg-Id":  # (ours is the message's id)
                continue
            if not _HEADER_NAME.fullmatch(name):
                raise nats.errors.BadHeaderError(name)
            lines.append(b"%b: %b\r\n" % (name.encode(),
                                            value.strip().translate(_NEWLINES).encode()))
        head = b"".join(lines)
        if len(_HEADS) >= 256:
            _HEADS.clear()
        _HEADS[items] = head
    if "\r" in msg_id or "\n" in msg_id:  # (str.translate costs per character: rarely)
        msg_id = msg_id.translate(_NEWLINES)
    return b"%bNats-Msg-Id: %b\r\n\r\n" % (head, msg_id.strip().encode())


def consumer_name(settings: UplinkSettings, pattern: str) -> str:
    """The durable consumer of one import pattern (stable across restarts)."""
    digest = hashlib.blake2s(pattern.encode(), digest_size=4).hexdigest()
    return f"zeromesh_{settings.prefix.replace('.', '_')}_{digest}"


def _key(msg: Msg) -> str:
    meta = msg.metadata
    return f"{meta.stream}:{meta.sequence.stream}"


def _is_refusal(error: BaseException) -> bool:
    text = str(error).lower()
    return any(word in text for word in _REFUSALS)


def _classify(error: BaseException) -> Exception:
    text = str(error).removeprefix("nats: ")  # (nats-py's own errors say it already)
    if isinstance(error, nats.errors.AuthorizationError) or _is_refusal(error):
        return HubRefused(f"nats: {text or type(error).__name__}")
    if isinstance(error, nats.js.errors.APIError):
        return HubRefused(f"nats: JetStream: {text}")
    if isinstance(error, nats.errors.Error) and text:
        return HubUnreachable(f"nats: {text}")
    return HubUnreachable(f"nats: {type(error).__name__} {text}".rstrip())
