"""Retained values and history across hosts of a namespace LAN, found by mDNS.

Publishers on h1 and h2 (long-lived `zeromesh pub --retain` reading stdin)
hold values; a late joiner on h3 gets, for each topic, the newest across
them — by `zeromesh last` and as the first messages of `zeromesh sub` — and
then live traffic.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import pytest

from tests import netns
from tests.system._meshproc import MeshProc, StdinPub, host_env, mesh_argv, unique

pytestmark = pytest.mark.netns


def _last(host: netns.Host, mesh: str, pattern: str) -> list[dict[str, Any]]:
    got = host.run(mesh_argv("last", host, mesh, pattern, "--json"), 30, env=host_env(host))
    if got.returncode == 1:
        return []
    assert got.returncode == 0, got.stderr
    values = json.loads(got.stdout)
    assert isinstance(values, list)
    return values


def _until_last(host: netns.Host, mesh: str, pattern: str,
                want: list[tuple[str, str]], timeout: float = 30.0) -> list[dict[str, Any]]:
    """`last` on `host` until it shows `want` ((topic, data) pairs), bounded."""
    deadline = time.monotonic() + timeout
    while True:
        values = _last(host, mesh, pattern)
        if [(v["topic"], v["data"]) for v in values] == want or time.monotonic() > deadline:
            return values


def test_a_late_joiner_on_another_host_gets_the_newest_values(lan: netns.Lan) -> None:
    h1, h2, h3 = lan.hosts
    mesh = unique("retain")
    p1 = StdinPub(h1, mesh, "room.door", "--retain")
    p2 = StdinPub(h2, mesh, "room.door", "--retain")
    try:
        p1.write("open\n")
        assert [(v["topic"], v["data"]) for v in _until_last(h3, mesh, "room.>", [
            ("room.door", "open")])] == [("room.door", "open")]
        p2.write("closed\n")  # later: newest wins, whoever holds it
        values = _until_last(h3, mesh, "room.>", [("room.door", "closed")])
        assert [(v["topic"], v["data"]) for v in values] == [("room.door", "closed")]
        sub = MeshProc(h3, mesh_argv("sub", h3, mesh, "room.*", "--count", "2",
                                     "--timeout", "30"))
        first = sub.wait_line(r"^room\.door ", 30)
        assert first.text == "room.door closed"
        p1.write("ajar\n")  # live, after the values
        sub.wait_line(r"^room\.door ajar$", 30)
        assert sub.wait_exit(30) == 0
        assert sub.texts() == ["room.door closed", "room.door ajar"]
    finally:
        for proc in (p1, p2):
            proc.finish()


def test_sub_since_replays_three_hosts_history_in_order_then_live(lan: netns.Lan) -> None:
    """Publishers on h1..h3 keep history; `sub --since` on h1 gets every message of the
    window exactly once, in order per publisher, then live."""
    hosts = lan.hosts
    mesh = unique("history")
    pubs = [StdinPub(host, mesh, f"hist.{host.name}", "--history", "hist.>")
            for host in hosts]
    try:
        for n in range(5):
            for pub in pubs:
                pub.write(f"{n}\n")
        want = {f"hist.{h.name} {n}" for h in hosts for n in range(5)}
        deadline = time.monotonic() + 30
        while True:  # each `pub` publishes once it found its peers: poll its history
            got = hosts[0].run(mesh_argv("sub", hosts[0], mesh, "hist.>", "--since", "10m",
                                         "--count", "15", "--timeout", "5"), 30,
                               env=host_env(hosts[0]))
            if got.returncode == 0 or time.monotonic() > deadline:
                break
        lines = got.stdout.splitlines()
        assert set(lines) == want, got.stdout
        for host in hosts:
            mine = [line for line in lines if line.startswith(f"hist.{host.name} ")]
            assert mine == [f"hist.{host.name} {n}" for n in range(5)]
        sub = MeshProc(hosts[2], mesh_argv("sub", hosts[2], mesh, "hist.>", "--since", "10m",
                                           "--count", "16", "--timeout", "30"))
        for line in sorted(want):
            sub.wait_line(rf"^{line}$", 30)
        pubs[0].write("live\n")
        sub.wait_line(rf"^hist\.{hosts[0].name} live$", 30)
        assert sub.wait_exit(30) == 0
        assert len(sub.texts()) == 16
    finally:
        for pub in pubs:
            pub.finish()


def test_joining_across_hosts_during_a_10k_per_s_flood_has_no_gap_no_duplicate(
        lan: netns.Lan) -> None:
    """The publisher on h1 retains ``flood.x`` ~10,000 times a second; a subscriber joining
    from h2 gets the retained value, then every later message exactly once."""
    h1, h2, _ = lan.hosts
    mesh = unique("flood")
    role = [sys.executable, "-m", "tests.system._memory_roles"]
    pub = MeshProc(h1, [*role, "flood", h1.ip, mesh, "10000"], stdin=True)
    try:
        pub.wait_line(r"^ready ", 20)
        join = MeshProc(h2, [*role, "join", h2.ip, mesh, "20000"])
        line = join.wait_line(r"^\[", 60)
        got = json.loads(line.text)
        assert got[0] > 1, "joined mid-stream"
        assert got == list(range(got[0], got[0] + len(got)))
        assert join.wait_exit(20) == 0
    finally:
        pub.close_stdin()
        pub.wait_exit(20)
