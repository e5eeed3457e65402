"""Uplinks to a real nats-server (JetStream, file store) through real agent processes:
export and import with headers both ways, no loop, an unreachable hub at start, wrong
credentials, SIGHUP, metrics."""

from __future__ import annotations

import asyncio
import json
import signal
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

import aiohttp
import nats
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.mesh._agent import AgentProc, SseStream, start_agent
from tests.mesh._proc import Cli

from ._brokers import free_port, make_certificate
from ._nats_server import stream_messages
from .conftest import StartNats

pytestmark = pytest.mark.timeout(60)

WAIT: Final = 15.0
TRACEPARENT: Final = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def config(tmp: Path, url: str, *, export: list[str], imports: tuple[str, ...] = (),
           more: str = "") -> str:
    return (f'data_dir = "{tmp / "agent"}"\n[[uplink]]\nurl = "{url}"\nprefix = "site1"\n'
            f"export = {json.dumps(export)}\nimport = {json.dumps(list(imports))}\n{more}")


async def uplink(http: aiohttp.ClientSession, agent: AgentProc) -> dict[str, Any]:
    async with http.get(f"{agent.url}/v1/uplinks") as response:
        assert response.status == 200
        statuses: list[dict[str, Any]] = await response.json()
    assert len(statuses) == 1, statuses
    return statuses[0]


async def until(http: aiohttp.ClientSession, agent: AgentProc,
                ready: Callable[[dict[str, Any]], bool], what: str) -> dict[str, Any]:
    """The uplink's status once `ready(status)` holds (within WAIT)."""
    status: dict[str, Any] = {}
    try:
        async with asyncio.timeout(WAIT):
            while True:  # (polled: the agent has no push for these figures)
                status = await uplink(http, agent)
                if ready(status):
                    return status
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"{what}: not within {WAIT} s; last {status}") from None


def connected(status: dict[str, Any]) -> bool:
    return bool(status["state"] == "connected")


async def test_export_and_import_carry_headers_both_ways(
        nats_server: StartNats, procs: list[Cli], mesh_name: str, tmp_path: Path) -> None:
    hub = nats_server()
    agent = start_agent(procs, mesh=mesh_name, name="edge", tmp=tmp_path,
                        config=config(tmp_path, hub.url, export=["sensors.>"],
                                      imports=("cmd.>",)))
    async with aiohttp.ClientSession() as http, \
            http.get(f"{agent.url}/v1/subscribe/cmd.%3E") as stream_response:
        stream = SseStream(stream_response)
        await stream.subscribed()
        await until(http, agent, connected, "connected")
        async with http.post(f"{agent.url}/v1/publish/sensors.kitchen.temp", data=b"21.5",
                             headers={"traceparent": TRACEPARENT}) as response:
            assert response.status == 202
        await until(http, agent, lambda s: s["exported"] == 1, "exported")
        stored = await stream_messages(hub.url, "ZEROMESH", "site1.sensors.>")
        assert [(m.subject, m.data) for m in stored] == [("site1.sensors.kitchen.temp", b"21.5")]
        headers = stored[0].headers or {}
        assert headers["traceparent"] == TRACEPARENT
        assert headers["Nats-Msg-Id"].startswith(f"{agent.id}-")  # the mesh message id
        assert headers["zeromesh-origin"] == "site1"

        nc = await nats.connect(hub.url, allow_reconnect=False)
        try:
            ack = await nc.jetstream().publish("site1.cmd.light", b"on",
                                               headers={"traceparent": TRACEPARENT})
            assert ack.stream == "ZEROMESH"
        finally:
            await nc.close()
        [event] = await stream.events(1)
    assert event["topic"] == "cmd.light"
    assert event["data"] == "on"
    assert event["headers"]["traceparent"] == TRACEPARENT
    assert event["headers"]["zeromesh-origin"] == "site1"


async def test_a_command_from_the_hub_is_not_sent_back(
        nats_server: StartNats, procs: list[Cli], mesh_name: str, tmp_path: Path) -> None:
    """export cmd.> and import cmd.> on one agent: once in the mesh, once on the hub; and a
    command published in the mesh goes to the hub once and does not come back."""
    hub = nats_server()
    agent = start_agent(procs, mesh=mesh_name, name="edge", tmp=tmp_path,
                        config=config(tmp_path, hub.url, export=["cmd.>"], imports=("cmd.>",)))
    async with aiohttp.ClientSession() as http, \
            http.get(f"{agent.url}/v1/subscribe/cmd.%3E") as stream_response:
        stream = SseStream(stream_response)
        await stream.subscribed()
        await until(http, agent, connected, "connected")
        nc = await nats.connect(hub.url, allow_reconnect=False)
        try:
            await nc.jetstream().publish("site1.cmd.from-hub", b"1")
        finally:
            await nc.close()
        async with http.post(f"{agent.url}/v1/publish/cmd.from-mesh", data=b"2") as response:
            assert response.status == 202
        status = await until(http, agent, lambda s: s["imported"] == 1 and s["exported"] == 1
                             and s["looped"] == 2, "one import, one export, two loops stopped")
        events = await stream.events(2)
        assert sorted(e["topic"] for e in events) == ["cmd.from-hub", "cmd.from-mesh"]
        stored = await stream_messages(hub.url, "ZEROMESH", "site1.cmd.>")
        assert sorted(m.subject for m in stored) == ["site1.cmd.from-hub", "site1.cmd.from-mesh"]
        # A marker from the hub, imported after the first: a loop would have sent the first
        # back (exported 2) before the marker is in.
        nc = await nats.connect(hub.url, allow_reconnect=False)
        try:
            await nc.jetstream().publish("site1.cmd.marker", b"3")
        finally:
            await nc.close()
        again = await until(http, agent, lambda s: s["imported"] == 2 and s["looped"] == 3,
                            "the marker imported, and stopped from going back")
        assert again["exported"] == status["exported"] == 1
    assert len(await stream_messages(hub.url, "ZEROMESH", "site1.cmd.>")) == 3


async def test_an_unreachable_hub_at_start_delays_and_loses_nothing(
        nats_server: StartNats, procs: list[Cli], mesh_name: str, tmp_path: Path) -> None:
    port = free_port()
    agent = start_agent(procs, mesh=mesh_name, name="edge", tmp=tmp_path,
                        config=config(tmp_path, f"nats://127.0.0.1:{port}",
                                      export=["sensors.>"]))
    async with aiohttp.ClientSession() as http:
        status = await until(http, agent, lambda s: s["attempts"] >= 2, "retrying")
        assert status["state"] == "connecting"
        assert status["last_error"]
        for i in range(20):  # the mesh works meanwhile; the backlog holds them
            async with http.post(f"{agent.url}/v1/publish/sensors.t", data=str(i)) as response:
                assert response.status == 202
        await until(http, agent, lambda s: s["backlog"] == 20, "backlog of 20")
        hub = nats_server(port=port)
        status = await until(http, agent, lambda s: connected(s) and s["backlog"] == 0,
                             "drained")
    assert status["exported"] == 20
    assert status["last_error"] == ""  # connected: the old error is over
    stored = await stream_messages(hub.url, "ZEROMESH", "site1.>")
    assert [m.data for m in stored] == [str(i).encode() for i in range(20)]
    # Said once in the log, though the state stayed `connecting` (it said nothing before)
    log = agent.cli.stderr()
    assert log.count(f"uplink nats://127.0.0.1:{port} (site1): connecting: ") == 1, log


async def test_wrong_credentials_are_down_and_not_hammered(
        nats_server: StartNats, procs: list[Cli], mesh_name: str, tmp_path: Path) -> None:
    hub = nats_server(user="site", password="right")
    url = f"nats://127.0.0.1:{hub.port}"
    agent = start_agent(procs, mesh=mesh_name, name="edge", tmp=tmp_path,
                        config=config(tmp_path, url, export=["a.>"],
                                      more='user = "site"\npassword = "wrong"\n'))
    async with aiohttp.ClientSession() as http:
        status = await until(http, agent, lambda s: s["state"] == "down", "down")
        assert "authorization" in status["last_error"].lower(), status
        assert status["last_error"].count("nats:") == 1, status  # (was "nats: nats: ...")
        await asyncio.sleep(2.0)  # long enough for a retry storm to show
        status = await uplink(http, agent)
        assert status["state"] == "down"
        assert status["attempts"] == 1, status
        async with http.post(f"{agent.url}/v1/publish/a.b", data=b"x") as response:
            assert response.status == 202  # the mesh works
    assert "password" not in json.dumps(status)


def test_a_bad_url_in_a_reloaded_config_keeps_the_running_uplinks(
        nats_server: StartNats, procs: list[Cli], mesh_name: str, tmp_path: Path) -> None:
    """SIGHUP re-reads [[uplink]]: one added starts; a bad file is refused and logged."""
    hub = nats_server()
    agent = start_agent(procs, "--data-dir", str(tmp_path / "agent"), mesh=mesh_name,
                        name="edge", tmp=tmp_path, config=f'data_dir = "{tmp_path / "agent"}"\n')
    path = tmp_path / "edge.toml"
    path.write_text(config(tmp_path, hub.url, export=["sensors.>"]))
    agent.cli.proc.send_signal(signal.SIGHUP)
    assert agent.cli.line("reloaded", timeout=WAIT) == "reloaded"
    path.write_text(config(tmp_path, "ftp://nowhere", export=["sensors.>"]))
    agent.cli.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + WAIT

    async def check() -> None:
        async with aiohttp.ClientSession() as http:
            status = await until(http, agent, connected, "the added uplink connected")
            assert status["url"] == hub.url
            async with http.post(f"{agent.url}/v1/publish/sensors.x", data=b"1") as response:
                assert response.status == 202
            await until(http, agent, lambda s: s["exported"] == 1, "exported")
            async with http.get(f"{agent.url}/metrics") as response:
                text = await response.text()
        families = {f.name: f for f in text_string_to_metric_families(text)}
        [sample] = families["zeromesh_uplink_exported"].samples
        assert sample.labels == {"url": hub.url, "prefix": "site1"}
        assert sample.value == 1
        states = {s.labels["state"]: s.value for s in families["zeromesh_uplink_state"].samples}
        assert states == {"connected": 1.0, "connecting": 0.0, "down": 0.0}

    asyncio.run(check())
    agent.cli.term()
    assert agent.cli.wait(timeout=max(1.0, deadline - time.monotonic() + 10)) == 0
    assert "config not reloaded" in agent.cli.stderr()


async def test_a_full_backlog_is_counted_and_logged_once(
        procs: list[Cli], mesh_name: str, tmp_path: Path) -> None:
    """The hub is away and the backlog's quota fills: best-effort messages beyond it are
    dropped and counted, with one log line, never silently."""
    agent = start_agent(procs, mesh=mesh_name, name="edge", tmp=tmp_path,
                        config=config(tmp_path, f"nats://127.0.0.1:{free_port()}",
                                      export=["sensors.>"], more="quota = 65536\n"))
    async with aiohttp.ClientSession() as http:
        for _ in range(40):
            async with http.post(f"{agent.url}/v1/publish/sensors.big",
                                 data=b"x" * 4000) as response:
                assert response.status == 202
        status = await until(http, agent, lambda s: s["backlog"] + s["dropped"] == 40,
                             "every message kept or counted")
    assert status["dropped"] > 0, status
    assert status["backlog"] * 4000 <= 65536, status
    agent.cli.term()
    assert agent.cli.wait(timeout=WAIT) == 0
    log = agent.cli.stderr()
    assert log.count("export backlog full") == 1, log


async def test_tls_with_a_private_ca(nats_server: StartNats, procs: list[Cli], mesh_name: str,
                                     tmp_path: Path) -> None:
    """nats+tls:// with tls_ca: the hub's certificate is checked against our CA file."""
    cert, key = make_certificate(tmp_path)
    hub = nats_server(tls=(cert, key))
    url = f"nats+tls://127.0.0.1:{hub.port}"
    agent = start_agent(procs, mesh=mesh_name, name="edge", tmp=tmp_path,
                        config=config(tmp_path, url, export=["sensors.>"],
                                      more=f'tls_ca = "{cert}"\n'))
    async with aiohttp.ClientSession() as http:
        await until(http, agent, connected, "connected over TLS")
        async with http.post(f"{agent.url}/v1/publish/sensors.t", data=b"secret") as response:
            assert response.status == 202
        await until(http, agent, lambda s: s["exported"] == 1, "exported")
    context = ssl.create_default_context(cafile=str(cert))
    nc = await nats.connect(f"tls://127.0.0.1:{hub.port}", tls=context, allow_reconnect=False)
    try:
        msg = await nc.jetstream().get_msg("ZEROMESH", 1)
    finally:
        await nc.close()
    assert (msg.subject, msg.data) == ("site1.sensors.t", b"secret")
