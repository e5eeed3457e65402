"""``benchmarks/spool.py --quick --json`` runs to completion with nothing lost, per fsync policy.

The benchmark runs as users run it: a program in a subprocess, on loopback,
under a timeout. Its figures are not checked against the issue's target here
(CI machines vary); only that each policy delivered every message intact and
that the raw fsync floor was measured in the same run.
"""

from __future__ import annotations

import json

import pytest

from tests.test_examples import BENCHMARKS, run


@pytest.mark.timeout(180)
def test_spool_benchmark_quick_run_is_lossless_for_every_fsync_policy() -> None:
    """batch, always and off each deliver all N reliable messages to the durable, none lost."""
    out = run(BENCHMARKS / "spool.py", "--quick", "--json", "--timeout", "60",
              timeout=170).stdout
    report = json.loads(out)
    assert report["benchmark"] == "spool"
    assert report["size"] == 128
    rows = report["results"]
    assert [r["policy"] for r in rows] == ["batch", "always", "off"]
    for row in rows:
        assert row["error"] == "", row
        assert row["lost"] == 0, row
        assert row["received"] == row["count"], row
        assert row["corrupt"] == 0, row
        assert row["publish_msgs_per_s"] > 0, row
        assert row["e2e_msgs_per_s"] > 0, row
        assert row["drained_msgs_per_s"] > 0, row
    floor = report["floor"]
    for kind in ("fsync_per_record", "group_commit_1ms", "group_commit_1ms_at_target"):
        assert floor[kind]["records"] > 0, floor
        assert floor[kind]["fsyncs_per_s"] > 0, floor
