"""Work queues across hosts of a namespace LAN: exactly-once split, and a worker cut off mid-stream.

Every node is a real process inside a host namespace of a LAN the test built
(tests/netns.py), bound to that host's 10.77.x.y address and found by mDNS.
Workers are ``zeromesh pull`` CLI processes; the pusher is ``zeromesh push``
reading stdin, or, where the test needs to see what the pusher saw (loss
detection, its ``lost_in_flight`` count), a small library program on h1.
Every wait has a deadline; nothing sleeps to let things settle.
"""

from __future__ import annotations

import json
import signal
import sys
from typing import Any, Final

import pytest

from tests import netns
from tests.system._meshproc import MeshProc, json_lines, mesh_argv, unique

pytestmark = pytest.mark.netns

JOBS: Final[int] = 40
AFTER_LOSS: Final[int] = 100
"""Pushes the cut-off test makes after its pusher has seen the worker lost."""

_PUSHER: Final[str] = r'''
import asyncio, json, sys
from mesh import AsyncNode

MESH, IP, AFTER = sys.argv[1], sys.argv[2], int(sys.argv[3])

def out(**fields):
    print(json.dumps(fields), flush=True)

async def main():
    async with AsyncNode(name="boss", mesh=MESH, interfaces=[IP]) as node:
        events = node.events()
        await node.wait_for_workers("jobs", 2, timeout=20)
        out(event="workers", count=node.worker_count("jobs"))
        pushed, lost_at = 0, None

        async def watch():
            nonlocal lost_at
            while True:
                ev = await events.next()
                if ev.kind.value == "lost":
                    lost_at = pushed
                    out(event="lost", peer=ev.peer.name, at=lost_at,
                        lost_in_flight=node.stats["lost_in_flight"])
                    return

        watcher = asyncio.create_task(watch())
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60
        while lost_at is None or pushed < lost_at + AFTER:
            if loop.time() > deadline:
                out(event="timeout", pushed=pushed)
                return 1
            await node.push("jobs", f"m{pushed}", timeout=5)
            pushed += 1
            await asyncio.sleep(0.005)
        await watcher
        out(event="done", pushed=pushed, lost_at=lost_at,
            lost_in_flight=node.stats["lost_in_flight"])
        # Stay a peer until the test has read the workers' output.
        await asyncio.to_thread(sys.stdin.read)
    return 0

sys.exit(asyncio.run(main()))
'''


def pull(host: netns.Host, mesh: str, *args: str) -> MeshProc:
    """``zeromesh pull jobs --json ARGS`` on ``host``."""
    return MeshProc(host, mesh_argv("pull", host, mesh, "jobs", "--json", *args))


def received(worker: MeshProc) -> list[str]:
    """The ``data`` of every message the worker printed, in order."""
    objs: list[dict[str, Any]] = json_lines("\n".join(worker.texts()))
    assert all(o["queue"] == "jobs" for o in objs), worker.describe()
    return [o["data"] for o in objs]


@pytest.mark.timeout(120)
def test_each_stdin_line_goes_to_exactly_one_worker_across_hosts(lan: netns.Lan) -> None:
    """``push --wait-workers 2`` on h1, ``pull --count K`` on h2 and h3: every line printed once.

    40 lines, each worker exits 0 after 20. Whichever worker reaches its
    count first hands what it holds unprinted back (graceful leave), so the
    other gets exactly the rest: the union is every line and no line twice.
    The pusher keeps its stdin open until both workers are done, so it is
    there to re-queue.
    """
    h1, h2, h3 = lan.hosts
    mesh = unique("wq")
    count = str(JOBS // 2)
    workers = [pull(h, mesh, "--count", count, "--timeout", "40") for h in (h2, h3)]
    pusher = MeshProc(h1, mesh_argv("push", h1, mesh, "jobs", "--wait-workers", "2",
                                    "--timeout", "20", "--name", "boss"), stdin=True)
    lines = [f"line-{i:02d}" for i in range(JOBS)]
    pusher.write("".join(f"{line}\n" for line in lines))
    for worker in workers:
        assert worker.wait_exit(40) == 0, worker.describe() + "\n" + pusher.describe()
    pusher.close_stdin()
    assert pusher.wait_exit(15) == 0, pusher.describe()

    got = [received(w) for w in workers]
    print(f"\nsplit over the LAN: h2 {len(got[0])}, h3 {len(got[1])} of {JOBS}")
    assert [len(g) for g in got] == [JOBS // 2, JOBS // 2], [w.describe() for w in workers]
    assert sorted(got[0] + got[1]) == lines
    sources = {json.loads(t)["source"] for w in workers for t in w.texts()}
    assert sources == {"boss"}


@pytest.mark.timeout(120)
def test_pushes_keep_succeeding_on_h2_after_worker_on_h3_is_cut_off(lan: netns.Lan) -> None:
    """Cutting h3's link mid-stream: the pusher sees its worker lost and every later push lands on h2.

    A library pusher on h1 pushes ``m0, m1, ...`` every 5 ms to workers on h2
    and h3. Once h3 has printed a few, its cable is pulled (``host.cut()``).
    The pusher notices (a ``lost`` peer event) and pushes 100 more, each of
    which must return (never raise) and reach h2. Nothing is printed twice,
    and whatever neither worker printed is at most what the pusher counted as
    ``lost_in_flight`` (best effort: messages in the cut worker's pipe go
    with it).
    """
    h1, h2, h3 = lan.hosts
    mesh = unique("wqcut")
    w2 = pull(h2, mesh, "--timeout", "90")
    w3 = pull(h3, mesh, "--timeout", "90")
    pusher = MeshProc(h1, [sys.executable, "-c", _PUSHER, mesh, h1.ip, str(AFTER_LOSS)],
                      stdin=True)
    pusher.wait_line(r'"event": "workers"', 30)
    w3.wait_line(r".", 15, start=4)  # h3 has printed five: mid-stream
    h3.cut()
    lost = json.loads(pusher.wait_line(r'"event": "lost"', 10).text)
    done = json.loads(pusher.wait_line(r'"event": "(done|timeout)"', 30).text)
    assert done["event"] == "done", pusher.describe()
    pushed = [f"m{i}" for i in range(done["pushed"])]
    after_loss = pushed[lost["at"]:]
    assert len(after_loss) == AFTER_LOSS
    w2.wait_line(rf'"data": "{after_loss[-1]}"', 15)

    got2, got3 = received(w2), received(w3)
    assert len(set(got2)) == len(got2), "a message twice"
    assert len(set(got3)) == len(got3), "a message twice"
    assert not set(got2) & set(got3), "a message on both workers"
    assert set(after_loss) <= set(got2), sorted(set(after_loss) - set(got2))
    missing = set(pushed) - set(got2) - set(got3)
    print(f"\ncut h3 after {len(got3)} of its messages; pusher saw it lost at push "
          f"{lost['at']}; {len(pushed)} pushed, h2 printed {len(got2)}, h3 {len(got3)}, "
          f"{len(missing)} lost, pusher counted lost_in_flight={done['lost_in_flight']}")
    assert len(missing) <= done["lost_in_flight"], (sorted(missing), done)

    pusher.close_stdin()
    assert pusher.wait_exit(15) == 0, pusher.describe()
    w2.send_signal(signal.SIGTERM)
    assert w2.wait_exit(15) == 0, w2.describe()
