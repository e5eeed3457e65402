"""The zeromesh CLI end to end on 127.0.0.1: real processes, exit codes, output formats."""

from __future__ import annotations

import json
import re
import signal
import time
from pathlib import Path

import pytest

from mesh import Node
from mesh.cli._main import build_parser

from ._proc import Cli, run
from .conftest import FAST, FAST_ENV


def start(procs: list[Cli], *args: str, mesh: str, stdin: bool = False) -> Cli:
    proc = Cli(args, mesh=mesh, stdin=stdin)
    procs.append(proc)
    return proc


@pytest.mark.parametrize(("args", "reason"), [
    (["pub"], "the following arguments are required: topic"),
    (["sub", "a..b"], "empty segment"),
    (["pub", "a.*", "x"], "topic"),
    (["sub", ">", "--timeout", "-1"], "must be > 0"),
    (["sub", ">", "--count", "zero"], "not an integer"),
    (["pub", "t", "x", "--interface", "0.0.0.0"], "interfaces"),
    (["pub", "t", "x", "--peer", "http://nope"], "peers"),
    (["pub", "t", "x", "--header", "novalue"], "K=V"),
    (["pub", "t", "x", "--ttl", "0"], "must be > 0"),
    (["pub", "t", "x", "--ttl", "x"], "not a number"),
    (["push", "q", "x", "--ttl", "-1"], "must be > 0"),
    (["push", "q", "x", "--ttl", "inf"], "finite"),
    (["sub", ">", "--timeout", "nan"], "finite"),
    (["sub", ">", "--timeout", "inf"], "finite"),
    (["pub", "t", "x", "--timeout", "nan"], "finite"),
    (["push", "q", "x", "--timeout", "NaN"], "finite"),
    (["pull", "q", "--timeout", "nan"], "finite"),
    (["req", "s", "x", "--timeout", "nan"], "finite"),
    (["peers", "--wait", "nan"], "finite"),
    (["last", ">", "--timeout", "1e999"], "finite"),
    (["serve", "s", "--exec", "cat", "--exec-timeout", "nan"], "finite"),
    (["sub", ">", "--since", "nan"], "positive duration"),
    (["sub", ">", "--since", "infm"], "positive duration"),
    (["agent", "--mesh", "has space"], "mesh"),
    (["frobnicate"], "invalid choice"),
])
def test_bad_usage_exits_2_with_one_line_and_no_traceback(args: list[str], reason: str,
                                                          mesh_name: str) -> None:
    """Every user error is exit 2 and a single line on stderr naming the problem."""
    result = run(args, mesh=mesh_name)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert reason in lines[0]
    assert "Traceback" not in result.stderr


def test_agent_prints_ready_and_stops_gracefully_on_sigterm(procs: list[Cli], mesh_name: str) -> None:
    """The ready line carries id and endpoints; SIGTERM is a goodbye and exit 0."""
    agent = start(procs, "agent", "--name", "a1", mesh=mesh_name)
    ready = agent.line("ready", timeout=10)
    assert re.match(rf"ready name=a1 id=[0-9a-f]{{32}} mesh={mesh_name} "
                    r"ctl=tcp://127\.0\.0\.1:\d+ pub=tcp://127\.0\.0\.1:\d+ "
                    r"http=http://127\.0\.0\.1:\d+$", ready)
    agent.term()
    assert agent.wait() == 0
    assert agent.line("stopped") == "stopped"


def test_sub_json_receives_stdin_lines_published_with_wait_subscribers(procs: list[Cli], mesh_name: str) -> None:
    """pub without DATA sends one message per stdin line; sub --json prints one object each."""
    sub = start(procs, "sub", "logs.>", "--count", "3", "--json", "--timeout", "20",
                mesh=mesh_name)
    result = run(["pub", "logs.app", "--wait-subscribers", "1", "--name", "writer"],
                 mesh=mesh_name, input="one\ntwo\nthree\n")
    assert result.returncode == 0, result.stderr
    assert sub.wait() == 0
    objs = [json.loads(sub.line("{")) for _ in range(3)]
    assert [o["data"] for o in objs] == ["one", "two", "three"]
    assert {o["topic"] for o in objs} == {"logs.app"}
    assert {o["source"] for o in objs} == {"writer"}
    assert len({o["id"] for o in objs}) == 3


def test_pub_reading_stdin_stops_at_ctrl_c(procs: list[Cli], mesh_name: str) -> None:
    """Ctrl-C while pub waits for its next stdin line (a terminal, an open pipe): it
    waited for that line, or the end of stdin, before exiting (asyncio's executor thread
    blocked in the read was joined at exit)."""
    with Node(name="reader", mesh=mesh_name, interfaces=["127.0.0.1"], **FAST) as node:
        sub = node.subscribe("logs.>")
        pub = start(procs, "pub", "logs.app", "--wait-subscribers", "1", mesh=mesh_name,
                    stdin=True)
        assert pub.proc.stdin is not None
        pub.proc.stdin.write("one\n")
        pub.proc.stdin.flush()
        assert sub.next(timeout=15).data == b"one"  # it reads stdin now; the pipe stays open
        pub.proc.send_signal(signal.SIGINT)
        assert pub.wait(timeout=5) == 130


def test_a_command_stopped_by_sigterm_leaves_the_mesh(procs: list[Cli], mesh_name: str) -> None:
    """SIGTERM (what `timeout` and service managers send) killed peers, pub, push and req
    on the spot: their peers reported them lost, not left (sub, pull, serve and the agent
    left), and the exit status was the signal's."""
    with Node(name="watcher", mesh=mesh_name, interfaces=["127.0.0.1"], **FAST) as node:
        events = node.events()
        child = Cli(["peers", "--wait", "30", "--name", "short"], mesh=mesh_name,
                    env=FAST_ENV)
        procs.append(child)
        joined = events.next(timeout=15)
        assert (joined.kind.value, joined.peer.name) == ("joined", "short")
        child.term()
        assert child.wait(timeout=5) == 143
        gone = events.next(timeout=5)
        assert (gone.kind.value, gone.peer.name) == ("left", "short")


def test_sub_json_gives_bytes_that_are_not_text_in_base64(procs: list[Cli],
                                                          mesh_name: str) -> None:
    """No byte is lost to a replacement character: as in the agent's JSON, data that is
    not UTF-8 comes in base64 with ``"encoding": "base64"``."""
    sub = start(procs, "sub", "bin.>", "--count", "2", "--json", "--timeout", "20",
                mesh=mesh_name)
    with Node(name="writer", mesh=mesh_name, interfaces=["127.0.0.1"], **FAST) as node:
        node.wait_for_subscribers("bin.x", 1, timeout=15)
        node.publish("bin.x", b"\xff\x00\x01")
        node.publish("bin.x", "café")
    assert sub.wait() == 0
    raw, text = (json.loads(sub.line("{")) for _ in range(2))
    assert (raw["data"], raw["encoding"]) == ("/wAB", "base64")
    assert text["data"] == "café"
    assert "encoding" not in text


def test_pub_without_wait_reaches_a_running_subscriber(procs: list[Cli], mesh_name: str) -> None:
    """Plain `pub TOPIC DATA` finds already-running subscribers before it sends."""
    agent = start(procs, "agent", mesh=mesh_name)
    agent.line("ready")
    sub = start(procs, "sub", "news", "--count", "1", mesh=mesh_name)
    agent.line("joined")  # the subscriber is up and in the mesh
    result = run(["pub", "news", "hello world"], mesh=mesh_name)
    assert result.returncode == 0, result.stderr
    assert sub.wait() == 0
    assert sub.line("news") == "news hello world"


def test_pub_exits_1_and_publishes_nothing_without_enough_subscribers(mesh_name: str) -> None:
    """--wait-subscribers N that never come: exit 1, reason on stderr."""
    started = time.monotonic()
    result = run(["pub", "t", "x", "--wait-subscribers", "1", "--timeout", "0.5"], mesh=mesh_name)
    assert result.returncode == 1
    assert "nothing published" in result.stderr
    assert time.monotonic() - started < 10


def test_sub_exits_1_when_the_timeout_comes_first(mesh_name: str) -> None:
    """--count N not reached within --timeout: exit 1."""
    result = run(["sub", ">", "--count", "1", "--timeout", "0.5"], mesh=mesh_name)
    assert result.returncode == 1
    assert result.stdout == ""


def test_peers_json_lists_others_never_itself(procs: list[Cli], mesh_name: str) -> None:
    """`peers --json` is a list of objects with the contract's fields."""
    agent = start(procs, "agent", "--name", "listed", mesh=mesh_name)
    agent.line("ready")
    result = run(["peers", "--wait", "0.5", "--json", "--name", "asker"], mesh=mesh_name)
    assert result.returncode == 0, result.stderr
    peers = json.loads(result.stdout)
    assert [p["name"] for p in peers] == ["listed"]
    assert {"id", "name", "state", "endpoints", "last_seen"} <= set(peers[0])
    assert peers[0]["state"] == "alive"


def test_peers_exits_1_when_alone(mesh_name: str) -> None:
    """Nobody out there: empty list and exit 1."""
    result = run(["peers", "--wait", "0.3", "--json"], mesh=mesh_name)
    assert result.returncode == 1
    assert json.loads(result.stdout) == []


def test_sigkilled_agent_is_reported_lost_within_the_threshold(procs: list[Cli], mesh_name: str) -> None:
    """No goodbye after SIGKILL: heartbeats stop and the peer is lost within 1.5 s."""
    watcher = start(procs, "agent", "--name", "watcher", mesh=mesh_name)
    watcher.line("ready")
    victim = start(procs, "agent", "--name", "victim", mesh=mesh_name)
    victim.line("ready")
    watcher.line("joined name=victim")
    killed = time.monotonic()
    victim.proc.kill()
    watcher.line("lost name=victim", timeout=5)
    took = time.monotonic() - killed
    print(f"loss detected {took:.3f} s after SIGKILL")
    assert took <= 1.5 + 0.2  # 0.2 s for reading the line across processes


def test_restarted_agent_rejoins_with_the_same_id(procs: list[Cli], mesh_name: str, tmp_path: Path) -> None:
    """Same data dir after a crash: same id, and peers see it join again."""
    watcher = start(procs, "agent", "--name", "watcher", mesh=mesh_name)
    watcher.line("ready")
    first = start(procs, "agent", "--name", "phoenix", "--data-dir", str(tmp_path), mesh=mesh_name)
    found = re.search(r"id=(\w+)", first.line("ready"))
    assert found is not None
    node_id = found.group(1)
    watcher.line("joined name=phoenix")
    first.proc.kill()
    watcher.line("lost name=phoenix", timeout=5)
    second = start(procs, "agent", "--name", "phoenix", "--data-dir", str(tmp_path),
                   mesh=mesh_name)
    assert f"id={node_id}" in second.line("ready")
    assert f"id={node_id}" in watcher.line("joined name=phoenix", timeout=5)


@pytest.mark.timeout(120)
def test_spool_commands_find_the_data_dir_in_zeromesh_data_dir(mesh_name: str,
                                                               tmp_path: Path) -> None:
    """ZEROMESH_DATA_DIR stands for --data-dir in every spool command, as in every other."""
    data = tmp_path / "node"
    made = run(["pub", "t", "x", "--reliable", "--data-dir", str(data), "--timeout", "2"],
               mesh=mesh_name)
    assert made.returncode == 0, made.stderr
    env = {"ZEROMESH_DATA_DIR": str(data)}
    listed = run(["spool", "ls", "--json"], mesh=mesh_name, env=env)
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout)["dead"]["messages"] == 0
    shown = run(["spool", "show"], mesh=mesh_name, env=env)
    assert (shown.returncode, shown.stderr) == (1, "")  # no dead letters: nothing shown
    durables = run(["spool", "durables", "--json"], mesh=mesh_name, env=env)
    assert (durables.returncode, durables.stdout) == (0, "[]\n"), durables.stderr
    purged = run(["spool", "purge"], mesh=mesh_name, env=env)
    assert purged.returncode == 0, purged.stderr
    assert "purged 0 message(s)" in purged.stdout
    forgot = run(["spool", "forget", "nobody"], mesh=mesh_name, env=env)
    assert forgot.returncode == 2  # (it got as far as looking for the durable)
    assert forgot.stderr.startswith("zeromesh spool: durable: no known durable 'nobody'")
    replayed = run(["spool", "replay", "--timeout", "5"], mesh=mesh_name, env=env)
    assert replayed.returncode == 0, replayed.stderr


def test_spool_replay_with_no_dead_letters_exits_0_at_once(mesh_name: str,
                                                          tmp_path: Path) -> None:
    """No dead letters, but a push waiting in the outbox for a worker: replay printed
    "0/0 delivered", waited its whole --timeout for that push and exited 1 ("1 not
    delivered"), as if a replay had failed."""
    data = str(tmp_path / "node")
    pushed = run(["push", "jobs", "x", "--reliable", "--data-dir", data, "--timeout", "0.5"],
                 mesh=mesh_name)
    assert pushed.returncode == 0, pushed.stderr
    started = time.monotonic()
    replayed = run(["spool", "replay", "--data-dir", data, "--timeout", "10"], mesh=mesh_name)
    assert (replayed.returncode, replayed.stdout, replayed.stderr) == (
        0, "replaying 0 dead letter(s)\n", "")
    assert time.monotonic() - started < 8


@pytest.mark.parametrize("action", ["ls", "show", "replay", "purge", "durables"])
def test_spool_commands_on_a_dir_with_no_spool_exit_2_and_make_nothing(
        action: str, mesh_name: str, tmp_path: Path) -> None:
    """No spool there: exit 2 with one line, and no data dir is made (`replay` made one)."""
    missing = tmp_path / "missing"
    result = run(["spool", action, "--data-dir", str(missing)], mesh=mesh_name)
    assert result.returncode == 2, result.stderr
    assert result.stderr == f"zeromesh spool: --data-dir: {missing} has no spool\n"
    assert not missing.exists()


_NODE_FLAGS = ["--mesh", "elsewhere", "--interface", "127.0.0.1", "--peer",
               "tcp://127.0.0.1:9", "--data-dir", "/nonexistent/zeromesh"]


def test_top_and_keygen_accept_the_node_flags(mesh_name: str, tmp_path: Path) -> None:
    """DESIGN: every command takes --mesh/--interface/--peer/--data-dir; top and keygen
    accept them (no usage error) and run as without them."""
    top = run(["top", "--agent", "http://127.0.0.1:9", *_NODE_FLAGS], mesh=mesh_name,
              timeout=30)
    assert top.returncode == 1, top.stderr
    assert top.stderr.startswith("zeromesh top: cannot reach the agent at http://127.0.0.1:9")
    keys = run(["keygen", "--out", str(tmp_path), *_NODE_FLAGS], mesh=mesh_name)
    assert keys.returncode == 0, keys.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["node.key", "node.key_secret"]


def test_keygen_takes_a_file_name_stem_only(mesh_name: str, tmp_path: Path) -> None:
    """`--name ../x` wrote the keys outside `--out` (and `--name ''` wrote '.key'): a
    usage error now, exit 2 with one line, and nothing written."""
    out = tmp_path / "keys"
    for name in ("../escaped", ""):
        keys = run(["keygen", "--out", str(out), "--name", name], mesh=mesh_name)
        assert keys.returncode == 2, keys.stderr
        assert keys.stderr.startswith("zeromesh keygen: --name: name "), keys.stderr
        assert len(keys.stderr.splitlines()) == 1
    assert sorted(p.name for p in tmp_path.rglob("*")) == []


def test_demo_accepts_the_node_flags_and_keeps_its_interface() -> None:
    """`demo` takes them too; --interface is still the demo nodes' address."""
    args = build_parser().parse_args(["demo", *_NODE_FLAGS[:2], "--interface", "::1",
                                      *_NODE_FLAGS[4:]])
    assert args.interface == "::1"
