"""`python -m mesh ...` as a child process on 127.0.0.1, read line by line with deadlines."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import IO


def child_env(mesh: str) -> dict[str, str]:
    """No stray ZEROMESH_* settings; loopback only; an agent's HTTP API on a free port."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ZEROMESH_")}
    env.update(ZEROMESH_INTERFACES="127.0.0.1", ZEROMESH_MESH=mesh, ZEROMESH_HTTP="127.0.0.1:0",
               PYTHONUNBUFFERED="1")
    return env


class StderrLog:
    """A child's stderr, read as it comes (so the pipe never fills and the child never
    blocks on a log line), kept and waitable."""

    def __init__(self, stream: IO[str]) -> None:
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self._reader.start()

    def _pump(self, stream: IO[str]) -> None:
        for line in stream:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()

    def wait_for(self, needle: str, timeout: float) -> str:
        """The first line containing `needle` (waits for it at most `timeout` seconds)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.lines:
                    if needle in line:
                        return line
                left = deadline - time.monotonic()
                assert left > 0, f"{needle!r} not on the child's stderr:\n" + "\n".join(
                    self.lines[-40:])
                self._cond.wait(left)

    def whole(self, timeout: float = 10.0) -> str:
        """Everything, once the stream has ended (the child exited)."""
        self._reader.join(timeout)
        with self._cond:
            return "".join(line + "\n" for line in self.lines)


class Cli:
    """A CLI child; every process started here is killed in `close()` (SIGKILL, our PID only)."""

    def __init__(self, args: Sequence[str], *, mesh: str, stdin: bool = False,
                 env: dict[str, str] | None = None) -> None:
        env = {**child_env(mesh), **(env or {})}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mesh", *args], env=env, text=True,
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self._lines: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self.stdout: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()
        assert self.proc.stderr is not None
        self.log = StderrLog(self.proc.stderr)
        """Its stderr, drained as it comes."""

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    def line(self, startswith: str = "", timeout: float = 10.0) -> str:
        """The next stdout line starting with `startswith` (others are kept in .stdout)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            try:
                line = self._lines.get(timeout=max(left, 0.001))
            except queue.Empty:
                raise AssertionError(f"no line {startswith!r} within {timeout} s; "
                                     f"got {self.stdout}") from None
            if line is None:
                raise AssertionError(f"exited before {startswith!r}; got {self.stdout}")
            self.stdout.append(line)
            if line.startswith(startswith):
                return line

    def all_lines(self, timeout: float = 10.0) -> list[str]:
        """Every stdout line, once the process has exited and its pipe is drained."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self._lines.get(timeout=max(deadline - time.monotonic(), 0.001))
            except queue.Empty:
                break
            if line is None:
                self._lines.put(None)
                return self.stdout
            self.stdout.append(line)
        raise AssertionError(f"stdout not closed within {timeout} s")

    def wait(self, timeout: float = 15.0) -> int:
        return self.proc.wait(timeout)

    def stderr(self) -> str:
        """All it wrote to stderr (call once it has exited)."""
        return self.log.whole()

    def term(self) -> None:
        self.proc.send_signal(signal.SIGTERM)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(5)
        self.log.whole(5)  # (its reader is done with the pipe before the pipe is closed)
        for stream in (self.proc.stdout, self.proc.stderr, self.proc.stdin):
            if stream is not None:
                stream.close()


def run(args: Sequence[str], *, mesh: str, input: str | None = None, timeout: float = 20.0,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the CLI to its end (`env` is added to `child_env`)."""
    return subprocess.run([sys.executable, "-m", "mesh", *args],
                          env={**child_env(mesh), **(env or {})}, text=True, input=input,
                          capture_output=True, timeout=timeout, check=False)
