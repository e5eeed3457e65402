"""``[[service]]``: a mesh service answered by an app over HTTP.

Each request is POSTed to the app's URL (body as body, headers by the scheme of
`_headers.for_app`); a 2xx response is the reply, its headers travel back. The
node's serving machinery bounds the POSTs in flight (`concurrency`, the rest
wait in its backlog, beyond that the requester is told *busy*), so the app
sees at most that many at once.

Failures are answered at once, never left to the requester's timeout:

* the app answered non-2xx: an error reply (``RemoteError`` at the requester,
  502 at a requesting agent) with the status and the start of the body;
* the app took longer than `timeout`: an error reply;
* the app cannot be reached (refused, reset, gone mid-request): the request is
  declined, so the requester tries another server of the service (an app that
  died fails over like a node that died); with no other server, its retries
  end quickly in "no responders".
"""

from __future__ import annotations

import contextlib
import logging
import re
from typing import Final

import aiohttp

from .. import _trace
from .._message import Message, Reply
from .._node import AsyncNode
from .._services._server import Declined, Service
from ._config import ServiceApp
from ._headers import BadHeader, for_app, from_app
from ._metrics import AgentMetrics

_log = logging.getLogger("mesh.agent.service")
_MAX_ERROR_BODY: Final[int] = 1024
"""Characters of a non-2xx body kept in the error the requester sees."""
APP_STATUS: Final = re.compile(r"^app answered (\d{3}): (.*)\Z", re.DOTALL)
"""An error text made here for a non-2xx answer: a requesting agent reads the status and
the body back out of it (see `_http`)."""


class AppError(Exception):
    """The app answered, but not with a reply (the error text the requester gets)."""


class AppService:
    """One ``[[service]]``: serves its name on the node while it runs."""

    def __init__(self, node: AsyncNode, settings: ServiceApp,
                 session: aiohttp.ClientSession, metrics: AgentMetrics) -> None:
        self._node = node
        self._session = session
        self._metrics = metrics
        self._limit = node.config.max_message_size
        self.settings = settings
        self._timeout = aiohttp.ClientTimeout(total=settings.timeout)
        self._served: Service | None = None
        self._warned = False

    async def start(self) -> None:
        self._served = await self._node.serve(self.settings.name, self.handle,
                                              concurrency=self.settings.concurrency)

    def update(self, settings: ServiceApp) -> bool:
        """Take new settings in place (url, timeout); False when they need a new serve
        (its concurrency changed)."""
        if settings.concurrency != self.settings.concurrency:
            return False
        self.settings = settings
        self._timeout = aiohttp.ClientTimeout(total=settings.timeout)
        return True

    async def aclose(self) -> None:
        """Stop serving: queued requests are declined (they go to other servers)."""
        if self._served is not None:
            await self._served.aclose()
            self._served = None

    async def handle(self, msg: Message) -> Reply:
        """The app's answer to one request."""
        settings = self.settings
        headers = for_app(msg)
        if _trace.ON:
            _trace.inject(headers)  # the serving span: the app's spans nest under it
        outcome = "error"
        try:
            async with self._session.post(settings.url, data=msg.data, headers=headers,
                                          timeout=self._timeout) as response:
                body = await _read(response, self._limit)
                if not 200 <= response.status < 300:
                    outcome = "status"
                    text = body[:_MAX_ERROR_BODY].decode("utf-8", "replace")
                    raise AppError(f"app answered {response.status}: {text}")
                try:
                    reply = Reply(body, from_app(response.headers.items()) or None)
                except BadHeader as exc:
                    raise AppError(f"app reply: {exc}") from None
                outcome = "ok"
                return reply
        except TimeoutError:
            outcome = "timeout"
            raise AppError(f"app did not answer within {settings.timeout:g} s") from None
        except (aiohttp.ClientConnectionError, ConnectionError) as exc:
            outcome = "unreachable"
            self._warn_once(f"{settings.url}: {type(exc).__name__} {exc}".rstrip())
            raise Declined(str(exc)) from None
        except aiohttp.ClientError as exc:
            raise AppError(f"app: {type(exc).__name__} {exc}".rstrip()) from None
        finally:
            self._metrics.service_apps.labels(settings.name, outcome).inc()

    def _warn_once(self, reason: str) -> None:
        if not self._warned:
            self._warned = True
            _log.warning("service %s: app unreachable, declining its requests (other servers "
                         "take them): %s", self.settings.name, reason)


async def _read(response: aiohttp.ClientResponse, limit: int) -> bytes:
    """The response body, refused past `limit` bytes (a reply cannot be larger)."""
    size = response.content_length
    if size is not None:
        if size > limit:
            raise AppError(f"app reply of {size} bytes exceeds max_message_size {limit}")
        return await response.read()
    chunks: list[bytes] = []
    total = 0
    async for chunk in response.content.iter_any():
        total += len(chunk)
        if total > limit:
            raise AppError(f"app reply exceeds max_message_size {limit}")
        chunks.append(chunk)
    return b"".join(chunks)


class AppServices:
    """The running ``[[service]]`` entries, by name; `apply` makes them match a config."""

    def __init__(self, node: AsyncNode, metrics: AgentMetrics) -> None:
        self._node = node
        self._metrics = metrics
        self._session: aiohttp.ClientSession | None = None
        self._running: dict[str, AppService] = {}

    async def apply(self, wanted: list[ServiceApp]) -> None:
        """Serve exactly these: new ones start, removed ones stop, changed ones change in
        place (a new concurrency means serving anew; requests queued meanwhile go to
        other servers or are retried)."""
        if self._session is None and wanted:
            # No connection limit of the session's own: each service's concurrency bounds it.
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        names = {svc.name: svc for svc in wanted}
        for name in [n for n in self._running if n not in names]:
            await self._running.pop(name).aclose()
        for name, settings in names.items():
            running = self._running.get(name)
            if running is not None and running.settings == settings:
                continue
            if running is not None and running.update(settings):
                continue
            if running is not None:
                await self._running.pop(name).aclose()
            assert self._session is not None
            app = AppService(self._node, settings, self._session, self._metrics)
            await app.start()
            self._running[name] = app

    def names(self) -> list[str]:
        return sorted(self._running)

    async def aclose(self) -> None:
        running, self._running = list(self._running.values()), {}
        for app in running:
            with contextlib.suppress(Exception):
                await app.aclose()
        if self._session is not None:
            await self._session.close()
            self._session = None
