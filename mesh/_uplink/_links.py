"""The agent's uplinks as a set: started with the agent, changed on SIGHUP.

A reload compares each ``[[uplink]]`` with the running ones: an unchanged
one keeps running (its connection and counters too), a changed or removed
one stops (its backlog stays on disk under its name, and is sent when an
uplink of the same url and prefix runs again), a new one starts. A prefix
change keeps the export durables (named by url and pattern), and what the old
backlog holds unacknowledged moves to the new one. Export patterns no longer
configured have their durable subscriptions ended (`AsyncNode.end_durable`),
so no publisher keeps spooling for them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

import msgspec

from patterns import TopicPattern

from .._node import AsyncNode
from .._spool import FsyncPolicy
from .._support._text import quoted
from ..errors import ConfigError, MeshError
from ._backlog import Backlog
from ._hub import ORIGIN_HEADER, Hub
from ._link import Uplink, durable_name
from ._settings import UplinkSettings

_log = logging.getLogger("mesh.uplink")


def new_hub(settings: UplinkSettings, node_name: str, data_dir: str | None = None) -> Hub:
    """The adapter for the url's scheme (imported here: the uplink extra is optional).
    With `data_dir`, an MQTT session's filters are remembered there (`_session`)."""
    if settings.kind == "nats":
        from ._nats import NatsHub
        return NatsHub(settings, node_name)
    from ._mqtt import MqttHub
    sessions = Path(data_dir) / "uplinks" / "mqtt-sessions" if data_dir is not None else None
    return MqttHub(settings, node_name, sessions)


class Uplinks:
    """Every running uplink of one agent."""

    def __init__(self, node: AsyncNode, data_dir: str | None, *, fsync: FsyncPolicy,
                 quota: int) -> None:
        self._node = node
        self._data_dir = data_dir
        self._fsync = fsync
        self._quota = quota
        self._running: dict[str, tuple[Uplink, asyncio.Task[None]]] = {}
        """By slug (url and prefix), with the settings they run with."""

    @property
    def links(self) -> list[Uplink]:
        return [link for link, _ in self._running.values()]

    def statuses(self) -> list[dict[str, object]]:
        return [link.status() for link in self.links]

    async def apply(self, wanted: list[UplinkSettings]) -> None:
        """Run exactly these uplinks (see the module docstring).

        Raises:
            ConfigError: an uplink without a data dir, two with the same url and prefix,
                or a new one whose backlog cannot be used (nothing running changes then).
        """
        if wanted and self._data_dir is None:
            raise ConfigError("uplink", "an uplink needs data_dir (its backlog lives there)")
        by_slug: dict[str, UplinkSettings] = {}
        durables: dict[str, UplinkSettings] = {}
        for settings in wanted:
            if settings.slug in by_slug:
                raise ConfigError("uplink", f"two uplinks to {settings.shown_url} with prefix "
                                            f"{quoted(settings.prefix)}")
            by_slug[settings.slug] = settings
            for pattern in settings.export:
                other = durables.setdefault(durable_name(settings, pattern), settings)
                if other is not settings:
                    raise ConfigError("uplink", f"two uplinks to {settings.shown_url} export "
                                                f"{quoted(pattern)} (prefixes "
                                                f"{quoted(other.prefix)} and "
                                                f"{quoted(settings.prefix)}): one durable "
                                                "subscription reads a pattern for a hub")
        # New uplinks' backlogs open before anything running changes: one that cannot be
        # used refuses the whole config, and what runs is kept as it was.
        opened: dict[str, Backlog] = {}
        try:
            for slug, settings in by_slug.items():
                if slug not in self._running:
                    opened[slug] = await self._backlog(settings)
        except BaseException:
            for unused in opened.values():
                await unused.aclose()
            raise
        gone: list[Uplink] = []
        """Stopped, not configured any more: their backlogs are open for `_hand_over`."""
        starting: list[tuple[UplinkSettings, Backlog]] = []
        try:
            for slug, (link, _) in list(self._running.items()):
                if by_slug.get(slug) != link.settings:
                    if slug in by_slug:
                        await self._stop(slug)
                    else:
                        gone.append(await self._halt(slug))
                    await self._end_unused(link.settings, durables)
            for slug, settings in by_slug.items():
                if slug not in self._running:
                    backlog = opened.pop(slug, None)  # (not `or`: an empty one is falsy)
                    if backlog is None:
                        backlog = await self._backlog(settings)
                    starting.append((settings, backlog))
            for link in gone:
                await _hand_over(link, starting)
        finally:  # (a changed uplink's backlog unusable now: the others start all the same)
            for link in gone:
                await link.backlog.aclose()
            for unused in opened.values():
                await unused.aclose()
            for settings, backlog in starting:
                self._start(settings, backlog)

    async def _backlog(self, settings: UplinkSettings) -> Backlog:
        """The uplink's backlog, open.

        Raises:
            ConfigError: it cannot be opened (its directory unusable).
        """
        assert self._data_dir is not None
        backlog = Backlog(Path(self._data_dir) / "uplinks" / settings.slug, fsync=self._fsync,
                          quota=settings.quota or self._quota)
        try:
            await backlog.open()
        except OSError as exc:
            await backlog.aclose()
            raise ConfigError("uplink", f"{settings.shown_url}: backlog unusable: "
                                        f"{exc.strerror or exc}") from None
        return backlog

    def _start(self, settings: UplinkSettings, backlog: Backlog) -> None:
        name, data_dir = self._node.name, self._data_dir
        link = Uplink(self._node, settings, lambda: new_hub(settings, name, data_dir), backlog)
        task = asyncio.get_running_loop().create_task(self._run(link),
                                                      name=f"zeromesh-uplink-{settings.slug}")
        self._running[settings.slug] = (link, task)
        _log.info("uplink %s (%s): started, export %s, import %s, %d waiting from before",
                  settings.shown_url, settings.prefix, settings.export, settings.imports,
                  len(backlog))

    async def _run(self, link: Uplink) -> None:
        try:
            await link.run()
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # a bug: say so loudly, the agent goes on
            _log.error("uplink %s stopped: %r", link.settings.shown_url, exc, exc_info=exc)
            raise

    async def _stop(self, slug: str) -> None:
        link = self._running[slug][0]
        try:
            await self._halt(slug)
        finally:
            await link.backlog.aclose()

    async def _halt(self, slug: str) -> Uplink:
        """Stop the uplink's tasks; its backlog stays open (the caller closes it)."""
        link, task = self._running.pop(slug)
        task.cancel()
        # (an uplink ended by a bug was logged by `_run`: the stop goes on)
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        return link

    async def _end_unused(self, old: UplinkSettings, kept: dict[str, UplinkSettings]
                          ) -> None:
        """End `old`'s export durables that no uplink of the new config reads (`kept`, by
        durable name): its publishers stop spooling for them (stopped, `old` holds none
        open)."""
        for pattern in dict.fromkeys(old.export):
            name = durable_name(old, pattern)
            if name in kept:
                continue
            try:
                await self._node.end_durable(name)
            except MeshError as exc:
                _log.warning("uplink %s (%s): export durable of %r not ended: %s",
                             old.shown_url, old.prefix, pattern, exc)

    async def aclose(self) -> None:
        for slug in list(self._running):
            await self._stop(slug)


async def _hand_over(old: Uplink, starting: list[tuple[UplinkSettings, Backlog]]) -> None:
    """Move what the backlog of `old` (no longer configured) holds unacknowledged to the
    backlog of an uplink starting to the same hub whose export takes its topic (a prefix
    change): its mesh side was acknowledged already, and left there it would wait for
    that url and prefix to come back. It goes out under the new prefix, which its origin
    header then names (else the new uplink would import its own export)."""
    for settings, backlog in starting:
        if settings.shown_url != old.settings.shown_url:
            continue
        patterns = [TopicPattern(pattern) for pattern in settings.export]
        moving = [(record_id, msg) for record_id, msg in old.backlog.waiting()
                  if any(pattern.matches(msg.topic) for pattern in patterns)]
        if not moving:
            continue
        origin = {ORIGIN_HEADER: settings.prefix}
        try:
            await backlog.add([msgspec.structs.replace(msg, headers={**msg.headers, **origin})
                               for _, msg in moving])
        except MeshError as exc:
            _log.warning("uplink %s (%s): %d waiting exports stay in its backlog, not moved "
                         "to prefix %s: %s", old.settings.shown_url, old.settings.prefix,
                         len(moving), settings.prefix, exc)
            continue
        old.backlog.done(record_id for record_id, _ in moving)
        _log.info("uplink %s (%s): %d waiting exports moved to prefix %s",
                  old.settings.shown_url, old.settings.prefix, len(moving), settings.prefix)
