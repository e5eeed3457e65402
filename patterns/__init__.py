"""ZeroMQ pattern wrappers for zeromesh: pub/sub, the control channel, topic logic.

Imports neither `mesh` nor `discovery`.
"""

from ._control import ControlDealer, ControlRouter
from ._pubsub import MARKER_PREFIX, Publisher, Subscriber
from ._pushpull import Puller, Pusher
from ._reqrep import DEFAULT_SERVICE_HWM, ServiceDealer, ServiceRouter
from ._security import Curve, KeyFileError, generate_keypair, load_allowlist, load_secret
from ._socket import DEFAULT_MAX_MESSAGE_SIZE, Context
from ._topics import (
    MAX_TOPIC_BYTES,
    TopicPattern,
    patterns_overlap,
    topic_from_key,
    topic_key,
    validate_pattern,
    validate_topic,
)
from .errors import InvalidName, PatternError, SocketClosed, WouldBlock

__all__ = [
    "DEFAULT_MAX_MESSAGE_SIZE",
    "DEFAULT_SERVICE_HWM",
    "MARKER_PREFIX",
    "MAX_TOPIC_BYTES",
    "Context",
    "ControlDealer",
    "ControlRouter",
    "Curve",
    "InvalidName",
    "KeyFileError",
    "PatternError",
    "Publisher",
    "Puller",
    "Pusher",
    "ServiceDealer",
    "ServiceRouter",
    "SocketClosed",
    "Subscriber",
    "TopicPattern",
    "WouldBlock",
    "generate_keypair",
    "load_allowlist",
    "load_secret",
    "patterns_overlap",
    "topic_from_key",
    "topic_key",
    "validate_pattern",
    "validate_topic",
]
