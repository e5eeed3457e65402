"""History replay: `since=` and `last=` give what publishers kept, then live, exactly once.

Real nodes on 127.0.0.1; a publisher keeps what it publishes on its
``history`` topics; a late subscriber asks for a window of it, merged across
publishers in timestamp order and in order per publisher, then continues
live with no gap and no duplicate.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from mesh import ConfigError, Message, Subscription
from mesh._memory._history import parse_since

from ._flood import join_during_flood
from ._proc import child_env, run
from .conftest import FAST_ENV, MakeNode


async def _take(sub: Subscription, n: int) -> list[Message]:
    return [await sub.next(timeout=10) for _ in range(n)]


async def test_since_replays_the_window_then_goes_live(make_node: MakeNode) -> None:
    pub = await make_node("pub", mdns=False, history=["sensors.>"])
    for i in range(50):
        await pub.publish(f"sensors.t{i % 3}", str(i))
    await pub.publish("other.x", "not kept")
    sub_node = await make_node("sub", mdns=False, peers=pub.endpoints["ctl"])
    await sub_node.wait_for_peers(1, timeout=5)
    sub = await sub_node.subscribe("sensors.>", since=60)
    got = await _take(sub, 50)
    assert [m.text for m in got] == [str(i) for i in range(50)]
    assert [m.topic for m in got[:3]] == ["sensors.t0", "sensors.t1", "sensors.t2"]
    await pub.wait_for_subscribers("sensors.t0", 1, timeout=5)
    await pub.publish("sensors.t0", "live")
    assert (await sub.next(timeout=5)).text == "live"
    with pytest.raises(TimeoutError):
        await sub.next(timeout=0.2)


async def test_last_gives_the_newest_n_of_each_topic(make_node: MakeNode) -> None:
    pub = await make_node("pub", mdns=False, history=["s.>"])
    for i in range(10):
        await pub.publish("s.a", f"a{i}")
        await pub.publish("s.b", f"b{i}")
    sub_node = await make_node("sub", mdns=False, peers=pub.endpoints["ctl"])
    await sub_node.wait_for_peers(1, timeout=5)
    sub = await sub_node.subscribe("s.*", last=2)
    assert [m.text for m in await _take(sub, 4)] == ["a8", "b8", "a9", "b9"]


async def test_three_publishers_merge_in_time_order_each_in_its_own_order(
        make_node: MakeNode) -> None:
    pubs = [await make_node(f"p{i}", mdns=False, history=["m.>"]) for i in range(3)]
    for round_ in range(20):
        for i, pub in enumerate(pubs):
            await pub.publish(f"m.p{i}", f"{i}-{round_}")
    seeds = [p.endpoints["ctl"][0] for p in pubs]
    sub_node = await make_node("sub", mdns=False, peers=seeds)
    await sub_node.wait_for_peers(3, timeout=5)
    sub = await sub_node.subscribe("m.>", since=60)
    got = await _take(sub, 60)
    assert sorted(m.text for m in got) == sorted(f"{i}-{r}" for i in range(3) for r in range(20))
    for i in range(3):
        mine = [m.text for m in got if m.text.startswith(f"{i}-")]
        assert mine == [f"{i}-{r}" for r in range(20)]
    stamps = [m.timestamp for m in got]
    assert stamps == sorted(stamps)


async def test_no_gap_and_no_duplicate_between_history_and_live(make_node: MakeNode) -> None:
    """Joining while the topic is published at full speed: every message exactly once."""
    joined, got = await join_during_flood(make_node, retain=False,
                                          publisher={"history": ["flood.>"]},
                                          subscribe={"since": 3600})
    assert got == list(range(1, len(got) + 1))
    assert got[-1] > joined  # history, then live


async def test_history_with_large_headers_is_paged_within_the_message_limit(
        make_node: MakeNode) -> None:
    """As for retained values: headers were not counted in a page, so 50 messages with
    2 KiB of headers made an answer over the 64 KiB limit and none was replayed."""
    limit = {"max_message_size": 64 * 1024, "mdns": False}
    pub = await make_node("pub", history=["log.>"], **limit)
    meta = {"meta": "m" * 2048}
    for i in range(50):
        await pub.publish("log.web", b"%d" % i, headers=meta)
    sub_node = await make_node("sub", peers=pub.endpoints["ctl"], **limit)
    await sub_node.wait_for_peers(1, timeout=5)
    sub = await sub_node.subscribe("log.>", since=600)
    assert [m.data for m in await _take(sub, 50)] == [b"%d" % i for i in range(50)]


def test_a_topic_past_the_history_does_not_uncover_another_still_on_its_way() -> None:
    """A publisher sends a batch per topic, so its messages arrive in order per topic only:
    one on `x.b` past what its history covered used to end the cover for all its topics,
    and a covered `h.a` message arriving after it was delivered twice (10 per publisher in
    a flood mixing history and other topics). It stays covered; later ones pass."""
    from mesh._names import pattern
    from mesh._pubsub._subscription import Subscription

    def msg(topic: str, seq: int) -> Message:
        return Message(topic, b"%d" % seq, "pub", "P", seq, time.time())

    sub: Subscription[bytes] = Subscription(pattern(">"))
    sub._hold()
    sub._release([msg("h.a", 10)], {}, {"P": ((pattern("h.>"),), 10)})
    sub._deliver([msg("x.b", 11)])
    sub._deliver([msg("h.a", 10), msg("h.a", 12)])
    assert [(m.topic, m.seq) for m in sub.drain(10)] == [("h.a", 10), ("x.b", 11), ("h.a", 12)]


@pytest.mark.parametrize("age", [0, -1, float("nan")])
def test_a_history_max_age_that_is_not_above_zero_is_rejected(age: float) -> None:
    """NaN passed the `<= 0` check, and history then never aged out (every comparison
    with a NaN horizon is false)."""
    from mesh import AsyncNode

    with pytest.raises(ConfigError, match="history_max_age"):
        AsyncNode(name="n", history=["a.>"], history_max_age=age)


async def test_bad_since_and_last_are_rejected(make_node: MakeNode) -> None:
    node = await make_node("n", mdns=False)
    for kwargs in ({"since": 0}, {"since": -5},
                   {"since": datetime.now().astimezone() + timedelta(hours=1)}, {"last": 0}):
        with pytest.raises(ConfigError):
            await node.subscribe("a.b", **kwargs)


async def test_a_last_or_since_out_of_range_is_a_config_error(
        make_node: MakeNode, monkeypatch: pytest.MonkeyPatch) -> None:
    """`last` past what a query carries failed in the background (the subscription got no
    history, a traceback in the log); a naive `since` in year 1 (local time at or east of
    UTC) was a ValueError (a 500 at the agent): both are a ConfigError when subscribing,
    and `since` when parsed."""
    node = await make_node("n", mdns=False)
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    try:
        for kwargs in ({"last": 10**20}, {"since": datetime(1, 1, 1)}):
            with pytest.raises(ConfigError):
                await node.subscribe("a.b", **kwargs)
        with pytest.raises(ConfigError, match="out of range"):
            parse_since("0001-01-01")
    finally:
        monkeypatch.undo()
        time.tzset()


@pytest.mark.parametrize("args", [["--since", "tomorrow"], ["--since", "2999-01-01T00:00:00"],
                                  ["--since", "-5m"], ["--last", "0"]])
def test_cli_rejects_bad_since_and_last(args: list[str], mesh_name: str) -> None:
    got = run(["sub", "a.b", *args, "--no-mdns", "--timeout", "1"], mesh=mesh_name)
    assert got.returncode == 2
    assert got.stderr.count("\n") == 1


def test_history_survives_a_sigkill_and_cli_since_replays_it(tmp_path: Path,
                                                             mesh_name: str) -> None:
    """A publisher with a data dir keeps its history on disk: killed and restarted, it still
    answers `zeromesh sub --since`."""
    data = tmp_path / "pub"
    env = {**child_env(mesh_name), **FAST_ENV, "ZEROMESH_MDNS": "false"}
    code = ("import asyncio, sys\n"
            "from mesh import AsyncNode\n"
            "async def main():\n"
            f"    async with AsyncNode(name='pub', data_dir={str(data)!r},\n"
            "                         history=['log.>']) as n:\n"
            "        if sys.argv[1] == 'write':\n"
            "            for i in range(5):\n"
            "                await n.publish('log.line', f'line {i}')\n"
            "            await asyncio.sleep(0)\n"
            "        print('ready', n.endpoints['ctl'][0], flush=True)\n"
            "        await asyncio.Event().wait()\n"
            "asyncio.run(main())\n")
    for mode in ("write", "read"):
        proc = subprocess.Popen([sys.executable, "-c", code, mode], env=env, text=True,
                                stdout=subprocess.PIPE)
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline().split()
            assert line[0] == "ready", line
            got = run(["sub", "log.>", "--since", "1h", "--count", "5", "--json", "--timeout",
                       "15", "--peer", line[1], "--no-mdns"], mesh=mesh_name)
            assert got.returncode == 0, got.stderr
            assert [json.loads(x)["data"] for x in got.stdout.splitlines()] == [
                f"line {i}" for i in range(5)]
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            if proc.stdout is not None:
                proc.stdout.close()


async def test_a_durable_starts_from_history_and_gets_reliable_ones_once(
        make_node: MakeNode, tmp_path: Path) -> None:
    """`subscribe_durable(..., since=)`: the best-effort history first, then live; a reliable
    message in the history comes once, through the durable's queue."""
    pub = await make_node("pub", mdns=False, history=["orders.>"],
                          data_dir=str(tmp_path / "pub"))
    for i in range(3):
        await pub.publish("orders.new", f"seen {i}")
    sub_node = await make_node("sub", mdns=False, peers=pub.endpoints["ctl"],
                               data_dir=str(tmp_path / "sub"))
    await sub_node.wait_for_peers(1, timeout=5)
    durable = await sub_node.subscribe_durable("orders.>", "book", since=600)
    got = [await durable.next(timeout=10) for _ in range(3)]
    assert [m.text for m in got] == ["seen 0", "seen 1", "seen 2"]
    await pub.wait_for_durables("orders.new", 1, timeout=10)
    await pub.publish("orders.new", "paid", reliable=True)
    msg = await durable.next(timeout=10)
    assert (msg.text, msg.reliable) == ("paid", True)
    with pytest.raises(TimeoutError):
        await durable.next(timeout=0.3)


async def test_agent_sse_since_replays_history_and_rejects_last_zero(
        mesh_name: str, tmp_path: Path) -> None:
    """`GET /v1/subscribe/{pattern}?since=S` (plain and durable) starts with history; S is
    written as for the CLI (seconds, 10m, 2d: not bounded by a request timeout, or an
    ISO 8601 time); `?last=0`, a bad or future `since` are a 400."""
    import aiohttp

    from mesh._agent import Agent, load

    from .conftest import FAST
    config = load(None, env={}, flags={"name": "agent", "mesh": mesh_name, "mdns": False,
                                        "interfaces": ["127.0.0.1"], "http": "127.0.0.1:0",
                                        "history": ["ev.>"], "data_dir": str(tmp_path / "a"),
                                        **FAST})
    async with Agent(config) as agent, aiohttp.ClientSession() as http:
        await agent.node.publish("ev.one", b"first")
        earlier = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 60))
        for query in ("since=600", "durable=d1&since=600", "last=1", "since=2d",
                      "since=86400", f"since={earlier}"):
            async with http.get(f"{agent.http_url}/v1/subscribe/ev.%3E?{query}") as stream:
                async with asyncio.timeout(10):
                    async for raw in stream.content:
                        if raw.startswith(b"data: "):
                            assert json.loads(raw[len(b"data: "):])["data"] == "first"
                            break
        for bad in ("last=0", "since=nan", "since=soon", "since=0", "since=2999-01-01"):
            async with http.get(f"{agent.http_url}/v1/subscribe/ev.%3E?{bad}") as r:
                assert r.status == 400, bad
                assert (await r.json())["error"], bad
