"""A node's own figures: its counters sampled once a second, and the report built of them.

Links are what this node's sockets carry, each reported by the end that knows
its count: pub/sub links *into* this node from every peer it has received
from (the publisher's PUB fans out and cannot tell), work and service links
*out* of it to the peers it pushed to or asked, control links out to every
peer it beats to. Rates are counts of the last whole second.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from typing import Final

from .._membership._peers import PeerState, PeerTable
from .._message import Message
from .._pubsub._engine import PubSub
from .._services._requests import Requests
from .._services._serving import Serving
from .._work._queues import WorkQueues
from . import _report
from ._rates import Rates

TICK: Final[float] = 1.0
_CONCURRENCY: Final[int] = 4


class OwnFigures:
    """Samples a node's counters every second; builds and serves its `Report`."""

    def __init__(self, *, peers: PeerTable, pubsub: PubSub, work: WorkQueues,
                 serving: Serving, requests: Requests, heartbeat_interval: float) -> None:
        self._peers = peers
        self._pubsub = pubsub
        self._work = work
        self._serving = serving
        self._requests = requests
        self._beats = max(1, round(1.0 / heartbeat_interval))
        self.node_id = ""
        self.name = ""
        self.published = Rates()
        self.published_bytes = Rates()
        self.delivered = Rates()
        self.received = Rates()
        """Pub/sub messages received from each peer (by id)."""
        self.pushed = Rates()
        """Work messages handed to each peer's workers (by id)."""
        self.asked = Rates()
        """Requests sent to each peer (by id)."""
        self.queued = Rates()
        """Work messages handed out per queue."""
        self.answered = Rates()
        """Requests answered per served service."""

    def start(self, node_id: str, name: str) -> None:
        self.node_id, self.name = node_id, name
        self._serving.serve_internal(_report.FIGURES_SERVICE, self._answer, _CONCURRENCY)

    async def run(self) -> None:
        """Sample every `TICK` seconds until cancelled (on the monotonic clock's multiples)."""
        loop = asyncio.get_running_loop()
        while True:
            self.sample()
            await asyncio.sleep(TICK - loop.time() % TICK)

    def sample(self) -> None:
        pubsub = self._pubsub
        self.published.sample(pubsub.published_by_topic)
        self.published_bytes.sample(pubsub.published_bytes_by_topic)
        self.delivered.sample(pubsub.delivered_by_topic)
        self.received.sample(pubsub.received_by_peer)
        queues, by_peer = self._work.figures()
        self.pushed.sample(by_peer)
        self.queued.sample({name: counts.sent for name, counts in queues.items()})
        self.asked.sample(self._requests.sent_by_peer)
        served = {}
        for name in self._serving.names:
            svc = self._serving.get(name)
            if svc is not None:
                served[name] = svc.handled + svc.failed
        self.answered.sample(served)

    def _answer(self, request: Message) -> bytes:
        return _report.encode(self.report())

    def report(self) -> _report.Report:
        me = self.node_id
        records = self._peers.records()
        peers = [_report.NodeState(r.id, r.name, r.state.value) for r in records]
        links: list[_report.Link] = []
        received = self._pubsub.received_by_peer
        asked = self._requests.sent_by_peer
        pushed = set(self.pushed.names())
        for rec in records:
            beats = self._beats if rec.state is PeerState.ALIVE else 0
            links.append(_report.Link(me, rec.id, "control", beats))
            if rec.id in received:
                links.append(_report.Link(rec.id, me, "pubsub", self.received.per_s(rec.id)))
            if rec.id in pushed:
                links.append(_report.Link(me, rec.id, "work", self.pushed.per_s(rec.id)))
            if rec.id in asked:
                links.append(_report.Link(me, rec.id, "service", self.asked.per_s(rec.id)))
        return _report.Report(me, self.name, time.time(), peers, links,
                              self._pubsub.patterns, self._topics(), self._queues(),
                              self._services())

    def _topics(self) -> list[_report.TopicFigure]:
        out = []
        published = set(self._pubsub.published_by_topic)
        for topic in sorted(published | set(self._pubsub.delivered_by_topic)):
            spark = (self.published if topic in published else self.delivered).spark(topic)
            out.append(_report.TopicFigure(topic, self.published.per_s(topic),
                                           self.delivered.per_s(topic), topic in published,
                                           spark, self.published_bytes.per_s(topic)))
        return out

    def _queues(self) -> list[_report.QueueFigure]:
        queues, _ = self._work.figures()
        return [_report.QueueFigure(name, c.workers, c.in_flight, c.backlog,
                                    self.queued.per_s(name)) for name, c in queues.items()]

    def _services(self) -> list[_report.ServiceFigure]:
        timeouts = self._requests.timeouts_by_service
        out = []
        served = self._serving.names
        for name in sorted(set(served) | set(timeouts)):
            p50 = p99 = None
            timings = self._serving.timings.get(name)
            if timings:
                p50, p99 = _percentiles(list(timings))
            out.append(_report.ServiceFigure(name, name in served, p50, p99,
                                             timeouts.get(name, 0), self.answered.per_s(name)))
        return out


def _percentiles(seconds: list[float]) -> tuple[float, float]:
    """The 50th and 99th percentiles of `seconds`, in milliseconds."""
    if len(seconds) == 1:
        return seconds[0] * 1000, seconds[0] * 1000
    cuts = statistics.quantiles(seconds, n=100, method="inclusive")
    return round(cuts[49] * 1000, 3), round(cuts[98] * 1000, 3)
