"""Bounded waiting for discovery tests: poll a condition until a deadline, never sleep blindly."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable

from discovery import DiscoveryEvent, PeerFound, PeerGone, PeerInfo


async def eventually(
    condition: Callable[[], object], *, timeout: float = 5.0, interval: float = 0.005
) -> None:
    """Return as soon as `condition()` is truthy; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(interval)


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
