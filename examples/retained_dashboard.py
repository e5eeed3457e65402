"""A dashboard that starts after the sensors still shows every current reading.

Three sensor nodes each publish their last reading with ``retain=True``: it
becomes that topic's retained value, kept by its publisher. A dashboard node
that starts later subscribes to ``home.*.temp`` and first receives the
current value of every matching topic (the newest, whoever holds it), then
live readings as they come: nothing between the two is lost or repeated.
``node.last(pattern)`` answers the same question once, without subscribing.

Everything stays on 127.0.0.1 with static peering; the mesh name is random.

Run: ``python examples/retained_dashboard.py``
"""

from __future__ import annotations

import uuid

from mesh import AsyncNode

LOOPBACK = ["127.0.0.1"]
ROOMS = {"kitchen": "21.5", "garage": "9.0", "attic": "27.25"}


async def main() -> None:
    mesh = f"example-{uuid.uuid4().hex[:8]}"
    sensors = [AsyncNode(name=f"sensor-{room}", mesh=mesh, interfaces=LOOPBACK, mdns=False)
               for room in ROOMS]
    for sensor in sensors:
        await sensor.start()
    try:
        for sensor, (room, reading) in zip(sensors, ROOMS.items(), strict=True):
            await sensor.publish(f"home.{room}.temp", reading, retain=True)
        seeds = [s.endpoints["ctl"][0] for s in sensors]
        async with AsyncNode(name="dashboard", mesh=mesh, interfaces=LOOPBACK, mdns=False,
                             peers=seeds) as dashboard:
            await dashboard.wait_for_peers(len(sensors), timeout=10)
            current = await dashboard.last("home.*.temp")
            print("last:", ", ".join(f"{m.topic}={m.text}" for m in current))
            readings = await dashboard.subscribe("home.*.temp")
            for _ in ROOMS:
                msg = await readings.next(timeout=10)
                print(f"retained {msg.topic} {msg.text} from {msg.source}")
            kitchen = sensors[0]
            await kitchen.wait_for_subscribers("home.kitchen.temp", 1, timeout=10)
            await kitchen.publish("home.kitchen.temp", "22.0", retain=True)
            msg = await readings.next(timeout=10)
            print(f"live {msg.topic} {msg.text} from {msg.source}")
    finally:
        for sensor in sensors:
            await sensor.aclose()


if __name__ == "__main__":
    from mesh import run

    run(main())
