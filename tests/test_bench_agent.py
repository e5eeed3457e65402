"""``benchmarks/agent.py --quick`` prints its table: every row ran, nothing lost, figures > 0.

The benchmark runs as users run it: a program in a subprocess, on loopback,
under a timeout. Its figures are not compared with any target here (CI
machines vary); only that the HTTP publish rows (1 and 16 in flight), the SSE
row and the library baselines from the same run are all there, nonzero, with
a ratio to their baseline and no message lost.
"""

from __future__ import annotations

import re

import pytest

from tests.test_examples import BENCHMARKS, run

ROW = re.compile(r"^\s*(?P<what>\S.*?)\s+(?P<in_flight>\d+|-)\s+(?P<count>\d+)\s+"
                 r"(?P<rate>[\d,]+)\s+(?P<base>[\d,]+|-)\s+(?P<ratio>[\d.e+-]+|-)\s+"
                 r"(?P<lost>\d+)$")


@pytest.mark.timeout(200)
def test_agent_benchmark_quick_run_prints_a_lossless_table_with_ratios() -> None:
    """Library publish/deliver baselines, HTTP publish at 1 and 16 in flight, SSE delivery."""
    out = run(BENCHMARKS / "agent.py", "--quick", "--timeout", "60", timeout=190).stdout
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["what", "in", "flight"], out
    assert set(lines[1]) == {"-"}, out
    rows = [ROW.match(line) for line in lines[2:]]
    assert all(rows), out  # no problem lines: none errored or saw a corrupt payload
    table = {(m["what"], m["in_flight"]): m for m in rows if m}
    assert list(table) == [("publish: AsyncNode.publish", "-"), ("publish: HTTP POST", "1"),
                           ("publish: HTTP POST", "16"), ("deliver: library subscriber", "-"),
                           ("deliver: SSE stream", "-")], out
    for key, m in table.items():
        assert int(m["lost"]) == 0, (key, out)
        assert int(m["count"]) > 0, (key, out)
        assert int(m["rate"].replace(",", "")) > 0, (key, out)
        if key[0].startswith(("publish: HTTP", "deliver: SSE")):
            assert int(m["base"].replace(",", "")) > 0, (key, out)
            assert float(m["ratio"]) > 0, (key, out)
