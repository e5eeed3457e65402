"""``benchmarks/typed.py --quick --json`` runs to completion with nothing lost, both kinds.

The benchmark runs as users run it: a program in a subprocess, on loopback,
under a timeout. Its figures are not checked here (machines vary); only that
the untyped and the typed runs each delivered every message intact, decoded.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "typed.py"


@pytest.mark.timeout(150)
def test_typed_benchmark_quick_run_is_lossless() -> None:
    env = {**os.environ, "ZEROMESH_INTERFACES": "127.0.0.1", "PYTHONUNBUFFERED": "1"}
    env.pop("ZEROMESH_PEERS", None)
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--json", "--timeout", "40"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=140,
                          check=False)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    report = json.loads(proc.stdout)
    assert report["benchmark"] == "typed"
    for kind in ("bytes", "typed"):
        side = report[kind]
        assert (side["lost"], side["corrupt"], side["error"]) == (0, 0, ""), side
        assert side["received"] == report["count"], side
        assert side["msgs_per_s"] > 0, side
        assert side["sub_cpu_us"] > 0, side
        assert side["pub_cpu_us"] > 0, side
    assert report["ratio"] > 0
    assert report["cpu_ratio"] > 0
