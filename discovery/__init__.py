"""Who is out there: mDNS (zeroconf) and static peers, reported as peer events.

`discovery` imports neither `mesh` nor `patterns`; the mesh composes it.
Backends implement `DiscoveryBackend` and report `PeerFound` / `PeerGone`
through a plain callable sink on the event loop.
"""

from ._base import DiscoveryBackend, EventSink
from ._events import DiscoveryEvent, PeerFound, PeerGone, PeerInfo
from ._mdns import SERVICE_TYPE, MdnsDiscovery
from ._static import StaticDiscovery, parse_peer_urls
from .errors import DiscoveryError, InvalidRecord

__all__ = [
    "SERVICE_TYPE",
    "DiscoveryBackend",
    "DiscoveryError",
    "DiscoveryEvent",
    "EventSink",
    "InvalidRecord",
    "MdnsDiscovery",
    "PeerFound",
    "PeerGone",
    "PeerInfo",
    "StaticDiscovery",
    "parse_peer_urls",
]

for _name in ("PeerInfo", "PeerFound", "PeerGone", "MdnsDiscovery", "StaticDiscovery"):
    globals()[_name].__module__ = __name__
del _name
