"""``benchmarks/reqrep.py --quick`` runs as users run it: both sides answer every request."""

from __future__ import annotations

import json

import pytest

from tests.test_examples import BENCHMARKS, run


@pytest.mark.timeout(120)
def test_reqrep_benchmark_quick_run_answers_every_request_correctly() -> None:
    """Raw and zeromesh report latency and throughput, with no wrong reply and no error."""
    out = run(BENCHMARKS / "reqrep.py", "--quick", "--json", "--timeout", "40",
              timeout=100).stdout
    report = json.loads(out)
    assert report["benchmark"] == "reqrep"
    for side in ("raw", "zeromesh"):
        result = report[side]
        assert result["error"] == "", (side, result)
        assert result["wrong"] == 0, (side, result)
        assert result["latency_count"] == 1000, (side, result)
        assert result["throughput_count"] == 5000, (side, result)
        assert 0 < result["p50_us"] <= result["p99_us"], (side, result)
        assert result["requests_per_s"] > 0, (side, result)
    assert report["ratios"]["p50"] > 0
