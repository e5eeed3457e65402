"""``benchmarks/scale.py --quick --json`` (N=10 on a namespace LAN) runs to completion and
reports every figure.

Its figures are not checked against issue 16's targets here (test_scale_lan.py does
that); only that one run measures them all. Needs root, like every netns test.
"""

from __future__ import annotations

import json

import pytest

from tests.conftest import _netns_skip_reason
from tests.test_examples import BENCHMARKS, run

pytestmark = pytest.mark.netns


@pytest.mark.timeout(150)
def test_scale_benchmark_quick_run_reports_every_figure() -> None:
    reason = _netns_skip_reason()
    if reason is not None:
        pytest.skip(reason)
    report = json.loads(run(BENCHMARKS / "scale.py", "--quick", "--json", timeout=140).stdout)
    (row,) = report["rows"]
    assert row["nodes"] == row["processes"] == 10, row
    assert not row["errors"], row
    for key in ("start_s", "rss_mb_median", "tcp_max", "members_median"):
        assert row[key] > 0, (key, row)
