"""``benchmarks/features.py --quick --json``: every feature variant and both reliable sides run.

Its figures are not checked here (machines vary); only that each variant of the
pub/sub run delivered every message intact, that the reliable comparison ran
against a real nats-server (none lost, none refused) and that the ratios were
taken within the run.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import quick_benchmark
from tests.uplink._binaries import require_binary, require_module

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "features.py"


@pytest.mark.timeout(170)
def test_features_benchmark_quick_run_covers_every_variant() -> None:
    require_binary("nats-server", "nats-server")
    require_module("nats", "pip install 'zeromesh[bench]'")
    report = quick_benchmark(SCRIPT, timeout=160)
    assert report["benchmark"] == "features"
    assert report["reliable_skipped"] == ""
    variants = report["variants"]
    assert list(variants) == ["plain", "headers", "ttl", "retain", "history"]
    for name, side in variants.items():
        assert (side["lost"], side["corrupt"], side["error"]) == (0, 0, ""), (name, side)
        assert side["received"] == report["count"], (name, side)
        assert min(side["msgs_per_s"], side["sub_cpu_us"], side["pub_cpu_us"]) > 0, side
        assert len(side["ratios"]) == report["repeat"], side
    assert variants["plain"]["ratio"] == 1.0
    reliable = report["reliable"]
    assert reliable["errors"] == []
    assert min(reliable["zeromesh_msgs_per_s"], reliable["jetstream_msgs_per_s"]) > 0
    assert len(reliable["ratios"]) == report["repeat"]
