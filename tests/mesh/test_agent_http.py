"""The agent's HTTP API end to end: a real agent process, real HTTP clients (aiohttp, curl),
real peers."""

from __future__ import annotations

import asyncio
import io
import shutil
import subprocess
import time
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from mesh._support._tally import LATENCY_NAMES, OTHER
from tests.helpers import aeventually

from ._agent import SseStream, start_agent, wait_status
from ._proc import Cli
from .conftest import MakeNode

pytestmark = pytest.mark.timeout(60)


async def test_names_with_braces_are_routed_like_any_other(procs: list[Cli],
                                                           mesh_name: str) -> None:
    """Topics may hold ``{`` and ``}``: aiohttp's default route parameter refuses them,
    and every such publish, subscribe or last was a 404 "no such route"."""
    agent = start_agent(procs, mesh=mesh_name, name="side")
    async with aiohttp.ClientSession() as http, \
            http.get(f"{agent.url}/v1/subscribe/q%7Bz%7D.%3E") as stream_response:
        assert stream_response.status == 200, await stream_response.text()
        stream = SseStream(stream_response)
        await stream.subscribed()
        async with http.post(f"{agent.url}/v1/publish/q%7Bz%7D.a?retain=true",
                             data=b"encoded") as r:
            assert r.status == 202, await r.text()
        curl = await asyncio.create_subprocess_exec(  # (-g: the braces as they are)
            "curl", "-sg", "-o", "/dev/null", "-w", "%{http_code}", "--data-binary", "raw",
            f"{agent.url}/v1/publish/q{{z}}.b", stdout=subprocess.PIPE)
        raw, _ = await asyncio.wait_for(curl.communicate(), 20)
        assert raw == b"202"
        events = await stream.events(2)
        async with http.get(f"{agent.url}/v1/last/q%7Bz%7D.%3E") as r:
            assert r.status == 200, await r.text()
            last = await r.json()
    assert [(e["topic"], e["data"]) for e in events] == [("q{z}.a", "encoded"),
                                                          ("q{z}.b", "raw")]
    assert [(m["topic"], m["data"]) for m in last] == [("q{z}.a", "encoded")]


async def test_publish_reaches_own_sse_subscriber_with_headers_and_content_type(
        procs: list[Cli], mesh_name: str) -> None:
    """Two apps may share one sidecar: its own publishes reach its own SSE streams, and
    headers (traceparent, X-*) and the content type pass through untouched."""
    agent = start_agent(procs, mesh=mesh_name, name="side")
    async with aiohttp.ClientSession() as http, \
            http.get(f"{agent.url}/v1/subscribe/orders.%3E") as stream_response:
        assert stream_response.headers["Content-Type"] == "text/event-stream"
        stream = SseStream(stream_response)
        await stream.subscribed()
        headers = {"Content-Type": "application/json",
                   "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
                   "X-Tenant": "acme", "User-Agent": "not-carried"}
        for i in range(3):
            async with http.post(f"{agent.url}/v1/publish/orders.eu", headers=headers,
                                 data=b'{"n": %d}' % i) as r:
                assert r.status == 202, await r.text()
        events = await stream.events(3)
    assert [e["data"] for e in events] == ['{"n": 0}', '{"n": 1}', '{"n": 2}']
    first = events[0]
    assert first["topic"] == "orders.eu"
    assert first["source"] == "side"
    assert first["event_id"] == first["id"]
    assert first["source_id"] == agent.id
    assert first["headers"] == {"content-type": "application/json",
                                "traceparent": headers["traceparent"], "x-tenant": "acme"}
    assert len({e["id"] for e in events}) == 3


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_publishes_and_reads_sse_with_an_encoded_wildcard(procs: list[Cli], mesh_name: str) -> None:
    """A shell service needs only curl; ``acc.%3E`` is the pattern ``acc.>``."""
    agent = start_agent(procs, mesh=mesh_name, name="side")
    sse = subprocess.Popen(["curl", "-sN", "--max-time", "20", f"{agent.url}/v1/subscribe/acc.%3E"],
                           stdout=subprocess.PIPE, text=True)
    try:
        assert sse.stdout is not None
        assert sse.stdout.readline().startswith(": subscribed")
        done = subprocess.run(["curl", "-s", "-w", " %{http_code}", "-X", "POST",
                               "--data-binary", "credit 42", f"{agent.url}/v1/publish/acc.eu.7"],
                              capture_output=True, text=True, timeout=10, check=True)
        assert done.stdout.endswith(" 202"), done.stdout
        line = ""
        while not line.startswith("id: "):  # after the comment's blank line
            line = sse.stdout.readline()
            assert line, "curl's stream ended"
        lines = [line.rstrip("\n")] + [sse.stdout.readline().rstrip("\n") for _ in range(2)]
    finally:
        sse.kill()
        sse.wait(5)
        if sse.stdout is not None:
            sse.stdout.close()
    assert lines[0].startswith("id: ")
    assert '"topic":"acc.eu.7"' in lines[1]
    assert '"data":"credit 42"' in lines[1]
    assert lines[2] == ""


async def test_publish_through_one_agent_reaches_sse_on_another(procs: list[Cli], mesh_name: str) -> None:
    """Across sidecars: the subscriber's agent streams what the publisher's agent took."""
    pub_agent = start_agent(procs, mesh=mesh_name, name="pubside")
    sub_agent = start_agent(procs, mesh=mesh_name, name="subside")
    async with aiohttp.ClientSession() as http, \
            http.get(f"{sub_agent.url}/v1/subscribe/metrics.*") as response:
        stream = SseStream(response)
        await stream.subscribed()
        # PUB semantics: until the publisher's agent has the subscription, a publish is not
        # for us. Probe until one arrives, then send the real messages.
        async with asyncio.timeout(10):
            while True:
                await http.post(f"{pub_agent.url}/v1/publish/metrics.probe", data=b"?")
                try:
                    async with asyncio.timeout(0.2):
                        await stream.events(1)
                    break
                except TimeoutError:
                    continue
        for i in range(20):
            await http.post(f"{pub_agent.url}/v1/publish/metrics.cpu", data=str(i))
        real: list[dict[str, Any]] = []
        while len(real) < 20:  # late probes may still be in the stream: skip them
            real += [e for e in await stream.events(1) if e["topic"] == "metrics.cpu"]
    assert [e["data"] for e in real] == [str(i) for i in range(20)]  # all, in order
    assert {e["source"] for e in real} == {"pubside"}


async def test_a_web_page_of_another_origin_cannot_post_through_the_agent(
        procs: list[Cli], mesh_name: str) -> None:
    """A page open in a browser on this machine can make it POST to 127.0.0.1 (a form, a
    fetch): every POST a browser marks as cross-site is a 403 that sends nothing, on the
    lean routes and aiohttp's alike; clients that are not browsers, and the agent's own
    page, are not affected."""
    agent = start_agent(procs, mesh=mesh_name, name="side")
    evil = [{"Origin": "http://evil.example"}, {"Sec-Fetch-Site": "cross-site"},
            {"Origin": "null"}]
    async with aiohttp.ClientSession() as http, \
            http.get(f"{agent.url}/v1/subscribe/co.%3E") as response:
        stream = SseStream(response)
        await stream.subscribed()
        for headers in evil:
            for path, body in (("/v1/publish/co.bad", b"x"), ("/v1/push/co.q", b"x"),
                               ("/v1/request/co.svc", b"x"),
                               ("/v1/publish", b'{"topic": "co.bad", "data": "x"}')):
                async with http.post(agent.url + path, data=body, headers=headers) as r:
                    assert r.status == 403, (path, headers)
                    assert "cross-origin" in (await r.json())["error"]
        own_page = {"Origin": agent.url, "Sec-Fetch-Site": "same-origin"}
        async with http.post(f"{agent.url}/v1/publish/co.good", data=b"ok",
                             headers=own_page) as r:
            assert r.status == 202
        [event] = await stream.events(1)
    assert (event["topic"], event["data"]) == ("co.good", "ok")  # nothing of the refused


async def test_request_statuses_reply_timeout_remote_error_and_no_responders(
        procs: list[Cli], mesh_name: str, make_node: MakeNode) -> None:
    """200 with the reply body, 502 with the handler's message, 504 on timeout, 503 fast
    when nobody serves."""
    server = await make_node("server")

    async def handler(msg):
        if msg.data == b"boom":
            raise ValueError("cannot boom")
        if msg.data == b"slow":
            await asyncio.sleep(2)
        return msg.data.upper() + b" " + msg.headers.get("x-request", "").encode()

    await server.serve("upper", handler)
    agent = start_agent(procs, mesh=mesh_name, name="side")
    url = f"{agent.url}/v1/request/upper"
    async with aiohttp.ClientSession() as http:
        ok = await wait_status(http, "POST", url, 200, data=b"hello",
                               headers={"X-Request": "r1"})
        assert await ok.read() == b"HELLO r1"
        assert ok.headers["X-Zeromesh-Source"] == "server"
        async with http.post(url, data=b"boom") as r:
            assert r.status == 502
            assert "cannot boom" in (await r.json())["error"]
        started = time.monotonic()
        async with http.post(url + "?timeout=0.3&retries=0", data=b"slow") as r:
            assert r.status == 504, await r.text()
        assert time.monotonic() - started < 1.5
        started = time.monotonic()
        async with http.post(f"{agent.url}/v1/request/nobody?timeout=5", data=b"x") as r:
            assert r.status == 503
            assert "nobody" in (await r.json())["error"]
        assert time.monotonic() - started < 2.0


async def test_error_reasons_name_the_name_as_given(procs: list[Cli], mesh_name: str) -> None:
    """Error reasons quote names plainly, each unprintable character as ``?``: they were
    Python's repr, which JSON escaped again (``'w"q\\\\z\\x01'`` for ``w"q\\z`` and U+0001)."""
    agent = start_agent(procs, mesh=mesh_name, name="side")
    async with aiohttp.ClientSession() as http:
        for route in ("request", "push"):
            async with http.post(f"{agent.url}/v1/{route}/w%22q%5Cz?timeout=0.3",
                                 data=b"x") as r:
                assert r.status == 503
                assert (await r.json())["error"] == "no responders for 'w\"q\\z'", route
        for method, path, reason in [
            ("POST", "/v1/publish/w%22q%5Cz%01",
             "topic: control or surrogate character U+0001 at index 5 in 'w\"q\\z?'"),
            ("POST", "/v1/publish/t?ttl=%1B%5B2J", "ttl must be a number of seconds, not '?[2J'"),
            ("POST", "/v1/publish/t?a%5Cb=1", "unknown query parameter 'a\\b' (known: "
                                             "reliable, retain, ttl)"),
            ("GET", "/v1/subscribe/a..b%5C", "pattern: empty segment in 'a..b\\'"),
            ("GET", "/v1/subscribe/t?since=%1B%5C", "since: not a duration (90, 30s, 10m, 2h, "
                                                   "1d) or an ISO 8601 time: '?\\'"),
        ]:
            async with http.request(method, f"{agent.url}{path}",
                                    data=b"x" if method == "POST" else None) as r:
                assert r.status == 400, path
                assert (await r.json())["error"] == reason, path


async def test_push_reaches_a_worker_with_headers(procs: list[Cli], mesh_name: str, make_node: MakeNode) -> None:
    worker = await make_node("worker")
    pull = await worker.pull("jobs")
    agent = start_agent(procs, mesh=mesh_name, name="side")
    async with aiohttp.ClientSession() as http:
        for i in range(5):
            async with http.post(f"{agent.url}/v1/push/jobs?timeout=10", data=f"job {i}",
                                 headers={"X-Job": str(i)}) as r:
                assert r.status == 202, await r.text()
    got = [await pull.next(timeout=10) for _ in range(5)]
    assert [m.text for m in got] == [f"job {i}" for i in range(5)]
    assert [(m.headers or {}).get("x-job") for m in got] == [str(i) for i in range(5)]
    assert got[0].source == "side"


async def test_peers_and_healthz(procs: list[Cli], mesh_name: str, make_node: MakeNode) -> None:
    """The peer list has the documented fields and never the agent itself."""
    await make_node("other")
    agent = start_agent(procs, mesh=mesh_name, name="side")
    async with aiohttp.ClientSession() as http:
        async with asyncio.timeout(10):
            while True:
                async with http.get(f"{agent.url}/v1/peers") as r:
                    peers = await r.json()
                if peers:
                    break
                await asyncio.sleep(0.05)
        async with http.get(f"{agent.url}/healthz") as r:
            health = await r.json()
    assert [p["name"] for p in peers] == ["other"]
    peer = peers[0]
    assert peer["state"] == "alive"
    assert len(peer["id"]) == 32
    assert peer["endpoints"]
    assert peer["last_seen"] > time.time() - 60
    assert health["status"] == "ok"
    assert health["id"] == agent.id


@pytest.mark.parametrize(("method", "path", "body", "status", "reason"), [
    ("POST", "/v1/publish/a..b", b"x", 400, "empty segment"),
    ("POST", "/v1/publish/a.*", b"x", 400, "topic"),
    ("POST", "/v1/publish/a?colour=red", b"x", 400, "unknown query parameter 'colour'"),
    ("POST", "/v1/publish/a?reliable=maybe", b"x", 400, "reliable must be true or false"),
    ("POST", "/v1/publish/a?reliable=true", b"x", 400, "data dir"),
    ("POST", "/v1/publish/a", b"x" * (2 * 1024 * 1024), 413, "too large"),
    ("POST", "/v1/request/svc?timeout=-1", b"x", 400, "timeout must be > 0"),
    ("POST", "/v1/request/svc?retries=many", b"x", 400, "retries must be an integer"),
    ("POST", "/v1/push/a.>", b"x", 400, "queue"),
    ("POST", "/v1/publish/a?ttl=0", b"x", 400, "ttl must be a finite number of seconds > 0"),
    ("POST", "/v1/push/a?ttl=soon", b"x", 400, "ttl must be a number of seconds"),
    ("GET", "/v1/subscribe/a..", b"", 400, "pattern"),
    ("GET", "/v1/nothing", b"", 404, "no such route"),
    ("DELETE", "/v1/peers", b"", 405, "Method Not Allowed"),
])
async def test_bad_requests_get_4xx_with_a_json_reason(procs: list[Cli], mesh_name: str, method: str,
                                                       path: str, body: bytes, status: int,
                                                       reason: str) -> None:
    agent = start_agent(procs, mesh=mesh_name, name="side")
    async with aiohttp.ClientSession() as http, \
            http.request(method, agent.url + path, data=io.BytesIO(body) if body else None) as r:
        assert r.status == status
        assert reason in (await r.json())["error"]
        async with http.get(f"{agent.url}/healthz") as health:
            assert health.status == 200


async def test_metrics_count_what_happened(procs: list[Cli], mesh_name: str, make_node: MakeNode) -> None:
    """/metrics parses with the Prometheus client's own parser, and the counts are right."""
    server = await make_node("server")
    await server.serve("echo", lambda msg: msg.data)
    agent = start_agent(procs, mesh=mesh_name, name="side")
    async with aiohttp.ClientSession() as http:
        await wait_status(http, "POST", f"{agent.url}/v1/request/echo", 200, data=b"x")
        async with http.get(f"{agent.url}/v1/subscribe/a.%3E") as response:
            stream = SseStream(response)
            await stream.subscribed()
            for topic, n in (("a.b", 5), ("a.c", 3)):
                for _ in range(n):
                    await http.post(f"{agent.url}/v1/publish/{topic}", data=b"m")
            await stream.events(8)
        await http.post(f"{agent.url}/v1/publish/a..", data=b"m")
        async with http.get(f"{agent.url}/metrics") as r:
            assert r.status == 200
            text = await r.text()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    assert samples[("zeromesh_messages_published_total", (("topic", "a.b"),))] == 5
    assert samples[("zeromesh_messages_published_total", (("topic", "a.c"),))] == 3
    assert samples[("zeromesh_messages_received_total", (("topic", "a.b"),))] == 5
    assert samples[("zeromesh_sse_events_total", (("pattern", "a.>"),))] == 8
    assert samples[("zeromesh_http_requests_total",
                    (("route", "/v1/publish/{topic}"), ("status", "202")))] == 8
    assert samples[("zeromesh_http_requests_total",
                    (("route", "/v1/publish/{topic}"), ("status", "400")))] == 1
    assert samples[("zeromesh_requests_total", (("outcome", "ok"), ("service", "echo")))] == 1
    assert samples[("zeromesh_request_duration_seconds_count", (("service", "echo"),))] == 1
    assert samples[("zeromesh_peers", (("state", "alive"),))] == 1
    assert ("zeromesh_peers", (("state", "left"),)) not in samples  # (never listed)
    assert samples[("zeromesh_spool_messages", ())] == 0
    assert ("zeromesh_messages_dropped_total", ()) not in samples


async def test_request_durations_keep_the_busiest_services_and_the_rest_as_other(
        procs: list[Cli], mesh_name: str, make_node: MakeNode) -> None:
    """A histogram is a score of series per service: past LATENCY_NAMES services the round
    trips are summed under ``other`` (counts stay bounded by metrics_names, as before)."""
    names = [f"svc{i:02d}" for i in range(LATENCY_NAMES + 5)]
    server = await make_node("server")
    for name in names:
        await server.serve(name, lambda msg: msg.data)
    agent = start_agent(procs, mesh=mesh_name, name="side")
    async with aiohttp.ClientSession() as http:
        await wait_status(http, "POST", f"{agent.url}/v1/request/{names[-1]}", 200, data=b"x")
        for name in names[:-1]:
            async with http.post(f"{agent.url}/v1/request/{name}", data=b"x") as r:
                assert r.status == 200
        async with http.get(f"{agent.url}/metrics") as r:
            text = await r.text()
    counts = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "zeromesh_request_duration_seconds_count":
                counts[s.labels["service"]] = s.value
    assert len(counts) == LATENCY_NAMES + 1
    assert counts[OTHER] == 5
    assert sum(counts.values()) == len(names)
    assert f"zeromesh_requests_total{{outcome=\"ok\",service=\"{names[0]}\"}} 1.0" in text


async def test_stalled_sse_client_holds_bounded_bytes_and_loses_the_oldest(
        mesh_name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A plain SSE client that stops reading keeps at most MAX_PENDING_BYTES of payloads
    queued (and one write's worth in flight), losing the oldest: the bound was 100,000
    messages whatever their size, so one stalled client of 256 KiB messages held 1 GiB
    after 4,000 of them (and up to 100 GiB of 1 MiB ones)."""
    import json
    import socket

    from mesh._agent import Agent, _sse, load

    from .conftest import FAST
    monkeypatch.setattr(_sse, "MAX_PENDING_BYTES", 1024 * 1024, raising=False)
    config = load(None, env={}, flags={"name": "agent", "mesh": mesh_name, "mdns": False,
                                        "interfaces": ["127.0.0.1"], "http": "127.0.0.1:0",
                                        **FAST})
    count, size = 400, 64 * 1024
    async with Agent(config) as agent, aiohttp.ClientSession() as http:
        host, port = agent.http_url.removeprefix("http://").rsplit(":", 1)
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect((host, int(port)))
        reader, writer = await asyncio.open_connection(sock=sock, limit=1 << 20)
        writer.write(b"GET /v1/subscribe/big.%3E?retained=false HTTP/1.1\r\nHost: a\r\n\r\n")
        await asyncio.wait_for(reader.readuntil(b": subscribed\n\n"), 10)
        for i in range(count):  # (the client reads none of it meanwhile)
            await agent.node.publish("big.x", i.to_bytes(4, "big") * (size // 4))
        await agent.node.publish("big.end", b"end")
        got = []
        async with asyncio.timeout(20):
            while True:
                line = await reader.readuntil(b"\n")
                if line.startswith(b"data: "):
                    msg = json.loads(line[6:])
                    if msg["topic"] == "big.end":
                        break
                    got.append(msg["data_b64"] if "data_b64" in msg else msg["data"])
        writer.close()
        assert len(got) < count // 2, len(got)  # about 1 MiB queued, 1 MiB written, buffers

        async def dropped() -> float:
            async with http.get(f"{agent.http_url}/metrics") as r:
                for family in text_string_to_metric_families(await r.text()):
                    if family.name == "zeromesh_sse_dropped":
                        return sum(s.value for s in family.samples
                                   if s.name.endswith("_total"))
            return 0.0

        lost = await aeventually(dropped)
    assert lost == count - len(got)
