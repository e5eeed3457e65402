"""The agent's metrics in Prometheus text format (the official client library).

Node counters are read when scraped (a collector over `AsyncNode.traffic()`),
so the message path pays one dict increment per batch and nothing per scrape
interval. Per-name families (``zeromesh_topic_messages_*``, ``..._queue_...``,
``zeromesh_service_requests_*``, ``zeromesh_peer_messages_*``) have at most
`NodeConfig.metrics_names` label values each, the rest summed under ``other``.
The sampled delivery latency is a histogram by kind (``pubsub``, ``work``) and
the same samples by name (``zeromesh_topic_delivery_latency_seconds{topic}``,
``zeromesh_queue_...{queue}``): a histogram is a score of series per label
value, so those keep far fewer names, the busiest `LATENCY_NAMES` (20), the
rest under ``other``; so do the round trips of requests through the agent
(``zeromesh_request_duration_seconds{service}``). What only the agent sees uses plain
dicts where every request counts (HTTP routes, requests: a prometheus Counter's lock
and label lookup cost more than the increment) and the client's own counters for the
rest (webhooks, pushes, SSE), in a registry private to this agent; the names in their
labels (queues, services, SSE patterns: any a client sends) are bounded the same way,
the first `metrics_names` kept (`BoundedNames`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, Final

from prometheus_client import (
    CollectorRegistry,
    Counter,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from .._membership._peers import PeerState
from .._node import AsyncNode
from .._support._tally import (
    LATENCY_NAMES,
    OTHER,
    SAMPLE_EVERY,
    Latencies,
    LatencySnapshot,
    Traffic,
)
from .._uplink._link import LinkState
from .._uplink._links import Uplinks

disable_created_metrics()  # type: ignore[no-untyped-call]  # `_created` series double the output and nobody graphs them

CONTENT_TYPE: Final[str] = "text/plain; version=0.0.4; charset=utf-8"
_LISTED_STATES: Final = tuple(s for s in PeerState if s is not PeerState.LEFT)
"""The states `node.peers()` shows (a peer that left is not listed)."""
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
    ("decode_errors", "zeromesh_messages_undecodable",
     "Messages a typed subscription or pull (type=T) skipped: not a T."),
    ("oversized", "zeromesh_messages_oversized",
     "Sends refused before sending: larger than max_message_size."),
    ("paused", "zeromesh_publish_pauses",
     "Times this node's publishing waited for a subscriber that was behind (pacing)."),
    ("pauses_asked", "zeromesh_publish_pauses_asked",
     "Pauses this node asked of publishers while it was behind on their messages."),
    ("abandoned", "zeromesh_messages_abandoned",
     "Spooled messages freed because every durable they waited for was forgotten."),
    ("durables_forgotten", "zeromesh_durables_forgotten",
     "Durable subscriptions this node forgot while running (forget_durable, durable_expiry, "
     "end_durable: by their owner or here)."),
)
_SPOOL_EVENTS: Final = (
    ("spooled", "written to the outbox spool (reliable)"),
    ("redelivered", "failed and scheduled again (reliable)"),
    ("dead_lettered", "moved to the dead-letter spool"),
)
_BY_NAME: Final = (
    ("topic", "messages", (
        ("sent", "published by this node"),
        ("received", "handed to this node's subscriptions (once per message)"),
        ("dropped", "a publisher dropped for this node at its high-water mark"),
        ("expired", "dropped undelivered here because their ttl passed"),
        *_SPOOL_EVENTS)),
    ("topic", "bytes", (
        ("sent", "of payload published by this node"),)),
    ("queue", "messages", (
        ("sent", "sent to workers by this node (a redelivery again)"),
        ("received", "taken by this node's workers"),
        ("dropped", "best-effort, lost in the pipe of a worker that died"),
        ("expired", "dropped undelivered here because their ttl passed"),
        *_SPOOL_EVENTS)),
    ("service", "requests", (
        ("sent", "sent by this node (each attempt)"),
        ("received", "served by this node"),
        ("dropped", "that reached this node for a service it does not serve"),
        ("redelivered", "attempts after the first (another server)"),
        ("timed_out", "given up on: no reply in time"),
        ("remote_errors", "answered with an error by the server"))),
    ("peer", "messages", (
        ("sent", "sent to the peer (work, requests)"),
        ("received", "received from the peer (pub/sub, work, requests)"),
        ("dropped", "lost on the way: high-water mark gaps and work lost with the peer"))),
)
"""Per kind of name: (kind, what is counted, (event, help)). Each event is its own
family, ``zeromesh_<kind>_<what>_<event>_total``, labelled by the kind (and ``peer_id``)."""


class AgentMetrics:
    """Every metric one agent exposes."""

    def __init__(self, node: AsyncNode, uplinks: Uplinks) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.http: dict[tuple[str, int], int] = {}
        """HTTP requests by (route, status): a plain dict, as every request counts here
        (a prometheus Counter's lock and label lookup cost more than the increment)."""
        self.pushed = Counter("zeromesh_messages_pushed",
                              "Work messages pushed through this agent, per queue.",
                              ["queue"], registry=r)
        self.requests: dict[tuple[str, str], int] = {}
        """Requests through this agent by (service, outcome): a plain dict, as `http`."""
        self.request_latency = Latencies()
        """Round trips answered, by service: histograms of the busiest `LATENCY_NAMES`."""
        self.webhooks = Counter("zeromesh_webhook_deliveries",
                                "Webhook POSTs per webhook and outcome "
                                "(ok, retry, dead_letter, dropped).",
                                ["webhook", "outcome"], registry=r)
        self.service_apps = Counter("zeromesh_service_app_requests",
                                    "Requests POSTed to a [[service]] app, per service and "
                                    "outcome (ok, status, timeout, unreachable, error).",
                                    ["service", "outcome"], registry=r)
        self.sse = Counter("zeromesh_sse_events", "Messages sent to SSE streams, per pattern.",
                           ["pattern"], registry=r)
        self.sse_dropped = Counter("zeromesh_sse_dropped",
                                   "Messages an SSE client was too slow for (oldest dropped), "
                                   "per pattern.", ["pattern"], registry=r)
        limit = node.config.metrics_names
        self.queue_label = BoundedNames(limit)
        self.service_label = BoundedNames(limit)
        self.pattern_label = BoundedNames(limit)
        r.register(_HttpCollector(self.http))
        r.register(_RequestCollector(self.requests, self.request_latency))
        r.register(_NodeCollector(node))
        r.register(_UplinkCollector(uplinks))

    def requested(self, service: str, outcome: str, seconds: float) -> None:
        """Count one request through this agent (its round trip when it was answered)."""
        key = (self.service_label(service), outcome)
        requests = self.requests
        requests[key] = requests.get(key, 0) + 1
        if outcome == "ok":
            self.request_latency.sample(service, seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class BoundedNames:
    """The label value for a name a client chose: itself for the first `limit` names,
    `OTHER` past them, so a client naming ever new queues, services or patterns cannot
    grow the agent's memory or its scrape without bound."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._kept: set[str] = set()

    def __call__(self, name: str) -> str:
        kept = self._kept
        if name in kept:
            return name
        if len(kept) < self._limit:
            kept.add(name)
            return name
        return OTHER


class _HttpCollector(Collector):
    """``zeromesh_http_requests_total{route, status}`` from the agent's dict."""

    def __init__(self, counts: dict[tuple[str, int], int]) -> None:
        self._counts = counts

    def collect(self) -> Iterator[Metric]:
        yield _counter("zeromesh_http_requests", "HTTP requests by route and status.",
                       ["route", "status"], self._counts)


class _RequestCollector(Collector):
    """``zeromesh_requests_total{service, outcome}`` and
    ``zeromesh_request_duration_seconds{service}`` from the agent's own counts."""

    def __init__(self, counts: dict[tuple[str, str], int], latency: Latencies) -> None:
        self._counts = counts
        self._latency = latency

    def collect(self) -> Iterator[Metric]:
        yield _counter("zeromesh_requests",
                       "Requests sent through this agent, per service and outcome.",
                       ["service", "outcome"], self._counts)
        yield _histogram("zeromesh_request_duration_seconds",
                         f"Round trip of the requests answered through this agent, per "
                         f"service (the busiest {LATENCY_NAMES}, the rest as {OTHER}).",
                         "service", self._latency.snapshot())


class _NodeCollector(Collector):
    """The node's own counters, read at scrape time."""

    def __init__(self, node: AsyncNode) -> None:
        self._node = node
        self._names: dict[str, str] = {}
        """Peer id -> name, for ids that are peers or still in a per-peer counter: a peer
        gone (forgotten) keeps its ``peer`` label, so its series stays the same series."""

    def collect(self) -> Iterator[Metric]:
        node = self._node
        traffic = node.traffic()
        names = self._peer_names(traffic)

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
        for state in _LISTED_STATES:
            peers.add_metric([state.value], states.count(state))
        yield peers

        yield GaugeMetricFamily("zeromesh_spool_messages",
                                "Reliable messages in the outbox spool, not yet delivered.",
                                value=traffic.spool_messages)
        yield GaugeMetricFamily("zeromesh_spool_bytes",
                                "Bytes of undelivered messages in the outbox spool, as its "
                                "quota counts them.", value=traffic.spool_bytes)
        yield GaugeMetricFamily("zeromesh_spool_disk_bytes",
                                "Bytes of the outbox spool's files, delivered messages "
                                "included until reclaimed.", value=traffic.spool_disk_bytes)
        yield GaugeMetricFamily("zeromesh_dead_letters", "Messages in the dead-letter spool.",
                                value=traffic.dead_letters)

        yield from _by_name(traffic.by_name, names)
        yield _histogram("zeromesh_delivery_latency_seconds",
                         f"Publish to delivery, sampled (the oldest message of one received "
                         f"batch in {SAMPLE_EVERY}), by kind (pubsub, work); from the "
                         f"sender's clock.", "kind", traffic.latency)
        for kind, what in (("topic", "pubsub"), ("queue", "work")):
            yield _histogram(f"zeromesh_{kind}_delivery_latency_seconds",
                             f"The {what} delivery latency samples, per {kind} (the busiest "
                             f"{LATENCY_NAMES}, the rest as {OTHER}).", kind,
                             traffic.latency_by_name.get(kind, {}))

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
        yield from _membership(traffic.membership)


    def _peer_names(self, traffic: Traffic) -> dict[str, str]:
        counted = {*traffic.dropped_by_peer, *(
            peer_id for counts in traffic.by_name.get("peer", {}).values() for peer_id in counts)}
        names = {peer_id: name for peer_id, name in self._names.items() if peer_id in counted}
        names.update((p.id, p.name) for p in self._node.peers())
        self._names = names
        return names


def _membership(figures: dict[str, int]) -> Iterator[Metric]:
    members = GaugeMetricFamily("zeromesh_members",
                                "Members this node knows alive (gossip included), itself not.")
    members.add_metric([], figures.get("members", 0))
    yield members
    links = GaugeMetricFamily("zeromesh_control_links",
                              "Control links held: neighbours, partners, pending greetings.")
    links.add_metric([], figures.get("links", 0))
    yield links
    watched = GaugeMetricFamily("zeromesh_watched_members",
                                "Members this node heartbeats and watches itself.")
    watched.add_metric([], figures.get("watched", 0))
    yield watched
    control = CounterMetricFamily("zeromesh_control_messages",
                                  "Control messages (heartbeats, gossip, hellos, credits).",
                                  labels=["direction"])
    control.add_metric(["sent"], figures.get("control_sent", 0))
    control.add_metric(["received"], figures.get("control_received", 0))
    yield control


def _by_name(by_name: dict[str, dict[str, dict[str, int]]],
              names: dict[str, str]) -> Iterator[Metric]:
    """Every per-name family, present (if empty) whether or not its event happened yet."""
    for kind, what, events in _BY_NAME:
        counts = by_name.get(kind, {})
        labels = ["peer", "peer_id"] if kind == "peer" else [kind]
        for event, text in events:
            family = CounterMetricFamily(f"zeromesh_{kind}_{what}_{event}",
                                         f"{what.capitalize()} {text}, per {kind}.",
                                         labels=labels)
            key = event if what != "bytes" else f"bytes_{event}"
            for name, n in counts.get(key, {}).items():
                if kind == "peer":
                    family.add_metric([OTHER if name == OTHER else names.get(name, ""), name],
                                      n)
                else:
                    family.add_metric([name], n)
            yield family


def _counter(name: str, text: str, labels: list[str],
             counts: Mapping[tuple[Any, ...], int]) -> CounterMetricFamily:
    """A counter family from a dict of counts by label values."""
    family = CounterMetricFamily(name, text, labels=labels)
    for key, value in sorted(counts.items()):
        family.add_metric([str(part) for part in key], value)
    return family


def _histogram(name: str, text: str, label: str,
               snapshots: Mapping[str, LatencySnapshot]) -> HistogramMetricFamily:
    """A latency histogram family, one series per name in `snapshots`."""
    family = HistogramMetricFamily(name, text, labels=[label])
    for value, snapshot in sorted(snapshots.items()):
        family.add_metric([value], _buckets(snapshot), snapshot.total)
    return family


def _buckets(snapshot: LatencySnapshot) -> list[tuple[str, float]]:
    """Cumulative buckets as Prometheus wants them, ending with +Inf."""
    out, running = [], 0
    for bound, n in zip([*map(repr, snapshot.bounds), "+Inf"], snapshot.counts, strict=True):
        running += n
        out.append((bound, float(running)))
    return out


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
