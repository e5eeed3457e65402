"""Fixtures for pattern tests: one ZeroMQ context per test, everything closed on the loop."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import pytest

from patterns import Context


@pytest.fixture
async def ctx() -> AsyncIterator[Context]:
    """A context for this test. At teardown every socket still open is closed on the loop
    (a watched socket must be: its reader is removed from the loop), then the context is
    ended off the loop, failing loudly if that hangs."""
    context = Context()
    try:
        yield context
    finally:
        for sock in list(context._sockets):  # what a failing test left open
            sock.close()
        async with asyncio.timeout(5):
            await asyncio.to_thread(context.close)


@pytest.fixture
def free_endpoint() -> str:
    """``tcp://127.0.0.1:<port>`` where nothing listens: a port the OS just handed out and
    took back. A DEALER or PUSH connected there queues up to its high-water mark."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"tcp://127.0.0.1:{port}"
