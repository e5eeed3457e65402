"""Errors raised by the `mesh` package.

Every error zeromesh raises on purpose derives from `MeshError`; errors of
pyzmq, zeroconf and msgspec never escape the public API::

    MeshError (Exception)
    ├── ClosedError                   the node is closed or not started
    ├── ConfigError (also ValueError) .key, .reason: a bad setting or name
    ├── MessageTooLarge (ValueError)  .size, .limit
    ├── ProtocolError                 a peer sent something we cannot read (internal; dropped)
    ├── DeliveryError                 a message could not be delivered
    │   ├── RequestTimeout (TimeoutError)   .timeout
    │   ├── NoRespondersError         .name: no live peer serves it
    │   └── RemoteError               .service, .message: the service's handler failed
    └── SpoolFullError                .quota, .used
"""

from __future__ import annotations

from ._support._text import quoted


class MeshError(Exception):
    """Root of every error the `mesh` package raises."""


class ClosedError(MeshError):
    """The node is not running (never started, or already closed)."""

    def __init__(self, what: str = "node is closed") -> None:
        super().__init__(what)


class ConfigError(MeshError, ValueError):
    """A setting, name or argument is invalid."""

    def __init__(self, key: str, reason: str) -> None:
        self.key = key
        self.reason = reason
        super().__init__(f"{key}: {reason}")


class MessageTooLarge(MeshError, ValueError):
    """A payload is larger than the configured maximum message size."""

    def __init__(self, size: int, limit: int) -> None:
        self.size = size
        self.limit = limit
        super().__init__(f"message of {size} bytes exceeds the limit of {limit} bytes")


class ProtocolError(MeshError):
    """Bytes from the network that do not follow the protocol."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class DeliveryError(MeshError):
    """A message could not be delivered."""


class RequestTimeout(DeliveryError, TimeoutError):
    """No reply or no readiness within the timeout."""

    def __init__(self, what: str, timeout: float) -> None:
        self.timeout = timeout
        super().__init__(f"{what}: timed out after {timeout:g} s")


class NoRespondersError(DeliveryError):
    """No live peer serves this name."""

    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(f"no responders for {quoted(name)}")


class RemoteError(DeliveryError):
    """The service's handler raised; `message` is its error text (the server keeps serving)."""

    def __init__(self, service: str, message: str) -> None:
        self.service = service
        self.message = message
        super().__init__(f"service {quoted(service)} failed: {message}")


class SpoolFullError(MeshError):
    """The spool quota or the disk is full; nothing already accepted is lost."""

    def __init__(self, quota: int, used: int) -> None:
        self.quota = quota
        self.used = used
        super().__init__(f"spool full: {used} of {quota} bytes used")
