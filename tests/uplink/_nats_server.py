"""A real ``nats-server`` with JetStream (file store) for the uplink tests.

`NatsServer` writes a config file into a temporary directory (``listen``,
``server_name``, ``jetstream { store_dir }``, optional ``authorization``; no HTTP
monitoring port), starts the server as a child of this process and waits until its port
answers with the NATS ``INFO`` greeting. It listens on 127.0.0.1 by default, or on
``host`` inside a network namespace when given an ``argv_prefix`` such as
``["ip", "netns", "exec", ns]`` (`on_host` does that for a `tests.netns.Host`). The port
is picked free once and kept, so `restart` brings the same server back at the same URL
with the same store: what JetStream had on disk survives a `kill`.

Only the PID this helper started is ever signalled. `running_nats` and the
``nats_server`` fixture (tests/uplink/conftest.py) stop it and remove its files even when
the test fails. Without nats-server the test is skipped (failed in CI, see `_binaries`).

`stream_messages` reads back every message a stream holds, for checks such as "each
message exactly once by ``Nats-Msg-Id``, in order per publisher".
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Final

from tests.uplink._binaries import require_binary

if TYPE_CHECKING:
    from nats.aio.msg import Msg

    from tests.netns import Host

LOOPBACK: Final[str] = "127.0.0.1"
READY_TIMEOUT: Final[float] = 10.0
"""How long a start may take until the port answers (a restart recovers the store first)."""
STOP_TIMEOUT: Final[float] = 5.0
"""How long `stop` waits after SIGTERM before it SIGKILLs."""
_PROBE_EVERY: Final[float] = 0.02
_LOG_TAIL: Final[int] = 4000
"""Characters of the server's output quoted when it fails to start."""

_FREE_PORT_CODE: Final[str] = """
import socket, sys
s = socket.socket(); s.bind((sys.argv[1], 0)); print(s.getsockname()[1]); s.close()
"""
_PROBE_CODE: Final[str] = """
import socket, sys
try:
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=0.5) as s:
        sys.exit(0 if s.recv(5) == b"INFO " else 1)
except OSError:
    sys.exit(1)
"""
"""One readiness probe run inside the namespace (`argv_prefix`): exit 0 if NATS answered."""


class NatsServerError(RuntimeError):
    """The server did not start (exited, or its port did not answer in time); the message
    quotes what it printed."""


def _quote(value: str) -> str:
    """A string value for the NATS config file (its quoted strings take JSON's escapes)."""
    return json.dumps(value)


def _free_port_here(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _probe_here(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5) as sock:
            return sock.recv(5) == b"INFO "
    except OSError:
        return False


class NatsServer:
    """One nats-server process with JetStream on a file store in its own directory.

    Args:
        host: The address to listen on (127.0.0.1, or a namespace's interface address).
        port: The port; None picks a free one (in the namespace, with `argv_prefix`).
        user, password: Require these credentials from every client (both or neither).
        argv_prefix: Prepended to the server's command line (and to each readiness probe),
            e.g. ``["ip", "netns", "exec", "ns1"]``; it must exec the program, so that
            the PID we hold is the server's own.
        workdir: Where the config, the log and the store live. None: a fresh temporary
            directory, removed by `close`.
        ready_timeout: How long `start` waits for the port to answer.
        publish_allow: The only subjects the user may publish to (with user and password):
            the server refuses the rest, message by message.
    """

    def __init__(self, *, host: str = LOOPBACK, port: int | None = None,
                 user: str | None = None, password: str | None = None,
                 argv_prefix: Sequence[str] = (), workdir: Path | None = None,
                 ready_timeout: float = READY_TIMEOUT,
                 tls: tuple[Path, Path] | None = None,
                 publish_allow: Sequence[str] | None = None) -> None:
        if (user is None) != (password is None):
            raise ValueError("give both user and password, or neither")
        if publish_allow is not None and user is None:
            raise ValueError("publish permissions belong to a user: give user and password")
        self.binary: Final[str] = require_binary("nats-server", "nats-server")
        self.host: Final[str] = host
        self.user: Final[str | None] = user
        self.password: Final[str | None] = password
        self.argv_prefix: Final[tuple[str, ...]] = tuple(argv_prefix)
        self.tls: Final[tuple[Path, Path] | None] = tls
        """(certificate, key): clients must speak TLS (``nats+tls://``)."""
        self.publish_allow: Final[tuple[str, ...] | None] = (
            None if publish_allow is None else tuple(publish_allow))
        """The only subjects the user may publish to (a server that refuses some)."""
        self.ready_timeout = ready_timeout
        self.name: Final[str] = f"zm-nats-{secrets.token_hex(4)}"
        self._own_workdir = workdir is None
        self.workdir: Final[Path] = (Path(tempfile.mkdtemp(prefix="zm-nats-")) if workdir is None
                                     else workdir)
        self.store_dir: Final[Path] = self.workdir / "jetstream"
        self.config_path: Final[Path] = self.workdir / "nats-server.conf"
        self.log_path: Final[Path] = self.workdir / "nats-server.log"
        self._port = port
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_start = 0

    @classmethod
    def on_host(cls, host: Host, **kw: Any) -> NatsServer:
        """A server listening on a `tests.netns.Host`'s address, inside its namespace
        (not started; the LAN's teardown also kills it if the test does not)."""
        return cls(host=host.ip, argv_prefix=["ip", "netns", "exec", host.netns], **kw)

    # --- what clients need --------------------------------------------------------------

    @property
    def port(self) -> int:
        """The client port (picked at the first `start` when not given)."""
        if self._port is None:
            raise RuntimeError("the port is picked at start()")
        return self._port

    @property
    def address(self) -> str:
        """``host:port`` (an IPv6 host in brackets)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def url(self) -> str:
        """``nats://host:port`` (no credentials; see `auth_url`)."""
        return f"nats://{self.address}"

    @property
    def auth_url(self) -> str:
        """`url` with ``user:password@`` in it when the server requires them."""
        if self.user is None or self.password is None:
            return self.url
        return self.url.replace("nats://", f"nats://{self.user}:{self.password}@", 1)

    @property
    def pid(self) -> int | None:
        """The server's PID while it runs (None before start and after stop/kill)."""
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    @property
    def running(self) -> bool:
        return self.pid is not None

    # --- lifecycle ----------------------------------------------------------------------

    def start(self) -> NatsServer:
        """Starts the server and returns once its port answers; on failure the process is
        killed and NatsServerError quotes its output."""
        if self.running:
            raise RuntimeError(f"{self.name} is already running (pid {self.pid})")
        if self._port is None:
            self._port = self._free_port()
        self.store_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self._config())
        with self.log_path.open("ab") as log:
            self._log_start = log.tell()
            self._proc = self._spawn(log)
        try:
            self._wait_ready()
        except BaseException:
            self.kill()
            raise
        return self

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGTERM (nats-server shuts down cleanly), wait, SIGKILL after `timeout`; returns
        the exit status, or None if it was not running. Idempotent."""
        proc = self._proc
        if proc is None:
            return None
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self._proc = None
        return proc.returncode

    def kill(self) -> None:
        """SIGKILL (a crash: nothing flushed) and wait until it is gone. Idempotent."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait(STOP_TIMEOUT)
        self._proc = None

    def restart(self) -> NatsServer:
        """Stops the server if it runs, then starts it again on the same port with the
        same store."""
        self.stop()
        return self.start()

    def close(self) -> None:
        """Stops the server and removes its directory if this helper made it."""
        try:
            self.stop()
        finally:
            if self._own_workdir:
                shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> NatsServer:
        if not self.running:
            try:
                self.start()
            except BaseException:
                self.close()
                raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<NatsServer {self.name} {self.host}:{self._port} pid={self.pid}>"

    def log(self) -> str:
        """What the server printed since its latest start."""
        try:
            with self.log_path.open("rb") as log:
                log.seek(self._log_start)
                return log.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    # --- internals ----------------------------------------------------------------------

    def _config(self) -> str:
        lines = [
            f"server_name: {_quote(self.name)}",
            f"listen: {_quote(self.address)}",
            "jetstream {",
            f"  store_dir: {_quote(str(self.store_dir))}",
            "}",
        ]
        if self.tls is not None:
            lines += ["tls {", f"  cert_file: {_quote(str(self.tls[0]))}",
                      f"  key_file: {_quote(str(self.tls[1]))}", "}"]
        if self.user is not None and self.password is not None and self.publish_allow:
            permissions = json.dumps({"publish": {"allow": list(self.publish_allow)}})
            lines += ["authorization {", "  users: [", f"    {{user: {_quote(self.user)}, "
                      f"password: {_quote(self.password)}, permissions: {permissions}}}",
                      "  ]", "}"]
        elif self.user is not None and self.password is not None:
            lines += ["authorization {", f"  user: {_quote(self.user)}",
                      f"  password: {_quote(self.password)}", "}"]
        return "\n".join(lines) + "\n"

    def _spawn(self, log: IO[bytes]) -> subprocess.Popen[bytes]:
        argv = [*self.argv_prefix, self.binary, "-c", str(self.config_path)]
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, cwd=self.workdir)

    def _in_namespace(self, code: str, *args: str) -> subprocess.CompletedProcess[str]:
        argv = [*self.argv_prefix, sys.executable, "-I", "-S", "-c", code, *args]
        return subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)

    def _free_port(self) -> int:
        if not self.argv_prefix:
            return _free_port_here(self.host)
        done = self._in_namespace(_FREE_PORT_CODE, self.host)
        if done.returncode != 0:
            raise NatsServerError(f"no free port on {self.host} via {self.argv_prefix}: "
                                  f"{done.stderr.strip()}")
        return int(done.stdout)

    def _probe(self) -> bool:
        if not self.argv_prefix:
            return _probe_here(self.host, self.port)
        return self._in_namespace(_PROBE_CODE, self.host, str(self.port)).returncode == 0

    def _wait_ready(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self.ready_timeout
        while True:
            status = self._proc.poll()
            if status is not None:
                raise NatsServerError(f"nats-server exited with status {status} at start:\n"
                                      f"{self.log()[-_LOG_TAIL:]}")
            if self._probe():
                return
            if time.monotonic() > deadline:
                raise NatsServerError(f"nats-server did not answer on {self.address} "
                                      f"within {self.ready_timeout} s:\n"
                                      f"{self.log()[-_LOG_TAIL:]}")
            time.sleep(_PROBE_EVERY)


@contextlib.contextmanager
def running_nats(**kw: Any) -> Iterator[NatsServer]:
    """A started `NatsServer` (arguments as its constructor's), stopped and its files
    removed when the block ends, however it ends."""
    server = NatsServer(**kw)
    try:
        yield server.start()
    finally:
        server.close()


async def stream_messages(url: str, stream: str, subject_filter: str = ">", *,
                          timeout: float = 10.0, batch: int = 1000) -> list[Msg]:
    """Every message `stream` holds on subjects matching `subject_filter`, in stream order
    (each once), read by an ephemeral pull consumer that is deleted afterwards.

    Returns the nats-py messages (``.subject``, ``.data``, ``.headers`` such as
    ``Nats-Msg-Id``, ``.metadata.sequence.stream``). The count is what the stream held
    when the consumer was made. `url` may carry ``user:password@``.

    Raises:
        TimeoutError: Not all of them arrived within `timeout` seconds.
    """
    import nats
    from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

    async with asyncio.timeout(timeout):
        # Not nats-py's default of 60 connect attempts 2 s apart: the server is up or the
        # test has failed already.
        nc = await nats.connect(url, allow_reconnect=False, connect_timeout=timeout,
                                max_reconnect_attempts=3, reconnect_time_wait=0.2)
        try:
            js = nc.jetstream()
            config = ConsumerConfig(deliver_policy=DeliverPolicy.ALL, ack_policy=AckPolicy.NONE,
                                    inactive_threshold=timeout + 5.0)
            sub = await js.pull_subscribe(subject_filter, stream=stream, config=config)
            info = await sub.consumer_info()
            held = info.num_pending or 0
            messages: list[Msg] = []
            try:
                while len(messages) < held:
                    want = min(batch, held - len(messages))
                    messages.extend(await sub.fetch(want, timeout=timeout))
            finally:
                await sub.unsubscribe()
                await js.delete_consumer(stream, info.name)
            return messages
        finally:
            await nc.close()
