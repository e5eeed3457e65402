"""Topic validation, pattern matching and SUB prefix filters (patterns._topics)."""

from __future__ import annotations

import pickle

import pytest
from hypothesis import given
from hypothesis import strategies as st

from patterns._topics import (
    MAX_TOPIC_BYTES,
    TopicPattern,
    patterns_overlap,
    topic_from_key,
    topic_key,
    validate_pattern,
    validate_topic,
)
from patterns.errors import InvalidName, PatternError

# --------------------------------------------------------------------------- reference


def reference_match(pattern: str, topic: str) -> bool:
    """Obviously-correct recursive matcher, written from the NATS rules."""

    def go(ps: list[str], ts: list[str]) -> bool:
        if not ps:
            return not ts
        head, *rest = ps
        if head == ">":
            return len(ts) >= 1
        if not ts:
            return False
        if head != "*" and head != ts[0]:
            return False
        return go(rest, ts[1:])

    return go(pattern.split("."), topic.split("."))


# A small alphabet so random topics and patterns often collide.
segments = st.sampled_from(["a", "b", "c", "ab", "é", "温度", "x-y_z", "1"])
topics = st.lists(segments, min_size=1, max_size=5).map(".".join)


@st.composite
def patterns(draw: st.DrawFn) -> str:
    parts = draw(st.lists(st.one_of(segments, st.just("*")), min_size=0, max_size=5))
    if draw(st.booleans()) or not parts:
        parts.append(">")
    return ".".join(parts)


@st.composite
def pattern_and_matching_topic(draw: st.DrawFn) -> tuple[str, str]:
    """A pattern plus a topic built to match it (wildcards filled in)."""
    pattern = draw(st.one_of(patterns(), topics))
    out: list[str] = []
    for part in pattern.split("."):
        if part == "*":
            out.append(draw(segments))
        elif part == ">":
            out.extend(draw(st.lists(segments, min_size=1, max_size=3)))
        else:
            out.append(part)
    return pattern, ".".join(out)


# --------------------------------------------------------------------------- validation

VALID_TOPICS = ["a", "a.b.c", "sensors.kitchen.temp", "é.温度", "a-b_c.d:e/f", "x" * 255]


@pytest.mark.parametrize("topic", VALID_TOPICS)
def test_valid_topics_pass(topic: str) -> None:
    """Ordinary topics, non-ASCII text and exactly 255 bytes are accepted."""
    validate_topic(topic)
    validate_pattern(topic)


BAD_TOPICS = [
    ("", "empty"),
    (".", "empty segment"),
    ("a..b", "empty segment"),
    (".a", "empty segment"),
    ("a.", "empty segment"),
    ("a b", "whitespace U+0020 at index 1"),
    ("a\tb", "whitespace U+0009"),
    ("a\nb", "whitespace U+000A"),
    ("a\r\n", "whitespace U+000D"),
    ("a\u00a0b", "whitespace U+00A0"),
    ("a\u3000b", "whitespace U+3000"),
    ("a\x00b", "control or surrogate character U+0000"),
    ("a\x7fb", "control or surrogate character U+007F"),
    ("a\x85b", "U+0085"),
    ("a\ud800b", "control or surrogate character U+D800"),
    ("a.*", "wildcard '*' not allowed in a topic"),
    ("a.>", "wildcard '>' not allowed in a topic"),
    ("a*b", "wildcard '*' not allowed in a topic"),
    ("x" * 256, "256 bytes, longer than 255"),
    ("é" * 128, "256 bytes, longer than 255"),
]


@pytest.mark.parametrize(("topic", "reason"), BAD_TOPICS)
def test_invalid_topics_rejected_with_reason(topic: str, reason: str) -> None:
    """Each bad topic is rejected and the message says why."""
    with pytest.raises(InvalidName, match=r"^invalid topic ") as info:
        validate_topic(topic)
    assert reason in str(info.value)
    assert reason.split(" at ")[0] in info.value.reason
    assert info.value.kind == "topic"
    assert info.value.name == topic


def test_invalid_name_message_shows_name_and_reason() -> None:
    """The message is built from the typed attributes."""
    with pytest.raises(InvalidName) as info:
        validate_topic("a..b")
    assert str(info.value) == "invalid topic 'a..b': empty segment"
    assert (info.value.kind, info.value.name, info.value.reason) == (
        "topic",
        "a..b",
        "empty segment",
    )


def test_invalid_name_is_value_error_and_pattern_error_and_pickles() -> None:
    """InvalidName sits under PatternError and ValueError and survives pickling."""
    err = InvalidName("pattern", "a.>.b", "why")
    assert isinstance(err, PatternError)
    assert isinstance(err, ValueError)
    copy = pickle.loads(pickle.dumps(err))
    assert (copy.kind, copy.name, copy.reason, str(copy)) == (
        err.kind,
        err.name,
        err.reason,
        str(err),
    )


def test_invalid_name_message_truncates_huge_names() -> None:
    """A huge name is shortened in the message but kept whole in .name."""
    with pytest.raises(InvalidName) as info:
        validate_topic("y" * 10_000)
    assert len(str(info.value)) < 200
    assert info.value.name == "y" * 10_000


@pytest.mark.parametrize("value", [None, b"a.b", 3])
def test_non_str_rejected(value: object) -> None:
    """Non-text input is a clear InvalidName, not a TypeError from deep inside."""
    with pytest.raises(InvalidName, match="must be str"):
        validate_topic(value)  # type: ignore[arg-type]


VALID_PATTERNS = ["a", "*", ">", "a.*", "a.>", "*.b", "a.*.c", "*.*.>", "a.b.c.>", "é.*"]


@pytest.mark.parametrize("pattern", VALID_PATTERNS)
def test_valid_patterns_pass(pattern: str) -> None:
    """Whole-segment wildcards are accepted, '>' only last."""
    validate_pattern(pattern)
    TopicPattern(pattern)


BAD_PATTERNS = [
    ("", "empty"),
    ("a..*", "empty segment"),
    ("*.", "empty segment"),
    ("a.>.b", "'>' is only allowed as the last segment"),
    (">.>", "'>' is only allowed as the last segment"),
    ("a*", "wildcard '*' must be a whole segment"),
    ("a.b>", "wildcard '>' must be a whole segment"),
    ("**", "wildcard '*' must be a whole segment"),
    ("a.* .b", "whitespace U+0020"),
    ("*" + ".*" * 128, "bytes, longer than 255"),
]


@pytest.mark.parametrize(("pattern", "reason"), BAD_PATTERNS)
def test_invalid_patterns_rejected_with_reason(pattern: str, reason: str) -> None:
    """Bad patterns are rejected by both validate_pattern and TopicPattern."""
    with pytest.raises(InvalidName, match=r"^invalid pattern ") as info:
        validate_pattern(pattern)
    assert reason in str(info.value)
    with pytest.raises(InvalidName, match=r"^invalid pattern "):
        TopicPattern(pattern)


# --------------------------------------------------------------------------- matching

MATCH_TABLE = [
    # pattern, topic, expected
    ("a", "a", True),
    ("a", "b", False),
    ("a.b", "a.b", True),
    ("a.b", "a.bc", False),
    ("a.b", "a.b.c", False),
    ("a.b", "a", False),
    ("*", "a", True),
    ("*", "a.b", False),
    ("a.*", "a.b", True),
    ("a.*", "a", False),
    ("a.*", "a.b.c", False),
    ("a.*", "ab.c", False),
    ("*.b", "a.b", True),
    ("*.b", "a.c", False),
    ("a.*.c", "a.b.c", True),
    ("a.*.c", "a.x.c", True),
    ("a.*.c", "a.b.d", False),
    ("a.*.c", "a.c", False),
    ("a.*.c", "a.b.c.d", False),
    ("*.*", "a.b", True),
    ("*.*", "a", False),
    (">", "a", True),
    (">", "a.b.c", True),
    ("a.>", "a", False),
    ("a.>", "a.b", True),
    ("a.>", "a.b.c", True),
    ("a.>", "ab.c", False),
    ("a.>", "b.a", False),
    ("a.b.>", "a.b", False),
    ("a.b.>", "a.b.c", True),
    ("a.b.>", "a.bb.c", False),
    ("*.>", "a", False),
    ("*.>", "a.b", True),
    ("*.b.>", "a.b.c.d", True),
    ("*.b.>", "a.c.c.d", False),
    ("a.*.>", "a.x.y", True),
    ("a.*.>", "a.x", False),
    ("é.*", "é.温度", True),
    ("é.*", "e.温度", False),
]


@pytest.mark.parametrize(("pattern", "topic", "expected"), MATCH_TABLE)
def test_match_table(pattern: str, topic: str, expected: bool) -> None:
    """`*` is one segment, final `>` is one or more segments, literals match exactly."""
    assert TopicPattern(pattern).matches(topic) is expected
    assert reference_match(pattern, topic) is expected


PREFIX_TABLE = [
    ("a", b"a\x00"),
    ("a.b.c", b"a.b.c\x00"),
    ("é", "é".encode() + b"\x00"),
    ("a.b.*", b"a.b."),
    ("a.*.c", b"a."),
    ("a.b.>", b"a.b."),
    ("*", b""),
    ("*.b", b""),
    (">", b""),
    ("é.>", "é.".encode()),
]


@pytest.mark.parametrize(("pattern", "prefix"), PREFIX_TABLE)
def test_prefix_table(pattern: str, prefix: bytes) -> None:
    """Literal prefix is the whole key with NUL; wildcard prefix stops at the first wildcard."""
    parsed = TopicPattern(pattern)
    assert parsed.prefix == prefix
    assert parsed.is_literal is (b"\x00" in prefix)


def test_literal_prefix_filters_exactly() -> None:
    """The NUL keeps `a.b` from receiving `a.bc` or `a.b.c` through libzmq's prefix filter."""
    prefix = TopicPattern("a.b").prefix
    assert topic_key("a.b").startswith(prefix)
    assert not topic_key("a.bc").startswith(prefix)
    assert not topic_key("a.b.c").startswith(prefix)


def test_pattern_is_value_type() -> None:
    """Equal text gives equal, hashable, immutable patterns."""
    one, two = TopicPattern("a.*"), TopicPattern("a.*")
    assert one == two
    assert hash(one) == hash(two)
    assert {one, two} == {one}
    assert str(one) == "a.*"
    assert repr(one) == "TopicPattern(pattern='a.*')"
    with pytest.raises(AttributeError):
        one.pattern = "b"  # type: ignore[misc]


@pytest.mark.parametrize("pattern", ["a.b", "a.*", "a.>", ">", "*.b"])
@pytest.mark.parametrize("topic", ["", ".", "a..b", "a.b."])
def test_matches_never_raises_on_garbage(pattern: str, topic: str) -> None:
    """matches() assumes valid topics but must not crash on invalid ones."""
    assert isinstance(TopicPattern(pattern).matches(topic), bool)


# --------------------------------------------------------------------------- keys


@pytest.mark.parametrize("topic", VALID_TOPICS)
def test_topic_key_round_trip(topic: str) -> None:
    """topic_from_key inverts topic_key."""
    key = topic_key(topic)
    assert key == topic.encode() + b"\x00"
    assert topic_from_key(key) == topic


@pytest.mark.parametrize(
    ("key", "kind", "reason"),
    [
        (b"a.b", "topic key", "missing NUL terminator"),
        (b"", "topic key", "missing NUL terminator"),
        (b"\xff\xfe\x00", "topic key", "not valid UTF-8"),
        (b"\x00", "topic", "empty"),
        (b"a\x00b\x00", "topic", "control or surrogate character U+0000"),
        (b"a.*\x00", "topic", "wildcard '*'"),
        (b"a..b\x00", "topic", "empty segment"),
    ],
)
def test_topic_from_key_rejects_bad_frames(key: bytes, kind: str, reason: str) -> None:
    """A hostile first frame is an InvalidName with the reason, never a decode error."""
    with pytest.raises(InvalidName) as info:
        topic_from_key(key)
    assert info.value.kind == kind
    assert reason in str(info.value)


# --------------------------------------------------------------------------- properties


@given(pattern_and_matching_topic())
def test_prefix_is_prefix_of_every_matching_key(pair: tuple[str, str]) -> None:
    """Any topic the pattern matches gets through the libzmq prefix filter."""
    pattern, topic = pair
    parsed = TopicPattern(pattern)
    assert parsed.matches(topic)
    assert topic_key(topic).startswith(parsed.prefix)


@given(st.one_of(patterns(), topics), topics)
def test_prefix_never_excludes_a_match(pattern: str, topic: str) -> None:
    """For random pairs: matches implies prefix filter passes."""
    parsed = TopicPattern(pattern)
    if parsed.matches(topic):
        assert topic_key(topic).startswith(parsed.prefix)


@given(st.one_of(patterns(), topics), topics)
def test_matches_agrees_with_reference(pattern: str, topic: str) -> None:
    """The fast matcher agrees with the recursive reference on random pairs."""
    assert TopicPattern(pattern).matches(topic) is reference_match(pattern, topic)


@given(pattern_and_matching_topic())
def test_matches_agrees_with_reference_on_matching_pairs(pair: tuple[str, str]) -> None:
    """The reference agrees on pairs constructed to match."""
    pattern, topic = pair
    assert reference_match(pattern, topic)
    assert TopicPattern(pattern).matches(topic)


@given(topics, topics)
def test_literal_pattern_matches_only_itself(literal: str, topic: str) -> None:
    """A wildcard-free pattern matches exactly its own text."""
    parsed = TopicPattern(literal)
    assert parsed.is_literal
    assert parsed.matches(literal)
    assert parsed.matches(topic) is (topic == literal)
    assert topic_key(topic).startswith(parsed.prefix) is (topic == literal)


@given(topics)
def test_every_topic_is_a_valid_pattern_and_round_trips(topic: str) -> None:
    """Topics are a subset of patterns; keys round-trip."""
    validate_topic(topic)
    validate_pattern(topic)
    assert topic_from_key(topic_key(topic)) == topic


@given(st.text(max_size=40))
def test_validation_is_total(text: str) -> None:
    """Arbitrary text either validates or raises InvalidName, nothing else."""
    for check, kind in ((validate_topic, "topic"), (validate_pattern, "pattern")):
        try:
            check(text)
        except InvalidName as exc:
            error = exc
        else:
            assert len(text.encode()) <= MAX_TOPIC_BYTES
            assert "" not in text.split(".")
            continue
        assert error.kind == kind
        assert error.reason in str(error)


@given(st.text(max_size=40), topics)
def test_valid_random_patterns_agree_with_reference(text: str, topic: str) -> None:
    """Whatever random text validates as a pattern matches like the reference."""
    try:
        parsed = TopicPattern(text)
    except InvalidName:
        return
    assert parsed.matches(topic) is reference_match(text, topic)
    if parsed.matches(topic):
        assert topic_key(topic).startswith(parsed.prefix)


# --------------------------------------------------------------------------- overlap


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ("a.*", "a.b", True),
        ("a.>", "*.c", True),
        (">", "a", True),
        (">", "a.b.c", True),
        (">", "*.*", True),
        (">", ">", True),
        ("a.b", "a.c", False),
        ("a.b", "a.b", True),
        ("a.>", "a", False),
        ("a.*", "a", False),
        ("a.*", "a.b.c", False),
        ("a.*.c", "a.b.*", True),
        ("a.*.c", "a.b.d", False),
        ("*.b.>", "a.*.c.d", True),
        ("*", "a.>", False),
        ("b.>", "a.>", False),
    ],
)
def test_overlap_table(a: str, b: str, expected: bool) -> None:
    """Two patterns overlap when some topic matches both, whichever comes first."""
    pa, pb = TopicPattern(a), TopicPattern(b)
    assert patterns_overlap(pa, pb) is expected
    assert patterns_overlap(pb, pa) is expected
    assert pa.overlaps(pb) is expected


def witness(a: str, b: str) -> str | None:
    """A topic matching both patterns, built segment by segment, or None."""
    out: list[str] = []
    sa, sb = a.split("."), b.split(".")
    for x, y in zip(sa, sb, strict=False):
        if x == ">" or y == ">":
            rest = sb[len(out):] if x == ">" else sa[len(out):]
            out.extend("z" if s in ("*", ">") else s for s in rest)
            return ".".join(out)
        if x != y and "*" not in (x, y):
            return None
        out.append(y if x == "*" else x)
    out = ["z" if s == "*" else s for s in out]
    return ".".join(out) if len(sa) == len(sb) else None


@given(st.one_of(patterns(), topics), st.one_of(patterns(), topics), topics)
def test_overlap_agrees_with_matching(a: str, b: str, topic: str) -> None:
    """A topic matching both proves an overlap; an overlap has a topic matching both."""
    pa, pb = TopicPattern(a), TopicPattern(b)
    overlap = patterns_overlap(pa, pb)
    if pa.matches(topic) and pb.matches(topic):
        assert overlap
    found = witness(a, b)
    assert overlap is (found is not None)
    if found is not None:
        assert pa.matches(found)
        assert pb.matches(found)
