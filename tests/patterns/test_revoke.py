"""A key revoked by `Curve.replace_allowlist` + `Context.revoke`: its live connections are
cut on every bound socket kind, the other keys' connections carry on."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import pytest
import zmq

from patterns import Context, Curve, Publisher, Puller, _socket
from patterns._socket import Socket
from tests.helpers import aeventually

Keys = tuple[bytes, bytes]


@pytest.fixture
async def server() -> AsyncIterator[tuple[Context, list[Keys]]]:
    """A secure context allowing two client keys (x, y), and those keys."""
    own, clients = zmq.curve_keypair(), [zmq.curve_keypair(), zmq.curve_keypair()]
    ctx = Context(Curve(*own, frozenset(public for public, _ in clients)))
    try:
        yield ctx, clients
    finally:
        for sock in list(ctx._sockets):
            sock.close()
        await asyncio.to_thread(ctx.close)


@pytest.fixture
async def clients(server: tuple[Context, list[Keys]]) -> AsyncIterator[list[Context]]:
    ctx, keys = server
    assert ctx.curve is not None
    made = [Context(Curve(*pair, frozenset({ctx.curve.public}))) for pair in keys]
    try:
        yield made
    finally:
        for client in made:
            for sock in list(client._sockets):
                sock.close()
            await asyncio.to_thread(client.close)


def _dial(client: Context, server: Context, kind: int, endpoint: str) -> Socket:
    assert client.curve is not None
    assert server.curve is not None
    client.curve.trust(endpoint, server.curve.public)
    sock = client.socket(kind)
    sock.connect(endpoint)
    return sock


def _revoke(ctx: Context, key: bytes) -> None:
    assert ctx.curve is not None
    assert ctx.curve.replace_allowlist(ctx.curve.allowed - {key}) == {key}
    ctx.revoke()


async def _gets(sock: Socket, timeout: float) -> list[bytes]:
    try:
        async with asyncio.timeout(timeout):
            return [frames[0] for frames in await sock.recv_many()]
    except TimeoutError:
        return []


async def test_a_revoked_subscriber_is_cut_off_though_it_sends_nothing_more(
        server: tuple[Context, list[Keys]], clients: list[Context]) -> None:
    ctx, keys = server
    pub = Publisher(ctx)
    endpoint = pub.bind("127.0.0.1")
    subs = [_dial(client, ctx, zmq.SUB, endpoint) for client in clients]
    for n, sub in enumerate(subs):
        sub.set_option(zmq.SUBSCRIBE, b"t")
        sub.set_option(zmq.SUBSCRIBE, b"\xff" + b"%d" % n)  # its readiness marker
    seen: set[bytes] = set()
    while len(seen) < 2:
        async with asyncio.timeout(3):
            seen.update(marker for _, marker in await pub.markers())
    _revoke(ctx, keys[1][0])
    got: list[bytes] = []
    for n in range(20):
        pub.send(b"t%d" % n)
    while len(got) < 20:
        got += await _gets(subs[0], 3)
    assert got == [b"t%d" % n for n in range(20)]
    assert await _gets(subs[1], 0.3) == []


async def test_what_a_revoked_pusher_sends_is_dropped_and_its_link_cut(
        server: tuple[Context, list[Keys]], clients: list[Context]) -> None:
    ctx, keys = server
    puller = Puller(ctx, max_message_size=1 << 20)
    endpoint = puller.bind("127.0.0.1")
    got: list[bytes] = []
    puller.start(lambda batch: got.extend(bytes(frames[0]) for frames in batch))
    pushers = [_dial(client, ctx, zmq.PUSH, endpoint) for client in clients]
    for n, pusher in enumerate(pushers):
        pusher.send(b"before %d" % n)
    await aeventually(lambda: len(got) == 2, timeout=3)
    _revoke(ctx, keys[1][0])
    pushers[1].send(b"revoked")
    pushers[0].send(b"allowed")
    await aeventually(lambda: b"allowed" in got, timeout=3)
    curve = ctx.curve
    assert curve is not None
    await aeventually(lambda: curve.cut.get(keys[1][0]) == 1, timeout=3)
    # its link was really cut: the pusher reconnected, and ZAP refused it
    await aeventually(lambda: curve.denied[keys[1][0]] >= 1, timeout=3)
    assert b"revoked" not in got


async def test_what_a_cut_connection_left_queued_cuts_nothing_more(
        server: tuple[Context, list[Keys]], clients: list[Context],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Its messages still queued name its fd, closed by then and soon another connection's
    (one from the same IP passes the check): cut once, the rest are only dropped."""
    ctx, keys = server
    curve = ctx.curve
    assert curve is not None
    cuts: list[object] = []
    cut = _socket._cut

    def record(conn: socket.socket) -> None:
        cuts.append(conn.getpeername())
        cut(conn)

    monkeypatch.setattr(_socket, "_cut", record)
    pull = ctx.socket(zmq.PULL)
    endpoint = pull.bind("127.0.0.1")
    x, y = (_dial(client, ctx, zmq.PUSH, endpoint) for client in clients)
    for n in range(5):
        x.send(b"x%d" % n)
        y.send(b"y%d" % n)
    await asyncio.sleep(0.2)  # (all in the PULL's queues: nothing shows it but reading)
    _revoke(ctx, keys[0][0])
    got: list[bytes] = []

    def read_one() -> int:
        got.extend(frames[0] for frames in pull.recv_nowait(1))
        return len(got)

    await aeventually(lambda: read_one() >= 0 and cuts, timeout=3)
    await aeventually(lambda: curve.denied[keys[0][0]] >= 1, timeout=3)  # x's fd closed
    port = int(endpoint.rsplit(":", 1)[1])
    others = [socket.create_connection(("127.0.0.1", port)) for _ in range(4)]  # reuse it
    try:
        await aeventually(lambda: read_one() == 5, timeout=3)
    finally:
        for other in others:
            other.close()
    assert got == [b"y%d" % n for n in range(5)]
    assert len(cuts) == 1
    assert curve.cut == {keys[0][0]: 1}
