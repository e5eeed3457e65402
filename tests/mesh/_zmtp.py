"""Raw ZMTP 3 bytes for fuzzing (RFC 23/ZMTP): greetings, commands and frames, right and wrong.

Only what a fuzzer needs to speak (or mis-speak) to a libzmq socket over a plain TCP
socket; the honest traffic goes through pyzmq.
"""

from __future__ import annotations

import contextlib
import random
import socket
import struct
import time
from typing import Final

GREETING_SIZE: Final[int] = 64


def greeting(*, major: int = 3, minor: int = 0, mechanism: bytes = b"NULL",
             as_server: int = 0, signature: bytes | None = None,
             filler: bytes = bytes(31)) -> bytes:
    """A 64-byte greeting; every field can be set to something wrong."""
    sig = signature if signature is not None else b"\xff" + bytes(8) + b"\x7f"
    return (sig + bytes([major & 0xFF, minor & 0xFF]) + mechanism[:20].ljust(20, b"\x00")
            + bytes([as_server & 0xFF]) + filler[:31].ljust(31, b"\x00"))


def command(name: bytes, body: bytes = b"", *, long: bool = False,
            declared: int | None = None) -> bytes:
    """A command frame; `declared` overrides the size field (a lie about the length)."""
    payload = bytes([len(name) & 0xFF]) + name + body
    size = len(payload) if declared is None else declared
    if long or size > 255:
        return b"\x06" + struct.pack(">Q", size & (2**64 - 1)) + payload
    return b"\x04" + bytes([size]) + payload


def prop(name: bytes, value: bytes, *, declared: int | None = None) -> bytes:
    """One metadata property of a READY command."""
    size = len(value) if declared is None else declared
    return bytes([len(name) & 0xFF]) + name + struct.pack(">I", size & 0xFFFFFFFF) + value


def ready(socket_type: bytes | None) -> bytes:
    return command(b"READY", b"" if socket_type is None else prop(b"Socket-Type", socket_type))


def frame(body: bytes, *, more: bool = False, declared: int | None = None,
          long: bool = False) -> bytes:
    """A message frame; `declared` overrides the size field."""
    size = len(body) if declared is None else declared
    flags = 0x01 if more else 0x00
    if long or size > 255:
        return bytes([flags | 0x02]) + struct.pack(">Q", size & (2**64 - 1)) + body
    return bytes([flags]) + bytes([size]) + body


def handshake(sock: socket.socket, socket_type: bytes, timeout: float = 2.0) -> str | None:
    """Greet as a NULL client; return the server's Socket-Type (None: not ZMTP 3 / closed)."""
    sock.settimeout(timeout)
    sock.sendall(greeting())
    data = b""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            chunk = sock.recv(4096)
            if not chunk:
                return None
            data += chunk
            if len(data) >= GREETING_SIZE + 2 and b"Socket-Type" in data:
                break
    except (TimeoutError, OSError):
        return None
    if len(data) < GREETING_SIZE or data[0] != 0xFF or data[10] != 3:
        return None
    at = data.find(b"Socket-Type")
    if at < 0:
        return None
    (size,) = struct.unpack(">I", data[at + 11:at + 15])
    sock.sendall(ready(socket_type))
    return data[at + 15:at + 15 + size].decode("ascii", "replace")


def socket_type_of(port: int) -> str | None:
    """The ZMTP socket type listening on 127.0.0.1:`port`, or None (not ZeroMQ)."""
    with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
        return handshake(sock, b"DEALER")


def malformed_greetings(rng: random.Random) -> list[tuple[str, bytes]]:
    """(kind, bytes) pairs: broken greetings and broken first commands, one connection each."""
    good = greeting()
    cases: list[tuple[str, bytes]] = [
        ("bad signature", greeting(signature=b"\x00" * 10)),
        ("bad signature", greeting(signature=b"GET / HTTP")),
        ("bad signature", b"\xff" + bytes(8) + b"\x00" + good[10:]),
        ("bad signature", bytes(rng.getrandbits(8) for _ in range(10)) + good[10:]),
        ("wrong version", greeting(major=0)),
        ("wrong version", greeting(major=1)),
        ("wrong version", greeting(major=2, minor=0)),
        ("wrong version", greeting(major=4)),
        ("wrong version", greeting(major=255, minor=255)),
        ("wrong version", greeting(minor=255)),
        ("unknown mechanism", greeting(mechanism=b"FOO")),
        ("unknown mechanism", greeting(mechanism=b"")),
        ("unknown mechanism", greeting(mechanism=b"null")),
        ("unknown mechanism", greeting(mechanism=b"NULL\x01")),
        ("unknown mechanism", greeting(mechanism=b"CURVE")),
        ("unknown mechanism", greeting(mechanism=b"PLAIN")),
        ("unknown mechanism", greeting(mechanism=b"GSSAPI")),
        ("unknown mechanism", greeting(mechanism=rng.randbytes(20))),
        ("odd fields", greeting(as_server=1)),
        ("odd fields", greeting(as_server=255, filler=rng.randbytes(31))),
        ("oversized length", good + command(b"READY", declared=2**63 - 1, long=True)),
        ("oversized length", good + command(b"READY", declared=2**64 - 1, long=True)),
        ("oversized length", good + command(b"READY", declared=255)),
        ("oversized length", good + command(b"READY", prop(b"Socket-Type", b"DEALER",
                                                           declared=2**32 - 1))),
        ("oversized length", good + ready(b"DEALER") + frame(b"x", declared=2**62, long=True)),
        ("oversized length", good + ready(b"DEALER") + frame(b"", declared=2**63 + 5, long=True)),
        ("bad command", good + ready(b"FOO")),
        ("bad command", good + ready(None)),
        ("bad command", good + ready(b"PUB") + ready(b"PUB")),
        ("bad command", good + ready(b"DEALER") + ready(b"DEALER")),
        ("bad command", good + command(b"")),
        ("bad command", good + command(b"ERROR", b"\x03bad")),
        ("bad command", good + command(b"HELLO", b"x" * 300)),
        ("bad command", good + command(b"PING", b"\xff\xff")),
        ("bad command", good + command(b"SUBSCRIBE", rng.randbytes(40))),
        ("bad command", good + command(b"READY", b"\x0bSocket-Type")),
        ("bad command", good + b"\x04"),
        ("bad command", good + b"\x05\x01\x00"),  # command flag with 'more'
        ("bad command", good + bytes([rng.getrandbits(8) | 0xF8]) + rng.randbytes(30)),
    ]
    for cut in range(1, GREETING_SIZE):  # every truncation of a valid greeting
        cases.append(("truncated", good[:cut]))
    cases.append(("truncated", good + ready(b"DEALER")[:5]))
    cases.append(("truncated", good + ready(b"DEALER") + frame(b"abcdef")[:4]))
    return cases


def blast(port: int, payloads: list[bytes], *, wait: float = 1.0) -> list[str]:
    """One TCP connection per payload, all open at once; each sends its bytes, then we wait
    (bounded) for the server to close. Returns each payload's outcome: ``closed`` (by the
    server within `wait`), ``open`` (still waiting for more) or ``refused``."""
    outcome = ["refused"] * len(payloads)
    socks: dict[int, socket.socket] = {}
    try:
        for index, payload in enumerate(payloads):
            try:
                sock = socket.create_connection(("127.0.0.1", port), timeout=2)
            except OSError:
                continue
            socks[index] = sock
            with contextlib.suppress(OSError):  # it may close while we write: also a close
                sock.sendall(payload)
            sock.settimeout(0.0)
        pending = dict(socks)
        deadline = time.monotonic() + wait
        while pending and time.monotonic() < deadline:
            for index, sock in list(pending.items()):
                try:
                    data = sock.recv(65536)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if not data:  # else a greeting or an HTTP answer: read on to EOF
                    outcome[index] = "closed"
                    del pending[index]
            if pending:
                time.sleep(0.01)
        for index in pending:
            outcome[index] = "open"
    finally:
        for sock in socks.values():
            sock.close()
    return outcome
