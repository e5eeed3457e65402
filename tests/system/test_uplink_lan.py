"""Uplinks across the namespace LAN: the hub (nats-server, JetStream file store) on its own
host, a site agent exporting to it, publishers on two site hosts — and the hub SIGKILLed and
restarted twice, the site's link cut for 5 s, the agent SIGKILLed: nothing is lost, nothing is
stored twice."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Final

import pytest

from tests import netns
from tests.uplink._binaries import require_binary

from ._meshproc import MeshProc, mesh_argv, unique

pytestmark = [pytest.mark.netns, pytest.mark.timeout(240)]

NATS_PORT: Final = 4222
PER_PUBLISHER: Final = 2500
CUT: Final = 5.0
"""Seconds the site's cable is out."""

_PUBLISHER = textwrap.dedent("""
    import asyncio, sys
    from mesh import AsyncNode
    async def main():
        mesh, data_dir, name, count, pace = sys.argv[1:6]
        async with AsyncNode(name=name, mesh=mesh, data_dir=data_dir) as node:
            await node.wait_for_durables("site.x", 1, timeout=30)
            print("publishing", flush=True)
            for i in range(int(count)):
                await node.publish(f"site.{name}", f"{name} {i}", reliable=True)
                if i % 100 == 0:
                    print(f"sent {i}", flush=True)
                await asyncio.sleep(float(pace))
            print("all published", flush=True)
            await node.wait_for_spool(timeout=120)
            print("all delivered", flush=True)
    asyncio.run(main())
""")

_STREAM_READER = textwrap.dedent("""
    import asyncio, json, sys
    import nats
    async def main():
        nc = await nats.connect(sys.argv[1], allow_reconnect=False)
        js = nc.jetstream()
        info = await js.stream_info(sys.argv[2])
        out = []
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            msg = await js.get_msg(sys.argv[2], seq)
            out.append([msg.headers.get("Nats-Msg-Id"), msg.subject, msg.data.decode()])
        await nc.close()
        print(json.dumps(out))
    asyncio.run(main())
""")


class HubServer:
    """nats-server with JetStream on one LAN host, started and SIGKILLed by PID."""

    def __init__(self, host: netns.Host, tmp: Path) -> None:
        binary = require_binary("nats-server", "nats-server")
        self.host = host
        tmp.mkdir(parents=True, exist_ok=True)
        self.config = tmp / "nats.conf"
        self.config.write_text(f'listen: "{host.ip}:{NATS_PORT}"\n'
                               f'server_name: hub\njetstream {{ store_dir: "{tmp / "js"}" }}\n')
        self.binary = binary
        self.url = f"nats://{host.ip}:{NATS_PORT}"
        self.proc: subprocess.Popen[str] | None = None
        self.start()

    def start(self) -> None:
        self.proc = self.host.popen([self.binary, "-c", str(self.config)], text=True,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 15
        probe = f"import socket; socket.create_connection(('{self.host.ip}', {NATS_PORT}), 1)"
        while self.host.python(probe, 5).returncode != 0:
            assert self.proc.poll() is None, self.proc.stderr.read() if self.proc.stderr else ""
            assert time.monotonic() < deadline, "nats-server did not listen within 15 s"
            time.sleep(0.05)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def read_stream(self, stream: str) -> list[list[str]]:
        done = self.host.run([sys.executable, "-c", _STREAM_READER, self.url, stream], 120,
                             check=True)
        rows: list[list[str]] = json.loads(done.stdout)
        return rows


@pytest.fixture
def hub_lan() -> Iterator[netns.Lan]:
    reason = netns.netns_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    with netns.make_lan(3) as lan:
        yield lan


def _agent(host: netns.Host, mesh: str, tmp: Path, hub_url: str) -> MeshProc:
    tmp.mkdir(parents=True, exist_ok=True)
    config = tmp / "agent.toml"
    config.write_text(f'data_dir = "{tmp / "agent"}"\nhttp = "127.0.0.1:0"\n'
                      f'[[uplink]]\nurl = "{hub_url}"\nprefix = "site1"\nexport = ["site.>"]\n')
    return MeshProc(host, mesh_argv("agent", host, mesh, "--name", "uplink", "--config",
                                    str(config)))


def _uplink_status(agent: MeshProc) -> dict[str, object]:
    url = agent.wait_line(r"^ready ", timeout=1).text.rsplit("http=", 1)[1]
    done = agent.host.run(["curl", "-sf", f"{url}/v1/uplinks"], 10, check=True)
    status: dict[str, object] = json.loads(done.stdout)[0]
    return status


def _wait_drained(agent: MeshProc, timeout: float) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while True:
        status = _uplink_status(agent)
        if status["state"] == "connected" and status["backlog"] == 0:
            return status
        assert time.monotonic() < deadline, f"backlog not drained: {status}"
        time.sleep(0.2)


def _check_stream(rows: list[list[str]], names: tuple[str, ...]) -> None:
    ids = [row[0] for row in rows]
    assert len(ids) == len(set(ids)), f"{len(ids) - len(set(ids))} duplicates in the stream"
    for name in names:
        got = [int(row[2].split()[1]) for row in rows if row[1] == f"site1.site.{name}"]
        assert sorted(set(got)) == list(range(PER_PUBLISHER)), \
            f"{name}: {PER_PUBLISHER - len(set(got))} missing"
        assert got == sorted(got), f"{name}: out of order"


def _site(lan: netns.Lan, tmp_path: Path, *, pace: float
          ) -> tuple[HubServer, MeshProc, list[MeshProc]]:
    """The hub on h1; the uplink agent on h2; publishers on h2 and h3, publishing."""
    hub = HubServer(lan[0], tmp_path / "hub")
    mesh = unique("up")
    agent = _agent(lan[1], mesh, tmp_path / "a", hub.url)
    agent.wait_line(r"^ready ", timeout=30)
    pubs = [MeshProc(host, [sys.executable, "-c", _PUBLISHER, mesh, str(tmp_path / name), name,
                            str(PER_PUBLISHER), str(pace)])
            for host, name in ((lan[1], "pa"), (lan[2], "pb"))]
    for pub in pubs:
        pub.wait_line(r"^publishing", timeout=30)
    return hub, agent, pubs


def test_export_survives_hub_kills_and_a_cut_link(hub_lan: netns.Lan, tmp_path: Path) -> None:
    hub, agent, pubs = _site(hub_lan, tmp_path, pace=0.004)
    site = hub_lan[1]
    pubs[0].wait_line(r"^sent 300$", timeout=30)
    for _ in range(2):  # the hub dies and comes back, twice
        hub.kill()
        _progress(pubs[0], 200)
        hub.start()
        _progress(pubs[0], 300)
    site.cut()
    cut_at = time.monotonic()
    while (left := CUT - (time.monotonic() - cut_at)) > 0:  # pb goes on publishing meanwhile
        upcoming = _next_hundred(pubs[1], 100)
        if upcoming >= PER_PUBLISHER:  # pb is done: the cable stays out for the rest
            time.sleep(left)
            break
        pubs[1].wait_line(rf"^sent {upcoming}$", timeout=30)
    site.restore()
    for pub in pubs:
        pub.wait_line(r"^all delivered", timeout=150)
    status = _wait_drained(agent, 120)
    rows = hub.read_stream("ZEROMESH")
    _check_stream(rows, ("pa", "pb"))
    print(f"\nhub killed twice, link cut 5 s: sent {2 * PER_PUBLISHER}, on the hub {len(rows)}, "
          f"acknowledged {status['exported']}, of which resends the hub dropped by id "
          f"{status['hub_duplicates']}; connects {status['connects']}")


def test_agent_sigkill_loses_nothing_and_the_hub_drops_resends(hub_lan: netns.Lan,
                                                               tmp_path: Path) -> None:
    hub, agent, pubs = _site(hub_lan, tmp_path, pace=0.002)
    pubs[0].wait_line(r"^sent 1000$", timeout=30)
    agent.send_signal(signal.SIGKILL)
    agent.wait_exit(timeout=10)
    pubs[0].wait_line(r"^sent 1500$", timeout=30)
    agent = MeshProc(agent.host, agent.argv)  # the same agent again: same config, same data
    agent.wait_line(r"^ready ", timeout=30)
    for pub in pubs:
        pub.wait_line(r"^all delivered", timeout=150)
    status = _wait_drained(agent, 120)
    rows = hub.read_stream("ZEROMESH")
    _check_stream(rows, ("pa", "pb"))
    print(f"\nagent SIGKILLed mid-stream: sent {2 * PER_PUBLISHER}, on the hub {len(rows)}, "
          f"acknowledged after the restart {status['exported']}, of which resends the hub "
          f"dropped by id {status['hub_duplicates']}")


def _progress(proc: MeshProc, ahead: int) -> None:
    """Until the publisher is `ahead` messages further (or done)."""
    upcoming = _next_hundred(proc, ahead)
    proc.wait_line(rf"^sent {upcoming}$" if upcoming < PER_PUBLISHER else r"^all published",
                   timeout=30)


def _next_hundred(proc: MeshProc, ahead: int) -> int:
    """The `sent N` line `ahead` messages after the last one seen."""
    last = proc.matching(r"^sent \d+$")[-1]
    return int(last.text.split()[1]) + ahead


_COMMANDER = textwrap.dedent("""
    import asyncio, sys
    import nats
    async def main():
        nc = await nats.connect(sys.argv[1], allow_reconnect=False)
        js = nc.jetstream()
        for i in range(int(sys.argv[2])):
            await js.publish(f"site1.cmd.c{i % 7}", f"c{i}".encode())
        await nc.close()
        print("published", flush=True)
    asyncio.run(main())
""")
COMMANDS: Final = 1000


def test_commands_from_the_hub_arrive_once_across_an_agent_restart(hub_lan: netns.Lan,
                                                                   tmp_path: Path) -> None:
    hub_host, site, other = hub_lan[0], hub_lan[1], hub_lan[2]
    hub = HubServer(hub_host, tmp_path / "hub")
    mesh = unique("up")
    sub = MeshProc(other, mesh_argv("sub", other, mesh, "cmd.>", "--durable", "app",
                                    "--data-dir", str(tmp_path / "s"), "--count", str(COMMANDS),
                                    "--timeout", "100"))
    config = tmp_path / "a" / "agent.toml"
    config.parent.mkdir(parents=True)
    config.write_text(f'data_dir = "{tmp_path / "a" / "data"}"\nhttp = "127.0.0.1:0"\n'
                      f'[[uplink]]\nurl = "{hub.url}"\nprefix = "site1"\nimport = ["cmd.>"]\n')
    argv = mesh_argv("agent", site, mesh, "--name", "uplink", "--config", str(config))
    agent = MeshProc(site, argv)
    agent.wait_line(r"^joined name=", timeout=30)  # it knows the durable from the hello
    commander = hub_host.run([sys.executable, "-c", _COMMANDER, hub.url, str(COMMANDS)], 60)
    assert commander.returncode == 0, commander.stderr
    sub.wait_line(r"^cmd\.c\d c300$", timeout=60)
    agent.send_signal(signal.SIGTERM)
    assert agent.wait_exit(timeout=20) == 0, agent.describe()
    agent = MeshProc(site, argv)
    agent.wait_line(r"^ready ", timeout=30)
    assert sub.wait_exit(timeout=90) == 0, sub.describe()
    got = [line.text.split()[1] for line in sub.matching(r"^cmd\.c\d c")]
    assert len(got) == COMMANDS, f"{len(got)} lines"
    assert set(got) == {f"c{i}" for i in range(COMMANDS)}, "missing or duplicated"
    status = _uplink_status(agent)
    print(f"\nimport across an agent restart: {COMMANDS} published on the hub, {len(got)} "
          f"received once each; after the restart imported {status['imported']}, redeliveries "
          f"dropped {status['duplicates']}")
