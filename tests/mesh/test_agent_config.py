"""The agent's config: TOML file, ZEROMESH_* env, flags; flag > env > file > default; a bad
file stops it at start with the key and the reason (exit 2)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from mesh._agent import load
from mesh.errors import ConfigError

from ._proc import child_env

pytestmark = pytest.mark.timeout(30)


def agent(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full = {**child_env("cfg"), **(env or {})}
    return subprocess.run([sys.executable, "-m", "mesh", "agent", *args], env=full, text=True,
                          capture_output=True, timeout=20, check=False)


def effective(*args: str, env: dict[str, str] | None = None) -> dict[str, object]:
    done = agent("--print-config", *args, env=env)
    assert done.returncode == 0, done.stderr
    config: dict[str, object] = json.loads(done.stdout)
    return config


def test_precedence_is_flag_then_env_then_file_then_default(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text('name = "from-file"\nfsync = "off"\nlost_after = 3.0\n'
                    'http = "127.0.0.1:7600"\n')
    cfg = str(path)
    assert effective("--config", cfg, "--name", "from-flag",
                     env={"ZEROMESH_NAME": "from-env"})["name"] == "from-flag"
    assert effective("--config", cfg, env={"ZEROMESH_NAME": "from-env"})["name"] == "from-env"
    from_file = effective("--config", cfg, env={"ZEROMESH_HTTP": ""})
    assert from_file["name"] == "from-file"
    assert from_file["fsync"] == "off"
    assert from_file["lost_after"] == 3.0
    assert from_file["http"] == "127.0.0.1:7600"
    default = effective(env={"ZEROMESH_HTTP": ""})
    assert default["name"] == socket.gethostname().split(".")[0]
    assert default["http"] == "127.0.0.1:7474"
    assert default["fsync"] == "batch"
    assert effective(env={"ZEROMESH_CONFIG": cfg})["name"] == "from-file"
    assert effective("--config", cfg, env={"ZEROMESH_LOST_AFTER": "2.5",
                                            "ZEROMESH_MDNS": "false"})["lost_after"] == 2.5


def test_print_config_shows_webhooks(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text('data_dir = "/tmp/x"\n[[webhooks]]\nurl = "http://127.0.0.1:9/h"\n'
                    'pattern = "a.>"\ndurable = "app"\nconcurrency = 4\n')
    hooks = effective("--config", str(path))["webhooks"]
    assert hooks == [{"url": "http://127.0.0.1:9/h", "pattern": "a.>", "queue": None,
                      "durable": "app", "concurrency": 4, "timeout": 5.0, "attempts": 5,
                      "backoff": 0.2, "accept": None}]


@pytest.mark.parametrize(("text", "reason"), [
    ('colour = "red"\n', "unknown field `colour`"),
    ('port = "x"\n', "port: Expected `int`, got `str`"),
    ('fsync = "sometimes"\n', "fsync: use always, batch or off"),
    ('http = "localhost:80"\n', "http: 'localhost:80': use IP:PORT"),
    ('interfaces = ["0.0.0.0"]\n', "interfaces: 0.0.0.0 cannot be bound"),
    ("name = \n", "config:"),
    ('[[webhooks]]\nurl = "ftp://x/y"\npattern = "a"\n', "webhooks[0].url: 'ftp://x/y'"),
    ('[[webhooks]]\nurl = "http://127.0.0.1:1/"\n', "webhooks[0]: give exactly one of"),
    ('[[webhooks]]\nurl = "http://127.0.0.1:1/"\npattern = "a..b"\n',
     "webhooks[0].pattern: empty segment"),
    ('[[webhooks]]\nurl = "http://127.0.0.1:1/"\npattern = "a"\ndurable = "d"\n',
     "webhooks[0].durable: a durable webhook needs data_dir"),
    ('data_dir = "d"\n[[webhooks]]\nurl = "http://127.0.0.1:1/a"\npattern = "a"\ndurable = "d"\n'
     '[[webhooks]]\nurl = "http://127.0.0.1:1/b"\npattern = "b"\ndurable = "d"\n',
     "webhooks[1].durable: 'd' is the durable of webhooks[0]"),  # (the second never ran)
    ('[[webhooks]]\nurl = "http://127.0.0.1:1/"\nqueue = "q"\nconcurrency = 0\n',
     "webhooks[0]: concurrency and attempts must be >= 1"),
    ('[[webhooks]]\nurl = "http://127.0.0.1:1/"\nqueue = "q"\nretries = 3\n',
     "unknown field `retries`"),
    ('[[webhooks]]\nurl = "http://127.0.0.1:99999/"\nqueue = "q"\n',
     "webhooks[0].url: 'http://127.0.0.1:99999/' is not a URL"),  # (every POST failed)
    ('[[webhooks]]\nurl = "http://127.0.0.1:1/"\nqueue = "q"\ntimeout = nan\n',
     "webhooks[0]: timeout must be > 0"),
    ('[[service]]\nname = "s"\nurl = "http://127.0.0.1:port/"\n',
     "service[0].url: 'http://127.0.0.1:port/' is not a URL"),
])
def test_a_bad_file_is_rejected_with_key_and_reason(tmp_path: Path, text: str, reason: str) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load(str(path), env={}, flags={})
    assert reason in str(caught.value)


def test_a_bad_file_stops_the_agent_with_one_line_and_exit_2(tmp_path: Path) -> None:
    """--print-config validates exactly as a start does, and never starts a node."""
    path = tmp_path / "agent.toml"
    path.write_text('[[webhooks]]\nurl = "http://127.0.0.1:1/"\nqueue = "a..b"\n')
    for args in (["--print-config", "--config", str(path)], ["--config", str(path)]):
        done = agent(*args)
        assert done.returncode == 2
        lines = done.stderr.strip().splitlines()
        assert lines == ["zeromesh agent: webhooks[0].queue: empty segment in 'a..b'"]


def test_missing_file_and_bad_env_are_usage_errors(tmp_path: Path) -> None:
    done = agent("--config", str(tmp_path / "nope.toml"))
    assert done.returncode == 2
    assert "No such file" in done.stderr
    done = agent(env={"ZEROMESH_PORT": "eighty"})
    assert done.returncode == 2
    assert "ZEROMESH_PORT: Expected `int`" in done.stderr


def test_the_http_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = agent("--http", f"127.0.0.1:{port}")
    assert done.returncode == 2
    assert f"http: cannot listen on 127.0.0.1:{port}" in done.stderr


async def test_a_sighup_during_the_start_reloads_once_the_agent_runs(
        mesh_name: str, tmp_path: Path) -> None:
    """A SIGHUP while the agent starts is applied when it runs (its default action killed the
    process before); from its stop on, SIGHUP is ignored until the process exits."""
    import os
    import signal

    from mesh._agent import Agent
    from mesh.cli._agent import Hangups
    from tests.helpers import aeventually

    from .conftest import FAST

    path = tmp_path / "agent.toml"
    path.write_text('name = "side"\n')
    flags = {"mesh": mesh_name, "mdns": False, "interfaces": ["127.0.0.1"],
             "http": "127.0.0.1:0", **FAST}
    agent = Agent(load(str(path), env={}, flags=flags))
    before = signal.getsignal(signal.SIGHUP)
    try:
        async with Hangups(agent, str(path), flags) as hangups:
            path.write_text('name = "side"\n[[service]]\nname = "s"\nurl = "http://127.0.0.1:9/"\n')
            os.kill(os.getpid(), signal.SIGHUP)
            await aeventually(lambda: hangups._missed, timeout=5)  # (handled while starting)
            async with agent:
                hangups.start()
                await aeventually(lambda: agent.services.names() == ["s"], timeout=5)
        assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, before)
