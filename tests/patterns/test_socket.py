"""`patterns._socket`: the FD reactor over ZeroMQ sockets, on 127.0.0.1 with OS-assigned ports.

What it promises: non-blocking sends that raise our errors, not zmq's; receives that wait
once and drain what is queued, in order; a watched socket that is drained by a callback on
its FD, a bounded batch at a time, letting other callbacks run during a flood; a send that
ate the FD's edge does not strand messages already waiting (ZMQ_FD is edge-triggered); and
closing — from the delivery callback, from another callback, or while tasks wait — delivers
nothing more and raises nothing on the loop (the conftest guard checks the latter).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
import zmq

from patterns import Context, SocketClosed, WouldBlock
from patterns import _socket as sockmod
from patterns._socket import Socket
from tests.helpers import aeventually

from ._fd import fd_of, fd_readable


async def _pair(ctx: Context, *, kind: int = zmq.DEALER,
                **options: int) -> tuple[Socket, Socket]:
    """`a` bound on 127.0.0.1:0 (DEALER unless told), `b` a DEALER connected to it, whose
    send queue is unbounded: a test can queue a flood before anything reads it."""
    a = ctx.socket(kind, **options)
    b = ctx.socket(zmq.DEALER, sndhwm=0)
    b.connect(a.bind("127.0.0.1"))
    return a, b


def _collect(into: list[bytes]) -> Callable[[list[list[bytes]]], None]:
    def on_messages(batch: list[list[bytes]]) -> None:
        into.extend(frames[0] for frames in batch)
    return on_messages


def _tail_is(got: list[bytes], expected: list[bytes]) -> Callable[[], bool]:
    return lambda: got[-len(expected):] == expected


async def _idle_turns(n: int = 20) -> None:
    """Let the loop run `n` turns: a watched socket's pending callbacks run within one or two."""
    for _ in range(n):
        await asyncio.sleep(0)


# -- binding, sending, receiving ------------------------------------------------------


async def test_bind_to_port_zero_returns_the_real_endpoint(ctx: Context) -> None:
    """`bind(host)` asks the OS for a port and returns the endpoint actually bound."""
    sock = ctx.socket(zmq.DEALER)
    endpoint = sock.bind("127.0.0.1")
    host, port = endpoint.removeprefix("tcp://").rsplit(":", 1)
    assert (host, endpoint.startswith("tcp://")) == ("127.0.0.1", True)
    assert 0 < int(port) < 65536


async def test_unwatched_round_trip_in_both_directions(ctx: Context) -> None:
    """Without `watch`, `recv_many` waits on pyzmq's poll and then drains what is queued."""
    a, b = await _pair(ctx)
    async with asyncio.timeout(5):
        b.send(b"ping")
        assert await a.recv_many() == [[b"ping"]]
        a.send(bytearray(b"pong"))  # bytearray is accepted as well
        assert await b.recv_many() == [[b"pong"]]


async def test_watched_recv_many_drains_up_to_limit_in_order(ctx: Context) -> None:
    """A watched socket's `recv_many` returns batches of at most `limit`, nothing lost or
    reordered across batches."""
    a, b = await _pair(ctx)
    a.watch()
    for i in range(50):
        b.send(b"%d" % i)
    got: list[bytes] = []
    async with asyncio.timeout(5):
        while len(got) < 50:
            batch = await a.recv_many(limit=7)
            assert 1 <= len(batch) <= 7
            got.extend(frames[0] for frames in batch)
    assert got == [b"%d" % i for i in range(50)]


async def test_send_without_a_peer_raises_would_block(ctx: Context) -> None:
    """A DEALER with no pipe at all cannot queue: `send` raises WouldBlock, not zmq.Again."""
    lonely = ctx.socket(zmq.DEALER)
    with pytest.raises(WouldBlock, match="high-water mark"):
        lonely.send(b"nobody")


async def test_send_queue_holds_exactly_the_high_water_mark(ctx: Context, free_endpoint: str,
                                                            ) -> None:
    """Connected to a port nobody listens on, a DEALER queues `sndhwm` messages, then
    `send` raises WouldBlock (the socket itself stays usable)."""
    sock = ctx.socket(zmq.DEALER, sndhwm=5)
    sock.connect(free_endpoint)
    for _ in range(5):
        sock.send(b"queued")
    with pytest.raises(WouldBlock):
        sock.send(b"one too many")
    assert not sock.closed


async def test_send_routed_to_an_unknown_peer_is_dropped_silently(ctx: Context) -> None:
    """ROUTER semantics: a reply to a requester that is gone is dropped, not raised."""
    router = ctx.socket(zmq.ROUTER)
    router.bind("127.0.0.1")
    router.watch()
    router.send_routed(b"no-such-peer", b"lost")


async def test_deliver_views_hands_over_memoryviews_of_the_frames(ctx: Context) -> None:
    """`deliver_views` gives views of ZeroMQ's buffers with the right bytes in them."""
    a, b = await _pair(ctx)
    got: list[bytes] = []

    def on_views(batch: list[list[memoryview]]) -> None:
        for frames in batch:
            assert all(isinstance(frame, memoryview) for frame in frames)
            got.append(bytes(frames[0]))

    a.deliver_views(on_views)
    payloads = [bytes([i]) * (i * 100) for i in range(1, 20)]
    for payload in payloads:
        b.send(payload)
    await aeventually(lambda: len(got) == len(payloads))
    assert got == payloads


async def test_oversized_message_is_never_delivered_and_the_link_recovers(ctx: Context) -> None:
    """A message over `max_message_size` drops the connection instead of reaching the
    callback; the sender reconnects and later messages get through."""
    a = ctx.socket(zmq.DEALER, max_message_size=1024)
    b = ctx.socket(zmq.DEALER)
    b.connect(a.bind("127.0.0.1"))
    got: list[bytes] = []
    a.deliver(_collect(got))
    b.send(b"x" * 4096)

    def retry_small() -> bool:
        if not got:
            b.send(b"small")
        return bool(got)

    await aeventually(retry_small, timeout=10)
    assert set(got) == {b"small"}


# -- the callback reactor -------------------------------------------------------------


async def test_deliver_batches_a_flood_and_lets_other_callbacks_run(ctx: Context) -> None:
    """Batches hold at most `limit` messages; while a flood drains, a callback scheduled
    meanwhile gets its turn long before the flood is done, and every message still
    arrives, in order. The bound is `_DISPATCH_ROUNDS` batches per readiness callback, and
    two may already be queued in the loop's turn: `watch`'s first look and the FD's reader."""
    a, b = await _pair(ctx)
    n, limit = 2000, 4
    for i in range(n):
        b.send(b"%d" % i)
    assert fd_readable(fd_of(a), timeout=5)  # input is waiting before the reader starts
    loop = asyncio.get_running_loop()
    got: list[bytes] = []
    sizes: list[int] = []
    other_ran_at: list[int] = []

    def on_messages(batch: list[list[bytes]]) -> None:
        if not got:
            loop.call_soon(lambda: other_ran_at.append(len(got)))
        sizes.append(len(batch))
        got.extend(frames[0] for frames in batch)

    a.deliver(on_messages, limit=limit)
    await aeventually(lambda: len(got) == n)
    assert got == [b"%d" % i for i in range(n)]
    assert max(sizes) <= limit
    assert other_ran_at
    assert other_ran_at[0] <= 2 * sockmod._DISPATCH_ROUNDS * limit, other_ran_at


# A send eats the FD's edge only when no later command reaches the mailbox in between,
# which the I/O thread may do on a loaded machine: such a round still checks delivery,
# and the test goes on (bounded) until the edge case itself has happened often enough.
_EDGE_ROUNDS = 10
_MAX_EDGE_ROUNDS = 60


async def test_a_send_that_ate_the_edge_does_not_strand_waiting_messages(ctx: Context) -> None:
    """ZMQ_FD is edge-triggered: messages arrive, then the watched side sends before its
    reader has run; the send processes the "messages arrived" command and the FD falls
    silent. The socket must look again by itself, or those messages (and every later one
    on that pipe, which signals nothing new) wait forever."""
    a, b = await _pair(ctx)
    got: list[bytes] = []
    a.deliver(_collect(got))
    b.send(b"hello")  # the connection is up and the pipe has been read empty once
    await aeventually(lambda: got == [b"hello"])
    fd = fd_of(a)
    edges_eaten = 0
    for round_ in range(_MAX_EDGE_ROUNDS):
        expected = [b"%d.%d" % (round_, i) for i in range(10)]
        for message in expected:
            b.send(message)
        assert fd_readable(fd, timeout=5), "the messages never signalled"
        a.send(b"reply before reading")  # on the loop's thread: the reader has not run
        edges_eaten += not fd_readable(fd)
        await aeventually(_tail_is(got, expected), timeout=5,
                          message=f"round {round_}: messages stranded after a send")
        if edges_eaten == _EDGE_ROUNDS:
            break
    assert edges_eaten == _EDGE_ROUNDS, f"precondition: a send ate the edge {edges_eaten} times"


async def test_a_send_that_ate_the_edge_still_wakes_a_waiting_receiver(ctx: Context) -> None:
    """The same edge case with a task waiting in `recv_many` on a watched socket instead of
    a callback: the send wakes it."""
    a, b = await _pair(ctx)
    a.watch()
    fd = fd_of(a)
    edges_eaten = 0
    for round_ in range(_MAX_EDGE_ROUNDS):
        waiting = asyncio.create_task(a.recv_many())
        await asyncio.sleep(0)  # one turn: the task is now waiting for readability
        assert not waiting.done()
        b.send(b"%d" % round_)
        assert fd_readable(fd, timeout=5), "the message never signalled"
        a.send(b"reply before reading")
        edges_eaten += not fd_readable(fd)
        async with asyncio.timeout(5):
            assert await waiting == [[b"%d" % round_]]
        if edges_eaten == _EDGE_ROUNDS:
            break
    assert edges_eaten == _EDGE_ROUNDS, f"precondition: a send ate the edge {edges_eaten} times"


async def test_unwatch_stops_the_callback_and_keeps_the_messages(ctx: Context) -> None:
    """After `unwatch`, nothing is handed over and nothing is lost: watching again drains
    what arrived meanwhile."""
    a, b = await _pair(ctx)
    got: list[bytes] = []
    a.deliver(_collect(got))
    b.send(b"before")
    await aeventually(lambda: got == [b"before"])
    a.unwatch()
    b.send(b"while unwatched")
    assert fd_readable(fd_of(a), timeout=5)
    await _idle_turns()
    assert got == [b"before"]
    a.deliver(_collect(got))
    await aeventually(lambda: got == [b"before", b"while unwatched"])


@pytest.mark.loop_errors_expected
async def test_a_raising_callback_does_not_leave_the_socket_deaf(ctx: Context) -> None:
    """A delivery callback raises once (the loop's handler gets the exception) while more
    input is queued: what was queued, and what comes later, is delivered all the same.
    (The drain consumed the FD's edge; if nothing looked again, the socket would stay
    silent for good: new messages join a pipe that was never read empty, which signals
    nothing new.)"""
    a, b = await _pair(ctx)
    for i in range(10):
        b.send(b"%d" % i)
    assert fd_readable(fd_of(a), timeout=5)
    got: list[bytes] = []
    raised = False

    def on_messages(batch: list[list[bytes]]) -> None:
        nonlocal raised
        got.extend(frames[0] for frames in batch)
        more = a._sync.getsockopt(zmq.EVENTS)  # reading it is what the drain does anyway
        assert isinstance(more, int)
        if not raised and more & zmq.POLLIN:  # raise with input still queued
            raised = True
            raise RuntimeError("a bug in a reader")

    # Consume the edge first, so that the only look in the first turn is `watch`'s own: the
    # FD's reader queued in the same turn would drain what the raising look left behind.
    a._sync.getsockopt(zmq.EVENTS)
    a.deliver(on_messages, limit=1)
    await aeventually(lambda: raised)
    b.send(b"later")
    await aeventually(lambda: len(got) == 11, timeout=2)


# -- closing ----------------------------------------------------------------------------


async def test_close_inside_the_delivery_callback_ends_delivery(ctx: Context) -> None:
    """The callback closes its own socket with more messages queued: it is not called
    again, nothing raises (on the loop either), and later calls raise SocketClosed."""
    a, b = await _pair(ctx)
    for i in range(50):
        b.send(b"%d" % i)
    assert fd_readable(fd_of(a), timeout=5)
    batches: list[list[list[bytes]]] = []

    def on_messages(batch: list[list[bytes]]) -> None:
        batches.append(batch)
        a.close()

    a.deliver(on_messages, limit=1)
    await aeventually(lambda: batches)
    await _idle_turns()
    assert batches == [[[b"0"]]]
    assert a.closed
    with pytest.raises(SocketClosed):
        a.send(b"after close")
    with pytest.raises(SocketClosed):
        a.recv_nowait()
    a.close()  # a second close is harmless


async def test_close_from_another_callback_during_a_flood_ends_delivery(ctx: Context) -> None:
    """While a flood is drained in rounds, another callback closes the socket: no batch is
    handed over after the close, and nothing raises."""
    a, b = await _pair(ctx)
    for i in range(2000):
        b.send(b"%d" % i)
    assert fd_readable(fd_of(a), timeout=5)
    loop = asyncio.get_running_loop()
    closed_at: list[int] = []
    seen_closed: list[bool] = []
    count = 0

    def close_now() -> None:
        closed_at.append(count)
        a.close()

    def on_messages(batch: list[list[bytes]]) -> None:
        nonlocal count
        if count == 0:
            loop.call_soon(close_now)
        seen_closed.append(a.closed)
        count += len(batch)

    a.deliver(on_messages, limit=1)
    await aeventually(lambda: closed_at)
    await _idle_turns()
    assert not any(seen_closed)
    assert count == closed_at[0] < 2000


async def test_close_wakes_watched_waiters_with_socket_closed(ctx: Context) -> None:
    """Tasks waiting to receive or to send on a watched socket get SocketClosed at close."""
    a, _b = await _pair(ctx)
    a.watch()
    lonely = ctx.socket(zmq.DEALER)  # no peer: never writable
    lonely.watch()
    receiving = asyncio.create_task(a.recv_many())
    sending = asyncio.create_task(lonely.wait_writable())
    await asyncio.sleep(0)
    assert not receiving.done()
    assert not sending.done()
    a.close()
    lonely.close()
    async with asyncio.timeout(5):
        with pytest.raises(SocketClosed):
            await receiving
        with pytest.raises(SocketClosed):
            await sending


async def test_close_wakes_an_unwatched_receiver_with_socket_closed(ctx: Context) -> None:
    """An unwatched socket (a publisher's subscription reader, a monitor) closed while a
    task waits in `recv_many`: the task gets SocketClosed, as its callers expect
    (`except SocketClosed: return`), not a CancelledError it never asked for."""
    a, _b = await _pair(ctx)
    receiving = asyncio.create_task(a.recv_many())
    await asyncio.sleep(0)
    a.close()
    async with asyncio.timeout(5):
        with pytest.raises(SocketClosed):
            await receiving


async def test_a_send_on_a_closed_socket_never_leaves_through_a_newer_one(ctx: Context) -> None:
    """`send` after `close` raises SocketClosed, always: the mesh relies on it for a link it
    dropped (``except SocketClosed``). Were the send to reach libzmq with the old handle,
    then once libzmq's reaper had freed that socket and a new socket took its memory, the
    send would succeed — on the new socket. Tried for a bounded window (the reaper frees a
    closed socket within a millisecond or two)."""
    sink = ctx.socket(zmq.ROUTER)
    endpoint = sink.bind("127.0.0.1")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 1.0
    tries = escaped = 0
    while loop.time() < deadline and not escaped:
        tries += 1
        old = ctx.socket(zmq.DEALER)
        old.connect(endpoint)
        old.close()
        await asyncio.sleep(0.002)  # a poll interval: give the reaper a chance to free it
        new = ctx.socket(zmq.DEALER)
        new.connect(endpoint)
        try:
            old.send(b"on a closed socket")
        except SocketClosed:
            pass
        else:
            escaped += 1
        new.close()
    assert not escaped, f"a send on a closed socket went out on a newer one (try {tries})"


async def test_context_close_closes_every_socket_it_made() -> None:
    """`Context.close` closes what is still open and ends the context, within a bound."""
    other = Context()
    socks = [other.socket(kind) for kind in (zmq.DEALER, zmq.ROUTER, zmq.PUSH)]
    socks[0].bind("127.0.0.1")
    async with asyncio.timeout(5):
        await asyncio.to_thread(other.close)
    assert all(sock.closed for sock in socks)
