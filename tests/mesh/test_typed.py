"""Typed payloads: Structs, dataclasses, dicts and lists in; `Message[T]` with `.value` out.

Real nodes on 127.0.0.1. A send of a non-bytes value is encoded with msgspec
and labelled with a ``content-type`` header (MessagePack unless the caller's
headers say JSON); ``type=T`` subscriptions decode by that header, skip and
count what is not a T, and keep delivering.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import threading
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest
from aiohttp import web

from mesh import AsyncNode, ConfigError, Message, Node, Reply
from mesh._agent._headers import as_json, wants_json
from tests.helpers import aeventually, eventually

from ._agent import SseStream, start_agent
from ._proc import Cli
from .conftest import FAST, MakeNode

MSGPACK = {"content-type": "application/msgpack"}
JSON = {"content-type": "application/json"}


class Reading(msgspec.Struct):
    sensor: str
    celsius: float


@dataclasses.dataclass
class Point:
    x: int
    y: int


async def _pair(make_node: MakeNode) -> tuple[AsyncNode, AsyncNode]:
    return await make_node("pub"), await make_node("sub")


async def test_a_struct_arrives_decoded_and_labelled(make_node: MakeNode) -> None:
    """Published on one node, decoded as the subscription's type on another."""
    pub, sub_node = await _pair(make_node)
    sub = await sub_node.subscribe("sensors.>", type=Reading)
    raw = await sub_node.subscribe("sensors.>")
    await pub.wait_for_subscribers("sensors.k1", 1, timeout=5)
    await pub.publish("sensors.k1", Reading("k1", 21.5), headers={"x-site": "lab"})
    msg = await sub.next(timeout=5)
    assert msg.value == Reading("k1", 21.5)
    assert msg.headers == {"x-site": "lab", **MSGPACK}
    assert msgspec.msgpack.decode(msg.data, type=Reading) == Reading("k1", 21.5)
    untyped = await raw.next(timeout=5)
    assert untyped.value == untyped.data  # no type: the payload bytes, as before
    assert untyped.decode(Reading) == Reading("k1", 21.5)
    assert isinstance(msg, Message)
    assert (sub.decode_errors, raw.decode_errors) == (0, 0)


async def test_subscriptions_of_different_types_share_a_topic(make_node: MakeNode) -> None:
    """Each typed subscription gets its own value; an untyped one still gets the bytes."""
    pub, sub_node = await _pair(make_node)
    as_struct = await sub_node.subscribe("s", type=Reading)
    as_dict = await sub_node.subscribe("s", type=dict[str, Any])
    raw = await sub_node.subscribe("s")
    await pub.wait_for_subscribers("s", 1, timeout=5)
    await pub.publish("s", Reading("k", 1.0))
    assert (await as_struct.next(timeout=5)).value == Reading("k", 1.0)
    assert (await as_dict.next(timeout=5)).value == {"sensor": "k", "celsius": 1.0}
    assert isinstance((await raw.next(timeout=5)).value, bytes)


async def test_a_dataclass_a_dict_and_a_list_too(make_node: MakeNode) -> None:
    """Anything msgspec encodes; the type may be a generic alias."""
    node = await make_node("solo")
    points = await node.subscribe("p", type=Point, retained=False)
    dicts = await node.subscribe("d", type=dict[str, float], retained=False)
    lists = await node.subscribe("l", type=list[int], retained=False)
    await node.publish("p", Point(1, 2))
    await node.publish("d", {"a": 1.5})
    await node.publish("l", [1, 2, 3])
    assert (await points.next(timeout=5)).value == Point(1, 2)
    assert (await dicts.next(timeout=5)).value == {"a": 1.5}
    assert (await lists.next(timeout=5)).value == [1, 2, 3]


async def test_json_when_the_headers_ask_for_it(make_node: MakeNode) -> None:
    """A content-type of application/json picks the JSON codec; decoding follows the label."""
    pub, sub_node = await _pair(make_node)
    sub = await sub_node.subscribe("j", type=Reading)
    await pub.wait_for_subscribers("j", 1, timeout=5)
    await pub.publish("j", Reading("k2", 3.0), headers=JSON)
    msg = await sub.next(timeout=5)
    assert msg.data == b'{"sensor":"k2","celsius":3.0}'
    assert (msg.value, msg.headers) == (Reading("k2", 3.0), JSON)
    assert msg.decode(Reading) == Reading("k2", 3.0)


async def test_bytes_and_str_are_unchanged(make_node: MakeNode) -> None:
    """No header is added to bytes or str; a JSON text published as str decodes by its label."""
    node = await make_node("solo")
    sub = await node.subscribe("b", retained=False)
    await node.publish("b", b"raw")
    await node.publish("b", '{"sensor":"s","celsius":1}', headers=JSON)
    first, second = await sub.next(timeout=5), await sub.next(timeout=5)
    assert (first.data, first.headers) == (b"raw", None)
    assert second.decode(Reading) == Reading("s", 1.0)


async def test_a_wrong_type_is_counted_and_the_next_good_one_arrives(
        make_node: MakeNode) -> None:
    """Bad payloads (another shape, not msgpack, an unknown label) are skipped and counted."""
    pub, sub_node = await _pair(make_node)
    sub = await sub_node.subscribe("s", type=Reading)
    await pub.wait_for_subscribers("s", 1, timeout=5)
    await pub.publish("s", {"sensor": "k", "celsius": "warm"})
    await pub.publish("s", b"\xc1")  # never valid MessagePack
    await pub.publish("s", Reading("k", 1.0), headers={"content-type": "application/msgpack"})
    await pub.publish("s", b"text", headers={"content-type": "text/plain"})
    await pub.publish("s", Reading("k", 2.0))
    assert [(await sub.next(timeout=5)).value for _ in range(2)] == [
        Reading("k", 1.0), Reading("k", 2.0)]
    assert sub.decode_errors == 3
    assert sub_node.traffic().totals["decode_errors"] == 3


@dataclasses.dataclass
class LockHolder:
    name: str
    lock: threading.Lock


async def test_a_node_without_decode_errors_reads_zero(make_node: MakeNode) -> None:
    """The README's ``traffic().totals["decode_errors"]`` on a node that never had one was
    a KeyError (totals were a plain dict of the counts that happened)."""
    node = await make_node("solo")
    totals = node.traffic().totals
    assert (totals["decode_errors"], totals["oversized"], totals["published"]) == (0, 0, 0)


async def test_a_type_msgspec_cannot_decode_is_refused_at_subscribe(make_node: MakeNode) -> None:
    """Found at the first message, such a type used to stop the delivery of every
    subscription of the node; `subscribe` and `pull` refuse it, and the node goes on."""
    node = await make_node("n")
    cases: list[Any] = [LockHolder, "Reading"]
    for bad in cases:
        with pytest.raises(ConfigError, match="type"):
            await node.subscribe("t.>", type=bad)
        with pytest.raises(ConfigError, match="type"):
            await node.pull("q", type=bad)
    sub = await node.subscribe("t.>", type=Reading)
    await node.publish("t.a", Reading("k", 1.0))
    assert (await sub.next(timeout=5)).value == Reading("k", 1.0)
    assert node.worker_count("q") == 0  # (no refused pull was left behind)


async def test_a_wrong_value_inside_a_run_costs_only_itself(make_node: MakeNode) -> None:
    """A run (typed values of one label, sent together) is decoded in one pass; a value in
    it that is not a T is skipped and counted, and the rest arrive in order."""
    pub, sub_node = await _pair(make_node)
    sub = await sub_node.subscribe("r", type=Reading, retained=False)  # (live at once)
    await pub.wait_for_subscribers("r", 1, timeout=5)
    for i in range(100):  # no await yields in between: they leave as one run
        await pub.publish("r", Reading("good", float(i)))
    got = [(await sub.next(timeout=5)).value for _ in range(100)]
    assert got == [Reading("good", float(i)) for i in range(100)]
    for i in range(200):
        await pub.publish("r", {"sensor": "k", "celsius": "warm"} if i == 100
                          else Reading("k", float(i)))
    got = [(await sub.next(timeout=5)).value for _ in range(199)]
    assert got == [Reading("k", float(i)) for i in range(200) if i != 100]
    assert sub.decode_errors == 1
    assert pub.traffic().totals["published"] == 300


async def test_a_typed_callback_gets_decoded_messages(make_node: MakeNode) -> None:
    got: list[Message[Reading]] = []
    node = await make_node("solo")
    await node.subscribe("c", type=Reading, callback=got.append, retained=False)
    await node.publish("c", [1, 2])  # not a Reading: skipped
    await node.publish("c", Reading("c", 5.0))
    assert [m.value for m in got] == [Reading("c", 5.0)]
    assert got[0].headers == MSGPACK
    with pytest.raises(TypeError):  # (one label shared by every typed message: read-only)
        got[0].headers["x"] = "y"  # type: ignore[index]


async def test_a_reliable_work_message_that_is_not_a_t_ends_in_the_dead_letters(
        make_node: MakeNode, tmp_path: Any) -> None:
    """Nacked at each attempt: after max_attempts it is a dead letter, to be looked at."""
    node = await make_node("solo", data_dir=str(tmp_path), max_attempts=2, retry_backoff=0.0)
    typed = await node.pull("r", type=Reading)
    await node.push("r", {"sensor": 1}, reliable=True)
    await node.push("r", Reading("ok", 1.0), reliable=True)
    assert (await typed.next(timeout=5)).value == Reading("ok", 1.0)
    asking = asyncio.ensure_future(typed.next())  # (redeliveries are decoded when asked for)
    try:
        await aeventually(lambda: len(node.dead_letters()) == 1, timeout=10)
    finally:
        asking.cancel()
    assert typed.decode_errors == 2


async def test_retained_and_reliable_typed_values(make_node: MakeNode, tmp_path: Any) -> None:
    """A typed retained value is labelled too; a reliable batch may mix bytes and values."""
    node = await make_node("solo", data_dir=str(tmp_path))
    await node.publish("r", Reading("r", 9.0), retain=True)
    sub = await node.subscribe("r", type=Reading)
    assert (await sub.next(timeout=5)).value == Reading("r", 9.0)
    mixed = await node.subscribe("m", retained=False)
    await node.publish_many("m", [b"a", Reading("m", 1.0), Reading("m", 2.0), "b"],
                            reliable=True)
    msgs = [await mixed.next(timeout=5) for _ in range(4)]
    assert [m.headers for m in msgs] == [None, MSGPACK, MSGPACK, None]
    assert msgs[2].decode(Reading) == Reading("m", 2.0)


async def test_a_type_sent_before_is_still_labelled_by_each_send(make_node: MakeNode) -> None:
    """Once a type was sent, later sends of it take a shorter path; the headers of each
    send still choose its codec, and the messages keep their order."""
    pub, sub_node = await _pair(make_node)
    sub = await sub_node.subscribe("k", type=Reading)
    await pub.wait_for_subscribers("k", 1, timeout=5)
    for i, headers in enumerate([None, None, JSON, None, JSON]):
        await pub.publish("k", Reading("k", float(i)), headers=headers)
    got = [await sub.next(timeout=5) for _ in range(5)]
    assert [m.value.celsius for m in got] == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert [dict(m.headers or {}) for m in got] == [MSGPACK, MSGPACK, JSON, MSGPACK, JSON]


async def test_an_unencodable_value_is_a_type_error(make_node: MakeNode) -> None:
    node = await make_node("solo")
    for _ in range(2):  # (a failed encode is not remembered as a type that encodes)
        with pytest.raises(TypeError):
            await node.publish("t", object())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="text/plain"):
        await node.publish("t", Reading("x", 1.0), headers={"content-type": "text/plain"})


async def test_push_and_request_with_a_struct(make_node: MakeNode) -> None:
    """Work messages and requests are encoded and labelled the same way."""
    client, worker = await _pair(make_node)
    pull = await worker.pull("jobs")
    await client.wait_for_workers("jobs", 1, timeout=5)
    await client.push("jobs", Reading("job", 4.0))
    job = await pull.next(timeout=5)
    assert (job.decode(Reading), job.headers) == (Reading("job", 4.0), MSGPACK)
    await pull.aclose()

    typed = await worker.pull("typed", type=Reading)
    await client.wait_for_workers("typed", 1, timeout=5)
    await client.push("typed", b"not msgpack \xc1")
    await client.push("typed", Reading("job", 5.0))
    good = await typed.next(timeout=5)
    assert good.value == Reading("job", 5.0)
    assert typed.decode_errors == 1

    def double(msg: Message) -> bytes:
        reading = msg.decode(Reading)
        return msgspec.msgpack.encode(Reading(reading.sensor, reading.celsius * 2))

    await worker.serve("double", double)
    await client.wait_for_service("double", timeout=5)
    reply = await client.request("double", Reading("q", 1.5), timeout=5)
    assert reply.decode(Reading) == Reading("q", 3.0)
    replies = await client.request_all("double", Reading("all", 2.0), timeout=5)
    assert [r.decode(Reading) for r in replies] == [Reading("all", 4.0)]


def test_blocking_node_typed_subscribe(mesh_name: str) -> None:
    """`Node.subscribe(type=T)` and a typed publish from the caller's thread."""
    common: dict[str, Any] = {"mesh": mesh_name, "interfaces": ["127.0.0.1"], **FAST}
    with Node(name="a", **common) as a, Node(name="b", **common) as b:
        sub = b.subscribe("t.*", type=Reading)
        a.wait_for_subscribers("t.x", 1, timeout=5)
        a.publish("t.x", {"sensor": 1})  # not a Reading
        a.publish("t.x", Reading("b", 7.5))
        a.publish_many("t.x", [Reading("b", 8.5)])
        assert [sub.next(timeout=5).value for _ in range(2)] == [
            Reading("b", 7.5), Reading("b", 8.5)]
        assert sub.decode_errors == 1
        got: list[Reading] = []
        b.subscribe("cb", type=Reading, callback=lambda m: got.append(m.value))
        a.wait_for_subscribers("cb", 1, timeout=5)
        a.publish("cb", Reading("cb", 1.0), headers=JSON)
        eventually(lambda: got == [Reading("cb", 1.0)], timeout=5)
        work = b.pull("w", type=Point)
        a.wait_for_workers("w", 1, timeout=5)
        a.push("w", Point(3, 4), timeout=5)
        assert work.next(timeout=5).value == Point(3, 4)
        assert work.decode_errors == 0
        b.serve("echo", lambda msg: msg.data)
        a.wait_for_service("echo", timeout=5)
        assert a.request("echo", Reading("e", 1.0), timeout=5).decode(Reading) == Reading("e", 1.0)


async def test_agent_sse_gives_json_to_apps_that_accept_it(
        procs: list[Cli], mesh_name: str, make_node: MakeNode) -> None:
    """With ``Accept: application/json`` a MessagePack payload arrives as JSON text (labelled
    so); without, the stream is as before (the payload's bytes, base64 when not UTF-8)."""
    agent = start_agent(procs, mesh=mesh_name, name="side")
    node = await make_node("py")
    url = f"{agent.url}/v1/subscribe/sensors.%3E"
    async with aiohttp.ClientSession() as http, \
            http.get(url, headers={"Accept": "text/event-stream, application/json"}) as j, \
            http.get(url) as plain:
        json_stream, plain_stream = SseStream(j), SseStream(plain)
        await json_stream.subscribed()
        await plain_stream.subscribed()
        await node.wait_for_subscribers("sensors.k1", 1, timeout=10)
        await node.publish("sensors.k1", Reading("k1", 21.5))
        await node.publish("sensors.k1", b"raw")
        as_json, as_is = await json_stream.events(2), await plain_stream.events(2)
    assert json.loads(as_json[0]["data"]) == {"sensor": "k1", "celsius": 21.5}
    assert as_json[0]["headers"] == {"content-type": "application/json"}
    assert as_json[1]["data"] == "raw"
    assert as_is[0]["headers"] == MSGPACK
    assert base64.b64decode(as_is[0]["data"]) == msgspec.msgpack.encode(Reading("k1", 21.5))


def test_as_json_leaves_other_payloads_alone() -> None:
    """Only MessagePack-labelled payloads that convert are changed."""
    def msg(data: bytes, headers: dict[str, str] | None) -> Message:
        return Message("t", data, "s", "id", 1, 0.0, headers)

    packed = msg(msgspec.msgpack.encode({"a": [1, b"x"]}), MSGPACK)
    assert as_json(packed).data == b'{"a":[1,"eA=="]}'
    assert as_json(packed).headers == JSON
    for same in (msg(b"\x91\xc1", MSGPACK), msg(b"raw", None), msg(b"{}", JSON)):
        assert as_json(same) is same
    assert wants_json("application/json; q=0.9")
    assert not wants_json("text/event-stream")


async def test_agent_gives_json_to_webhooks_last_and_gathered_replies_that_ask(
        procs: list[Cli], mesh_name: str, make_node: MakeNode, tmp_path: Path) -> None:
    """A webhook with ``accept = "application/json"``, and ``/v1/last`` and ``?all=true``
    asked with ``Accept: application/json``, get MessagePack payloads as JSON (labelled
    so); untyped bytes, and a webhook that did not ask, get the bytes as they are."""
    posts: asyncio.Queue[tuple[str, bytes, str]] = asyncio.Queue()

    async def hook(request: web.Request) -> web.Response:
        await posts.put((request.path, await request.read(), request.headers["Content-Type"]))
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/{which}", hook)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        base = "http://{}:{}".format(*runner.addresses[0][:2])
        config = (f'[[webhooks]]\npattern = "sensors.>"\nurl = "{base}/json"\n'
                  f'accept = "application/json"\n'
                  f'[[webhooks]]\npattern = "sensors.>"\nurl = "{base}/plain"\n')
        agent = start_agent(procs, mesh=mesh_name, name="side", config=config, tmp=tmp_path)
        node = await make_node("py")
        await node.wait_for_subscribers("sensors.k1", 1, timeout=10)  # (the agent: one peer)
        await node.publish("sensors.k1", Reading("k1", 21.5), retain=True)
        await node.publish("sensors.k1", b"raw")
        got: dict[str, list[tuple[bytes, str]]] = {"/json": [], "/plain": []}
        async with asyncio.timeout(10):
            for _ in range(4):
                path, body, content_type = await posts.get()
                got[path].append((body, content_type))
        assert [(json.loads(got["/json"][0][0]), got["/json"][0][1])] == [
            ({"sensor": "k1", "celsius": 21.5}, "application/json")]
        assert got["/json"][1] == (b"raw", "application/octet-stream")
        assert got["/plain"][0] == (msgspec.msgpack.encode(Reading("k1", 21.5)),
                                    "application/msgpack")

        def doubled(msg: Message) -> Reply:
            reading = msg.decode(Reading)
            return Reply(msgspec.msgpack.encode(Reading(reading.sensor, reading.celsius * 2)),
                         MSGPACK)

        await node.serve("double", doubled)
        ask_json = {"Accept": "application/json"}
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{agent.url}/v1/last/sensors.%3E", headers=ask_json) as r:
                last = await r.json()
            async with http.get(f"{agent.url}/v1/last/sensors.%3E") as r:
                last_as_is = await r.json()

            async def gathered(headers: dict[str, str]) -> list[dict[str, Any]]:
                async with http.post(f"{agent.url}/v1/request/double?all=true&timeout=5",
                                     data=msgspec.msgpack.encode(Reading("q", 1.5)),
                                     headers={**MSGPACK, **headers}) as r:
                    replies: list[dict[str, Any]] = await r.json()
                    return replies

            # (the agent learns of the new server by gossip: until then the list is empty)
            replies = await aeventually(lambda: gathered(ask_json), timeout=10, interval=0.05)
            replies_as_is = await gathered({})
        assert [json.loads(m["data"]) for m in last] == [{"sensor": "k1", "celsius": 21.5}]
        assert last[0]["headers"] == JSON
        assert last_as_is[0]["headers"] == MSGPACK
        assert json.loads(replies[0]["data"]) == {"sensor": "q", "celsius": 3.0}
        assert replies[0]["headers"] == JSON
        assert replies_as_is[0]["headers"] == MSGPACK
    finally:
        await runner.cleanup()

