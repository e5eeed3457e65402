"""PeerInfo <-> DNS-SD TXT properties, with validation and size limits.

Why a module of its own: a TXT record is the one piece of discovery that comes
from strangers on the LAN, so parsing it must be pure, total and strict. Every
function here either returns a valid value or raises `InvalidRecord(reason)`;
nothing else escapes, whatever the bytes. That makes it exhaustively testable
(hypothesis round-trips plus garbage) without sockets.

TXT keys (RFC 6763 `key=value` strings; unknown keys are ignored so a newer
peer can add some without breaking older ones):

====  =================================================================
id    node id, 32 lowercase hex chars
name  human name, 1..63 bytes UTF-8, printable
mesh  mesh name, 1..63 chars of ``[A-Za-z0-9._-]``
v     protocol version, decimal 0..65535
ep    comma-separated control endpoints ``tcp://IPv4:port`` or
      ``tcp://[IPv6]:port`` (1..8; link-local with its scope, ``[fe80::1%eth0]``)
key   optional CURVE public key, 40 chars Z85
====  =================================================================

The whole record is at most 1300 bytes so an announcement fits one packet.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from typing import Final

from ._events import PeerInfo
from .errors import InvalidRecord

MAX_TXT_BYTES: Final[int] = 1300
MAX_LABEL_BYTES: Final[int] = 63
MAX_ENDPOINTS: Final[int] = 8
MAX_VERSION: Final[int] = 65535

_ID_RE: Final = re.compile(r"[0-9a-f]{32}")
_MESH_RE: Final = re.compile(r"[A-Za-z0-9._-]{1,63}")
_VERSION_RE: Final = re.compile(r"0|[1-9][0-9]{0,4}")
_PORT_RE: Final = re.compile(r"[1-9][0-9]{0,4}")
_SCOPE_RE: Final = re.compile(r"[A-Za-z0-9_.-]{1,15}")
"""An IPv6 zone: a Linux interface name (at most 15 chars) or index."""
_Z85_ALPHABET: Final[frozenset[str]] = frozenset(
    "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.-:+=^!/*?&<>()[]{}@%$#"
)
_Z85_KEY_LEN: Final[int] = 40
_THIS_NETWORK: Final = ipaddress.IPv4Network("0.0.0.0/8")
_BROADCAST: Final = ipaddress.IPv4Address("255.255.255.255")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
TxtProperties = dict[bytes, bytes | None]
"""What zeroconf's `ServiceInfo.properties` holds."""


def check_id(value: str) -> str:
    """Return `value` if it is a node id (32 lowercase hex), else raise."""
    if not _ID_RE.fullmatch(value):
        raise InvalidRecord(f"id must be 32 lowercase hex chars, got {value[:40]!r}")
    return value


def check_name(value: str) -> str:
    """Return `value` if it is a usable human name, else raise."""
    if not value:
        raise InvalidRecord("name is empty")
    try:
        encoded = value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidRecord(f"name is not valid unicode: {value[:70]!r}") from None
    if len(encoded) > MAX_LABEL_BYTES:
        raise InvalidRecord(f"name is longer than {MAX_LABEL_BYTES} bytes")
    if not value.isprintable():
        raise InvalidRecord(f"name has unprintable characters: {value!r}")
    return value


def check_mesh(value: str) -> str:
    """Return `value` if it is a mesh name (``[A-Za-z0-9._-]``, 1..63), else raise."""
    if not _MESH_RE.fullmatch(value):
        raise InvalidRecord(f"mesh must be 1..63 chars of [A-Za-z0-9._-], got {value[:70]!r}")
    return value


def check_version(value: int) -> int:
    """Return `value` if it is a protocol version (0..65535), else raise."""
    if isinstance(value, bool) or not 0 <= value <= MAX_VERSION:
        raise InvalidRecord(f"version must be 0..{MAX_VERSION}, got {value!r}")
    return value


def check_key(value: str) -> str:
    """Return `value` if it is empty or a 40-char Z85 public key, else raise."""
    if value and (len(value) != _Z85_KEY_LEN or not set(value) <= _Z85_ALPHABET):
        raise InvalidRecord(f"key must be {_Z85_KEY_LEN} Z85 chars")
    return value


def check_ipv4(host: str) -> ipaddress.IPv4Address:
    """Parse a unicast IPv4 literal a peer could connect to, else raise."""
    try:
        ip = ipaddress.IPv4Address(host)
    except ValueError:
        raise InvalidRecord(f"not an IPv4 address: {host[:60]!r}") from None
    if ip in _THIS_NETWORK or ip.is_multicast or ip == _BROADCAST or ip.is_reserved:
        raise InvalidRecord(f"address {ip} is not a unicast host address")
    return ip


def check_ip(host: str) -> IPAddress:
    """Parse a unicast IPv4 or IPv6 literal (no brackets) a peer could connect to, else raise.

    IPv6 link-local needs its zone (``fe80::1%eth0``): without it no kernel knows
    which link is meant. IPv4-mapped IPv6 is refused: give the IPv4 address.
    """
    if ":" not in host:
        return check_ipv4(host)
    address, sep, scope = host.partition("%")
    if sep and not _SCOPE_RE.fullmatch(scope):
        raise InvalidRecord(f"bad IPv6 zone (an interface name) in {host[:60]!r}")
    try:
        ip = ipaddress.IPv6Address(host)
    except ValueError:
        raise InvalidRecord(f"not an IPv6 address: {host[:60]!r}") from None
    if ip.is_unspecified or ip.is_multicast or ip.ipv4_mapped is not None:
        raise InvalidRecord(f"address {address} is not a unicast host address")
    if ip.is_link_local != bool(sep):
        raise InvalidRecord(f"link-local {address} needs its zone, e.g. {address}%eth0"
                            if ip.is_link_local else f"only link-local takes a zone: {host!r}")
    return ip


def split_tcp_url(url: str) -> tuple[str, int]:
    """Split ``tcp://host:port`` or ``tcp://[IPv6]:port`` into host (no brackets) and port;
    the host is not checked."""
    if not url.startswith("tcp://"):
        raise InvalidRecord(f"endpoint must start with tcp://, got {url[:60]!r}")
    rest = url[len("tcp://") :]
    if rest.startswith("["):
        host, sep, tail = rest[1:].partition("]")
        if not sep or ":" not in host:
            raise InvalidRecord(f"brackets hold an IPv6 address: tcp://[addr]:port, "
                                f"got {url[:60]!r}")
        if not tail.startswith(":"):
            raise InvalidRecord(f"endpoint needs [addr]:port, got {url[:60]!r}")
        port_text = tail[1:]
    else:
        host, sep, port_text = rest.rpartition(":")
        if not sep or not host:
            raise InvalidRecord(f"endpoint needs host:port, got {url[:60]!r}")
        if ":" in host:
            raise InvalidRecord(f"an IPv6 address goes in brackets: tcp://[addr]:port, "
                                f"got {url[:60]!r}")
    if not _PORT_RE.fullmatch(port_text) or int(port_text) > 65535:
        raise InvalidRecord(f"endpoint port must be 1..65535, got {port_text[:10]!r}")
    return host, int(port_text)


def check_endpoint(url: str) -> str:
    """Return `url` if it is ``tcp://<unicast IPv4>:<port>`` or ``tcp://[<unicast IPv6>]:<port>``,
    else raise."""
    host, _port = split_tcp_url(url)
    check_ip(host)
    return url


def txt_from_peer(info: PeerInfo) -> TxtProperties:
    """Encode our own `PeerInfo` as TXT properties; raises if it is not announceable."""
    check_id(info.id)
    check_name(info.name)
    check_mesh(info.mesh)
    check_version(info.version)
    check_key(info.key)
    if not 1 <= len(info.endpoints) <= MAX_ENDPOINTS:
        raise InvalidRecord(f"need 1..{MAX_ENDPOINTS} endpoints, got {len(info.endpoints)}")
    for endpoint in info.endpoints:
        check_endpoint(endpoint)
    props: TxtProperties = {
        b"id": info.id.encode(),
        b"name": info.name.encode("utf-8"),
        b"mesh": info.mesh.encode(),
        b"v": str(info.version).encode(),
        b"ep": ",".join(info.endpoints).encode(),
    }
    if info.key:
        props[b"key"] = info.key.encode()
    size = txt_size(props)
    if size > MAX_TXT_BYTES:
        raise InvalidRecord(f"TXT record is {size} bytes, limit {MAX_TXT_BYTES}")
    return props


def txt_size(props: Mapping[bytes, bytes | None]) -> int:
    """Wire size of the TXT RDATA: one length byte plus ``key=value`` per entry."""
    return sum(1 + len(k) + (0 if v is None else 1 + len(v)) for k, v in props.items())


def _text(props: Mapping[bytes, bytes | None], key: bytes) -> str:
    value = props.get(key)
    if value is None:
        raise InvalidRecord(f"TXT key {key.decode()!r} is missing or has no value")
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRecord(f"TXT key {key.decode()!r} is not UTF-8") from None


def mesh_of(props: Mapping[bytes, bytes | None]) -> str | None:
    """The raw `mesh` value, for cheap wrong-mesh filtering before full parsing."""
    value = props.get(b"mesh")
    if value is None:
        return None
    return value.decode("utf-8", "replace")


def peer_from_txt(props: Mapping[bytes, bytes | None], *, source: str = "mdns") -> PeerInfo:
    """Decode and validate a peer's TXT properties; raises `InvalidRecord` on anything off."""
    size = txt_size(props)
    if size > MAX_TXT_BYTES:
        raise InvalidRecord(f"TXT record is {size} bytes, limit {MAX_TXT_BYTES}")
    node_id = check_id(_text(props, b"id"))
    name = check_name(_text(props, b"name"))
    mesh = check_mesh(_text(props, b"mesh"))
    version_text = _text(props, b"v")
    if not _VERSION_RE.fullmatch(version_text):
        raise InvalidRecord(f"v must be a decimal 0..{MAX_VERSION}, got {version_text[:10]!r}")
    version = check_version(int(version_text))
    ep_text = _text(props, b"ep")
    endpoints = tuple(ep_text.split(","))
    if len(endpoints) > MAX_ENDPOINTS:
        raise InvalidRecord(f"more than {MAX_ENDPOINTS} endpoints")
    for endpoint in endpoints:
        check_endpoint(endpoint)
    key = ""
    if b"key" in props:
        key = check_key(_text(props, b"key"))
        if not key:
            raise InvalidRecord("key is empty")
    return PeerInfo(
        id=node_id,
        name=name,
        mesh=mesh,
        version=version,
        endpoints=endpoints,
        key=key,
        source=source,
    )
