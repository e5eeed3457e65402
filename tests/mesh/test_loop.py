"""The event loop our entry points choose (`mesh._loop`): uvloop when installed, else asyncio's,
and ``ZEROMESH_LOOP`` to pick."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest

import mesh
from mesh import ConfigError, Node
from mesh._loop import loop_factory

from ._proc import child_env

pytestmark = pytest.mark.timeout(30)
uvloop = pytest.importorskip("uvloop")  # a dependency wherever it builds (not on Windows)


async def _loop_module() -> str:
    return type(asyncio.get_running_loop()).__module__


def test_auto_runs_on_uvloop_and_asyncio_opts_out(monkeypatch: pytest.MonkeyPatch) -> None:
    """`mesh.run` picks uvloop by default; ZEROMESH_LOOP=asyncio gives the standard loop."""
    monkeypatch.delenv("ZEROMESH_LOOP", raising=False)
    assert mesh.run(_loop_module()).startswith("uvloop")
    monkeypatch.setenv("ZEROMESH_LOOP", "asyncio")
    assert mesh.run(_loop_module()).startswith("asyncio")
    monkeypatch.setenv("ZEROMESH_LOOP", "uvloop")
    assert mesh.run(_loop_module()).startswith("uvloop")


def test_an_unknown_choice_is_a_config_error_naming_the_variable() -> None:
    with pytest.raises(ConfigError, match=r"ZEROMESH_LOOP.*expected one of auto, uvloop"):
        loop_factory({"ZEROMESH_LOOP": "tokio"})


def test_the_blocking_node_runs_its_loop_on_uvloop(mesh_name: str) -> None:
    """`Node` runs its private loop thread on the chosen loop, and works on it."""
    with Node(name="n", mesh=mesh_name, interfaces=["127.0.0.1"], mdns=False) as node:
        assert node._call(_loop_module(), 5).startswith("uvloop")
        sub = node.subscribe("t.>")
        node.publish("t.x", b"on uvloop")
        assert sub.next(timeout=5).data == b"on uvloop"


def test_the_cli_refuses_an_unknown_loop_with_exit_2(mesh_name: str) -> None:
    """One line naming the variable, exit 2, and nothing else on stderr."""
    env = {**child_env(mesh_name), "ZEROMESH_LOOP": "tokio"}
    done = subprocess.run([sys.executable, "-m", "mesh", "peers"], env=env, text=True,
                          capture_output=True, timeout=20, check=False)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "zeromesh peers: ZEROMESH_LOOP: expected one of auto, uvloop, asyncio, got 'tokio'"]
