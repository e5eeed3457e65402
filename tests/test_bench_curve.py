"""``benchmarks/curve.py --quick --json`` measures every figure with CURVE off and on.

The benchmark runs as users run it: a program in a subprocess, on loopback,
under a timeout. Its figures are not compared here (CI machines vary); only
that every row ran lossless and correct with CURVE off and on, and has an
on/off ratio.
"""

from __future__ import annotations

import json

import pytest

from tests.test_examples import BENCHMARKS, run

FIGURES = ["pubsub_64", "pubsub_1024", "reqrep_p50_us", "reqrep_p99_us",
           "reqrep_requests_per_s"]


@pytest.mark.timeout(200)
def test_curve_benchmark_quick_run_reports_off_on_and_ratio_for_every_figure() -> None:
    """Pub/sub at 64 B and 1 KiB, and request/reply p50, p99 and req/s: both settings nonzero."""
    out = run(BENCHMARKS / "curve.py", "--quick", "--json", "--timeout", "40",
              timeout=180).stdout
    report = json.loads(out)
    assert report["benchmark"] == "curve"
    assert report["ok"] is True, report
    rows = {r["figure"]: r for r in report["results"]}
    assert list(rows) == FIGURES
    for name, row in rows.items():
        for setting in ("off", "on"):
            figure = row[setting]
            assert figure["ok"], (name, setting, figure)
            assert figure["value"] > 0, (name, setting, figure)
        assert row["ratio"] is not None, row
        assert row["ratio"] > 0, row
    for size in (64, 1024):
        for setting in ("off", "on"):
            detail = rows[f"pubsub_{size}"][setting]["detail"]
            assert detail["lost"] == 0, detail
            assert detail["corrupt"] == 0, detail
            assert detail["received"] == rows[f"pubsub_{size}"][setting]["count"], detail
    assert rows["reqrep_p50_us"]["off"]["value"] <= rows["reqrep_p99_us"]["off"]["value"]
    assert rows["reqrep_p50_us"]["on"]["value"] <= rows["reqrep_p99_us"]["on"]["value"]
