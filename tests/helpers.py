"""Test helpers: wait for a condition instead of sleeping; touch files off the event loop.

`eventually` polls a predicate until it returns something truthy and returns
that value, or raises AssertionError at the deadline (with the last value or
exception in the message). `aeventually` is the asyncio twin; its predicate may
be a plain function or return an awaitable.

`quick_benchmark` runs a benchmark script as users run it (``--quick --json``,
loopback only) and returns its report.

`files`, `file_bytes` and `cut_tail` list, measure and damage files (spool segments) from async tests,
in a worker thread, so the loop under test never blocks on the disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, overload

T = TypeVar("T")


def _describe(predicate: object, message: str | None) -> str:
    if message:
        return message
    return getattr(predicate, "__qualname__", None) or repr(predicate)


def eventually(
    predicate: Callable[[], T],
    timeout: float = 5.0,
    interval: float = 0.01,
    *,
    message: str | None = None,
) -> T:
    """Polls ``predicate`` until truthy; returns its value.

    Raises:
        AssertionError: If still falsy (or raising) after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        error: BaseException | None = None
        value: T | None = None
        try:
            value = predicate()
        except Exception as exc:  # keep polling; report the last one
            error = exc
        if error is None and value:
            return value
        if time.monotonic() >= deadline:
            last = f"raised {error!r}" if error is not None else f"returned {value!r}"
            raise AssertionError(
                f"not true within {timeout} s: {_describe(predicate, message)} (last {last})"
            ) from error
        time.sleep(interval)


# The deadline is the helper's own (hence the ASYNC109 exceptions): at it, the failure names
# the predicate and its last result, which a caller's asyncio.timeout() would cut off.
@overload
async def aeventually(
    predicate: Callable[[], Awaitable[T]],
    timeout: float = ...,
    interval: float = ...,
    *,
    message: str | None = ...,
) -> T: ...


@overload
async def aeventually(
    predicate: Callable[[], T],
    timeout: float = ...,
    interval: float = ...,
    *,
    message: str | None = ...,
) -> T: ...


async def aeventually(
    predicate: Callable[[], T | Awaitable[T]],
    timeout: float = 5.0,
    interval: float = 0.01,
    *,
    message: str | None = None,
) -> T:
    """Async `eventually`: the predicate may be sync or async.

    Raises:
        AssertionError: If still falsy (or raising) after ``timeout`` seconds.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        error: BaseException | None = None
        value: T | None = None
        try:
            result = predicate()
            if inspect.isawaitable(result):
                left = max(deadline - loop.time(), interval)
                async with asyncio.timeout(left):
                    result = await result
            value = result
        except Exception as exc:  # incl. TimeoutError from a slow predicate
            error = exc
        if error is None and value:
            return value
        if loop.time() >= deadline:
            last = f"raised {error!r}" if error is not None else f"returned {value!r}"
            raise AssertionError(
                f"not true within {timeout} s: {_describe(predicate, message)} (last {last})"
            ) from error
        await asyncio.sleep(interval)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for a process told which port to bind)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def files(directory: Path, pattern: str) -> list[Path]:
    """The files in `directory` matching the glob `pattern`, sorted."""
    return await asyncio.to_thread(lambda: sorted(directory.glob(pattern)))


async def file_bytes(directory: Path, pattern: str) -> int:
    """Bytes of the files in `directory` matching `pattern`; one deleted while they are
    measured (a spool reclaiming a segment) counts as gone."""
    def measure() -> int:
        total = 0
        for path in directory.glob(pattern):
            with contextlib.suppress(FileNotFoundError):
                total += path.stat().st_size
        return total
    return await asyncio.to_thread(measure)


async def cut_tail(path: Path, nbytes: int) -> None:
    """Cut the last `nbytes` off the file at `path`, as a write torn by a crash would."""
    def cut() -> None:
        os.truncate(path, path.stat().st_size - nbytes)
    await asyncio.to_thread(cut)


def quick_benchmark(script: Path, timeout: float = 140.0) -> dict[str, Any]:
    """``script --quick --json`` in a subprocess on 127.0.0.1; its JSON report (asserts
    a zero exit, showing the output otherwise)."""
    env = {**os.environ, "ZEROMESH_INTERFACES": "127.0.0.1", "PYTHONUNBUFFERED": "1"}
    env.pop("ZEROMESH_PEERS", None)
    proc = subprocess.run([sys.executable, str(script), "--quick", "--json", "--timeout", "40"],
                          cwd=script.parent.parent, env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    report: dict[str, Any] = json.loads(proc.stdout)
    return report


async def until_changed(changed: asyncio.Event, condition: Callable[[], bool],
                        timeout: float = 15.0) -> None:
    """Until `condition()` holds, checked each time `changed` is set (by a test app that
    records what it receives); at most `timeout` seconds."""
    async with asyncio.timeout(timeout):
        while not condition():
            changed.clear()
            await changed.wait()


@dataclass(kw_only=True)
class CountsInFlight:
    """A test app's requests in flight (most at once too); `hold`, when set, keeps each
    request waiting, so a test can see how many the agent lets through at once."""

    hold: asyncio.Event | None = None
    in_flight: int = 0
    most_in_flight: int = 0
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    @contextlib.asynccontextmanager
    async def serving(self) -> AsyncIterator[None]:
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        self.changed.set()
        try:
            if self.hold is not None:
                await self.hold.wait()
            yield
        finally:
            self.in_flight -= 1
            self.changed.set()

    async def wait_until(self, condition: Callable[[], bool]) -> None:
        await until_changed(self.changed, condition)
