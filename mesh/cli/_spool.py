"""`zeromesh spool {ls,show,replay,purge,durables,forget}`: look into and act on a node's spools.

`ls`, `show` and `durables` only read the files, so they are safe while the
node runs (`durables`: last_seen as of the node's last save, at most a minute
old). `replay` runs the node itself (it must not be running elsewhere: the
data dir is locked) and reports delivery as it happens; `purge` and `forget`
also need the lock.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .. import _ttl, _wire
from .._config import env_var
from .._node import AsyncNode
from .._reliable._durables import KnownDurables
from .._reliable._outbox import DEAD, Replayed
from .._spool import SpoolStore, charge, unusable
from .._spool._lock import DataDirLock
from ..errors import ConfigError, ProtocolError

_SPOOLS = ("out", "dead")


def _data_dir(args: argparse.Namespace) -> Path:
    """The node's data dir (--data-dir, else ZEROMESH_DATA_DIR, as for every command); it
    must have a spool: these commands look into one, they never make one."""
    var = env_var("data_dir")
    given = args.data_dir or os.environ.get(var, "").strip()
    if not given:
        raise ConfigError("--data-dir", f"name the node's data dir (or set {var})")
    path = Path(given)
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
        report[which] = {"messages": len(records), "bytes": charge(p for _, p in records),
                         "disk_bytes": size, "by_name": dict(names)}
    if args.json:
        print(json.dumps(report))
    else:
        for which, info in report.items():
            label = "outbox" if which == "out" else "dead letters"
            print(f"{label:<13} {info['messages']:>8} messages  {info['bytes']:>12} bytes  "
                  f"({info['disk_bytes']} on disk)")
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
            if spooled.item.expires is not None:  # (a dead letter keeps it; replayed, it counts)
                row["expires"] = spooled.item.expires
        if args.json:
            print(json.dumps(row), flush=True)
        else:
            print(" ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    return 0 if records else 1


async def replay(args: argparse.Namespace, node: AsyncNode) -> int:
    """Put dead letters back and wait for those alone (the outbox may hold others, for a
    durable that is offline): 0 once each was delivered, 1 if one expired, failed
    again into the dead letters, or was still waiting at the timeout."""
    path = _data_dir(args)  # (before the node starts: it would make a data dir and a spool)
    ids = set(args.ids) if args.ids else None
    if ids is not None:  # (the node is not running: the lock would stop this one)
        missing = ids.difference(i for i, _ in SpoolStore.peek(path / "spool" / "dead")[0])
        if missing:
            raise ConfigError("ID", f"no dead letter {', '.join(map(str, sorted(missing)))} "
                                    "(`zeromesh spool show` lists them); nothing replayed")
    async with node:
        replayed = await node._replay(ids, follow=True)  # noqa: SLF001  (not public API)
        try:
            print(f"replaying {len(replayed)} dead letter(s)", flush=True)
            if len(replayed) == 0:  # (what else waits in the outbox is not ours to wait for)
                return 0
            outcomes = await _follow(replayed, args.timeout)
        finally:
            replayed.close()
    failed = [(outcomes[_ttl.EXPIRED], "expired (their ttl passed before delivery)"),
              (outcomes[DEAD], "failed again (back in the dead letters)"),
              (outcomes["waiting"], f"not delivered within {args.timeout:g} s (they stay "
                                    "in the outbox)")]
    told = [f"{n} {text}" for n, text in failed if n]
    if told:
        print(f"zeromesh spool replay: {'; '.join(told)}", file=sys.stderr)
        return 1
    return 0


async def _follow(replayed: Replayed, timeout: float) -> Counter[str]:
    """Print progress as the replayed messages end, until all have or `timeout` passes."""
    deadline = time.monotonic() + timeout
    shown = None
    while True:
        outcomes = replayed.outcomes()
        line = f"  {outcomes['delivered']}/{len(replayed)} delivered" + "".join(
            f", {outcomes[k]} {k}" for k in (_ttl.EXPIRED, DEAD) if outcomes[k])
        if line != shown:
            print(line, flush=True)
            shown = line
        if not outcomes["waiting"] or time.monotonic() >= deadline:
            return outcomes
        await asyncio.sleep(0.1)  # a progress display: poll the counts while waiting


async def purge(args: argparse.Namespace) -> int:
    path = _data_dir(args)
    which = "out" if args.outbox else "dead"
    lock = DataDirLock(str(path))
    lock.acquire()
    try:
        store = await _start(path / "spool" / which)
        ids = [record_id for record_id, _ in store.pending()]
        store.ack(ids)
        store.reclaim()
        await store.aclose()
    finally:
        lock.release()
    print(f"purged {len(ids)} message(s) from the {'outbox' if args.outbox else 'dead letters'}")
    return 0


async def _start(path: Path) -> SpoolStore:
    """The spool at `path`, recovered and ready to write.

    Raises:
        ConfigError: it cannot be read (a file in it that is not one), as at a node's start.
    """
    store = SpoolStore(path)
    try:
        await store.start()
    except OSError as exc:
        await store.aclose()
        raise unusable(exc) from None
    return store


def _dests(spooled: _wire.Spooled) -> list[str]:
    """The queues a spooled message is for (a publish: the durables it was spooled for)."""
    return list(spooled.dests) if spooled.kind == "t" else [spooled.name]


def _known(path: Path) -> KnownDurables:
    known = KnownDurables(str(path))
    known.load()
    return known


def _disk_bytes(spool: Path) -> int:
    return sum(f.stat().st_size for f in spool.glob("*.seg"))


def durables(args: argparse.Namespace) -> int:
    path = _data_dir(args)
    backlog: Counter[str] = Counter()
    for _, spooled in _records(path, "out"):
        if spooled is not None:
            backlog.update(_dests(spooled))
    infos = _known(path).infos(backlog.__getitem__)
    if args.json:
        print(json.dumps([info.to_dict() for info in infos]))
        return 0
    if not infos:
        print("no durable subscriptions known")
    for info in infos:
        print(f"{info.name:<20} {info.owner[:8]}  {info.pattern:<24} {info.backlog:>8} "
              f"waiting  last seen {_when(info.last_seen)}  {info.queue}")
    return 0


def _when(wall: float | None) -> str:
    if wall is None:
        return "unknown"
    stamp = datetime.fromtimestamp(wall, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return f"{stamp} ({max(0.0, time.time() - wall) / 3600:.1f} h ago)"


async def forget(args: argparse.Namespace) -> int:
    path = _data_dir(args)
    spool = path / "spool" / "out"
    lock = DataDirLock(str(path))
    lock.acquire()
    try:
        known = _known(path)
        queue = known.resolve(args.durable)
        pattern = known.pattern_of(queue)
        gone = known.forgotten | {queue}
        before = await asyncio.to_thread(_disk_bytes, spool)
        store = await _start(spool)
        try:
            waited, freed = 0, []
            for record_id, payload in store.pending():
                try:
                    dests = _dests(_wire.decode_spooled(payload))
                except ProtocolError:
                    continue
                if queue in dests:
                    waited += 1
                    if gone.issuperset(dests):
                        freed.append(record_id)
            known.forget(queue)  # first: a crash now leaves a tombstone, and a restart frees
            store.ack(freed)
            store.reclaim()
        finally:
            await store.aclose()
        after = await asyncio.to_thread(_disk_bytes, spool)
    finally:
        lock.release()
    kept = f" ({waited - len(freed)} stay for other durables)" if waited > len(freed) else ""
    print(f"forgot {queue} ({pattern}): freed {len(freed)} message(s){kept}, "
          f"{max(0, before - after)} bytes on disk")
    return 0
