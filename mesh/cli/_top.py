"""`zeromesh top`: the mesh live in the terminal, from an agent's ``GET /v1/events``.

Each ``stats`` event redraws the screen in place (plain ANSI: home, clear),
cut to the terminal's size; to a pipe or a file it is written as plain lines.
Peer events are shown in a short log under it. An agent that goes away (a
restart) is reached again every second. ``q``, Ctrl-C or SIGTERM quits
(status 0, the terminal's mode restored), as in `top` and `nats top`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import termios
import tty
from collections import deque
from collections.abc import AsyncIterator, Iterator
from typing import Any, Final

import aiohttp

from .._support._text import printable
from ._commands import stop_on_signals

DEFAULT_AGENT: Final[str] = "http://127.0.0.1:7474"
_CLEAR: Final[str] = "\x1b[H\x1b[2J"
_ROWS: Final[int] = 15
"""Rows shown per table (the busiest first)."""


async def run(args: argparse.Namespace) -> int:
    """Status 1 when the agent cannot be reached at first; one that goes away later (a
    restart) is reached again, as the mesh page does, until `q` or a signal."""
    url = args.agent.rstrip("/") + "/v1/events"
    log: deque[str] = deque(maxlen=5)
    quit_pressed = asyncio.Event()
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=30)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        try:
            response: aiohttp.ClientResponse | None = await _open(session, url)
        except _UNREACHABLE as exc:
            print(f"zeromesh top: cannot reach the agent at {args.agent}: {exc}",
                  file=sys.stderr)
            return 1
        with _keys(quit_pressed), stop_on_signals(quit_pressed):
            while response is not None:
                with contextlib.closing(response):
                    await _follow(response, log, quit_pressed)
                if quit_pressed.is_set():
                    break
                print(f"zeromesh top: lost the agent at {args.agent}; reconnecting (q quits)",
                      file=sys.stderr)
                response = await _reconnect(session, url, quit_pressed)
    return 0


class _Refused(aiohttp.ClientError):
    """The agent answered the stream's request with another status than 200."""


_UNREACHABLE: Final = (aiohttp.ClientError, OSError, TimeoutError)
_RETRY: Final[float] = 1.0
"""Seconds between attempts to reach an agent that went away."""


async def _open(session: aiohttp.ClientSession, url: str) -> aiohttp.ClientResponse:
    response = await session.get(url)
    if response.status != 200:
        response.close()
        raise _Refused(f"{url} answered {response.status}")
    return response


async def _follow(response: aiohttp.ClientResponse, log: deque[str],
                  quit_pressed: asyncio.Event) -> None:
    """Show the stream until it ends (or breaks) or `quit_pressed`."""
    reader = asyncio.ensure_future(_show(_events(response), log))
    quitting = asyncio.ensure_future(quit_pressed.wait())
    try:
        await asyncio.wait({reader, quitting}, return_when=asyncio.FIRST_COMPLETED)
    finally:  # (also when cancelled: no task is left to fail unseen)
        for task in (reader, quitting):
            task.cancel()
        await asyncio.wait({reader, quitting})
    failed = None if reader.cancelled() else reader.exception()
    if failed is not None and (isinstance(failed, BrokenPipeError)  # our stdout, not the agent
                               or not isinstance(failed, _UNREACHABLE)):
        raise failed


async def _reconnect(session: aiohttp.ClientSession, url: str,
                     quit_pressed: asyncio.Event) -> aiohttp.ClientResponse | None:
    """The stream again, once the agent answers; None when `quit_pressed` comes first."""
    while True:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(quit_pressed.wait(), _RETRY)
        if quit_pressed.is_set():
            return None
        with contextlib.suppress(*_UNREACHABLE):
            return await _open(session, url)


async def _events(response: aiohttp.ClientResponse) -> AsyncIterator[tuple[str, Any]]:
    kind, data = "message", list[str]()
    async for raw in response.content:
        line = raw.decode("utf-8", "replace").rstrip("\r\n")
        if not line:
            if data:
                yield kind, json.loads("\n".join(data))
            kind, data = "message", list[str]()
        elif line.startswith("event:"):
            kind = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())


async def _show(events: AsyncIterator[tuple[str, Any]], log: deque[str]) -> None:
    async for kind, data in events:
        if kind == "stats":
            sys.stdout.write(frame(render(data, log), _terminal_size()))
            sys.stdout.flush()
        elif kind in ("joined", "left", "lost"):
            log.append(f"{kind:<7} {data.get('name', '?')} ({str(data.get('id', ''))[:8]})")


def _terminal_size() -> os.terminal_size | None:
    """The size of the terminal stdout is, or None when it is a pipe or a file."""
    try:
        return os.get_terminal_size(sys.stdout.fileno()) if sys.stdout.isatty() else None
    except (OSError, ValueError):
        return None


def frame(lines: list[str], size: os.terminal_size | None) -> str:
    """What one snapshot writes. On a terminal: the screen cleared, then no line wider or
    more lines than it has (a wrapped or scrolled frame would push the top of the screen
    out of view every second). To a pipe or a file: plain lines, a blank one after each
    snapshot, no control sequence. Any character that is not printable (a peer's name
    from the network could hold one) is shown as ``?``, so nothing drives the terminal."""
    lines = [printable(line) for line in lines]
    if size is None:
        return "\n".join(lines) + "\n\n"
    width = size.columns or None  # (a terminal that says 0 by 0 gets every line)
    cut = [line[:width] for line in lines[:size.lines - 1 if size.lines > 1 else None]]
    return _CLEAR + "\r\n".join(cut) + "\r\n"


def render(stats: dict[str, Any], log: deque[str] | None = None) -> list[str]:
    """The screen for one stats snapshot."""
    node = stats.get("node", {})
    spool = stats.get("spool", {})
    lines = [f"zeromesh top — {node.get('name')} ({str(node.get('id', ''))[:8]}) mesh "
             f"{node.get('mesh')}  v{node.get('version')}  up {node.get('uptime_s')} s  "
             f"{node.get('health')}   (q quits)",
             f"spool {spool.get('messages', 0)} msgs {spool.get('bytes', 0)} B "
             f"({spool.get('quota_pct', 0)}% of quota)  dead letters "
             f"{spool.get('dead_letters', 0)}", ""]
    peers = stats.get("peers", [])
    lines.append(f"PEERS ({len(peers)})  {'name':<20} {'state':<8} {'rtt ms':>8} {'in/s':>8} "
                 f"{'out/s':>8} {'dropped':>8}")
    for p in peers[:_ROWS]:
        rtt = "-" if p.get("rtt_ms") is None else f"{p['rtt_ms']:.2f}"
        lines.append(f"  {str(p.get('id', ''))[:8]:<10} {p.get('name', '')[:20]:<20} "
                     f"{p.get('state', ''):<8} {rtt:>8} {p.get('in_per_s', 0):>8} "
                     f"{p.get('out_per_s', 0):>8} {p.get('dropped', 0):>8}")
    lines += ["", f"{'TOPIC':<40} {'msgs/s':>8} {'subs':>5} {'dropped':>8}"]
    for t in stats.get("topics", [])[:_ROWS]:
        lines.append(f"{t.get('topic', '')[:40]:<40} {t.get('msgs_per_s', 0):>8} "
                     f"{t.get('subscribers', 0):>5} {t.get('dropped', 0):>8}")
    lines += ["", f"{'QUEUE':<40} {'workers':>8} {'flight':>8} {'backlog':>8} {'msgs/s':>8}"]
    for q in stats.get("queues", [])[:_ROWS]:
        lines.append(f"{q.get('queue', '')[:40]:<40} {q.get('workers', 0):>8} "
                     f"{q.get('in_flight', 0):>8} {q.get('backlog', 0):>8} "
                     f"{q.get('msgs_per_s', 0):>8}")
    lines += ["", f"{'SERVICE':<40} {'servers':>8} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>8}"]
    for s in stats.get("services", [])[:_ROWS]:
        lines.append(f"{s.get('service', '')[:40]:<40} {s.get('servers', 0):>8} "
                     f"{_ms(s.get('p50_ms')):>8} {_ms(s.get('p99_ms')):>8} "
                     f"{s.get('per_s', 0):>8}")
    if log:
        lines += ["", "EVENTS", *log]
    return lines


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


@contextlib.contextmanager
def _keys(pressed: asyncio.Event) -> Iterator[None]:
    """Read single keys from a terminal stdin while inside; `q` sets `pressed`."""
    fd = sys.stdin.fileno() if sys.stdin is not None else -1
    if fd < 0 or not os.isatty(fd):
        yield
        return
    saved = termios.tcgetattr(fd)
    loop = asyncio.get_running_loop()

    def on_key() -> None:
        if os.read(fd, 32).lower().startswith(b"q") or not os.isatty(fd):
            pressed.set()

    tty.setcbreak(fd)
    loop.add_reader(fd, on_key)
    try:
        yield
    finally:
        loop.remove_reader(fd)
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)
