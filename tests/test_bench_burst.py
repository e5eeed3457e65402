"""``benchmarks/burst.py --quick --json`` runs to completion and reports delays.

The benchmark runs as users run it: a program in a subprocess, on loopback, under a
timeout. Its figures are not checked here (CI machines vary); only that every case ran
on both sides, that zeromesh (lossless with its defaults) delivered the whole burst, and
that the delay percentiles are ordered and positive.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import quick_benchmark

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "burst.py"


@pytest.mark.timeout(150)
def test_burst_benchmark_quick_run_reports_every_case() -> None:
    """Pub/sub 64 B and 1 KiB and push/pull 64 B, raw and zeromesh: each received the
    burst (raw pub/sub may drop at its HWM; zeromesh and raw push/pull lose nothing)."""
    report = quick_benchmark(SCRIPT)
    assert report["benchmark"] == "burst"
    rows = report["results"]
    assert [(r["pattern"], r["size"], r["side"]) for r in rows] == [
        (pattern, size, side) for pattern, size in (("pubsub", 64), ("pubsub", 1024),
                                                    ("pushpull", 64))
        for side in ("raw", "zeromesh")]
    for row in rows:
        assert row["error"] == "", row
        assert 0 < row["p50_ms"] <= row["p99_ms"] <= row["max_ms"], row
        assert row["msgs_per_s"] > 0, row
        if row["side"] == "zeromesh" or row["pattern"] == "pushpull":
            assert row["lost"] == 0, row
        else:
            assert 0 <= row["lost"] < row["count"], row
