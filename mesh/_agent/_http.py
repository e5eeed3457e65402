"""HTTP plumbing shared by the routes: JSON errors, query checks, error mapping.

Every failure a client can cause becomes a 4xx with ``{"error": reason}``;
mesh errors map to the statuses DESIGN.md names (503 no responders, 504
timeout, 502 remote error). Nothing a client sends ends the agent.
"""

from __future__ import annotations

import base64
import logging
import math
from collections.abc import Awaitable, Callable, Collection
from typing import Final
from urllib.parse import urlsplit

from aiohttp import web

from .._message import Message
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

_log = logging.getLogger("mesh.agent")
MAX_TIMEOUT: Final[float] = 3600.0

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def message_json(msg: Message, topic_key: str = "topic") -> dict[str, object]:
    """A message as the agent's JSON shows it: ``data`` as text, or base64 with
    ``"encoding": "base64"`` when it is not UTF-8 (SSE events, gathered replies, whose
    topic is their ``service``)."""
    body = msg.to_dict()
    if topic_key != "topic":
        body[topic_key] = body.pop("topic")
    try:
        body["data"] = msg.data.decode("utf-8")
    except UnicodeDecodeError:
        body["data"] = base64.b64encode(msg.data).decode("ascii")
        body["encoding"] = "base64"
    return body


def error(status: int, reason: str) -> web.Response:
    return web.json_response({"error": reason}, status=status)


def query(request: web.Request, allowed: Collection[str]) -> dict[str, str]:
    """The query parameters, each at most once and all known.

    Raises:
        web.HTTPBadRequest: an unknown or repeated parameter.
    """
    out: dict[str, str] = {}
    for key, value in request.query.items():
        if key not in allowed:
            known = ", ".join(sorted(allowed)) or "none"
            raise _bad(f"unknown query parameter {key!r} (known: {known})")
        if key in out:
            raise _bad(f"query parameter {key!r} given twice")
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
    raise _bad(f"{key} must be true or false, not {params[key]!r}")


def seconds(params: dict[str, str], key: str, default: float) -> float:
    if key not in params:
        return default
    try:
        value = float(params[key])
    except ValueError:
        raise _bad(f"{key} must be a number of seconds, not {params[key]!r}") from None
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
        raise _bad(f"ttl must be a number of seconds, not {params['ttl']!r}") from None
    if not value > 0 or not math.isfinite(value):
        raise _bad(f"ttl must be a finite number of seconds > 0, not {params['ttl']!r}")
    return value


def count(params: dict[str, str], key: str, default: int, top: int) -> int:
    if key not in params:
        return default
    try:
        value = int(params[key])
    except ValueError:
        raise _bad(f"{key} must be an integer, not {params[key]!r}") from None
    if not 0 <= value <= top:
        raise _bad(f"{key} must be between 0 and {top}")
    return value


def _bad(reason: str) -> web.HTTPBadRequest:
    return web.HTTPBadRequest(text=reason)


def route_name(request: web.Request) -> str:
    """The route template (``/v1/publish/{topic}``), never the concrete path: bounded labels."""
    info = request.match_info
    if info.http_exception is not None or info.route.resource is None:
        return "unmatched"
    return info.route.resource.canonical


def middleware(count_request: Callable[[str, int], None]) -> Callable[..., Awaitable[
        web.StreamResponse]]:
    """Maps exceptions to JSON errors and counts every request by route and status."""

    @web.middleware
    async def handle(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            response = await _call(request, handler)
        except web.HTTPNotFound:
            response = error(404, f"no such route: {request.method} {request.path}")
        except web.HTTPException as exc:
            response = _from_http_exception(exc)
        count_request(route_name(request), response.status)
        return response

    return handle


async def _call(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except (ConfigError, BadHeader) as exc:
        return error(400, str(exc))
    except MessageTooLarge as exc:
        return error(413, str(exc))
    except SpoolFullError as exc:
        return error(507, str(exc))
    except NoRespondersError as exc:
        return error(503, str(exc))
    except (RequestTimeout, TimeoutError) as exc:
        return error(504, str(exc) or "timed out")
    except RemoteError as exc:
        return error(502, str(exc))
    except ClosedError as exc:
        return error(503, str(exc))
    except (web.HTTPException, ConnectionError):
        raise
    except Exception as exc:
        _log.exception("%s %s failed", request.method, request.path)
        return error(500, f"internal error: {type(exc).__name__}")


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


def cross_origin(request: web.Request) -> web.Response | None:
    """A 403 for a request a browser made on behalf of a page of another origin (a
    state-changing POST must not be a cross-site form or fetch), else None.

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
