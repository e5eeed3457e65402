"""One node's figures as they travel: the reply of the internal figures service.

Every node answers `FIGURES_SERVICE` (without announcing it) with its `Report`;
the payload of the request is empty. Rates are counts of the last whole second.
"""

from __future__ import annotations

from collections.abc import Container
from typing import Final

import msgspec

from .. import _wire

FIGURES_SERVICE: Final[str] = "_zeromesh.figures"
"""The internal service every node answers with its own figures."""

KINDS: Final[tuple[str, ...]] = ("pubsub", "work", "service", "control")
"""What a link carries: topics, a work queue's messages, requests, heartbeats."""


class Link(msgspec.Struct, array_like=True, frozen=True):
    """A connection of this node's to a peer that carries `kind`."""

    source: str
    target: str
    """Node ids: the messages flow from `source` to `target`."""
    kind: str
    msgs_per_s: int


class NodeState(msgspec.Struct, array_like=True, frozen=True):
    """A node as the reporter sees it."""

    id: str
    name: str
    state: str


class TopicFigure(msgspec.Struct, array_like=True, frozen=True):
    topic: str
    published_per_s: int
    """Messages this node published on it in the last second."""
    delivered_per_s: int
    """Messages its subscriptions got in the last second."""
    publishes: bool
    """This node published on it (since it started)."""
    spark: list[int]
    """Published (or, if it does not publish it, delivered) per second, oldest first."""
    bytes_per_s: int = 0
    """Payload bytes this node published on it in the last second."""


class QueueFigure(msgspec.Struct, array_like=True, frozen=True):
    queue: str
    workers: int
    in_flight: int
    backlog: int
    msgs_per_s: int
    """Messages this node handed to its workers in the last second."""


class ServiceFigure(msgspec.Struct, array_like=True, frozen=True):
    service: str
    serving: bool
    """This node serves it (its answer times are below)."""
    p50_ms: float | None
    p99_ms: float | None
    timeouts: int
    """Requests from this node that timed out."""
    per_s: int
    """Requests this node answered in the last second."""


class Report(msgspec.Struct, array_like=True, frozen=True):
    """A node's figures: who it is, whom it sees, what flows through it."""

    id: str
    name: str
    time: float
    peers: list[NodeState]
    links: list[Link]
    subs: list[str]
    """Its subscription patterns."""
    topics: list[TopicFigure]
    queues: list[QueueFigure]
    services: list[ServiceFigure]


def stilled(report: Report, known: Container[str]) -> Report:
    """`report` as kept for a lost peer: every rate 0 (nothing it reported flows now,
    or the page would show a dead node's last traffic for a minute), and only the
    nodes in `known` (one that left since must not stay on a dead node's word)."""
    replace = msgspec.structs.replace
    return replace(
        report, peers=[p for p in report.peers if p.id in known],
        links=[replace(link, msgs_per_s=0) for link in report.links
               if link.source in known and link.target in known],
        topics=[replace(t, published_per_s=0, delivered_per_s=0, bytes_per_s=0)
                for t in report.topics],
        queues=[replace(q, msgs_per_s=0) for q in report.queues],
        services=[replace(s, per_s=0) for s in report.services])


_encoder: Final = msgspec.msgpack.Encoder()


_decoder: Final = msgspec.msgpack.Decoder(Report)


def encode(report: Report) -> bytes:
    return _encoder.encode(report)


def decode(data: bytes) -> Report:
    """`data` as a `Report`.

    Raises:
        ProtocolError: it is not one.
    """
    return _wire.decode_with(_decoder, data, "figures")
