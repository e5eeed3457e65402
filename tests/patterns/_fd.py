"""The ZeroMQ FD of a `patterns` socket, seen from the test: to build the edge-trigger cases.

libzmq's ``ZMQ_FD`` is an edge-triggered signal: it turns readable when commands (such
as "messages arrived on a pipe") wait for the socket, and any operation that processes
commands (``send``, ``recv``, reading ``EVENTS``) clears it, whether or not messages are
left. `poll(2)` on it does not process commands, so a test can wait for the edge without
consuming it, and see afterwards that something else did.
"""

from __future__ import annotations

import select

import zmq

from patterns._socket import Socket


def fd_of(sock: Socket) -> int:
    fd = sock._sync.getsockopt(zmq.FD)
    assert isinstance(fd, int)
    return fd


def fd_readable(fd: int, timeout: float = 0.0) -> bool:
    """Whether the FD is (or turns, within `timeout` s) readable.

    Blocks the calling thread on purpose: on the loop's thread it keeps the loop from
    running the socket's reader meanwhile, which is what the edge cases need.
    """
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(int(timeout * 1000)))
