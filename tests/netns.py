"""A throwaway LAN of Linux network namespaces for multi-host tests (root only).

`make_lan(n)` builds ``n`` "hosts" plugged into one Ethernet bridge::

    netns zm<hex>-br:   br0 (bridge, mcast_snooping 0, STP off)
                         ├── h1 ──veth── eth0 in netns zm<hex>-h1  10.77.<b>.1/24
                         ├── h2 ──veth── eth0 in netns zm<hex>-h2  10.77.<b>.2/24
                         └── ...

Everything lives in namespaces this module creates: the bridge has its own
namespace too, so the root namespace's interfaces, routes and addresses are
never touched, and nothing is reachable from outside the LAN. ``<hex>`` is
random per LAN and ``<b>`` is a random byte, so concurrent runs never collide.

Each host has ``lo`` up, ``eth0`` up with MULTICAST, and a route
``224.0.0.0/4 dev eth0``. That route matters: a host namespace has no default
route, and without it joining a group with ``INADDR_ANY`` (what zeroconf and
most mDNS code do) fails with ENODEV and sending to 224.0.0.251 fails with
ENETUNREACH. The bridge has multicast snooping off, so every multicast frame
is flooded to every port (mDNS must cross it whatever IGMP state exists).

``make_lan(n, ipv6=True)`` also gives each ``eth0`` a ULA ``fd77::<b>:<i>/64``
(`Host.ip6`) and a link-local ``fe80::77:<i>/64`` (`Host.ll6`, use it as
``fe80::77:<i>%eth0``) instead of the kernel's EUI-64 one, both added ``nodad``
so they are usable at once (duplicate address detection would hold them
tentative for a second or more, and a tentative address cannot be bound).
IPv6 multicast (ff02::fb) needs no route: the kernel adds ff00::/8 on every
IPv6 interface.

Processes started with `Host.popen` / `Host.run` are tracked. `Lan.close()`
SIGKILLs the process group of each one (each runs in its own session, so the
group is exactly what we started plus its children), then anything still
inside our own namespaces, then deletes every namespace. It is idempotent and
keeps going past individual failures. Every command is bounded by a timeout.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

NETNS_PREFIX: Final[str] = "zm"
"""Every namespace this module creates is named ``zm<6 hex>-<role>``."""
_IP_TIMEOUT: Final[float] = 10.0
_KILL_WAIT: Final[float] = 5.0
_BRIDGE: Final[str] = "br0"
_HOST_IF: Final[str] = "eth0"
_MCAST_NET: Final[str] = "224.0.0.0/4"
_STATIC_NEIGHBOURS_FROM: Final[int] = 12
"""Hosts on a LAN from which they get static neighbour entries (see
`Lan._add_static_neighbours`); smaller LANs resolve addresses with ARP as a real one does."""

_created: set[str] = set()
"""Every namespace name created in this process (for the session leak check)."""
_created_lock = threading.Lock()


class NetnsError(RuntimeError):
    """A namespace command failed; the message has the command and its stderr."""


def _ip(*args: str, timeout: float = _IP_TIMEOUT, check: bool = True,
        stdin: str | None = None) -> str:
    """Runs ``ip <args>`` (bounded), ``stdin`` as its input, and returns stdout."""
    argv = ["ip", *args]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                              check=False, input=stdin)
    except subprocess.TimeoutExpired as exc:
        raise NetnsError(f"{' '.join(argv)}: timed out after {timeout} s") from exc
    if check and done.returncode != 0:
        raise NetnsError(f"{' '.join(argv)}: exit {done.returncode}: {done.stderr.strip()}")
    return done.stdout


def _mac(subnet_byte: int, index: int) -> str:
    """A host's eth0 address: locally administered, fixed by its place on the LAN."""
    return f"02:77:{subnet_byte:02x}:00:{index >> 8:02x}:{index & 0xFF:02x}"


def list_netns() -> set[str]:
    """Names of every network namespace registered under /run/netns."""
    out = _ip("netns", "list")
    # Lines look like "name" or "name (id: 3)".
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def created_netns() -> set[str]:
    """Every namespace name this process has created (whether or not it still exists)."""
    with _created_lock:
        return set(_created)


def netns_unavailable_reason() -> str | None:
    """Why a LAN cannot be built here (not root, no ``ip``, no netns/veth/bridge), or None."""
    if not sys.platform.startswith("linux"):
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "`ip` (iproute2) is not installed"
    probe = f"{NETNS_PREFIX}{secrets.token_hex(3)}-probe"
    try:
        _ip("netns", "add", probe)
    except NetnsError as exc:
        return f"`ip netns add` is not permitted here: {exc}"
    try:
        _ip("-n", probe, "link", "add", "zmprobebr", "type", "bridge")
        _ip("-n", probe, "link", "add", "zmprobe0", "type", "veth", "peer", "name", "zmprobe1")
    except NetnsError as exc:
        return f"bridge/veth not available: {exc}"
    finally:
        with contextlib.suppress(NetnsError):
            _ip("netns", "del", probe)
    return None


@dataclass(eq=False)
class Host:
    """One host on the LAN: a network namespace with one interface, ``eth0``."""

    lan: Lan = field(repr=False)
    index: int
    """1-based position on the LAN; also the last byte of `ip`."""
    name: str
    """Short name, ``h1``, ``h2``, ...; also the bridge-side interface name."""
    netns: str
    """Namespace name, for ``ip netns exec``."""
    ip: str
    """IPv4 address of ``eth0`` (no prefix length)."""
    interface: str = _HOST_IF
    ip6: str | None = None
    """ULA IPv6 address of ``eth0`` (a LAN built with ``ipv6=True``), else None."""
    ll6: str | None = None
    """Link-local IPv6 address of ``eth0`` with its zone, ``fe80::77:<i>%eth0``."""

    def _argv(self, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.netns, *argv]

    def _env(self, env: Mapping[str, str] | None) -> dict[str, str]:
        if env is not None:
            return dict(env)
        merged = dict(os.environ)
        merged["ZEROMESH_INTERFACES"] = self.ip
        return merged

    def popen(
        self, argv: Sequence[str], *, env: Mapping[str, str] | None = None, **kw: Any
    ) -> subprocess.Popen[Any]:
        """Starts ``argv`` inside this host's namespace; `Lan.close` will SIGKILL it.

        Args:
            argv: Program and arguments (``ip netns exec`` execs it, so the Popen's
                pid is the program itself).
            env: Environment for the child. Default: this process's environment
                with ``ZEROMESH_INTERFACES`` set to this host's `ip` (not the
                127.0.0.1 that the test process itself uses).
            **kw: Passed to `subprocess.Popen` (``stdout=PIPE``, ``text=True``...).
                ``start_new_session`` is forced on so teardown can kill the group.
        """
        kw["start_new_session"] = True
        proc: subprocess.Popen[Any] = subprocess.Popen(self._argv(argv), env=self._env(env), **kw)
        self.lan.track(proc)
        return proc

    def run(
        self,
        argv: Sequence[str],
        timeout: float,
        *,
        check: bool = False,
        input: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Runs ``argv`` in this namespace to completion, text in/out, bounded.

        Raises:
            subprocess.TimeoutExpired: After killing the process group.
            subprocess.CalledProcessError: If ``check`` and the exit status is not 0.
        """
        proc = self.popen(
            argv,
            env=env,
            stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            out, err = proc.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            proc.communicate(timeout=_KILL_WAIT)
            raise
        done = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
        if check:
            done.check_returncode()
        return done

    def python(self, code: str, timeout: float, **kw: Any) -> subprocess.CompletedProcess[str]:
        """Runs ``python -c code`` (this interpreter) in the namespace; see `run`."""
        return self.run([sys.executable, "-c", code], timeout, **kw)

    def ping(self, ip: str, *, timeout: float = 1.0) -> bool:
        """Tells whether one ICMP echo to ``ip`` is answered within ``timeout``."""
        if shutil.which("ping") is not None:
            argv = ["ping", "-n", "-q", "-c1", f"-W{max(1, round(timeout))}", ip]
            try:
                return self.run(argv, timeout + 5.0).returncode == 0
            except subprocess.TimeoutExpired:
                return False
        # No ping binary: a raw ICMP echo from Python (we are root anyway).
        code = _PY_PING.format(ip=ip, timeout=timeout)
        try:
            return self.python(code, timeout + 5.0).returncode == 0
        except subprocess.TimeoutExpired:
            return False

    def cut(self, *, silent: bool = False) -> None:
        """Unplugs this host from the bridge until `restore`.

        Args:
            silent: False (default) sets the bridge-side veth down, like pulling
                the cable: ``eth0`` loses carrier and local sends may fail fast.
                True disables the bridge port instead: ``eth0`` stays up and
                packets just vanish, like a dead switch port or a frozen peer.
        """
        br = self.lan.bridge_netns
        if silent:
            _bridge("-n", br, "link", "set", "dev", self.name, "state", "0")
        else:
            _ip("-n", br, "link", "set", self.name, "down")

    def restore(self) -> None:
        """Plugs this host back in (undoes either kind of `cut`).

        Also forgets failed or half-done ARP resolutions on every host: a peer
        that tried to reach this host while it was cut holds an INCOMPLETE or
        FAILED neighbour entry, and a packet queued on an INCOMPLETE entry whose
        last probe was already sent is dropped when it fails. Without this, the
        first second or so after `restore` is flaky (seen in practice).
        """
        br = self.lan.bridge_netns
        _ip("-n", br, "link", "set", self.name, "up")
        _bridge("-n", br, "link", "set", "dev", self.name, "state", "3")  # forwarding
        for host in self.lan.hosts:
            for state in ("incomplete", "failed"):
                _ip("-n", host.netns, "neigh", "flush", "dev", host.interface, "nud", state)


def _bridge(*args: str) -> None:
    argv = ["bridge", *args]
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=_IP_TIMEOUT, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise NetnsError(f"{' '.join(argv)}: timed out") from exc
    if done.returncode != 0:
        raise NetnsError(f"{' '.join(argv)}: exit {done.returncode}: {done.stderr.strip()}")


def _kill_group(proc: subprocess.Popen[Any]) -> None:
    """SIGKILLs the session/group we created for ``proc`` (pgid == its pid)."""
    # The group outlives its leader while any member lives, and its id cannot be
    # reused meanwhile, so this only ever hits what we started and its children.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()


class Lan:
    """Hosts on one bridge; build it with `make_lan`, tear it down with `close`."""

    def __init__(self, n: int, *, ipv6: bool = False, interfaces: Sequence[str] = ()) -> None:
        if not 1 <= n <= 250:
            raise ValueError(f"a LAN has 1..250 hosts, not {n}")
        if len(interfaces) > n or not all(0 < len(name) <= 15 for name in interfaces):
            raise ValueError(f"interface names {interfaces!r}: at most {n}, 1-15 characters")
        self.n: Final[int] = n
        self.ipv6: Final[bool] = ipv6
        self.interfaces: Final[tuple[str, ...]] = tuple(interfaces)
        """Host i's interface name (``eth0`` past the end): hosts whose links are named
        differently (``eth0`` here, ``enp3s0`` there) as on a real LAN."""
        self.tag: Final[str] = f"{NETNS_PREFIX}{secrets.token_hex(3)}"
        """Per-LAN prefix of every namespace name, e.g. ``zm3fa91c``."""
        self.subnet_byte: Final[int] = secrets.randbelow(254) + 1
        self.bridge_netns: Final[str] = f"{self.tag}-br"
        self.hosts: list[Host] = []
        self._procs: list[subprocess.Popen[Any]] = []
        self._namespaces: list[str] = []
        self._lock = threading.Lock()
        self._closed = False

    @property
    def subnet(self) -> str:
        """The LAN's IPv4 subnet, ``10.77.<b>.0/24``."""
        return f"10.77.{self.subnet_byte}.0/24"

    @property
    def subnet6(self) -> str | None:
        """The LAN's IPv6 subnet, ``fd77::/64`` (None without ``ipv6``)."""
        return "fd77::/64" if self.ipv6 else None

    @property
    def namespaces(self) -> list[str]:
        """Every namespace this LAN created (bridge first)."""
        return list(self._namespaces)

    @property
    def processes(self) -> list[subprocess.Popen[Any]]:
        """Every process started on any host so far."""
        with self._lock:
            return list(self._procs)

    def __getitem__(self, index: int) -> Host:
        return self.hosts[index]

    def __iter__(self) -> Iterator[Host]:
        return iter(self.hosts)

    def __len__(self) -> int:
        return len(self.hosts)

    def __repr__(self) -> str:
        return f"<Lan {self.tag} {self.subnet} hosts={[h.name for h in self.hosts]}>"

    def track(self, proc: subprocess.Popen[Any]) -> None:
        """Kill `proc` (its process group) when the LAN closes; if it is closed already, now,
        and raise NetnsError."""
        with self._lock:
            if self._closed:
                _kill_group(proc)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=_KILL_WAIT)
                raise NetnsError(f"{self!r} is closed")
            self._procs.append(proc)

    def _add_netns(self, name: str) -> None:
        with _created_lock:
            _created.add(name)
        self._namespaces.append(name)  # before creating: close() tolerates a missing one
        _ip("netns", "add", name)

    def build(self) -> None:
        """Creates the namespaces, bridge, veths, addresses and routes."""
        br = self.bridge_netns
        self._add_netns(br)
        _ip("-n", br, "link", "set", "lo", "up")
        _ip(
            "-n", br, "link", "add", _BRIDGE, "type", "bridge",
            "mcast_snooping", "0", "stp_state", "0", "forward_delay", "0",
        )  # fmt: skip
        _ip("-n", br, "link", "set", _BRIDGE, "multicast", "on", "up")
        for index in range(1, self.n + 1):
            name = f"h{index}"
            dev = self.interfaces[index - 1] if index <= len(self.interfaces) else _HOST_IF
            host = Host(
                lan=self,
                index=index,
                name=name,
                netns=f"{self.tag}-{name}",
                ip=f"10.77.{self.subnet_byte}.{index}",
                ip6=f"fd77::{self.subnet_byte:x}:{index:x}" if self.ipv6 else None,
                interface=dev,
                ll6=f"fe80::77:{index:x}%{dev}" if self.ipv6 else None,
            )
            self._add_netns(host.netns)
            hn = host.netns
            # Created inside the bridge namespace with its peer straight in the
            # host namespace: no interface ever appears in the root namespace.
            _ip(
                "-n", br, "link", "add", name, "type", "veth", "peer", "name", dev, "netns", hn
            )
            _ip("-n", br, "link", "set", name, "master", _BRIDGE)
            _ip("-n", br, "link", "set", name, "multicast", "on", "up")
            _ip("-n", hn, "link", "set", "lo", "up")
            _ip("-n", hn, "addr", "add", f"{host.ip}/24", "dev", dev)
            if host.ip6 is not None and host.ll6 is not None:
                _ip("-n", hn, "link", "set", dev, "addrgenmode", "none")
                _ip("-n", hn, "addr", "add", f"{host.ip6}/64", "dev", dev, "nodad")
                ll6 = host.ll6.partition("%")[0]
                _ip("-n", hn, "addr", "add", f"{ll6}/64", "dev", dev, "nodad")
            _ip("-n", hn, "link", "set", dev, "address", _mac(self.subnet_byte, index))
            _ip("-n", hn, "link", "set", dev, "multicast", "on", "up")
            _ip("-n", hn, "route", "add", _MCAST_NET, "dev", dev)
            self.hosts.append(host)
        if self.n >= _STATIC_NEIGHBOURS_FROM:
            self._add_static_neighbours()

    def _add_static_neighbours(self) -> None:
        """Every host knows every other host's MAC address without ARP.

        Unlike a real LAN, where each host has a kernel and a neighbour table of its own,
        every namespace here shares this kernel's one table, with room for
        ``gc_thresh3`` (1,024) resolved entries in all. A LAN of 100 hosts that talk to
        a dozen others each fills it: the kernel logs "neighbor table overflow", new
        entries fail, and packets to those hosts are dropped (SYNs retried for 20 s and
        more) until its garbage collection catches up. Permanent entries do not count
        against that limit."""
        for host in self.hosts:
            lines = []
            for other in self.hosts:
                if other is host:
                    continue
                mac = _mac(self.subnet_byte, other.index)
                lines.append(f"neigh replace {other.ip} lladdr {mac} dev {host.interface} "
                             "nud permanent")
                if other.ip6 is not None:
                    lines.append(f"neigh replace {other.ip6} lladdr {mac} dev {host.interface} "
                                 "nud permanent")
            _ip("-n", host.netns, "-batch", "-", stdin="\n".join(lines) + "\n")

    def close(self) -> None:
        """Kills every process started here, then deletes every namespace.

        Idempotent. Tries every step even if some fail, then raises NetnsError
        listing the failures.
        """
        with self._lock:
            self._closed = True
            procs, self._procs = self._procs, []
        errors: list[str] = []
        for proc in procs:
            _kill_group(proc)
        for proc in procs:
            try:
                proc.wait(timeout=_KILL_WAIT)
            except subprocess.TimeoutExpired:
                errors.append(f"pid {proc.pid} survived SIGKILL")
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                if stream is not None:
                    with contextlib.suppress(OSError):
                        stream.close()
        namespaces, self._namespaces = self._namespaces, []
        existing = _existing(namespaces, errors)
        # Anything still inside our private namespaces descends from what we
        # started (e.g. a daemon that left our process group): kill it too.
        for ns in existing:
            errors.extend(_kill_netns_pids(ns))
        for ns in reversed(namespaces):  # hosts first, then the bridge
            if ns not in existing:
                continue
            try:
                _ip("netns", "del", ns)
            except NetnsError as exc:
                errors.append(str(exc))
        if errors:
            raise NetnsError(f"{self!r} teardown: " + "; ".join(errors))

    def __enter__(self) -> Lan:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _existing(namespaces: list[str], errors: list[str]) -> set[str]:
    try:
        present = list_netns()
    except NetnsError as exc:
        errors.append(str(exc))
        return set(namespaces)  # unknown: try them all
    return present.intersection(namespaces)


def destroy_netns(ns: str) -> list[str]:
    """Kills every process inside namespace ``ns``, then deletes it; returns errors.

    Only for namespaces this process created (see `created_netns`).
    """
    errors = _kill_netns_pids(ns)
    try:
        _ip("netns", "del", ns)
    except NetnsError as exc:
        errors.append(str(exc))
    return errors


def _kill_netns_pids(ns: str) -> list[str]:
    try:
        out = _ip("netns", "pids", ns)
    except NetnsError as exc:
        return [str(exc)]
    pids = [int(p) for p in out.split() if p.isdigit()]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + _KILL_WAIT
    while pids and time.monotonic() < deadline:
        pids = [p for p in pids if _alive_in(p, ns)]
        if pids:
            time.sleep(0.01)
    return [f"pid {p} in {ns} survived SIGKILL" for p in pids]


def _alive_in(pid: int, ns: str) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state != "Z"  # a zombie is dead; its parent (not us) reaps it


@contextlib.contextmanager
def make_lan(n: int = 3, *, ipv6: bool = False, interfaces: Sequence[str] = ()) -> Iterator[Lan]:
    """Builds an ``n``-host LAN (with IPv6 addresses too if `ipv6`; host i's interface
    named ``interfaces[i - 1]``, else ``eth0``), yields it, and always tears it down.

    Raises:
        NetnsError: If building or tearing down fails (a failed build is torn
            down before the error propagates).
    """
    lan = Lan(n, ipv6=ipv6, interfaces=interfaces)
    try:
        lan.build()
        yield lan
    finally:
        lan.close()


_PY_PING: Final[str] = """
import os, socket, struct, sys, time
def csum(b):
    s = sum(struct.unpack('!%dH' % (len(b) // 2), b))
    s = (s >> 16) + (s & 0xffff); s += s >> 16
    return ~s & 0xffff
ident = os.getpid() & 0xffff
body = struct.pack('!BBHHH', 8, 0, 0, ident, 1) + b'zeromesh'
pkt = body[:2] + struct.pack('!H', csum(body)) + body[4:]
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
s.sendto(pkt, ({ip!r}, 0))
deadline = time.monotonic() + {timeout!r}
while (left := deadline - time.monotonic()) > 0:
    s.settimeout(left)
    try:
        data = s.recv(2048)
    except (socket.timeout, OSError):
        break
    ihl = (data[0] & 15) * 4
    if data[ihl] == 0 and struct.unpack('!H', data[ihl + 4:ihl + 6])[0] == ident:
        sys.exit(0)
sys.exit(1)
"""
