"""The agent's live figures: one JSON snapshot of this node and the mesh (``event: stats``).

Shape (the mesh page and ``zeromesh top`` read it)::

    {"time", "node": {id, name, mesh, version, uptime_s, health},
     "peers": [{id, name, state, last_seen_s, rtt_ms, in_per_s, out_per_s, dropped}],
     "topics": [{topic, msgs_per_s, bytes_per_s, subscribers, dropped, spark}],
     "queues": [{queue, workers, in_flight, backlog, msgs_per_s}],
     "services": [{service, servers, p50_ms, p99_ms, timeouts, per_s}],
     "spool": {messages, bytes, quota_bytes, quota_pct, oldest_age_s, fsync, dead_letters},
     "uplinks": [what GET /v1/uplinks lists]}

Topics, queues and services are the mesh's, merged from every reachable node's
own figures; peers are this node's view, with its traffic to and from each.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, Final

from .. import __version__
from .._figures import _merge
from .._figures._report import Report
from .._node import AsyncNode
from .._uplink._links import Uplinks

SPOOL_WARN_PCT: Final[float] = 90.0
"""A spool fuller than this makes the node's health ``degraded``."""


class Stats:
    """Builds the snapshots of one agent's node."""

    def __init__(self, node: AsyncNode, uplinks: Uplinks) -> None:
        self._node = node
        self._uplinks = uplinks
        self._started = time.monotonic()

    async def snapshot(self) -> dict[str, Any]:
        node = self._node
        reports = await node.gather_figures()
        spool = node.spool_figures()
        return {"time": round(time.time(), 3), "node": self._me(spool),
                "peers": self._peers(reports), "topics": _merge.topics(reports),
                "queues": _merge.queues(reports), "services": _merge.services(reports),
                "spool": spool, "uplinks": self._uplinks.statuses()}

    async def topology(self) -> dict[str, Any]:
        reports = await self._node.gather_figures()
        return _merge.topology(reports, {p.id: p.state.value for p in self._node.peers()})

    def _me(self, spool: dict[str, Any]) -> dict[str, Any]:
        node = self._node
        health = "ok" if node.running else "down"
        if health == "ok" and spool["quota_pct"] >= SPOOL_WARN_PCT:
            health = "degraded"
        return {"id": node.id, "name": node.name, "mesh": node.mesh, "version": __version__,
                "uptime_s": round(time.monotonic() - self._started, 1), "health": health}

    def _peers(self, reports: Sequence[Report]) -> list[dict[str, Any]]:
        """Each peer with its traffic to and from this node, from every report's links:
        a subscriber's report counts what this node's PUB socket sent it (which this
        node cannot tell by itself); each link is counted once, by whoever reports it."""
        me, now = reports[0].id, time.time()
        into: dict[str, int] = {}
        out: dict[str, int] = {}
        seen: set[tuple[str, str, str]] = set()
        for report in reports:
            for link in report.links:
                key = (link.source, link.target, link.kind)
                if link.kind == "control" or key in seen:
                    continue
                seen.add(key)
                if link.target == me:
                    into[link.source] = into.get(link.source, 0) + link.msgs_per_s
                elif link.source == me:
                    out[link.target] = out.get(link.target, 0) + link.msgs_per_s
        dropped = self._node.dropped_by_peer
        return [{"id": p.id, "name": p.name, "state": p.state.value,
                 "last_seen_s": round(max(0.0, now - p.last_seen), 3),
                 "rtt_ms": None if p.rtt is None else round(p.rtt * 1000, 3),
                 "in_per_s": into.get(p.id, 0), "out_per_s": out.get(p.id, 0),
                 "dropped": dropped.get(p.id, 0)}
                for p in sorted(self._node.peers(), key=lambda p: (p.name, p.id))]
