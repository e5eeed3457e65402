"""Retained values across hosts of a namespace LAN, found by mDNS.

Publishers on h1 and h2 (long-lived `zeromesh pub --retain` reading stdin)
hold values; a late joiner on h3 gets, for each topic, the newest across
them — by `zeromesh last` and as the first messages of `zeromesh sub` — and
then live traffic.
"""

from __future__ import annotations

import json
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
