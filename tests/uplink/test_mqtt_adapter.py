"""The MQTT 5 adapter against a real mosquitto on 127.0.0.1: export in order with user
properties, import with manual acks (redelivered until settled, queued while away),
and how a refusal, an absent broker, a silent one and a killed one are reported."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from mesh._uplink import _mqtt
from mesh._uplink._hub import ID_HEADER, Hub, HubRefused, HubUnreachable, Incoming
from mesh._uplink._mqtt import MqttHub
from mesh._uplink._settings import UplinkSettings

from ._brokers import WAIT, Mosquitto, Sub, free_port, make_certificate, pub

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    # No cap on the QoS 1 messages queued for a subscriber (default 1,000, then "Outgoing
    # messages are being dropped"): the exporter has 2,000 PUBACKed in a burst faster
    # than the checking mosquitto_sub takes them.
    with Mosquitto(tmp_path / "mosquitto", options=["max_queued_messages 0"]) as running:
        yield running


class Hubs:
    """Makes MqttHubs (prefix site1, export everything); closes them all at teardown."""

    def __init__(self) -> None:
        self.made: list[MqttHub] = []

    def __call__(self, url: str, sessions: Path | None = None, **settings: Any) -> MqttHub:
        settings.setdefault("prefix", "site1")
        settings.setdefault("export", [">"])
        hub = MqttHub(UplinkSettings(url=url, **settings), "node-1", sessions)
        self.made.append(hub)
        return hub


@pytest.fixture
async def hubs() -> AsyncIterator[Hubs]:
    made = Hubs()
    yield made
    for hub in made.made:
        await hub.close()


@pytest.fixture(params=["publish_qos1", "paho publish"])
def publish_way(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """For the export tests: the adapter's own QoS 1 PUBLISH and PUBACK handling, and
    paho's `publish` it falls back to when paho's internals differ."""
    if request.param == "paho publish":
        monkeypatch.setattr(_mqtt, "FAST_PUBLISH", False)
    way: str = request.param
    return way


async def receive(hub: MqttHub, count: int, *, settle: bool = False) -> list[Incoming]:
    """`count` imports (settling each batch, if asked, as the uplink core does)."""
    got: list[Incoming] = []
    async with asyncio.timeout(WAIT):
        while len(got) < count:
            batch = await hub.receive(count - len(got), 1.0)
            for message in batch if settle else ():
                hub.settle(message)
            got += batch
    return got


async def test_export_arrives_in_order_with_user_properties(broker: Mosquitto, hubs: Hubs,
                                                            tmp_path: Path,
                                                            publish_way: str) -> None:
    sub = Sub(broker.port, "site1/#", tmp_path / "sub.txt")
    try:
        await sub.ready()
        hub = hubs(broker.url(), window=64)
        await hub.connect()
        futures = [hub.send(f"orders.eu{i % 3}", f"m{i}".encode(), {"n": str(i)}, f"id{i}")
                   for i in range(2000)]
        async with asyncio.timeout(WAIT):
            await asyncio.gather(*futures)
        lines = await sub.lines(2000)
    finally:
        sub.close()
    assert [line.rpartition("|")[2] for line in lines] == [f"m{i}" for i in range(2000)]
    assert lines[5] == f"site1/orders/eu2|n:5 {ID_HEADER}:id5|m5"


async def test_import_maps_topic_headers_and_key(broker: Mosquitto, hubs: Hubs) -> None:
    hub = hubs(broker.url(), export=[], imports=[">"])
    await hub.connect()
    await pub(broker.port, "site1/cmd/x", ["one", "two"], {"k": "v"})
    await pub(broker.port, "site1/cmd/y", ["three"], {ID_HEADER: "abc", "k": "w"})
    await pub(broker.port, "site1/cmd/z", ["same", "same"], qos=0)  # both mid 0
    await pub(broker.port, "site1/bad.level/x", ["dropped"])  # no mesh spelling
    await pub(broker.port, "elsewhere/x", ["not ours"])
    arrived = await receive(hub, 6)
    [bad] = [m for m in arrived if m.unusable]  # (for the core to count, and settle)
    assert (bad.topic, bad.data) == ("", b"dropped")
    assert "'site1/bad.level/x': no mesh spelling" in bad.unusable
    got = [m for m in arrived if not m.unusable]
    assert [(m.topic, m.data, m.headers) for m in got] == [
        ("cmd.x", b"one", {"k": "v"}), ("cmd.x", b"two", {"k": "v"}),
        ("cmd.y", b"three", {ID_HEADER: "abc", "k": "w"}),
        ("cmd.z", b"same", {}), ("cmd.z", b"same", {})]
    assert got[0].key.startswith("mqtt:")
    assert got[0].key != got[1].key
    assert got[2].key == "abc"
    assert got[4].key.startswith(got[3].key + ":")  # a first delivery is never a repeat
    assert await hub.receive(10, 0.3) == []
    for message in arrived:
        hub.settle(message)
    await hub.close()
    await hub.connect()  # all settled: nothing comes back
    assert await hub.receive(10, 0.5) == []


async def test_unsettled_import_is_redelivered_with_its_key(broker: Mosquitto,
                                                            hubs: Hubs) -> None:
    first = hubs(broker.url(), export=[], imports=["cmd.>"])
    await first.connect()
    await pub(broker.port, "site1/cmd/x", ["settled", "unsettled", "unsettled"])
    settled, unsettled, twin = await receive(first, 3)
    assert len({settled.key, unsettled.key, twin.key}) == 3  # same payload, other mids
    first.settle(settled)
    await first.close()
    first.settle(unsettled)  # after close: a no-op, not an ack on some later connection

    second = hubs(broker.url(), export=[], imports=["cmd.>"])  # same client id
    await second.connect()
    again = await receive(second, 2)
    assert [(m.key, m.data) for m in again] == [(unsettled.key, b"unsettled"),
                                                (twin.key, b"unsettled")]
    for message in again:
        second.settle(message)
    await second.close()
    await second.connect()
    assert await second.receive(10, 0.5) == []


async def test_imports_published_while_away_arrive_after_reconnect(broker: Mosquitto,
                                                                   hubs: Hubs) -> None:
    hub = hubs(broker.url(), export=[], imports=["cmd.*"])
    await hub.connect()  # the session and its subscription now exist on the broker
    await hub.close()
    await pub(broker.port, "site1/cmd/a", [f"away{i}" for i in range(5)])
    await hub.connect()
    got = await receive(hub, 5)
    assert [m.data for m in got] == [f"away{i}".encode() for i in range(5)]


async def test_an_import_pattern_removed_is_unsubscribed_from_the_session(
        broker: Mosquitto, hubs: Hubs, tmp_path: Path) -> None:
    """A config (a reload, or a restart) drops cfg.> from the imports: the persistent
    session kept that subscription (no UNSUBSCRIBE), and the broker went on sending and
    queueing cfg messages that were then dropped (5 of 5 here). Now the connect
    unsubscribes it, as the session's filters remembered in the data dir say."""
    sessions = tmp_path / "sessions"
    first = hubs(broker.url(), sessions, export=[], imports=["cmd.>", "cfg.>"])
    await first.connect()
    await first.close()
    second = hubs(broker.url(), sessions, export=[], imports=["cmd.>"])  # same client id
    await second.connect()
    await pub(broker.port, "site1/cfg/x", [f"cfg{i}" for i in range(5)])
    await pub(broker.port, "site1/cmd/x", ["marker"])
    [marker] = await receive(second, 1, settle=True)
    assert marker.data == b"marker"
    await second.close()
    await pub(broker.port, "site1/cfg/x", ["away"])  # not queued for the session either
    await pub(broker.port, "site1/cmd/x", ["marker2"])
    await second.connect()
    [marker] = await receive(second, 1, settle=True)
    assert marker.data == b"marker2"
    assert await second.receive(10, 0.2) == []
    assert broker.log().count("Received UNSUBSCRIBE from zeromesh-site1-node-1") == 1


async def test_a_flood_of_imports_waits_in_the_broker_not_in_memory(
        broker: Mosquitto, hubs: Hubs, monkeypatch: pytest.MonkeyPatch) -> None:
    """2,000 imports published at once, 10 taken and settled: mosquitto does not keep to
    our Receive Maximum (256) once acks come (it sent 256 more per ack), and all 2,000
    were read into memory; now reading stops at INBOX_MAX and goes on as the core takes
    them, in order, each once."""
    monkeypatch.setattr(_mqtt, "INBOX_MAX", 300, raising=False)
    hub = hubs(broker.url(), export=[], imports=["cmd.>"])
    await hub.connect()
    await pub(broker.port, "site1/cmd/x", [str(i) for i in range(2000)])
    taken = await receive(hub, 10, settle=True)
    await asyncio.sleep(0.3)  # (what the broker would push meanwhile)
    waiting = await hub.receive(5000, 1.0)
    assert len(waiting) <= 301
    for message in waiting:
        hub.settle(message)
    rest = await receive(hub, 1990 - len(waiting), settle=True)
    assert [int(m.data) for m in taken + waiting + rest] == list(range(2000))
    assert await hub.receive(10, 0.2) == []


async def test_session_outlives_a_broker_restart(broker: Mosquitto, hubs: Hubs) -> None:
    """mosquitto saves the session (and what it queued) on SIGTERM; the port is kept."""
    hub = hubs(broker.url(), export=[], imports=["cmd.*"])
    await hub.connect()
    await hub.close()
    await pub(broker.port, "site1/cmd/a", ["kept0", "kept1"])
    port = broker.port
    broker.restart()
    assert broker.port == port
    await hub.connect()
    got = await receive(hub, 2)
    assert [m.data for m in got] == [b"kept0", b"kept1"]


async def test_bad_password_is_refused_naming_it(tmp_path: Path, hubs: Hubs) -> None:
    """mosquitto 2.0 answers a wrong password with 135, as it does no credentials."""
    with Mosquitto(tmp_path / "auth", users={"mesh": "right"}) as broker:
        with pytest.raises(HubRefused, match=r"^mqtt: Not authorized$"):
            await hubs(broker.url("mesh", "wrong")).connect()
        with pytest.raises(HubRefused, match="Not authorized"):
            await hubs(broker.url()).connect()
        hub = hubs(broker.url(), user="mesh", password="right")
        await hub.connect()
        await hub.send("a", b"x", {}, "id1")


async def test_tls_both_ways(tmp_path: Path, hubs: Hubs) -> None:
    """mqtts:// with tls_ca (the certificate names 127.0.0.1), through mosquitto's TLS
    listener; more imports than the window, settled as they come."""
    with Mosquitto(tmp_path / "tls", tls=True) as broker:
        hub = hubs(f"mqtts://127.0.0.1:{broker.tls_port}", imports=["cmd.>"],
                   tls_ca=str(broker.ca))
        await hub.connect()
        futures = [hub.send("out", f"m{i}".encode(), {}, f"id{i}") for i in range(300)]
        async with asyncio.timeout(WAIT):
            await asyncio.gather(*futures)
        await pub(broker.port, "site1/cmd/x", [f"in{i}" for i in range(300)])
        got = await receive(hub, 300, settle=True)  # more than the window: settle as we go
        assert [m.data for m in got] == [f"in{i}".encode() for i in range(300)]


Answer = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def stand_in(answer: Answer, context: ssl.SSLContext | None = None
                   ) -> AsyncIterator[int]:
    """A stand-in broker on 127.0.0.1 running `answer` for each connection; yields its
    port and, at the end, waits for every `answer` to have returned."""
    running: set[asyncio.Task[None]] = set()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        running.add(task)
        try:
            await answer(reader, writer)
            with contextlib.suppress(OSError):  # until the client closes (maybe abruptly)
                await reader.read()
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=context)
    async with server:
        yield server.sockets[0].getsockname()[1]
        async with asyncio.timeout(WAIT):
            await asyncio.gather(*running)


def _publish_packet(topic: str, payload: bytes, mid: int) -> bytes:
    """An MQTT 5 PUBLISH, QoS 1, no properties (remaining length < 128)."""
    body = len(topic).to_bytes(2, "big") + topic.encode() + mid.to_bytes(2, "big") + b"\0"
    body += payload
    return bytes([0x32, len(body)]) + body


async def test_tls_packets_sharing_a_record_are_all_read(tmp_path: Path, hubs: Hubs) -> None:
    """A stand-in TLS broker sends the SUBACK and five PUBLISHes in one write, so in one
    TLS record: after the first packet the rest wait decrypted in the SSL object, which
    the socket's readiness does not show (mosquitto writes a record per packet)."""
    cert, key = make_certificate(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1024)  # CONNECT
        writer.write(bytes([0x20, 3, 0, 0, 0]))  # CONNACK: success
        await reader.read(1024)  # SUBSCRIBE, mid 1 (a fresh client's first)
        writer.write(bytes([0x90, 4, 0, 1, 0, 1])  # SUBACK: mid 1, granted QoS 1
                     + b"".join(_publish_packet("site1/cmd/x", b"m%d" % i, 100 + i)
                                for i in range(5)))

    async with stand_in(answer, context) as port:
        hub = hubs(f"mqtts://127.0.0.1:{port}", imports=["cmd.>"], tls_ca=str(cert))
        await hub.connect()
        got = await receive(hub, 5)
        assert [m.data for m in got] == [b"m%d" % i for i in range(5)]
        await hub.close()


@pytest.mark.parametrize(("code", "error", "name"), [
    (0x86, HubRefused, "Bad user name or password"), (0x87, HubRefused, "Not authorized"),
    (0x85, HubRefused, "Client identifier not valid"),
    (0x88, HubUnreachable, "Server unavailable"), (0x89, HubUnreachable, "Server busy")])
async def test_connack_refusals(hubs: Hubs, code: int, error: type[Exception], name: str
                                ) -> None:
    """A stand-in broker answering CONNECT with `code`: refused (no use retrying soon)
    or unreachable (a busy or unavailable server is worth a quick retry)."""
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1024)  # the CONNECT
        writer.write(bytes([0x20, 3, 0, code, 0]))  # CONNACK: no session, code, no properties

    async with stand_in(answer) as port:
        with pytest.raises(error, match=f"^mqtt: {name}$"):
            await hubs(f"mqtt://127.0.0.1:{port}").connect()


async def test_refused_publish_fails_its_future(tmp_path: Path, hubs: Hubs,
                                                publish_way: str) -> None:
    with Mosquitto(tmp_path / "acl", acl="topic read site1/#\n") as broker:
        hub = hubs(broker.url())
        await hub.connect()
        with pytest.raises(HubRefused, match=r"orders\.eu refused: Not authorized"):
            await hub.send("orders.eu", b"x", {}, "id1")
        assert not hub.lost.done()  # one message refused, the connection lives on


async def test_nothing_listening_is_unreachable(hubs: Hubs) -> None:
    start = time.monotonic()
    with pytest.raises(HubUnreachable, match="refused"):
        await hubs(f"mqtt://127.0.0.1:{free_port()}").connect()
    assert time.monotonic() - start < _mqtt.CONNECT_TIMEOUT


async def test_silent_listener_times_out(hubs: Hubs, monkeypatch: pytest.MonkeyPatch) -> None:
    """TCP accepted (by the backlog), no CONNACK ever: unreachable after CONNECT_TIMEOUT."""
    monkeypatch.setattr(_mqtt, "CONNECT_TIMEOUT", 0.5)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        start = time.monotonic()
        with pytest.raises(HubUnreachable, match=r"no answer within 0\.5 s"):
            await hubs(f"mqtt://127.0.0.1:{silent.getsockname()[1]}").connect()
        assert 0.4 < time.monotonic() - start < 2.0


async def test_killed_broker_resolves_lost_and_fails_pending_sends(broker: Mosquitto,
                                                                   hubs: Hubs,
                                                                   publish_way: str) -> None:
    hub = hubs(broker.url(), imports=["cmd.>"])
    await hub.connect()
    await hub.send("a", b"acked", {}, "id0")
    broker.pause()
    pending = [hub.send("a", f"m{i}".encode(), {}, f"id{i}") for i in range(1, 11)]
    await asyncio.sleep(0.2)
    assert not any(f.done() for f in pending)
    assert not hub.lost.done()
    broker.kill()
    async with asyncio.timeout(WAIT):
        reason = await hub.lost
    assert isinstance(reason, HubUnreachable)
    for future in pending:
        with pytest.raises(HubUnreachable):
            await future
    with pytest.raises(HubUnreachable):
        await hub.send("a", b"late", {}, "id11")
    with pytest.raises(HubUnreachable):
        await hub.receive(10, 1.0)


async def test_silent_broker_is_noticed_by_keepalive(broker: Mosquitto, hubs: Hubs,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A broker that stops answering (the connection still open) is lost within about
    twice the keepalive."""
    monkeypatch.setattr(_mqtt, "KEEPALIVE", 1)
    hub = hubs(broker.url())
    await hub.connect()
    broker.pause()
    start = time.monotonic()
    async with asyncio.timeout(WAIT):
        reason = await hub.lost
    assert isinstance(reason, HubUnreachable)
    assert time.monotonic() - start < 4


async def test_callback_exception_resolves_lost(broker: Mosquitto, hubs: Hubs,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """An exception in a paho callback reaches `lost`, not the loop's exception handler."""
    hub = hubs(broker.url(), export=[], imports=["cmd.>"])
    await hub.connect()

    def broken(subject: str) -> str | None:
        raise RuntimeError("mapping broke")

    monkeypatch.setattr(hub.subjects, "inbound", broken)
    await pub(broker.port, "site1/cmd/x", ["boom"])
    async with asyncio.timeout(WAIT):
        reason = await hub.lost
    assert isinstance(reason, RuntimeError)
    assert str(reason) == "mapping broke"


def test_client_id() -> None:
    settings = UplinkSettings(url="mqtt://127.0.0.1", prefix="site.eu", export=[">"])
    hub: Hub = MqttHub(settings, "host 1/a")  # mypy checks MqttHub is a Hub
    assert hub.kind == "mqtt"
    assert MqttHub(settings, "host 1/a").client_id == "zeromesh-site-eu-host-1-a"
    long = MqttHub(settings, "n" * 100).client_id
    assert len(long) == 64
    assert long != MqttHub(settings, "n" * 99).client_id
    settings.client_id = "mine"
    assert MqttHub(settings, "host").client_id == "mine"


def test_publish_user_properties_are_the_bytes_paho_would_send() -> None:
    """The adapter encodes a PUBLISH's user properties itself (paho's `Properties` cost
    more than the rest of an export); the bytes are paho's."""
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    for headers in ({}, {"zeromesh-origin": "site1"}, {"a": "é" * 40, "long": "x" * 300}):
        theirs = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        theirs.UserProperty = [*headers.items(), (ID_HEADER, "id-1")]
        expected = theirs.pack()  # type: ignore[no-untyped-call]
        assert _mqtt._user_properties(headers, "id-1") == expected, headers
        assert _mqtt._UserProperties(expected).pack() == expected  # (the fallback's)


async def test_a_header_over_64_kib_is_refused_and_the_link_lives_on(broker: Mosquitto,
                                                                     hubs: Hubs,
                                                                     publish_way: str) -> None:
    hub = hubs(broker.url())
    await hub.connect()
    async with asyncio.timeout(WAIT):
        with pytest.raises(HubRefused, match="65,535"):
            await hub.send("a", b"x", {"big": "v" * 70_000}, "id1")
        assert await hub.send("a", b"x", {"small": "v"}, "id2") is False
    assert not hub.lost.done()


def _packet(first: int, body: bytes) -> bytes:
    """An MQTT packet: its first byte, the remaining length (variable byte integer), body."""
    length, n = bytearray(), len(body)
    while True:
        n, byte = n >> 7, n & 0x7F
        length.append(byte | (0x80 if n else 0))
        if not n:
            return bytes([first]) + bytes(length) + body


async def test_packets_written_together_and_a_large_one_are_all_read(hubs: Hubs) -> None:
    """The client reads ahead (what the socket has, up to 64 KiB) and hands paho packets
    from memory: a SUBACK and five PUBLISHes in one write all arrive, and so does a
    200 KB PUBLISH, longer than one read."""
    big = bytes(range(256)) * 800

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1024)  # CONNECT
        writer.write(bytes([0x20, 3, 0, 0, 0]))  # CONNACK: success
        await reader.read(1024)  # SUBSCRIBE, mid 1
        payloads = [b"m%d" % i for i in range(5)] + [big]
        writer.write(bytes([0x90, 4, 0, 1, 0, 1]) + b"".join(
            _packet(0x32, len(b"site1/cmd/x").to_bytes(2, "big") + b"site1/cmd/x"
                    + (100 + i).to_bytes(2, "big") + b"\0" + payload)
            for i, payload in enumerate(payloads)))

    async with stand_in(answer) as port:
        hub = hubs(f"mqtt://127.0.0.1:{port}", imports=["cmd.>"])
        await hub.connect()
        got = await receive(hub, 6)
        assert [m.data for m in got] == [b"m%d" % i for i in range(5)] + [big]
        await hub.close()


async def test_close_sends_its_disconnect(hubs: Hubs) -> None:
    """What the client writes leaves together once per loop turn; a close still sends its
    DISCONNECT before the socket goes."""
    received = bytearray()

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1024)  # CONNECT
        writer.write(bytes([0x20, 3, 0, 0, 0]))  # CONNACK: success
        while chunk := await reader.read(65536):  # until the client closes
            received.extend(chunk)

    async with stand_in(answer) as port:
        hub = hubs(f"mqtt://127.0.0.1:{port}")
        await hub.connect()
        futures = [hub.send("a", b"m%d" % i, {}, f"id{i}") for i in range(3)]
        await asyncio.sleep(0.2)
        await hub.close()
    assert received.count(b"m") >= 3  # the three PUBLISHes (never acknowledged)
    assert received.endswith(bytes([0xE0, 1, 0])), received[-8:].hex()  # normal disconnect
    assert all(f.done() for f in futures)
