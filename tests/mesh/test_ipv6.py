"""IPv6 on loopback (::1): every pattern between two nodes, static peers ``tcp://[::1]:port``,
an IPv4 node and a dual one meshed, and clear errors for IPv6 input that cannot work."""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import socket
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from mesh import AsyncNode, ConfigError, Message, NodeConfig, RequestTimeout, _wire
from mesh._membership import _control as control
from mesh._membership._control import _first_endpoint
from mesh._membership._foreign import ForeignMembers
from patterns import generate_keypair
from tests.helpers import aeventually

from ._proc import Cli, run
from .conftest import MakeNode


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


pytestmark = pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback (::1) here")


async def _pair(make_node: MakeNode, **settings: object) -> tuple[AsyncNode, AsyncNode]:
    """Two nodes on ::1 only, b seeded with a's control endpoint (no mDNS: lo has no
    IPv6 multicast), each seeing the other."""
    a = await make_node("a", interfaces=["::1"], mdns=False, **settings)
    b = await make_node("b", interfaces=["::1"], mdns=False, peers=a.endpoints["ctl"],
                        **settings)
    async with asyncio.timeout(5):
        await a.wait_for_peers(1)
        await b.wait_for_peers(1)
    return a, b


async def test_mdns_left_on_for_ipv6_loopback_is_one_clear_warning(
        make_node: MakeNode, caplog: pytest.LogCaptureFixture) -> None:
    """zeroconf on ::1 logged "Network is unreachable" with an OSError line at each send;
    a node there now says once that it finds peers through seeds, and one with a seed
    (and mDNS on) joins its seed as usual."""
    with caplog.at_level(logging.WARNING):
        a = await make_node("a", interfaces=["::1"])
        b = await make_node("b", interfaces=["::1"], peers=a.endpoints["ctl"])
        async with asyncio.timeout(5):
            await b.wait_for_peers(1)
    assert [(r.name, r.getMessage()) for r in caplog.records] == [
        ("mesh.node", "no mDNS on ::1 (loopback has no IPv6 multicast): this node finds "
                      "peers only through seeds (--peer)")]


async def test_nodes_bind_and_announce_ipv6_endpoints(make_node: MakeNode) -> None:
    a, b = await _pair(make_node)
    for role, endpoints in a.endpoints.items():
        assert all(ep.startswith("tcp://[::1]:") for ep in endpoints), (role, endpoints)
    (peer,) = b.peers()
    assert peer.id == a.id
    assert peer.endpoints[0] == a.endpoints["ctl"][0]


async def test_pub_sub_over_ipv6(make_node: MakeNode) -> None:
    a, b = await _pair(make_node)
    sub = await a.subscribe("six.>")
    await b.wait_for_subscribers("six.one", 1, timeout=5)
    await b.publish("six.one", b"over ::1")
    msg = await sub.next(timeout=5)
    assert (msg.topic, msg.data) == ("six.one", b"over ::1")


async def test_push_pull_over_ipv6(make_node: MakeNode) -> None:
    a, b = await _pair(make_node)
    got: list[bytes] = []

    async def handle(msg: Message) -> None:
        got.append(msg.data)

    await a.pull("jobs6", handler=handle)
    await b.wait_for_workers("jobs6", 1, timeout=5)
    for i in range(20):
        await b.push("jobs6", str(i), timeout=5)
    await aeventually(lambda: len(got) == 20, timeout=5, message="20 jobs over ::1")
    assert sorted(got) == sorted(str(i).encode() for i in range(20))


async def test_request_reply_over_ipv6(make_node: MakeNode) -> None:
    a, b = await _pair(make_node)
    await a.serve("svc6.up", lambda m: m.data.upper())
    await b.wait_for_service("svc6.up", timeout=5)
    reply = await b.request("svc6.up", b"six", timeout=5)
    assert reply.data == b"SIX"


async def test_static_peer_url_in_brackets(make_node: MakeNode) -> None:
    """``--peer tcp://[::1]:PORT`` on a fixed control port, as a user would write it."""
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
        probe.bind(("::1", 0))
        port = probe.getsockname()[1]
    a = await make_node("a", interfaces=["::1"], mdns=False, port=port)
    assert a.endpoints["ctl"] == [f"tcp://[::1]:{port}"]
    b = await make_node("b", interfaces=["::1"], mdns=False, peers=[f"tcp://[::1]:{port}"])
    await a.wait_for_peers(1, timeout=5)
    await b.wait_for_peers(1, timeout=5)


async def test_static_ipv6_peer_with_a_curve_key(make_node: MakeNode, tmp_path: Path) -> None:
    """``tcp://[::1]:port#KEY``: a secure node dials an IPv6 seed only with its key."""
    for name in ("a", "b"):
        generate_keypair(tmp_path, name)
    allow = tmp_path / "allow"
    allow.mkdir()
    for name in ("a", "b"):
        shutil.copy(tmp_path / f"{name}.key", allow)

    def keys(name: str) -> dict[str, str]:
        return {"secret_key": str(tmp_path / f"{name}.key_secret"), "allow": str(allow)}

    a = await make_node("a", interfaces=["::1"], mdns=False, **keys("a"))
    await a.serve("echo6", lambda m: m.data)
    public = (tmp_path / "a.key").read_text().split('public-key = "')[1].split('"')[0]
    (ctl,) = a.endpoints["ctl"]
    b = await make_node("b", interfaces=["::1"], mdns=False, peers=[f"{ctl}#{public}"],
                        **keys("b"))
    await b.wait_for_service("echo6", timeout=10)
    assert (await b.request("echo6", b"secure six", timeout=5)).data == b"secure six"


async def test_a_dual_node_links_an_ipv4_node_and_an_ipv6_node(make_node: MakeNode) -> None:
    """Mixed mesh: v4 (127.0.0.1), v6 (::1) and dual (both). Each dials the dual node in its
    own family; the v4 and v6 nodes learn of each other by gossip but, sharing no family,
    never pick an endpoint they cannot dial (they stay strangers, nothing breaks)."""
    dual = await make_node("dual", interfaces=["127.0.0.1", "::1"], mdns=False)
    ctl4, ctl6 = dual.endpoints["ctl"]
    assert ctl4.startswith("tcp://127.0.0.1:")
    assert ctl6.startswith("tcp://[::1]:")
    v4 = await make_node("v4", interfaces=["127.0.0.1"], mdns=False, peers=[ctl4])
    v6 = await make_node("v6", interfaces=["::1"], mdns=False, peers=[ctl6])
    await dual.wait_for_peers(2, timeout=5)
    await v4.wait_for_peers(1, timeout=5)
    await v6.wait_for_peers(1, timeout=5)
    (seen_by_v4,) = v4.peers()
    (seen_by_v6,) = v6.peers()
    assert seen_by_v4.endpoints[0] == ctl4
    assert seen_by_v6.endpoints[0] == ctl6
    sub4 = await v4.subscribe("mix")
    sub6 = await v6.subscribe("mix")
    await dual.wait_for_subscribers("mix", 2, timeout=5)
    await dual.publish("mix", b"both")
    assert (await sub4.next(timeout=5)).data == b"both"
    assert (await sub6.next(timeout=5)).data == b"both"
    assert {p.name for p in dual.peers()} == {"v4", "v6"}
    assert [p.name for p in v4.peers()] == ["dual"]


async def test_members_of_the_other_family_keep_a_mixed_mesh_quiet(
        make_node: MakeNode, monkeypatch: pytest.MonkeyPatch) -> None:
    """The v4 node keeps the v6 node's record without dialling it, so all three views
    (and digests) agree: at idle nobody sends anyone a whole view again (before, v4 and
    the dual node exchanged theirs every few seconds, for ever), nothing is logged as bad
    input, and news of the v6 node's end reaches the v4 node."""
    monkeypatch.setattr(control, "_SYNC_EVERY", 0.1)  # a resync would come at once
    synced: list[str] = []
    original = control.Membership._send_view

    def spy(self: control.Membership, endpoint: str, news: list[Any], *, sync: bool) -> None:
        if sync:
            synced.append(self._id)
        original(self, endpoint, news, sync=sync)

    monkeypatch.setattr(control.Membership, "_send_view", spy)
    fast = {"heartbeat_interval": 0.05, "mdns": False}
    dual = await make_node("dual", interfaces=["127.0.0.1", "::1"], **fast)
    ctl4, ctl6 = dual.endpoints["ctl"]
    v4 = await make_node("v4", interfaces=["127.0.0.1"], peers=[ctl4], **fast)
    v6 = await make_node("v6", interfaces=["::1"], peers=[ctl6], **fast)
    await dual.wait_for_peers(2, timeout=5)
    await aeventually(lambda: v4.traffic().membership["foreign"] == 1, timeout=5)
    assert [p.name for p in v4.peers()] == ["dual"]
    views = [n._live().membership for n in (dual, v4, v6)]
    await aeventually(lambda: len({m._digest() for m in views}) == 1, timeout=5)
    synced.clear()
    await asyncio.sleep(0.5)  # 10 beats, 5 resync periods: the digests stay equal
    assert synced == []
    assert len({m._digest() for m in views}) == 1
    assert v4.traffic().input_dropped.get("bad_member", 0) == 0
    await v6.aclose()  # it leaves: the news reaches v4 through dual
    await aeventually(lambda: v4.traffic().membership["foreign"] == 0, timeout=5)


async def test_a_wait_for_subscribers_says_which_are_of_the_other_family(
        make_node: MakeNode) -> None:
    """An IPv4-only publisher waiting for an IPv6-only subscriber cannot ever reach it:
    the timeout says so, with how many, rather than only "timed out"."""
    fast = {"heartbeat_interval": 0.05, "mdns": False}
    dual = await make_node("dual", interfaces=["127.0.0.1", "::1"], **fast)
    ctl4, ctl6 = dual.endpoints["ctl"]
    v4 = await make_node("v4", interfaces=["127.0.0.1"], peers=[ctl4], **fast)
    v6 = await make_node("v6", interfaces=["::1"], peers=[ctl6], **fast)
    await v6.subscribe("mix.>")
    await aeventually(lambda: v4._live().membership.unreachable_subscribers("mix.x") == 1,
                      timeout=5, message="v4 knows the v6 subscriber by gossip")
    with pytest.raises(RequestTimeout, match=r"\(1 more on an address family this node has "
                                             r"no interface of: IPv4 or IPv6\)"):
        await v4.wait_for_subscribers("mix.x", 1, timeout=0.3)
    with pytest.raises(RequestTimeout) as plain:
        await v4.wait_for_subscribers("other.x", 1, timeout=0.1)
    assert "address family" not in str(plain.value)


def test_first_endpoint_picks_a_family_it_can_dial() -> None:
    eps = ["tcp://10.0.0.1:5", "tcp://[fd77::1]:6"]
    assert _first_endpoint(eps) == "tcp://10.0.0.1:5"
    assert _first_endpoint(eps, frozenset({6})) == "tcp://[fd77::1]:6"
    assert _first_endpoint(eps, frozenset({4})) == "tcp://10.0.0.1:5"
    assert _first_endpoint(["tcp://[fd77::1]:6"], frozenset({4})) is None
    assert _first_endpoint(["tcp://[fe80::1%eth0]:6"]) == "tcp://[fe80::1%eth0]:6"


def test_first_endpoint_dials_link_local_on_our_zone() -> None:
    """The zone a member announces is its own interface's name: dialled as is on a host
    whose link is named otherwise, libzmq silently never connects."""
    theirs = ["tcp://[fe80::1%eth0]:6"]
    assert _first_endpoint(theirs, frozenset({6}), ("lan0",)) == "tcp://[fe80::1%lan0]:6"
    assert _first_endpoint(["tcp://[fe80::1%2]:6"], frozenset({6}), ("lan0",)) == (
        "tcp://[fe80::1%lan0]:6")
    assert _first_endpoint(theirs, frozenset({6}), ("lan0", "eth0")) == theirs[0]
    assert _first_endpoint(theirs, frozenset({6}), ("lan0", "wlan0")) is None  # which link?
    assert _first_endpoint(theirs, frozenset({6}), ("lan0", "wlan0"), {"fe80::1": "wlan0"}) == (
        "tcp://[fe80::1%wlan0]:6")  # the link mDNS found it on (or a seed named)
    assert _first_endpoint(["tcp://[fd77::1]:6"], frozenset({6}), ("lan0",)) == (
        "tcp://[fd77::1]:6")


def test_first_endpoint_puts_loopback_last() -> None:
    """A member on loopback and a LAN address: from another host its loopback endpoint
    is that host's own."""
    assert _first_endpoint(["tcp://127.0.0.1:5", "tcp://10.0.0.1:6"]) == "tcp://10.0.0.1:6"
    assert _first_endpoint(["tcp://[::1]:5", "tcp://[fd77::1]:6"]) == "tcp://[fd77::1]:6"
    assert _first_endpoint(["tcp://[::1]:5", "tcp://127.0.0.1:6"]) == "tcp://[::1]:5"


def test_first_endpoint_keeps_link_local_and_global_apart() -> None:
    """A node on link-local only has no route to a global address, and one on global
    addresses only no zone of its own for a link-local one."""
    both = ["tcp://[fd77::1]:6", "tcp://[fe80::1%eth0]:7"]
    assert _first_endpoint(both, frozenset(), ("lan0",)) == "tcp://[fe80::1%lan0]:7"
    assert _first_endpoint(both[1:], frozenset({6}), ()) is None
    assert _first_endpoint(both[:1], frozenset(), ("lan0",)) is None


@pytest.mark.parametrize("endpoint", [
    "tcp://[fe80::1]:6",            # link-local without its zone
    "tcp://[fd77::1%eth0]:6",       # a zone on a global address
    "tcp://[::]:6", "tcp://[ff02::1]:6", "tcp://[::ffff:10.0.0.1]:6",
    "tcp://[localhost]:6", "tcp://[example.com]:6", "tcp://[::1]", "tcp://[::1]:0",
    "tcp://[::1]:70000", "tcp://::1:6", "tcp://[::1%eth0/x]:6", "tcp://[1.2.3.4]:6",
])
def test_first_endpoint_rejects_names_and_garbage(endpoint: str) -> None:
    assert _first_endpoint([endpoint]) is None


@pytest.mark.parametrize(("iface", "reason"), [
    ("fe80::1", "needs its interface"),
    ("fd77::1%eth0", "only a link-local"),
    ("::", "cannot be bound"),
    ("ff02::fb", "cannot be bound"),
    ("::ffff:127.0.0.1", "IPv4 address"),
    ("::1::2", "not an IPv4 or IPv6"),
    ("fe80::1%nosuchif0", "no interface 'nosuchif0'"),  # (bind said "Invalid argument")
    ("fe80::1%99999", "no interface '99999'"),
])
async def test_bad_ipv6_interfaces_are_config_errors(iface: str, reason: str) -> None:
    with pytest.raises(ConfigError, match=reason):
        await AsyncNode(name="x", interfaces=[iface], mdns=False).start()


def test_a_seed_on_a_zone_this_host_lacks_is_a_config_error() -> None:
    """libzmq dials ``[fe80::1%eth9]`` on a host without eth9 silently never: the node
    ran alone with no word of why."""
    with pytest.raises(ConfigError, match="no interface 'nosuchif0'"):
        NodeConfig(peers=["tcp://[fe80::1%nosuchif0]:7700"]).validated()
    key = "%" * 40  # (a Z85 key may hold "%": it is no zone)
    NodeConfig(peers=["tcp://[fe80::1%1]:7700", "tcp://[fe80::1%lo]:7700",
                      f"tcp://127.0.0.1:7700#{key}"]).validated()


async def test_ipv6_interfaces_are_canonical(make_node: MakeNode) -> None:
    node = await make_node("a", interfaces=["0:0::1"], mdns=False)
    assert node.endpoints["ctl"][0].startswith("tcp://[::1]:")


async def test_an_interface_named_twice_is_bound_once(make_node: MakeNode) -> None:
    """The same address twice (or a link-local one by its zone's name and number) was
    bound twice: two endpoints of each socket, and with a fixed port "Address already in
    use" at start."""
    node = await make_node("a", interfaces=["::1", "0:0::1", "127.0.0.1", "127.0.0.1"],
                           mdns=False)
    ctl = node.endpoints["ctl"]
    assert [ep.rsplit(":", 1)[0] for ep in ctl] == ["tcp://[::1]", "tcp://127.0.0.1"], ctl
    config = NodeConfig(interfaces=["fe80::1%1", "fe80::1%lo"]).validated()
    assert config.interfaces == ["fe80::1%lo"]  # (index 1: loopback in any namespace)


@pytest.mark.parametrize(("args", "reason"), [
    (["--interface", "::2"], "::2"),                    # not an address of this host
    (["--interface", "fe80::1%nosuchif0"], "fe80::1"),  # no such link
    (["--interface", "fe80::1"], "needs its interface"),
    (["--interface", "::1", "--peer", "tcp://[::1]"], "tcp://[::1]"),  # no port
    (["--interface", "::1", "--peer", "tcp://::1:5000"], "brackets"),
])
def test_cli_bad_ipv6_input_exits_2_with_one_line(args: list[str], reason: str,
                                                  mesh_name: str) -> None:
    result = run(["pub", "t", "x", "--no-mdns", *args], mesh=mesh_name, timeout=60)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert reason in lines[0]


def test_agent_on_ipv6_loopback(procs: list[Cli], mesh_name: str) -> None:
    """``agent --interface ::1 --http [::1]:0``: IPv6 endpoints, and the HTTP API on ::1."""
    agent = Cli(["agent", "--name", "a6", "--interface", "::1", "--http", "[::1]:0",
                 "--no-mdns"], mesh=mesh_name)
    procs.append(agent)
    ready = agent.line("ready", timeout=30)
    fields = dict(part.split("=", 1) for part in ready.split()[1:])
    assert fields["ctl"].startswith("tcp://[::1]:"), ready
    assert fields["http"].startswith("http://[::1]:"), ready
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never a proxy
    with direct.open(f"{fields['http']}/v1/peers", timeout=10) as reply:
        assert reply.status == 200
        assert json.loads(reply.read()) == []
    agent.term()
    assert agent.wait() == 0


def test_a_member_of_the_other_family_with_a_bad_pattern_matches_nothing() -> None:
    # Gossip passes a foreign record on unchecked: its invalid pattern must not turn
    # a wait for subscribers falling short into an InvalidName.
    hello = _wire.Hello(id="x" * 16, name="x", mesh="m", incarnation=1, ctl=[], pub=[],
                        subs=["a..b", "mix.>"], subs_version=1)
    foreign = ForeignMembers(limit=10, forget_after=60.0)
    assert foreign.learn(hello)
    assert foreign.subscribers("mix.x") == 1
    assert foreign.subscribers("other.x") == 0
