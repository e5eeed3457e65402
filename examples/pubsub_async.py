"""Publish and subscribe with `AsyncNode`: two nodes, one wildcard subscription.

A "hub" node subscribes to ``sensors.*.temp`` (``*`` matches one topic
segment). A "sensor" node joins it, waits until the hub's subscription is in
force (`wait_for_subscribers`, so nothing is lost to the slow-joiner race),
then publishes temperatures and one humidity reading that the pattern does
not match. The hub prints what it receives.

Both nodes stay on 127.0.0.1 and find each other by static peering (the
sensor is given the hub's control endpoint); on a LAN you would leave mDNS on
and give no peers. The mesh name is random, so runs never see each other.

Run: ``python examples/pubsub_async.py``
"""

from __future__ import annotations

import asyncio
import uuid

from mesh import AsyncNode

LOOPBACK = ["127.0.0.1"]
READINGS = [("kitchen", "21.5"), ("garage", "12.0"), ("attic", "27.25")]


async def main() -> None:
    mesh = f"example-{uuid.uuid4().hex[:12]}"
    async with AsyncNode(name="hub", mesh=mesh, interfaces=LOOPBACK, mdns=False) as hub:
        temps = await hub.subscribe("sensors.*.temp")
        async with AsyncNode(name="sensor", mesh=mesh, interfaces=LOOPBACK, mdns=False,
                             peers=hub.endpoints["ctl"]) as sensor:
            await sensor.wait_for_subscribers("sensors.kitchen.temp", 1, timeout=5)
            await sensor.publish("sensors.kitchen.humidity", "40")  # no subscriber matches
            for room, celsius in READINGS:
                await sensor.publish(f"sensors.{room}.temp", celsius)

            for _ in READINGS:
                msg = await temps.next(timeout=5)
                print(f"{msg.topic} = {msg.text} (from {msg.source})")
    print(f"received {temps.received} temperatures")


if __name__ == "__main__":
    asyncio.run(main())
