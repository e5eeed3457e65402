"""Traces (issue 15): sends are PRODUCER spans, receipts CONSUMER spans, one trace per message.

In-process nodes use the SDK's in-memory exporter, installed as the global tracer provider
for the test only (and removed after it, so no other test runs traced). Agents and CLI
processes configure an SDK of their own at start (`_otel`), writing spans to a file.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDict
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from opentelemetry.util._once import Once

from mesh import Node, _trace
from mesh.errors import ConfigError
from tests.helpers import aeventually

from ._agent import start_agent
from ._otel import read_spans, traced_env
from ._proc import Cli
from .conftest import MakeNode

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """A real SDK as the global tracer provider for this test (nodes started after see it)."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    saved = trace._TRACER_PROVIDER
    trace._TRACER_PROVIDER_SET_ONCE = Once()
    trace.set_tracer_provider(provider)
    try:
        yield exporter
    finally:
        trace._TRACER_PROVIDER = saved
        trace._TRACER_PROVIDER_SET_ONCE = Once()
        provider.shutdown()
        _trace.refresh()
        assert not _trace.ON


def _one(exporter: InMemorySpanExporter, name: str, kind: SpanKind) -> ReadableSpan:
    found = [s for s in exporter.get_finished_spans() if s.name == name and s.kind == kind]
    assert len(found) == 1, [(s.name, s.kind) for s in exporter.get_finished_spans()]
    return found[0]


async def _spans(exporter: InMemorySpanExporter, name: str, kind: SpanKind) -> ReadableSpan:
    await aeventually(lambda: any(s.name == name and s.kind == kind
                                  for s in exporter.get_finished_spans()),
                      message=f"a {kind.name} span {name!r}")
    return _one(exporter, name, kind)


def _child_of(child: ReadableSpan, parent: ReadableSpan) -> None:
    assert child.context is not None
    assert parent.context is not None
    assert child.context.trace_id == parent.context.trace_id
    assert child.parent is not None
    assert child.parent.span_id == parent.context.span_id


def _traceparent(span: ReadableSpan) -> str:
    assert span.context is not None
    return f"00-{span.context.trace_id:032x}-{span.context.span_id:016x}-{span.context.trace_flags:02x}"


async def test_publish_to_a_subscriber_is_one_trace(spans: InMemorySpanExporter,
                                                    make_node: MakeNode) -> None:
    """A PRODUCER span under the app's current span, a CONSUMER span under it on the other
    node; the message carries the producer's traceparent; semantic attributes are set."""
    a = await make_node("a")
    b = await make_node("b")
    assert _trace.ON
    sub = await b.subscribe("orders.>")
    await a.wait_for_subscribers("orders.eu", timeout=5)
    with trace.get_tracer("app").start_as_current_span("checkout") as app_span:
        await a.publish("orders.eu", "one", headers={"x-kept": "yes"})
    msg = await sub.next(timeout=5)
    producer = _one(spans, "publish orders.eu", SpanKind.PRODUCER)
    consumer = await _spans(spans, "receive orders.eu", SpanKind.CONSUMER)
    assert isinstance(app_span, ReadableSpan)
    _child_of(producer, app_span)
    _child_of(consumer, producer)
    assert msg.headers is not None
    assert msg.headers["traceparent"] == _traceparent(producer)
    assert msg.headers["x-kept"] == "yes"
    assert producer.attributes is not None
    assert dict(producer.attributes).items() >= {
        "messaging.system": "zeromesh", "messaging.destination.name": "orders.eu",
        "messaging.operation": "publish"}.items()
    assert consumer.attributes is not None
    assert dict(consumer.attributes).items() >= {
        "messaging.system": "zeromesh", "messaging.destination.name": "orders.eu",
        "messaging.operation": "receive", "messaging.message.id": msg.id,
        "messaging.destination.subscription.name": "orders.>"}.items()


async def test_an_explicit_traceparent_is_the_producers_parent(spans: InMemorySpanExporter,
                                                               make_node: MakeNode) -> None:
    """An app's own traceparent header is not lost: the PRODUCER span is its child (and the
    header sent names the producer), tracestate travels along."""
    a = await make_node("a")
    sub = await a.subscribe("t")
    given = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    await a.publish("t", "x", headers={"traceparent": given, "tracestate": "k=v"})
    msg = await sub.next(timeout=5)
    producer = _one(spans, "publish t", SpanKind.PRODUCER)
    assert producer.context is not None
    assert producer.context.trace_id == 0x0af7651916cd43dd8448eb211c80319c
    assert producer.parent is not None
    assert producer.parent.span_id == 0xb7ad6b7169203331
    assert msg.headers is not None
    assert msg.headers["traceparent"] == _traceparent(producer)
    assert msg.headers["tracestate"] == "k=v"


async def test_a_traceparent_spelled_in_capitals_or_unreadable_is_not_sent_beside_ours(
        spans: InMemorySpanExporter, make_node: MakeNode) -> None:
    """``Traceparent`` (as HTTP spells it) is the app's parent too, and the message carries
    one traceparent, the producer's; a tracestate beside an unreadable traceparent belongs
    to no trace of ours and is dropped with it."""
    a = await make_node("a")
    sub = await a.subscribe("t.>")
    given = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    await a.publish("t.caps", "x", headers={"Traceparent": given, "x-kept": "yes"})
    await a.publish("t.bad", "x", headers={"traceparent": "garbage", "tracestate": "k=v"})
    caps, bad = await sub.next(timeout=5), await sub.next(timeout=5)
    producer = _one(spans, "publish t.caps", SpanKind.PRODUCER)
    assert producer.parent is not None
    assert producer.parent.span_id == 0xb7ad6b7169203331
    assert caps.headers == {"traceparent": _traceparent(producer), "x-kept": "yes"}
    assert bad.headers == {"traceparent": _traceparent(_one(spans, "publish t.bad",
                                                            SpanKind.PRODUCER))}


async def test_a_callback_runs_inside_its_consumer_span(spans: InMemorySpanExporter,
                                                        make_node: MakeNode) -> None:
    a = await make_node("a")
    b = await make_node("b")
    inside: list[trace.SpanContext] = []
    await b.subscribe("cb", callback=lambda msg: inside.append(
        trace.get_current_span().get_span_context()))
    await a.wait_for_subscribers("cb", timeout=5)
    await a.publish("cb", "x")
    consumer = await _spans(spans, "process cb", SpanKind.CONSUMER)
    _child_of(consumer, _one(spans, "publish cb", SpanKind.PRODUCER))
    assert inside == [consumer.context]


async def test_push_to_a_worker_and_request_to_a_server(spans: InMemorySpanExporter,
                                                        make_node: MakeNode) -> None:
    """push -> the worker's handler; request -> the service handler (current in it); the
    request's PRODUCER span lasts until the reply."""
    a = await make_node("a")
    b = await make_node("b")
    handled: list[str] = []

    async def work(msg: Any) -> None:
        handled.append(msg.text)

    def answer(msg: Any) -> str:
        return format(trace.get_current_span().get_span_context().span_id, "016x")

    await b.pull("jobs", handler=work)
    await b.serve("svc", answer)
    await a.wait_for_workers("jobs", timeout=5)
    await a.wait_for_service("svc", timeout=5)
    await a.push("jobs", "job")
    reply = await a.request("svc", "q", timeout=5)
    push = _one(spans, "push jobs", SpanKind.PRODUCER)
    taken = await _spans(spans, "receive jobs", SpanKind.CONSUMER)
    worked = await _spans(spans, "process jobs", SpanKind.CONSUMER)
    _child_of(taken, push)
    _child_of(worked, push)
    assert handled == ["job"]
    request = _one(spans, "request svc", SpanKind.PRODUCER)
    served = _one(spans, "process svc", SpanKind.CONSUMER)
    _child_of(served, request)
    assert served.context is not None
    assert reply.text == format(served.context.span_id, "016x")
    assert request.end_time is not None
    assert served.end_time is not None
    assert request.end_time >= served.end_time


async def test_a_reliable_message_to_a_durable(spans: InMemorySpanExporter,
                                               make_node: MakeNode, tmp_path: Path) -> None:
    """A reliable publish (one span for its batch) reaches a durable through the spool."""
    a = await make_node("a", data_dir=str(tmp_path / "a"))
    b = await make_node("b", data_dir=str(tmp_path / "b"))
    durable = await b.subscribe_durable("audit.>", "log")
    await a.wait_for_durables("audit.x", timeout=5)
    await a.publish_many("audit.x", ["one", "two"], reliable=True)
    got = [await durable.next(timeout=5), await durable.next(timeout=5)]
    assert [m.text for m in got] == ["one", "two"]
    producer = _one(spans, "publish audit.x", SpanKind.PRODUCER)
    assert producer.attributes is not None
    assert producer.attributes["messaging.batch.message_count"] == 2
    await aeventually(lambda: len([s for s in spans.get_finished_spans()
                                   if s.kind == SpanKind.CONSUMER]) == 2)
    for consumer in spans.get_finished_spans():
        if consumer.kind == SpanKind.CONSUMER:
            _child_of(consumer, producer)


async def test_without_a_configured_sdk_nothing_is_added(make_node: MakeNode) -> None:
    """The API imported but no provider set (the default proxy): off, headers untouched."""
    a = await make_node("a")
    assert not _trace.ON
    sub = await a.subscribe("t")
    await a.publish("t", "x")
    assert (await sub.next(timeout=5)).headers is None


def test_without_a_configured_sdk_opentelemetry_is_not_even_imported(tmp_path: Path) -> None:
    code = textwrap.dedent("""
        import asyncio, sys
        from mesh import AsyncNode, _trace

        async def main():
            async with AsyncNode(name="solo", mesh="untraced") as node:
                sub = await node.subscribe("t")
                await node.publish("t", "x")
                msg = await sub.next(timeout=5)
                assert msg.headers is None, msg.headers
            assert not _trace.ON
            print(sorted(m for m in sys.modules if m.startswith("opentelemetry")))

        asyncio.run(main())
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True, cwd=tmp_path).stdout
    assert out.strip() == "[]"


@pytest.fixture
async def hook_app() -> AsyncIterator[tuple[str, list[CIMultiDict[str]]]]:
    """An app behind the agent: records each POST's headers, answers 204."""
    posts: list[CIMultiDict[str]] = []

    async def handle(request: web.Request) -> web.Response:
        await request.read()
        posts.append(request.headers.copy())
        return web.Response(status=204)

    web_app = web.Application()
    web_app.router.add_post("/hook", handle)
    runner = web.AppRunner(web_app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        yield f"http://{host}:{port}/hook", posts
    finally:
        await runner.cleanup()


async def test_an_agent_traces_its_webhook_posts_and_sse(
        spans: InMemorySpanExporter, make_node: MakeNode, procs: list[Cli], mesh_name: str,
        tmp_path: Path, hook_app: tuple[str, list[CIMultiDict[str]]]) -> None:
    """An agent with an SDK of its own (configured at its start, as opentelemetry-instrument
    would): a message published here gets its webhook span there, whose traceparent the POST
    carries, and an SSE span; all in the publisher's trace."""
    url, posts = hook_app
    file = tmp_path / "agent-spans.jsonl"
    config = f'[[webhooks]]\nurl = "{url}"\npattern = "hooked.>"\n'
    agent = start_agent(procs, mesh=mesh_name, name="side", config=config, tmp=tmp_path,
                        env=traced_env(tmp_path, file))
    node = await make_node("pub")
    async with aiohttp.ClientSession() as http, http.get(
            f"{agent.url}/v1/subscribe/hooked.>", timeout=aiohttp.ClientTimeout(total=30)
    ) as stream:
        assert await stream.content.readline() == b": subscribed\n"
        await node.wait_for_subscribers("hooked.x", timeout=10)
        await node.publish("hooked.x", "hello")
        async with asyncio.timeout(15):
            while b"hello" not in await stream.content.readline():
                pass
    await aeventually(lambda: len(posts) == 1, timeout=10)
    producer = _one(spans, "publish hooked.x", SpanKind.PRODUCER)
    assert producer.context is not None
    trace_id = f"{producer.context.trace_id:032x}"

    def theirs(operation: str) -> dict[str, Any]:
        found = [s for s in read_spans(file) if s["kind"] == "CONSUMER"
                 and s["attributes"].get("messaging.operation.name") == operation]
        assert len(found) == 1, read_spans(file)
        return found[0]

    webhook = await aeventually(lambda: theirs("webhook"), timeout=10)
    assert webhook["trace_id"] == trace_id
    assert webhook["parent_id"] == f"{producer.context.span_id:016x}"
    assert webhook["attributes"]["messaging.operation.name"] == "webhook"
    assert posts[0]["traceparent"].startswith(f"00-{trace_id}-{webhook['span_id']}-")
    sse = theirs("sse")
    assert sse["trace_id"] == trace_id
    assert sse["parent_id"] == f"{producer.context.span_id:016x}"



def test_blocking_best_effort_publishes_keep_each_callers_parent(
        spans: InMemorySpanExporter, mesh_name: str) -> None:
    """The blocking Node hands best-effort publishes to its loop in batches: each PRODUCER
    span is still the child of the span current where *that* publish was called, not of
    the one whose call woke the loop (another request's trace)."""
    tracer = trace.get_tracer("app")
    with Node(name="a", mesh=mesh_name, interfaces=["127.0.0.1"], mdns=False) as node:
        sub = node.subscribe("t")
        parents = {}
        for i in range(50):  # faster than the loop drains: several share a batch
            with tracer.start_as_current_span(f"request {i}") as app_span:
                node.publish("t", str(i))
            parents[str(i)] = app_span.get_span_context().span_id
        got = [sub.next(timeout=5) for _ in range(50)]
    producers = {s.context.span_id: s for s in spans.get_finished_spans()
                 if s.kind == SpanKind.PRODUCER and s.context is not None}
    wrong = []
    for msg in got:
        assert msg.headers is not None
        producer = producers[int(msg.headers["traceparent"].split("-")[2], 16)]
        if producer.parent is None or producer.parent.span_id != parents[msg.text]:
            wrong.append(msg.text)
    assert wrong == []


async def test_bad_headers_fail_as_they_do_untraced(spans: InMemorySpanExporter,
                                                    make_node: MakeNode) -> None:
    """Headers that are not a str -> str mapping raise the untraced send's TypeError or
    ConfigError, not an AttributeError from inside the propagator."""
    a = await make_node("a", mdns=False)
    bad: list[Any] = [[("a", "b")], "abc", {1: "x"}, {"traceparent": 5}]
    for headers in bad:
        for send in (lambda h: a.publish("t", "x", headers=h),
                     lambda h: a.push("q", "x", headers=h, timeout=0.1),
                     lambda h: a.request("s", "x", headers=h, timeout=0.1),
                     lambda h: a.request_all("s", "x", headers=h, timeout=0.1)):
            with pytest.raises(TypeError, match="headers"):
                await send(headers)
    with pytest.raises(ConfigError, match="not valid Unicode"):
        await a.publish("t", "x", headers={"traceparent": "\udcff"})


async def test_a_bulk_publish_joins_the_requests_trace(spans: InMemorySpanExporter,
                                                       mesh_name: str, tmp_path: Path) -> None:
    """``POST /v1/publish`` with a ``traceparent`` header: its lines' PRODUCER spans are
    children of it (best effort and reliable alike), not each a new trace; a line's own
    traceparent still wins."""
    from mesh._agent import Agent, load

    from .conftest import FAST
    given = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    own = "00-11111111111111111111111111111111-2222222222222222-01"
    config = load(None, env={}, flags={"name": "agent", "mesh": mesh_name, "mdns": False,
                                        "interfaces": ["127.0.0.1"], "http": "127.0.0.1:0",
                                        "data_dir": str(tmp_path / "a"), **FAST})
    body = b"".join(line + b"\n" for line in (
        b'{"topic": "bulk.a", "data": "1"}',
        b'{"topic": "bulk.b", "data": "2", "reliable": true}',
        b'{"topic": "bulk.c", "data": "3", "headers": {"traceparent": "%s"}}' % own.encode()))
    async with Agent(config) as agent, aiohttp.ClientSession() as http, http.post(
            f"{agent.http_url}/v1/publish", data=body, headers={"traceparent": given}
    ) as response:
        assert response.status == 202, await response.text()
    parents = {s.name: (s.parent.trace_id, s.parent.span_id) if s.parent else None
               for s in spans.get_finished_spans() if s.kind == SpanKind.PRODUCER}
    assert parents == {"publish bulk.a": (0x0af7651916cd43dd8448eb211c80319c, 0xb7ad6b7169203331),
                       "publish bulk.b": (0x0af7651916cd43dd8448eb211c80319c, 0xb7ad6b7169203331),
                       "publish bulk.c": (0x11111111111111111111111111111111, 0x2222222222222222)}


async def test_a_gathering_requests_span_lasts_until_the_gathering_ends(
        spans: InMemorySpanExporter, make_node: MakeNode) -> None:
    """`request_all`'s PRODUCER span, like `request`'s, ends after the servers answered
    (it ended as the request was built, before it was even sent)."""
    a = await make_node("a", mdns=False)

    async def answer(msg: Any) -> str:
        await asyncio.sleep(0.02)
        return "x"

    await a.serve("svc", answer)
    assert [r.text for r in await a.request_all("svc", "q", timeout=5)] == ["x"]
    request = _one(spans, "request svc", SpanKind.PRODUCER)
    served = _one(spans, "process svc", SpanKind.CONSUMER)
    _child_of(served, request)
    assert request.end_time is not None
    assert served.end_time is not None
    assert request.end_time >= served.end_time
