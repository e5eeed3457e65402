"""The local disk spool that turns any send into at-least-once delivery."""

from ._files import FsyncPolicy, unusable
from ._segment import RecordKind, RecoveryReport, charge
from ._store import SpoolStore

__all__ = ["FsyncPolicy", "RecordKind", "RecoveryReport", "SpoolStore", "charge", "unusable"]
