"""CURVE with an allowlist across a namespace LAN: allowed nodes talk; a node with an unknown
key and a plain node receive nothing and can publish nothing into the mesh.

h1 and h2 hold keys in the allowlist; h3 holds a key nobody allows (it allows everyone, so
it tries hard); h4 has no key at all. Every node is a real ``python -m mesh`` process in its
host's namespace.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests import netns
from tests.system._meshproc import Agent, MeshProc, host_env, json_lines, mesh_argv, unique

pytestmark = [pytest.mark.netns, pytest.mark.timeout(90)]


def keygen(out: Path, name: str) -> None:
    done = subprocess.run([sys.executable, "-m", "mesh", "keygen", "--out", str(out),
                           "--name", name], capture_output=True, text=True, timeout=20,
                          check=False)
    assert done.returncode == 0, done.stderr
    assert (out / f"{name}.key_secret").stat().st_mode & 0o777 == 0o600


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, list[str]]:
    """CLI flags per role: allowed a and b, unknown c (allowing all), plain d."""
    for name in ("a", "b", "c"):
        keygen(tmp_path, name)
    allow = tmp_path / "allow"
    allow.mkdir()
    for name in ("a", "b"):
        shutil.copy(tmp_path / f"{name}.key", allow)
    everyone = tmp_path / "everyone"
    everyone.mkdir()
    for name in ("a", "b", "c"):
        shutil.copy(tmp_path / f"{name}.key", everyone)
    return {
        "a": ["--secret-key", str(tmp_path / "a.key_secret"), "--allow", str(allow)],
        "b": ["--secret-key", str(tmp_path / "b.key_secret"), "--allow", str(allow)],
        "c": ["--secret-key", str(tmp_path / "c.key_secret"), "--allow", str(everyone)],
        "d": [],
    }


def test_only_allowed_keys_exchange_messages(lan4: netns.Lan, keys: dict[str, list[str]]) -> None:
    h1, h2, h3, h4 = lan4.hosts
    mesh = unique("sec")
    agents = {role: Agent(host, mesh, f"{role}-{host.name}", extra=keys[role])
              for role, host in zip("abcd", (h1, h2, h3, h4), strict=True)}
    for agent in agents.values():
        agent.wait_ready()
    a, b, c, d = (agents[r] for r in "abcd")
    a.wait_event("joined", b.name, 10)
    b.wait_event("joined", a.name, 10)
    # Positive evidence that each refusal happened (not just that nothing happened yet):
    # the secure nodes name the strangers, the plain node names the secure ones.
    for agent in (a, b):
        agent.wait_stderr(rf"ignoring peer '{c.name}' .*not in the allowlist", 10)
        agent.wait_stderr(rf"ignoring peer '{d.name}' .*accepts only CURVE peers", 10)
    d.wait_stderr(rf"ignoring peer '{a.name}' .*requires CURVE", 10)

    # Allowed: a publisher with key a reaches a subscriber with key b.
    good_sub = MeshProc(h2, mesh_argv("sub", h2, mesh, "t.>", "--json", "--count", "3",
                                      "--timeout", "20", *keys["b"]))
    # Strangers subscribe too; they must get nothing.
    bad_subs = [MeshProc(host, mesh_argv("sub", host, mesh, "t.>", "--count", "1",
                                         "--timeout", "4", *keys[role]))
                for role, host in (("c", h3), ("d", h4))]
    pub = h1.run(mesh_argv("pub", h1, mesh, "t.secret", "--wait-subscribers", "1",
                           "--timeout", "15", *keys["a"]), 25,
                 input="s1\ns2\ns3\n", env=host_env(h1))
    assert pub.returncode == 0, pub.stderr
    assert good_sub.wait_exit(15) == 0, good_sub.describe()
    assert [m["data"] for m in json_lines("\n".join(good_sub.texts()))] == ["s1", "s2", "s3"]
    for bad in bad_subs:
        assert bad.wait_exit(15) == 1, bad.describe()  # exit 1: nothing received
        assert not bad.texts(), bad.describe()

    # Strangers publish: the secure subscriber gets nothing; their `pub` sees no subscriber.
    watcher = MeshProc(h2, mesh_argv("sub", h2, mesh, "t.>", "--count", "1", "--timeout", "5",
                                     *keys["b"]))
    evils = [MeshProc(host, mesh_argv("pub", host, mesh, "t.secret", "evil",
                                      "--wait-subscribers", "1", "--timeout", "3", *keys[role]))
             for role, host in (("c", h3), ("d", h4))]  # both at once: each waits out 3 s
    for evil in evils:
        assert evil.wait_exit(20) == 1, evil.describe()
    assert watcher.wait_exit(15) == 1, watcher.describe()
    assert not watcher.texts(), watcher.describe()

    for agent in (c, d):  # (they may join their own kind: c's subscriber shares key c)
        assert not agent.matching(rf"^joined name=({a.name}|{b.name}) "), agent.describe()
    for agent in (a, b):
        assert not agent.matching(rf"^joined name=({c.name}|{d.name}) "), agent.describe()
    for agent in agents.values():
        agent.stop()


def test_bad_key_settings_are_usage_errors(tmp_path: Path) -> None:
    keygen(tmp_path, "n")
    base = [sys.executable, "-m", "mesh", "agent", "--print-config"]
    cases = [
        (["--secret-key", str(tmp_path / "n.key_secret")], "allow: CURVE needs both"),
        (["--allow", str(tmp_path)], "secret_key: CURVE needs both"),
    ]
    for args, reason in cases:
        done = subprocess.run([*base, *args], capture_output=True, text=True, timeout=20,
                              check=False)
        assert done.returncode == 2, done.stderr
        assert reason in done.stderr, done.stderr
    (tmp_path / "n.key_secret").chmod(0o644)
    (tmp_path / "empty").mkdir()
    cases = [
        (["--secret-key", str(tmp_path / "n.key_secret"), "--allow", str(tmp_path)],
         "secret_key: " + str(tmp_path / "n.key_secret") + ": the secret key is readable"),
        (["--secret-key", str(tmp_path / "n.key"), "--allow", str(tmp_path)],
         "holds no secret key"),
    ]
    for args, reason in cases:
        done = subprocess.run([sys.executable, "-m", "mesh", "sub", "x", "--timeout", "1",
                               *args], capture_output=True, text=True, timeout=20, check=False)
        assert done.returncode == 2, done.stderr
        assert reason in done.stderr, done.stderr
    (tmp_path / "n.key_secret").chmod(0o600)
    done = subprocess.run([sys.executable, "-m", "mesh", "sub", "x", "--timeout", "1",
                           "--secret-key", str(tmp_path / "n.key_secret"),
                           "--allow", str(tmp_path / "empty")],
                          capture_output=True, text=True, timeout=20, check=False)
    assert done.returncode == 2
    assert "allow: " in done.stderr
    assert "no public keys" in done.stderr
