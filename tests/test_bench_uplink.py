"""``benchmarks/uplink.py --quick --json`` runs to completion against the brokers it starts:
for each, the baseline and zeromesh's two paths were measured in the same repetition, every
message published was exported (and, on JetStream, is in the stream), with a ratio, the
fsync mode and the CPU per message beside the figures; and no broker or agent is left.

Its figures are not checked against the issue's target here (CI machines vary).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.test_examples import BENCHMARKS, run
from tests.uplink._binaries import require_binary


@pytest.mark.timeout(90)
def test_uplink_quick_run_exports_every_message_to_both_brokers() -> None:
    require_binary("nats-server", "nats-server")
    require_binary("mosquitto", "mosquitto")
    out = run(BENCHMARKS / "uplink.py", "--quick", "--json", "--timeout", "30",
              timeout=80).stdout
    report = json.loads(out)
    assert report["ok"], report
    assert (report["size"], report["fsync"], report["window"]) == (64, "batch", 256)
    assert report["baseline_window"] == 64
    assert report["loop"] in ("uvloop", "asyncio")
    for kind, ways in (("nats", {"publish_async", "concurrent_publish"}),
                       ("mqtt", {"mqtt_qos1"})):
        part = report[kind]
        assert part["ok"], part
        assert len(part["runs"]) == 1, part
        rep = part["runs"][0]
        assert set(rep["baseline"]) == ways, rep
        for way in ways:
            assert rep["baseline"][way]["acked"] > 0, rep
            assert not rep["baseline"][way]["error"], rep
        assert rep["baseline_msgs_per_s"] == max(rep["baseline"][w]["msgs_per_s"] for w in ways)
        for path in ("best_effort", "reliable"):
            export = rep[path]
            assert export["error"] == "", (kind, path, export)
            assert export["sent"] > 0, (kind, path, export)
            assert export["exported"] == export["sent"], (kind, path, export)
            assert export["on_hub"] == (export["sent"] if kind == "nats" else None), export
            assert export["msgs_per_s"] > 0, (kind, path, export)
            assert set(export["cpu_us"]) == {"agent", "publisher", "broker"}, export
            ratio = rep["ratio"][path]
            assert ratio == pytest.approx(export["msgs_per_s"] / rep["baseline_msgs_per_s"])
            assert part[path]["ratio"]["min"] == part[path]["ratio"]["max"] == ratio, part
    started = {p["program"] for p in report["processes"]}
    assert started == {"nats-server", "mosquitto", "zeromesh agent", "zeromesh publisher"}
    for proc in report["processes"]:  # stopped: gone, or the PID is someone else's now
        try:
            text = Path(f"/proc/{proc['pid']}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            text = ""
        if proc["program"] in ("nats-server", "mosquitto"):
            assert proc["program"] not in text, proc
        elif proc["program"] == "zeromesh agent":
            assert "zm-uplink-bench-" not in text, proc
