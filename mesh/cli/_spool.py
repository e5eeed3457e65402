"""`zeromesh spool {ls,show,replay,purge}`: look into and act on a node's spools.

`ls` and `show` only read the files, so they are safe while the node runs.
`replay` runs the node itself (it must not be running elsewhere: the data dir
is locked) and reports delivery as it happens; `purge` also needs the lock.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from .. import _wire
from .._node import AsyncNode
from .._spool import SpoolStore
from .._spool._lock import DataDirLock
from ..errors import ConfigError, ProtocolError

_SPOOLS = ("out", "dead")


def _data_dir(args: argparse.Namespace) -> Path:
    if not args.data_dir:
        raise ConfigError("--data-dir", "name the node's data dir (or set ZEROMESH_DATA_DIR)")
    path = Path(args.data_dir)
    if not (path / "spool").is_dir():
        raise ConfigError("--data-dir", f"{path} has no spool")
    return path


def _records(path: Path, which: str) -> list[tuple[int, _wire.Spooled | None]]:
    pending, _ = SpoolStore.peek(path / "spool" / which)
    out: list[tuple[int, _wire.Spooled | None]] = []
    for record_id, payload in pending:
        try:
            out.append((record_id, _wire.decode_spooled(payload)))
        except ProtocolError:
            out.append((record_id, None))
    return out


def ls(args: argparse.Namespace) -> int:
    path = _data_dir(args)
    report: dict[str, dict[str, Any]] = {}
    for which in _SPOOLS:
        records, size = SpoolStore.peek(path / "spool" / which)
        names: Counter[str] = Counter()
        for _, payload in records:
            try:
                names[_wire.decode_spooled(payload).name] += 1
            except ProtocolError:
                names["<unreadable>"] += 1
        report[which] = {"messages": len(records), "bytes": size, "by_name": dict(names)}
    if args.json:
        print(json.dumps(report))
    else:
        for which, info in report.items():
            label = "outbox" if which == "out" else "dead letters"
            print(f"{label:<13} {info['messages']:>8} messages  {info['bytes']:>12} bytes")
            for name, count in sorted(info["by_name"].items()):
                print(f"  {name:<40} {count:>8}")
    return 0


def show(args: argparse.Namespace) -> int:
    path = _data_dir(args)
    which = "out" if args.outbox else "dead"
    records = _records(path, which)[: args.limit]
    for record_id, spooled in records:
        if spooled is None:
            row = {"spool_id": record_id, "error": "unreadable record"}
        else:
            row = {"spool_id": record_id, "kind": "queue" if spooled.kind == "q" else "topic",
                   "name": spooled.name, "attempts": spooled.attempts,
                   "reason": spooled.reason, "seq": spooled.item.seq,
                   "data": spooled.item.payload.decode("utf-8", "replace")}
        if args.json:
            print(json.dumps(row), flush=True)
        else:
            print(" ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    return 0 if records else 1


async def replay(args: argparse.Namespace, node: AsyncNode) -> int:
    ids = set(args.ids) if args.ids else None
    async with node:
        moved = await node.replay_dead_letters(ids)
        print(f"replaying {moved} dead letter(s)", flush=True)
        deadline = time.monotonic() + args.timeout
        last = -1
        while time.monotonic() < deadline:
            left = node.spool_pending
            if left != last:
                print(f"  {moved - min(left, moved)}/{moved} delivered", flush=True)
                last = left
            if left == 0:
                return 0
            await asyncio.sleep(0.1)  # a progress display: poll the count while waiting
        left = node.spool_pending  # (read while the node is open: closed, it has no spool)
    print(f"zeromesh spool replay: {left} not delivered within {args.timeout:g} s; "
          "they stay in the outbox", file=sys.stderr)
    return 1


async def purge(args: argparse.Namespace) -> int:
    path = _data_dir(args)
    which = "out" if args.outbox else "dead"
    lock = DataDirLock(str(path))
    lock.acquire()
    try:
        store = SpoolStore(path / "spool" / which)
        await store.start()
        ids = [record_id for record_id, _ in store.pending()]
        store.ack(ids)
        await store.aclose()
    finally:
        lock.release()
    print(f"purged {len(ids)} message(s) from the {'outbox' if args.outbox else 'dead letters'}")
    return 0
