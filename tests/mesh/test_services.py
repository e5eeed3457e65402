"""Services (router/dealer): replies matched to requests, load balancing, timeouts, errors, failover."""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import zmq
import zmq.asyncio

from mesh import (
    AsyncNode,
    ClosedError,
    ConfigError,
    Message,
    MessageTooLarge,
    Node,
    NodeConfig,
    NoRespondersError,
    PeerState,
    RemoteError,
    RequestTimeout,
)
from mesh import _wire as wire
from mesh._services._server import Declined
from tests.helpers import aeventually

from ._proc import Cli
from .conftest import FAST, FAST_ENV, MakeNode


def _servers_known(node: AsyncNode, service: str, *, alive_only: bool = False) -> int:
    """How many peers `node` knows as servers of `service` (the alive ones, if `alive_only`)."""
    return sum(service in p.services for p in node._live().membership.table.records()
               if not alive_only or p.state is PeerState.ALIVE)


async def _servers(make_node: MakeNode, client: AsyncNode, service: str,
                   handlers: list[Callable[[Message], Any]]) -> list[AsyncNode]:
    """Start one node per handler serving `service`; wait until `client` sees them all."""
    nodes = []
    for i, handler in enumerate(handlers):
        node = await make_node(f"s{i}")
        await node.serve(service, handler)
        nodes.append(node)
    await aeventually(lambda: _servers_known(client, service, alive_only=True) == len(handlers),
                      message=f"{len(handlers)} servers of {service} known")
    return nodes


async def test_a_request_gets_its_reply_with_headers_passed_through(make_node: MakeNode) -> None:
    """The handler sees data, headers and requester; the reply names the server."""
    client = await make_node("client")
    seen = []

    def handler(msg):
        seen.append(msg)
        return b"re:" + msg.data

    await _servers(make_node, client, "svc.echo", [handler])
    reply = await client.request("svc.echo", b"ping", headers={"traceparent": "00-abc-01"})
    assert reply.data == b"re:ping"
    assert reply.source == "s0"
    assert reply.topic == "svc.echo"
    assert seen[0].headers == {"traceparent": "00-abc-01"}
    assert seen[0].source == "client"
    assert seen[0].source_id == client.id


async def test_1000_concurrent_requests_to_two_servers_are_all_answered_correctly(make_node: MakeNode) -> None:
    """1,000 requests in flight at once: each gets its own reply, and both servers work."""
    client = await make_node("client")
    served: collections.Counter[str] = collections.Counter()

    def handler(name: str) -> Callable[[Message], Awaitable[bytes]]:
        async def handle(msg: Message) -> bytes:
            served[name] += 1
            await asyncio.sleep(0.001)
            return msg.data[::-1]
        return handle

    await _servers(make_node, client, "svc.rev", [handler("a"), handler("b")])
    async with asyncio.timeout(20):
        replies = await asyncio.gather(*(client.request("svc.rev", f"req-{i}", timeout=15)
                                         for i in range(1000)))
    assert [r.data for r in replies] == [f"req-{i}".encode()[::-1] for i in range(1000)]
    print("split:", dict(served))
    assert sum(served.values()) == 1000
    assert min(served.values()) >= 300, served  # least-outstanding balancing uses both


async def test_concurrent_requests_share_frames_within_the_size_limit(make_node: MakeNode) -> None:
    """Requests made together travel together, split so no frame exceeds the receiver's limit:
    60 KB and tiny requests mixed, 120 in flight, max_message_size 100 KB, all answered."""
    client = await make_node("client", max_message_size=100_000)
    server = await make_node("s0", max_message_size=100_000)
    await server.serve("svc.len", lambda m: b"%d:%s" % (len(m.data), m.data[:4]))
    await client.wait_for_service("svc.len", timeout=5)
    bodies = [(b"%04d" % i) * (15_000 if i % 3 == 0 else 1) for i in range(120)]
    async with asyncio.timeout(20):
        replies = await asyncio.gather(*(client.request("svc.len", body, timeout=15)
                                         for body in bodies))
    assert [r.data for r in replies] == [b"%d:%s" % (len(b), b[:4]) for b in bodies]
    assert server.stats["requests_served"] == 120
    assert "service" not in server.dropped_input, server.dropped_input


async def test_requests_made_together_leave_together_and_replies_come_back_together(
        make_node: MakeNode, monkeypatch: pytest.MonkeyPatch) -> None:
    """Requester side: 200 requests made in one loop iteration leave as a handful of frames
    (the first at once, the rest together), all answered. Server side: one frame holding 3
    requests from a raw DEALER is answered by one frame holding the 3 replies, in order."""
    client = await make_node("client")
    server = await make_node("s0")
    await server.serve("svc.up", lambda m: m.data.upper())
    await client.wait_for_service("svc.up", timeout=5)
    await client.request("svc.up", b"warm")  # the link to the server exists from here on
    [link] = client._live().requests._links.values()
    frames = 0
    real_send = link.dealer.try_send

    def counting_send(frame: bytes | bytearray) -> bool:  # observes the real send, which still happens
        nonlocal frames
        frames += 1
        return real_send(frame)

    monkeypatch.setattr(link.dealer, "try_send", counting_send)
    async with asyncio.timeout(20):
        replies = await asyncio.gather(*(client.request("svc.up", b"r%d" % i, timeout=15)
                                         for i in range(200)))
    assert [r.data for r in replies] == [b"R%d" % i for i in range(200)]
    assert 2 <= frames <= 10, frames

    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    try:
        dealer.connect(server.endpoints["rtr"][0])
        requests = [wire.Request(i, "svc.up", "ab" * 16, "raw", 0.0, None, b"x%d" % i)
                    for i in range(3)]
        dealer.send(bytes(wire.encode_service(requests)))
        assert await asyncio.to_thread(dealer.poll, 5000), "no reply frame"
        answered = wire.decode_service(dealer.recv(), 10**6)
    finally:
        dealer.close()
    assert [(r.id, r.payload) for r in answered] == [(0, b"X0"), (1, b"X1"), (2, b"X2")]


async def test_sequential_requests_alternate_between_servers(make_node: MakeNode) -> None:
    """With one request at a time, servers take turns (round robin on ties)."""
    client = await make_node("client")
    await _servers(make_node, client, "svc.who", [lambda m: "s0", lambda m: "s1"])
    sources = [(await client.request("svc.who", b"")).text for _ in range(20)]
    assert collections.Counter(sources) == {"s0": 10, "s1": 10}, sources


async def test_a_handler_past_the_timeout_raises_and_its_late_reply_is_discarded(make_node: MakeNode) -> None:
    """RequestTimeout comes at the timeout; the late reply never reaches the next request."""
    client = await make_node("client")

    async def handler(msg):
        if msg.data == b"slow":
            await asyncio.sleep(0.5)
        return msg.data

    await _servers(make_node, client, "svc.slow", [handler])
    started = time.monotonic()
    with pytest.raises(RequestTimeout, match=r"svc\.slow"):
        await client.request("svc.slow", b"slow", timeout=0.2, retries=0)
    assert 0.15 <= time.monotonic() - started < 0.5
    for i in range(5):  # spans the moment the late reply arrives
        reply = await client.request("svc.slow", f"fast-{i}", timeout=2)
        assert reply.data == f"fast-{i}".encode()
        await asyncio.sleep(0.1)
    await aeventually(lambda: client.stats["late_replies"] == 1, message="late reply counted")


async def test_a_timeout_names_the_service_as_given(make_node: MakeNode) -> None:
    """As the agent's 504 body shows it: quoted plainly, not Python's repr (``'s"l\\\\w'``)."""
    client = await make_node("client")

    async def slow(msg: Message) -> bytes:
        await asyncio.sleep(0.5)
        return msg.data

    await _servers(make_node, client, 's"l\\w', [slow])
    with pytest.raises(RequestTimeout) as timed_out:
        await client.request('s"l\\w', b"x", timeout=0.2, retries=0)
    assert str(timed_out.value) == "request to 's\"l\\w': timed out after 0.2 s"


async def test_a_handler_error_is_a_remote_error_and_the_server_keeps_serving(make_node: MakeNode) -> None:
    """The requester gets RemoteError with the handler's message; the next request works."""
    client = await make_node("client")

    def handler(msg):
        if msg.data == b"bad":
            raise ValueError("cannot parse 'bad'")
        return b"ok"

    await _servers(make_node, client, "svc.parse", [handler])
    with pytest.raises(RemoteError, match="cannot parse 'bad'") as info:
        await client.request("svc.parse", b"bad")
    assert info.value.service == "svc.parse"
    assert info.value.message == "cannot parse 'bad'"
    assert (await client.request("svc.parse", b"good")).data == b"ok"


async def test_no_responders_fails_fast_not_after_the_timeout(make_node: MakeNode) -> None:
    """Past the discovery grace after start, a service nobody serves fails at once."""
    client = await make_node("client")
    await _servers(make_node, client, "svc.other", [lambda m: b""])
    await asyncio.sleep(0.5)  # the node's discovery grace (0.5 s) is over
    started = time.monotonic()
    with pytest.raises(NoRespondersError, match=r"svc\.missing"):
        await client.request("svc.missing", b"x", timeout=5)
    assert time.monotonic() - started < 0.1


async def test_right_after_start_a_request_waits_briefly_for_discovery(make_node: MakeNode) -> None:
    """A node that just started finds an existing server instead of failing."""
    server = await make_node("server")
    await server.serve("svc.early", lambda m: b"found")
    client = await make_node("client", peers=server.endpoints["ctl"], mdns=False)
    reply = await client.request("svc.early", b"", timeout=5)
    assert reply.data == b"found"


async def test_an_oversized_request_raises_before_anything_is_sent(make_node: MakeNode) -> None:
    """MessageTooLarge at the requester; the server never sees it."""
    client = await make_node("client", max_message_size=1000)
    calls: list[Message] = []

    def record(msg: Message) -> bytes:
        calls.append(msg)
        return b""

    await _servers(make_node, client, "svc.big", [record])
    with pytest.raises(MessageTooLarge):
        await client.request("svc.big", b"x" * 1001)
    assert (await client.request("svc.big", b"x" * 1000)).data == b""
    assert len(calls) == 1
    assert client.traffic().totals["oversized"] == 1  # refused and counted


async def test_an_oversized_reply_is_a_remote_error(make_node: MakeNode) -> None:
    """A handler returning more than max_message_size gets an error reply, not a hang."""
    client = await make_node("client")
    server = await make_node("server", max_message_size=100)
    await server.serve("svc.huge", lambda m: b"x" * 101)
    await client.wait_for_service("svc.huge", timeout=5)
    with pytest.raises(RemoteError, match="exceeds"):
        await client.request("svc.huge", b"")


async def test_concurrency_bounds_a_plain_function_that_returns_a_coroutine(
        make_node: MakeNode) -> None:
    """``serve(name, lambda m: handle(m, db), concurrency=2)``: the coroutines the lambda
    returns run 2 at a time like an async handler's, not all at once."""
    node = await make_node("solo")
    running = peak = 0

    async def handle(msg: Message, factor: int) -> bytes:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.002)
        running -= 1
        return msg.data * factor

    await node.serve("svc.lambda", lambda m: handle(m, 2), concurrency=2)
    replies = await asyncio.gather(*(node.request("svc.lambda", str(i), timeout=5)
                                     for i in range(30)))
    assert [r.data for r in replies] == [str(i).encode() * 2 for i in range(30)]
    assert peak == 2


async def test_a_reply_over_the_requesters_limit_does_not_cut_it_off_from_the_server(
        make_node: MakeNode) -> None:
    """A server of a larger max_message_size answers past the requester's: ZeroMQ drops that
    connection and never reconnects it by itself. The requester fails that request, and
    reconnects: its next requests to that server are answered, not all timed out."""
    client = await make_node("client", max_message_size=1000)
    server = await make_node("server", max_message_size=200_000)
    await server.serve("svc.size", lambda m: b"x" * int(m.data))
    await client.wait_for_service("svc.size", timeout=5)
    assert len((await client.request("svc.size", "10", timeout=2)).data) == 10
    with pytest.raises(NoRespondersError):
        await client.request("svc.size", "150000", timeout=2, retries=0)
    for _ in range(3):
        assert len((await client.request("svc.size", "10", timeout=2)).data) == 10


async def test_a_nan_timeout_or_concurrency_is_a_config_error(make_node: MakeNode) -> None:
    """NaN passes ``<= 0`` checks: a NaN timeout never timed out, and broke the node's shared
    deadline timer so that later requests never timed out either; a NaN concurrency served
    nothing. Each is refused."""
    node = await make_node("solo")
    await node.serve("svc.ok", lambda m: b"ok")
    nan: Any = float("nan")  # (not what the signatures say: the point)
    for call in (lambda: node.request("svc.ok", b"", timeout=nan),
                 lambda: node.request_all("svc.ok", b"", timeout=nan),
                 lambda: node.wait_for_service("svc.ok", timeout=nan),
                 lambda: node.serve("svc.nan", lambda m: b"", concurrency=nan)):
        with pytest.raises(ConfigError):
            await asyncio.wait_for(call(), 1)


async def test_a_request_between_attempts_ends_with_closed_error_when_its_node_closes(
        make_node: MakeNode) -> None:
    """A request backing off between attempts (its server declines) when the node closes:
    ClosedError, not a ZMQError from opening a DEALER on the closed node's context."""
    client = await make_node("client")

    def declines(msg: Message) -> bytes:
        raise Declined("busy")

    await _servers(make_node, client, "svc.declines", [declines])
    requests = [asyncio.create_task(client.request("svc.declines", b"", timeout=5, retries=100))
                for _ in range(3)]
    await aeventually(lambda: client.stats["requests"] >= 6, message="retrying")
    await client.aclose()
    for request in requests:
        with pytest.raises(ClosedError):
            await asyncio.wait_for(request, 2)


async def test_a_node_serves_its_own_requests_without_the_network(make_node: MakeNode) -> None:
    """A local service answers requests from the same node."""
    node = await make_node("solo")
    await node.serve("svc.local", lambda m: m.text.upper())
    assert (await node.request("svc.local", "abc")).data == b"ABC"
    assert (await node.request("svc.local", "abc")).source_id == node.id


async def test_a_timed_out_attempt_is_retried_on_another_server(make_node: MakeNode) -> None:
    """One server hangs: each request still succeeds, by failover to the other one."""
    client = await make_node("client")
    hung = asyncio.Event()

    async def hang(msg):
        await hung.wait()
        return b"late"

    await _servers(make_node, client, "svc.flaky", [hang, lambda m: b"ok"])
    try:
        replies = [await client.request("svc.flaky", b"", timeout=3, retries=2)
                   for _ in range(4)]
    finally:
        hung.set()
    assert [r.data for r in replies] == [b"ok"] * 4


async def test_a_lone_slow_server_gets_the_whole_timeout_and_is_asked_once(
        make_node: MakeNode) -> None:
    """Attempts share the time only with servers a retry could fail over to: a lone server
    that answers within the timeout, but after a third of it, is not timed out by the first
    attempt and asked again (its work done twice, its reply thrown away)."""
    client = await make_node("client")
    calls = 0

    async def slow(msg):
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.5)
        return b"done"

    await _servers(make_node, client, "svc.lone", [slow])
    reply = await client.request("svc.lone", b"", timeout=1.2, retries=2)
    assert (reply.data, calls) == (b"done", 1)


async def test_retries_zero_means_one_attempt(make_node: MakeNode) -> None:
    """With retries=0 a hung server is a timeout, not a failover."""
    client = await make_node("client")

    async def hang(msg):
        await asyncio.sleep(10)

    await _servers(make_node, client, "svc.hang", [hang])
    with pytest.raises(RequestTimeout):
        await client.request("svc.hang", b"", timeout=0.3, retries=0)


async def test_a_server_that_stops_serving_fails_its_queued_requests_over_at_once(make_node: MakeNode) -> None:
    """Closing a service declines its backlog: those requests move on without a timeout."""
    client = await make_node("client")
    release = asyncio.Event()

    async def slow(msg):
        await release.wait()
        return b"slow"

    first = await make_node("first")
    handle = await first.serve("svc.move", slow, concurrency=1)
    await client.wait_for_service("svc.move", timeout=5)
    pending = [asyncio.create_task(client.request("svc.move", b"", timeout=10))
               for _ in range(5)]
    await aeventually(lambda: first.stats["requests_served"] == 5, message="5 at the server")
    other = await make_node("other")
    await other.serve("svc.move", lambda m: b"other")
    await aeventually(lambda: _servers_known(client, "svc.move") == 2)
    closing = asyncio.create_task(handle.aclose())  # 1 running (blocked), 4 queued
    done, _ = await asyncio.wait(pending, timeout=1.5)  # their timeout is 10 s
    assert len(done) == 4, "the queued ones failed over at once"
    assert {t.result().data for t in done} == {b"other"}
    release.set()
    await closing
    assert {(await t).data for t in pending} == {b"slow", b"other"}


async def test_malformed_frames_to_the_service_router_are_dropped_and_counted(make_node: MakeNode) -> None:
    """Garbage on the ROUTER is counted once per frame; the node keeps serving."""
    server = await make_node("server")
    await server.serve("svc.safe", lambda m: b"fine")
    ctx = zmq.asyncio.Context()
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    try:
        dealer.connect(server.endpoints["rtr"][0])
        for junk in (b"", b"ZM\x01R\xff\xff", b"XX\x01Rabc", b"ZM\x09R\x90", [b"a", b"b"]):
            if isinstance(junk, list):
                await dealer.send_multipart(junk)
            else:
                await dealer.send(junk)
        await aeventually(lambda: server.dropped_input.get("service", 0) == 5,
                          message="5 service frames dropped")
    finally:
        dealer.close()
        ctx.term()
    client = await make_node("client")
    await client.wait_for_service("svc.safe", timeout=5)
    assert (await client.request("svc.safe", b"")).data == b"fine"


async def test_bad_arguments_are_config_errors(make_node: MakeNode) -> None:
    """Invalid names, timeouts, retries, concurrency and double serving are ConfigError."""
    node = await make_node("n")
    with pytest.raises(ConfigError, match="service"):
        await node.serve("a..b", lambda m: b"")
    with pytest.raises(ConfigError, match="concurrency"):
        await node.serve("ok", lambda m: b"", concurrency=0)
    await node.serve("ok", lambda m: b"")
    with pytest.raises(ConfigError, match="already served"):
        await node.serve("ok", lambda m: b"")
    with pytest.raises(ConfigError, match="timeout"):
        await node.request("ok", b"", timeout=0)
    with pytest.raises(ConfigError, match="retries"):
        await node.request("ok", b"", retries=-1)
    with pytest.raises(ConfigError, match="service"):
        await node.request("a.*", b"")


def test_the_blocking_node_serves_a_blocking_handler_in_threads(mesh_name: str) -> None:
    """`Node.serve` runs a plain handler in worker threads: blocking calls are fine."""
    settings: dict[str, Any] = {"mesh": mesh_name, "interfaces": ["127.0.0.1"], **FAST}
    threads = set()

    def handler(msg):
        threads.add(threading.get_ident())
        time.sleep(0.05)  # blocking is allowed here
        return msg.data.upper()

    with Node(name="server", **settings) as server, Node(name="client", **settings) as client:
        service = server.serve("svc.block", handler, concurrency=4)
        client.wait_for_service("svc.block", timeout=5)
        assert client.request("svc.block", b"abc").data == b"ABC"
        started = time.monotonic()
        results = []
        workers = [threading.Thread(target=lambda i=i: results.append(
            client.request("svc.block", f"r{i}").data)) for i in range(8)]
        for t in workers:
            t.start()
        for t in workers:
            t.join(10)
        assert sorted(results) == sorted(f"R{i}".encode() for i in range(8))
        assert time.monotonic() - started < 0.4 * 8 / 4 + 0.5  # 4 at a time, not 1
        assert threading.get_ident() not in threads
        service.close()
        with pytest.raises(NoRespondersError):
            client.request("svc.block", b"x", timeout=2)


@pytest.mark.timeout(90)
async def test_requests_survive_a_server_process_sigkilled_mid_stream(mesh_name: str) -> None:
    """Two `zeromesh serve --echo` processes; one is SIGKILLed mid-stream; every request succeeds."""
    servers = [Cli(["serve", "svc.fo", "--echo", "--name", f"srv{i}"], mesh=mesh_name,
                   env=FAST_ENV)
               for i in range(2)]
    try:
        ctls = []
        for srv in servers:
            ready = srv.line("ready", timeout=15)
            ctls.append(dict(f.split("=", 1) for f in ready.split()[1:])["ctl"])
        async with AsyncNode(name="client", mesh=mesh_name, interfaces=["127.0.0.1"],
                             peers=ctls, mdns=False, **FAST) as client:
            await aeventually(lambda: _servers_known(client, "svc.fo") == 2,
                              timeout=10, message="both servers known")
            stop = asyncio.Event()
            durations: list[tuple[float, float]] = []  # (start, seconds)
            by_server: collections.Counter[str] = collections.Counter()

            async def stream(k: int) -> int:
                n = 0
                while not stop.is_set():
                    body = f"{k}-{n}"
                    t0 = time.monotonic()
                    reply = await client.request("svc.fo", body, timeout=5)
                    durations.append((t0, time.monotonic() - t0))
                    assert reply.text == body
                    by_server[reply.source] += 1
                    n += 1
                return n

            tasks = [asyncio.create_task(stream(k)) for k in range(8)]
            await aeventually(lambda: min(by_server.values(), default=0) >= 50, timeout=15,
                              message="both servers answering")
            killed_at = time.monotonic()
            servers[0].proc.kill()  # SIGKILL, our own child
            await asyncio.sleep(1.0)
            stop.set()
            async with asyncio.timeout(15):
                counts = await asyncio.gather(*tasks)  # any failed request raises here
            around = [d for t0, d in durations if killed_at - 0.5 <= t0 <= killed_at + 0.5]
            stall = max(around)
            print(f"requests={sum(counts)} split={dict(by_server)} "
                  f"max latency around the kill={stall * 1000:.1f} ms, "
                  f"failovers: late={client.stats['late_replies']}")
            assert stall < 1.0, "failover should not wait for a timeout or loss detection"
            after = sum(1 for t0, _ in durations if t0 > killed_at + 0.1)
            assert after > 0
    finally:
        for srv in servers:
            srv.close()


async def test_service_hwm_is_a_setting_and_a_full_queue_waits_instead_of_dropping(
        make_node: MakeNode) -> None:
    """``service_hwm`` bounds queued requests; at 1, 300 requests in flight all succeed.

    Requesters wait on the full queue; replies are never dropped (unbounded).
    """
    client = await make_node("client", service_hwm=1)
    server = await make_node("s0", service_hwm=1)

    async def handler(msg):
        await asyncio.sleep(0)
        return msg.data[::-1]

    await server.serve("svc.tiny", handler)
    await client.wait_for_service("svc.tiny", timeout=5)
    async with asyncio.timeout(20):
        replies = await asyncio.gather(*(client.request("svc.tiny", f"r{i}", timeout=15)
                                         for i in range(300)))
    assert [r.data for r in replies] == [f"r{i}".encode()[::-1] for i in range(300)]
    router = server._live().serving._router._sock._sync
    assert (router.getsockopt(zmq.RCVHWM), router.getsockopt(zmq.SNDHWM)) == (1, 0)
    with pytest.raises(ConfigError, match="service_hwm"):
        await make_node("bad", service_hwm=-1)
    assert NodeConfig.from_env({"ZEROMESH_SERVICE_HWM": "7"}).service_hwm == 7
