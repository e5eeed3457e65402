"""``benchmarks/pushpull.py --quick --json`` runs to completion with nothing lost.

The benchmark runs as users run it: a program in a subprocess, on loopback,
under a timeout. Its figures are not checked here (CI machines vary); only
that raw pyzmq and every zeromesh prefetch row delivered every message intact.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "pushpull.py"


@pytest.mark.timeout(150)
def test_pushpull_benchmark_quick_run_is_lossless() -> None:
    """Raw PUSH/PULL and zeromesh (default and extra prefetch) each deliver all N, none lost."""
    env = {**os.environ, "ZEROMESH_INTERFACES": "127.0.0.1", "PYTHONUNBUFFERED": "1"}
    env.pop("ZEROMESH_PEERS", None)
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--json", "--timeout", "40"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=140,
                          check=False)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    report = json.loads(proc.stdout)
    assert report["benchmark"] == "pushpull"
    assert report["size"] == 64
    rows = report["results"]
    assert [r["side"] for r in rows] == ["raw"] + ["zeromesh"] * (len(rows) - 1)
    assert len(rows) >= 3
    assert rows[1]["default_prefetch"]
    assert not any(r["default_prefetch"] for r in rows[2:])
    for row in rows:
        assert row["lost"] == 0, row
        assert row["received"] == report["count"], row
        assert row["corrupt"] == 0, row
        assert row["error"] == "", row
        assert row["msgs_per_s"] > 0, row
    for row in rows[1:]:
        assert row["ratio"] is not None, row
        assert row["ratio"] > 0, row
