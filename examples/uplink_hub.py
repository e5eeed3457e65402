"""A site agent with uplinks to a NATS JetStream hub and an MQTT 5 hub, end to end.

Starts a local nats-server (JetStream, file store) and mosquitto on 127.0.0.1
(free ports, a temp dir), and a ``zeromesh agent`` with the uplinks of
``examples/uplink_nats.toml`` and ``examples/uplink_mqtt.toml`` (their ports and
data dir swapped for the temp ones). Then:

- a reading published in the mesh (through the agent's HTTP API, with a
  ``traceparent``) is read on the NATS hub with a plain nats-py subscription and
  on the MQTT hub with ``mosquitto_sub``;
- a command published on each hub (JetStream, ``mosquitto_pub``) comes into the
  mesh, read from the agent's ``/v1/subscribe/cmd.>`` stream;
- ``GET /v1/uplinks`` shows both connected with nothing waiting.

Needs nats-server, mosquitto and mosquitto-clients (Debian packages) and
``pip install 'zeromesh[uplink]'``. Run: ``python examples/uplink_hub.py``
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import aiohttp
import nats

HERE = Path(__file__).resolve().parent
LOOPBACK = "127.0.0.1"
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
DEADLINE = 30.0
"""Seconds for the whole example; every wait below is bounded by it."""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        port: int = probe.getsockname()[1]
        return port


async def listening(port: int) -> None:
    while True:
        try:
            _, writer = await asyncio.open_connection(LOOPBACK, port)
        except OSError:
            await asyncio.sleep(0.05)
            continue
        writer.close()
        return


def uplink_tables(example: str, port: int) -> str:
    """The [[uplink]] part of an example config, pointed at our local broker."""
    text = (HERE / example).read_text()
    table = text[text.index("[[uplink]]"):]
    return re.sub(r"127\.0\.0\.1:\d+", f"{LOOPBACK}:{port}", table)


async def main(tmp: Path) -> int:
    binaries = {name: shutil.which(name, path=os.environ["PATH"] + ":/usr/sbin:/sbin")
                for name in ("nats-server", "mosquitto", "mosquitto_sub", "mosquitto_pub")}
    missing = [name for name, path in binaries.items() if path is None]
    if missing:
        print(f"needs {', '.join(missing)} (apt-get install nats-server mosquitto "
              "mosquitto-clients)", file=sys.stderr)
        return 2
    nats_port, mqtt_port = free_port(), free_port()
    (tmp / "mosquitto.conf").write_text(
        f"listener {mqtt_port} {LOOPBACK}\nallow_anonymous true\npersistence true\n"
        f"persistence_location {tmp}/\n" + ("user root\n" if os.geteuid() == 0 else ""))
    (tmp / "agent.toml").write_text(
        f'data_dir = "{tmp / "agent"}"\nhttp = "{LOOPBACK}:0"\n'
        + uplink_tables("uplink_nats.toml", nats_port)
        + uplink_tables("uplink_mqtt.toml", mqtt_port))
    children: list[subprocess.Popen[str]] = []

    def start(*argv: str, **kw: object) -> subprocess.Popen[str]:
        child: subprocess.Popen[str] = subprocess.Popen(argv, text=True, **kw)  # type: ignore[call-overload]
        children.append(child)
        return child

    try:
        start(str(binaries["nats-server"]), "-a", LOOPBACK, "-p", str(nats_port), "-js",
              "-sd", str(tmp / "js"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        start(str(binaries["mosquitto"]), "-c", str(tmp / "mosquitto.conf"),
              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        await listening(nats_port)
        await listening(mqtt_port)
        env = {**os.environ, "ZEROMESH_INTERFACES": LOOPBACK, "PYTHONUNBUFFERED": "1"}
        agent = start(sys.executable, "-m", "mesh", "agent", "--config", str(tmp / "agent.toml"),
                      "--name", "site1-agent", "--mesh", f"uplink-{uuid.uuid4().hex[:8]}",
                      env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        assert agent.stdout is not None
        ready = await asyncio.to_thread(agent.stdout.readline)
        url = ready.rsplit("http=", 1)[1].strip()
        print(f"agent: {ready.strip()}")
        async with aiohttp.ClientSession() as http:
            while True:
                async with http.get(f"{url}/v1/uplinks") as response:
                    states = [u["state"] for u in await response.json()]
                if states == ["connected", "connected"]:
                    break
                await asyncio.sleep(0.05)
            print("uplinks: nats and mqtt connected")
            await export_reading(http, url, nats_port, mqtt_port)
            await import_commands(http, url, nats_port, mqtt_port, str(binaries["mosquitto_pub"]))
            async with http.get(f"{url}/v1/uplinks") as response:
                for status in await response.json():
                    print(f"uplink {status['url']}: {status['state']}, exported "
                          f"{status['exported']}, imported {status['imported']}, backlog "
                          f"{status['backlog']}")
        return 0
    finally:
        for child in reversed(children):
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        for child in children:
            try:
                child.wait(5)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()


async def export_reading(http: aiohttp.ClientSession, url: str, nats_port: int,
                         mqtt_port: int) -> None:
    """A reading published in the mesh, read on both hubs by their own plain clients."""
    nc = await nats.connect(f"nats://{LOOPBACK}:{nats_port}", allow_reconnect=False)
    sub = await nc.subscribe("site1.sensors.>")
    await nc.flush()
    # A persistent MQTT session for the reader, made before the reading exists (-E: exit
    # once subscribed); the broker keeps the reading for it until it comes back to read.
    reader = [str(shutil.which("mosquitto_sub")), "-V", "mqttv5", "-h", LOOPBACK, "-p",
              str(mqtt_port), "-t", "site1/sensors/#", "-q", "1", "-c", "-i", "demo-reader",
              "-x", "60"]
    await asyncio.to_thread(subprocess.run, [*reader, "-E"], check=True, timeout=10)
    async with http.post(f"{url}/v1/publish/sensors.kitchen.temp", data=b"21.5",
                         headers={"traceparent": TRACEPARENT}) as response:
        assert response.status == 202
    msg = await sub.next_msg(timeout=10)
    headers = msg.headers or {}
    print(f"nats client: {msg.subject} {msg.data.decode()} "
          f"traceparent={headers.get('traceparent')} Nats-Msg-Id={headers.get('Nats-Msg-Id')}")
    await nc.close()
    read = await asyncio.to_thread(subprocess.run, [*reader, "-C", "1", "-W", "20", "-F",
                                                    "%t %p"], capture_output=True, text=True,
                                   check=True, timeout=25)
    print(f"mosquitto_sub: {read.stdout.strip()}")


async def import_commands(http: aiohttp.ClientSession, url: str, nats_port: int,
                          mqtt_port: int, mosquitto_pub: str) -> None:
    """A command published on each hub, received in the mesh."""
    async with http.get(f"{url}/v1/subscribe/cmd.%3E") as stream:
        while not (await stream.content.readline()).startswith(b": subscribed"):
            pass
        nc = await nats.connect(f"nats://{LOOPBACK}:{nats_port}", allow_reconnect=False)
        await nc.jetstream().publish("site1.cmd.kitchen.light", b"on")
        await nc.close()
        await asyncio.to_thread(
            subprocess.run, [mosquitto_pub, "-V", "mqttv5", "-h", LOOPBACK, "-p",
                             str(mqtt_port), "-q", "1", "-t", "site1/cmd/kitchen/heater", "-m",
                             "off"], check=True, timeout=10)
        seen = 0
        while seen < 2:
            line = (await stream.content.readline()).decode()
            if line.startswith("data: "):
                event = json.loads(line[6:])
                print(f"mesh: {event['topic']} {event['data']} "
                      f"(origin {event['headers']['zeromesh-origin']})")
                seen += 1


async def stoppable(tmp: Path) -> int:
    """`main` under its deadline; SIGTERM cancels it as Ctrl-C does, so the hubs, the agent
    and the temp dir go too."""
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    async with asyncio.timeout(DEADLINE):
        return await main(tmp)


if __name__ == "__main__":
    with tempfile.TemporaryDirectory(prefix="zeromesh-uplink-") as tmp_dir:
        try:
            sys.exit(asyncio.run(stoppable(Path(tmp_dir))))
        except TimeoutError:
            print(f"uplink_hub: not done within {DEADLINE:g} s", file=sys.stderr)
            sys.exit(1)
        except (KeyboardInterrupt, asyncio.CancelledError):
            print("uplink_hub: stopped", file=sys.stderr)
            sys.exit(130)
