"""The examples and the pub/sub benchmark run as users run them: as programs, on loopback.

Each runs in a subprocess with ``ZEROMESH_INTERFACES=127.0.0.1`` and a
timeout, must exit 0 and print what its docstring promises.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.uplink._binaries import require_binary

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
    (stop,) = [i for i, line in enumerate(lines) if line.startswith("server a stopped")]
    before = re.fullmatch(r"server a stopped \(answered so far: a=(\d+), b=(\d+)\)", lines[stop])
    assert before, lines[stop]
    assert int(before.group(1)) > 0, lines[stop]
    assert int(before.group(2)) > 0, lines[stop]
    assert all(not line.endswith("(from a)") for line in lines[stop + 1:])
    assert re.fullmatch(r"200 requests, 200 replies: a=\d+, b=\d+", lines[-1]), lines[-1]


def test_iot_sensor_example_loses_nothing_across_a_consumer_outage() -> None:
    """Readings published during the dashboard's 2 s outage all arrive after it restarts."""
    out = run(EXAMPLES / "iot_sensor.py", "--outage", "2", timeout=40).stdout
    lines = out.splitlines()
    stop = next(i for i, line in enumerate(lines) if line.startswith("dashboard stopped"))
    back = next(i for i, line in enumerate(lines) if line.startswith("dashboard restarted"))
    assert stop < back, out
    waiting = re.search(r"; (\d+) readings waiting", lines[back])
    assert waiting is not None, out
    assert int(waiting.group(1)) > 0, out
    summary = re.search(r"sensor sent (\d+) readings, dashboard got (\d+)", out)
    assert summary is not None, out
    assert summary.group(1) == summary.group(2), out
    assert int(summary.group(1)) >= 60, out  # 4 s of readings, one every 50 ms
    assert lines[-1] == "nothing lost: every reading arrived intact", out


def test_retained_dashboard_example_shows_every_current_reading_then_live() -> None:
    """A late dashboard gets each room's retained reading, then the live one."""
    out = run(EXAMPLES / "retained_dashboard.py", timeout=30).stdout
    lines = out.splitlines()
    assert lines[0] == ("last: home.attic.temp=27.25, home.garage.temp=9.0, "
                        "home.kitchen.temp=21.5"), out
    assert lines[1:4] == ["retained home.attic.temp 27.25 from sensor-attic",
                          "retained home.garage.temp 9.0 from sensor-garage",
                          "retained home.kitchen.temp 21.5 from sensor-kitchen"], out
    assert lines[4] == "live home.kitchen.temp 22.0 from sensor-kitchen", out


def test_every_example_is_tested() -> None:
    """A new example needs a test here."""
    assert {p.name for p in EXAMPLES.glob("*.py")} == {
        "pubsub_async.py", "pubsub_sync.py", "peer_events.py", "worker_pool.py",
        "service_failover.py", "iot_sensor.py", "webhook_consumer.py",
        "retained_dashboard.py", "uplink_hub.py"}


def test_uplink_example_crosses_both_hubs_both_ways() -> None:
    """A reading reaches a plain NATS client and mosquitto_sub with its trace context; a
    command from each hub reaches the mesh; both uplinks end connected with nothing waiting."""
    for name, package in (("nats-server", "nats-server"), ("mosquitto", "mosquitto"),
                          ("mosquitto_sub", "mosquitto-clients")):
        require_binary(name, package)
    out = run(EXAMPLES / "uplink_hub.py", timeout=60).stdout
    lines = out.splitlines()
    assert any(re.fullmatch(r"nats client: site1\.sensors\.kitchen\.temp 21\.5 traceparent="
                            r"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01 "
                            r"Nats-Msg-Id=\w+-\d+", line) for line in lines), out
    assert "mosquitto_sub: site1/sensors/kitchen/temp 21.5" in lines, out
    assert "mesh: cmd.kitchen.light on (origin site1)" in lines, out
    assert "mesh: cmd.kitchen.heater off (origin site1)" in lines, out
    finals = [line for line in lines if line.startswith("uplink ")]
    assert len(finals) == 2, out
    for line in finals:
        assert line.endswith(": connected, exported 1, imported 1, backlog 0"), out


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


def _running_with(marker: str) -> list[str]:
    """Command lines of this machine's processes with `marker` as an argument (or a URL in it)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:  # the process ended meanwhile
            continue
        if any(arg == marker.encode() or arg.startswith(f"{marker}/".encode()) for arg in args):
            found.append(" ".join(a.decode(errors="replace") for a in args))
    return found


@pytest.mark.timeout(90)
def test_curl_service_example_publishes_subscribes_and_requests_with_curl_only() -> None:
    """Three 202s, the three events back over SSE with their traceparent, an echo reply, a 503;
    and nothing it started is left running."""
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    env = {**os.environ, "ZEROMESH_INTERFACES": "127.0.0.1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("ZEROMESH_PEERS", None)
    proc = subprocess.run(["sh", str(EXAMPLES / "curl_service.sh")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=80, check=False)
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    lines = proc.stdout.splitlines()
    up = re.fullmatch(r"agent up: (http://127\.0\.0\.1:\d+) \(mesh (\S+)\)", lines[0])
    assert up is not None, proc.stdout
    trace = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    assert lines[1:] == [
        "subscribed to orders.>",
        "published: order 1 tea (202)",
        "published: order 2 coffee (202)",
        "published: order 3 cake (202)",
        f"event: orders.created = order 1 tea (traceparent {trace})",
        f"event: orders.created = order 2 coffee (traceparent {trace})",
        f"event: orders.created = order 3 cake (traceparent {trace})",
        "reply from demo.echo (200): ping from sh",
        "request to demo.nobody (503): no responders for 'demo.nobody'",
        "done"], proc.stdout
    assert _running_with(up.group(2)) == [], "the agent or the echo service outlived the script"
    assert _running_with(up.group(1)) == [], "the SSE curl outlived the script"


def test_curl_service_example_without_zeromesh_on_path_says_so_at_once() -> None:
    """Run without the venv's bin on PATH, it waited 10 s and blamed the agent ("no agent
    ready line within 10 s"), the agent's "not found" deleted with its temp dir."""
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed")
    path = os.pathsep.join(dict.fromkeys([str(Path(curl).parent), "/bin", "/usr/bin"]))
    if shutil.which("zeromesh", path=path) is not None:
        pytest.skip("zeromesh is installed system-wide")
    env = {**os.environ, "ZEROMESH_INTERFACES": "127.0.0.1", "PATH": path}
    proc = subprocess.run(["sh", str(EXAMPLES / "curl_service.sh")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=5, check=False)
    assert proc.returncode == 1
    assert proc.stderr == "curl_service: no zeromesh on PATH (activate the venv it is installed in)\n"


@pytest.mark.timeout(60)
def test_webhook_consumer_example_retries_the_refused_post_and_keeps_order() -> None:
    """The first POST gets 503, is retried, and the app ends with all three orders in order,
    each with its topic, id and traceparent; the agent counted 1 retry and 3 acks."""
    out = run(EXAMPLES / "webhook_consumer.py", timeout=50).stdout
    lines = out.splitlines()
    refused = lines.index("app: 503 for 'order 1: tea' (refused on purpose)")
    got = [m for m in (re.fullmatch(r"app: got '(.+)' topic=(\S+) id=(\S+) traceparent=(\S+)",
                                    line) for line in lines) if m]
    assert [m.group(1) for m in got] == ["order 1: tea", "order 2: coffee", "order 3: cake"], out
    assert refused < lines.index(got[0].group(0)), out
    for m in got:
        assert m.group(2) == "orders.created", out
        assert m.group(4) == "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", out
    assert len({m.group(3) for m in got}) == 3, out
    counters = dict(re.findall(r'^metrics: zeromesh_webhook_deliveries_total\{outcome="(\w+)",'
                               r'webhook="0:orders\.>"\} (\S+)$', out, re.MULTILINE))
    assert counters == {"retry": "1.0", "ok": "3.0"}, out
    assert lines[-1] == "app received 3 of 3 orders in 4 POSTs, in order", out


@pytest.mark.timeout(60)
def test_webhook_consumer_example_stopped_by_sigterm_leaves_no_agent_or_temp_dir(
        tmp_path: Path) -> None:
    """SIGTERM stops it as Ctrl-C does: exit 130, its agent stopped, its temp dir removed.
    It used to die at once, leaving the agent running (retrying POSTs to the app that had
    gone) and the temp dir with the config."""
    env = {**os.environ, "ZEROMESH_INTERFACES": "127.0.0.1", "PYTHONUNBUFFERED": "1",
           "TMPDIR": str(tmp_path)}
    env.pop("ZEROMESH_PEERS", None)
    proc = subprocess.Popen([sys.executable, str(EXAMPLES / "webhook_consumer.py")], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True, start_new_session=True)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # (ends at EOF: the example exits within its own deadline)
            if line.startswith("agent up:"):
                break
        [folder] = tmp_path.iterdir()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 130
        assert _running_with(str(folder / "agent.toml")) == [], "the agent outlived it"
        assert list(tmp_path.iterdir()) == []
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # (its group: the agent too, if it was left)
        proc.communicate()
