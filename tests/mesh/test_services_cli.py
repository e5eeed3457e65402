"""`zeromesh serve` and `zeromesh req` end to end: real processes, exit codes, output.

On 127.0.0.1, plus one run across the namespace LAN (server on h2, `req` on h1).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from mesh.errors import RemoteError
from tests import netns

from ._proc import Cli, run
from .conftest import FAST_ENV, MakeNode


def serve(procs: list[Cli], mesh: str, *args: str) -> Cli:
    proc = Cli(["serve", *args], mesh=mesh)
    procs.append(proc)
    proc.line("ready", timeout=15)
    return proc


@pytest.mark.parametrize(("args", "reason"), [
    (["serve", "svc"], "one of the arguments --echo --exec is required"),
    (["serve", "svc", "--echo", "--exec", "cat"], "not allowed with"),
    (["serve", "svc", "--exec", "no-such-command-zm"], "command not found"),
    (["serve", "svc", "--exec", "'unbalanced"], "quotation"),
    (["serve", "a..b", "--echo"], "empty segment"),
    (["req", "svc"], "the following arguments are required: data"),
    (["req", "svc", "x", "--retries", "-1"], "must be >= 0"),
    (["req", "svc", "x", "--timeout", "0"], "must be > 0"),
    (["req", "a.*", "x"], "service"),
])
def test_bad_usage_exits_2_with_one_line(args: list[str], reason: str, mesh_name: str) -> None:
    """Usage and config errors: exit 2, one line on stderr, no traceback."""
    result = run(args, mesh=mesh_name)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert reason in lines[0]


def test_serve_echo_answers_req_and_stops_on_sigterm(procs: list[Cli], mesh_name: str) -> None:
    """`req` prints the reply body; `serve` says ready, then stops gracefully with counts."""
    server = Cli(["serve", "svc.echo", "--echo", "--name", "echoer"], mesh=mesh_name)
    procs.append(server)
    ready = server.line("ready", timeout=15)
    assert re.match(rf"ready service=svc\.echo name=echoer id=[0-9a-f]{{32}} mesh={mesh_name} "
                    r"ctl=tcp://127\.0\.0\.1:\d+ rtr=tcp://127\.0\.0\.1:\d+$", ready)
    result = run(["req", "svc.echo", "hello mesh"], mesh=mesh_name)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "hello mesh\n"
    server.term()
    assert server.wait() == 0
    assert server.line("stopped") == "stopped handled=1 failed=0"


def test_serve_exec_pipes_the_body_through_a_command(procs: list[Cli], mesh_name: str) -> None:
    """`serve --exec 'tr a-z A-Z'`: the body goes to stdin, the reply is its stdout."""
    serve(procs, mesh_name, "svc.upper", "--exec", "tr a-z A-Z")
    result = run(["req", "svc.upper", "make me loud"], mesh=mesh_name)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "MAKE ME LOUD\n"


def test_a_failing_command_is_an_error_reply_with_its_stderr(procs: list[Cli], mesh_name: str) -> None:
    """Non-zero exit: `req` exits 1 with the command's stderr; the server keeps serving."""
    serve(procs, mesh_name, "svc.fail", "--exec",
          "sh -c 'cat >/dev/null; echo \"disk on fire\" >&2; exit 3'")
    result = run(["req", "svc.fail", "x"], mesh=mesh_name)
    assert result.returncode == 1
    assert result.stderr.strip() == "zeromesh req: service 'svc.fail' failed: disk on fire"
    assert run(["req", "svc.fail", "y"], mesh=mesh_name).returncode == 1  # still serving


@pytest.mark.timeout(90)
@pytest.mark.parametrize(("command", "reply", "error"), [
    ("echo fixed-reply", b"fixed-reply\n", None),
    ("false", None, "false exited with status 1"),
    ("sh -c 'echo disk on fire >&2; exit 3'", None, "disk on fire"),
])
async def test_a_command_that_does_not_read_its_stdin_answers_every_request(
        procs: list[Cli], make_node: MakeNode, mesh_name: str, command: str,
        reply: bytes | None, error: str | None) -> None:
    """A command may exit before reading the body (uvloop then raised on the write to its
    closed pipe, at random): the reply is its stdout or its failure, every time."""
    server = Cli(["serve", "svc.nostdin", "--exec", command], mesh=mesh_name, env=FAST_ENV)
    procs.append(server)
    server.line("ready", timeout=15)
    node = await make_node("asker")
    await node.wait_for_service("svc.nostdin", timeout=10)
    for i in range(30):  # small and pipe-filling bodies: the child may exit mid-write
        body = b"x" * (200_000 if i % 3 == 0 else 5)
        if error is None:
            got = await node.request("svc.nostdin", body, timeout=10, retries=0)
            assert got.data == reply, (i, got.data)
        else:
            with pytest.raises(RemoteError) as failed:
                await node.request("svc.nostdin", body, timeout=10, retries=0)
            assert failed.value.message == error, i


def test_a_command_past_its_exec_timeout_is_killed_and_reported(procs: list[Cli], mesh_name: str) -> None:
    """`--exec-timeout` bounds each run: the request fails, the server lives on."""
    serve(procs, mesh_name, "svc.sleepy", "--exec", "sleep 30", "--exec-timeout", "0.3")
    started = time.monotonic()
    result = run(["req", "svc.sleepy", "x", "--timeout", "10", "--retries", "0"], mesh=mesh_name)
    assert result.returncode == 1
    assert result.stderr.strip() == ("zeromesh req: service 'svc.sleepy' failed: "
                                     "sleep timed out after 0.3 s")
    assert time.monotonic() - started < 8


def test_req_without_a_server_exits_1_within_its_timeout(mesh_name: str) -> None:
    """No responders: exit 1, one line, once --timeout (which covers finding a server) has
    passed, plus start-up (the bound leaves a loaded machine room for that)."""
    started = time.monotonic()
    result = run(["req", "svc.nobody", "x", "--timeout", "1"], mesh=mesh_name, timeout=60)
    took = time.monotonic() - started
    assert result.returncode == 1
    assert result.stderr.strip() == "zeromesh req: no responders for 'svc.nobody'"
    assert 1 <= took < 15, took


def test_req_errors_name_the_service_as_given(mesh_name: str) -> None:
    """One-line errors quote a name plainly, each unprintable character as ``?`` (they
    were Python's repr: ``'a\\\\b"'``, ``'a\\x1b[2J'``)."""
    result = run(["req", 'a\\b"', "x", "--timeout", "0.2"], mesh=mesh_name, timeout=60)
    assert (result.returncode, result.stderr.strip()) == (
        1, "zeromesh req: no responders for 'a\\b\"'")
    result = run(["req", "a\x1b[2J", "x"], mesh=mesh_name, timeout=60)
    assert (result.returncode, result.stderr.strip()) == (
        2, "zeromesh req: service: control or surrogate character U+001B at index 1 in 'a?[2J'")


def test_req_times_out_with_exit_1(procs: list[Cli], mesh_name: str) -> None:
    """A server slower than --timeout: exit 1 with a timeout message."""
    serve(procs, mesh_name, "svc.slow", "--exec", "sleep 5")
    result = run(["req", "svc.slow", "x", "--timeout", "1"], mesh=mesh_name)
    assert result.returncode == 1
    assert "timed out after 1 s" in result.stderr


@pytest.mark.netns
def test_req_on_one_host_reaches_serve_on_another(lan: netns.Lan, mesh_name: str) -> None:
    """Across the namespace LAN: `serve --echo` on h2, `req` on h1, discovered by mDNS."""
    h1, h2 = lan.hosts[0], lan.hosts[1]

    def env(host: netns.Host) -> dict[str, str]:
        base = {k: v for k, v in os.environ.items() if not k.startswith("ZEROMESH_")}
        return {**base, "ZEROMESH_INTERFACES": host.ip, "ZEROMESH_MESH": mesh_name,
                "PYTHONUNBUFFERED": "1"}

    server = h2.popen([sys.executable, "-m", "mesh", "serve", "svc.lan", "--echo",
                       "--name", "far"], env=env(h2), stdout=subprocess.PIPE,
                      stderr=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        line = server.stdout.readline()  # bounded by pytest's timeout
        assert line.startswith("ready service=svc.lan name=far"), line
        assert f"rtr=tcp://{h2.ip}:" in line
        result = h1.run([sys.executable, "-m", "mesh", "req", "svc.lan", "across the lan",
                         "--timeout", "10"], 30, env=env(h1))
        assert result.returncode == 0, result.stderr
        assert result.stdout == "across the lan\n"
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            assert server.wait(10) == 0
        finally:
            if server.poll() is None:
                server.kill()
            server.communicate(timeout=5)
