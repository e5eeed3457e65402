"""The mesh page (``GET /``) of a real agent on a 3-host namespace LAN, in a real browser.

Agents run as CLI processes on h1..h3 (`_meshproc`), each serving HTTP on its
host's address. A headless chromium runs inside h1's namespace
(tests/agent_page/_browser.py), pointed at h1's agent there, so the page sees
exactly what a person on h1 would. Every test fails on any console error of
the page, and leaves its screenshots in its tmp dir (printed on failure).

``ZEROMESH_PAGE_SHOT=docs/mesh-page.png`` makes the traffic test also write its
laptop-width screenshot there (how docs/mesh-page.png is made).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Final

import aiohttp
import pytest
from aiohttp import web

from tests import netns
from tests.agent_page._browser import Browser
from tests.helpers import eventually
from tests.system._meshproc import Agent, unique

pytestmark = [pytest.mark.netns, pytest.mark.timeout(120)]

PORT: Final[int] = 7474
JOIN_TIMEOUT: Final[float] = 10.0
LOST_ON_PAGE: Final[float] = 2.0
"""A SIGKILLed host shows as lost on the page within this many seconds, without a reload."""
SHOT_ENV: Final[str] = "ZEROMESH_PAGE_SHOT"


def start_mesh(lan: netns.Lan, mesh: str, *, h1_extra: tuple[str, ...] = ()) -> list[Agent]:
    """Agents on h1..h3, HTTP on each host's own address, all joined to one another."""
    agents = [Agent(host, mesh, extra=["--http", f"{host.ip}:{PORT}",
                                       *(h1_extra if host is lan[0] else ())])
              for host in lan]
    for agent in agents:
        agent.wait_ready()
    for agent in agents:
        for other in agents:
            if other is not agent:
                agent.wait_event("joined", other.name, JOIN_TIMEOUT)
    return agents


@pytest.fixture
def browser(lan: netns.Lan, tmp_path: Path) -> Iterator[Browser]:
    """A headless chromium in h1's namespace; no console error by the end of the test."""
    with Browser(tmp_path, host=lan[0]) as b:
        try:
            yield b
        finally:
            b.screenshot("last.png", full_page=True)
            print(f"\npage screenshots: {tmp_path}")
        assert b.errors == [], f"console errors on the page (screenshots in {tmp_path})"


def open_page(browser: Browser, agent: Agent) -> None:
    browser.navigate(f"http://{agent.host.ip}:{PORT}/")
    browser.wait_for("document.querySelector('#conn').dataset.state === 'ok'"
                     " && document.body.dataset.snapshots >= 1", 10, "the page is live")


def node_state(agent: Agent) -> str:
    return f"document.querySelector(\"#topology g.node[data-id='{agent.id}']\")?.dataset.state"


def test_page_shows_the_hosts_and_a_killed_one_turns_lost_live(lan: netns.Lan,
                                                               browser: Browser) -> None:
    """h1's page draws the three nodes and their links; h3 SIGKILLed is lost on the page
    (picture, peers table, event log) within 2 s, with no reload."""
    a1, a2, a3 = start_mesh(lan, unique("page"))
    open_page(browser, a1)
    browser.wait_for("document.querySelectorAll('#topology g.node').length === 3"
                     " && document.querySelectorAll('#topology line.link').length === 3",
                     10, "three nodes, each linked to the other two")
    assert browser.evaluate(node_state(a1)) == "self"
    for peer in (a2, a3):
        assert browser.wait_for(f"{node_state(peer)} === 'alive'", 5)
        assert browser.evaluate(
            f"document.querySelector(\"#peers tr[data-id='{peer.id}'] .badge\").dataset.state"
        ) == "alive"
    assert browser.evaluate("document.querySelector('#node-name').textContent") == a1.name
    browser.screenshot("three-hosts.png")
    navigations = browser.evaluate("performance.getEntriesByType('navigation').length")

    killed_at = a3.send_signal(signal.SIGKILL)
    browser.wait_for(
        f"{node_state(a3)} === 'lost'"
        f" && document.querySelector(\"#peers tr[data-id='{a3.id}']\")?.className === 'state-lost'"
        f" && document.querySelector(\"#topology g.node[data-id='{a3.id}'] text.status\")"
        f".textContent === 'lost'",
        LOST_ON_PAGE + 3, "h3 lost on the page")
    took = time.monotonic() - killed_at
    browser.screenshot("h3-lost.png")
    print(f"\nSIGKILLed h3 shown lost on h1's page after {took * 1000:.0f} ms")
    assert took <= LOST_ON_PAGE, took
    assert browser.evaluate(node_state(a2)) == "alive"
    dashed = browser.evaluate(
        f"getComputedStyle(document.querySelector(\"#topology g.node[data-id='{a3.id}'] circle\"))"
        ".strokeDasharray")
    assert dashed not in ("", "none"), "lost is told by the outline's dashes too"
    assert browser.evaluate("performance.getEntriesByType('navigation').length") == navigations
    log = browser.evaluate("[...document.querySelectorAll('#log li')].map(li => li.textContent)")
    assert any("lost" in line and a3.name in line for line in log), log
    agent_saw = a1.wait_event("lost", a3.name, 1).at - killed_at
    print(f"(h1's agent printed lost after {agent_saw * 1000:.0f} ms)")
    browser.leave()
    a1.stop()
    a2.stop()


async def _publish_steadily(session: aiohttp.ClientSession, url: str, count: int,
                            every: float) -> None:
    for i in range(count):  # bounded: at most count * every seconds
        async with session.post(url, data=json.dumps({"n": i}).encode()) as response:
            assert response.status == 202, await response.text()
        await asyncio.sleep(every)


async def _subscribe(session: aiohttp.ClientSession, url: str, got: list[bytes]) -> None:
    async with session.get(url, timeout=aiohttp.ClientTimeout(total=None)) as response:
        assert response.status == 200
        async for line in response.content:
            if line.startswith(b"data:"):
                got.append(line)


def test_page_lists_a_topic_nobody_subscribes_with_its_rate(lan: netns.Lan,
                                                            browser: Browser) -> None:
    """A topic h1 publishes to with no subscriber anywhere is listed with a non-zero rate
    and no subscriber, beside a topic h2 and h3 subscribe to (traffic on their links)."""
    a1, a2, a3 = start_mesh(lan, unique("topics"))
    got: list[bytes] = []
    session: list[aiohttp.ClientSession] = []
    tasks: list[asyncio.Task[None]] = []

    async def start() -> None:
        s = aiohttp.ClientSession()
        session.append(s)
        for agent in (a2, a3):
            tasks.append(asyncio.create_task(_subscribe(
                s, f"http://{agent.host.ip}:{PORT}/v1/subscribe/orders.%3E", got)))
        base = f"http://{a1.host.ip}:{PORT}/v1/publish"
        tasks.append(asyncio.create_task(
            _publish_steadily(s, f"{base}/lonely.readings", 600, 0.1)))
        tasks.append(asyncio.create_task(
            _publish_steadily(s, f"{base}/orders.created", 1200, 0.025)))

    async def stop() -> None:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await session[0].close()

    browser.run(start)
    try:
        open_page(browser, a1)
        row = "#topics tr[data-topic='lonely.readings']"
        browser.wait_for(f"document.querySelector(\"{row}\")"
                         f" && document.querySelector(\"{row} td:nth-child(2)\").textContent"
                         " !== '0/s'", 15, "the topic with no subscriber, with a rate")
        rate = browser.evaluate(f"document.querySelector(\"{row} td:nth-child(2)\").textContent")
        subscribers = browser.evaluate(
            f"document.querySelector(\"{row} td:nth-child(5)\").textContent")
        print(f"\nlonely.readings on the page: {rate}, subscribers {subscribers}")
        assert rate.endswith("/s"), rate
        assert float(rate.split()[0].rstrip("/s")) > 0, rate
        assert subscribers == "none"
        busy = "#topics tr[data-topic='orders.created']"
        browser.wait_for(f"document.querySelector(\"{busy} td:nth-child(5)\")?.textContent === '2'",
                         15, "the subscribed topic, with its two subscribers")
        browser.wait_for("Math.max(...[...document.querySelectorAll('#topology line.link')]"
                         ".map(l => parseFloat(l.style.strokeWidth))) > 2", 10,
                         "a link drawn thicker for its traffic")
        browser.wait_for(f"document.querySelector(\"{busy} svg.spark polyline\")", 5)
        # the page may draw the figures before the first message reached an SSE client
        waited = time.monotonic()
        failed = [t.exception() for t in tasks if t.done() and not t.cancelled()
                  and t.exception() is not None]
        assert not failed, f"a subscriber or publisher task failed: {failed}"
        eventually(lambda: got, timeout=10, message="the subscribers received the traffic")
        print(f"first message at the SSE subscribers {time.monotonic() - waited:.2f} s later")
        browser.screenshot("traffic.png")
        if os.environ.get(SHOT_ENV):  # the picture for the docs: a few seconds of traffic
            browser.wait_for("document.body.dataset.snapshots >= 15", 25,
                             "fifteen seconds of figures")
            browser.screenshot("", to=Path(os.environ[SHOT_ENV]))
    finally:
        browser.run(stop)
    browser.leave()
    for agent in (a1, a2, a3):
        agent.stop()


def test_dead_letter_is_replayed_by_clicking_replay(lan: netns.Lan, browser: Browser,
                                                    tmp_path: Path) -> None:
    """A queue webhook whose app refuses dead-letters a job after 2 attempts; the page lists
    it with its reason and attempts; the app is fixed, Replay is clicked, and the webhook
    delivers it (the app accepts this second round); the list empties."""
    received: list[tuple[bool, bytes]] = []
    accepting = [False]
    delivered = threading.Event()

    async def app(request: web.Request) -> web.Response:
        received.append((accepting[0], await request.read()))
        if accepting[0]:
            delivered.set()
        return web.Response(status=200 if accepting[0] else 503, text="not now")

    port = browser.serve(app)  # in h1's namespace, beside h1's agent
    config = tmp_path / "h1.toml"
    config.write_text(
        f'data_dir = "{tmp_path / "h1-data"}"\n'
        "[[webhooks]]\n"
        f'url = "http://127.0.0.1:{port}/jobs"\n'
        'queue = "jobs"\nattempts = 2\nbackoff = 0.05\ntimeout = 2.0\n')
    a1, a2, a3 = start_mesh(lan, unique("dead"), h1_extra=("--config", str(config)))
    open_page(browser, a1)
    status, body = browser.http("POST", f"http://{a1.host.ip}:{PORT}/v1/push/jobs",
                                b"job-one")
    assert status == 202, body
    row = "#dead-letters tbody tr"
    browser.wait_for(f"document.querySelector(\"{row}\")", 15, "the dead letter on the page")
    cells = browser.evaluate(f"[...document.querySelector(\"{row}\").cells]"
                             ".map(c => c.textContent)")
    print(f"\ndead letter row: {cells}")
    assert [r[0] for r in received] == [False, False], received
    assert cells[2] == "jobs", cells
    assert cells[4] == "2", cells
    assert "503" in cells[3] or "not now" in cells[3], cells
    browser.screenshot("dead-letter.png")

    accepting[0] = True
    browser.click(f"{row} button.replay")
    assert delivered.wait(10), f"the replayed job reached the app: {received}"
    browser.wait_for(f"!document.querySelector(\"{row}\")", 10, "the replayed letter leaves")
    assert received[-1] == (True, b"job-one"), received
    assert browser.evaluate("document.querySelector('#dead-status').textContent").startswith(
        "replay")
    browser.leave()
    for agent in (a1, a2, a3):
        agent.stop()
