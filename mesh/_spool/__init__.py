"""The local disk spool that turns any send into at-least-once delivery."""

from ._segment import RecordKind, RecoveryReport
from ._store import FsyncPolicy, SpoolStore

__all__ = ["FsyncPolicy", "RecordKind", "RecoveryReport", "SpoolStore"]
