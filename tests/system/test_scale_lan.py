"""30 nodes, each its own process on its own host of a namespace LAN: discovery, fan-out,
loss detection, and how connections grow with N.

Figures are printed (run with -s): time for all to see all, fan-out completion, loss
detection spread, TCP connections per node.
"""

from __future__ import annotations

import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Final

import pytest

from tests import netns
from tests.system._meshproc import MeshProc, host_env, mesh_argv, unique

pytestmark = [pytest.mark.netns, pytest.mark.timeout(240)]

N: Final[int] = 30
ROLE: Final[str] = str(Path(__file__).with_name("_scale_role.py"))
ALL_SEEN_WITHIN: Final[float] = 5.0
LOST_AFTER: Final[float] = 1.5
LOSS_MARGIN: Final[float] = 0.6
"""30 processes share 2 cores here: a heartbeat tick can be late by this much."""


@pytest.fixture
def lan30():
    reason = netns.netns_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    with netns.make_lan(N) as lan:
        yield lan


def established(host: netns.Host) -> int:
    done = host.run(["ss", "-Htn", "state", "established"], 10)
    return len([line for line in done.stdout.splitlines() if line.strip()])


def test_thirty_nodes_see_each_other_fan_out_and_notice_a_crash(lan30: netns.Lan) -> None:
    mesh = unique("scale")
    names = [f"n{i:02d}" for i in range(N)]
    nodes = [MeshProc(host, [sys.executable, ROLE, name, mesh])
             for host, name in zip(lan30.hosts, names, strict=True)]
    for node in nodes:
        node.wait_line(r"^ready$", 60)
    last_ready = max(node.matching(r"^ready$")[0].at for node in nodes)

    # 1. discovery: every node reports the 29 others joined
    deadline = last_ready + ALL_SEEN_WITHIN + 30  # generous wait, the assertion is below
    seen_at = []
    for node, name in zip(nodes, names, strict=True):
        for other in names:
            if other != name:
                node.wait_line(rf"^joined {other}$", max(0.1, deadline - time.monotonic()))
        seen_at.append(max(line.at for line in node.matching(r"^joined ")))
    all_seen = max(seen_at) - last_ready
    print(f"\n{N} nodes: all saw all {N - 1} others {all_seen:.2f} s after the last was "
          f"ready (median node {statistics.median(seen_at) - last_ready:.2f} s)")
    assert all_seen <= ALL_SEEN_WITHIN, all_seen

    # connections grow with N: per node, a control link and a subscription to every peer,
    # each counted at both ends (O(N) per node, O(N^2) in the mesh)
    per_node = established(lan30.hosts[0])
    print(f"TCP connections established on one host: {per_node} "
          f"({per_node / (N - 1):.1f} per peer)")
    assert per_node >= 2 * (N - 1)

    # 2. fan-out: one publish reaches all 30
    pub = lan30.hosts[0].run(mesh_argv("pub", lan30.hosts[0], mesh, "scale.hello", "hi all",
                                       "--wait-subscribers", str(N), "--timeout", "30"),
                             60, env=host_env(lan30.hosts[0]))
    assert pub.returncode == 0, pub.stderr
    arrivals = [node.wait_line(r"^got hi all$", 15).at for node in nodes]
    print(f"fan-out: all {N} got the message, arrivals spread over "
          f"{(max(arrivals) - min(arrivals)) * 1000:.0f} ms")

    # 3. a crash: everyone else reports it lost within the loss threshold
    victim, victim_name = nodes[-1], names[-1]
    start = len(nodes[0].lines)
    killed = victim.send_signal(signal.SIGKILL)
    detect = []
    for node in nodes[:-1]:
        line = node.wait_line(rf"^lost {victim_name}$", LOST_AFTER + 10,
                              start=min(start, len(node.lines)))
        detect.append(line.at - killed)
    print(f"SIGKILL of {victim_name}: seen lost by all {N - 1} after "
          f"{min(detect):.2f}-{max(detect):.2f} s (median {statistics.median(detect):.2f} s)")
    assert max(detect) <= LOST_AFTER + LOSS_MARGIN, detect
    for node in nodes[:-1]:
        assert not node.matching(rf"^left {victim_name}$")
