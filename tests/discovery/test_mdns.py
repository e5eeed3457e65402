"""mDNS backend on 127.0.0.1: nodes see each other, strangers are dropped and counted.

Every zeroconf here is bound to 127.0.0.1 only (IPv4), and every test uses its own
random mesh name, so tests running side by side on one host never see each other.
"""

from __future__ import annotations

import asyncio
import functools
import statistics
import time
import uuid
from collections.abc import AsyncIterator, Callable

import pytest
from zeroconf import IPVersion
from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

from discovery import SERVICE_TYPE, InvalidRecord, MdnsDiscovery, PeerFound, PeerInfo
from tests.helpers import aeventually

from ._util import Recorder, new_peer

LOOPBACK = ["127.0.0.1"]
Factory = Callable[[str], MdnsDiscovery]


@pytest.fixture
def mesh() -> str:
    return uuid.uuid4().hex


@pytest.fixture
async def make() -> AsyncIterator[Factory]:
    made: list[MdnsDiscovery] = []

    def factory(mesh: str) -> MdnsDiscovery:
        backend = MdnsDiscovery(LOOPBACK, mesh=mesh)
        made.append(backend)
        return backend

    yield factory
    async with asyncio.timeout(10):
        await asyncio.gather(*(b.aclose() for b in made))


@pytest.fixture
async def raw_zc() -> AsyncIterator[AsyncZeroconf]:
    aiozc = AsyncZeroconf(interfaces=LOOPBACK, ip_version=IPVersion.V4Only)
    yield aiozc
    async with asyncio.timeout(5):
        await aiozc.async_close()


@pytest.mark.parametrize("interfaces", [[], ["0.0.0.0"], ["224.0.0.251"], ["eth0"], "127.0.0.1"])
def test_interfaces_are_explicit_ipv4(interfaces: list[str]) -> None:
    with pytest.raises(InvalidRecord):
        MdnsDiscovery(interfaces, mesh="m")


async def test_start_rejects_other_mesh_or_bad_info(make: Factory, mesh: str) -> None:
    with pytest.raises(InvalidRecord):
        await make(mesh).start(new_peer("other"), Recorder())
    with pytest.raises(InvalidRecord):
        await make(mesh).start(PeerInfo("x", "n", mesh, 1, ("tcp://127.0.0.1:1",)), Recorder())


async def test_a_peer_that_cannot_be_resolved_at_first_is_found_later(
        make: Factory, mesh: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Resolution is not given up after a few failures while the name is still browsed
    (a busy responder, lost datagrams): it is tried again, backing off, until it works.
    The first five answers are thrown away here (what a lossy LAN does to them)."""
    from discovery import _mdns

    failures = 5
    real = AsyncServiceInfo.async_request

    async def lossy(self: AsyncServiceInfo, *args: object, **kw: object) -> bool:
        nonlocal failures
        if self.name.startswith("beta") and failures > 0:
            failures -= 1
            await asyncio.sleep(0.05)
            return False
        return await real(self, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(AsyncServiceInfo, "async_request", lossy)
    monkeypatch.setattr(_mdns, "_RESOLVE_TIMEOUT", 0.2)
    async with asyncio.timeout(20):
        a, b = make(mesh), make(mesh)
        sink_a = Recorder()
        me_b = new_peer(mesh, "beta", 5012)
        await a.start(new_peer(mesh, "alpha", 5011), sink_a)
        await b.start(me_b, Recorder())
        await aeventually(lambda: sink_a.found(me_b.id), timeout=15)
        assert failures == 0


async def test_two_nodes_see_each_other_not_other_mesh(make: Factory, mesh: str) -> None:
    async with asyncio.timeout(15):
        a, b, c = make(mesh), make(mesh), make(uuid.uuid4().hex)
        sink_a, sink_b, sink_c = Recorder(), Recorder(), Recorder()
        me_a, me_b = new_peer(mesh, "alpha", 5001), new_peer(mesh, "beta", 5002)
        me_c = new_peer(c.mesh, "gamma", 5003)
        await a.start(me_a, sink_a)
        await b.start(me_b, sink_b)
        await c.start(me_c, sink_c)
        await aeventually(lambda: sink_a.found(me_b.id) and sink_b.found(me_a.id))
        await aeventually(lambda: a.dropped.get("other_mesh") and b.dropped.get("other_mesh"))
        await aeventually(lambda: c.dropped.get("other_mesh", 0) >= 2)
        assert sink_a.ids() == {me_b.id}
        assert sink_b.ids() == {me_a.id}
        assert sink_c.ids() == set()
        found = [e for _, e in sink_a.events if isinstance(e, PeerFound)]
        assert found[0].info == me_b
        assert found[0].info.source == "mdns"
        assert a.dropped.get("self", 0) >= 1
        assert {p.id for p in a.peers} == {me_b.id}


async def test_goodbye_is_peer_gone(make: Factory, mesh: str) -> None:
    async with asyncio.timeout(15):
        a, b = make(mesh), make(mesh)
        sink = Recorder()
        me_b = new_peer(mesh, "leaving")
        await a.start(new_peer(mesh), sink)
        await b.start(me_b, Recorder())
        await aeventually(lambda: sink.found(me_b.id))
        started = time.monotonic()
        await b.aclose()
        assert time.monotonic() - started < 1.0, "aclose must not linger"
        await aeventually(lambda: sink.gone(me_b.id))
        assert a.peers == ()
        await b.aclose()  # idempotent


async def test_update_reannounces(make: Factory, mesh: str) -> None:
    async with asyncio.timeout(15):
        a, b = make(mesh), make(mesh)
        sink = Recorder()
        me_b = new_peer(mesh, "mover", 6000)
        await a.start(new_peer(mesh), sink)
        await b.start(me_b, Recorder())
        await aeventually(lambda: sink.found(me_b.id))
        moved = PeerInfo(me_b.id, "mover", mesh, 2, ("tcp://127.0.0.1:6001",))
        await b.update(moved)

        def seen_moved() -> bool:
            return any(isinstance(e, PeerFound) and e.info == moved for _, e in sink.events)

        await aeventually(seen_moved)


async def _register_raw(aiozc: AsyncZeroconf, label: str, props: dict[bytes, bytes | None]) -> None:
    info = AsyncServiceInfo(
        SERVICE_TYPE,
        f"{label}.{SERVICE_TYPE}",
        port=7000,
        properties=props,
        server=f"{label}.local.",
        parsed_addresses=LOOPBACK,
    )
    await aiozc.async_register_service(info, cooperating_responders=True)


async def test_garbage_records_dropped_and_counted(
    make: Factory, mesh: str, raw_zc: AsyncZeroconf
) -> None:
    async with asyncio.timeout(15):
        a = make(mesh)
        sink = Recorder()
        await a.start(new_peer(mesh), sink)
        m = mesh.encode()
        await _register_raw(raw_zc, "bad-id", {b"mesh": m, b"id": b"zz", b"v": b"1"})
        await _register_raw(raw_zc, "bin-name", {b"mesh": m, b"name": b"\xff\xfe"})
        await _register_raw(
            raw_zc,
            "far-away",
            {
                b"id": uuid.uuid4().hex.encode(),
                b"name": b"far",
                b"mesh": m,
                b"v": b"1",
                b"ep": b"tcp://10.9.8.7:5000",
            },
        )
        await aeventually(lambda: a.dropped.get("bad_txt", 0) >= 2)
        await aeventually(lambda: a.dropped.get("unroutable", 0) >= 1)
        assert sink.events == []
        # still alive and reporting after the garbage
        b = make(mesh)
        me_b = new_peer(mesh, "after")
        await b.start(me_b, Recorder())
        await aeventually(lambda: sink.found(me_b.id))


async def test_sink_errors_do_not_break_discovery(make: Factory, mesh: str) -> None:
    async with asyncio.timeout(15):
        seen: list[str] = []

        def flaky(event: object) -> None:
            assert isinstance(event, PeerFound)
            seen.append(event.info.id)
            raise RuntimeError("sink bug")

        a = make(mesh)
        await a.start(new_peer(mesh), flaky)
        first, second = make(mesh), make(mesh)
        me1, me2 = new_peer(mesh, "one"), new_peer(mesh, "two")
        await first.start(me1, Recorder())
        await second.start(me2, Recorder())
        await aeventually(lambda: {me1.id, me2.id} <= set(seen))


async def test_discovery_latency(make: Factory, mesh: str) -> None:
    """A running browser must see a freshly started node in well under 0.25 s."""
    async with asyncio.timeout(30):
        watcher = make(mesh)
        sink = Recorder()
        await watcher.start(new_peer(mesh, "watcher"), sink)
        latencies: list[float] = []
        for i in range(10):
            node = make(mesh)
            me = new_peer(mesh, f"fresh{i}")
            started = time.monotonic()
            await node.start(me, Recorder())
            node_id = me.id
            await aeventually(functools.partial(sink.found, node_id), timeout=3.0, interval=0.001)
            found_at = sink.found(node_id)
            assert found_at is not None
            latencies.append(found_at - started)
            await node.aclose()
        median, worst = statistics.median(latencies), max(latencies)
        print(
            f"\nmDNS discovery latency on loopback: median {median * 1000:.1f} ms, "
            f"max {worst * 1000:.1f} ms over {len(latencies)} nodes"
        )
        assert median < 0.25
