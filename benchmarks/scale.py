"""Issue 16's scale benchmark: how membership grows with the number of nodes.

For each N (``--sizes``, default 10, 30 and 100) a fresh namespace LAN
(`tests.netns.make_lan`, N hosts, root needed) runs one ``_scale_node.py`` process per host,
one node each (``--per-host`` more), mDNS off, every node given only the first host's node
as its seed (a static peer; ``--seeds all``: every host's node, the full list of static
peers that today's all-to-all membership needs for a full view without multicast;
``--seeds mdns``: no seed, mDNS on, across the LAN's bridge).
Measured, from each node's time-stamped ``joined`` / ``lost`` lines and from /proc and
``ss`` in the hosts' namespaces:

* **pair p50 / max**: over every pair (A, B), from the later of the two ready until A saw
  B joined (discovery once both are up);
* **full view**: from the last node ready until every node has seen the N-1 others
  joined (bounded by ``--view-timeout``; if some never did, the median view size is
  shown instead);
* **idle**, over a ``--idle`` s window after that: TCP connections established per host
  (``ss -Htn state established``; a connection between two hosts counts at both), control
  messages (sent + received) per second per node and control links held
  (``traffic().membership``), RSS and CPU per process (``/proc/<pid>/status`` VmRSS,
  ``/proc/<pid>/stat`` utime + stime);
* **lost by all**: the last host's process is SIGKILLed; from the kill until the last of the
  others printed ``lost`` for each of its nodes (bounded); ``false lost`` counts every other
  ``lost`` line of the whole run.

The N=10 row is the baseline: each figure's growth is shown as its ratio to N=10's, next
to N/10 (linear) and (N/10)^2. Everything runs inside the LAN's namespaces (10.77.x.y);
every process is killed and every namespace deleted however the run ends.

Run (as root)::

    python benchmarks/scale.py                 # N = 10, 30, 100
    python benchmarks/scale.py --sizes 10,30   # a shorter run
    python benchmarks/scale.py --quick --json  # N = 10 only, machine-readable
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Final

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository: tests.netns

import _harness  # forces ZEROMESH_INTERFACES=127.0.0.1 for this process

from tests import netns
from tests.system._meshproc import unique
from tests.system._scale import (
    Group,
    cpu_seconds,
    established,
    node_names,
    rss_mb,
    seed_url,
)

SIZES: Final[tuple[int, ...]] = (10, 30, 100)
LOST_AFTER: Final[float] = 1.5
READY_TIMEOUT: Final[float] = 180.0
LOST_TIMEOUT: Final[float] = 15.0
"""After a kill, how long the others get to report it (the figure is the real time);
5 s with --quick."""


@dataclass
class Row:
    """The figures of one N."""

    nodes: int
    processes: int
    start_s: float = 0.0
    """From the first process started until the last node was ready."""
    full_view_s: float | None = None
    """From the last ready until every node saw all others; None: not all did."""
    full_nodes: int = 0
    """Nodes whose view became full."""
    median_view: float = 0.0
    """Others the median node saw joined (N-1 when all is well)."""
    lost_all_s: float | None = None
    """From the SIGKILL until the last observer saw every victim lost; None: not all did."""
    lost_seen_by: int = 0
    false_lost: int = 0
    tcp_median: float = 0.0
    tcp_max: int = 0
    """TCP connections established per host, at idle."""
    ctl_per_s: float | None = None
    """Control messages (sent + received) per second per node, median, at idle."""
    links_median: float | None = None
    members_median: float | None = None
    rss_mb_median: float = 0.0
    rss_mb_max: float = 0.0
    cpu_pct_median: float = 0.0
    """Idle CPU per process, % of one core."""
    cpu_pct_max: float = 0.0
    cpu_pct_total: float = 0.0
    """Idle CPU of all the processes together, % of one core."""
    pair_p50_s: float | None = None
    """Median over pairs (A, B): from the later of A and B ready until A saw B joined."""
    pair_max_s: float | None = None
    join_cpu_s: float = 0.0
    """CPU seconds per process (median) from its start until the end of the view phase
    (interpreter start-up included: about 0.4 s)."""
    load: float = 0.0
    """The machine's 1-minute load average when this N started (it is shared)."""
    errors: list[str] = field(default_factory=list)
    timeline: dict[str, list[int]] = field(default_factory=dict)
    """With --timeline: joined and false lost events per 5 s around the last ready."""


def measure(n: int, per_host: int, idle: float, view_timeout: float, seeding: str,
            lost_timeout: float = LOST_TIMEOUT, timeline: bool = False,
            dump: Path | None = None) -> Row:
    hosts = max(1, n // per_host)
    row = Row(nodes=hosts * per_host, processes=hosts)
    names = node_names(row.nodes)
    everyone = set(names)
    mesh = unique("scale")
    row.load = os.getloadavg()[0]
    with netns.make_lan(hosts) as lan:
        seeds = {"all": [seed_url(host) for host in lan.hosts],
                 "first": [seed_url(lan.hosts[0])], "mdns": []}[seeding]
        started = time.monotonic()
        groups = [Group(host, mesh, names[i * per_host:(i + 1) * per_host], seeds=seeds,
                        lost_after=LOST_AFTER, mdns=seeding == "mdns")
                  for i, host in enumerate(lan.hosts)]
        ready = [g.wait_ready(max(0.1, started + READY_TIMEOUT - time.monotonic()))
                 for g in groups]
        if any(at is None for at in ready):
            row.errors.append(f"{sum(at is None for at in ready)} processes not ready "
                              f"within {READY_TIMEOUT:.0f} s")
            return row
        last_ready = max(at for at in ready if at is not None)
        row.start_s = last_ready - started

        deadline = last_ready + view_timeout
        views: dict[str, float | int] = {}
        for g in groups:
            views.update(g.full_views(everyone, max(0.0, deadline - time.monotonic())))
        full = [at for at in views.values() if isinstance(at, float)]
        row.full_nodes = len(full)
        row.median_view = statistics.median(
            row.nodes - 1 if isinstance(v, float) else v for v in views.values())
        if len(full) == row.nodes:
            row.full_view_s = max(full) - last_ready
        row.join_cpu_s = statistics.median(cpu_seconds(g.proc.pid) for g in groups)
        row.pair_p50_s, row.pair_max_s = _pair_discovery(groups)

        measure_idle(row, lan, groups, idle)

        victim = groups[-1]
        victims = set(victim.names)
        marks = [len(g.lines) for g in groups]
        killed = victim.send_signal(signal.SIGKILL)
        kill_deadline = killed + lost_timeout
        seen: dict[str, float | None] = {}
        for g, mark in zip(groups[:-1], marks[:-1], strict=True):
            seen.update(g.lost_seen(victims, mark, max(0.0, kill_deadline - time.monotonic())))
        at = [t for t in seen.values() if t is not None]
        row.lost_seen_by = len(at)
        if at and len(at) == len(seen):
            row.lost_all_s = max(at) - killed
        row.false_lost = sum(1 for g in groups for _, other, _ in g.events("lost")
                             if other not in victims)
        if timeline:
            row.timeline = _timeline(groups, victims, last_ready)
        if dump is not None:
            _dump(dump / f"n{n}.txt", groups, last_ready)
        for g in groups[:-1]:
            g.close_stdin()
    return row


def _pair_discovery(groups: list[Group]) -> tuple[float | None, float | None]:
    """Median and max over every pair (A, B) of the time from the later of A and B ready
    until A first saw B joined: how long discovery takes once both are up."""
    ready: dict[str, float] = {}
    for g in groups:
        ready.update(g.ready_at())
    first: dict[tuple[str, str], float] = {}
    for g in groups:
        for node, other, at in g.events("joined"):
            if other in ready and node in ready:
                first.setdefault((node, other), at - max(ready[node], ready[other]))
    if not first:
        return None, None
    took = [max(0.0, t) for t in first.values()]
    return statistics.median(took), max(took)


def _dump(path: Path, groups: list[Group], last_ready: float) -> None:
    """Every process's lines (stdout events and its nodes' debug log), times relative to
    the last ready, in time order: who lost whom, and why."""
    rows: list[tuple[float, str]] = []
    for g in groups:
        for line in g.lines:
            parts = line.text.split()
            if len(parts) == 4 and parts[1] in ("joined", "left", "lost"):
                rows.append((float(parts[3]), " ".join(parts[:3])))
        for text in g.stderr_lines:
            stamp, _, rest = text.partition(" ")
            try:
                rows.append((float(stamp), f"{g.names[0]}: {rest}"))
            except ValueError:
                rows.append((last_ready, f"{g.names[0]}: {text}"))
    path.parent.mkdir(parents=True, exist_ok=True)
    head = f"# times from the last ready, CLOCK_MONOTONIC {last_ready:.3f}\n"
    path.write_text(head + "".join(f"{at - last_ready:9.3f} {text}\n" for at, text in sorted(rows)))


def _timeline(groups: list[Group], victims: set[str], last_ready: float) -> dict[str, list[int]]:
    """Joined and (false) lost events per 5 s from 30 s before the last ready: when the
    mesh came together, and whether losses kept coming once everyone was up."""
    bins = range(-30, 90, 5)

    def count(kind: str) -> list[int]:
        times = [at - last_ready for g in groups for _, other, at in g.events(kind)
                 if other not in victims]
        return [sum(1 for t in times if lo <= t < lo + 5) for lo in bins]

    return {"from_s": list(bins), "joined": count("joined"), "lost": count("lost")}


def measure_idle(row: Row, lan: netns.Lan, groups: list[Group], idle: float) -> None:
    """Connections, control messages, RSS and CPU over an idle window of ``idle`` s."""
    pids = [g.proc.pid for g in groups]
    before = [g.figures() for g in groups]
    cpu0 = [cpu_seconds(pid) for pid in pids]
    t0 = time.monotonic()
    time.sleep(idle)  # the measurement window itself
    cpu1 = [cpu_seconds(pid) for pid in pids]
    elapsed = time.monotonic() - t0
    after = [g.figures() for g in groups]
    tcp = [n for n in map(count_established, lan.hosts) if n is not None]
    if len(tcp) < len(lan.hosts):
        row.errors.append(f"`ss` timed out on {len(lan.hosts) - len(tcp)} hosts")
    rss = [rss_mb(pid) for pid in pids]
    cpu = [100 * (b - a) / elapsed for a, b in zip(cpu0, cpu1, strict=True)]
    row.tcp_median, row.tcp_max = statistics.median(tcp or [0]), max(tcp or [0])
    row.rss_mb_median, row.rss_mb_max = statistics.median(rss), max(rss)
    row.cpu_pct_median, row.cpu_pct_max = statistics.median(cpu), max(cpu)
    row.cpu_pct_total = sum(cpu)
    rates, links, members = [], [], []
    unanswered = 0
    for b, a in zip(before, after, strict=True):
        if a is None or b is None:
            unanswered += 1
            continue
        for name, fig in a["nodes"].items():
            members.append(fig.get("members", 0))
            if "links" in fig:
                links.append(fig["links"])
            old = b["nodes"].get(name, {})
            if "control_sent" in fig and "control_received" in fig:
                sent = fig["control_sent"] - old.get("control_sent", 0)
                received = fig["control_received"] - old.get("control_received", 0)
                rates.append((sent + received) / elapsed)
    if unanswered:
        row.errors.append(f"{unanswered} processes did not answer `figures` within 10 s")
    row.members_median = statistics.median(members) if members else None
    row.links_median = statistics.median(links) if links else None
    row.ctl_per_s = statistics.median(rates) if rates else None


def count_established(host: netns.Host) -> int | None:
    """`established` on ``host``, or None when ``ss`` did not answer in time (a host so
    loaded that ``ip netns exec`` stalls)."""
    try:
        return established(host)
    except subprocess.TimeoutExpired:
        return None


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def growth(rows: list[Row], key: str) -> list[str]:
    """Each row's ``key`` as a ratio to the first row's (the baseline)."""
    base = getattr(rows[0], key)
    out = []
    for row in rows:
        value = getattr(row, key)
        out.append("-" if value is None or not base else f"{value / base:.2f}x")
    return out


def report(rows: list[Row]) -> None:
    columns = [("N", 4), ("procs", 5), ("start s", 7), ("full view s", 11),
               ("full/N", 7), ("med view", 8), ("pair p50/max s", 14), ("lost by all s", 13),
               ("seen by", 7),
               ("false lost", 10), ("TCP/host med", 12), ("max", 4), ("ctl msg/s/node", 14),
               ("links", 5), ("RSS MB med", 10), ("CPU % med", 9), ("CPU % max", 9),
               ("CPU % all", 9), ("join CPU s", 10), ("load", 5)]
    _harness.print_table(columns, [[
        str(r.nodes), str(r.processes), f"{r.start_s:.1f}", fmt(r.full_view_s, ".2f"),
        f"{r.full_nodes}/{r.nodes}", f"{r.median_view:.0f}",
        f"{fmt(r.pair_p50_s, '.3f')}/{fmt(r.pair_max_s, '.2f')}", fmt(r.lost_all_s, ".2f"),
        f"{r.lost_seen_by}/{r.nodes - r.nodes // r.processes}", str(r.false_lost),
        f"{r.tcp_median:.0f}", str(r.tcp_max), fmt(r.ctl_per_s, ".1f"),
        fmt(r.links_median, ".0f"), f"{r.rss_mb_median:.1f}", f"{r.cpu_pct_median:.2f}",
        f"{r.cpu_pct_max:.2f}", f"{r.cpu_pct_total:.1f}", f"{r.join_cpu_s:.2f}",
        f"{r.load:.1f}"] for r in rows])
    for r in rows:
        for error in r.errors:
            print(f"  N={r.nodes}: {error}")
        if r.timeline:
            print(f"  N={r.nodes} events per 5 s from {r.timeline['from_s'][0]} s after the "
                  f"last ready: joined {r.timeline['joined']}, false lost {r.timeline['lost']}")
    if len(rows) < 2:
        return
    print(f"\ngrowth against N={rows[0].nodes} (the baseline row of this run):")
    gcols = [("N", 4), ("N ratio", 7), ("N^2 ratio", 9), ("full view", 9), ("lost by all", 11),
             ("TCP/host", 8), ("ctl msg/s", 9), ("RSS", 6), ("CPU", 6), ("join CPU", 8)]
    keys = ["full_view_s", "lost_all_s", "tcp_median", "ctl_per_s", "rss_mb_median",
            "cpu_pct_median", "join_cpu_s"]
    cols = [growth(rows, key) for key in keys]
    _harness.print_table(gcols, [
        [str(r.nodes), f"{r.nodes / rows[0].nodes:.1f}x", f"{(r.nodes / rows[0].nodes) ** 2:.0f}x",
         *(col[i] for col in cols)] for i, r in enumerate(rows)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)),
                        help="comma-separated node counts (default 10,30,100); the first is "
                             "the baseline for the ratios")
    parser.add_argument("--per-host", type=int, default=1,
                        help="nodes per process (one process per host; default 1)")
    parser.add_argument("--seeds", choices=("first", "all", "mdns"), default="first",
                        help="first: every node is given the first host's node as its one "
                             "seed (issue 16); all: every host's first node is a static peer "
                             "of every node (how a full view is had without gossip); mdns: "
                             "no seed, mDNS on")
    parser.add_argument("--idle", type=float, default=5.0, help="idle window, s (default 5)")
    parser.add_argument("--view-timeout", type=float, default=30.0,
                        help="how long after the last ready a full view may take, s")
    parser.add_argument("--quick", action="store_true",
                        help="the first N only, 2 s idle window, 5 s for a full view and for "
                             "the loss to be seen")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    parser.add_argument("--timeline", action="store_true",
                        help="also print joined and false lost events per 5 s around the "
                             "last node ready (when the mesh came together)")
    parser.add_argument("--dump", type=Path, metavar="DIR",
                        help="write every node's events and membership debug log, in time "
                             "order, to DIR/n<N>.txt (why a member was taken for lost)")
    args = parser.parse_args(argv)
    if args.dump is not None:
        os.environ["ZEROMESH_SCALE_DEBUG"] = "1"  # read by _scale_node.py
    try:
        sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--sizes: not a list of integers: {args.sizes!r}")
    lost_timeout = LOST_TIMEOUT
    if args.quick:
        sizes, args.idle, args.view_timeout, lost_timeout = sizes[:1], 2.0, 5.0, 5.0
    if not sizes or any(not 2 <= n <= 250 * args.per_host for n in sizes) or args.per_host < 1:
        parser.error("--sizes: each N must be 2..250 x --per-host")
    reason = netns.netns_unavailable_reason()
    if reason is not None:
        print(f"scale.py: {reason}", file=sys.stderr)
        return 2
    rows = []
    for n in sizes:
        if not args.json:
            print(f"N={n} ...", file=sys.stderr, flush=True)
        rows.append(measure(n, args.per_host, args.idle, args.view_timeout,
                            args.seeds, lost_timeout, args.timeline, args.dump))
    if args.json:
        print(json.dumps({"per_host": args.per_host, "seeds": args.seeds,
                          "rows": [asdict(r) for r in rows]}))
    else:
        report(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
