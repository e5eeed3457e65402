"""A durable subscriber's link is cut for 10 s while reliable messages flow: all arrive."""

from __future__ import annotations

import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests import netns

from ._meshproc import MeshProc, mesh_argv, unique

COUNT = 600
_PUBLISHER = textwrap.dedent("""
    import asyncio, sys, time
    from mesh import AsyncNode
    async def main():
        async with AsyncNode(name="sensor", mesh=sys.argv[1], data_dir=sys.argv[2]) as node:
            await node.wait_for_durables("lan.x", 1, timeout=20)
            print("publishing", flush=True)
            for i in range(int(sys.argv[3])):
                await node.publish("lan.readings", f"r{i}", reliable=True)
                if i % 10 == 0:
                    print(f"sent {i}", flush=True)
                await asyncio.sleep(0.025)
            print("all published", flush=True)
            await node.wait_for_spool(timeout=60)
            print("all delivered", flush=True)
    asyncio.run(main())
""")


@pytest.mark.netns
@pytest.mark.timeout(120)
def test_durable_subscriber_link_cut_for_10_s_gets_everything(lan: netns.Lan, tmp_path: Path) -> None:
    """Cable pulled from the subscriber's host mid-stream for 10 s: nothing is lost."""
    h1, h2 = lan[0], lan[1]
    mesh = unique("dur")
    sub = MeshProc(h2, mesh_argv("sub", h2, mesh, "lan.>", "--durable", "audit", "--data-dir",
                                 str(tmp_path / "s"), "--count", str(COUNT), "--timeout", "100"))
    pub = MeshProc(h1, [sys.executable, "-c", _PUBLISHER, mesh, str(tmp_path / "p"), str(COUNT)])
    pub.wait_line(r"^publishing", timeout=30)
    pub.wait_line(r"^sent 100$", timeout=30)
    h2.cut()
    cut_at = time.monotonic()
    k = 110
    while time.monotonic() - cut_at < 10.0:  # the publisher keeps going through the outage
        assert k < COUNT, "the stream ended before 10 s of outage"
        pub.wait_line(rf"^sent {k}$", timeout=30)
        k += 10
    h2.restore()
    restored_at = time.monotonic()
    assert sub.wait_exit(timeout=60) == 0, sub.describe()
    last = sub.matching(r"^lan\.readings r")[-1]
    got = [line.text.split()[1] for line in sub.matching(r"^lan\.readings r")]
    assert set(got) == {f"r{i}" for i in range(COUNT)}, sub.describe()
    order = [int(r[1:]) for r in dict.fromkeys(got)]
    assert order == sorted(order), "not in the publisher's order"
    print(f"\nlink cut 10 s: {len(got)} delivered ({len(got) - len(set(got))} duplicates); "
          f"backlog drained {last.at - restored_at:.2f} s after the link came back")
    pub.wait_line(r"^all delivered", timeout=30)
