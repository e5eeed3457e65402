"""Pacing: a publisher waits while a subscriber that is behind catches up, unless that
subscriber's consumer has stopped (`mesh._pubsub._pace`)."""

from __future__ import annotations

import asyncio
import time

from mesh import AsyncNode, Subscription
from mesh._pubsub._pace import LAG, MAX_PAUSE, MIN_QUEUED, Consumption, Transit
from tests.helpers import aeventually

from .conftest import MakeNode

BURST = 60_000


def test_a_moving_consumer_behind_asks_to_come_back_to_half_the_lag() -> None:
    consumption = Consumption()
    consumption.pause_wanted(5000, 0, 0)  # (the first look only marks)
    time.sleep(0.01)
    pause = consumption.pause_wanted(5000, 500, 0)  # ~50,000 messages/s, 5,000 queued: ~0.1 s
    assert consumption.rate > 0.0
    assert pause == MAX_PAUSE
    assert consumption.pause_wanted(int(consumption.rate * LAG / 2), 500, 0) == 0.0


def test_a_stopped_consumer_asks_for_nothing() -> None:
    consumption = Consumption()
    consumption.pause_wanted(5000, 100, 0)
    time.sleep(0.01)
    assert consumption.pause_wanted(90_000, 100, 0) == 0.0  # nothing taken since: no rate


def test_a_consumer_that_ran_dry_meanwhile_is_not_taken_for_slow() -> None:
    consumption = Consumption()
    consumption.pause_wanted(5000, 0, 0)
    time.sleep(0.01)
    # it took 500 and then waited for more (dry 0 -> 1): 500 in 10 ms is not its speed
    assert consumption.pause_wanted(5000, 500, 1) == 0.0


def test_transit_is_measured_above_the_least_delay_seen_whatever_the_clock_offset() -> None:
    transit = Transit()
    offset = 3600.0  # the publisher's clock is an hour behind ours
    assert transit.queueing("p", offset + 0.001, 100.0) == 0.0
    assert transit.queueing("p", offset + 0.0004, 100.1) == 0.0  # a new least
    assert abs(transit.queueing("p", offset + 0.0104, 100.2) - 0.010) < 1e-9
    assert transit.queueing("q", 5.0, 100.2) == 0.0  # each publisher on its own


async def _pair(make_node: MakeNode, max_pending: int = 100_000
                ) -> tuple[AsyncNode, AsyncNode, Subscription]:
    publisher, subscriber = await make_node("publisher"), await make_node("subscriber")
    sub = await subscriber.subscribe("burst.>", retained=False, max_pending=max_pending)
    await publisher.wait_for_subscribers("burst.x", 1, timeout=5)
    return publisher, subscriber, sub


async def test_a_slow_moving_subscriber_paces_its_publisher(make_node: MakeNode) -> None:
    """A consumer at ~90 k messages/s under a burst of 60,000: the publisher is held
    back instead of queueing the burst at the subscriber; nothing is lost."""
    publisher, subscriber, sub = await _pair(make_node)
    deepest = 0

    async def consume() -> None:
        nonlocal deepest
        for taken in range(1, BURST + 1):
            await sub.next(timeout=10)
            deepest = max(deepest, sub.pending)
            if taken % 100 == 0:
                await asyncio.sleep(0.001)

    consumer = asyncio.create_task(consume())
    for i in range(BURST):
        await publisher.publish("burst.x", i.to_bytes(4, "little"))
    await asyncio.wait_for(consumer, timeout=30)
    print(f"deepest queue {deepest}, publisher paused {publisher.stats['paused']} times, "
          f"{subscriber.stats['pauses_asked']} pauses asked")
    assert subscriber.stats["pauses_asked"] > 0
    assert publisher.stats["paused"] > 0
    assert sub.dropped == 0
    assert deepest < BURST // 2, deepest  # unpaced, nearly the whole burst queues here


async def test_a_stopped_consumer_does_not_hold_its_publisher(make_node: MakeNode) -> None:
    """A subscription nobody reads loses the oldest beyond max_pending, as before; the
    publisher is not held back for it."""
    publisher, _, sub = await _pair(make_node, max_pending=1000)
    started = time.monotonic()
    for i in range(BURST):
        await publisher.publish("burst.x", i.to_bytes(4, "little"))
    took = time.monotonic() - started
    await aeventually(lambda: sub.received == BURST, timeout=5)  # (the drops are counted)
    print(f"published in {took:.3f} s; paused {publisher.stats['paused']} times; "
          f"dropped {sub.dropped}")
    assert sub.dropped > 0
    assert MIN_QUEUED <= sub.pending <= 1000
    # held at every full batch (as it would be if a stopped consumer asked for pauses),
    # 60,000 messages would take seconds
    assert took < 1.0, took
