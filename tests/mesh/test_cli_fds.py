"""The CLI started with stdin, stdout or both closed (`cmd <&-`, `>&-`), as cron, init
scripts and careless wrappers start it: no abort, no traceback, the usual exit status."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Sequence

import pytest

from ._proc import child_env

pytestmark = pytest.mark.timeout(120)

_CLOSE = {"stdin": "<&-", "stdout": ">&-", "both": "<&- >&-"}


def _closed(closed: str, args: Sequence[str], mesh: str,
            env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """`python -m mesh ARGS` with the `closed` fds closed (by the shell, then exec)."""
    script = f'exec "$@" {_CLOSE[closed]}'
    return subprocess.Popen(["sh", "-c", script, "sh", sys.executable, "-m", "mesh", *args],
                            env={**child_env(mesh), **(env or {})}, text=True,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)


def _finish(proc: subprocess.Popen[str], timeout: float = 30) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=5)
    return proc.returncode, out, err


@pytest.mark.parametrize(("closed", "args", "status", "loop"), [
    ("stdin", ["sub", "t.a", "--timeout", "0.5"], 1, "uvloop"),
    ("stdout", ["sub", "t.a", "--timeout", "0.5"], 1, "uvloop"),
    ("stdout", ["pub", "t.a", "x"], 0, "uvloop"),
    ("stdin", ["pub", "t.a"], 0, "uvloop"),  # no DATA: no stdin is no lines
    ("stdin", ["pub", "t.a"], 0, "asyncio"),
    ("stdin", ["push", "q.a"], 0, "asyncio"),
    ("both", ["push", "q.a", "x", "--timeout", "0.5"], 1, "uvloop"),  # (no worker: "no responders")
])
def test_a_command_with_closed_std_fds_exits_as_usual(
        closed: str, args: list[str], status: int, loop: str, mesh_name: str) -> None:
    """Closed fds are /dev/null to the command (libuv aborted when it closed a socket that
    had taken fd 0 or 1; without DATA, `pub`/`push` read from a None sys.stdin)."""
    code, _, err = _finish(_closed(closed, args, mesh_name, {"ZEROMESH_LOOP": loop}))
    assert "Traceback" not in err, err
    assert "Assertion" not in err, err
    assert code == status, err


def test_an_agent_with_stdin_closed_stops_cleanly(mesh_name: str) -> None:
    """An agent started with `<&-` runs, and exits 0 on SIGTERM (it aborted on the way out)."""
    agent = _closed("stdin", ["agent", "--name", "nostdin"], mesh_name)
    try:
        assert agent.stdout is not None
        ready = agent.stdout.readline()  # (bounded by the test's timeout)
        assert ready.startswith("ready name=nostdin"), ready
        agent.send_signal(signal.SIGTERM)
    finally:
        code, out, err = _finish(agent)
    assert "Traceback" not in err, err
    assert "Assertion" not in err, err
    assert (code, out) == (0, "stopped\n"), err
