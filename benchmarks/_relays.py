"""The floor of services over HTTP: two relays that do nothing but relay.

`sidecar.py`'s service row asks whether two agents and the app answer within
2x a direct call to the app. Part of that cost is not the agents' code but
the path itself: an HTTP hop in, a ZeroMQ hop between two processes, an HTTP
hop out, each a thread woken on the other side. These relays take that path
with as little Python as it allows: the asking relay reads a POST with a
Content-Length, sends its body on a DEALER and writes the reply back; the
serving relay reads the ROUTER and POSTs the body to the app on one kept
connection. No headers, ids, retries, deadlines, metrics or checks: a
measurement of the path, not a usable sidecar.

ZeroMQ is read the way zeromesh reads it (the socket's FD in the event loop,
non-blocking receives until EVENTS has no POLLIN): zmq.asyncio's futures cost
more per message.

Run by `sidecar.py` as children::

    python benchmarks/_relays.py serving http://127.0.0.1:PORT/upper   # ready zmq=tcp://...
    python benchmarks/_relays.py asking tcp://127.0.0.1:PORT           # ready http=http://...
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from typing import Final
from urllib.parse import urlsplit

import _harness as h
import zmq
from _harness import LOOPBACK

_END: Final = b"\r\n\r\n"


class _Framer(asyncio.Protocol):
    """Splits an HTTP/1.1 byte stream into messages by Content-Length; `on_message` gets
    each body."""

    def __init__(self, on_message: Callable[[_Framer, bytes], None]) -> None:
        self._buf = bytearray()
        self._on_message = on_message
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # (a stream transport)

    def data_received(self, data: bytes) -> None:
        self._buf += data
        while (end := self._buf.find(_END)) >= 0:
            length = 0
            for line in bytes(self._buf[:end]).split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.lower() == b"content-length":
                    length = int(value)
            start = end + len(_END)
            if len(self._buf) < start + length:
                return
            body = bytes(self._buf[start:start + length])
            del self._buf[:start + length]
            self._on_message(self, body)


def _readable(sock: zmq.Socket[bytes]) -> bool:
    events = sock.getsockopt(zmq.EVENTS)
    assert isinstance(events, int)
    return bool(events & zmq.POLLIN)


async def serving(app_url: str) -> None:
    """Each request from the ROUTER is POSTed to the app; its answer goes back."""
    loop = asyncio.get_running_loop()
    url = urlsplit(app_url)
    router: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.ROUTER)
    zmq_port = router.bind_to_random_port(f"tcp://{LOOPBACK}")
    waiting: list[bytes] = []  # the identities of requests at the app, in order

    def answered(_conn: _Framer, body: bytes) -> None:
        router.send_multipart([waiting.pop(0), body], zmq.NOBLOCK)
        drain()

    host, port_text = url.netloc.rsplit(":", 1)
    _, app = await loop.create_connection(lambda: _Framer(answered), host, int(port_text))
    head = (f"POST {url.path} HTTP/1.1\r\nHost: {url.netloc}\r\n"
            "Content-Length: %d\r\n\r\n").encode()

    def drain() -> None:
        while _readable(router):
            identity, body = router.recv_multipart(zmq.NOBLOCK)
            waiting.append(identity)
            assert app.transport is not None
            app.transport.writelines((head % len(body), body))

    loop.add_reader(router.FD, drain)
    print(f"ready zmq=tcp://{LOOPBACK}:{zmq_port}", flush=True)
    await asyncio.Event().wait()


async def asking(zmq_url: str) -> None:
    """Each POST's body goes out on the DEALER; the reply is the answer (one in flight per
    connection, as the benchmark's client sends them)."""
    loop = asyncio.get_running_loop()
    dealer: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
    dealer.connect(zmq_url)
    asking_now: list[_Framer] = []  # the connections whose request is out, in order
    ok = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n"

    def request(conn: _Framer, body: bytes) -> None:
        asking_now.append(conn)
        dealer.send(body, zmq.NOBLOCK)
        drain()

    def drain() -> None:
        while _readable(dealer):
            reply = dealer.recv(zmq.NOBLOCK)
            transport = asking_now.pop(0).transport
            if transport is not None:
                transport.writelines((ok % len(reply), reply))

    loop.add_reader(dealer.FD, drain)
    server = await loop.create_server(lambda: _Framer(request), LOOPBACK, 0)
    print(f"ready http=http://{LOOPBACK}:{server.sockets[0].getsockname()[1]}", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    role, where = sys.argv[1:3]
    h.mesh_run(serving(where) if role == "serving" else asking(where))
