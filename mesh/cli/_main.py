"""The `zeromesh` command line: argument parsing, logging setup and exit codes.

Exit status: 0 success, 1 timeout or nothing received, 2 bad usage or
config — always with a one-line reason on stderr, never a traceback. This is
the only module that configures logging.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from collections.abc import Sequence
from datetime import datetime
from typing import NoReturn

from patterns import KeyFileError, generate_keypair

from .. import _loop
from .._memory._history import parse_since
from .._spool import FsyncPolicy
from .._support._text import printable, quoted
from .._support._urls import http_url_problem
from ..errors import ConfigError, MeshError
from . import _commands, _demo
from . import _spool as spool_commands

EXIT_OK = 0
EXIT_FAIL = 1
EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors are one line and exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: {message}\n")


def _common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("node")
    g.add_argument("--mesh", help="mesh name (env ZEROMESH_MESH; default 'default')")
    g.add_argument("--name", help="node name (env ZEROMESH_NAME; default: host name)")
    g.add_argument("--interface", action="append", dest="interfaces", metavar="IP",
                   help="IPv4 or IPv6 address to bind and announce on (link-local with "
                        "its interface: fe80::1%%eth0); repeatable "
                        "(env ZEROMESH_INTERFACES, comma-separated; default 127.0.0.1)")
    g.add_argument("--peer", action="append", dest="peers", metavar="URL",
                   help="static peer control endpoint tcp://host:port or "
                        "tcp://[IPv6]:port; repeatable "
                        "(env ZEROMESH_PEERS)")
    g.add_argument("--data-dir", help="keeps the node id (env ZEROMESH_DATA_DIR)")
    g.add_argument("--port", type=int, help="control port (default: any free port)")
    g.add_argument("--no-mdns", dest="mdns", action="store_false", default=None,
                   help="do not announce or browse with mDNS (static peers only)")
    g.add_argument("--history", action="append", metavar="PATTERN",
                   help="keep what this node publishes on matching topics for late "
                        "subscribers (`sub --since/--last`); repeatable")
    g.add_argument("--fsync", choices=[p.value for p in FsyncPolicy],
                   help="spool fsync policy (default batch: group commit)")
    g.add_argument("--durable-expiry", type=float, metavar="S",
                   help="forget a durable subscription no peer announced for S seconds, "
                        "and its backlog (env ZEROMESH_DURABLE_EXPIRY; default 604800 = "
                        "7 days)")
    g.add_argument("--secret-key", metavar="FILE",
                   help="CURVE secret key file from `zeromesh keygen`: encrypt and "
                        "authenticate everything (env ZEROMESH_SECRET_KEY; needs --allow)")
    g.add_argument("--allow", metavar="PATH",
                   help="CURVE allowlist: a directory of *.key public key files, or one "
                        "(env ZEROMESH_ALLOW)")
    g.add_argument("-v", "--verbose", action="count", default=0, help="more log output")


def _unused_node_flags(p: argparse.ArgumentParser, why: str, *, interface: bool = True) -> None:
    """The node flags DESIGN promises every command, for one that runs no node of its own
    (top, keygen, demo): accepted, so one set of flags works with any command, and with no
    effect, as the ZEROMESH_* variables have none there."""
    g = p.add_argument_group("node", f"Accepted like every command's, with no effect: {why}.")
    g.add_argument("--mesh", metavar="M")
    if interface:
        g.add_argument("--interface", action="append", dest="interfaces", metavar="IP")
    g.add_argument("--peer", action="append", dest="peers", metavar="URL")
    g.add_argument("--data-dir", metavar="D")


def _since(text: str) -> float | datetime:
    """Seconds ago (``90``, ``30s``, ``10m``, ``2h``, ``1d``) or an ISO 8601 time."""
    try:
        return parse_since(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(exc.reason) from None


def _seconds(text: str) -> float:
    """A duration for a timeout, a wait or a ttl: > 0 and finite (NaN passed `<= 0` and
    crashed later; every one of these is meant to end)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {quoted(text)}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds: {quoted(text)}")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0: {quoted(text)}")
    return value


def _http_url(text: str) -> str:
    """An agent's address: ``http(s)://host[:port]`` (anything else was an attempt to reach
    it, failing as "cannot reach" with status 1)."""
    problem = http_url_problem(text)
    if problem is not None:
        raise argparse.ArgumentTypeError(problem)
    return text


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {quoted(text)}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1: {quoted(text)}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="zeromesh", description="A brokerless messaging mesh.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("demo", help="run a small mesh on this machine, showing every pattern")
    p.add_argument("--interface", default="127.0.0.1", metavar="IP",
                   help="address for the demo nodes (default 127.0.0.1)")
    _unused_node_flags(p, "the demo makes its own mesh in a temp dir", interface=False)

    p = sub.add_parser("agent", help="run a sidecar node with an HTTP API until SIGINT/SIGTERM")
    _common(p)
    p.add_argument("--http", metavar="HOST:PORT",
                   help="HTTP API address (env ZEROMESH_HTTP; default 127.0.0.1:7474)")
    p.add_argument("--config", metavar="FILE",
                   help="TOML config file (env ZEROMESH_CONFIG); flags and env override it")
    p.add_argument("--print-config", action="store_true",
                   help="print the effective config as JSON and exit")

    p = sub.add_parser("top", help="live peers, topics, queues and services from an agent")
    p.add_argument("--agent", type=_http_url, default="http://127.0.0.1:7474", metavar="URL",
                   help="the agent's HTTP address (default http://127.0.0.1:7474)")
    _unused_node_flags(p, "top shows the agent's mesh")

    p = sub.add_parser("keygen", help="write a CURVE keypair (NAME.key, NAME.key_secret)")
    p.add_argument("--out", default=".", metavar="DIR",
                   help="directory for the key files (default: here)")
    p.add_argument("--name", default="node", help="file name stem (default: node)")
    _unused_node_flags(p, "keygen only writes files")

    p = sub.add_parser("peers", help="list the peers of the mesh")
    _common(p)
    p.add_argument("--wait", type=_seconds, default=1.0, metavar="S",
                   help="seconds to listen before listing (default 1)")
    p.add_argument("--json", action="store_true", help="print a JSON list")

    p = sub.add_parser("pub", help="publish a message (no DATA: one per stdin line)")
    _common(p)
    p.add_argument("topic")
    p.add_argument("data", nargs="?")
    p.add_argument("--reliable", action="store_true",
                   help="spool to disk first; at-least-once to durable subscriptions "
                        "(needs --data-dir)")
    p.add_argument("--retain", action="store_true",
                   help="make it the topic's retained value here (empty DATA clears it)")
    p.add_argument("--ttl", type=_seconds, metavar="S",
                   help="drop each message not delivered within S seconds (from any spool too)")
    p.add_argument("--wait-subscribers", type=_count, metavar="N",
                   help="publish only once N matching subscribers are connected")
    p.add_argument("--timeout", type=_seconds, default=10.0, metavar="S",
                   help="how long to wait for subscribers, then (--reliable) for receivers to "
                        "take what was spooled; the rest stays there (default 10)")
    p.add_argument("--header", action="append", default=[], metavar="K=V",
                   help="message header; repeatable")

    p = sub.add_parser("sub", help="print messages on topics matching PATTERN")
    _common(p)
    p.add_argument("pattern")
    p.add_argument("--count", type=_count, metavar="N", help="exit 0 after N messages")
    p.add_argument("--timeout", type=_seconds, metavar="S", help="bound the whole run")
    p.add_argument("--json", action="store_true", help="one JSON object per message")
    p.add_argument("--durable", metavar="NAME",
                   help="a durable subscription kept in --data-dir; restart to resume it")
    p.add_argument("--no-retained", dest="retained", action="store_false",
                   help="start with live messages (skip the topics' retained values)")
    p.add_argument("--since", type=_since, metavar="S|TIME",
                   help="first replay the publishers' history from S ago (90, 30s, 10m, "
                        "2h, 1d) or from an ISO 8601 time, then go live")
    p.add_argument("--last", type=_count, metavar="N",
                   help="first replay the newest N messages of each topic from history")

    p = sub.add_parser("last", help="print the retained values matching PATTERN")
    _common(p)
    p.add_argument("pattern")
    p.add_argument("--json", action="store_true", help="print a JSON list")
    p.add_argument("--timeout", type=_seconds, default=5.0, metavar="S",
                   help="how long to wait for each publisher's answer (default 5)")

    p = sub.add_parser("push", help="hand a message to one worker of QUEUE (no DATA: stdin lines)")
    _common(p)
    p.add_argument("queue")
    p.add_argument("data", nargs="?")
    p.add_argument("--reliable", action="store_true",
                   help="spool to disk first; at-least-once, even if no worker is up "
                        "(needs --data-dir)")
    p.add_argument("--ttl", type=_seconds, metavar="S",
                   help="drop each message no worker got within S seconds (from the spool too)")
    p.add_argument("--wait-workers", type=_count, metavar="N",
                   help="push only once N workers of the queue are connected")
    p.add_argument("--timeout", type=_seconds, default=10.0, metavar="S",
                   help="how long to wait for workers, and for them to take what was pushed "
                        "(default 10)")
    p.add_argument("--header", action="append", default=[], metavar="K=V",
                   help="message header; repeatable")

    p = sub.add_parser("pull", help="work on QUEUE: print each message given to this worker")
    _common(p)
    p.add_argument("queue")
    p.add_argument("--count", type=_count, metavar="N", help="exit 0 after N messages")
    p.add_argument("--timeout", type=_seconds, metavar="S", help="bound the whole run")
    p.add_argument("--json", action="store_true", help="one JSON object per message")
    p.add_argument("--prefetch", type=_count, default=16, metavar="N",
                   help="messages held per pusher before they are printed (default 16)")

    p = sub.add_parser("serve", help="answer requests to SERVICE until SIGINT/SIGTERM")
    _common(p)
    p.add_argument("service")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--echo", action="store_true", help="reply with the request body")
    how.add_argument("--exec", metavar="CMD",
                     help="run CMD per request (no shell): body on stdin, reply = stdout; "
                          "a non-zero exit is an error reply with its stderr")
    p.add_argument("--exec-timeout", type=_seconds, default=30.0, metavar="S",
                   help="kill CMD after S seconds and reply with an error (default 30)")
    p.add_argument("--concurrency", type=_count, default=16, metavar="N",
                   help="requests handled at once (default 16)")

    p = sub.add_parser("req", help="send DATA to SERVICE and print the reply body")
    _common(p)
    p.add_argument("service")
    p.add_argument("data")
    p.add_argument("--timeout", type=_seconds, default=5.0, metavar="S",
                   help="covers finding a server and all retries (default 5)")
    p.add_argument("--retries", type=_retries, metavar="N",
                   help="retries on another server after a timeout (default 2; not with --all)")
    p.add_argument("--all", action="store_true",
                   help="ask every live server and print each reply as it comes, one line "
                        "'SOURCE DATA' each, until all answered or --timeout; exit 1 if none "
                        "answered without an error")
    p.add_argument("--json", action="store_true",
                   help="print each reply as one JSON object (service, data, source, headers, "
                        "error when the server failed)")
    p.add_argument("--header", action="append", default=[], metavar="K=V",
                   help="request header; repeatable")
    _add_spool(sub)
    _add_bench(sub)
    return parser


def _add_bench(sub: argparse._SubParsersAction[_Parser]) -> None:
    p = sub.add_parser("bench", help="measure msgs/s, MB/s, latency and drops of a pattern",
                       description="Both ends on this machine (a child process runs the "
                                   "other), or with --role one end against a peer by mesh "
                                   "name. Latency is one way from a send timestamp in each "
                                   "message (across hosts it depends on their clock sync); "
                                   "reqrep: the round trip.")
    _common(p)
    p.add_argument("pattern", choices=["pubsub", "pushpull", "reqrep", "spool"])
    p.add_argument("--role", choices=["pub", "sub", "push", "pull", "req", "rep"],
                   help="run only this end (pubsub/spool: pub|sub, pushpull: push|pull, "
                        "reqrep: req|rep)")
    p.add_argument("--count", type=_count, metavar="N",
                   help="messages (requests) to send (default: pubsub 200000, pushpull and "
                        "spool 100000, reqrep 10000)")
    p.add_argument("--size", type=_count, default=64, metavar="B",
                   help="payload bytes, at least 8 (default 64)")
    p.add_argument("--in-flight", type=_count, metavar="N",
                   help="reqrep: requests outstanding at once (default 1, at most 10,000)")
    p.add_argument("--timeout", type=_seconds, default=60.0, metavar="S",
                   help="bound the whole run; exit 1 if it comes first (default 60)")
    p.add_argument("--json", action="store_true", help="one JSON object instead of a table")


def _retries(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {quoted(text)}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0: {quoted(text)}")
    return value


def _configure_logging(verbose: int) -> None:
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _spool(args: argparse.Namespace) -> int:
    if args.action == "ls":
        return spool_commands.ls(args)
    if args.action == "show":
        return spool_commands.show(args)
    if args.action == "purge":
        return _loop.run(spool_commands.purge(args))
    if args.action == "durables":
        return spool_commands.durables(args)
    if args.action == "forget":
        return _loop.run(spool_commands.forget(args))
    code: int = _loop.run(_commands.until_terminated(
        lambda: spool_commands.replay(args, _commands.node_for(args))))
    return code


def _keygen(args: argparse.Namespace) -> int:
    try:
        public, secret = generate_keypair(args.out, args.name)
    except KeyFileError as exc:
        raise ConfigError("--name" if str(exc).startswith("name ") else "--out",
                          str(exc)) from None
    key = public.read_text().split('public-key = "')[1].split('"')[0]
    print(f"public key {key}\nwrote {public} (share it: peers put it in their allowlist)\n"
          f"wrote {secret} (mode 0600: keep it secret)")
    return EXIT_OK


_REPLAY_EXIT = ("It waits for the messages it replayed alone (not others in the outbox). "
                "Exit 0 once each was delivered; 1 if one expired (its ttl passed: it "
                "leaves the dead letters, counted as expired), failed again (back in the "
                "dead letters), or was not delivered within --timeout (it stays in the "
                "outbox).")


def _add_spool(sub: argparse._SubParsersAction[_Parser]) -> None:
    p = sub.add_parser("spool", help="inspect, replay or purge a node's spools; list or forget "
                                     "the durables it spools for")
    actions = p.add_subparsers(dest="action", required=True, parser_class=_Parser)
    for name, text in [("ls", "count what is in the outbox and the dead letters"),
                       ("show", "print dead letters (or --outbox messages)"),
                       ("replay", "deliver dead letters again, showing progress"),
                       ("purge", "delete the dead letters (or --outbox); node must be stopped"),
                       ("durables", "list the durable subscriptions spooled for, with backlogs"),
                       ("forget", "stop spooling for a durable and free its backlog; node "
                                  "must be stopped")]:
        a = actions.add_parser(name, help=text, epilog=_REPLAY_EXIT if name == "replay" else None)
        _common(a)
        if name in ("ls", "show", "durables"):
            a.add_argument("--json", action="store_true",
                           help="one JSON object per record" if name == "show"
                           else "a JSON list" if name == "durables" else "one JSON object")
        if name == "forget":
            a.add_argument("durable", metavar="NAME",
                           help="the durable's queue (_durable.<node id>.<name>), or its "
                                "name alone when no other owner has one of that name")
        if name in ("show", "purge"):
            a.add_argument("--outbox", action="store_true", help="the outbox, not dead letters")
        if name == "show":
            a.add_argument("--limit", type=_count, default=1000, metavar="N",
                           help="print at most N (default 1000)")
        if name == "replay":
            a.add_argument("ids", nargs="*", type=int, metavar="ID",
                           help="spool ids to replay (default: all)")
            a.add_argument("--timeout", type=_seconds, default=30.0, metavar="S",
                           help="how long to wait for delivery (default 30)")


def _reopen_closed_std_fds() -> None:
    """Put /dev/null on any of fds 0-2 that are closed (`cmd <&-`, `>&-`), as daemons do.

    Otherwise the next file opened (a socket, a pipe) gets one of those numbers, and
    uvloop's libuv aborts the process when it closes it (`uv__close: Assertion fd >
    STDERR_FILENO`); Python has set the matching sys.std* to None, which the commands
    would trip over."""
    for fd, flags, name in ((0, os.O_RDONLY, "stdin"), (1, os.O_WRONLY, "stdout"),
                            (2, os.O_WRONLY, "stderr")):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, flags)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
        if getattr(sys, name) is None:  # (open for the process's life, like sys.std* are)
            setattr(sys, name, open(fd, "r" if fd == 0 else "w", closefd=False))  # noqa: SIM115


def main(argv: Sequence[str] | None = None) -> int:
    _reopen_closed_std_fds()
    args = build_parser().parse_args(argv)
    _configure_logging(getattr(args, "verbose", 0))
    try:
        if args.command == "demo":
            return _demo.run(args.interface)
        if args.command == "spool":
            return _spool(args)
        if args.command == "keygen":
            return _keygen(args)
        if args.command == "bench":  # imported here: only bench needs it
            from .. import _bench
            return _bench.run(args)
        if args.command == "top":  # imported here: aiohttp is only needed by top
            from . import _top
            return _loop.run(_top.run(args))
        if args.command == "agent":  # imported here: the HTTP stack costs ~0.4 s to load
            from . import _agent as agent_cli
            return _loop.run(agent_cli.run(args))
        handler = _commands.HANDLERS[args.command]
        code: int = _loop.run(_commands.until_terminated(lambda: handler(args)))
        return code
    except ConfigError as exc:  # (printable: a remote error's text comes from the network)
        print(f"zeromesh {args.command}: {printable(str(exc))}", file=sys.stderr)
        return EXIT_USAGE
    except MeshError as exc:
        print(f"zeromesh {args.command}: {printable(str(exc))}", file=sys.stderr)
        return EXIT_FAIL
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return EXIT_OK
