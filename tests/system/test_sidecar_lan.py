"""The sidecar and the library across hosts of a namespace LAN: services served by HTTP
apps (``[[service]]``), scatter-gather, bulk NDJSON publishing and typed payloads.

Every node is a real process inside a host namespace of a 3-host LAN the test built
(tests/netns.py): ``zeromesh agent`` processes with their HTTP API on 127.0.0.1:7474
of their own host, HTTP apps and library programs (tests/system/_sidecar_role.py)
bound to their host's 10.77.x.y address, found by mDNS. The test reaches an agent
with curl run inside that agent's host. Each test builds its own LAN (it takes
about 50 ms) and its teardown SIGKILLs every process started on it and deletes its
namespaces, even on failure. Every wait has a deadline; nothing sleeps to let things settle.
"""

from __future__ import annotations

import json
import signal
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TypeVar

import pytest

from tests import netns
from tests.helpers import eventually
from tests.system._meshproc import Agent, Line, MeshProc, mesh_argv, unique
from tests.system._sidecar_role import APP_TRACEPARENT, READINGS, TRACEPARENT

pytestmark = [pytest.mark.netns, pytest.mark.timeout(150)]

HTTP_PORT: Final[int] = 7474
"""Each agent's HTTP API, on 127.0.0.1 of its own host (a namespace of the test's own)."""
APP_PORT: Final[int] = 8080
"""Each app's port, on its host's LAN address."""
WAIT: Final[float] = 30.0
BULK: Final[int] = 10_000
BAD_LINE: Final[int] = 5_000
AT_ONCE: Final[float] = 10.0
"""A gathering that stops at its first reply ends within this, half its 20 s timeout
(a reply takes milliseconds; the bound is loose for a loaded machine)."""
P = TypeVar("P", bound=MeshProc)


# -- processes -------------------------------------------------------------------------


class Started:
    """Starts a test's processes on the LAN's hosts and keeps them, so that a failure shows
    what each one printed (the LAN's teardown kills them all): use as ``with``."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.procs: list[MeshProc] = []

    def __enter__(self) -> Started:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: object) -> None:
        if isinstance(exc, AssertionError):
            every = "\n".join(proc.describe() for proc in self.procs)
            raise AssertionError(f"{exc}\n\nevery process of the test:\n{every}") from exc

    def add(self, proc: P) -> P:
        self.procs.append(proc)
        return proc

    def role(self, host: netns.Host, *args: str) -> MeshProc:
        """A process of tests/system/_sidecar_role.py on ``host``, its stdin kept open."""
        return self.add(MeshProc(host, [sys.executable, "-m", "tests.system._sidecar_role",
                                        *args], stdin=True))

    def app(self, host: netns.Host, *, slow: bool = False) -> MeshProc:
        """The HTTP app ``app-<host>`` on ``host``'s address (see `app_url`)."""
        return self.role(host, "app", f"app-{host.name}", host.ip, str(APP_PORT),
                         *(["--slow"] if slow else []))

    def agent(self, host: netns.Host, mesh: str,
              services: Mapping[str, str] | None = None) -> Agent:
        """An agent on ``host`` (HTTP on its 127.0.0.1:7474) serving ``services``
        (name: url)."""
        extra = ["--http", f"127.0.0.1:{HTTP_PORT}"]
        if services:
            config = self.tmp_path / f"{host.name}.toml"
            config.write_text("".join(f'[[service]]\nname = "{name}"\nurl = "{url}"\n'
                                      for name, url in services.items()))
            extra += ["--config", str(config)]
        return self.add(Agent(host, mesh, extra=extra))


def app_url(host: netns.Host, path: str) -> str:
    return f"http://{host.ip}:{APP_PORT}/{path}"


def ready(*procs: MeshProc) -> None:
    """Every agent has printed ``ready`` and every app ``listening``."""
    for proc in procs:
        if isinstance(proc, Agent):
            proc.wait_ready(WAIT)
        else:
            proc.wait_line(r'"event": "listening"', WAIT)


def events(proc: MeshProc, kind: str, *, start: int = 0) -> list[dict[str, Any]]:
    """Every JSON line of ``proc`` (from line ``start``) whose event is ``kind``."""
    return [json.loads(line.text)
            for line in proc.matching(rf'^\{{"event": "{kind}"', start=start)]


def event(proc: MeshProc, kind: str, timeout: float = WAIT) -> dict[str, Any]:
    """The first JSON line of ``proc`` whose event is ``kind``."""
    found: dict[str, Any] = json.loads(proc.wait_line(rf'^\{{"event": "{kind}"', timeout).text)
    return found


def finish(*procs: MeshProc) -> None:
    """Ends each library process's stdin; each exits 0."""
    for proc in procs:
        proc.close_stdin()
    for proc in procs:
        assert proc.wait_exit(WAIT) == 0, proc.describe()


# -- HTTP, by curl inside a host --------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Answer:
    """An HTTP response as curl got it."""

    status: int
    headers: dict[str, str]
    """Names lower-cased."""
    body: str

    def json(self) -> Any:
        return json.loads(self.body)


def post(host: netns.Host, path: str, data: str | Path = "", *,
         headers: Mapping[str, str] | None = None, timeout: float = 30.0) -> Answer:
    """``POST http://127.0.0.1:7474<path>`` from inside ``host`` (the agent there); ``data``
    is the body, or a file holding it."""
    argv = ["curl", "-sS", "-i", "-m", f"{timeout:g}", "-H", "Expect:",
            "-H", "Content-Type: text/plain",
            "--data-binary", f"@{data}" if isinstance(data, Path) else data]
    for name, value in (headers or {}).items():
        argv += ["-H", f"{name}: {value}"]
    done = host.run([*argv, f"http://127.0.0.1:{HTTP_PORT}{path}"], timeout + 5)
    assert done.returncode == 0, f"curl {path}: exit {done.returncode}: {done.stderr}"
    head, _, body = done.stdout.partition("\n\n")  # (text mode: CRLF read as LF)
    status, *lines = head.split("\n")
    fields = (line.partition(":") for line in lines)
    return Answer(int(status.split()[1]), {name.strip().lower(): value.strip()
                                           for name, _, value in fields}, body)


def post_until(host: netns.Host, path: str, status: int, data: str = "", *,
               headers: Mapping[str, str] | None = None) -> Answer:
    """`post` again until it answers ``status`` (the agent has found what it needs)."""
    def answered() -> Answer:
        answer = post(host, path, data, headers=headers)
        assert answer.status == status, answer  # (the last one is in the failure)
        return answer

    return eventually(answered, timeout=WAIT, interval=0.05, message=f"POST {path} -> {status}")


# -- 1. services over HTTP ---------------------------------------------------------------


def headers_at(app: MeshProc, body: str) -> dict[str, str]:
    """The headers (names lower-cased) of the request with ``body`` that ``app`` received."""
    [request] = [e for e in events(app, "got") if e["body"] == body]
    return {name.lower(): value for name, value in request["headers"].items()}


def unanswered(app: MeshProc) -> set[str]:
    """The bodies of the requests ``app`` got and never answered."""
    return ({e["body"] for e in events(app, "got")}
            - {e["body"] for e in events(app, "answered")})


def test_http_apps_serve_requests_from_http_cli_and_library_and_fail_over(
        lan: netns.Lan, tmp_path: Path) -> None:
    """``upper`` served by an app behind the agent on h2 and another on h3:

    - h1's agent (HTTP), the CLI on h1 and a library node on h1 all get the app's reply
      with its headers (trace context, X-, other names under X-Zeromesh-Header-), and
      the app gets the requester's headers plus the agent's X-Zeromesh-*;
    - a stream of library requests (4 in flight) is shared by both apps;
    - h2's app SIGKILLed while requests are in flight at it: those and every later one
      are answered by h3's app within their retries; not one fails.
    """
    h1, h2, h3 = lan.hosts
    mesh = unique("svc")
    with Started(tmp_path) as started:
        apps = {h: started.app(h) for h in (h2, h3)}
        agents = [started.agent(h1, mesh)] + [
            started.agent(h, mesh, {"upper": app_url(h, "upper")}) for h in (h2, h3)]
        ready(*apps.values(), *agents)
        servers = {f"app-{h.name}": agent
                   for h, agent in zip((h2, h3), agents[1:], strict=True)}

        answer = post_until(h1, "/v1/request/upper", 200, "hi",
                            headers={"traceparent": TRACEPARENT, "X-Tenant": "t1"})
        served_by = answer.headers["x-served-by"]
        assert served_by in servers, answer
        assert answer.body == "HI"
        assert answer.headers["traceparent"] == APP_TRACEPARENT
        assert answer.headers["x-zeromesh-header-warehouse"] == "north"
        assert answer.headers["content-type"].startswith("text/plain")
        assert answer.headers["x-zeromesh-source"] == servers[served_by].name
        seen = headers_at(apps[h2 if served_by == "app-h2" else h3], "hi")
        assert (seen["traceparent"], seen["x-tenant"]) == (TRACEPARENT, "t1")
        assert (seen["x-zeromesh-service"], seen["x-zeromesh-source"]) == (
            "upper", agents[0].name)
        assert seen["x-zeromesh-id"]

        cli = started.add(MeshProc(h1, mesh_argv("req", h1, mesh, "upper", "cli", "--json",
                                                 "--timeout", "15")))
        assert cli.wait_exit(WAIT) == 0, cli.describe()
        [by_cli] = [json.loads(text) for text in cli.texts()]
        assert (by_cli["data"], by_cli["service"]) == ("CLI", "upper"), by_cli
        assert by_cli["headers"]["x-served-by"] in servers, by_cli
        assert (by_cli["headers"]["traceparent"], by_cli["headers"]["warehouse"]) == (
            APP_TRACEPARENT, "north")

        client = started.role(h1, "stream", mesh, h1.ip)
        first = event(client, "first")
        assert first["data"] == "LIB"
        assert (first["headers"]["x-served-by"], first["headers"]["warehouse"]) in {
            (name, "north") for name in servers}, first
        seen = headers_at(apps[h2 if first["headers"]["x-served-by"] == "app-h2" else h3],
                          "lib")
        assert (seen["x-zeromesh-header-tenant"], seen["traceparent"]) == ("t2", TRACEPARENT)

        def both_served(lines: Sequence[Line]) -> int | None:
            names = [json.loads(ln.text).get("served_by") for ln in lines]
            return len(lines) if len(names) > 20 and set(names) >= set(servers) else None

        assert client.wait_for(both_served, WAIT), "the load is not shared"
        apps[h2].wait_line(r'^\{"event": "got"', WAIT, start=len(apps[h2].lines))  # a new one
        apps[h2].send_signal(signal.SIGKILL)
        killed_at = len(client.lines)
        client.wait_line(r'"event": "reply"', WAIT, start=killed_at + 40)
        finish(client)
        assert apps[h2].wait_exit(WAIT) == -signal.SIGKILL
        in_flight = unanswered(apps[h2])

        replies = events(client, "reply")
        assert events(client, "error") == []
        assert all(r["data"] == f"S{r['n']}" for r in replies)
        assert len({r["n"] for r in replies}) == len(replies)
        by_app = {name: sum(r["served_by"] == name for r in replies) for name in servers}
        failed_over = {r["data"].lower(): r["served_by"] for r in replies
                       if r["data"].lower() in in_flight}
        print(f"\n{len(replies)} requests: {by_app}; in flight at the killed app, then "
              f"answered by: {failed_over}")
        assert in_flight, "no request was in flight at the killed app"
        assert failed_over == dict.fromkeys(in_flight, "app-h3")
        assert {r["served_by"] for r in events(client, "reply", start=killed_at + 10)} == {
            "app-h3"}
        assert agents[1].proc.poll() is None, "h2's agent outlives its app"


# -- 2. scatter-gather ---------------------------------------------------------------------


def test_request_all_gathers_the_timely_servers_across_hosts(lan: netns.Lan,
                                                             tmp_path: Path) -> None:
    """``who`` served on h1 (its app never answers), h2 and h3: a gathering with a 1.5 s
    timeout, by the library and by ``?all=true`` on h1's agent, gets the two replies of
    h2 and h3; with ``max_replies=1`` and a 20 s timeout, one reply, at once."""
    hosts = lan.hosts
    mesh = unique("all")
    with Started(tmp_path) as started:
        apps = [started.app(h, slow=h is hosts[0]) for h in hosts]
        agents = [started.agent(h, mesh, {"who": app_url(h, "who")}) for h in hosts]
        gatherer = started.role(hosts[0], "gather", mesh, hosts[0].ip)
        ready(*apps, *agents)
        timely = {(agent.name, f"app-{h.name}")
                  for h, agent in zip(hosts[1:], agents[1:], strict=True)}

        every = event(gatherer, "gathered")
        first = json.loads(gatherer.wait_line(r'"max_replies": 1', WAIT).text)
        assert {(r["source"], r["data"]) for r in every["replies"]} == timely, every
        assert all(r["error"] is None and r["headers"]["x-served-by"] == r["data"]
                   for r in every["replies"]), every
        assert 1.4 <= every["took"] < AT_ONCE, every
        assert len(first["replies"]) == 1, first
        assert (first["replies"][0]["source"], first["replies"][0]["data"]) in timely, first
        assert first["took"] < AT_ONCE, first
        finish(gatherer)

        path = "/v1/request/who?all=true"
        eventually(lambda: len(post(hosts[0], f"{path}&max_replies=2&timeout=1").json()) == 2,
                   timeout=WAIT, message="h1's agent knows the servers on h2 and h3")
        answer = post(hosts[0], f"{path}&timeout=1.5")
        assert answer.status == 200, answer
        assert {(r["source"], r["data"]) for r in answer.json()} == timely, answer
        answer = post(hosts[0], f"{path}&max_replies=1&timeout=20", timeout=AT_ONCE)
        assert answer.status == 200, answer
        [one] = answer.json()
        assert (one["source"], one["data"]) in timely, answer
        assert len(events(apps[0], "got")) >= 2, "h1's slow app was asked too"


# -- 3. bulk publish -------------------------------------------------------------------------


def ndjson(tmp_path: Path, name: str, lines: Sequence[str]) -> Path:
    path = tmp_path / name
    path.write_text("".join(f"{line}\n" for line in lines))
    return path


def test_ndjson_bulk_reaches_a_subscriber_on_another_host_in_order(lan: netns.Lan,
                                                                   tmp_path: Path) -> None:
    """10,000 NDJSON lines posted to h1's agent reach an SSE subscriber of h2's agent, all
    and in order; a body whose line 5,000 is bad is a 400 naming that line, and not one
    of its lines reaches the subscriber."""
    h1, h2, _ = lan.hosts
    mesh = unique("bulk")
    with Started(tmp_path) as started:
        agents = [started.agent(h, mesh) for h in (h1, h2)]
        ready(*agents)
        sse = started.add(MeshProc(h2, ["curl", "-sSN",
                                        f"http://127.0.0.1:{HTTP_PORT}/v1/subscribe/bulk.%3E"]))

        def probe_seen() -> bool:
            assert post(h1, "/v1/publish/bulk.probe", "?").status == 202
            return bool(sse.matching('"topic":"bulk.probe"'))

        eventually(probe_seen, timeout=WAIT, interval=0.05,
                   message="h2's subscriber gets what h1's agent publishes")
        assert post(h1, "/v1/publish/bulk.fence", "").status == 202
        fence = sse.wait_line('"topic":"bulk.fence"', WAIT)

        good = [json.dumps({"topic": "bulk.n", "data": str(i)}) for i in range(BULK)]
        answer = post(h1, "/v1/publish", ndjson(tmp_path, "good.ndjson", good))
        assert (answer.status, answer.json()) == (202, {"published": BULK}), answer
        bad = [json.dumps({"topic": "bulk.bad", "data": str(i)}) for i in range(BULK)]
        bad[BAD_LINE - 1] = json.dumps({"topic": "bulk..bad", "data": "x"})
        answer = post(h1, "/v1/publish", ndjson(tmp_path, "bad.ndjson", bad))
        assert answer.status == 400, answer
        assert answer.json()["line"] == BAD_LINE, answer
        assert answer.json()["error"].startswith(f"line {BAD_LINE}: "), answer
        assert post(h1, "/v1/publish/bulk.after", "after").status == 202

        sse.wait_line('"topic":"bulk.after"', WAIT, start=fence.index)
        got = [json.loads(text.removeprefix("data: "))
               for text in sse.texts()[fence.index + 1:] if text.startswith("data: ")]
        assert [m["topic"] for m in got] == ["bulk.n"] * BULK + ["bulk.after"], (
            f"{len(got)} events; topics {sorted({m['topic'] for m in got})}")
        assert [m["data"] for m in got[:BULK]] == [str(i) for i in range(BULK)]
        assert {m["source"] for m in got} == {agents[0].name}


# -- 4. typed payloads ---------------------------------------------------------------------


def test_a_struct_published_on_one_host_arrives_decoded_on_the_others(
        lan: netns.Lan, tmp_path: Path) -> None:
    """The blocking API publishes on h1 a dict that is not a Reading, then Readings; the
    async API on h2 and the blocking API on h3 subscribe with ``type=Reading``: each gets
    every Reading decoded, in order, counts one decode error and keeps going."""
    h1, h2, h3 = lan.hosts
    mesh = unique("typed")
    with Started(tmp_path) as started:
        subs = [started.role(h2, "typed-sub", mesh, h2.ip, "async"),
                started.role(h3, "typed-sub", mesh, h3.ip, "sync")]
        pub = started.role(h1, "typed-pub", mesh, h1.ip)
        assert event(pub, "published")["count"] == READINGS + 1
        for sub in subs:
            assert event(sub, "end")["decode_errors"] == 1
            assert [(v["type"], v["sensor"], v["celsius"], v["content_type"], v["source"])
                    for v in events(sub, "value")] == [
                ("Reading", "h1", 20.0 + i, "application/msgpack", "pub")
                for i in range(READINGS)]
        finish(pub, *subs)
