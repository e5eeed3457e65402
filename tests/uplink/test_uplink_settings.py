"""[[uplink]] in the agent's config: bad input stops the agent at start (exit 2, the key and
the reason); the subject mapping both ways; the backlog survives a restart."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mesh._spool import FsyncPolicy
from mesh._uplink._backlog import Backlog, Exported
from mesh._uplink._subjects import Subjects
from mesh.errors import SpoolFullError

from ..mesh._proc import child_env

pytestmark = pytest.mark.timeout(60)


def start_with(tmp_path: Path, uplink: str, data_dir: bool = True) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "agent.toml"
    head = f'data_dir = "{tmp_path / "data"}"\n' if data_dir else ""
    path.write_text(f'{head}http = "127.0.0.1:0"\n[[uplink]]\n{uplink}')
    return subprocess.run([sys.executable, "-m", "mesh", "agent", "--config", str(path)],
                          env=child_env("uplinkcfg"), text=True, capture_output=True,
                          timeout=20, check=False)


@pytest.mark.parametrize(("uplink", "key", "reason"), [
    ('url = "nats//hub:4222"\nprefix = "s"\nexport = ["a.>"]\n', "uplink[0].url", "nats://"),
    ('url = "http://hub:4222"\nprefix = "s"\nexport = ["a.>"]\n', "uplink[0].url", "nats://"),
    ('url = "nats://"\nprefix = "s"\nexport = ["a.>"]\n', "uplink[0].url", "host"),
    ('url = "nats://hub:99999"\nprefix = "s"\nexport = ["a.>"]\n', "uplink[0].url", "port"),
    ('url = "mqtt://hub/x/y"\nprefix = "s"\nexport = ["a.>"]\n', "uplink[0].url", "host"),
    ('url = "nats://hub"\nprefix = ""\nexport = ["a.>"]\n', "uplink[0].prefix", "empty"),
    ('url = "nats://hub"\nprefix = "site.*"\nexport = ["a.>"]\n', "uplink[0].prefix",
     "wildcard"),
    ('url = "nats://hub"\nprefix = "$SYS"\nexport = ["a.>"]\n', "uplink[0].prefix", "'$'"),
    ('url = "mqtt://hub"\nprefix = "$share"\nexport = ["a.>"]\n', "uplink[0].prefix",
     "'$'"),
    ('url = "nats://hub"\nprefix = "s"\n', "uplink[0]", "export or import"),
    ('url = "nats://hub"\nprefix = "s"\nexport = ["a..b"]\n', "uplink[0].export", ""),
    ('url = "nats://hub"\nprefix = "s"\nimport = [""]\n', "uplink[0].import", ""),
    ('url = "nats://hub"\nprefix = "s"\nexport = ["a"]\nstream = "A.B"\n',
     "uplink[0].stream", "stream name"),
    ('url = "nats://hub"\nprefix = "s"\nexport = ["a"]\ntls_ca = "/nonexistent.pem"\n',
     "uplink[0].tls_ca", "no such file"),
    ('url = "mqtt://hub"\nprefix = "s"\nexport = ["a"]\ntoken = "t"\n', "uplink[0]",
     "user/password"),
    ('url = "nats://hub"\nprefix = "s"\nexport = ["a"]\nwindow = 0\n', "uplink[0]", "window"),
    ('url = "nats://hub"\nprefix = "s"\nexport = ["a"]\nexprot = ["b"]\n', "exprot", ""),
])
def test_a_bad_uplink_stops_the_agent_at_start(tmp_path: Path, uplink: str, key: str,
                                               reason: str) -> None:
    done = start_with(tmp_path, uplink)
    assert done.returncode == 2, done.stdout + done.stderr
    line = done.stderr.strip()
    assert "\n" not in line, line
    assert key in line, line
    assert reason in line, line
    assert "ready" not in done.stdout


@pytest.mark.parametrize("field", ["tls_ca", "tls_cert"])
def test_a_tls_file_that_is_no_pem_stops_the_agent_at_start(tmp_path: Path, field: str
                                                           ) -> None:
    """It was only checked to exist: the agent started, and NATS retried it as an
    unreachable hub for ever, MQTT ended the uplink with a traceback."""
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate\n")
    files = f'{field} = "{bad}"\n' + (f'tls_key = "{bad}"\n' if field == "tls_cert" else "")
    done = start_with(tmp_path, f'url = "mqtts://127.0.0.1:1"\nprefix = "s"\nexport = ["a"]\n'
                                f"{files}")
    assert done.returncode == 2, done.stdout + done.stderr
    line = done.stderr.strip()
    assert "\n" not in line, line
    assert f"uplink[0].{field}" in line, line
    assert "unusable" in line, line


def test_an_uplink_needs_a_data_dir(tmp_path: Path) -> None:
    done = start_with(tmp_path, 'url = "nats://127.0.0.1:4222"\nprefix = "s"\nexport = ["a"]\n',
                      data_dir=False)
    assert done.returncode == 2
    assert "uplink[0]" in done.stderr
    assert "data_dir" in done.stderr


@pytest.mark.parametrize("module", ["nats", "paho"])
def test_without_the_extra_the_error_names_it(tmp_path: Path, module: str) -> None:
    scheme = "nats" if module == "nats" else "mqtt"
    path = tmp_path / "agent.toml"
    path.write_text(f'data_dir = "{tmp_path}"\n[[uplink]]\nurl = "{scheme}://127.0.0.1"\n'
                    'prefix = "s"\nexport = ["a"]\n')
    code = (f"import sys; sys.modules[{module!r}] = None\n"
            "from mesh._agent import load\nfrom mesh.errors import ConfigError\n"
            f"try:\n    load({str(path)!r}, {{}}, {{}})\n"
            "except ConfigError as exc:\n    print(exc)\n")
    done = subprocess.run([sys.executable, "-c", code], text=True, capture_output=True,
                          timeout=20, check=True)
    assert "pip install 'zeromesh[uplink]'" in done.stdout
    assert "uplink[0]" in done.stdout


def test_nats_subjects_are_mesh_topics_under_the_prefix() -> None:
    subjects = Subjects("nats", "site1")
    assert subjects.outbound("sensors.a.temp") == "site1.sensors.a.temp"
    assert subjects.outbound("cmd.>") == "site1.cmd.>"
    assert subjects.outbound("cmd.*.on") == "site1.cmd.*.on"
    assert subjects.inbound("site1.cmd.light") == "cmd.light"
    assert subjects.inbound("site2.cmd.light") is None
    assert subjects.inbound("site1") is None


def test_mqtt_topics_map_dots_and_wildcards() -> None:
    subjects = Subjects("mqtt", "plant.a")
    assert subjects.outbound("sensors.a.temp") == "plant/a/sensors/a/temp"
    assert subjects.outbound("cmd.>") == "plant/a/cmd/#"
    assert subjects.outbound("cmd.*.on") == "plant/a/cmd/+/on"
    assert subjects.inbound("plant/a/cmd/light") == "cmd.light"
    assert subjects.inbound("plant/a/cmd/v1.2") is None  # a '.' inside a level has no spelling
    assert subjects.inbound("plant/a/cmd//x") is None
    assert subjects.inbound("plant/b/cmd/x") is None


def _exported(i: int) -> Exported:
    return Exported(f"src-{i}", "a.b", b"x" * 10, {"k": str(i)}, 1.0 + i)


async def test_the_backlog_keeps_its_order_and_marks_across_a_restart(tmp_path: Path) -> None:
    backlog = Backlog(tmp_path / "b", fsync=FsyncPolicy.BATCH, quota=1 << 20)
    await backlog.open()
    await backlog.add([_exported(i) for i in range(10)])
    first = backlog.take_unsent()
    assert first is not None
    backlog.done([first[0]])
    backlog.mark(["hub:1", "hub:2"])
    await backlog.aclose()

    again = Backlog(tmp_path / "b", fsync=FsyncPolicy.BATCH, quota=1 << 20)
    await again.open()
    try:
        order = []
        while (item := again.take_unsent()) is not None:
            order.append(item[1].id)
        assert order == [f"src-{i}" for i in range(1, 10)]
        assert again.seen("hub:1")
        assert again.seen("hub:2")
        assert not again.seen("hub:3")
        again.rewind()
        assert again.take_unsent() is not None  # all still unacknowledged: sent again
    finally:
        await again.aclose()


async def test_a_full_backlog_refuses_and_stores_nothing(tmp_path: Path) -> None:
    backlog = Backlog(tmp_path / "b", fsync=FsyncPolicy.OFF, quota=4096)
    await backlog.open()
    try:
        with pytest.raises(SpoolFullError):
            await backlog.add([Exported(f"s-{i}", "a", b"x" * 512, {}, 1.0) for i in range(20)])
        assert len(backlog) == 0
    finally:
        await backlog.aclose()


def test_print_config_hides_uplink_secrets(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(f'data_dir = "{tmp_path}"\n[[uplink]]\nurl = "nats://127.0.0.1"\n'
                    'prefix = "s"\nexport = ["a"]\nuser = "site"\npassword = "hunter2"\n'
                    'token = "tok"\n')
    done = subprocess.run([sys.executable, "-m", "mesh", "agent", "--config", str(path),
                           "--print-config"], env=child_env("uplinkcfg"), text=True,
                          capture_output=True, timeout=20, check=True)
    assert "hunter2" not in done.stdout
    assert '"tok"' not in done.stdout
    assert '"password": "***"' in done.stdout
    assert '"user": "site"' in done.stdout
