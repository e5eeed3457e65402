"""mDNS / DNS-SD backend on zeroconf's asyncio API.

Why it looks like this:

* **Explicit interfaces only.** zeroconf is always built with the given
  addresses and the IP version they call for (``V4Only``, ``V6Only``, or
  ``All`` for a mix: A records on IPv4 interfaces, AAAA on IPv6 ones, queries
  to 224.0.0.251 and ff02::fb); there is no "all interfaces" mode, so a test
  on 127.0.0.1 cannot leak onto the LAN.
* **IPv6 link-local endpoints** (``tcp://[fe80::1%eth0]:port``) carry the
  announcer's zone, its interface name, which means nothing here: with one
  link-local interface of our own we dial the address on our zone; with more
  we keep only endpoints whose zone names one of ours.
* **Unicast safety.** zeroconf's listen socket is bound to 0.0.0.0:5353 (or [::]:5353) and
  answers legacy/QU queries by unicast to the sender. Before anything is
  registered we put a source-address filter in front of every zeroconf reader
  transport (`_netguard.SourceFilter`, via asyncio's ``transport.set_protocol``):
  datagrams from outside the chosen interfaces' networks are dropped (counted
  as ``dropped["foreign_source"]``) before zeroconf sees them, so it never
  learns an outside address to answer. Standard multicast and legacy unicast
  queries from inside those networks are answered as usual.
* **No probing.** Ids are unique and the host name is derived from the id
  (``zm-<id[:12]>.local.``), so we register with ``cooperating_responders=True``:
  zeroconf 0.154 returns from `async_check_service` before probing (which
  would cost a 150-250 ms random delay plus three probes 500 ms apart, ~1.2 s)
  and announces at once. A running browser sees a new node in a few
  milliseconds on loopback (see tests/discovery/test_mdns.py latency test).
* **Known gap.** Sockets zeroconf would add later through
  `async_update_interfaces` would not be filtered; we never call it.
* **Strangers are untrusted.** Each resolved record goes through `_txt`; records
  of another mesh, malformed TXT, endpoints outside our interfaces' networks
  and our own record are dropped and counted in `dropped` by reason, logged as
  a warning once per reason and instance, then at debug level. Nothing raises
  into zeroconf's callbacks: they only schedule our own tasks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Final

from zeroconf import DNSQuestionType, IPVersion, ServiceListener, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from ._base import EventSink
from ._events import PeerFound, PeerGone, PeerInfo
from ._netguard import (
    NetworkSet,
    check_interfaces,
    install_source_filter,
    interface_networks,
    zone_name,
)
from ._txt import check_mesh, mesh_of, peer_from_txt, split_tcp_url, txt_from_peer
from .errors import DiscoveryError, InvalidRecord

SERVICE_TYPE: Final[str] = "_zeromesh._tcp.local."

log: Final = logging.getLogger("discovery.mdns")
_EXPECTED: Final = frozenset({"self", "other_mesh"})

_RESOLVE_TIMEOUT: Final[float] = 1.0
_RESOLVE_ATTEMPTS: Final[int] = 3
"""Quick attempts at resolving a name; after those, attempts back off up to:"""
_RESOLVE_BACKOFF_MAX: Final[float] = 30.0
_CLOSE_TIMEOUT: Final[float] = 2.0
_MAX_WARNED: Final[int] = 4096
_INSTANCE_NAME_BYTES: Final[int] = 63 - 9  # room for "-<id[:8]>"


def instance_label(me: PeerInfo) -> str:
    """``<name>-<id[:8]>``, dots replaced and the name cut to fit one DNS label."""
    name = me.name.replace(".", "-")
    encoded = name.encode("utf-8")[:_INSTANCE_NAME_BYTES]
    name = encoded.decode("utf-8", "ignore")
    return f"{name}-{me.id[:8]}"


def server_name(node_id: str) -> str:
    """Host name unique to the node id, so two nodes on one machine never clash."""
    return f"zm-{node_id[:12]}.local."


class MdnsDiscovery:
    """Announces this node with mDNS and reports peers of the same mesh."""

    def __init__(self, interfaces: Sequence[str], *, mesh: str) -> None:
        self._interfaces = check_interfaces(interfaces)
        self._mesh = check_mesh(mesh)
        self.dropped: dict[str, int] = {}
        """Records and datagrams dropped, by reason."""
        self._aiozc: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._info: AsyncServiceInfo | None = None
        self._me: PeerInfo | None = None
        self._sink: EventSink | None = None
        self._allowed = NetworkSet(())
        self._known: dict[str, PeerInfo] = {}
        self._resolving: dict[str, asyncio.Task[None]] = {}
        self._background: set[asyncio.Task[object]] = set()
        self._warned: set[tuple[str, str]] = set()
        self._closed = False

    @property
    def interfaces(self) -> tuple[str, ...]:
        return self._interfaces

    @property
    def mesh(self) -> str:
        return self._mesh

    @property
    def peers(self) -> tuple[PeerInfo, ...]:
        """Peers currently announced (and reported), in discovery order."""
        return tuple(self._known.values())

    async def start(self, me: PeerInfo, sink: EventSink) -> None:
        """Bind zeroconf on the chosen interfaces, browse, and announce `me`."""
        if self._aiozc is not None or self._closed:
            raise RuntimeError("MdnsDiscovery can be started once")
        info = self._service_info(me)
        self._allowed = NetworkSet(interface_networks(self._interfaces))
        self._me, self._sink = me, sink
        aiozc = AsyncZeroconf(interfaces=list(self._interfaces),
                              ip_version=_ip_version(self._interfaces))
        self._aiozc = aiozc
        try:
            await aiozc.zeroconf.async_wait_for_start()
            engine = aiozc.zeroconf.engine
            install_source_filter(
                (reader.transport for reader in engine.readers), self._allowed, self._drop_source
            )
            self._browser = AsyncServiceBrowser(
                aiozc.zeroconf,
                SERVICE_TYPE,
                listener=_Listener(self._on_seen, self._on_removed),
                question_type=DNSQuestionType.QM,
            )
            announced = await aiozc.async_register_service(info, cooperating_responders=True)
        except BaseException:
            await self.aclose()
            raise
        self._info = info
        self._keep(announced)

    async def update(self, me: PeerInfo) -> None:
        """Re-announce with new connect info (same id); peers get a `PeerFound`."""
        if self._aiozc is None or self._info is None or self._me is None or self._closed:
            raise RuntimeError("MdnsDiscovery is not running")
        if me.id != self._me.id:
            raise InvalidRecord("update() cannot change the node id")
        info = self._service_info(me)
        if info.name == self._info.name:
            announced = await self._aiozc.async_update_service(info)
        else:
            await self._aiozc.async_unregister_service(self._info)
            announced = await self._aiozc.async_register_service(info, cooperating_responders=True)
        self._me, self._info = me, info
        self._keep(announced)

    async def aclose(self) -> None:
        """Send goodbyes, stop browsing and close zeroconf; idempotent, bounded in time."""
        if self._closed:
            return
        self._closed = True
        tasks = [*self._resolving.values(), *self._background]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._resolving.clear()
        self._background.clear()
        aiozc, self._aiozc = self._aiozc, None
        if aiozc is None:
            return
        try:
            async with asyncio.timeout(_CLOSE_TIMEOUT):
                if self._browser is not None:
                    await self._browser.async_cancel()
                # One goodbye, sent now: zeroconf's own close sends three, 125 ms apart,
                # and every node's close (each short CLI command's too) waited 250 ms for
                # them. Connected peers hear of our leaving on the mesh itself anyway.
                zc = aiozc.zeroconf
                goodbye = zc.generate_unregister_all_services()
                if goodbye is not None:
                    zc.async_send(goodbye)
                await aiozc.async_close()  # (no service left to say goodbye for) sockets
        except TimeoutError:
            log.warning("zeroconf did not close within %.1f s", _CLOSE_TIMEOUT)
        except Exception:
            log.exception("error while closing zeroconf")
        self._browser = None

    # -- internals -------------------------------------------------------------

    def _service_info(self, me: PeerInfo) -> AsyncServiceInfo:
        if me.mesh != self._mesh:
            raise InvalidRecord(f"node mesh {me.mesh!r} differs from backend mesh {self._mesh!r}")
        props = txt_from_peer(me)
        _host, port = split_tcp_url(me.endpoints[0])
        return AsyncServiceInfo(
            SERVICE_TYPE,
            f"{instance_label(me)}.{SERVICE_TYPE}",
            port=port,
            properties=props,
            server=server_name(me.id),
            parsed_addresses=[address.partition("%")[0] for address in self._interfaces],
        )

    def _keep(self, awaitable: Awaitable[object]) -> None:
        task: asyncio.Task[object] = asyncio.ensure_future(awaitable)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _drop(self, reason: str, instance: str, detail: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1
        key = (reason, instance)
        # Our own record and other meshes sharing the LAN are normal, not suspicious.
        if reason not in _EXPECTED and key not in self._warned and len(self._warned) < _MAX_WARNED:
            self._warned.add(key)
            log.warning("dropping mDNS record %s (%s): %s", instance, reason, detail)
        else:
            log.debug("dropping mDNS record %s (%s): %s", instance, reason, detail)

    def _drop_source(self, source: str) -> None:
        self._drop("foreign_source", source, "datagram from outside the chosen networks")

    def _emit(self, event: PeerFound | PeerGone) -> None:
        if self._sink is None or self._closed:
            return
        try:
            self._sink(event)
        except Exception:
            log.exception("discovery event sink failed on %r", event)

    def _on_seen(self, name: str) -> None:
        """add/update callback from zeroconf: (re)resolve in a task of our own."""
        if self._closed:
            return
        previous = self._resolving.pop(name, None)
        if previous is not None:
            previous.cancel()
        task = asyncio.get_running_loop().create_task(self._resolve(name))
        self._resolving[name] = task
        task.add_done_callback(lambda done: self._forget_task(name, done))

    def _forget_task(self, name: str, task: asyncio.Task[None]) -> None:
        if self._resolving.get(name) is task:
            del self._resolving[name]

    def _on_removed(self, name: str) -> None:
        task = self._resolving.pop(name, None)
        if task is not None:
            task.cancel()
        info = self._known.pop(name, None)
        if info is not None:
            self._emit(PeerGone(info))

    async def _resolve(self, name: str) -> None:
        try:
            await self._resolve_and_report(name)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("unexpected error resolving %s", name)

    async def _resolve_and_report(self, name: str) -> None:
        aiozc = self._aiozc
        if aiozc is None:
            return
        info: AsyncServiceInfo | None = None
        attempt = 0
        while info is None:
            candidate = AsyncServiceInfo(SERVICE_TYPE, name)
            if await candidate.async_request(
                aiozc.zeroconf, _RESOLVE_TIMEOUT * 1000, question_type=DNSQuestionType.QM
            ):
                info = candidate
                break
            attempt += 1
            if attempt >= _RESOLVE_ATTEMPTS:
                # still browsed, so still announced: a busy responder or lost datagrams;
                # asked again later, ever more rarely (the task ends when the name goes)
                delay = min(_RESOLVE_TIMEOUT * 2 ** (attempt - _RESOLVE_ATTEMPTS + 1),
                            _RESOLVE_BACKOFF_MAX)
                log.debug("could not resolve %s (%d attempts); again in %g s", name, attempt,
                          delay)
                await asyncio.sleep(delay)
        peer = self._check(name, info)
        if peer is None:
            return
        old = self._known.get(name)
        if old is not None and old.id != peer.id:
            self._emit(PeerGone(old))
        self._known[name] = peer
        if peer != old:
            self._emit(PeerFound(peer))

    def _check(self, name: str, info: AsyncServiceInfo) -> PeerInfo | None:
        props = info.properties
        mesh = mesh_of(props)
        if mesh != self._mesh:
            self._drop("other_mesh", name, f"mesh {mesh!r}")
            return None
        try:
            peer = peer_from_txt(props, source="mdns")
        except DiscoveryError as exc:
            self._drop("bad_txt", name, str(exc))
            return None
        if self._me is not None and peer.id == self._me.id:
            self._drop("self", name, "our own announcement")
            return None
        heard_on = _heard_on(info)
        routable = tuple(ep for ep in (self._dialable(ep, heard_on) for ep in peer.endpoints)
                         if ep is not None)
        if not routable:
            self._drop("unroutable", name, f"no endpoint in {self._allowed.networks}")
            return None
        if routable != peer.endpoints:
            log.debug("%s: ignoring endpoints outside our networks", name)
            peer = PeerInfo(
                id=peer.id,
                name=peer.name,
                mesh=peer.mesh,
                version=peer.version,
                endpoints=routable,
                key=peer.key,
                source=peer.source,
            )
        return peer

    def _dialable(self, endpoint: str, heard_on: dict[str, str]) -> str | None:
        """`endpoint` as we would dial it (a link-local one on our zone: the one its
        AAAA record came in on, `heard_on`, if we have several), or None if it is
        outside our interfaces' networks."""
        host, port = split_tcp_url(endpoint)
        address, zoned, _ = host.partition("%")
        zones = self._allowed.zones
        zone = zones[0] if len(zones) == 1 else heard_on.get(address)
        if zoned and zone is not None:
            host = f"{address}%{zone}"
            endpoint = f"tcp://[{host}]:{port}"
        return endpoint if host in self._allowed else None

    def __repr__(self) -> str:
        return f"MdnsDiscovery({list(self._interfaces)!r}, mesh={self._mesh!r})"


def _heard_on(info: AsyncServiceInfo) -> dict[str, str]:
    """Each link-local address of the record -> the zone (interface name) its AAAA
    record came in on: a host on several links has no other way to tell which is the
    peer's (its announced zone is its own interface's name)."""
    heard: dict[str, str] = {}
    for scoped in info.parsed_scoped_addresses(IPVersion.V6Only):
        address, _, index = scoped.partition("%")
        if index.isdigit():
            heard[address] = zone_name(int(index))
    return heard


def _ip_version(interfaces: Sequence[str]) -> IPVersion:
    """What zeroconf must speak on these interfaces: IPv4, IPv6 or both."""
    v6 = sum(":" in address for address in interfaces)
    if v6 == 0:
        return IPVersion.V4Only
    return IPVersion.V6Only if v6 == len(interfaces) else IPVersion.All


class _Listener(ServiceListener):
    """zeroconf's callback surface; runs on the loop and only schedules work."""

    def __init__(self, on_seen: Callable[[str], None],
                 on_removed: Callable[[str], None]) -> None:
        self._on_seen = on_seen
        self._on_removed = on_removed

    def add_service(self, zc: Zeroconf, type_: str, name: str) -> None:
        with _never_raise(name):
            self._on_seen(name)

    def update_service(self, zc: Zeroconf, type_: str, name: str) -> None:
        with _never_raise(name):
            self._on_seen(name)

    def remove_service(self, zc: Zeroconf, type_: str, name: str) -> None:
        with _never_raise(name):
            self._on_removed(name)


@contextlib.contextmanager
def _never_raise(name: str) -> Iterator[None]:
    try:
        yield
    except Exception:
        log.exception("error handling mDNS event for %s", name)
