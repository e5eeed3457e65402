"""Shared fixtures: loopback-only environment, and network-namespace LANs.

- every test runs with ``ZEROMESH_INTERFACES=127.0.0.1`` (DESIGN: tests touch
  only loopback or namespaces they created);
- ``lan`` / ``lan4``: a fresh 3- / 4-host LAN of network namespaces
  (tests/netns.py); skipped with the reason when not root or netns is missing;
- a session check that no namespace this run created is left behind.
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Iterator

import pytest

from tests import netns


@pytest.fixture(autouse=True)
def _loopback_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ZEROMESH_INTERFACES", "127.0.0.1")
    monkeypatch.setenv("ZEROMESH_HTTP", "127.0.0.1:0")  # agents: never the shared default port


@functools.cache
def _netns_skip_reason() -> str | None:
    return netns.netns_unavailable_reason()


def _lan(n: int) -> Iterator[netns.Lan]:
    reason = _netns_skip_reason()
    if reason is not None:
        pytest.skip(reason)
    with netns.make_lan(n) as lan:
        yield lan


@pytest.fixture
def lan() -> Iterator[netns.Lan]:
    """A fresh LAN of 3 hosts (h1..h3), torn down after the test."""
    yield from _lan(3)


@pytest.fixture
def lan4() -> Iterator[netns.Lan]:
    """A fresh LAN of 4 hosts (h1..h4), torn down after the test."""
    yield from _lan(4)


@pytest.fixture(scope="session", autouse=True)
def _no_leaked_namespaces() -> Iterator[None]:
    """Fails the session if any namespace this run created still exists (and removes it)."""
    yield
    ours = netns.created_netns()
    if not ours:
        return
    leaked = sorted(ours & netns.list_netns())
    for name in leaked:
        netns.destroy_netns(name)
    assert not leaked, f"network namespaces leaked by this test run (now deleted): {leaked}"


@pytest.fixture
def mesh_name() -> str:
    """A mesh of its own for each test, so parallel runs never see each other."""
    return "t" + uuid.uuid4().hex[:12]
