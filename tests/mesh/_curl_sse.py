"""``curl -N`` on an SSE URL as a child process, read event by event with deadlines."""

from __future__ import annotations

import json
import queue
import shutil
import subprocess
import threading
import time
from collections.abc import Sequence
from typing import Any

import pytest


class CurlEvents:
    """The events of one ``curl -sN URL``; `close` kills it (our PID only)."""

    def __init__(self, url: str, argv: Sequence[str] = ()) -> None:
        if shutil.which("curl") is None:
            pytest.skip("curl is not installed")
        self.proc = subprocess.Popen([*argv, "curl", "-sN", url], stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True)
        self._events: queue.SimpleQueue[tuple[str, Any, float] | None] = queue.SimpleQueue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        kind, data = "message", list[str]()
        for raw in self.proc.stdout:
            line = raw.rstrip("\n")
            if not line:
                if data:
                    self._events.put((kind, json.loads("\n".join(data)), time.monotonic()))
                kind, data = "message", []
            elif line.startswith("event:"):
                kind = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].strip())
        self._events.put(None)

    def next(self, kinds: Sequence[str], timeout: float) -> tuple[str, Any, float]:
        """The next event of one of `kinds` (others are skipped): (kind, data, arrival)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                got = self._events.get(timeout=max(deadline - time.monotonic(), 0.001))
            except queue.Empty:
                raise AssertionError(f"no {kinds} event within {timeout} s") from None
            if got is None:
                raise AssertionError(f"the stream ended before a {kinds} event")
            if got[0] in kinds:
                return got

    def stats_until(self, ok: Any, timeout: float) -> dict[str, Any]:
        """The first stats snapshot for which `ok(snapshot)` is true."""
        deadline = time.monotonic() + timeout
        while True:
            _, data, _ = self.next(["stats"], max(deadline - time.monotonic(), 0.001))
            if ok(data):
                return dict(data)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
