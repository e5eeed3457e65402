"""The blocking Node used from plain threads: closing while other threads still call it,
and what its handles do around a close."""

from __future__ import annotations

import os
import signal
import threading
from collections import Counter
from collections.abc import Callable
from typing import Any, Protocol

import pytest

from mesh import ClosedError, Node


class Closable(Protocol):
    def close(self) -> None: ...


def _common(mesh_name: str) -> dict[str, Any]:
    return {"mesh": mesh_name, "interfaces": ["127.0.0.1"], "mdns": False}


def _hammer(call: Callable[[], object], started: threading.Event, stop: threading.Event,
            outcomes: Counter[str]) -> threading.Thread:
    """A thread calling `call` until it raises ClosedError or `stop` is set (bounded)."""

    def run() -> None:
        started.set()
        for _ in range(1_000_000):
            if stop.is_set():
                outcomes["stopped"] += 1
                return
            try:
                call()
            except ClosedError:
                outcomes["closed"] += 1
                return
        outcomes["never stopped"] += 1

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_calls_racing_close_from_other_threads_all_end(mesh_name: str) -> None:
    """A call handed to the loop just as it stopped used to wait for it forever (2 runs in
    3 left a thread calling `peers()` stuck); now each ends (with ClosedError if it never
    ran)."""
    for round_ in range(4):
        node = Node(name=f"a{round_}", **_common(mesh_name))
        node.start()
        started, stop = threading.Event(), threading.Event()
        outcomes: Counter[str] = Counter()
        threads = [_hammer(node.peers, started, stop, outcomes) for _ in range(3)]
        assert started.wait(5)
        node.close()
        stop.set()
        for thread in threads:
            thread.join(5)
        assert not any(t.is_alive() for t in threads), f"round {round_}: a call never ended"
        assert sum(outcomes.values()) == 3, outcomes


def test_publishes_racing_close_are_delivered_or_raise(mesh_name: str) -> None:
    """A best-effort publish that returned is delivered (here: to the node's own
    subscriber); one made once close began raises ClosedError. They used to be handed over
    after close's last drain: returned, never delivered, with a loop traceback per batch."""
    node = Node(name="a", **_common(mesh_name))
    node.start()
    sub = node.subscribe("x.>", max_pending=0)
    sent: Counter[int] = Counter()
    started, stop = threading.Event(), threading.Event()
    outcomes: Counter[str] = Counter()

    def publisher(i: int) -> Callable[[], None]:
        def publish() -> None:
            node.publish(f"x.{i}", b"d")
            sent[i] += 1
        return publish

    threads = [_hammer(publisher(i), started, stop, outcomes) for i in range(3)]
    assert started.wait(5)
    node.close()
    for thread in threads:
        thread.join(5)
    assert outcomes == {"closed": 3}
    assert sub.received == sum(sent.values()) > 0


def test_a_subscription_timeout_is_one_error_not_a_chain(mesh_name: str) -> None:
    """``next(timeout)`` timing out (or interrupted by Ctrl-C) used to show "During handling
    of the above exception (IndexError: pop from an empty deque), another exception
    occurred" above the TimeoutError."""
    with Node(name="a", **_common(mesh_name)) as node:
        sub = node.subscribe("x")
        with pytest.raises(TimeoutError) as caught:
            sub.next(timeout=0.01)
        assert caught.value.__context__ is None
        sub.close()
        with pytest.raises(ClosedError) as closed:
            sub.next(timeout=0.01)
        assert closed.value.__context__ is None


def test_every_handle_closes_quietly_after_its_node_closed(mesh_name: str) -> None:
    """As their async twins do. A service's ``close()`` (say, a ``with node.serve(...)``
    block ending after the node closed) used to raise ClosedError."""
    node = Node(name="a", **_common(mesh_name))
    node.start()
    handles: list[Closable] = [node.serve("s", lambda msg: b"x"), node.subscribe("x"), node.pull("q"),
               node.events(), node.request_all_stream("s", b"", timeout=0.5)]
    node.close()
    for handle in handles:
        handle.close()


class _Interrupted(Exception):
    """What our SIGINT handler raises in place of KeyboardInterrupt (pytest's own)."""


def test_a_pull_interrupted_by_ctrl_c_takes_nothing_behind_the_callers_back(
        mesh_name: str) -> None:
    """Ctrl-C in ``next()``, caught, and the program goes on: the next message pushed is
    the next one it gets. The interrupted call used to go on on the loop, take that message
    and have it counted as processed by the following ``next()``: lost."""
    with Node(name="a", **_common(mesh_name)) as node:
        pull = node.pull("q")

        def on_sigint(signum: int, frame: object) -> None:
            raise _Interrupted

        previous = signal.signal(signal.SIGINT, on_sigint)
        timer = threading.Timer(0.1, os.kill, (os.getpid(), signal.SIGINT))
        try:
            timer.start()
            with pytest.raises(_Interrupted):
                pull.next(timeout=5)
        finally:
            timer.join()
            signal.signal(signal.SIGINT, previous)
        node.push("q", b"m0", timeout=2)
        node.peers()  # (a round trip through the loop: an interrupted call has run by now)
        assert pull.next(timeout=2).data == b"m0"
