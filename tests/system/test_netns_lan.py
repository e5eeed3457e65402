"""The network-namespace LAN used by multi-host tests (tests/netns.py) works as promised."""

from __future__ import annotations

import itertools
import os
import selectors
import subprocess
import sys
import textwrap
from typing import Any

import pytest

from tests import netns
from tests.conftest import _netns_skip_reason
from tests.helpers import eventually

pytestmark = pytest.mark.netns

MCAST_GROUP = "224.0.0.251"  # the mDNS group, on a port of our own
MCAST_PORT = 5399

RECEIVER = textwrap.dedent(
    f"""
    import socket, struct, sys
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("", {MCAST_PORT}))
    # INADDR_ANY, as mDNS stacks do: needs the 224.0.0.0/4 route in the namespace.
    mreq = struct.pack("4s4s", socket.inet_aton("{MCAST_GROUP}"), socket.inet_aton("0.0.0.0"))
    s.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreq)
    print("ready", flush=True)
    s.settimeout(10)
    data, addr = s.recvfrom(2048)
    print(data.decode(), addr[0], flush=True)
    """
)

SENDER = textwrap.dedent(
    f"""
    import socket, time
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
    s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)
    for _ in range(20):
        s.sendto(b"hello-mesh", ("{MCAST_GROUP}", {MCAST_PORT}))
        time.sleep(0.05)
    """
)


@pytest.fixture
def netns_ok() -> None:
    reason = _netns_skip_reason()
    if reason is not None:
        pytest.skip(reason)


def read_line(proc: subprocess.Popen[Any], timeout: float) -> str:
    """One stdout line from ``proc`` within ``timeout`` seconds (never blocks forever)."""
    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            raise AssertionError(f"no output from {proc.args!r} within {timeout} s")
    line: str = proc.stdout.readline()
    return line.strip()


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def root_links() -> set[str]:
    out = subprocess.run(
        ["ip", "-o", "link", "show"], capture_output=True, text=True, timeout=10, check=True
    ).stdout
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines()}


class Boom(Exception):
    """Raised inside a LAN's body to check teardown after failures."""


def test_hosts_have_lan_addresses(lan4: netns.Lan) -> None:
    """Hosts are h1..hN at 10.77.<b>.1..N in namespaces with the LAN's unique prefix."""
    assert [h.name for h in lan4] == ["h1", "h2", "h3", "h4"]
    b = lan4.subnet_byte
    assert [h.ip for h in lan4] == [f"10.77.{b}.{i}" for i in range(1, 5)]
    assert all(h.netns.startswith(lan4.tag + "-") for h in lan4)
    assert set(lan4.namespaces) <= netns.list_netns()
    out = lan4[0].run(["ip", "-o", "-4", "addr", "show", "dev", "eth0"], 5, check=True).stdout
    assert f"{lan4[0].ip}/24" in out


def test_hosts_ping_each_other(lan: netns.Lan) -> None:
    """Every host answers ICMP echo from every other host across the bridge."""
    for src, dst in itertools.permutations(lan.hosts, 2):
        assert dst.ip.startswith("10.77.")
        assert src.ping(dst.ip), f"{src.name} cannot ping {dst.name} ({dst.ip})"


def test_loopback_is_up_in_each_host(lan: netns.Lan) -> None:
    """`lo` is up, so 127.0.0.1 works inside every namespace."""
    for host in lan:
        assert host.ping("127.0.0.1")


def test_multicast_crosses_the_bridge(lan: netns.Lan) -> None:
    """A datagram h1 sends to 224.0.0.251 reaches receivers on h2 and h3."""
    h1, h2, h3 = lan.hosts
    receivers = [
        h.popen([sys.executable, "-c", RECEIVER], stdout=subprocess.PIPE, text=True)
        for h in (h2, h3)
    ]
    for proc in receivers:
        assert read_line(proc, 10) == "ready"
    h1.python(SENDER, timeout=10, check=True)
    for proc in receivers:
        assert read_line(proc, 10) == f"hello-mesh {h1.ip}"
        assert proc.wait(timeout=5) == 0


def test_children_get_their_host_address_as_interface(lan: netns.Lan) -> None:
    """Processes on a host see ZEROMESH_INTERFACES=<host ip>, not the test's 127.0.0.1."""
    assert os.environ["ZEROMESH_INTERFACES"] == "127.0.0.1"
    code = "import os; print(os.environ['ZEROMESH_INTERFACES'])"
    assert lan[1].python(code, timeout=10, check=True).stdout.strip() == lan[1].ip


@pytest.mark.parametrize("silent", [False, True], ids=["link-down", "silent"])
def test_cut_and_restore(lan: netns.Lan, silent: bool) -> None:
    """A cut host reaches nobody and nobody reaches it; restore brings it back."""
    h1, h2, h3 = lan.hosts
    assert h1.ping(h2.ip)
    h1.cut(silent=silent)
    assert not h1.ping(h2.ip)
    assert not h3.ping(h1.ip)
    assert h2.ping(h3.ip), "the rest of the LAN must keep working"
    h1.restore()
    assert h1.ping(h2.ip)
    assert h3.ping(h1.ip)


def test_run_timeout_kills_the_command(lan: netns.Lan) -> None:
    """`run` is bounded: on timeout the process is killed and TimeoutExpired raised."""
    with pytest.raises(subprocess.TimeoutExpired):
        lan[0].run(["sleep", "30"], timeout=0.2)
    assert all(p.poll() is not None for p in lan.processes)


def test_close_cleans_up_even_when_the_body_raises(netns_ok: None) -> None:
    """After an exception in the body, processes (and their children) are dead, namespaces gone."""
    before = root_links()
    # The body is the test: Boom must pass through make_lan's __exit__ after it has started things.
    with pytest.raises(Boom), netns.make_lan(2) as lan:  # noqa: PT012
        names = lan.namespaces
        assert len(names) == 3
        sleeper = lan[0].popen(["sleep", "60"])
        # A child that forks a grandchild: the whole group must die.
        parent = lan[1].popen(
            ["sh", "-c", "sleep 60 & echo $!; wait"], stdout=subprocess.PIPE, text=True
        )
        grandchild = int(read_line(parent, 10))
        assert pid_alive(sleeper.pid)
        assert pid_alive(grandchild)
        raise Boom
    assert not set(names) & netns.list_netns()
    assert sleeper.poll() is not None
    assert parent.poll() is not None
    eventually(lambda: not pid_alive(grandchild), timeout=5, message="grandchild killed")
    assert root_links() == before, "the root namespace's links must be untouched"
    lan.close()  # idempotent


def test_close_kills_daemons_left_in_namespace(netns_ok: None) -> None:
    """A process that escaped our process group but stayed in our namespace dies too."""
    with netns.make_lan(1) as lan:
        names = lan.namespaces
        spawner = lan[0].popen(
            ["sh", "-c", "setsid sleep 60 > /dev/null 2>&1 & echo $!"],
            stdout=subprocess.PIPE,
            text=True,
        )
        daemon = int(read_line(spawner, 10))
        spawner.wait(timeout=5)
        assert pid_alive(daemon)
    eventually(lambda: not pid_alive(daemon), timeout=5, message="daemon killed")
    assert not set(names) & netns.list_netns()


def test_closed_lan_refuses_new_processes(netns_ok: None) -> None:
    """Starting a process on a closed LAN is an error, not a leak."""
    with netns.make_lan(1) as lan:
        host = lan[0]
    with pytest.raises(netns.NetnsError, match="is closed"):
        host.popen(["true"])


def test_a_large_lan_needs_no_arp(netns_ok: None) -> None:
    """From `_STATIC_NEIGHBOURS_FROM` hosts on, each host has a permanent neighbour entry
    for every other (the kernel's one shared ARP table would overflow at 100 hosts) with
    the address its eth0 really has, so hosts still reach each other."""
    n = netns._STATIC_NEIGHBOURS_FROM
    with netns.make_lan(n) as lan:
        first, last = lan[0], lan[n - 1]
        mac = last.run(["cat", "/sys/class/net/eth0/address"], 5, check=True).stdout.strip()
        neigh = first.run(["ip", "neigh", "show", "dev", "eth0"], 5, check=True).stdout
        entries = {line.split()[0]: line.split() for line in neigh.splitlines()}
        assert {h.ip for h in lan.hosts[1:]} <= entries.keys()
        assert mac in entries[last.ip]
        assert "PERMANENT" in entries[last.ip]
        assert first.ping(last.ip)
        assert last.ping(first.ip)
