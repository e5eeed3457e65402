"""Merging nodes' reports into the mesh's picture: topology, topics, queues, services.

Each message is counted once, where it is known best: a topic's rate is the
sum of its publishers' (so a topic nobody subscribes to still has one), or,
when no reachable node published it, the most any subscriber received.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

from patterns import InvalidName, TopicPattern

from ._rates import WINDOW
from ._report import Report

MAX_TOPICS: Final[int] = 200
OTHER: Final[str] = "other"


def topology(reports: Sequence[Report], states: dict[str, str]) -> dict[str, Any]:
    """``{"nodes": [...], "links": [...]}``; `reports[0]` is this node's, `states` its view
    of its peers (a node it does not know itself takes its reporter's view)."""
    me = reports[0].id if reports else ""
    nodes: dict[str, dict[str, Any]] = {}
    for report in reports:
        nodes.setdefault(report.id, _node(report.id, report.name, "alive", me))
    for report in reports:
        for peer in report.peers:
            nodes.setdefault(peer.id, _node(peer.id, peer.name, peer.state, me))
    for node_id, state in states.items():
        if node_id in nodes:
            nodes[node_id]["state"] = state
    links: dict[tuple[str, str, str], int] = {}
    for report in reports:
        for link in report.links:
            key = (link.source, link.target, link.kind)
            links[key] = max(links.get(key, 0), link.msgs_per_s)
    return {"nodes": sorted(nodes.values(), key=lambda n: (not n["self"], n["name"], n["id"])),
            "links": [{"source": s, "target": t, "kind": k, "msgs_per_s": rate}
                      for (s, t, k), rate in sorted(links.items())]}


def _node(node_id: str, name: str, state: str, me: str) -> dict[str, Any]:
    return {"id": node_id, "name": name, "state": state, "self": node_id == me}


def topics(reports: Sequence[Report]) -> list[dict[str, Any]]:
    """Every topic any node published or received, busiest first, at most `MAX_TOPICS`
    (the rest summed as ``other``)."""
    published: dict[str, int] = {}
    published_bytes: dict[str, int] = {}
    delivered: dict[str, int] = {}
    pub_spark: dict[str, list[int]] = {}
    sub_spark: dict[str, list[int]] = {}
    for report in reports:
        for fig in report.topics:
            if fig.publishes:
                published[fig.topic] = published.get(fig.topic, 0) + fig.published_per_s
                published_bytes[fig.topic] = (published_bytes.get(fig.topic, 0)
                                              + fig.bytes_per_s)
                _add(pub_spark.setdefault(fig.topic, [0] * WINDOW), fig.spark)
            else:
                delivered[fig.topic] = max(delivered.get(fig.topic, 0), fig.delivered_per_s)
                _max(sub_spark.setdefault(fig.topic, [0] * WINDOW), fig.spark)
    patterns = [[_pattern(p) for p in report.subs] for report in reports]
    rows: list[dict[str, Any]] = []
    for topic in sorted(set(published) | set(delivered)):
        rate = published[topic] if topic in published else delivered[topic]
        spark = pub_spark[topic] if topic in published else sub_spark[topic]
        subscribers = sum(1 for mine in patterns
                          if any(p is not None and p.matches(topic) for p in mine))
        rows.append({"topic": topic, "msgs_per_s": rate,
                     "bytes_per_s": published_bytes.get(topic, 0),
                     "subscribers": subscribers, "dropped": 0, "spark": spark})
    rows.sort(key=lambda r: (-r["msgs_per_s"], -sum(r["spark"]), r["topic"]))
    if len(rows) <= MAX_TOPICS:
        return rows
    kept, rest = rows[:MAX_TOPICS - 1], rows[MAX_TOPICS - 1:]
    spark = [0] * WINDOW
    for row in rest:
        _add(spark, row["spark"])
    return [*kept, {"topic": OTHER, "msgs_per_s": sum(r["msgs_per_s"] for r in rest),
                    "bytes_per_s": sum(r["bytes_per_s"] for r in rest), "subscribers": 0,
                    "dropped": sum(r["dropped"] for r in rest), "spark": spark}]


def _pattern(text: str) -> TopicPattern | None:
    try:
        return TopicPattern(text)
    except InvalidName:
        return None


def _add(into: list[int], spark: list[int]) -> None:
    for i, n in enumerate(spark[-WINDOW:]):
        into[i] += n


def _max(into: list[int], spark: list[int]) -> None:
    for i, n in enumerate(spark[-WINDOW:]):
        into[i] = max(into[i], n)


def queues(reports: Sequence[Report]) -> list[dict[str, Any]]:
    merged: dict[str, dict[str, Any]] = {}
    for report in reports:
        for fig in report.queues:
            row = merged.setdefault(fig.queue, {"queue": fig.queue, "workers": 0,
                                                "in_flight": 0, "backlog": 0, "msgs_per_s": 0})
            row["workers"] = max(row["workers"], fig.workers)
            row["in_flight"] += fig.in_flight
            row["backlog"] += fig.backlog
            row["msgs_per_s"] += fig.msgs_per_s
    return [merged[name] for name in sorted(merged)]


def services(reports: Sequence[Report]) -> list[dict[str, Any]]:
    merged: dict[str, dict[str, Any]] = {}
    for report in reports:
        for fig in report.services:
            row = merged.setdefault(fig.service, {"service": fig.service, "servers": 0,
                                                  "p50_ms": None, "p99_ms": None,
                                                  "timeouts": 0, "per_s": 0})
            row["timeouts"] += fig.timeouts
            if not fig.serving:
                continue
            row["servers"] += 1
            row["per_s"] += fig.per_s
            for key, value in (("p50_ms", fig.p50_ms), ("p99_ms", fig.p99_ms)):
                if value is not None:
                    row[key] = value if row[key] is None else max(row[key], value)
    return [merged[name] for name in sorted(merged)]
