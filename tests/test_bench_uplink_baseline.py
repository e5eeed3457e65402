"""``benchmarks/uplink_baseline.py --quick --json`` runs to completion against the brokers
it starts, every message acknowledged, and leaves no broker behind.

Its figures are not checked (CI machines vary); only that each baseline was measured,
nothing was refused or lost, and the JetStream baseline is the better of its two ways.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.test_examples import BENCHMARKS, run
from tests.uplink._binaries import require_binary


@pytest.mark.timeout(120)
def test_uplink_baseline_quick_run_measures_both_brokers() -> None:
    require_binary("nats-server", "nats-server")
    require_binary("mosquitto", "mosquitto")
    out = run(BENCHMARKS / "uplink_baseline.py", "--quick", "--json", "--timeout", "30",
              timeout=100).stdout
    report = json.loads(out)
    assert report["ok"], report
    assert (report["size"], report["window"]) == (64, 64)
    nats = report["nats"]
    for mode in ("publish_async", "concurrent_publish"):
        assert nats[mode]["ok"], nats[mode]
        assert [r["acked"] > 0 for r in nats[mode]["runs"]] == [True], nats[mode]
    assert nats["baseline_msgs_per_s"] == max(nats[m]["median_msgs_per_s"]
                                              for m in ("publish_async", "concurrent_publish"))
    mqtt = report["mqtt"]
    assert mqtt["ok"], mqtt
    assert mqtt["runs"][0]["acked"] > 0, mqtt
    assert mqtt["baseline_msgs_per_s"] > 0, mqtt
    started = {b["program"] for b in report["brokers"]}
    assert started == {"nats-server", "mosquitto"}, report["brokers"]
    for broker in report["brokers"]:  # stopped: gone, or the PID is someone else's now
        exe = Path(f"/proc/{broker['pid']}/exe")
        assert not exe.exists() or exe.resolve().name != broker["program"], broker
