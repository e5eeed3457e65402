"""The durables the agent's config owns, remembered in its data dir from run to run.

A durable webhook or an uplink export pattern removed from the config file while the
agent runs has its durable ended at the reload (SIGHUP). One removed while the agent was
down was never ended: the agent no longer opened it, and publishers spooled every reliable
message on its pattern for it until `durable_expiry` (7 days). So the names the config
owns are written to ``<data dir>/agent-durables.json`` at each start and reload, and at
the next start those the config no longer names are ended. (A data dir without the file,
as from an agent older than this, ends nothing.)
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Final

from .._node import AsyncNode
from .._support._files import replace_json
from .._uplink._link import durable_name
from ..errors import MeshError
from ._config import AgentConfig

_log = logging.getLogger("mesh.agent")
FILE: Final[str] = "agent-durables.json"


def owned(config: AgentConfig) -> set[str]:
    """The durables `config` has the agent open: its durable webhooks' and one per uplink
    export pattern."""
    names = {hook.durable for hook in config.webhooks if hook.durable is not None}
    names.update(durable_name(link, pattern) for link in config.uplinks
                 for pattern in link.export)
    return names


class OwnedDurables:
    """What the config owned last, in `FILE` (nothing without a data dir)."""

    def __init__(self, node: AsyncNode, data_dir: str | None) -> None:
        self._node = node
        self._path = None if data_dir is None else Path(data_dir) / FILE

    async def start(self, names: set[str]) -> None:
        """End the durables the last run's config owned and `names` does not (call before
        anything can open them: an open one cannot be ended), then remember `names`."""
        if self._path is None:
            return
        before = await asyncio.to_thread(self._load)
        for name in sorted(before - names):
            try:
                freed = await self._node.end_durable(name)
            except MeshError as exc:
                _log.warning("durable %s, gone from the config while the agent was down, "
                             "not ended: %s", name, exc)
            else:
                _log.info("durable %s, gone from the config while the agent was down: "
                          "ended (%d spooled here freed)", name, freed)
        await self.save(names)

    async def save(self, names: set[str]) -> None:
        """Remember `names` (a failure is logged: the next start then ends too little)."""
        if self._path is not None:
            await asyncio.to_thread(self._write, sorted(names))

    def _load(self) -> set[str]:
        assert self._path is not None
        try:
            data = json.loads(self._path.read_text())
            return {name for name in data["durables"] if isinstance(name, str)}
        except FileNotFoundError:
            return set()
        except (OSError, ValueError, KeyError, TypeError) as exc:
            _log.warning("%s unreadable, ignored: %s", self._path, exc)
            return set()

    def _write(self, names: list[str]) -> None:
        assert self._path is not None
        try:
            replace_json(self._path, {"durables": names})
        except OSError as exc:
            _log.warning("cannot save %s: %s", self._path, exc)
