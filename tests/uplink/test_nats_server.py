"""The NATS helper itself: a real nats-server with JetStream on a file store, started,
crashed, restarted and stopped by PID, and `stream_messages` reading a stream back."""

from __future__ import annotations

import socket
import sys
import time
from pathlib import Path

import nats
import pytest
from nats.aio.client import Client as NATS
from nats.errors import NoServersError

from tests import netns
from tests.uplink import _binaries
from tests.uplink._nats_server import NatsServer, NatsServerError, stream_messages
from tests.uplink.conftest import StartNats


def _alive(pid: int) -> bool:
    """The PID names a live nats-server (not a zombie, not a reused PID)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    comm, state = stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2]
    return comm == "nats-server" and state != "Z"


async def _quiet(_error: Exception) -> None:
    """An error callback that does not log: the refusal is what the test expects."""


async def _refusal(url: str) -> Exception:
    """What connecting to `url` raised (it must fail). The client is closed after it, as
    nats-py leaves its socket open when a connect is refused."""
    client = NATS()
    try:
        await client.connect(url, allow_reconnect=False, connect_timeout=2, error_cb=_quiet,
                             max_reconnect_attempts=1, reconnect_time_wait=0)
    except Exception as exc:
        return exc
    finally:
        await client.close()
    raise AssertionError(f"{url} accepted the connection")


async def _publish(url: str, count: int, *, first: int = 0, create: bool = True) -> list[int]:
    """`count` messages on orders.a / orders.b (alternating), each with a unique
    Nats-Msg-Id; returns their stream sequences."""
    nc = await nats.connect(url, allow_reconnect=False)
    try:
        js = nc.jetstream()
        if create:
            await js.add_stream(name="ORDERS", subjects=["orders.>"])
        seqs = []
        for i in range(first, first + count):
            ack = await js.publish(f"orders.{'ab'[i % 2]}", b"m%d" % i,
                                   headers={"Nats-Msg-Id": f"id-{i}"})
            seqs.append(ack.seq)
        return seqs
    finally:
        await nc.close()


async def test_jetstream_keeps_what_is_published_and_stream_messages_reads_it_back(
        nats_server: StartNats) -> None:
    server = nats_server()
    assert server.url == f"nats://127.0.0.1:{server.port}"
    assert "http" not in server.config_path.read_text()  # no monitoring port
    assert await _publish(server.url, 10) == list(range(1, 11))

    nc = await nats.connect(server.url, allow_reconnect=False)
    try:  # the same Nats-Msg-Id again is acknowledged as a duplicate and not stored
        ack = await nc.jetstream().publish("orders.a", b"again", headers={"Nats-Msg-Id": "id-0"})
    finally:
        await nc.close()
    assert ack.duplicate
    assert ack.seq == 1

    every = await stream_messages(server.url, "ORDERS")
    assert [m.headers["Nats-Msg-Id"] for m in every if m.headers] == [f"id-{i}" for i in range(10)]
    assert [m.metadata.sequence.stream for m in every] == list(range(1, 11))
    only_b = await stream_messages(server.url, "ORDERS", "orders.b", batch=2)
    assert [(m.subject, m.data) for m in only_b] == [("orders.b", b"m%d" % i)
                                                   for i in range(1, 10, 2)]


async def test_sigkill_and_restart_keep_the_file_stored_messages(nats_server: StartNats) -> None:
    server = nats_server()
    url, pid = server.url, server.pid
    assert pid is not None
    await _publish(server.url, 5)

    server.kill()
    assert not _alive(pid)
    assert not server.running
    server.kill()  # idempotent

    server.restart()
    assert server.url == url  # same port
    assert server.pid not in (None, pid)
    assert "Restored 5 messages" in server.log()
    assert await _publish(server.url, 3, first=5, create=False) == [6, 7, 8]
    ids = [m.headers["Nats-Msg-Id"] for m in await stream_messages(url, "ORDERS") if m.headers]
    assert ids == [f"id-{i}" for i in range(8)]


async def test_stop_leaves_no_process_and_close_removes_the_files() -> None:
    server = NatsServer()
    with server:
        pid = server.pid
        assert pid is not None
        assert _alive(pid)
        assert server.stop() == 1  # nats-server's status after a clean shutdown on SIGTERM
        assert "Server Exiting" in server.log()
        assert not _alive(pid)
        assert server.stop() is None  # idempotent
        assert isinstance(await _refusal(server.url), NoServersError)
    assert not server.workdir.exists()


async def test_credentials_are_required_when_set(nats_server: StartNats) -> None:
    server = nats_server(user="zm", password="s3cret")
    assert server.auth_url == f"nats://zm:s3cret@127.0.0.1:{server.port}"
    assert "Authorization Violation" in str(await _refusal(server.url))
    assert await _publish(server.auth_url, 2) == [1, 2]
    assert len(await stream_messages(server.auth_url, "ORDERS")) == 2


def test_a_server_that_cannot_listen_fails_fast_with_its_output() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        server = NatsServer(port=taken.getsockname()[1])
        started = time.monotonic()
        with pytest.raises(NatsServerError, match="address already in use"), server:
            pass
        assert time.monotonic() - started < 5.0
    assert server.pid is None
    assert not server.workdir.exists()


def test_a_missing_program_skips_unless_brokers_are_required(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(_binaries.REQUIRE_BROKERS_ENV, raising=False)
    with pytest.raises(pytest.skip.Exception, match=r"apt-get install zm-pkg"):
        _binaries.require_binary("zm-no-such-program", "zm-pkg")
    monkeypatch.setenv(_binaries.REQUIRE_BROKERS_ENV, "1")
    with pytest.raises(pytest.fail.Exception, match=r"ZEROMESH_REQUIRE_BROKERS=1"):
        _binaries.require_binary("zm-no-such-program", "zm-pkg")
    assert _binaries.find_binary("sh") is not None


_CLIENT = """
import asyncio, sys, nats
async def main():
    nc = await nats.connect(sys.argv[1], allow_reconnect=False, connect_timeout=5)
    js = nc.jetstream()
    if sys.argv[2] == "create":
        await js.add_stream(name="ORDERS", subjects=["orders.>"])
    ack = await js.publish("orders.a", b"over the lan", headers={"Nats-Msg-Id": "x"})
    print(ack.stream, ack.seq, bool(ack.duplicate))
    await nc.close()
asyncio.run(main())
"""


@pytest.mark.netns
def test_a_server_in_a_namespace_serves_the_other_hosts(lan: netns.Lan) -> None:
    """On h1's address inside h1's namespace; clients on h2 and h3 reach it over the LAN,
    before and after a SIGKILL and restart."""
    with NatsServer.on_host(lan[0]) as server:
        assert server.url == f"nats://{lan[0].ip}:{server.port}"
        first = lan[1].run([sys.executable, "-c", _CLIENT, server.url, "create"], timeout=20)
        assert first.returncode == 0, first.stderr
        assert first.stdout.split() == ["ORDERS", "1", "False"]
        server.kill()
        server.restart()
        again = lan[2].run([sys.executable, "-c", _CLIENT, server.url, "-"], timeout=20)
        assert again.returncode == 0, again.stderr
        assert again.stdout.split() == ["ORDERS", "1", "True"]  # kept across the crash
