"""TXT codec: round-trips for every valid PeerInfo, InvalidRecord for everything else."""

from __future__ import annotations

import ipaddress
import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from discovery import InvalidRecord, PeerInfo
from discovery._txt import (
    MAX_TXT_BYTES,
    check_endpoint,
    peer_from_txt,
    txt_from_peer,
    txt_size,
)

Z85 = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.-:+=^!/*?&<>()[]{}@%$#"

ids = st.text("0123456789abcdef", min_size=32, max_size=32)
names = st.text(
    st.characters(blacklist_categories=("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp", "Zs")),
    min_size=1,
    max_size=15,
).filter(lambda s: s.isprintable() and len(s.encode()) <= 63)
meshes = st.text(string.ascii_letters + string.digits + "._-", min_size=1, max_size=63)
unicast = st.tuples(
    st.integers(1, 223).filter(lambda a: a != 0),
    st.integers(0, 255),
    st.integers(0, 255),
    st.integers(1, 254),
)
v4_endpoints = st.builds(
    lambda ip, port: f"tcp://{ip[0]}.{ip[1]}.{ip[2]}.{ip[3]}:{port}",
    unicast,
    st.integers(1, 65535),
)

v6_unicast = st.builds(  # global, documentation and ULA prefixes: never filtered (fast)
    lambda prefix, rest: ipaddress.IPv6Address(prefix << 112 | rest),
    st.sampled_from([0x2001, 0x2a00, 0xfd77, 0xfc00]),
    st.integers(0, 2**112 - 1),
) | st.just(ipaddress.IPv6Address("::1"))
v6_endpoints = st.builds(
    lambda ip, port: f"tcp://[{ip}]:{port}",
    v6_unicast,
    st.integers(1, 65535),
)
endpoints = st.one_of(v4_endpoints, v6_endpoints)
keys = st.one_of(st.just(""), st.text(Z85, min_size=40, max_size=40))
peers = st.builds(
    PeerInfo,
    id=ids,
    name=names,
    mesh=meshes,
    version=st.integers(0, 65535),
    endpoints=st.lists(endpoints, min_size=1, max_size=8).map(tuple),
    key=keys,
    source=st.just("mdns"),
)


def good() -> PeerInfo:
    return PeerInfo("0" * 32, "node", "mesh", 1, ("tcp://127.0.0.1:5000",))


@settings(max_examples=300)
@given(peers)
def test_round_trip(info: PeerInfo) -> None:
    props = txt_from_peer(info)
    assert txt_size(props) <= MAX_TXT_BYTES
    assert peer_from_txt(props) == info


@settings(max_examples=500)
@given(st.dictionaries(st.binary(max_size=12), st.one_of(st.none(), st.binary(max_size=80))))
def test_garbage_never_escapes(props: dict[bytes, bytes | None]) -> None:
    try:
        peer_from_txt(props)
    except InvalidRecord as exc:
        error = exc
    else:
        return  # accepted
    assert error.reason


@settings(max_examples=300)
@given(st.sampled_from([b"id", b"name", b"mesh", b"v", b"ep", b"key"]), st.binary(max_size=90))
def test_one_mangled_field(key: bytes, value: bytes) -> None:
    props = txt_from_peer(good())
    props[key] = value
    try:
        info = peer_from_txt(props)
    except InvalidRecord:
        return
    # whatever got through is a fully valid record again
    assert txt_from_peer(info)


@settings(max_examples=300)
@given(st.text(max_size=40))
def test_endpoint_garbage(url: str) -> None:
    try:
        check_endpoint(url)
    except InvalidRecord:
        return
    assert url.startswith("tcp://")


@pytest.mark.parametrize(
    "url",
    [
        "tcp://0.0.0.0:1",
        "tcp://0.1.2.3:1",
        "tcp://224.0.0.251:5353",
        "tcp://239.1.1.1:80",
        "tcp://255.255.255.255:80",
        "tcp://240.0.0.1:80",
        "tcp://127.0.0.1:0",
        "tcp://127.0.0.1:65536",
        "tcp://127.0.0.1:080",
        "tcp://127.0.0.1:+80",
        "tcp://127.0.0.1",
        "tcp://:80",
        "tcp://localhost:80",
        "tcp://01.2.3.4:80",
        "tcp://1.2.3:80",
        "tcp://::1:80",
        "tcp://[::1]",
        "tcp://[::1]80",
        "tcp://[127.0.0.1]:80",
        "tcp://[::]:80",
        "tcp://[ff02::fb]:5353",
        "tcp://[::ffff:10.0.0.1]:80",
        "tcp://[fe80::1]:80",
        "tcp://[fd00::1%eth0]:80",
        "tcp://[fe80::1%]:80",
        "tcp://[fe80::1%eth0/x]:80",
        "tcp://[localhost]:80",
        "udp://127.0.0.1:80",
        "tcp://127.0.0.1:80 ",
        "tcp://127.0.0.1:٨٠",
    ],
)
def test_bad_endpoints(url: str) -> None:
    with pytest.raises(InvalidRecord):
        check_endpoint(url)


@pytest.mark.parametrize(
    "url",
    ["tcp://[::1]:80", "tcp://[fd77::1]:7700", "tcp://[2001:db8::5]:1",
     "tcp://[fe80::1%eth0]:80", "tcp://[FE80::A%7]:80"],
)
def test_ipv6_endpoints(url: str) -> None:
    assert check_endpoint(url) == url


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("id", "0" * 31),
        ("id", "A" * 32),
        ("id", ""),
        ("name", ""),
        ("name", "x" * 64),
        ("name", "é" * 32),
        ("name", "a\nb"),
        ("name", "\ud800"),
        ("mesh", ""),
        ("mesh", "a b"),
        ("mesh", "m" * 64),
        ("mesh", "mesh/1"),
        ("version", -1),
        ("version", 65536),
        ("version", True),
        ("endpoints", ()),
        ("endpoints", tuple(f"tcp://10.0.0.{i}:1" for i in range(1, 10))),
        ("endpoints", ("tcp://10.0.0.1:1,tcp://10.0.0.2:2",)),
        ("key", "x" * 39),
        ("key", "," * 40),
    ],
)
def test_bad_own_info(field: str, value: object) -> None:
    fields = {
        "id": "0" * 32,
        "name": "node",
        "mesh": "m",
        "version": 1,
        "endpoints": ("tcp://127.0.0.1:5000",),
    }
    fields[field] = value
    with pytest.raises(InvalidRecord):
        txt_from_peer(PeerInfo(**fields))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("key", "value"),
    [
        (b"v", b"01"),
        (b"v", b"1.0"),
        (b"v", b"99999"),
        (b"v", None),
        (b"id", b"\xff" * 32),
        (b"name", b"\xc3"),
        (b"ep", b""),
        (b"ep", b"tcp://127.0.0.1:5000,"),
        (b"key", b""),
        (b"key", None),
    ],
)
def test_bad_incoming_fields(key: bytes, value: bytes | None) -> None:
    props = txt_from_peer(good())
    props[key] = value
    with pytest.raises(InvalidRecord):
        peer_from_txt(props)


@pytest.mark.parametrize("key", [b"id", b"name", b"mesh", b"v", b"ep"])
def test_missing_key(key: bytes) -> None:
    props = txt_from_peer(good())
    del props[key]
    with pytest.raises(InvalidRecord, match=key.decode()):
        peer_from_txt(props)


def test_unknown_keys_are_ignored() -> None:
    props = txt_from_peer(good())
    props[b"future"] = b"x"
    props[b"flag"] = None
    assert peer_from_txt(props) == good()


def test_size_limit() -> None:
    props = txt_from_peer(good())
    props[b"pad"] = b"x" * MAX_TXT_BYTES
    with pytest.raises(InvalidRecord, match="limit"):
        peer_from_txt(props)
    big = PeerInfo(
        "0" * 32,
        "n" * 63,
        "m" * 63,
        65535,
        tuple(f"tcp://223.255.255.{i}:65535" for i in range(1, 9)),
        "k" * 40,
    )
    assert txt_size(txt_from_peer(big)) <= MAX_TXT_BYTES


@settings(max_examples=200)
@given(st.dictionaries(st.sampled_from([b"id", b"name", b"mesh", b"v", b"ep", b"key", b"x" * 200]),
                       st.none() | st.binary(max_size=1500)))
def test_large_garbage_values_never_escape(props: dict[bytes, bytes | None]) -> None:
    """Values up to 1500 bytes on the known keys: InvalidRecord, or a record within limits."""
    try:
        info = peer_from_txt(props)
    except InvalidRecord as exc:
        error = exc
    else:
        assert txt_size(txt_from_peer(info)) <= MAX_TXT_BYTES
        return
    assert error.reason


@settings(max_examples=300)
@given(peers, st.data())
def test_byte_flips_in_a_valid_record(info: PeerInfo, data: st.DataObject) -> None:
    """One byte of one value of a real record changed: rejected, or still a fully valid
    record (a flip inside a name or an id can yield another valid one)."""
    props = txt_from_peer(info)
    key = data.draw(st.sampled_from(sorted(props)))
    value = bytearray(props[key] or b"")
    if value:
        value[data.draw(st.integers(0, len(value) - 1))] ^= data.draw(st.integers(1, 255))
    props[key] = bytes(value)
    try:
        parsed = peer_from_txt(props)
    except InvalidRecord:
        return
    assert peer_from_txt(txt_from_peer(parsed)) == parsed
