"""The agent's metrics in Prometheus text format (the official client library).

Node counters are read when scraped (a collector over `AsyncNode.traffic()`),
so the message path pays one dict increment per batch and nothing per scrape
interval. What only the agent sees (HTTP routes, requests, webhooks, pushes)
uses the client's own counters in a registry private to this agent.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Final

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .._membership._peers import PeerState
from .._node import AsyncNode
from .._uplink._link import LinkState
from .._uplink._links import Uplinks

disable_created_metrics()  # type: ignore[no-untyped-call]  # `_created` series double the output and nobody graphs them

CONTENT_TYPE: Final[str] = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS: Final = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1,
                           0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_NODE_TOTALS: Final = (
    ("spooled", "zeromesh_messages_spooled", "Reliable messages written to the outbox spool."),
    ("redelivered", "zeromesh_messages_redelivered",
     "Reliable deliveries that failed and were scheduled again."),
    ("dead_lettered", "zeromesh_messages_dead_lettered",
     "Reliable messages moved to the dead-letter spool after max_attempts."),
    ("pulled", "zeromesh_messages_pulled", "Work messages received by this node's workers."),
    ("lost_in_flight", "zeromesh_messages_lost_in_flight",
     "Best-effort work messages in the pipe of a worker that died."),
    ("duplicates", "zeromesh_messages_duplicate", "Reliable duplicates dropped by dedup."),
    ("expired", "zeromesh_messages_expired",
     "Messages dropped undelivered because their ttl passed: on arrival here, or waiting "
     "in this node's queues or spool."),
    ("oversized", "zeromesh_messages_oversized",
     "Sends refused before sending: larger than max_message_size."),
    ("abandoned", "zeromesh_messages_abandoned",
     "Spooled messages freed because every durable they waited for was forgotten."),
    ("durables_forgotten", "zeromesh_durables_forgotten",
     "Durable subscriptions this node forgot while running (forget_durable, durable_expiry)."),
)


class AgentMetrics:
    """Every metric one agent exposes."""

    def __init__(self, node: AsyncNode, uplinks: Uplinks) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.http = Counter("zeromesh_http_requests", "HTTP requests by route and status.",
                            ["route", "status"], registry=r)
        self.pushed = Counter("zeromesh_messages_pushed",
                              "Work messages pushed through this agent, per queue.",
                              ["queue"], registry=r)
        self.requests = Counter("zeromesh_requests",
                                "Requests sent through this agent, per service and outcome.",
                                ["service", "outcome"], registry=r)
        self.latency = Histogram("zeromesh_request_duration_seconds",
                                 "Request round trip through this agent, per service.",
                                 ["service"], buckets=_LATENCY_BUCKETS, registry=r)
        self.webhooks = Counter("zeromesh_webhook_deliveries",
                                "Webhook POSTs per webhook and outcome "
                                "(ok, retry, dead_letter, dropped).",
                                ["webhook", "outcome"], registry=r)
        self.sse = Counter("zeromesh_sse_events", "Messages sent to SSE streams, per pattern.",
                           ["pattern"], registry=r)
        self.sse_dropped = Counter("zeromesh_sse_dropped",
                                   "Messages an SSE client was too slow for (oldest dropped), "
                                   "per pattern.", ["pattern"], registry=r)
        r.register(_NodeCollector(node))
        r.register(_UplinkCollector(uplinks))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _NodeCollector(Collector):
    """The node's own counters, read at scrape time."""

    def __init__(self, node: AsyncNode) -> None:
        self._node = node

    def collect(self) -> Iterator[Metric]:
        node = self._node
        traffic = node.traffic()
        names = {p.id: p.name for p in node.peers()}

        published = CounterMetricFamily(
            "zeromesh_messages_published", "Messages published by this node, per topic.",
            labels=["topic"])
        for topic, n in traffic.published_by_topic.items():
            published.add_metric([topic], n)
        yield published

        received = CounterMetricFamily(
            "zeromesh_messages_received",
            "Messages handed to this node's subscriptions (once per message), per topic.",
            labels=["topic"])
        for topic, n in traffic.delivered_by_topic.items():
            received.add_metric([topic], n)
        yield received

        by_peer = CounterMetricFamily(
            "zeromesh_peer_messages_received", "Pub/sub messages received from each peer.",
            labels=["peer", "peer_id"])
        for peer_id, n in traffic.received_by_peer.items():
            by_peer.add_metric([names.get(peer_id, ""), peer_id], n)
        yield by_peer

        dropped = CounterMetricFamily(
            "zeromesh_messages_dropped",
            "Messages a publisher dropped for this node at its high-water mark, per peer "
            "(ZeroMQ PUB semantics: a slow subscriber loses, a publisher never blocks).",
            labels=["peer", "peer_id"])
        for peer_id, n in traffic.dropped_by_peer.items():
            dropped.add_metric([names.get(peer_id, ""), peer_id], n)
        yield dropped

        for key, name, text in _NODE_TOTALS:
            family = CounterMetricFamily(name, text)
            family.add_metric([], traffic.totals.get(key, 0))
            yield family

        peers = GaugeMetricFamily("zeromesh_peers", "Known peers by liveness state.",
                                  labels=["state"])
        states = [p.state for p in node.peers()]
        for state in PeerState:
            peers.add_metric([state.value], states.count(state))
        yield peers

        yield GaugeMetricFamily("zeromesh_spool_messages",
                                "Reliable messages in the outbox spool, not yet delivered.",
                                value=traffic.spool_messages)
        yield GaugeMetricFamily("zeromesh_spool_bytes", "Bytes the outbox spool holds on disk.",
                                value=traffic.spool_bytes)
        yield GaugeMetricFamily("zeromesh_dead_letters", "Messages in the dead-letter spool.",
                                value=traffic.dead_letters)

        dropped_input = CounterMetricFamily(
            "zeromesh_input_dropped",
            "Input dropped without harm, by reason (undecodable frames, other meshes, "
            "refused peers...).", labels=["reason"])
        for reason, n in traffic.input_dropped.items():
            dropped_input.add_metric([reason], n)
        yield dropped_input
        refused = CounterMetricFamily("zeromesh_curve_refused",
                                      "Connections refused: CURVE key not in the allowlist.")
        refused.add_metric([], traffic.curve_refused)
        yield refused


_UPLINK_TOTALS: Final = (
    ("exported", "Messages the hub acknowledged."),
    ("imported", "Hub messages published into the mesh."),
    ("failed", "Messages given up on (refused by the hub repeatedly, or unmappable)."),
    ("dropped", "Best-effort messages not exported: the backlog quota was full."),
    ("duplicates", "Hub redeliveries recognised and not published again."),
    ("hub_duplicates", "Resends the hub already had and dropped by message id."),
    ("looped", "Messages not sent back to the hub they came from."),
    ("connects", "Connections made to the hub."),
)


class _UplinkCollector(Collector):
    """`zeromesh_uplink_*`, per uplink (labelled by url and prefix), read at scrape time."""

    def __init__(self, uplinks: Uplinks) -> None:
        self._uplinks = uplinks

    def collect(self) -> Iterator[Metric]:
        links = self._uplinks.links
        labels = ["url", "prefix"]
        for key, text in _UPLINK_TOTALS:
            family = CounterMetricFamily(f"zeromesh_uplink_{key}", text, labels=labels)
            for link in links:
                family.add_metric([link.settings.shown_url, link.settings.prefix],
                                  getattr(link.counts, key))
            yield family
        backlog = GaugeMetricFamily("zeromesh_uplink_backlog",
                                    "Exported messages not yet acknowledged by the hub.",
                                    labels=labels)
        age = GaugeMetricFamily("zeromesh_uplink_oldest_pending_seconds",
                                "Age of the oldest message waiting for the hub.", labels=labels)
        state = GaugeMetricFamily("zeromesh_uplink_state",
                                  "1 for the uplink's current state.", labels=[*labels, "state"])
        for link in links:
            at = [link.settings.shown_url, link.settings.prefix]
            backlog.add_metric(at, len(link.backlog))
            age.add_metric(at, link.backlog.oldest_age())
            for each in LinkState:
                state.add_metric([*at, each.value], float(link.state is each))
        yield backlog
        yield age
        yield state
