"""`zeromesh` CLI processes inside a namespace LAN, with time-stamped output.

Each `MeshProc` runs ``python -m mesh <args>`` on one `netns.Host` (so the
LAN's teardown SIGKILLs it whatever happens) and a reader thread stamps every
stdout line with `time.monotonic()` the moment it arrives. Tests wait for a
line matching a regex under a deadline and get its arrival time back, so
latencies are measured from the lines themselves, not from when the test
happened to look. Every wait is bounded; nothing here sleeps.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, TypeVar

from tests import netns

T = TypeVar("T")
_STRIP_ENV: Final = ("ZEROMESH_MESH", "ZEROMESH_NAME", "ZEROMESH_PEERS", "ZEROMESH_DATA_DIR")


def unique(prefix: str) -> str:
    """A fresh name for a mesh or a node: ``<prefix>-<12 hex>``."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def host_env(host: netns.Host) -> dict[str, str]:
    """This process's environment for a child on ``host``: its address, unbuffered, no stray mesh settings."""
    env = {k: v for k, v in os.environ.items() if k not in _STRIP_ENV}
    env["ZEROMESH_INTERFACES"] = host.ip
    env["PYTHONUNBUFFERED"] = "1"
    return env


def mesh_argv(command: str, host: netns.Host, mesh: str, *args: str) -> list[str]:
    """``python -m mesh COMMAND ARGS --mesh M --interface <host ip>``."""
    return [sys.executable, "-m", "mesh", command, *args, "--mesh", mesh, "--interface", host.ip]


@dataclass(frozen=True, slots=True)
class Line:
    index: int
    """Position in the process's stdout (0-based)."""
    at: float
    """`time.monotonic()` when the line was read."""
    text: str


class MeshProc:
    """One CLI process on a host; stdout lines are collected with arrival times."""

    def __init__(self, host: netns.Host, argv: Sequence[str], *, stdin: bool = False) -> None:
        self.host = host
        self.argv = list(argv)
        self.started = time.monotonic()
        self.proc: subprocess.Popen[str] = host.popen(
            self.argv,
            env=host_env(host),
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[Line] = []
        self.stderr_lines: list[str] = []
        self._cond = threading.Condition()
        self._eof = False
        self._threads = [
            threading.Thread(target=self._read_stdout, daemon=True),
            threading.Thread(target=self._read_stderr, daemon=True),
        ]
        for t in self._threads:
            t.start()

    # -- readers ----------------------------------------------------------------

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            now = time.monotonic()
            with self._cond:
                self.lines.append(Line(len(self.lines), now, raw.rstrip("\n")))
                self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            with self._cond:
                self.stderr_lines.append(raw.rstrip("\n"))
                self._cond.notify_all()

    # -- waiting ----------------------------------------------------------------

    def wait_line(self, pattern: str, timeout: float, *, start: int = 0) -> Line:
        """The first stdout line at or after index ``start`` matching regex ``pattern``.

        Raises:
            AssertionError: none within ``timeout`` s (or the output ended first),
                with the output so far.
        """
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            seen = start
            while True:
                for line in self.lines[seen:]:
                    if regex.search(line.text):
                        return line
                seen = max(seen, len(self.lines))
                left = deadline - time.monotonic()
                if self._eof or left <= 0:
                    why = "output ended" if self._eof else f"not within {timeout} s"
                    raise AssertionError(f"{pattern!r}: {why}\n{self.describe()}")
                self._cond.wait(left)

    def wait_for(self, check: Callable[[list[Line]], T | None], timeout: float) -> T | None:
        """The first result of ``check(lines)`` that is not None, tried on the lines so far
        and again as each arrives; None if ``timeout`` s passed or the output ended first."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = check(self.lines)
                left = deadline - time.monotonic()
                if found is not None or self._eof or left <= 0:
                    return found
                self._cond.wait(left)

    def wait_stderr(self, pattern: str, timeout: float) -> str:
        """The first stderr line matching regex ``pattern`` (e.g. a log line)."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.stderr_lines:
                    if regex.search(line):
                        return line
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no stderr line {pattern!r} within {timeout} s\n"
                                         + self.describe())
                self._cond.wait(left)

    def matching(self, pattern: str, *, start: int = 0) -> list[Line]:
        """Every stdout line so far (from index ``start``) matching regex ``pattern``."""
        regex = re.compile(pattern)
        with self._cond:
            return [ln for ln in self.lines[start:] if regex.search(ln.text)]

    def texts(self) -> list[str]:
        with self._cond:
            return [ln.text for ln in self.lines]

    def describe(self) -> str:
        with self._cond:
            out = "\n".join(f"  {ln.at - self.started:7.3f} {ln.text}" for ln in self.lines)
            err = "\n".join(f"  {s}" for s in self.stderr_lines[-30:])
        return (f"{self.host.name}: {' '.join(self.argv[2:])} (rc={self.proc.poll()})\n"
                f" stdout:\n{out}\n stderr:\n{err}")

    # -- ending -----------------------------------------------------------------

    def send_signal(self, sig: signal.Signals) -> float:
        """Sends ``sig`` to the process itself; returns the monotonic time just before."""
        at = time.monotonic()
        self.proc.send_signal(sig)
        return at

    def wait_exit(self, timeout: float) -> int:
        """The exit status, after the output has been read to the end.

        Raises:
            AssertionError: still running after ``timeout`` s.
        """
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"still running after {timeout} s\n{self.describe()}") from None
        for t in self._threads:
            t.join(timeout=5)
        return rc

    def write(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text)
        self.proc.stdin.flush()

    def close_stdin(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()


class Agent(MeshProc):
    """``zeromesh agent --name N`` on a host; call `wait_ready` before using its fields."""

    def __init__(self, host: netns.Host, mesh: str, name: str | None = None, *,
                 extra: Sequence[str] = ()) -> None:
        self.name = name or unique(host.name)
        self.mesh = mesh
        self.ready: Line | None = None
        self.id = self.ctl = self.pub = ""
        super().__init__(host, mesh_argv("agent", host, mesh, "--name", self.name, *extra))

    def wait_ready(self, timeout: float = 15.0) -> Agent:
        """Waits for the ``ready`` line and parses its fields; returns self."""
        self.ready = self.wait_line(r"^ready ", timeout)
        fields = dict(part.split("=", 1) for part in self.ready.text.split()[1:])
        assert fields["name"] == self.name, self.ready.text
        assert fields["mesh"] == self.mesh, self.ready.text
        self.id, self.ctl, self.pub = fields["id"], fields["ctl"], fields["pub"]
        return self

    def wait_event(self, kind: str, peer: str, timeout: float, *, start: int = 0) -> Line:
        """The first ``<kind> name=<peer>`` line at or after index ``start``."""
        return self.wait_line(rf"^{kind} name={re.escape(peer)} id=[0-9a-f]+$", timeout,
                              start=start)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM; asserts a graceful exit: ``stopped`` last and status 0."""
        self.send_signal(signal.SIGTERM)
        rc = self.wait_exit(timeout)
        assert rc == 0, self.describe()
        assert self.texts()[-1] == "stopped", self.describe()


def start_agents(mesh: str, *hosts: netns.Host, extra: Sequence[str] = ()) -> list[Agent]:
    """One agent per host, started together (interpreter start-ups overlap), all ready."""
    agents = [Agent(host, mesh, extra=extra) for host in hosts]
    return [agent.wait_ready() for agent in agents]


def json_lines(text: str) -> list[Any]:
    """Every non-empty line of ``text`` parsed as JSON."""
    return [json.loads(line) for line in text.splitlines() if line.strip()]


class StdinPub(MeshProc):
    """``zeromesh pub TOPIC`` reading stdin, kept running until `finish`.

    A `pub` that exits right after publishing races its own goodbye against
    its data (see test_mesh_lan's test of that); tests whose subject is
    something else keep the publisher alive until the subscribers are done.
    """

    def __init__(self, host: netns.Host, mesh: str, topic: str, *args: str) -> None:
        super().__init__(host, mesh_argv("pub", host, mesh, topic, *args), stdin=True)

    def finish(self, timeout: float = 10.0) -> None:
        """Closes stdin (end of input) and asserts exit 0."""
        self.close_stdin()
        rc = self.wait_exit(timeout)
        assert rc == 0, self.describe()
