"""Fixtures for in-process node tests: unique mesh per test, nodes closed even on failure."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any, Protocol

import pytest

from mesh import AsyncNode

from ._proc import Cli

FAST: dict[str, Any] = {"heartbeat_interval": 0.05, "suspect_after": 0.15, "lost_after": 0.3}
FAST_ENV = {f"ZEROMESH_{key.upper()}": str(value) for key, value in FAST.items()}
"""`FAST` for a CLI child (``env=FAST_ENV``) in a mesh with FAST in-process nodes, which
would otherwise take it for lost between two of its default-timed heartbeats."""


class MakeNode(Protocol):
    """The `make_node` fixture: ``await make_node(name, **settings)`` -> a started AsyncNode."""

    async def __call__(self, name: str, **settings: Any) -> AsyncNode: ...


@pytest.fixture
async def make_node(mesh_name: str) -> AsyncIterator[MakeNode]:
    """Start AsyncNodes on 127.0.0.1 in this test's mesh; all are closed at teardown."""
    nodes: list[AsyncNode] = []

    async def make(name: str, **settings: Any) -> AsyncNode:
        settings = {"mesh": mesh_name, "interfaces": ["127.0.0.1"], **FAST, **settings}
        node = AsyncNode(name=name, **settings)
        await node.start()
        nodes.append(node)
        return node

    try:
        yield make
    finally:
        await close_all(nodes)


async def close_all(nodes: list[AsyncNode]) -> None:
    """Close `nodes` together: each close waits ~0.25 s for zeroconf's goodbyes, which
    one after another add up over hundreds of tests. The first failure is raised once
    all have closed."""
    results = await asyncio.gather(*(node.aclose() for node in nodes), return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result


@pytest.fixture
def procs() -> Iterator[list[Cli]]:
    """CLI processes a test starts; each is SIGKILLed (if still running) at teardown."""
    started: list[Cli] = []
    try:
        yield started
    finally:
        for proc in started:
            proc.close()


@pytest.fixture
async def release() -> AsyncIterator[asyncio.Event]:
    """An event set at teardown: slow service handlers wait on it (instead of sleeping), so
    none outlives its test."""
    event = asyncio.Event()
    try:
        yield event
    finally:
        event.set()
