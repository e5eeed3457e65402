"""``[[service]]``: a mesh service answered by an app over HTTP.

Each request is POSTed to the app's URL (body as body, headers by the scheme of
`_headers.for_app`) on a keep-alive connection (`_app_client`); a 2xx response
is the reply, its headers travel back. The
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

import asyncio
import contextlib
import functools
import logging
import re
from typing import Final

from prometheus_client.metrics import Counter as CounterChild

from .. import _trace
from .._message import Message, Reply
from .._node import AsyncNode
from .._services._server import Declined, FutureHandler, ReplyBody, Service
from ._app_client import AppClient, BadResponse, ClientClosed, Response
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


class AppService(FutureHandler):
    """One ``[[service]]``: serves its name on the node while it runs.

    Each request is a POST on the app's keep-alive connections (`_app_client`); the node
    bounds them by `concurrency` and answers when the returned future ends."""

    def __init__(self, node: AsyncNode, settings: ServiceApp, metrics: AgentMetrics) -> None:
        self._node = node
        self._metrics = metrics
        self._limit = node.config.max_message_size
        self.settings = settings
        self._client = AppClient(settings.url)
        self._served: Service | None = None
        self._warned = False
        self._outcomes: dict[str, CounterChild] = {}
        """The outcome counters, each labelled once (a `labels()` lookup per request costs
        more than the increment)."""

    async def start(self) -> None:
        self._served = await self._node.serve(self.settings.name, self,
                                              concurrency=self.settings.concurrency)

    async def update(self, settings: ServiceApp) -> None:
        """Take new settings in place: the name stays served throughout."""
        if settings.concurrency != self.settings.concurrency and self._served is not None:
            self._served.resize(settings.concurrency)
        if settings.url != self.settings.url:
            old, self._client = self._client, AppClient(settings.url)
            self._warned = False  # (the new app's failure is news)
            await old.aclose()
        self.settings = settings

    async def aclose(self) -> None:
        """Stop serving: queued requests are declined (they go to other servers)."""
        if self._served is not None:
            await self._served.aclose()
            self._served = None
        await self._client.aclose()

    def __call__(self, msg: Message) -> asyncio.Future[ReplyBody]:
        """Start the app's answer to one request: the future is its reply."""
        headers = for_app(msg)
        if _trace.ON:
            _trace.inject(headers)  # the serving span: the app's spans nest under it
        answer = self._client.post(headers, msg.data, self.settings.timeout, self._limit)
        reply: asyncio.Future[ReplyBody] = asyncio.get_running_loop().create_future()
        answer.add_done_callback(functools.partial(self._answered, reply))
        return reply

    def _answered(self, reply: asyncio.Future[ReplyBody],
                  answer: asyncio.Future[Response]) -> None:
        if reply.done():  # (cancelled: the node is closing)
            return
        outcome = "error"
        try:
            response = answer.result()
            status = response.status
            if not 200 <= status < 300:
                outcome = "status"
                text = response.body[:_MAX_ERROR_BODY].decode("utf-8", "replace")
                raise AppError(f"app answered {status}: {text}")
            try:
                result = Reply(response.body, from_app(response.headers) or None)
            except BadHeader as exc:
                raise AppError(f"app reply: {exc}") from None
            outcome = "ok"
            reply.set_result(result)
        except TimeoutError:
            outcome = "timeout"
            reply.set_exception(AppError(
                f"app did not answer within {self.settings.timeout:g} s"))
        except ClientClosed as exc:  # (the app's url changed: not the app's failure)
            reply.set_exception(Declined(str(exc)))
        except OSError as exc:
            outcome = "unreachable"
            self._warn_once(f"{self.settings.url}: {type(exc).__name__} {exc}".rstrip())
            reply.set_exception(Declined(str(exc)))
        except BadResponse as exc:
            reply.set_exception(AppError(f"app: {exc}"))
        except AppError as exc:  # (the app's failure, not ours: logged without a traceback)
            reply.set_exception(exc.with_traceback(None))
        finally:
            counter = self._outcomes.get(outcome)
            if counter is None:
                counter = self._outcomes[outcome] = self._metrics.service_apps.labels(
                    self.settings.name, outcome)
            counter.inc()

    def _warn_once(self, reason: str) -> None:
        if not self._warned:
            self._warned = True
            _log.warning("service %s: app unreachable, declining its requests (other servers "
                         "take them): %s", self.settings.name, reason)


class AppServices:
    """The running ``[[service]]`` entries, by name; `apply` makes them match a config."""

    def __init__(self, node: AsyncNode, metrics: AgentMetrics) -> None:
        self._node = node
        self._metrics = metrics
        self._running: dict[str, AppService] = {}

    async def apply(self, wanted: list[ServiceApp]) -> None:
        """Serve exactly these: new ones start, removed ones stop, changed ones change in
        place."""
        names = {svc.name: svc for svc in wanted}
        for name in [n for n in self._running if n not in names]:
            await self._running.pop(name).aclose()
        for name, settings in names.items():
            running = self._running.get(name)
            if running is not None:
                if running.settings != settings:
                    await running.update(settings)
                continue
            app = AppService(self._node, settings, self._metrics)
            await app.start()
            self._running[name] = app

    def names(self) -> list[str]:
        return sorted(self._running)

    async def aclose(self) -> None:
        running, self._running = list(self._running.values()), {}
        for app in running:
            with contextlib.suppress(Exception):
                await app.aclose()
