"""The zeromesh wire protocol: frame layout, msgspec envelopes, version and size checks.

Every message is a single ZeroMQ frame. Multipart messages are avoided on
purpose: libzmq (4.3.5) can abort the process on an assertion (``!_more`` in
fq.cpp) when a peer's pipe terminates while a multipart message is half read,
which happens when a publisher exits mid-stream. One frame also costs less.
So a large payload travels inside its batch: batch frames leave and arrive
without a copy of the frame (zero-copy send, views of ZeroMQ's buffer on
receive), so a payload is copied once into its batch and once out of it, as
raw pyzmq copies once on send and once on receive. Sending large payloads as
frames of their own (no copy at the sender) worked, but brings back the
multipart abort above, so it was dropped.

Each frame carries a 4-byte header, checked before anything is decoded:

======  ========  =====================================================
bytes   value     meaning
======  ========  =====================================================
0-1     ``ZM``    magic
2       1         protocol version (``PROTOCOL_VERSION``)
3       ``D|C|R`` kind: data batch, control message, service request/reply
======  ========  =====================================================

Data (PUB -> SUB): ``topic key | header | Batch``.

- *topic key* is the UTF-8 topic plus a NUL, first so that libzmq's prefix
  filter selects exact topics exactly and wildcard patterns by their literal
  prefix;
- ``Batch`` (msgpack array) = ``[source id, source name, topic seq, items,
  epoch, credit out, payloads, ts, seq, label]`` (epoch and credit out for work
  queues; a batch whose messages are all plain — best effort, no headers, no
  ttl — may be a *run*: no items, just the payloads, one timestamp ``ts`` and
  the first sequence number ``seq``, the rest numbered contiguously; ``topic
  seq`` is then the stream position of its first message, so one frame is one
  contiguous range of the stream, which work credits acknowledge by running
  total; ``label``, a pub/sub run's one content type, for typed values; a node
  says in its hello whether its PULL (``runs``) and its SUB (``sub_runs``) take
  runs, and gets items where it does not)
  where each item is ``[seq, timestamp, headers | nil, payload, reliable,
  topic, expires | nil]`` (``reliable`` and ``topic`` for spooled messages;
  ``expires``, the sender's wall-clock time after which the item must not be
  delivered: its timestamp plus the ``ttl`` it was sent with). All items
  share one topic; ``topic seq`` numbers the first item, the rest follow
  contiguously, so a receiver sees publisher-side drops as gaps. A receiver
  drops an item whose ``expires`` has passed (work items are still credited),
  counting it as expired; a peer predating ``expires`` ignores it.

Control (DEALER -> ROUTER): ``header | Control``, ``Control`` a tagged
msgpack array (tag first):

===  =========  ==========================================================
tag  message    fields
===  =========  ==========================================================
1    Hello      id, name, mesh, incarnation, ctl, pub, subs, subs_version, reply,
               pull, queues, rtr, services, durables, key, feeds (the subs that
               only feed durables' live views: no reliable messages by pub/sub),
               retains (it holds retained values), history (its history patterns),
               pubs (the topics it publishes on; nil from an older node: all),
               seq (its alive counter), digest (a summary of its membership view),
               runs (its PULL takes work runs), sub_runs (its SUB takes pub/sub runs)
2    Heartbeat  id, incarnation, subs_version, ctl, sent, echo, held (the round trip:
               a peer echoes our last `sent` and how long it held it), seq, digest,
               watching (false: the sender stops beating us)
3    Bye        id
4    Credit     id, queue, consumed, epoch, window: a worker has consumed this many of
               a pusher's messages on a queue (a running total, so a lost one is
               superseded) and now grants it this window
5    Nack       id, queue, seqs: these consumed messages failed (redeliver later)
6    Gossip     id, news, sync: membership news passed on; each piece a member's
               record (a Hello, tag 1), a Down (tag 10: id, incarnation, seq, left —
               lost or left) or a Change (tag 11: id, incarnation, base, version,
               set, added, removed — an interest delta); sync: the sender's whole
               view, answered with what of ours is newer
7    Want       id, ids: send me these members' whole records
8    Pace       id, pause: a subscription of mine is behind on your messages while
               its consumer still takes them: pause your publishing this many seconds
===  =========  ==========================================================

Service (DEALER -> ROUTER requests, ROUTER -> DEALER replies): ``header |
[ServiceFrame, ...]``, a msgpack array of one or more tagged arrays (the
requests, or replies, of one loop iteration to one peer travel together); the
ROUTER's routing-id frame is added and stripped by ZeroMQ, so each side still
reads a single frame:

===  =======  ==============================================================
tag  message  fields
===  =======  ==============================================================
1    Request  id (correlation, per requester), service, source id, source
              name, timestamp, headers | nil, payload
2    Reply    id, status (0 ok, 1 handler error, 2 not served here, 3 busy),
              timestamp, payload, error text, headers | nil (the handler's)
===  =======  ==============================================================

Retained values travel as the payload of a request to the internal service
``_zeromesh.retained``, which every node serves without announcing it: a
``RetainedQuery`` (pattern, the asker's interest version, a cursor) answered
by a ``RetainedPage`` (the publisher's name, items with their topics, the
cursor of the next page or "" at the end), both msgpack arrays. History
likewise on ``_zeromesh.history``: a ``HistoryQuery`` (pattern, since, last,
version, after, upto) answered by ``HistoryPage`` s (name, items in publishing
order, next, upto, and the publisher's history patterns).

Evolution: fields are only appended, with defaults; new message kinds get new
tags, which older peers drop and count as malformed.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Annotated, Any, Final, TypeVar

import msgspec

from .errors import ProtocolError

MAGIC: Final[bytes] = b"ZM"
PROTOCOL_VERSION: Final[int] = 1
KIND_DATA: Final[bytes] = b"D"
KIND_CONTROL: Final[bytes] = b"C"
KIND_SERVICE: Final[bytes] = b"R"
DATA_HEADER: Final[bytes] = MAGIC + bytes([PROTOCOL_VERSION]) + KIND_DATA
CONTROL_HEADER: Final[bytes] = MAGIC + bytes([PROTOCOL_VERSION]) + KIND_CONTROL
MAX_CONTROL_SIZE: Final[int] = 64 * 1024
MAX_KEY_SIZE: Final[int] = 257
"""A topic (at most 255 bytes) plus its NUL, with one byte to spare."""

MAX_PUBS: Final[int] = 64
"""Entries of a hello's `pubs` at most: past that a node announces patterns covering its
topics (``seg.>``, at last ``>``); a receiver takes a longer list as ``>``."""

FRAME_BYTES: Final[int] = 256 * 1024
"""Payload bytes a batch (pub/sub, work, service) collects before it leaves, at most (a
node with a smaller ``max_message_size`` uses that: `frame_budget`); a larger message
travels alone."""
WIRE_OVERHEAD: Final[int] = 64 * 1024
"""What a frame may carry beyond ``max_message_size`` (header, topic key, envelope)."""
ITEM_OVERHEAD: Final[int] = 32
"""About what a data item adds to its payload once encoded (for `encode_data`'s hint)."""
RUN_ITEM_OVERHEAD: Final[int] = 5
"""What a run's payload adds once encoded, at most (its msgpack bin header)."""
SERVICE_ITEM_OVERHEAD: Final[int] = 64
"""What a request or reply adds to its payload and headers, at most, besides the
service name (a request's source id and name, correlation id, timestamp)."""


def frame_budget(max_message_size: int) -> int:
    """Payload bytes a node's batches collect before they leave: `FRAME_BYTES`, or its
    ``max_message_size`` when smaller, so a batch stays within the frame a receiver of the
    same setting accepts (`max_frame`)."""
    return min(FRAME_BYTES, max_message_size)


def max_frame(max_message_size: int) -> int:
    """The largest frame a node accepts: its largest message plus the envelope."""
    return max_message_size + WIRE_OVERHEAD


MAX_SEQ: Final[int] = 2**63 - 1
"""A message's sequence is at most this (a node starts at the clock in microseconds, far
below): a receiver keeps `seq` + 1 (dedup marks), which past 2**64 - 1 msgpack cannot
encode; an item beyond it is malformed."""
Seq = Annotated[int, msgspec.Meta(ge=0, le=MAX_SEQ)]
Time = Annotated[float, msgspec.Meta(ge=-sys.float_info.max, le=sys.float_info.max)]
"""A wall-clock time in seconds: finite. A NaN or infinite timestamp is malformed: it
would reach the application as the message's time and make the latency histograms'
sums NaN or infinite for good."""


class Item(msgspec.Struct, array_like=True, gc=False):
    """One published message inside a batch."""

    seq: Seq
    """Per-source sequence; with the source id it is the message id."""
    ts: Time
    """Publisher wall clock, seconds since the epoch."""
    headers: dict[str, str] | None
    """Free application headers (e.g. ``traceparent``), passed through untouched."""
    payload: bytes
    """The user's bytes."""
    reliable: bool = False
    """Spooled by its sender: the receiver deduplicates it and its ack settles the spool."""
    topic: str = ""
    """The topic of a reliable publish (its batch may travel on a durable's queue)."""
    expires: Time | None = None
    """Publisher wall clock after which it must not be delivered (`ts` plus its ttl);
    None: never. Spooled records carry it too, so it survives restarts."""


class Spooled(msgspec.Struct, array_like=True, gc=False):
    """A reliable message as kept in the sender's spool (also the dead-letter record)."""

    kind: str
    """``q`` work queue, ``t`` topic (to durables)."""
    name: str
    """Queue or topic."""
    item: Item
    dests: list[str] = []
    """For topics: the durable queues it still has to reach."""
    attempts: int = 0
    """Failed deliveries so far (nack, lost worker, ack timeout)."""
    reason: str = ""
    """Why it was dead-lettered."""


class Batch(msgspec.Struct, array_like=True, gc=False):
    """Messages of one topic from one source, in publish order."""

    source: str
    name: str
    topic_seq: int
    items: list[Item]
    epoch: int = 0
    """Work queues: which of the pusher's streams to this worker (credits quote it back)."""
    credit_out: bool = False
    """Work queues: this batch used up the worker's credit and the pusher has more (the
    worker grows a window it drains fast; see `_window`)."""
    payloads: list[bytes] = []
    """A *run* (then `items` is empty): plain messages (best effort, no headers, no ttl)
    given as payloads alone; they share `ts` and are numbered `seq`, `seq` + 1, ... so
    neither side builds a struct per message."""
    ts: Time = 0.0
    """A run's timestamp: the sender's wall clock when its first message was sent."""
    seq: int = 0
    """The sequence number of a run's first message (the rest follow contiguously)."""
    label: str = ""
    """A run's content type, shared by all its messages (typed values; empty: none).
    A run carries no other headers."""


class Hello(msgspec.Struct, frozen=True, array_like=True, tag=1):
    """Who I am, where to reach me, and what I subscribe to."""

    id: str
    name: str
    mesh: str
    incarnation: int
    ctl: list[str]
    pub: list[str]
    subs: list[str]
    subs_version: int
    """Version of everything this node announces interest in (subs, queues, services)."""
    reply: bool = False
    pull: list[str] = []
    """Work-queue (PULL) endpoints."""
    queues: dict[str, int] = {}
    """Work queues this node pulls from, with the credit window it grants each pusher."""
    rtr: list[str] = []
    """Service (ROUTER) endpoints."""
    services: list[str] = []
    """Services this node serves."""
    durables: dict[str, str] = {}
    """Durable subscriptions of this node: their queue -> pattern."""
    key: str = ""
    """The node's CURVE public key (Z85) when it is secure."""
    feeds: list[str] = []
    """Those of `subs` that only feed durables' live views: they take best-effort
    messages alone (the durable queue brings the reliable ones), so a publisher may
    leave its reliable messages out of pub/sub for them."""
    retains: bool = False
    """This node holds retained values: a new subscription asks it for them."""
    history: list[str] = []
    """The patterns of the topics whose messages this node keeps as history."""
    pubs: list[str] | None = None
    """What this node publishes on (topics, or patterns covering them): a subscriber
    connects to its publisher only where these meet its subscriptions. None: a node that
    predates it, taken as publishing on everything (``>``)."""
    seq: int = 0
    """The member's alive counter: it raises it to refute news that it was lost."""
    digest: int = 0
    """A summary of the sender's membership view (see `_membership._gossip`): equal
    digests mean nothing to exchange."""
    runs: bool = False
    """Its PULL takes work runs (`Batch.payloads`); a node that predates them gets items."""
    sub_runs: bool = False
    """Its SUB takes pub/sub runs (`Batch.payloads` on a topic); a publisher sends items
    on the topics such a node subscribes to when it predates them."""
    ended: list[str] = []
    """Queues of durable subscriptions of this node that it ended (`end_durable`), for
    `durable_expiry` after: a publisher forgets them and frees what it spooled for them.
    A node that predates it ignores it (a trailing field)."""


class Heartbeat(msgspec.Struct, frozen=True, array_like=True, tag=2):
    """I am alive; `subs_version` tells a peer whether its view of my subs is stale."""

    id: str
    incarnation: int
    subs_version: int
    ctl: list[str]
    sent: float = 0.0
    """The sender's monotonic clock at sending (only the sender reads it, echoed)."""
    echo: float = 0.0
    """The `sent` of the receiver's last heartbeat to us (0: none yet)."""
    held: float = 0.0
    """Seconds between our receiving that heartbeat and sending this one: the receiver's
    round trip is its clock now minus `echo` minus `held`."""
    seq: int = 0
    """The sender's alive counter (see `Hello.seq`)."""
    digest: int = 0
    """The sender's membership digest (see `Hello.digest`)."""
    watching: bool = True
    """False: the sender stops beating us (we were a neighbour or a partner of its and
    are no more): stop watching its silence; it stays a member."""


class Bye(msgspec.Struct, frozen=True, array_like=True, tag=3):
    """I am leaving on purpose: drop me now, do not wait to call me lost."""

    id: str


class Credit(msgspec.Struct, frozen=True, array_like=True, tag=4):
    """Worker -> pusher: messages consumed so far on `queue` (frees that much window)."""

    id: str
    queue: str
    consumed: int
    epoch: int = 0
    window: int = 0
    """The window the worker now grants (0: unchanged)."""


class Nack(msgspec.Struct, frozen=True, array_like=True, tag=5):
    """Worker -> pusher: these reliable messages failed; sent before the credit covering them."""

    id: str
    queue: str
    seqs: list[int]
    epoch: int = 0


class Down(msgspec.Struct, frozen=True, array_like=True, tag=10):
    """News: a member was lost (silent to the members that watch it) or left."""

    id: str
    incarnation: int
    seq: int
    left: bool = False


class Change(msgspec.Struct, frozen=True, array_like=True, tag=11):
    """News: a member's interest changed from version `base` to `version` (only what
    changed: fields set whole, names added to and removed from set fields)."""

    id: str
    incarnation: int
    base: int
    version: int
    set: dict[str, Any] = {}
    added: dict[str, list[str]] = {}
    removed: dict[str, list[str]] = {}


News = Hello | Down | Change
"""Gossip's news: a member's whole record (alive), its end, or a change of its interest."""


class Gossip(msgspec.Struct, frozen=True, array_like=True, tag=6):
    """Membership news, passed on by each member that learns something from it.

    `sync`: this is the sender's whole view (it saw our digest differ); answer with
    whatever of ours is newer."""

    id: str
    news: list[News]
    sync: bool = False


class Want(msgspec.Struct, frozen=True, array_like=True, tag=7):
    """Send me these members' whole records (a change came that I could not apply)."""

    id: str
    ids: list[str]


class Pace(msgspec.Struct, frozen=True, array_like=True, tag=8):
    """Subscriber -> publisher: hold your publishing `pause` seconds (see `_pubsub._pace`)."""

    id: str
    pause: float


Control = Hello | Heartbeat | Bye | Credit | Nack | Gossip | Want | Pace

_encoder: Final = msgspec.msgpack.Encoder()
ENCODER: Final = _encoder
HELLO_DECODER: Final = msgspec.msgpack.Decoder(Hello)
_batch_decoder: Final = msgspec.msgpack.Decoder(Batch)
_control_decoder: Final = msgspec.msgpack.Decoder(Control)


_spooled_decoder: Final = msgspec.msgpack.Decoder(Spooled)


encode_spooled: Final[Callable[[Spooled], bytes]] = _encoder.encode
"""A spool record of a message (msgspec's own method: no Python call per record)."""


def decode_spooled(data: bytes) -> Spooled:
    """Raises ProtocolError for a record that is not a spooled message."""
    return decode_with(_spooled_decoder, data, "spool record")


_T = TypeVar("_T")


def decode_with(decoder: msgspec.msgpack.Decoder[_T], data: bytes, what: str) -> _T:
    """`data` decoded, or ProtocolError naming `what` it should have been."""
    try:
        return decoder.decode(data)
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"undecodable {what}: {exc}") from exc


def encode_data(key: bytes, batch: Batch, size_hint: int = 0) -> bytearray:
    """One data frame; msgspec writes straight after the prefix (no extra copy).

    `size_hint`, the encoded batch's expected size, lets the buffer be allocated
    once rather than grown (and copied) by doubling as msgspec writes a 256 KiB
    batch; msgspec trims what is left over.
    """
    buf = bytearray(len(key) + len(DATA_HEADER) + size_hint) if size_hint > 0 else bytearray()
    prefix = len(key) + len(DATA_HEADER)
    buf[:prefix] = key + DATA_HEADER
    _encoder.encode_into(batch, buf, prefix)
    return buf


def encode_control(msg: Control) -> bytearray:
    buf = bytearray(CONTROL_HEADER)
    _encoder.encode_into(msg, buf, len(buf))
    return buf


def _check_header(header: bytes | memoryview, expected: bytes) -> None:
    if header == expected:
        return
    if header[:2] != MAGIC or len(header) != 4:
        raise ProtocolError("bad magic")
    if header[2] != PROTOCOL_VERSION:
        raise ProtocolError(f"unsupported protocol version {header[2]}")
    raise ProtocolError("unexpected message kind")


def split_data(frame: bytes | memoryview) -> tuple[bytes, int]:
    """The topic key of a data frame and where its header starts.

    Raises:
        ProtocolError: no NUL-terminated key within the topic size limit.
    """
    head = frame if isinstance(frame, bytes) else bytes(frame[:MAX_KEY_SIZE])
    end = head.find(b"\x00", 0, MAX_KEY_SIZE)
    if end < 1:
        raise ProtocolError("data frame without a topic key")
    return head[: end + 1], end + 1


def decode_data(frame: bytes | memoryview, offset: int, max_size: int) -> Batch:
    """Decode the batch of a data frame whose key ends at `offset`, checking header and size first.

    Raises:
        ProtocolError: anything malformed; the caller drops and counts it.
    """
    if len(frame) - offset > max_size:
        raise ProtocolError(f"data frame of {len(frame)} bytes exceeds {max_size}")
    _check_header(frame[offset : offset + 4], DATA_HEADER)
    try:
        return _batch_decoder.decode(memoryview(frame)[offset + 4 :])
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"undecodable data: {exc}") from exc


def decode_data_message(frames: Sequence[bytes | memoryview], max_size: int
                        ) -> tuple[bytes, Batch]:
    """The topic key and batch of a received data message (pub/sub or work).

    Raises:
        ProtocolError: anything malformed; the caller drops and counts it.
    """
    if len(frames) != 1:
        raise ProtocolError(f"data message of {len(frames)} frames")
    frame = frames[0]
    key, offset = split_data(frame)
    return key, decode_data(frame, offset, max_size)


def decode_control_message(frames: Sequence[bytes]) -> Control:
    """The control message of one received control message.

    Raises:
        ProtocolError: anything malformed; the caller drops and counts it.
    """
    if len(frames) != 1:
        raise ProtocolError(f"control message of {len(frames)} frames")
    return decode_control(frames[0])


def decode_control(frame: bytes) -> Control:
    """Decode a control frame, checking header and size first.

    Raises:
        ProtocolError: anything malformed; the caller drops and counts it.
    """
    if len(frame) > MAX_CONTROL_SIZE:
        raise ProtocolError("control message too large")
    _check_header(frame[:4], CONTROL_HEADER)
    try:
        msg: Control = _control_decoder.decode(memoryview(frame)[4:])
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"undecodable control: {exc}") from exc
    return msg


# -- services -------------------------------------------------------------------

SERVICE_HEADER: Final[bytes] = MAGIC + bytes([PROTOCOL_VERSION]) + KIND_SERVICE
REPLY_OK: Final[int] = 0
REPLY_ERROR: Final[int] = 1
"""The handler raised; `error` carries its message."""
REPLY_NOT_SERVED: Final[int] = 2
"""The server does not (or no longer) serve this service: try another."""
REPLY_BUSY: Final[int] = 3
"""The server's backlog for the service is full: try another."""


class Request(msgspec.Struct, frozen=True, array_like=True, gc=False, tag=1):
    """One request to a service."""

    id: int
    """Correlation id, unique per requester node."""
    service: str
    source: str
    """Requester node id."""
    name: str
    """Requester node name."""
    ts: Time
    headers: dict[str, str] | None
    payload: bytes


class Reply(msgspec.Struct, frozen=True, array_like=True, gc=False, tag=2):
    """The answer to the request with the same `id`."""

    id: int
    status: int
    ts: Time
    payload: bytes
    error: str = ""
    headers: dict[str, str] | None = None
    """The handler's reply headers (a peer predating them ignores them)."""


ServiceFrame = Request | Reply

_service_decoder: Final = msgspec.msgpack.Decoder(list[ServiceFrame])


def encode_service(msgs: Sequence[ServiceFrame]) -> bytearray:
    """One frame carrying `msgs` (requests to one server, or replies to one requester)."""
    buf = bytearray(SERVICE_HEADER)
    _encoder.encode_into(msgs, buf, len(buf))
    return buf


def decode_service(frame: bytes, max_size: int) -> list[ServiceFrame]:
    """Decode a service frame (never empty), checking size and header first.

    Raises:
        ProtocolError: anything malformed; the caller drops and counts it.
    """
    if len(frame) > max_size:
        raise ProtocolError(f"service frame of {len(frame)} bytes exceeds {max_size}")
    _check_header(frame[:4], SERVICE_HEADER)
    try:
        msgs: list[ServiceFrame] = _service_decoder.decode(memoryview(frame)[4:])
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"undecodable service frame: {exc}") from exc
    if not msgs:
        raise ProtocolError("empty service frame")
    return msgs


_Frame = TypeVar("_Frame", Request, Reply)


def service_messages(batch: Iterable[Sequence[bytes]], parts: int, kind: type[_Frame],
                     max_size: int, drop: Callable[[str], None]
                     ) -> Iterator[tuple[Sequence[bytes], _Frame]]:
    """Each `kind` message (with its frames) of every well-formed service message of
    `parts` frames in `batch` (a ROUTER sees the requester's routing id first); the
    reason anything else is left out goes to `drop`, which counts and logs it."""
    for frames in batch:
        try:
            if len(frames) != parts:
                raise ProtocolError(f"service message of {len(frames)} frames")
            msgs = decode_service(frames[-1], max_size)
        except ProtocolError as exc:
            drop(exc.reason)
            continue
        for msg in msgs:
            if isinstance(msg, kind):
                yield frames, msg
            else:
                drop(f"a {type(msg).__name__} where a {kind.__name__} belongs")


def service_payload_size(payload: bytes, headers: dict[str, str] | None) -> int:
    """Bytes of a request's or reply's payload and headers."""
    if not headers:
        return len(payload)
    return len(payload) + sum(len(k) + len(v) for k, v in headers.items())


def kept_size(item: Item, topic: str) -> int:
    """About the bytes `item` takes encoded alone with `topic` (a retained value, a history
    entry): its headers included, so pages of such items stay within a reply's limit."""
    return service_payload_size(item.payload, item.headers) + len(topic) + ITEM_OVERHEAD


def service_frames(msgs: Sequence[ServiceFrame], budget: int) -> Iterator[bytearray]:
    """`msgs` as frames of at most `budget` payload bytes each (a larger one alone), so a
    frame stays within the receiver's limit (`max_frame`)."""
    if len(msgs) == 1:
        yield encode_service(msgs)
        return
    start, size = 0, 0
    for i, msg in enumerate(msgs):
        if isinstance(msg, Request):
            more = service_payload_size(msg.payload, msg.headers) + SERVICE_ITEM_OVERHEAD
        else:
            more = (service_payload_size(msg.payload, msg.headers) + len(msg.error)
                    + SERVICE_ITEM_OVERHEAD)
        if size and size + more > budget:
            yield encode_service(msgs[start:i])
            start, size = i, 0
        size += more
    yield encode_service(msgs[start:])
