"""The agent: a node, its HTTP API and its webhooks, in one event loop.

The HTTP server (aiohttp) runs in the node's own loop, so a request costs no
thread hop; aiohttp also gives the webhook client and cancels a handler when
its client disconnects (an SSE stream ends with its connection). Connections
start on the lean front (`_front`), which answers plain publishes, pushes and
requests itself and hands everything else to aiohttp.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import socket
from typing import Any, Final, Self

import aiohttp
import msgspec
from aiohttp import web

from .._node import AsyncNode
from .._uplink._links import Uplinks
from ..errors import ConfigError, MeshError
from . import _http
from ._config import AgentConfig, Webhook, http_address
from ._front import Front, FrontSite
from ._metrics import AgentMetrics
from ._owned import OwnedDurables, owned
from ._page import Page
from ._routes import LEAN, Routes
from ._seeing import Seeing
from ._service_apps import AppServices
from ._sse import Streams
from ._webhooks import WebhookRunner

_log = logging.getLogger("mesh.agent")
_SHUTDOWN_GRACE: Final[float] = 2.0


class Agent:
    """``async with Agent(config) as agent:`` runs until the block ends."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.node = AsyncNode(config.node_config())
        self.uplinks = Uplinks(self.node, config.data_dir, fsync=config.fsync,
                               quota=config.spool_quota)
        self.metrics = AgentMetrics(self.node, self.uplinks)
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self._owned = OwnedDurables(self.node, config.data_dir)
        self.services = AppServices(self.node, self.metrics)
        """``[[service]]`` entries: mesh services answered by apps over HTTP."""
        self._hooks: dict[bytes, tuple[WebhookRunner, asyncio.Task[None]]] = {}
        """Running webhooks, by their settings (encoded): a reload keeps the unchanged."""
        self.http_url = ""
        self._reloading = asyncio.Lock()
        """One reload at a time: two overlapping ones ran both files' webhooks at once."""

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.config.body_limit)
        app[_http.COUNT] = self._count
        Routes(self.node, self.metrics, self.uplinks).add_to(app)
        Streams(self.node, self.metrics).add_to(app)
        Seeing(self.node, self.uplinks).add_to(app)
        Page().add_to(app)
        _http.add_fallback(app)
        return app

    def _count(self, route: str, status: int) -> None:
        counts = self.metrics.http  # (routes and statuses are few: this stays small)
        counts[route, status] = counts.get((route, status), 0) + 1

    async def __aenter__(self) -> Self:
        host, port = http_address(self.config.http)
        _http.quiet_client_errors()
        await self.node.start()
        try:
            await self._owned.start(owned(self.config))  # (before any client can open one)
            app = self.app()
            self._runner = web.AppRunner(app, access_log=None,
                                         handler_cancellation=True,
                                         shutdown_timeout=_SHUTDOWN_GRACE)
            await self._runner.setup()
            front = Front.of(self._runner, app, LEAN, self.config.body_limit)
            site = FrontSite(self._runner, front, host, port)
            try:
                await site.start()
            except OSError as exc:
                raise ConfigError("http", f"cannot listen on {host}:{port}: "
                                          f"{exc.strerror or exc}") from None
            self.http_url = _url(self._runner.addresses[0])
            await self.uplinks.apply(self.config.uplinks)
            self._session = aiohttp.ClientSession()
            await self._apply_webhooks(self.config.webhooks)
            await self.services.apply(self.config.services)
        except BaseException:
            await self.aclose()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def reload(self, config: AgentConfig) -> None:
        """Apply a re-read config (SIGHUP): webhooks, services, uplinks and the CURVE allowlist
        change now; any other key that changed is named in one log line (it needs a
        restart) and keeps its running value.

        Raises:
            ConfigError: the new allowlist, uplinks or durable webhooks cannot be used (what
                runs is kept).
        """
        async with self._reloading:  # (FIFO: the file read last is applied last)
            _check_durables(config.webhooks, self.config.data_dir)
            if config.allow is not None and config.allow == self.config.allow:
                self.node.reload_allowlist()
            await self.uplinks.apply(config.uplinks)
            await self._apply_webhooks(config.webhooks)
            await self.services.apply(config.services)
            self.config.webhooks, self.config.uplinks = config.webhooks, config.uplinks
            self.config.services = config.services
            await self._owned.save(owned(self.config))
        later = [key for key in AgentConfig.__struct_fields__
                 if key not in _RELOADED and getattr(config, key) != getattr(self.config, key)]
        if later:
            _log.warning("config reloaded; changed keys that need a restart: %s",
                         ", ".join(later))

    async def _apply_webhooks(self, hooks: list[Webhook]) -> None:
        """Run exactly these webhooks: unchanged ones keep running (and their queues); one
        whose source and concurrency stay takes its new settings in place (restarted, its
        POSTs in flight were cut and what its subscription held was dropped). The durable
        of a removed one that no webhook takes on is ended, as an uplink's removed export
        is: announced still, it had publishers spool for it for good."""
        wanted = {msgspec.json.encode(hook): (i, hook) for i, hook in enumerate(hooks)}
        for key in [k for k in wanted if k not in self._hooks]:
            source = _source(wanted[key][1])
            old = next((k for k, (runner, task) in self._hooks.items()  # (a failed one: anew)
                        if k not in wanted and not task.done()
                        and _source(runner.hook) == source), None)
            if old is not None:
                self._hooks[key] = self._hooks.pop(old)
        kept = {hook.durable for hook in hooks}
        for key in [k for k in self._hooks if k not in wanted]:
            runner, task = self._hooks.pop(key)
            await _stopped(task)
            durable = runner.hook.durable
            if durable is not None and durable not in kept:
                try:
                    await self.node.end_durable(durable)
                except MeshError as exc:  # (e.g. an SSE stream holds it open)
                    _log.warning("webhook durable %r not ended: %s", durable, exc)
        assert self._session is not None
        for key, (i, hook) in wanted.items():
            if key in self._hooks:
                self._hooks[key][0].update(hook, i)
                continue
            runner = WebhookRunner(self.node, hook, i, self._session, self.metrics)
            task = asyncio.get_running_loop().create_task(runner.run(),
                                                          name=f"zeromesh-webhook-{i}")
            task.add_done_callback(functools.partial(_failed, runner))
            self._hooks[key] = runner, task

    async def aclose(self) -> None:
        await self.services.aclose()
        await self.uplinks.aclose()
        hooks, self._hooks = list(self._hooks.values()), {}
        for _, task in hooks:
            await _stopped(task)
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        await self.node.aclose()


_RELOADED: Final = frozenset({"webhooks", "uplinks", "services"})
"""What SIGHUP changes in a running agent; besides, the files of an unchanged ``allow``
path are read again."""


def _check_durables(hooks: list[Webhook], data_dir: str | None) -> None:
    """A durable webhook needs the running data_dir: a new one in the file waits for a
    restart, and until then its webhook could not run.

    Raises:
        ConfigError: the running agent has no data_dir.
    """
    for i, hook in enumerate(hooks):
        if hook.durable is not None and data_dir is None:
            raise ConfigError(f"webhooks[{i}].durable", "a durable webhook needs data_dir, "
                                                        "and this agent runs without one "
                                                        "(data_dir needs a restart)")


def _source(hook: Webhook) -> tuple[str | None, str | None, str | None, int]:
    """What a running webhook cannot change in place: its subscription and its slots."""
    return hook.pattern, hook.queue, hook.durable, hook.concurrency


def _failed(runner: WebhookRunner, task: asyncio.Task[None]) -> None:
    """A webhook that ended by itself (e.g. its durable open elsewhere) is logged then, not
    found at the agent's stop."""
    if not task.cancelled() and task.exception() is not None:
        _log.error("webhook %s stopped: %s", runner.label, task.exception())


async def _stopped(task: asyncio.Task[None]) -> None:
    """Stop a webhook; one that failed already was logged (`_failed`): its error must not
    break the agent's close, which would leave the node and the HTTP server open."""
    task.cancel()
    await asyncio.wait([task])


def _url(bound: tuple[Any, ...]) -> str:
    """The agent's URL from the address it is bound to; a link-local one keeps its zone
    (``http://[fe80::1%eth0]:7474``, as curl and `zeromesh top` take it; not RFC 6874's
    ``%25``, which aiohttp cannot resolve), without which no client can reach it."""
    host, port = bound[0], bound[1]
    if ":" not in host:
        return f"http://{host}:{port}"
    zone = ""
    if len(bound) > 3 and bound[3]:
        try:
            zone = f"%{socket.if_indextoname(bound[3])}"
        except OSError:
            zone = f"%{bound[3]}"
    return f"http://[{host}{zone}]:{port}"
