"""Metrics complete: per topic, queue, service and peer families from a real agent, label
sets bounded by `metrics_names` (the rest as ``other``), sampled delivery latency."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from mesh import AsyncNode, Message
from mesh._agent._metrics import AgentMetrics
from mesh._spool import FsyncPolicy
from mesh._support._tally import LATENCY_NAMES, OTHER, Latencies, Tally
from mesh._uplink._links import Uplinks
from tests.helpers import aeventually

from ._agent import SseStream, start_agent, wait_status
from ._proc import Cli
from .conftest import MakeNode

pytestmark = pytest.mark.timeout(90)

_EVENTS = {
    "topic_messages": ("sent", "received", "dropped", "expired", "spooled", "redelivered",
                       "dead_lettered"),
    "queue_messages": ("sent", "received", "dropped", "expired", "spooled", "redelivered",
                       "dead_lettered"),
    "service_requests": ("sent", "received", "dropped", "redelivered", "timed_out",
                         "remote_errors"),
    "peer_messages": ("sent", "received", "dropped"),
}


async def scrape(http: aiohttp.ClientSession, url: str) -> dict[str, list[Sample]]:
    """Family name -> its samples (counter families named without ``_total``)."""
    async with http.get(f"{url}/metrics") as r:
        assert r.status == 200
        text = await r.text()
    assert_one_family_per_name(text)
    return {f.name: list(f.samples) for f in text_string_to_metric_families(text)}


def assert_one_family_per_name(text: str) -> None:
    """What Prometheus itself refuses a whole scrape for (a second TYPE line for a name, a
    series twice) and the python parser lets through."""
    typed = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")]
    assert len(typed) == len(set(typed)), sorted({n for n in typed if typed.count(n) > 1})
    series = [line.rsplit(" ", 1)[0] for line in text.splitlines()
              if line and not line.startswith("#")]
    assert len(series) == len(set(series)), sorted({s for s in series if series.count(s) > 1})


def value(families: dict[str, list[Sample]], family: str, **labels: str) -> float:
    return sum(s.value for s in families.get(family, [])
               if s.name == family + "_total" and labels.items() <= s.labels.items())


async def test_every_family_is_there_with_its_labels_after_traffic_of_each_kind(
        procs: list[Cli], mesh_name: str, make_node: MakeNode, tmp_path: Path) -> None:
    """Pub/sub, push/pull, request/reply, a reliable publish to a durable, an expired push
    and a dead letter each show under their own name; the latency histogram has samples."""
    agent = start_agent(procs, "--data-dir", str(tmp_path / "agent"), mesh=mesh_name,
                        name="side", env={"ZEROMESH_MAX_ATTEMPTS": "2",
                                          "ZEROMESH_RETRY_BACKOFF": "0.01"})
    node = await make_node("peer", data_dir=str(tmp_path / "peer"))
    await node.serve("echo", lambda m: m.data)

    def fail(msg: Message) -> None:
        raise RuntimeError("cannot process")

    await node.pull("jobs", handler=lambda m: None)
    await node.pull("poison", handler=fail)
    await node.subscribe_durable("orders.>", "d")
    async with aiohttp.ClientSession() as http:
        await wait_status(http, "POST", f"{agent.url}/v1/request/echo", 200, data=b"x")
        await wait_status(http, "POST", f"{agent.url}/v1/push/jobs", 202, data=b"j")
        async with http.post(f"{agent.url}/v1/push/poison?reliable=true", data=b"p") as r:
            assert r.status == 202
        async with http.post(f"{agent.url}/v1/push/nobody?reliable=true&ttl=0.2",
                             data=b"late") as r:
            assert r.status == 202
        async with http.get(f"{agent.url}/v1/subscribe/feed.%3E") as response:
            stream = SseStream(response)
            await stream.subscribed()
            await node.wait_for_subscribers("feed.x", 1, timeout=10)
            for i in range(4 * 16):  # one batch each: at least 4 sampled
                await node.publish("feed.x", str(i))
                await asyncio.sleep(0)  # (lets this message's batch leave alone)
            await stream.events(64)

        async def spooled_for_the_durable() -> bool:  # once the agent has heard of it
            async with http.post(f"{agent.url}/v1/publish/orders.x?reliable=true",
                                 data=b"o") as r:
                assert r.status == 202
            return value(await scrape(http, agent.url), "zeromesh_topic_messages_spooled",
                         topic="orders.x") >= 1

        await aeventually(spooled_for_the_durable, timeout=10, interval=0.1)

        async def settled() -> dict[str, list[Sample]] | None:
            families = await scrape(http, agent.url)
            done = (value(families, "zeromesh_queue_messages_dead_lettered", queue="poison")
                    and value(families, "zeromesh_queue_messages_expired", queue="nobody"))
            return families if done else None

        families = await aeventually(settled, timeout=15, interval=0.1,
                                     message="a dead letter and an expired push")
    assert families is not None
    for what, events in _EVENTS.items():
        for event in events:
            assert f"zeromesh_{what}_{event}" in families, (what, event)
    expected = [
        ("zeromesh_topic_messages_sent", {"topic": "orders.x"}),
        ("zeromesh_topic_messages_spooled", {"topic": "orders.x"}),
        ("zeromesh_topic_messages_received", {"topic": "feed.x"}),
        ("zeromesh_queue_messages_sent", {"queue": "jobs"}),
        ("zeromesh_queue_messages_spooled", {"queue": "poison"}),
        ("zeromesh_queue_messages_redelivered", {"queue": "poison"}),
        ("zeromesh_queue_messages_dead_lettered", {"queue": "poison"}),
        ("zeromesh_queue_messages_expired", {"queue": "nobody"}),
        ("zeromesh_service_requests_sent", {"service": "echo"}),
        ("zeromesh_peer_messages_sent", {"peer": "peer", "peer_id": node.id}),
        ("zeromesh_peer_messages_received", {"peer": "peer", "peer_id": node.id}),
    ]
    for family, labels in expected:
        assert value(families, family, **labels) >= 1, (family, labels)
        assert all(set(s.labels) == set(labels) for s in families[family]), family
    assert value(families, "zeromesh_topic_messages_received", topic="feed.x") == 64
    assert value(families, "zeromesh_peer_messages_received", peer_id=node.id) >= 64
    latency = {s.labels.get("kind"): s.value for s in
               families["zeromesh_delivery_latency_seconds"]
               if s.name == "zeromesh_delivery_latency_seconds_count"}
    assert latency["pubsub"] >= 1
    assert "work" in latency
    # the existing families still count as before
    assert value(families, "zeromesh_messages_received", topic="feed.x") == 64
    assert value(families, "zeromesh_messages_dead_lettered") == 1


async def test_ten_thousand_topics_leave_the_configured_number_of_label_sets(
        procs: list[Cli], mesh_name: str) -> None:
    """With metrics_names=100, 10,000 topics show as 100 names and ``other``, which holds
    the rest: the sum over the label sets is every message."""
    agent = start_agent(procs, mesh=mesh_name, name="side",
                        env={"ZEROMESH_METRICS_NAMES": "100"})
    async def publish(http: aiohttp.ClientSession, i: int) -> None:
        async with http.post(f"{agent.url}/v1/publish/t.{i}", data=b"x") as r:
            assert r.status == 202, await r.text()

    async with aiohttp.ClientSession() as http:
        for start in range(0, 10_000, 100):  # 100 requests at a time
            await asyncio.gather(*(publish(http, i) for i in range(start, start + 100)))
        families = await scrape(http, agent.url)
    for family in ("zeromesh_topic_messages_sent", "zeromesh_messages_published"):
        counts = {s.labels["topic"]: s.value for s in families[family]
                  if s.name == family + "_total"}
        assert len(counts) == 101, family
        named = sum(n for topic, n in counts.items() if topic != OTHER)
        assert counts[OTHER] == 10_000 - named == 9_900


async def test_a_peer_publishing_to_the_agent_leaves_one_family_per_name_and_its_label(
        procs: list[Cli], mesh_name: str, make_node: MakeNode) -> None:
    """Messages from a peer are counted once, in ``zeromesh_peer_messages_received`` (pub/sub,
    work and requests): no second family of that name that Prometheus would refuse."""
    agent = start_agent(procs, mesh=mesh_name, name="side")
    node = await make_node("peer")
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{agent.url}/v1/subscribe/feed.%3E") as response:
            stream = SseStream(response)
            await stream.subscribed()
            await node.wait_for_subscribers("feed.x", 1, timeout=10)
            await node.publish("feed.x", "x")
            await stream.events(1)
        families = await scrape(http, agent.url)
        assert value(families, "zeromesh_peer_messages_received", peer="peer",
                     peer_id=node.id) == 1
        # Gone, its counter stays the same series: the peer label used to turn "".
        await node.aclose()
        async def gone() -> bool:
            async with http.get(f"{agent.url}/v1/peers") as response:
                return all(p["id"] != node.id for p in await response.json())
        await aeventually(gone, timeout=10)
        families = await scrape(http, agent.url)
    [sample] = [s for s in families["zeromesh_peer_messages_received"]
                if s.labels.get("peer_id") == node.id]
    assert (sample.labels["peer"], sample.value) == ("peer", 1)


async def test_names_clients_choose_in_the_agents_own_families_are_bounded_too(
        procs: list[Cli], mesh_name: str, make_node: MakeNode) -> None:
    """Queues pushed to, services asked and SSE patterns opened through the agent count
    under at most metrics_names label values, the rest as ``other`` (a client naming a
    new service per request must not grow the agent's memory and scrape for ever)."""
    agent = start_agent(procs, mesh=mesh_name, name="side",
                        env={"ZEROMESH_METRICS_NAMES": "3"})
    worker = await make_node("worker")
    for i in range(6):
        await worker.pull(f"q.{i}", handler=lambda m: None)
    async with aiohttp.ClientSession() as http:
        for i in range(6):
            await wait_status(http, "POST", f"{agent.url}/v1/push/q.{i}", 202, data=b"j")
            async with http.post(f"{agent.url}/v1/request/s.{i}?timeout=0.05",
                                 data=b"x") as r:
                assert r.status == 503, await r.text()
            async with http.get(f"{agent.url}/v1/subscribe/p.{i}.%3E") as response:
                await SseStream(response).subscribed()
        families = await scrape(http, agent.url)
    for family, label in (("zeromesh_messages_pushed", "queue"),
                          ("zeromesh_requests", "service"),
                          ("zeromesh_sse_events", "pattern")):
        names = {s.labels[label] for s in families[family]}
        assert len(names) == 4, (family, names)
        assert OTHER in names, (family, names)
    assert value(families, "zeromesh_messages_pushed") == 6
    assert value(families, "zeromesh_messages_pushed", queue=OTHER) == 3
    assert value(families, "zeromesh_requests", service=OTHER) == 3


async def test_work_latency_is_sampled_at_the_worker(make_node: MakeNode) -> None:
    """Pushes taken by a worker on another node put samples in the ``work`` histogram."""
    pusher = await make_node("pusher")
    worker = await make_node("worker")
    got: list[str] = []
    await worker.pull("jobs", handler=lambda m: got.append(m.text))
    await pusher.wait_for_workers("jobs", 1, timeout=10)

    def sampled() -> int:
        return sum(worker.traffic().latency["work"].counts)

    async with asyncio.timeout(20):
        for i in range(10_000):  # bounded: one sample per 16 batches is due long before
            await pusher.push("jobs", str(i))
            await aeventually(functools.partial(_more_than, got, i), timeout=5)  # 1 batch each
            if sampled():
                break
    snapshot = worker.traffic().latency["work"]
    assert sum(snapshot.counts) >= 1
    assert 0 <= snapshot.total < 5
    by_name = worker.traffic().by_name
    assert by_name["queue"]["received"]["jobs"] == len(got)
    assert by_name["peer"]["received"][pusher.id] == len(got)
    assert pusher.traffic().by_name["queue"]["sent"]["jobs"] == len(got)


def _more_than(got: list[str], n: int) -> bool:
    return len(got) > n


def render(node: AsyncNode) -> dict[str, list[Sample]]:
    """An agent's metrics of `node`, in-process (no agent to start), checked as `scrape`."""
    text = AgentMetrics(node, Uplinks(node, None, fsync=FsyncPolicy.OFF, quota=1)).render()
    assert_one_family_per_name(text.decode())
    return {f.name: list(f.samples) for f in text_string_to_metric_families(text.decode())}


def latency_counts(families: dict[str, list[Sample]], kind: str) -> dict[str, float]:
    """Name -> samples in ``zeromesh_<kind>_delivery_latency_seconds``."""
    family = f"zeromesh_{kind}_delivery_latency_seconds"
    return {s.labels[kind]: s.value for s in families[family] if s.name == family + "_count"}


class Arrivals:
    """A subscription callback or handler that says when a message arrived."""

    def __init__(self) -> None:
        self.event = asyncio.Event()

    def __call__(self, msg: Message) -> None:
        self.event.set()

    async def after(self, send: Callable[[str, str], Awaitable[object]], name: str,
                    i: int) -> None:
        """Send one message (`send` is publish or push) and wait until it arrived: one
        batch each."""
        self.event.clear()
        await send(name, str(i))
        async with asyncio.timeout(5):
            await self.event.wait()


async def sample_each(names: list[str], sampled: Callable[[], int],
                      send: Callable[[str, int], Awaitable[None]]) -> None:
    """Send on each name in turn, one delivered batch at a time, until the kind's
    histogram has one more sample: so each name has at least one (one batch in 16 is)."""
    async with asyncio.timeout(20):
        for k, name in enumerate(names):
            for i in range(1000):  # bounded: a sample is due every 16 batches
                if sampled() > k:
                    break
                await send(name, i)


async def test_delivery_latency_per_topic_and_per_queue_each_name_its_own_histogram(
        make_node: MakeNode) -> None:
    """Two topics and a queue each get their own histogram, beside the by-kind one
    (unchanged), and the per-name samples add up to the kind's."""
    sender = await make_node("sender")
    receiver = await make_node("receiver")
    arrived = Arrivals()
    await receiver.subscribe("feed.>", callback=arrived)
    await receiver.pull("jobs", handler=arrived)
    await sender.wait_for_subscribers("feed.a", 1, timeout=10)
    await sender.wait_for_subscribers("feed.b", 1, timeout=10)
    await sender.wait_for_workers("jobs", 1, timeout=10)

    def sampled(kind: str) -> int:
        return sum(receiver.traffic().latency[kind].counts)

    await sample_each(["feed.a", "feed.b"], functools.partial(sampled, "pubsub"),
                      functools.partial(arrived.after, sender.publish))
    await sample_each(["jobs"], functools.partial(sampled, "work"),
                      functools.partial(arrived.after, sender.push))
    families = render(receiver)
    topics = latency_counts(families, "topic")
    queues = latency_counts(families, "queue")
    assert set(topics) == {"feed.a", "feed.b"}, topics
    assert min(topics.values()) >= 1, topics
    assert set(queues) == {"jobs"}, queues
    assert queues["jobs"] >= 1
    assert len(families["zeromesh_topic_delivery_latency_seconds"]) == 2 * 21
    kinds = {s.labels["kind"]: s.value for s in families["zeromesh_delivery_latency_seconds"]
             if s.name == "zeromesh_delivery_latency_seconds_count"}
    assert sum(topics.values()) == kinds["pubsub"]
    assert queues["jobs"] == kinds["work"]
    buckets = [s for s in families["zeromesh_topic_delivery_latency_seconds"]
               if s.name.endswith("_bucket") and s.labels["topic"] == "feed.a"]
    assert buckets[-1].labels["le"] == "+Inf"
    assert buckets[-1].value == topics["feed.a"]


async def test_delivery_latency_names_past_the_bound_are_summed_under_other(
        make_node: MakeNode) -> None:
    """More topics sampled than `LATENCY_NAMES`: that many have their own histogram, the
    rest are under ``other``, so the series stay few whatever the topics."""
    sender = await make_node("sender")
    receiver = await make_node("receiver")
    arrived = Arrivals()
    await receiver.subscribe("t.>", callback=arrived)
    await sender.wait_for_subscribers("t.x", 1, timeout=10)
    names = [f"t.{k}" for k in range(LATENCY_NAMES + 5)]
    await sample_each(names, lambda: sum(receiver.traffic().latency["pubsub"].counts),
                      functools.partial(arrived.after, sender.publish))
    families = render(receiver)
    topics = latency_counts(families, "topic")
    assert len(topics) == LATENCY_NAMES + 1, sorted(topics)
    assert OTHER in topics
    assert topics[OTHER] >= 5
    assert sum(topics.values()) == sum(receiver.traffic().latency["pubsub"].counts)
    series = families["zeromesh_topic_delivery_latency_seconds"]
    assert len(series) == (LATENCY_NAMES + 1) * 21  # 19 buckets, count, sum per name


def test_latencies_keep_the_busiest_names_and_every_sample() -> None:
    """A busy newcomer takes the place of a quiet name, whose samples fold into other:
    the total over the names is every sample, and the names stay `limit` + other."""
    latencies = Latencies(limit=4)
    for name in "abcd":
        latencies.sample(name, 0.001)
    for _ in range(200):
        latencies.sample("e", 0.002)
        latencies.sample("a", 0.001)
    assert set(latencies) == {"a", "e", OTHER, *(set("bcd") & set(latencies))}
    assert len(latencies) == 5
    snapshots = latencies.snapshot()
    assert sum(sum(s.counts) for s in snapshots.values()) == 4 + 400
    for i in range(1000):
        latencies.sample(f"x{i}", 0.5)
    assert len(latencies) == 5
    assert sum(sum(s.counts) for s in latencies.snapshot().values()) == 1404


def test_a_tally_keeps_at_most_its_limit_and_the_sum() -> None:
    tally = Tally(limit=10)
    for i in range(1000):
        tally.add(f"n{i}", 1)
    assert len(tally) == 11
    assert sum(tally.values()) == 1000
    assert tally[OTHER] == 990
    assert len(tally._rising) <= 10


def test_a_busy_newcomer_takes_the_place_of_a_quiet_name_and_equals_do_not_churn() -> None:
    """A name counted under other that gets busy is promoted at a review (its past stays
    in other), a kept name that went quiet is folded into other; the sum never changes."""
    tally = Tally(limit=4)
    for name in "abcd":
        tally.add(name, 5)
    for _ in range(200):  # e is busy, the others quiet: reviews happen every 64 misses
        tally.add("e", 1)
        tally.add("a", 1)
    assert "e" in tally
    assert len(tally) == 5
    assert sum(tally.values()) == 20 + 400
    assert "a" in tally  # busy all along: kept
    before = dict(tally)
    for i in range(200):  # many newcomers, once each: none beats a kept name by 2x
        tally.add(f"x{i}", 1)
    assert {k for k in tally if k != OTHER} == {k for k in before if k != OTHER}
    assert sum(tally.values()) == 20 + 400 + 200
