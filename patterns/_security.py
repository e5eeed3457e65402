"""CURVE keys, the allowlist, and the ZAP handler that enforces it.

A secure node is a CURVE server on every socket it binds and a CURVE client
on every socket it connects, so every byte between nodes is encrypted and
authenticated both ways. Who may connect is decided by a ZAP handler (a
thread on the node's own ZeroMQ context): only public keys in the allowlist
pass. Which server a client talks to is pinned by the server key it is given
for that endpoint (`Curve.trust`); a socket never connects to an endpoint
whose key it does not know, so there is no silent downgrade to plaintext.

Key files are ZeroMQ's certificate format (what ``zmq.auth`` and czmq
write): a public ``NAME.key`` and a secret ``NAME.key_secret`` (mode 0600).
An allowlist is a directory of public key files, or one file of them.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import Counter
from pathlib import Path
from typing import Any, Final

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from .errors import PatternError

_log = logging.getLogger("patterns.security")
ZAP_DOMAIN: Final[bytes] = b"zeromesh"
Z85_KEY_LEN: Final[int] = 40


class KeyFileError(PatternError):
    """A key file or allowlist cannot be used."""


def generate_keypair(directory: str | os.PathLike[str], name: str = "node") -> tuple[Path, Path]:
    """Write ``NAME.key`` (public) and ``NAME.key_secret`` (secret, 0600) into `directory`.

    Raises:
        KeyFileError: `name` is not a plain file name, the files exist already (keys are
            never overwritten) or they cannot be written.
    """
    if not name or not name.isprintable() or any(sep in name for sep in (os.sep, os.altsep)
                                                 if sep):
        # ('../x' wrote outside `directory`; '' made the files '.key' and '.key_secret')
        raise KeyFileError(f"name {name!r}: give a file name stem, without '/'")
    where = Path(directory)
    public, secret = where / f"{name}.key", where / f"{name}.key_secret"
    for path in (public, secret):
        if path.exists():
            raise KeyFileError(f"{path} exists; keys are never overwritten")
    try:
        where.mkdir(parents=True, exist_ok=True)
        old = os.umask(0o077)  # the secret file is born private, never briefly readable
        try:
            zmq.auth.create_certificates(where, name)
        finally:
            os.umask(old)
        secret.chmod(0o600)
        public.chmod(0o644)
    except OSError as exc:
        raise KeyFileError(f"cannot write keys in {where}: {exc.strerror or exc}") from None
    return public, secret


def load_secret(path: str | os.PathLike[str]) -> tuple[bytes, bytes]:
    """(public, secret) Z85 keys from a secret key file.

    Raises:
        KeyFileError: unreadable, not a secret key file, or readable by others.
    """
    file = Path(path)
    try:
        mode = file.stat().st_mode
        public, secret = zmq.auth.load_certificate(file)
    except (OSError, ValueError) as exc:
        raise KeyFileError(f"{file}: not a usable secret key file ({exc})") from None
    if secret is None:
        raise KeyFileError(f"{file}: holds no secret key (give the .key_secret file)")
    if mode & 0o077:
        raise KeyFileError(f"{file}: the secret key is readable by others; chmod 600 it")
    _check_z85(public, file)
    _check_z85(secret, file)
    return public, secret


def load_allowlist(path: str | os.PathLike[str]) -> frozenset[bytes]:
    """The public keys in a directory of key files (``*.key``) or in one key file.

    Raises:
        KeyFileError: nothing readable there, or a file that is not a key file.
    """
    where = Path(path)
    files = sorted(where.glob("*.key")) if where.is_dir() else [where]
    keys = set()
    for file in files:
        try:
            public, _ = zmq.auth.load_certificate(file)
        except (OSError, ValueError) as exc:
            raise KeyFileError(f"{file}: not a public key file ({exc})") from None
        _check_z85(public, file)
        keys.add(public)
    if not keys:
        raise KeyFileError(f"{where}: no public keys (*.key files) found")
    return frozenset(keys)


def _check_z85(key: bytes, file: Path) -> None:
    if len(key) != Z85_KEY_LEN:
        raise KeyFileError(f"{file}: a CURVE key is {Z85_KEY_LEN} Z85 characters")
    try:
        zmq.utils.z85.decode(key)
    except (ValueError, KeyError):
        raise KeyFileError(f"{file}: the key is not valid Z85") from None


class Curve:
    """One node's CURVE identity, its allowlist, and the server keys it trusts."""

    def __init__(self, public: bytes, secret: bytes, allowed: frozenset[bytes]) -> None:
        self.public = public
        self.secret = secret
        self.allowed = allowed | {public}
        self._server_keys: dict[str, bytes] = {}
        self._lock = threading.Lock()
        self.denied: Counter[bytes] = Counter()
        """Connection attempts refused by ZAP, by client key (bounded by `_MAX_DENIED`)."""
        self.cut: dict[bytes, int] = {}
        """Live connections cut since their key was revoked, by key (revoked keys only)."""

    @classmethod
    def from_files(cls, secret_key: str | os.PathLike[str],
                   allow: str | os.PathLike[str]) -> Curve:
        public, secret = load_secret(secret_key)
        return cls(public, secret, load_allowlist(allow))

    def replace_allowlist(self, allowed: frozenset[bytes]) -> frozenset[bytes]:
        """A new allowlist (a config reload): new connections and hellos are checked
        against it (one reference swap, safe for the ZAP thread reading it). Returns the
        keys it no longer holds: their live connections are cut by `Context.revoke`."""
        old, self.allowed = self.allowed, allowed | {self.public}
        removed = old - self.allowed
        with self._lock:
            self.cut = {key: n for key, n in self.cut.items() if key not in self.allowed}
        return removed

    def allows(self, key: str | bytes) -> bool:
        raw = key.encode("ascii", "replace") if isinstance(key, str) else key
        return raw in self.allowed

    def trust(self, endpoint: str, key: str | bytes) -> None:
        """Connect to `endpoint` only as the holder of `key` (an allowed key)."""
        raw = key.encode("ascii", "replace") if isinstance(key, str) else key
        with self._lock:
            self._server_keys[endpoint] = raw

    def retain(self, endpoints: set[str]) -> None:
        """Forget the keys of endpoints not in `endpoints` (their members are gone): a node
        that outlives many members would otherwise keep every endpoint it ever trusted."""
        with self._lock:
            self._server_keys = {endpoint: key for endpoint, key in self._server_keys.items()
                                 if endpoint in endpoints}

    def note_cut(self, key: bytes) -> None:
        """A live connection of revoked `key` was cut: say so once per key."""
        with self._lock:
            if key in self.allowed:
                return
            first = key not in self.cut
            self.cut[key] = self.cut.get(key, 0) + 1
        if first:
            _log.warning("cut the connections of CURVE key %s: it was removed from the "
                         "allowlist (its reconnects are refused)", key.decode("ascii", "replace"))

    @property
    def trusted(self) -> int:
        """How many endpoints have a trusted key."""
        return len(self._server_keys)

    def server_key(self, endpoint: str) -> bytes | None:
        with self._lock:
            return self._server_keys.get(endpoint)

    # ZAP credentials provider: called on the authenticator's thread.
    def callback(self, domain: str, key: bytes) -> bool:
        if key in self.allowed:
            return True
        with self._lock:
            if len(self.denied) < _MAX_DENIED or key in self.denied:
                first = key not in self.denied and key not in self.cut  # (cut: logged)
                self.denied[key] += 1
                if first:
                    _log.warning("refused a connection from unknown CURVE key %s "
                                 "(not in the allowlist)", key.decode("ascii", "replace"))
        return False


_MAX_DENIED: Final[int] = 1000


class ZapHandler:
    """The allowlist check for one ZeroMQ context, on a thread of its own."""

    def __init__(self, ctx: zmq.Context[Any], curve: Curve) -> None:
        self._auth = ThreadAuthenticator(zmq.Context.shadow(ctx.underlying), log=_log)
        self._auth.start()
        self._auth.configure_curve_callback(ZAP_DOMAIN.decode(), credentials_provider=curve)

    def stop(self) -> None:
        self._auth.stop()
