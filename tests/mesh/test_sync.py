"""The blocking Node used from plain threads: closing while other threads still call it,
and what its handles do around a close."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import pytest

import mesh._core
from mesh import ClosedError, Node
from mesh._membership import _events
from tests.helpers import eventually


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


def test_a_blocking_events_stream_nobody_reads_keeps_only_the_newest(
        mesh_name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """As the async stream: the newest `MAX_PENDING`, the rest counted in `dropped`."""
    monkeypatch.setattr(_events, "MAX_PENDING", 2)
    with Node(name="a", **_common(mesh_name)) as a:
        idle = a.events()
        for name in ("b", "c", "d"):  # joined and left, one after the other: 6 events
            other = Node(name=name, peers=a.endpoints["ctl"], **_common(mesh_name))
            other.start()
            try:
                a.wait_for_peers(1, timeout=5)
            finally:
                other.close()
            eventually(lambda: a.peers() == [], timeout=5)
        eventually(lambda: idle.dropped == 4, timeout=5)
        assert [idle.next(timeout=1).peer.name for _ in range(2)] == ["d", "d"]


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


_STUCK_HANDLERS = textwrap.dedent("""
    import sys, threading, time
    import mesh._core
    from mesh import Node
    mesh._core._HANDLER_GRACE = 0.1  # (a pull handler's grace at close: the test's time)
    started = threading.Semaphore(0)
    def stuck(msg):
        started.release()
        time.sleep(3600)
    node = Node(name="a", mesh=sys.argv[1], interfaces=["127.0.0.1"], mdns=False)
    node.start()
    node.pull("jobs", handler=stuck)
    node.serve("svc", stuck)
    node.push("jobs", b"x", timeout=5)
    threading.Thread(target=node.request, args=("svc", b"x"), kwargs={"timeout": 30},
                     daemon=True).start()
    assert started.acquire(timeout=5) and started.acquire(timeout=5)
    node.close()
    print("closed", flush=True)
""")


def test_blocking_handlers_still_running_do_not_hold_up_the_exit(mesh_name: str) -> None:
    """A program whose pull and serve handlers never return exits once it closed its node,
    saying which handlers it abandoned. They ran in the loop's default pool, whose threads
    Python joins at exit: the program never ended."""
    proc = subprocess.Popen([sys.executable, "-c", _STUCK_HANDLERS, mesh_name],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"still running 15 s on (printed {out!r})")
    assert (proc.returncode, out) == (0, "closed\n"), err
    assert "pull handler stuck of queue 'jobs' still running: abandoned" in err
    assert "serve handler stuck of service 'svc' still running: abandoned" in err


def test_a_pull_handler_abandoned_at_close_leaves_its_message_unprocessed(
        mesh_name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The reliable message a handler still held when its node closed is delivered again
    (to the next worker), as after a crash: the handler never finished it."""
    monkeypatch.setattr(mesh._core, "_HANDLER_GRACE", 0.1)
    with Node(name="p", data_dir=str(tmp_path / "p"), **_common(mesh_name)) as pusher:
        worker = Node(name="w", peers=pusher.endpoints["ctl"], **_common(mesh_name))
        worker.start()
        started, release = threading.Event(), threading.Event()

        def stuck(msg: object) -> None:
            started.set()
            release.wait(10)

        try:
            worker.pull("jobs", handler=stuck)
            pusher.wait_for_workers("jobs", timeout=5)
            pusher.push("jobs", b"m", reliable=True)
            assert started.wait(5)
            worker.close()
        finally:
            release.set()
            worker.close()
        again = pusher.pull("jobs").next(timeout=5)
        assert again.data == b"m"


def test_close_from_a_pull_handler_is_prompt(mesh_name: str) -> None:
    """A handler closing its own node: the close waited for the handler's grace (2 s),
    the handler being the one that waited for the close. The message counts as processed."""
    with Node(name="a", **_common(mesh_name)) as node:
        took: list[float] = []

        def handler(msg: object) -> None:
            began = time.monotonic()
            node.close()
            took.append(time.monotonic() - began)

        node.pull("jobs", handler=handler)
        node.push("jobs", b"x", timeout=5)
        eventually(lambda: took, timeout=5)
        assert took[0] < 1.0, took
