"""The mesh page in a real headless chromium, against a stand-in agent with canned figures.

Each section shows what it is given, formatted for people; states are told by
more than colour; names with markup stay text; the page fits a phone's width;
Replay and Purge POST to the agent; and no console error at any point. The
real agents' tests are tests/system/test_page_lan.py.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.agent_page._browser import LAPTOP, PHONE, Browser
from tests.agent_page._fake import ME, PEERS, FakeMesh

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def fake() -> FakeMesh:
    return FakeMesh()


@pytest.fixture
def page(tmp_path: Path, fake: FakeMesh) -> Iterator[Browser]:
    """The page of the fake agent, loaded and live; fails on any console error after."""
    with Browser(tmp_path) as browser:
        port = browser.serve_app(fake.app())
        browser.navigate(f"http://127.0.0.1:{port}/")
        browser.wait_for("document.querySelector('#conn').dataset.state === 'ok'", 10,
                         "the page's stream is live")
        browser.wait_for("document.querySelectorAll('#topology g.node').length === 4"
                         " && document.body.dataset.snapshots >= 2", 10,
                         "the picture is drawn and figures have come")
        yield browser
        print(f"screenshots in {tmp_path}")
        assert browser.errors == [], f"console errors (screenshots in {tmp_path})"


def text(browser: Browser, selector: str) -> str:
    return str(browser.evaluate(f"document.querySelector({json.dumps(selector)}).textContent"))


def test_every_section_shows_its_figures_for_people(page: Browser) -> None:
    page.screenshot("laptop.png", full_page=True)
    assert text(page, "#node-name") == "gateway"
    assert text(page, "#node-mesh") == "plant-3"
    assert text(page, "#node-uptime") == "1 h 2 min"
    assert text(page, "#node-health") == "ok"
    row = f"#peers tr[data-id='{PEERS[0][0]}']"
    assert text(page, f"{row} td:nth-child(4)") == "0.8 ms"
    assert text(page, f"{row} td:nth-child(5)") == "1.2 k/s"
    assert text(page, f"#peers tr[data-id='{PEERS[2][0]}'] td:nth-child(3)") == "48 s ago"
    topic = "#topics tr[data-topic='orders.created']"
    assert text(page, f"{topic} td:nth-child(2)") == "1.2 k/s"
    assert text(page, f"{topic} td:nth-child(3)") == "2.4 MiB/s"
    assert page.evaluate(f"document.querySelector(\"{topic} svg.spark polyline\")"
                         ".getAttribute('points').split(' ').length") == 60
    assert text(page, "#queues tr[data-queue='jobs'] td:nth-child(4)") == "15 k"
    assert text(page, "#services tr[data-service='tax'] td:nth-child(3)") == "1.2 ms"
    assert text(page, "#spool-quota") == "72 % of 64 MiB"
    assert text(page, "#spool-fsync") == "batch"
    assert text(page, "#spool-oldest") == "1 min 35 s"
    assert "connection refused" in text(page, "#uplinks tbody")
    page.wait_for("document.querySelector('#dead-letters tr[data-id=\"7\"]')", 5)
    assert "webhook answered 503" in text(page, "#dead-letters tr[data-id='7']")


def test_states_are_told_by_shape_and_words_not_colour_alone(page: Browser) -> None:
    state = page.evaluate(
        "Object.fromEntries([...document.querySelectorAll('#topology g.node')].map(g =>"
        " [g.dataset.id, [g.dataset.state, g.querySelector('text.status').textContent,"
        " getComputedStyle(g.querySelector('circle')).strokeDasharray]]))")
    assert state[ME][:2] == ["self", "this node"]
    assert state[PEERS[0][0]] == ["alive", "", "none"]
    assert state[PEERS[1][0]][:2] == ["suspect", "suspect"]
    assert state[PEERS[2][0]][:2] == ["lost", "lost"]
    assert state[PEERS[1][0]][2] != "none"
    assert state[PEERS[2][0]][2] not in ("none", state[PEERS[1][0]][2])
    busy = PEERS[0][0]
    widths = page.evaluate(
        "Object.fromEntries([...document.querySelectorAll('#topology line.link')].map(l =>"
        f" [l.dataset.target === '{busy}' || l.dataset.source === '{busy}' ? 'busy'"
        " : l.dataset.state, parseFloat(l.style.strokeWidth)]))")
    assert widths["busy"] > widths["lost"]
    badges = page.evaluate("[...document.querySelectorAll('#peers .badge.state')]"
                           ".map(b => b.textContent)")
    assert badges == ["● alive", "◐ suspect", "✕ lost"]


def test_names_with_markup_stay_text(page: Browser) -> None:
    assert page.evaluate("document.querySelectorAll('#topics script, #peers b').length") == 0
    assert "<script>" in text(page, "#topics tbody")
    assert "billing-<b>2</b>" in text(page, "#peers tbody")


def test_fits_a_phone_width(page: Browser) -> None:
    page.resize(*PHONE)
    page.wait_for("document.documentElement.scrollWidth <= window.innerWidth", 5,
                  "no sideways scrolling of the page at phone width")
    page.screenshot("phone.png", full_page=True)
    page.resize(*LAPTOP)


def test_replay_and_purge_post_to_the_agent(page: Browser, fake: FakeMesh) -> None:
    page.wait_for("document.querySelector('#dead-letters button.replay')", 5)
    page.click("#dead-letters button.replay[data-id='7']")
    page.wait_for("!document.querySelector('#dead-letters tr[data-id=\"7\"]')", 5,
                  "the replayed letter leaves the list")
    assert fake.posts == [("replay", "id=7", b"")]
    assert text(page, "#dead-status") == "replay 7: 1"
    page.click("#purge-all")
    assert text(page, "#purge-all") == "Click again to purge all"
    page.click("#purge-all")
    page.wait_for("document.querySelector('#dead-status').textContent === 'purge all: 1'", 5)
    assert fake.posts[1][0] == "purge"
    assert fake.posts[1][2] == b"", "no body: purge all"


def test_peer_events_are_logged_and_restyle_the_picture(page: Browser, fake: FakeMesh) -> None:
    peer_id, name = PEERS[0]

    async def lose() -> None:
        fake.stats["peers"][0]["state"] = "lost"
        fake.peer_event("lost", peer_id, name, "lost")

    page.run(lose)
    page.wait_for("document.querySelector('#log li[data-kind=\"lost\"]')", 5)
    assert name in text(page, "#log li")
    page.wait_for(f"document.querySelector(\"#topology g[data-id='{peer_id}']\")"
                  ".dataset.state === 'lost'", 2, "the lost event restyles the node at once")


def test_dead_letters_beyond_the_listed_say_how_many_there_are(page: Browser,
                                                                fake: FakeMesh) -> None:
    """The agent lists the oldest 10,000 dead letters; with 50,000 in the spool the card
    said "Dead letters 10000" (the count of the list), under Purge all and Replay all,
    which act on all 50,000."""
    async def bury() -> None:
        fake.stats["spool"]["dead_letters"] = 50_000

    page.run(bury)
    page.wait_for("document.querySelector('#spool-dead').textContent === '50 k'", 5)
    page.wait_for("document.querySelector('#dead-summary').textContent === 'oldest 1 of 50 k'",
                  5, "the card says the list is part of the dead letters")
