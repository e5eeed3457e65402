"""Many nodes on a namespace LAN, seeded with one node: shared by test_scale_lan.py and
benchmarks/scale.py.

A `Group` is one ``benchmarks/_scale_node.py`` process on one host running one or more
nodes (mDNS off, seeds as static peers: usually the LAN's first node); the first node of
each binds `SEED_PORT`, so any of them can be named as a seed. Its stdout lines
(``NAME ready STAMP``, ``NAME joined|left|lost OTHER STAMP``) carry the node's own
`time.monotonic()` (CLOCK_MONOTONIC: one clock for every process and namespace of the
machine), so every figure here is read off the lines and none depends on how soon this
process, busy with 100 pipes on a loaded machine, got to read them: when each node's
view became full, when each observer saw a victim lost. Every wait is bounded.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Final

from tests import netns
from tests.system._meshproc import Line, MeshProc

ROLE: Final[str] = str(Path(__file__).resolve().parents[2] / "benchmarks" / "_scale_node.py")
SEED_PORT: Final[int] = 7390
"""The control port of each process's first node (every host is a namespace of its own,
so they never collide)."""
_CLK_TCK: Final[int] = os.sysconf("SC_CLK_TCK")


def node_names(count: int) -> list[str]:
    return [f"n{i:03d}" for i in range(count)]


def seed_url(host: netns.Host) -> str:
    """The control endpoint of the first node on ``host``."""
    return f"tcp://{host.ip}:{SEED_PORT}"


class Group(MeshProc):
    """One process on ``host`` running the nodes ``names``, each with static peers
    ``seeds`` (the first node leaves itself out), and with mDNS on if ``mdns``."""

    def __init__(self, host: netns.Host, mesh: str, names: Sequence[str], *,
                 seeds: Sequence[str], lost_after: float = 1.5, mdns: bool = False) -> None:
        self.names = list(names)
        argv = [ROLE, "--mesh", mesh, "--port", str(SEED_PORT), "--lost-after", str(lost_after)]
        if mdns:
            argv.append("--mdns")
        for url in seeds:
            argv += ["--seed", url]
        super().__init__(host, [sys.executable, *argv, *self.names], stdin=True)

    def wait_ready(self, timeout: float) -> float | None:
        """When the last of its nodes printed ``ready``; None if not within ``timeout``."""
        want = set(self.names)

        def check(lines: list[Line]) -> float | None:
            ready = [_stamp(parts) for parts in map(_words, lines)
                     if len(parts) == 3 and parts[1] == "ready" and parts[0] in want]
            return max(ready) if len(ready) == len(want) else None

        return self.wait_for(check, timeout)

    def full_views(self, everyone: set[str], timeout: float) -> dict[str, float | int]:
        """For each of its nodes: when its view first held everyone else (a time), or, if
        that did not happen within ``timeout``, how many others it held at the end."""
        result = self.wait_for(lambda lines: _full_at(lines, self.names, everyone, False),
                               timeout)
        if result is not None:
            return dict(result)
        return dict(_full_at(self.lines, self.names, everyone, True) or {})

    def lost_seen(self, victims: set[str], since: int, timeout: float
                  ) -> dict[str, float | None]:
        """For each of its nodes that is no victim: when it had seen every victim lost
        (lines from index ``since``), or None if not within ``timeout``."""
        observers = [n for n in self.names if n not in victims]

        def check(lines: list[Line]) -> dict[str, float | None] | None:
            seen = _lost_at(lines[since:], observers, victims)
            return seen if all(at is not None for at in seen.values()) else None

        found = self.wait_for(check, timeout)
        return found if found is not None else _lost_at(self.lines[since:], observers, victims)

    def ready_at(self) -> dict[str, float]:
        """When each of its nodes printed ``ready``."""
        return {parts[0]: _stamp(parts) for parts in map(_words, self.lines)
                if len(parts) == 3 and parts[1] == "ready"}

    def events(self, kind: str) -> list[tuple[str, str, float]]:
        """Every ``(node, other, arrival time)`` of ``NAME <kind> OTHER`` lines so far."""
        out = []
        for line in self.matching(rf"^\S+ {kind} \S+ \S+$"):
            node, _, other, _ = parts = line.text.split()
            out.append((node, other, _stamp(parts)))
        return out

    def figures(self, timeout: float = 10.0) -> dict[str, Any] | None:
        """Asks for and returns its ``figures`` line (``pid`` and ``nodes``); None if it
        did not come within ``timeout`` (a process too busy to answer)."""
        start = len(self.lines)
        try:
            self.write("figures\n")
        except OSError:  # it has exited
            return None
        line = self.wait_for(lambda lines: next(
            (ln for ln in lines[start:] if ln.text.startswith("figures ")), None), timeout)
        if line is None:
            return None
        found: dict[str, Any] = json.loads(line.text.split(" ", 1)[1])
        return found


def _full_at(lines: Iterable[Line], mine: Sequence[str], everyone: set[str],
             partial: bool) -> dict[str, float | int] | None:
    views: dict[str, set[str]] = {n: set() for n in mine}
    full: dict[str, float | int] = {}
    for parts in map(_words, lines):
        if len(parts) != 4 or parts[0] not in views:
            continue
        node, kind, other, _ = parts
        if kind == "joined":
            views[node].add(other)
        else:
            views[node].discard(other)
        if node not in full and views[node] >= everyone - {node}:
            full[node] = _stamp(parts)
    if len(full) == len(views):
        return full
    if not partial:
        return None
    return {n: full.get(n, len(views[n])) for n in mine}


def _lost_at(lines: Iterable[Line], observers: Sequence[str], victims: set[str]
             ) -> dict[str, float | None]:
    pending = {n: set(victims) for n in observers}
    seen: dict[str, float | None] = dict.fromkeys(observers)
    for parts in map(_words, lines):
        if len(parts) == 4 and parts[1] == "lost" and parts[0] in pending:
            pending[parts[0]].discard(parts[2])
            if not pending[parts[0]] and seen[parts[0]] is None:
                seen[parts[0]] = _stamp(parts)
    return seen


def _words(line: Line) -> list[str]:
    return line.text.split()


def _stamp(parts: list[str]) -> float:
    """The node's own time of the event (its line's last word)."""
    return float(parts[-1])


def established(host: netns.Host) -> int:
    """TCP connections established in ``host``'s namespace (both ends, if both are there)."""
    done = host.run(["ss", "-Htn", "state", "established"], 10)
    return len([line for line in done.stdout.splitlines() if line.strip()])


def cpu_seconds(pid: int) -> float:
    """User + system CPU of process ``pid`` so far (0.0 if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def rss_mb(pid: int) -> float:
    """Resident set size of process ``pid`` in MB (0.0 if it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0

