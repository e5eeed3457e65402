"""Which networks the mDNS backend may talk to, and the ingress filter that enforces it.

Why: zeroconf binds its listen socket to ``0.0.0.0:5353`` even when told to use
only some interfaces, so a datagram from any LAN address reaches it. A legacy
unicast query (source port != 5353) or a QU question is answered by *unicast to
the packet's source* — from a node that was told to stay on 127.0.0.1 or inside
a test namespace, that would be a packet to the outside world.

How: after zeroconf has created its sockets we swap the asyncio protocol of
every reader transport (`transport.set_protocol`, public asyncio API) for a
`SourceFilter` that drops any datagram whose source IPv4 is not inside the
network of one of the chosen interfaces, and hands everything else to
zeroconf's own `AsyncListener` untouched. Zeroconf only ever replies to sources
it has heard from, and otherwise multicasts on the chosen interfaces, so with
the filter in place nothing we send can leave those networks.

Networks come from the kernel's interface table (`ifaddr`, a zeroconf
dependency; it reads getifaddrs and sends nothing). An address not found there
falls back to its /24 (127.x always to 127.0.0.0/8).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Final

import ifaddr

from ._txt import check_ipv4
from .errors import InvalidRecord

log: Final = logging.getLogger("discovery.mdns")

_LOOPBACK: Final = ipaddress.IPv4Network("127.0.0.0/8")
_FALLBACK_PREFIX: Final[int] = 24


def check_interfaces(interfaces: Sequence[str]) -> tuple[str, ...]:
    """Validate explicit IPv4 interface addresses (at least one, no wildcards)."""
    if isinstance(interfaces, str):
        raise InvalidRecord("interfaces must be a sequence of IPv4 addresses, not one string")
    if not interfaces:
        raise InvalidRecord("at least one interface address is required")
    checked: dict[str, None] = {}
    for address in interfaces:
        checked[str(check_ipv4(address))] = None
    return tuple(checked)


def interface_networks(interfaces: Iterable[str]) -> tuple[ipaddress.IPv4Network, ...]:
    """The IPv4 network each interface address lives in, from the kernel's table."""
    prefixes: dict[str, int] = {}
    try:
        for adapter in ifaddr.get_adapters():
            for entry in adapter.ips:
                if isinstance(entry.ip, str):
                    prefixes.setdefault(entry.ip, entry.network_prefix)
    except OSError as exc:  # pragma: no cover - getifaddrs failing is exotic
        log.warning("cannot read interface table (%s); assuming /%d", exc, _FALLBACK_PREFIX)
    networks: dict[ipaddress.IPv4Network, None] = {}
    for address in interfaces:
        ip = ipaddress.IPv4Address(address)
        if ip in _LOOPBACK:
            networks[_LOOPBACK] = None
            continue
        prefix = prefixes.get(address)
        if prefix is None:
            log.warning("interface %s not found; assuming its network is /%d", ip, _FALLBACK_PREFIX)
            prefix = _FALLBACK_PREFIX
        networks[ipaddress.IPv4Network(f"{ip}/{prefix}", strict=False)] = None
    return tuple(networks)


class NetworkSet:
    """Fast membership test of an IPv4 string in a few networks."""

    __slots__ = ("_nets", "networks")

    def __init__(self, networks: Sequence[ipaddress.IPv4Network]) -> None:
        self.networks = tuple(networks)
        self._nets = tuple((int(n.network_address), int(n.netmask)) for n in self.networks)

    def __contains__(self, address: object) -> bool:
        if not isinstance(address, str):
            return False
        try:
            value = int(ipaddress.IPv4Address(address))
        except ValueError:
            return False
        return any(value & mask == net for net, mask in self._nets)


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
