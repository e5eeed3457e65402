"""How a bench run is shown: a live progress line, then a table or one JSON object."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any, TextIO

from ._stats import Summary

_TICK = 0.2


class Progress:
    """One line on stderr, rewritten in place, only when stderr is a terminal.

    A log file or a pipe gets nothing: it would only be noise between the
    report and the errors a script looks for.
    """

    def __init__(self, label: str, count: Callable[[], int], total: int,
                 stream: TextIO | None = None) -> None:
        self.label = label
        self.count = count
        self.total = total
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty()
        self._task: asyncio.Task[None] | None = None

    def __enter__(self) -> Progress:
        if self.enabled:
            self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    def __exit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            self.stream.write("\r\x1b[K")
            self.stream.flush()

    async def _run(self) -> None:
        n, rate, last_t = self.count(), 0.0, time.monotonic()
        while True:  # at once (the other end may take a while to start), then every tick
            self.stream.write(f"\r\x1b[K{self.label}: {n:,} / {self.total:,} msgs  "
                              f"{rate:,.0f} msgs/s")
            self.stream.flush()
            await asyncio.sleep(_TICK)
            now_n, t = self.count(), time.monotonic()
            rate = (now_n - n) / (t - last_t)
            n, last_t = now_n, t

def to_json(info: dict[str, Any], summary: Summary) -> str:
    """One object; every key always present (null where this end cannot know it)."""
    figures = asdict(summary)
    figures["latency_us"] = figures.pop("latency")
    return json.dumps({**info, **figures})


def _num(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(title: str, rows: list[tuple[str, Summary]], note: str) -> str:
    """A `nats bench`-style table: one row per end that measured something."""
    head = (f"{'':<6}{'msgs/s':>12}{'MB/s':>9}{'p50 us':>10}{'p90 us':>10}{'p99 us':>10}"
            f"{'max us':>10}{'drops':>8}")
    lines = [title, head]
    for name, s in rows:
        lat = s.latency
        cells = [_num(s.msgs_per_s, ",.0f"), _num(s.mb_per_s, ".2f")]
        cells += [_num(getattr(lat, q), ",.0f") if lat else "-" for q in ("p50", "p90", "p99",
                                                                           "max")]
        cells.append(_num(s.drops, ","))
        lines.append(f"{name:<6}{cells[0]:>12}{cells[1]:>9}{cells[2]:>10}{cells[3]:>10}"
                     f"{cells[4]:>10}{cells[5]:>10}{cells[6]:>8}")
    if note:
        lines.append(note)
    return "\n".join(lines)
