"""Roles for the hostile-mDNS test, each run inside one namespace host of a test LAN.

python -m tests.system._mdns_roles node IFACE MESH NAME
    A node with mDNS on IFACE, subscribed to ``hz.>``. Prints ``ready id=.. ctl=..``,
    ``joined|left|lost name=.. id=..`` per peer event and ``got TOPIC DATA`` per message.
    Reads commands on stdin: ``status`` prints one JSON line (peers, mDNS drops, input
    drops); ``pub TOPIC DATA`` publishes once a subscriber is ready, then prints
    ``published TOPIC``. Exits at stdin EOF.

python -m tests.system._mdns_roles attack IFACE JSON
    The stranger: binds a ROUTER on IFACE (the address its spoofed records point to),
    multicasts hostile mDNS responses from IFACE:5353 to 224.0.0.251 on IFACE only, prints
    ``sent CATEGORY N`` per category and ``done``, then ``hello FIELDS`` for every control
    message that reaches its ROUTER, until stdin EOF.
"""

from __future__ import annotations

import asyncio
import json
import random
import socket
import sys
import threading
import time
from collections.abc import Mapping

import zmq
from zeroconf._dns import DNSAddress, DNSPointer, DNSService, DNSText
from zeroconf._protocol.outgoing import DNSOutgoing
from zeroconf.const import (
    _CLASS_IN,
    _CLASS_UNIQUE,
    _FLAGS_AA,
    _FLAGS_QR_RESPONSE,
    _TYPE_A,
    _TYPE_PTR,
    _TYPE_SRV,
    _TYPE_TXT,
)

from discovery import SERVICE_TYPE, MdnsDiscovery
from mesh import AsyncNode, ProtocolError
from mesh import _wire as wire

MDNS_GROUP = ("224.0.0.251", 5353)


def out(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


# -- the node under test ----------------------------------------------------------------------

async def node(interface: str, mesh: str, name: str) -> None:
    async with AsyncNode(name=name, mesh=mesh, interfaces=[interface], mdns=True,
                         heartbeat_interval=0.2, suspect_after=1.0, lost_after=3.0) as n:
        events = n.events()
        await n.subscribe("hz.>", callback=lambda m: out(f"got {m.topic} {m.data.decode()}"))
        out(f"ready id={n.id} ctl={n.endpoints['ctl'][0]}")

        async def report() -> None:
            async for event in events:
                out(f"{event.kind.value} name={event.peer.name} id={event.peer.id}")

        reporter = asyncio.create_task(report())
        loop = asyncio.get_running_loop()
        while line := await loop.run_in_executor(None, sys.stdin.readline):
            words = line.split()
            if words == ["status"]:
                mdns = [d for d in n._live().discovery if isinstance(d, MdnsDiscovery)]
                out(json.dumps({
                    "peers": [{"id": p.id, "name": p.name, "state": p.state.value,
                               "endpoints": list(p.endpoints)} for p in n.peers()],
                    "mdns_dropped": mdns[0].dropped,
                    "mdns_peers": [{"id": p.id, "endpoints": list(p.endpoints)}
                                   for p in mdns[0].peers],
                    "input_dropped": dict(n.dropped_input)}))
            elif len(words) == 3 and words[0] == "pub":
                await n.wait_for_subscribers(words[1], 1, timeout=10)
                await n.publish(words[1], words[2])
                out(f"published {words[1]}")
        reporter.cancel()


# -- the stranger -----------------------------------------------------------------------------

def _txt(entries: list[bytes]) -> bytes:
    return b"".join(bytes([len(e)]) + e for e in entries)


def _response(instance: str, server: str, ip: str, port: int, txt: bytes,
              ttl: int = 120) -> list[bytes]:
    """One announcement (PTR, SRV, TXT, A) as zeroconf would send it, with our TXT bytes."""
    msg = DNSOutgoing(_FLAGS_QR_RESPONSE | _FLAGS_AA)
    msg.add_answer_at_time(DNSPointer(SERVICE_TYPE, _TYPE_PTR, _CLASS_IN, ttl, instance), 0)
    unique = _CLASS_IN | _CLASS_UNIQUE
    msg.add_answer_at_time(DNSService(instance, _TYPE_SRV, unique, ttl, 0, 0, port, server), 0)
    msg.add_answer_at_time(DNSText(instance, _TYPE_TXT, unique, ttl, txt), 0)
    msg.add_answer_at_time(DNSAddress(server, _TYPE_A, unique, ttl, socket.inet_aton(ip)), 0)
    return msg.packets()


def hostile_packets(p: Mapping[str, str], port: int,
                    rng: random.Random) -> list[tuple[str, bytes]]:
    """(category, datagram): garbage, another mesh, bad TXT, and spoofs of a live node."""
    me, mesh, real_id = p["ip"], p["mesh"], p["real_id"]
    ep = f"tcp://{me}:{port}".encode()

    def record(label: str, entries: list[bytes]) -> list[bytes]:
        return _response(f"{label}.{SERVICE_TYPE}", f"{label}.local.", me, port, _txt(entries))

    def fields(**over: bytes) -> list[bytes]:
        base = {"id": rng.randbytes(16).hex().encode(), "name": b"bogus", "mesh": mesh.encode(),
                "v": b"1", "ep": ep}
        base.update(over)
        return [k.encode() + b"=" + v for k, v in base.items()]

    cases: list[tuple[str, bytes]] = []
    for _ in range(100):
        cases.append(("garbage", rng.randbytes(rng.choice((1, 11, 12, 40, 512, 1400)))))
    valid = record("garbage-base", fields())[0]
    for cut in range(12, len(valid), 7):
        cases.append(("garbage", valid[:cut]))  # truncated announcements
    cases.append(("garbage", b"\x00\x00\x84\x00\xff\xff\xff\xff\xff\xff\xff\xff"))  # huge counts
    cases.append(("garbage", valid[:12] + b"\xc0\x0c" * 200))  # compression pointer loop
    bad_txt = {
        "bad id": fields(id=b"zz"),
        "uppercase id": fields(id=rng.randbytes(16).hex().upper().encode()),
        "oversized": fields(name=b"n" * 60) + [b"x%d=" % i + b"y" * 200 for i in range(8)],
        "bad endpoint": fields(ep=b"tcp://999.1.1.1:5000"),
        "bad port": fields(ep=f"tcp://{me}:0".encode()),
        "not tcp": fields(ep=f"udp://{me}:5000".encode()),
        "multicast endpoint": fields(ep=b"tcp://224.0.0.251:5000"),
        "too many endpoints": fields(ep=b",".join([ep] * 9)),
        "bad key": fields(key=b"short"),
        "key not z85": fields(key=b"~" * 40),
        "non-UTF-8 name": fields(name=b"\xff\xfe\xfd"),
        "non-UTF-8 mesh": fields(mesh=mesh.encode() + b"\xff"),
        "unprintable name": fields(name=b"a\x1b[2Jb"),
        "bad version": fields(v=b"01"),
        "huge version": fields(v=b"9" * 200),
        "missing ep": [e for e in fields() if not e.startswith(b"ep=")],
        "no values": [b"id", b"name", b"mesh=" + mesh.encode(), b"v", b"ep"],
    }
    for index, (kind, entries) in enumerate(bad_txt.items()):
        cases += [(f"bad txt: {kind}", pkt) for pkt in record(f"badtxt{index}", entries)]
    cases += [("other mesh", pkt) for pkt in record("othermesh", fields(mesh=b"not-" +
                                                                         mesh.encode()))]
    cases += [("unroutable", pkt) for pkt in record("faraway", fields(ep=b"tcp://8.8.8.8:5000"))]
    # the spoofs: a live node's id with our address, under a new name and under its own
    spoof = fields(id=real_id.encode(), name=p["real_name"].encode())
    cases += [("spoof: same id, new instance", pkt) for pkt in record("impostor", spoof)]
    own = p["real_instance"]
    cases += [("spoof: same id, same instance", pkt) for pkt in
              _response(own, "impostor-host.local.", me, port, _txt(spoof))]
    cases += [("spoof: goodbye of the live node", pkt) for pkt in
              _response(own, "impostor-host.local.", me, port, _txt(spoof), ttl=0)]
    return cases


def attack(interface: str, params: Mapping[str, str]) -> None:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port(f"tcp://{interface}")
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((interface, 5353))
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(interface))
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)
    cases = hostile_packets({**params, "ip": interface}, port, random.Random(6))
    senders = [(sock, cases)]
    foreign = params.get("foreign_ip")
    if foreign:  # an address of another network on the same wire
        far = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        far.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        far.bind((foreign, 5353))
        far.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(foreign))
        packets = _response(f"foreign.{SERVICE_TYPE}", "foreign.local.", interface, port,
                            _txt([b"id=" + b"ab" * 16, b"name=foreign",
                                  b"mesh=" + params["mesh"].encode(), b"v=1",
                                  f"ep=tcp://{interface}:{port}".encode()]))
        senders.append((far, [("foreign source", pkt) for pkt in packets]))
    counts: dict[str, int] = {}
    for _round in range(3):  # multicast on a LAN may lose one; records are idempotent
        for sender, batch in senders:
            for kind, packet in batch:
                sender.sendto(packet, MDNS_GROUP)
                counts[kind] = counts.get(kind, 0) + 1
                time.sleep(0.0005)
        time.sleep(0.2)
    for kind, n in counts.items():
        out(f"sent {kind}: {n}")
    out("done")
    stop = threading.Event()

    def wait_eof() -> None:
        sys.stdin.read()
        stop.set()

    threading.Thread(target=wait_eof, daemon=True).start()
    while not stop.is_set():
        if not router.poll(100):
            continue
        frames = router.recv_multipart()
        try:
            msg = wire.decode_control(frames[-1])
        except ProtocolError as exc:
            out(f"hello undecodable: {exc}")
            continue
        fields = {f: getattr(msg, f) for f in msg.__struct_fields__}
        out(f"hello {type(msg).__name__} {json.dumps(fields)}")
    router.close()
    ctx.term()
    for sender, _ in senders:
        sender.close()


if __name__ == "__main__":
    if sys.argv[1] == "node":
        asyncio.run(node(sys.argv[2], sys.argv[3], sys.argv[4]))
    else:
        attack(sys.argv[2], json.loads(sys.argv[3]))
