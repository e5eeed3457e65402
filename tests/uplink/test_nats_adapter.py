"""The NATS JetStream adapter's export against a real nats-server on 127.0.0.1: each send's
future resolves with the stream's PubAck (True for a message id the stream had already),
a message the client or the stream will not take fails its own future with HubRefused and
the connection lives on, and a killed server fails what is in flight with HubUnreachable."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator
from typing import Any

import nats
import pytest
from nats.js import api

from mesh._uplink import _nats
from mesh._uplink._hub import HubRefused, HubUnreachable
from mesh._uplink._nats import NatsHub
from mesh._uplink._settings import UplinkSettings

from ._nats_server import stream_messages
from .conftest import StartNats

pytestmark = pytest.mark.timeout(30)
WAIT = 10.0


class Hubs:
    """Makes NatsHubs (prefix site1, export everything); closes them all at teardown."""

    def __init__(self) -> None:
        self.made: list[NatsHub] = []

    def __call__(self, url: str, **settings: Any) -> NatsHub:
        settings.setdefault("prefix", "site1")
        settings.setdefault("export", [">"])
        hub = NatsHub(UplinkSettings(url=url, **settings), "node-1")
        self.made.append(hub)
        return hub


@pytest.fixture(params=["framed", "publish"])
async def hubs(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
               ) -> AsyncIterator[Hubs]:
    """Each test runs twice: with the adapter writing HPUB frames into nats-py's buffer
    itself, and with the `publish` it falls back to when nats-py's internals differ."""
    if request.param == "publish":
        monkeypatch.setattr(_nats, "_can_frame", lambda nc: False)
    made = Hubs()
    yield made
    for hub in made.made:
        await hub.close()


async def test_exports_are_acknowledged_in_order_and_a_resent_id_is_a_duplicate(
        nats_server: StartNats, hubs: Hubs) -> None:
    server = nats_server()
    hub = hubs(server.url)
    await hub.connect()
    futures = [hub.send(f"orders.eu{i % 3}", b"m%d" % i,
                        {"n": f" {i}\r\n", "Nats-Msg-Id": "not this"}, f"id{i}")
               for i in range(300)]
    async with asyncio.timeout(WAIT):
        assert await asyncio.gather(*futures) == [False] * 300
        assert await hub.send("orders.eu0", b"again", {}, "id7") is True  # dropped by id
    every = await stream_messages(server.url, "ZEROMESH")
    assert [(m.subject, m.data, m.headers) for m in every] == [
        (f"site1.orders.eu{i % 3}", b"m%d" % i, {"n": str(i), "Nats-Msg-Id": f"id{i}"})
        for i in range(300)]


async def test_refusals_fail_their_own_future_and_the_link_lives_on(
        nats_server: StartNats, hubs: Hubs) -> None:
    server = nats_server()
    nc = await nats.connect(server.url, allow_reconnect=False)
    try:  # a stream that takes 100-byte messages at the most
        await nc.jetstream().add_stream(name="ZEROMESH", subjects=["site1.>"],
                                        max_msg_size=100, storage=api.StorageType.FILE)
    finally:
        await nc.close()
    hub = hubs(server.url)
    await hub.connect()
    async with asyncio.timeout(WAIT):
        with pytest.raises(HubRefused, match="maximum"):  # the stream's error PubAck
            await hub.send("a", b"x" * 500, {}, "big")
        with pytest.raises(HubRefused, match="MaxPayload"):  # over the server's max_payload
            await hub.send("a", b"x" * (2 * 1024 * 1024), {}, "huge")
        with pytest.raises(HubRefused, match="BadHeader"):  # a header name NATS cannot carry
            await hub.send("a", b"x", {"bad name": "v"}, "hdr")
        assert await hub.send("a", b"small", {}, "ok") is False
    assert not hub.lost.done()
    assert [m.data for m in await stream_messages(server.url, "ZEROMESH")] == [b"small"]


async def test_a_killed_server_fails_what_is_in_flight(nats_server: StartNats,
                                                       hubs: Hubs) -> None:
    server = nats_server()
    hub = hubs(server.url)
    await hub.connect()
    async with asyncio.timeout(WAIT):
        assert await hub.send("a", b"acked", {}, "id0") is False
    server.kill()
    pending = [hub.send("a", b"m%d" % i, {}, f"id{i}") for i in range(1, 11)]
    async with asyncio.timeout(WAIT):
        reason = await hub.lost
        results = await asyncio.gather(*pending, return_exceptions=True)
    assert isinstance(reason, HubUnreachable), reason
    assert all(isinstance(r, HubUnreachable) for r in results), results
    with pytest.raises(HubUnreachable):
        await hub.send("a", b"late", {}, "id11")


async def test_close_is_bounded_when_the_server_stopped_reading(nats_server: StartNats) -> None:
    """nats-py's own close waits for its unsent bytes to drain: with a server that stopped
    reading (SIGSTOP) and more queued than the sockets hold, that is forever. The hub's
    close drops the connection after CLOSE_WAIT instead (the agent's exit waits on it)."""
    server = nats_server()
    hub = NatsHub(UplinkSettings(url=server.url, prefix="site1", export=[">"]), "node-1")
    await hub.connect()
    async with asyncio.timeout(WAIT):
        assert await hub.send("a", b"acked", {}, "id0") is False
    nc = hub._nc
    pid = server.pid
    assert nc is not None
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    try:
        chunk = b"x" * (256 * 1024)
        for _ in range(800):  # at most 200 MiB: the sockets hold a few MiB
            await nc.publish("filler", chunk)
            await asyncio.sleep(0)  # the flusher's turn: it blocks once the sockets are full
            if nc._pending_data_size > 0:
                break  # (below nats-py's pending limit, past which publish closes itself)
        assert nc._pending_data_size > 0, "nothing waits to be sent: the close would not block"
        transport = nc._transport._io_writer.transport  # type: ignore[union-attr]
        started = time.monotonic()
        async with asyncio.timeout(_nats.CLOSE_WAIT + 5):
            await hub.close()
        assert time.monotonic() - started < _nats.CLOSE_WAIT + 1
        assert transport.is_closing()  # dropped, not left open behind the abandoned close
    finally:
        os.kill(pid, signal.SIGCONT)
