"""The uplink core in-process against a real nats-server: what the agent tests cannot force."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Final

import nats
import pytest

from mesh import Message
from mesh._spool import FsyncPolicy
from mesh._uplink import _nats
from mesh._uplink._backlog import Backlog
from mesh._uplink._hub import Incoming
from mesh._uplink._link import Uplink
from mesh._uplink._nats import NatsHub
from mesh._uplink._settings import UplinkSettings
from tests.mesh.conftest import MakeNode

from .conftest import StartNats

pytestmark = pytest.mark.timeout(60)
WAIT: Final = 15.0


class _AcksLost(NatsHub):
    """A hub connection whose acknowledgements never reach the hub (a cut, a crash)."""

    def settle(self, incoming: Incoming) -> None:
        pass


async def _wait(condition: Callable[[], bool], what: str) -> None:
    """Until `condition()` (polled: these are plain counters)."""
    try:
        async with asyncio.timeout(WAIT):
            while True:
                if condition():
                    return
                await asyncio.sleep(0.02)
    except TimeoutError:
        raise AssertionError(f"{what}: not within {WAIT} s") from None


async def test_a_redelivered_import_is_recognised_and_not_published_again(
        nats_server: StartNats, make_node: MakeNode, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_nats, "ACK_WAIT", 0.5)  # the hub redelivers after half a second
    hub = nats_server()
    node = await make_node("edge", data_dir=str(tmp_path / "node"))
    got: list[Message] = []
    await node.subscribe("cmd.>", callback=got.append)
    settings = UplinkSettings(url=hub.url, prefix="site1", imports=["cmd.>"])
    backlog = Backlog(tmp_path / "uplink", fsync=FsyncPolicy.BATCH, quota=1 << 20)
    await backlog.open()
    link = Uplink(node, settings, lambda: _AcksLost(settings, "edge"), backlog)
    running = asyncio.create_task(link.run())
    try:
        await _wait(lambda: link.state.value == "connected", "connected")
        nc = await nats.connect(hub.url, allow_reconnect=False)
        try:
            for i in range(10):
                await nc.jetstream().publish(f"site1.cmd.c{i}", b"x")
        finally:
            await nc.close()
        await _wait(lambda: link.counts.duplicates >= 20, "two rounds of redeliveries")
        assert link.counts.imported == 10
        assert sorted(m.topic for m in got) == sorted(f"cmd.c{i}" for i in range(10))
    finally:
        running.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running
        await backlog.aclose()
