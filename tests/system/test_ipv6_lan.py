"""IPv6 across hosts of a namespace LAN: mDNS over IPv6 only, a mixed IPv4/IPv6/dual mesh,
and link-local addresses with their zone.

Each host's ``eth0`` has 10.77.<b>.<i>/24, fd77::<b>:<i>/64 and fe80::77:<i>/64
(tests/netns.py, ``make_lan(n, ipv6=True)``); every node is a real process
(tests/system/_ipv6_role.py) given only the addresses the test names, so a node
given only its fd77:: address can find the others by nothing but mDNS over IPv6
(ff02::fb, AAAA records) and reach them by nothing but IPv6. Every wait has a
deadline; nothing sleeps.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from typing import Any, Final

import pytest

from tests import netns
from tests.system._meshproc import Agent, MeshProc, unique

pytestmark = pytest.mark.netns

_WAIT: Final[float] = 40.0
_JOBS: Final[int] = 5
"""Jobs each edge pushes (tests/system/_ipv6_role.py)."""


_RESOLVE: Final[str] = r'''
import asyncio, json, sys
from zeroconf import IPVersion
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf
from discovery import SERVICE_TYPE

IFACE, MESH = sys.argv[1], sys.argv[2]

async def main():
    names = asyncio.Queue()
    aiozc = AsyncZeroconf(interfaces=[IFACE], ip_version=IPVersion.V6Only)
    browser = AsyncServiceBrowser(aiozc.zeroconf, SERVICE_TYPE,
                                  handlers=[lambda **kw: names.put_nowait(kw["name"])])
    try:
        async with asyncio.timeout(20):
            while True:
                info = AsyncServiceInfo(SERVICE_TYPE, await names.get())
                if (await info.async_request(aiozc.zeroconf, 3000)
                        and info.properties.get(b"mesh") == MESH.encode()):
                    print(json.dumps({"v6": info.parsed_addresses(IPVersion.V6Only),
                                      "v4": info.parsed_addresses(IPVersion.V4Only),
                                      "ep": info.properties[b"ep"].decode()}), flush=True)
                    return
    finally:
        await browser.async_cancel()
        await aiozc.async_close()

asyncio.run(main())
'''
"""A plain zeroconf browser on an IPv6 interface: the first record of mesh MESH, resolved."""


@pytest.fixture
def lan6() -> Iterator[netns.Lan]:
    """A fresh 3-host LAN with IPv6 addresses, torn down after the test."""
    reason = netns.netns_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    with netns.make_lan(3, ipv6=True) as lan:
        yield lan


def role(host: netns.Host, kind: str, mesh: str, name: str, interfaces: list[str | None],
         peers: int) -> MeshProc:
    """A hub or an edge node (tests/system/_ipv6_role.py) on ``host``, bound to `interfaces`."""
    ifaces = ",".join(iface for iface in interfaces if iface is not None)
    return MeshProc(host, [sys.executable, "-m", "tests.system._ipv6_role", kind, mesh, name,
                           ifaces, str(peers)], stdin=True)


def event(proc: MeshProc, kind: str, timeout: float = _WAIT) -> dict[str, Any]:
    """The first JSON line of ``proc`` whose event is `kind`."""
    line = proc.wait_line(rf'"event": "{kind}"', timeout)
    obj: dict[str, Any] = json.loads(line.text)
    return obj


def events(proc: MeshProc, kind: str) -> list[dict[str, Any]]:
    return [json.loads(line.text) for line in proc.matching(rf'"event": "{kind}"')]


def run_mesh(hub: MeshProc, edges: list[MeshProc]) -> None:
    """Every edge's message, jobs and request reach the hub; every process ends with 0."""
    for edge in edges:
        name = edge.argv[5]
        assert event(edge, "reply")["data"] == name.upper(), edge.describe()
        hub.wait_line(rf'"topic": "six.{name}"', _WAIT)
        hub.wait_line(rf'"data": "{name}-{_JOBS - 1}"', _WAIT)
    jobs = sorted(e["data"] for e in events(hub, "job"))
    assert jobs == sorted(f"{e.argv[5]}-{i}" for e in edges for i in range(_JOBS)), hub.describe()
    for edge in edges:
        edge.close_stdin()
        assert edge.wait_exit(20) == 0, edge.describe()
    hub.close_stdin()
    assert hub.wait_exit(20) == 0, hub.describe()


@pytest.mark.timeout(180)
def test_ipv6_only_nodes_find_each_other_by_mdns_and_use_every_pattern(lan6: netns.Lan) -> None:
    """Three nodes given only their fd77:: address: mDNS over IPv6 finds them, and
    pub/sub, push/pull and request/reply all cross the LAN over IPv6."""
    h1, h2, h3 = lan6.hosts
    mesh = unique("six")
    hub = role(h1, "hub", mesh, "hub", [h1.ip6], 2)
    edges = [role(h, "edge", mesh, h.name, [h.ip6], 2) for h in (h2, h3)]
    for proc, host in ((hub, h1), (edges[0], h2), (edges[1], h3)):
        ready = event(proc, "ready")["endpoints"]
        assert all(ep.startswith(f"tcp://[{host.ip6}]:") for eps in ready.values() for ep in eps)
    for proc in (hub, *edges):
        seen = event(proc, "peers")["peers"]
        assert len(seen) == 2, proc.describe()
        assert all(p["endpoints"][0].startswith("tcp://[fd77::") for p in seen), seen
    run_mesh(hub, edges)


@pytest.mark.timeout(180)
def test_mixed_mesh_each_node_dials_the_family_it_has(lan6: netns.Lan) -> None:
    """A dual node (IPv4 + IPv6) on h1, an IPv4-only node on h2, an IPv6-only node on h3.

    Each edge finds the dual node by mDNS and dials it in its own family; the dual
    node has both. The IPv4-only and IPv6-only nodes hear of each other by gossip but
    share no family: neither lists the other, and nothing breaks.
    """
    h1, h2, h3 = lan6.hosts
    mesh = unique("mix")
    hub = role(h1, "hub", mesh, "dual", [h1.ip, h1.ip6], 2)
    v4 = role(h2, "edge", mesh, "v4", [h2.ip], 1)
    v6 = role(h3, "edge", mesh, "v6", [h3.ip6], 1)
    ready = event(hub, "ready")["endpoints"]["ctl"]
    assert ready == [f"tcp://{h1.ip}:{ready[0].rsplit(':', 1)[1]}",
                     f"tcp://[{h1.ip6}]:{ready[1].rsplit(':', 1)[1]}"]
    (dual_by_v4,) = event(v4, "peers")["peers"]
    (dual_by_v6,) = event(v6, "peers")["peers"]
    assert dual_by_v4["name"] == dual_by_v6["name"] == "dual"
    assert dual_by_v4["endpoints"][0] == ready[0]
    assert dual_by_v6["endpoints"][0] == ready[1]
    by_hub = {p["name"]: p["endpoints"][0] for p in event(hub, "peers")["peers"]}
    assert by_hub["v4"].startswith(f"tcp://{h2.ip}:")
    assert by_hub["v6"].startswith(f"tcp://[{h3.ip6}]:")
    run_mesh(hub, [v4, v6])
    assert [p["name"] for p in event(v4, "end")["peers"]] == ["dual"]
    assert [p["name"] for p in event(v6, "end")["peers"]] == ["dual"]


@pytest.mark.timeout(180)
def test_link_local_nodes_mesh_by_mdns(lan6: netns.Lan) -> None:
    """Two nodes given only ``fe80::77:<i>%eth0``: endpoints carry the zone, mDNS finds
    them over the link, and the patterns cross it."""
    h1, h2, _ = lan6.hosts
    mesh = unique("ll")
    hub = role(h1, "hub", mesh, "hub", [h1.ll6], 1)
    edge = role(h2, "edge", mesh, "h2", [h2.ll6], 1)
    assert event(hub, "ready")["endpoints"]["ctl"][0].startswith(f"tcp://[{h1.ll6}]:")
    (seen,) = event(edge, "peers")["peers"]
    assert seen["endpoints"][0].startswith(f"tcp://[{h1.ll6}]:")
    run_mesh(hub, [edge])


@pytest.mark.timeout(120)
def test_mdns_over_ipv6_announces_aaaa_records(lan6: netns.Lan) -> None:
    """Any DNS-SD browser on IPv6 resolves an IPv6-only node to its AAAA address, and its
    TXT ``ep`` to IPv6 endpoints."""
    h1, h2, _ = lan6.hosts
    mesh = unique("aaaa")
    hub = role(h1, "hub", mesh, "hub", [h1.ip6], 0)
    (ctl,) = event(hub, "ready")["endpoints"]["ctl"]
    done = h2.run([sys.executable, "-c", _RESOLVE, str(h2.ip6), mesh], 60)
    assert done.returncode == 0, done.stderr
    resolved = json.loads(done.stdout)
    assert resolved == {"v6": [h1.ip6], "v4": [], "ep": ctl}, resolved
    hub.close_stdin()
    assert hub.wait_exit(20) == 0, hub.describe()


@pytest.fixture
def lan6_named() -> Iterator[netns.Lan]:
    """Three IPv6 hosts whose links are named differently: ``lan0`` on h2, ``eth0``
    on the others."""
    reason = netns.netns_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    with netns.make_lan(3, ipv6=True, interfaces=("eth0", "lan0")) as lan:
        yield lan


@pytest.mark.timeout(120)
def test_link_local_peers_are_dialled_on_our_zone_not_theirs(lan6_named: netns.Lan) -> None:
    """h1's node announces ``fe80::77:1%2`` (its link by number), h2's ``fe80::77:2%lan0``:
    each dials the other on its own link. The zone in a member's hello is the announcer's
    interface; dialled as is (``%lan0`` on h1, which has none), the pub/sub, push and
    request sockets never connected, though membership said alive."""
    h1, h2, _ = lan6_named.hosts
    assert h1.ll6 is not None
    assert h2.ll6 is not None
    links = json.loads(h1.run(["ip", "-j", "link", "show", "dev", h1.interface], 10).stdout)
    by_number = f"{h1.ll6.partition('%')[0]}%{links[0]['ifindex']}"
    mesh = unique("zone")
    hub = role(h1, "hub", mesh, "hub", [by_number], 1)
    edge = role(h2, "edge", mesh, "h2", [h2.ll6], 1)
    (seen,) = event(edge, "peers")["peers"]
    assert all(ep.startswith(f"tcp://[{h1.ll6.partition('%')[0]}%lan0]:")
               for ep in seen["endpoints"]), seen
    run_mesh(hub, [edge])


@pytest.mark.timeout(120)
def test_link_local_only_and_global_only_nodes_meet_through_a_node_with_both(
        lan6_named: netns.Lan) -> None:
    """h1's node has fd77:: and link-local, h2 is a link-local-only host (no route to
    fd77::), h3's node has fd77:: only. Each edge dials h1's node on the address it can
    reach (h2 the link-local one, though fd77:: comes first); the edges know of each other
    but dial nothing (no lost/joined flapping). h2 dialled fd77::1 and never reached the
    hub, which never learned of it."""
    h1, h2, h3 = lan6_named.hosts
    assert h1.ip6 is not None
    assert h1.ll6 is not None
    assert h2.ll6 is not None
    assert h3.ip6 is not None
    h2.run(["ip", "addr", "del", f"{h2.ip6}/64", "dev", h2.interface], 10, check=True)
    mesh = unique("scope")
    hub = role(h1, "hub", mesh, "dual", [h1.ip6, h1.ll6], 2)
    ll = role(h2, "edge", mesh, "ll", [h2.ll6], 1)
    v6 = role(h3, "edge", mesh, "v6", [h3.ip6], 1)
    (by_ll,) = event(ll, "peers")["peers"]
    assert by_ll["endpoints"][0].startswith(f"tcp://[{h1.ll6.partition('%')[0]}%lan0]:")
    (by_v6,) = event(v6, "peers")["peers"]
    assert by_v6["endpoints"][0].startswith(f"tcp://[{h1.ip6}]:")
    run_mesh(hub, [ll, v6])
    for edge in (ll, v6):
        assert [p["name"] for p in event(edge, "end")["peers"]] == ["dual"], edge.describe()


_FETCH: Final[str] = r'''
import asyncio, sys, aiohttp

async def main():
    async with aiohttp.ClientSession() as session:
        async with session.get(sys.argv[1] + "/healthz") as response:
            print(response.status, (await response.json())["status"])

asyncio.run(main())
'''


@pytest.mark.timeout(60)
def test_agent_on_a_link_local_address_prints_a_url_that_reaches_it(lan6: netns.Lan) -> None:
    """``--http '[fe80::77:1%2]:0'``: the ``http=`` URL of the ready line keeps the zone
    (by name), and a client (aiohttp, as `zeromesh top`) reaches the agent with it. It
    printed ``http://[fe80::77:1]:port``, which no client can connect to."""
    h1 = lan6.hosts[0]
    assert h1.ll6 is not None
    links = json.loads(h1.run(["ip", "-j", "link", "show", "dev", h1.interface], 10).stdout)
    address = h1.ll6.partition("%")[0]
    agent = Agent(h1, unique("http6"), extra=["--http", f"[{address}%{links[0]['ifindex']}]:0"])
    agent.wait_ready()
    assert agent.ready is not None
    url = agent.ready.text.rpartition(" http=")[2]
    assert url.startswith(f"http://[{h1.ll6}]:"), url
    done = h1.run([sys.executable, "-c", _FETCH, url], 20)
    assert (done.returncode, done.stdout) == (0, "200 ok\n"), done.stderr
    agent.stop()


@pytest.mark.timeout(120)
def test_a_node_on_two_links_dials_each_member_on_the_link_it_was_found_on(
        lan6_named: netns.Lan) -> None:
    """h1's node is on link-local addresses of two links (``eth0``, the LAN, and ``eth1``),
    h2's on ``lan0``: h2's zone names neither of h1's links, so h1 dials h2 on the one
    its mDNS record came in on. It dropped the record as unroutable and kept h2 as a
    member it cannot dial; h2 saw h1 lost and joined again every few seconds."""
    h1, h2, _ = lan6_named.hosts
    assert h1.ll6 is not None
    assert h2.ll6 is not None
    for argv in (["link", "add", "eth1", "type", "veth", "peer", "name", "eth1p"],
                 ["link", "set", "eth1", "addrgenmode", "none"],
                 ["addr", "add", "fe80::88:1/64", "dev", "eth1", "nodad"],
                 ["link", "set", "eth1p", "up"], ["link", "set", "eth1", "up"]):
        h1.run(["ip", *argv], 10, check=True)
    mesh = unique("links")
    hub = role(h1, "hub", mesh, "hub", [h1.ll6, "fe80::88:1%eth1"], 1)
    edge = role(h2, "edge", mesh, "h2", [h2.ll6], 1)
    (seen,) = event(hub, "peers")["peers"]
    assert seen["endpoints"][0].startswith(f"tcp://[{h2.ll6.partition('%')[0]}%eth0]:"), seen
    run_mesh(hub, [edge])


@pytest.mark.timeout(120)
def test_a_node_also_on_loopback_is_dialled_on_its_lan_address(lan6: netns.Lan) -> None:
    """h1's node is on ``::1`` (for local apps) and its fd77:: address, in that order: h2
    dials the fd77:: one. It dialled ``[::1]``, its own host, and had nothing from h1
    but what h1 sent on its own (membership said alive; no message arrived)."""
    h1, h2, _ = lan6.hosts
    assert h1.ip6 is not None
    assert h2.ip6 is not None
    mesh = unique("lo6")
    hub = role(h1, "hub", mesh, "hub", ["::1", h1.ip6], 1)
    edge = role(h2, "edge", mesh, "h2", [h2.ip6], 1)
    (seen,) = event(edge, "peers")["peers"]
    assert seen["endpoints"][0].startswith(f"tcp://[{h1.ip6}]:"), seen
    run_mesh(hub, [edge])
