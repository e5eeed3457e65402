"""What a discovery backend reports: a peer's connect info appeared or went away.

Events are frozen values. They say nothing about liveness: mDNS never notices a
crashed peer, so liveness is decided by the mesh's heartbeats, not here.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class PeerInfo:
    """Everything a node needs to connect to a peer's control channel."""

    id: str
    """Stable node id (32 lowercase hex chars); empty for a static peer not yet greeted."""
    name: str
    """Human name of the node; empty when unknown."""
    mesh: str
    """Mesh name; nodes of other meshes are never reported."""
    version: int
    """Protocol version the peer speaks."""
    endpoints: tuple[str, ...]
    """Control (ROUTER) endpoints, `tcp://ip:port`, best first."""
    key: str = ""
    """CURVE public key (Z85) when security is on, else empty."""
    source: str = field(default="", compare=False)
    """Which backend found it: `mdns` or `static`."""


@dataclass(frozen=True, slots=True)
class PeerFound:
    """A peer was announced (or re-announced with new connect info)."""

    info: PeerInfo


@dataclass(frozen=True, slots=True)
class PeerGone:
    """A peer withdrew its announcement (mDNS goodbye)."""

    info: PeerInfo


DiscoveryEvent = PeerFound | PeerGone
