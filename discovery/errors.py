"""Errors raised by the discovery package.

::

    DiscoveryError          root: catch this to handle any discovery failure
     └── InvalidRecord      a TXT record, peer URL or interface that cannot be used

Records that arrive from the network are never raised to the caller: the mDNS
backend drops and counts them. `InvalidRecord` surfaces only for what *we* were
given (our own `PeerInfo`, a `--peer` URL, an interface), so the CLI can exit 2
with its one-line reason.
"""

from __future__ import annotations


class DiscoveryError(Exception):
    """Root of every error the discovery package raises."""


class InvalidRecord(DiscoveryError, ValueError):
    """A record, URL or interface failed validation; `reason` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


__all__ = ["DiscoveryError", "InvalidRecord"]
