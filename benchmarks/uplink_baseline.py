"""The uplink benchmark's baselines: a plain client publishing straight to the broker.

Issue 14's benchmark measures the agent exporting mesh messages to NATS JetStream and to
MQTT 5; these are the figures it is compared against, from the same machine:

(a) **JetStream**: nats-py publishes 64 B messages to a stream on a file store (in a
    nats-server this script starts on 127.0.0.1 in a temporary directory), each with a
    unique ``Nats-Msg-Id`` header (the exporter sets one, and the server's duplicate
    tracking has a cost), 64 acks in flight, two ways: ``js.publish_async`` with a window
    of 64 (``publish_async_max_pending=64``), and 64 tasks each awaiting ``js.publish``
    in turn. The better median of the two is the baseline.
(b) **MQTT 5**: paho-mqtt publishes 64 B messages at QoS 1 to a mosquitto this script
    starts (127.0.0.1, persistence on, in a temporary directory) with
    ``max_inflight_messages`` 64, counting PUBACKs (``on_publish``) until every message
    is acknowledged. Nobody subscribes: this is the publish path, as the exporter's is.

A run publishes for ``--seconds`` (default 2) or until ``--max-count`` messages, whichever
comes first, then waits for every outstanding ack: msgs/s = acknowledged / (first publish
to last ack). After a JetStream run the stream must hold exactly the acknowledged
messages (no loss, no duplicate). ``--repeat`` runs (default 3) of each, interleaved,
printed one by one and as the median. Each run has a hard deadline (``--timeout``), and
both brokers are stopped (SIGTERM, then SIGKILL, by PID) and their directories removed
however the script ends.

The nats-py client runs on the event loop ``--loop`` picks (default: uvloop, as the agent
does); paho-mqtt drives its socket from this thread (``client.loop``), no thread of its own.

Run::

    python benchmarks/uplink_baseline.py                 # both, 3 runs of 2 s each
    python benchmarks/uplink_baseline.py --only nats --repeat 5
    python benchmarks/uplink_baseline.py --quick --json  # a small run, machine-readable

The functions (`jetstream_baseline`, `mqtt_baseline`, `nats_server`, `mosquitto`,
`jetstream_run`, `mqtt_run`) are importable (``import uplink_baseline`` with benchmarks/
on ``sys.path``) for the uplink benchmark itself.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final

import _harness
from _harness import LOOPBACK

SIZE: Final[int] = 64
WINDOW: Final[int] = 64
"""Acknowledgements in flight, for both brokers."""
SECONDS: Final[float] = 2.0
MAX_COUNT: Final[int] = 3_000_000
"""Messages a run publishes at the most, whatever ``--seconds`` says."""
START_TIMEOUT: Final[float] = 10.0
STOP_TIMEOUT: Final[float] = 5.0
SUBJECT: Final[str] = "baseline.data"
TOPIC: Final[str] = "baseline/data"
NATS_MODES: Final[tuple[str, ...]] = ("publish_async", "concurrent_publish")
_SBIN: Final[tuple[str, ...]] = ("/usr/local/sbin", "/usr/sbin", "/sbin")
PAYLOAD: Final[bytes] = _harness.make_payload(SIZE)
STARTED: list[tuple[str, int]] = []
"""(program, PID) of every broker this process started, for the report (all are stopped)."""


@dataclass
class Run:
    """One timed run: messages acknowledged, and the time from first publish to last ack."""

    acked: int = 0
    seconds: float = 0.0
    failed: int = 0
    """Publishes the broker refused (an error ack, or a failure reason code)."""
    error: str = ""

    @property
    def rate(self) -> float:
        return self.acked / self.seconds if self.seconds > 0 else 0.0


# --- the brokers ------------------------------------------------------------------------


def find_program(name: str) -> str:
    """The path of `name` (Debian puts the brokers in /usr/sbin, off a user's PATH)."""
    path = os.pathsep.join([os.environ.get("PATH", os.defpath), *_SBIN])
    found = shutil.which(name, path=path)
    if found is None:
        raise SystemExit(f"{name} is not installed (apt-get install {name})")
    return found


def _listening(port: int) -> bool:
    try:
        with socket.create_connection((LOOPBACK, port), timeout=0.5):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def _broker(program: str, config: Callable[[Path, int], str]) -> Iterator[int]:
    """Runs `program -c <config>` on a free port of 127.0.0.1 in a temporary directory
    until the block ends; yields the port once it accepts connections. `config` gets the
    directory and the port and returns the file's text."""
    workdir = Path(tempfile.mkdtemp(prefix=f"zm-{program}-"))
    port = _harness.free_port()
    conf = workdir / f"{program}.conf"
    conf.write_text(config(workdir, port))
    log_path = workdir / f"{program}.log"
    # setpriv (util-linux) gives the broker a parent-death signal: it is killed even if
    # this process is (SIGKILL included), as long as the thread that started it lives.
    setpriv = shutil.which("setpriv")
    reaper = [setpriv, "--pdeathsig", "KILL"] if setpriv else []
    with log_path.open("wb") as log:
        proc = subprocess.Popen([*reaper, find_program(program), "-c", str(conf)], cwd=workdir,
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    STARTED.append((program, proc.pid))
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not _listening(port):
            if proc.poll() is not None or time.monotonic() > deadline:
                why = f"exited {proc.returncode}" if proc.poll() is not None else "timed out"
                raise RuntimeError(f"{program} did not start ({why}):\n"
                                   f"{log_path.read_text(errors='replace')[-2000:]}")
            time.sleep(0.02)
        yield port
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(STOP_TIMEOUT)
        shutil.rmtree(workdir, ignore_errors=True)


def nats_server(*, jetstream: bool = True,
                extra: str = "") -> contextlib.AbstractContextManager[int]:
    """A nats-server on 127.0.0.1, with JetStream on a file store unless `jetstream` is
    False; `extra` is appended to its config. Yields its port."""
    return _broker("nats-server", lambda workdir, port: (
        f'server_name: "zm-baseline"\nlisten: "{LOOPBACK}:{port}"\n'
        + (f'jetstream {{\n  store_dir: "{workdir / "jetstream"}"\n}}\n' if jetstream else "")
        + extra))


def mosquitto() -> contextlib.AbstractContextManager[int]:
    """A mosquitto with persistence on, on 127.0.0.1; yields its port."""
    return _broker("mosquitto", lambda workdir, port: (
        f"listener {port} {LOOPBACK}\nallow_anonymous true\npersistence true\n"
        f"persistence_location {workdir}/\nmax_inflight_messages {WINDOW}\n"
        "log_dest stderr\nlog_type error\nlog_type warning\n"))


# --- (a) JetStream ----------------------------------------------------------------------


async def jetstream_run(url: str, mode: str, *, seconds: float = SECONDS,
                        max_count: int = MAX_COUNT, window: int = WINDOW) -> Run:
    """One run of `mode` (``publish_async`` or ``concurrent_publish``) into a fresh stream,
    deleted afterwards."""
    import nats

    nc = await nats.connect(url, allow_reconnect=False)
    stream = f"BASE{uuid.uuid4().hex[:8].upper()}"
    try:
        js = nc.jetstream(publish_async_max_pending=window)
        await js.add_stream(name=stream, subjects=[f"{stream}.>"])
        publish = _publish_async if mode == "publish_async" else _concurrent_publish
        run = await publish(js, f"{stream}.{SUBJECT}", stream, seconds, max_count, window)
        state = (await js.stream_info(stream)).state
        if state.messages != run.acked:
            run.error = f"the stream holds {state.messages} messages, {run.acked} were acked"
        await js.delete_stream(stream)
        return run
    finally:
        await nc.close()


async def _publish_async(js: Any, subject: str, prefix: str, seconds: float, max_count: int,
                         window: int) -> Run:
    run = Run()

    def acked(future: asyncio.Future[Any]) -> None:
        if future.cancelled() or future.exception() is not None:
            run.failed += 1
        else:
            run.acked += 1

    sent = 0
    started = time.perf_counter()
    stop = started + seconds
    while sent < max_count and time.perf_counter() < stop:
        future = await js.publish_async(subject, PAYLOAD,
                                        headers={"Nats-Msg-Id": f"{prefix}-{sent}"})
        future.add_done_callback(acked)
        sent += 1
    await js.publish_async_completed()  # at most `window` were still waiting
    run.seconds = time.perf_counter() - started
    return run


async def _concurrent_publish(js: Any, subject: str, prefix: str, seconds: float,
                              max_count: int, window: int) -> Run:
    run = Run()
    sent = 0
    started = time.perf_counter()
    stop = started + seconds

    async def publisher() -> None:
        nonlocal sent
        while sent < max_count and time.perf_counter() < stop:
            n, sent = sent, sent + 1
            try:
                await js.publish(subject, PAYLOAD, headers={"Nats-Msg-Id": f"{prefix}-{n}"})
            except Exception:
                run.failed += 1
            else:
                run.acked += 1

    await asyncio.gather(*(publisher() for _ in range(window)))
    run.seconds = time.perf_counter() - started
    return run


async def jetstream_baseline(repeat: int, seconds: float = SECONDS, max_count: int = MAX_COUNT,
                             timeout: float = 60.0,
                             report: Callable[[str, int, Run], None] | None = None,
                             ) -> dict[str, list[Run]]:
    """`repeat` runs of each mode against one nats-server, interleaved; each run must end
    within `timeout` seconds. `report(mode, n, run)` is called after each."""
    runs: dict[str, list[Run]] = {mode: [] for mode in NATS_MODES}
    with nats_server() as port:
        url = f"nats://{LOOPBACK}:{port}"
        for n in range(1, repeat + 1):
            for mode in NATS_MODES:
                async with asyncio.timeout(timeout):
                    run = await jetstream_run(url, mode, seconds=seconds, max_count=max_count)
                runs[mode].append(run)
                if report is not None:
                    report(mode, n, run)
    return runs


# --- (b) MQTT 5 -------------------------------------------------------------------------


def mqtt_run(port: int, *, seconds: float = SECONDS, max_count: int = MAX_COUNT,
             window: int = WINDOW, timeout: float = 60.0) -> Run:
    """One run of QoS 1 publishes to the mosquitto on `port`, `window` in flight."""
    from paho.mqtt import client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

    run = Run()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"zm-base-{uuid.uuid4().hex[:8]}",
                         protocol=MQTTProtocolVersion.MQTTv5)
    client.max_inflight_messages_set(window)
    client.max_queued_messages_set(0)  # paho queues what exceeds the window: no limit

    def on_publish(_client: Any, _userdata: Any, _mid: int, reason: Any,
                   _properties: Any) -> None:
        if reason.is_failure:
            run.failed += 1
        else:
            run.acked += 1

    client.on_publish = on_publish
    deadline = time.monotonic() + timeout
    client.connect(LOOPBACK, port, keepalive=60, clean_start=True)
    try:
        while not client.is_connected():
            _pump(client, deadline, "no CONNACK")
        sent = 0
        started = time.perf_counter()
        stop = started + seconds
        while True:
            if sent < max_count and time.perf_counter() < stop:
                # Keep a window's worth queued in paho beyond the `window` on the wire, so
                # each PUBACK is answered at once with the next PUBLISH.
                while sent - run.acked - run.failed < 2 * window and sent < max_count:
                    info = client.publish(TOPIC, PAYLOAD, qos=1)
                    if info.rc != mqtt.MQTT_ERR_SUCCESS:
                        raise RuntimeError(f"publish: {mqtt.error_string(info.rc)}")
                    sent += 1
            elif run.acked + run.failed >= sent:
                break
            _pump(client, deadline, f"{sent - run.acked - run.failed} PUBACKs missing")
        run.seconds = time.perf_counter() - started
    except RuntimeError as exc:
        run.error = str(exc)
    finally:
        client.disconnect()
        with contextlib.suppress(Exception):
            client.loop(0.1)  # sends the DISCONNECT
    return run


def _pump(client: Any, deadline: float, what: str) -> None:
    """One pass of paho's network loop; RuntimeError if the connection dropped or the run
    is past its deadline."""
    from paho.mqtt import client as mqtt

    rc = client.loop(timeout=0.05)
    if rc != mqtt.MQTT_ERR_SUCCESS:
        raise RuntimeError(f"connection lost: {mqtt.error_string(rc)}")
    if time.monotonic() > deadline:
        raise RuntimeError(f"timed out: {what}")


def mqtt_baseline(repeat: int, seconds: float = SECONDS, max_count: int = MAX_COUNT,
                  timeout: float = 60.0,
                  report: Callable[[str, int, Run], None] | None = None) -> list[Run]:
    """`repeat` runs against one mosquitto; `report("mqtt_qos1", n, run)` after each."""
    runs = []
    with mosquitto() as port:
        for n in range(1, repeat + 1):
            run = mqtt_run(port, seconds=seconds, max_count=max_count, timeout=timeout)
            runs.append(run)
            if report is not None:
                report("mqtt_qos1", n, run)
    return runs


# --- the script -------------------------------------------------------------------------


def median_rate(runs: list[Run]) -> float:
    return statistics.median(run.rate for run in runs) if runs else 0.0


def summary(runs: list[Run]) -> dict[str, Any]:
    return {"runs": [{**asdict(run), "msgs_per_s": run.rate} for run in runs],
            "median_msgs_per_s": median_rate(runs),
            "ok": all(not run.error and not run.failed for run in runs)}


def _print_run(mode: str, n: int, run: Run) -> None:
    problems = f"  failed={run.failed}" if run.failed else ""
    problems += f"  ERROR: {run.error}" if run.error else ""
    print(f"  {mode:<20} run {n}: {run.rate:>10,.0f} msgs/s  ({run.acked:,} acked in "
          f"{run.seconds:.2f} s){problems}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    _harness.add_run_flags(parser, quick="a small run: 0.3 s, 1 run each (smoke test)")
    parser.add_argument("--seconds", type=float, default=None,
                        help=f"publishing time per run (default {SECONDS})")
    parser.add_argument("--max-count", type=int, default=MAX_COUNT,
                        help="messages per run at the most")
    parser.add_argument("--only", choices=("nats", "mqtt"), default=None)
    args = parser.parse_args()
    _harness.check_run_flags(parser, args)
    if args.max_count < 1:
        parser.error("--max-count must be at least 1")
    seconds = args.seconds if args.seconds is not None else 0.3 if args.quick else SECONDS
    repeat = args.repeat or (1 if args.quick else 3)
    loop = _harness.apply_loop_flag(args)
    report = None if args.json else _print_run
    if not args.json:
        print(f"{SIZE} B messages, {WINDOW} acks in flight, {seconds:g} s per run, "
              f"{repeat} run(s); nats-py on {loop}")
    result: dict[str, Any] = {"benchmark": "uplink_baseline", "size": SIZE, "window": WINDOW,
                              "seconds": seconds, "repeat": repeat, "loop": loop}
    if args.only in (None, "nats"):
        if not args.json:
            print("(a) nats-py -> JetStream (file store), unique Nats-Msg-Id each")
        nats_runs = _harness.mesh_run(jetstream_baseline(repeat, seconds, args.max_count,
                                                         args.timeout, report))
        modes = {mode: summary(runs) for mode, runs in nats_runs.items()}
        best = max(NATS_MODES, key=lambda mode: modes[mode]["median_msgs_per_s"])
        result["nats"] = {**modes, "baseline": best,
                          "baseline_msgs_per_s": modes[best]["median_msgs_per_s"]}
        if not args.json:
            for mode in NATS_MODES:
                print(f"  {mode:<20} median {modes[mode]['median_msgs_per_s']:>8,.0f} msgs/s")
            print(f"  JetStream baseline: {result['nats']['baseline_msgs_per_s']:,.0f} msgs/s "
                  f"({best})")
    if args.only in (None, "mqtt"):
        if not args.json:
            print("(b) paho-mqtt -> mosquitto, MQTT 5 QoS 1 (persistence on, no subscriber)")
        mqtt = summary(mqtt_baseline(repeat, seconds, args.max_count, args.timeout, report))
        result["mqtt"] = {**mqtt, "baseline_msgs_per_s": mqtt["median_msgs_per_s"]}
        if not args.json:
            print(f"  MQTT baseline: {mqtt['median_msgs_per_s']:,.0f} msgs/s (median)")
    ok = all(part["ok"] for key in ("nats", "mqtt") if key in result
             for part in ([result[key][m] for m in NATS_MODES] if key == "nats"
                          else [result[key]]))
    result["ok"] = ok
    result["brokers"] = [{"program": program, "pid": pid} for program, pid in STARTED]
    if args.json:
        print(json.dumps(result))
    elif not ok:
        print("some runs failed or lost messages (see above)")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
