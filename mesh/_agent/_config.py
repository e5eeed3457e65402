"""The agent's settings: the node's, plus the HTTP listener and webhooks, from TOML.

Precedence is flag > ``ZEROMESH_*`` environment > config file > default, the
order a sidecar's operator expects: the file is the deployment, env and flags
are the overrides. Every key is checked at start; a bad file stops the agent
with the key and the reason (exit 2), never later at the first message.
"""

from __future__ import annotations

import ipaddress
import math
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Final

import msgspec

from .. import _names
from .._config import NodeConfig, convert, env_values
from .._support._text import quoted
from .._support._urls import http_url_problem
from .._uplink._settings import UplinkSettings
from .._uplink._settings import check as check_uplink
from ..errors import ConfigError

DEFAULT_HTTP: Final[str] = "127.0.0.1:7474"


class Webhook(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Deliver a topic pattern or a work queue to the app by HTTP POST; 2xx = ack."""

    url: str
    pattern: str | None = None
    """Topics to deliver (``*`` one segment, ``>`` the rest)."""
    queue: str | None = None
    """A work queue to be a worker of (exactly one of pattern/queue)."""
    durable: str | None = None
    """Durable subscription name for a pattern (needs data_dir): reliable messages
    published while the agent is down are delivered when it returns."""
    concurrency: int = 1
    """POSTs in flight at once; 1 keeps each publisher's order."""
    timeout: float = 5.0
    """Seconds one POST may take."""
    attempts: int = 5
    """POSTs per message before it goes to the dead-letter spool."""
    backoff: float = 0.2
    """First retry delay in seconds; grows exponentially with jitter."""
    accept: str | None = None
    """What the app reads, as an HTTP ``Accept`` header would say it: with
    ``application/json``, MessagePack payloads (typed sends) are POSTed as JSON, labelled
    so; other payloads go as they are."""

    @property
    def source(self) -> str:
        return f"queue {self.queue}" if self.queue else f"pattern {self.pattern}"


class ServiceApp(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """``[[service]]``: serve the mesh service `name` by POSTing each request to the app."""

    name: str
    url: str
    """Where each request is POSTed; a 2xx body is the reply."""
    concurrency: int = 16
    """Requests in flight to the app at once; the rest wait in the node's serving backlog."""
    timeout: float = 10.0
    """Seconds one POST may take before the requester gets an error."""


class AgentConfig(NodeConfig, kw_only=True, forbid_unknown_fields=True):
    """Everything `zeromesh agent` needs; top-level keys are the node's settings."""

    http: str = DEFAULT_HTTP
    """HOST:PORT of the HTTP API (port 0 = any free port)."""
    max_body: int = 0
    """Largest HTTP request body; 0 = max_message_size."""
    webhooks: list[Webhook] = msgspec.field(default_factory=list)
    uplinks: list[UplinkSettings] = msgspec.field(default_factory=list, name="uplink")
    """``[[uplink]]``: links to NATS JetStream or MQTT 5 brokers (need data_dir)."""
    services: list[ServiceApp] = msgspec.field(default_factory=list, name="service")
    """``[[service]]``: mesh services answered by an app over HTTP."""

    def validated(self) -> AgentConfig:
        config = super().validated()
        assert isinstance(config, AgentConfig)
        http_address(config.http)
        if config.max_body < 0:
            raise ConfigError("max_body", "must be >= 0")
        durables: dict[str, int] = {}
        for i, hook in enumerate(config.webhooks):
            _check_webhook(f"webhooks[{i}]", hook, config.data_dir)
            if hook.durable is not None:  # (a second one could never open it: it never ran)
                first = durables.setdefault(hook.durable, i)
                if first != i:
                    raise ConfigError(f"webhooks[{i}].durable",
                                      f"{quoted(hook.durable)} is the durable of webhooks[{first}]")
        seen: set[str] = set()
        for i, svc in enumerate(config.services):
            _check_service(f"service[{i}]", svc, seen)
        for i, link in enumerate(config.uplinks):
            check_uplink(f"uplink[{i}]", link)
            if config.data_dir is None:
                raise ConfigError(f"uplink[{i}]", "an uplink needs data_dir (its backlog "
                                                  "lives there)")
        return config

    def node_config(self) -> NodeConfig:
        return NodeConfig(**{f: getattr(self, f) for f in NodeConfig.__struct_fields__})

    @property
    def body_limit(self) -> int:
        return self.max_body or self.max_message_size


def http_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` with a literal IP (the agent binds exactly there).

    Raises:
        ConfigError: not an IP address and a port.
    """
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    try:
        ipaddress.ip_address(host)
        number = int(port)
    except ValueError:
        raise ConfigError("http", f"{quoted(text)}: use IP:PORT, e.g. {DEFAULT_HTTP}") from None
    if not sep or not 0 <= number <= 65535:
        raise ConfigError("http", f"{quoted(text)}: use IP:PORT, e.g. {DEFAULT_HTTP}")
    return host, number


def _check_webhook(key: str, hook: Webhook, data_dir: str | None) -> None:
    if (hook.pattern is None) == (hook.queue is None):
        raise ConfigError(key, "give exactly one of pattern or queue")
    problem = http_url_problem(hook.url)
    if problem is not None:
        raise ConfigError(f"{key}.url", problem)
    try:
        if hook.pattern is not None:
            _names.pattern(hook.pattern)
        else:
            _names.queue(hook.queue or "")
    except ConfigError as exc:
        raise ConfigError(f"{key}.{exc.key}", exc.reason) from None
    if hook.durable is not None:
        if hook.pattern is None:
            raise ConfigError(f"{key}.durable", "only a pattern webhook can be durable")
        if data_dir is None:
            raise ConfigError(f"{key}.durable", "a durable webhook needs data_dir")
        if not hook.durable or "." in hook.durable:
            raise ConfigError(f"{key}.durable", "use a single name segment")
    if hook.concurrency < 1 or hook.attempts < 1:
        raise ConfigError(key, "concurrency and attempts must be >= 1")
    if not hook.timeout > 0 or not hook.backoff >= 0:  # (NaN: neither)
        raise ConfigError(key, "timeout must be > 0 and backoff >= 0")


def _check_service(key: str, svc: ServiceApp, seen: set[str]) -> None:
    try:
        _names.service(svc.name)
    except ConfigError as exc:
        raise ConfigError(f"{key}.name", exc.reason) from None
    if svc.name in seen:
        raise ConfigError(f"{key}.name", f"service {quoted(svc.name)} is configured twice")
    seen.add(svc.name)
    problem = http_url_problem(svc.url)
    if problem is not None:
        raise ConfigError(f"{key}.url", problem)
    if svc.concurrency < 1:
        raise ConfigError(f"{key}.concurrency", "must be >= 1")
    if not 0 < svc.timeout <= 3600 or math.isnan(svc.timeout):
        raise ConfigError(f"{key}.timeout", "must be > 0 and <= 3600 seconds")


def load(path: str | None, env: Mapping[str, str], flags: Mapping[str, object]
         ) -> AgentConfig:
    """The effective config: flags > env > file > defaults, validated.

    Raises:
        ConfigError: the file cannot be read or parsed, or a key is bad.
    """
    values: dict[str, object] = {}
    if path:
        try:
            values = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError("config", f"{path}: {exc.strerror or exc}") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError("config", f"{path}: {exc}") from None
    values.update(env_values(AgentConfig, env))
    values.update({k: v for k, v in flags.items() if v is not None})
    return convert(values, AgentConfig).validated()
