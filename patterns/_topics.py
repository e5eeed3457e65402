"""Topic names and subscription patterns for pub/sub (pure logic, no sockets).

A **topic** is ``a.b.c``: one or more non-empty segments separated by ``.``,
UTF-8 text with no whitespace or control characters, no ``*`` or ``>``, and at
most 255 bytes once encoded.

A **pattern** is a topic in which a whole segment may be a wildcard (NATS
semantics):

- ``*`` matches exactly one segment: ``a.*.c`` matches ``a.b.c``, not ``a.c``;
- ``>`` as the last segment matches one or more remaining segments: ``a.>``
  matches ``a.b`` and ``a.b.c`` but not ``a``; ``>`` alone matches every topic.

On the wire a publisher's first frame is `topic_key(topic)`: the UTF-8 topic
followed by a NUL byte. `TopicPattern.prefix` is the longest byte string that
every matching key starts with, so it can be handed to libzmq's SUB prefix
filter: the NUL makes a literal pattern an exact filter (``a.b`` does not
receive ``a.bc``), and a wildcard pattern is filtered by its literal head and
then checked exactly with `TopicPattern.matches`.

Guarantees: for every pattern ``p`` and valid topic ``t``,
``p.matches(t)`` implies ``topic_key(t).startswith(p.prefix)``; a literal
pattern matches exactly itself.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Final

from .errors import InvalidName

MAX_TOPIC_BYTES: Final[int] = 255
"""Longest topic or pattern, in UTF-8 bytes."""

SEPARATOR: Final[str] = "."
ONE: Final[str] = "*"
"""Wildcard segment matching exactly one segment."""
REST: Final[str] = ">"
"""Final wildcard segment matching one or more segments."""

_KEY_END: Final[bytes] = b"\x00"
# Unicode whitespace (same set as str.isspace), C0/C1 controls and DEL, and
# lone surrogates (which cannot be encoded as UTF-8).
_BAD_CHAR: Final[re.Pattern[str]] = re.compile(r"[\s\x00-\x1f\x7f-\x9f\ud800-\udfff]")
_WILDCARD_CHAR: Final[re.Pattern[str]] = re.compile(r"[*>]")


def _check_text(kind: str, name: object) -> str:
    """Checks everything topics and patterns share except wildcards; returns the name."""
    if not isinstance(name, str):
        raise InvalidName(kind, repr(name), f"must be str, not {type(name).__name__}")
    if not name:
        raise InvalidName(kind, name, "empty")
    bad = _BAD_CHAR.search(name)
    if bad is not None:
        char = bad.group()
        what = "whitespace" if char.isspace() else "control or surrogate character"
        raise InvalidName(kind, name, f"{what} U+{ord(char):04X} at index {bad.start()}")
    size = len(name.encode())
    if size > MAX_TOPIC_BYTES:
        raise InvalidName(kind, name, f"{size} bytes, longer than {MAX_TOPIC_BYTES}")
    if name.startswith(SEPARATOR) or name.endswith(SEPARATOR) or ".." in name:
        raise InvalidName(kind, name, "empty segment")
    return name


def validate_topic(topic: str, kind: str = "topic") -> None:
    """Checks that ``topic`` is a valid concrete topic (no wildcards).

    Args:
        topic: The topic, e.g. ``"sensors.kitchen.temp"``.
        kind: What the name is to the caller (queue and service names follow topic
            rules); it names the thing in the error.

    Raises:
        InvalidName: With ``kind`` and the reason, e.g. ``"empty segment"``.
    """
    _check_text(kind, topic)
    wild = _WILDCARD_CHAR.search(topic)
    if wild is not None:
        raise InvalidName(
            kind, topic, f"wildcard {wild.group()!r} not allowed in a {kind} (only in patterns)"
        )


def validate_pattern(pattern: str) -> None:
    """Checks that ``pattern`` is a valid subscription pattern.

    Args:
        pattern: The pattern, e.g. ``"sensors.*.temp"`` or ``"sensors.>"``.

    Raises:
        InvalidName: With ``kind="pattern"`` and the reason.
    """
    _split_pattern(pattern)


def _split_pattern(pattern: str) -> list[str]:
    """Validates ``pattern`` and returns its segments."""
    _check_text("pattern", pattern)
    segments = pattern.split(SEPARATOR)
    last = len(segments) - 1
    for index, segment in enumerate(segments):
        if segment == ONE:
            continue
        if segment == REST:
            if index != last:
                raise InvalidName("pattern", pattern, "'>' is only allowed as the last segment")
            continue
        wild = _WILDCARD_CHAR.search(segment)
        if wild is not None:
            raise InvalidName(
                "pattern",
                pattern,
                f"wildcard {wild.group()!r} must be a whole segment, not part of {segment!r}",
            )
    return segments


def topic_key(topic: str) -> bytes:
    """Returns the first wire frame for ``topic``: its UTF-8 bytes then NUL.

    The topic is not validated here; validate it once where it enters.
    """
    return topic.encode() + _KEY_END


def topic_from_key(key: bytes) -> str:
    """Returns the topic carried by a first wire frame, validating it.

    Args:
        key: A frame built by `topic_key`, as received from the network.

    Raises:
        InvalidName: With ``kind="topic key"`` if the frame is not NUL-terminated
            UTF-8, or ``kind="topic"`` if the text is not a valid topic.
    """
    if not key.endswith(_KEY_END):
        raise InvalidName("topic key", _show(key), "missing NUL terminator")
    try:
        topic = key[:-1].decode()
    except UnicodeDecodeError as exc:
        raise InvalidName("topic key", _show(key), "not valid UTF-8") from exc
    validate_topic(topic)
    return topic


def _show(key: bytes) -> str:
    return key.decode("utf-8", "backslashreplace")


@dataclass(frozen=True, slots=True)
class TopicPattern:
    """A parsed subscription pattern; cheap to match many topics against.

    Construct with the pattern text: ``TopicPattern("sensors.*.temp")``.
    Equality and hashing use the text only.

    Raises:
        InvalidName: From the constructor if the pattern is invalid.
    """

    pattern: str
    """The pattern text, as given."""
    prefix: bytes = field(init=False, compare=False, repr=False)
    """Bytes every matching `topic_key` starts with, for libzmq SUB filtering."""
    is_literal: bool = field(init=False, compare=False, repr=False)
    """True when the pattern has no wildcard, so it matches exactly one topic."""
    _head: str = field(init=False, compare=False, repr=False)
    _count: int = field(init=False, compare=False, repr=False)
    _checks: tuple[tuple[int, str], ...] = field(init=False, compare=False, repr=False)
    _rest: bool = field(init=False, compare=False, repr=False)
    _tail_only: bool = field(init=False, compare=False, repr=False)
    segments: tuple[str, ...] = field(init=False, compare=False, repr=False)
    """The pattern split at ``.`` (for comparing patterns with each other)."""

    def __post_init__(self) -> None:
        segments = _split_pattern(self.pattern)
        rest = segments[-1] == REST
        fixed = segments[:-1] if rest else segments
        first_wild = next((i for i, s in enumerate(segments) if s in (ONE, REST)), len(segments))
        literal = first_wild == len(segments)
        head = "".join(s + SEPARATOR for s in segments[:first_wild])
        setattr_ = object.__setattr__
        setattr_(self, "is_literal", literal)
        setattr_(self, "prefix", topic_key(self.pattern) if literal else head.encode())
        setattr_(self, "_head", head)
        setattr_(self, "_rest", rest)
        setattr_(self, "_tail_only", rest and first_wild == len(segments) - 1)
        setattr_(self, "_count", len(fixed))
        setattr_(self, "segments", tuple(segments))
        # Segments still to compare after the head matched: literal ones only.
        setattr_(
            self,
            "_checks",
            tuple((i, s) for i, s in enumerate(fixed) if i >= first_wild and s != ONE),
        )

    def matches(self, topic: str) -> bool:
        """Tells whether ``topic`` matches this pattern.

        ``topic`` is assumed to be a valid topic (see `validate_topic`); the
        answer for anything else is unspecified but never an exception.
        """
        if self.is_literal:
            return topic == self.pattern
        head = self._head
        if not topic.startswith(head):
            return False
        if self._tail_only:
            # Only a trailing '>': anything non-empty after the head matches.
            return len(topic) > len(head)
        segments = topic.split(SEPARATOR)
        if self._rest:
            if len(segments) <= self._count:
                return False
        elif len(segments) != self._count:
            return False
        return all(segments[index] == segment for index, segment in self._checks)

    def overlaps(self, other: TopicPattern) -> bool:
        """Tells whether some topic matches both this pattern and ``other``.

        What a subscriber needs to decide, from a publisher's announced
        patterns, whether connecting to it can bring anything it wants.
        """
        return patterns_overlap(self, other)

    def __str__(self) -> str:
        return self.pattern


def patterns_overlap(a: TopicPattern, b: TopicPattern) -> bool:
    """Tells whether some topic matches both ``a`` and ``b`` (a pattern meets a pattern).

    Segment by segment: two literals must be equal, ``*`` meets any one
    segment, and a ``>`` meets whatever the other has from there on (one
    segment at least, which the other has since it reached that position).
    Without a ``>`` both must be equally long: ``a.>`` does not meet ``a``.
    """
    sa, sb = a.segments, b.segments
    for x, y in zip(sa, sb, strict=False):
        if x == REST or y == REST:
            return True
        if x != y and x != ONE and y != ONE:
            return False
    return len(sa) == len(sb)
