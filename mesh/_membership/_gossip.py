"""Membership news: what a member is, as gossip passes it on, and which news is newer.

A member's record is its hello (`_wire.Hello`: identity, endpoints, key, what
it offers) plus its alive counter `seq`. News about it is that record
(alive), a `_wire.Down` (lost or left) or a `_wire.Change` (its interest, as a
delta against the version before). Which of two pieces of news wins is decided
by `(incarnation, seq, status)`: a later run beats an earlier one; at the same
(incarnation, seq) lost beats alive and left beats both; only the member
itself raises its seq, to refute news that it was lost — so a node that left
can never be brought back by stale alive news, and a node wrongly declared
lost can always prove otherwise.

The digest is a summary of a whole view, the XOR of one hash per member: equal
digests mean nothing to exchange, and it is updated member by member.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Iterable, Mapping
from typing import Any, Final

import msgspec

from .. import _wire
from ..errors import ProtocolError

ALIVE: Final[int] = 0
LOST: Final[int] = 1
LEFT: Final[int] = 2

SET_FIELDS: Final[frozenset[str]] = frozenset({"subs", "feeds", "pubs", "services", "history"})
"""Hello fields that are sets of names: a change carries what was added and removed."""
_IDENTITY_FIELDS: Final[frozenset[str]] = frozenset(
    {"id", "name", "mesh", "incarnation", "ctl", "key", "reply", "seq", "digest",
     "subs_version"})
"""Hello fields a change may never touch."""


def digest_part(member_id: str, incarnation: int, seq: int, status: int, version: int) -> int:
    """One member's share of a view's digest (stable across processes, unlike `hash`)."""
    text = f"{member_id}\x00{incarnation}\x00{seq}\x00{status}\x00{version}".encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "big")


def interest(hello: _wire.Hello) -> dict[str, Any]:
    """The fields of a hello that say what the member offers (what a change may touch),
    each a copy: the last interest announced is kept to compute the next change, and a
    part may announce a container it goes on changing."""
    return {f: copy.copy(getattr(hello, f)) for f in hello.__struct_fields__
            if f not in _IDENTITY_FIELDS}


def delta(before: Mapping[str, Any], after: Mapping[str, Any]
          ) -> tuple[dict[str, Any], dict[str, list[str]], dict[str, list[str]]]:
    """What changed from `before` to `after` (two `interest` maps): fields set whole,
    names added and names removed per set field."""
    set_: dict[str, Any] = {}
    added: dict[str, list[str]] = {}
    removed: dict[str, list[str]] = {}
    for name, value in after.items():
        old = before.get(name)
        if value == old:
            continue
        if name in SET_FIELDS and isinstance(old, list):
            plus = sorted(set(value) - set(old))
            minus = sorted(set(old) - set(value))
            if plus:
                added[name] = plus
            if minus:
                removed[name] = minus
        else:
            set_[name] = value
    return set_, added, removed


def apply_change(hello: _wire.Hello, change: _wire.Change) -> _wire.Hello:
    """`hello` with `change` applied, typed and checked as any hello is.

    Raises:
        ProtocolError: the change touches identity fields or makes a malformed hello.
    """
    touched = {*change.set, *change.added, *change.removed}
    if touched & _IDENTITY_FIELDS or not touched <= set(hello.__struct_fields__):
        raise ProtocolError("a change touching fields it may not")
    fields: dict[str, Any] = dict(change.set)
    for name in {*change.added, *change.removed}:
        if name not in SET_FIELDS:
            raise ProtocolError(f"a change adding to {name!r}, which is not a set")
        current = set(getattr(hello, name) or ())  # None: an older node's pubs
        current |= set(change.added.get(name, ()))
        current -= set(change.removed.get(name, ()))
        fields[name] = sorted(current)
    try:
        changed = msgspec.structs.replace(hello, subs_version=change.version, **fields)
        # re-decoding types every field as a hello received whole would be
        return _wire.HELLO_DECODER.decode(_wire.ENCODER.encode(changed))
    except (TypeError, msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise ProtocolError(f"a malformed change: {exc}") from None


def chunks(news: Iterable[_wire.News], budget: int) -> list[list[_wire.News]]:
    """Split news into lists whose encoded size stays under `budget` bytes each (a
    control message has a size limit; a whole view may not fit in one)."""
    out: list[list[_wire.News]] = []
    current: list[_wire.News] = []
    size = 0
    for item in news:
        n = len(_wire.ENCODER.encode(item))
        if current and size + n > budget:
            out.append(current)
            current, size = [], 0
        current.append(item)
        size += n
    if current:
        out.append(current)
    return out
