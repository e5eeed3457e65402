"""This node's hello: who it is, where it listens, and what each part of it offers.

Membership knows only the identity and the control endpoints; every other
field comes from the `HelloPart` that owns it (pub/sub its endpoint and
subscriptions, work queues their queues, services their names, durables
theirs). The interest version counts changes of what the parts offer; every
heartbeat carries it, so a peer that missed a hello notices and asks again.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .. import _wire
from ._listener import HelloPart


@dataclass(frozen=True, slots=True)
class Identity:
    """What a node is, for as long as it runs."""

    id: str
    """Stable node id (kept in its data dir)."""
    name: str
    mesh: str
    incarnation: int
    """When this run started (ns): tells a restarted peer from its earlier run."""
    key: str = ""
    """The CURVE public key (Z85), when security is on."""


class Announcement:
    """Builds our hello from the identity and the parts' fields."""

    def __init__(self, identity: Identity, parts: Sequence[HelloPart] = ()) -> None:
        self.identity = identity
        self.parts = tuple(parts)
        self.ctl: list[str] = []
        """Our control endpoints (known once bound)."""
        self.version = 0
        """The interest version: one more at each change of what a part offers."""
        self.seq = 0
        """Our alive counter: raised to refute news that we were lost (see `_gossip`)."""

    def hello(self, reply: bool, digest: int = 0) -> _wire.Hello:
        me = self.identity
        fields: dict[str, Any] = {}
        for part in self.parts:
            fields.update(part.hello_fields(self.version))
        return _wire.Hello(id=me.id, name=me.name, mesh=me.mesh, incarnation=me.incarnation,
                           ctl=self.ctl, subs_version=self.version, reply=reply, key=me.key,
                           seq=self.seq, digest=digest, **fields)
