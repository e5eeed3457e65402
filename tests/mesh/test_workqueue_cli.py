"""`zeromesh push` / `zeromesh pull` end to end: real processes on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import sys

from ._proc import Cli, child_env, run
from .conftest import MakeNode


def test_each_line_goes_to_exactly_one_pull_worker(mesh_name: str) -> None:
    """Two workers with --count 2, four stdin lines pushed: each worker prints two, none twice."""
    workers = [Cli(["pull", "jobs", "--count", "2", "--json", "--prefetch", "1",
                    "--timeout", "20"], mesh=mesh_name) for _ in range(2)]
    try:
        result = run(["push", "jobs", "--wait-workers", "2", "--name", "boss"],
                     mesh=mesh_name, input="a\nb\nc\nd\n")
        assert result.returncode == 0, result.stderr
        outputs = []
        for worker in workers:
            assert worker.wait() == 0
            outputs.append([json.loads(line) for line in worker.all_lines()])
    finally:
        for worker in workers:
            worker.close()
    assert [len(o) for o in outputs] == [2, 2]
    data = sorted(obj["data"] for o in outputs for obj in o)
    assert data == ["a", "b", "c", "d"]
    assert {obj["queue"] for o in outputs for obj in o} == {"jobs"}
    assert {obj["source"] for o in outputs for obj in o} == {"boss"}


def test_push_without_workers_exits_1_with_no_responders(mesh_name: str) -> None:
    """No worker ever appears: exit 1 and the reason on one line."""
    result = run(["push", "jobs", "x", "--timeout", "0.5"], mesh=mesh_name)
    assert result.returncode == 1
    assert "no responders for 'jobs'" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


async def test_push_exits_1_when_its_messages_are_not_consumed_in_time(
        make_node: MakeNode, mesh_name: str) -> None:
    """A worker is handed all three and takes none: at the timeout they are not consumed,
    and being best effort they are lost as the pusher exits. That is a timeout (exit 1,
    one line saying so), not a success."""
    worker = await make_node("worker")
    held = await worker.pull("jobs", prefetch=5)  # (never read: nothing is consumed)
    push = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mesh", "push", "jobs", "--wait-workers", "1", "--timeout", "2",
        env=child_env(mesh_name), stdin=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    try:
        _, err = await asyncio.wait_for(push.communicate(b"a\nb\nc\n"), 30)
    finally:
        if push.returncode is None:
            push.kill()
            await push.wait()
    await held.aclose()
    assert push.returncode == 1, err
    assert err.decode().splitlines() == [
        "zeromesh push: 3 message(s) not consumed within 2 s (best effort: they are lost "
        "when this pusher exits)"]


def test_pull_exits_1_when_nothing_arrives(mesh_name: str) -> None:
    """--count not reached within --timeout: exit 1."""
    result = run(["pull", "jobs", "--count", "1", "--timeout", "0.5"], mesh=mesh_name)
    assert result.returncode == 1


def test_bad_queue_name_is_usage_error(mesh_name: str) -> None:
    """Wildcards are not queue names: exit 2, one line."""
    result = run(["push", "jobs.*", "x"], mesh=mesh_name)
    assert result.returncode == 2
    assert "queue" in result.stderr
    assert "Traceback" not in result.stderr
