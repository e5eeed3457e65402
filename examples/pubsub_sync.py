"""Publish and subscribe with the blocking `Node`: the twin of pubsub_async.py.

`Node` runs the same node on a private event-loop thread, so plain scripts
need no ``async``. A "hub" subscribes to ``sensors.*.temp``; a "sensor" joins
it, waits until that subscription is in force, then publishes temperatures
and one humidity reading the pattern does not match. The hub prints what it
receives.

Loopback only, static peering, a random mesh name per run.

Run: ``python examples/pubsub_sync.py``
"""

from __future__ import annotations

import uuid

from mesh import Node

LOOPBACK = ["127.0.0.1"]
READINGS = [("kitchen", "21.5"), ("garage", "12.0"), ("attic", "27.25")]


def main() -> None:
    mesh = f"example-{uuid.uuid4().hex[:12]}"
    with Node(name="hub", mesh=mesh, interfaces=LOOPBACK, mdns=False) as hub:
        temps = hub.subscribe("sensors.*.temp")
        with Node(name="sensor", mesh=mesh, interfaces=LOOPBACK, mdns=False,
                  peers=hub.endpoints["ctl"]) as sensor:
            sensor.wait_for_subscribers("sensors.kitchen.temp", 1, timeout=5)
            sensor.publish("sensors.kitchen.humidity", "40")  # no subscriber matches
            for room, celsius in READINGS:
                sensor.publish(f"sensors.{room}.temp", celsius)

            for _ in READINGS:
                msg = temps.next(timeout=5)
                print(f"{msg.topic} = {msg.text} (from {msg.source})")
    print(f"received {len(READINGS)} temperatures")


if __name__ == "__main__":
    main()
