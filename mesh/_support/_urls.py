"""URLs the user gives for HTTP (an app's, an agent's), checked where they are read."""

from __future__ import annotations

from urllib.parse import urlsplit

from ._text import quoted


def http_url_problem(text: str) -> str | None:
    """Why `text` is no ``http(s)://host[:port]`` URL, or None when it is one (a bad port
    found here is a one-line error at start, not a failure at every request)."""
    try:
        url = urlsplit(text)
        url.port  # noqa: B018  # (raises on a port out of range or not a number)
    except ValueError as exc:
        return f"{quoted(text)} is not a URL ({exc})"
    if url.scheme not in ("http", "https") or not url.hostname:
        return f"{quoted(text)} is not an http(s) URL"
    return None
