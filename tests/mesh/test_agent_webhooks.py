"""Webhooks against a real local HTTP app: retries then ack, dead letters, replay, ordering,
bounded concurrency."""

from __future__ import annotations

import asyncio
import json
import signal
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import aiohttp
import msgspec
import pytest
from aiohttp import web
from multidict import CIMultiDict
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import CountsInFlight, aeventually, free_port

from ._agent import start_agent
from ._proc import Cli
from .conftest import MakeNode

if TYPE_CHECKING:
    from mesh._agent import Agent

pytestmark = pytest.mark.timeout(60)


@dataclass
class App(CountsInFlight):
    """The application behind the sidecar: records each POST; fails as told."""

    url: str = ""
    fail_first: int = 0
    """Answer 503 to the first N POSTs of each message."""
    always_fail: bool = False
    attempts: Counter[str] = field(default_factory=Counter)
    accepted: list[tuple[str, bytes, CIMultiDict[str]]] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    """Each POST's path and query."""

    async def handle(self, request: web.Request) -> web.Response:
        msg_id = request.headers["X-Zeromesh-Id"]
        self.paths.append(request.path_qs)
        self.attempts[msg_id] += 1
        async with self.serving():
            body = await request.read()
            if self.always_fail or self.attempts[msg_id] <= self.fail_first:
                return web.Response(status=503, text="not now")
            self.accepted.append((msg_id, body, request.headers.copy()))
            return web.Response(status=204)


@pytest.fixture
async def app() -> AsyncIterator[App]:
    state = App()
    web_app = web.Application()
    web_app.router.add_post("/hook", state.handle)
    runner = web.AppRunner(web_app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    state.url = f"http://{host}:{port}/hook"
    try:
        yield state
    finally:
        if state.hold is not None:
            state.hold.set()
        await runner.cleanup()


def hook_config(url: str, **keys: object) -> str:
    lines = ["[[webhooks]]", f'url = "{url}"']
    for key, value in keys.items():
        lines.append(f"{key} = {value!r}".replace("'", '"'))
    return "\n".join(lines) + "\n"


async def metric(http: aiohttp.ClientSession, base: str, name: str, **labels: str) -> float:
    async with http.get(f"{base}/metrics") as r:
        text = await r.text()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return 0.0


async def test_failed_posts_are_retried_then_acked_in_publish_order(
        procs: list[Cli], mesh_name: str, tmp_path: Path, app: App) -> None:
    """Each message is POSTed until a 2xx; with concurrency 1 the app sees the publish order,
    and each message is accepted exactly once."""
    app.fail_first = 2
    config = hook_config(app.url, pattern="orders.>", durable="hook", attempts=5,
                         backoff=0.02, concurrency=1)
    agent = start_agent(procs, "--data-dir", str(tmp_path / "agent"), mesh=mesh_name,
                        name="side", config=config, tmp=tmp_path)
    async with aiohttp.ClientSession() as http:
        for i in range(10):
            async with http.post(f"{agent.url}/v1/publish/orders.eu?reliable=true",
                                 data=f"order {i}",
                                 headers={"Content-Type": "text/plain",
                                          "traceparent": f"00-{i:032x}-{i:016x}-01"}) as r:
                assert r.status == 202, await r.text()
        await app.wait_until(lambda: len(app.accepted) == 10)
        assert [body for _, body, _ in app.accepted] == [f"order {i}".encode() for i in range(10)]
        assert all(n == 3 for n in app.attempts.values())
        assert len(app.attempts) == 10
        _, _, headers = app.accepted[4]
        assert headers["Content-Type"] == "text/plain"
        assert headers["traceparent"] == f"00-{4:032x}-{4:016x}-01"
        assert headers["X-Zeromesh-Topic"] == "orders.eu"
        assert headers["X-Zeromesh-Source"] == "side"
        label = "0:orders.>"
        assert await metric(http, agent.url, "zeromesh_webhook_deliveries_total",
                            webhook=label, outcome="ok") == 10
        assert await metric(http, agent.url, "zeromesh_webhook_deliveries_total",
                            webhook=label, outcome="retry") == 20


async def test_message_headers_named_as_http_own_come_renamed_and_the_body_whole(
        procs: list[Cli], mesh_name: str, tmp_path: Path, app: App) -> None:
    """A message header such as content-length or host cannot pose as the POST's own: it
    comes as X-Zeromesh-Header-<name> (as reply headers do), so the body arrives whole."""
    config = hook_config(app.url, pattern="orders.>")
    agent = start_agent(procs, mesh=mesh_name, name="side", config=config, tmp=tmp_path)
    line = {"topic": "orders.eu", "data": "hello",
            "headers": {"content-length": "1", "host": "evil", "x-k": "v"}}
    async with aiohttp.ClientSession() as http, \
            http.post(f"{agent.url}/v1/publish", data=json.dumps(line)) as r:
        assert r.status == 202, await r.text()
    await app.wait_until(lambda: len(app.accepted) == 1)
    [(_, body, headers)] = app.accepted
    assert body == b"hello"
    assert headers["X-Zeromesh-Header-Content-Length"] == "1"
    assert headers["X-Zeromesh-Header-Host"] == "evil"
    assert headers["Host"] != "evil"
    assert headers["X-K"] == "v"


async def test_a_webhook_that_always_fails_dead_letters_then_replay_delivers(
        procs: list[Cli], mesh_name: str, tmp_path: Path, app: App) -> None:
    """After `attempts` POSTs the message is in the dead-letter spool; once the app is
    fixed, replaying delivers it."""
    app.always_fail = True
    config = hook_config(app.url, queue="jobs", attempts=3, backoff=0.01)
    data_dir = tmp_path / "agent"
    agent = start_agent(procs, "--data-dir", str(data_dir), mesh=mesh_name, name="side",
                        config=config, tmp=tmp_path)
    async with aiohttp.ClientSession() as http:
        for i in range(2):
            async with http.post(f"{agent.url}/v1/push/jobs", data=f"job {i}") as r:
                assert r.status == 202, await r.text()

        async def both_dead_lettered() -> bool:
            return await metric(http, agent.url, "zeromesh_dead_letters") >= 2

        await aeventually(both_dead_lettered, timeout=15, interval=0.05)
        assert sum(app.attempts.values()) == 6
        assert not app.accepted
        assert await metric(http, agent.url, "zeromesh_webhook_deliveries_total",
                            outcome="dead_letter") == 2
        app.always_fail = False
        async with http.post(f"{agent.url}/v1/dead-letters/replay") as r:
            assert r.status == 202
            assert (await r.json())["replayed"] == 2
        await app.wait_until(lambda: len(app.accepted) == 2)
        assert sorted(body for _, body, _ in app.accepted) == [b"job 0", b"job 1"]

        async def spool_empty() -> bool:
            return await metric(http, agent.url, "zeromesh_spool_messages") == 0

        await aeventually(spool_empty, timeout=10, interval=0.05)
        assert await metric(http, agent.url, "zeromesh_dead_letters") == 0


async def test_a_redirect_is_no_ack_and_is_not_followed(
        procs: list[Cli], mesh_name: str, tmp_path: Path) -> None:
    """A 3xx is "anything else": retried, then dead-lettered. It used to be followed: a 302
    turned the POST into a body-less GET whose 200 acked a message the app never got."""
    seen: list[tuple[str, str]] = []

    async def record(request: web.Request) -> web.Response:
        seen.append((request.method, request.path))
        if request.path == "/hook":
            raise web.HTTPFound("/landing")
        return web.Response(text="a page")

    web_app = web.Application()
    web_app.router.add_route("*", "/{path}", record)
    runner = web.AppRunner(web_app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        config = hook_config(f"http://{host}:{port}/hook", queue="jobs", attempts=2,
                             backoff=0.01)
        agent = start_agent(procs, "--data-dir", str(tmp_path / "agent"), mesh=mesh_name,
                            name="side", config=config, tmp=tmp_path)
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{agent.url}/v1/push/jobs?reliable=true", data=b"j") as r:
                assert r.status == 202, await r.text()

            async def dead_lettered() -> bool:
                return await metric(http, agent.url, "zeromesh_dead_letters") == 1

            await aeventually(dead_lettered, timeout=10, interval=0.05)
            assert await metric(http, agent.url, "zeromesh_webhook_deliveries_total",
                                outcome="ok") == 0
        assert seen == [("POST", "/hook")] * 2
    finally:
        await runner.cleanup()


async def test_a_best_effort_push_that_cannot_be_dead_lettered_is_counted_dropped(
        procs: list[Cli], mesh_name: str, tmp_path: Path, app: App) -> None:
    """Without a data dir a queue webhook cannot dead-letter: a best-effort message it gives
    up on is dropped and counted. It used to be nacked ("handed back") to nobody: gone,
    with no outcome counted."""
    app.always_fail = True
    config = hook_config(app.url, queue="jobs", attempts=2, backoff=0.01)
    agent = start_agent(procs, mesh=mesh_name, name="side", config=config, tmp=tmp_path)
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{agent.url}/v1/push/jobs", data=b"job") as r:
            assert r.status == 202, await r.text()

        async def dropped() -> bool:
            return await metric(http, agent.url, "zeromesh_webhook_deliveries_total",
                                webhook="0:jobs", outcome="dropped") == 1

        await aeventually(dropped, timeout=5, interval=0.05)
    assert sum(app.attempts.values()) == 2


async def test_a_pattern_webhook_too_slow_for_its_backlog_counts_what_it_drops(
        procs: list[Cli], mesh_name: str, tmp_path: Path, app: App) -> None:
    """Past 100 000 messages queued for a stalled app, a best-effort pattern webhook drops
    the oldest: counted as dropped (they used to be logged once and counted nowhere)."""
    app.hold = asyncio.Event()
    config = hook_config(app.url, pattern="ev.>", attempts=1)
    agent = start_agent(procs, mesh=mesh_name, name="side", config=config, tmp=tmp_path)
    body = "\n".join(json.dumps({"topic": "ev.x", "data": str(i)}) for i in range(20_000))
    async with aiohttp.ClientSession() as http:
        for _ in range(6):  # 120 000: one in the held POST, 100 000 queued, ~20 000 dropped
            async with http.post(f"{agent.url}/v1/publish", data=body) as r:
                assert r.status == 202, await r.text()
        await app.wait_until(lambda: app.in_flight == 1)

        async def all_received() -> bool:
            return await metric(http, agent.url, "zeromesh_messages_received_total",
                                topic="ev.x") == 120_000

        await aeventually(all_received, timeout=10, interval=0.05)
        app.hold.set()

        async def all_dropped_counted() -> bool:
            """(One more when the first was taken only once the queue was full.)"""
            dropped = await metric(http, agent.url, "zeromesh_webhook_deliveries_total",
                                   webhook="0:ev.>", outcome="dropped")
            return 120_000 - 100_000 - 1 <= dropped <= 120_000 - 100_000

        await aeventually(all_dropped_counted, timeout=10, interval=0.05)


async def test_a_pattern_webhook_too_slow_for_large_messages_is_bounded_in_bytes(
        procs: list[Cli], mesh_name: str, tmp_path: Path, app: App) -> None:
    """70 messages of 1 MB for a stalled app: 64 MiB of them stay queued, the oldest
    beyond are dropped and counted (by count alone all 70 MB were held)."""
    app.hold = asyncio.Event()
    config = hook_config(app.url, pattern="big.>", attempts=1)
    agent = start_agent(procs, mesh=mesh_name, name="side", config=config, tmp=tmp_path)
    size, count = 1_000_000, 70
    async with aiohttp.ClientSession() as http:
        for _ in range(count):
            async with http.post(f"{agent.url}/v1/publish/big.x", data=b"x" * size) as r:
                assert r.status == 202, await r.text()
        await app.wait_until(lambda: app.in_flight == 1)

        async def all_received() -> bool:
            return await metric(http, agent.url, "zeromesh_messages_received_total",
                                topic="big.x") == count
        await aeventually(all_received, timeout=10, interval=0.05)
        app.hold.set()
        kept = 64 * 1024 * 1024 // size  # (67 queued, besides the one in the held POST)

        async def dropped_counted() -> bool:
            dropped = await metric(http, agent.url, "zeromesh_webhook_deliveries_total",
                                   webhook="0:big.>", outcome="dropped")
            return count - 1 - kept <= dropped <= count - kept  # (the first may have been
            # taken for the held POST only once the queue was full)
        await aeventually(dropped_counted, timeout=10, interval=0.05)


async def test_concurrency_bounds_posts_in_flight(procs: list[Cli], mesh_name: str, tmp_path: Path, app: App) -> None:
    app.hold = asyncio.Event()
    config = hook_config(app.url, pattern="load.*", concurrency=3, attempts=1)
    agent = start_agent(procs, mesh=mesh_name, name="side", config=config, tmp=tmp_path)
    async with aiohttp.ClientSession() as http:
        for i in range(8):
            await http.post(f"{agent.url}/v1/publish/load.x", data=str(i))
        await app.wait_until(lambda: app.in_flight == 3)
        # Give the agent every chance to exceed the bound before releasing.
        for _ in range(3):
            await http.get(f"{agent.url}/healthz")
        assert app.most_in_flight == 3
        app.hold.set()
        await app.wait_until(lambda: len(app.accepted) == 8)
    assert app.most_in_flight == 3


async def test_sighup_adds_a_webhook_and_a_broken_file_keeps_the_running_config(
        procs: list[Cli], mesh_name: str, tmp_path: Path, app: App) -> None:
    """SIGHUP re-reads the file: a webhook added starts receiving; a changed key that needs
    a restart is named in one log line; a broken file is logged and changes nothing."""
    agent = start_agent(procs, mesh=mesh_name, name="side", tmp=tmp_path,
                        config='name = "side"\n')
    path = tmp_path / "side.toml"
    path.write_text('max_body = 4096\n' + hook_config(app.url, pattern="orders.>"))
    agent.cli.proc.send_signal(signal.SIGHUP)
    assert agent.cli.line("reloaded", timeout=15) == "reloaded"
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{agent.url}/v1/publish/orders.new", data=b"one") as r:
            assert r.status == 202
        await app.wait_until(lambda: len(app.accepted) == 1)
        path.write_text("this is [not toml\n")
        agent.cli.proc.send_signal(signal.SIGHUP)
        async with http.post(f"{agent.url}/v1/publish/orders.new", data=b"two") as r:
            assert r.status == 202
        await app.wait_until(lambda: len(app.accepted) == 2)  # the webhook still runs
        async with http.get(f"{agent.url}/v1/peers") as r:
            assert r.status == 200
    agent.cli.term()
    assert agent.cli.wait(timeout=15) == 0
    log = agent.cli.stderr()
    assert "changed keys that need a restart: max_body" in log, log
    assert "config not reloaded" in log, log
    assert [body for _, body, _ in app.accepted] == [b"one", b"two"]


async def test_overlapping_reloads_apply_one_after_the_other(mesh_name: str, app: App) -> None:
    """Two SIGHUPs whose reloads overlap (the first still stopping an old webhook) end with
    exactly the second file's webhooks: both files' webhooks ran at once before, each message
    POSTed twice, and a service re-served by both failed with "already served"."""
    from mesh._agent import Agent, load
    from mesh._agent._config import Webhook

    from .conftest import FAST

    config = load(None, env={}, flags={"name": "side", "mesh": mesh_name, "mdns": False,
                                        "interfaces": ["127.0.0.1"], "http": "127.0.0.1:0",
                                        **FAST})
    config.webhooks = [Webhook(url=f"{app.url}?v=0", pattern="t.>")]
    async with Agent(config) as agent:
        # (each a new pattern: the running webhook is stopped, not updated in place, and
        # the second reload comes while the first awaits that)
        first, second = (msgspec.structs.replace(config, webhooks=[
            Webhook(url=f"{app.url}?v={v}", pattern=f"t{v}.>")]) for v in (1, 2))
        await asyncio.gather(agent.reload(first), agent.reload(second))
        assert agent.config.webhooks == second.webhooks
        assert len(agent._hooks) == 1  # (both ran: each message was POSTed twice)


async def test_a_webhook_that_cannot_start_is_logged_and_the_agent_still_stops(
        mesh_name: str, tmp_path: Path, app: App, caplog: pytest.LogCaptureFixture) -> None:
    """A webhook whose durable is open already (here by the app's own subscription) fails:
    that is logged when it happens, and stopping the agent closes everything (the failure
    was raised out of the agent's close instead: its node and HTTP server left open, the
    CLI's exit status 2)."""
    import logging

    from mesh._agent import Agent, load
    from mesh._agent._config import Webhook

    from .conftest import FAST

    config = load(None, env={}, flags={"name": "side", "mesh": mesh_name, "mdns": False,
                                        "interfaces": ["127.0.0.1"], "http": "127.0.0.1:0",
                                        "data_dir": str(tmp_path), **FAST})
    agent = Agent(config)
    with caplog.at_level(logging.ERROR, logger="mesh.agent"):
        async with agent, await agent.node.subscribe_durable("x.>", "d"):
            await agent.reload(msgspec.structs.replace(config, webhooks=[
                Webhook(url=app.url, pattern="y.>", durable="d")]))
            await aeventually(lambda: "is open already" in caplog.text, timeout=5)
    assert not agent.node.running


async def test_a_reload_that_removes_a_durable_webhook_ends_its_durable(
        mesh_name: str, tmp_path: Path, app: App) -> None:
    """A durable webhook removed on SIGHUP ends its durable, as a removed uplink export does:
    the agent kept announcing it, so publishers spooled every reliable message on its
    pattern for good (20 of 20 in a library publisher's spool)."""
    from mesh._agent import Agent, load
    from mesh._agent._config import Webhook

    from .conftest import FAST

    config = load(None, env={}, flags={"name": "side", "mesh": mesh_name, "mdns": False,
                                        "interfaces": ["127.0.0.1"], "http": "127.0.0.1:0",
                                        "data_dir": str(tmp_path), **FAST})
    config.webhooks = [Webhook(url=app.url, pattern="a.>", durable="gone"),
                       Webhook(url=app.url, pattern="b.>", durable="kept")]
    async with Agent(config) as agent:
        node = agent.node
        await aeventually(lambda: len(node.durables()) == 2, timeout=5)
        await agent.reload(msgspec.structs.replace(config, webhooks=[
            Webhook(url=f"{app.url}?v=2", pattern="b.>", durable="kept")]))
        await node.publish("a.x", b"nobody's", reliable=True)
        assert [(d.name, d.backlog) for d in node.durables()] == [("kept", 0)]


async def test_durables_removed_from_the_config_while_the_agent_is_down_end_at_its_start(
        procs: list[Cli], mesh_name: str, tmp_path: Path, make_node: MakeNode) -> None:
    """A durable webhook and an uplink export removed from the file while the agent was
    down end at its next start, as at a reload: they were never ended, and publishers
    spooled for them until durable_expiry (7 days). The one still configured stays."""
    pub = await make_node("pub", data_dir=str(tmp_path / "pub"))
    kept = hook_config("http://127.0.0.1:9/hook", pattern="k.>", durable="kept")
    removed = (hook_config("http://127.0.0.1:9/hook", pattern="g.>", durable="gone")
               + f'[[uplink]]\nurl = "nats://127.0.0.1:{free_port()}"\nprefix = "site"\n'
               + 'export = ["up.>"]\n')
    args = ("--data-dir", str(tmp_path / "agent"))
    agent = start_agent(procs, *args, mesh=mesh_name, name="side", tmp=tmp_path,
                        config=kept + removed)
    await aeventually(lambda: len(pub.durables()) == 3, timeout=5)
    gone, kept_name, export = sorted(d.name for d in pub.durables())
    assert (gone, kept_name, export[:7]) == ("gone", "kept", "uplink-")
    agent.cli.term()
    assert agent.cli.wait() == 0
    start_agent(procs, *args, mesh=mesh_name, name="side", tmp=tmp_path, config=kept)
    await aeventually(lambda: [d.name for d in pub.durables()] == ["kept"], timeout=5)


async def test_a_reload_adding_a_durable_webhook_to_an_agent_without_data_dir_is_refused(
        mesh_name: str, tmp_path: Path, app: App) -> None:
    """The new file's data_dir needs a restart, so the running agent has none: its durable
    webhook could never run. The reload is refused, naming the key (it said "reloaded",
    and the webhook was dead; before that failure was logged, not a word)."""
    from mesh._agent import Agent, load
    from mesh._agent._config import Webhook
    from mesh.errors import ConfigError

    from .conftest import FAST

    config = load(None, env={}, flags={"name": "side", "mesh": mesh_name, "mdns": False,
                                        "interfaces": ["127.0.0.1"], "http": "127.0.0.1:0",
                                        **FAST})
    async with Agent(config) as agent:
        new = msgspec.structs.replace(config, data_dir=str(tmp_path), webhooks=[
            Webhook(url=app.url, pattern="a.>", durable="d")])
        with pytest.raises(ConfigError, match=r"webhooks\[0\].durable: .*needs data_dir"):
            await agent.reload(new)
        assert (agent.config.webhooks, agent._hooks) == ([], {})


async def test_a_reload_that_changes_a_webhooks_url_loses_and_repeats_nothing(
        mesh_name: str, app: App) -> None:
    """A new url (or timeout, attempts, backoff, accept) is taken in place: the webhook was
    restarted, so its POST in flight was cut and what waited for the app was dropped
    unseen (a best-effort pattern webhook: 236 of 300 lost, not counted)."""
    from mesh._agent import Agent, load
    from mesh._agent._config import Webhook

    from .conftest import FAST

    config = load(None, env={}, flags={"name": "side", "mesh": mesh_name, "mdns": False,
                                        "interfaces": ["127.0.0.1"], "http": "127.0.0.1:0",
                                        **FAST})
    config.webhooks = [Webhook(url=app.url, pattern="t.>")]
    async with Agent(config) as agent:
        node = agent.node
        await _delivering(agent, app)
        app.accepted.clear()
        app.hold = asyncio.Event()
        for i in range(5):
            await node.publish("t.x", f"m{i}".encode())
        await app.wait_until(lambda: app.in_flight == 1)
        await agent.reload(msgspec.structs.replace(config, webhooks=[
            Webhook(url=f"{app.url}?v=2", pattern="t.>", attempts=2)]))
        app.hold.set()

        def sent() -> list[bytes]:
            return sorted(body for _, body, _ in app.accepted if body != b"probe")
        await app.wait_until(lambda: len(sent()) >= 5)
        assert sent() == [f"m{i}".encode() for i in range(5)]
        assert app.paths[-4:] == ["/hook?v=2"] * 4  # (m0 was POSTed before the reload)


async def _delivering(agent: Agent, app: App) -> None:
    """Wait until the in-process agent's webhook on ``t.>`` POSTs its own publishes."""
    async def posted() -> bool:
        await agent.node.publish("t.x", b"probe")
        return bool(app.accepted)
    await aeventually(posted, timeout=5, interval=0.02)
    await app.wait_until(lambda: app.in_flight == 0)


async def test_an_in_process_agents_webhook_delivers(mesh_name: str, app: App) -> None:
    """With warnings as errors (pytest here, ``-W error`` for an app), the first retry
    policy built raised tenacity's DeprecationWarning for ``initial``: the webhook ended
    at its first message (nothing logged); ``multiplier`` is the name now."""
    from mesh._agent import Agent, load
    from mesh._agent._config import Webhook

    from .conftest import FAST

    config = load(None, env={}, flags={"name": "side", "mesh": mesh_name, "mdns": False,
                                        "interfaces": ["127.0.0.1"], "http": "127.0.0.1:0",
                                        **FAST})
    config.webhooks = [Webhook(url=app.url, pattern="t.>", backoff=0.5)]
    async with Agent(config) as agent:
        await _delivering(agent, app)
