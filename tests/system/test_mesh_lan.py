"""The `zeromesh` CLI across hosts of a namespace LAN: discovery, isolation, pub/sub, liveness.

Every node is a real ``python -m mesh`` process inside a host namespace of a
LAN the test built (tests/netns.py), bound to that host's 10.77.x.y address.
Timings (discovery latency, loss detection, rejoin) are measured from the
arrival times of the processes' own output lines and printed (run with -s).
"""

from __future__ import annotations

import signal
import statistics
import subprocess
import time
from typing import Any, Final

import pytest

from tests import netns
from tests.system._meshproc import (
    Agent,
    MeshProc,
    StdinPub,
    host_env,
    json_lines,
    mesh_argv,
    start_agents,
    unique,
)

pytestmark = pytest.mark.netns

HEARTBEAT: Final[float] = 0.5
LOST_AFTER: Final[float] = 1.5
"""Defaults (DESIGN: a silent peer is lost after 1.5 s)."""
LOSS_MARGIN: Final[float] = 0.35
"""Allowed lateness of a `lost` event past LOST_AFTER (a tick, scheduling, our reader)."""
JOIN_TIMEOUT: Final[float] = 10.0
DISCOVERY_ROUNDS: Final[int] = 5


def run_cli(host: netns.Host, mesh: str, command: str, *args: str, timeout: float,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
    """``zeromesh COMMAND ARGS`` on ``host`` to completion (bounded)."""
    return host.run(mesh_argv(command, host, mesh, *args), timeout, input=input,
                    env=host_env(host))


def json_lines_one(line: str) -> dict[str, Any]:
    """The one JSON object on ``line``."""
    (obj,) = json_lines(line)
    assert isinstance(obj, dict), line
    return obj


def wait_all_joined(agents: list[Agent], timeout: float = JOIN_TIMEOUT) -> None:
    """Each agent prints ``joined`` for every other one."""
    for agent in agents:
        for other in agents:
            if other is not agent:
                agent.wait_event("joined", other.name, timeout)


# -- 1. discovery -------------------------------------------------------------------


def test_agents_on_three_hosts_discover_each_other_fast(lan: netns.Lan) -> None:
    """Agents on h1..h3 each report the other two joined; a new agent is seen within ~0.25 s.

    The latency is from the new agent's ``ready`` line (excludes interpreter
    start-up) to h1's ``joined`` line, over fresh nodes that start, join,
    leave gracefully (``left`` on h1) and exit 0.
    """
    h1, h2, h3 = lan.hosts
    mesh = unique("disc")
    agents = start_agents(mesh, h1, h2, h3)
    wait_all_joined(agents)
    a1, a2, a3 = agents
    a3.stop()
    a1.wait_event("left", a3.name, 5)

    from_ready: list[float] = []
    from_start: list[float] = []
    for _ in range(DISCOVERY_ROUNDS):
        new = Agent(h3, mesh).wait_ready()
        assert new.ready is not None
        joined = a1.wait_event("joined", new.name, JOIN_TIMEOUT)
        a2.wait_event("joined", new.name, JOIN_TIMEOUT)
        from_ready.append(joined.at - new.ready.at)
        from_start.append(joined.at - new.started)
        mark = len(a1.lines)
        new.stop()
        a1.wait_event("left", new.name, 5, start=mark)
    print(f"\ndiscovery h3 -> h1 over {DISCOVERY_ROUNDS} fresh agents: "
          f"from ready median {statistics.median(from_ready) * 1000:.0f} ms "
          f"max {max(from_ready) * 1000:.0f} ms; "
          f"from process start median {statistics.median(from_start) * 1000:.0f} ms "
          f"max {max(from_start) * 1000:.0f} ms")
    assert statistics.median(from_ready) < 0.25, from_ready
    assert max(from_ready) < 1.0, from_ready
    for agent in (a1, a2):
        agent.stop()


# -- 2. mesh isolation ---------------------------------------------------------------


def test_other_mesh_is_invisible_and_gets_no_messages(lan: netns.Lan) -> None:
    """A node of another mesh is never listed by `peers` nor joined, and its `sub` gets nothing.

    Positive controls make the negatives meaningful: the same `peers` on h1
    lists the same-mesh agent on h2, the other mesh's own nodes do see each
    other, and the same-mesh subscriber does receive what was published.
    """
    h1, h2, h3 = lan.hosts
    mesh, other = unique("iso"), unique("iso-other")
    a1 = Agent(h1, mesh)
    a2 = Agent(h2, mesh)
    b3 = Agent(h3, other)
    for agent in (a1, a2, b3):
        agent.wait_ready()
    wait_all_joined([a1, a2])

    # The other mesh's subscriber on h2, same pattern as ours on h3.
    theirs = MeshProc(h2, mesh_argv("sub", h2, other, "iso.>", "--name", unique("b-sub"),
                                    "--count", "1", "--timeout", "30", "--json"))
    b3.wait_line(r"^joined name=b-sub-", JOIN_TIMEOUT)  # it is up, in its own mesh
    ours = MeshProc(h3, mesh_argv("sub", h3, mesh, "iso.>", "--name", unique("a-sub"),
                                  "--count", "2", "--timeout", "10", "--json"))

    listed = run_cli(h1, mesh, "peers", "--wait", "1.5", "--json", timeout=20)
    assert listed.returncode == 0, listed.stderr
    (peers,) = json_lines(listed.stdout)
    names = {p["name"] for p in peers}
    assert {a1.name, a2.name} <= names, peers  # a1 shares h1 with this `peers` node
    (p2,) = [p for p in peers if p["name"] == a2.name]
    assert (p2["id"], p2["state"]) == (a2.id, "alive"), p2
    assert a2.ctl in p2["endpoints"], p2
    assert b3.name not in names, peers
    assert not any(p["name"].startswith("b-sub-") for p in peers), peers
    assert all(p["id"] != b3.id for p in peers), peers

    seen_by_other = run_cli(h1, other, "peers", "--wait", "1.5", "--json", timeout=20)
    assert seen_by_other.returncode == 0, seen_by_other.stderr
    other_names = {p["name"] for p in json_lines(seen_by_other.stdout)[0]}
    assert b3.name in other_names
    assert a1.name not in other_names
    assert a2.name not in other_names

    pub = StdinPub(h1, mesh, "iso.data", "--wait-subscribers", "1", "--timeout", "10")
    pub.write("first\nsecond\n")
    assert ours.wait_exit(15) == 0, ours.describe()
    pub.finish()
    assert [m["data"] for m in map(json_lines_one, ours.texts())] == ["first", "second"]

    theirs.send_signal(signal.SIGTERM)  # still waiting: nothing reached it
    assert theirs.wait_exit(10) == 1, theirs.describe()
    assert theirs.texts() == [], theirs.describe()
    for agent in (a1, a2):
        assert not agent.matching(rf"name=({b3.name}|b-sub-)"), agent.describe()
    assert not b3.matching(rf"name=({a1.name}|{a2.name}|a-sub-)"), b3.describe()
    for agent in (a1, a2, b3):
        agent.stop()


# -- 3. pub/sub with wildcards -------------------------------------------------------


def test_wildcard_subscribers_get_exactly_the_matching_topics(lan: netns.Lan) -> None:
    """`sensors.*.temp` on h2 and `sensors.>` on h3 each get exactly their topics from h1.

    One `pub` per topic on h1, each waiting for the subscribers its topic
    matches (topics matching neither are published without waiting). Only
    once every one of them has published does a last `pub` send a message
    matching both, and each subscriber's --count includes it: a stray
    delivery would be counted first, so the last message would be missing
    or another one would be. Every message's data and `source` are checked.
    """
    h1, h2, h3 = lan.hosts
    mesh = unique("wild")
    pub_name = unique("pub-h1")
    sub_temp = MeshProc(h2, mesh_argv("sub", h2, mesh, "sensors.*.temp", "--json",
                                      "--count", "3", "--timeout", "25"))
    sub_all = MeshProc(h3, mesh_argv("sub", h3, mesh, "sensors.>", "--json",
                                     "--count", "6", "--timeout", "25"))
    subs = {"sensors.*.temp": sub_temp, "sensors.>": sub_all}
    # topic -> the subscribers (by pattern) it matches
    topics = {
        "sensors.kitchen.temp": ["sensors.*.temp", "sensors.>"],
        "sensors.garage.temp": ["sensors.*.temp", "sensors.>"],
        "sensors.kitchen.humidity": ["sensors.>"],
        "sensors.garage.door.temp": ["sensors.>"],  # * is exactly one segment
        "sensors.kitchen": ["sensors.>"],
        "sensors": [],  # > is one or more segments
        "other.kitchen.temp": [],
        "sensorsX.kitchen.temp": [],
    }
    waiting: list[StdinPub] = []
    unmatched: list[MeshProc] = []
    for topic, matching in topics.items():
        if matching:
            pub = StdinPub(h1, mesh, topic, "--name", pub_name, "--timeout", "15",
                           "--wait-subscribers", str(len(matching)))
            pub.write(f"payload of {topic}\n")
            waiting.append(pub)
        else:
            unmatched.append(MeshProc(h1, mesh_argv("pub", h1, mesh, topic, f"payload of {topic}",
                                                    "--name", pub_name)))
    for topic, matching in topics.items():
        for pattern in matching:
            subs[pattern].wait_line(f'"topic": "{topic}"', 20)
    for proc in unmatched:
        assert proc.wait_exit(15) == 0, proc.describe()

    last = StdinPub(h1, mesh, "sensors.last.temp", "--name", pub_name,
                    "--wait-subscribers", "2", "--timeout", "15")
    last.write("the end\n")
    assert sub_temp.wait_exit(20) == 0, sub_temp.describe()
    assert sub_all.wait_exit(20) == 0, sub_all.describe()
    for pub in [*waiting, last]:
        pub.finish()

    got_temp = [json_lines_one(t) for t in sub_temp.texts()]
    got_all = [json_lines_one(t) for t in sub_all.texts()]
    for got in (got_temp, got_all):
        for msg in got:
            assert msg["source"] == pub_name, msg
            expected = "the end" if msg["topic"] == "sensors.last.temp" else (
                f"payload of {msg['topic']}")
            assert msg["data"] == expected, msg
            assert msg["id"], msg
        assert got[-1]["topic"] == "sensors.last.temp", got
        assert len({m["id"] for m in got}) == len(got), got
    assert sorted(m["topic"] for m in got_temp) == sorted(
        ["sensors.kitchen.temp", "sensors.garage.temp", "sensors.last.temp"])
    assert sorted(m["topic"] for m in got_all) == sorted(
        ["sensors.kitchen.temp", "sensors.garage.temp", "sensors.kitchen.humidity",
         "sensors.garage.door.temp", "sensors.kitchen", "sensors.last.temp"])


# -- 4. link cut and restore ---------------------------------------------------------


@pytest.mark.parametrize("silent", [False, True], ids=["link-down", "silent-drop"])
def test_cut_link_is_lost_then_rejoins_and_pubsub_resumes(lan: netns.Lan, silent: bool) -> None:
    """h2 unplugged: h1 reports it lost within 1.5 s (+margin); plugged back: joined, pub/sub works.

    Both kinds of cut: the cable pulled (carrier lost) and a port that
    silently drops everything. A subscriber on h2 that started before the
    cut and lived through it receives a message published from h1 after the
    link is restored.
    """
    h1, h2, _ = lan.hosts
    mesh = unique("cut")
    a1, a2 = start_agents(mesh, h1, h2)
    wait_all_joined([a1, a2])
    sub = MeshProc(h2, mesh_argv("sub", h2, mesh, "after.cut", "--json", "--name",
                                 unique("sub-h2"), "--count", "1", "--timeout", "40"))
    a1.wait_line(r"^joined name=sub-h2-", JOIN_TIMEOUT)

    mark1, mark2 = len(a1.lines), len(a2.lines)
    cut_at = time.monotonic()
    h2.cut(silent=silent)
    lost = a1.wait_event("lost", a2.name, LOST_AFTER + 3, start=mark1)
    a2.wait_event("lost", a1.name, LOST_AFTER + 3, start=mark2)
    detect = lost.at - cut_at

    mark1 = len(a1.lines)
    restored_at = time.monotonic()
    h2.restore()
    rejoined = a1.wait_event("joined", a2.name, 15, start=mark1)
    a2.wait_event("joined", a1.name, 15, start=mark2)
    rejoin = rejoined.at - restored_at
    print(f"\nlink cut ({'silent drop' if silent else 'link down'}): h1 reported h2 lost after {detect * 1000:.0f} ms "
          f"(lost_after {LOST_AFTER} s); rejoined {rejoin * 1000:.0f} ms after restore")
    assert LOST_AFTER - HEARTBEAT - 0.2 <= detect <= LOST_AFTER + LOSS_MARGIN, detect
    assert not a1.matching(rf"^left name={a2.name}"), a1.describe()

    pub = StdinPub(h1, mesh, "after.cut", "--wait-subscribers", "1", "--timeout", "15")
    pub.write("back again\n")
    assert sub.wait_exit(20) == 0, sub.describe()
    pub.finish()
    (msg,) = [json_lines_one(t) for t in sub.texts()]
    assert (msg["topic"], msg["data"]) == ("after.cut", "back again")
    for agent in (a1, a2):
        agent.stop()


# -- 5. SIGKILL ----------------------------------------------------------------------


def test_killed_agent_is_reported_lost(lan: netns.Lan) -> None:
    """An agent on h2 killed with SIGKILL (no goodbye) is reported lost by h1 within 1.5 s + margin."""
    h1, h2, _ = lan.hosts
    mesh = unique("kill")
    a1, a2 = start_agents(mesh, h1, h2)
    wait_all_joined([a1, a2])
    killed_at = a2.send_signal(signal.SIGKILL)
    assert a2.wait_exit(5) == -signal.SIGKILL
    lost = a1.wait_event("lost", a2.name, LOST_AFTER + 3)
    detect = lost.at - killed_at
    print(f"\nSIGKILL: h1 reported h2 lost after {detect * 1000:.0f} ms (lost_after {LOST_AFTER} s)")
    assert LOST_AFTER - HEARTBEAT - 0.2 <= detect <= LOST_AFTER + LOSS_MARGIN, detect
    assert not a1.matching(rf"^left name={a2.name}"), a1.describe()
    a1.stop()


# -- 6. CLI end to end ---------------------------------------------------------------


def test_cli_pub_stdin_lines_reach_sub_in_order(lan: netns.Lan) -> None:
    """`pub` on h2 sends 3 stdin lines once 1 subscriber is there; `sub --count 3` prints them.

    The subscriber on h1 exits 0 after the three messages, in order.
    """
    h1, h2, _ = lan.hosts
    mesh = unique("cli")
    pub_name = unique("pub-h2")
    sub = MeshProc(h1, mesh_argv("sub", h1, mesh, "chat.*", "--json", "--count", "3",
                                 "--timeout", "20"))
    pub = run_cli(h2, mesh, "pub", "chat.room", "--name", pub_name, "--wait-subscribers", "1",
                  "--timeout", "15", timeout=25, input="one\ntwo\nthree\n")
    assert pub.returncode == 0, pub.stderr
    assert sub.wait_exit(15) == 0, sub.describe()
    got = [json_lines_one(t) for t in sub.texts()]
    assert [m["data"] for m in got] == ["one", "two", "three"]
    assert {(m["topic"], m["source"]) for m in got} == {("chat.room", pub_name)}


def test_cli_pub_without_subscribers_times_out_with_exit_1(lan: netns.Lan) -> None:
    """`pub --wait-subscribers 1 --timeout 1` with nobody subscribed exits 1 after about 1 s."""
    h1 = lan.hosts[0]
    started = time.monotonic()
    done = run_cli(h1, unique("lonely"), "pub", "nobody.listens", "hello",
                   "--wait-subscribers", "1", "--timeout", "1", timeout=15)
    took = time.monotonic() - started
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert done.stdout == ""
    assert "nothing published" in done.stderr
    assert "Traceback" not in done.stderr
    assert 1.0 <= took < 5.0, took


# -- 7. static peers -----------------------------------------------------------------


def test_static_peer_without_mdns_joins(lan: netns.Lan) -> None:
    """With --no-mdns, an agent given --peer tcp://<h1>:7700 and the agent on h1 both report joined.

    Neither announces on mDNS (a browsing `peers` on h3 finds nobody), and when
    h1's agent restarts on the same port, h2 sees it leave and the new one join.
    """
    h1, h2, h3 = lan.hosts
    mesh = unique("static")
    static1 = ["--no-mdns", "--port", "7700"]
    a1 = Agent(h1, mesh, extra=static1).wait_ready()
    assert a1.ctl == f"tcp://{h1.ip}:7700", a1.ready
    a2 = Agent(h2, mesh, extra=["--no-mdns", "--peer", a1.ctl]).wait_ready()
    wait_all_joined([a1, a2])

    browsing = run_cli(h3, mesh, "peers", "--wait", "1.5", "--json", timeout=20)
    assert browsing.returncode == 1, (browsing.stdout, browsing.stderr)

    a1.stop()
    a2.wait_event("left", a1.name, 5)
    again = Agent(h1, mesh, extra=static1).wait_ready()
    a2.wait_event("joined", again.name, JOIN_TIMEOUT)
    again.wait_event("joined", a2.name, JOIN_TIMEOUT)
    for agent in (again, a2):
        agent.stop()


# -- bugs found ----------------------------------------------------------------------

EXITING_PUBS: Final[int] = 12
EXITING_ROUNDS: Final[int] = 4
"""Measured: about 2 rounds in 3 lose at least one message, so 4 rounds miss the bug ~1%."""


def test_pub_that_exits_at_once_delivers_to_the_subscriber_it_waited_for(lan: netns.Lan) -> None:
    """Every `pub --wait-subscribers 1 T DATA` that exits 0 has its message reach the subscriber.

    DESIGN: once the wait is over, a message published reaches those
    subscribers. Several publishers on h1 finish at about the same time; the
    subscriber on h2 must get every message. Fails today (see the report):
    the publisher's Bye (control channel) can be handled before its data
    (pub/sub channel), and the subscriber then disconnects its SUB from that
    publisher, which makes libzmq discard the data still queued.
    """
    h1, h2, _ = lan.hosts
    for round_ in range(EXITING_ROUNDS):
        mesh = unique("exit")
        sub = MeshProc(h2, mesh_argv("sub", h2, mesh, "exit.>", "--json",
                                     "--count", str(EXITING_PUBS), "--timeout", "6"))
        pubs = [MeshProc(h1, mesh_argv("pub", h1, mesh, f"exit.t{i}", f"m{i}",
                                       "--wait-subscribers", "1", "--timeout", "8"))
                for i in range(EXITING_PUBS)]
        for pub in pubs:
            assert pub.wait_exit(15) == 0, pub.describe()
        rc = sub.wait_exit(15)
        got = sorted(json_lines_one(t)["data"] for t in sub.texts())
        missing = sorted({f"m{i}" for i in range(EXITING_PUBS)} - set(got))
        assert not missing, (
            f"round {round_}: {len(missing)} of {EXITING_PUBS} messages published "
            f"(pub exit 0) never arrived: {missing}")
        assert rc == 0, f"round {round_}: everything arrived, yet the subscriber exited {rc}"
