"""Brokers for the uplink tests: started here on 127.0.0.1 only, stopped by their PID.

`Mosquitto` is one broker process (start/stop/kill/restart, its port kept across a
restart, its database in `workdir`); `pub` and `Sub` drive ``mosquitto_pub`` and
``mosquitto_sub`` against it, so what the adapter does is checked by another client.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Final

from ._binaries import require_binary

WAIT: Final[float] = 10.0
"""Seconds any one wait here may take."""
READY_PROBE: Final = "zeromesh-test/ready"


def mosquitto_binary() -> str:
    """The broker's path, or skip the test."""
    require_binary("mosquitto_pub", "mosquitto-clients")
    return require_binary("mosquitto", "mosquitto")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 just now (the caller binds it soon after)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def make_certificate(workdir: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (its own CA) and its key, in `workdir`."""
    cert, key = workdir / "cert.pem", workdir / "key.pem"
    openssl = require_binary("openssl", "openssl")
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)],
                   check=True, timeout=WAIT, capture_output=True)
    return cert, key


class Mosquitto:
    """One mosquitto on 127.0.0.1 with persistence; a context manager that stops it."""

    def __init__(self, workdir: Path, *, users: Mapping[str, str] | None = None,
                 acl: str | None = None, tls: bool = False,
                 options: Iterable[str] = ()) -> None:
        self.binary = mosquitto_binary()
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.users = dict(users or {})
        self.acl = acl
        """``acl_file`` text (mosquitto's syntax), when given."""
        self.tls = tls
        """A second listener, on `tls_port`: TLS with a self-signed certificate for
        127.0.0.1 (`ca`, the file that trusts it)."""
        self.options = list(options)
        """More lines for its config file (e.g. ``max_queued_messages 0``)."""
        self.port = self.tls_port = 0
        self.ca, self.key = make_certificate(self.workdir) if tls else (Path(), Path())
        self.proc: subprocess.Popen[bytes] | None = None

    def url(self, user: str | None = None, password: str | None = None) -> str:
        auth = f"{user}:{password}@" if user is not None else ""
        return f"mqtt://{auth}127.0.0.1:{self.port}"

    def _config(self) -> Path:
        lines = [f"listener {self.port} 127.0.0.1", "persistence true",
                 f"persistence_location {self.workdir}/", f"log_dest file {self.log_path}",
                 "log_type all"]
        if self.tls:
            lines += [f"listener {self.tls_port} 127.0.0.1", f"cafile {self.ca}",
                      f"certfile {self.ca}", f"keyfile {self.key}"]
        if os.geteuid() == 0:
            lines.append("user root")  # else it drops to `mosquitto`, who cannot write here
        if self.users:
            passwd = self.workdir / "passwd"
            passwd.unlink(missing_ok=True)
            for user, password in self.users.items():
                subprocess.run(["mosquitto_passwd", "-b", *(["-c"] if not passwd.exists()
                                                            else []), str(passwd), user,
                                password], check=True, timeout=WAIT, capture_output=True)
            lines += ["allow_anonymous false", f"password_file {passwd}"]
        else:
            lines.append("allow_anonymous true")
        if self.acl is not None:
            (self.workdir / "acl").write_text(self.acl)
            lines.append(f"acl_file {self.workdir / 'acl'}")
        lines += self.options
        path = self.workdir / "mosquitto.conf"
        path.write_text("\n".join(lines) + "\n")
        return path

    @property
    def log_path(self) -> Path:
        return self.workdir / "mosquitto.log"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self) -> None:
        """Start on `port` (a free one the first time; the same one after); return once
        it accepts connections."""
        assert self.proc is None, "already running"
        for attempt in range(3):
            if not self.port or attempt:
                self.port = free_port()
                self.tls_port = free_port() if self.tls else 0
            with (self.workdir / "stderr.txt").open("ab") as stderr:
                self.proc = subprocess.Popen([self.binary, "-c", str(self._config())],
                                             stdout=subprocess.DEVNULL, stderr=stderr)
            if self._wait_ready():
                return
            self.stop()  # lost the port to someone else: try another
        raise AssertionError(f"mosquitto did not start; its log:\n{self.log()}"
                             f"{(self.workdir / 'stderr.txt').read_text(errors='replace')}")

    def _wait_ready(self) -> bool:
        assert self.proc is not None
        deadline = time.monotonic() + WAIT
        for port in (self.port, self.tls_port):
            while port and self.proc.poll() is None:
                with contextlib.suppress(OSError), \
                        socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    break
                if time.monotonic() > deadline:
                    return False
                time.sleep(0.02)
        return self.proc.poll() is None

    def stop(self) -> None:
        """SIGTERM (it saves its database), SIGKILL if it has not exited after WAIT s."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)  # after `pause`: a stopped process ignores TERM
        _end(proc)

    def kill(self) -> None:
        """A crash: SIGKILL (its database is as it last saved it)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.stop()

    def pause(self) -> None:
        """SIGSTOP: connections stay up, nothing is answered."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def restart(self) -> None:
        self.stop()
        self.start()

    def __enter__(self) -> Mosquitto:
        self.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc is not None:
            self.kill()
        else:
            self.stop()


def _client_args(port: int) -> list[str]:
    return ["-h", "127.0.0.1", "-p", str(port), "-V", "mqttv5"]


async def pub(port: int, topic: str, payloads: Iterable[str],
              properties: Mapping[str, str] | None = None, *, qos: int = 1) -> None:
    """Publish each payload (one line each) with ``mosquitto_pub -l``, in order."""
    args = ["mosquitto_pub", *_client_args(port), "-q", str(qos), "-t", topic, "-l"]
    for key, value in (properties or {}).items():
        args += ["-D", "publish", "user-property", key, value]
    proc = await asyncio.create_subprocess_exec(
        *args, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        async with asyncio.timeout(WAIT):
            _, err = await proc.communicate("".join(f"{p}\n" for p in payloads).encode())
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.decode(errors="replace")


class Sub:
    """``mosquitto_sub`` printing ``topic|user properties|payload`` lines to a file.

    With `client_id`, a persistent session (``-c -i``, never expiring): the broker keeps
    its subscription and queues for it across a broker restart (mosquitto_sub reconnects
    by itself) and while it is away; a new `Sub` with that id resumes it, appending to the
    same `out`."""

    def __init__(self, port: int, topic: str, out: Path, *, client_id: str | None = None
                 ) -> None:
        self.port = port
        self.out = out
        session = ["-c", "-i", client_id] if client_id is not None else []
        args = ["mosquitto_sub", *_client_args(port), "-q", "1", *session, "-t", topic,
                "-t", READY_PROBE, "-F", "%t|%P|%p"]
        with out.open("ab") as sink:
            self.proc = subprocess.Popen(args, stdout=sink, stderr=subprocess.DEVNULL)

    def read(self) -> list[str]:
        """Every line so far, the readiness probes left out; a last line that
        mosquitto_sub is still writing (no newline yet) is left for the next read."""
        text = self.out.read_text(errors="replace")
        text = text[:text.rfind("\n") + 1]
        return [line for line in text.splitlines() if not line.startswith(READY_PROBE)]

    async def ready(self) -> None:
        """Returns once the subscription is in force (a probe it was sent comes out)."""
        async with asyncio.timeout(WAIT):
            while READY_PROBE not in self.out.read_text(errors="replace"):
                await pub(self.port, READY_PROBE, ["probe"], qos=0)
                await asyncio.sleep(0.05)

    async def lines(self, count: int, timeout: float = WAIT) -> list[str]:
        """The first `count` lines, once there are that many."""
        try:
            async with asyncio.timeout(timeout):
                while True:  # polling the file: mosquitto_sub flushes each line
                    lines = self.read()
                    if len(lines) >= count:
                        return lines[:count]
                    await asyncio.sleep(0.02)
        except TimeoutError:
            raise AssertionError(f"{len(self.read())} of {count} lines within {timeout} s"
                                 ) from None

    def close(self) -> None:
        _end(self.proc)


def _end(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM (mosquitto saves its database), SIGKILL if still there after WAIT s."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(WAIT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(WAIT)
