"""``benchmarks/retained.py --quick --json`` runs to completion and reports both figures.

Its figures are not checked against the issue's targets here (CI machines
vary); only that both measurements and their baselines come from one run.
"""

from __future__ import annotations

import json

import pytest

from tests.test_examples import BENCHMARKS, run


@pytest.mark.timeout(120)
def test_retained_benchmark_quick_run_reports_costs_and_join_time() -> None:
    report = json.loads(run(BENCHMARKS / "retained.py", "--quick", "--json",
                            timeout=110).stdout)
    assert report["topics"] == 500
    for key in ("publish_plain_per_s", "publish_retained_per_s", "join_retained_s",
                "same_as_live_s"):
        assert report[key] > 0, report
