"""A webhook consumer: the agent POSTs each message to a small web app; 2xx is the ack.

The app (aiohttp, on 127.0.0.1, any free port) only has to answer HTTP: it
never speaks to the mesh itself. The example writes a TOML config for a
``zeromesh agent`` with one webhook (``orders.>`` to the app's URL,
concurrency 1, so the orders arrive in the order they were published),
starts the agent with it, and publishes three orders through the agent's
HTTP API (``POST /v1/publish/orders.created``).

The app answers its first POST with 503 on purpose: the agent retries that
order after a short backoff, and only then goes on to the next, so the app
still sees every order once as a success, in order. The example prints what
the app received (body, topic, message id, trace context) and the agent's
``zeromesh_webhook_deliveries`` counters, then stops the agent; it exits 1 if
any order is missing or out of order.

Run: ``python examples/webhook_consumer.py``
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
from aiohttp import web

LOOPBACK = "127.0.0.1"
ORDERS = ["order 1: tea", "order 2: coffee", "order 3: cake"]
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
DEADLINE = 20.0
"""Seconds for the whole example; every wait below is bounded by it."""


class ConsumerApp:
    """The app: refuses the first POST, records the others."""

    def __init__(self) -> None:
        self.posts = 0
        self.received: list[str] = []
        self.all_received = asyncio.Event()

    async def orders(self, request: web.Request) -> web.Response:
        body = (await request.read()).decode()
        self.posts += 1
        if self.posts == 1:
            print(f"app: 503 for {body!r} (refused on purpose)")
            return web.Response(status=503, text="not ready yet")
        h = request.headers
        print(f"app: got {body!r} topic={h.get('X-Zeromesh-Topic')} "
              f"id={h.get('X-Zeromesh-Id')} traceparent={h.get('traceparent')}")
        self.received.append(body)
        if len(self.received) >= len(ORDERS):
            self.all_received.set()
        return web.Response(status=204)


@contextlib.asynccontextmanager
async def serving(app: ConsumerApp) -> AsyncIterator[str]:
    """The app's URL while the block runs."""
    web_app = web.Application()
    web_app.router.add_post("/orders", app.orders)
    runner = web.AppRunner(web_app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, LOOPBACK, 0).start()
        host, port = runner.addresses[0][:2]
        yield f"http://{host}:{port}/orders"
    finally:
        await runner.cleanup()


def write_config(folder: Path, url: str) -> Path:
    """The agent's TOML config: loopback only, one webhook for the orders."""
    path = folder / "agent.toml"
    path.write_text(f"""\
mesh = "webhook-demo-{uuid.uuid4().hex[:8]}"
name = "orders-agent"
interfaces = ["{LOOPBACK}"]
mdns = false
http = "{LOOPBACK}:0"

[[webhooks]]
url = "{url}"
pattern = "orders.>"
concurrency = 1
attempts = 5
backoff = 0.2
timeout = 2.0
""", encoding="utf-8")
    return path


@contextlib.asynccontextmanager
async def agent(config: Path) -> AsyncIterator[str]:
    """A ``zeromesh agent`` with `config`; yields its HTTP API URL, stops it at the end."""
    env = {**os.environ, "ZEROMESH_INTERFACES": LOOPBACK}
    for var in ("ZEROMESH_HTTP", "ZEROMESH_PEERS", "ZEROMESH_MESH", "ZEROMESH_DATA_DIR"):
        env.pop(var, None)  # the config file is the whole story here
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mesh", "agent", "--config", str(config),
        stdout=asyncio.subprocess.PIPE, env=env)
    try:
        assert proc.stdout is not None
        while not (line := (await proc.stdout.readline()).decode()).startswith("ready "):
            if not line:
                raise RuntimeError(f"agent exited {await proc.wait()} before it was ready")
        fields = dict(f.split("=", 1) for f in line.split()[1:])
        yield fields["http"]
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                async with asyncio.timeout(5):
                    await proc.wait()
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def webhook_counters(session: aiohttp.ClientSession, api: str) -> list[str]:
    """The agent's ``zeromesh_webhook_deliveries`` samples from ``/metrics``."""
    async with session.get(f"{api}/metrics") as response:
        text = await response.text()
    return [line for line in text.splitlines()
            if line.startswith("zeromesh_webhook_deliveries_total")]


async def main() -> int:
    app = ConsumerApp()
    async with asyncio.timeout(DEADLINE), serving(app) as url:
        print(f"app listening on {url}")
        with tempfile.TemporaryDirectory(prefix="zeromesh-webhook-") as folder:
            config = write_config(Path(folder), url)
            async with agent(config) as api, aiohttp.ClientSession() as session:
                print(f"agent up: {api}, webhook orders.> -> {url}")
                for order in ORDERS:
                    async with session.post(
                            f"{api}/v1/publish/orders.created", data=order.encode(),
                            headers={"Content-Type": "text/plain",
                                     "traceparent": TRACEPARENT}) as response:
                        print(f"published {order!r}: {response.status}")
                        if response.status != 202:
                            return 1
                await app.all_received.wait()
                for line in await webhook_counters(session, api):
                    print(f"metrics: {line}")
    ok = app.received == ORDERS
    print(f"app received {len(app.received)} of {len(ORDERS)} orders in "
          f"{app.posts} POSTs, {'in order' if ok else 'NOT as published'}")
    return 0 if ok else 1


async def stoppable() -> int:
    """`main`, which SIGTERM cancels as Ctrl-C does: the agent and the temp dir go too."""
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    return await main()


if __name__ == "__main__":
    try:
        sys.exit(asyncio.run(stoppable()))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("webhook_consumer: stopped", file=sys.stderr)
        sys.exit(130)
