"""`zeromesh push` / `zeromesh pull` end to end: real processes on 127.0.0.1."""

from __future__ import annotations

import json

from ._proc import Cli, run


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


def test_push_exits_1_when_its_messages_are_not_consumed_in_time(mesh_name: str) -> None:
    """The only worker is handed all three, takes one and stops: the two it gives back
    are a timeout (exit 1, one line saying so), not a success."""
    worker = Cli(["pull", "jobs", "--count", "1", "--prefetch", "5", "--timeout", "20"],
                 mesh=mesh_name)
    try:
        result = run(["push", "jobs", "--wait-workers", "1", "--timeout", "3"],
                     mesh=mesh_name, input="a\nb\nc\n")
        assert worker.wait() == 0
    finally:
        worker.close()
    assert result.returncode == 1, result.stderr
    assert "2 message(s) not consumed within 3 s" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


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
