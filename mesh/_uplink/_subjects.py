"""Mesh topics and patterns as hub subjects, both ways.

NATS subjects are zeromesh topics already (``a.b.c``, ``*``, ``>``), so the
mapping only adds or strips the prefix. MQTT separates levels with ``/`` and
spells the wildcards ``+`` and ``#``.
"""

from __future__ import annotations

import re
from typing import Final

from .. import _names
from ..errors import ConfigError
from ._hub import Unsendable

_TO_MQTT: Final = str.maketrans({".": "/", "*": "+", ">": "#"})
_NO_MQTT: Final = re.compile(r"[+#/*>\x00]")
"""What an MQTT topic name cannot hold (wildcards), or holds with another meaning ('/'
separates levels: mesh 'a/b' would come back as 'a.b')."""
_NO_NATS: Final = re.compile(r"[\s*>]")


class Subjects:
    """The mapping for one uplink."""

    def __init__(self, kind: str, prefix: str) -> None:
        self.mqtt = kind == "mqtt"
        self.sep = "/" if self.mqtt else "."
        self.prefix = prefix.translate(_TO_MQTT) if self.mqtt else prefix
        self._head = self.prefix + self.sep

    def outbound(self, topic: str) -> str:
        """The hub subject of mesh topic (or pattern) `topic`."""
        return self._head + (topic.translate(_TO_MQTT) if self.mqtt else topic)

    def subject(self, topic: str) -> str:
        """The hub subject an exported message on mesh topic `topic` is published to.

        Raises:
            Unsendable: the topic has no spelling on this hub (MQTT: a '+', '#' or '/' in
                it; both: a wildcard or whitespace).
        """
        bad = (_NO_MQTT if self.mqtt else _NO_NATS).search(topic)
        if bad is not None:
            raise Unsendable(f"{'mqtt' if self.mqtt else 'nats'}: mesh topic {topic!r} has "
                             f"no spelling on the hub ({bad.group()!r})")
        return self.outbound(topic)

    def inbound(self, subject: str) -> str | None:
        """The mesh topic of hub subject `subject`; None when it is not one of ours
        or has no mesh spelling (an MQTT level holding '.', an empty level...)."""
        if not subject.startswith(self._head):
            return None
        rest = subject[len(self._head):]
        if self.mqtt:
            if "." in rest:
                return None
            rest = rest.replace("/", ".")
        try:
            _names.topic(rest)
        except ConfigError:
            return None
        return rest
