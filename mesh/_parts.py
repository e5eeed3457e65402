"""What the node's parts need from the node itself, as small protocols.

A part whose interest changes (a new subscription, queue or service) tells
the `Announcer`; a part that must wait for the mesh to reach some state asks
the `Waiter`. What membership needs from the parts is in
`_membership._listener`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol


class Announcer(Protocol):
    """Where a part reports that what this node offers changed."""

    def interest_changed(self) -> None:
        """Our subscriptions, queues or services changed: tell every peer."""


class Waiter(Protocol):
    """Waits, with a deadline, until the mesh reaches a state."""

    async def wait(self, ready: Callable[[], bool], timeout: float, what: str) -> None:
        """Return once `ready()` holds.

        Raises:
            RequestTimeout: it did not within `timeout` seconds (`what` names the wait).
        """

    def wake(self) -> None:
        """Something a wait may depend on changed: let each re-check its condition."""
