"""Seeing the mesh through an agent: /v1/events, /v1/topology, dead letters, cross-origin."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from mesh import AsyncNode, Message
from mesh._figures import _merge
from mesh._figures._mesh import FRESH
from tests.helpers import aeventually

from ._agent import start_agent
from ._curl_sse import CurlEvents
from ._proc import Cli
from .conftest import FAST_ENV, MakeNode

pytestmark = pytest.mark.timeout(90)

STATS_KEYS = {"time", "node", "peers", "topics", "queues", "services", "spool", "uplinks"}


@pytest.fixture
def curls() -> Iterator[list[CurlEvents]]:
    opened: list[CurlEvents] = []
    yield opened
    for curl in opened:
        curl.close()


def test_events_tell_joined_left_lost_in_order_and_stats_every_second(
        procs: list[Cli], curls: list[CurlEvents], mesh_name: str) -> None:
    watcher = start_agent(procs, mesh=mesh_name, name="watcher")
    events = CurlEvents(f"{watcher.url}/v1/events")
    curls.append(events)
    _, first, at1 = events.next(["stats"], 10)
    _, second, at2 = events.next(["stats"], 10)
    assert set(first) == STATS_KEYS
    assert set(second) == STATS_KEYS
    assert 0.5 < at2 - at1 < 1.6, at2 - at1
    assert 0.5 < second["time"] - first["time"] < 1.6
    assert first["node"]["id"] == watcher.id
    assert first["node"]["health"] == "ok"
    assert len(first["topics"]) == 0
    assert first["spool"]["fsync"] == "batch"

    graceful = start_agent(procs, mesh=mesh_name, name="graceful")
    kind, data, _ = events.next(["joined", "left", "lost"], 15)
    assert (kind, data) == ("joined", {"id": graceful.id, "name": "graceful",
                                       "state": "alive"})
    graceful.cli.term()
    assert graceful.cli.wait(15) == 0
    kind, data, _ = events.next(["joined", "left", "lost"], 15)
    assert (kind, data["id"], data["name"]) == ("left", graceful.id, "graceful")

    killed = start_agent(procs, mesh=mesh_name, name="killed")
    kind, data, _ = events.next(["joined", "left", "lost"], 15)
    assert (kind, data["id"]) == ("joined", killed.id)
    stats = events.stats_until(lambda s: any(p["id"] == killed.id and p["rtt_ms"] is not None
                                             for p in s["peers"]), 10)
    (peer,) = [p for p in stats["peers"] if p["id"] == killed.id]
    assert peer["name"] == "killed"
    assert peer["state"] == "alive"
    assert 0 <= peer["rtt_ms"] < 1000
    assert peer["last_seen_s"] < 5
    killed.cli.proc.send_signal(signal.SIGKILL)
    kind, data, _ = events.next(["joined", "left", "lost"], 15)
    assert (kind, data) == ("lost", {"id": killed.id, "name": "killed", "state": "lost"})


async def test_a_left_event_says_the_peer_left(make_node: MakeNode) -> None:
    """The event of a peer that said goodbye carried ``"state": "alive"`` (the peer as it
    was last): consumers other than the page read that field."""
    from mesh._agent._seeing import peer_event

    watcher = await make_node("watcher", mdns=False)
    events = watcher.events()
    leaving = await make_node("leaving", mdns=False, peers=watcher.endpoints["ctl"])
    await watcher.wait_for_peers(1, timeout=5)
    await leaving.aclose()
    encoded = [peer_event(await events.next(timeout=5)) for _ in range(2)]
    assert encoded == [
        b'event: %s\ndata: {"id":"%s","name":"leaving","state":"%s"}\n\n'
        % (kind, leaving.id.encode(), state) for kind, state in
        [(b"joined", b"alive"), (b"left", b"left")]]


def test_a_topic_nobody_subscribes_to_has_a_rate(procs: list[Cli], curls: list[CurlEvents],
                                                  mesh_name: str) -> None:
    watcher = start_agent(procs, mesh=mesh_name, name="watcher")
    publisher = Cli(["pub", "lonely.topic"], mesh=mesh_name, stdin=True, env=FAST_ENV)
    procs.append(publisher)
    events = CurlEvents(f"{watcher.url}/v1/events")
    curls.append(events)
    deadline = time.monotonic() + 20

    def rate(stats: dict[str, object]) -> int:
        rows = [t for t in stats["topics"] if t["topic"] == "lonely.topic"]  # type: ignore[attr-defined]
        return int(rows[0]["msgs_per_s"]) if rows else 0

    stats: dict[str, object] = {}
    while time.monotonic() < deadline:  # the publisher is a peer once it is up: keep going
        publisher.proc.stdin.write("x\n" * 20)  # type: ignore[union-attr]
        publisher.proc.stdin.flush()  # type: ignore[union-attr]
        _, stats, _ = events.next(["stats"], 5)
        if rate(stats) > 0:
            break
    assert rate(stats) > 0, stats
    (row,) = [t for t in stats["topics"] if t["topic"] == "lonely.topic"]  # type: ignore[attr-defined]
    assert row["subscribers"] == 0
    assert len(row["spark"]) == 60
    assert row["spark"][-1] > 0
    assert row["bytes_per_s"] == row["msgs_per_s"]  # each message is one line, "x"


def test_peer_rates_count_what_a_publisher_sent_each_subscriber(
        procs: list[Cli], curls: list[CurlEvents], mesh_name: str) -> None:
    """The publisher's own page shows its traffic out to a subscriber (which its PUB
    socket cannot attribute; the subscriber's report does)."""
    publisher = start_agent(procs, mesh=mesh_name, name="publisher")
    subscriber = Cli(["sub", "busy.>", "--name", "sub"], mesh=mesh_name, env=FAST_ENV)
    procs.append(subscriber)
    events = CurlEvents(f"{publisher.url}/v1/events")
    curls.append(events)
    deadline = time.monotonic() + 20
    out = 0
    while time.monotonic() < deadline and not out:
        for _ in range(20):
            subprocess.run(["curl", "-sf", "-X", "POST", f"{publisher.url}/v1/publish/busy.x",
                            "-d", "payload"], check=True, timeout=10, capture_output=True)
        _, stats, _ = events.next(["stats"], 5)
        rows = [p for p in stats["peers"] if p["name"] == "sub"]
        out = int(rows[0]["out_per_s"]) if rows else 0
    assert out > 0


async def _bury(data_dir: Path, n: int) -> None:
    async with AsyncNode(name="burier", data_dir=str(data_dir), mdns=False) as node:
        for i in range(n):
            msg = Message("jobs", f"job {i}".encode(), "burier", node.id, i, time.time())
            await node.dead_letter("jobs", msg, reason="worker said no", attempts=3)


async def test_dead_letters_listed_purged_and_cross_origin_posts_refused(
        procs: list[Cli], mesh_name: str, tmp_path: Path) -> None:
    await _bury(tmp_path / "agent", 3)
    agent = start_agent(procs, "--data-dir", str(tmp_path / "agent"), mesh=mesh_name)
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{agent.url}/v1/dead-letters") as response:
            listed = await response.json()
        assert [d["data_preview"] for d in listed] == ["job 0", "job 1", "job 2"]
        assert {(d["queue"], d["reason"], d["attempts"], d["size"]) for d in listed} == {
            ("jobs", "worker said no", 3, 5)}
        assert set(listed[0]) == {"id", "queue", "topic", "reason", "attempts", "time",
                                  "size", "data_preview"}
        for path in ("purge", "replay"):
            async with http.post(f"{agent.url}/v1/dead-letters/{path}",
                                 headers={"Origin": "http://evil.example"}) as response:
                assert response.status == 403
                assert "cross-origin" in (await response.json())["error"]
        same = {"Origin": agent.url, "Sec-Fetch-Site": "same-origin"}
        async with http.post(f"{agent.url}/v1/dead-letters/purge", headers=same,
                             json={"ids": [listed[0]["id"]]}) as response:
            assert response.status == 200
            assert await response.json() == {"purged": 1}
        async with http.get(f"{agent.url}/v1/dead-letters") as response:
            assert [d["data_preview"] for d in await response.json()] == ["job 1", "job 2"]
        refused = await asyncio.to_thread(
            subprocess.run, ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-X",
                             "POST", "-H", "Sec-Fetch-Site: cross-site",
                             f"{agent.url}/v1/dead-letters/purge"],
            capture_output=True, text=True, timeout=10, check=False)
        assert refused.stdout == "403"
        async with http.post(f"{agent.url}/v1/dead-letters/purge") as response:
            assert await response.json() == {"purged": 2}
        async with http.get(f"{agent.url}/v1/dead-letters") as response:
            assert await response.json() == []
        async with http.post(f"{agent.url}/v1/dead-letters/purge", data=b"[1]") as response:
            assert response.status == 400


async def test_topology_of_two_agents_and_a_publisher(procs: list[Cli], mesh_name: str) -> None:
    a = start_agent(procs, mesh=mesh_name, name="a")
    b = start_agent(procs, mesh=mesh_name, name="b")
    async with aiohttp.ClientSession() as http:
        deadline = time.monotonic() + 15
        topology: dict[str, list[dict[str, object]]] = {}
        kinds: set[tuple[object, object, object]] = set()
        while time.monotonic() < deadline:
            async with http.get(f"{a.url}/v1/topology") as response:
                topology = await response.json()
            kinds = {(ln["source"], ln["target"], ln["kind"]) for ln in topology["links"]}
            if {(a.id, b.id, "control"), (b.id, a.id, "control")} <= kinds:
                break
            await asyncio.sleep(0.2)  # poll the endpoint under test, bounded by the deadline
        nodes = {n["id"]: n for n in topology["nodes"]}
        assert nodes[a.id] == {"id": a.id, "name": "a", "state": "alive", "self": True}
        assert nodes[b.id] == {"id": b.id, "name": "b", "state": "alive", "self": False}
        assert {(a.id, b.id, "control"), (b.id, a.id, "control")} <= kinds


async def test_a_lost_peer_s_last_report_shows_no_traffic_and_no_node_that_left(
        make_node: MakeNode, procs: list[Cli], mesh_name: str) -> None:
    """A SIGKILLed subscriber's last report is kept for the picture, but what it said
    flowed is not shown as flowing still, and a node that left since is not shown (alive,
    on the dead node's word) while this node no longer knows it."""
    watcher = await make_node("watcher")
    publisher = await make_node("publisher")
    killed = Cli(["sub", "busy.>", "--name", "killed"], mesh=mesh_name, env=FAST_ENV)
    procs.append(killed)
    await publisher.wait_for_subscribers("busy.x", 1, timeout=10)
    pub_id = publisher.id

    async def flowing() -> bool:  # the subscriber's report counts the publisher's traffic
        for _ in range(20):
            await publisher.publish("busy.x", b"payload")
        reports = await watcher.gather_figures()
        return any(link.source == pub_id and link.kind == "pubsub" and link.msgs_per_s
                   for r in reports[1:] for link in r.links)

    await aeventually(flowing, timeout=10, interval=0.1)
    killed_id = next(p.id for p in watcher.peers() if p.name == "killed")
    killed.proc.send_signal(signal.SIGKILL)
    await publisher.aclose()
    await aeventually(lambda: [p.state.value for p in watcher.peers()] == ["lost"], timeout=10)
    await asyncio.sleep(FRESH)  # (figures gathered within FRESH s are reused)

    reports = await watcher.gather_figures()
    assert killed_id in {r.id for r in reports}  # its last report is kept...
    topology = _merge.topology(reports, {p.id: p.state.value for p in watcher.peers()})
    assert {n["id"] for n in topology["nodes"]} == {watcher.id, killed_id}  # ...not its peers
    assert [ln for ln in topology["links"] if ln["msgs_per_s"]] == []
    assert all(t["msgs_per_s"] == 0 for t in _merge.topics(reports))
