"""``benchmarks/sidecar.py --quick --json`` runs every row: the bare server and the agent at
1 and 16 in flight, bulk NDJSON with nothing lost, service round trips three ways (direct,
through two agents, through the two floor relays).

Figures are not compared with targets here (CI machines vary); only that each row ran
and produced positive figures.
"""

from __future__ import annotations

import json

import pytest

from tests.test_examples import BENCHMARKS, run


@pytest.mark.timeout(120)
def test_sidecar_benchmark_quick_run_measures_every_row() -> None:
    report = json.loads(run(BENCHMARKS / "sidecar.py", "--quick", "--json",
                            timeout=110).stdout)
    rows = {(r["what"], r["in_flight"]): r for r in report["rows"]}
    for n in (1, 16):
        for what in ("publish: bare aiohttp", "publish: agent"):
            row = rows[what, n]
            assert row["rate"] > 0, row
            assert row["cpu_ratio"] is None or row["cpu_ratio"] >= 0, row
    [bulk] = [r for r in report["rows"] if r["what"].startswith("bulk publish")]
    assert bulk["lost"] == 0, bulk
    assert bulk["rate"] > 0, bulk
    for what in ("service: app called directly", "service: agent -> agent -> app",
                 "service: relay -> relay -> app (floor)"):
        row = rows[what, 1]
        assert 0 < row["p50_us"] <= row["p90_us"], row
        assert row["count"] == 200, row
