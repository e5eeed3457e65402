"""The chaos test: reliable traffic survives SIGKILLs of publishers, subscribers and workers.

Two publishers each send 2,500 reliable publishes (to a durable subscription)
and 2,500 reliable pushes (to three workers): 10,000 messages. Meanwhile a
driver SIGKILLs a random process 10 times and restarts it on the same data
dir. At the end every message must have arrived, with its content; the
duplicates (allowed by at-least-once) are counted and reported.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest

ROLE = str(Path(__file__).with_name("_chaos_role.py"))
PER_PUBLISHER = 2_500


class Proc:
    def __init__(self, role: str, name: str, mesh: str, base: Path, *extra: str) -> None:
        self.args = [sys.executable, ROLE, role, name, mesh, str(base / name),
                     str(base / f"{name}.out"), *extra]
        self.name = name
        self.out = base / f"{name}.out"
        self.err = base / f"{name}.err"
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> None:
        env = {**os.environ, "ZEROMESH_INTERFACES": "127.0.0.1", "PYTHONUNBUFFERED": "1",
               "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
        with self.err.open("a") as err:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen(self.args, env=env, stdout=subprocess.PIPE,
                                         stderr=err, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # bounded: the test's timeout covers a hang
        assert line.strip() == "ready", (f"{self.name} did not start: {line!r}; its stderr "
                                         f"ends:\n{self.err.read_text()[-3000:]}")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        if self.proc is not None:
            self.proc.wait(10)
            if self.proc.stdout is not None:
                self.proc.stdout.close()

    def lines(self) -> list[str]:
        return self.out.read_text().split() if self.out.exists() else []


@pytest.mark.timeout(240)
def test_reliable_delivery_survives_ten_random_sigkills(tmp_path: Path) -> None:
    """10,000 reliable messages, 10 SIGKILLs and restarts: every message arrives."""
    mesh = "chaos" + uuid.uuid4().hex[:8]
    durable = Proc("durable", "sub", mesh, tmp_path)
    workers = [Proc("worker", f"w{i}", mesh, tmp_path) for i in range(3)]
    publishers = [Proc("publisher", f"p{i}", mesh, tmp_path, str(PER_PUBLISHER)) for i in (1, 2)]
    everyone = [durable, *workers, *publishers]
    expected = {f"p{i}-{n}" for i in (1, 2) for n in range(PER_PUBLISHER)}
    rng = random.Random(4)
    kills: Counter[str] = Counter()
    try:
        for proc in [durable, *workers]:
            proc.start()
        for proc in publishers:
            proc.start()
        for _ in range(10):
            time.sleep(rng.uniform(0.3, 0.8))  # chaos pacing: when the next kill lands
            victim = rng.choice(everyone)
            victim.kill()
            kills[victim.name] += 1
            victim.start()
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline:
            got_sub = set(durable.lines())
            got_work = {line for w in workers for line in w.lines()}
            if expected <= got_sub and expected <= got_work:
                break
            time.sleep(0.5)  # polling files written by other processes, under a deadline
        sub_lines = durable.lines()
        work_lines = [line for w in workers for line in w.lines()]
    finally:
        for proc in everyone:
            proc.kill()
    missing_sub = expected - set(sub_lines)
    missing_work = expected - set(work_lines)
    dup_sub = len(sub_lines) - len(set(sub_lines))
    dup_work = len(work_lines) - len(set(work_lines))
    print(f"\nchaos: kills {dict(kills)}; durable got {len(set(sub_lines))}/{len(expected)} "
          f"(+{dup_sub} duplicates); workers got {len(set(work_lines))}/{len(expected)} "
          f"(+{dup_work} duplicates); sent {2 * len(expected)}, lost "
          f"{len(missing_sub) + len(missing_work)}")
    assert not missing_sub, f"durable subscriber never got {sorted(missing_sub)[:10]}..."
    assert not missing_work, f"workers never got {sorted(missing_work)[:10]}..."
    assert set(sub_lines) <= expected
    assert set(work_lines) <= expected
