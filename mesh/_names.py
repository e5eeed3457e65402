"""The names users give — topics, patterns, queues, services, durables — checked in one place.

Each check raises `ConfigError` with the kind of name as its key and the reason,
and is cached: names are checked on every send, and a valid name stays valid.
Queue and service names follow topic rules (no wildcards); a durable's name is
one segment, since it becomes the last segment of its queue's name.
"""

from __future__ import annotations

import functools

from patterns import InvalidName, TopicPattern, topic_key, validate_topic

from ._support._cache import CACHE_LIMIT
from ._support._text import quoted
from .errors import ConfigError


def _checked(name: str, kind: str) -> None:
    try:
        validate_topic(name, kind)
    except InvalidName as exc:
        raise ConfigError(kind, f"{exc.reason} in {quoted(name)}") from None


@functools.lru_cache(maxsize=CACHE_LIMIT)
def topic(name: str) -> bytes:
    """The wire key of a valid topic.

    Raises:
        ConfigError: the topic is invalid.
    """
    _checked(name, "topic")
    return topic_key(name)


@functools.lru_cache(maxsize=CACHE_LIMIT)
def pattern(text: str) -> TopicPattern:
    """A parsed subscription pattern (``*`` one segment, ``>`` the rest).

    Raises:
        ConfigError: the pattern is invalid.
    """
    try:
        return TopicPattern(text)
    except InvalidName as exc:
        raise ConfigError("pattern", f"{exc.reason} in {quoted(text)}") from None


@functools.lru_cache(maxsize=CACHE_LIMIT)
def queue(name: str) -> bytes:
    """The wire key of a valid queue name.

    Raises:
        ConfigError: the name is invalid.
    """
    _checked(name, "queue")
    return topic_key(name)


@functools.lru_cache(maxsize=CACHE_LIMIT)
def service(name: str) -> str:
    """A valid service name, as given.

    Raises:
        ConfigError: the name is invalid.
    """
    _checked(name, "service")
    return name


def durable(name: str) -> str:
    """A valid durable subscription name, as given.

    Raises:
        ConfigError: the name is empty, has more than one segment or is otherwise invalid.
    """
    if not name or "." in name:
        raise ConfigError("durable", f"{quoted(name)}: use a single name segment")
    _checked(name, "durable")
    return name
