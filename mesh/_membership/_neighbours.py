"""Which members a node watches by choice: a bounded set, whatever the mesh's size.

Members sit on a ring ordered by id; each node watches its next two on the ring
and one more member chosen by hashing the pair of ids (a random chord, stable
while both live). Watching is mutual (a watched node beats back), so each node
is watched by about six others — enough that a silent node is noticed by several
— and the ring plus random chords is a small-world graph: news flooded along it
reaches every member in O(log N) hops. Node ids are random, so ring neighbours
are as good as random picks and need no coordination.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Final

SUCCESSORS: Final[int] = 2
CHORDS: Final[int] = 1


def choose(me: str, members: Iterable[str], *, successors: int = SUCCESSORS,
           chords: int = CHORDS) -> frozenset[str]:
    """The members `me` watches by choice, out of `members` (the alive ones)."""
    ring = sorted({*members, me})
    n = len(ring)
    at = ring.index(me)
    picked = {ring[(at + k) % n] for k in range(1, min(successors, n - 1) + 1)}
    rest = [m for m in ring if m != me and m not in picked]
    rest.sort(key=lambda m: hashlib.blake2b(f"{me}\x00{m}".encode(), digest_size=8).digest())
    picked.update(rest[:chords])
    return frozenset(picked)
