"""The mesh page of a real agent process on 127.0.0.1, in a headless chromium.

The page and its assets come from the agent itself with a strict CSP; it goes
live with no console error; and when the agent restarts (same port, same data
dir) the open page reconnects by itself, with no reload.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.agent_page._browser import Browser
from tests.helpers import free_port

pytestmark = pytest.mark.timeout(90)


class AgentProcess:
    """``python -m mesh agent`` on 127.0.0.1:``port``, ready once it printed ``ready``."""

    def __init__(self, port: int, data_dir: Path, mesh: str) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mesh", "agent", "--name", "page-agent", "--mesh", mesh,
             "--http", f"127.0.0.1:{port}", "--data-dir", str(data_dir)],
            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, start_new_session=True)
        self.ready = self._line("ready ", 20.0)

    def _line(self, prefix: str, timeout: float) -> str:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        buffer = b""
        while time.monotonic() < deadline:
            readable, _, _ = select.select([self.proc.stdout], [], [],
                                           max(0.0, deadline - time.monotonic()))
            if not readable:
                break
            chunk = os.read(self.proc.stdout.fileno(), 4096)
            if not chunk:
                break
            buffer += chunk
            for line in buffer.decode(errors="replace").splitlines():
                if line.startswith(prefix):
                    return line
        raise AssertionError(f"no {prefix!r} line within {timeout} s: {buffer!r}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        assert self.proc.stdout is not None
        self.proc.stdout.close()


@pytest.fixture
def agents(tmp_path: Path) -> Iterator[list[AgentProcess]]:
    started: list[AgentProcess] = []
    yield started
    for agent in started:
        agent.stop()


def test_page_is_served_by_the_agent_and_reconnects_when_it_restarts(
        tmp_path: Path, agents: list[AgentProcess]) -> None:
    port = free_port()
    mesh = "page" + uuid.uuid4().hex[:8]
    agents.append(AgentProcess(port, tmp_path / "data", mesh))
    with Browser(tmp_path) as browser:
        status, body = browser.http("GET", f"http://127.0.0.1:{port}/")
        assert status == 200
        assert b"/page/app.js" in body
        for asset in ("app.js", "style.css"):
            status, _ = browser.http("GET", f"http://127.0.0.1:{port}/page/{asset}")
            assert status == 200, asset
        status, _ = browser.http("GET", f"http://127.0.0.1:{port}/page/secret.txt")
        assert status == 404

        browser.navigate(f"http://127.0.0.1:{port}/")
        browser.wait_for("document.querySelector('#conn').dataset.state === 'ok'"
                         " && document.body.dataset.snapshots >= 2", 10, "live")
        assert browser.evaluate("document.querySelector('#node-name').textContent") == \
            "page-agent"
        assert browser.errors == []
        browser.screenshot("before-restart.png")
        before = browser.evaluate("performance.getEntriesByType('navigation').length")

        agents[0].stop()
        browser.wait_for("document.querySelector('#conn').dataset.state === 'bad'", 10,
                         "the page says it is reconnecting")
        browser.screenshot("agent-down.png")
        seen = int(browser.evaluate("document.body.dataset.snapshots"))
        agents.append(AgentProcess(port, tmp_path / "data", mesh))
        restarted = time.monotonic()
        browser.wait_for("document.querySelector('#conn').dataset.state === 'ok'"
                         f" && document.body.dataset.snapshots > {seen}", 15,
                         "the page is live again with no reload")
        print(f"\npage live again {time.monotonic() - restarted:.1f} s after the agent was ready")
        browser.screenshot("after-restart.png")
        assert browser.evaluate("performance.getEntriesByType('navigation').length") == before
        # While the agent was down the browser logged the failed connections (network
        # errors); nothing else may be logged: no script error, no CSP violation.
        others = [e for e in browser.errors if not (e.kind == "log" and e.source == "network")]
        assert others == []
        browser.leave()
