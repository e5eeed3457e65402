"""Discovery test helpers: made-up peers and an event sink that records what it is told.

(To wait for a condition, use `tests.helpers.aeventually`.)
"""

from __future__ import annotations

import time
import uuid

from discovery import DiscoveryEvent, PeerFound, PeerGone, PeerInfo


def new_peer(mesh: str, name: str = "node", port: int = 5000) -> PeerInfo:
    return PeerInfo(uuid.uuid4().hex, name, mesh, 1, (f"tcp://127.0.0.1:{port}",))


class Recorder:
    """An EventSink that keeps every event, with arrival times."""

    def __init__(self) -> None:
        self.events: list[tuple[float, DiscoveryEvent]] = []

    def __call__(self, event: DiscoveryEvent) -> None:
        self.events.append((time.monotonic(), event))

    def found(self, node_id: str) -> float | None:
        for at, event in self.events:
            if isinstance(event, PeerFound) and event.info.id == node_id:
                return at
        return None

    def gone(self, node_id: str) -> bool:
        return any(isinstance(e, PeerGone) and e.info.id == node_id for _, e in self.events)

    def ids(self) -> set[str]:
        return {e.info.id for _, e in self.events}
