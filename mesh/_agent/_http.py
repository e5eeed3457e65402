"""HTTP plumbing shared by the routes: JSON errors, query checks, error mapping.

Every failure a client can cause becomes a 4xx with ``{"error": reason}``;
mesh errors map to the statuses DESIGN.md names (503 no responders, 504
timeout, 502 remote error). Nothing a client sends ends the agent.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Collection, Coroutine, Mapping
from typing import Any, Final, Protocol, cast
from urllib.parse import urlsplit

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from multidict import MultiMapping

from .._message import Message
from .._support._text import quoted
from ..errors import (
    ClosedError,
    ConfigError,
    MessageTooLarge,
    NoRespondersError,
    RemoteError,
    RequestTimeout,
    SpoolFullError,
)
from ._headers import BadHeader
from ._service_apps import APP_STATUS

_log = logging.getLogger("mesh.agent")
MAX_TIMEOUT: Final[float] = 3600.0

class RequestView(Protocol):
    """What a route reads of a request: aiohttp's `web.Request`, or the lean front's
    (`_front.LeanRequest`) for the routes it serves."""

    @property
    def method(self) -> str: ...
    @property
    def path(self) -> str: ...
    @property
    def match_info(self) -> Mapping[str, str]: ...
    @property
    def query_string(self) -> str: ...
    @property
    def query(self) -> MultiMapping[str]: ...
    @property
    def headers(self) -> Mapping[str, str]: ...
    async def read(self) -> bytes: ...


ViewHandler = Callable[[RequestView], Coroutine[Any, Any, web.StreamResponse]]


class ClientErrorsInOneLine(logging.Filter):
    """aiohttp logs each request it cannot parse (a bad request line, header or framing)
    at ERROR with a traceback: a client's mistake, not the agent's, which answers it
    with a 400. Such a record becomes one WARNING line naming what was wrong."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            what = " ".join(str(exc.message).split())[:200]
            record.msg, record.args = "%s: %s %s", (record.getMessage(), exc.code, what)
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.exc_info = record.exc_text = None
        return True


def quiet_client_errors() -> None:
    """Put `ClientErrorsInOneLine` on aiohttp's server logger (once per process)."""
    logger = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, ClientErrorsInOneLine) for f in logger.filters):
        logger.addFilter(ClientErrorsInOneLine())


def message_json(msg: Message, topic_key: str = "topic") -> dict[str, object]:
    """A message as the agent's JSON shows it (`Message.to_dict`; gathered replies have
    their topic as ``service``)."""
    body = msg.to_dict()
    if topic_key != "topic":
        body[topic_key] = body.pop("topic")
    return body


def error(status: int, reason: str) -> web.Response:
    return web.json_response({"error": reason}, status=status)


def query(request: RequestView, allowed: Collection[str]) -> dict[str, str]:
    """The query parameters, each at most once and all known.

    Raises:
        web.HTTPBadRequest: an unknown or repeated parameter.
    """
    out: dict[str, str] = {}
    for key, value in request.query.items():
        if key not in allowed:
            known = ", ".join(sorted(allowed)) or "none"
            raise _bad(f"unknown query parameter {quoted(key)} (known: {known})")
        if key in out:
            raise _bad(f"query parameter {quoted(key)} given twice")
        out[key] = value
    return out


def flag(params: dict[str, str], key: str, default: bool = False) -> bool:
    if key not in params:
        return default
    value = params[key].lower()
    if value in ("true", "1", "yes", ""):
        return True
    if value in ("false", "0", "no"):
        return False
    raise _bad(f"{key} must be true or false, not {quoted(params[key])}")


def seconds(params: dict[str, str], key: str, default: float) -> float:
    if key not in params:
        return default
    try:
        value = float(params[key])
    except ValueError:
        raise _bad(f"{key} must be a number of seconds, not {quoted(params[key])}") from None
    if not 0 < value <= MAX_TIMEOUT or math.isnan(value):
        raise _bad(f"{key} must be > 0 and <= {MAX_TIMEOUT:g}")
    return value


def ttl(params: dict[str, str]) -> float | None:
    """``?ttl=S``: seconds a message may wait for delivery (absent: forever)."""
    if "ttl" not in params:
        return None
    try:
        value = float(params["ttl"])
    except ValueError:
        raise _bad(f"ttl must be a number of seconds, not {quoted(params['ttl'])}") from None
    if not value > 0 or not math.isfinite(value):
        raise _bad(f"ttl must be a finite number of seconds > 0, not {quoted(params['ttl'])}")
    return value


def count(params: dict[str, str], key: str, default: int, top: int) -> int:
    if key not in params:
        return default
    try:
        value = int(params[key])
    except ValueError:
        raise _bad(f"{key} must be an integer, not {quoted(params[key])}") from None
    if not 0 <= value <= top:
        raise _bad(f"{key} must be between 0 and {top}")
    return value


def _bad(reason: str) -> web.HTTPBadRequest:
    return web.HTTPBadRequest(text=reason)


CountRequest = Callable[[str, int], None]
COUNT: Final[web.AppKey[CountRequest]] = web.AppKey("zeromesh_count_request")
"""Where `add_routes` finds the function counting requests by route and status."""
GUARDED: Final[web.AppKey[dict[tuple[str, str], ViewHandler]]] = web.AppKey(
    "zeromesh_guarded_handlers")
"""The handlers `add_routes` added (by method and path template), for the lean front."""
UNMATCHED: Final[str] = "unmatched"


def _not_counted(route: str, status: int) -> None:
    """An app without ``app[COUNT]`` (a page served alone, in tests) counts nothing."""


def add_routes(app: web.Application, routes: list[web.RouteDef]) -> None:
    """Add routes whose failures become JSON errors and whose requests are counted by
    route template and status (``app[COUNT]``, when set).

    Each handler is wrapped where it is added, rather than by an aiohttp middleware,
    which costs every request a few microseconds more (see benchmarks/README.md)."""
    count = app.get(COUNT, _not_counted)
    guarded = app.setdefault(GUARDED, {})
    for r in routes:
        guarded[r.method, r.path] = _guarded(cast(ViewHandler, r.handler), r.path, count)
    app.add_routes([web.route(r.method, _ANY_SEGMENT.sub(r"{\1:[^/]+}", r.path),
                              guarded[r.method, r.path], **r.kwargs) for r in routes])


_ANY_SEGMENT: Final = re.compile(r"\{(\w+)\}")
"""A ``{name}`` in a route template: aiohttp's default for it refuses ``{`` and ``}``,
which topics, queues and services may hold; our templates take any one segment."""


def add_fallback(app: web.Application) -> None:
    """A JSON 404 (no such route) or 405 (with Allow) for what no route takes; add last."""
    count = app.get(COUNT, _not_counted)

    async def unmatched(request: web.Request) -> web.StreamResponse:
        allowed: set[str] = set()
        for resource in request.app.router.resources():
            if resource is not fallback:
                allowed |= (await resource.resolve(request))[1]
        if allowed:
            response = error(405, "Method Not Allowed")
            response.headers["Allow"] = ",".join(sorted(allowed))
        else:
            response = error(404, f"no such route: {request.method} {request.path}")
        count(UNMATCHED, response.status)
        return response

    fallback = app.router.add_resource("/{tail:.*}")
    fallback.add_route("*", unmatched)


def _guarded(handler: ViewHandler, route: str, count: Callable[[str, int], None]
             ) -> ViewHandler:
    async def guarded(request: RequestView) -> web.StreamResponse:
        try:
            refused = cross_origin(request) if request.method == "POST" else None
            response = await handler(request) if refused is None else refused
        except (ConfigError, BadHeader) as exc:
            response = error(400, str(exc))
        except MessageTooLarge as exc:
            response = error(413, str(exc))
        except SpoolFullError as exc:
            response = error(507, str(exc))
        except NoRespondersError as exc:
            response = error(503, str(exc))
        except (RequestTimeout, TimeoutError) as exc:
            response = error(504, str(exc) or "timed out")
        except RemoteError as exc:
            response = remote_error(exc)
        except ClosedError as exc:
            response = error(503, str(exc))
        except web.HTTPException as exc:
            response = _from_http_exception(exc)
        except ConnectionError:
            raise
        except Exception as exc:
            _log.exception("%s %s failed", request.method, request.path)
            response = error(500, f"internal error: {type(exc).__name__}")
        count(route, response.status)
        return response

    return guarded


def remote_error(exc: RemoteError) -> web.Response:
    """502 for a server that failed; a ``[[service]]`` app's non-2xx answer also gives
    its ``status`` and ``body``."""
    body: dict[str, object] = {"error": str(exc), "service": exc.service}
    found = APP_STATUS.match(exc.message)
    if found:
        body["status"] = int(found.group(1))
        body["body"] = found.group(2)
    return web.json_response(body, status=502)


def _from_http_exception(exc: web.HTTPException) -> web.StreamResponse:
    if exc.status < 400:
        return exc
    reason = exc.text if exc.text and exc.content_type == "text/plain" else exc.reason
    if exc.status == 413:
        reason = f"body too large: {exc.reason}"
    response = error(exc.status, reason or "error")
    if exc.status == 405 and "Allow" in exc.headers:
        response.headers["Allow"] = exc.headers["Allow"]
    return response


def cross_origin(request: RequestView) -> web.Response | None:
    """A 403 for a request a browser made on behalf of a page of another origin (a
    state-changing POST must not be a cross-site form or fetch: any web page open in a
    browser on this machine could otherwise publish, push or call services through the
    agent), else None.

    Browsers say where a request comes from: ``Sec-Fetch-Site`` (same-origin, same-site,
    cross-site, none) and ``Origin``; clients that are not browsers send neither."""
    site = request.headers.get("Sec-Fetch-Site", "").strip().lower()
    if site and site not in ("same-origin", "none"):
        return error(403, f"cross-origin request refused (Sec-Fetch-Site: {site[:32]})")
    origin = request.headers.get("Origin", "").strip()
    if origin:
        parsed = urlsplit(origin)
        host = request.headers.get("Host", "").strip().lower()
        if origin == "null" or parsed.scheme not in ("http", "https") or \
                parsed.netloc.lower() != host:
            return error(403, f"cross-origin request refused (Origin: {origin[:64]})")
    return None
