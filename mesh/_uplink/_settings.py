"""One ``[[uplink]]`` of the agent's config, checked at start (exit 2 with key and reason)."""

from __future__ import annotations

import hashlib
import ssl
from pathlib import Path
from typing import Final
from urllib.parse import SplitResult, urlsplit

import msgspec

from .. import _names
from ..errors import ConfigError

NATS_SCHEMES: Final = frozenset({"nats", "nats+tls", "tls"})
MQTT_SCHEMES: Final = frozenset({"mqtt", "mqtts"})
_DEFAULT_PORTS: Final = {"nats": 4222, "nats+tls": 4222, "tls": 4222, "mqtt": 1883,
                         "mqtts": 8883}


class UplinkSettings(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """A link from this mesh to a NATS JetStream or MQTT 5 broker."""

    url: str
    """``nats://``, ``nats+tls://`` (JetStream) or ``mqtt://``, ``mqtts://`` (MQTT 5)."""
    prefix: str
    """This mesh's name on the hub: mesh topic T is hub subject ``<prefix>.T``."""
    export: list[str] = msgspec.field(default_factory=list)
    """Mesh topic patterns sent to the hub, at least once."""
    imports: list[str] = msgspec.field(default_factory=list, name="import")
    """Patterns (under the prefix) brought from the hub into the mesh."""
    stream: str = "ZEROMESH"
    """NATS: the JetStream stream, created if missing with subjects ``<prefix>.>``."""
    window: int = 256
    """Exported messages in flight (sent, not yet acknowledged by the hub)."""
    quota: int = 0
    """Bytes of unsent messages the export backlog may hold (its files stay near it);
    0 = the node's spool_quota."""
    session_expiry: int = 7 * 24 * 3600
    """MQTT: seconds the broker keeps our session (and queues imports) while we are away."""
    client_id: str = ""
    """MQTT client id; default ``zeromesh-<prefix>-<node name>``."""
    creds: str | None = None
    nkey: str | None = None
    user: str | None = None
    password: str | None = None
    token: str | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None

    @property
    def kind(self) -> str:
        return "nats" if self.parts.scheme in NATS_SCHEMES else "mqtt"

    @property
    def parts(self) -> SplitResult:
        return urlsplit(self.url)

    @property
    def host(self) -> str:
        return self.parts.hostname or ""

    @property
    def port(self) -> int:
        return self.parts.port or _DEFAULT_PORTS[self.parts.scheme]

    @property
    def tls(self) -> bool:
        return self.parts.scheme in ("nats+tls", "tls", "mqtts") or self.tls_ca is not None

    @property
    def shown_url(self) -> str:
        """The url without credentials (logs, /v1/uplinks)."""
        parts = self.parts
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{parts.scheme}://{host}:{self.port}"

    @property
    def slug(self) -> str:
        """A stable file/durable name for this uplink: its prefix and a hash of its url."""
        digest = hashlib.blake2s(f"{self.shown_url} {self.prefix}".encode(),
                                 digest_size=4).hexdigest()
        return f"{self.prefix.replace('.', '_')}-{digest}"

    def username(self) -> str | None:
        return self.user or self.parts.username

    def secret(self) -> str | None:
        return self.password or self.parts.password


def check(key: str, link: UplinkSettings) -> None:
    """Raises ConfigError naming ``uplink[i].<key>`` for the first bad setting."""
    parts = urlsplit(link.url)
    if parts.scheme not in NATS_SCHEMES | MQTT_SCHEMES:
        raise ConfigError(f"{key}.url", f"{link.url!r}: use nats://, nats+tls://, mqtt:// "
                                        "or mqtts://")
    try:
        port = parts.port
    except ValueError:
        raise ConfigError(f"{key}.url", f"{link.url!r}: bad port") from None
    if not parts.hostname or port == 0 or parts.path not in ("", "/"):
        raise ConfigError(f"{key}.url", f"{link.url!r}: give host[:port] and nothing more")
    if not link.prefix:
        raise ConfigError(f"{key}.prefix", "must not be empty (this mesh's name on the hub)")
    for pattern in (link.prefix,):
        if any(c in pattern for c in "*>/+#"):
            raise ConfigError(f"{key}.prefix", f"{pattern!r}: no wildcards or '/'")
    if link.prefix.startswith("$"):  # ($SYS, $JS, $share...: the brokers' own subjects)
        raise ConfigError(f"{key}.prefix", f"{link.prefix!r}: must not start with '$' "
                                           "(the broker's own subjects)")
    try:
        _names.topic(link.prefix)
    except ConfigError as exc:
        raise ConfigError(f"{key}.prefix", exc.reason) from None
    if not link.export and not link.imports:
        raise ConfigError(key, "give export or import patterns (or both)")
    for field, patterns in (("export", link.export), ("import", link.imports)):
        for pattern in patterns:
            try:
                _names.pattern(pattern)
            except ConfigError as exc:
                raise ConfigError(f"{key}.{field}", exc.reason) from None
    if link.kind == "nats" and (not link.stream or any(c in link.stream for c in " .*>")):
        raise ConfigError(f"{key}.stream", f"{link.stream!r}: a JetStream stream name "
                                           "(no spaces, '.', '*' or '>')")
    if link.window < 1 or link.quota < 0 or link.session_expiry < 0:
        raise ConfigError(key, "window must be >= 1, quota and session_expiry >= 0")
    for field in ("creds", "nkey", "tls_ca", "tls_cert", "tls_key"):
        path = getattr(link, field)
        if path is not None and not Path(path).is_file():
            raise ConfigError(f"{key}.{field}", f"{path}: no such file")
    if (link.tls_cert is None) != (link.tls_key is None):
        raise ConfigError(f"{key}.tls_cert", "give both tls_cert and tls_key, or neither")
    if link.tls:
        try:
            tls_context(link)
        except ConfigError as exc:
            raise ConfigError(f"{key}.{exc.key}", exc.reason) from None
    if link.kind == "mqtt" and (link.creds or link.nkey or link.token):
        raise ConfigError(key, "MQTT takes user/password and tls_* credentials only")
    _check_client_library(key, link.kind)


def tls_context(link: UplinkSettings) -> ssl.SSLContext:
    """The client side of `link`'s TLS: the system's CAs or `tls_ca`, and `tls_cert` with
    `tls_key` when given. Built at start (`check`) too, so that a file that is no PEM of
    its kind stops the agent with its name, rather than failing every connection.

    Raises:
        ConfigError: a file cannot be used (key ``tls_ca`` or ``tls_cert``, with why).
    """
    field = "tls_ca"
    try:
        context = ssl.create_default_context(cafile=link.tls_ca)
        if link.tls_cert and link.tls_key:
            field = "tls_cert"
            # (a callback for an encrypted key's passphrase: else OpenSSL asks the terminal)
            context.load_cert_chain(link.tls_cert, link.tls_key, password=_no_passphrase)
    except (ssl.SSLError, OSError) as exc:
        path = link.tls_ca if field == "tls_ca" else f"{link.tls_cert}, {link.tls_key}"
        raise ConfigError(field, f"{path}: unusable: {exc.strerror or exc}") from None
    return context


def _no_passphrase() -> bytes:
    return b""


def _check_client_library(key: str, kind: str) -> None:
    module = "nats" if kind == "nats" else "paho.mqtt.client"
    try:
        __import__(module)
    except ImportError:
        raise ConfigError(key, f"the {kind} uplink needs the uplink extra: "
                               "pip install 'zeromesh[uplink]'") from None
