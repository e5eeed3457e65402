"""Uplinks: the mesh reaching a broker users already run (NATS JetStream, MQTT 5).

One core (`_link.Uplink`) does what both need — the export backlog in its own
spool, the import dedup marks, state, reconnecting, counters — and talks to a
broker through a small adapter (`_hub.Hub`): `_nats` and `_mqtt`.

Words used here: *export* is mesh → hub, *import* is hub → mesh; the *hub* is
the broker; a *subject* is a hub-side name (a NATS subject or an MQTT topic).
"""
