"""A start that fails at any step leaves nothing behind and says why.

Each test makes one step of `AsyncNode.start` fail — a port in use, an
unusable spool, a discovery backend that cannot start, the agent's HTTP port
taken — and checks that every task, thread, socket and the data-dir lock
started before it are gone, and that the node can start once the cause is
removed. Where the real failure cannot be provoked on demand, the step's own
function is made to raise.
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from discovery import MdnsDiscovery, StaticDiscovery
from mesh import AsyncNode, ConfigError
from mesh._agent import Agent, load
from mesh._membership._control import Membership
from mesh._pubsub._engine import PubSub
from mesh._services._serving import Serving
from mesh._spool import SpoolStore
from mesh._work._queues import WorkQueues
from tests.helpers import aeventually

from .conftest import FAST


@dataclass
class Baseline:
    """What the process holds before a start: it must hold the same after a failed one."""

    tasks: set[asyncio.Task[Any]]
    threads: set[threading.Thread]
    fds: int

    @classmethod
    def now(cls) -> Baseline:
        return cls(set(asyncio.all_tasks()), _threads(), _open_fds())

    async def check_restored(self) -> None:
        await aeventually(lambda: set(asyncio.all_tasks()) <= self.tasks, timeout=5,
                          message="a task outlived the failed start")
        try:
            await aeventually(lambda: _threads() <= self.threads, timeout=5)
        except AssertionError:
            left = sorted(t.name for t in _threads() - self.threads)
            raise AssertionError(f"threads outlived the failed start: {left}") from None
        await aeventually(lambda: _open_fds() <= self.fds, timeout=5,
                          message="a socket or file outlived the failed start")


def _threads() -> set[threading.Thread]:
    """Live threads, but for the loop's default executor (the test's loop owns it, and
    `asyncio.to_thread` keeps its workers until the loop closes)."""
    return {t for t in threading.enumerate() if not t.name.startswith("asyncio_")}


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def settings(mesh_name: str, tmp_path: Path) -> dict[str, Any]:
    return {"name": "n", "mesh": mesh_name, "interfaces": ["127.0.0.1"],
            "data_dir": str(tmp_path / "data"), "mdns": False, **FAST}


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A TCP port on 127.0.0.1 that something else listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


async def _fails_cleanly(settings: dict[str, Any], key: str) -> None:
    """Start must raise ConfigError(`key`), leave nothing, and work once the fault is gone."""
    await asyncio.sleep(0)  # let fixtures' own setup tasks settle first
    before = Baseline.now()
    node = AsyncNode(**settings)
    with pytest.raises(ConfigError) as caught:
        await node.start()
    assert caught.value.key == key
    assert not node.running
    await before.check_restored()
    assert node.peers() == []


@pytest.mark.skipif(not Path("/proc/self/fd").exists(), reason="counts open files in /proc")
async def test_a_control_port_in_use_unwinds_everything(settings: dict[str, Any],
                                                        taken_port: int) -> None:
    """A real bind failure: the spool and lock taken before it are released."""
    await _fails_cleanly({**settings, "port": taken_port}, "interfaces")
    async with AsyncNode(**settings) as node:  # the data dir is free again
        assert node.running


STEPS = [
    pytest.param(SpoolStore, "start", OSError(28, "No space left on device"), "data_dir",
                 id="spool-open"),
    pytest.param(Membership, "bind", OSError(98, "Address already in use"), "interfaces",
                 id="control-bind"),
    pytest.param(PubSub, "bind", OSError(98, "Address already in use"), "interfaces",
                 id="publisher-bind"),
    pytest.param(Serving, "bind", OSError(98, "Address already in use"), "interfaces",
                 id="service-bind"),
    pytest.param(WorkQueues, "bind", OSError(98, "Address already in use"), "interfaces",
                 id="work-bind"),
    pytest.param(StaticDiscovery, "start", OSError(101, "Network is unreachable"), "peers",
                 id="static-discovery"),
    pytest.param(MdnsDiscovery, "start", OSError(19, "No such device"), "mdns",
                 id="mdns-discovery"),
]


@pytest.mark.skipif(not Path("/proc/self/fd").exists(), reason="counts open files in /proc")
@pytest.mark.parametrize(("owner", "method", "error", "key"), STEPS)
async def test_a_failure_at_each_step_unwinds_everything(
        settings: dict[str, Any], monkeypatch: pytest.MonkeyPatch, owner: type, method: str,
        error: OSError, key: str) -> None:
    """Whatever step fails, what the steps before it started is closed again."""
    original = getattr(owner, method)

    def fail(*args: Any, **kwargs: Any) -> Any:
        raise error

    async def afail(*args: Any, **kwargs: Any) -> Any:
        raise error

    monkeypatch.setattr(owner, method, afail if asyncio.iscoroutinefunction(original) else fail)
    if owner is StaticDiscovery:
        settings = {**settings, "peers": ["tcp://127.0.0.1:9"]}
    if owner is MdnsDiscovery:
        settings = {**settings, "mdns": True}
    await _fails_cleanly(settings, key)
    monkeypatch.setattr(owner, method, original)
    async with AsyncNode(**settings) as node:  # nothing left over stands in the way
        assert node.running


@pytest.mark.skipif(not Path("/proc/self/fd").exists(), reason="counts open files in /proc")
async def test_an_agent_whose_http_port_is_taken_closes_its_node(settings: dict[str, Any],
                                                                 taken_port: int) -> None:
    """The last step of an agent's start is listening; its node is unwound when it fails."""
    before = Baseline.now()
    config = load(None, env={}, flags={
        "name": "agent", "mesh": settings["mesh"], "interfaces": ["127.0.0.1"],
        "data_dir": settings["data_dir"], "mdns": False, "http": f"127.0.0.1:{taken_port}"})
    agent = Agent(config)
    with pytest.raises(ConfigError, match="http: cannot listen"):
        await agent.__aenter__()
    assert not agent.node.running
    await before.check_restored()
    async with AsyncNode(**settings) as node:  # the agent's data dir lock was released
        assert node.running
