"""The two ends of each bench pattern, on the public `AsyncNode` API only.

Senders put a send timestamp (``time.time_ns()``, 8 bytes little endian) at
the head of every payload, so the receiver measures one-way latency without
talking back; after the last message they send an end marker (the same
topic or queue, told apart by its headers) with how many they sent and how
long that took, so the receiver can count drops and show the sender's rate.
Receiving roles return once every message arrived, or the marker came and
nothing more did for a moment; the caller bounds the whole run in time.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass
from typing import Any, Final, Protocol

from .._message import Message
from .._node import AsyncNode
from ..errors import DeliveryError, RequestTimeout
from ._stats import Meter

HEADER: Final[int] = 8
"""Bytes of send timestamp at the head of every payload (so --size is at least this)."""
_STAMP = struct.Struct("<q")
_unpack = _STAMP.unpack_from
_now = time.time_ns
_END: Final[str] = "zeromesh-bench"
_SETTLE: Final[float] = 0.5
"""After the end marker, how long with no message means the rest were dropped."""
_WINDOW: Final[int] = 1000
"""Reliable publishes per `publish_many`: one group commit each."""
NAMES: Final[dict[str, str]] = {"pubsub": "bench.pubsub", "pushpull": "bench.pushpull",
                                "reqrep": "bench.reqrep", "spool": "bench.spool"}
"""The topic, queue or service each pattern uses."""


@dataclass(frozen=True)
class Plan:
    """What to run: the same on both ends."""

    pattern: str
    count: int
    size: int
    in_flight: int

    @property
    def name(self) -> str:
        return NAMES[self.pattern]

    def payloads(self, n: int) -> Iterator[bytes]:
        """`n` payloads of `size` bytes, each stamped when it is made."""
        pad, pack, now = bytes(self.size - HEADER), _STAMP.pack, time.time_ns
        for _ in range(n):
            yield pack(now()) + pad


Role = Callable[[AsyncNode, Plan, Meter, Callable[[], float]], Coroutine[Any, Any, None]]
"""A role runs one end: node, plan, figures, and the seconds left in the run."""


def _end_headers(meter: Meter) -> dict[str, str]:
    return {_END: "end", "sent": str(meter.sent or 0), "send-ns": str(meter.send_ns or 0)}


class _Closable(Protocol):
    async def aclose(self) -> None: ...


class _Receiver:
    """Records each message; notices the end marker; says when the run is complete."""

    def __init__(self, plan: Plan, meter: Meter, *, reliable: bool = False) -> None:
        self.meter = meter
        self.reliable = reliable
        self.target = plan.count
        """Messages that complete the run: `count` until the end marker tells."""
        self.done = asyncio.Event()
        self.marked = asyncio.Event()
        """The end marker came (it says how many were sent)."""
        self._append = meter.latencies.append

    def __call__(self, msg: Message) -> None:
        """The hot path, so `Meter.record` is inlined with bound methods."""
        meter = self.meter
        if msg.headers is None or _END not in msg.headers:
            now = _now()
            self._append(now - _unpack(msg.data)[0])
            if not meter.received:
                meter.first_ns = now
            meter.last_ns = now
            meter.received += 1
        else:
            meter.sent = self.target = int(msg.headers.get("sent", "0"))
            meter.send_ns = int(msg.headers.get("send-ns", "0")) or None
            self.marked.set()
            msg.ack()  # a durable's last message: its sender waits for this ack
        if meter.received >= self.target and (self.marked.is_set() or not self.reliable):
            self.done.set()  # (reliable: the marker too, or its sender waits for its ack)

    async def run(self, source: _Closable) -> None:
        """Wait, then stop receiving from `source` (a subscription or pull) whatever happened."""
        try:
            await self.wait()
        finally:
            await source.aclose()

    async def wait(self) -> None:
        """Until complete, or (unless `reliable`: those arrive, however late) the marker
        came and then nothing for a moment."""
        if self.reliable:
            await self.done.wait()
            return
        seen = -1
        while not self.done.is_set():
            if self.marked.is_set() and self.meter.received == seen:
                return
            seen = self.meter.received if self.marked.is_set() else -1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.done.wait(), _SETTLE)
        # All came: the marker, sent after them, may still be on its way (a work queue's
        # marker can travel in a later frame than the last message); it says how many
        # were sent, so give it a moment.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.marked.wait(), _SETTLE)


async def _send(plan: Plan, meter: Meter, send: Callable[[bytes], Awaitable[None]]) -> None:
    """Send `count` stamped payloads one by one, timing it."""
    start = time.perf_counter_ns()
    meter.sent = 0
    for payload in plan.payloads(plan.count):
        await send(payload)
        meter.sent += 1
    meter.send_ns = time.perf_counter_ns() - start


async def pub(node: AsyncNode, plan: Plan, meter: Meter, left: Callable[[], float]) -> None:
    await node.wait_for_subscribers(plan.name, 1, timeout=left())
    await _send(plan, meter, lambda data: node.publish(plan.name, data))
    await node.publish(plan.name, b"", headers=_end_headers(meter))


async def sub(node: AsyncNode, plan: Plan, meter: Meter, left: Callable[[], float]) -> None:
    receiver = _Receiver(plan, meter)
    await receiver.run(await node.subscribe(plan.name, callback=receiver))


async def push(node: AsyncNode, plan: Plan, meter: Meter, left: Callable[[], float]) -> None:
    await node.wait_for_workers(plan.name, 1, timeout=left())
    await _send(plan, meter, lambda data: node.push(plan.name, data, timeout=left()))
    await node.push(plan.name, b"", headers=_end_headers(meter), timeout=left())


async def pull(node: AsyncNode, plan: Plan, meter: Meter, left: Callable[[], float]) -> None:
    receiver = _Receiver(plan, meter)
    await receiver.run(await node.pull(plan.name, handler=receiver))


async def req(node: AsyncNode, plan: Plan, meter: Meter, left: Callable[[], float]) -> None:
    """`in_flight` requesters share the count; latency is the round trip."""
    await node.wait_for_service(plan.name, timeout=left())
    payload = bytes(plan.size)
    issued = 0
    clock = time.perf_counter_ns

    async def requester() -> None:
        nonlocal issued
        while issued < plan.count:
            issued += 1
            start = clock()
            try:
                await node.request(plan.name, payload, timeout=min(left(), 5.0), retries=0)
            except DeliveryError:  # a lost or failed request is the bench's "drop"
                meter.failures += 1
                continue
            now = clock()
            meter.record(now, now - start)

    meter.begin(clock())
    await asyncio.gather(*(requester() for _ in range(plan.in_flight)))


async def rep(node: AsyncNode, plan: Plan, meter: Meter, left: Callable[[], float]) -> None:
    """Echo requests until cancelled (by the other end finishing, a signal or the timeout)."""

    def echo(msg: Message) -> bytes:
        meter.received += 1
        return msg.data

    service = await node.serve(plan.name, echo)
    try:
        await asyncio.Event().wait()
    finally:
        await service.aclose()


async def spool_pub(node: AsyncNode, plan: Plan, meter: Meter,
                    left: Callable[[], float]) -> None:
    """Reliable publishes in windows (one group commit each), then wait for every ack."""
    # A live subscriber first: a --data-dir may remember durables that are not running,
    # and one of those alone would be spooled for while the running one missed out.
    await node.wait_for_subscribers(plan.name, 1, timeout=left())
    await node.wait_for_durables(plan.name, 1, timeout=left())
    start = time.perf_counter_ns()
    meter.sent = 0
    while meter.sent < plan.count:
        n = min(_WINDOW, plan.count - meter.sent)
        await node.publish_many(plan.name, plan.payloads(n), reliable=True)
        meter.sent += n
    meter.send_ns = time.perf_counter_ns() - start
    await node.publish(plan.name, b"", headers=_end_headers(meter), reliable=True)
    try:
        await node.wait_for_spool(timeout=left())
    except RequestTimeout:  # not "waiting for the other end": it came, and did not take all
        raise DeliveryError(f"{node.spool_pending:,} spooled messages not acknowledged in "
                            "time (a --data-dir keeps them for every durable it has seen, "
                            "running or not)") from None


async def spool_sub(node: AsyncNode, plan: Plan, meter: Meter,
                    left: Callable[[], float]) -> None:
    """A durable subscription, consumed as fast as it comes."""
    receiver = _Receiver(plan, meter, reliable=True)
    durable = await node.subscribe_durable(plan.name, "bench")

    async def consume() -> None:
        async for msg in durable:
            receiver(msg)

    consumer = asyncio.create_task(consume())
    try:
        await receiver.run(durable)
    finally:
        consumer.cancel()


ROLES: Final[dict[str, dict[str, Role]]] = {
    "pubsub": {"sub": sub, "pub": pub},
    "pushpull": {"pull": pull, "push": push},
    "reqrep": {"req": req, "rep": rep},
    "spool": {"sub": spool_sub, "pub": spool_pub},
}
"""Per pattern: the measuring end first, then its partner (the child in a local run)."""

RECEIVERS: Final[frozenset[str]] = frozenset({"sub", "pull", "req"})
"""Roles that measure messages arriving (a requester measures replies)."""
