"""``benchmarks/memory.py --quick --json`` runs to completion and reports every figure.

Its figures are not checked against the issue's targets here (CI machines
vary); only that both measurements and their baselines come from one run.
"""

from __future__ import annotations

import json

import pytest

from tests.test_examples import BENCHMARKS, run


@pytest.mark.timeout(120)
def test_memory_benchmark_quick_run_reports_costs_join_and_replay() -> None:
    report = json.loads(run(BENCHMARKS / "memory.py", "--quick", "--json",
                            timeout=110).stdout)
    assert report["topics"] == 500
    for key in ("publish_plain_per_s", "publish_retained_per_s", "join_retained_s",
                "same_as_live_s", "publish_history_per_s", "replay_per_s", "live_per_s"):
        assert report[key] > 0, report
