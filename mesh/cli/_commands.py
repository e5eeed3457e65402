"""The CLI's node commands. Each runs its own short-lived node: a peer like any other."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import queue
import shlex
import shutil
import signal
import sys
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from typing import Any, Final

from .._membership._peers import PeerEvent
from .._message import Message
from .._node import AsyncNode
from .._support._text import printable, quoted
from ..errors import ConfigError, NoRespondersError, RequestTimeout

_DISCOVERY_WINDOW: Final[float] = 0.25
"""How long `pub` without --wait-subscribers listens before publishing."""
_STDIN_CHUNK: Final[int] = 65536


def node_for(args: argparse.Namespace) -> AsyncNode:
    """A node from the common flags (and ZEROMESH_* variables)."""
    return _node(args)


def _node(args: argparse.Namespace) -> AsyncNode:
    settings = {k: getattr(args, k, None) for k in
                ("mesh", "name", "interfaces", "peers", "data_dir", "port", "mdns", "fsync",
                 "durable_expiry", "secret_key", "allow", "history")}
    return AsyncNode(**settings)


def out(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


@contextlib.contextmanager
def stop_on_signals(stop: asyncio.Event) -> Iterator[None]:
    loop = asyncio.get_running_loop()
    sigs = (signal.SIGINT, signal.SIGTERM)
    for sig in sigs:
        loop.add_signal_handler(sig, stop.set)
    try:
        yield
    finally:
        for sig in sigs:
            loop.remove_signal_handler(sig)


async def until_terminated(command: Callable[[], Coroutine[Any, Any, int]]) -> int:
    """`command()`, which SIGTERM cancels as Ctrl-C does, so that its node leaves
    gracefully (killed by SIGTERM, as `timeout` does, it was reported lost by its peers
    1.5 s later instead of left); the exit status is then 143 (128 + SIGTERM). (A
    factory, not a coroutine: one made before a loop that then cannot start would
    warn "never awaited".)"""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    terminated = False

    def terminate() -> None:
        nonlocal terminated
        terminated = True
        task.cancel()

    loop.add_signal_handler(signal.SIGTERM, terminate)  # (sub, pull, serve set their own)
    try:
        return await command()
    except asyncio.CancelledError:
        if not terminated:
            raise
        task.uncancel()
        return 128 + signal.SIGTERM
    finally:
        loop.remove_signal_handler(signal.SIGTERM)


def event_line(event: PeerEvent) -> str:
    return f"{event.kind.value} name={printable(event.peer.name)} id={event.peer.id}"


async def peers(args: argparse.Namespace) -> int:
    async with _node(args) as node:
        await asyncio.sleep(args.wait)  # the contract: listen this long, then list
        found = node.peers()
    if args.json:
        out(json.dumps([p.to_dict() for p in found]))
    else:
        for p in found:
            out(printable(f"{p.name:<20} {p.id[:8]}  {p.state.value:<7} {p.endpoints[0]}  "
                          f"subs={','.join(p.subscriptions) or '-'}"))
    return 0 if found else 1


def _headers(pairs: list[str]) -> dict[str, str] | None:
    headers = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError("--header", f"expected K=V, got {quoted(pair)}")
        headers[key] = value
    return headers or None


async def pub(args: argparse.Namespace) -> int:
    headers = _headers(args.header)
    async with _node(args) as node:
        node.check_topic(args.topic)
        try:
            if args.wait_subscribers:
                await node.wait_for_subscribers(args.topic, args.wait_subscribers,
                                                timeout=args.timeout)
            else:
                await asyncio.sleep(_DISCOVERY_WINDOW)
                await node.wait_for_known_subscribers(args.topic, timeout=args.timeout)
        except RequestTimeout as exc:
            print(f"zeromesh pub: {exc}; nothing published", file=sys.stderr)
            return 1
        async for payload in _payloads(args.data):
            await node.publish(args.topic, payload, headers=headers, reliable=args.reliable,
                               retain=args.retain, ttl=args.ttl)
        if args.reliable:
            await _settle_spool(node, args.timeout, "pub")
    return 0


async def last(args: argparse.Namespace) -> int:
    async with _node(args) as node:
        await asyncio.sleep(_DISCOVERY_WINDOW)  # let the publishers be found first
        values = await node.last(args.pattern, timeout=args.timeout)
    if args.json:
        out(json.dumps([m.to_dict() for m in values]))
    else:
        for msg in values:
            out(f"{msg.topic} {msg.text}")
    return 0 if values else 1


async def _payloads(data: str | None) -> AsyncIterator[bytes | str]:
    """DATA if given, else one payload per stdin line (none when there is no stdin)."""
    if data is not None:
        yield data
        return
    if sys.stdin is None:
        return
    buf = bytearray()
    async for chunk in _stdin_chunks():
        buf += chunk
        if b"\n" in chunk:
            *lines, tail = bytes(buf).split(b"\n")
            buf = bytearray(tail)
            for line in lines:
                yield line.rstrip(b"\r")
    if buf:
        yield bytes(buf).rstrip(b"\r")


async def _stdin_chunks() -> AsyncIterator[bytes]:
    """stdin's bytes until its end, read by a daemon thread one chunk at a time as asked.

    Not `asyncio.to_thread`: the loop's executor is joined at exit, so a read blocked on
    a terminal or an open pipe held Ctrl-C until the next line came (or forever)."""
    loop = asyncio.get_running_loop()
    asks: queue.SimpleQueue[asyncio.Future[bytes]] = queue.SimpleQueue()

    def hand(fut: asyncio.Future[bytes], chunk: bytes, error: OSError | None) -> None:
        if fut.done():
            return
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(chunk)

    def read() -> None:
        chunk, error = b".", None
        while chunk and error is None:
            fut = asks.get()
            try:
                chunk = os.read(0, _STDIN_CHUNK)
            except OSError as exc:
                error = exc
            with contextlib.suppress(RuntimeError):  # (the loop closed: we are exiting)
                loop.call_soon_threadsafe(hand, fut, chunk, error)

    threading.Thread(target=read, name="zeromesh-stdin", daemon=True).start()
    while True:
        fut = loop.create_future()
        asks.put(fut)
        chunk = await fut
        if not chunk:
            return
        yield chunk


async def _settle_spool(node: AsyncNode, timeout: float, command: str) -> None:
    """Stay up while online receivers take what we spooled; what is left stays on disk."""
    try:
        await node.wait_for_spool(timeout=timeout)
    except RequestTimeout:
        print(f"zeromesh {command}: {node.spool_pending} message(s) kept in the spool for "
              "receivers not online; they go out when this data dir runs again", file=sys.stderr)


async def sub(args: argparse.Namespace) -> int:
    async with _node(args) as node:
        subscription: AsyncIterator[Message]
        if args.durable:
            subscription = await node.subscribe_durable(args.pattern, args.durable,
                                                        since=args.since, last=args.last)
        else:
            subscription = await node.subscribe(args.pattern, retained=args.retained,
                                                since=args.since, last=args.last)

        def show(msg: Message) -> str:
            return json.dumps(msg.to_dict()) if args.json else f"{msg.topic} {msg.text}"

        return await _print_messages(subscription, show, args.count, args.timeout)


async def _print_messages(messages: AsyncIterator[Message], show: Callable[[Message], str],
                          count: int | None, timeout: float | None) -> int:
    """Print until `count` messages, the timeout or a signal; the exit status of sub/pull."""
    received = 0
    stop = asyncio.Event()

    async def consume() -> None:
        nonlocal received
        async for msg in messages:
            out(show(msg))
            received += 1
            if count is not None and received >= count:
                return

    with stop_on_signals(stop):
        consumer = asyncio.create_task(consume())
        stopper = asyncio.create_task(stop.wait())
        await asyncio.wait({consumer, stopper}, timeout=timeout,
                           return_when=asyncio.FIRST_COMPLETED)
        for task in (consumer, stopper):
            task.cancel()
        failed = consumer.exception() if consumer.done() and not consumer.cancelled() else None
        if failed is not None:
            raise failed  # (an error while receiving is not "nothing arrived")
    if count is not None:
        return 0 if received >= count else 1
    return 0 if received else 1


async def push(args: argparse.Namespace) -> int:
    headers = _headers(args.header)
    async with _node(args) as node:
        node.check_queue(args.queue)
        try:
            if args.wait_workers:
                await node.wait_for_workers(args.queue, args.wait_workers, timeout=args.timeout)
            else:
                await asyncio.sleep(_DISCOVERY_WINDOW)
        except RequestTimeout as exc:
            print(f"zeromesh push: {exc}; nothing pushed", file=sys.stderr)
            return 1
        async for payload in _payloads(args.data):
            await node.push(args.queue, payload, headers=headers, timeout=args.timeout,
                            reliable=args.reliable, ttl=args.ttl)
        if args.reliable:
            await _settle_spool(node, args.timeout, "push")
            return 0
        return 0 if await _settle_work(node, args.queue, args.timeout) else 1


async def _settle_work(node: AsyncNode, queue: str, timeout: float) -> bool:
    """Stay up while workers consume what we handed them: a worker that stops (e.g. `pull
    --count`) gives back what it did not take, and only a pusher still up can pass it on.
    False (a timeout, said on stderr) when some were still not consumed at the end: being
    best effort, they are lost when this pusher exits."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    left = 0
    while loop.time() < deadline:
        left = sum(q.in_flight + q.backlog for q in node.figures().queues if q.queue == queue)
        if not left:
            return True
        await asyncio.sleep(0.02)  # a progress check, bounded by the timeout
    print(f"zeromesh push: {left} message(s) not consumed within {timeout:g} s "
          "(best effort: they are lost when this pusher exits)", file=sys.stderr)
    # Said: the work queue's own warning as the node closes would say it again.
    logging.getLogger("mesh.workqueue").setLevel(logging.ERROR)
    return False


async def pull(args: argparse.Namespace) -> int:
    async with _node(args) as node:
        work = await node.pull(args.queue, prefetch=args.prefetch)

        def show(msg: Message) -> str:
            return json.dumps(_named_dict(msg, "queue")) if args.json else msg.text

        code = await _print_messages(work, show, args.count, args.timeout)
        await work.aclose()  # what we did not print goes back to the pushers
    return code


def _named_dict(msg: Message, key: str) -> dict[str, object]:
    """`msg` as JSON, its topic under `key` (``queue``, ``service``)."""
    out = msg.to_dict()
    out[key] = out.pop("topic")
    return out


# -- services ---------------------------------------------------------------------


async def serve(args: argparse.Namespace) -> int:
    handler = _echo if args.echo else _exec_handler(args.exec, args.exec_timeout)
    stop = asyncio.Event()
    with stop_on_signals(stop):
        async with _node(args) as node:
            service = await node.serve(args.service, handler, concurrency=args.concurrency)
            ep = node.endpoints
            out(f"ready service={args.service} name={node.name} id={node.id} mesh={node.mesh} "
                 f"ctl={','.join(ep['ctl'])} rtr={','.join(ep['rtr'])}")
            await stop.wait()
            await service.aclose()
    out(f"stopped handled={service.handled} failed={service.failed}")
    return 0


def _echo(msg: Message) -> bytes:
    return msg.data


def _exec_handler(command: str, timeout: float) -> Callable[[Message], Coroutine[Any, Any, bytes]]:
    """Run `command` per request (split like a shell, no shell): body on stdin, reply = stdout."""
    try:
        argv = shlex.split(command)
    except ValueError as exc:
        raise ConfigError("--exec", f"{exc} in {quoted(command)}") from None
    if not argv:
        raise ConfigError("--exec", "empty command")
    if shutil.which(argv[0]) is None:
        raise ConfigError("--exec", f"command not found: {argv[0]}")

    async def run(msg: Message) -> bytes:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
        try:
            async with asyncio.timeout(timeout):
                out, err = await _communicate(proc, msg.data)
        except TimeoutError as exc:
            await _reap(proc)
            raise RuntimeError(f"{argv[0]} timed out after {timeout:g} s") from exc
        except BaseException:  # cancelled: the child must not outlive the request
            await _reap(proc)
            raise
        if proc.returncode != 0:
            reason = err.decode("utf-8", "replace").strip()
            raise RuntimeError(reason or f"{argv[0]} exited with status {proc.returncode}")
        return out

    return run


async def _communicate(proc: asyncio.subprocess.Process, data: bytes) -> tuple[bytes, bytes]:
    """`proc.communicate(data)`, except that a command which exits without reading all of
    `data` is not an error: under uvloop, writing to its closed pipe raises a RuntimeError
    that asyncio's own feeder lets through, so the reply would depend on a race."""
    assert proc.stdin is not None  # (all three are pipes: see the caller)
    assert proc.stdout is not None
    assert proc.stderr is not None

    async def feed(stdin: asyncio.StreamWriter) -> None:
        # BrokenPipe/ConnectionReset: asyncio's loop; RuntimeError: uvloop's closed handle
        with contextlib.suppress(BrokenPipeError, ConnectionResetError, RuntimeError):
            if data:
                stdin.write(data)
                await stdin.drain()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError, RuntimeError):
            stdin.close()

    _, out, err, _ = await asyncio.gather(feed(proc.stdin), proc.stdout.read(),
                                          proc.stderr.read(), proc.wait())
    return out, err


async def _reap(proc: asyncio.subprocess.Process) -> None:
    """Kill `proc` and wait for it (a timed-out or cancelled request leaves no child)."""
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
    await proc.wait()


async def req(args: argparse.Namespace) -> int:
    headers = _headers(args.header)
    if args.all and args.retries is not None:
        raise ConfigError("--retries", "makes no sense with --all (every server is asked once)")
    async with _node(args) as node:
        node.check_service(args.service)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + args.timeout
        try:  # the contract: --timeout covers finding a server too
            await node.wait_for_service(args.service, timeout=args.timeout)
        except RequestTimeout:
            if args.all:
                print(f"zeromesh req: no server of {quoted(args.service)}", file=sys.stderr)
                return 1
            raise NoRespondersError(args.service) from None
        if args.all:
            return await _req_all(node, args, headers, deadline)
        try:
            reply = await node.request(args.service, args.data, headers=headers,
                                       timeout=max(deadline - loop.time(), 0.001),
                                       retries=2 if args.retries is None else args.retries)
        except RequestTimeout as exc:  # report the user's --timeout, not what was left of it
            raise RequestTimeout(f"request to {quoted(args.service)}", args.timeout) from exc
    if args.json:
        out(json.dumps(_named_dict(reply, "service")))
        return 0
    stdout = sys.stdout.buffer
    stdout.write(reply.data if reply.data.endswith(b"\n") else reply.data + b"\n")
    stdout.flush()
    return 0


async def _req_all(node: AsyncNode, args: argparse.Namespace, headers: dict[str, str] | None,
                   deadline: float) -> int:
    """`req --all`: let discovery find the other servers, then print each reply as it comes;
    0 if at least one server answered without an error."""
    loop = asyncio.get_running_loop()
    known = 1
    while True:  # until no new server turned up for a discovery window (or time is up)
        window = min(_DISCOVERY_WINDOW, deadline - loop.time())
        if window <= 0:
            break
        try:
            await node.wait_for_service(args.service, known + 1, timeout=window)
        except RequestTimeout:
            break
        known += 1
    ok = answered = 0
    async with node.request_all_stream(args.service, args.data, headers=headers,
                                       timeout=max(deadline - loop.time(), 0.001)) as replies:
        async for reply in replies:
            answered += 1
            ok += reply.error is None
            if args.json:
                out(json.dumps(_named_dict(reply, "service")))
            elif reply.error is not None:
                out(f"{reply.source} error: {reply.error}")
            else:
                out(f"{reply.source} {reply.text.rstrip()}")
    if answered and not ok:
        print(f"zeromesh req: {'the server' if answered == 1 else f'all {answered} servers'} "
              f"of {quoted(args.service)} answered with an error", file=sys.stderr)
    elif not ok:
        print(f"zeromesh req: no reply from a server of {quoted(args.service)} within "
              f"{args.timeout:g} s", file=sys.stderr)
    return 0 if ok else 1




HANDLERS: Final[dict[str, Callable[[argparse.Namespace], Coroutine[Any, Any, int]]]] = {
    "peers": peers,
    "pub": pub,
    "sub": sub,
    "last": last,
    "serve": serve,
    "req": req,
    "push": push,
    "pull": pull,
}
