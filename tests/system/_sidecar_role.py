"""Processes of the sidecar LAN tests (tests/system/test_sidecar_lan.py), run inside a host
namespace; each prints JSON lines on stdout, flushed at once.

python -m tests.system._sidecar_role app NAME IP PORT [--slow]  # an HTTP app behind an agent
python -m tests.system._sidecar_role stream MESH IP          # library requests of ``upper``
python -m tests.system._sidecar_role gather MESH IP           # library request_all of ``who``
python -m tests.system._sidecar_role typed-pub MESH IP        # blocking API, Structs out
python -m tests.system._sidecar_role typed-sub MESH IP async|sync

The app is what a service in any language would be: a plain HTTP server, bound to
its host's LAN address, that its agent POSTs each request of a ``[[service]]`` to.
It answers ``/upper`` with the body upper-cased (after `WORK` s of "work", so
requests are in flight at it when it is SIGKILLed) and ``/who`` with its name;
``--slow`` makes ``/who`` never answer. It prints a line when a request arrives
(``got``, with the headers the agent passed on) and when it is about to answer one
(``answered``): a request it got and never answered was in flight when it died.

The library processes stay in the mesh until stdin ends (nothing they sent races
their goodbye) and exit 0.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final

import msgspec
from aiohttp import web

from mesh import AsyncNode, MeshError, Message, Node

WAIT: Final[float] = 30.0
"""Seconds a library process waits for peers, servers or subscribers."""
WORK: Final[float] = 0.1
"""Seconds the app takes over each ``/upper`` request."""
IN_FLIGHT: Final[int] = 4
"""Requests the stream keeps outstanding at once."""
TRACEPARENT: Final[str] = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
"""What requesters send; the app's own span id comes back in `APP_TRACEPARENT`."""
APP_TRACEPARENT: Final[str] = "00-4bf92f3577b34da6a3ce929d0e0e4736-b7ad6b7169203331-01"
READINGS: Final[int] = 3
"""Readings the typed publisher sends after its one message that is not a Reading."""


class Reading(msgspec.Struct):
    """The typed payload: what a sensor on one host tells the others."""

    sensor: str
    celsius: float


def out(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


async def _stdin_closed() -> None:
    await asyncio.to_thread(sys.stdin.read)


# -- the HTTP app ----------------------------------------------------------------------


async def app(name: str, ip: str, port: int, slow: bool) -> None:
    """Serves on ``ip:port`` until killed; prints ``listening`` once bound."""
    never = asyncio.Event()

    async def upper(request: web.Request) -> web.Response:
        body = await request.read()
        out(event="got", path="upper", body=body.decode(), headers=dict(request.headers))
        await asyncio.sleep(WORK)  # the app's work: keeps requests in flight here
        out(event="answered", body=body.decode())
        return web.Response(body=body.upper(), content_type="text/plain", headers={
            "X-Served-By": name, "traceparent": APP_TRACEPARENT,
            "X-Zeromesh-Header-Warehouse": "north"})  # a reply header named "warehouse"

    async def who(request: web.Request) -> web.Response:
        out(event="got", path="who", body=(await request.read()).decode(), headers={})
        if slow:
            await never.wait()  # never set: this app is slower than any gathering
        return web.Response(text=name, headers={"X-Served-By": name})

    web_app = web.Application()
    web_app.router.add_post("/upper", upper)
    web_app.router.add_post("/who", who)
    runner = web.AppRunner(web_app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, ip, port).start()
    out(event="listening", url=f"http://{ip}:{port}")
    try:
        await never.wait()  # until SIGKILL (or the LAN's teardown)
    finally:
        await runner.cleanup()


# -- library requesters ---------------------------------------------------------------


def _reply(reply: Message, **extra: Any) -> dict[str, Any]:
    return {"data": reply.text, "source": reply.source, "headers": dict(reply.headers or {}),
            **extra}


async def stream(node: AsyncNode) -> None:
    """Waits for two servers of ``upper``, makes one request with headers, then streams
    requests (`IN_FLIGHT` at a time, each with the default retries) until stdin ends."""
    await node.wait_for_service("upper", 2, timeout=WAIT)
    first = await node.request("upper", "lib", headers={"tenant": "t2",
                                                        "traceparent": TRACEPARENT})
    out(event="first", **_reply(first))
    numbers = itertools.count()

    async def requester() -> None:
        while True:
            n = next(numbers)
            try:
                reply = await node.request("upper", f"s{n}", timeout=5)
            except MeshError as exc:  # a request that failed for good: the test sees it
                out(event="error", n=n, error=str(exc))
                continue
            served_by = (reply.headers or {}).get("x-served-by")
            out(event="reply", n=n, data=reply.text, served_by=served_by)

    async with asyncio.TaskGroup() as tasks:
        running = [tasks.create_task(requester()) for _ in range(IN_FLIGHT)]
        await _stdin_closed()
        for task in running:
            task.cancel()
    out(event="end", sent=next(numbers))


async def gather(node: AsyncNode) -> None:
    """Waits for three servers of ``who``; gathers with a short timeout, then with
    ``max_replies=1`` and a long one; prints each gathering and how long it took."""
    await node.wait_for_service("who", 3, timeout=WAIT)
    for timeout, max_replies in ((1.5, None), (20.0, 1)):
        started = time.monotonic()
        replies = await node.request_all("who", "?", timeout=timeout, max_replies=max_replies)
        out(event="gathered", timeout=timeout, max_replies=max_replies,
            took=time.monotonic() - started,
            replies=[_reply(r, error=r.error) for r in replies])
    await _stdin_closed()


# -- typed payloads ---------------------------------------------------------------------


def typed_pub(mesh: str, ip: str) -> None:
    """The blocking API: once two subscribers are there, a dict that is no Reading, then
    `READINGS` Readings."""
    with Node(name="pub", mesh=mesh, interfaces=[ip]) as node:
        node.wait_for_subscribers("sensors.h1", 2, timeout=WAIT)
        node.publish("sensors.h1", {"sensor": "h1", "celsius": "warm"})
        for i in range(READINGS):
            node.publish("sensors.h1", Reading("h1", 20.0 + i))
        out(event="published", count=READINGS + 1)
        sys.stdin.read()


def _typed(msg: Message[Reading]) -> dict[str, Any]:
    value = msg.value
    return {"type": type(value).__name__, "sensor": value.sensor, "celsius": value.celsius,
            "content_type": (msg.headers or {}).get("content-type"), "source": msg.source}


async def typed_sub_async(node: AsyncNode) -> None:
    sub = await node.subscribe("sensors.>", type=Reading)
    out(event="subscribed")
    for _ in range(READINGS):
        out(event="value", **_typed(await sub.next(timeout=WAIT)))
    out(event="end", decode_errors=sub.decode_errors)
    await _stdin_closed()


def typed_sub_sync(mesh: str, ip: str) -> None:
    with Node(name="sync-sub", mesh=mesh, interfaces=[ip]) as node:
        sub = node.subscribe("sensors.>", type=Reading)
        out(event="subscribed")
        for _ in range(READINGS):
            out(event="value", **_typed(sub.next(timeout=WAIT)))
        out(event="end", decode_errors=sub.decode_errors)
        sys.stdin.read()


async def _with_node(mesh: str, ip: str, name: str,
                     role: Callable[[AsyncNode], Awaitable[None]]) -> None:
    async with AsyncNode(name=name, mesh=mesh, interfaces=[ip]) as node:
        await role(node)


def main(argv: list[str]) -> None:
    role = argv[0]
    if role == "app":
        asyncio.run(app(argv[1], argv[2], int(argv[3]), slow="--slow" in argv[4:]))
        return
    mesh, ip = argv[1], argv[2]
    if role == "typed-pub":
        typed_pub(mesh, ip)
    elif role == "typed-sub" and argv[3] == "sync":
        typed_sub_sync(mesh, ip)
    else:
        run = {"stream": stream, "gather": gather, "typed-sub": typed_sub_async}[role]
        asyncio.run(_with_node(mesh, ip, role, run))


if __name__ == "__main__":
    main(sys.argv[1:])
