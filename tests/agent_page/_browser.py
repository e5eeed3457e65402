"""A headless Chromium driven over the DevTools protocol, for the mesh page's tests.

No selenium or playwright: Debian's ``chromium`` is started with
``--remote-debugging-port=0``; the port it chose is read from
``<user-data-dir>/DevToolsActivePort``, and a tiny client speaks the protocol
over aiohttp's websocket client (`Devtools`). It navigates, evaluates
JavaScript, clicks at an element's centre with real mouse events, takes
screenshots, and collects every console error, uncaught exception and
error log entry of the page.

`Browser` is the synchronous face the tests use. Its client runs an event
loop in a thread of its own; for a browser on a namespace host, that thread
first enters the host's network namespace (``setns``), so the loopback the
DevTools port listens on, and the agent's address, are the host's. Aiohttp
servers a test starts on that loop (`Browser.serve`) live on that host too:
a webhook app beside the agent.

Chromium is started headless and kept to the addresses it is given: the
flags below turn off every background connection (updates, sync, metrics,
component downloads, QUIC), and a namespace host has no route off its LAN.
A missing ``chromium`` skips the test, or fails it when
``ZEROMESH_REQUIRE_BROWSER=1`` (CI).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ctypes
import itertools
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TypeVar

import aiohttp
import pytest
from aiohttp import web

from tests import netns

REQUIRE_BROWSER_ENV: Final[str] = "ZEROMESH_REQUIRE_BROWSER"
"""Set to ``1`` (CI): a missing chromium fails the browser tests instead of skipping them."""
CHROMIUM_NAMES: Final = ("chromium", "chromium-browser")
FLAGS: Final = (
    "--no-sandbox", "--headless", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-default-apps", "--metrics-recording-only", "--no-default-browser-check",
    "--disable-extensions", "--disable-breakpad", "--disable-domain-reliability",
    "--no-pings", "--hide-scrollbars", "--mute-audio", "--remote-debugging-address=127.0.0.1",
)
LAPTOP: Final = (1366, 900)
PHONE: Final = (390, 844)
_START_TIMEOUT: Final[float] = 20.0
_CALL_TIMEOUT: Final[float] = 15.0
_CLONE_NEWNET: Final[int] = 0x40000000

T = TypeVar("T")


def require_chromium() -> str:
    """The chromium program's path; skips the test when missing (fails it under
    ``ZEROMESH_REQUIRE_BROWSER=1``)."""
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found is not None:
            return found
    reason = "chromium not installed (apt-get install chromium)"
    if os.environ.get(REQUIRE_BROWSER_ENV) == "1":
        pytest.fail(f"{reason}, and {REQUIRE_BROWSER_ENV}=1 requires it", pytrace=False)
    pytest.skip(reason)


@dataclass(frozen=True, slots=True)
class ConsoleError:
    kind: str
    """``console`` (console.error/assert), ``exception`` (uncaught) or ``log`` (an error
    the browser logged: a failed load, a CSP violation...)."""
    source: str
    """For ``log``: the entry's source (``network``, ``security``, ``javascript``...)."""
    text: str


class Devtools:
    """One page target's DevTools session over a websocket."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self._ws = ws
        self._ids = itertools.count(1)
        self._calls: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._waiters: dict[str, list[asyncio.Future[dict[str, Any]]]] = {}
        self.errors: list[ConsoleError] = []
        self._reader = asyncio.get_running_loop().create_task(self._read())

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        """Sends one command; its result (raises RuntimeError with the protocol's error)."""
        call_id = next(self._ids)
        done: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._calls[call_id] = done
        await self._ws.send_str(json.dumps({"id": call_id, "method": method, "params": params}))
        try:
            return await asyncio.wait_for(done, _CALL_TIMEOUT)
        finally:
            self._calls.pop(call_id, None)

    def expect(self, event: str) -> asyncio.Future[dict[str, Any]]:
        """A future for the next ``event``'s params (make it before the command causing it)."""
        waiter: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(event, []).append(waiter)
        return waiter

    async def _read(self) -> None:
        async for frame in self._ws:
            if frame.type != aiohttp.WSMsgType.TEXT:
                break
            message = json.loads(frame.data)
            if "id" in message:
                done = self._calls.get(message["id"])
                if done is not None and not done.done():
                    if "error" in message:
                        done.set_exception(RuntimeError(f"devtools: {message['error']}"))
                    else:
                        done.set_result(message.get("result", {}))
                continue
            self._event(message.get("method", ""), message.get("params", {}))
        for pending in self._calls.values():
            if not pending.done():
                pending.set_exception(ConnectionError("devtools connection closed"))

    def _event(self, method: str, params: dict[str, Any]) -> None:
        for waiter in self._waiters.pop(method, []):
            if not waiter.done():
                waiter.set_result(params)
        if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            text = " ".join(str(a.get("value", a.get("description", "")))
                            for a in params.get("args", []))
            self.errors.append(ConsoleError("console", "console-api", text))
        elif method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            text = details.get("exception", {}).get("description") or details.get("text", "")
            self.errors.append(ConsoleError("exception", "javascript", text))
        elif method == "Log.entryAdded":
            entry = params.get("entry", {})
            if entry.get("level") == "error":
                self.errors.append(ConsoleError(
                    "log", entry.get("source", ""), f"{entry.get('text', '')} {entry.get('url', '')}"))

    async def close(self) -> None:
        await self._ws.close()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader


def _enter_netns(name: str) -> None:
    """Moves the calling thread (only) into network namespace ``name``."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if libc.setns(fd, _CLONE_NEWNET) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"setns {name}: {os.strerror(errno)}")
    finally:
        os.close(fd)


class _LoopThread:
    """An event loop in a thread of its own, optionally inside a network namespace."""

    def __init__(self, namespace: str | None) -> None:
        self.loop = asyncio.new_event_loop()
        self._namespace = namespace
        self._started = threading.Event()
        self._failure: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="devtools-loop", daemon=True)
        self._thread.start()
        self._started.wait(10)
        failure = self._failed()
        if failure is not None:
            self._thread.join(5)
            self.loop.close()
            raise failure

    def _failed(self) -> BaseException | None:
        """What stopped the thread entering its namespace, if anything (set by the thread)."""
        return self._failure

    def _main(self) -> None:
        try:
            if self._namespace is not None:
                _enter_netns(self._namespace)
        except BaseException as exc:
            self._failure = exc
            self._started.set()
            return
        asyncio.set_event_loop(self.loop)
        self._started.set()
        self.loop.run_forever()

    def run(self, make: Callable[[], Coroutine[Any, Any, T]], timeout: float) -> T:
        """Runs ``make()`` on the loop and waits for its result (bounded)."""

        async def bounded() -> T:
            return await asyncio.wait_for(make(), timeout)

        return asyncio.run_coroutine_threadsafe(bounded(), self.loop).result(timeout + 5)

    def close(self) -> None:
        if not self._thread.is_alive():
            return
        with contextlib.suppress(Exception):
            self.run(self.loop.shutdown_default_executor, 10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


class Browser:
    """A headless chromium with one page, on this machine or on a namespace ``host``.

    Use as a context manager; ``errors`` holds the page's console errors so far.
    Screenshots go to ``shots`` (the test's tmp dir).
    """

    def __init__(self, shots: Path, host: netns.Host | None = None,
                 size: tuple[int, int] = LAPTOP) -> None:
        self.program = require_chromium()
        self.shots = shots
        self.host = host
        self.size = size
        self._profile = Path(tempfile.mkdtemp(prefix="zm-chromium-"))
        self._log = open(shots / "chromium.log", "w")  # noqa: SIM115  (closed in close())
        self._proc: subprocess.Popen[bytes] | None = None
        self._thread: _LoopThread | None = None
        self._session: aiohttp.ClientSession | None = None
        self._devtools: Devtools | None = None
        self._runners: list[web.AppRunner] = []

    def __enter__(self) -> Browser:
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- start and stop ----------------------------------------------------------------

    def _start(self) -> None:
        argv = [self.program, *FLAGS, f"--user-data-dir={self._profile}",
                "--remote-debugging-port=0", f"--window-size={self.size[0]},{self.size[1]}",
                "about:blank"]
        if self.host is not None:
            self._proc = self.host.popen(argv, env=dict(os.environ), stdin=subprocess.DEVNULL,
                                         stdout=self._log, stderr=self._log)
        else:
            self._proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self._log,
                                          stderr=self._log, start_new_session=True)
        port = self._devtools_port()
        self._thread = _LoopThread(self.host.netns if self.host is not None else None)
        self._devtools = self._thread.run(lambda: self._attach(port), _START_TIMEOUT)
        self.resize(*self.size)

    def _devtools_port(self) -> int:
        """The port chromium wrote to DevToolsActivePort (it writes it once listening)."""
        path = self._profile / "DevToolsActivePort"
        deadline = time.monotonic() + _START_TIMEOUT
        assert self._proc is not None
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise AssertionError(f"chromium exited with {self._proc.returncode}; "
                                     f"see {self.shots / 'chromium.log'}")
            with contextlib.suppress(FileNotFoundError, ValueError, IndexError):
                return int(path.read_text().splitlines()[0])
            time.sleep(0.05)
        raise AssertionError(f"chromium wrote no DevToolsActivePort within {_START_TIMEOUT} s")

    async def _attach(self, port: int) -> Devtools:
        self._session = aiohttp.ClientSession()
        base = f"http://127.0.0.1:{port}"
        async with self._session.get(f"{base}/json/list") as response:
            targets = await response.json()
        page = next(t for t in targets if t.get("type") == "page")
        ws = await self._session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0)
        tools = Devtools(ws)
        for domain in ("Page", "Runtime", "Log"):
            await tools.call(f"{domain}.enable")
        return tools

    def close(self) -> None:
        """Ends the DevTools session, then chromium (by its process group), then the
        servers started with `serve`, then the loop thread."""
        if self._thread is not None:
            with contextlib.suppress(Exception):
                self._thread.run(self._detach, 10)
        if self._proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._proc.pid, 9)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(10)
            self._proc = None
        if self._thread is not None:
            with contextlib.suppress(Exception):
                self._thread.run(self._stop_servers, 10)
            self._thread.close()
            self._thread = None
        self._log.close()
        shutil.rmtree(self._profile, ignore_errors=True)

    async def _detach(self) -> None:
        if self._devtools is not None:
            await self._devtools.close()
            self._devtools = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _stop_servers(self) -> None:
        for runner in self._runners:
            await runner.cleanup()
        self._runners = []

    # -- what the tests call -----------------------------------------------------------

    @property
    def tools(self) -> Devtools:
        assert self._devtools is not None, "browser not started"
        return self._devtools

    @property
    def errors(self) -> list[ConsoleError]:
        return list(self.tools.errors)

    def run(self, make: Callable[[], Coroutine[Any, Any, T]], timeout: float = 30.0) -> T:
        """Runs a coroutine on the browser's loop (in the host's namespace)."""
        assert self._thread is not None
        return self._thread.run(make, timeout)

    def resize(self, width: int, height: int) -> None:
        self.size = (width, height)
        self.run(lambda: self.tools.call(
            "Emulation.setDeviceMetricsOverride", width=width, height=height,
            deviceScaleFactor=1, mobile=width < 600))

    def navigate(self, url: str, timeout: float = 15.0) -> None:
        async def go() -> None:
            loaded = self.tools.expect("Page.loadEventFired")
            result = await self.tools.call("Page.navigate", url=url)
            if result.get("errorText"):
                raise AssertionError(f"navigate {url}: {result['errorText']}")
            await loaded

        self.run(go, timeout)

    def leave(self) -> None:
        """Navigates away (about:blank): the page's streams end before their agent does,
        which would otherwise log the cut stream as a console error."""
        self.navigate("about:blank")

    def evaluate(self, expression: str, timeout: float = 15.0) -> Any:
        """The JSON value of ``expression`` in the page (a promise is awaited)."""

        async def go() -> Any:
            result = await self.tools.call("Runtime.evaluate", expression=expression,
                                           returnByValue=True, awaitPromise=True)
            if "exceptionDetails" in result:
                raise AssertionError(f"{expression}: {result['exceptionDetails']}")
            return result["result"].get("value")

        return self.run(go, timeout)

    def wait_for(self, expression: str, timeout: float, what: str = "") -> Any:
        """The first truthy value of ``expression``, re-evaluated in the page every 50 ms
        until ``timeout`` s; on timeout a screenshot is written and the test fails."""
        script = (
            f"new Promise((done) => {{ const end = performance.now() + {timeout * 1000:.0f};"
            f" const tick = () => {{ let v; try {{ v = ({expression}); }} catch (e) {{ v = null; }}"
            " if (v) done(v instanceof Node ? true : v);"
            " else if (performance.now() > end) done(null);"
            " else setTimeout(tick, 50); }; tick(); })")
        value = self.evaluate(script, timeout + 10)
        if not value:
            shot = self.screenshot(f"timeout-{int(time.time() * 1000)}.png")
            raise AssertionError(f"{what or expression}: not within {timeout} s "
                                 f"(screenshot {shot}; console errors {self.errors})")
        return value

    def click(self, selector: str) -> None:
        """A real mouse click (press and release) at the centre of ``selector``'s element."""
        box = self.evaluate(
            f"(() => {{ const e = document.querySelector({json.dumps(selector)});"
            " if (!e) return null; e.scrollIntoView({block: 'center'});"
            " const r = e.getBoundingClientRect();"
            " return [r.x + r.width / 2, r.y + r.height / 2]; })()")
        assert box, f"nothing matches {selector!r}"

        async def go() -> None:
            for kind in ("mousePressed", "mouseReleased"):
                await self.tools.call("Input.dispatchMouseEvent", type=kind, x=box[0],
                                      y=box[1], button="left", clickCount=1)

        self.run(go)

    def screenshot(self, name: str, *, full_page: bool = False, to: Path | None = None) -> Path:
        """Writes a PNG of the page (``to``, else ``shots/name``); returns its path."""

        async def go() -> bytes:
            params: dict[str, Any] = {"format": "png"}
            if full_page:
                metrics = await self.tools.call("Page.getLayoutMetrics")
                size = metrics["cssContentSize"]
                params["clip"] = {"x": 0, "y": 0, "width": size["width"],
                                  "height": size["height"], "scale": 1}
                params["captureBeyondViewport"] = True
            shot = await self.tools.call("Page.captureScreenshot", **params)
            return base64.b64decode(shot["data"])

        path = to or self.shots / name
        path.write_bytes(self.run(go))
        return path

    def serve(self, handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
              host: str = "127.0.0.1") -> int:
        """Starts an HTTP server answering every POST with ``handler``, on the browser's
        host (its namespace), at ``host`` and a free port; returns the port."""
        app = web.Application()
        app.router.add_post("/{tail:.*}", handler)
        return self.serve_app(app, host)

    def serve_app(self, app: web.Application, host: str = "127.0.0.1") -> int:
        """Runs ``app`` on the browser's loop and host at ``host`` and a free port."""

        async def go() -> int:
            runner = web.AppRunner(app, access_log=None, handler_cancellation=True,
                                   shutdown_timeout=1.0)
            await runner.setup()
            site = web.TCPSite(runner, host, 0)
            await site.start()
            self._runners.append(runner)
            return int(runner.addresses[0][1])

        return self.run(go)

    def http(self, method: str, url: str, body: bytes = b"",
             timeout: float = 10.0) -> tuple[int, bytes]:
        """One HTTP request from the browser's host (status, body)."""

        async def go() -> tuple[int, bytes]:
            assert self._session is not None
            async with self._session.request(method, url, data=body) as response:
                return response.status, await response.read()

        return self.run(go, timeout)
