"""`zeromesh bench` end to end on 127.0.0.1: both ends as real processes, JSON, table, exit codes."""

from __future__ import annotations

import json
import os
import pathlib
import pty
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mesh._bench import _run
from mesh._bench._stats import Meter, summarize
from mesh.cli._main import build_parser
from tests.helpers import free_port

from ._proc import Cli, child_env, run

pytestmark = pytest.mark.timeout(45)


def _processes_naming(text: str) -> list[str]:
    """Command lines of running processes that contain `text` (Linux /proc)."""
    found = []
    for cmdline in pathlib.Path("/proc").glob("[0-9]*/cmdline"):
        try:
            line = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in line:
            found.append(line)
    return found


@pytest.mark.parametrize(("pattern", "extra"), [
    ("pubsub", []),
    ("pushpull", []),
    ("reqrep", ["--in-flight", "4"]),
    ("spool", ["--fsync", "off"]),
])
def test_each_pattern_runs_both_ends_and_reports_json(pattern: str, extra: list[str],
                                                      mesh_name: str) -> None:
    """A lossless local run: every message counted, plausible rates and ordered percentiles,
    and the child end is gone when the command returns."""
    result = run(["bench", pattern, "--count", "500", "--json", "--timeout", "30", *extra],
                 mesh=mesh_name, timeout=40)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["pattern"] == pattern
    assert report["count"] == 500
    assert report["size"] == 64
    assert report["received"] == 500
    assert report["drops"] == 0
    assert report["msgs_per_s"] > 0
    assert report["mb_per_s"] > 0
    lat = report["latency_us"]
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
    if pattern == "reqrep":
        assert report["in_flight"] == 4
    else:
        assert report["sent"] == 500
        assert report["send_msgs_per_s"] > 0
    if pattern == "spool":
        assert report["fsync"] == "off"
    if pathlib.Path("/proc/self").exists():
        assert _processes_naming(report["mesh"]) == []


def test_table_has_the_header_and_a_row_per_end(mesh_name: str) -> None:
    """Without --json: a title, the column header, the sender's and the receiver's rows."""
    result = run(["bench", "pushpull", "--count", "300", "--timeout", "30"], mesh=mesh_name,
                 timeout=40)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("zeromesh bench pushpull: 300 msgs x 64 B")
    assert lines[1].split() == ["msgs/s", "MB/s", "p50", "us", "p90", "us", "p99", "us",
                                "max", "us", "drops"]
    assert lines[2].split()[0] == "push"
    assert lines[3].split()[0] == "pull"
    assert lines[3].split()[-1] == "0"
    assert "\r" not in result.stderr
    assert "msgs/s" not in result.stderr  # no progress: not a TTY


@pytest.mark.parametrize(("args", "reason"), [
    (["bench", "pubsub", "--role", "req"], "--role"),
    (["bench", "pubsub", "--size", "4"], "--size"),
    (["bench", "pushpull", "--in-flight", "2"], "--in-flight"),
    (["bench", "pubsub", "--count", "0"], "must be >= 1"),
    (["bench", "reqrep", "--in-flight", "10001", "--count", "1"], "--in-flight: at most"),
    (["bench", "pubsub", "--size", "1048577", "--count", "1"], "max_message_size"),
    (["bench", "mqtt"], "invalid choice"),
])
def test_bad_usage_exits_2_with_one_line(args: list[str], reason: str, mesh_name: str) -> None:
    result = run(args, mesh=mesh_name)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert reason in lines[0], result.stderr
    assert result.stdout == ""


def test_a_lone_sub_end_exits_1_at_its_timeout(mesh_name: str) -> None:
    """--role sub with no publisher in its mesh: nothing received within --timeout."""
    result = run(["bench", "pubsub", "--role", "sub", "--timeout", "0.5"], mesh=mesh_name)
    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "timed out after 0.5 s" in lines[0], result.stderr


@pytest.mark.parametrize("pattern", ["pubsub", "spool"])
def test_one_end_each_meets_the_other_by_mesh_name(pattern: str, procs: list[Cli], mesh_name: str) -> None:
    """--role sub and --role pub as separate commands find each other (mDNS on 127.0.0.1);
    the subscriber learns the sent count from the publisher's end marker, and a reliable
    publisher exits 0 only once the durable acknowledged everything, the marker too."""
    sub = Cli(["bench", pattern, "--role", "sub", "--count", "400", "--json",
               "--timeout", "30"], mesh=mesh_name)
    procs.append(sub)
    pub = run(["bench", pattern, "--role", "pub", "--count", "400", "--json",
               "--timeout", "30"], mesh=mesh_name, timeout=40)
    assert pub.returncode == 0, pub.stderr
    sent = json.loads(pub.stdout)
    assert sent["role"] == "pub"
    assert sent["sent"] == 400
    assert sent["received"] is None
    assert sub.wait(30) == 0, sub.stderr()
    got = json.loads(sub.line("{"))
    assert got["role"] == "sub"
    assert got["received"] == 400
    assert got["drops"] == 0
    assert got["sent"] == 400
    assert got["send_msgs_per_s"] > 0


def test_a_failing_other_end_is_one_line_and_exit_1(mesh_name: str) -> None:
    """The child end cannot start (it inherits ZEROMESH_PORT, which this end has bound):
    its reason, relayed."""
    result = run(["bench", "pushpull", "--count", "3", "--timeout", "20"], mesh=mesh_name,
                 timeout=30, env={"ZEROMESH_PORT": str(free_port())})
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "the other end exited" in lines[0], result.stderr
    assert "cannot bind" in lines[0]


def test_a_secure_local_run_peers_its_child_by_key(tmp_path: Path, mesh_name: str) -> None:
    """With CURVE on and no mDNS, the child reaches us only with our key in its --peer URL."""
    keys = run(["keygen", "--out", str(tmp_path)], mesh=mesh_name)
    assert keys.returncode == 0, keys.stderr
    result = run(["bench", "pushpull", "--count", "300", "--json", "--timeout", "30",
                  "--secret-key", str(tmp_path / "node.key_secret"), "--allow", str(tmp_path)],
                 mesh=mesh_name, timeout=40)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["received"] == 300


def test_progress_is_one_rewritten_line_on_a_terminal(mesh_name: str) -> None:
    """stderr on a TTY: a line rewritten with \\r showing count and rate, cleared at the end."""
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen([sys.executable, "-m", "mesh", "bench", "pubsub", "--count",
                                 "20000", "--timeout", "30"], env=child_env(mesh_name),
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=slave)
        os.close(slave)
        out, _ = proc.communicate(timeout=40)
        seen = b""
        while True:  # the child is gone: what it wrote is in the pty's buffer
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: nothing more
                break
            if not chunk:
                break
            seen += chunk
    finally:
        os.close(master)
    assert proc.returncode == 0
    text = seen.decode(errors="replace")
    assert "\r" in text
    assert "bench pubsub sub:" in text
    assert "msgs/s" in text
    assert "\n" not in text.replace("\r\n", "")  # never a new line: always the same one
    assert b"msgs/s" in out


def test_a_run_cut_short_counts_no_unsent_message_as_dropped(
        capsys: pytest.CaptureFixture[str]) -> None:
    """Stopped (Ctrl-C, --timeout) before the sender's end marker: how many it sent is not
    known, so the messages it never sent are not reported as drops (they were: 99,734,006
    'drops' of 100,000,000 when all 265,994 sent had arrived)."""
    args = build_parser().parse_args(["bench", "pushpull", "--count", "100000000", "--json"])
    plan = _run._plan(args)
    meter = Meter()
    for _ in range(5):
        meter.record(time.time_ns(), 1000)
    assert _run._finish(args, plan, "pull", "m", meter, "stopped by a signal") == 1
    out, err = capsys.readouterr()
    report = json.loads(out)
    assert report["received"] == 5
    assert report["drops"] is None
    assert "5 of 100,000,000 received" in err


def test_a_receiver_is_never_faster_than_its_sender() -> None:
    """Messages that queued up and then came in a burst (the first one late) were counted
    over the burst alone: 'sub 2,040,432 msgs/s' under 'pub 640,568'. The rate is now over
    the sending time when that was longer."""
    meter = Meter()
    start = time.time_ns()
    for i in range(1000):  # all 1,000 within 10 ms...
        meter.record(start + i * 10_000, 1000)
    meter.sent, meter.send_ns = 1000, 50_000_000  # ...of what took 50 ms to send
    summary = summarize(meter, 64, expected=1000, receiver=True)
    assert summary.send_msgs_per_s == pytest.approx(20_000)
    assert summary.msgs_per_s == pytest.approx(20_000)
    assert summary.seconds == pytest.approx(0.05)
    meter.send_ns = 1_000_000  # sent in 1 ms, received over 10 ms: the receiver's own rate
    assert summarize(meter, 64, expected=1000, receiver=True).msgs_per_s == pytest.approx(
        999 / 0.00999)
