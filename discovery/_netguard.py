"""Which networks the mDNS backend may talk to, and the ingress filter that enforces it.

Why: zeroconf binds its listen socket to ``0.0.0.0:5353`` even when told to use
only some interfaces, so a datagram from any LAN address reaches it. A legacy
unicast query (source port != 5353) or a QU question is answered by *unicast to
the packet's source* — from a node that was told to stay on 127.0.0.1 or inside
a test namespace, that would be a packet to the outside world.

How: after zeroconf has created its sockets we swap the asyncio protocol of
every reader transport (`transport.set_protocol`, public asyncio API) for a
`SourceFilter` that drops any datagram whose source address is not inside the
network of one of the chosen interfaces (an IPv6 link-local source also on
the same link: its zone must match), and hands everything else to
zeroconf's own `AsyncListener` untouched. Zeroconf only ever replies to sources
it has heard from, and otherwise multicasts on the chosen interfaces, so with
the filter in place nothing we send can leave those networks.

Networks come from the kernel's interface table (`ifaddr`, a zeroconf
dependency; it reads getifaddrs and sends nothing). An address not found there
falls back to its /24 or /64 (127.x always to 127.0.0.0/8, ::1 to ::1/128).
IPv4 sources on zeroconf's dual-stack socket (``IPVersion.All``) arrive
IPv4-mapped (``::ffff:10.0.0.5``) and are judged as the IPv4 address.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import logging
import socket
from collections.abc import Callable, Iterable, Sequence
from typing import Final

import ifaddr

from ._txt import check_ip
from .errors import InvalidRecord

log: Final = logging.getLogger("discovery.mdns")

_LOOPBACK: Final = ipaddress.IPv4Network("127.0.0.0/8")
_FALLBACK_PREFIX: Final[dict[int, int]] = {4: 24, 6: 64}
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def check_interfaces(interfaces: Sequence[str]) -> tuple[str, ...]:
    """Validate explicit IPv4/IPv6 interface addresses (at least one, no wildcards);
    returns them in canonical form (IPv6 compressed, zone kept)."""
    if isinstance(interfaces, str):
        raise InvalidRecord("interfaces must be a sequence of IP addresses, not one string")
    if not interfaces:
        raise InvalidRecord("at least one interface address is required")
    checked: dict[str, None] = {}
    for address in interfaces:
        checked[str(check_ip(address))] = None
    return tuple(checked)


def interface_networks(interfaces: Iterable[str]) -> tuple[Network, ...]:
    """The network each interface address lives in, from the kernel's table (a
    link-local one keeps the address's zone: ``fe80::%eth0/64``)."""
    prefixes: dict[str, int] = {}
    try:
        for adapter in ifaddr.get_adapters():
            for entry in adapter.ips:
                key = entry.ip if isinstance(entry.ip, str) else entry.ip[0].partition("%")[0]
                prefixes.setdefault(key, entry.network_prefix)
    except OSError as exc:  # pragma: no cover - getifaddrs failing is exotic
        log.warning("cannot read interface table (%s); assuming /%d or /%d", exc,
                    _FALLBACK_PREFIX[4], _FALLBACK_PREFIX[6])
    networks: dict[Network, None] = {}
    for address in interfaces:
        ip = ipaddress.ip_address(address)
        if ip in _LOOPBACK or ip.is_loopback:
            networks[ipaddress.ip_network(f"{ip}/{ip.max_prefixlen}") if ip.version == 6
                     else _LOOPBACK] = None
            continue
        bare, _, zone = address.partition("%")
        prefix = prefixes.get(bare)
        if prefix is None:
            prefix = _FALLBACK_PREFIX[ip.version]
            log.warning("interface %s not found; assuming its network is /%d", ip, prefix)
        net = ipaddress.ip_network(f"{bare}/{prefix}", strict=False)
        if zone:  # as datagrams name it: an interface name, not an index
            with contextlib.suppress(OSError, ValueError):
                zone = socket.if_indextoname(int(zone)) if zone.isdigit() else zone
            net = ipaddress.IPv6Network(f"{net.network_address}%{zone}/{prefix}")
        networks[net] = None
    return tuple(networks)


class NetworkSet:
    """Membership test of an address string (IPv4, IPv6, IPv4-mapped, zoned) in a few
    networks; a zoned network (link-local) takes only sources of that zone."""

    __slots__ = ("_nets", "networks", "zones")

    def __init__(self, networks: Sequence[Network]) -> None:
        self.networks = tuple(networks)
        self._nets = tuple(
            (n, n.network_address.scope_id if isinstance(n, ipaddress.IPv6Network) else None)
            for n in self.networks)
        self.zones: tuple[str, ...] = tuple(dict.fromkeys(z for _, z in self._nets if z))
        """The zones (interface names) of the link-local networks."""

    def __contains__(self, address: object) -> bool:
        if not isinstance(address, str):
            return False
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        zone = None
        if isinstance(ip, ipaddress.IPv6Address):
            zone = ip.scope_id
            ip = ip.ipv4_mapped or ip
        return any(ip in net and (want is None or want == zone) for net, want in self._nets)


class SourceFilter(asyncio.DatagramProtocol):
    """Wraps zeroconf's datagram protocol; passes on only datagrams from allowed sources."""

    def __init__(
        self,
        inner: asyncio.BaseProtocol,
        allowed: NetworkSet,
        on_drop: Callable[[str], None],
    ) -> None:
        self._inner = inner
        self._allowed = allowed
        self._on_drop = on_drop

    @property
    def inner(self) -> asyncio.BaseProtocol:
        return self._inner

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        source = addr[0] if addr else None
        if len(addr) > 3 and addr[3] and "%" not in str(source):
            source = f"{source}%{zone_name(int(addr[3]))}"  # IPv6 link-local: zone as an index
        if source not in self._allowed:
            self._on_drop(str(source))
            return
        self._inner.datagram_received(data, addr)  # type: ignore[attr-defined]

    def error_received(self, exc: Exception) -> None:
        self._inner.error_received(exc)  # type: ignore[attr-defined]

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._inner.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self._inner.connection_lost(exc)


@functools.lru_cache(maxsize=64)
def zone_name(index: int) -> str:
    """An interface index as a zone name (``eth0``), as the networks name zones."""
    try:
        return socket.if_indextoname(index)
    except OSError:
        return str(index)


def install_source_filter(
    transports: Iterable[asyncio.BaseTransport],
    allowed: NetworkSet,
    on_drop: Callable[[str], None],
) -> int:
    """Put a `SourceFilter` in front of each transport's protocol; returns how many."""
    count = 0
    for transport in transports:
        protocol = transport.get_protocol()
        if isinstance(protocol, SourceFilter):
            continue
        transport.set_protocol(SourceFilter(protocol, allowed, on_drop))
        count += 1
    return count
