"""The unicast-safety filter: datagrams from outside the chosen networks never reach zeroconf."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import shutil
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from discovery import MdnsDiscovery
from discovery._netguard import NetworkSet, SourceFilter, interface_networks

from ._netns_node import query
from ._util import new_peer

REPO = Path(__file__).resolve().parents[2]


class FakeProtocol(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.got: list[tuple[bytes, tuple[str | int, ...]]] = []

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        self.got.append((data, addr))


def test_network_set() -> None:
    nets = NetworkSet([ipaddress.IPv4Network("127.0.0.0/8"), ipaddress.IPv4Network("10.1.2.0/24")])
    assert "127.9.9.9" in nets
    assert "10.1.2.200" in nets
    assert "10.1.3.1" not in nets
    assert "192.0.2.1" not in nets
    assert "fe80::1" not in nets
    assert None not in nets


def test_network_set_ipv6() -> None:
    """IPv6 networks; IPv4-mapped sources (a dual-stack socket) are judged as IPv4; a
    link-local network takes only sources of its own zone."""
    nets = NetworkSet([ipaddress.IPv6Network("fd77::/64"), ipaddress.IPv4Network("10.1.2.0/24"),
                       ipaddress.IPv6Network("fe80::%eth0/64")])
    assert nets.zones == ("eth0",)
    assert "fd77::9" in nets
    assert "fd78::9" not in nets
    assert "::ffff:10.1.2.3" in nets
    assert "::ffff:10.1.3.3" not in nets
    assert "fe80::5%eth0" in nets
    assert "fe80::5%eth1" not in nets
    assert "fe80::5" not in nets
    assert "::1" not in nets


def test_ipv6_loopback_network_is_itself() -> None:
    assert interface_networks(["::1"]) == (ipaddress.IPv6Network("::1/128"),)


def test_unknown_ipv6_interface_falls_back_to_slash_64() -> None:
    assert interface_networks(["2001:db8:77::5"]) == (ipaddress.IPv6Network("2001:db8:77::/64"),)
    (zoned,) = interface_networks(["fe80::77:5%lo"])
    assert isinstance(zoned, ipaddress.IPv6Network)
    assert str(zoned) == "fe80::%lo/64"
    assert zoned.network_address.scope_id == "lo"


def test_loopback_network_is_slash_8() -> None:
    assert interface_networks(["127.0.0.1"]) == (ipaddress.IPv4Network("127.0.0.0/8"),)


def test_unknown_interface_falls_back_to_slash_24() -> None:
    assert interface_networks(["198.51.100.77"]) == (ipaddress.IPv4Network("198.51.100.0/24"),)


def test_source_filter() -> None:
    inner = FakeProtocol()
    dropped: list[str] = []
    guard = SourceFilter(inner, NetworkSet([ipaddress.IPv4Network("127.0.0.0/8")]), dropped.append)
    guard.datagram_received(b"a", ("127.0.0.1", 5353))
    guard.datagram_received(b"b", ("192.0.2.7", 40000))
    guard.datagram_received(b"c", ("fe80::1", 5353, 0, 2))
    assert inner.got == [(b"a", ("127.0.0.1", 5353))]
    assert dropped[0] == "192.0.2.7"
    assert dropped[1].startswith("fe80::1%")  # the zone named, as a name or an index


def test_source_filter_zones_link_local_sources() -> None:
    """A link-local source's zone comes as the address tuple's index: it must be lo's."""
    inner = FakeProtocol()
    dropped: list[str] = []
    lo = socket.if_nametoindex("lo")
    nets = NetworkSet(interface_networks(["fe80::77:1%lo"]))
    guard = SourceFilter(inner, nets, dropped.append)
    guard.datagram_received(b"a", ("fe80::77:2", 5353, 0, lo))
    guard.datagram_received(b"b", ("fe80::77:2", 5353, 0, lo + 1000))
    guard.datagram_received(b"c", ("fe80::77:2", 5353, 0, 0))
    assert inner.got == [(b"a", ("fe80::77:2", 5353, 0, lo))]
    assert dropped == [f"fe80::77:2%{lo + 1000}", "fe80::77:2"]


async def test_legacy_unicast_query_is_answered_on_loopback() -> None:
    mesh = uuid.uuid4().hex
    backend = MdnsDiscovery(["127.0.0.1"], mesh=mesh)
    try:
        async with asyncio.timeout(10):
            await backend.start(new_peer(mesh), lambda event: None)
            answered = await asyncio.to_thread(query, "127.0.0.1", "224.0.0.251")
            assert answered, "a legacy (non-5353 source port) query must get a unicast answer"
    finally:
        await backend.aclose()


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


@pytest.fixture
def two_namespaces() -> Iterator[tuple[str, str]]:
    """ns_a (vA: 10.77.1.1/24 + 10.88.0.1/24) <-veth-> ns_b (vB: 10.77.1.2/24 + 10.88.0.2/24)."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 to build network namespaces")
    tag = uuid.uuid4().hex[:6]
    ns_a, ns_b = f"zmda{tag}", f"zmdb{tag}"
    _ip("netns", "add", ns_a)
    try:
        _ip("netns", "add", ns_b)
        _ip("link", "add", f"va{tag}", "netns", ns_a, "type", "veth",
            "peer", "name", f"vb{tag}", "netns", ns_b)  # fmt: skip
        for ns, dev, host in ((ns_a, f"va{tag}", "1"), (ns_b, f"vb{tag}", "2")):
            _ip("-n", ns, "addr", "add", f"10.77.1.{host}/24", "dev", dev)
            _ip("-n", ns, "addr", "add", f"10.88.0.{host}/24", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "route", "add", "224.0.0.0/4", "dev", dev)
        yield ns_a, ns_b
    finally:
        subprocess.run(["ip", "netns", "del", ns_b], capture_output=True, timeout=10)
        subprocess.run(["ip", "netns", "del", ns_a], capture_output=True, timeout=10)


def _in_ns(ns: str, *args: str) -> list[str]:
    return ["ip", "netns", "exec", ns, sys.executable, "-m", "tests.discovery._netns_node", *args]


@pytest.mark.netns
def test_foreign_sources_get_no_answer(two_namespaces: tuple[str, str]) -> None:
    ns_a, ns_b = two_namespaces
    node = subprocess.Popen(
        _in_ns(ns_a, "node", "10.77.1.1", uuid.uuid4().hex),
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert node.stdout is not None
        assert node.stdin is not None
        assert node.stdout.readline().strip() == "ready"

        def ask(source: str, destination: str) -> str:
            done = subprocess.run(
                _in_ns(ns_b, "query", source, destination),
                cwd=REPO, capture_output=True, text=True, timeout=20, check=True,
            )  # fmt: skip
            return done.stdout.strip()

        # same packet, two sources: only the one inside 10.77.1.0/24 is answered
        assert ask("10.77.1.2", "224.0.0.251") == "answered"
        assert ask("10.77.1.2", "10.77.1.1") == "answered"
        assert ask("10.88.0.2", "224.0.0.251") == "silent"
        assert ask("10.88.0.2", "10.88.0.1") == "silent"
        assert ask("10.88.0.2", "10.77.1.1") == "silent"
        out, _ = node.communicate("", timeout=20)
        dropped = json.loads(out.strip().splitlines()[-1])
        assert dropped.get("foreign_source", 0) >= 3
    finally:
        if node.poll() is None:
            node.kill()
            node.wait(timeout=10)
