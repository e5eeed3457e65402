"""The examples and the pub/sub benchmark run as users run them: as programs, on loopback.

Each runs in a subprocess with ``ZEROMESH_INTERFACES=127.0.0.1`` and a
timeout, must exit 0 and print what its docstring promises.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
BENCHMARKS = ROOT / "benchmarks"


def run(script: Path, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "ZEROMESH_INTERFACES": "127.0.0.1", "PYTHONUNBUFFERED": "1"}
    env.pop("ZEROMESH_PEERS", None)
    proc = subprocess.run([sys.executable, str(script), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)
    assert proc.returncode == 0, f"{script.name} exited {proc.returncode}:\n{proc.stderr}"
    return proc


@pytest.mark.parametrize("name", ["pubsub_async.py", "pubsub_sync.py"])
def test_pubsub_example_delivers_matching_topics_only(name: str) -> None:
    """The wildcard subscriber gets every temperature and not the humidity reading."""
    out = run(EXAMPLES / name).stdout
    assert "sensors.kitchen.temp = 21.5 (from sensor)" in out
    assert "sensors.attic.temp = 27.25 (from sensor)" in out
    assert "received 3 temperatures" in out
    assert "humidity" not in out


def test_peer_events_example_reports_join_then_leave() -> None:
    """The watcher sees the visitor join, then leave, in that order."""
    out = run(EXAMPLES / "peer_events.py").stdout
    lines = out.splitlines()
    joined = next(i for i, line in enumerate(lines) if line.startswith("joined: visitor"))
    left = next(i for i, line in enumerate(lines) if line.startswith("left: visitor"))
    assert joined < left
    assert lines[-1] == "peers now: none"


def test_worker_pool_example_splits_by_speed_and_does_each_job_once() -> None:
    """The two fast workers share the jobs about equally, the slow one gets far fewer, none twice."""
    started = time.monotonic()
    out = run(EXAMPLES / "worker_pool.py", timeout=20).stdout
    assert time.monotonic() - started < 10, out
    assert "all 300 jobs done, each exactly once" in out
    split = {m["name"]: int(m["jobs"]) for m in re.finditer(
        r"^\s+(?P<name>\S+)\s+\d+ ms/job:\s+(?P<jobs>\d+) jobs", out, re.MULTILINE)}
    assert set(split) == {"fast-1", "fast-2", "slow"}, out
    assert sum(split.values()) == 300, out
    assert split["slow"] < min(split["fast-1"], split["fast-2"]) / 2, out


def test_service_failover_example_answers_every_request_across_a_server_stop() -> None:
    """Both servers answer before the stop, only "b" after it, and no request fails."""
    out = run(EXAMPLES / "service_failover.py", timeout=20).stdout
    lines = out.splitlines()
    stop = lines.index("server a stopped")
    assert any(line.endswith("(from a)") for line in lines[:stop])
    assert all(not line.endswith("(from a)") for line in lines[stop:])
    assert re.fullmatch(r"200 requests, 200 replies: a=\d+, b=\d+", lines[-1]), lines[-1]


def test_iot_sensor_example_loses_nothing_across_a_consumer_outage() -> None:
    """Readings published during the dashboard's 2 s outage all arrive after it restarts."""
    out = run(EXAMPLES / "iot_sensor.py", "--outage", "2", timeout=40).stdout
    lines = out.splitlines()
    stop = next(i for i, line in enumerate(lines) if line.startswith("dashboard stopped"))
    back = next(i for i, line in enumerate(lines) if line.startswith("dashboard restarted"))
    assert stop < back, out
    waiting = re.search(r"; (\d+) readings waiting", lines[back])
    assert waiting is not None and int(waiting.group(1)) > 0, out
    summary = re.search(r"sensor sent (\d+) readings, dashboard got (\d+)", out)
    assert summary is not None and summary.group(1) == summary.group(2), out
    assert int(summary.group(1)) >= 60, out  # 4 s of readings, one every 50 ms
    assert lines[-1] == "nothing lost: every reading arrived intact", out


def test_every_example_is_tested() -> None:
    """A new example needs a test here."""
    assert {p.name for p in EXAMPLES.glob("*.py")} == {
        "pubsub_async.py", "pubsub_sync.py", "peer_events.py", "worker_pool.py",
        "service_failover.py", "iot_sensor.py"}


@pytest.mark.timeout(120)
def test_pubsub_benchmark_quick_run_is_lossless() -> None:
    """``benchmarks/pubsub.py --quick`` completes with nothing lost, raw and zeromesh."""
    out = run(BENCHMARKS / "pubsub.py", "--quick", "--json", "--timeout", "40",
              timeout=100).stdout
    report = json.loads(out)
    assert [r["size"] for r in report["results"]] == [64, 1024]
    for row in report["results"]:
        for side in ("raw", "zeromesh"):
            result = row[side]
            assert result["lost"] == 0, (side, row)
            assert result["received"] == row["count"], (side, row)
            assert result["corrupt"] == 0, (side, row)
            assert result["error"] == "", (side, row)
            assert result["msgs_per_s"] > 0, (side, row)
