"""Hostile mDNS on a namespace LAN: a stranger on h3 multicasts garbage, another mesh's
record, malformed TXT records and spoofs of a live node (its id with the stranger's
address, under a new instance name and under the node's own, plus a forged goodbye).
The node under test (h1) stays up, lists no bogus peer, keeps its real peer (h2) and its
connection, still receives from it, and counts every kind of drop."""

from __future__ import annotations

import json
import re
import sys
import time
from typing import Any

import pytest

from tests import netns

from ._meshproc import MeshProc, unique

pytestmark = pytest.mark.timeout(90)

FOREIGN_NET_IP = "192.0.2.3"
"""A TEST-NET-1 address added to the stranger's own eth0, inside its namespace."""


def role(host: netns.Host, *args: str) -> MeshProc:
    return MeshProc(host, [sys.executable, "-m", "tests.system._mdns_roles", *args], stdin=True)


def status(proc: MeshProc) -> dict[str, Any]:
    start = len(proc.lines)
    proc.write("status\n")
    return dict(json.loads(proc.wait_line(r"^\{", 10, start=start).text))


def wait_status(proc: MeshProc, check: Any, timeout: float, what: str) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        now = status(proc)
        if check(now):
            return now
        assert time.monotonic() < deadline, f"{what}: {now}\n{proc.describe()}"
        time.sleep(0.1)


def test_hostile_mdns_is_dropped_and_the_real_peer_kept(lan: netns.Lan) -> None:
    h1, h2, h3 = lan[0], lan[1], lan[2]
    mesh = unique("mdns")
    target = role(h1, "node", h1.ip, mesh, "target")
    honest = role(h2, "node", h2.ip, mesh, "honest")
    ready = {p: dict(kv.split("=", 1) for kv in p.wait_line("^ready ", 15).text.split()[1:])
             for p in (target, honest)}
    honest_id, honest_ctl = ready[honest]["id"], ready[honest]["ctl"]
    target.wait_line(rf"^joined name=honest id={honest_id}$", 15)
    honest.write("pub hz.before 1\n")
    target.wait_line(r"^got hz\.before 1$", 10)
    before = status(target)
    assert [p["id"] for p in before["peers"]] == [honest_id], before

    add_ip = ["ip", "addr", "add", f"{FOREIGN_NET_IP}/24", "dev", h3.interface]
    assert h3.run(add_ip, 10).returncode == 0
    params = {"mesh": mesh, "real_id": honest_id, "real_name": "honest",
              "real_instance": f"honest-{honest_id[:8]}._zeromesh._tcp.local.",
              "foreign_ip": FOREIGN_NET_IP}
    stranger = role(h3, "attack", h3.ip, json.dumps(params))
    stranger.wait_line("^done$", 30)
    sent = {m.group(1): int(m.group(2)) for ln in stranger.texts()
            if (m := re.match(r"^sent (.+): (\d+)$", ln))}

    def dropped(s: dict[str, Any], reason: str) -> int:
        return int(s["mdns_dropped"].get(reason, 0)) - int(before["mdns_dropped"].get(reason, 0))

    # every bad TXT kind once (its name), but a non-UTF-8 mesh is just another mesh
    bad_kinds = [k for k in sent if k.startswith("bad txt: ") and k != "bad txt: non-UTF-8 mesh"]
    want = {"other_mesh": 2, "bad_txt": len(bad_kinds), "unroutable": 1, "foreign_source": 1}
    after = wait_status(target, lambda s: all(dropped(s, r) >= n for r, n in want.items()),
                        20, "drops not counted")
    # still the same one peer, alive, at its real control endpoint
    honest.write("pub hz.after 2\n")
    target.wait_line(r"^got hz\.after 2$", 10)
    after = status(target)
    stranger.close_stdin()
    stranger.wait_exit(10)
    print(f"\nmDNS datagrams sent by the stranger: {sum(sent.values())}")
    for kind in sorted(sent):
        print(f"  {kind}: {sent[kind]}")
    print("target mDNS drops:", {r: dropped(after, r) for r in after["mdns_dropped"]})
    print("target input drops:", after["input_dropped"])
    print("target peers:", after["peers"])
    print("target mDNS view:", after["mdns_peers"])
    hellos = stranger.matching("^hello ")
    print(f"control messages the stranger received at its spoofed endpoint: {len(hellos)}")
    for line in hellos[:3]:
        print("  ", line.text[:400])
    # the node's own drop counts (and so /metrics) include discovery's, prefixed mdns_
    assert after["input_dropped"].get("mdns_bad_txt", 0) >= len(bad_kinds), after
    assert [(p["id"], p["state"]) for p in after["peers"]] == [(honest_id, "alive")], after
    assert after["peers"][0]["endpoints"][0] == honest_ctl, after
    assert {p["id"] for p in after["mdns_peers"]} <= {honest_id}, after
    joined = target.matching(r"^(joined|left|lost) ")
    assert [ln.text for ln in joined] == [f"joined name=honest id={honest_id}"], joined
    assert target.proc.poll() is None
    assert honest.proc.poll() is None
    # what the duplicate-id spoof earned the stranger: the target greets the spoofed control
    # endpoint with its own hello (what any stranger gets by asking its advertised control
    # port); nothing else, and its peer record and links stay the real node's
    assert all(ln.text.startswith(f'hello Hello {{"id": "{ready[target]["id"]}"')
               for ln in hellos), hellos
    warned = [ln for ln in target.stderr_lines if "dropping mDNS record" in ln]
    for reason in ("bad_txt", "unroutable", "foreign_source"):
        assert any(f"({reason})" in ln for ln in warned), target.describe()
    assert not [ln for ln in target.stderr_lines if "Traceback" in ln], target.describe()
    target.close_stdin()
    honest.close_stdin()
    assert target.wait_exit(15) == 0, target.describe()
    assert honest.wait_exit(15) == 0, honest.describe()
