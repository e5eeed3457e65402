"""`zeromesh top` in a real terminal (tmux): it shows a peer and a topic's rate, `q` quits."""

from __future__ import annotations

import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from mesh._membership._peers import Peer, PeerEvent, PeerEventKind, PeerState
from mesh.cli import _top
from mesh.cli._commands import event_line
from mesh.cli._main import build_parser
from tests.helpers import free_port

from ._agent import start_agent
from ._proc import Cli, child_env, run
from .conftest import FAST_ENV

pytestmark = pytest.mark.timeout(90)


class Tmux:
    """A private tmux server (its own socket) with one window; killed at the end."""

    def __init__(self, socket: str) -> None:
        self.socket = socket

    def __call__(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["tmux", "-L", self.socket, *args], capture_output=True,
                              text=True, timeout=10, check=False)

    def screen(self) -> str:
        return self("capture-pane", "-p", "-t", "top").stdout

    def wait_for(self, pattern: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while True:
            screen = self.screen()
            if re.search(pattern, screen, re.MULTILINE):
                return screen
            if time.monotonic() > deadline:
                raise AssertionError(f"no {pattern!r} on screen within {timeout} s:\n{screen}")
            time.sleep(0.1)  # polling a screen: nothing to wait on, bounded by the deadline


@pytest.fixture
def tmux(mesh_name: str) -> Iterator[Tmux]:
    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed (.ci/run installs it)")
    server = Tmux(f"zeromesh-{mesh_name}")
    yield server
    server("kill-server")


def _command(argv: list[str], env: dict[str, str], rc_file: Path) -> str:
    exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()
                       if k.startswith(("ZEROMESH_", "PYTHON", "PATH")))
    return (f"env {exports} {shlex.quote(sys.executable)} -m mesh "
            f"{' '.join(shlex.quote(a) for a in argv)}; echo $? > {shlex.quote(str(rc_file))}")


def test_top_shows_a_peer_and_a_topic_rate_and_quits_on_q(
        procs: list[Cli], mesh_name: str, tmux: Tmux, tmp_path: Path) -> None:
    agent = start_agent(procs, mesh=mesh_name, name="watched")
    publisher = Cli(["pub", "top.demo", "--name", "busy-pub"], mesh=mesh_name, stdin=True,
                    env=FAST_ENV)
    procs.append(publisher)
    rc_file = tmp_path / "rc"
    command = _command(["top", "--agent", agent.url], child_env(mesh_name), rc_file)
    started = tmux("new-session", "-d", "-s", "top", "-x", "150", "-y", "45", command)
    assert started.returncode == 0, started.stderr
    deadline = time.monotonic() + 30
    screen = ""
    while time.monotonic() < deadline:
        publisher.proc.stdin.write("x\n" * 20)  # type: ignore[union-attr]
        publisher.proc.stdin.flush()  # type: ignore[union-attr]
        screen = tmux.wait_for(r"^zeromesh top", 15)
        if re.search(r"busy-pub\s+alive", screen) and re.search(r"^top\.demo\s+[1-9]",
                                                                screen, re.MULTILINE):
            break
        time.sleep(0.3)  # the next redraw comes within a second; bounded by the deadline
    assert re.search(r"busy-pub\s+alive", screen), screen
    assert re.search(r"^top\.demo\s+[1-9]", screen, re.MULTILINE), screen
    tmux("send-keys", "-t", "top", "q")
    deadline = time.monotonic() + 10
    while not rc_file.exists() or not rc_file.read_text().strip():
        assert time.monotonic() < deadline, tmux.screen()
        time.sleep(0.05)  # waiting for the shell to write top's status, bounded
    assert rc_file.read_text().strip() == "0"


def test_top_without_an_agent_is_one_line_and_status_1(mesh_name: str) -> None:
    done = run(["top", "--agent", "http://127.0.0.1:9"], mesh=mesh_name, timeout=30)
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith("zeromesh top: cannot reach the agent at http://127.0.0.1:9")


def test_top_quits_on_sigint_with_status_0_and_no_traceback(procs: list[Cli],
                                                            mesh_name: str) -> None:
    """Ctrl-C quits like `q` (status 0, nothing on stderr); it left a 'Task exception was
    never retrieved' traceback behind."""
    agent = start_agent(procs, mesh=mesh_name, name="watched")
    top = Cli(["top", "--agent", agent.url], mesh=mesh_name)
    procs.append(top)
    first = top.line("zeromesh top", timeout=15)  # the first screen: it is streaming
    assert "\x1b" not in first  # stdout is a pipe: plain lines, no screen control
    top.proc.send_signal(signal.SIGINT)
    assert top.wait(15) == 0, top.stderr()
    assert top.stderr() == ""


@pytest.mark.parametrize("agent", ["notaurl", "ftp://127.0.0.1:7474", "http://127.0.0.1:99999",
                                   "http://:7474"])
def test_top_with_an_agent_that_is_no_http_url_is_a_usage_error(
        agent: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Was an attempt to reach it: "cannot reach the agent at notaurl: notaurl/v1/events",
    status 1."""
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["top", "--agent", agent])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert agent in err


def test_top_fits_a_small_terminal_with_its_header_in_view(
        procs: list[Cli], mesh_name: str, tmux: Tmux, tmp_path: Path) -> None:
    """More rows than the terminal has (here 25 lines for 12): each frame is cut to the
    terminal, so it never scrolls and the header stays on its first line (it scrolled out
    of view every second)."""
    agent = start_agent(procs, mesh=mesh_name, name="watched")
    lines = "".join(f'{{"topic": "small.topic{i}.with.a.long.name", "data": "x"}}\n'
                    for i in range(20))
    posted = subprocess.run(["curl", "-sf", "-X", "POST", f"{agent.url}/v1/publish",
                             "--data-binary", lines], capture_output=True, timeout=10,
                            check=False)
    assert posted.returncode == 0, posted.stderr
    command = _command(["top", "--agent", agent.url], child_env(mesh_name), tmp_path / "rc")
    started = tmux("new-session", "-d", "-s", "top", "-x", "50", "-y", "12", command)
    assert started.returncode == 0, started.stderr
    tmux.wait_for(r"^small\.topic", 15)
    screen = tmux.wait_for(r"^TOPIC", 5)  # a whole frame, drawn again a second later
    rows = screen.splitlines()
    assert rows[0].startswith("zeromesh top"), screen
    assert len(rows[0]) <= 50


async def test_names_from_the_network_cannot_drive_the_terminal(
        capsys: pytest.CaptureFixture[str]) -> None:
    """A peer named with escape sequences (the wire does not check names: a hostile node
    can) is shown with ``?`` for them; it set the terminal's title and cleared it."""
    evil = "\x1b]0;pwned\x07\x1b[2J\x1b[31mRED\u202e"
    peer = {"id": "e" * 32, "name": evil, "state": "alive", "rtt_ms": 1.0}

    async def events() -> AsyncIterator[tuple[str, Any]]:
        yield "joined", {"id": "e" * 32, "name": evil, "state": "alive"}
        yield "stats", {"node": {"name": "me", "id": "m" * 32}, "peers": [peer],
                        "topics": [{"topic": evil, "msgs_per_s": 1}]}

    await _top._show(events(), deque(maxlen=5))
    out = capsys.readouterr().out
    assert not {"\x1b", "\x07", "\u202e"} & set(out), repr(out)
    assert "?]0;pwned??[2J?[31mRED?" in out
    peer_event = PeerEvent(PeerEventKind.JOINED, Peer(
        "e" * 32, evil, PeerState.ALIVE, ("tcp://127.0.0.1:1",), 0.0))
    assert "\x1b" not in event_line(peer_event)  # what an agent prints of its peers


def test_top_follows_an_agent_that_restarts(procs: list[Cli], mesh_name: str) -> None:
    """SIGKILL the agent, start it again on its port: top shows the new one (it exited
    with "cannot reach the agent ... Response payload is not completed", status 1, while
    the page reconnects by itself)."""
    port = free_port()
    first = start_agent(procs, "--http", f"127.0.0.1:{port}", mesh=mesh_name, name="first")
    top = Cli(["top", "--agent", first.url], mesh=mesh_name)
    procs.append(top)
    top.line("zeromesh top — first", timeout=15)
    first.cli.proc.send_signal(signal.SIGKILL)
    top.log.wait_for("zeromesh top: lost the agent at", 10)
    start_agent(procs, "--http", f"127.0.0.1:{port}", mesh=mesh_name, name="second")
    top.line("zeromesh top — second", timeout=15)
    top.proc.send_signal(signal.SIGINT)
    assert top.wait(15) == 0
    assert "Traceback" not in top.stderr()


def test_top_into_a_pipe_that_closes_ends_with_status_0(procs: list[Cli],
                                                       mesh_name: str) -> None:
    """`zeromesh top | head -1`: the closed pipe is not a lost agent (top kept trying to
    reach it again, writing 'lost the agent' lines until killed)."""
    agent = start_agent(procs, mesh=mesh_name, name="watched")
    top = subprocess.Popen([sys.executable, "-m", "mesh", "top", "--agent", agent.url],
                           env=child_env(mesh_name), stdin=subprocess.DEVNULL,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert top.stdout is not None
        assert top.stdout.readline().startswith("zeromesh top")
        top.stdout.close()
        assert top.wait(10) == 0
        assert "lost the agent" not in top.stderr.read()  # type: ignore[union-attr]
    finally:
        if top.poll() is None:
            top.kill()
            top.wait(5)
        top.stderr.close()  # type: ignore[union-attr]
