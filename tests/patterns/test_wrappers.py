"""The pattern wrappers over `patterns._socket`: pub/sub, push/pull, router/dealer and the
control channel, each pair on 127.0.0.1 with OS-assigned ports.

Each test checks a round trip or a behaviour the wrapper's docstring promises: readiness
markers, refcounted prefixes and PUB's dropping at the high-water mark; an unbounded push
queue and a puller that can stop and start again; bounded requests that wait rather than
drop, unbounded replies, connection events; control outboxes that drop at a small mark.
Closing a wrapper from inside its own delivery callback must end delivery quietly (the
conftest guard fails the test on any exception the loop only logged).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
import zmq

from patterns import (
    Context,
    ControlDealer,
    ControlRouter,
    Publisher,
    Puller,
    Pusher,
    ServiceDealer,
    ServiceRouter,
    SocketClosed,
    Subscriber,
)
from tests.helpers import aeventually

from ._fd import fd_of, fd_readable

Batch = list[list[bytes]]
Views = list[list[memoryview]]


def _firsts(into: list[bytes]) -> Callable[[Batch], None]:
    def on_batch(batch: Batch) -> None:
        into.extend(frames[0] for frames in batch)
    return on_batch


def _views(into: list[bytes]) -> Callable[[Views], None]:
    def on_batch(batch: Views) -> None:
        for frames in batch:
            assert isinstance(frames[0], memoryview)
            into.append(bytes(frames[0]))
    return on_batch


def _has_len(seq: list[bytes] | list[list[bytes]], n: int) -> Callable[[], bool]:
    return lambda: len(seq) == n


async def _idle_turns(n: int = 20) -> None:
    """Let the loop run `n` turns: a watched socket's pending callbacks run within one or two."""
    for _ in range(n):
        await asyncio.sleep(0)


# -- pub/sub ----------------------------------------------------------------------------


async def _markers_until(pub: Publisher, wanted: set[tuple[bool, bytes]]) -> None:
    seen: set[tuple[bool, bytes]] = set()
    async with asyncio.timeout(5):
        while not wanted <= seen:
            seen.update(await pub.markers())


async def test_pubsub_delivers_subscribed_prefixes_once_the_marker_is_seen(ctx: Context) -> None:
    """Once the publisher sees a subscriber's readiness marker, a message on a prefix
    subscribed before it is delivered (no slow-joiner loss) and other topics are not."""
    pub = Publisher(ctx)
    sub = Subscriber(ctx)
    sub.connect(pub.bind("127.0.0.1"))
    sub.add_prefix(b"a.")
    sub.set_marker(b"m1")
    got: list[bytes] = []
    sub.start(_views(got))
    await _markers_until(pub, {(True, b"m1")})
    pub.send(b"b.not-for-us")
    pub.send(b"a.first")
    pub.send(bytearray(b"a.second"))
    await aeventually(lambda: got == [b"a.first", b"a.second"])


async def test_subscriber_prefixes_are_refcounted(ctx: Context) -> None:
    """A prefix added twice stays subscribed after one removal and goes with the second;
    a new marker, once seen, says the removal is in force (old marker: unsubscribed)."""
    pub = Publisher(ctx)
    sub = Subscriber(ctx)
    sub.connect(pub.bind("127.0.0.1"))
    got: list[bytes] = []
    sub.start(_views(got))
    sub.add_prefix(b"x.")
    sub.add_prefix(b"x.")
    sub.add_prefix(b"keep.")
    sub.set_marker(b"m1")
    await _markers_until(pub, {(True, b"m1")})
    sub.remove_prefix(b"x.")
    sub.set_marker(b"m2")
    await _markers_until(pub, {(True, b"m2"), (False, b"m1")})
    pub.send(b"x.still")
    await aeventually(lambda: got == [b"x.still"])
    sub.remove_prefix(b"x.")
    sub.remove_prefix(b"x.")  # one too many: ignored
    sub.set_marker(b"m3")
    await _markers_until(pub, {(True, b"m3")})
    pub.send(b"x.gone")
    pub.send(b"keep.after")  # same connection, sent later: had x.gone matched, it came first
    await aeventually(lambda: got[-1:] == [b"keep.after"])
    assert got == [b"x.still", b"keep.after"]


async def test_publisher_drops_for_a_subscriber_behind_the_high_water_mark(ctx: Context) -> None:
    """PUB semantics: a subscriber that does not read loses messages; the publisher never
    blocks or raises, and what does arrive is in order."""
    pub = Publisher(ctx, hwm=10)
    sub = Subscriber(ctx, hwm=10)
    sub.connect(pub.bind("127.0.0.1"))
    sub.add_prefix(b"")
    sub.set_marker(b"m")
    await _markers_until(pub, {(True, b"m")})
    n = 1000
    body = b"." * (64 * 1024)  # 64 MiB in all: more than the kernel's socket buffers hold
    for i in range(n):
        pub.send(i.to_bytes(4, "big") + body)
    got: list[bytes] = []
    sub.start(_views(got))

    def end_arrived() -> bool:
        pub.send(b"end")  # itself dropped while the queues are still full: so send again
        return b"end" in got

    await aeventually(end_arrived, timeout=10)
    seqs = [int.from_bytes(m[:4], "big") for m in got if m != b"end"]
    assert seqs == sorted(set(seqs)), "out of order or duplicated"
    assert 0 < len(seqs) < n, f"expected some but not all of {n} delivered, got {len(seqs)}"


async def test_subscriber_closed_inside_its_callback_delivers_nothing_more(ctx: Context) -> None:
    pub = Publisher(ctx)
    sub = Subscriber(ctx)
    sub.connect(pub.bind("127.0.0.1"))
    sub.add_prefix(b"")
    sub.set_marker(b"m")
    await _markers_until(pub, {(True, b"m")})
    for i in range(100):
        pub.send(b"%d" % i)
    assert fd_readable(fd_of(sub._sock), timeout=5)
    batches: list[int] = []

    def on_batch(batch: Views) -> None:
        batches.append(len(batch))
        sub.close()

    sub.start(on_batch)
    await aeventually(lambda: batches)
    await _idle_turns()
    assert len(batches) == 1
    assert sub.closed


async def test_subscriber_disconnect_stops_that_publisher(ctx: Context) -> None:
    """After `disconnect`, a publisher's messages no longer arrive; `connect` again resumes
    (connecting is idempotent per endpoint, so it does not double up)."""
    pub = Publisher(ctx)
    endpoint = pub.bind("127.0.0.1")
    sub = Subscriber(ctx)
    sub.connect(endpoint)
    sub.connect(endpoint)  # no second connection
    sub.add_prefix(b"")
    sub.set_marker(b"m1")
    got: list[bytes] = []
    sub.start(_views(got))
    await _markers_until(pub, {(True, b"m1")})
    pub.send(b"one")
    pub.send(b"two")
    await aeventually(lambda: got == [b"one", b"two"])
    sub.disconnect(endpoint)
    sub.connect(endpoint)
    sub.set_marker(b"m2")  # replayed on the new connection: seen once it is up
    await _markers_until(pub, {(True, b"m2")})
    pub.send(b"three")
    await aeventually(lambda: got[-1:] == [b"three"])
    assert got == [b"one", b"two", b"three"]


# -- push/pull --------------------------------------------------------------------------


async def test_pushers_reach_one_puller_in_order_per_pusher(ctx: Context) -> None:
    """Several pushers, one puller: every message arrives, each pusher's in its order,
    handed over as views."""
    puller = Puller(ctx, max_message_size=1 << 20)
    endpoint = puller.bind("127.0.0.1")
    got: list[bytes] = []
    puller.start(_views(got))
    pushers = [Pusher(ctx, endpoint) for _ in range(3)]
    for i in range(200):
        for n, pusher in enumerate(pushers):
            pusher.send(b"%d:%d" % (n, i))
    await aeventually(lambda: len(got) == 600)
    for n in range(3):
        assert [m for m in got if m.startswith(b"%d:" % n)] == [b"%d:%d" % (n, i)
                                                                 for i in range(200)]


async def test_push_queue_is_unbounded_until_the_worker_appears(ctx: Context,
                                                                free_endpoint: str) -> None:
    """A pusher's queue has no high-water mark (the mesh's credit bounds it): far more than
    ZeroMQ's default 1000 messages queue for a worker that is not there yet, without
    WouldBlock, and all arrive in order once it binds."""
    pusher = Pusher(ctx, free_endpoint)
    n = 5000
    for i in range(n):
        pusher.send(b"%d" % i)
    puller = Puller(ctx, max_message_size=1 << 20)
    host, port = free_endpoint.removeprefix("tcp://").rsplit(":", 1)
    puller.bind(host, int(port))
    got: list[bytes] = []
    puller.start(_views(got))
    await aeventually(lambda: len(got) == n, timeout=10)
    assert got == [b"%d" % i for i in range(n)]


async def test_puller_stop_keeps_messages_for_a_later_start(ctx: Context) -> None:
    """`stop` hands nothing more over and loses nothing: `start` again delivers what
    arrived meanwhile."""
    puller = Puller(ctx, max_message_size=1 << 20)
    pusher = Pusher(ctx, puller.bind("127.0.0.1"))
    got: list[bytes] = []
    puller.start(_views(got))
    pusher.send(b"before")
    await aeventually(lambda: got == [b"before"])
    puller.stop()
    pusher.send(b"while stopped")
    assert fd_readable(fd_of(puller._sock), timeout=5)
    await _idle_turns()
    assert got == [b"before"]
    puller.start(_views(got))
    await aeventually(lambda: got == [b"before", b"while stopped"])


async def test_puller_closed_inside_its_callback_delivers_nothing_more(ctx: Context) -> None:
    puller = Puller(ctx, max_message_size=1 << 20)
    pusher = Pusher(ctx, puller.bind("127.0.0.1"))
    for i in range(100):
        pusher.send(b"%d" % i)
    assert fd_readable(fd_of(puller._sock), timeout=5)
    batches: list[int] = []

    def on_batch(batch: Views) -> None:
        batches.append(len(batch))
        puller.close()

    puller.start(on_batch)
    await aeventually(lambda: batches)
    await _idle_turns()
    assert len(batches) == 1


# -- router/dealer ----------------------------------------------------------------------


async def test_requests_and_replies_round_trip_to_the_right_dealer(ctx: Context) -> None:
    """The router sees ``[routing id, frame]``; a reply to that id reaches that dealer only,
    as a single frame."""
    router_got: list[list[bytes]] = []
    router = ServiceRouter(ctx, router_got.extend)
    endpoint = router.bind("127.0.0.1")
    router.start()
    replies: list[list[bytes]] = [[], [], []]
    dealers = [ServiceDealer(ctx, endpoint, _firsts(replies[n])) for n in range(3)]
    for n, dealer in enumerate(dealers):
        for i in range(20):
            assert dealer.try_send(b"%d:%d" % (n, i))
    await aeventually(lambda: len(router_got) == 60)
    assert all(len(frames) == 2 for frames in router_got)
    for identity, frame in router_got:
        router.reply(identity, b"re:" + frame)
    await aeventually(lambda: sum(map(len, replies)) == 60)
    for n in range(3):
        assert replies[n] == [b"re:%d:%d" % (n, i) for i in range(20)]


async def test_router_replying_before_its_reader_ran_still_gets_every_request(
        ctx: Context) -> None:
    """The edge case on the server side: requests arrive, the router sends a reply before
    its reader has run (the send eats the FD's edge), and every request is still handed
    over."""
    got: list[list[bytes]] = []
    router = ServiceRouter(ctx, got.extend)
    dealer = ServiceDealer(ctx, router.bind("127.0.0.1"), lambda batch: None)
    router.start()
    assert dealer.try_send(b"first")
    await aeventually(lambda: len(got) == 1)
    identity = got[0][0]
    fd = fd_of(router._sock)
    for round_ in range(10):
        for i in range(10):
            assert dealer.try_send(b"%d.%d" % (round_, i))
        assert fd_readable(fd, timeout=5), "the requests never signalled"
        router.reply(identity, b"a reply before reading")
        assert not fd_readable(fd), "precondition: the reply consumed the FD's edge"
        await aeventually(_has_len(got, 1 + 10 * (round_ + 1)), timeout=5,
                          message=f"round {round_}: requests stranded after a reply")


async def test_dealer_requesting_before_its_reader_ran_still_gets_every_reply(
        ctx: Context) -> None:
    """The same on the client side: replies arrive, the dealer sends a request before its
    reader has run, and every reply is still handed over."""
    requests: list[list[bytes]] = []
    router = ServiceRouter(ctx, requests.extend)
    replies: list[bytes] = []
    dealer = ServiceDealer(ctx, router.bind("127.0.0.1"), _firsts(replies))
    router.start()
    assert dealer.try_send(b"hello")
    await aeventually(lambda: requests)
    identity = requests[0][0]
    fd = fd_of(dealer._sock)
    for round_ in range(10):
        for i in range(10):
            router.reply(identity, b"%d.%d" % (round_, i))
        assert fd_readable(fd, timeout=5), "the replies never signalled"
        assert dealer.try_send(b"a request before reading")
        assert not fd_readable(fd), "precondition: the request consumed the FD's edge"
        await aeventually(_has_len(replies, 10 * (round_ + 1)), timeout=5,
                          message=f"round {round_}: replies stranded after a request")


async def test_dealer_at_the_high_water_mark_waits_and_never_drops(
        ctx: Context, free_endpoint: str) -> None:
    """The request direction is bounded by `hwm`: with the server not there yet, exactly
    `hwm` requests queue, then `try_send` says False and `send` waits; once the server is
    up, `send` completes and every request arrives, in order."""
    dealer = ServiceDealer(ctx, free_endpoint, lambda batch: None, hwm=4)
    assert [dealer.try_send(b"%d" % i) for i in range(5)] == [True] * 4 + [False]
    sending = asyncio.create_task(dealer.send(b"4"))
    await _idle_turns()
    assert not sending.done(), "send returned while the queue was full"
    got: list[bytes] = []
    router = ServiceRouter(ctx, lambda batch: got.extend(frames[1] for frames in batch), hwm=4)
    host, port = free_endpoint.removeprefix("tcp://").rsplit(":", 1)
    router.bind(host, int(port))
    router.start()
    async with asyncio.timeout(10):
        await sending
    await aeventually(lambda: len(got) == 5, timeout=10)
    assert got == [b"%d" % i for i in range(5)]


async def test_replies_are_never_dropped_for_a_requester_that_does_not_read(
        ctx: Context) -> None:
    """Replies are unbounded: a requester that reads nothing for a while (its own receive
    queue 1 deep) still gets every reply of a burst far beyond ZeroMQ's default mark."""
    requests: list[list[bytes]] = []
    router = ServiceRouter(ctx, requests.extend)
    slow = ctx.socket(zmq.DEALER, rcvhwm=1)
    slow.connect(router.bind("127.0.0.1"))
    router.start()
    slow.send(b"give me a lot")
    await aeventually(lambda: requests)
    identity = requests[0][0]
    n = 3000
    body = b"." * (16 * 1024)  # 48 MiB: beyond 1000 queued plus the kernel's buffers
    for i in range(n):
        router.reply(identity, i.to_bytes(4, "big") + body)
    got: list[int] = []
    async with asyncio.timeout(20):
        while len(got) < n:
            got.extend(int.from_bytes(frames[0][:4], "big") for frames in await slow.recv_many())
    assert got == list(range(n))


async def test_dealer_reports_connection_up_and_down(ctx: Context) -> None:
    """`connection_events` says True once the handshake is done and False when the server
    goes away."""
    router = ServiceRouter(ctx, lambda batch: None)
    dealer = ServiceDealer(ctx, router.bind("127.0.0.1"), lambda batch: None)
    router.start()
    events: list[bool] = []
    async with asyncio.timeout(5):
        while True not in events:
            events.extend(await dealer.connection_events())
        router.close()
        while events[-1] is not False:
            events.extend(await dealer.connection_events())


async def test_router_and_dealer_closed_inside_their_callbacks(ctx: Context) -> None:
    """Each side closes itself from its delivery callback with more queued: one batch
    each, no exception, and a later send raises SocketClosed."""
    router_batches: list[int] = []

    def on_requests(batch: Batch) -> None:
        router_batches.append(len(batch))
        for identity, _frame in batch:
            router.reply(identity, b"reply")
        router.close()

    router = ServiceRouter(ctx, on_requests)
    dealer_batches: list[int] = []

    def on_replies(batch: Batch) -> None:
        dealer_batches.append(len(batch))
        dealer.close()

    dealer = ServiceDealer(ctx, router.bind("127.0.0.1"), on_replies)
    for i in range(50):
        assert dealer.try_send(b"%d" % i)
    assert fd_readable(fd_of(router._sock), timeout=5)
    router.start()
    await aeventually(lambda: router_batches and dealer_batches)
    await _idle_turns()
    assert len(router_batches) == 1
    assert len(dealer_batches) == 1
    with pytest.raises(SocketClosed):
        router.reply(b"anyone", b"after close")
    with pytest.raises(SocketClosed):
        dealer.try_send(b"after close")


@pytest.mark.parametrize("which", ["publisher markers", "dealer connection events"])
async def test_waiting_reader_gets_socket_closed_at_close(ctx: Context, free_endpoint: str,
                                                          which: str) -> None:
    """The mesh's reader tasks end on ``except SocketClosed: return``: closing the wrapper
    under a waiting `markers()` or `connection_events()` must raise exactly that."""
    close: Callable[[], None]
    if which == "publisher markers":
        pub = Publisher(ctx)
        pub.bind("127.0.0.1")
        waiting: asyncio.Task[object] = asyncio.create_task(pub.markers())
        close = pub.close
    else:
        dealer = ServiceDealer(ctx, free_endpoint, lambda batch: None)
        waiting = asyncio.create_task(dealer.connection_events())
        close = dealer.close
    await asyncio.sleep(0)
    close()
    async with asyncio.timeout(5):
        with pytest.raises(SocketClosed):
            await waiting


# -- control channel --------------------------------------------------------------------


async def test_outbox_drops_beyond_its_small_high_water_mark(ctx: Context,
                                                             free_endpoint: str) -> None:
    """An outbox to an unreachable peer queues 64 control messages, then `send` says False
    (dropped) instead of raising or blocking; the next heartbeat repeats the news anyway."""
    outbox = ControlDealer(ctx, free_endpoint)
    results = [outbox.send(b"heartbeat %d" % i) for i in range(100)]
    assert results == [True] * 64 + [False] * 36


async def test_inbox_closed_inside_its_callback_delivers_nothing_more(ctx: Context) -> None:
    inbox = ControlRouter(ctx)
    outbox = ControlDealer(ctx, inbox.bind("127.0.0.1"))
    for i in range(50):
        assert outbox.send(b"%d" % i)
    assert fd_readable(fd_of(inbox._sock), timeout=5)
    batches: list[Batch] = []

    def on_messages(batch: Batch) -> None:
        batches.append(batch)
        inbox.close()

    inbox.start(on_messages)
    await aeventually(lambda: batches)
    await _idle_turns()
    assert len(batches) == 1
    assert all(len(frames) == 1 for frames in batches[0])  # routing id stripped
