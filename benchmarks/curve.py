"""CURVE overhead: zeromesh pub/sub and request/reply with CURVE off and on, in one run.

The measurements are the zeromesh sides of ``pubsub.py`` and ``reqrep.py``
(the same processes, payloads and checks), run as plain nodes and as secure
nodes, interleaved (off, on, off, on, ...; ``--repeat`` rounds, the median of
each reported) so that a change in machine load hits both settings alike:

* **pub/sub**: lossless throughput (msgs/s at the receiver) at 64 B and 1 KiB;
* **request/reply**: p50 and p99 round trip with 1 request in flight, and
  requests/s with 64 in flight (64-byte bodies, an echo service).

For "on", a keypair per side is generated into a temporary directory at the
start (`patterns.generate_keypair`); each node gets its own ``secret_key``
and ``allow`` = that directory, so the two admit each other and every socket
between them is CURVE. The figure tracked is **on/off** per row: below 1 for
throughput and above 1 for latency is what CURVE costs.

Both settings find their peer by mDNS on 127.0.0.1, not by a static peer URL:
a static URL carries no CURVE key, so a secure node refuses it (fails closed).
Only the discovery differs from ``pubsub.py``/``reqrep.py``; the data path is
the same.

Run::

    python benchmarks/curve.py                  # pubsub.py's and reqrep.py's default counts
    python benchmarks/curve.py --quick --json   # a small run, machine-readable

Everything binds 127.0.0.1 only (``ZEROMESH_INTERFACES`` is forced to it).
Every phase has a hard timeout; children still alive at the end are killed.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final, TypeVar

import _harness as h
import pubsub
import reqrep
from _harness import LOOPBACK

SETTINGS: Final[tuple[str, ...]] = ("off", "on")
DISCOVERY: Final[dict[str, Any]] = {"mdns": True, "peers": []}
"""Both settings alike: a static peer URL has no CURVE key, so a secure node refuses it."""
T = TypeVar("T")
SIDES: Final[tuple[str, str]] = ("a", "b")
"""Key names: the first process of a pair (subscriber, server) and the second."""


def node_opts(setting: str, keys: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The extra `AsyncNode` settings of the first and the second process."""
    if setting == "off":
        return dict(DISCOVERY), dict(DISCOVERY)
    first, second = ({**DISCOVERY, "secret_key": str(keys / f"{name}.key_secret"),
                      "allow": str(keys)} for name in SIDES)
    return first, second


def make_keys(where: Path) -> Path:
    from patterns import generate_keypair

    for name in SIDES:
        generate_keypair(where, name)
    return where


# -- measurements ------------------------------------------------------------------


def interleaved(run: Callable[[str], T], failed: Callable[[T], bool], repeat: int,
                progress: Callable[[str], None], what: str) -> dict[str, list[T]]:
    """`repeat` rounds of ``run("off")`` then ``run("on")``, so load drift hits both alike.

    A failed run ends the rounds (it is the last of its setting's list).
    """
    runs: dict[str, list[T]] = {setting: [] for setting in SETTINGS}
    for i in range(repeat):
        for setting in SETTINGS:
            progress(f"{what}, CURVE {setting} ({i + 1}/{repeat})")
            res = run(setting)
            runs[setting].append(res)
            if failed(res):
                return runs
    return runs


def measure_pubsub(size: int, count: int, args: argparse.Namespace, keys: Path,
                   progress: Callable[[str], None]) -> dict[str, dict[str, Any]]:
    """Setting -> the median run by receive rate (or the failed one), as `h.median_of`."""
    runs = interleaved(lambda setting: pubsub.run_mesh(size, count, args.timeout,
                                                       *node_opts(setting, keys)),
                       lambda res: h.failed(res, count), args.repeat, progress,
                       f"pub/sub {size} B x {count}")
    out = {}
    for setting, results in runs.items():
        res = h.median_of(iter(results).__next__, len(results), count)
        detail = h.side(res, count)
        assert detail is not None
        out[setting] = {"value": res.recv_rate, "ok": h.ok(detail), "count": count,
                        "detail": detail}
    return out


def reqrep_problem(res: reqrep.Result, n_lat: int, n_tput: int) -> str:
    """Why a request/reply run does not count, or ``""``."""
    if res.error or res.wrong:
        return f"wrong replies={res.wrong} error={res.error or '-'}"
    if res.latency_count != n_lat or res.throughput_count != n_tput:
        return f"ran {res.latency_count}/{n_lat} timed and {res.throughput_count}/{n_tput} " \
               "in flight"
    return ""


def measure_reqrep(args: argparse.Namespace, keys: Path, progress: Callable[[str], None]
                   ) -> dict[str, dict[str, dict[str, Any]]]:
    """Figure -> setting -> p50, p99 or requests/s, each the median over the runs."""
    n_lat, n_tput = args.n_lat, args.n_tput
    runs = interleaved(lambda setting: reqrep.run_side("zeromesh", n_lat, n_tput,
                                                       args.timeout, *node_opts(setting, keys)),
                       lambda res: bool(reqrep_problem(res, n_lat, n_tput)), args.repeat,
                       progress, f"req/rep {n_lat} timed + {n_tput} in flight")
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for key in ("p50_us", "p99_us", "requests_per_s"):
        out[f"reqrep_{key}"] = {}
        for setting, results in runs.items():
            problem = next((p for r in results if (p := reqrep_problem(r, n_lat, n_tput))), "")
            values = [getattr(r, key) for r in results]
            out[f"reqrep_{key}"][setting] = {
                "value": 0.0 if problem else statistics.median(values), "ok": not problem,
                "runs": values, "error": problem}
    return out


# -- report ------------------------------------------------------------------------

FIGURES: Final[tuple[tuple[str, str, str], ...]] = (
    ("pubsub_64", "pub/sub 64 B msgs/s", ",.0f"),
    ("pubsub_1024", "pub/sub 1 KiB msgs/s", ",.0f"),
    ("reqrep_p50_us", "req/rep p50 us (1 in fl.)", ",.1f"),
    ("reqrep_p99_us", "req/rep p99 us (1 in fl.)", ",.1f"),
    ("reqrep_requests_per_s", "req/rep req/s (64 in fl.)", ",.0f"),
)
COLUMNS: Final = (("figure", 26), ("CURVE off", 12), ("CURVE on", 12), ("on/off", 7))


def run_all(args: argparse.Namespace, keys: Path,
            progress: Callable[[str], None]) -> dict[str, dict[str, dict[str, Any]]]:
    """Figure -> setting -> measurement."""
    figures = {f"pubsub_{size}": measure_pubsub(
        size, args.count or (pubsub.QUICK_COUNT if args.quick else pubsub.DEFAULT_COUNTS[size]),
        args, keys, progress) for size in pubsub.SIZES}
    return {**figures, **measure_reqrep(args, keys, progress)}


def on_off(row: dict[str, dict[str, Any]]) -> float | None:
    off, on = row["off"], row["on"]
    return on["value"] / off["value"] if off["ok"] and on["ok"] and off["value"] else None


def print_report(figures: dict[str, dict[str, dict[str, Any]]]) -> None:
    cells = []
    for name, title, spec in FIGURES:
        row = figures[name]
        cells.append([title, *(format(row[s]["value"], spec) if row[s]["ok"] else "FAILED"
                               for s in SETTINGS), h.fmt_ratio(on_off(row))])
    h.print_table(COLUMNS, cells)
    for name, title, _ in FIGURES:
        for setting in SETTINGS:
            m = figures[name][setting]
            if name.startswith("pubsub"):
                h.print_problems(f"{title}, CURVE {setting}", m["detail"])
            elif m["error"]:
                print(f"  {title}, CURVE {setting}: {m['error']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int,
                        help="pub/sub messages per size (default 1M at 64 B, 300k at 1 KiB)")
    parser.add_argument("--latency-count", dest="n_lat", type=int,
                        help="requests timed one at a time")
    parser.add_argument("--throughput-count", dest="n_tput", type=int,
                        help=f"requests with {reqrep.IN_FLIGHT} in flight")
    h.add_run_flags(parser, quick="a small run (a smoke test)")
    args = parser.parse_args(argv)
    args.repeat = args.repeat or (1 if args.quick else 3)
    args.n_lat = args.n_lat or (reqrep.QUICK_LATENCY_COUNT if args.quick
                                else reqrep.DEFAULT_LATENCY_COUNT)
    args.n_tput = args.n_tput or (reqrep.QUICK_THROUGHPUT_COUNT if args.quick
                                  else reqrep.DEFAULT_THROUGHPUT_COUNT)
    if args.count is not None and args.count < 1:
        parser.error("--count must be at least 1")
    if args.repeat < 1 or args.n_lat < 1 or args.n_tput < reqrep.IN_FLIGHT:
        parser.error(f"need --repeat >= 1, --latency-count >= 1 and "
                     f"--throughput-count >= {reqrep.IN_FLIGHT}")

    def progress(text: str) -> None:
        print(f"# {text}", file=sys.stderr, flush=True)

    try:
        with tempfile.TemporaryDirectory(prefix="zeromesh-curve-bench-") as tmp:
            figures = run_all(args, make_keys(Path(tmp)), progress)
    finally:  # only our own children: whatever a phase left behind
        for child in mp.active_children():
            child.kill()
            child.join(timeout=5)
    ok = all(figures[name][s]["ok"] for name, _, _ in FIGURES for s in SETTINGS)
    if args.json:
        print(json.dumps({
            "benchmark": "curve", "transport": f"tcp://{LOOPBACK}", "discovery": "mdns",
            "repeat": args.repeat, "statistic": "median", "python": sys.version.split()[0],
            "results": [{"figure": name, "title": title, **figures[name],
                         "ratio": on_off(figures[name])} for name, title, _ in FIGURES],
            "ok": ok}, indent=2))
    else:
        print_report(figures)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
