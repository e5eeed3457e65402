"""GET /v1/topology across three hosts of a namespace LAN: every node and its links, and a
SIGKILLed host's node turning lost while its last known links stay."""

from __future__ import annotations

import json
import signal
import time
from typing import Any

import pytest

from tests import netns
from tests.system._meshproc import Agent, start_agents, unique
from tests.system.test_mesh_lan import wait_all_joined

pytestmark = [pytest.mark.netns, pytest.mark.timeout(120)]


def topology(agent: Agent) -> dict[str, Any]:
    """The topology as `agent` answers it (curl in its host's namespace)."""
    assert agent.ready is not None
    url = dict(p.split("=", 1) for p in agent.ready.text.split()[1:])["http"]
    done = agent.host.run(["curl", "-s", "--max-time", "5", f"{url}/v1/topology"], 10)
    assert done.returncode == 0, (done.returncode, url, agent.describe())
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def wait_topology(agent: Agent, ok: Any, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        seen = topology(agent)
        if ok(seen):
            return seen
        assert time.monotonic() < deadline, seen
        time.sleep(0.2)  # polling the endpoint under test, bounded by the deadline


def test_topology_lists_three_nodes_and_their_links_and_a_killed_one_turns_lost(
        lan: netns.Lan) -> None:
    h1, h2, h3 = lan.hosts
    agents = start_agents(unique("topo"), h1, h2, h3)
    try:
        wait_all_joined(agents)
        ids = [a.id for a in agents]
        pairs = {(s, t, "control") for s in ids for t in ids if s != t}

        def complete(seen: dict[str, Any]) -> bool:
            links = {(ln["source"], ln["target"], ln["kind"]) for ln in seen["links"]}
            return pairs <= links and len(seen["nodes"]) == 3

        seen = wait_topology(agents[0], complete, 15)
        nodes = {n["id"]: n for n in seen["nodes"]}
        assert set(nodes) == set(ids)
        assert [n["self"] for n in seen["nodes"]] == [True, False, False]
        assert {n["name"] for n in seen["nodes"]} == {a.name for a in agents}
        assert all(n["state"] == "alive" for n in seen["nodes"])
        assert all(set(ln) == {"source", "target", "kind", "msgs_per_s"}
                   for ln in seen["links"])
        agents[2].send_signal(signal.SIGKILL)
        agents[2].wait_exit(10)
        gone = ids[2]

        def lost(seen: dict[str, Any]) -> bool:
            return any(n["id"] == gone and n["state"] == "lost" for n in seen["nodes"])

        seen = wait_topology(agents[0], lost, 10)
        links = {(ln["source"], ln["target"], ln["kind"]) for ln in seen["links"]}
        assert (gone, ids[0], "control") in links  # its last report is kept
        assert (ids[0], gone, "control") in links
    finally:
        for agent in agents[:2]:
            agent.stop()
