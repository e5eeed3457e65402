"""Looking into a node's spools while it runs: its dead letters and the outbox's figures."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Collection
from typing import Any, Final

from .. import _wire
from ..errors import ProtocolError
from ._outbox import Outbox

PREVIEW: Final[int] = 200
"""Characters of a dead letter's data shown (decoded as UTF-8, bad bytes replaced)."""
MAX_LISTED: Final[int] = 10_000


def dead_letters(outbox: Outbox, limit: int = MAX_LISTED) -> list[dict[str, Any]]:
    """The dead letters, oldest first: ``{id, queue, topic, reason, attempts, time, size,
    data_preview}`` (``id`` is the spool id replay and purge take; ``time`` the message's
    own timestamp; ``queue`` the queue or durable it was for)."""
    out: list[dict[str, Any]] = []
    for record_id, payload in outbox.dead.pending()[:limit]:
        try:
            spooled = _wire.decode_spooled(payload)
        except ProtocolError:
            out.append({"id": record_id, "queue": None, "topic": None,
                        "reason": "unreadable record", "attempts": 0, "time": None,
                        "size": len(payload), "data_preview": ""})
            continue
        item = spooled.item
        topic = spooled.name if spooled.kind == "t" else item.topic
        queue = spooled.name if spooled.kind == "q" else ",".join(spooled.dests) or None
        out.append({"id": record_id, "queue": queue, "topic": topic or None,
                    "reason": spooled.reason, "attempts": spooled.attempts, "time": item.ts,
                    "size": len(item.payload),
                    "data_preview": item.payload[:PREVIEW * 4].decode("utf-8", "replace")
                    [:PREVIEW]})
    return out


def purge(outbox: Outbox, ids: Collection[int] | None) -> int:
    """Delete dead letters (all, or those spool `ids`); how many went."""
    gone = [record_id for record_id, _ in outbox.dead.pending()
            if ids is None or record_id in ids]
    outbox.dead.ack(gone)
    outbox.dead.reclaim()
    return len(gone)


def spool_figures(outbox: Outbox | None, quota: int, fsync: str) -> dict[str, Any]:
    """``{messages, bytes, disk_bytes, quota_bytes, quota_pct, oldest_age_s, fsync,
    dead_letters}``: ``bytes`` is what the quota counts (the messages still to deliver),
    ``disk_bytes`` what the files hold (delivered ones until reclaimed)."""
    if outbox is None:
        return {"messages": 0, "bytes": 0, "disk_bytes": 0, "quota_bytes": 0, "quota_pct": 0.0,
                "oldest_age_s": None, "fsync": fsync, "dead_letters": 0}
    used = outbox.store.used_bytes
    oldest = None
    payload = outbox.store.first()
    if payload is not None:
        with contextlib.suppress(ProtocolError):
            oldest = round(max(0.0, time.time() - _wire.decode_spooled(payload).item.ts), 3)
    return {"messages": len(outbox.store), "bytes": used,
            "disk_bytes": outbox.store.disk_bytes, "quota_bytes": quota,
            "quota_pct": round(100.0 * used / quota, 2) if quota else 0.0,
            "oldest_age_s": oldest, "fsync": fsync, "dead_letters": len(outbox.dead)}
