"""Static peers: URL validation at construction, one PeerFound per URL on start."""

from __future__ import annotations

import pytest

from discovery import InvalidRecord, PeerFound, PeerInfo, StaticDiscovery, parse_peer_urls

from ._util import Recorder, new_peer


def test_parse_peer_urls() -> None:
    assert parse_peer_urls("") == []
    assert parse_peer_urls(" tcp://127.0.0.1:1 ,, tcp://127.0.0.2:2,") == [
        "tcp://127.0.0.1:1",
        "tcp://127.0.0.2:2",
    ]


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("127.0.0.1:5000", "tcp://"),
        ("tcp://127.0.0.1", "host:port"),
        ("tcp://127.0.0.1:0", "port"),
        ("tcp://127.0.0.1:70000", "port"),
        ("tcp://0.0.0.0:5000", "unicast"),
        ("tcp://224.0.0.1:5000", "unicast"),
        ("tcp://1.2.3.999:5000", "IPv4"),
        ("tcp://bad_host!:5000", "host name"),
        ("tcp://-x:5000", "host name"),
        ("tcp://[::1]", "port"),
        ("tcp://[::1]:", "port"),
        ("tcp://::1:5000", "brackets"),
        ("tcp://[::1:5000", "brackets"),
        ("tcp://[1.2.3.4]:5000", "IPv6"),
        ("tcp://[localhost]:5000", "IPv6"),
        ("tcp://[::]:5000", "unicast"),
        ("tcp://[ff02::fb]:5000", "unicast"),
        ("tcp://[::ffff:127.0.0.1]:5000", "unicast"),
        ("tcp://[fe80::1]:5000", "zone"),
        ("tcp://[fd00::1%eth0]:5000", "link-local"),
        ("tcp://[fe80::1%a/b]:5000", "zone"),
        ("tcp://[::g]:5000", "IPv6"),
    ],
)
def test_bad_urls_fail_at_construction(url: str, reason: str) -> None:
    with pytest.raises(InvalidRecord, match=reason):
        StaticDiscovery([url], mesh="m")


def test_ipv6_urls() -> None:
    """IPv6 literals in brackets, link-local with its zone, a CURVE key after '#'."""
    key = "rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7"
    urls = ["tcp://[::1]:5000", "tcp://[fd77::2]:7700", "tcp://[fe80::2%eth0]:7700",
            f"tcp://[fd77::3]:7700#{key}"]
    assert StaticDiscovery(urls, mesh="m").urls == tuple(urls)
    assert StaticDiscovery(["tcp://[FD77:0:0::3]:7700", f"tcp://[fd77::3]:7700#{key}"],
                           mesh="m").urls == ("tcp://[fd77::3]:7700", urls[3])


def test_bad_mesh() -> None:
    with pytest.raises(InvalidRecord):
        StaticDiscovery([], mesh="no spaces")


async def test_events() -> None:
    urls = ["tcp://127.0.0.1:5001", "tcp://localhost:5002", "tcp://127.0.0.1:5001"]
    backend = StaticDiscovery(urls, mesh="m")
    assert backend.urls == ("tcp://127.0.0.1:5001", "tcp://localhost:5002")
    sink = Recorder()
    await backend.start(new_peer("m", port=5009), sink)
    events = [e for _, e in sink.events]
    assert events == [
        PeerFound(PeerInfo("", "", "m", 0, ("tcp://127.0.0.1:5001",), source="static")),
        # a host name comes with its addresses (how the seed's own hellos spell it)
        PeerFound(PeerInfo("", "", "m", 0, ("tcp://localhost:5002", "tcp://127.0.0.1:5002"),
                           source="static")),
    ]
    assert all(isinstance(e, PeerFound) and e.info.source == "static" for e in events)
    await backend.aclose()


async def test_own_endpoint_is_skipped() -> None:
    backend = StaticDiscovery(["tcp://127.0.0.1:5000", "tcp://127.0.0.1:5001"], mesh="m")
    sink = Recorder()
    await backend.start(new_peer("m", port=5000), sink)
    assert [e.info.endpoints for _, e in sink.events] == [("tcp://127.0.0.1:5001",)]
