"""Run inside a test network namespace: an mDNS node, or a legacy unicast querier.

python -m tests.discovery._netns_node node IFACE MESH   # "ready"; dropped counts at stdin EOF
python -m tests.discovery._netns_node query SRC DST     # "answered" or "silent"
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import sys
import uuid

from discovery import SERVICE_TYPE, MdnsDiscovery, PeerInfo


def legacy_ptr_query(query_id: int) -> bytes:
    """A one-question DNS query for the service type's PTR records (RFC 6762 §6.7 legacy)."""
    qname = b"".join(
        bytes([len(label)]) + label.encode() for label in SERVICE_TYPE.rstrip(".").split(".")
    )
    return (
        struct.pack("!HHHHHH", query_id, 0, 1, 0, 0, 0)
        + qname
        + b"\x00"
        + struct.pack("!HH", 12, 1)
    )


def query(source: str, destination: str, timeout: float = 1.0) -> bool:
    """Send a legacy query from `source` (ephemeral port); True if any answer came back."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((source, 0))
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(source))
        sock.settimeout(timeout)
        sock.sendto(legacy_ptr_query(0x4242), (destination, 5353))
        try:
            data, _addr = sock.recvfrom(9000)
        except TimeoutError:
            return False
        return data[:2] == b"\x42\x42" and struct.unpack("!H", data[6:8])[0] > 0


async def node(interface: str, mesh: str) -> None:
    backend = MdnsDiscovery([interface], mesh=mesh)
    me = PeerInfo(uuid.uuid4().hex, "netns", mesh, 1, (f"tcp://{interface}:5000",))
    await backend.start(me, lambda event: None)
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await backend.aclose()
    print(json.dumps(backend.dropped), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "node":
        asyncio.run(node(sys.argv[2], sys.argv[3]))
    else:
        print("answered" if query(sys.argv[2], sys.argv[3]) else "silent", flush=True)
