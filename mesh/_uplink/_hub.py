"""What the uplink core needs from a broker adapter, and what an adapter reports.

An adapter owns one connection at a time. The core calls `connect`, then
`send` (pipelined: each call returns at once with a future that resolves when
the hub acknowledged that message) and `receive`/`settle` for imports, until
`lost` resolves; then `close`, and `connect` again after a backoff.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

ORIGIN_HEADER = "zeromesh-origin"
"""Set on a message imported from a hub (to the uplink's url): it is never exported back."""
ID_HEADER = "zeromesh-id"
"""The mesh message id, carried to the hub (MQTT user property; NATS has Nats-Msg-Id too)."""


class HubRefused(Exception):
    """The hub answered but will not have us (credentials, permissions, bad stream):
    retrying soon cannot help, so the uplink goes `down` and retries slowly."""


class Unsendable(HubRefused):
    """This message can never go to this hub (its topic has no spelling there, it is
    larger than the hub takes): failed at once, never tried again."""


class HubUnreachable(Exception):
    """No connection (refused, timeout, TLS, lost): retried with backoff."""


@dataclass(slots=True)
class Incoming:
    """One message from the hub, not yet acknowledged there."""

    key: str
    """Stable across redeliveries of the same hub message (the dedup key)."""
    topic: str
    """The mesh topic (prefix stripped, mapped)."""
    data: bytes
    headers: dict[str, str]
    token: object
    """The adapter's handle for `settle`."""
    maybe_seen: bool = False
    """The key may have been imported before: a redelivery (NATS delivered more than
    once, MQTT's DUP flag), or a key that is the message's own id. Only then is it
    looked up: a first delivery of a key made from broker fields (an MQTT packet id
    wraps) is never taken for an old one."""
    unusable: str = ""
    """Why it cannot come into the mesh (its subject has no mesh spelling; `topic` is
    then empty): the core counts it failed and acknowledges it."""


class Hub(Protocol):
    """A broker connection (see the module docstring for the call order)."""

    kind: str
    """``nats`` or ``mqtt`` (labels, logs)."""

    async def connect(self) -> None:
        """Connect, and set up the import consumer/subscription if there are imports.

        Raises:
            HubRefused: the hub rejected us (auth, permissions, config).
            HubUnreachable: no connection now.
        """
        ...

    def send(self, topic: str, data: bytes, headers: Mapping[str, str], msg_id: str
             ) -> asyncio.Future[bool]:
        """Publish one exported message (mesh topic; the adapter maps it).

        The future resolves once the hub has it (PubAck, PUBACK) — True when the
        hub says it had it already (a resend it dropped by id) — and fails with
        HubUnreachable (this connection will not acknowledge it), HubRefused
        (the hub will not take this message now) or Unsendable (nor ever).
        """
        ...

    async def receive(self, limit: int, timeout: float) -> list[Incoming]:
        """Up to `limit` imported messages, in hub order; [] after `timeout` s with none.

        Raises:
            HubUnreachable: the connection is gone.
        """
        ...

    def settle(self, incoming: Incoming) -> None:
        """Acknowledge one imported message on the hub (it is in the mesh now)."""
        ...

    @property
    def lost(self) -> asyncio.Future[BaseException]:
        """Resolves (with the reason) when this connection is gone for good."""
        ...

    async def close(self) -> None:
        """Disconnect (keeping the hub-side session/consumer for the next connect)."""
        ...
