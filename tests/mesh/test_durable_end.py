"""Durables end: listing what a publisher spools for, forgetting an abandoned durable (CLI
and library), `durable_expiry` on a running node, and a forgotten durable coming back.

Real nodes over 127.0.0.1 with real data dirs; the CLI runs as child processes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from mesh import AsyncNode, ConfigError, DurableInfo, Node
from mesh._agent._config import load as load_agent_config
from mesh._membership._peers import PeerRecord
from mesh._reliable._durables import KnownDurables
from tests.helpers import aeventually, eventually

from ._proc import Cli, child_env, run
from .conftest import FAST, MakeNode

_PAYLOAD = "x" * 1000
"""A kilobyte per message, so that the spool's bytes on disk say something."""


def _disk(spool: Path) -> tuple[int, int]:
    """(apparent bytes, allocated bytes) of the spool directory's segment files."""
    stats = [f.stat() for f in spool.glob("*.seg")]
    return sum(s.st_size for s in stats), sum(s.st_blocks * 512 for s in stats)


async def _abandoned(make_node: MakeNode, tmp_path: Path, name: str = "audit",
                     pattern: str = "orders.>", **settings: Any) -> tuple[AsyncNode, str]:
    """A publisher that learned durable `name` from a subscriber that is gone since;
    returns the publisher and the durable's queue."""
    pub = await make_node("pub", data_dir=str(tmp_path / "p"), **settings)
    sub = await make_node(f"sub-{name}", data_dir=str(tmp_path / f"s-{name}"))
    await sub.subscribe_durable(pattern, name)
    await pub.wait_for_durables(pattern.replace(">", "x"), 1, timeout=5)
    queue = f"_durable.{sub.id}.{name}"
    await sub.aclose()
    return pub, queue


@pytest.mark.timeout(90)
async def test_cli_lists_an_abandoned_durables_backlog_and_forget_frees_its_disk(
        make_node: MakeNode, mesh_name: str, tmp_path: Path) -> None:
    """`spool durables --json` shows the backlog of a durable whose subscriber is gone;
    `spool forget` empties the outbox and gives the segments' bytes back; a restarted
    publisher no longer spools for it. A name two owners share is refused (exit 2, both
    listed), and so is an unknown one."""
    n = 300
    pub, queue = await _abandoned(make_node, tmp_path)
    other = await make_node("other", data_dir=str(tmp_path / "o"))
    await other.subscribe_durable("elsewhere.>", "audit")  # same name, another owner
    await pub.wait_for_durables("elsewhere.x", 1, timeout=5)
    other_queue = f"_durable.{other.id}.audit"
    await other.aclose()
    started = time.time()
    await pub.publish_many("orders.new", [_PAYLOAD] * n, reliable=True)
    assert pub.spool_pending == n
    await pub.aclose()  # `forget` needs the data dir's lock
    data = str(tmp_path / "p")

    listed = await asyncio.to_thread(run, ["spool", "durables", "--data-dir", data, "--json"],
                                     mesh=mesh_name)
    assert listed.returncode == 0, listed.stderr
    rows = {row["queue"]: row for row in json.loads(listed.stdout)}
    assert set(rows) == {queue, other_queue}
    row = rows[queue]
    assert (row["name"], row["pattern"], row["backlog"]) == ("audit", "orders.>", n)
    assert row["owner"] == queue.split(".")[1]
    assert started - 60 < row["last_seen"] <= time.time()
    assert rows[other_queue]["backlog"] == 0

    ambiguous = await asyncio.to_thread(run, ["spool", "forget", "audit", "--data-dir", data],
                                        mesh=mesh_name)
    assert ambiguous.returncode == 2
    assert len(ambiguous.stderr.splitlines()) == 1, ambiguous.stderr
    assert queue in ambiguous.stderr
    assert other_queue in ambiguous.stderr
    unknown = await asyncio.to_thread(run, ["spool", "forget", "nosuch", "--data-dir", data],
                                      mesh=mesh_name)
    assert unknown.returncode == 2
    assert len(unknown.stderr.splitlines()) == 1
    assert "nosuch" in unknown.stderr
    assert "Traceback" not in unknown.stderr + ambiguous.stderr

    spool = tmp_path / "p" / "spool" / "out"
    before = await asyncio.to_thread(_disk, spool)
    forgot = await asyncio.to_thread(run, ["spool", "forget", queue, "--data-dir", data],
                                     mesh=mesh_name)
    assert forgot.returncode == 0, forgot.stderr
    after = await asyncio.to_thread(_disk, spool)
    print(f"\nspool/out on disk before forget: {before[0]} bytes ({before[1]} allocated); "
          f"after: {after[0]} bytes ({after[1]} allocated); CLI: {forgot.stdout.strip()}")
    assert f"freed {n} message(s)" in forgot.stdout
    assert before[0] > n * len(_PAYLOAD)
    assert after[0] < before[0] // 10
    assert after[1] < before[1]
    ls = await asyncio.to_thread(run, ["spool", "ls", "--data-dir", data, "--json"],
                                 mesh=mesh_name)
    assert json.loads(ls.stdout)["out"]["messages"] == 0
    again = await asyncio.to_thread(run, ["spool", "durables", "--data-dir", data, "--json"],
                                    mesh=mesh_name)
    assert [r["queue"] for r in json.loads(again.stdout)] == [other_queue]

    restarted = await make_node("pub", data_dir=data)
    assert [d.queue for d in restarted.durables()] == [other_queue]
    await restarted.publish_many("orders.new", ["after"] * 10, reliable=True)
    assert restarted.spool_pending == 0  # nobody to spool for any more


async def test_forget_durable_on_a_running_node_frees_its_backlog(make_node: MakeNode,
                                                                  tmp_path: Path) -> None:
    """The library's `forget_durable`: backlog counted, spool emptied, its bytes given back,
    later reliable publishes not spooled for it; bad names are a ConfigError."""
    n = 200
    pub, queue = await _abandoned(make_node, tmp_path)
    await pub.publish_many("orders.new", [_PAYLOAD] * n, reliable=True)
    (info,) = await aeventually(lambda: [d for d in pub.durables() if d.backlog == n])
    assert isinstance(info, DurableInfo)
    assert (info.queue, info.name, info.pattern, info.backlog) == (queue, "audit", "orders.>", n)
    assert info.owner == queue.split(".")[1]
    assert info.last_seen is not None
    used = pub.traffic().spool_bytes
    assert used > n * len(_PAYLOAD)
    with pytest.raises(ConfigError, match="no known durable"):
        await pub.forget_durable("nosuch")
    assert await pub.forget_durable("audit") == n
    assert pub.spool_pending == 0
    assert pub.durables() == []
    await aeventually(lambda: pub.traffic().spool_bytes < used // 10)
    await pub.publish_many("orders.new", ["later"] * 5, reliable=True)
    assert pub.spool_pending == 0
    with pytest.raises(ConfigError, match="no known durable"):
        await pub.forget_durable(queue)


async def test_a_message_for_two_durables_stays_for_the_one_not_forgotten(
        make_node: MakeNode, tmp_path: Path) -> None:
    """Forgetting one of two absent durables with the same pattern keeps the messages
    for the other, also after a restart (they are not sent to the forgotten one again);
    forgetting the second frees them."""
    pub, first = await _abandoned(make_node, tmp_path, "one")
    second_node = await make_node("sub-two", data_dir=str(tmp_path / "s-two"))
    await second_node.subscribe_durable("orders.>", "two")
    await pub.wait_for_durables("orders.x", 2, timeout=5)
    second = f"_durable.{second_node.id}.two"
    await second_node.aclose()
    await pub.publish_many("orders.new", [f"m{i}" for i in range(20)], reliable=True)
    assert await pub.forget_durable("one") == 20
    assert pub.spool_pending == 20
    await pub.aclose()
    pub = await make_node("pub", data_dir=str(tmp_path / "p"))
    assert [(d.queue, d.backlog) for d in pub.durables()] == [(second, 20)]
    assert pub.spool_pending == 20
    assert await pub.forget_durable(second) == 20
    assert pub.spool_pending == 0
    stored = json.loads((tmp_path / "p" / "durables.json").read_text())
    assert first in stored["forgotten"]
    assert stored["durables"] == {}


def test_blocking_node_lists_and_forgets_durables(mesh_name: str, tmp_path: Path) -> None:
    """`Node.durables` and `Node.forget_durable`, the blocking twins."""
    common: dict[str, Any] = {"mesh": mesh_name, "interfaces": ["127.0.0.1"], **FAST}
    with Node(name="p", data_dir=str(tmp_path / "p"), **common) as pub:
        with Node(name="s", data_dir=str(tmp_path / "s"), **common) as sub:
            sub.subscribe_durable("orders.>", "audit")
            pub.wait_for_durables("orders.x", 1, timeout=5)
        pub.publish_many("orders.new", ["a", "b", "c"], reliable=True)
        assert [d.backlog for d in pub.durables()] == [3]
        assert pub.forget_durable("audit") == 3
        assert pub.durables() == []
        assert pub.spool_pending == 0


@pytest.mark.timeout(60)
async def test_durable_expiry_forgets_an_absent_durable_and_keeps_a_present_one(
        make_node: MakeNode, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """With `durable_expiry` 2 s, a running publisher forgets the durable whose subscriber
    is gone (backlog freed, one WARNING line) and keeps the one whose owner is online with
    the same pattern; the gone one, back, is learned again as new and gets only what is
    published after (the gap is lost to it)."""
    caplog.set_level(logging.WARNING, logger="mesh.spool")
    pub = await make_node("pub", data_dir=str(tmp_path / "p"), durable_expiry=2.0)
    here_node = await make_node("here", data_dir=str(tmp_path / "here"))
    here = await here_node.subscribe_durable("orders.>", "here")
    gone_node = await make_node("sub-gone", data_dir=str(tmp_path / "s-gone"))
    await gone_node.subscribe_durable("orders.>", "gone")
    await pub.wait_for_durables("orders.x", 2, timeout=5)
    present, gone = f"_durable.{here_node.id}.here", f"_durable.{gone_node.id}.gone"
    await gone_node.aclose()
    await pub.publish_many("orders.new", [f"gap{i}" for i in range(10)], reliable=True)
    for _ in range(10):
        (await here.next(timeout=5)).ack()

    await aeventually(lambda: [d.queue for d in pub.durables()] == [present], timeout=10)
    await aeventually(lambda: pub.spool_pending == 0, timeout=5)
    lines = [r.getMessage() for r in caplog.records
             if r.levelno == logging.WARNING and gone in r.getMessage()]
    assert len(lines) == 1, lines
    assert "not announced by any peer for" in lines[0]
    assert "10 spooled messages freed" in lines[0]
    assert "lost to it" in lines[0]

    back = await make_node("sub-gone", data_dir=str(tmp_path / "s-gone"))
    durable = await back.subscribe_durable("orders.>", "gone")
    await aeventually(lambda: {d.queue for d in pub.durables()} == {gone, present}, timeout=5)
    await pub.publish("orders.new", "after", reliable=True)
    assert (await durable.next(timeout=5)).text == "after"
    with pytest.raises(TimeoutError):
        await durable.next(timeout=0.5)  # nothing from the gap
    assert (await here.next(timeout=5)).text == "after"  # the present one never stopped


async def test_the_first_durables_json_format_is_still_read(make_node: MakeNode, mesh_name: str,
                                                           tmp_path: Path) -> None:
    """A ``{queue: pattern}`` file from before last_seen: listed (last seen unknown),
    spooled for, and rewritten in the new format with a last_seen by a running node."""
    data = tmp_path / "p"
    (data / "spool").mkdir(parents=True)
    queue = "_durable." + "a" * 32 + ".old"
    (data / "durables.json").write_text(json.dumps({queue: "orders.>"}))
    listed = await asyncio.to_thread(run, ["spool", "durables", "--data-dir", str(data),
                                           "--json"], mesh=mesh_name)
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout) == [{"queue": queue, "name": "old", "owner": "a" * 32,
                                          "pattern": "orders.>", "backlog": 0,
                                          "last_seen": None}]
    text = await asyncio.to_thread(run, ["spool", "durables", "--data-dir", str(data)],
                                   mesh=mesh_name)
    assert "last seen unknown" in text.stdout
    pub = await make_node("pub", data_dir=str(data))
    await pub.publish("orders.new", "kept", reliable=True)
    assert pub.spool_pending == 1
    await pub.aclose()
    stored = json.loads((data / "durables.json").read_text())
    assert stored["v"] == 2
    assert stored["durables"][queue]["pattern"] == "orders.>"
    assert time.time() - 60 < stored["durables"][queue]["last_seen"] <= time.time()


async def test_durable_expiry_must_be_positive(mesh_name: str, tmp_path: Path) -> None:
    """`durable_expiry` <= 0 is a ConfigError (argument, environment, agent file) and
    exit 2 with one line from the CLI."""
    for bad in (0.0, -5.0, float("nan")):
        with pytest.raises(ConfigError, match="durable_expiry"):
            AsyncNode(durable_expiry=bad)
    assert AsyncNode().config.durable_expiry == 7 * 24 * 3600.0
    toml = tmp_path / "agent.toml"
    toml.write_text("durable_expiry = 0\n")
    with pytest.raises(ConfigError, match="durable_expiry"):
        load_agent_config(str(toml), {}, {})
    toml.write_text("durable_expiry = 3600.0\n")
    assert load_agent_config(str(toml), {}, {}).durable_expiry == 3600.0
    assert load_agent_config(None, {"ZEROMESH_DURABLE_EXPIRY": "120"}, {}).durable_expiry == 120
    for args, env in ((["--durable-expiry", "0"], {}), ([], {"ZEROMESH_DURABLE_EXPIRY": "-1"})):
        result = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "mesh", "sub", "orders.>", "--timeout", "1",
                             *args], env={**child_env(mesh_name), **env}, text=True,
            capture_output=True, timeout=20, check=False)
        assert result.returncode == 2, result.stderr
        assert len(result.stderr.splitlines()) == 1
        assert "durable_expiry" in result.stderr


def test_forget_needs_the_data_dir_lock(mesh_name: str, tmp_path: Path) -> None:
    """Like purge, `forget` refuses while a node holds the data dir (exit 2, one line)."""
    with Node(name="p", data_dir=str(tmp_path / "p"), mesh=mesh_name,
              interfaces=["127.0.0.1"]):
        result = run(["spool", "forget", "audit", "--data-dir", str(tmp_path / "p")],
                     mesh=mesh_name)
    assert result.returncode == 2
    assert "in use" in result.stderr
    assert len(result.stderr.splitlines()) == 1


async def test_forgetting_a_durable_whose_owner_is_online_learns_it_again(
        make_node: MakeNode, tmp_path: Path) -> None:
    """Its owner still announces it: the backlog goes, but the durable is learned again at
    once, so its live subscriber keeps getting reliable messages (its live view takes
    best-effort ones only: without its queue it would miss them)."""
    pub = await make_node("pub", data_dir=str(tmp_path / "p"))
    sub = await make_node("sub", data_dir=str(tmp_path / "s"))
    durable = await sub.subscribe_durable("orders.>", "audit")
    await pub.wait_for_durables("orders.x", 1, timeout=5)
    await pub.publish("orders.new", "before", reliable=True)
    (await durable.next(timeout=5)).ack()
    await pub.wait_for_spool(timeout=5)  # its ack is back: no backlog
    assert await pub.forget_durable("audit") == 0
    assert [d.name for d in pub.durables()] == ["audit"]
    await pub.publish("orders.new", "after", reliable=True)
    msg = await durable.next(timeout=5)
    assert (msg.text, msg.reliable) == ("after", True)
    msg.ack()
    await pub.wait_for_spool(timeout=5)


def _known_with(tmp_path: Path, silent: float, clock: list[float]) -> KnownDurables:
    queue = "_durable." + "b" * 32 + ".audit"
    (tmp_path / "durables.json").write_text(json.dumps(
        {"v": 2, "durables": {queue: {"pattern": "a.>", "last_seen": time.time() - silent}}}))
    known = KnownDurables(str(tmp_path), clock=lambda: clock[0])
    known.load()
    known.start_clock()
    return known


def test_silence_carries_over_a_restart_but_owners_get_a_minute_to_say_hello(
        tmp_path: Path) -> None:
    """A durable last seen 8 days before a restart does not expire at once (the node could
    not hear its owner while down): only after the first minute, unless announced in it;
    one seen 1 day before has 6 days left."""
    day, clock = 86400.0, [1000.0]
    known = _known_with(tmp_path, 8 * day, clock)
    (queue,) = known.matching("a.b")
    assert known.stale(7 * day) == []
    clock[0] += 59.0
    assert known.stale(7 * day) == []
    clock[0] += 2.0
    assert [q for q, _ in known.stale(7 * day)] == [queue]
    assert known.stale(7 * day)[0][1] >= 8 * day

    clock[0] = 1000.0
    known = _known_with(tmp_path, 8 * day, clock)
    clock[0] += 30.0
    known.heard([queue])  # its owner said hello in time
    clock[0] += 60.0
    assert known.stale(7 * day) == []

    clock[0] = 1000.0
    known = _known_with(tmp_path, 1 * day, clock)
    clock[0] += 6 * day - 10
    assert known.stale(7 * day) == []
    clock[0] += 20
    assert [q for q, _ in known.stale(7 * day)] == [queue]


@pytest.mark.timeout(60)
def test_an_agent_forgets_an_abandoned_durable_after_durable_expiry(
        mesh_name: str, tmp_path: Path, procs: list[Cli]) -> None:
    """Real processes: `zeromesh agent --durable-expiry 1` learns a `sub --durable` that
    then exits, forgets it a second later (durables.json shows the tombstone, `spool
    durables` read while the agent runs lists nothing) and logs it once on stderr."""
    data = tmp_path / "p"
    agent = Cli(["agent", "--data-dir", str(data), "--durable-expiry", "1"], mesh=mesh_name)
    procs.append(agent)
    agent.line("ready")
    subscriber = Cli(["sub", "orders.>", "--durable", "audit", "--data-dir",
                      str(tmp_path / "s"), "--timeout", "30"], mesh=mesh_name)
    procs.append(subscriber)
    (queue,) = eventually(lambda: list(_stored(data).get("durables", {})), timeout=15)
    assert queue.endswith(".audit")
    subscriber.term()  # a graceful goodbye: gone from the agent's peers at once
    assert subscriber.wait() in (0, 1)
    eventually(lambda: queue in _stored(data).get("forgotten", ()), timeout=15)
    listed = run(["spool", "durables", "--data-dir", str(data), "--json"], mesh=mesh_name)
    assert json.loads(listed.stdout) == []
    agent.term()
    assert agent.wait() == 0
    lines = [line for line in agent.stderr().splitlines() if "not announced" in line]
    assert len(lines) == 1, lines
    assert queue in lines[0]
    assert "WARNING" in lines[0]


def _stored(data: Path) -> dict[str, Any]:
    try:
        stored: dict[str, Any] = json.loads((data / "durables.json").read_text())
    except (OSError, ValueError):
        return {}
    return stored


# -- the owner ends its durable ------------------------------------------------------


def _ended_lines(caplog: pytest.LogCaptureFixture, queue: str) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if queue in r.getMessage() and "ended by its owner" in r.getMessage()]


async def test_an_owner_ends_its_durable_and_its_publisher_frees_the_backlog(
        make_node: MakeNode, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Closing a durable's Pull keeps it (100 wait in the publisher's spool); `end_durable`
    (refused while open) makes the publisher forget it at once: backlog freed, one log
    line, later reliable publishes not spooled. Subscribing to the name again is a new
    durable that gets only what is published after."""
    caplog.set_level(logging.INFO, logger="mesh.spool")
    pub = await make_node("pub", data_dir=str(tmp_path / "p"))
    sub = await make_node("sub", data_dir=str(tmp_path / "s"))
    durable = await sub.subscribe_durable("orders.>", "audit")
    await pub.wait_for_durables("orders.x", 1, timeout=5)
    queue = f"_durable.{sub.id}.audit"
    with pytest.raises(ConfigError, match="is open"):
        await sub.end_durable("audit")
    with pytest.raises(ConfigError, match="single name segment"):
        await sub.end_durable(queue)
    await durable.aclose()
    await pub.publish_many("orders.new", [f"old{i}" for i in range(100)], reliable=True)
    await aeventually(lambda: [d.backlog for d in pub.durables()] == [100])

    assert await sub.end_durable("audit") == 0
    await aeventually(lambda: pub.durables() == [] and pub.spool_pending == 0)
    assert len(_ended_lines(caplog, queue)) == 1
    assert "100 spooled messages freed" in _ended_lines(caplog, queue)[0]
    await pub.publish_many("orders.new", ["gone"] * 10, reliable=True)
    assert pub.spool_pending == 0

    again = await sub.subscribe_durable("orders.>", "audit")
    await pub.wait_for_durables("orders.x", 1, timeout=5)
    await pub.publish("orders.new", "new", reliable=True)
    msg = await again.next(timeout=5)
    assert (msg.text, msg.reliable) == ("new", True)
    msg.ack()
    with pytest.raises(TimeoutError):
        await again.next(timeout=0.3)  # nothing from before the end
    assert _stored(tmp_path / "s")["ended"] == {}
    assert len(_ended_lines(caplog, queue)) == 1


async def test_a_publisher_down_when_the_durable_ended_forgets_it_when_back(
        make_node: MakeNode, tmp_path: Path) -> None:
    """Two publishers are down while the owner ends its durable: one back while the owner
    runs, the other after the owner restarted (the tombstone is kept in its data dir):
    both free the backlog they held for it."""
    pubs = [await make_node(f"pub{i}", data_dir=str(tmp_path / f"p{i}")) for i in (1, 2)]
    sub = await make_node("sub", data_dir=str(tmp_path / "s"))
    await (await sub.subscribe_durable("orders.>", "audit")).aclose()
    for pub in pubs:
        await pub.wait_for_durables("orders.x", 1, timeout=5)
        await pub.publish_many("orders.new", ["m"] * 20, reliable=True)
        await pub.aclose()
    await sub.end_durable("audit")
    queue = f"_durable.{sub.id}.audit"

    first = await make_node("pub1", data_dir=str(tmp_path / "p1"))
    assert first.spool_pending == 20
    await aeventually(lambda: first.spool_pending == 0 and first.durables() == [])
    await sub.aclose()
    assert list(_stored(tmp_path / "s")["ended"]) == [queue]
    sub = await make_node("sub", data_dir=str(tmp_path / "s"))
    second = await make_node("pub2", data_dir=str(tmp_path / "p2"))
    await aeventually(lambda: second.spool_pending == 0 and second.durables() == [])


async def test_an_ended_durable_is_announced_for_durable_expiry(make_node: MakeNode,
                                                                tmp_path: Path) -> None:
    """The tombstone goes after `durable_expiry` (every publisher forgot it by then)."""
    sub = await make_node("sub", data_dir=str(tmp_path / "s"), durable_expiry=0.5)
    await sub.end_durable("audit")
    assert list(_stored(tmp_path / "s")["ended"]) == [f"_durable.{sub.id}.audit"]
    await aeventually(lambda: _stored(tmp_path / "s")["ended"] == {}, timeout=5)


def test_only_its_owner_ends_a_durable(tmp_path: Path) -> None:
    """A peer announcing another node's durable as ended is ignored; its owner is not."""
    owner, other = "a" * 32, "b" * 32
    queue = f"_durable.{owner}.audit"
    known = KnownDurables(str(tmp_path))
    known.learn({queue: "orders.>"})
    known.peer_updated(PeerRecord(other, "other", 1, "", "", ended=(queue,)))
    assert known.knows(queue)
    known.peer_updated(PeerRecord(owner, "owner", 1, "", "", ended=(queue,),
                                  durables={queue: "orders.>"}))
    assert not known.knows(queue)


def test_blocking_node_ends_its_durable(mesh_name: str, tmp_path: Path) -> None:
    """`Node.end_durable`, the blocking twin; no data dir is a ConfigError."""
    common: dict[str, Any] = {"mesh": mesh_name, "interfaces": ["127.0.0.1"], **FAST}
    with Node(name="s", data_dir=str(tmp_path / "s"), **common) as sub:
        sub.subscribe_durable("orders.>", "audit").close()
        assert sub.end_durable("audit") == 0
    with Node(name="n", **common) as bare, pytest.raises(ConfigError, match="data dir"):
        bare.end_durable("audit")
