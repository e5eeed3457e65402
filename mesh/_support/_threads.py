"""HandlerThreads: the daemon threads the blocking `Node` runs handlers in.

``asyncio.to_thread`` runs them in the loop's default pool, whose threads
Python joins at exit: one handler that never returns kept the program from
exiting after ``node.close()``. These threads are daemons, so a handler still
running when its node closes is abandoned (with a warning naming it), never
waited for; the caller of the awaited `run` decides what its message becomes.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import logging
import os
import queue
import threading
from collections.abc import Callable
from typing import Any, Final, TypeVar

T = TypeVar("T")
_log = logging.getLogger("mesh.node")
MAX_THREADS: Final[int] = min(32, (os.cpu_count() or 1) + 4)
"""As many as the default pool this replaces would start."""


class Job:
    """One handler call: its future on the loop, and whether its own thread let it go."""

    __slots__ = ("released", "waiting", "what")

    def __init__(self, what: str) -> None:
        self.what = what
        self.waiting: asyncio.Future[Any] | None = None
        """The loop's side of the call, cancelled to stop waiting for it."""
        self.released = False
        """The handler itself stopped the wait (it closes its node): not abandoned."""

    def release(self) -> None:
        """On the loop: stop waiting for this call (its thread goes on, unwarned)."""
        self.released = True
        if self.waiting is not None:
            self.waiting.cancel()


_Item = tuple[concurrent.futures.Future[Any], Callable[[], Any], Job]


class HandlerThreads:
    """A pool of daemon threads started as needed, up to `max_threads`."""

    def __init__(self, name: str, max_threads: int = MAX_THREADS) -> None:
        self._name = name
        self._max = max_threads
        self._work: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._idle = threading.Semaphore(0)
        self._current: dict[int, Job] = {}
        """The job each busy thread runs, by thread ident."""
        self._shut = False

    async def run(self, what: str, fn: Callable[..., T], *args: Any,
                  abandoned: Callable[[], None] | None = None) -> T:
        """`fn(*args)` in one of the threads (in a copy of this context, as
        ``asyncio.to_thread``). Cancelled while it runs, it is abandoned: warned of, and
        `abandoned` is called (on the loop).

        Raises:
            RuntimeError: the pool was shut down.
        """
        job = Job(what)
        ctx = contextvars.copy_context()
        done: concurrent.futures.Future[T] = concurrent.futures.Future()
        with self._lock:
            if self._shut:
                raise RuntimeError("handler threads are shut down")
            self._work.put((done, lambda: ctx.run(fn, *args), job))
            if not self._idle.acquire(blocking=False) and len(self._threads) < self._max:
                thread = threading.Thread(target=self._serve, daemon=True,
                                          name=f"{self._name}-{len(self._threads)}")
                self._threads.append(thread)
                thread.start()
        waiting: asyncio.Future[T] = asyncio.wrap_future(done)
        job.waiting = waiting
        try:
            return await waiting
        except asyncio.CancelledError:
            if done.running() and not job.released:
                _log.warning("%s still running: abandoned (the node closed or the "
                             "handle did)", what)
                if abandoned is not None:
                    abandoned()
            raise

    def current(self) -> Job | None:
        """The job the calling thread runs (None: not one of ours, or idle)."""
        return self._current.get(threading.get_ident())

    def shutdown(self) -> None:
        """Idle threads end now, busy ones once their handler returns; none is waited for."""
        with self._lock:
            self._shut = True
            for _ in self._threads:
                self._work.put(None)

    def _serve(self) -> None:
        me = threading.get_ident()
        while (item := self._work.get()) is not None:
            done, call, job = item
            if done.set_running_or_notify_cancel():
                self._current[me] = job
                try:
                    done.set_result(call())
                except BaseException as exc:  # the awaiting side raises it
                    done.set_exception(exc)
                finally:
                    del self._current[me]
            self._idle.release()
