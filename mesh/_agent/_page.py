"""``GET /``: the mesh page, served entirely by the agent.

The page is three static files shipped as package data (``page/``): plain
HTML, CSS and JavaScript with no build step and no asset from elsewhere, so it
works on a LAN with no internet. It reads the agent's own JSON and SSE
endpoints (``/v1/events``, ``/v1/topology``, ``/v1/dead-letters``) from the
same origin. The files are read once, when the routes are added.

A strict Content-Security-Policy keeps it that way: scripts, styles and
connections from this origin only, so a topic or node name shown on the page
can never load or run anything.
"""

from __future__ import annotations

from importlib import resources
from typing import Final

from aiohttp import web

from . import _http

ASSETS: Final[dict[str, str]] = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
"""Every file of the page and its content type; nothing else under ``/page/`` exists."""
_POLICY: Final[str] = ("default-src 'none'; script-src 'self'; style-src 'self'; "
                       "connect-src 'self'; img-src 'self' data:; base-uri 'none'; "
                       "form-action 'none'; frame-ancestors 'none'")


class Page:
    """The page's routes: ``/`` (index.html) and ``/page/{name}`` (its assets)."""

    def __init__(self) -> None:
        folder = resources.files(__package__ or "mesh._agent") / "page"
        self._files = {name: (folder / name).read_bytes() for name in ASSETS}

    def add_to(self, app: web.Application) -> None:
        _http.add_routes(app, [web.get("/", self.index), web.get("/page/{name}", self.asset)])

    async def index(self, request: web.Request) -> web.Response:
        _http.query(request, ())
        return self._serve("index.html")

    async def asset(self, request: web.Request) -> web.Response:
        _http.query(request, ())
        name = request.match_info["name"]
        if name not in ASSETS:
            return _http.error(404, f"no such file: {name}")
        return self._serve(name)

    def _serve(self, name: str) -> web.Response:
        return web.Response(body=self._files[name], headers={
            "Content-Type": ASSETS[name],
            "Cache-Control": "no-cache",
            "Content-Security-Policy": _POLICY,
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer",
        })
