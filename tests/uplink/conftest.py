"""Fixtures for the uplink tests: real brokers on 127.0.0.1, stopped even when a test fails."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Protocol

import pytest

from tests.uplink._nats_server import NatsServer


class StartNats(Protocol):
    """The `nats_server` fixture: ``start_nats(**kw)`` -> a started `NatsServer` (the
    constructor's arguments: ``user=``, ``password=``, ``host=``, ``argv_prefix=``...)."""

    def __call__(self, **kw: Any) -> NatsServer: ...


@pytest.fixture
def nats_server() -> Iterator[StartNats]:
    """Starts nats-servers (JetStream, file store, a free port on 127.0.0.1 by default);
    every one is stopped and its files removed at teardown. Skips the test when nats-server
    is not installed (fails it under ``ZEROMESH_REQUIRE_BROKERS=1``)."""
    with contextlib.ExitStack() as stack:  # closes every one even if another's close fails

        def start(**kw: Any) -> NatsServer:
            server = NatsServer(**kw)
            stack.callback(server.close)
            return server.start()

        yield start


# The agent-process fixtures of tests/mesh, for the uplink tests that run agents.
from tests.mesh.conftest import make_node, procs  # noqa: E402, F401
