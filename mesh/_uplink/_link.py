"""One uplink: the export intake, the export sender, the importer and the link's state.

The intake takes messages from a durable subscription per export pattern
(reliable ones were spooled for it by their publishers; best-effort ones
arrive while the agent runs) and acknowledges them on the mesh side only
once they are in the uplink's backlog. The sender keeps a window of them in
flight to the hub and lets one leave the backlog only on the hub's
acknowledgement; on a new connection it starts again from the oldest one not
acknowledged, so after an outage the backlog drains in order (the hub drops
the resent ones it already has, by message id). The importer publishes what
the hub's durable consumer delivers into the mesh reliably, then
acknowledges it on the hub.

The connection loop never gives up: `connecting` retries with exponential
backoff and jitter, `down` (the hub refused us) retries slowly, and each state
change is one log line, not one per attempt.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import hashlib
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from patterns import TopicPattern

from .._message import Message
from .._node import AsyncNode
from .._work._pull import Pull
from ..errors import ClosedError, MeshError, MessageTooLarge, SpoolFullError
from ._backlog import Backlog, Exported
from ._hub import ORIGIN_HEADER, Hub, HubRefused, HubUnreachable, Incoming, Unsendable
from ._settings import UplinkSettings

_log = logging.getLogger("mesh.uplink")

INTAKE_PREFETCH: Final[int] = 2048
INTAKE_BATCH: Final[int] = 1024
IMPORT_BATCH: Final[int] = 256
IMPORT_GRACE: Final[float] = 5.0
"""Longest a stopping agent waits for the imports it is publishing to reach its spool."""
ACK_TIMEOUT: Final[float] = 10.0
"""A hub acknowledgement later than this means the connection is gone, whatever TCP says."""
RETRY_FIRST: Final[float] = 0.2
RETRY_MAX: Final[float] = 10.0
DOWN_RETRY: Final[float] = 30.0
"""Between attempts once the hub has refused us: a wrong password is not hammered."""
ROOM_AGAIN: Final[float] = 0.5
"""A full backlog counts as having room again (a new episode may be logged) once it has
drained below this share of its quota."""
MAX_ATTEMPTS: Final[int] = 5
"""Times the hub may refuse one message before it is counted failed and dropped."""
REFUSED_PAUSE: Final[float] = 1.0
"""Seconds before a refused message is sent again (alone: the others go on meanwhile)."""
_DROPPED_HEADERS: Final = frozenset({"Nats-Msg-Id", "Nats-Expected-Stream"})


class LinkState(enum.StrEnum):
    CONNECTING = "connecting"
    CONNECTED = "connected"
    DOWN = "down"


@dataclass(slots=True)
class Counts:
    """What one uplink has done since the agent started."""

    exported: int = 0
    imported: int = 0
    failed: int = 0
    """Messages given up on: refused by the hub MAX_ATTEMPTS times, or unsendable there
    (a topic with no spelling on the hub, too large), or larger than the backlog's quota."""
    dropped: int = 0
    """Best-effort messages not exported because the backlog's quota was full."""
    duplicates: int = 0
    """Hub redeliveries recognised and not published again."""
    hub_duplicates: int = 0
    """Resends the hub already had and dropped by message id (NATS reports them)."""
    looped: int = 0
    """Messages not sent back where they came from (origin header)."""
    connects: int = 0
    attempts: int = 0
    """Connection attempts, failed ones included (a refused hub is not hammered)."""
    by_state: dict[str, float] = field(default_factory=dict)


class Uplink:
    """Runs one ``[[uplink]]`` until cancelled."""

    def __init__(self, node: AsyncNode, settings: UplinkSettings, hub: Callable[[], Hub],
                 backlog: Backlog) -> None:
        self.settings = settings
        self._node = node
        self._new_hub = hub
        self.backlog = backlog
        self.counts = Counts()
        self.state = LinkState.CONNECTING
        self.last_error = ""
        self._more = asyncio.Event()
        """Set when the backlog grows or an acknowledgement frees the window."""
        self._full_logged = False
        self._imports = [TopicPattern(pattern) for pattern in settings.imports]
        self._skips_logged: set[str] = set()
        """Kinds of dropped imports logged already (then at debug: no log flood)."""
        self._failure_logged = ""
        """Why the last dropped export was logged (the same reason again goes to debug,
        and every unsendable topic counts as one reason: no log flood)."""

    # -- lifecycle ------------------------------------------------------------------------

    async def run(self) -> None:
        """Intake and connection loops until cancelled; the backlog stays on disk."""
        async with asyncio.TaskGroup() as tasks:
            for pattern in dict.fromkeys(self.settings.export):  # (each once: one durable)
                tasks.create_task(self._intake(pattern, durable_name(self.settings, pattern)),
                                  name=f"zeromesh-uplink-intake-{pattern}")
            tasks.create_task(self._connect_forever(), name="zeromesh-uplink-link")

    def _set_state(self, state: LinkState, error: str = "") -> None:
        first_error = bool(error) and not self.last_error
        if error:
            self.last_error = error
        elif state is LinkState.CONNECTED:
            self.last_error = ""  # (what failed before this connection is over)
        if state is self.state and not first_error:
            return
        self.state = state
        name = f"{self.settings.shown_url} ({self.settings.prefix})"
        if state is LinkState.CONNECTED:
            _log.warning("uplink %s: connected", name)
        else:
            _log.warning("uplink %s: %s%s", name, state.value, f": {error}" if error else "")

    # -- export intake ----------------------------------------------------------------------

    async def _intake(self, pattern: str, durable: str) -> None:
        pull = await self._node.subscribe_durable(pattern, durable, prefetch=INTAKE_PREFETCH)
        async with pull:
            while True:
                try:
                    batch = await _take_batch(pull)
                except ClosedError:
                    return
                await self._admit(batch)

    async def _admit(self, batch: list[tuple[Message, Callable[[bool], None]]]) -> None:
        prefix = self.settings.prefix
        keep: list[tuple[Message, Callable[[bool], None]]] = []
        for msg, settle in batch:
            if msg.headers is not None and msg.headers.get(ORIGIN_HEADER) == prefix:
                self.counts.looped += 1  # it came from this hub: never back
                settle(True)
            else:
                keep.append((msg, settle))
        if not keep:
            return
        # Shielded: a stopping uplink (a reload) lets the batch it is writing in and settles
        # it. A message taken and never settled holds its sender's credit until its ack
        # timeout: the next uplink reading the durable got nothing from that sender meanwhile,
        # and the message, on disk in this backlog but not known here, was not handed over.
        keeping = asyncio.ensure_future(self._keep(keep))
        try:
            await asyncio.shield(keeping)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.shield(keeping)  # (one group commit)
            raise

    async def _keep(self, keep: list[tuple[Message, Callable[[bool], None]]]) -> None:
        """Store `keep` in the backlog and settle each message: acknowledged once stored,
        refused when it cannot be (a full quota, an unwritable backlog)."""
        prefix = self.settings.prefix
        origin = {ORIGIN_HEADER: prefix}  # shared by the messages without headers of their own
        exports = [Exported(m.id, m.topic, m.data,
                            {**m.headers, ORIGIN_HEADER: prefix} if m.headers else origin,
                            m.timestamp) for m, _ in keep]
        try:
            stored, huge, unwritable = await self._store(exports)
        except ClosedError:
            for _, settle in keep:
                settle(False)
            raise
        for _, settle in keep[:stored]:
            settle(True)
        if huge:
            self.counts.failed += huge
            self._log_dropped("larger than the export backlog's quota "
                              f"({self.backlog.store.quota_bytes} bytes)", f"{huge} message(s)")
        if stored:
            self._more.set()
        if stored == len(keep):
            store = self.backlog.store
            if self._full_logged and store.used_bytes < ROOM_AGAIN * store.quota_bytes:
                self._full_logged = False  # (not at the first batch that fits: one episode,
                _log.warning("uplink %s: export backlog has room again",  # one line)
                             self.settings.shown_url)
            return
        refused = keep[stored:]
        if not self._full_logged:
            self._full_logged = True
            if unwritable:
                self.last_error = f"export backlog unwritable: {unwritable}"
                _log.error("uplink %s: %s; reliable messages wait in their senders' spools, "
                           "best-effort ones are dropped", self.settings.shown_url,
                           self.last_error)
            else:
                _log.error("uplink %s: export backlog full (%d of %d bytes); reliable "
                           "messages wait in their senders' spools, best-effort ones are "
                           "dropped", self.settings.shown_url, self.backlog.used_bytes,
                           self.backlog.store.quota_bytes)
        self.counts.dropped += sum(1 for m, _ in refused if not m.reliable)
        for msg, settle in refused:
            settle(not msg.reliable)  # reliable: its sender redelivers it later

    async def _store(self, exports: list[Exported]) -> tuple[int, int, str]:
        """Into the backlog: all at once, or, when the quota is near, as many as fit
        (in order). Returns how many were dealt with (stored, or too large for the quota
        even when empty: never storable, so given up on rather than refused for ever),
        how many of them were too large, and why the rest were not stored when that is
        a failed write (the disk, the directory gone) rather than the quota: like a full
        quota, it refuses them for now, and the uplink goes on."""
        try:
            await self.backlog.add(exports)
            return len(exports), 0, ""
        except SpoolFullError:
            pass
        except MeshError as exc:
            return 0, 0, str(exc)
        huge = 0
        for done, one in enumerate(exports):
            try:
                await self.backlog.add([one])
            except SpoolFullError:
                if not self.backlog.never_fits(one):
                    return done, huge, ""
                huge += 1
            except MeshError as exc:
                return done, huge, str(exc)
        return len(exports), huge, ""

    # -- the connection -----------------------------------------------------------------

    async def _connect_forever(self) -> None:
        delay = RETRY_FIRST
        while True:
            hub = self._new_hub()
            self.counts.attempts += 1
            try:
                await hub.connect()
            except HubRefused as exc:
                await _close(hub)
                self._set_state(LinkState.DOWN, str(exc))
                await asyncio.sleep(DOWN_RETRY * random.uniform(0.8, 1.2))
                continue
            except HubUnreachable as exc:
                await _close(hub)
                self._set_state(LinkState.CONNECTING, str(exc))
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))
                delay = min(delay * 2, RETRY_MAX)
                continue
            delay = RETRY_FIRST
            self.counts.connects += 1
            self._set_state(LinkState.CONNECTED)
            try:
                reason = await self._while_connected(hub)
            finally:
                await _close(hub)
                self.backlog.rewind()
            if isinstance(reason, HubRefused):
                self._set_state(LinkState.DOWN, str(reason))
                await asyncio.sleep(DOWN_RETRY * random.uniform(0.8, 1.2))
            else:
                self._set_state(LinkState.CONNECTING, str(reason))
                await asyncio.sleep(RETRY_FIRST * random.uniform(0.5, 1.0))

    async def _while_connected(self, hub: Hub) -> BaseException:
        """Send and import until the connection fails; returns why it ended."""
        sender = asyncio.ensure_future(self._send(hub))
        workers = [sender, asyncio.ensure_future(_resolved(hub.lost))]
        if self.settings.imports:
            workers.append(asyncio.ensure_future(self._import(hub)))
        try:
            done, _ = await asyncio.wait(workers, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in workers:
                task.cancel()
            for task in workers:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        first = done.pop()
        if first.cancelled():
            return HubUnreachable("cancelled")
        error = first.exception()
        if error is not None and not isinstance(error, (HubRefused, HubUnreachable)):
            _log.error("uplink %s: %s", self.settings.shown_url, error, exc_info=error)
        return error or first.result()

    # -- export sender ------------------------------------------------------------------

    async def _send(self, hub: Hub) -> BaseException:
        """Keep `window` messages in flight until the connection fails.

        A message the hub refuses (its future fails with HubRefused: a permission, a
        stream limit) is sent again alone after REFUSED_PAUSE, up to MAX_ATTEMPTS
        times, then counted failed and dropped with a log line; the others in flight
        are not touched (resending them would put copies on the hub). One it can never
        take (Unsendable: a topic with no spelling there) fails at once.

        The hub's acknowledgements are collected as they come and leave the backlog
        together, once per turn of this loop (one ack record for a run of them, not
        one each), and always before it returns; one that comes after that leaves
        at once.
        """
        backlog = self.backlog
        window = self.settings.window
        in_flight: dict[int, tuple[asyncio.Future[bool], float]] = {}
        """In the order sent: the first is the oldest unacknowledged."""
        attempts: dict[int, int] = {}
        failure: list[BaseException] = []
        acked: list[int] = []
        counts = self.counts
        more = self._more
        finished = False

        def settled(record_id: int, fut: asyncio.Future[bool]) -> None:
            in_flight.pop(record_id, None)
            more.set()
            if fut.cancelled():
                return
            error = fut.exception()
            if error is None:
                acked.append(record_id)
                if finished:
                    release()
                if fut.result():
                    counts.hub_duplicates += 1
                if attempts:
                    attempts.pop(record_id, None)
            elif isinstance(error, HubRefused):
                self.last_error = str(error)
                tries = attempts[record_id] = attempts.get(record_id, 0) + 1
                if tries >= MAX_ATTEMPTS or isinstance(error, Unsendable):
                    del attempts[record_id]
                    backlog.done((record_id,))
                    counts.failed += 1
                    self._log_failed(record_id, tries, error)
                else:
                    retries[record_id] = loop.call_later(REFUSED_PAUSE, again, record_id)
            else:
                failure.append(error)

        def again(record_id: int) -> None:
            del retries[record_id]
            backlog.again(record_id)
            more.set()

        def release() -> None:
            if acked:
                backlog.done(acked)
                counts.exported += len(acked)
                acked.clear()

        loop = asyncio.get_running_loop()
        ticker: list[asyncio.TimerHandle] = []
        retries: dict[int, asyncio.TimerHandle] = {}
        """Refused messages waiting to be sent again, by record id."""

        def tick() -> None:  # a look at the ack timeout at least once a second
            more.set()
            ticker[:] = [loop.call_later(1.0, tick)]

        tick()
        try:
            while True:
                release()
                while len(in_flight) < window and not failure:
                    item = backlog.take_unsent()
                    if item is None:
                        break
                    record_id, msg = item
                    fut = hub.send(msg.topic, msg.data, msg.headers, msg.id)
                    in_flight[record_id] = (fut, time.monotonic())
                    fut.add_done_callback(functools.partial(settled, record_id))
                if failure:  # the connection is gone: the next one resends what is left
                    for fut, _ in list(in_flight.values()):
                        fut.cancel()
                    return failure[0]
                if in_flight:
                    oldest = next(iter(in_flight.values()))[1]
                    if time.monotonic() - oldest > ACK_TIMEOUT:
                        return HubUnreachable(f"no acknowledgement within {ACK_TIMEOUT:g} s")
                more.clear()
                if acked:
                    continue  # acknowledged while sending: released at the top
                await more.wait()  # (an ack, more to send, or the ticker)
        finally:
            ticker[0].cancel()
            for handle in retries.values():
                handle.cancel()
            finished = True
            release()

    def _log_failed(self, record_id: int, tries: int, error: HubRefused) -> None:
        key = "unsendable" if isinstance(error, Unsendable) else str(error)
        times = "" if tries == 1 else f" {tries} times"
        self._log_dropped(str(error), f"message {record_id}", key=key,
                          how=f"the hub refused {{}}{times}")

    def _log_dropped(self, why: str, what: str, *, key: str = "",
                     how: str = "{} not exported") -> None:
        """One line per reason (`key`, else `why`); the same reason again goes to debug."""
        key = key or why
        level = logging.DEBUG if key == self._failure_logged else logging.ERROR
        self._failure_logged = key
        _log.log(level, "uplink %s: %s, dropped: %s", self.settings.shown_url,
                 how.format(what), why)

    # -- import -------------------------------------------------------------------------

    async def _import(self, hub: Hub) -> BaseException:
        backlog, prefix = self.backlog, self.settings.prefix
        while True:
            batch = await hub.receive(IMPORT_BATCH, 1.0)
            fresh: list[Incoming] = []
            for incoming in batch:
                if incoming.unusable or not self._wanted(incoming.topic):
                    self._skip(incoming)
                    hub.settle(incoming)
                elif incoming.maybe_seen and backlog.seen(incoming.key):
                    self.counts.duplicates += 1
                    hub.settle(incoming)
                elif incoming.headers.get(ORIGIN_HEADER) == prefix:
                    self.counts.looped += 1  # our own export, seen by our own consumer
                    hub.settle(incoming)
                else:
                    fresh.append(incoming)
            if not fresh:
                continue
            # Shielded: a message in the outbox must be marked and acknowledged, even when
            # the agent stops meanwhile, or the hub's redelivery would be a duplicate.
            bringing = asyncio.ensure_future(self._bring_in(hub, fresh))
            try:
                error = await asyncio.shield(bringing)
            except asyncio.CancelledError:
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(IMPORT_GRACE):
                        await bringing
                raise
            if error is not None:
                return error

    def _wanted(self, topic: str) -> bool:
        """Does an import pattern of this config take `topic`? (An MQTT session the broker
        kept may still hold the subscription of a pattern an earlier config had.)"""
        return any(pattern.matches(topic) for pattern in self._imports)

    def _skip(self, incoming: Incoming) -> None:
        """An import that does not come in: one with no mesh spelling is counted failed;
        either kind is logged once, then at debug."""
        if incoming.unusable:
            self.counts.failed += 1
            why = f"cannot import {incoming.unusable}"
        else:
            why = (f"no import pattern takes {incoming.topic!r} (a subscription an "
                   "earlier config made?)")
        kind = "unusable" if incoming.unusable else "unwanted"
        level = logging.DEBUG if kind in self._skips_logged else logging.WARNING
        self._skips_logged.add(kind)
        _log.log(level, "uplink %s: %s: acknowledged and dropped", self.settings.shown_url,
                 why)

    async def _bring_in(self, hub: Hub, fresh: list[Incoming]) -> BaseException | None:
        """Publish into the mesh reliably, then mark and acknowledge what went in.

        The batch is published at once: the publishes reach the spool in the order
        started, within one loop iteration, so they share its commits, and their marks
        are written together as soon as they are in. A SIGKILL between that commit and
        the marks' write loses the marks of what is in the mesh: the hub's redelivery of
        the batch is published again, a duplicate under a crash, as at-least-once
        allows.
        """
        prefix = self.settings.prefix
        publishing: list[asyncio.Future[None]] = []
        for incoming in fresh:
            headers = {k: v for k, v in incoming.headers.items() if k not in _DROPPED_HEADERS}
            headers[ORIGIN_HEADER] = prefix
            publishing.append(asyncio.ensure_future(self._node.publish(
                incoming.topic, incoming.data, headers=headers, reliable=True)))
        try:
            await asyncio.wait(publishing)
        finally:
            for fut in publishing:
                fut.cancel()  # (only what a cancellation of ours interrupted)
            paused, done = self._published(fresh, publishing)
            self.backlog.mark([incoming.key for incoming in done])
            for incoming in done:
                hub.settle(incoming)
        if paused is not None and not isinstance(paused, HubUnreachable):
            raise paused  # (a bug: after the marks of what did go in)
        return paused

    def _published(self, fresh: list[Incoming], publishing: list[asyncio.Future[None]]
                   ) -> tuple[BaseException | None, list[Incoming]]:
        """Why importing pauses, if it does (the spool full or the node closing:
        HubUnreachable, retried; any other error: one it should not have met), and what is
        in the mesh, or never can be (too large: counted failed)."""
        done: list[Incoming] = []
        paused: BaseException | None = None
        for incoming, fut in zip(fresh, publishing, strict=True):
            if not fut.done() or fut.cancelled():
                continue
            exc = fut.exception()
            if exc is None:
                self.counts.imported += 1
            elif isinstance(exc, MessageTooLarge):
                self.counts.failed += 1
                _log.error("uplink %s: cannot import %s: %s",
                           self.settings.shown_url, incoming.key, exc)
            elif isinstance(exc, SpoolFullError | ClosedError):
                # Not acknowledged: the hub delivers it again after its ack wait.
                paused = paused or HubUnreachable(f"import paused: {exc}")
                continue
            else:
                paused = paused or exc
                continue
            done.append(incoming)
        return paused, done

    # -- what /v1/uplinks shows ---------------------------------------------------------

    def status(self) -> dict[str, object]:
        s, c = self.settings, self.counts
        return {"url": s.shown_url, "kind": s.kind, "prefix": s.prefix, "state": self.state.value,
                "backlog": len(self.backlog), "backlog_bytes": self.backlog.used_bytes,
                "oldest_pending_age": round(self.backlog.oldest_age(), 3),
                "exported": c.exported, "imported": c.imported, "failed": c.failed,
                "dropped": c.dropped, "duplicates": c.duplicates,
                "hub_duplicates": c.hub_duplicates, "looped": c.looped,
                "connects": c.connects, "attempts": c.attempts, "last_error": self.last_error,
                "export": list(s.export), "import": list(s.imports)}


async def _close(hub: Hub) -> None:
    """Close `hub`; a cancellation of this task that the broker library swallowed meanwhile
    (in its connect or close) is raised again: else a stopping uplink retries for ever."""
    await hub.close()
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def durable_name(settings: UplinkSettings, pattern: str) -> str:
    """The durable subscription an export pattern is read through: named by the hub's url
    and the pattern, not the prefix nor the pattern's place in the list, so that a reload
    that changes the prefix, or adds, removes or reorders patterns, keeps each remaining
    one's durable. A new name reaches the publishers only with the agent's next hello:
    what they publish until then is spooled for the old name alone (one name read with
    another pattern lost messages too)."""
    hub = hashlib.blake2s(settings.shown_url.encode(), digest_size=4).hexdigest()
    digest = hashlib.blake2s(pattern.encode(), digest_size=4).hexdigest()
    return f"uplink-{hub}-{digest}"


async def _take_batch(pull: Pull) -> list[tuple[Message, Callable[[bool], None]]]:
    batch = [await pull.take()]
    while pull.pending and len(batch) < INTAKE_BATCH:
        batch.append(await pull.take())
    return batch


async def _resolved(fut: asyncio.Future[BaseException]) -> BaseException:
    return await asyncio.shield(fut)
