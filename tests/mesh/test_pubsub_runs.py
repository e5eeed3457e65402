"""Pub/sub runs: plain publishes travel as payloads with one timestamp and a sequence range.

A topic's pending messages are a run or items, never both; these check that
plain and other publishes keep their order and numbers end to end, that large
runs split under the frame limit, and that a subscriber that predates runs is
sent items.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from mesh import Message
from tests.helpers import aeventually

from .conftest import MakeNode


async def _pair(make_node: MakeNode, pattern: str = "runs.>",
                **settings: Any) -> tuple[Any, list[Message]]:
    publisher = await make_node("publisher", **settings)
    subscriber = await make_node("subscriber", **settings)
    got: list[Message] = []
    await subscriber.subscribe(pattern, callback=got.append)
    await publisher.wait_for_subscribers("runs.a", 1, timeout=5)
    return publisher, got


async def test_plain_and_other_publishes_keep_their_order(make_node: MakeNode) -> None:
    """Runs and item frames on one topic interleave without reordering; ids stay unique."""
    publisher, got = await _pair(make_node)
    before = time.time()
    for i in range(3000):
        if i % 11 == 0:
            await publisher.publish("runs.a", str(i), headers={"n": str(i)})
        elif i % 13 == 0:
            await publisher.publish("runs.a", str(i), ttl=60)
        else:
            await publisher.publish("runs.a", str(i))
    after = time.time()
    await aeventually(lambda: len(got) == 3000, timeout=10, message="3000 received")
    assert [m.data for m in got] == [str(i).encode() for i in range(3000)]
    assert all((dict(m.headers or {}) == {"n": m.data.decode()}) == (int(m.data) % 11 == 0)
               for m in got)
    seqs = [m.seq for m in got]
    assert seqs == sorted(seqs)
    assert len(set(seqs)) == len(seqs)
    assert all(before <= m.timestamp <= after for m in got)
    assert publisher.stats["published"] == 3000


@pytest.mark.parametrize("headers", [None, {"k": "v"}], ids=["runs", "items"])
async def test_batches_stay_within_the_frame_a_receiver_accepts(
        make_node: MakeNode, headers: dict[str, str] | None) -> None:
    """Each topic keeps its order, and what one loop turn publishes leaves in frames no
    larger than the receivers' `max_message_size` allows (64 KiB here: 800 KB published
    at once must leave as a dozen frames, not three of 256 KiB, which they would drop)."""
    publisher, got = await _pair(make_node, max_message_size=64 * 1024)
    big = b"x" * 20_000
    for i in range(40):
        await publisher.publish("runs.a", big + str(i).encode(), headers=headers)
        await publisher.publish("runs.b", str(i), headers=headers)
    await aeventually(lambda: len(got) == 80, timeout=10, message="80 received")
    by_topic: dict[str, list[bytes]] = {"runs.a": [], "runs.b": []}
    for m in got:
        by_topic[m.topic].append(m.data)
    assert by_topic["runs.a"] == [big + str(i).encode() for i in range(40)]
    assert by_topic["runs.b"] == [str(i).encode() for i in range(40)]
    assert publisher.stats["dropped"] == 0


async def test_a_subscriber_that_predates_runs_gets_items(
        make_node: MakeNode, monkeypatch: pytest.MonkeyPatch) -> None:
    """A subscriber whose hello does not say `sub_runs` is sent every message as an item."""
    subscriber = await make_node("old-subscriber")
    engine = subscriber._run.pubsub if subscriber._run is not None else None
    assert engine is not None
    fields = engine.hello_fields
    monkeypatch.setattr(engine, "hello_fields", lambda version: {
        k: v for k, v in fields(version).items() if k != "sub_runs"})
    runs: list[object] = []
    real = engine._run_messages

    def recorded(batch: Any, topic: str, run: list[bytes]) -> list[Message]:
        runs.append(batch)
        return real(batch, topic, run)

    monkeypatch.setattr(engine, "_run_messages", recorded)
    got: list[Message] = []
    await subscriber.subscribe("runs.>", callback=got.append)
    publisher = await make_node("publisher")
    await publisher.wait_for_subscribers("runs.a", 1, timeout=5)
    for i in range(500):
        await publisher.publish("runs.a", str(i))
    await aeventually(lambda: len(got) == 500, timeout=10, message="500 received")
    assert [m.data for m in got] == [str(i).encode() for i in range(500)]
    assert runs == []


async def test_a_subscriber_here_and_history_get_every_plain_message(
        make_node: MakeNode, tmp_path: Any) -> None:
    """Where each message needs an item at once (a local subscription, history), the
    remote subscriber still gets the same messages with the same ids."""
    publisher = await make_node("publisher", history=["runs.>"],
                                data_dir=str(tmp_path / "p"))
    subscriber = await make_node("subscriber")
    here: list[Message] = []
    there: list[Message] = []
    await publisher.subscribe("runs.>", callback=here.append)
    await subscriber.subscribe("runs.>", callback=there.append)
    await publisher.wait_for_subscribers("runs.a", 1, timeout=5)
    for i in range(200):
        await publisher.publish("runs.a", str(i))
    await aeventually(lambda: len(there) == 200, timeout=10, message="200 received")
    assert [m.id for m in here] == [m.id for m in there]
    replayed = await subscriber.subscribe("runs.>", last=200)
    first = [await replayed.next(timeout=5) for _ in range(200)]
    assert [m.id for m in first] == [m.id for m in there]


async def test_typed_and_plain_publishes_share_a_topic_in_order(make_node: MakeNode) -> None:
    """Typed values travel as runs with one content type; mixed with plain bytes on the
    same topic, each message keeps its place and its label (or none)."""
    publisher, got = await _pair(make_node)
    for i in range(600):
        if i % 3 == 0:
            await publisher.publish("runs.a", str(i))
        else:
            await publisher.publish("runs.a", {"n": i})
    await aeventually(lambda: len(got) == 600, timeout=10, message="600 received")
    for i, m in enumerate(got):
        if i % 3 == 0:
            assert (m.data, m.headers) == (str(i).encode(), None)
        else:
            assert m.headers == {"content-type": "application/msgpack"}
            assert m.decode(dict[str, int]) == {"n": i}
    seqs = [m.seq for m in got]
    assert seqs == sorted(seqs)


async def test_a_typed_run_shares_one_read_only_label(make_node: MakeNode) -> None:
    """The messages of a typed run share their headers: no one consumer can change them."""
    publisher, got = await _pair(make_node)
    for i in range(100):
        await publisher.publish("runs.a", {"n": i})
    await aeventually(lambda: len(got) == 100, timeout=10, message="100 received")
    assert [m.decode(dict[str, int]) for m in got] == [{"n": i} for i in range(100)]
    assert all(m.headers is got[0].headers for m in got)
    with pytest.raises(TypeError):
        got[1].headers["content-type"] = "x"  # type: ignore[index]
