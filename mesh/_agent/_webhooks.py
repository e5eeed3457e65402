"""Webhook subscriptions: each message POSTed to the app; a 2xx is the ack.

A failed POST (other status, a 3xx included, connection error, timeout) is
retried with exponential backoff and jitter (tenacity) up to the webhook's
`attempts`; then the message goes to the node's dead-letter spool (queue and
durable webhooks, with a data dir: ``zeromesh spool replay`` sends it to the
queue again), or, for a best-effort pattern webhook or a best-effort message
with no spool to take it, is dropped and counted.
`concurrency` bounds POSTs in flight; with 1, each message waits for the one
before it, so each publisher's order is kept. A webhook with ``accept =
"application/json"`` gets MessagePack payloads (typed sends) as JSON.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import Final

import aiohttp
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential_jitter,
)

from .. import _trace
from .._message import Message
from .._node import AsyncNode
from .._reliable._durables import durable_queue
from ..errors import ClosedError, MeshError
from ._config import Webhook
from ._headers import as_json, for_delivery, wants_json
from ._metrics import AgentMetrics

_log = logging.getLogger("mesh.agent.webhook")
_MAX_BACKOFF: Final[float] = 30.0
_MAX_PENDING: Final[int] = 100_000
"""Best-effort messages queued for a slow app before the oldest are dropped (logged once):
a plain pattern webhook is best effort, and must not grow the agent without bound."""
_MAX_PENDING_BYTES: Final[int] = 64 * 1024 * 1024
"""Payload bytes queued for it before the oldest are dropped too (by count alone, a
stalled app of large messages held gigabytes)."""

Settle = Callable[[bool], None]


class _Refused(Exception):
    """The app did not take the message (status, error or timeout)."""


def _settle_nothing(ok: bool) -> None:
    pass


class WebhookRunner:
    """Feeds one webhook from its subscription or queue."""

    def __init__(self, node: AsyncNode, hook: Webhook, index: int,
                 session: aiohttp.ClientSession, metrics: AgentMetrics) -> None:
        self._node = node
        self._hook = hook
        self.label = f"{index}:{hook.queue or hook.pattern}"
        self._session = session
        self._metrics = metrics
        self._slots = asyncio.Semaphore(hook.concurrency)
        self._tasks: set[asyncio.Task[None]] = set()
        self._dead_queue = hook.queue
        self._kind = "queue" if hook.queue else "topic"
        self._json = wants_json(hook.accept)

    @property
    def hook(self) -> Webhook:
        return self._hook

    def update(self, hook: Webhook, index: int) -> None:
        """Take a reload's settings in place (same source and concurrency: see the agent's
        `_source`): the next POST uses them, those in flight finish."""
        self._hook = hook
        self.label = f"{index}:{hook.queue or hook.pattern}"
        self._json = wants_json(hook.accept)

    async def run(self) -> None:
        """Deliver until cancelled (the agent stopping) or the node closes."""
        try:
            async for msg, settle in self._messages():
                await self._slots.acquire()
                task = asyncio.get_running_loop().create_task(
                    self._deliver_traced(msg, settle) if _trace.ON else self._deliver(msg, settle))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
                if self._hook.concurrency == 1:
                    await asyncio.shield(task)  # in order: the next waits for this one
        finally:
            for task in list(self._tasks):
                task.cancel()
            for task in list(self._tasks):
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def _messages(self) -> AsyncIterator[tuple[Message, Settle]]:
        hook, node = self._hook, self._node
        if hook.pattern is not None and hook.durable is None:
            async with await node.subscribe(hook.pattern, max_pending=_MAX_PENDING) as sub:
                sub.bound_bytes(_MAX_PENDING_BYTES)
                counted = 0
                async for msg in sub:
                    if sub.dropped != counted:  # the app too slow: the oldest went unposted
                        self._metrics.webhooks.labels(self.label, "dropped").inc(
                            sub.dropped - counted)
                        counted = sub.dropped
                    yield msg, _settle_nothing
            return
        if hook.queue is not None:
            pull = await node.pull(hook.queue, prefetch=max(8, 2 * hook.concurrency))
        else:
            assert hook.pattern is not None
            assert hook.durable is not None
            pull = await node.subscribe_durable(hook.pattern, hook.durable)
            self._dead_queue = durable_queue(node.id, hook.durable)
        async with pull:
            while True:
                try:
                    yield await pull.take()
                except ClosedError:
                    return

    async def _deliver_traced(self, msg: Message, settle: Settle) -> None:
        """`_deliver` in a CONSUMER span, which each POST's ``traceparent`` names."""
        with _trace.processing(msg, "webhook", destination=self._hook.queue,
                               subscription=self._hook.pattern):
            await self._deliver(msg, settle)

    async def _deliver(self, msg: Message, settle: Settle) -> None:
        try:
            try:
                await self._post_with_retries(msg)
            except _Refused as exc:
                await self._give_up(msg, settle, str(exc))
            else:
                self._metrics.webhooks.labels(self.label, "ok").inc()
                settle(True)
        except asyncio.CancelledError:
            settle(False)  # the agent is stopping: a reliable message comes back later
            raise
        finally:
            self._slots.release()

    async def _post_with_retries(self, msg: Message) -> None:
        hook = self._hook
        retrying = AsyncRetrying(
            stop=stop_after_attempt(hook.attempts),
            wait=wait_exponential_jitter(multiplier=hook.backoff, max=_MAX_BACKOFF,
                                         jitter=hook.backoff),
            retry=retry_if_exception_type(_Refused),
            before_sleep=self._count_retry,
            reraise=True)
        async for attempt in retrying:
            with attempt:
                await self._post(msg)

    def _count_retry(self, state: RetryCallState) -> None:
        self._metrics.webhooks.labels(self.label, "retry").inc()

    async def _post(self, msg: Message) -> None:
        hook = self._hook
        if self._json:
            msg = as_json(msg)
        headers = for_delivery(msg, self._kind)
        if _trace.ON:
            _trace.inject(headers)  # the webhook span (current): the app's spans nest under it
        try:
            async with self._session.post(  # a 3xx is no ack: followed, a 302 becomes a GET
                    hook.url, data=msg.data, headers=headers, allow_redirects=False,
                    timeout=aiohttp.ClientTimeout(total=hook.timeout)) as response:
                await response.read()
                if not 200 <= response.status < 300:
                    raise _Refused(f"{hook.url} answered {response.status}")
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise _Refused(f"{hook.url}: {type(exc).__name__} {exc}".rstrip()) from None

    async def _give_up(self, msg: Message, settle: Settle, reason: str) -> None:
        attempts = self._hook.attempts
        if self._dead_queue is None or (not msg.reliable and self._hook.queue is None):
            self._drop(msg, settle, reason)
            return
        try:
            await self._node.dead_letter(self._dead_queue, msg, reason=reason,
                                         attempts=attempts)
        except MeshError as exc:  # no data dir, or the spool is full
            if not msg.reliable:  # handed back, it would be gone unseen: nobody sends it again
                self._drop(msg, settle, f"{reason}; cannot dead-letter it here ({exc})")
                return
            _log.warning("webhook %s: cannot dead-letter %s here (%s); handing it back",
                         self.label, msg.id, exc)
            settle(False)  # the sender's spool sends it again
            return
        _log.warning("webhook %s: message %s dead-lettered after %d attempts: %s",
                     self.label, msg.id, attempts, reason)
        self._metrics.webhooks.labels(self.label, "dead_letter").inc()
        settle(True)

    def _drop(self, msg: Message, settle: Settle, reason: str) -> None:
        _log.warning("webhook %s: dropped message %s after %d attempts: %s",
                     self.label, msg.id, self._hook.attempts, reason)
        self._metrics.webhooks.labels(self.label, "dropped").inc()
        settle(True)
