"""zeromesh: a brokerless messaging mesh — mDNS discovery, ZeroMQ patterns, no broker.

The asyncio core is `AsyncNode`; `Node` is its blocking twin with the same
method names. This module only re-exports; the layout, lowest layer first
(a module imports from its own layer or below; tests/test_architecture.py)::

    errors.py         the exception tree (public)
    _support/         drop-and-count logging, mailboxes, tallies, bounded memos, waits, tasks
    _spool/           the disk log behind at-least-once: record format, store, data-dir lock
    _loop.py          the event loop our entry points run on (uvloop when installed)
    _wire.py          frame layout, msgspec envelopes, size limits and frame budgets
    _codec.py         typed payloads: values to labelled msgspec bytes and back, cached codecs
    _message.py       Message and Headers, what applications receive
    _names.py         topic, pattern, queue, service and durable names: one check each
    _config.py        NodeConfig: arguments, then environment, then defaults
    _ttl.py           message expiry: checking a ttl, has an item expired
    _trace.py         OpenTelemetry spans for sends and receipts (off: one module bool)
    _membership/      who is out there: identity, peer table (alive/suspect/lost/forgotten),
                      control channel (hello, heartbeats, bye), peer events, hello parts
    _parts.py         what parts need from the node (Announcer, Waiter)
    _pubsub/          topic fan-out: batching publishes, dispatching to subscriptions
    _work/            work queues: pushers' targets and credit, workers' pulls, the window,
                      pushers' backlogs (and their expiry)
    _services/        request/reply: serving (ROUTER, Service) and requesting (retries, failover)
    _reliable/        at-least-once on the spool: the outbox, receiver dedup, durables, their end
    _memory/          what the mesh remembers: retained values and history, kept by each
                      publisher, gathered by new subscriptions with no gap and no duplicate
    _figures/         what a node reports about itself (links, rates, queues, services),
                      served to peers as an internal service; the mesh's, gathered and merged
    _core.py          NodeCore: builds the parts, starts and closes them as one
    _node.py          AsyncNode: the public asyncio API over the parts (+ _node_p2p.py,
                      its work-queue and service methods)
    _sync.py          Node: the blocking twin (+ _sync_streams.py, its iterators)
    _agent/           the HTTP sidecar: routes, SSE, webhooks, metrics
    cli/              the `zeromesh` command: node commands, spool CLI, agent, demo
    _bench/           `zeromesh bench`
"""

from importlib.metadata import PackageNotFoundError, version

from ._config import NodeConfig
from ._loop import run
from ._membership._events import PeerEvents
from ._membership._peers import Peer, PeerEvent, PeerEventKind, PeerState
from ._message import Headers, Message, Reply
from ._node import AsyncNode
from ._pubsub._subscription import Subscription
from ._reliable._durables import DurableInfo
from ._services._gather import Replies
from ._sync import Node, SyncPeerEvents, SyncPull, SyncReplies, SyncSubscription
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
    "DurableInfo",
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
    "Replies",
    "Reply",
    "RequestTimeout",
    "SpoolFullError",
    "Subscription",
    "SyncPeerEvents",
    "SyncPull",
    "SyncReplies",
    "SyncSubscription",
    "__version__",
    "run",
]

for _name in __all__:
    if isinstance(globals()[_name], type):
        globals()[_name].__module__ = __name__
del _name
