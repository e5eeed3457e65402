"""``[[service]]``: an app behind an agent serves a mesh service over HTTP. Real agent
processes, real HTTP apps (aiohttp on the test's loop), the CLI and the library as
requesters."""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDictProxy
from prometheus_client.parser import text_string_to_metric_families

from mesh._agent._config import AgentConfig
from tests.helpers import CountsInFlight, aeventually

from ._agent import AgentProc, start_agent, wait_status
from ._proc import Cli, child_env
from .conftest import FAST_ENV, MakeNode

pytestmark = pytest.mark.timeout(60)

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
APP_TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-b7ad6b7169203331-01"


@dataclass
class App(CountsInFlight):
    """An app serving ``upper``: answers the body upper-cased, with headers; ``fail`` gets a
    500, ``slow`` never answers in time; `hold` (when set) keeps each request waiting."""

    name: str
    url: str = ""
    runner: web.AppRunner | None = None
    seen: list[CIMultiDictProxy[str]] = field(default_factory=list)
    never: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, request: web.Request) -> web.Response:
        self.seen.append(request.headers)
        async with self.serving():
            body = await request.read()
            if body == b"fail":
                return web.Response(status=500, text="boom")
            if body == b"slow":
                await self.never.wait()
            return web.Response(body=body.upper(), content_type="text/plain", headers={
                "X-Served-By": self.name, "traceparent": APP_TRACEPARENT,
                "X-Zeromesh-Header-Warehouse": "north"})

    async def start(self) -> None:
        web_app = web.Application()
        web_app.router.add_post("/upper", self.handle)
        self.runner = web.AppRunner(web_app, access_log=None, shutdown_timeout=0.5)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0).start()
        host, port = self.runner.addresses[0][:2]
        self.url = f"http://{host}:{port}/upper"

    async def stop(self) -> None:
        self.never.set()
        if self.hold is not None:
            self.hold.set()
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None


@pytest.fixture
async def apps() -> AsyncIterator[Callable[[str], App]]:
    made: list[App] = []

    def make(name: str) -> App:
        app = App(name)
        made.append(app)
        return app

    try:
        yield make
    finally:
        for app in made:
            await app.stop()


async def _app(apps: Callable[[str], App], name: str) -> App:
    app = apps(name)
    await app.start()
    return app


def service_config(url: str, name: str = "upper", **extra: object) -> str:
    lines = [f'[[service]]\nname = "{name}"\nurl = "{url}"']
    lines += [f"{key} = {value}" for key, value in extra.items()]
    return "\n".join(lines) + "\n"


def _serving(procs: list[Cli], mesh: str, tmp: Path, name: str, config: str) -> AgentProc:
    return start_agent(procs, mesh=mesh, name=name, tmp=tmp, config=config)


async def _finish(procs: list[Cli], mesh: str, *args: str) -> tuple[int, list[str], str]:
    """Run ``zeromesh ARGS`` to its end (waited for in a thread: the apps run on this loop)."""
    cli = Cli(list(args), mesh=mesh, env=FAST_ENV)
    procs.append(cli)
    code = await asyncio.to_thread(cli.wait, 30)
    return code, await asyncio.to_thread(cli.all_lines), await asyncio.to_thread(cli.stderr)


async def test_app_answers_http_cli_and_library_requesters_with_its_headers(
        procs: list[Cli], mesh_name: str, tmp_path: Path, make_node: MakeNode,
        apps: Callable[[str], App]) -> None:
    app = await _app(apps, "app1")
    _serving(procs, mesh_name, tmp_path, "side", service_config(app.url))
    asker = start_agent(procs, mesh=mesh_name, name="asker")
    async with aiohttp.ClientSession() as http:
        response = await wait_status(http, "POST", f"{asker.url}/v1/request/upper", 200,
                                     data=b"hi", headers={"traceparent": TRACEPARENT,
                                                          "X-Tenant": "t1"})
    assert await response.read() == b"HI"
    assert response.headers["X-Served-By"] == "app1"
    assert response.headers["traceparent"] == APP_TRACEPARENT
    assert response.headers["Content-Type"].startswith("text/plain")
    assert response.headers["X-Zeromesh-Header-Warehouse"] == "north"
    assert response.headers["X-Zeromesh-Source"] == "side"
    got = app.seen[-1]
    assert got["traceparent"] == TRACEPARENT  # untouched
    assert got["X-Tenant"] == "t1"
    assert (got["X-Zeromesh-Service"], got["X-Zeromesh-Source"]) == ("upper", "asker")
    assert got["X-Zeromesh-Id"]

    code, lines, err = await _finish(procs, mesh_name, "req", "upper", "hi")
    assert (code, lines) == (0, ["HI"]), err

    client = await make_node("lib")
    await client.wait_for_service("upper", timeout=10)
    reply = await client.request("upper", b"lib", headers={"tenant": "t2"})
    assert reply.data == b"LIB"
    assert reply.headers is not None
    assert (reply.headers["x-served-by"], reply.headers["warehouse"]) == ("app1", "north")
    assert app.seen[-1]["X-Zeromesh-Header-Tenant"] == "t2"


async def test_two_apps_share_the_load_and_a_stopped_app_fails_over(
        procs: list[Cli], mesh_name: str, tmp_path: Path, make_node: MakeNode,
        apps: Callable[[str], App]) -> None:
    one, two = await _app(apps, "one"), await _app(apps, "two")
    _serving(procs, mesh_name, tmp_path, "side1", service_config(one.url))
    _serving(procs, mesh_name, tmp_path, "side2", service_config(two.url))
    client = await make_node("lib")
    await client.wait_for_service("upper", 2, timeout=10)
    replies = await asyncio.gather(*(client.request("upper", f"m{i}") for i in range(20)))
    assert sorted(r.data for r in replies) == sorted(f"M{i}".encode() for i in range(20))
    assert one.seen, len(two.seen)
    assert two.seen, len(one.seen)

    async def stream(count: int) -> list[bytes]:
        return [(await client.request("upper", f"s{i}", timeout=5)).data
                for i in range(count)]

    streaming = asyncio.create_task(stream(40))
    await one.wait_until(lambda: len(one.seen) >= 15)  # mid-stream
    await one.stop()
    assert await streaming == [f"S{i}".encode() for i in range(40)]
    before = len(two.seen)
    assert [(await client.request("upper", "after")).data for _ in range(5)] == [b"AFTER"] * 5
    assert len(two.seen) == before + 5


async def test_app_errors_timeouts_and_downtime_answer_at_once(
        procs: list[Cli], mesh_name: str, tmp_path: Path, apps: Callable[[str], App]) -> None:
    """A non-2xx: 502 with the app's status and body; slower than `timeout`: an error,
    not a hang; an app that is not there: 503 quickly (its agent declines)."""
    app = await _app(apps, "app1")
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        closed = sock.getsockname()[1]
    config = (service_config(app.url, timeout=0.5) +
              service_config(f"http://127.0.0.1:{closed}/x", name="down"))
    side = _serving(procs, mesh_name, tmp_path, "side", config)
    asker = start_agent(procs, mesh=mesh_name, name="asker")
    loop = asyncio.get_running_loop()
    async with aiohttp.ClientSession() as http:
        await wait_status(http, "POST", f"{asker.url}/v1/request/upper", 200, data=b"x")
        async with http.post(f"{asker.url}/v1/request/upper", data=b"fail") as r:
            assert r.status == 502
            body = await r.json()
        assert (body["status"], body["body"], body["service"]) == (500, "boom", "upper")
        assert "500" in body["error"]
        started = loop.time()
        async with http.post(f"{asker.url}/v1/request/upper?timeout=8", data=b"slow") as r:
            assert r.status == 502
            assert "did not answer within 0.5 s" in (await r.json())["error"]
        assert loop.time() - started < 4
        started = loop.time()
        async with http.post(f"{asker.url}/v1/request/down?timeout=8", data=b"x") as r:
            assert r.status == 503, await r.text()
        assert loop.time() - started < 4
        async with http.get(f"{side.url}/metrics") as r:
            families = {f.name: f for f in text_string_to_metric_families(await r.text())}
    outcomes = {(s.labels["service"], s.labels["outcome"]): s.value
                for s in families["zeromesh_service_app_requests"].samples
                if s.name.endswith("_total")}
    assert outcomes[("upper", "status")] == 1
    assert outcomes[("upper", "timeout")] == 1
    assert outcomes[("down", "unreachable")] >= 1


async def test_concurrency_bounds_the_requests_in_flight_at_the_app(
        procs: list[Cli], mesh_name: str, tmp_path: Path, make_node: MakeNode,
        apps: Callable[[str], App]) -> None:
    app = await _app(apps, "app1")
    side = _serving(procs, mesh_name, tmp_path, "side", service_config(app.url, concurrency=2))
    client = await make_node("lib")
    await client.wait_for_service("upper", timeout=10)
    app.hold = asyncio.Event()
    asked = [asyncio.create_task(client.request("upper", f"c{i}", timeout=20, retries=0))
             for i in range(8)]
    await app.wait_until(lambda: app.in_flight == 2)

    async def all_arrived() -> bool:
        async with aiohttp.ClientSession() as http, http.get(f"{side.url}/metrics") as r:
            text = await r.text()
        return 'zeromesh_service_requests_received_total{service="upper"} 8.0' in text

    await aeventually(all_arrived, timeout=10, interval=0.05)  # the rest wait in the backlog
    assert (app.in_flight, app.most_in_flight) == (2, 2)
    app.hold.set()
    assert sorted(r.data for r in await asyncio.gather(*asked)) == sorted(
        f"C{i}".encode() for i in range(8))
    assert app.most_in_flight == 2


async def test_sighup_adds_changes_and_removes_a_service(
        procs: list[Cli], mesh_name: str, tmp_path: Path, apps: Callable[[str], App]) -> None:
    one, two = await _app(apps, "one"), await _app(apps, "two")
    side = _serving(procs, mesh_name, tmp_path, "side", 'name = "side"\n')
    asker = start_agent(procs, mesh=mesh_name, name="asker")
    path = tmp_path / "side.toml"
    url = f"{asker.url}/v1/request/upper?timeout=2"
    async with aiohttp.ClientSession() as http:
        for config, served_by in ((service_config(one.url), "one"),
                                  (service_config(two.url, timeout=3), "two")):
            path.write_text(config)
            side.cli.proc.send_signal(signal.SIGHUP)
            assert side.cli.line("reloaded", timeout=15) == "reloaded"
            response = await wait_status(http, "POST", url, 200, data=b"x")
            assert response.headers["X-Served-By"] == served_by
        path.write_text(service_config("ftp://127.0.0.1/x"))  # bad: the running config stays
        side.cli.proc.send_signal(signal.SIGHUP)
        assert "service[0].url" in await _logged(side, "config not reloaded")
        response = await wait_status(http, "POST", url, 200, data=b"x")
        assert response.headers["X-Served-By"] == "two"
        path.write_text('name = "side"\n')
        side.cli.proc.send_signal(signal.SIGHUP)
        assert side.cli.line("reloaded", timeout=15) == "reloaded"
        await wait_status(http, "POST", url, 503, data=b"x")



async def test_a_sighup_while_the_agent_stops_does_not_kill_it(
        procs: list[Cli], mesh_name: str, tmp_path: Path, apps: Callable[[str], App]) -> None:
    """SIGHUP (logrotate, a config tool) while the agent is stopping: its handler was gone, so
    the default action killed it mid-stop (exit -1, the request in flight lost, its peers
    told nothing); now it is ignored and the agent stops as it should."""
    app = await _app(apps, "one")
    side = _serving(procs, mesh_name, tmp_path, "side", service_config(app.url))
    url = f"{side.url}/v1/request/upper?"
    async with aiohttp.ClientSession() as http:
        await wait_status(http, "POST", url, 200, data=b"warm")
        app.hold = asyncio.Event()
        held = asyncio.create_task(http.post(url, data=b"held"))
        await app.wait_until(lambda: app.in_flight == 1)
        side.cli.term()  # it stops serving at once, then waits for the held request
        # (held too while it still serves: 504 then; 503 once it stopped serving)
        await wait_status(http, "POST", f"{url}timeout=0.1", 503, data=b"x")
        side.cli.proc.send_signal(signal.SIGHUP)  # (the default action kills at once)
        app.hold.set()
        response = await held
        assert (response.status, await response.read()) == (200, b"HELD")
    assert await asyncio.to_thread(side.cli.wait) == 0
    assert side.cli.line("stopped") == "stopped"


async def _logged(agent: AgentProc, text: str) -> str:
    """The agent's first stderr line containing `text` (waited for in a thread, bounded)."""
    return await asyncio.to_thread(agent.cli.log.wait_for, text, 15)


@pytest.mark.parametrize(("config", "reason"), [
    ('[[service]]\nname = "a"\nurl = "ftp://127.0.0.1/x"\n',
     "service[0].url: 'ftp://127.0.0.1/x' is not an http(s) URL"),
    ('[[service]]\nname = "a"\nurl = "http://127.0.0.1:1/x"\n'
     '[[service]]\nname = "a"\nurl = "http://127.0.0.1:2/x"\n',
     "service[1].name: service 'a' is configured twice"),
])
def test_bad_service_config_exits_2_with_one_line(tmp_path: Path, config: str,
                                                  reason: str) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(config)
    done = subprocess.run([sys.executable, "-m", "mesh", "agent", "--config", str(path)],
                          env=child_env("cfg"), text=True, capture_output=True, timeout=20,
                          check=False)
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert reason in done.stderr, done.stderr


def _serving_s(mesh_name: str, server: asyncio.Server) -> AgentConfig:
    """An in-process agent's config: service ``s`` is the app `server` listens for."""
    from mesh._agent import load
    from mesh._agent._config import ServiceApp

    from .conftest import FAST

    port = server.sockets[0].getsockname()[1]
    config = load(None, env={}, flags={"name": "agent", "mesh": mesh_name, "mdns": False,
                                        "interfaces": ["127.0.0.1"], "http": "127.0.0.1:0",
                                        **FAST})
    config.services = [ServiceApp(name="s", url=f"http://127.0.0.1:{port}/x")]
    return config


async def test_an_apps_error_answer_is_logged_in_one_line(
        mesh_name: str, caplog: pytest.LogCaptureFixture) -> None:
    """An app's first non-2xx answer (or timeout) is logged as the app's failure, not with a
    traceback of the agent's own code ("raise AppError(...)"), which told nothing more."""
    import logging

    from mesh._agent import Agent
    from mesh.errors import RemoteError

    async def app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 500 Err\r\nContent-Length: 4\r\nConnection: close\r\n\r\nboom")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(app, "127.0.0.1", 0)
    config = _serving_s(mesh_name, server)
    try:
        with caplog.at_level(logging.WARNING):
            async with Agent(config) as agent:
                with pytest.raises(RemoteError, match="app answered 500: boom"):
                    await agent.node.request("s", b"x", timeout=5, retries=0)
    finally:
        server.close()
    assert "Traceback" not in caplog.text, caplog.text


async def test_reply_headers_are_utf8_and_one_that_is_not_fails_the_reply(
        mesh_name: str) -> None:
    """An app's reply header is read as UTF-8 (``café`` came as ``cafÃ©``: read as latin-1);
    one whose bytes are not UTF-8 fails the request, naming the header (it used to pass as
    latin-1 text, which the app never meant)."""
    from mesh._agent import Agent
    from mesh.errors import RemoteError

    async def app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await reader.readuntil(b"\r\n\r\n")
        await reader.readexactly(2)
        latin = b"X-Latin: caf\xe9\r\n" if b"x-zeromesh-header-bad" in request else b""
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Utf8: caf\xc3\xa9\r\n"
                     + latin + b"Connection: close\r\n\r\nok")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(app, "127.0.0.1", 0)
    config = _serving_s(mesh_name, server)
    try:
        async with Agent(config) as agent:
            reply = await agent.node.request("s", b"ok", timeout=5, retries=0)
            assert reply.headers == {"x-utf8": "café"}
            with pytest.raises(RemoteError, match="header X-Latin is not UTF-8 text"):
                await agent.node.request("s", b"ok", timeout=5, retries=0,
                                         headers={"bad": "1"})
    finally:
        server.close()


async def test_a_reload_that_changes_concurrency_keeps_serving(
        mesh_name: str, apps: Callable[[str], App]) -> None:
    """A new `concurrency` takes effect in place: with a request in flight, the service was
    unserved until it ended (up to 2 s) and every request meanwhile got "no responders"."""
    import msgspec

    from mesh._agent import Agent, load
    from mesh._agent._config import ServiceApp

    from .conftest import FAST

    app = await _app(apps, "one")
    config = load(None, env={}, flags={"name": "agent", "mesh": mesh_name, "mdns": False,
                                        "interfaces": ["127.0.0.1"], "http": "127.0.0.1:0",
                                        **FAST})
    config.services = [ServiceApp(name="upper", url=app.url, concurrency=1)]
    async with Agent(config) as agent:
        node = agent.node
        slow = asyncio.create_task(node.request("upper", b"slow", timeout=10, retries=0))
        await app.wait_until(lambda: app.in_flight == 1)
        wider = msgspec.structs.replace(config, services=[
            ServiceApp(name="upper", url=app.url, concurrency=2)])
        async with asyncio.timeout(1):
            await agent.reload(wider)
        reply = await node.request("upper", b"x", timeout=1, retries=0)
        assert (reply.data, app.in_flight) == (b"X", 1)  # beside the slow one: 2 at once
        app.never.set()
        assert (await slow).data == b"SLOW"
