"""Durable subscriptions as their publishers know them: remembered across restarts,
forgotten once abandoned.

A durable subscription is a named, per-node work queue
(``_durable.<node id>.<name>``) that only its own node pulls from. A publisher
that has ever seen one announced (in a hello) writes it to
``<data dir>/durables.json`` and, from then on, spools every reliable message
whose topic matches for it, online or not, until that node consumes it.

Durables end. Each one keeps the wall-clock time a peer last announced it
(`last_seen`: its owner's hello, refreshed every heartbeat while the owner is
there). One that no peer announced for ``durable_expiry`` seconds is forgotten
by a running publisher, like one an operator forgets (``zeromesh spool
forget``, `AsyncNode.forget_durable`): nothing more is spooled for it and its
backlog leaves the spool. If it comes back it is learned again as new: what
was published while it was forgotten was never spooled for it and is lost to
it. A forgotten durable leaves a tombstone here until no spooled message
names it any more, so that messages spooled for it and for others are not
sent to it again after a restart.

An owner ends its own durable (`AsyncNode.end_durable`): it stops announcing
it and announces its queue in its hello's ``ended`` instead, for
``durable_expiry`` seconds (kept here across its restarts), by which time every
publisher that still knew it has forgotten it anyway. A publisher that hears
it forgets the durable as `forget_durable` does. Subscribing to the name again
makes a new durable (the tombstone goes).

Silence is timed on the monotonic clock while the node runs; across a restart
it carries on from `last_seen` (wall clock), but a durable never expires in
the first `_HEAR_FIRST` seconds after a start, since the node could not hear
its owner while it was down.

``durables.json``::

    {"v": 2, "durables": {"<queue>": {"pattern": "orders.>", "last_seen": 1765000000.0}},
     "forgotten": ["<queue>", ...], "ended": {"<own queue>": 1765000000.0}}

The first format, a plain ``{"<queue>": "<pattern>"}`` map, is still read
(its durables' `last_seen` is unknown: their silence counts from that start).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from patterns import InvalidName, TopicPattern

from .._membership._peers import PeerRecord
from .._support._cache import BoundedDict
from .._support._files import replace_json
from .._support._text import quoted
from ..errors import ConfigError

_log = logging.getLogger("mesh.spool")
PREFIX: Final[str] = "_durable"
_FILE: Final[str] = "durables.json"
_VERSION: Final[int] = 2
_SAVE_EVERY: Final[float] = 60.0
"""Seconds between saves that only refresh `last_seen` (a change of the set saves at once,
and so does closing): the file's `last_seen` lags at most this much while the node runs."""
_HEAR_FIRST: Final[float] = 60.0
"""After a start, no durable expires for this long (or `durable_expiry`, if shorter): the
owners that are online say hello first."""


def durable_queue(node_id: str, name: str) -> str:
    """The queue that carries durable `name` of node `node_id`."""
    return f"{PREFIX}.{node_id}.{name}"


def split_queue(queue: str) -> tuple[str, str]:
    """(owner node id, name) of a durable's queue."""
    _, owner, name = [*queue.split(".", 2), "", ""][:3]
    return owner, name


@dataclass(frozen=True, slots=True)
class DurableInfo:
    """A durable subscription this node spools reliable messages for."""

    queue: str
    """Its queue, ``_durable.<owner>.<name>``: a unique name for it."""
    name: str
    """The name its owner gave it (``subscribe_durable(pattern, name)``)."""
    owner: str
    """The node id of the subscriber that owns it."""
    pattern: str
    """The topics it subscribes to."""
    backlog: int
    """Reliable messages in this node's spool waiting to reach it."""
    last_seen: float | None
    """Wall-clock time (epoch seconds) a peer last announced it; None if unknown (learned
    by an older version that did not keep it, and not heard since)."""

    def to_dict(self) -> dict[str, object]:
        return {"queue": self.queue, "name": self.name, "owner": self.owner,
                "pattern": self.pattern, "backlog": self.backlog, "last_seen": self.last_seen}


@dataclass(slots=True)
class _Known:
    pattern: TopicPattern
    last_seen: float | None
    quiet_since: float
    """Monotonic time its silence began (as of this run)."""


class KnownDurables:
    """Queue name -> pattern of every durable seen, persisted in the data dir; and this
    node's own durables, which its hello announces.

    It learns from peers' hellos as a `PeerListener`.
    """

    def __init__(self, data_dir: str | None, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._path = Path(data_dir) / _FILE if data_dir is not None else None
        self._clock = clock
        self._known: dict[str, _Known] = {}
        self._forgotten: set[str] = set()
        self._cache: BoundedDict[str, list[str]] = BoundedDict()
        self._started = clock()
        self._saved_at = self._started
        self.mine: dict[str, str] = {}
        """This node's own durable subscriptions: queue -> pattern."""
        self._ended: dict[str, float] = {}
        """This node's own durables it ended: queue -> wall-clock time it ended them."""
        self.on_ended: Callable[[str], object] = self.forget
        """Called with a known durable its owner announces as ended (the node frees its
        backlog too)."""

    # -- what peers announce (HelloPart, PeerListener) --------------------------------

    def hello_fields(self, version: int) -> Mapping[str, Any]:
        return {"durables": self.mine, "ended": sorted(self._ended)}

    def peer_connected(self, new: PeerRecord, old: PeerRecord | None) -> None:
        self._announced(new)

    def peer_updated(self, rec: PeerRecord) -> None:
        self._announced(rec)

    def _announced(self, rec: PeerRecord) -> None:
        """Its durables are learned; those it ended (its own only) are forgotten."""
        ended = [q for q in rec.ended if q in self._known and split_queue(q)[0] == rec.id]
        for queue in ended:
            self.on_ended(queue)
        if rec.durables:
            self.learn({q: p for q, p in rec.durables.items() if q not in rec.ended})

    def peer_lost(self, rec: PeerRecord) -> None:
        pass  # a publisher spools for a durable whether its node is there or not

    def peer_gone(self, rec: PeerRecord) -> None:
        pass

    def peers_changed(self) -> None:
        pass

    # -- the set -------------------------------------------------------------------

    def learn(self, durables: Mapping[str, str], *, save: bool = True) -> bool:
        """Remember announced durables (and that they were heard now); True if any was new."""
        changed = False
        now, wall = self._clock(), time.time()
        for queue, pattern in durables.items():
            known = self._known.get(queue)
            if known is not None and known.pattern.pattern == pattern:
                known.last_seen, known.quiet_since = wall, now
                continue
            if not queue.startswith(PREFIX + "."):
                continue
            try:
                self._known[queue] = _Known(TopicPattern(pattern), wall, now)
            except InvalidName:
                continue
            if queue in self._forgotten:
                self._forgotten.discard(queue)
                _log.info("durable %s is back: learned again as new (what was published "
                          "while it was forgotten was not spooled for it)", queue)
            changed = True
        if changed:
            self._cache.clear()
            if save:
                self.save()
        return changed

    def forget(self, queue: str) -> bool:
        """Stop knowing `queue` (a tombstone stays, see the module docstring); False if it
        was not known."""
        if self._known.pop(queue, None) is None:
            return False
        self._forgotten.add(queue)
        self._cache.clear()
        self.save()
        return True

    def own(self, queue: str, pattern: str) -> None:
        """This node subscribes to its durable `queue` (new, if it had ended it)."""
        self.mine[queue] = pattern
        revived = self._ended.pop(queue, None) is not None
        if not self.learn({queue: pattern}) and revived:
            self.save()

    def end(self, queue: str) -> None:
        """This node ends its own durable `queue`: no longer announced, announced ended."""
        self.mine.pop(queue, None)
        self._ended[queue] = time.time()
        self.save()

    @property
    def ended(self) -> frozenset[str]:
        """This node's own durables it ended and still announces as ended."""
        return frozenset(self._ended)

    def drop_ended(self, expiry: float) -> bool:
        """Stop announcing the durables ended `expiry` seconds ago or more; True if any."""
        wall = time.time()
        old = [q for q, at in self._ended.items() if wall - at >= expiry]
        for queue in old:
            del self._ended[queue]
        if old:
            self.save()
        return bool(old)

    def knows(self, queue: str) -> bool:
        return queue in self._known

    def matching(self, topic: str) -> list[str]:
        """The durable queues a reliable message on `topic` must reach."""
        queues = self._cache.get(topic)
        if queues is None:
            queues = self._cache.put(topic, [q for q, k in self._known.items()
                                             if k.pattern.matches(topic)])
        return queues

    def resolve(self, name: str) -> str:
        """The queue of the known durable `name`: its queue name, or just its name when
        only one owner has a durable of that name.

        Raises:
            ConfigError: no known durable has that name, or several do (all listed).
        """
        if name in self._known:
            return name
        found = sorted(q for q in self._known if split_queue(q)[1] == name)
        if len(found) == 1:
            return found[0]
        if not found:
            raise ConfigError("durable", f"no known durable {quoted(name)} "
                              f"({len(self._known)} known; see `zeromesh spool durables`)")
        raise ConfigError("durable", f"{quoted(name)} is ambiguous, name one of: "
                                     f"{', '.join(found)}")

    def infos(self, backlog: Callable[[str], int]) -> list[DurableInfo]:
        """Every known durable, by queue name, with its backlog as `backlog` counts it."""
        out = []
        for queue in sorted(self._known):
            known = self._known[queue]
            owner, name = split_queue(queue)
            out.append(DurableInfo(queue, name, owner, known.pattern.pattern, backlog(queue),
                                   known.last_seen))
        return out

    def pattern_of(self, queue: str) -> str:
        known = self._known.get(queue)
        return known.pattern.pattern if known is not None else ""

    @property
    def forgotten(self) -> frozenset[str]:
        """Durables forgotten whose queue spooled messages may still name."""
        return frozenset(self._forgotten)

    def keep_forgotten(self, named: Iterable[str]) -> None:
        """Drop the tombstones no spooled message names any more (`named`: those that are)."""
        keep = self._forgotten.intersection(named)
        if keep != self._forgotten:
            self._forgotten = keep
            self.save()

    # -- expiry --------------------------------------------------------------------

    def start_clock(self) -> None:
        """The node starts: silences count from now on (and from `last_seen` before)."""
        now, wall = self._clock(), time.time()
        self._started = self._saved_at = now
        for known in self._known.values():
            silent = 0.0 if known.last_seen is None else max(0.0, wall - known.last_seen)
            known.quiet_since = now - silent
            if known.last_seen is None:
                known.last_seen = wall  # an old file: its silence counts from this start

    def heard(self, present: Iterable[str]) -> None:
        """These are announced right now (their owners are there)."""
        now, wall = self._clock(), time.time()
        for queue in present:
            known = self._known.get(queue)
            if known is not None:
                known.last_seen, known.quiet_since = wall, now
        if now - self._saved_at >= _SAVE_EVERY:
            self.save()

    def stale(self, expiry: float) -> list[tuple[str, float]]:
        """(queue, seconds silent) of every durable no peer announced for `expiry` seconds."""
        now = self._clock()
        if now - self._started < min(expiry, _HEAR_FIRST):
            return []
        return [(q, now - k.quiet_since) for q, k in self._known.items()
                if now - k.quiet_since >= expiry]

    # -- the file ------------------------------------------------------------------

    def load(self) -> None:
        if self._path is None or not self._path.exists():
            return
        try:
            stored = json.loads(self._path.read_text())
            if not isinstance(stored, dict):
                raise ValueError("not a JSON object")
            if stored.get("v") == _VERSION:
                self._forgotten.update(q for q in stored.get("forgotten", ())
                                       if isinstance(q, str))
                self._ended.update((q, float(at)) for q, at in stored.get("ended", {}).items()
                                   if isinstance(q, str) and isinstance(at, (int, float)))
                entries = stored.get("durables", {}).items()
            else:  # the first format: queue -> pattern
                entries = ((q, {"pattern": p, "last_seen": None}) for q, p in stored.items())
            for queue, entry in entries:
                self._load_one(queue, entry)
        except (OSError, ValueError, AttributeError, TypeError) as exc:
            _log.warning("cannot read %s (%s): durables are learned again from peers",
                         self._path, exc)
        self._cache.clear()

    def _load_one(self, queue: str, entry: object) -> None:
        if not isinstance(entry, Mapping):
            return
        pattern, seen = entry.get("pattern"), entry.get("last_seen")
        if not isinstance(pattern, str) or not queue.startswith(PREFIX + "."):
            return
        try:
            parsed = TopicPattern(pattern)
        except InvalidName:
            return
        last_seen = float(seen) if isinstance(seen, (int, float)) else None
        self._known[queue] = _Known(parsed, last_seen, self._clock())
        self._forgotten.discard(queue)

    def save(self) -> None:
        self._saved_at = self._clock()
        if self._path is None or not (self._known or self._forgotten or self._ended
                                      or self._path.exists()):
            return
        state = {"v": _VERSION,
                 "durables": {q: {"pattern": k.pattern.pattern, "last_seen": k.last_seen}
                              for q, k in self._known.items()},
                 "forgotten": sorted(self._forgotten), "ended": self._ended}
        try:
            replace_json(self._path, state)
        except OSError as exc:
            _log.warning("cannot save %s: %s", self._path, exc)


def log_expired(queue: str, silent: float, freed: int) -> None:
    """The one line a durable's expiry is logged with."""
    _log.warning("durable %s was not announced by any peer for %s: forgotten, %d spooled "
                 "messages freed; if it comes back it starts afresh (what was published "
                 "meanwhile is lost to it)", queue, _duration(silent), freed)


def log_forgotten(queue: str, freed: int, *, again: bool) -> None:
    """The line an application's `forget_durable` is logged with."""
    _log.info("durable %s forgotten: %d spooled messages freed%s", queue, freed,
              "; its owner still announces it, so it is learned again as new" if again else "")


def log_ended(queue: str, freed: int, *, by_owner: bool) -> None:
    """The line a durable's end is logged with: on its owner (this node ended it), or on a
    publisher that heard its owner ended it."""
    if by_owner:
        _log.info("durable %s ended by its owner: forgotten, %d spooled messages freed",
                  queue, freed)
    else:
        _log.info("durable %s ended: no longer announced, its publishers forget it "
                  "(%d spooled here freed)", queue, freed)


def _duration(seconds: float) -> str:
    for unit, size in (("d", 86400.0), ("h", 3600.0), ("min", 60.0)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.1f} s"
