"""`zeromesh spool` on a real data dir, run in-process: what `replay` waits for and reports."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from mesh import AsyncNode, Message
from mesh import _wire as wire
from mesh._reliable._durables import KnownDurables
from mesh._spool import SpoolStore
from mesh.cli import _spool as spool_commands
from mesh.cli._main import build_parser, main
from tests.helpers import free_port

from .conftest import FAST, MakeNode


async def _spool(data: Path, which: str, records: list[wire.Spooled]) -> list[int]:
    """Put `records` into the node's `which` spool ("out" or "dead") while it is down."""
    store = SpoolStore(data / "spool" / which)
    await store.start()
    try:
        return [await store.append(wire.encode_spooled(r)) for r in records]
    finally:
        await store.aclose()


def _job(seq: int, text: str, *, ttl: float | None = None) -> wire.Spooled:
    now = time.time()
    item = wire.Item(seq, now, None, text.encode(), True, "",
                     None if ttl is None else now + ttl)
    return wire.Spooled("q", "jobs", item, attempts=3, reason="nacked by the worker")


_DURABLE = "_durable.0123456789abcdef.audit"


def _waiting_for_an_offline_durable() -> wire.Spooled:
    item = wire.Item(100, time.time(), None, b"for later", True, "orders.new")
    return wire.Spooled("t", "orders.new", item, [_DURABLE])


async def _replay(mesh_name: str, data: Path, port: int, *argv: str,
                  **settings: Any) -> tuple[int, Any]:
    """`zeromesh spool replay --data-dir data ARGV` with the worker at `port` as its seed."""
    args = build_parser().parse_args(["spool", "replay", "--data-dir", str(data), *argv])
    node = AsyncNode(name="replayer", mesh=mesh_name, interfaces=["127.0.0.1"],
                     data_dir=str(data), mdns=False, peers=[f"tcp://127.0.0.1:{port}"],
                     **FAST, **settings)
    return await spool_commands.replay(args, node), node


async def _worker(make_node: MakeNode, port: int, *, fail: bool = False) -> list[str]:
    got: list[str] = []

    def take(msg: Message) -> None:
        got.append(msg.text)
        if fail:
            raise RuntimeError("still not today")

    worker = await make_node("worker", mdns=False, port=port)
    await worker.pull("jobs", handler=take)
    return got


@pytest.mark.timeout(30)
async def test_replay_waits_for_the_messages_it_replayed_not_the_whole_outbox(
        make_node: MakeNode, mesh_name: str, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A message waiting in the outbox for an offline durable is no concern of replay's:
    it counted the whole outbox, so it waited out its timeout and exited 1 with "1 not
    delivered" although both replayed messages had been delivered."""
    data = tmp_path / "node"
    await _spool(data, "out", [_waiting_for_an_offline_durable()])
    await _spool(data, "dead", [_job(1, "job1"), _job(2, "job2")])
    port = free_port()
    got = await _worker(make_node, port)
    code, node = await _replay(mesh_name, data, port, "--timeout", "2")
    out, err = capsys.readouterr()
    assert (code, err) == (0, ""), out
    assert "replaying 2 dead letter(s)" in out
    assert out.splitlines()[-1] == "  2/2 delivered"
    assert sorted(got) == ["job1", "job2"]
    assert node.stats["acked"] == 2


@pytest.mark.timeout(30)
async def test_replay_reports_a_dead_letter_whose_ttl_passed_as_expired_not_delivered(
        make_node: MakeNode, mesh_name: str, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """An expired dead letter replayed left the outbox as expired, and replay counted it
    "1/1 delivered", exit 0. It is reported as expired now, exit 1 (not every replayed
    message was delivered), and leaves the dead letters counted as expired."""
    data = tmp_path / "node"
    await _spool(data, "dead", [_job(1, "stale", ttl=0.001), _job(2, "fresh")])
    port = free_port()
    got = await _worker(make_node, port)
    code, node = await _replay(mesh_name, data, port, "--timeout", "5")
    out, err = capsys.readouterr()
    assert code == 1, (out, err)
    assert "replaying 2 dead letter(s)" in out
    assert out.splitlines()[-1] == "  1/2 delivered, 1 expired"
    assert err == "zeromesh spool replay: 1 expired (their ttl passed before delivery)\n"
    assert got == ["fresh"]
    assert node.stats["expired"] == 1
    assert SpoolStore.peek(data / "spool" / "dead")[0] == []


@pytest.mark.timeout(30)
async def test_replay_reports_a_message_that_fails_again_as_dead_lettered_not_delivered(
        make_node: MakeNode, mesh_name: str, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A replayed message the worker fails again until it is a dead letter once more has
    left the outbox, but was not delivered: exit 1, and it is back in the dead letters."""
    data = tmp_path / "node"
    await _spool(data, "dead", [_job(1, "cursed")])
    port = free_port()
    got = await _worker(make_node, port, fail=True)
    code, _ = await _replay(mesh_name, data, port, "--timeout", "5", max_attempts=2,
                            retry_backoff=0.01)
    out, err = capsys.readouterr()
    assert code == 1, (out, err)
    assert out.splitlines()[-1] == "  0/1 delivered, 1 dead-lettered"
    assert err == "zeromesh spool replay: 1 failed again (back in the dead letters)\n"
    assert got == ["cursed", "cursed"]
    assert len(SpoolStore.peek(data / "spool" / "dead")[0]) == 1


def test_replay_of_an_id_that_is_no_dead_letter_is_a_usage_error(
        mesh_name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`spool replay 999` (a typo, an id from another spool) said "replaying 0 dead
    letter(s)" and exited 0. It is a usage error now, and nothing is replayed, not even
    the ids that do exist."""
    data = tmp_path / "node"
    [dead] = asyncio.run(_spool(data, "dead", [_job(1, "job1")]))
    code = main(["spool", "replay", str(dead), str(dead + 998), "--data-dir", str(data),
                 "--mesh", mesh_name, "--timeout", "1"])
    out, err = capsys.readouterr()
    assert (code, out) == (2, "")
    assert err == (f"zeromesh spool: ID: no dead letter {dead + 998} (`zeromesh spool show` "
                   "lists them); nothing replayed\n")
    assert [i for i, _ in SpoolStore.peek(data / "spool" / "dead")[0]] == [dead]


@pytest.mark.parametrize("action", [["purge"], ["forget", "audit"]])
def test_purge_and_forget_on_a_spool_they_cannot_read_exit_2_without_a_traceback(
        action: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A segment that cannot be read (here a directory in its place) stopped `purge` and
    `forget` with a traceback; the node itself says "spool unusable" at start. They say
    so too now, naming the file, exit 2."""
    data = tmp_path / "node"
    which = "dead" if action == ["purge"] else "out"
    asyncio.run(_spool(data, which, [_job(1, "job1")]))
    KnownDurables(str(data)).learn({_DURABLE: "orders.>"})
    blocker = data / "spool" / which / f"{99:020d}.seg"
    blocker.mkdir()
    code = main(["spool", *action, "--data-dir", str(data)])
    out, err = capsys.readouterr()
    assert (code, out) == (2, "")
    assert err == f"zeromesh spool: data_dir: spool unusable: {blocker}: Is a directory\n"
