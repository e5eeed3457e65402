"""Node settings: one typed struct, filled from arguments, then environment, then defaults.

Durations are seconds as floats. Names are validated here, so a bad setting
fails at start with the key and the reason (`ConfigError`), never later.

No ``from __future__ import annotations`` here: `NodeConfig` is shown as
``mesh.NodeConfig``, and msgspec resolves string annotations in the module
a type claims to be from, where `FsyncPolicy` is not a name.
"""

import ipaddress
import math
import os
import re
import socket
from collections.abc import Mapping
from enum import Enum
from typing import Final, TypeVar

import msgspec

from discovery import InvalidRecord, StaticDiscovery, parse_peer_urls
from patterns import InvalidName, TopicPattern

from ._spool._files import FsyncPolicy
from ._support._text import quoted
from .errors import ConfigError

DEFAULT_MESH: Final[str] = "default"
DEFAULT_INTERFACE: Final[str] = "127.0.0.1"
_MESH_RE: Final = re.compile(r"^[A-Za-z0-9._-]{1,63}$")
_NAME_MAX: Final[int] = 63
_S = TypeVar("_S")


class NodeConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Everything a node needs to start. Every field has a CLI flag and an env variable."""

    name: str = ""
    """Human name; defaults to the host name."""
    mesh: str = DEFAULT_MESH
    """Nodes of different meshes never see each other."""
    interfaces: list[str] = msgspec.field(default_factory=lambda: [DEFAULT_INTERFACE])
    """IPv4 or IPv6 addresses to bind and announce on (IPv6 link-local with its zone,
    ``fe80::1%eth0``). Loopback unless you choose a LAN interface."""
    peers: list[str] = msgspec.field(default_factory=list)
    """Static peers' control endpoints, ``tcp://host:port``."""
    data_dir: str | None = None
    """Where the node id (and later the spool) live; None = ephemeral identity."""
    port: int = 0
    """Control port (0 = any free port); fix it for static peering."""
    mdns: bool = True
    """Announce and browse with mDNS."""
    heartbeat_interval: float = 0.5
    """Seconds between heartbeats to each peer (beats fall on the wall clock's
    multiples of it, so nodes with agreeing clocks beat together)."""
    suspect_after: float = 1.0
    """A peer silent this long is suspect (no event; work and requests go to alive
    peers first)."""
    lost_after: float = 1.5
    """A peer silent this long is lost (an event; it joins again when heard)."""
    history: list[str] = msgspec.field(default_factory=list)
    """Patterns of the topics whose messages this node keeps for late subscribers
    (``subscribe(..., since=, last=)``)."""
    history_max_age: float = 3600.0
    """History older than this many seconds is dropped."""
    history_max_bytes: int = 64 * 1024 * 1024
    """History beyond this many bytes drops its oldest messages."""
    forget_after: float = 60.0
    """A peer lost this long is forgotten: its connections closed, gone from ``peers()``;
    if it comes back it joins as new."""
    max_message_size: int = 1024 * 1024
    fsync: FsyncPolicy = FsyncPolicy.BATCH
    """Spool fsync policy: ``always`` | ``batch`` (group commit) | ``off``."""
    spool_quota: int = 256 * 1024 * 1024
    """Bytes of undelivered messages the outbox spool may hold; past it a reliable send
    raises SpoolFullError. Delivered ones do not count, and their space is reclaimed so
    the files stay near this size."""
    max_attempts: int = 5
    """Failed deliveries of a reliable message before it is dead-lettered."""
    ack_timeout: float = 30.0
    """A worker holding reliable messages this long without progress loses them to others."""
    retry_backoff: float = 0.5
    """First redelivery delay; doubles per attempt (capped at 30 s)."""
    durable_expiry: float = 7 * 24 * 3600.0
    """A durable subscription no peer has announced for this long (seconds; default 7
    days) is forgotten by this publisher: no more spooling for it, its backlog freed. If
    it comes back it is learned again as new; what was published meanwhile is lost to it."""
    secret_key: str | None = None
    """CURVE secret key file (``zeromesh keygen``): encrypt and authenticate every socket."""
    allow: str | None = None
    """CURVE allowlist: a directory of public key files (``*.key``) or one such file."""
    pub_hwm: int = 10_000
    """Messages queued per subscriber before PUB drops (0 = unbounded)."""
    sub_hwm: int = 10_000
    """Messages queued per publisher on the SUB side before ZeroMQ drops (0 = unbounded)."""
    service_hwm: int = 10_000
    """Request frames queued towards a server (0 = unbounded); the requests of one loop
    iteration share a frame. A full queue makes ``request`` wait, never drop."""
    metrics_names: int = 1000
    """Names (topics, queues, services, peers) each per-name counter keeps apart; the
    rest are counted together as ``other`` (the busiest names keep their own), so a
    topic explosion cannot exhaust memory or a metrics server."""

    def validated(self) -> "NodeConfig":
        """Return a copy with defaults resolved; raise ConfigError on the first bad key."""
        for field in msgspec.structs.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, float) and math.isnan(value):
                # (here for every duration: NaN passes every `<= 0` check below, and a NaN
                # forget_after spun the loop at 100 %)
                raise ConfigError(field.name, "must be a number, not NaN")
        name = self.name or socket.gethostname().split(".")[0] or "node"
        if len(name.encode()) > _NAME_MAX or not name.isprintable():
            raise ConfigError("name", f"must be printable and at most {_NAME_MAX} bytes")
        if not _MESH_RE.match(self.mesh):
            raise ConfigError("mesh", "use 1-63 of A-Z a-z 0-9 . _ -")
        if not self.interfaces:
            raise ConfigError("interfaces", "at least one IPv4 or IPv6 address is needed")
        # (one address named twice, or by its zone's name and number, was bound twice:
        # with a fixed port, "Address already in use")
        interfaces = list(dict.fromkeys(_interface(iface) for iface in self.interfaces))
        try:
            StaticDiscovery(self.peers, mesh=self.mesh)
        except InvalidRecord as exc:
            raise ConfigError("peers", str(exc)) from None
        for url in self.peers:  # (a valid URL: a zone is in brackets, before a "#key")
            zone = url.partition("#")[0].partition("[")[2].partition("]")[0].partition("%")[2]
            if zone:
                _zone("peers", url, zone)
        if not 0 <= self.port <= 65535:
            raise ConfigError("port", "must be 0-65535")
        if self.heartbeat_interval <= 0:
            raise ConfigError("heartbeat_interval", "must be > 0")
        if not self.heartbeat_interval < self.suspect_after <= self.lost_after:
            raise ConfigError("lost_after",
                              "need heartbeat_interval < suspect_after <= lost_after")
        if self.forget_after <= 0:
            raise ConfigError("forget_after", "must be > 0")
        if self.history_max_age <= 0 or self.history_max_bytes <= 0:
            raise ConfigError("history_max_age" if self.history_max_age <= 0
                              else "history_max_bytes", "must be > 0")
        for pattern in self.history:
            try:
                TopicPattern(pattern)
            except InvalidName as exc:
                raise ConfigError("history", f"{exc.reason} in {quoted(pattern)}") from None
        if self.spool_quota <= 0:
            raise ConfigError("spool_quota", "must be > 0")
        if self.max_attempts < 1:
            raise ConfigError("max_attempts", "must be >= 1")
        if self.ack_timeout <= 0:
            raise ConfigError("ack_timeout", "must be > 0 seconds")
        if self.retry_backoff < 0:
            raise ConfigError("retry_backoff", "must be >= 0 seconds")
        if self.durable_expiry <= 0:
            raise ConfigError("durable_expiry", "must be > 0 seconds")
        if (self.secret_key is None) != (self.allow is None):
            raise ConfigError("secret_key" if self.secret_key is None else "allow",
                              "CURVE needs both secret_key and allow (the allowlist)")
        if self.max_message_size <= 0:
            raise ConfigError("max_message_size", "must be > 0")
        if self.metrics_names < 1:
            raise ConfigError("metrics_names", "must be >= 1")
        for key in ("pub_hwm", "sub_hwm", "service_hwm"):
            if getattr(self, key) < 0:
                raise ConfigError(key, "must be >= 0 (0 = unbounded)")
        return msgspec.structs.replace(self, name=name, interfaces=interfaces)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: object) -> "NodeConfig":
        """Defaults < ZEROMESH_* environment < explicit overrides (None means 'not given')."""
        values = env_values(cls, os.environ if env is None else env)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return convert(values, cls)


def _interface(iface: str) -> str:
    """An interface address in canonical form (IPv6 compressed, zone kept, by name if
    given by number), or ConfigError. Whether it is this host's is known when it is bound."""
    _, zoned, zone = iface.partition("%")
    try:
        addr = ipaddress.ip_address(iface)
    except ValueError:
        raise ConfigError("interfaces", f"{quoted(iface)} is not an IPv4 or IPv6 address") from None
    if addr.is_unspecified or addr.is_multicast:
        raise ConfigError("interfaces", f"{iface} cannot be bound: choose an interface")
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            raise ConfigError("interfaces", f"{iface}: give the IPv4 address {addr.ipv4_mapped}")
        if addr.is_link_local and not zoned:
            raise ConfigError("interfaces", f"link-local {iface} needs its interface: "
                              f"{iface}%eth0")
        if zoned and not addr.is_link_local:
            raise ConfigError("interfaces", f"{iface}: only a link-local address takes %{zone}")
        if zoned:  # (libzmq's bind said only "Invalid argument" of a name it lacks)
            return f"{str(addr).partition('%')[0]}%{_zone('interfaces', iface, zone)}"
    return str(addr)


def _zone(key: str, where: str, zone: str) -> str:
    """The name of this host's interface `zone` (a name or an index), or ConfigError:
    libzmq binds to a missing one with "Invalid argument", and dials it silently never."""
    try:
        name = socket.if_indextoname(int(zone)) if zone.isdigit() else zone
        socket.if_nametoindex(name)
    except (OSError, OverflowError):
        raise ConfigError(key, f"{where}: this host has no interface {quoted(zone)}") from None
    return name


def env_var(field: str) -> str:
    """The environment variable of a setting: ``data_dir`` -> ``ZEROMESH_DATA_DIR``."""
    return f"ZEROMESH_{field.upper()}"


def env_values(cls: type[msgspec.Struct], env: Mapping[str, str]) -> dict[str, object]:
    """Every ``ZEROMESH_<FIELD>`` that is set, typed (lists are comma-separated).

    Raises:
        ConfigError: a variable does not parse; the variable is the key.
    """
    values: dict[str, object] = {}
    for field in msgspec.structs.fields(cls):
        var = env_var(field.name)
        raw = env.get(var, "").strip()
        if not raw:
            continue
        value: object = raw
        if field.name == "peers":
            try:
                value = parse_peer_urls(raw)
            except InvalidRecord as exc:
                raise ConfigError(var, str(exc)) from None
        elif field.type == list[str]:
            value = [part.strip() for part in raw.split(",") if part.strip()]
        try:
            values[field.name] = msgspec.convert(value, field.type, strict=False)
        except msgspec.ValidationError as exc:
            raise ConfigError(var, _reason(str(exc))) from None
    return values


def convert(values: Mapping[str, object], cls: type[_S]) -> _S:
    """Typed settings from plain values; the error names the offending key.

    Raises:
        ConfigError: a value has the wrong type or a key is unknown.
    """
    try:
        return msgspec.convert(values, cls)
    except msgspec.ValidationError as exc:
        text = str(exc)
        where = _WHERE_RE.search(text)
        key = where.group(1) if where else "config"
        if key == "config" and "unknown field" in text.lower():
            found = re.search(r"`(.+?)`", text)
            key = found.group(1) if found else key
        raise ConfigError(key, _choices(cls, key) or _reason(text)) from None


def _choices(cls: type, key: str) -> str | None:
    """For a setting with fixed choices (an Enum), the reason lists them."""
    if not issubclass(cls, msgspec.Struct):
        return None
    for field in msgspec.structs.fields(cls):
        if field.name == key and isinstance(field.type, type) and issubclass(field.type, Enum):
            names = [str(member.value) for member in field.type]
            return f"use {', '.join(names[:-1])} or {names[-1]}"
    return None


_WHERE_RE: Final = re.compile(r" - at `\$\.?(.+?)`$")


def _reason(text: str) -> str:
    """msgspec's message without its ``- at `$.x``` suffix (the key says where)."""
    return _WHERE_RE.sub("", text)
