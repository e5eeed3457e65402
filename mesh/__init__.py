"""zeromesh: a brokerless messaging mesh — mDNS discovery, ZeroMQ patterns, no broker.

The asyncio core is `AsyncNode`; `Node` is its blocking twin with the same
method names.
"""

from importlib.metadata import PackageNotFoundError, version

from ._config import NodeConfig
from ._loop import run
from ._membership._events import PeerEvents
from ._membership._peers import Peer, PeerEvent, PeerEventKind, PeerState
from ._message import Headers, Message
from ._node import AsyncNode
from ._pubsub._subscription import Subscription
from ._sync import Node, SyncPeerEvents, SyncPull, SyncSubscription
from ._work._pull import Pull
from .errors import (
    ClosedError,
    ConfigError,
    DeliveryError,
    MeshError,
    MessageTooLarge,
    NoRespondersError,
    ProtocolError,
    RemoteError,
    RequestTimeout,
    SpoolFullError,
)

try:
    __version__ = version("zeromesh")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0"

__all__ = [
    "AsyncNode",
    "ClosedError",
    "ConfigError",
    "DeliveryError",
    "Headers",
    "MeshError",
    "Message",
    "MessageTooLarge",
    "NoRespondersError",
    "Node",
    "NodeConfig",
    "Peer",
    "PeerEvent",
    "PeerEventKind",
    "PeerEvents",
    "PeerState",
    "ProtocolError",
    "Pull",
    "RemoteError",
    "RequestTimeout",
    "SpoolFullError",
    "Subscription",
    "SyncPeerEvents",
    "SyncPull",
    "SyncSubscription",
    "__version__",
    "run",
]

for _name in __all__:
    if isinstance(globals()[_name], type):
        globals()[_name].__module__ = __name__
del _name
