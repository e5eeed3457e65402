"""The conftest leak guards, tested from outside: a child pytest run (loopback only, no
network at all) whose tests break the rules on purpose, and what the guard says about each."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

_CHILD_TESTS = '''
import asyncio
import threading

import pytest

import mesh._loop


def _boom() -> None:
    raise ValueError("boom in a callback")


async def test_callback_raises_on_the_test_loop() -> None:
    asyncio.get_running_loop().call_soon(_boom)
    await asyncio.sleep(0)
    await asyncio.sleep(0)


async def test_callback_raises_eight_times() -> None:
    for _ in range(8):
        asyncio.get_running_loop().call_soon(_boom)
    await asyncio.sleep(0)
    await asyncio.sleep(0)


def test_callback_raises_on_a_private_loop_thread() -> None:
    """What a blocking `mesh.Node` does: its own loop (uvloop here) in a thread."""
    loop = mesh._loop.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="private-loop")
    thread.start()
    try:
        loop.call_soon_threadsafe(_boom)
        done = threading.Event()
        loop.call_soon_threadsafe(done.set)
        assert done.wait(5)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


@pytest.mark.loop_errors_expected
async def test_expected_callback_error_passes() -> None:
    asyncio.get_running_loop().call_soon(_boom)
    await asyncio.sleep(0)
    await asyncio.sleep(0)


STOP = threading.Event()


def test_thread_outlives_the_test() -> None:
    threading.Thread(target=STOP.wait, name="left-behind", daemon=True).start()


def test_thread_that_ends_within_the_grace_is_fine() -> None:
    STOP.set()  # the one left behind above ends too: the next test must not be blamed
    threading.Thread(target=STOP.wait, args=(0.2,), name="ends-soon", daemon=True).start()
'''


@pytest.fixture(scope="module")
def child_report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[str, str]]:
    """Runs the child tests once; their outcome and message by test name."""
    pytest.importorskip("uvloop")
    tmp = tmp_path_factory.mktemp("guards")
    (tmp / "conftest.py").write_text(
        "from tests.conftest import _loop_and_thread_guard  # noqa: F401\n")
    (tmp / "test_child.py").write_text(textwrap.dedent(_CHILD_TESTS))
    (tmp / "pytest.ini").write_text(textwrap.dedent("""\
        [pytest]
        asyncio_mode = auto
        asyncio_default_fixture_loop_scope = function
        markers =
            loop_errors_expected: see tests/conftest.py
        """))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ZEROMESH_INTERFACES": "127.0.0.1"}
    env.pop("ZEROMESH_LOOP", None)
    xml = tmp / "report.xml"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-c",
         str(tmp / "pytest.ini"), "--rootdir", str(tmp), f"--junitxml={xml}", str(tmp)],
        cwd=tmp, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert xml.exists(), proc.stdout + proc.stderr
    out: dict[str, tuple[str, str]] = {}
    for case in ET.parse(xml).getroot().iter("testcase"):
        outcome, text = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome, text = child.tag, (child.get("message") or "") + (child.text or "")
        out[case.get("name", "")] = (outcome, text)
    return out


def test_a_callback_exception_on_the_test_loop_fails_the_test(
        child_report: dict[str, tuple[str, str]]) -> None:
    """An exception in a loop callback (what a socket reader is) fails the test, named with
    its context: the message, the handle and the traceback."""
    outcome, text = child_report["test_callback_raises_on_the_test_loop"]
    assert outcome == "error", (outcome, text)
    assert "exception handler fired 1 time(s)" in text, text
    assert "Exception in callback _boom()" in text, text
    assert "ValueError('boom in a callback')" in text, text
    assert "in _boom" in text, text  # the traceback


def test_many_callback_exceptions_are_shown_in_part_and_counted(
        child_report: dict[str, tuple[str, str]]) -> None:
    """The first few are shown in full, the rest counted by message and exception."""
    outcome, text = child_report["test_callback_raises_eight_times"]
    assert outcome == "error", (outcome, text)
    assert "fired 8 time(s)" in text, text
    assert "[5] " in text, text
    assert "[6] " not in text, text
    assert "... and 3 more: Exception in callback _boom()" in text, text


def test_a_callback_exception_on_a_uvloop_thread_fails_the_test(
        child_report: dict[str, tuple[str, str]]) -> None:
    """The loop a blocking Node runs in its own thread (uvloop, from mesh._loop) is hooked too."""
    outcome, text = child_report["test_callback_raises_on_a_private_loop_thread"]
    assert outcome == "error", (outcome, text)
    assert "on uvloop.Loop in thread 'private-loop'" in text, text
    assert "ValueError('boom in a callback')" in text, text


def test_the_marker_lets_an_expected_callback_exception_pass(
        child_report: dict[str, tuple[str, str]]) -> None:
    """``@pytest.mark.loop_errors_expected`` is the explicit opt-out."""
    assert child_report["test_expected_callback_error_passes"] == ("passed", "")


def test_a_thread_outliving_its_test_fails_it_and_only_it(
        child_report: dict[str, tuple[str, str]]) -> None:
    """A thread still alive after the grace fails the test that started it, named with its
    stack; a thread that ends within the grace does not, nor is the next test blamed."""
    outcome, text = child_report["test_thread_outlives_the_test"]
    assert outcome == "error", (outcome, text)
    assert "1 thread(s) started during this test still alive" in text, text
    assert "'left-behind' (daemon=True" in text, text
    assert "in wait" in text, text  # where it is stuck
    assert child_report["test_thread_that_ends_within_the_grace_is_fine"] == ("passed", "")
