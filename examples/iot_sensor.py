"""An IoT sensor publishes reliably through an outage of its consumer; nothing is lost.

A sensor node publishes a temperature reading every 50 ms with
``publish(..., reliable=True)``: each returns once the reading is on disk in
the sensor's spool. A dashboard node consumes them through a *durable*
subscription (``subscribe_durable``), acknowledging each after recording it.

After a second the dashboard stops (the outage, 30 s by default). The sensor
does not notice anything: it keeps publishing, and its spool holds what the
dashboard has not acknowledged. Then the dashboard starts again with the
same data dir, so the same identity and the same durable subscription, and
receives the backlog, then the live readings. When the sensor is done, the
example compares what was sent with what was received: every reading arrived
(duplicates, possible around the stop, are counted and dropped).

Everything stays on 127.0.0.1 with static peering (the dashboard dials the
sensor); the mesh name is random and both data dirs are temporary.

Run: ``python examples/iot_sensor.py`` (or ``--outage 5`` for a shorter outage)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from mesh import AsyncNode, Message

LOOPBACK = ["127.0.0.1"]
INTERVAL = 0.05
"""Seconds between readings."""
BEFORE = 1.0
"""Seconds of normal operation before the outage, and after the dashboard returns."""
DURABLE = "dashboard"


def reading(n: int) -> str:
    """The n-th reading: a slow wave around 21 degrees."""
    return f"{n} {21 + 2 * math.sin(n / 40):.2f}"


class Dashboard:
    """The consumer: one durable subscription; the node can be stopped and started again."""

    def __init__(self, mesh: str, data_dir: str, sensor: list[str]) -> None:
        self._settings: dict[str, Any] = {"name": "dashboard", "mesh": mesh, "interfaces": LOOPBACK,
                          "mdns": False, "peers": sensor, "data_dir": data_dir}
        self.node: AsyncNode | None = None
        self.received: dict[int, str] = {}
        self.duplicates = 0
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> str:
        """Start the node and consume; returns the durable's queue (for the sensor to await)."""
        self.node = AsyncNode(**self._settings)
        await self.node.start()
        readings = await self.node.subscribe_durable("sensors.>", DURABLE)
        self._task = asyncio.create_task(self._consume(readings))
        return f"_durable.{self.node.id}.{DURABLE}"

    async def _consume(self, readings: AsyncIterator[Message]) -> None:
        async for msg in readings:
            if not msg.reliable:
                continue
            n = int(msg.text.split()[0])
            if n in self.received:
                self.duplicates += 1
            self.received[n] = msg.text
            msg.ack()  # after recording it: a stop before this means a redelivery, not a loss

    async def stop(self) -> None:
        assert self.node is not None
        assert self._task is not None
        await self.node.aclose()  # ends the iteration
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(self._task, 5)
        self.node = self._task = None


async def main(outage: float) -> int:
    task = asyncio.current_task()  # SIGTERM stops it as Ctrl-C does: the data dirs go too
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    mesh = f"example-{uuid.uuid4().hex[:12]}"
    with tempfile.TemporaryDirectory(prefix="zeromesh-iot-") as tmp:
        sensor_dir, dashboard_dir = Path(tmp, "sensor"), Path(tmp, "dashboard")
        async with AsyncNode(name="sensor", mesh=mesh, interfaces=LOOPBACK, mdns=False,
                             data_dir=str(sensor_dir)) as sensor:
            dashboard = Dashboard(mesh, str(dashboard_dir), sensor.endpoints["ctl"])
            durable = await dashboard.start()
            await sensor.wait_for_workers(durable, 1, timeout=10)  # the sensor knows it now
            sent: dict[int, str] = {}
            outage_at = time.monotonic() + BEFORE
            back_at = outage_at + outage
            end_at = back_at + BEFORE
            n = 0
            next_at = time.monotonic()
            stopped = restarted = False
            while time.monotonic() < end_at:
                sent[n] = reading(n)
                await sensor.publish("sensors.greenhouse.temp", sent[n], reliable=True)
                if n % 20 == 0:
                    print(f"sent {sent[n]} (sensor spool holds {sensor.spool_pending})")
                n += 1
                now = time.monotonic()
                if not stopped and now >= outage_at:
                    await dashboard.stop()
                    stopped = True
                    print(f"dashboard stopped after {len(dashboard.received)} readings; "
                          f"outage of {outage:g} s")
                elif stopped and not restarted and now >= back_at:
                    pending = sensor.spool_pending
                    await dashboard.start()
                    restarted = True
                    print(f"dashboard restarted with its data dir; {pending} readings waiting")
                next_at += INTERVAL
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            await sensor.wait_for_spool(timeout=30)  # every reading acknowledged
            await dashboard.stop()
    lost = sorted(set(sent) - set(dashboard.received))
    wrong = [k for k, v in dashboard.received.items() if sent.get(k) != v]
    print(f"sensor sent {len(sent)} readings, dashboard got {len(dashboard.received)} "
          f"({dashboard.duplicates} duplicates dropped)")
    if lost or wrong:
        print(f"LOST {len(lost)}: {lost[:10]}; WRONG {len(wrong)}: {wrong[:10]}")
        return 1
    print("nothing lost: every reading arrived intact")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--outage", type=float, default=30.0,
                        help="seconds the consumer stays down (default %(default)s)")
    args = parser.parse_args()
    if args.outage < 0:
        parser.error("--outage must not be negative")
    try:
        sys.exit(asyncio.run(main(args.outage)))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("iot_sensor: stopped", file=sys.stderr)
        sys.exit(130)
