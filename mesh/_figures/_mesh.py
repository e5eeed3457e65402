"""The mesh's figures: every reachable node's own report, gathered on demand.

A peer that is alive is asked (all at once, each bounded by a short timeout);
a suspect or lost one is not, and its last report is kept, so the picture
still shows its links, marked by its state. A lost one's report is stilled:
nothing it reported flows any more, and the nodes it saw that this node no
longer knows (one that left meanwhile) are not shown on its word. A peer that
left or was forgotten is dropped. Gathering more often than `FRESH` seconds returns the last result.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Final

from .._membership._peers import PeerRecord, PeerState, PeerTable
from .._services._requests import Requests
from ..errors import DeliveryError, ProtocolError
from . import _report
from ._own import OwnFigures

_log = logging.getLogger("mesh.node")

ASK_TIMEOUT: Final[float] = 0.8
"""How long one peer's report is waited for."""
FRESH: Final[float] = 0.5
"""Gathered figures younger than this are reused."""


class MeshFigures:
    """Gathers and keeps the reports of this node and its peers."""

    def __init__(self, own: OwnFigures, peers: PeerTable, requests: Requests) -> None:
        self._own = own
        self._peers = peers
        self._requests = requests
        self._reports: dict[str, _report.Report] = {}
        self._at = -FRESH
        self._gathering: asyncio.Future[None] | None = None

    async def gather(self) -> list[_report.Report]:
        """This node's report first, then the last known of each peer in the table."""
        loop = asyncio.get_running_loop()
        if loop.time() - self._at < FRESH:
            return self._current()
        gathering = self._gathering
        if gathering is not None:  # one round at a time; the others wait for it
            await asyncio.shield(gathering)
            return self._current()
        gathering = self._gathering = loop.create_future()
        try:
            await self._ask_all()
            self._at = loop.time()
        finally:
            self._gathering = None
            gathering.set_result(None)
        return self._current()

    async def _ask_all(self) -> None:
        records = self._peers.records()
        known = {rec.id for rec in records}
        for gone in set(self._reports) - known:
            del self._reports[gone]
        alive = [rec for rec in records if rec.state is PeerState.ALIVE and rec.rtr]
        answers = await asyncio.gather(*(self._ask(rec) for rec in alive))
        for rec, got in zip(alive, answers, strict=True):
            if got is not None and got.id == rec.id:
                self._reports[rec.id] = got

    async def _ask(self, rec: PeerRecord) -> _report.Report | None:
        try:
            reply = await self._requests.ask(rec, _report.FIGURES_SERVICE, b"",
                                             timeout=ASK_TIMEOUT)
            return _report.decode(reply.data)
        except (DeliveryError, ProtocolError) as exc:
            _log.debug("no figures from %s: %s", rec.name, exc)
            return None

    def _current(self) -> list[_report.Report]:
        states = {rec.id: rec.state for rec in self._peers.records()}
        own = self._own.report()
        known = {own.id, *states}
        return [own, *(r if states[i] is not PeerState.LOST else _report.stilled(r, known)
                       for i, r in self._reports.items() if i in states)]

    def own_report(self) -> _report.Report:
        return self._own.report()

    def states(self) -> dict[str, str]:
        """Each peer's state as this node sees it."""
        return {rec.id: rec.state.value for rec in self._peers.records()}

