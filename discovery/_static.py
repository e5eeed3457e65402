"""Static peers: for networks where multicast does not reach (`--peer`, `ZEROMESH_PEERS`).

A static peer is only an address: its id, name and version are learned when the
mesh greets it over ZeroMQ. So this backend emits one `PeerFound` per URL with an
empty id, and never a `PeerGone` (liveness is the heartbeats' business).

URLs are validated when the backend is built, not when it starts, so a typo on
the command line is a clear `InvalidRecord` and exit status 2 before anything
binds a socket. An IP literal is preferred (IPv6 in brackets,
``tcp://[fd00::5]:7700``, link-local with its zone ``tcp://[fe80::5%eth0]:7700``);
a host name must resolve (to IPv4) through the system resolver at construction.
For a CURVE mesh the peer's public key follows the URL after ``#``
(``tcp://10.0.0.5:7700#<40 Z85 chars>``): a secure node connects only to an
endpoint whose key it knows.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Sequence
from typing import Final

from ._base import EventSink
from ._events import PeerFound, PeerInfo
from ._txt import check_ip, check_key, check_mesh, split_tcp_url
from .errors import InvalidRecord

_HOSTNAME_RE: Final = re.compile(
    r"(?=.{1,253}\Z)(?!-)[A-Za-z0-9-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*\.?"
)
_IPV4_LIKE_RE: Final = re.compile(r"[0-9.]+")


def parse_peer_urls(text: str) -> list[str]:
    """Split a comma-separated `ZEROMESH_PEERS` value; blanks are skipped, nothing is validated."""
    return [part.strip() for part in text.split(",") if part.strip()]


def split_key(url: str) -> tuple[str, str]:
    """``tcp://host:port#KEY`` -> (URL, KEY); no ``#``: an empty key.

    Raises:
        InvalidRecord: the part after ``#`` is not a CURVE public key.
    """
    base, sep, key = url.partition("#")  # a URL has no '#'; a Z85 key may
    if not sep:
        return url, ""
    if not key:
        raise InvalidRecord(f"peer {url!r}: nothing after '#' (give the peer's public key)")
    try:
        check_key(key)
    except InvalidRecord as exc:
        raise InvalidRecord(f"peer {base!r}: {exc}") from None
    return base, key


def check_peer_url(url: str) -> str:
    """Return `url` if it is ``tcp://host:port[#KEY]`` with a usable host, else raise
    `InvalidRecord`. An IPv6 address comes back compressed (``[fd00:0::5]`` ->
    ``[fd00::5]``), as the peer's own hellos spell it: one peer, one link."""
    return resolve_peer_url(url)[0]


def resolve_peer_url(url: str) -> tuple[str, tuple[str, ...]]:
    """`check_peer_url`, and for a host name the IPv4 endpoints it resolved to (as the
    seed's own hellos spell it: membership tells a seed that is a member from one that is
    not); one lookup for both."""
    base, key = split_key(url)
    host, port = split_tcp_url(base)
    if ":" in host or _IPV4_LIKE_RE.fullmatch(host):
        try:
            ip = check_ip(host)
        except InvalidRecord as exc:
            raise InvalidRecord(f"peer {url!r}: {exc}") from None
        if ip.version == 6:
            return f"tcp://[{ip}]:{port}" + (f"#{key}" if key else ""), ()
        return url, ()
    if not _HOSTNAME_RE.fullmatch(host):
        raise InvalidRecord(f"peer {url!r}: host must be an IP address or a host name")
    try:
        found = socket.getaddrinfo(host, port, socket.AF_INET, socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        raise InvalidRecord(f"peer {url!r}: cannot resolve {host!r} to IPv4 ({exc})") from None
    return url, tuple(dict.fromkeys(f"tcp://{info[4][0]}:{port}" for info in found))


class StaticDiscovery:
    """A `DiscoveryBackend` that reports a fixed list of peer URLs."""

    def __init__(self, urls: Sequence[str], *, mesh: str) -> None:
        self._mesh = check_mesh(mesh)
        self._aliases: dict[str, tuple[str, ...]] = {}
        """Per URL (duplicates removed, in order), a host name's addresses as endpoints."""
        for url in urls:
            checked, aliases = resolve_peer_url(url)
            self._aliases.setdefault(checked, aliases)
        self._urls: tuple[str, ...] = tuple(self._aliases)
        self._started = False

    @property
    def urls(self) -> tuple[str, ...]:
        """The validated URLs, duplicates removed, in the order given."""
        return self._urls

    async def start(self, me: PeerInfo, sink: EventSink) -> None:
        """Report every URL once as a `PeerFound` with `source="static"`."""
        if self._started:
            raise RuntimeError("StaticDiscovery already started")
        self._started = True
        own = set(me.endpoints)
        for url in self._urls:
            base, key = split_key(url)
            if base in own:
                continue
            info = PeerInfo(id="", name="", mesh=self._mesh, version=0,
                            endpoints=(base, *self._aliases[url]), key=key, source="static")
            sink(PeerFound(info))

    async def aclose(self) -> None:
        """Nothing to withdraw: static peers were never announced."""
        self._started = False

    def __repr__(self) -> str:
        return f"StaticDiscovery({list(self._urls)!r}, mesh={self._mesh!r})"
