"""``benchmarks/typed.py --quick --json`` runs to completion with nothing lost, both kinds.

Its figures are not checked here (machines vary); only that the untyped and
the typed runs each delivered every message intact (the typed ones decoded).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import quick_benchmark

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "typed.py"


@pytest.mark.timeout(150)
def test_typed_benchmark_quick_run_is_lossless() -> None:
    report = quick_benchmark(SCRIPT)
    assert report["benchmark"] == "typed"
    for kind in ("bytes", "typed"):
        side = report[kind]
        assert (side["lost"], side["corrupt"], side["error"]) == (0, 0, ""), side
        assert side["received"] == report["count"], side
        assert min(side["msgs_per_s"], side["sub_cpu_us"], side["pub_cpu_us"]) > 0, side
    assert min(report["ratio"], report["cpu_ratio"]) > 0
