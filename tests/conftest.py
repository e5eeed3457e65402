"""Shared fixtures: loopback-only environment, and network-namespace LANs.

- every test runs with ``ZEROMESH_INTERFACES=127.0.0.1`` (DESIGN: tests touch
  only loopback or namespaces they created);
- ``lan`` / ``lan4``: a fresh 3- / 4-host LAN of network namespaces
  (tests/netns.py); skipped with the reason when not root or netns is missing;
- a session check that no namespace this run created is left behind;
- two leak guards on every test (`_loop_and_thread_guard`): no event loop's exception
  handler fired (a reader is a callback on a socket FD, so an exception in it is only
  logged by the loop, never raised at the test), and no thread the test started outlives
  it. Mark a test ``@pytest.mark.loop_errors_expected`` when a callback's exception is
  what it checks.
"""

from __future__ import annotations

import asyncio
import functools
import os
import sys
import threading
import time
import traceback
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any, Final

import pytest

from tests import netns

# Processes the suite starts (the CLI, agents, benchmarks, examples) cache their bytecode,
# as Python does by default: where the environment turns that off (PYTHONDONTWRITEBYTECODE),
# every one of them would compile our modules again.
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
sys.dont_write_bytecode = False


@pytest.fixture(autouse=True)
def _loopback_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ZEROMESH_INTERFACES", "127.0.0.1")
    monkeypatch.setenv("ZEROMESH_HTTP", "127.0.0.1:0")  # agents: never the shared default port


_THREAD_GRACE: Final[float] = 2.0
_LOOP_ERRORS_SHOWN: Final[int] = 5
"""Loop errors shown in full; the rest are counted by message and exception."""
"""How long, in all, the threads a test started get to end after it (teardown included)."""


def _loop_classes() -> list[type[asyncio.AbstractEventLoop]]:
    """Every loop class whose handler we hook: asyncio's (all its loops share
    `BaseEventLoop.call_exception_handler`) and uvloop's, which `mesh._loop` picks.
    uvloop's `Loop` is a Python subclass of its C loop, and the C code looks the method
    up by name, so an attribute set on the subclass catches its calls too."""
    classes: list[type[asyncio.AbstractEventLoop]] = [asyncio.BaseEventLoop]
    try:
        import uvloop
    except ImportError:  # not on this platform: only asyncio's loops exist
        pass
    else:
        classes.append(uvloop.Loop)
    return classes


def _hooked(original: Callable[[Any, dict[str, Any]], None],
            record: Callable[[asyncio.AbstractEventLoop, dict[str, Any]], None],
            ) -> Callable[[Any, dict[str, Any]], None]:
    def call_exception_handler(self: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        record(self, context)
        original(self, context)  # the loop's own handler still logs it (or the test's runs)

    return call_exception_handler


def _describe_loop_error(loop: asyncio.AbstractEventLoop, thread: str,
                         context: dict[str, Any]) -> str:
    lines = [f"{context.get('message', '(no message)')}",
             f"  on {type(loop).__module__}.{type(loop).__qualname__} in thread {thread!r}"]
    for key, value in context.items():
        if key not in ("message", "exception"):
            lines.append(f"  {key}: {value!r}")
    exc = context.get("exception")
    if isinstance(exc, BaseException):
        lines.append(f"  exception: {exc!r}")
        lines.extend("    " + line for chunk in traceback.format_exception(exc)
                     for line in chunk.rstrip("\n").split("\n"))
    return "\n".join(lines)


def _process_wide(thread: threading.Thread) -> bool:
    """Threads a library keeps for the whole process by design, started by whichever test
    needs them first: pyzmq's garbage collector, which frees zero-copy frames (started by
    the first large ``copy=False`` send)."""
    zmq_garbage = sys.modules.get("zmq.utils.garbage")
    return zmq_garbage is not None and isinstance(thread, zmq_garbage.GarbageCollectorThread)


def _describe_thread(thread: threading.Thread) -> str:
    target = getattr(thread, "_target", None)  # private, but the one clue to who started it
    head = f"{thread.name!r} (daemon={thread.daemon}, target={target!r})"
    frame = sys._current_frames().get(thread.ident or -1)
    if frame is None:
        return head
    stack = "".join(traceback.format_stack(frame)[-6:])
    return head + ", now at:\n" + "\n".join("    " + line for line in stack.splitlines())


@pytest.fixture(autouse=True)
def _loop_and_thread_guard(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fails the test if any event loop's exception handler fired during it (its own loop,
    a `Node`'s loop thread, uvloop or asyncio), or if a thread it started is still alive a
    short grace after it (threads alive before it are not its business).

    Autouse fixtures are set up first, so this is torn down after pytest-asyncio has closed
    the test's loop (cancelled tasks, shut its default executor down) and after the test's
    other fixtures closed their nodes: what those do is checked too."""
    errors: list[tuple[asyncio.AbstractEventLoop, str, dict[str, Any]]] = []

    def record(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        errors.append((loop, threading.current_thread().name, context))

    before = set(threading.enumerate())
    with pytest.MonkeyPatch.context() as patch:  # our own: undone here, not with the test's
        for cls in _loop_classes():
            patch.setattr(cls, "call_exception_handler",
                          _hooked(cls.call_exception_handler, record))
        yield
    deadline = time.monotonic() + _THREAD_GRACE
    outlived = []
    for thread in threading.enumerate():
        if thread in before or thread is threading.current_thread() or _process_wide(thread):
            continue
        thread.join(max(deadline - time.monotonic(), 0.0))
        if thread.is_alive():
            outlived.append(thread)
    problems = []
    if errors and request.node.get_closest_marker("loop_errors_expected") is None:
        shown = [f"[{n}] " + _describe_loop_error(*error)
                 for n, error in enumerate(errors[:_LOOP_ERRORS_SHOWN], 1)]
        rest = Counter(f"{context.get('message')}: {context.get('exception')!r}"
                       for _loop, _thread, context in errors[_LOOP_ERRORS_SHOWN:])
        shown.extend(f"... and {count} more: {what}" for what, count in rest.most_common())
        problems.append(
            f"an event loop's exception handler fired {len(errors)} time(s) during this test "
            "(an exception in a callback; mark the test loop_errors_expected if that is "
            "what it checks):\n" + "\n".join(shown))
    if outlived:
        problems.append(
            f"{len(outlived)} thread(s) started during this test still alive "
            f"{_THREAD_GRACE} s after it:\n"
            + "\n".join(f"  - {_describe_thread(thread)}" for thread in outlived))
    if problems:
        pytest.fail("\n\n".join(problems), pytrace=False)


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
