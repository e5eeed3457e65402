"""The MQTT uplink end to end: `zeromesh agent` processes and a real mosquitto, all on
127.0.0.1. Export through a broker restart, import across an agent restart (exactly once,
headers carried), no loop when a topic goes both ways, a wrong password (down, not
hammered) and a broker absent at start (connected once it comes)."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Final, TypeVar

import aiohttp
import pytest

from mesh._uplink._link import IMPORT_BATCH

from ..mesh._agent import AgentProc, SseStream, start_agent
from ..mesh._proc import Cli
from ..mesh.conftest import FAST_ENV
from ._brokers import Mosquitto, Sub, pub

pytestmark = pytest.mark.timeout(30)

WAIT: Final[float] = 15.0
"""Seconds any one condition here may take."""
TRACEPARENT: Final = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"

T = TypeVar("T")


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    """mosquitto with no cap on what it queues for an offline persistent session (its
    default, 1000, drops the rest: a subscriber away during a restart would miss them)."""
    with Mosquitto(tmp_path / "mosquitto", options=["max_queued_messages 0"]) as running:
        yield running


def agent_config(tmp_path: Path, url: str, *, export: Sequence[str] = (),
                 imports: Sequence[str] = (), extra: str = "") -> str:
    """The agent's TOML: its data dir in `tmp_path`, one MQTT uplink with prefix site1."""
    return (f'data_dir = "{tmp_path / "agent"}"\nhttp = "127.0.0.1:0"\n'
            f'[[uplink]]\nurl = "{url}"\nprefix = "site1"\n'
            f"export = {json.dumps(list(export))}\nimport = {json.dumps(list(imports))}\n"
            f"{extra}")


async def until_awaited(probe: Callable[[], Awaitable[T | None]], what: str,
                        timeout: float = WAIT) -> T:
    """`probe()`'s first truthy answer, asked every 20 ms; fails naming `what` after
    `timeout` s, with the last answer."""
    deadline = time.monotonic() + timeout
    while True:
        last = await probe()
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s; last: {last!r}")
        await asyncio.sleep(0.02)


async def until(check: Callable[[], T | None], what: str, timeout: float = WAIT) -> T:
    """`until_awaited` for a plain function."""
    async def probe() -> T | None:
        return check()
    return await until_awaited(probe, what, timeout)


class Api:
    """The agent's HTTP API, for one test."""

    def __init__(self, http: aiohttp.ClientSession, agent: AgentProc) -> None:
        self.http = http
        self.agent = agent

    async def uplink(self) -> dict[str, Any]:
        async with self.http.get(f"{self.agent.url}/v1/uplinks") as response:
            assert response.status == 200, await response.text()
            links: list[dict[str, Any]] = await response.json()
        assert len(links) == 1, links
        return links[0]

    async def uplink_when(self, check: Callable[[dict[str, Any]], bool], what: str,
                          timeout: float = WAIT) -> dict[str, Any]:
        async def probe() -> dict[str, Any] | None:
            status = await self.uplink()
            return status if check(status) else None
        try:
            return await until_awaited(probe, what, timeout)
        except AssertionError:
            raise AssertionError(f"{what}: not within {timeout} s; "
                                 f"/v1/uplinks: {await self.uplink()}") from None

    async def publish(self, topic: str, data: bytes) -> None:
        """A reliable publish through the agent (answered once in its spool)."""
        url = f"{self.agent.url}/v1/publish/{topic}?reliable=true"
        async with self.http.post(url, data=data) as response:
            assert response.status == 202, await response.text()

    async def spooled(self) -> int:
        """``zeromesh_spool_messages``: reliable messages not yet acknowledged by every
        durable they are for."""
        async with self.http.get(f"{self.agent.url}/metrics") as response:
            text = await response.text()
        for line in text.splitlines():
            if line.startswith("zeromesh_spool_messages "):
                return int(float(line.split()[1]))
        raise AssertionError(f"no zeromesh_spool_messages in /metrics:\n{text}")


def properties(line: str) -> tuple[str, dict[str, str], str]:
    """A `Sub` line: topic, user properties (mosquitto_sub's %P: ``k:v k:v``), payload."""
    topic, props, payload = line.split("|", 2)
    pairs = dict(item.split(":", 1) for item in props.split(" ") if item)
    return topic, pairs, payload


def json_lines(cli: Cli, topic: str) -> list[dict[str, Any]]:
    """What `zeromesh sub --json` printed so far on `topic` (other lines stay read)."""
    while True:
        try:
            cli.line("", timeout=0.001)
        except AssertionError:
            break
    return [m for m in (json.loads(line) for line in cli.stdout if line.startswith("{"))
            if m["topic"] == topic]


async def test_export_survives_a_broker_restart(broker: Mosquitto, procs: list[Cli],
                                                mesh_name: str, tmp_path: Path) -> None:
    """2,000 reliable publishes on sensors.x through the agent's HTTP API reach a
    persistent-session subscriber on the broker, mosquitto SIGTERMed and restarted in the
    middle: every zeromesh-id arrives (duplicates allowed, counted), the backlog empties."""
    total = 2000
    sub = Sub(broker.port, "site1/#", tmp_path / "sub.txt", client_id="e2e-export")
    agent = start_agent(procs, mesh=mesh_name, name="exporter", tmp=tmp_path,
                        config=agent_config(tmp_path, broker.url(), export=["sensors.>"]))
    try:
        await sub.ready()
        async with aiohttp.ClientSession() as http:
            api = Api(http, agent)
            await api.uplink_when(lambda s: s["state"] == "connected", "connected")
            published = 0

            async def publisher(worker: int, workers: int) -> None:
                nonlocal published
                for i in range(worker, total, workers):
                    await api.publish("sensors.x", f"m{i}".encode())
                    published += 1

            started = time.monotonic()
            publishing = asyncio.gather(*(publisher(w, 8) for w in range(8)))
            try:
                await until(lambda: len(sub.read()) >= 300, "300 on the broker")
                at_stop = published, len(sub.read())
                await asyncio.to_thread(broker.stop)
                down_at = published  # publishing goes on, into the backlog
                await until(lambda: published >= min(total, down_at + 200),
                            "200 more published while the broker is down")
                await asyncio.to_thread(broker.start)
                await publishing
            finally:
                publishing.cancel()
            sent_in = time.monotonic() - started

            def complete() -> list[str] | None:
                lines = sub.read()
                ids = {properties(line)[1].get("zeromesh-id") for line in lines}
                return lines if len(ids) >= total else None

            await until(complete, f"{total} ids on the broker")
            status = await api.uplink_when(
                lambda s: s["backlog"] == 0 and s["exported"] >= total, "backlog drained")
    finally:
        sub.close()
    parsed = [properties(line) for line in sub.read()]
    ids = Counter(props["zeromesh-id"] for _, props, _ in parsed)
    assert len(ids) == total
    assert {payload for _, _, payload in parsed} == {f"m{i}" for i in range(total)}
    assert {topic for topic, _, _ in parsed} == {"site1/sensors/x"}
    assert all(props.get("zeromesh-origin") == "site1" for _, props, _ in parsed)
    duplicates = len(parsed) - len(ids)
    assert at_stop[1] < total  # the restart came in the middle
    assert status["state"] == "connected"
    assert status["backlog"] == 0
    assert status["exported"] >= total
    assert status["connects"] == 2
    print(f"\nexport through a mosquitto restart: sent {total}, received {len(parsed)}, "
          f"duplicates {duplicates}; stopped at {at_stop[0]} published / {at_stop[1]} on "
          f"the broker; {sent_in:.1f} s to publish; exported {status['exported']}, "
          f"connects {status['connects']}")


@pytest.mark.parametrize("stop", ["sigterm", "sigkill"])
async def test_import_exactly_once_across_an_agent_restart(
        broker: Mosquitto, procs: list[Cli], mesh_name: str, tmp_path: Path, stop: str
        ) -> None:
    """3,000 QoS 1 publishes on site1/cmd/light (user property traceparent) reach a
    durable `zeromesh sub 'cmd.>'` once each, the agent SIGTERMed (or SIGKILLed) and
    started again on its data dir while they flow; each carries traceparent and
    zeromesh-origin: site1.

    A stopping agent finishes the import batch it is in (up to IMPORT_BATCH = 256), so with
    the stop after 100 and 3,000 in all, some are left for the restarted agent (with
    1,000, an import that publishes each batch at once had sometimes taken them all).
    A killed one finishes nothing: what it had published and marked is recognised when
    the broker delivers it again; what a commit had just put in its spool, the kill
    before its marks were written, is published again (at-least-once, see
    `Uplink._bring_in`): at most the batch in flight."""
    total = 3000
    config = agent_config(tmp_path, broker.url(), imports=["cmd.>"])
    agent = start_agent(procs, mesh=mesh_name, name="importer", tmp=tmp_path, config=config)
    sub = Cli(["sub", "cmd.>", "--durable", "lights", "--data-dir", str(tmp_path / "sub"),
               "--name", "lights", "--json"], mesh=mesh_name, env=FAST_ENV)
    procs.append(sub)
    async with aiohttp.ClientSession() as http:
        api = Api(http, agent)
        await api.uplink_when(lambda s: s["state"] == "connected", "connected")

        async def durable_known() -> bool:
            """A reliable probe reaches the sub only through its durable queue, so once
            one does, the agent spools for the durable (imports are published reliably)."""
            await api.publish("cmd.probe", b"probe")
            return bool(json_lines(sub, "cmd.probe"))

        await until_awaited(durable_known, "the agent knows the durable")
        await pub(broker.port, "site1/cmd/light", [f"light {i}" for i in range(total)],
                  {"traceparent": TRACEPARENT})
        await until(lambda: len(json_lines(sub, "cmd.light")) >= 100,
                    "100 imported before the restart")
        if stop == "sigterm":
            agent.cli.term()
            assert agent.cli.wait() == 0
        else:
            agent.cli.proc.kill()  # (our own child)
            agent.cli.wait()
        at_restart = len(json_lines(sub, "cmd.light"))
    agent = start_agent(procs, mesh=mesh_name, name="importer", tmp=tmp_path, config=config)
    async with aiohttp.ClientSession() as http:
        api = Api(http, agent)
        await pub(broker.port, "site1/cmd/light", ["end"])  # after all the others
        await until(lambda: any(m["data"] == "end" for m in json_lines(sub, "cmd.light")),
                    "the end marker in the mesh")
        # and nothing more can come: the agent's spool holds only what the sub has in hand
        await until_awaited(lambda: _spool_at_most(api, 1), "the agent's spool delivered")
        after = await api.uplink()
    got = [m for m in json_lines(sub, "cmd.light") if m["data"] != "end"]
    payloads = Counter(m["data"] for m in got)
    duplicates = len(got) - len(payloads)
    assert sorted(payloads) == sorted(f"light {i}" for i in range(total))
    if stop == "sigterm":
        assert duplicates == 0, [p for p, n in payloads.items() if n > 1]
        assert len({m["id"] for m in got}) == total
    else:
        assert duplicates <= IMPORT_BATCH, [p for p, n in payloads.items() if n > 1]
    assert at_restart < total  # the restart came in the middle
    for message in got:
        assert message["headers"]["traceparent"] == TRACEPARENT
        assert message["headers"]["zeromesh-origin"] == "site1"
    if stop == "sigterm":  # it acknowledged on the broker all it had imported: nothing
        assert after["duplicates"] == 0  # came back to drop
    print(f"\nimport across an agent {stop}: sent {total}, received {len(got)}, duplicates "
          f"{duplicates}; {at_restart} in the mesh at the restart, imported after it "
          f"{after['imported']} (the marker too), redeliveries dropped {after['duplicates']}")


async def test_no_loop_when_a_topic_goes_both_ways(
        broker: Mosquitto, procs: list[Cli], mesh_name: str, tmp_path: Path) -> None:
    """export and import both cmd.>: a command published on the broker arrives once in the
    mesh and is not sent back; the broker's subscriber sees it once."""
    sub = Sub(broker.port, "site1/#", tmp_path / "sub.txt")
    agent = start_agent(procs, mesh=mesh_name, name="both", tmp=tmp_path,
                        config=agent_config(tmp_path, broker.url(), export=["cmd.>"],
                                            imports=["cmd.>"]))
    try:
        await sub.ready()
        async with aiohttp.ClientSession() as http, \
                http.get(f"{agent.url}/v1/subscribe/cmd.%3E") as response:
            stream = SseStream(response)
            await stream.subscribed()
            api = Api(http, agent)
            await api.uplink_when(lambda s: s["state"] == "connected", "connected")
            await pub(broker.port, "site1/cmd/x", ["switch"])
            # imported, and the export intake has seen it and kept it back
            await api.uplink_when(lambda s: s["imported"] == 1 and s["looped"] >= 1,
                                  "imported and held back")
            # a marker from the mesh, after it: what came before it on either side is all
            await api.publish("cmd.marker", b"marker")
            status = await api.uplink_when(lambda s: s["exported"] == 1, "marker exported")
            events = await stream.events(2)
            lines = await sub.lines(2)
    finally:
        sub.close()
    assert [(e["topic"], e["data"]) for e in events] == [("cmd.x", "switch"),
                                                         ("cmd.marker", "marker")]
    assert events[0]["headers"]["zeromesh-origin"] == "site1"
    assert [(topic, payload) for topic, _, payload in map(properties, lines)] == [
        ("site1/cmd/x", "switch"), ("site1/cmd/marker", "marker")]
    assert sub.read() == lines
    assert (status["imported"], status["exported"], status["looped"]) == (1, 1, 1)
    assert status["duplicates"] == 0
    print(f"\nno loop: in the mesh {len(events) - 1}, on the broker {len(lines) - 1} "
          f"(then the marker); looped {status['looped']}")


async def test_wrong_password_is_down_and_not_hammered(
        procs: list[Cli], mesh_name: str, tmp_path: Path) -> None:
    """The broker refuses the agent's password: state down, the refusal in last_error, one
    attempt (not a retry storm); the mesh works meanwhile, publishes wait in the backlog."""
    with Mosquitto(tmp_path / "auth", users={"mesh": "right"}) as broker:
        agent = start_agent(procs, mesh=mesh_name, name="refused", tmp=tmp_path,
                            config=agent_config(tmp_path, broker.url(), export=["sensors.>"],
                                                extra='user = "mesh"\npassword = "wrong"\n'))
        async with aiohttp.ClientSession() as http:
            api = Api(http, agent)
            down = await api.uplink_when(lambda s: s["state"] == "down", "down")
            assert "Not authorized" in down["last_error"], down
            observed = [down["attempts"]]
            started = time.monotonic()
            while time.monotonic() - started < 3.0:  # three seconds of watching it
                observed.append((await api.uplink())["attempts"])
                await asyncio.sleep(0.1)
            await api.publish("sensors.x", b"waits")
            status = await api.uplink_when(lambda s: s["backlog"] == 1, "in the backlog")
    assert set(observed) <= {1, 2}, observed
    assert status["state"] == "down"
    assert status["connects"] == 0
    assert "Not authorized" in status["last_error"]
    print(f"\nwrong password: {down['last_error']!r}, attempts over 3 s: "
          f"{sorted(set(observed))}")


async def test_unreachable_broker_at_start(procs: list[Cli], mesh_name: str,
                                           tmp_path: Path) -> None:
    """Nothing listens on the broker's port when the agent starts: connecting; a message
    published then waits in the backlog and is delivered once mosquitto comes."""
    broker = Mosquitto(tmp_path / "mosquitto")
    with broker:  # a persistent session for the subscriber, kept while all is down
        sub = Sub(broker.port, "site1/#", tmp_path / "sub.txt", client_id="e2e-late")
        try:
            await sub.ready()
        finally:
            sub.close()
    port = broker.port
    agent = start_agent(procs, mesh=mesh_name, name="early", tmp=tmp_path,
                        config=agent_config(tmp_path, broker.url(), export=["sensors.>"]))
    try:
        async with aiohttp.ClientSession() as http:
            api = Api(http, agent)
            early = await api.uplink_when(  # connecting, and an attempt has failed
                lambda s: s["state"] == "connecting" and s["last_error"], "refused")
            await api.publish("sensors.x", b"before")
            await api.uplink_when(lambda s: s["backlog"] == 1, "in the backlog")
            await asyncio.to_thread(broker.start)
            assert broker.port == port
            status = await api.uplink_when(
                lambda s: s["state"] == "connected" and s["exported"] == 1, "delivered")
        sub = Sub(broker.port, "site1/#", tmp_path / "sub.txt", client_id="e2e-late")
        try:
            lines = await sub.lines(1)
        finally:
            sub.close()
    finally:
        broker.stop()
    assert early["connects"] == 0
    assert "Connection refused" in early["last_error"], early
    assert [(t, p) for t, _, p in map(properties, lines)] == [("site1/sensors/x", "before")]
    assert status["backlog"] == 0
    assert status["last_error"] == ""  # connected: the old error is over
    print(f"\nunreachable at start: {early['last_error']!r}; connected after "
          f"{status['attempts']} attempts, exported {status['exported']}")


async def _spool_at_most(api: Api, count: int) -> bool:
    return await api.spooled() <= count
